/* SPDX-License-Identifier: MIT */
/*
 * window.h - private header of the per-subject sliding window (lib/window.c).
 * It owns a subject's time slices: the current slice that the aggregator
 * fills, the queue of closed slices still inside the window, the running
 * window aggregate, and the statistics the snapshot publishes (count, sum,
 * mean, min, max, rate, p50 .. p999, totals since start).  Not installed.
 *
 * Time is the caller's CLOCK_MONOTONIC in ns, passed in; nothing here reads
 * a clock.  Slice k covers [k * slice_ns, (k + 1) * slice_ns).  With
 * N = window_ns / slice_ns, the window at time t (in slice k) is slices
 * k-N+1 .. k: the N-1 closed slices before the current one plus the current,
 * partial one, so fresh data is visible at once and a value recorded at t is
 * gone from the statistics by t + window_ns (it leaves between
 * window_ns - slice_ns and window_ns after it was recorded).
 *
 * Memory per subject: two dense histograms (current slice, aggregate of
 * the closed slices in the window) of 5 KB each with the default 1 h range
 * (16-bit counters, hist.h), and the closed slices inside the window in
 * one buffer, packed (gamma-coded nonzero buckets, about 200 bytes for a
 * slice of 1,000 log-normal values; hist.h, Packed form), with up to 25%
 * room to grow.  Measured (bench, part window, 1,000 log-normal values
 * per subject per slice, malloc overhead and the huge-page arena's whole
 * chunks included): 10.6 KB per subject with 1 slice, 13.5 KB with 10,
 * 27.4 KB with 60; 10,000 subjects with default settings about 135 MB
 * (it was 510 MB with 32-bit counters and sparse slices).
 *
 * Idle subjects: when an advance leaves the window with no value at all
 * (nothing in the closed slices inside it, nothing in the new current
 * slice: the subject has been idle for a whole window), the window frees
 * both histograms and the buffer and keeps only this struct (320
 * bytes); the histograms' arena unmaps a chunk once it holds none.  Its next value wakes it: tally__window_add() allocates the two
 * histograms again, and if that fails the value is not recorded and is
 * counted in `lost` (and in the stats), never dropped silently.  Stats
 * and advances of a sleeping window cost nothing and allocate nothing.
 *
 * For code that reads or merges windows (e.g. several drain threads'
 * windows merged at publish): the API kept its shape, with these changes
 * since 16-bit counters and sleep came in: tally__window_add() returns
 * bool; w->ring is gone (w->fifo, w->nclosed); a histogram's counts are
 * uint16_t, so read a bucket with tally__hist_bucket(), never counts[i];
 * a sleeping window's cur and agg have no storage (counts NULL, count 0):
 * they read as empty, and merging into one needs tally__hist_wake() first;
 * tally__hist_merge() / _sub() / quantiles / cumulative work as before.
 *
 * Threads: a window belongs to one thread (the aggregator).  Nothing here
 * locks, blocks or is atomic; publish copies the stats out.
 */
#ifndef TALLY_LIB_WINDOW_H
#define TALLY_LIB_WINDOW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hist.h"

#define TALLY__WINDOW_DEFAULT_SLICE_NS UINT64_C(1000000000)  /* 1 s */
#define TALLY__WINDOW_DEFAULT_WINDOW_NS UINT64_C(10000000000) /* 10 s */
#define TALLY__WINDOW_MAX_SLICES 3600u
#define TALLY__WINDOW_MAGIC 0x57444e57u /* "WNDW": set by init, checked */
/* Rates are never computed over less than this (see tally__window_stats). */

struct tally__window_config {
	uint64_t slice_ns;  /* > 0 */
	uint64_t window_ns; /* slice_ns * N, 1 <= N <= 3600 */
	uint64_t max_value; /* histogram top of range, >= 1 */
};

#define TALLY__WINDOW_CONFIG_DEFAULT                                           \
	((struct tally__window_config){ TALLY__WINDOW_DEFAULT_SLICE_NS,        \
					TALLY__WINDOW_DEFAULT_WINDOW_NS,       \
					TALLY__HIST_DEFAULT_MAX })

struct tally__window {
	/* First: the line a sample touches (hist.h).  A window placed on a
	 * 64-byte boundary (lib/engine.c allocates its subjects so) costs a
	 * sample that line and the counter's line. */
	struct tally__hist cur;  /* slice cur_slice, receiving values */
	/* next to it: the engine compares it with its own slice for every
	 * sample it drains while a walk closes slices (lazy advance) */
	uint64_t cur_slice;
	uint32_t magic;          /* TALLY__WINDOW_MAGIC while initialised */
	struct tally__hist agg;  /* closed slices inside the window; exact min/max */
	/* The closed slices inside the window, oldest first, as records
	 * fifo[fhead .. ftail): varint slice, varint length, packed histogram
	 * (hist.h).  Records leave from the head, in slice order. */
	uint8_t *fifo;
	uint32_t fhead, ftail, fcap;
	uint32_t nclosed;        /* records in the fifo */
	uint64_t slice_ns;
	uint32_t nslices;
	uint64_t start_ns;       /* time given to init */
	uint64_t total_count;    /* closed slices since start */
	uint64_t total_sum;      /* same, saturating */
	bool total_sum_saturated;
	uint64_t lost;           /* values not recorded: no memory to wake */
};

