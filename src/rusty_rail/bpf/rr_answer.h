/* Rusty Rail: the answers the XDP program sends itself (docs/WIRE.md sections 8b and 11.3), as plain IP
 * back to the router the frame came from: ICMP / ICMPv6 echo replies, and "fragmentation needed" /
 * "packet too big" for packets too long for the path toward their backend. The Python twin is
 * rusty_rail/core/icmp.py; the golden fixtures and the differential test hold the two to the same bytes.
 *
 * Each answer is a global function (the verifier walks it once, with its arguments unknown, rather than
 * again for every path of rr_balance that reaches it), so it checks every bound itself. The inner packet
 * is at `inner_at` in the frame, already validated by rr_balance (docs/WIRE.md section 4, 4b); an answer
 * keeps the bytes it reuses where they are and moves the frame's start, as the forward path does.
 * Included by xdp_balancer.c only, after rr_counters.h and rr_ipv6.h.
 */
#ifndef RR_ANSWER_H
#define RR_ANSWER_H

#include "rr_counters.h"
#include "rr_ipv6.h"

#define ICMP_HLEN 8
#define QUOTE4 548                      /* an IPv4 answer stays within 576 bytes (RFC 1812 4.3.2.3) */
#define QUOTE6 1232                     /* an IPv6 one within 1280 (RFC 4443 2.4(c)) */
#define ANSWER_TTL 64
#define TOO_BIG_TOS 0xC0                /* precedence "internetwork control", as Linux's ICMP errors */
#define IP_DF 0x4000
#define IP_OFFSET 0x1FFF
#define ICMP_ECHO_REPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_FRAG_NEEDED 4
#define ICMP_ECHO_REQUEST 8
#define ICMPV6_PACKET_TOO_BIG 2
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define INNER_AT_MAX (ETH_LEN + IP6_LEN + 16)   /* Ethernet, outer IPv6, GRE with every option */
#define NOT_ANSWERED (-1)

/* The ones' complement sum of `len` bytes at `offset`, folded to 16 bits in host order (csum_fold), or
 * -1 when they are not in the frame. Global: its loop is walked once. */
__attribute__((noinline)) int rr_csum(struct xdp_md *ctx, __u64 offset, __u64 len)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	/* 64-bit arguments: a 32-bit one is compared as such and widened after, losing its bounds. */
	if (offset > ETH_LEN + IP6_LEN + ICMP_HLEN || len > RR_MAX_CSUM_LEN || data + offset + len > data_end)
		return -1;
	return csum_fold(csum_bytes(data + offset, data_end, len));
}

/* RFC 1624 eqn. 3: a checksum after one 16-bit word changed (network-order values). */
static __always_inline __u16 csum_replace(__u16 check, __u16 old, __u16 new)
{
	__u32 sum = (__u16)~check + (__u16)~old + (__u32)new;

	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	return (__u16)~sum;
}

/* Ethernet of an answer: to the frame's sender (`mac`, saved before the frame moved), from the device. */
static __always_inline void answer_ethernet(__u8 *eth, const __u8 *mac, const struct rr_config *cfg, __u16 type)
{
	st32(eth, ld32(mac));
	st16(eth + 4, ld16(mac + 4));
	st32(eth + 6, ld32(cfg->local_mac));
	st16(eth + 10, ld16(cfg->local_mac + 4));
	st16(eth + 12, bpf_htons(type));
}

/* IPv4 of an answer: no options, ID 0 and DF (RFC 6864 atomic), TTL 64, ICMP, addresses as given. */
static __always_inline void answer_ipv4(__u8 *ip, __u8 tos, __u32 total, __be32 saddr, __be32 daddr)
{
	__u32 first = bpf_htonl(0x45000000 | (__u32)tos << 16 | total);
	__u64 sum = (__u64)first + bpf_htonl(IP_DF) + bpf_htons(ANSWER_TTL << 8 | IPPROTO_ICMP) + saddr + daddr;

	st32(ip, first);
	st32(ip + 4, bpf_htonl(IP_DF));
	st16(ip + 8, bpf_htons(ANSWER_TTL << 8 | IPPROTO_ICMP));
	st16(ip + 10, (__u16)~csum_fold_small(sum));
	st32(ip + 12, saddr);
	st32(ip + 16, daddr);
}

