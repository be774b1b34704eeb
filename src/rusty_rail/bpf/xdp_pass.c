// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
/* Rusty Rail: an XDP program that passes every frame to the host.
 *
 * Why it exists: on a veth, frames a program sends with XDP_TX (or redirects) are delivered only when
 * the peer veth runs an XDP program too (docs in /work/shared/DESIGN.md); without one they count as
 * xdp_tx errors and vanish. The lab and the tests attach this to the balancer's peer.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int rr_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
