/* Rusty Rail: the XDP program's maps. Names are the contract with rusty_rail/engines/xdp.py, which
 * finds them with bpf_object__find_map_by_name and may resize rr_maglev and rr_conns before load. */
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

/* slot -> index into rr_backends. max_entries is the largest table the loader allows; the table in
 * use has rr_config.table_size slots. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RR_DEFAULT_TABLE_SIZE);
	__type(key, __u32);
	__type(value, __u32);
} rr_maglev SEC(".maps");

/* Bounded: the kernel evicts the least recently used entry when full, like core/conntrack.py. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, RR_DEFAULT_CONNS);
	__type(key, struct rr_flow_key);
	__type(value, struct rr_conn);
} rr_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RR_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} rr_stats SEC(".maps");

#endif
