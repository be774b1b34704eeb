// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
/* Rusty Rail: the XDP data plane. docs/WIRE.md is the contract, section by section:
 * frames that are not GRE over IPv4 go to the host (XDP_PASS); GRE frames are validated, hashed on
 * their inner flow, given a backend (connection table, then Maglev table) and sent back out of the
 * same device re-encapsulated (XDP_TX), or dropped with a counted reason.
 *
 * The Maglev tables are built in Python (rusty_rail/core/maglev.py) and written into rr_maglev; this
 * program only indexes them, one table per service (section 10). There are only services: the
 * environment form of the configuration is one catch-all service, found without a map lookup. Maps
 * and structs: rr_maps.h, rr_structs.h; the helpers that read packet bytes: rr_packet.h.
 *
 * Verifier notes (kernel 6.18, clang 14):
 * - Every logical length check is made against the outer/inner total length (the contract's notion
 *   of "the packet"); every read is additionally guarded by a data_end check, which the logic already
 *   implies, because the verifier cannot know that.
 * - The GRE checksum loop is a plain bounded loop (unrolling disabled) over 32-bit words; only the
 *   loop counter is precise, so the states after the loop prune against each other.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "rr_maps.h"
#include "rr_packet.h"

#define ETH_LEN 14
#define GRE_OFF (ETH_LEN + IP4_LEN)     /* the outer header has no options, or the frame is dropped */
#define OUT_GRE_LEN 4
#define OUT_HDR_LEN (ETH_LEN + IP4_LEN + OUT_GRE_LEN)

#define GRE_F_CSUM 0x8000
#define GRE_F_KEY 0x2000
#define GRE_F_SEQ 0x1000
#define GRE_F_RESERVED 0x4C00           /* routing, strict source route: RFC 2784 2.3 says discard */
#define GRE_F_VERSION 0x0007

#define OUT_TTL 64
#define OUT_DF 0x4000

static __always_inline void count(__u32 index)
{
	__u64 *counter = bpf_map_lookup_elem(&rr_stats, &index);

	if (counter)
		*counter += 1;          /* per-CPU: no atomics needed */
}

static __always_inline int drop(__u32 reason)
{
	count(reason);
	return XDP_DROP;
}

/* docs/WIRE.md section 10, in core/service.py's order (ServiceMatcher): (VIP, port, protocol), (VIP,
 * any port, protocol), (VIP, any port, any protocol); then, for a TCP/UDP key without ports, the
 * (VIP, protocol) fallback entry (the lowest-port service). NULL: no service with a VIP matches. */
static __always_inline struct rr_service *find_named(const struct rr_flow_key *key)
{
	struct rr_service_key sk = {
		.vip = key->dst,
		.port = key->dport,
		.proto = key->proto,
		.fragment = 0,
	};
	struct rr_service *svc;

	if (sk.port) {          /* with port 0 the first two keys are the same */
		svc = bpf_map_lookup_elem(&rr_services, &sk);
		if (svc)
			return svc;
		sk.port = 0;
	}
	svc = bpf_map_lookup_elem(&rr_services, &sk);
	if (svc)
		return svc;
	sk.proto = 0;
	svc = bpf_map_lookup_elem(&rr_services, &sk);
	if (svc)
		return svc;
	if ((key->proto == IPPROTO_TCP || key->proto == IPPROTO_UDP) && !key->sport && !key->dport) {
		sk.proto = key->proto;
		sk.fragment = 1;
		return bpf_map_lookup_elem(&rr_services, &sk);
	}
	return NULL;
}

/* The flow's service as its index and table size; 0 when none matches (NO_SERVICE). Services with a
 * VIP first (only when there are any: the environment form looks nothing up), then the catch-all. */
static __always_inline int find_service(const struct rr_config *cfg, const struct rr_flow_key *key,
					__u32 *index, __u32 *table_size)
{
	if (cfg->named_services) {
		struct rr_service *svc = find_named(key);

		if (svc) {
			*index = svc->index;
			*table_size = svc->table_size;
			return 1;
		}
	}
	if (!cfg->catch_all)
		return 0;
	*index = cfg->catch_all - 1;
	*table_size = cfg->catch_all_size;
	return 1;
}

/* Is rr_backends[index] (index < RR_MAX_BACKENDS) listed in the service `svc_index`? */
static __always_inline int is_member(__u32 svc_index, __u32 index)
{
	__u32 word = svc_index * RR_MEMBER_WORDS + (index >> 6);
	__u64 *bits = bpf_map_lookup_elem(&rr_members, &word);

	return bits && ((*bits >> (index & 63)) & 1);
}

/* CLOCK_MONOTONIC at tick resolution: bpf_ktime_get_ns() once per jiffy per CPU (rr_clock), so a
 * packet costs an inlined jiffies load and per-CPU array lookup instead of a clock read. */
static __always_inline __u64 clock_ns(void)
{
	__u32 zero = 0;
	struct rr_clock *clock = bpf_map_lookup_elem(&rr_clock, &zero);
	__u64 jiffies = bpf_jiffies64();

	if (!clock)
		return bpf_ktime_get_ns();
	if (clock->jiffies != jiffies || !clock->ns) {
		clock->ns = bpf_ktime_get_ns();
		clock->jiffies = jiffies;
	}
	return clock->ns;
}

