/* Rusty Rail: the structs shared by the XDP program and its Python control plane.
 *
 * Every struct here has a ctypes mirror in rusty_rail/engines/xdp/maps.py; tests/test_xdp_layout.py
 * compiles this header with the host compiler and checks sizes and offsets of the mirrors against it,
 * so the two cannot drift apart silently. Layouts are explicit (no implicit padding).
 */
#ifndef RR_STRUCTS_H
#define RR_STRUCTS_H

#include <linux/types.h>

/* rr_config[0]: the balancer's own identity, and where its services are. There are only services
 * (docs/WIRE.md section 10): those with a VIP are found in rr_services (IPv4 VIPs) or rr_services6
 * (IPv6 VIPs), the catch-all (every VIP of both families; the environment form is exactly one) here,
 * without a lookup. Service i's Maglev table is rr_maglev[i * table_stride ...], its member bitmap
 * rr_members[i * RR_MEMBER_WORDS ...]. */
struct rr_config {
	__be32 local_addr;          /* outer source toward IPv4 backends (network order; 0: none) */
	__u8 local_mac[6];          /* Ethernet source of forwarded frames */
	__u16 pad;
	__u32 hash_seed;            /* murmur3 seed, docs/WIRE.md section 6 */
	__u32 named_services;       /* services with an IPv4 VIP; 0: IPv4 flows skip every rr_services lookup */
	__u32 catch_all;            /* 0: no catch-all service; else 1 + its service index */
	__u32 catch_all_size;       /* slots of the catch-all's table (0: no backend with a weight: NO_BACKEND) */
	__u32 table_stride;         /* rr_maglev entries per service: the largest table the maps hold */
	__u64 conn_timeout_ns[3];   /* at offset 32: 8-aligned without padding; idle timeouts, by RR_TIMEOUT_* */
	__u8 local_addr6[16];       /* outer source toward IPv6 backends (:: when the device has none) */
	__u32 named_services6;      /* services with an IPv6 VIP; 0: IPv6 flows skip every rr_services6 lookup */
	__u32 catch_all_flags;      /* the catch-all's options, RR_OPT_* (rr_service.flags for the others) */
	__u64 icmp_period_ns;       /* the "too big" token bucket (rr_icmp_bucket): credit one answer costs */
	__u64 icmp_capacity_ns;     /* and the most credit a CPU holds (the burst); 0: no answers */
	__u64 services_gen;         /* bumped after every change of what names the services (rr_services,
				     * rr_services6, the catch-all, their options): a connection entry
				     * stamped with the current value holds the flow's service (rr_conn) */
	__u32 cache_services;       /* RR_CACHE_*: families whose flows look their connection entry up first */
	__u32 pad2;
};

/* rr_config.cache_services: every service with a VIP of that family keeps a connection table and has no
 * QUIC, so an entry is what most of its packets find: it is looked up before the service (whose lookup
 * a stamped entry then spares). Otherwise a flow without entries would pay a lookup for nothing. */
#define RR_CACHE_SERVICES4 1
#define RR_CACHE_SERVICES6 2

/* A service's options (docs/WIRE.md section 11; core/options.py ServiceOptions), as rr_service.flags and
 * rr_config.catch_all_flags hold them. A service whose flags have none of RR_OPT_SLOW decides TCP and UDP
 * flows exactly as without options. */
#define RR_OPT_HASH_MASK 0x3        /* core/options.py HashFields: 0 5-tuple, 1 source-ip, 2 source-ip-port */
#define RR_OPT_HASH_SOURCE_IP 1
#define RR_OPT_HASH_SOURCE_IP_PORT 2
#define RR_OPT_NO_CONNS 0x4         /* connection_table = false: rr_conns is never read or written */
#define RR_OPT_ANSWER_PING 0x8      /* echo requests to the service are answered here */
#define RR_OPT_QUIC 0x10            /* QUIC short headers go by their server ID (rr_quic) */
#define RR_OPT_SLOW (RR_OPT_HASH_MASK | RR_OPT_NO_CONNS | RR_OPT_QUIC)

#define RR_TIMEOUT_TCP 0
#define RR_TIMEOUT_UDP 1
#define RR_TIMEOUT_OTHER 2

/* rr_backends[i]: backend i, as the Maglev table's entries name it. `addr` is the backend's identity
 * in 16 bytes: an IPv6 address, or an IPv4 one IPv4-mapped (::ffff:a.b.c.d, RFC 4291 2.5.5.2; the
 * configuration refuses IPv6 backends in ::ffff:0:0/96, so the two never meet). */
