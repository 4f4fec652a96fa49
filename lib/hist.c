/* SPDX-License-Identifier: MIT */
/*
 * hist.c - the log-linear latency histogram: allocation, merge and
 * subtraction (dense and sparse), quantiles and cumulative counts at bucket
 * edges.  The bucket layout, its error bound and the hot-path add are in
 * hist.h.
 *
 * Design.  A time-slice histogram must be cheap to fill (the aggregator
 * adds tens of millions of values per second), mergeable (a window is the
 * sum of its slices) and subtractable (a slice leaves the window by being
 * subtracted, not by recomputing the window).  Plain counters over a fixed
 * log-linear layout give all three: add is an index computation, two
 * increments and a running count/sum/min/max, merge and subtract are
 * bucket-wise, and the error bound
 * (1/128 relative) holds for every value whatever the distribution, unlike
 * rank-error sketches whose error depends on the data.  The cost is memory:
 * 2345 counters for a one-hour range, so closed slices are kept sparse.
 *
 * Reading is what must not scale with the bucket count: a publish computes
 * five quantiles for every active subject.  Each histogram therefore keeps
 * one uint64_t subtotal per 64-bucket block (an octave above 127), updated
 * by add; a quantile or cumulative walk adds up block subtotals and only
 * scans the buckets of the few blocks where a requested rank or edge falls.
 * All the requested quantiles are answered in the same ascending pass.  The
 * walk works over the sum of several histograms (a window's closed slices
 * plus its current slice) without materialising that sum.
 *
 * Invariants, checked with always-on aborts where cheap: blocks[b] equals
 * the true number of values in block b (exact, even when a uint32_t bucket
 * saturates), the blocks add up to count, and a subtraction never takes
 * more than was merged.  Breaking one is a bug in the caller, not an input
 * error, so it aborts rather than returning an errno.
 */
#include "hist.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* What merge and subtract need of either a dense or a sparse histogram. */
struct summary {
	uint64_t count, sum, min, max, clamped;
	uint32_t flags;
};

static struct summary summary_of(const struct tally__hist *h)
{
	return (struct summary){ h->count, h->sum, h->min, h->max,
				 h->clamped, h->flags };
}

static struct summary summary_of_sparse(const struct tally__hist_sparse *s)
{
	return (struct summary){ s->count, s->sum, s->min, s->max,
				 s->clamped, s->flags };
}

static void summary_clear(struct tally__hist *h)
{
	h->count = 0;
	h->sum = 0;
	h->min = UINT64_MAX;
	h->max = 0;
	h->clamped = 0;
	h->flags = 0;
}

static uint32_t block_end(const struct tally__hist *h, uint32_t b)
{
	uint32_t end = (b + 1u) * TALLY__HIST_BLOCK;

	return end < h->nbuckets ? end : h->nbuckets;
}

int tally__hist_init(struct tally__hist *h, uint64_t max_value)
{
	uint32_t nbuckets, nblocks;
	uint64_t *mem;

	if (max_value == 0)
		return -EINVAL;
	nbuckets = tally__hist_nbuckets_for(max_value);
	nblocks = (nbuckets + TALLY__HIST_BLOCK - 1u) / TALLY__HIST_BLOCK;
	/* One allocation: the subtotals, then the counters. */
	mem = calloc(nblocks + (nbuckets + 1u) / 2u, sizeof(uint64_t));
	if (mem == NULL)
		return -ENOMEM;
	h->blocks = mem;
	h->counts = (uint32_t *)(mem + nblocks);
	h->nbuckets = nbuckets;
	h->nblocks = nblocks;
	h->max_value = max_value;
	summary_clear(h);
	return 0;
}

void tally__hist_destroy(struct tally__hist *h)
{
	free(h->blocks);
	h->blocks = NULL;
	h->counts = NULL;
	h->nbuckets = 0;
	h->nblocks = 0;
}

void tally__hist_reset(struct tally__hist *h)
{
	if (h->flags & TALLY__HIST_BUCKET_SATURATED) {
		/* A stuck bucket may sit in a block whose subtotal is 0. */
		memset(h->counts, 0, h->nbuckets * sizeof(*h->counts));
		memset(h->blocks, 0, h->nblocks * sizeof(*h->blocks));
	} else {
		for (uint32_t b = 0; b < h->nblocks; b++) {
			uint32_t lo = b * TALLY__HIST_BLOCK;

			if (h->blocks[b] == 0)
				continue;
			memset(h->counts + lo, 0,
			       (block_end(h, b) - lo) * sizeof(*h->counts));
			h->blocks[b] = 0;
		}
	}
	summary_clear(h);
}

