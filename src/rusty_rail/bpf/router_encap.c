// SPDX-License-Identifier: Apache-2.0
/* The lab's router: GRE encapsulation toward the balancers on tc clsact egress (direct action).
 *
 * There is no GRE module in the kernel, so the router cannot have a gre device; instead packets routed
 * to a service address leave through network V and this program wraps them on the way out:
 * Ethernet | IPv4 (20, proto 47) | GRE (4, proto 0x0800) | inner packet, like the original's router.
 * The target is the next hop of the kernel's own route to the inner destination: BIRD installs the
 * balancers' BGP routes to the VIPs as one multipath route (or static ones in the lab's direct mode), and
 * bpf_fib_lookup on the inner 5-tuple, with fib_multipath_hash_policy=1 set in the router's namespace,
 * returns the next hop the kernel's L4 hash picks for the flow: one flow, one target, and a withdrawn
 * route takes its balancer out at once. Python writes only the service prefix and source (router.py).
 */
#include <linux/in.h>
#include <linux/pkt_cls.h>

#include "router_encap.h"
#include "rr_tc.h"

#define AF_INET 2
#define GRE_HLEN 4
#define ENCAP_LEN (sizeof(struct iphdr) + GRE_HLEN)
#define IP_MF_OFFSET 0x3FFF
/* Ethernet, IPv4 without options (with options, no ports are read), a TCP header to its data offset. */
#define HEADERS_MAX (ETH_HLEN + sizeof(struct iphdr) + 13)

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

/* The inner header bytes (IPv4 + TCP/UDP) every GSO segment repeats. The transport's part is left out
 * where it is not read: behind IPv4 options (no GSO sender here uses them), or not TCP/UDP. */
static __always_inline __u32 inner_headers(struct iphdr *ip, void *end)
{
	__u8 *l4 = (void *)(ip + 1);

	if (ip->ihl != 5)
		return ip->ihl * 4;
	if (ip->protocol == IPPROTO_UDP)
		return sizeof(*ip) + 8;
	if (ip->protocol == IPPROTO_TCP && (void *)(l4 + 13) <= end)
		return sizeof(*ip) + (l4[12] >> 4) * 4;
	return sizeof(*ip);
}

/* Sent: counted as the skb it is and as the packets it becomes on the wire, which is what a balancer
 * counts. A GSO skb (a sender's 64 KB write, forwarded whole) is cut after this program into pieces of
 * gso_size payload bytes. Called after bpf_skb_adjust_room, which shrank gso_size by the 24 bytes it
 * added and zeroed gso_segs for the stack to recount: so the count is made here, the stack's way. */
static __always_inline void count_sent(struct __sk_buff *skb, __u32 inner_hlen)
{
	__u32 mss = skb->gso_size, headers = ETH_HLEN + ENCAP_LEN + inner_hlen, wire = 1;

	if (mss && skb->len > headers)
		wire = (skb->len - headers + mss - 1) / mss;
	count(RR_ENCAP_OK);
	count_n(RR_ENCAP_OK_WIRE, wire);
}

/* The kernel's forwarding choice for the inner packet: an input lookup as if it had just arrived on
 * the interface it came in by (so the multipath hash runs: an output lookup with an interface given
 * skips it), with the ports filled for the L4 hash. On success fib->ipv4_dst is the route's next hop. */
static __always_inline int route_inner(struct __sk_buff *skb, struct iphdr *ip, __u32 ports,
				       struct bpf_fib_lookup *fib)
{
	fib->family = AF_INET;
	fib->tos = ip->tos;
	fib->l4_protocol = ip->protocol;
	fib->sport = ports & 0xffff; /* both still in network order, as the wire has them */
	fib->dport = ports >> 16;
	fib->ipv4_src = ip->saddr;
	fib->ipv4_dst = ip->daddr;
	/* tot_len 0: the kernel checks the MTU itself, knowing GSO packets are segmented later. */
	fib->tot_len = 0;
	fib->ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

SEC("tc")
int rr_router_encap(struct __sk_buff *skb)
{
	void *end;
	struct iphdr *ip;
	struct bpf_fib_lookup fib = {};
	struct rr_encap_cfg *cfg;
	struct iphdr outer = {};
	__u32 zero = 0, ports = 0, tot_len, csum, inner_hlen, inner_dst;
	__u16 gre[2] = {0, bpf_htons(ETH_P_IP)};
	int rc;

	ip = rr_tc_ipv4(skb, HEADERS_MAX, &end);
	if (!ip)
		return TC_ACT_OK;
	cfg = bpf_map_lookup_elem(&rr_encap_cfg, &zero);
	if (!cfg || (ip->daddr & cfg->service_mask) != cfg->service_net || ip->protocol == IPPROTO_GRE)
		return TC_ACT_OK;
	/* Ports for unfragmented TCP/UDP; fragments and everything else follow the 3-tuple. */
	if ((ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) && ip->ihl == 5 &&
	    !(ip->frag_off & bpf_htons(IP_MF_OFFSET))) {
		__u32 *p = (void *)(ip + 1);

		if ((void *)(p + 1) <= end)
			ports = *p;
	}
	inner_dst = ip->daddr;
	rc = route_inner(skb, ip, ports, &fib);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
		count(RR_ENCAP_NO_ROUTE);
		return TC_ACT_SHOT;
	}
	if (fib.ipv4_dst == inner_dst) {
		count(RR_ENCAP_NO_GATEWAY);
		return TC_ACT_SHOT;
	}

	inner_hlen = inner_headers(ip, end);
	tot_len = bpf_ntohs(ip->tot_len) + ENCAP_LEN;
	outer.version = 4;
	outer.ihl = 5;
	outer.tos = ip->tos;
	outer.tot_len = bpf_htons(tot_len);
	outer.frag_off = bpf_htons(0x4000); /* DF, ID 0 */
	outer.ttl = 64;
	outer.protocol = IPPROTO_GRE;
	outer.saddr = cfg->src;
	outer.daddr = fib.ipv4_dst;
	csum = bpf_csum_diff(0, 0, (__be32 *)&outer, sizeof(outer), 0);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	outer.check = ~csum & 0xffff;

	if (bpf_skb_adjust_room(skb, ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_GRE)) {
		count(RR_ENCAP_ROOM_FAIL);
		return TC_ACT_SHOT;
	}
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &outer, sizeof(outer), 0) ||
	    bpf_skb_store_bytes(skb, sizeof(struct ethhdr) + sizeof(outer), gre, sizeof(gre), 0))
		return TC_ACT_SHOT;

	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The kernel resolves the next hop's MAC (ARP for the outer destination) and sends the frame. */
		count(RR_ENCAP_NO_NEIGH);
		count_sent(skb, inner_hlen);
		return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
	}
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	count_sent(skb, inner_hlen);
	if (fib.ifindex != skb->ifindex)
		return bpf_redirect(fib.ifindex, 0);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
