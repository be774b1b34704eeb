// SPDX-License-Identifier: Apache-2.0
/* GRE receiver for the servers: tc clsact ingress, direct action.
 *
 * The kernel here has no GRE module, so a server cannot have a gre0 device. This program strips
 * outer IPv4 + GRE (RFC 2784, with the RFC 2890 key/sequence and the checksum option) in place and
 * hands the inner IPv4 packet to the stack as if it had arrived bare: the server holds the VIP on
 * `lo` and answers the client directly (DSR).
 *
 * Only GRE version 0 carrying IPv4 (protocol 0x0800) with no reserved/routing bits and an
 * unfragmented outer header is decapsulated; anything else is passed untouched, so the stack still
 * sees (and answers) what it would without us. The GRE checksum is not verified: the inner packet
 * carries its own transport checksum, which the stack checks.
 */
#include <linux/in.h>
#include <linux/pkt_cls.h>

#include "rr_tc.h"

#define GRE_CSUM 0x8000
#define GRE_KEY 0x2000
#define GRE_SEQ 0x1000
#define GRE_RESERVED 0x4C00 /* RFC 1701 routing + strict source route + recursion bits */
#define GRE_VERSION 0x0007
#define IP_MF_OFFSET 0x3FFF

/* Headers we may read: Ethernet, outer IPv4 with options, GRE with all options, inner IPv4. */
#define HEADERS_MAX (14 + 60 + 16 + 20)

SEC("tc")
int rr_gre_decap(struct __sk_buff *skb)
{
	void *end;
	struct iphdr *outer, *inner;
	__u16 *gre;
	__u16 flags;
	__u32 outer_len, gre_len;

	outer = rr_tc_ipv4(skb, HEADERS_MAX, &end);
	if (!outer || outer->protocol != IPPROTO_GRE)
		return TC_ACT_OK;
	if (outer->ihl < 5 || (outer->frag_off & bpf_htons(IP_MF_OFFSET)))
		return TC_ACT_OK;
	outer_len = outer->ihl * 4;
	if (outer_len > 60)
		return TC_ACT_OK;
	gre = (void *)outer + outer_len;
	if ((void *)(gre + 2) > end)
		return TC_ACT_OK;
	flags = bpf_ntohs(gre[0]);
	if ((flags & (GRE_VERSION | GRE_RESERVED)) || gre[1] != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	gre_len = 4;
	if (flags & GRE_CSUM)
		gre_len += 4;
	if (flags & GRE_KEY)
		gre_len += 4;
	if (flags & GRE_SEQ)
		gre_len += 4;
	inner = (void *)gre + gre_len;
	if ((void *)(inner + 1) > end || inner->version != 4)
		return TC_ACT_OK;
	/* Removes outer IPv4 + GRE right after the Ethernet header; the MAC header is kept. */
	if (bpf_skb_adjust_room(skb, -(__s32)(outer_len + gre_len), BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
