/* Rusty Rail: the per-service options in the XDP program (docs/WIRE.md section 11; core/options.py): the
 * bytes a service's slot is hashed on, and a QUIC short header's server ID. Included by xdp_balancer.c
 * only. A service without RR_OPT_SLOW flags never comes here for TCP or UDP.
 */
#ifndef RR_OPTIONS_H
#define RR_OPTIONS_H

#include "rr_maps.h"
#include "rr_ipv6.h"

#define QUIC_LONG_HEADER 0x80           /* RFC 9000 17.2: the header form bit */
#define QUIC_ROTATION_MASK 0xE0         /* the CID's config rotation bits (QUIC-LB section 3): ours are 0 */
#define UDP_LEN 8
#define QUIC_INNER_AT_MAX (ETH_LEN + IP6_LEN + 16)   /* Ethernet, outer IPv6, GRE with every option */

/* The fields a service with `flags` leaves out of its slot hash (section 11.1), zeroed in a copy of the
 * flow's key: `tail` is that copy's sport, dport, proto (at the same place relative to each other in
 * rr_flow_key and rr_flow_key6). "source-ip-port" leaves out the destination port, "source-ip" the
 * ports and the protocol too. */
_Static_assert(__builtin_offsetof(struct rr_flow_key, proto) - __builtin_offsetof(struct rr_flow_key, sport) == 4 &&
	       __builtin_offsetof(struct rr_flow_key6, proto) - __builtin_offsetof(struct rr_flow_key6, sport) == 4,
	       "leave_out() finds dport and proto from sport");

static __always_inline void leave_out(__u8 *tail, __u32 flags)
{
	st16(tail + 2, 0);
	if ((flags & RR_OPT_HASH_MASK) == RR_OPT_HASH_SOURCE_IP) {
		st16(tail, 0);
		tail[4] = 0;
	}
}

/* The slot hash of an IPv4 flow of a service with `flags`: `full` (the 5-tuple's) for "5-tuple", else
 * the hash of the key with the fields left out zeroed. */
static __always_inline __u32 slot_hash(const struct rr_flow_key *key, __u32 flags, __u32 seed, __u32 full)
{
	struct rr_flow_key k = *key;

	if (!(flags & RR_OPT_HASH_MASK))
		return full;
	leave_out((__u8 *)&k.sport, flags);
	return flow_hash(&k, seed);
}

/* The same for an IPv6 flow. */
static __always_inline __u32 slot_hash6(const struct rr_flow_key6 *key, __u32 flags, __u32 seed, __u32 full)
{
	struct rr_flow_key6 k = *key;

	if (!(flags & RR_OPT_HASH_MASK))
		return full;
	leave_out((__u8 *)&k.sport, flags);
	return flow_hash6(&k, seed);
}

/* The server ID a QUIC short header carries (section 11.4), or -1: the inner packet (validated) at
 * `inner_at` in the frame, ending at `end`. Only a UDP datagram that is not a fragment and has no IPv6
 * extension headers carries one; its header is found here again, off the hit path, rather than carried
 * there. Short header (form bit clear), the CID's first octet's rotation bits 0, then two bytes of
 * plaintext server ID (QUIC-LB section 5.2). */
static __always_inline int quic_server_id(struct xdp_md *ctx, __u32 inner_at, int six, __u32 end)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 udp_at;

	if (inner_at > QUIC_INNER_AT_MAX)
		return -1;
	__u8 *inner = data + inner_at;

	if (six) {
		if ((void *)(inner + IP6_LEN) > data_end || inner[6] != IPPROTO_UDP)
			return -1;
		udp_at = inner_at + IP6_LEN;
	} else {
		if ((void *)(inner + IP4_LEN) > data_end || inner[9] != IPPROTO_UDP ||
		    (ld16(inner + 6) & bpf_htons(IP_MF_OFFSET)))
			return -1;
		udp_at = inner_at + ((inner[0] & 0x0F) << 2);
	}
	if (udp_at + UDP_LEN + 4 > end)
		return -1;
	__u8 *p = data + udp_at + UDP_LEN;

	if ((void *)(p + 4) > data_end || (p[0] & QUIC_LONG_HEADER) || (p[1] & QUIC_ROTATION_MASK))
		return -1;
	return p[2] << 8 | p[3];
}

/* The backend index of a QUIC server ID in the service `svc_index`: listed there, in use; else -1. */
static __always_inline int quic_backend(__u32 svc_index, int server_id)
{
	__u32 key = RR_QUIC_KEY(svc_index, (__u32)server_id);
	__u32 *index = bpf_map_lookup_elem(&rr_quic, &key);

	if (!index)
		return -1;
	__u32 i = *index;

	if (i >= RR_MAX_BACKENDS || !is_member(svc_index, i))
		return -1;
	return i;
}

#endif
