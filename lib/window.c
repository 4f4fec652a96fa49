/* SPDX-License-Identifier: MIT */
/*
 * window.c - the per-subject sliding window: slice rotation, incremental
 * maintenance of the window aggregate, and the statistics published for a
 * subject.  Layout, time model and memory figures are in window.h.
 *
 * Design.  A window is the sum of its time slices, and histograms add and
 * subtract bucket by bucket, so the window is kept incrementally: when a
 * slice closes it is added to the aggregate once, and when it leaves the
 * window it is subtracted once.  Nothing is ever recomputed from all the
 * slices, so the per-slice cost does not grow with the window length (up
 * to 3600 slices).  Only min and max do not subtract; they are recomputed
 * from the per-slice min/max, and only when the slice leaving held the
 * window's extreme, which keeps the aggregate's bounds exact.
 *
 * The current slice is a dense histogram because it takes every value on
 * the aggregator's hot path.  It is not added to the aggregate value by
 * value (that would touch two dense arrays per value, two cache misses
 * with thousands of subjects); readers instead walk aggregate + current
 * together.  Closed slices are kept sparse (nonzero buckets only): most
 * slices touch a few dozen to a few hundred of the 2345 buckets, and a
 * subject keeps up to N-1 of them.  Storing a slice is the only step that
 * can fail (malloc); its room is reserved before anything changes, so a
 * failed advance leaves the window as it was and the current slice simply
 * keeps collecting until the next advance succeeds.
 *
 * Gaps.  Advancing from slice c to slice k expires the closed slices
 * c-N+1 .. k-N: at most N-1 of them, visited by slice number.  When that is
 * all of them (the subject was idle for about a window), the aggregate is
 * reset in one go instead of subtracting, and after a whole window with
 * nothing in it the sparse buffers are freed, so idle subjects shrink back
 * to their two dense histograms.  No loop ever runs per elapsed slice.
 */
#include "window.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static int config_nslices(const struct tally__window_config *c, uint32_t *n)
{
	uint64_t slices;

	if (c->slice_ns == 0 || c->max_value == 0 || c->window_ns % c->slice_ns)
		return -EINVAL;
	slices = c->window_ns / c->slice_ns;
	if (slices < 1 || slices > TALLY__WINDOW_MAX_SLICES)
		return -EINVAL;
	*n = (uint32_t)slices;
	return 0;
}

int tally__window_init(struct tally__window *w,
		       const struct tally__window_config *cfg, uint64_t now_ns)
{
	const struct tally__window_config def = TALLY__WINDOW_CONFIG_DEFAULT;
	uint32_t n;
	int rc;

	cfg = cfg != NULL ? cfg : &def;
	rc = config_nslices(cfg, &n);
	if (rc != 0)
		return rc;
	memset(w, 0, sizeof(*w));
	w->ring = calloc(n, sizeof(*w->ring));
	if (w->ring == NULL)
		return -ENOMEM;
	for (uint32_t i = 0; i < n; i++)
		tally__hist_sparse_clear(&w->ring[i].s);
	w->nslices = n;
	rc = tally__hist_init(&w->cur, cfg->max_value);
	if (rc == 0)
		rc = tally__hist_init(&w->agg, cfg->max_value);
	if (rc != 0) {
		tally__window_destroy(w);
		return rc;
	}
	w->slice_ns = cfg->slice_ns;
	w->cur_slice = now_ns / cfg->slice_ns;
	w->start_ns = now_ns;
	w->magic = TALLY__WINDOW_MAGIC;
	return 0;
}

void tally__window_destroy(struct tally__window *w)
{
	for (uint32_t i = 0; w->ring != NULL && i < w->nslices; i++)
		tally__hist_sparse_free(&w->ring[i].s);
	free(w->ring);
	w->ring = NULL;
	w->nslices = 0;
	tally__hist_destroy(&w->cur);
	tally__hist_destroy(&w->agg);
	w->magic = 0;
}

/* Every closed slice leaves; release frees the sparse buffers too. */
static void window_drop_all(struct tally__window *w, bool release)
{
	for (uint32_t i = 0; i < w->nslices; i++) {
		if (release)
			tally__hist_sparse_free(&w->ring[i].s);
		else if (w->ring[i].s.count != 0)
			tally__hist_sparse_clear(&w->ring[i].s);
	}
	tally__hist_reset(&w->agg);
}

/* Subtract closed slice j if it is stored.  Returns true when it may have
 * held the aggregate's min or max (bounds need recomputing). */
