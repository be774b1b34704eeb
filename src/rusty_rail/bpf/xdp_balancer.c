// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
/* Rusty Rail: the XDP data plane. docs/WIRE.md is the contract, section by section:
 * frames that are not GRE over IPv4 or IPv6 go to the host (XDP_PASS); GRE frames are validated, hashed
 * on their inner flow (IPv4 or IPv6), given a backend (connection table, then Maglev table) and sent
 * back out of the same device re-encapsulated in the backend's family (XDP_TX), or dropped with a
 * counted reason.
 *
 * The Maglev tables are built in Python (rusty_rail/core/maglev.py) and written into rr_maglev; this
 * program only indexes them, one table per service (section 10). There are only services: the
 * environment form of the configuration is one catch-all service, found without a map lookup. Maps
 * and structs: rr_maps.h, rr_structs.h; the helpers that read packet bytes: rr_packet.h and rr_ipv6.h;
 * finding a flow's service: rr_services.h.
 *
 * Verifier notes (kernel 6.18, clang 14):
 * - Every logical length check is made against the outer/inner total length (the contract's notion
 *   of "the packet"); every read is additionally guarded by a data_end check, which the logic already
 *   implies, because the verifier cannot know that.
 * - The GRE checksum loop is a plain bounded loop (unrolling disabled) over 32-bit words; only the
 *   loop counter is precise, so the states after the loop prune against each other.
 *
 * Where the time goes (BPF_PROG_TEST_RUN, bench/xdp_test_run.py, in multiples of the bare MAC-swap
 * program; found by taking one piece out at a time): of a hit in rr_conns' ~2.9, the harness and the
 * program's own call ~0.9, parsing ~0.3, the lookup ~1.0 (a call into the kernel's hash table; where
 * returns pass a mitigation thunk, as SRSO's safe RET here, a call and return alone costs ~0.2-0.4),
 * the rest ~0.6 (clock, backend, member bit, output headers, three per-CPU counters ~0.2). So a call
 * per packet is what to avoid: the flow cache (rr_flow_cache.h) serves a flow's later packets in a tick
 * without one (~1.8 in all), the clock is read once a tick, and an expired entry that already holds what
 * an update would write is restamped in place. A new flow adds murmur3 (~0.4) and the LRU insert (~5.7).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "rr_maps.h"
#include "rr_counters.h"
#include "rr_packet.h"
#include "rr_ipv6.h"
#include "rr_services.h"
#include "rr_options.h"
#include "rr_answer.h"
#include "rr_flow_cache.h"

#define OUT_GRE_LEN 4

#define GRE_F_CSUM 0x8000
#define GRE_F_KEY 0x2000
#define GRE_F_SEQ 0x1000
#define GRE_F_RESERVED 0x4C00           /* routing, strict source route: RFC 2784 2.3 says discard */
#define GRE_F_VERSION 0x0007

#define OUT_TTL 64
#define OUT_DF 0x4000

/* rr_conns6's update, in a function of its own (a BPF subprogram): written inline beside rr_conns'
 * clang merges the two calls into one whose map the verifier then cannot know, and no longer turns the
 * IPv4 path's update into a direct call. */
static __attribute__((noinline)) long insert6(struct rr_flow_key6 *key, struct rr_conn *conn)
{
	return bpf_map_update_elem(&rr_conns6, key, conn, BPF_ANY);
}

/* The flow's connection entry. One call site per connection table: clang sinks two lookups of different
 * maps into one call whose map the verifier cannot know, so it calls the generic helper (an indirect
 * call) instead of inlining the hash lookup: that was the IPv4 and IPv6 hit paths' regression, a fifth
 * of each. The empty asm after the IPv4 lookup leaves the two branches different last instructions, so
 * nothing is sunk (bpftool's xlated dump shows no bpf_map_lookup_elem call left). */
static __always_inline struct rr_conn *find_conn(int six, struct rr_flow_key *key, struct rr_flow_key6 *key6)
{
	struct rr_conn *conn;

	if (!six) {
		conn = bpf_map_lookup_elem(&rr_conns, key);
		barrier_var(conn);
	} else {
		conn = bpf_map_lookup_elem(&rr_conns6, key6);
	}
	return conn;
}

