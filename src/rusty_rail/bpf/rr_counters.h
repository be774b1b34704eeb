/* Rusty Rail: counting and the clock, for the XDP program and its headers (rr_stats, rr_clock). Included
 * by xdp_balancer.c (and the headers it includes after this one) only. */
#ifndef RR_COUNTERS_H
#define RR_COUNTERS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "rr_maps.h"

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

#endif
