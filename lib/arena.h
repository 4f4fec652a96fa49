/* SPDX-License-Identifier: MIT */
/*
 * arena.h - private header of the huge-page arena (lib/arena.c): fixed-size
 * objects carved out of 2 MiB chunks that are mapped 2 MiB-aligned and
 * marked MADV_HUGEPAGE, so that the aggregator's histograms (hist.c's
 * storage) and the engine's per-subject states, whose first line holds
 * the window's hot fields (lib/engine.c, calloc_line), sit in a few huge
 * pages instead of thousands of 4 KiB ones.  Not installed.
 *
 * Why: with 10,000 subjects every drained sample lands in a different
 * subject's counters, and in 4 KiB pages nearly every one of those
 * touches also misses the TLB (BENCHMARKS.md, issue 18).  One 2 MiB page
 * holds the two histograms of about 200 subjects, or the states of about
 * 1,000.
 *
 * Memory: a chunk is unmapped as soon as its last object is freed, unless
 * it is the one spare chunk kept while its size class has other chunks in
 * use (so that a subject that sleeps and wakes at a chunk's edge does not
 * map and unmap 2 MiB each time); when every object of a size class is
 * free, nothing of it stays mapped.  So idle windows give their memory
 * back to the system as they did with malloc (window.h, Idle subjects).
 * tally__arena_bytes() counts what is mapped, whole chunks, for the
 * benchmarks' heap figures.
 *
 * Failure: tally__arena_alloc() returns NULL when no chunk can be mapped
 * (or the object is too large for one); the caller then uses malloc
 * (hist.c does) and remembers which it used.  A kernel that refuses
 * MADV_HUGEPAGE once is not asked again: every later object is NULL at
 * once (malloc), the chunks already mapped still serve.
 *
 * Threads: one process-wide set of size classes under one mutex.  Objects
 * are taken and given back only on slow paths (a window made, woken, put
 * to sleep or destroyed), never per sample, and with drain_threads > 1 a
 * window may be made by one thread's code and destroyed by another's
 * (engine teardown): a lock costs a few tens of ns there and keeps the
 * arena out of the engine's and the lanes' structs.  The lock is held
 * across fork() (pthread_atfork), so a child never inherits it taken.
 */
#ifndef TALLY_LIB_ARENA_H
#define TALLY_LIB_ARENA_H

#include <stddef.h>

/* Chunk size and alignment: one x86-64 huge page. */
#define TALLY__ARENA_CHUNK ((size_t)2 << 20)

/* A zeroed object of size bytes (rounded up to 64; 64-byte aligned), or
 * NULL (no memory, or size over a sixteenth of a chunk).  Any thread. */
void *tally__arena_alloc(size_t size);

/* Give back p, from tally__arena_alloc(size) with the same size.  p NULL
 * is fine.  Any thread. */
void tally__arena_free(void *p, size_t size);

/* Bytes mapped by the arena now (whole chunks).  Any thread. */
size_t tally__arena_bytes(void);

#endif /* TALLY_LIB_ARENA_H */
