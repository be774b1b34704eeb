/* SPDX-License-Identifier: Apache-2.0 */
/* What the tc programs (gre_decap.c, router_encap.c) share: reaching the IPv4 header of an skb. */
#ifndef RR_TC_H
#define RR_TC_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* The IPv4 header after the Ethernet header, or NULL when the frame is not IPv4 or too short; *end
 * is the end of what may be read. The first `headers_max` bytes (those the caller reads) are pulled
 * into the linear area first: frames sent from a TX ring (an AF_PACKET sender) arrive with their
 * headers in page fragments, outside data..data_end, and would otherwise look truncated.
 * Every packet pointer taken before this call is invalid after it (bpf_skb_pull_data). */
static __always_inline struct iphdr *rr_tc_ipv4(struct __sk_buff *skb, __u32 headers_max, void **end)
{
	__u32 want = skb->len < headers_max ? skb->len : headers_max;
	struct ethhdr *eth;
	struct iphdr *ip;

	if ((void *)(long)skb->data + want > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, want);
	eth = (void *)(long)skb->data;
	*end = (void *)(long)skb->data_end;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > *end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->version != 4)
		return NULL;
	return ip;
}

#endif