/* The two 16-byte backend identities (rr_backend.addr, rr_conn.backend_addr) are equal. */
static __always_inline int same_backend(const __u8 *a, const __u8 *b)
{
	return ld64(a) == ld64(b) && ld64(a + 8) == ld64(b + 8);
}

static __always_inline __u64 conn_timeout(const struct rr_config *cfg, __u8 proto)
{
	if (proto == IPPROTO_TCP)
		return cfg->conn_timeout_ns[RR_TIMEOUT_TCP];
	if (proto == IPPROTO_UDP)
		return cfg->conn_timeout_ns[RR_TIMEOUT_UDP];
	return cfg->conn_timeout_ns[RR_TIMEOUT_OTHER];
}

/* The GRE checksum (RFC 2784 2.5) over the `len` bytes at `offset` in the frame is right. rr_csum is a
 * global function, so the verifier walks its loop once, with offset and length unknown: written inline
 * it walked the loop's iterations again for every path here (outer family, GRE header variant), three
 * quarters of all its work. Off the usual path: only GRE with the C flag comes here. A longer packet
 * than RR_MAX_CSUM_LEN is not verifiable: not right. */
static __always_inline int gre_checksum_ok(struct xdp_md *ctx, __u32 offset, __u32 len)
{
	return rr_csum(ctx, offset, len) == 0xFFFF;
}

