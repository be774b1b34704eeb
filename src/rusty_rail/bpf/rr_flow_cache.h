/* Rusty Rail: the flow cache in front of rr_conns and rr_conns6 (docs/WIRE.md section 7).
 *
 * Why: a hit's lookup in rr_conns is a call into the kernel's hash table (jhash, the bucket walk, a
 * memcmp), a third of the whole hit path; this CPU's copy of the entry, in a per-CPU array the verifier
 * turns into a few loads, is not. Like Open vSwitch's exact-match cache, it pays for flows with more than
 * one packet per tick on a CPU: the elephants that carry most of the bytes.
 *
 * What a copy may be used for: one tick (a jiffy), as long as nothing in the maps has been changed by the
 * control plane since (rr_cache_gen). Within that tick the copy says what rr_conns said: it is made from an
 * entry a packet found fresh, valid and a member in this tick, and stamped then (a hit writes its stamp
 * once a tick anyway); once a tick each cached flow goes to rr_conns again, which keeps the entry's stamp
 * and the LRU's order as they were without the cache. Every change from user space (a sync's writes,
 * a connection written or deleted by hand) bumps rr_cache_gen after it, so no copy outlives what it was
 * made from (a handover successor bumps its own, not its predecessor's: the old program, until replaced,
 * may use a copy for the rest of its tick). Only TCP and UDP flows of services without QUIC are cached: their backend comes from the
 * entry alone (QUIC packets go by their server ID, echo requests may be answered here). */
#ifndef RR_FLOW_CACHE_H
#define RR_FLOW_CACHE_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "rr_maps.h"
#include "rr_counters.h"
#include "rr_packet.h"

/* The flow's slot: its key's 8-byte words folded and multiplied (Fibonacci hashing), the top bits. Not
 * the flow hash (murmur3, computed only on a miss) and not seeded: a collision costs only a trip to
 * rr_conns. `key`: an rr_flow_key (16 bytes) or, `six`, an rr_flow_key6 (40). */
static __always_inline __u32 flow_cache_index(const __u8 *key, int six)
{
	__u64 x = ld64(key) ^ (ld64(key + 8) * 0x9E3779B97F4A7C15ULL);

	if (six)
		x ^= ld64(key + 16) ^ (ld64(key + 24) * 0x9E3779B97F4A7C15ULL) ^ (ld64(key + 32) * 0xC2B2AE3D27D4EB4FULL);
	return (__u32)((x * 0xC2B2AE3D27D4EB4FULL) >> (64 - RR_FLOW_CACHE_BITS));
}

/* This CPU's slot for the flow, and the generation to stamp a copy with (read before rr_conns is: a
 * bump after the read makes the copy stale, never the other way round). NULL: no slot, or the cache is
 * off (RR_FLOW_CACHE_OFF: the benchmark's measure of the rr_conns path alone). */
static __always_inline struct rr_flow_cache_entry *flow_cache_slot(const __u8 *key, int six, __u64 *gen)
{
	__u32 zero = 0;
	__u32 index = flow_cache_index(key, six);
	__u64 *g = bpf_map_lookup_elem(&rr_cache_gen, &zero);

	if (!g)
		return NULL;
	*gen = *(volatile __u64 *)g;
	if (*gen & RR_FLOW_CACHE_OFF)
		return NULL;
	return bpf_map_lookup_elem(&rr_flow_cache, &index);
}

/* The slot holds this flow's copy, made in this tick under this generation. */
static __always_inline int flow_cache_valid(const struct rr_flow_cache_entry *e, const __u8 *key, int six, __u64 gen)
{
	if (e->jiffies != bpf_jiffies64() || e->gen != gen || e->six != six ||
	    ld64(e->key) != ld64(key) || ld64(e->key + 8) != ld64(key + 8))
		return 0;
	return !six || (ld64(e->key + 16) == ld64(key + 16) && ld64(e->key + 24) == ld64(key + 24) &&
			ld64(e->key + 32) == ld64(key + 32));
}

static __always_inline void flow_cache_fill(struct rr_flow_cache_entry *e, const __u8 *key, int six, __u64 gen,
					    __u32 backend_index, __u32 flow_hash, __u32 svc_index)
{
	st64(e->key, ld64(key));
	st64(e->key + 8, ld64(key + 8));
	if (six) {
		st64(e->key + 16, ld64(key + 16));
		st64(e->key + 24, ld64(key + 24));
		st64(e->key + 32, ld64(key + 32));
	}
	e->six = six;
	e->gen = gen;
	e->backend_index = backend_index;
	e->flow_hash = flow_hash;
	e->svc_index = svc_index;
	e->jiffies = bpf_jiffies64();
}

/* The flow's backend from this CPU's copy (counted: flow_cache_hit), with its index, service and flow
 * hash; NULL when there is none to use. Either way *slot and *gen are what flow_cache_fill needs. */
static __always_inline struct rr_backend *flow_cache_backend(const __u8 *key, int six, struct rr_flow_cache_entry **slot,
							     __u64 *gen, __u32 *backend_index, __u32 *svc_index,
							     __u32 *flow_hash)
{
	struct rr_flow_cache_entry *e = flow_cache_slot(key, six, gen);
	struct rr_backend *b;

	*slot = e;
	if (!e || !flow_cache_valid(e, key, six, *gen))
		return NULL;
	*backend_index = e->backend_index;
	b = bpf_map_lookup_elem(&rr_backends, backend_index);
	if (b) {
		*svc_index = e->svc_index;
		*flow_hash = e->flow_hash;
		count(RR_STAT_FLOW_CACHE_HIT);
	}
	return b;
}

#endif