/* The token bucket of the "too big" answers (core/options.py TokenBucket): 1 when one may be sent now. */
static __always_inline int icmp_allowed(const struct rr_config *cfg)
{
	__u32 zero = 0;
	struct rr_icmp_bucket *b = bpf_map_lookup_elem(&rr_icmp_bucket, &zero);
	__u64 now = clock_ns();

	if (!b)
		return 0;
	if (now > b->last_ns) {
		__u64 credit = b->credit_ns + (now - b->last_ns);

		b->credit_ns = credit < cfg->icmp_capacity_ns ? credit : cfg->icmp_capacity_ns;
		b->last_ns = now;
	}
	if (!cfg->icmp_period_ns || b->credit_ns < cfg->icmp_period_ns)
		return 0;
	b->credit_ns -= cfg->icmp_period_ns;
	return 1;
}

/* Cut the frame to `keep` bytes from its start, then move its start by `delta` (the headers an answer
 * needs before the bytes it keeps in place): 0, or -1 when the kernel refused (nothing sent). */
static __always_inline int reshape(struct xdp_md *ctx, __u32 keep, int delta)
{
	int tail = (int)(ctx->data_end - ctx->data) - (int)keep;

	if (tail < 0)
		return -1;
	if (tail > 0 && bpf_xdp_adjust_tail(ctx, -tail))
		return -1;
	if (delta && bpf_xdp_adjust_head(ctx, delta))
		return -1;
	return 0;
}

/* docs/WIRE.md section 11.3: answer the inner packet at `inner_at` if it is an echo request (IPv4: ICMP
 * type 8, not a fragment; IPv6: ICMPv6 type 128 right after the fixed header). XDP_TX, or NOT_ANSWERED
 * (the frame untouched) for anything else. */
__attribute__((noinline)) int rr_echo(struct xdp_md *ctx, __u64 inner_at, __u64 six)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct rr_config *cfg = bpf_map_lookup_elem(&rr_config, &zero);
	__u8 mac[6];

	if (!cfg || inner_at > INNER_AT_MAX || data + ETH_LEN > data_end ||
	    data + inner_at + IP4_LEN + ICMP_HLEN > data_end)
		return NOT_ANSWERED;
	__u8 *inner = data + inner_at;

	__builtin_memcpy(mac, (__u8 *)data + 6, 6);
	if (six) {
		__u32 total = IP6_LEN + be16_at(inner + 4);

		if ((void *)(inner + IP6_LEN + ICMP_HLEN) > data_end)
			return NOT_ANSWERED;
		if (inner[6] != NH_ICMPV6 || inner[40] != ICMPV6_ECHO_REQUEST || total < IP6_LEN + ICMP_HLEN)
			return NOT_ANSWERED;
		__u16 check = be16_at(inner + 42), code = inner[41];

		/* The fixed header stays where it is: the new Ethernet header goes right before it. */
		if (reshape(ctx, inner_at + total, (int)inner_at - ETH_LEN))
			return drop(RR_DROP_TX_FAILED);
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (data + ETH_LEN + IP6_LEN + ICMP_HLEN > data_end)
			return drop(RR_DROP_TX_FAILED);
		__u8 *ip6 = data + ETH_LEN;
		__u64 a = ld64(ip6 + 8), b = ld64(ip6 + 16);

		answer_ethernet(data, mac, cfg, ETH_P_IPV6);
		st32(ip6, bpf_htonl(0x60000000));               /* traffic class and flow label 0 */
		ip6[7] = ANSWER_TTL;
		copy16(ip6 + 8, ip6 + 24);
		st64(ip6 + 24, a);
		st64(ip6 + 32, b);
		ip6[40] = ICMPV6_ECHO_REPLY;
		st16(ip6 + 42, bpf_htons(csum_replace(check, ICMPV6_ECHO_REQUEST << 8 | code, ICMPV6_ECHO_REPLY << 8 | code)));
		count(RR_STAT_ICMP_ECHO);
		return XDP_TX;
	}
	__u32 ihl4 = (inner[0] & 0x0F) << 2;
	__u32 total = be16_at(inner + 2);

	if (inner[9] != IPPROTO_ICMP || (ld16(inner + 6) & bpf_htons(IP_MF_OFFSET)) || ihl4 < IP4_LEN ||
	    total < ihl4 + ICMP_HLEN)
		return NOT_ANSWERED;
	__u8 *icmp = inner + ihl4;

	if ((void *)(icmp + ICMP_HLEN) > data_end || icmp[0] != ICMP_ECHO_REQUEST)
		return NOT_ANSWERED;
	__u16 check = be16_at(icmp + 2), code = icmp[1];
	__u8 tos = inner[1];
	__be32 saddr = ld32(inner + 12), daddr = ld32(inner + 16);

	/* The ICMP message stays where it is: a 20-byte header (the request's options dropped) before it. */
	if (reshape(ctx, inner_at + total, (int)(inner_at + ihl4) - ETH_LEN - IP4_LEN))
		return drop(RR_DROP_TX_FAILED);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + ETH_LEN + IP4_LEN + ICMP_HLEN > data_end)
		return drop(RR_DROP_TX_FAILED);
	icmp = data + ETH_LEN + IP4_LEN;
	answer_ethernet(data, mac, cfg, ETH_P_IP);
	answer_ipv4(data + ETH_LEN, tos, total - ihl4 + IP4_LEN, daddr, saddr);
	icmp[0] = ICMP_ECHO_REPLY;
	st16(icmp + 2, bpf_htons(csum_replace(check, ICMP_ECHO_REQUEST << 8 | code, code)));
	count(RR_STAT_ICMP_ECHO);
	return XDP_TX;
}

