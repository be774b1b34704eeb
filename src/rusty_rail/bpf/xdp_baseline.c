// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
/* Rusty Rail: the benchmark baseline (bench/xdp_test_run.py). The least an XDP forwarder does: read
 * the Ethernet header, swap its addresses, send the frame back out (XDP_TX). The balancer's cost is
 * reported relative to this, so the fixed cost of BPF_PROG_TEST_RUN per repetition is visible. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int rr_baseline(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *eth = data;
	__u8 tmp[6];

	if (data + 14 > data_end)
		return XDP_PASS;
	__builtin_memcpy(tmp, eth, 6);
	__builtin_memcpy(eth, eth + 6, 6);
	__builtin_memcpy(eth + 6, tmp, 6);
	return XDP_TX;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
