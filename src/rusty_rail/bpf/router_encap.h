/* SPDX-License-Identifier: Apache-2.0 */
/* Maps and structs of the lab router's GRE encapsulator (router_encap.c).
 * Mirrored in Python by rusty_rail/lab/router.py; tests/test_lab_plan.py checks the mirror. */
#ifndef RR_ROUTER_ENCAP_H
#define RR_ROUTER_ENCAP_H

#include <linux/types.h>

/* Key 0 of rr_encap_cfg. Addresses and the service prefix are in network byte order. */
struct rr_encap_cfg {
	__u32 service_net;  /* inner destinations (dst & mask) == service_net are encapsulated */
	__u32 service_mask;
	__u32 src;          /* outer source: the router's address on network V */
};

/* Counters, index into rr_encap_stats. */
enum rr_encap_stat {
	RR_ENCAP_OK = 0,         /* encapsulated and sent, in skbs: a GSO super-packet counts once */
	RR_ENCAP_NO_ROUTE = 1,   /* the kernel has no route forwarding the inner packet: dropped */
	RR_ENCAP_NO_NEIGH = 2,   /* of RR_ENCAP_OK, the next hop's MAC unknown: handed to bpf_redirect_neigh */
	RR_ENCAP_NO_GATEWAY = 3, /* the route names no next-hop address to tunnel to: dropped */
	RR_ENCAP_ROOM_FAIL = 4,  /* bpf_skb_adjust_room failed: dropped */
	RR_ENCAP_OK_WIRE = 5,    /* RR_ENCAP_OK in wire packets (a GSO skb's segments), as balancers count */
	RR_ENCAP_STATS = 6,
};

#endif
