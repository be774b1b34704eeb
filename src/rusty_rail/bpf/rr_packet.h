/* Rusty Rail: what the XDP program computes from packet bytes alone, without maps: wide loads and
 * stores, the RFC 1071 checksum, the flow hash (docs/WIRE.md section 6) and the inner flow key
 * (section 5). Each has a Python twin in rusty_rail/core, and the golden fixtures and the differential
 * tests hold the two to the same bytes. Included by xdp_balancer.c only.
 */
#ifndef RR_PACKET_H
#define RR_PACKET_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "rr_hash.h"
#include "rr_structs.h"

#define ETH_LEN 14
#define IP4_LEN 20
#define IP_MF_OFFSET 0x3FFF             /* MF flag and fragment offset */

/* Longest GRE header + payload whose checksum we verify. A non-multi-buffer XDP frame lives in one
 * page, so no real frame reaches this; a longer one is dropped as GRE_CHECKSUM (not verifiable). */
#define RR_MAX_CSUM_LEN 4096

static __always_inline __u16 be16_at(const __u8 *p)
{
	return bpf_ntohs(*(const __u16 *)p);
}

/* Wide loads and stores at any byte offset (the verifier allows misaligned packet and map value
 * accesses unless BPF_F_STRICT_ALIGNMENT, which the loader does not set): one instruction where
 * __builtin_memcpy through a byte pointer would make four or six. Byte copies, so order-neutral. */
static __always_inline __u32 ld32(const void *p)
{
	return *(const __u32 *)p;
}

static __always_inline __u16 ld16(const void *p)
{
	return *(const __u16 *)p;
}

static __always_inline __u64 ld64(const void *p)
{
	return *(const __u64 *)p;
}

static __always_inline void st64(void *p, __u64 v)
{
	*(__u64 *)p = v;
}

static __always_inline void st32(void *p, __u32 v)
{
	*(__u32 *)p = v;
}

static __always_inline void st16(void *p, __u16 v)
{
	*(__u16 *)p = v;
}

/* RFC 1071 end-around-carry fold of a sum of 16- or 32-bit words to 16 bits. A sum of words read in
 * host order folds to the byte-swapped network-order sum; 0xFFFF (a correct checksum) is the same
 * either way, and a complemented host-order sum stored in host order is the right checksum field. */
static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xFFFFFFFF) + (sum >> 32);
	sum = (sum & 0xFFFFFFFF) + (sum >> 32);
	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	return (__u16)sum;
}

/* csum_fold for a sum below 2^35 (at most eight 32-bit words): after three 16-bit end-around folds
 * it is at most 0xFFFF. A fold's result is determined by the sum (0 only for 0, else the value in
 * 1..0xFFFF congruent to it mod 0xFFFF), so this agrees with csum_fold wherever both apply. */
static __always_inline __u16 csum_fold_small(__u64 sum)
{
	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	return (__u16)sum;
}

/* Ones' complement sum of `len` bytes at `start` (len <= RR_MAX_CSUM_LEN, checked by the caller; the
 * bytes are within the frame, also checked by the caller). An odd tail is padded with zeros, as RFC
 * 1071 says. Returns 0 (never a valid sum of a GRE header, whose protocol field is non-zero) if the
 * verifier-only bounds checks fail, which the caller's length checks rule out. */
static __always_inline __u64 csum_bytes(void *start, void *data_end, __u32 len)
{
	__u32 words = len >> 2;
	__u64 sum = 0;
	__u32 i;

#pragma clang loop unroll(disable)
	for (i = 0; i < RR_MAX_CSUM_LEN / 4; i++) {
		__u32 *p = start + (i << 2);

		if (i >= words)
			break;
		if ((void *)(p + 1) > data_end)
			return 0;
		sum += *p;
	}

	__u32 rest = len & 3;
	__u8 *t = start + (len & (RR_MAX_CSUM_LEN - 4));   /* == len & ~3, bounded for the verifier */

	if (rest) {
		__u32 w;

		/* The tail as the first bytes of a zero-padded word, in the same order as the loads above. */
		if ((void *)(t + 1) > data_end)
			return 0;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
		w = t[0];
		if (rest >= 2) {
			if ((void *)(t + 2) > data_end)
				return 0;
			w |= (__u32)t[1] << 8;
		}
		if (rest == 3) {
			if ((void *)(t + 3) > data_end)
				return 0;
			w |= (__u32)t[2] << 16;
		}
#else
		w = (__u32)t[0] << 24;
		if (rest >= 2) {
			if ((void *)(t + 2) > data_end)
				return 0;
			w |= (__u32)t[1] << 16;
		}
		if (rest == 3) {
			if ((void *)(t + 3) > data_end)
				return 0;
			w |= (__u32)t[2] << 8;
		}
#endif
		sum += w;
	}
	return sum;
}

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

