// SPDX-License-Identifier: Apache-2.0
/* The lab's router: GRE encapsulation toward the balancers on tc clsact egress (direct action).
 *
 * There is neither a GRE nor an ip6_gre module in the kernel, so the router cannot have a tunnel device;
 * instead packets routed to a service address (IPv4 or IPv6) leave through network V and this program
 * wraps them on the way out: Ethernet | IPv4 (20, proto 47) or IPv6 (40, next header 47) | GRE (4, the
 * inner EtherType) | inner packet, like the original's router.
 * The target is the next hop of the kernel's own route to the inner destination: BIRD installs the
 * balancers' BGP routes to the VIPs as one multipath route per family (or static ones in the lab's direct
 * mode), and bpf_fib_lookup on the inner 5-tuple, with fib_multipath_hash_policy=1 set in the router's
 * namespace for both families, returns the next hop the kernel's L4 hash picks for the flow: one flow,
 * one target, and a withdrawn route takes its balancer out at once. The outer family is the next hop's
 * (an IPv6 route's next hops are IPv6), except for an IPv6 next hop listed in rr_encap_endpoints, which
 * is reached over IPv4 at the address listed (the lab's "IPv6 over IPv4" tunnels: the kernel has no IPv6
 * route through an IPv4 gateway). Python writes only the prefixes, the sources and the endpoints
 * (router.py).
 */
#include <linux/pkt_cls.h>

#include "router_encap.h"
#include "rr_tc.h"

#define AF_INET 2
#define AF_INET6 10
#define ENCAP4_LEN (sizeof(struct iphdr) + GRE_HLEN)
#define ENCAP6_LEN (sizeof(struct ipv6hdr) + GRE_HLEN)
/* Ethernet, the fixed IPv6 header (longer than IPv4 without options; with options, no ports are read),
 * a TCP header to its data offset. */
#define HEADERS_MAX (ETH_HLEN + sizeof(struct ipv6hdr) + 13)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rr_encap_cfg);
} rr_encap_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RR_ENCAP_STATS);
	__type(key, __u32);
	__type(value, __u64);
} rr_encap_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct in6_addr);
	__type(value, struct rr_encap_endpoint);
} rr_encap_endpoints SEC(".maps");

/* What the encapsulation needs of the inner packet, whichever its family. */
struct inner {
	__u32 len;   /* its length: IPv4 total length, or 40 + IPv6 payload length */
	__u32 hlen;  /* the header bytes every GSO segment repeats (IP + TCP/UDP where read) */
	__be16 type; /* its EtherType: GRE's protocol field */
	__u8 tc;     /* IPv4 TOS or IPv6 traffic class: the outer header's too */
};

static __always_inline void count_n(__u32 what, __u64 n)
{
	__u64 *c = bpf_map_lookup_elem(&rr_encap_stats, &what);

	if (c)
		__sync_fetch_and_add(c, n);
}

static __always_inline void count(__u32 what)
{
	count_n(what, 1);
}

/* The transport header bytes a GSO segment repeats, or 0 where they are not read. */
static __always_inline __u32 transport_headers(__u8 proto, __u8 *l4, void *end)
{
	if (proto == IPPROTO_UDP)
		return 8;
	if (proto == IPPROTO_TCP && (void *)(l4 + 13) <= end)
		return (l4[12] >> 4) * 4;
	return 0;
}

/* Sent: counted as the skb it is and as the packets it becomes on the wire, which is what a balancer
 * counts. A GSO skb (a sender's 64 KB write, forwarded whole) is cut after this program into pieces of
 * gso_size payload bytes. Called after bpf_skb_adjust_room, which shrank gso_size by the bytes it
 * added and zeroed gso_segs for the stack to recount: so the count is made here, the stack's way. */
static __always_inline void count_sent(struct __sk_buff *skb, __u32 encap_len, struct inner *in)
{
	__u32 mss = skb->gso_size, headers = ETH_HLEN + encap_len + in->hlen, wire = 1;

	if (mss && skb->len > headers)
		wire = (skb->len - headers + mss - 1) / mss;
	count(RR_ENCAP_OK);
	count_n(RR_ENCAP_OK_WIRE, wire);
	if (in->type == bpf_htons(ETH_P_IPV6))
		count_n(RR_ENCAP_OK_WIRE_IPV6, wire);
	if (encap_len == ENCAP6_LEN)
		count(RR_ENCAP_OUTER_IPV6);
}

/* An inner IPv4 packet to the service prefix: the lookup's fields and *in; 0 when it is not ours. Ports
 * for unfragmented TCP/UDP; fragments and everything else follow the 3-tuple. */
