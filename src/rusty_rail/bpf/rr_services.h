/* Rusty Rail: a flow's service and its members, from the XDP program's maps (docs/WIRE.md section 10):
 * the lookups in rr_services / rr_services6 in core/service.py's order, the catch-all, and the member
 * bitmap a connection entry's backend must be in. Included by xdp_balancer.c only.
 */
#ifndef RR_SERVICES_H
#define RR_SERVICES_H

#include "rr_maps.h"
#include "rr_ipv6.h"

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
		svc = bpf_map_lookup_elem(&rr_services, &sk);
		barrier_var(svc);       /* not sunk into one call with find_named6's (see find_conn) */
		return svc;
	}
	return NULL;
}

/* find_named for an IPv6 flow: the same rule over rr_services6's 20-byte keys. */
static __always_inline struct rr_service *find_named6(const struct rr_flow_key6 *key)
{
	struct rr_service_key6 sk = {
		.port = key->dport,
		.proto = key->proto,
		.fragment = 0,
	};
	struct rr_service *svc;

	copy16(sk.vip, key->dst);
	if (sk.port) {
		svc = bpf_map_lookup_elem(&rr_services6, &sk);
		if (svc)
			return svc;
		sk.port = 0;
	}
	svc = bpf_map_lookup_elem(&rr_services6, &sk);
	if (svc)
		return svc;
	sk.proto = 0;
	svc = bpf_map_lookup_elem(&rr_services6, &sk);
	if (svc)
		return svc;
	if ((key->proto == IPPROTO_TCP || key->proto == IPPROTO_UDP) && !key->sport && !key->dport) {
		sk.proto = key->proto;
		sk.fragment = 1;
		return bpf_map_lookup_elem(&rr_services6, &sk);
	}
	return NULL;
}

/* The flow's service as its index, table size and options; 0 when none matches (NO_SERVICE). Services
 * with a VIP of the flow's family first (only when there are any: the environment form looks nothing
 * up), then the catch-all. `named` is find_named's or find_named6's answer, NULL when not looked up. */
static __always_inline int find_service(const struct rr_config *cfg, struct rr_service *named,
					__u32 *index, __u32 *table_size, __u32 *flags)
{
	if (named) {
		*index = named->index;
		*table_size = named->table_size;
		*flags = named->flags;
		return 1;
	}
	if (!cfg->catch_all)
		return 0;
	*index = cfg->catch_all - 1;
	*table_size = cfg->catch_all_size;
	*flags = cfg->catch_all_flags;
	return 1;
}

/* Is rr_backends[index] (index < RR_MAX_BACKENDS) listed in the service `svc_index`? */
static __always_inline int is_member(__u32 svc_index, __u32 index)
{
	__u32 word = svc_index * RR_MEMBER_WORDS + (index >> 6);
	__u64 *bits = bpf_map_lookup_elem(&rr_members, &word);

	return bits && ((*bits >> (index & 63)) & 1);
}

#endif
