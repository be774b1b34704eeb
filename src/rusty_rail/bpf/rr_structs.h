/* Rusty Rail: the structs shared by the XDP program and its Python control plane.
 *
 * Every struct here has a ctypes mirror in rusty_rail/engines/xdp_maps.py; tests/test_xdp_layout.py
 * compiles this header with the host compiler and checks sizes and offsets of the mirrors against it,
 * so the two cannot drift apart silently. Layouts are explicit (no implicit padding).
 */
#ifndef RR_STRUCTS_H
#define RR_STRUCTS_H

#include <linux/types.h>

/* rr_config[0]: the balancer's own identity and the table parameters. */
struct rr_config {
	__be32 local_addr;          /* outer source address of forwarded frames (network order) */
	__u8 local_mac[6];          /* Ethernet source of forwarded frames */
	__u16 pad;
	__u32 table_size;           /* Maglev slots in use (M, prime); 0 = no table: NO_BACKEND */
	__u32 backend_count;        /* 0 = no backends: NO_BACKEND for every new flow */
	__u32 hash_seed;            /* murmur3 seed, docs/WIRE.md section 6 */
	__u64 conn_timeout_ns[3];   /* at offset 24: 8-aligned without padding */   /* idle timeouts, indexed by RR_TIMEOUT_* */
};

#define RR_TIMEOUT_TCP 0
#define RR_TIMEOUT_UDP 1
#define RR_TIMEOUT_OTHER 2

/* rr_backends[i]: backend i, as the Maglev table's entries name it. */
struct rr_backend {
	__be32 addr;                /* network order */
	__u8 mac[6];                /* Ethernet address of the backend's next hop */
	__u8 has_mac;               /* 0: next hop unknown, NO_NEIGHBOUR */
	__u8 in_use;                /* 0: a free slot of the array, or a backend that left */
};

/* The 16 bytes of docs/WIRE.md section 6, in that order: the connection table's key and, read as four
 * little-endian 32-bit words, the flow hash's input. */
struct rr_flow_key {
	__be32 src;
	__be32 dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* rr_conns value: where a flow went, and when it was last seen. The address is kept next to the index
 * so that a slot of rr_backends reused by another backend does not inherit the old one's flows. */
struct rr_conn {
	__be32 backend_addr;
	__u32 backend_index;
	__u64 last_seen_ns;         /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
};

/* rr_stats indexes. 1..18 are the drop reasons of docs/WIRE.md section 9, numbered as there. */
#define RR_STAT_FORWARDED 0
#define RR_DROP_OUTER_BAD_IHL 1
#define RR_DROP_OUTER_OPTIONS 2
#define RR_DROP_OUTER_BAD_LENGTH 3
#define RR_DROP_OUTER_BAD_CHECKSUM 4
#define RR_DROP_OUTER_FRAGMENT 5
#define RR_DROP_GRE_TRUNCATED 6
#define RR_DROP_GRE_VERSION 7
#define RR_DROP_GRE_RESERVED 8
#define RR_DROP_GRE_CHECKSUM 9
#define RR_DROP_GRE_PROTOCOL 10
#define RR_DROP_INNER_TRUNCATED 11
#define RR_DROP_INNER_VERSION 12
#define RR_DROP_INNER_BAD_IHL 13
#define RR_DROP_INNER_BAD_LENGTH 14
#define RR_DROP_NO_BACKEND 15
#define RR_DROP_NO_NEIGHBOUR 16
#define RR_DROP_NO_SERVICE 17       /* reserved: this program has no service map yet */
#define RR_DROP_TX_FAILED 18        /* bpf_xdp_adjust_head/tail refused */
#define RR_STAT_PASSED 19           /* not GRE over IPv4: XDP_PASS */
#define RR_STAT_CONN_HIT 20         /* forwarded frames whose backend came from rr_conns */
#define RR_STAT_CONN_NEW 21         /* rr_conns entries (re)written from the Maglev table */
#define RR_STAT_MAX 32

#define RR_MAX_BACKENDS 4096
#define RR_DEFAULT_TABLE_SIZE 65537
#define RR_DEFAULT_CONNS (1 << 20)

#endif