static bool window_drop(struct tally__window *w, uint64_t j)
{
	struct tally__window_slot *slot = &w->ring[j % w->nslices];
	bool extreme;

	if (slot->s.count == 0 || slot->slice != j)
		return false;
	extreme = slot->s.min <= w->agg.min || slot->s.max >= w->agg.max;
	tally__hist_sub_sparse(&w->agg, &slot->s);
	tally__hist_sparse_clear(&slot->s);
	return extreme;
}

/* Exact aggregate min/max from the closed slices still stored. */
static void window_fix_bounds(struct tally__window *w)
{
	uint64_t min = UINT64_MAX, max = 0;

	for (uint32_t i = 0; i < w->nslices; i++) {
		const struct tally__hist_sparse *s = &w->ring[i].s;

		if (s->count == 0)
			continue;
		min = s->min < min ? s->min : min;
		max = s->max > max ? s->max : max;
	}
	tally__hist_set_bounds(&w->agg, min, max);
}

/* Drop the closed slices that are outside the window of slice k. */
static void window_expire(struct tally__window *w, uint64_t k)
{
	uint64_t n = w->nslices, first, last;
	bool fix = false;

	if (k < n)
		return; /* slice k-N would be negative: nothing leaves */
	last = k - n;
	if (last + 1 >= w->cur_slice) {
		window_drop_all(w, false);
		return;
	}
	first = w->cur_slice >= n - 1 ? w->cur_slice - (n - 1) : 0;
	for (uint64_t j = first; j <= last; j++)
		fix |= window_drop(w, j);
	if (fix)
		window_fix_bounds(w);
	else /* still exact: say so (clears BOUNDS_LOOSE) */
		tally__hist_set_bounds(&w->agg, w->agg.min, w->agg.max);
}

/* Count the current slice in the totals, store it if it is still inside
 * the window (room reserved by the caller), and empty it. */
static void window_close(struct tally__window *w, bool keep)
{
	struct tally__window_slot *slot = &w->ring[w->cur_slice % w->nslices];

	w->total_count += w->cur.count;
	w->total_sum = tally__hist_sat_add(w->total_sum, w->cur.sum,
					   &w->total_sum_saturated);
	if (keep && w->cur.count != 0) {
		int rc;

		TALLY__ASSERT(slot->s.count == 0);
		rc = tally__hist_sparse_from(&slot->s, &w->cur);
		TALLY__ASSERT(rc == 0);
		slot->slice = w->cur_slice;
		tally__hist_merge_sparse(&w->agg, &slot->s);
	}
	tally__hist_reset(&w->cur);
}

int tally__window_advance(struct tally__window *w, uint64_t now_ns)
{
	uint64_t k;
	bool keep;

	TALLY__ASSERT(w->magic == TALLY__WINDOW_MAGIC);
	k = now_ns / w->slice_ns;
	if (k <= w->cur_slice)
		return 0;
	keep = k - w->cur_slice < w->nslices;
	if (keep && w->cur.count != 0) {
		struct tally__hist_sparse *s = &w->ring[w->cur_slice % w->nslices].s;

		if (tally__hist_sparse_reserve(s, tally__hist_nonzero(&w->cur)))
			return -ENOMEM;
	}
	if (keep)
		window_expire(w, k);
	else
		window_drop_all(w, true);
	window_close(w, keep);
	w->cur_slice = k;
	return 0;
}

static void stats_summary(const struct tally__window *w,
			  struct tally__window_stats *out)
{
	const struct tally__hist *a = &w->agg, *c = &w->cur;
	bool sat = (a->flags | c->flags) & TALLY__HIST_SUM_SATURATED;
	bool tsat = w->total_sum_saturated;

	out->count = a->count + c->count;
	out->sum = tally__hist_sat_add(a->sum, c->sum, &sat);
	out->mean = out->count ? (double)out->sum / (double)out->count : 0.0;
	out->min = a->min < c->min ? a->min : c->min;
	out->max = a->max > c->max ? a->max : c->max;
	if (out->count == 0)
		out->min = out->max = 0;
	out->clamped = a->clamped + c->clamped;
	out->sum_saturated = sat;
	out->bucket_saturated = (a->flags | c->flags) &
				TALLY__HIST_BUCKET_SATURATED;
	out->total_count = w->total_count + c->count;
	out->total_sum = tally__hist_sat_add(w->total_sum, c->sum, &tsat);
}

static void stats_rate(const struct tally__window *w, uint64_t now_ns,
		       struct tally__window_stats *out)
{
	uint64_t n = w->nslices, from = 0, covered;

