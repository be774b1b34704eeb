/* SPDX-License-Identifier: Apache-2.0 */
/* What the tc programs (gre_decap.c, router_encap.c) share: reaching an skb's headers, and the GRE and
 * bpf_skb_adjust_room constants they both use. */
#ifndef RR_TC_H
#define RR_TC_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define GRE_HLEN 4 /* flags and protocol: the only GRE header either program writes */
#define IP_MF_OFFSET 0x3FFF

/* The kernel's bpf_skb_adjust_room flags for a decapsulation whose inner packet is of another IP family
 * than the outer header (Linux 6.3, include/uapi/linux/bpf.h): they set skb->protocol to the inner
 * family. Debian's linux-libc-dev (6.1) predates them, so they are spelt out here. */
#define RR_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define RR_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)

/* The Ethernet header, or NULL when the frame is shorter than one; *end is the end of what may be read.
 * The first `headers_max` bytes (those the caller reads) are pulled into the linear area first: frames
 * sent from a TX ring (an AF_PACKET sender) arrive with their headers in page fragments, outside
 * data..data_end, and would otherwise look truncated.
 * Every packet pointer taken before this call is invalid after it (bpf_skb_pull_data). */
static __always_inline struct ethhdr *rr_tc_eth(struct __sk_buff *skb, __u32 headers_max, void **end)
{
	__u32 want = skb->len < headers_max ? skb->len : headers_max;
	struct ethhdr *eth;

	if ((void *)(long)skb->data + want > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, want);
	eth = (void *)(long)skb->data;
	*end = (void *)(long)skb->data_end;
	if ((void *)(eth + 1) > *end)
		return NULL;
	return eth;
}

#endif