/* counts[i] += n, saturating at UINT32_MAX; the block subtotal is exact. */
static void bucket_add(struct tally__hist *h, uint32_t i, uint32_t n)
{
	uint32_t c = h->counts[i];

	if (c > UINT32_MAX - n) {
		c = UINT32_MAX;
		h->flags |= TALLY__HIST_BUCKET_SATURATED;
	} else {
		c += n;
	}
	h->counts[i] = c;
	h->blocks[i / TALLY__HIST_BLOCK] += n;
}

/* counts[i] -= n; a saturated bucket stays stuck until the next reset. */
static void bucket_sub(struct tally__hist *h, uint32_t i, uint32_t n)
{
	bool stuck = (h->flags & TALLY__HIST_BUCKET_SATURATED) &&
		     h->counts[i] == UINT32_MAX;

	if (!stuck) {
		TALLY__ASSERT(h->counts[i] >= n);
		h->counts[i] -= n;
	}
	TALLY__ASSERT(h->blocks[i / TALLY__HIST_BLOCK] >= n);
	h->blocks[i / TALLY__HIST_BLOCK] -= n;
}

static void summary_merge(struct tally__hist *h, const struct summary *s)
{
	bool sat = false;

	h->count += s->count;
	h->sum = tally__hist_sat_add(h->sum, s->sum, &sat);
	h->flags |= s->flags | (sat ? TALLY__HIST_SUM_SATURATED : 0u);
	h->clamped += s->clamped;
	h->min = s->min < h->min ? s->min : h->min;
	h->max = s->max > h->max ? s->max : h->max;
}

static void summary_sub(struct tally__hist *h, const struct summary *s)
{
	TALLY__ASSERT(h->count >= s->count && h->clamped >= s->clamped);
	h->count -= s->count;
	h->clamped -= s->clamped;
	h->flags |= TALLY__HIST_BOUNDS_LOOSE;
	if (!(h->flags & TALLY__HIST_SUM_SATURATED)) {
		TALLY__ASSERT(h->sum >= s->sum);
		h->sum -= s->sum;
	}
	if (h->count == 0)
		tally__hist_reset(h);
}

void tally__hist_merge(struct tally__hist *a, const struct tally__hist *b)
{
	struct summary s = summary_of(b);

	TALLY__ASSERT(a->nbuckets == b->nbuckets);
	for (uint32_t blk = 0; blk < b->nblocks; blk++) {
		if (b->blocks[blk] == 0)
			continue;
		for (uint32_t i = blk * TALLY__HIST_BLOCK; i < block_end(b, blk); i++)
			if (b->counts[i] != 0)
				bucket_add(a, i, b->counts[i]);
	}
	summary_merge(a, &s);
}

void tally__hist_sub(struct tally__hist *a, const struct tally__hist *b)
{
	struct summary s = summary_of(b);

	TALLY__ASSERT(a->nbuckets == b->nbuckets);
	for (uint32_t blk = 0; blk < b->nblocks; blk++) {
		if (b->blocks[blk] == 0)
			continue;
		for (uint32_t i = blk * TALLY__HIST_BLOCK; i < block_end(b, blk); i++)
			if (b->counts[i] != 0)
				bucket_sub(a, i, b->counts[i]);
	}
	summary_sub(a, &s);
}

void tally__hist_set_bounds(struct tally__hist *h, uint64_t min, uint64_t max)
{
	if (h->count == 0)
		return;
	TALLY__ASSERT(min <= max && max <= h->max_value);
	h->min = min;
	h->max = max;
	h->flags &= ~(uint32_t)TALLY__HIST_BOUNDS_LOOSE;
}

uint32_t tally__hist_nonzero(const struct tally__hist *h)
{
	uint32_t n = 0;

	for (uint32_t b = 0; b < h->nblocks; b++) {
		if (h->blocks[b] == 0)
			continue;
		for (uint32_t i = b * TALLY__HIST_BLOCK; i < block_end(h, b); i++)
			n += h->counts[i] != 0;
	}
	return n;
}

int tally__hist_sparse_reserve(struct tally__hist_sparse *s, uint32_t n)
{
	struct tally__hist_entry *e;

	if (n <= s->cap)
		return 0;
	e = realloc(s->e, n * sizeof(*e));
	if (e == NULL)
		return -ENOMEM;
	s->e = e;
	s->cap = n;
	return 0;
}

int tally__hist_sparse_from(struct tally__hist_sparse *s,
			    const struct tally__hist *h)
{
	int rc = tally__hist_sparse_reserve(s, tally__hist_nonzero(h));

	if (rc != 0)
		return rc;
	s->len = 0;
	for (uint32_t b = 0; b < h->nblocks; b++) {
		if (h->blocks[b] == 0)
			continue;
		for (uint32_t i = b * TALLY__HIST_BLOCK; i < block_end(h, b); i++)
			if (h->counts[i] != 0)
				s->e[s->len++] = (struct tally__hist_entry){
					i, h->counts[i]
				};
	}
	s->count = h->count;
	s->sum = h->sum;
	s->min = h->min;
	s->max = h->max;
	s->clamped = h->clamped;
	s->flags = h->flags;
	return 0;
}