	if (w->cur_slice >= n - 1)
		from = (w->cur_slice - (n - 1)) * w->slice_ns;
	from = from > w->start_ns ? from : w->start_ns;
	covered = now_ns > from ? now_ns - from : 0;
	/* at least one slice: a subject seen for the first time 3 ms ago
	 * with 2 samples is not doing 667 a second */
	covered = covered > w->slice_ns ? covered : w->slice_ns;
	out->covered_ns = covered;
	out->rate = (double)out->count * 1e9 / (double)covered;
}

static void stats_quantiles(const struct tally__window *w,
			    struct tally__window_stats *out)
{
	static const double qs[5] = { 0.5, 0.9, 0.95, 0.99, 0.999 };
	const struct tally__hist *hs[2] = { &w->agg, &w->cur };
	uint64_t v[5];

	out->has_quantiles = tally__hist_quantiles_n(hs, 2, qs, 5, v) == 0;
	if (!out->has_quantiles)
		memset(v, 0, sizeof(v));
	out->p50 = v[0];
	out->p90 = v[1];
	out->p95 = v[2];
	out->p99 = v[3];
	out->p999 = v[4];
}

int tally__window_stats(struct tally__window *w, uint64_t now_ns,
			struct tally__window_stats *out)
{
	int rc = tally__window_advance(w, now_ns);

	memset(out, 0, sizeof(*out));
	stats_summary(w, out);
	stats_rate(w, now_ns, out);
	stats_quantiles(w, out);
	return rc;
}

/* ---- merge (drain_threads) ----------------------------------------------- */

int tally__window_stats_merged(struct tally__window *const *ws, size_t n,
			       uint64_t now_ns, struct tally__window_stats *out)
{
	static const double qs[5] = { 0.5, 0.9, 0.95, 0.99, 0.999 };
	const struct tally__hist *hs[2 * TALLY__WINDOW_MERGE_MAX];
	const struct tally__window *first = NULL;
	bool sat = false, tsat = false;
	uint32_t flags = 0;
	uint64_t v[5], start = UINT64_MAX, cur = 0;
	int rc = 0;

	memset(out, 0, sizeof(*out));
	if (n == 0 || n > TALLY__WINDOW_MERGE_MAX)
		return -EINVAL;
	out->min = UINT64_MAX;
	for (size_t k = 0; k < n; k++) {
		struct tally__window *w = ws[k];
		int r = tally__window_advance(w, now_ns);

		rc = rc ? rc : r;
		TALLY__ASSERT(w->nslices == ws[0]->nslices && w->slice_ns == ws[0]->slice_ns);
		hs[2 * k] = &w->agg;
		hs[2 * k + 1] = &w->cur;
		flags |= w->agg.flags | w->cur.flags;
		out->count += w->agg.count + w->cur.count;
		out->sum = tally__hist_sat_add(out->sum, w->agg.sum, &sat);
		out->sum = tally__hist_sat_add(out->sum, w->cur.sum, &sat);
		out->min = w->agg.min < out->min ? w->agg.min : out->min;
		out->min = w->cur.min < out->min ? w->cur.min : out->min;
		out->max = w->agg.max > out->max ? w->agg.max : out->max;
		out->max = w->cur.max > out->max ? w->cur.max : out->max;
		out->clamped += w->agg.clamped + w->cur.clamped;
		out->total_count += w->total_count + w->cur.count;
		out->total_sum = tally__hist_sat_add(out->total_sum, w->total_sum, &tsat);
		out->total_sum = tally__hist_sat_add(out->total_sum, w->cur.sum, &tsat);
		/* the rate's span: the latest slice (an advance may have failed)
		 * and the earliest start */
		if (!first || w->cur_slice > cur)
			cur = w->cur_slice, first = w;
		start = w->start_ns < start ? w->start_ns : start;
	}
	sat |= (flags & TALLY__HIST_SUM_SATURATED) != 0;
	out->mean = out->count ? (double)out->sum / (double)out->count : 0.0;
	if (out->count == 0)
		out->min = out->max = 0;
	out->sum_saturated = sat;
	out->bucket_saturated = flags & TALLY__HIST_BUCKET_SATURATED;
	struct tally__window span = *first;
	span.start_ns = start;
	stats_rate(&span, now_ns, out);
	out->has_quantiles = tally__hist_quantiles_n(hs, 2 * n, qs, 5, v) == 0;
	if (!out->has_quantiles)
		memset(v, 0, sizeof(v));
	out->p50 = v[0];
	out->p90 = v[1];
	out->p95 = v[2];
	out->p99 = v[3];
	out->p999 = v[4];
	return rc;
}
