/* SPDX-License-Identifier: Apache-2.0 */
/* The hash pieces of the balancer's BPF program, written once: murmur3's finaliser and the seed.
 * The Python twins are rusty_rail/core/flowhash.py (fmix32) and core/constants.py (RR_HASH_SEED);
 * tests compare them. */
#ifndef RR_HASH_H
#define RR_HASH_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

/* core/constants.py RR_HASH_SEED (docs/WIRE.md section 6). */
#define RR_HASH_SEED 0x52525f31

/* murmur3's finaliser (Appleby): mixes every input bit into every output bit. */
static __always_inline __u32 rr_fmix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85EBCA6B;
	h ^= h >> 13;
	h *= 0xC2B2AE35;
	h ^= h >> 16;
	return h;
}

#endif