struct rr_backend {
	__u8 addr[16];              /* IPv4: its 4 bytes at 12, network order */
	__u8 mac[6];                /* Ethernet address of the backend's next hop */
	__u8 has_mac;               /* 0: next hop unknown, NO_NEIGHBOUR */
	__u8 in_use;                /* 0: a free slot of the array, or a backend that left */
	__u8 ipv6;                  /* 1: the outer header toward it is IPv6 (docs/WIRE.md section 8) */
	__u8 pad1;
	__u16 mtu;                  /* the largest IP packet toward it: the device's MTU or its route's (8b) */
	__u8 pad[4];
};

/* The 16 bytes of docs/WIRE.md section 6 for an IPv4 flow, in that order: rr_conns' key and, read as
 * four little-endian 32-bit words, the flow hash's input. */
struct rr_flow_key {
	__be32 src;
	__be32 dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* The 40 bytes of docs/WIRE.md section 6 for an IPv6 flow: rr_conns6' key and, read as ten
 * little-endian 32-bit words, the flow hash's input. */
struct rr_flow_key6 {
	__u8 src[16];
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* rr_conns and rr_conns6 value: where a flow went, and when it was last seen. The backend's identity
 * (rr_backend.addr) is kept next to its index so that a slot of rr_backends reused by another backend
 * does not inherit the old one's flows. The flow hash is kept for the outer IPv6 flow label, so a hit
 * does not hash the key again. */
struct rr_conn {
	__u8 backend_addr[16];
	__u32 backend_index;
	__u32 flow_hash;            /* docs/WIRE.md section 6, of the entry's key */
	__u64 last_seen_ns;         /* CLOCK_MONOTONIC, tick resolution (struct rr_clock) */
	/* The flow's service, as its lookup answered while rr_config.services_gen was svc_gen: a hit under
	 * the same generation skips the lookup, whose answer cannot have changed. 0: never stamped. */
	__u64 svc_gen;
	__u32 svc_index;
	__u32 svc_table_size;
	__u32 svc_flags;
	__u32 pad;
};

/* rr_flow_cache, per CPU, at a flow's slot (rr_flow_cache.h): this CPU's copy of what an rr_conns or
 * rr_conns6 hit gave the flow `key`, usable in the tick and generation it was made in. */
struct rr_flow_cache_entry {
	__u8 key[40];               /* the rr_flow_key (16 bytes, then unused) or rr_flow_key6 */
	__u64 jiffies;              /* bpf_jiffies64() when made (0: never) */
	__u64 gen;                  /* rr_cache_gen[0] then */
	__u32 backend_index;
	__u32 flow_hash;
	__u32 svc_index;            /* the flow's service (its options: no QUIC) */
	__u32 six;                  /* 1: `key` is an rr_flow_key6 */
};
#define RR_FLOW_CACHE_BITS 10       /* 1024 slots a CPU: 48 KiB */
#define RR_FLOW_CACHE_SLOTS (1 << RR_FLOW_CACHE_BITS)
#define RR_FLOW_CACHE_OFF (1ULL << 63)  /* in rr_cache_gen[0]: no copy is made or used */

/* rr_clock[0], per CPU: the time of this CPU's first packet in the current jiffy. The hit path reads
 * it instead of calling bpf_ktime_get_ns() per packet (a third of the hit path's cost): connection
 * timestamps are CLOCK_MONOTONIC at tick resolution (never ahead of it, at most about a jiffy
 * behind), against idle timeouts of seconds. */
struct rr_clock {
	__u64 jiffies;              /* bpf_jiffies64() when `ns` was read */
	__u64 ns;                   /* bpf_ktime_get_ns() then */
};

/* rr_services key: (VIP, port, protocol) as core/service.py's ServiceKey, port 0 = any port, proto 0 =
 * any protocol. `fragment` 1 marks the entry a TCP/UDP flow key without ports (a fragment) falls back
 * to: the service of that VIP and protocol with the lowest port (port 0 in the key). */
struct rr_service_key {
	__be32 vip;
	__be16 port;
	__u8 proto;
	__u8 fragment;
};

/* rr_services6 key: the same for an IPv6 VIP (core/service.py's 20-byte lookup entries). */
struct rr_service_key6 {
	__u8 vip[16];
	__be16 port;
	__u8 proto;
	__u8 fragment;
};

/* rr_services and rr_services6 value. A service's index names its Maglev table (rr_maglev[index * table_stride ...])
 * and its member bitmap (rr_members[index * RR_MEMBER_WORDS ...]). */
struct rr_service {
	__u32 index;
	__u32 table_size;           /* slots of its table (0: no backend with a weight: NO_BACKEND) */
	__u32 flags;                /* its options, RR_OPT_* */
};

/* rr_icmp_bucket[0], per CPU: the "too big" answers' token bucket (core/options.py TokenBucket), credit
 * in nanoseconds. Zero at load: the first packet finds it full (credit capped at icmp_capacity_ns). */
struct rr_icmp_bucket {
	__u64 credit_ns;
	__u64 last_ns;
};

/* rr_quic key: a service's index and a QUIC server ID (docs/WIRE.md section 11.4); the value is the
 * rr_backends index of the backend with that ID. */
#define RR_QUIC_KEY(svc_index, server_id) ((svc_index) << 16 | (server_id))
#define RR_MAX_QUIC_IDS 4096

/* rr_backend_stats value, per CPU: what was forwarded to backend b for the service with index s, at
 * rr_backend_stats[s * RR_MAX_BACKENDS + b]. Counted as core/balancer.py counts a
 * pool's packets and bytes: on XDP_TX only, bytes = the inner packet's total length. The map planner
 * zeroes a slot before its (service, backend index) pair starts naming another address or rejoins. */
struct rr_backend_stats {
	__u64 packets;
	__u64 bytes;
};

/* rr_stats indexes. 1..18, 23..25 and 27 are the drop reasons of docs/WIRE.md section 9, numbered as there.
 * A forward is counted once, by its inner packet's family: RR_STAT_FORWARDED (IPv4) or
 * RR_STAT_FORWARDED_IPV6; the figure "forwarded" is their sum (engines/xdp/counters.py). */
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
#define RR_DROP_NO_SERVICE 17       /* no service matches (no rr_services entry, no catch-all) */
#define RR_DROP_TX_FAILED 18        /* bpf_xdp_adjust_head/tail refused */
#define RR_STAT_PASSED 19           /* not GRE over IPv4 or IPv6 (WIRE.md section 1): XDP_PASS */
#define RR_STAT_CONN_HIT 20         /* forwarded frames whose backend came from rr_conns */
#define RR_STAT_CONN_NEW 21         /* rr_conns entries (re)written from the Maglev table */
#define RR_STAT_CONN_INSERT 22      /* of those, written under a key with no entry at all (a new
                                     * entry, not a rewrite): engines/xdp/counters.py derives LRU
                                     * evictions */
#define RR_DROP_TX_REFUSED 23       /* never counted by the program: frames the device refused to transmit
                                     * after XDP_TX, which the engine reads from the device (docs/WIRE.md
                                     * section 9); reserved so that every drop reason has one number */
#define RR_DROP_INNER_EXT_HEADERS 24 /* more than RR_EXT_HEADERS inner IPv6 extension headers, or one cut short */
#define RR_DROP_OUTPUT_TOO_BIG 25   /* the output's IP packet is longer than rr_config.mtu */
#define RR_STAT_FORWARDED_IPV6 26   /* forwards whose inner packet is IPv6 (RR_STAT_FORWARDED: IPv4) */
#define RR_DROP_ICMP_RATE_LIMITED 27 /* too big, to be answered, but this CPU's token bucket was empty */
#define RR_STAT_ICMP_TOO_BIG 28     /* "fragmentation needed" / "packet too big" answers sent (XDP_TX) */
#define RR_STAT_ICMP_ECHO 29        /* echo requests answered (XDP_TX) */
#define RR_STAT_QUIC_ROUTED 30      /* forwards whose backend came from their QUIC server ID */
#define RR_STAT_FLOW_CACHE_HIT 31   /* forwards whose backend came from a copy of an rr_conns entry
                                     * (rr_flow_cache): the XDP engine's conn_hit is this and 20 */
#define RR_STAT_MAX 32

#define RR_EXT_HEADERS 4            /* inner IPv6 extension headers walked (core/ipv6.py EXTENSION_HEADER_LIMIT) */

#define RR_MAX_BACKENDS 4096
#define RR_DEFAULT_TABLE_SIZE 65537
#define RR_DEFAULT_CONNS (1 << 20)
#define RR_DEFAULT_MAX_SERVICES 64  /* the loader may set another number before load */
/* rr_members: per service, one bit per rr_backends index: the backends listed in that service
 * (drained ones included), which a connection entry must name to be used. */
#define RR_MEMBER_WORDS (RR_MAX_BACKENDS / 64)

#endif
