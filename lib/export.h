/* SPDX-License-Identifier: MIT */
/*
 * export.h - private header of the packed export buckets (lib/export.c):
 * a subject's since-start counts below each export edge (the cumulative
 * histogram /metrics shows, Prometheus counters that never decrease),
 * its count and its sum, in a few dozen bytes instead of one uint64 per
 * edge.  Not installed.
 *
 * Why: the engine keeps these counts for every subject it has ever seen,
 * busy or idle, and publishes a copy of them with each snapshot.  Dense,
 * that is 92 x 8 bytes for the engine's own copy and as much again for
 * the published one, about 1.5 KB of an idle subject's memory (issue
 * 18: an idle subject < 1 KB).  Most of a subject's edges hold the same
 * cumulative count as the edge before (its latencies fill a few
 * octaves), so the per-edge differences are mostly 0.
 *
 * Form: varint count, varint sum, then for each edge whose difference
 * from the edge before is not 0, varint gap (edges skipped since the
 * last one written, each with difference 0), varint difference; edges
 * past the last one written have difference 0.  Differences are taken
 * modulo 2^64, so every array packs and unpacks exactly (the counts are
 * nondecreasing, but nothing here depends on it).
 *
 * Lifetime (lib/engine.c): the engine's counts are dense while the
 * subject's window is awake (a slice closing folds into them) and packed
 * once it sleeps; a published bucket block points at a sleeping
 * subject's pack instead of copying it (shown), and a pack the engine
 * gives up while some block may still show it is freed with the newest
 * block (retire_next), after that block's grace period.  Readers only
 * ever read len and bytes; the engine's thread alone writes the rest.
 */
#ifndef TALLY_LIB_EXPORT_H
#define TALLY_LIB_EXPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tally__export_pack {
	struct tally__export_pack *retire_next; /* the engine's: on a block's free list */
	uint32_t len;                           /* bytes */
	bool shown;                             /* the engine's: a block may point at it */
	uint8_t bytes[];
};

/* The most bytes the packed form of n edges can take. */
#define TALLY__EXPORT_PACKED_MAX(n) (20u + 20u * (size_t)(n))

/* Bytes of the packed form of le[n], count and sum. */
size_t tally__export_packed_len(const uint64_t *le, uint32_t n, uint64_t count, uint64_t sum);

/* Write the packed form at out (room for tally__export_packed_len());
 * returns past it. */
uint8_t *tally__export_put(uint8_t *out, const uint64_t *le, uint32_t n, uint64_t count, uint64_t sum);

/* A pack of le[n], count and sum, malloc'd to its size (shown false), or
 * NULL (no memory; the test hook's "export.pack"). */
struct tally__export_pack *tally__export_pack_new(const uint64_t *le, uint32_t n, uint64_t count,
						  uint64_t sum);

/* Add a packed form (bytes, len) into le[n], *count and *sum (the sum
 * saturating, as the engine's).  A form that names an edge past n or
 * ends inside a varint is a broken invariant of our own heap: dies
 * naming it. */
void tally__export_add(const uint8_t *bytes, uint32_t len, uint64_t *le, uint32_t n, uint64_t *count,
		       uint64_t *sum);

#endif /* TALLY_LIB_EXPORT_H */
