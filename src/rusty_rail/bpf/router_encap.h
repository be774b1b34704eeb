/* SPDX-License-Identifier: Apache-2.0 */
/* Maps and structs of the lab router's GRE encapsulator (router_encap.c).
 * Mirrored in Python by rusty_rail/lab/router.py; tests/test_lab_plan.py checks the mirror. */
#ifndef RR_ROUTER_ENCAP_H
#define RR_ROUTER_ENCAP_H

#include <linux/types.h>

/* Key 0 of rr_encap_cfg. Addresses and the service prefixes are in network byte order. */
struct rr_encap_cfg {
	__u32 service_net;     /* inner IPv4 destinations (dst & mask) == service_net are encapsulated */
	__u32 service_mask;
	__u32 src;             /* outer IPv4 source: the router's IPv4 address on network V */
	__u32 service6_net[4]; /* the same for inner IPv6 destinations */
	__u32 service6_mask[4];
	__u32 src6[4];         /* outer IPv6 source: the router's IPv6 address on network V */
};

/* Value of rr_encap_endpoints, keyed by an IPv6 next hop (16 bytes): that next hop is reached through
 * GRE over IPv4, to this address (network order). An IPv6 next hop not listed is reached over IPv6. */
struct rr_encap_endpoint {
	__u32 ipv4;
};

/* Counters, index into rr_encap_stats. */
enum rr_encap_stat {
	RR_ENCAP_OK = 0,         /* encapsulated and sent, in skbs: a GSO super-packet counts once */
	RR_ENCAP_NO_ROUTE = 1,   /* the kernel has no route forwarding the inner packet: dropped */
	RR_ENCAP_NO_NEIGH = 2,   /* of RR_ENCAP_OK, the next hop's MAC unknown: handed to bpf_redirect_neigh */
	RR_ENCAP_NO_GATEWAY = 3, /* the route names no next-hop address to tunnel to: dropped */
	RR_ENCAP_ROOM_FAIL = 4,  /* bpf_skb_adjust_room failed: dropped */
	RR_ENCAP_OK_WIRE = 5,    /* RR_ENCAP_OK in wire packets (a GSO skb's segments), as balancers count */
	RR_ENCAP_OK_WIRE_IPV6 = 6, /* of RR_ENCAP_OK_WIRE, inner IPv6 packets (balancers' forwarded_ipv6) */
	RR_ENCAP_OUTER_IPV6 = 7,   /* of RR_ENCAP_OK, sent in GRE over IPv6 */
	RR_ENCAP_STATS = 8,
};

#endif