static __always_inline __u64 conn_timeout(const struct rr_config *cfg, __u8 proto)
{
	if (proto == IPPROTO_TCP)
		return cfg->conn_timeout_ns[RR_TIMEOUT_TCP];
	if (proto == IPPROTO_UDP)
		return cfg->conn_timeout_ns[RR_TIMEOUT_UDP];
	return cfg->conn_timeout_ns[RR_TIMEOUT_OTHER];
}

SEC("xdp")
int rr_balance(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 frame_len = data_end - data;

	/* -- 1. Is the frame ours? -------------------------------------------------------------- */
	if (data + GRE_OFF > data_end)
		goto pass;
	__u8 *eth = data;
	__u8 *ip = data + ETH_LEN;
	__u8 ver_ihl = ip[0];

	if (ld16(eth + 12) != bpf_htons(ETH_P_IP) || (ver_ihl >> 4) != 4 || ip[9] != IPPROTO_GRE)
		goto pass;

	/* -- 2. Outer IPv4 ------------------------------------------------------------------------ */
	__u32 ihl = ver_ihl & 0x0F;

	if (ihl < 5)
		return drop(RR_DROP_OUTER_BAD_IHL);
	if (ihl > 5)
		return drop(RR_DROP_OUTER_OPTIONS);
	__u32 total = be16_at(ip + 2);

	if (total < IP4_LEN || total > frame_len - ETH_LEN)
		return drop(RR_DROP_OUTER_BAD_LENGTH);
	{
		const __u32 *w = (const __u32 *)ip;
		__u64 sum = (__u64)w[0] + w[1] + w[2] + w[3] + w[4];

		if (csum_fold_small(sum) != 0xFFFF)
			return drop(RR_DROP_OUTER_BAD_CHECKSUM);
	}
	if (ld16(ip + 6) & bpf_htons(IP_MF_OFFSET))
		return drop(RR_DROP_OUTER_FRAGMENT);

	/* -- 3. GRE ------------------------------------------------------------------------------- */
	__u32 gre_avail = total - IP4_LEN;      /* GRE header + payload, to the outer total length */
	__u8 *gre = data + GRE_OFF;

	if (gre_avail < 4 || (void *)(gre + 4) > data_end)
		return drop(RR_DROP_GRE_TRUNCATED);
	__u32 gre_len = 4;

	/* The usual header (no flags, version 0, protocol IPv4) passes every check below with 4 bytes:
	 * one comparison instead of them. */
	if (ld32(gre) != bpf_htonl(ETH_P_IP)) {
		__u32 flags = be16_at(gre);

		if (flags & GRE_F_VERSION)
			return drop(RR_DROP_GRE_VERSION);
		if (flags & GRE_F_RESERVED)
			return drop(RR_DROP_GRE_RESERVED);
		/* 4 bytes, plus 4 for each of checksum(+reserved1), key, sequence number (RFC 2890). */
		gre_len += ((flags >> 13) & 4) + ((flags >> 11) & 4) + ((flags >> 10) & 4);

		if (gre_avail < gre_len)
			return drop(RR_DROP_GRE_TRUNCATED);
		if (flags & GRE_F_CSUM) {
			if (gre_avail > RR_MAX_CSUM_LEN ||
			    csum_fold(csum_bytes(gre, data_end, gre_avail)) != 0xFFFF)
				return drop(RR_DROP_GRE_CHECKSUM);
		}
		if (ld16(gre + 2) != bpf_htons(ETH_P_IP))
			return drop(RR_DROP_GRE_PROTOCOL);
		/* The key and sequence number are parsed (gre_len) and not used. */
	}

	/* -- 4. Inner IPv4 ------------------------------------------------------------------------ */
	__u32 inner_avail = gre_avail - gre_len;
	__u8 *inner = data + GRE_OFF + gre_len;

	if (inner_avail < IP4_LEN || (void *)(inner + IP4_LEN) > data_end)
		return drop(RR_DROP_INNER_TRUNCATED);
	__u8 inner_ver_ihl = inner[0];

	if ((inner_ver_ihl >> 4) != 4)
		return drop(RR_DROP_INNER_VERSION);
	__u32 ihl4 = (inner_ver_ihl & 0x0F) << 2;

	if (ihl4 < IP4_LEN)
		return drop(RR_DROP_INNER_BAD_IHL);
	__u32 inner_len = be16_at(inner + 2);

	if (inner_len < ihl4 || inner_len > inner_avail)
		return drop(RR_DROP_INNER_BAD_LENGTH);

	/* -- 5, 6. Flow key and hash -------------------------------------------------------------- */
	struct rr_flow_key key = {};
	int reason = inner_flow_key(inner, data_end, inner_len, ihl4, &key);

	if (reason)
		return drop(reason);
	__u8 tos = inner[1];

	/* -- 7. Backend choice -------------------------------------------------------------------- */
	__u32 zero = 0;
	struct rr_config *cfg = bpf_map_lookup_elem(&rr_config, &zero);

	if (!cfg)
		return drop(RR_DROP_NO_BACKEND);
	/* The flow's service gives the table and the member bitmap (section 10). */
	__u32 svc_index = 0;
	__u32 table_size = 0;

	if (!find_service(cfg, &key, &svc_index, &table_size))
		return drop(RR_DROP_NO_SERVICE);
	struct rr_backend *backend = NULL;
	__u32 backend_index = 0;
	struct rr_conn *conn = bpf_map_lookup_elem(&rr_conns, &key);
	/* Read after the lookup: nothing then waits on it across the call. */
	__u64 now = clock_ns();

	if (conn) {
		__u32 index = conn->backend_index;
		struct rr_backend *b = bpf_map_lookup_elem(&rr_backends, &index);
		__u64 last = conn->last_seen_ns;

		/* Fresh while now < last + timeout, as core/conntrack.py. Signed: another CPU may have
		 * stamped the entry a little later than our `now`, which is fresh too. */
		if (b && b->in_use && b->addr == conn->backend_addr &&
		    (__s64)(now - last) < (__s64)conn_timeout(cfg, key.proto) && is_member(svc_index, index)) {
			backend = b;
			backend_index = index;
			conn->last_seen_ns = now;
			count(RR_STAT_CONN_HIT);
		}
	}
	if (!backend) {
		if (table_size == 0)
			return drop(RR_DROP_NO_BACKEND);
		__u32 slot = flow_hash(&key, cfg->hash_seed) % table_size + svc_index * cfg->table_stride;
		__u32 *index = bpf_map_lookup_elem(&rr_maglev, &slot);

		if (!index)
			return drop(RR_DROP_NO_BACKEND);
		backend_index = *index;
		backend = bpf_map_lookup_elem(&rr_backends, &backend_index);
		if (!backend || !backend->in_use)
			return drop(RR_DROP_NO_BACKEND);
		/* Written before the neighbour check, as core/balancer.py does: the flow belongs to this
		 * backend even while its next hop is being resolved. */
		struct rr_conn fresh = {
			.backend_addr = backend->addr,
			.backend_index = backend_index,
			.last_seen_ns = now,
		};

		long err = bpf_map_update_elem(&rr_conns, &key, &fresh, BPF_ANY);

		count(RR_STAT_CONN_NEW);
		/* Only when the lookup found nothing: the entry is new (a stale or non-member entry was
		 * rewritten in place). Inserts - live - Python's deletions = LRU evictions. */
		if (!conn && !err)
			count(RR_STAT_CONN_INSERT);
	}
	if (!backend->has_mac)
		return drop(RR_DROP_NO_NEIGHBOUR);

	/* -- 8. Output frame ---------------------------------------------------------------------- */
	/* Cut what follows the inner packet (outer padding, bytes past either total length), then move
	 * the start so exactly 38 bytes of new headers precede the inner packet, which stays in place. */
	int tail = (int)frame_len - (GRE_OFF + gre_len + inner_len);
	int head = (int)gre_len - OUT_GRE_LEN;

	if (tail > 0 && bpf_xdp_adjust_tail(ctx, -tail))
		return drop(RR_DROP_TX_FAILED);
	if (head > 0 && bpf_xdp_adjust_head(ctx, head))
		return drop(RR_DROP_TX_FAILED);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + OUT_HDR_LEN > data_end)
		return drop(RR_DROP_TX_FAILED);

	__u8 *out = data;
	__u8 *oip = out + ETH_LEN;
	__be32 saddr = cfg->local_addr;
	__be32 daddr = backend->addr;
	/* Outer IPv4: version 4, IHL 5, the inner TOS, total length; id 0, DF; TTL 64, GRE; checksum;
	 * addresses. Its checksum: the four constant-or-computed header words plus the addresses (the
	 * checksum field 0), summed as written (host order: see csum_fold). */
	__u32 ver_tos_len = bpf_htonl(0x45000000 | (__u32)tos << 16 | (IP4_LEN + OUT_GRE_LEN + inner_len));
	__u64 sum = (__u64)ver_tos_len + saddr + daddr + bpf_htonl(OUT_DF) +
		    bpf_htons(OUT_TTL << 8 | IPPROTO_GRE);

	st32(out, ld32(backend->mac));
	st16(out + 4, ld16(backend->mac + 4));
	st32(out + 6, ld32(cfg->local_mac));
	st16(out + 10, ld16(cfg->local_mac + 4));
	st16(out + 12, bpf_htons(ETH_P_IP));
	st32(oip, ver_tos_len);
	st32(oip + 4, bpf_htonl(OUT_DF));               /* id 0, flags DF, offset 0 */
	st16(oip + 8, bpf_htons(OUT_TTL << 8 | IPPROTO_GRE));
	st16(oip + 10, (__u16)~csum_fold_small(sum));
	st32(oip + 12, saddr);
	st32(oip + 16, daddr);
	/* GRE: no checksum, key or sequence number; protocol IPv4. */
	st32(oip + IP4_LEN, bpf_htonl(ETH_P_IP));
	count(RR_STAT_FORWARDED);
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