struct tally__window_stats {
	uint64_t count;        /* values in the window */
	uint64_t sum;          /* their sum (saturating, see sum_saturated) */
	double mean;           /* sum / count; 0 when count == 0 */
	uint64_t min, max;     /* exact; 0 when count == 0 */
	double rate;           /* values per second over covered_ns */
	uint64_t covered_ns;   /* time the window covers so far, see stats() */
	bool has_quantiles;    /* false when count == 0: p* are then 0, not data */
	uint64_t p50, p90, p95, p99, p999;
	uint64_t clamped;      /* values in the window recorded above max_value */
	bool sum_saturated;    /* sum (and mean) are lower bounds */
	bool bucket_saturated; /* quantiles inside one octave are approximate */
	uint64_t total_count;  /* values since start, never decreases */
	uint64_t total_sum;    /* their sum, saturating, never decreases */
	uint64_t lost;         /* values since start not recorded for want of
				* memory (a sleeping window that could not
				* wake); not in count or total_count */
};

/*
 * Set up an empty window whose current slice contains now_ns.  cfg NULL
 * means TALLY__WINDOW_CONFIG_DEFAULT.  Returns 0, -EINVAL (slice_ns 0,
 * window not a multiple of slice, N outside 1..3600, max_value 0) or
 * -ENOMEM.  May call malloc.
 */
int tally__window_init(struct tally__window *w,
		       const struct tally__window_config *cfg, uint64_t now_ns);

/* Free everything; w may then be init'ed again. */
void tally__window_destroy(struct tally__window *w);

/* The cold half of add: the window sleeps (idle); wake it and record v,
 * or count v in lost.  Returns true when v was recorded. */
bool tally__window_add_cold(struct tally__window *w, uint64_t v);

/* Record one value into the current slice: the hot path.  Returns true;
 * false only when the window was asleep and no memory could be had to
 * wake it (v is then counted in lost).  Call tally__window_advance()
 * first when the time may have moved on. */
static inline bool tally__window_add(struct tally__window *w, uint64_t v)
{
	if (TALLY__UNLIKELY(w->cur.counts == NULL))
		return tally__window_add_cold(w, v);
	tally__hist_add_lazy(&w->cur, v);
	return true;
}

/* True when the window holds no storage (idle for a whole window). */
static inline bool tally__window_asleep(const struct tally__window *w)
{
	return w->cur.counts == NULL;
}

/* Heap bytes the window holds now (its histograms and buffer, not the
 * struct itself): what the bench and the tests report. */
size_t tally__window_heap_bytes(const struct tally__window *w);

/*
 * Move the window to now_ns: close the current slice if its time is over
 * (into the ring and the aggregate), and subtract every closed slice that
 * left the window.  Any gap is handled in at most N steps; an idle gap of a
 * whole window resets the window in one go.  now_ns in or before the
 * current slice does nothing.  A window left with no value at all is put
 * to sleep (see Idle subjects).  Returns 0 or -ENOMEM (storing the closed
 * slice); on error nothing changed and the current slice keeps collecting.
 */
int tally__window_advance(struct tally__window *w, uint64_t now_ns);

/*
 * Advance to now_ns, then fill *out.  Rate: count / covered_ns, where
 * covered_ns = now_ns - max(start of slice k-N+1, start_ns), i.e. the whole
 * window once it has been running that long, the elapsed time before, and
 * never less than one slice (a new subject's first samples are not a
 * burst rate).  Quantiles are computed over
 * aggregate + current slice in one pass.  Returns 0 or -ENOMEM (from
 * advance; *out is then still filled from the unadvanced window).
 */
int tally__window_stats(struct tally__window *w, uint64_t now_ns,
			struct tally__window_stats *out);

/*
 * Merge (drain_threads, lib/engine.c): the statistics of the sum of n
 * windows of one subject that were filled by different threads, as if
 * every value had gone into one window.  All n must share one
 * configuration (slice, window, max_value); each is first advanced to
 * now_ns.  count, sum, min, max, clamped and the totals are exact
 * combinations; the quantiles are one walk over the 2n histograms
 * (tally__hist_quantiles_n), so they are the quantiles of the summed
 * histogram, within the same bound; the rate counts from the earliest
 * window's start.  n == 1 gives what tally__window_stats gives.  n is
 * 1 .. TALLY__WINDOW_MERGE_MAX.  Returns 0, -EINVAL (n out of range),
 * or the first -ENOMEM of an advance (*out is still filled).  The caller
 * must hold off every window's owner while this runs.
 */
#define TALLY__WINDOW_MERGE_MAX 32u
int tally__window_stats_merged(struct tally__window *const *ws, size_t n,
			       uint64_t now_ns, struct tally__window_stats *out);

#endif /* TALLY_LIB_WINDOW_H */