/* murmur3 x86_32 (Appleby) of `nblocks` 32-bit little-endian blocks (a constant: the loop unrolls),
 * without a tail: flow keys are whole blocks. rusty_rail.core.flowhash.flow_hash's function. */
static __always_inline __u32 rr_murmur3(const __u32 *block, const int nblocks, __u32 seed)
{
	__u32 h = seed;
	int i;

#pragma clang loop unroll(full)
	for (i = 0; i < nblocks; i++) {
		__u32 k = block[i];

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
		k = __builtin_bswap32(k);
#endif
		k *= 0xCC9E2D51;
		k = rotl32(k, 15);
		k *= 0x1B873593;
		h ^= k;
		h = rotl32(h, 13);
		h = h * 5 + 0xE6546B64;
	}
	return rr_fmix32(h ^ (__u32)(nblocks * 4));
}

/* The flow hash of an IPv4 key: its 16 bytes (docs/WIRE.md section 6). */
static __always_inline __u32 flow_hash(const struct rr_flow_key *key, __u32 seed)
{
	return rr_murmur3((const __u32 *)key, sizeof(*key) / 4, seed);
}

/* The ports of a packet quoted in an ICMP error (RFC 792, RFC 4443 section 2.4: the start of the packet
 * that caused it), reversed: it travelled the other way, so its destination port is the flow's source
 * port. Left as they are (zero) when the quote ends before them. */
static __always_inline void quoted_ports(__u16 *sport, __u16 *dport, __u8 *ports, void *data_end)
{
	if ((void *)(ports + 4) > data_end)
		return;
	*sport = ld16(ports + 2);
	*dport = ld16(ports);
}

static __always_inline int is_icmp_error(__u8 type)
{
	/* unreachable (incl. fragmentation needed), time exceeded, parameter problem */
	return type == 3 || type == 11 || type == 12;
}

/* docs/WIRE.md section 5 for an inner packet whose version, IHL and total length were checked.
 * `inner` points at it, `inner_len` is its total length, `ihl4` its header length in bytes.
 * Returns 0, or RR_DROP_INNER_TRUNCATED (TCP/UDP without its 4 port bytes). */
static __always_inline int inner_flow_key(__u8 *inner, void *data_end, __u32 inner_len, __u32 ihl4,
					  struct rr_flow_key *key)
{
	__u8 proto = inner[9];
	__u8 *l4;

	key->src = ld32(inner + 12);
	key->dst = ld32(inner + 16);
	key->proto = proto;

	/* Fragments: the 3-tuple, so every fragment of a datagram goes where its first one went. */
	if (ld16(inner + 6) & bpf_htons(IP_MF_OFFSET))
		return 0;

	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		if (inner_len < ihl4 + 4)
			return RR_DROP_INNER_TRUNCATED;
		l4 = inner + ihl4;
		if ((void *)(l4 + 4) > data_end)
			return RR_DROP_INNER_TRUNCATED;
		st32(&key->sport, ld32(l4));    /* sport, dport: the 4 port bytes as they are */
		return 0;
	}

	/* ICMP errors follow the flow they are about (its tuple reversed: it travelled the other way),
	 * so "fragmentation needed" reaches the backend that sent the too-big packet (as in Katran). */
	if (proto != IPPROTO_ICMP || inner_len < ihl4 + 8 + IP4_LEN)
		return 0;
	l4 = inner + ihl4;
	if ((void *)(l4 + 8 + IP4_LEN) > data_end || !is_icmp_error(l4[0]))
		return 0;

	__u8 *emb = l4 + 8;
	__u32 emb_ihl4 = (emb[0] & 0x0F) << 2;

	if ((emb[0] >> 4) != 4 || emb_ihl4 < IP4_LEN || inner_len < ihl4 + 8 + emb_ihl4)
		return 0;       /* no complete embedded header: the plain 3-tuple */

	__u8 emb_proto = emb[9];

	key->src = ld32(emb + 16);
	key->dst = ld32(emb + 12);
	key->proto = emb_proto;
	if ((emb_proto == IPPROTO_TCP || emb_proto == IPPROTO_UDP) && !(be16_at(emb + 6) & IP_MF_OFFSET) &&
	    inner_len >= ihl4 + 8 + emb_ihl4 + 4) {
		quoted_ports(&key->sport, &key->dport, emb + emb_ihl4, data_end);
	}
	return 0;
}

#endif
