/* Rusty Rail: the XDP program's maps. Names are the contract with rusty_rail/engines/xdp/maps.py;
 * engines/xdp/program.py finds them with bpf_object__find_map_by_name and resizes rr_maglev, rr_conns,
 * rr_conns6, rr_services, rr_services6, rr_members and rr_backend_stats before load (max_services * table size, max_services *
 * RR_MEMBER_WORDS, max_services * RR_MAX_BACKENDS, ...); engines/xdp/planner.py computes what they
 * hold. */
#ifndef RR_MAPS_H
#define RR_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "rr_structs.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rr_config);
} rr_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RR_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct rr_backend);
} rr_backends SEC(".maps");

/* slot -> index into rr_backends: service i's table (rr_service.table_size slots, or
 * rr_config.catch_all_size for the catch-all) at i * rr_config.table_stride. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RR_DEFAULT_TABLE_SIZE);
	__type(key, __u32);
	__type(value, __u32);
} rr_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rr_clock);
} rr_clock SEC(".maps");

/* Per CPU: copies of rr_conns entries, usable for one tick (rr_flow_cache.h). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RR_FLOW_CACHE_SLOTS);
	__type(key, __u32);
	__type(value, struct rr_flow_cache_entry);
} rr_flow_cache SEC(".maps");

/* rr_cache_gen[0]: bumped by user space after each change it makes to the maps (engines/xdp/program.py),
 * so that no rr_flow_cache copy made before it is used. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} rr_cache_gen SEC(".maps");

/* Which service with an IPv4 VIP a flow belongs to (docs/WIRE.md section 10): the 8-byte keys of
 * core/service.py's ServiceMatcher.entries. Not looked up while rr_config.named_services is 0; the
 * catch-all is not here. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * RR_DEFAULT_MAX_SERVICES);   /* each service + each (VIP, protocol) fallback */
	__type(key, struct rr_service_key);
	__type(value, struct rr_service);
} rr_services SEC(".maps");

/* The same for IPv6 VIPs: the matcher's 20-byte entries; skipped while named_services6 is 0. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * RR_DEFAULT_MAX_SERVICES);
	__type(key, struct rr_service_key6);
	__type(value, struct rr_service);
} rr_services6 SEC(".maps");

/* Word index * RR_MEMBER_WORDS + b / 64, bit b % 64: backend b is listed in the service with that
 * index. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RR_DEFAULT_MAX_SERVICES * RR_MEMBER_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} rr_members SEC(".maps");

/* Bounded: the kernel evicts the least recently used entry when full, like core/conntrack.py. IPv4
 * flows here; IPv6 flows in rr_conns6 (a key of their own length), each map the configured capacity. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, RR_DEFAULT_CONNS);
	__type(key, struct rr_flow_key);
	__type(value, struct rr_conn);
} rr_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, RR_DEFAULT_CONNS);
	__type(key, struct rr_flow_key6);
	__type(value, struct rr_conn);
} rr_conns6 SEC(".maps");

/* Counters by index (rr_structs.h): 0 forwarded with an inner IPv4 packet, 26 with an inner IPv6 one,
 * 1..18, 24, 25, 27 drop reasons, 19 passed, 20 conn_hit, 21 conn_new, 22 conn_insert (new rr_conns /
 * rr_conns6 entries only: engines/xdp/counters.py derives LRU evictions), 28..30 the options' answers and
 * QUIC forwards. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RR_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} rr_stats SEC(".maps");

/* The "too big" answers' token bucket, per CPU (rr_structs.h). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rr_icmp_bucket);
} rr_icmp_bucket SEC(".maps");

/* RR_QUIC_KEY(service index, server ID) -> rr_backends index, for the backends listed in a service with
 * quic = true (docs/WIRE.md section 11.4). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RR_MAX_QUIC_IDS);
	__type(key, __u32);
	__type(value, __u32);
} rr_quic SEC(".maps");

/* Per (service, backend): packets and inner bytes forwarded, at service index * RR_MAX_BACKENDS +
 * rr_backends index. Per CPU, so the forward path adds without atomics; the
 * control plane sums the CPUs' values. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RR_DEFAULT_MAX_SERVICES * RR_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct rr_backend_stats);
} rr_backend_stats SEC(".maps");

#endif