/* docs/WIRE.md section 8b: the inner packet at `inner_at` is too long for the path toward its backend,
 * whose usable MTU (less the encapsulation) is `mtu`. "Fragmentation needed" (IPv4 with DF, not a later
 * fragment, not an ICMP error) or "packet too big" (IPv6, not an ICMPv6 error) when the token bucket
 * allows (XDP_TX); else a counted drop. */
__attribute__((noinline)) int rr_too_big(struct xdp_md *ctx, __u64 inner_at, __u64 six, __u64 mtu)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct rr_config *cfg = bpf_map_lookup_elem(&rr_config, &zero);
	__u8 mac[6];
	int sum;

	if (!cfg || inner_at > INNER_AT_MAX || data + ETH_LEN > data_end || data + inner_at + IP6_LEN + 1 > data_end)
		return drop(RR_DROP_OUTPUT_TOO_BIG);   /* rr_balance checked it is there: not reached */
	__u8 *inner = data + inner_at;

	__builtin_memcpy(mac, (__u8 *)data + 6, 6);
	if (six) {
		__u32 total = IP6_LEN + be16_at(inner + 4);
		__u32 quote = total < QUOTE6 ? total : QUOTE6;

		if (inner[6] == NH_ICMPV6 && inner[40] < ICMPV6_ECHO_REQUEST)
			return drop(RR_DROP_OUTPUT_TOO_BIG);       /* no error about an error (RFC 4443 2.4(e)) */
		if (!icmp_allowed(cfg))
			return drop(RR_DROP_ICMP_RATE_LIMITED);
		if (reshape(ctx, inner_at + quote, (int)inner_at - (ETH_LEN + IP6_LEN + ICMP_HLEN)))
			return drop(RR_DROP_TX_FAILED);
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (data + ETH_LEN + IP6_LEN + ICMP_HLEN + IP6_LEN > data_end)
			return drop(RR_DROP_TX_FAILED);
		__u8 *ip6 = data + ETH_LEN;
		__u8 *icmp = ip6 + IP6_LEN;
		__u8 *quoted = icmp + ICMP_HLEN;

		answer_ethernet(data, mac, cfg, ETH_P_IPV6);
		st32(ip6, bpf_htonl(0x60000000));
		st16(ip6 + 4, bpf_htons(ICMP_HLEN + quote));
		st16(ip6 + 6, bpf_htons(NH_ICMPV6 << 8 | ANSWER_TTL));
		copy16(ip6 + 8, quoted + 24);           /* from the packet's destination, to its source */
		copy16(ip6 + 24, quoted + 8);
		st32(icmp, bpf_htonl(ICMPV6_PACKET_TOO_BIG << 24));    /* type, code 0, checksum 0 for now */
		st32(icmp + 4, bpf_htonl((__u32)mtu));
		sum = rr_csum(ctx, ETH_LEN + IP6_LEN, ICMP_HLEN + quote);
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (sum < 0 || data + ETH_LEN + IP6_LEN + ICMP_HLEN > data_end)
			return drop(RR_DROP_TX_FAILED);
		ip6 = data + ETH_LEN;
		/* The pseudo-header (RFC 8200 8.1): both addresses, the length, the next header. */
		__u64 pseudo = (__u64)(__u32)sum + bpf_htonl(ICMP_HLEN + quote) + bpf_htonl(NH_ICMPV6);
		const __u32 *w = (const __u32 *)(ip6 + 8);

		pseudo += (__u64)w[0] + w[1] + w[2] + w[3] + w[4] + w[5] + w[6] + w[7];
		st16(ip6 + IP6_LEN + 2, (__u16)~csum_fold(pseudo));
		count(RR_STAT_ICMP_TOO_BIG);
		return XDP_TX;
	}
	__u32 ihl4 = (inner[0] & 0x0F) << 2;
	__u32 total = be16_at(inner + 2);
	__u32 quote = total < QUOTE4 ? total : QUOTE4;
	__u16 frag = be16_at(inner + 6);

	if (!(frag & IP_DF) || (frag & IP_OFFSET) || ihl4 < IP4_LEN)
		return drop(RR_DROP_OUTPUT_TOO_BIG);
	if (inner[9] == IPPROTO_ICMP) {
		__u8 *type = inner + ihl4;

		if ((void *)(type + 1) > data_end)
			return drop(RR_DROP_OUTPUT_TOO_BIG);
		if (*type == 3 || *type == 4 || *type == 5 || *type == 11 || *type == 12)
			return drop(RR_DROP_OUTPUT_TOO_BIG);       /* RFC 1122 3.2.2 */
	}
	if (!icmp_allowed(cfg))
		return drop(RR_DROP_ICMP_RATE_LIMITED);
	if (reshape(ctx, inner_at + quote, (int)inner_at - (ETH_LEN + IP4_LEN + ICMP_HLEN)))
		return drop(RR_DROP_TX_FAILED);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + ETH_LEN + IP4_LEN + ICMP_HLEN + IP4_LEN > data_end)
		return drop(RR_DROP_TX_FAILED);
	__u8 *icmp = data + ETH_LEN + IP4_LEN;
	__u8 *quoted = icmp + ICMP_HLEN;

	answer_ethernet(data, mac, cfg, ETH_P_IP);
	answer_ipv4(data + ETH_LEN, TOO_BIG_TOS, IP4_LEN + ICMP_HLEN + quote, ld32(quoted + 16), ld32(quoted + 12));
	st32(icmp, bpf_htonl(ICMP_DEST_UNREACH << 24 | ICMP_FRAG_NEEDED << 16));
	st32(icmp + 4, bpf_htonl((__u32)mtu & 0xFFFF));     /* unused, next-hop MTU (RFC 1191 4) */
	sum = rr_csum(ctx, ETH_LEN + IP4_LEN, ICMP_HLEN + quote);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (sum < 0 || data + ETH_LEN + IP4_LEN + ICMP_HLEN > data_end)
		return drop(RR_DROP_TX_FAILED);
	st16(data + ETH_LEN + IP4_LEN + 2, (__u16)~(__u16)sum);
	count(RR_STAT_ICMP_TOO_BIG);
	return XDP_TX;
}

#endif
