/* Rusty Rail: the inner IPv6 packet's flow key and hash (docs/WIRE.md sections 4b, 5 and 6), from
 * packet bytes alone. The Python twin is rusty_rail/core/flow.py's inner6_flow_key; the golden fixtures
 * and the differential test hold the two to the same answers. Included by xdp_balancer.c only.
 */
#ifndef RR_IPV6_H
#define RR_IPV6_H

#include "rr_packet.h"

#define IP6_LEN 40
#define NH_HOP_BY_HOP 0
#define NH_ROUTING 43
#define NH_FRAGMENT 44
#define NH_ICMPV6 58
#define NH_DEST_OPTS 60
#define FRAG_OFFSET_M 0xFFF9            /* fragment offset (<< 3) and the M flag of a fragment header */

/* The flow hash of an IPv6 key: its 40 bytes (docs/WIRE.md section 6). */
static __always_inline __u32 flow_hash6(const struct rr_flow_key6 *key, __u32 seed)
{
	return rr_murmur3((const __u32 *)key, sizeof(*key) / 4, seed);
}

static __always_inline int is_walked(__u8 nh)
{
	return nh == NH_HOP_BY_HOP || nh == NH_ROUTING || nh == NH_DEST_OPTS || nh == NH_FRAGMENT;
}

/* 16 bytes (an IPv6 address) in two 64-bit moves. */
static __always_inline void copy16(__u8 *to, const __u8 *from)
{
	st64(to, ld64(from));
	st64(to + 8, ld64(from + 8));
}

/* docs/WIRE.md sections 4b and 5 for an inner IPv6 packet whose version and payload length were
 * checked: `inner` points at it (its 40 bytes are within the frame), `inner_len` is 40 + payload length.
 * Every byte of `key` is written (no memset first: the hit path counts stores). Returns 0,
 * RR_DROP_INNER_EXT_HEADERS, or RR_DROP_INNER_TRUNCATED (TCP/UDP, not a fragment, without its 4 port
 * bytes). Every length check is against inner_len (the contract's packet); the data_end checks beside
 * them are for the verifier. */
static __always_inline int inner6_flow_key(__u8 *inner, void *data_end, __u32 inner_len,
					   struct rr_flow_key6 *key)
{
	__u8 nh = inner[6];
	__u32 at = IP6_LEN;
	__u8 *h;
	int i;

	copy16(key->src, inner + 8);
	copy16(key->dst, inner + 24);
	st64(&key->sport, 0);   /* sport, dport, proto, pad */
	if (nh == IPPROTO_TCP || nh == IPPROTO_UDP)
		goto ports;     /* no extension headers: the usual case, without walking */

#pragma clang loop unroll(full)
	for (i = 0; i < RR_EXT_HEADERS; i++) {
		if (nh == NH_HOP_BY_HOP || nh == NH_ROUTING || nh == NH_DEST_OPTS) {
			h = inner + at;
			if (at + 2 > inner_len || (void *)(h + 2) > data_end)
				return RR_DROP_INNER_EXT_HEADERS;
			__u32 len = ((__u32)h[1] + 1) << 3;

			if (at + len > inner_len)
				return RR_DROP_INNER_EXT_HEADERS;
			nh = h[0];
			at += len;
		} else if (nh == NH_FRAGMENT) {
			h = inner + at;
			if (at + 8 > inner_len || (void *)(h + 8) > data_end)
				return RR_DROP_INNER_EXT_HEADERS;
			if (ld16(h + 2) & bpf_htons(FRAG_OFFSET_M)) {
				/* A fragment: the 3-tuple of its fragment header's next header, the same in
				 * every fragment of the packet (its transport header may be in another). */
				key->proto = h[0];
				return 0;
			}
			nh = h[0];      /* an atomic fragment (RFC 6946): a whole packet */
			at += 8;
		} else {
			break;
		}
	}
	if (is_walked(nh))
		return RR_DROP_INNER_EXT_HEADERS;       /* a fifth extension header */
	key->proto = nh;

	if (nh == IPPROTO_TCP || nh == IPPROTO_UDP) {
ports:
		h = inner + at;
		if (at + 4 > inner_len || (void *)(h + 4) > data_end)
			return RR_DROP_INNER_TRUNCATED;
		st32(&key->sport, ld32(h));     /* sport, dport: the 4 port bytes as they are */
		key->proto = nh;
		return 0;
	}

	/* ICMPv6 errors (RFC 4443 types 1-4) follow the flow they quote, reversed, as ICMP errors do for
	 * IPv4; the quoted packet's extension headers are not walked. */
	if (nh != NH_ICMPV6 || inner_len < at + 8 + IP6_LEN)
		return 0;
	h = inner + at;
	if ((void *)(h + 8 + IP6_LEN) > data_end || h[0] < 1 || h[0] > 4 || (h[8] >> 4) != 6)
		return 0;

	__u8 *emb = h + 8;
	__u8 emb_nh = emb[6];

	copy16(key->src, emb + 24);
	copy16(key->dst, emb + 8);
	key->proto = emb_nh;
	if ((emb_nh == IPPROTO_TCP || emb_nh == IPPROTO_UDP) && inner_len >= at + 8 + IP6_LEN + 4) {
		quoted_ports(&key->sport, &key->dport, emb + IP6_LEN, data_end);
	}
	return 0;
}

#endif
