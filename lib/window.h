/* SPDX-License-Identifier: MIT */
/*
 * window.h - private header of the per-subject sliding window (lib/window.c).
 * It owns a subject's time slices: the current slice that the aggregator
 * fills, the ring of closed slices still inside the window, the running
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
 * Memory per subject: two dense histograms (current slice, aggregate of the
 * closed slices in the window) of 9.7 KB each with the default 1 h range,
 * ~19.4 KB, plus N slot headers of 72 bytes and, per nonempty closed slice,
 * 8 bytes per nonzero bucket (typically a few hundred bytes).  The sparse
 * buffers are kept for reuse and given back after one whole window with no
 * value.  10,000 subjects with default settings: about 200 MB.
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

/* A closed slice: valid when s.count > 0. */
struct tally__window_slot {
	struct tally__hist_sparse s;
	uint64_t slice;
};

struct tally__window {
	uint32_t magic;          /* TALLY__WINDOW_MAGIC while initialised */
	/* first, on the line that add touches anyway: the engine compares it
	 * with its own slice for every sample it drains (lazy advance) */
	uint64_t cur_slice;
	struct tally__hist cur;  /* slice cur_slice, receiving values */
	struct tally__hist agg;  /* closed slices inside the window; exact min/max */
	struct tally__window_slot *ring; /* slice k lives in ring[k % nslices] */
	uint64_t slice_ns;
	uint32_t nslices;
	uint64_t start_ns;       /* time given to init */
	uint64_t total_count;    /* closed slices since start */
	uint64_t total_sum;      /* same, saturating */
	bool total_sum_saturated;
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

/* Record one value into the current slice: the hot path, never fails.
 * Call tally__window_advance() first when the time may have moved on. */
static inline void tally__window_add(struct tally__window *w, uint64_t v)
{
	tally__hist_add(&w->cur, v);
}

/*
 * Move the window to now_ns: close the current slice if its time is over
 * (into the ring and the aggregate), and subtract every closed slice that
 * left the window.  Any gap is handled in at most N steps; an idle gap of a
 * whole window resets the window in one go.  now_ns in or before the
 * current slice does nothing.  Returns 0 or -ENOMEM (storing the closed
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