SEC("xdp")
int rr_balance(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 frame_len = data_end - data;

	/* -- 1. Is the frame ours? -------------------------------------------------------------- */
	if (data + ETH_LEN + IP4_LEN > data_end)
		goto pass;
	__u8 *eth = data;
	__u8 *ip = data + ETH_LEN;
	__u16 ethertype = ld16(eth + 12);
	__u32 l3_len;           /* the outer header: 20 (IPv4, no options) or 40 (IPv6) bytes */
	__u32 outer_len;        /* the outer packet: IPv4 total length, or 40 + IPv6 payload length */

	if (ethertype == bpf_htons(ETH_P_IP)) {
		__u8 ver_ihl = ip[0];

		if ((ver_ihl >> 4) != 4 || ip[9] != IPPROTO_GRE)
			goto pass;
		/* -- 2. Outer IPv4 -------------------------------------------------------------------- */
		__u32 ihl = ver_ihl & 0x0F;

		if (ihl < 5)
			return drop(RR_DROP_OUTER_BAD_IHL);
		if (ihl > 5)
			return drop(RR_DROP_OUTER_OPTIONS);
		outer_len = be16_at(ip + 2);
		if (outer_len < IP4_LEN || outer_len > frame_len - ETH_LEN)
			return drop(RR_DROP_OUTER_BAD_LENGTH);
		{
			const __u32 *w = (const __u32 *)ip;
			__u64 sum = (__u64)w[0] + w[1] + w[2] + w[3] + w[4];

			if (csum_fold_small(sum) != 0xFFFF)
				return drop(RR_DROP_OUTER_BAD_CHECKSUM);
		}
		if (ld16(ip + 6) & bpf_htons(IP_MF_OFFSET))
			return drop(RR_DROP_OUTER_FRAGMENT);
		l3_len = IP4_LEN;
	} else if (ethertype == bpf_htons(ETH_P_IPV6)) {
		/* GRE must follow the fixed header: extension headers first make it the host's. */
		if (data + ETH_LEN + IP6_LEN > data_end || (ip[0] >> 4) != 6 || ip[6] != IPPROTO_GRE)
			goto pass;
		/* -- 2b. Outer IPv6 ------------------------------------------------------------------- */
		outer_len = IP6_LEN + be16_at(ip + 4);
		if (outer_len > frame_len - ETH_LEN)
			return drop(RR_DROP_OUTER_BAD_LENGTH);
		l3_len = IP6_LEN;
	} else {
		goto pass;
	}

	/* -- 3. GRE ------------------------------------------------------------------------------- */
	__u32 gre_avail = outer_len - l3_len;   /* GRE header + payload, to the outer packet's end */
	__u8 *gre = ip + l3_len;

	if (gre_avail < 4 || (void *)(gre + 4) > data_end)
		return drop(RR_DROP_GRE_TRUNCATED);
	__u32 gre_len = 4;
	__u32 gre_word = ld32(gre);
	int six;                /* the inner packet is IPv6 */

	/* The usual headers (no flags, version 0, protocol IPv4 or IPv6) pass every check below with 4
	 * bytes: one comparison instead of them. */
	if (gre_word == bpf_htonl(ETH_P_IP)) {
		six = 0;
	} else if (gre_word == bpf_htonl(ETH_P_IPV6)) {
		six = 1;
	} else {
		__u32 flags = be16_at(gre);

		if (flags & GRE_F_VERSION)
			return drop(RR_DROP_GRE_VERSION);
		if (flags & GRE_F_RESERVED)
			return drop(RR_DROP_GRE_RESERVED);
		/* 4 bytes, plus 4 for each of checksum(+reserved1), key, sequence number (RFC 2890). */
		gre_len += ((flags >> 13) & 4) + ((flags >> 11) & 4) + ((flags >> 10) & 4);

		if (gre_avail < gre_len)
			return drop(RR_DROP_GRE_TRUNCATED);
		if ((flags & GRE_F_CSUM) && !gre_checksum_ok(ctx, ETH_LEN + l3_len, gre_avail))
			return drop(RR_DROP_GRE_CHECKSUM);
		if (ld16(gre + 2) == bpf_htons(ETH_P_IP))
			six = 0;
		else if (ld16(gre + 2) == bpf_htons(ETH_P_IPV6))
			six = 1;
		else
			return drop(RR_DROP_GRE_PROTOCOL);
		/* The key and sequence number are parsed (gre_len) and not used. */
	}

	/* -- 4, 5. The inner packet and its flow key ---------------------------------------------- */
	__u32 inner_avail = gre_avail - gre_len;
	__u8 *inner = gre + gre_len;
	struct rr_flow_key key;         /* zeroed in the IPv4 branch: the IPv6 path writes key6 instead */
	struct rr_flow_key6 key6;
	__u32 inner_len;
	__u8 tos;               /* IPv4 TOS or IPv6 traffic class: the outer header's */
	int reason;
	__u32 inner_at = ETH_LEN + l3_len + gre_len;   /* where the inner packet starts in the frame */

	if (!six) {
		if (inner_avail < IP4_LEN || (void *)(inner + IP4_LEN) > data_end)
			return drop(RR_DROP_INNER_TRUNCATED);
		__u8 inner_ver_ihl = inner[0];

		if ((inner_ver_ihl >> 4) != 4)
			return drop(RR_DROP_INNER_VERSION);
		__u32 ihl4 = (inner_ver_ihl & 0x0F) << 2;

		if (ihl4 < IP4_LEN)
			return drop(RR_DROP_INNER_BAD_IHL);
		inner_len = be16_at(inner + 2);
		if (inner_len < ihl4 || inner_len > inner_avail)
			return drop(RR_DROP_INNER_BAD_LENGTH);
		__builtin_memset(&key, 0, sizeof(key));
		reason = inner_flow_key(inner, data_end, inner_len, ihl4, &key);
		tos = inner[1];
	} else {
		if (inner_avail < IP6_LEN || (void *)(inner + IP6_LEN) > data_end)
			return drop(RR_DROP_INNER_TRUNCATED);
		if ((inner[0] >> 4) != 6)
			return drop(RR_DROP_INNER_VERSION);
		inner_len = IP6_LEN + be16_at(inner + 4);
		if (inner_len > inner_avail)
			return drop(RR_DROP_INNER_BAD_LENGTH);
		reason = inner6_flow_key(inner, data_end, inner_len, &key6);
		tos = (__u8)(inner[0] << 4 | inner[1] >> 4);
	}
	if (reason)
		return drop(reason);

	/* -- 7. Backend choice -------------------------------------------------------------------- */
	__u32 zero = 0;
	struct rr_config *cfg = bpf_map_lookup_elem(&rr_config, &zero);

	if (!cfg)
		return drop(RR_DROP_NO_BACKEND);
	/* This CPU's copy of the flow's entry, made in this tick (rr_flow_cache.h): the backend without
	 * looking up the service or rr_conns. */
	const __u8 *flow = six ? (const __u8 *)&key6 : (const __u8 *)&key;
	struct rr_flow_cache_entry *cached = NULL;
	__u64 cache_gen = 0;
	__u32 backend_index = 0;
	__u32 hash = 0;
	__u32 svc_index = 0;
	struct rr_backend *backend = flow_cache_backend(flow, six, &cached, &cache_gen, &backend_index, &svc_index, &hash);

	if (backend)
		goto chosen;
	/* The flow's service gives the table, the member bitmap (section 10) and the options (11). With named
	 * services of the flow's family, all with a connection table and without QUIC (cache_services), the
	 * connection entry is looked up first: one stamped under the current services_gen names the service,
	 * and the rr_services lookup is skipped (its answer cannot have changed: the planner bumps the
	 * generation after rewriting what names services). The generation is read before any lookup, so a
	 * stamp never outlives the services it was read from. */
	__u32 named_here = six ? cfg->named_services6 : cfg->named_services;
	int cache = named_here && (cfg->cache_services & (six ? RR_CACHE_SERVICES6 : RR_CACHE_SERVICES4));
	__u64 gen = 0;          /* without the cache, entries are written unstamped */
	struct rr_service *named = NULL;
	struct rr_conn *conn = NULL;
	__u32 table_size = 0;
	__u32 flags = 0;
	int conn_looked_up = 0;
	int stamped = 0;        /* conn holds the flow's service under this generation */

	if (cache) {
		gen = *(volatile __u64 *)&cfg->services_gen;
		conn = find_conn(six, &key, &key6);
		conn_looked_up = 1;
		if (conn && gen && conn->svc_gen == gen) {
			svc_index = conn->svc_index;
			table_size = conn->svc_table_size;
			flags = conn->svc_flags;
			stamped = 1;
		}
	}
	if (named_here && !stamped)
		named = six ? find_named6(&key6) : find_named(&key);
	if (!stamped && !find_service(cfg, named, &svc_index, &table_size, &flags))
		return drop(RR_DROP_NO_SERVICE);

	/* Every value live from here to the output costs the hit path a stack spill (the program has four
	 * callee-saved registers): the option paths recompute what they need rather than carry it. */
	__u8 proto = six ? key6.proto : key.proto;
	__u64 now = 0;

	if ((flags & RR_OPT_ANSWER_PING) && (proto == IPPROTO_ICMP || proto == NH_ICMPV6)) {
		int answered = rr_echo(ctx, inner_at, six);     /* an echo request: answered here (11.3) */

		if (answered >= 0)
			return answered;
	}
	if (flags & RR_OPT_SLOW) {
		if ((flags & RR_OPT_QUIC) && proto == IPPROTO_UDP) {
			int index = quic_backend(svc_index, quic_server_id(ctx, inner_at, six, inner_at + inner_len));

			if (index >= 0) {
				backend_index = index;
				backend = bpf_map_lookup_elem(&rr_backends, &backend_index);
				if (backend && backend->in_use) {
					count(RR_STAT_QUIC_ROUTED);
					/* The flow label of an IPv6 output still comes from the 5-tuple's hash. */
					if (backend->ipv6)
						hash = six ? flow_hash6(&key6, cfg->hash_seed) : flow_hash(&key, cfg->hash_seed);
					goto chosen;
				}
				backend = NULL;
			}
		}
		if (flags & RR_OPT_NO_CONNS) {
			conn = NULL;    /* an entry left from before the option: never read or written */
			goto table;
		}
	}
	if (!conn_looked_up)
		conn = find_conn(six, &key, &key6);
	/* Read after the lookup: nothing then waits on it across the call. */
	now = clock_ns();

	if (conn) {
		__u32 index = conn->backend_index;
		struct rr_backend *b = bpf_map_lookup_elem(&rr_backends, &index);
		__u64 last = conn->last_seen_ns;

		/* Fresh while now < last + timeout, as core/conntrack.py. Signed: another CPU may have
		 * stamped the entry a little later than our `now`, which is fresh too. */
		if (b && b->in_use && same_backend(b->addr, conn->backend_addr) &&
		    (__s64)(now - last) < (__s64)conn_timeout(cfg, proto) && is_member(svc_index, index)) {
			backend = b;
			backend_index = index;
			hash = conn->flow_hash;
			/* Written when the tick has moved on, never back: `now` changes once a jiffy (clock_ns),
			 * so a flow's entry is written once a tick instead of on every packet (a write dirties its
			 * cache line for every CPU that reads the flow), and a CPU whose tick began earlier leaves
			 * another's later stamp. Freshness is the same rule: the stamp trails by a tick at most. */
			if ((__s64)(now - last) > 0)
				conn->last_seen_ns = now;
			if (cache && !stamped) {
				conn->svc_index = svc_index;
				conn->svc_table_size = table_size;
				conn->svc_flags = flags;
				conn->svc_gen = gen;
			}
			if (cached && !(flags & RR_OPT_QUIC) && (proto == IPPROTO_TCP || proto == IPPROTO_UDP))
				flow_cache_fill(cached, flow, six, cache_gen, index, hash, svc_index);
			count(RR_STAT_CONN_HIT);
		}
	}
	if (!backend) {
table:
		if (table_size == 0)
			return drop(RR_DROP_NO_BACKEND);
		hash = six ? flow_hash6(&key6, cfg->hash_seed) : flow_hash(&key, cfg->hash_seed);
		__u32 slot_of = (flags & RR_OPT_HASH_MASK) == 0 ? hash :
				six ? slot_hash6(&key6, flags, cfg->hash_seed, hash) : slot_hash(&key, flags, cfg->hash_seed, hash);
		__u32 slot = slot_of % table_size + svc_index * cfg->table_stride;
		__u32 *index = bpf_map_lookup_elem(&rr_maglev, &slot);

		if (!index)
			return drop(RR_DROP_NO_BACKEND);
		backend_index = *index;
		backend = bpf_map_lookup_elem(&rr_backends, &backend_index);
		if (!backend || !backend->in_use)
			return drop(RR_DROP_NO_BACKEND);
		/* Written before the neighbour check, as core/balancer.py does: the flow belongs to this
		 * backend even while its next hop is being resolved. Never for a service without a
		 * connection table. */
		if (flags & RR_OPT_NO_CONNS)
			goto chosen;
		/* The entry found (past its idle timeout, or naming a backend that left) names this very
		 * backend and hash: a rewrite would change only its stamp and service, so those are written in
		 * place, as a hit writes them, and the entry is the one an update would leave. An update takes
		 * a new element from the LRU's free list under two locks: most of the miss path's cost. */
		if (conn && conn->backend_index == backend_index && conn->flow_hash == hash &&
		    same_backend(conn->backend_addr, backend->addr)) {
			conn->svc_index = svc_index;
			conn->svc_table_size = table_size;
			conn->svc_flags = flags;
			conn->svc_gen = gen;
			conn->last_seen_ns = now;
			count(RR_STAT_CONN_NEW);
			goto chosen;
		}
		struct rr_conn fresh = {
			.backend_index = backend_index,
			.flow_hash = hash,
			.last_seen_ns = now,
			.svc_gen = gen,
			.svc_index = svc_index,
			.svc_table_size = table_size,
			.svc_flags = flags,
		};
		long err;

		copy16(fresh.backend_addr, backend->addr);
		if (!six)
			err = bpf_map_update_elem(&rr_conns, &key, &fresh, BPF_ANY);
		else
			err = insert6(&key6, &fresh);
		count(RR_STAT_CONN_NEW);
		/* Only when the lookup found nothing: the entry is new (a stale or non-member entry was
		 * rewritten in place). Inserts - live - Python's deletions = LRU evictions. */
		if (!conn && !err)
			count(RR_STAT_CONN_INSERT);
	}
chosen:
	if (!backend->has_mac)
		return drop(RR_DROP_NO_NEIGHBOUR);

	/* -- 8. Output frame ---------------------------------------------------------------------- */
	int out6 = backend->ipv6;
	__u32 out_l3 = out6 ? IP6_LEN : IP4_LEN;

	/* Longer than the path toward the backend takes (the device's MTU or its route's): 8b. */
	if (out_l3 + OUT_GRE_LEN + inner_len > backend->mtu)
		return rr_too_big(ctx, inner_at, six, backend->mtu - out_l3 - OUT_GRE_LEN);
	/* Cut what follows the inner packet (outer padding, bytes past either packet's length), then move
	 * the start so exactly the new headers precede the inner packet, which stays in place. */
	int tail = (int)frame_len - (int)(inner_at + inner_len);
	int head = (int)inner_at - (int)(ETH_LEN + out_l3 + OUT_GRE_LEN);

	if (tail > 0 && bpf_xdp_adjust_tail(ctx, -tail))
		return drop(RR_DROP_TX_FAILED);
	if (head != 0 && bpf_xdp_adjust_head(ctx, head))
		return drop(RR_DROP_TX_FAILED);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;

	__u8 *out = data;
	__u8 *oip = out + ETH_LEN;
	__u32 gre_proto = six ? bpf_htonl(ETH_P_IPV6) : bpf_htonl(ETH_P_IP);

	if (out6) {
		if (data + ETH_LEN + IP6_LEN + OUT_GRE_LEN > data_end)
			return drop(RR_DROP_TX_FAILED);
		/* Outer IPv6: version 6, the inner traffic class, the flow label from the flow hash (RFC
		 * 6438); payload length; next header GRE; hop limit 64; addresses. No checksum. */
		st32(oip, bpf_htonl(0x60000000 | (__u32)tos << 20 | (hash & 0xFFFFF)));
		st16(oip + 4, bpf_htons(OUT_GRE_LEN + inner_len));
		st16(oip + 6, bpf_htons(IPPROTO_GRE << 8 | OUT_TTL));
		copy16(oip + 8, cfg->local_addr6);
		copy16(oip + 24, backend->addr);
		st32(oip + IP6_LEN, gre_proto);
		st16(out + 12, bpf_htons(ETH_P_IPV6));
	} else {
		if (data + ETH_LEN + IP4_LEN + OUT_GRE_LEN > data_end)
			return drop(RR_DROP_TX_FAILED);
		__be32 saddr = cfg->local_addr;
		__be32 daddr = ld32(backend->addr + 12);
		/* Outer IPv4: version 4, IHL 5, the inner TOS, total length; id 0, DF; TTL 64, GRE;
		 * checksum; addresses. Its checksum: the four constant-or-computed header words plus the
		 * addresses (the checksum field 0), summed as written (host order: see csum_fold). */
		__u32 ver_tos_len = bpf_htonl(0x45000000 | (__u32)tos << 16 | (IP4_LEN + OUT_GRE_LEN + inner_len));
		__u64 sum = (__u64)ver_tos_len + saddr + daddr + bpf_htonl(OUT_DF) +
			    bpf_htons(OUT_TTL << 8 | IPPROTO_GRE);

		st32(oip, ver_tos_len);
		st32(oip + 4, bpf_htonl(OUT_DF));               /* id 0, flags DF, offset 0 */
		st16(oip + 8, bpf_htons(OUT_TTL << 8 | IPPROTO_GRE));
		st16(oip + 10, (__u16)~csum_fold_small(sum));
		st32(oip + 12, saddr);
		st32(oip + 16, daddr);
		st32(oip + IP4_LEN, gre_proto);         /* GRE: no checksum, key or sequence number */
		st16(out + 12, bpf_htons(ETH_P_IP));
	}
	st32(out, ld32(backend->mac));
	st16(out + 4, ld16(backend->mac + 4));
	st32(out + 6, ld32(cfg->local_mac));
	st16(out + 10, ld16(cfg->local_mac + 4));
	count(six ? RR_STAT_FORWARDED_IPV6 : RR_STAT_FORWARDED);     /* once, by the inner family */
	{
		/* What went to this backend for this service (core/balancer.py: pool.packets, pool.bytes). */
		__u32 slot = svc_index * RR_MAX_BACKENDS + backend_index;
		struct rr_backend_stats *bs = bpf_map_lookup_elem(&rr_backend_stats, &slot);

		if (bs) {
			bs->packets += 1;       /* per-CPU: no atomics needed */
			bs->bytes += inner_len;
		}
	}
	return XDP_TX;

pass:
	count(RR_STAT_PASSED);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