void tally__hist_sparse_clear(struct tally__hist_sparse *s)
{
	s->len = 0;
	s->flags = 0;
	s->count = 0;
	s->sum = 0;
	s->min = UINT64_MAX;
	s->max = 0;
	s->clamped = 0;
}

void tally__hist_sparse_free(struct tally__hist_sparse *s)
{
	free(s->e);
	s->e = NULL;
	s->cap = 0;
	tally__hist_sparse_clear(s);
}

void tally__hist_merge_sparse(struct tally__hist *h,
			      const struct tally__hist_sparse *s)
{
	struct summary sm = summary_of_sparse(s);

	for (uint32_t k = 0; k < s->len; k++) {
		TALLY__ASSERT(s->e[k].idx < h->nbuckets);
		bucket_add(h, s->e[k].idx, s->e[k].n);
	}
	summary_merge(h, &sm);
}

void tally__hist_sub_sparse(struct tally__hist *h,
			    const struct tally__hist_sparse *s)
{
	struct summary sm = summary_of_sparse(s);

	for (uint32_t k = 0; k < s->len; k++) {
		TALLY__ASSERT(s->e[k].idx < h->nbuckets);
		bucket_sub(h, s->e[k].idx, s->e[k].n);
	}
	summary_sub(h, &sm);
}

/* ---- read side: walks over the sum of nh histograms ---------------- */

struct walk {
	const struct tally__hist *const *hs;
	size_t nh;
	uint64_t count, min, max; /* of the sum */
	bool exact;               /* min/max exact: no BOUNDS_LOOSE */
};

static int walk_init(struct walk *w, const struct tally__hist *const *hs,
		     size_t nh)
{
	if (nh == 0)
		return -EINVAL;
	*w = (struct walk){ hs, nh, 0, UINT64_MAX, 0, true };
	for (size_t k = 0; k < nh; k++) {
		TALLY__ASSERT(hs[k]->nbuckets == hs[0]->nbuckets);
		w->count += hs[k]->count;
		w->exact &= !(hs[k]->flags & TALLY__HIST_BOUNDS_LOOSE);
		if (hs[k]->count == 0)
			continue;
		w->min = hs[k]->min < w->min ? hs[k]->min : w->min;
		w->max = hs[k]->max > w->max ? hs[k]->max : w->max;
	}
	return 0;
}

static uint64_t walk_block(const struct walk *w, uint32_t b)
{
	uint64_t t = 0;

	for (size_t k = 0; k < w->nh; k++)
		t += w->hs[k]->blocks[b];
	return t;
}

static uint64_t walk_bucket(const struct walk *w, uint32_t i)
{
	uint64_t t = 0;

	for (size_t k = 0; k < w->nh; k++)
		t += w->hs[k]->counts[i];
	return t;
}

/* Values in buckets [lo, hi) of one block. */
static uint64_t walk_partial(const struct walk *w, uint32_t lo, uint32_t hi)
{
	uint64_t t = 0;

	for (uint32_t i = lo; i < hi; i++)
		t += walk_bucket(w, i);
	return t;
}

/* Nearest rank of q among count values: ceil(q * count), in [1, count]. */
static uint64_t rank_of(double q, uint64_t count)
{
	double r = __builtin_ceil(q * (double)count);

	if (r < 1.0)
		return 1;
	return r >= (double)count ? count : (uint64_t)r;
}

static bool qs_valid(const double *qs, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (!(qs[i] >= 0.0 && qs[i] <= 1.0))
			return false; /* also rejects NaN */
		if (i > 0 && qs[i] < qs[i - 1])
			return false;
	}
	return true;
}

/* Value reported for the rank-th value, which lies in bucket idx. */
static uint64_t report(const struct walk *w, uint32_t idx, uint64_t rank)
{
	uint64_t v = tally__hist_bucket_mid(idx);

	if (w->exact && rank == 1)
		return w->min;
	if (w->exact && rank == w->count)
		return w->max;
	v = v < w->min ? w->min : v;
	return v > w->max ? w->max : v;
}

/*
 * Add buckets next, next+1, ... (below hi) to *cum until it reaches rank r.
 * Returns the bucket where it did, or hi.  The usual one or two histograms
 * get a tight loop of their own.
 */
