/* SPDX-License-Identifier: MIT */
/*
 * engine_priv.h (private): an engine without its thread, driven by the
 * caller, so that the benchmark measures the real ingest loop of
 * engine.c on one core instead of a copy of it; and what the benchmark
 * reads of a running engine that the public counters do not say.
 */
#ifndef TALLY_LIB_ENGINE_PRIV_H
#define TALLY_LIB_ENGINE_PRIV_H

#include <stdbool.h>
#include <stdint.h>

#include <tally/engine.h>

/* The drain's look-ahead (engine.c, drain_slot and lane_drain_slot;
 * issue 18), here so that the benchmark's memory floor uses the same
 * distances.  With thousands of subjects, a sample's window and bucket
 * are rarely in cache, and one miss after another is what bounds the
 * ingest.  So the drain looks ahead in the ring: TALLY__PF_FAR entries
 * ahead it fetches both the subject's state and the bucket counter the
 * value will increment (the block subtotals are not kept on this path:
 * hist.h, Subtotals), the counter's address from an array beside the
 * state pointers (pf_counts), not from the state's line, which is still
 * on its way; the misses overlap instead of queueing.  Only hints: every
 * index is bounds-checked as it would be for real, and a wrong guess (a
 * rewritten entry, counters a sleep gave back) costs a useless fetch,
 * nothing more.  Below TALLY__PF_MIN_SUBJECTS active subjects everything
 * is in cache and the look-ahead is skipped.  Retuned after the lazy add
 * (BENCHMARKS.md, issue 18): 11 pairs of distances from 8/4 to 64/24,
 * none better than 16/8 (the counter then fetched 8 entries ahead, from
 * the state's line); with one look 16 entries ahead for both, 24 and 32
 * were no better (2026-12-07). */
#define TALLY__PF_FAR 16u
#define TALLY__PF_MIN_SUBJECTS 256u
/* The ring itself: the hardware prefetcher follows a stream only inside a
 * 4 KiB page (256 entries), so every page the drain enters was a stall on
 * memory; TALLY__RING_PF entries ahead (2 KiB), one line in four entries,
 * and only entries already published (a line the producer is still
 * writing would be taken from it).  At 10 subjects, where nothing else
 * misses, this was +35-70% samples per CPU-second, one drain thread or
 * two. */
#define TALLY__RING_PF 128u

/* An engine on seg with no aggregator thread. Same errors as
 * tally_engine_start(). Free with tally__engine_free(). */
int tally__engine_new(struct tally_segment *seg, const struct tally_engine_config *cfg,
		      struct tally_engine **out);

/* One pass of the aggregator's ingest at time now: close slices that
 * ended, then drain every ring once (a bounded batch each). Returns the
 * samples taken. Only on an engine from tally__engine_new(). With
 * drain_threads N > 1, each drain thread's pass over its own slots runs
 * here in turn, in the caller's thread (threads 1 .. N-1, then 0). */
uint64_t tally__engine_ingest(struct tally_engine *e, uint64_t now);

/* For tests of the lazy advance: enter now's slice without walking the
 * subjects (as when a drain comes between a slice change and the walk
 * reaching a subject), then drain every ring once. */
uint64_t tally__engine_ingest_lazy(struct tally_engine *e, uint64_t now);

/* Hold (true) or resume the draining of every drain thread of a running
 * engine; it still publishes. For the benchmark: rings filled while
 * held, then drained flat out. Any thread. */
void tally__engine_hold(struct tally_engine *e, bool hold);

/* What the thread does to publish at now: close slices that ended in
 * every window, then publish (tally_engine_read then reads it). */
void tally__engine_publish(struct tally_engine *e, uint64_t now);

/* Samples rejected so far (bad subject ids). */
uint64_t tally__engine_rejected(struct tally_engine *e);

/* Rows of publishes that drain threads merged while thread 0 held them
 * (lib/engine.c, struct merge_job); 0 with one drain thread. */
uint64_t tally__engine_merge_helped(struct tally_engine *e);

/* The longest time the aggregator went without draining a ring since the
 * last reset (a publish, a slice close, a reap), not counting its sleeps
 * when idle. reset: start over (returns the value it had). Any thread. */
uint64_t tally__engine_max_stall_ns(struct tally_engine *e, bool reset);

void tally__engine_free(struct tally_engine **e);

#endif /* TALLY_LIB_ENGINE_PRIV_H */