static __always_inline int inner4(struct iphdr *ip, void *end, struct rr_encap_cfg *cfg,
				  struct bpf_fib_lookup *fib, struct inner *in)
{
	__u32 *ports = (void *)(ip + 1);

	if ((void *)(ip + 1) > end || ip->version != 4 || ip->protocol == IPPROTO_GRE ||
	    (ip->daddr & cfg->service_mask) != cfg->service_net)
		return 0;
	fib->family = AF_INET;
	fib->tos = ip->tos;
	fib->l4_protocol = ip->protocol;
	if ((ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) && ip->ihl == 5 &&
	    !(ip->frag_off & bpf_htons(IP_MF_OFFSET)) && (void *)(ports + 1) <= end) {
		fib->sport = *ports & 0xffff; /* both still in network order, as the wire has them */
		fib->dport = *ports >> 16;
	}
	fib->ipv4_src = ip->saddr;
	fib->ipv4_dst = ip->daddr;
	in->len = bpf_ntohs(ip->tot_len);
	in->hlen = ip->ihl * 4 + (ip->ihl == 5 ? transport_headers(ip->protocol, (void *)(ip + 1), end) : 0);
	in->type = bpf_htons(ETH_P_IP);
	in->tc = ip->tos;
	return 1;
}

/* The same for an inner IPv6 packet (RFC 8200). Ports when TCP or UDP follows the fixed header: the
 * kernel's multipath hash takes them from the lookup alike; with extension headers, the 3-tuple. */
static __always_inline int inner6(struct ipv6hdr *ip6, void *end, struct rr_encap_cfg *cfg,
				  struct bpf_fib_lookup *fib, struct inner *in)
{
	__u32 *dst = ip6->daddr.in6_u.u6_addr32, *ports = (void *)(ip6 + 1);

	if ((void *)(ip6 + 1) > end || ip6->version != 6 || ip6->nexthdr == IPPROTO_GRE)
		return 0;
	if ((dst[0] & cfg->service6_mask[0]) != cfg->service6_net[0] ||
	    (dst[1] & cfg->service6_mask[1]) != cfg->service6_net[1] ||
	    (dst[2] & cfg->service6_mask[2]) != cfg->service6_net[2] ||
	    (dst[3] & cfg->service6_mask[3]) != cfg->service6_net[3])
		return 0;
	fib->family = AF_INET6;
	fib->flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0FFFFFFF);
	fib->l4_protocol = ip6->nexthdr;
	if ((ip6->nexthdr == IPPROTO_TCP || ip6->nexthdr == IPPROTO_UDP) && (void *)(ports + 1) <= end) {
		fib->sport = *ports & 0xffff;
		fib->dport = *ports >> 16;
	}
	__builtin_memcpy(fib->ipv6_src, ip6->saddr.in6_u.u6_addr32, 16);
	__builtin_memcpy(fib->ipv6_dst, dst, 16);
	in->len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	in->hlen = sizeof(*ip6) + transport_headers(ip6->nexthdr, (void *)(ip6 + 1), end);
	in->type = bpf_htons(ETH_P_IPV6);
	in->tc = bpf_ntohl(*(__be32 *)ip6) >> 20;
	return 1;
}

/* Make room after the Ethernet header and write the outer header (outer_len bytes), the 4-byte GRE
 * header and the new ethertype: shared by both outer families. -1: no room; -2: a store failed. */
static __always_inline int push(struct __sk_buff *skb, void *outer, __u32 outer_len, __be16 *gre,
				__be16 type, __u64 l3_flag)
{
	if (bpf_skb_adjust_room(skb, outer_len + GRE_HLEN, BPF_ADJ_ROOM_MAC, l3_flag | BPF_F_ADJ_ROOM_ENCAP_L4_GRE))
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, outer, outer_len, 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + outer_len, gre, GRE_HLEN, 0) ||
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &type, sizeof(type), 0))
		return -2;
	return 0;
}

/* Wrap the skb in IPv4 + GRE from src to dst. */
static __always_inline int push4(struct __sk_buff *skb, struct inner *in, __be32 src, __be32 dst)
{
	struct iphdr outer = {};
	__be16 gre[2] = {0, in->type}, type = bpf_htons(ETH_P_IP);
	__u32 csum;

	outer.version = 4;
	outer.ihl = 5;
	outer.tos = in->tc;
	outer.tot_len = bpf_htons(in->len + ENCAP4_LEN);
	outer.frag_off = bpf_htons(0x4000); /* DF, ID 0 */
	outer.ttl = 64;
	outer.protocol = IPPROTO_GRE;
	outer.saddr = src;
	outer.daddr = dst;
	csum = bpf_csum_diff(0, 0, (__be32 *)&outer, sizeof(outer), 0);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	outer.check = ~csum & 0xffff;
	return push(skb, &outer, sizeof(outer), gre, type, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4);
}

