// SPDX-License-Identifier: Apache-2.0
/* GRE receiver for the servers: tc clsact ingress, direct action.
 *
 * The kernel here has neither the GRE nor the ip6_gre module, so a server cannot have a gre0 or ip6gre0
 * device. This program strips the outer IPv4 or IPv6 header and GRE (RFC 2784, with the RFC 2890
 * key/sequence and the checksum option) in place and hands the inner IPv4 or IPv6 packet to the stack as
 * if it had arrived bare: the server holds the VIPs on `lo` and answers the client directly (DSR).
 * Either outer family may carry either inner family (docs/WIRE.md section 8: the balancer's outer family
 * is the backend address's); when they differ, the skb's protocol and the Ethernet type become the
 * inner family's.
 *
 * Only GRE version 0 with no reserved/routing bits, carrying IPv4 (0x0800) or IPv6 (0x86DD) whose version
 * nibble agrees, is decapsulated: behind an unfragmented outer IPv4 header, or an outer IPv6 header whose
 * next header is GRE (no extension headers, as a balancer or the lab's router sends it). Anything else
 * is passed untouched, so the stack still sees (and answers) what it would without us. The GRE checksum
 * is not verified: the inner packet carries its own transport checksum, which the stack checks.
 */
#include <linux/pkt_cls.h>

#include "rr_tc.h"

#define GRE_CSUM 0x8000
#define GRE_KEY 0x2000
#define GRE_SEQ 0x1000
#define GRE_RESERVED 0x4C00 /* RFC 1701 routing + strict source route + recursion bits */
#define GRE_VERSION 0x0007

/* Headers we may read: Ethernet, outer IPv4 with options (longer than IPv6's 40), GRE with all options,
 * the inner packet's first byte. */
#define HEADERS_MAX (14 + 60 + 16 + 1)

SEC("tc")
int rr_gre_decap(struct __sk_buff *skb)
{
	void *end;
	struct ethhdr *eth;
	__u16 *gre;
	__u16 flags, outer_proto, inner_proto;
	__u8 *inner;
	__u32 outer_len, gre_len;
	__u64 decap = 0;

	eth = rr_tc_eth(skb, HEADERS_MAX, &end);
	if (!eth)
		return TC_ACT_OK;
	outer_proto = eth->h_proto;
	if (outer_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *outer = (void *)(eth + 1);

		if ((void *)(outer + 1) > end || outer->version != 4 || outer->protocol != IPPROTO_GRE)
			return TC_ACT_OK;
		if (outer->ihl < 5 || (outer->frag_off & bpf_htons(IP_MF_OFFSET)))
			return TC_ACT_OK;
		outer_len = outer->ihl * 4;
	} else if (outer_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *outer = (void *)(eth + 1);

		if ((void *)(outer + 1) > end || outer->version != 6 || outer->nexthdr != IPPROTO_GRE)
			return TC_ACT_OK;
		outer_len = sizeof(*outer);
	} else {
		return TC_ACT_OK;
	}
	if (outer_len > 60)
		return TC_ACT_OK;
	gre = (void *)(eth + 1) + outer_len;
	if ((void *)(gre + 2) > end)
		return TC_ACT_OK;
	flags = bpf_ntohs(gre[0]);
	if (flags & (GRE_VERSION | GRE_RESERVED))
		return TC_ACT_OK;
	gre_len = GRE_HLEN;
	if (flags & GRE_CSUM)
		gre_len += 4;
	if (flags & GRE_KEY)
		gre_len += 4;
	if (flags & GRE_SEQ)
		gre_len += 4;
	inner = (void *)gre + gre_len;
	if ((void *)(inner + 1) > end)
		return TC_ACT_OK;
	inner_proto = gre[1];
	if (inner_proto == bpf_htons(ETH_P_IP)) {
		if (*inner >> 4 != 4)
			return TC_ACT_OK;
		if (outer_proto != inner_proto)
			decap = RR_ADJ_ROOM_DECAP_L3_IPV4;
	} else if (inner_proto == bpf_htons(ETH_P_IPV6)) {
		if (*inner >> 4 != 6)
			return TC_ACT_OK;
		if (outer_proto != inner_proto)
			decap = RR_ADJ_ROOM_DECAP_L3_IPV6;
	} else {
		return TC_ACT_OK;
	}
	/* Removes the outer header + GRE right after the Ethernet header; the MAC header is kept. */
	if (bpf_skb_adjust_room(skb, -(__s32)(outer_len + gre_len), BPF_ADJ_ROOM_MAC, decap))
		return TC_ACT_SHOT;
	/* The stack reads skb->protocol (set above by the flag); captures and XDP-less taps read this. */
	if (decap && bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &inner_proto, sizeof(inner_proto), 0))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
