/* SPDX-License-Identifier: MIT */
/*
 * gw_pattern.h: the bytes the gateway's tests send and expect as bodies,
 * and the hash they compare: a deterministic pattern that any offset of
 * can be computed without the bytes before it (so a 100 MB body is never
 * held in memory), and FNV-1a 64.
 */
#ifndef TALLY_TEST_GW_PATTERN_H
#define TALLY_TEST_GW_PATTERN_H

#include <stddef.h>
#include <stdint.h>

#define GW_FNV_INIT 0xcbf29ce484222325ull

static inline uint64_t gw_fnv(uint64_t h, const void *p, size_t n)
{
	const unsigned char *s = p;

	for (size_t i = 0; i < n; i++)
		h = (h ^ s[i]) * 0x100000001b3ull;
	return h;
}

/* Byte i of the pattern: a mix of i that is not periodic in 2^k. */
static inline void gw_pattern_fill(char *buf, uint64_t pos, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		uint64_t x = (pos + i) * 0x9E3779B97F4A7C15ull;
		buf[i] = (char)(x >> 56 ^ (pos + i) >> 12);
	}
}

#endif