/* Wrap the skb in IPv6 + GRE from src to dst. The flow label is the skb's flow hash (RFC 6438: a
 * tunnel's label from the inner flow, so paths that hash on it keep a flow together). */
static __always_inline int push6(struct __sk_buff *skb, struct inner *in, __u32 *src, __u32 *dst)
{
	struct ipv6hdr outer = {};
	__be16 gre[2] = {0, in->type}, type = bpf_htons(ETH_P_IPV6);
	__u32 label = bpf_get_hash_recalc(skb) & 0xFFFFF;

	*(__be32 *)&outer = bpf_htonl(6 << 28 | (__u32)in->tc << 20 | label);
	outer.payload_len = bpf_htons(in->len + GRE_HLEN);
	outer.nexthdr = IPPROTO_GRE;
	outer.hop_limit = 64;
	__builtin_memcpy(outer.saddr.in6_u.u6_addr32, src, 16);
	__builtin_memcpy(outer.daddr.in6_u.u6_addr32, dst, 16);
	return push(skb, &outer, sizeof(outer), gre, type, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6);
}

SEC("tc")
int rr_router_encap(struct __sk_buff *skb)
{
	void *end;
	struct ethhdr *eth;
	struct bpf_fib_lookup fib = {};
	struct rr_encap_cfg *cfg;
	struct rr_encap_endpoint *endpoint = NULL;
	struct inner in = {};
	__u32 zero = 0, inner_dst[4], encap_len;
	int rc, pushed, family;

	eth = rr_tc_eth(skb, HEADERS_MAX, &end);
	cfg = bpf_map_lookup_elem(&rr_encap_cfg, &zero);
	if (!eth || !cfg)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		if (!inner4((void *)(eth + 1), end, cfg, &fib, &in))
			return TC_ACT_OK;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		if (!inner6((void *)(eth + 1), end, cfg, &fib, &in))
			return TC_ACT_OK;
	} else {
		return TC_ACT_OK;
	}
	family = fib.family;
	__builtin_memcpy(inner_dst, fib.ipv6_dst, sizeof(inner_dst)); /* ipv4_dst is its first word */

	/* The kernel's forwarding choice for the inner packet: an input lookup as if it had just arrived on
	 * the interface it came in by (so the multipath hash runs: an output lookup with an interface given
	 * skips it), with the ports filled for the L4 hash. tot_len 0: the kernel checks the MTU itself,
	 * knowing GSO packets are segmented later. On success fib.ipv4_dst / ipv6_dst is the next hop, and
	 * fib.family its family (an IPv4 route may have an IPv6 gateway, RFC 5549). */
	fib.tot_len = 0;
	fib.ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
		count(RR_ENCAP_NO_ROUTE);
		return TC_ACT_SHOT;
	}
	if (fib.family == family && fib.ipv6_dst[0] == inner_dst[0] &&
	    (family == AF_INET || (fib.ipv6_dst[1] == inner_dst[1] && fib.ipv6_dst[2] == inner_dst[2] &&
				   fib.ipv6_dst[3] == inner_dst[3]))) {
		count(RR_ENCAP_NO_GATEWAY); /* the destination itself is the next hop: nothing to tunnel to */
		return TC_ACT_SHOT;
	}

	if (fib.family == AF_INET6)
		endpoint = bpf_map_lookup_elem(&rr_encap_endpoints, fib.ipv6_dst);
	if (fib.family == AF_INET)
		pushed = push4(skb, &in, cfg->src, fib.ipv4_dst);
	else if (endpoint)
		pushed = push4(skb, &in, cfg->src, endpoint->ipv4);
	else
		pushed = push6(skb, &in, cfg->src6, fib.ipv6_dst);
	if (pushed) {
		if (pushed == -1)
			count(RR_ENCAP_ROOM_FAIL);
		return TC_ACT_SHOT;
	}
	encap_len = fib.family == AF_INET || endpoint ? ENCAP4_LEN : ENCAP6_LEN;

	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The kernel resolves the MAC of the outer destination (ARP or neighbour discovery) and sends. */
		count(RR_ENCAP_NO_NEIGH);
		count_sent(skb, encap_len, &in);
		return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
	}
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	count_sent(skb, encap_len, &in);
	if (fib.ifindex != skb->ifindex)
		return bpf_redirect(fib.ifindex, 0);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