static uint32_t walk_scan(const struct walk *w, uint32_t next, uint32_t hi,
			  uint64_t *cum, uint64_t r)
{
	const uint32_t *a = w->hs[0]->counts;
	uint64_t c = *cum;
	uint32_t i = next;

	if (w->nh == 1) {
		while (i < hi && (c += a[i]) < r)
			i++;
	} else if (w->nh == 2) {
		const uint32_t *b = w->hs[1]->counts;

		while (i < hi && (c += (uint64_t)a[i] + b[i]) < r)
			i++;
	} else {
		while (i < hi && (c += walk_bucket(w, i)) < r)
			i++;
	}
	*cum = c;
	return i;
}

/* Last nonzero bucket of [lo, hi). */
static uint32_t walk_last(const struct walk *w, uint32_t lo, uint32_t hi)
{
	while (hi > lo && walk_bucket(w, hi - 1) == 0)
		hi--;
	return hi > lo ? hi - 1 : lo;
}

/*
 * Answer qs[q], qs[q+1], ... whose ranks r fall in block b, which holds
 * ranks (cum, total]; r is the rank of qs[q] (r > cum).  Returns the next
 * unanswered q.
 */
static size_t walk_quantile_block(const struct walk *w, uint32_t b,
				  uint64_t cum, uint64_t total, uint64_t r,
				  const double *qs, size_t q, size_t n,
				  uint64_t *out)
{
	uint32_t lo = b * TALLY__HIST_BLOCK, hi = block_end(w->hs[0], b);
	uint32_t next = lo, at = lo;

	for (;;) {
		if (r > cum) {
			at = walk_scan(w, next, hi, &cum, r);
			if (at == hi) {
				/* Only a saturated (short) bucket gets here. */
				at = walk_last(w, lo, hi);
				cum = total;
			}
			next = at + 1;
		}
		out[q++] = report(w, at, r);
		if (q == n)
			return q;
		r = rank_of(qs[q], w->count);
		if (r > total)
			return q;
	}
}

int tally__hist_quantiles_n(const struct tally__hist *const *hs, size_t nh,
			    const double *qs, size_t n, uint64_t *out)
{
	struct walk w;
	uint64_t cum = 0, r;
	size_t q = 0;
	int rc = walk_init(&w, hs, nh);

	if (rc != 0)
		return rc;
	if (!qs_valid(qs, n))
		return -EINVAL;
	if (w.count == 0)
		return -ENODATA;
	r = n > 0 ? rank_of(qs[0], w.count) : 0;
	for (uint32_t b = 0; b < hs[0]->nblocks && q < n; b++) {
		uint64_t t = walk_block(&w, b);

		if (r <= cum + t) {
			q = walk_quantile_block(&w, b, cum, cum + t, r, qs, q,
						n, out);
			r = q < n ? rank_of(qs[q], w.count) : 0;
		}
		cum += t;
	}
	TALLY__ASSERT(q == n && cum <= w.count);
	return 0;
}

int tally__hist_quantiles(const struct tally__hist *h, const double *qs,
			  size_t n, uint64_t *out)
{
	return tally__hist_quantiles_n(&h, 1, qs, n, out);
}

static bool edges_valid(const struct tally__hist *h, const uint64_t *edges,
			size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (edges[i] <= h->max_value && !tally__hist_is_edge(edges[i]))
			return false;
		if (i > 0 && edges[i] <= edges[i - 1])
			return false;
	}
	return true;
}

int tally__hist_cumulative_le_n(const struct tally__hist *const *hs,
				size_t nh, const uint64_t *edges, size_t n,
				uint64_t *out)
{
	struct walk w;
	uint64_t cum = 0;
	uint32_t b = 0;
	int rc = walk_init(&w, hs, nh);

	if (rc != 0)
		return rc;
	if (!edges_valid(hs[0], edges, n))
		return -EINVAL;
	for (size_t k = 0; k < n; k++) {
		uint32_t i, eb;

		if (edges[k] > hs[0]->max_value) {
			out[k] = w.count;
			continue;
		}
		i = tally__hist_index(edges[k]);
		eb = i / TALLY__HIST_BLOCK;
		while (b < eb)
			cum += walk_block(&w, b++);
		out[k] = cum + walk_partial(&w, eb * TALLY__HIST_BLOCK, i);
	}
	return 0;
}

int tally__hist_cumulative_le(const struct tally__hist *h,
			      const uint64_t *edges, size_t n, uint64_t *out)
{
	return tally__hist_cumulative_le_n(&h, 1, edges, n, out);
}

size_t tally__hist_default_edges(uint64_t *out, size_t cap)
{
	size_t n = 0;

	for (unsigned k = 10; k < 30; k++)
		for (unsigned j = 4; j < 8; j++, n++)
			if (n < cap)
				out[n] = (uint64_t)j << (k - 2);
	for (unsigned k = 30; k < 42; k++, n++)
		if (n < cap)
			out[n] = UINT64_C(1) << k;
	TALLY__ASSERT(n == TALLY__HIST_DEFAULT_NEDGES);
	return n;
}
