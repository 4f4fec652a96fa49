/* SPDX-License-Identifier: MIT */
/*
 * test_window.c - Criterion tests of the per-subject sliding window
 * (lib/window.c): configuration checks, values leaving the window on time,
 * slice-by-slice expiry, idle gaps, sleep and wake of an idle window
 * (memory failure injected), carries of 16-bit counters across slices,
 * totals since start, rate, and a
 * property test that the incrementally kept aggregate always equals a
 * from-scratch recomputation over random time steps and window shapes;
 * and the merge of windows filled by several drain threads against one
 * window given every value.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "window.h"

#define SEC UINT64_C(1000000000)
#define MS UINT64_C(1000000)

static uint64_t rnd(uint64_t *s) /* splitmix64 */
{
	uint64_t z = (*s += UINT64_C(0x9e3779b97f4a7c15));

	z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
	return z ^ (z >> 31);
}

static void mk(struct tally__window *w, uint64_t slice, uint64_t window,
	       uint64_t now)
{
	struct tally__window_config c = TALLY__WINDOW_CONFIG_DEFAULT;

	c.slice_ns = slice;
	c.window_ns = window;
	cr_assert_eq(tally__window_init(w, &c, now), 0);
}

static struct tally__window_stats stats(struct tally__window *w, uint64_t now)
{
	struct tally__window_stats st;

	cr_assert_eq(tally__window_stats(w, now, &st), 0);
	return st;
}

Test(window, config_checked)
{
	struct tally__window w;
	struct tally__window_config c = TALLY__WINDOW_CONFIG_DEFAULT;

	c.window_ns = 10 * SEC + 1;
	cr_assert_eq(tally__window_init(&w, &c, 0), -EINVAL);
	c.window_ns = 3601 * SEC;
	cr_assert_eq(tally__window_init(&w, &c, 0), -EINVAL);
	c.window_ns = 0;
	cr_assert_eq(tally__window_init(&w, &c, 0), -EINVAL);
	c.window_ns = SEC;
	c.slice_ns = 0;
	cr_assert_eq(tally__window_init(&w, &c, 0), -EINVAL);
	c = TALLY__WINDOW_CONFIG_DEFAULT;
	c.max_value = 0;
	cr_assert_eq(tally__window_init(&w, &c, 0), -EINVAL);
	c = TALLY__WINDOW_CONFIG_DEFAULT;
	c.window_ns = 3600 * SEC;
	cr_assert_eq(tally__window_init(&w, &c, 0), 0);
	cr_assert_eq(w.nslices, 3600);
	tally__window_destroy(&w);
	cr_assert_eq(tally__window_init(&w, NULL, 5), 0);
	cr_assert_eq(w.nslices, 10);
	cr_assert_eq(w.slice_ns, SEC);
	cr_assert_eq(w.agg.nbuckets, 2345);
	tally__window_destroy(&w);
}

Test(window, value_leaves_on_time)
{
	struct tally__window w;
	struct tally__window_stats st;
	uint64_t t = 5 * SEC + 500 * MS;

	mk(&w, SEC, 10 * SEC, 0);
	st = stats(&w, t);
	cr_assert_eq(st.count, 0);
	cr_assert(!st.has_quantiles);
	tally__window_add(&w, 12345);
	st = stats(&w, t);
	cr_assert_eq(st.count, 1);
	cr_assert(st.has_quantiles);
	cr_assert_eq(st.p50, 12345); /* one value: exact */
	cr_assert_eq(st.p999, 12345);
	cr_assert_eq(st.min, 12345);
	st = stats(&w, 15 * SEC - 1); /* window = slices 5..14 */
	cr_assert_eq(st.count, 1);
	st = stats(&w, 15 * SEC); /* slices 6..15: gone, t + W not reached */
	cr_assert_eq(st.count, 0);
	cr_assert(!st.has_quantiles);
	cr_assert_eq(st.min, 0);
	cr_assert_eq(st.max, 0);
	cr_assert_eq(st.total_count, 1);
	cr_assert_eq(st.total_sum, 12345);
	cr_assert_eq(w.agg.count, 0);
	tally__window_destroy(&w);
}

Test(window, expiry_slice_by_slice)
{
	struct tally__window w;
	struct tally__window_stats st;

	mk(&w, SEC, 10 * SEC, 0);
	/* slice i gets i + 1 values of 1000 * (i + 1) */
	for (uint64_t i = 0; i < 10; i++) {
		cr_assert_eq(tally__window_advance(&w, i * SEC), 0);
		for (uint64_t k = 0; k <= i; k++)
			tally__window_add(&w, 1000 * (i + 1));
	}
	st = stats(&w, 9 * SEC + 1);
	cr_assert_eq(st.count, 55);
	cr_assert_eq(st.min, 1000);
	cr_assert_eq(st.max, 10000);
	for (uint64_t k = 10; k < 20; k++) {
		uint64_t left = 0, sum = 0;

		for (uint64_t i = k - 9; i < 10; i++) {
			left += i + 1;
			sum += (i + 1) * 1000 * (i + 1);
		}
		st = stats(&w, k * SEC + 7);
		cr_assert_eq(st.count, left, "at %lu", k);
		cr_assert_eq(st.sum, sum);
		cr_assert_eq(st.min, left ? 1000 * (k - 8) : 0); /* exact */
		cr_assert_eq(st.max, left ? 10000 : 0);
		cr_assert_eq(st.has_quantiles, left != 0);
		if (left) { /* nearest-rank p50 of what is left, within 1/128 */
			uint64_t rank = (left + 1) / 2, c = 0, i = k - 9, x;

			while ((c += i + 1) < rank)
				i++;
			x = 1000 * (i + 1);
			cr_assert_leq((st.p50 > x ? st.p50 - x : x - st.p50) * 128,
				      x, "p50 %lu exact %lu", st.p50, x);
		}
		cr_assert_eq(st.total_count, 55);
	}
	cr_assert(!(w.agg.flags & TALLY__HIST_BOUNDS_LOOSE));
	tally__window_destroy(&w);
}

Test(window, idle_gaps)
{
	struct tally__window w;
	struct tally__window_stats st;
	uint64_t now = 1000 * SEC;

	mk(&w, MS, 3600 * MS, now); /* 3600 slices of 1 ms */
	for (int i = 0; i < 5000; i++) {
		now += MS / 2;
		cr_assert_eq(tally__window_advance(&w, now), 0);
		tally__window_add(&w, (uint64_t)i);
	}
	st = stats(&w, now);
	cr_assert_eq(st.count, 5000);
	/* gap of exactly N-1 slices: every closed slice leaves, current stays */
	now = (now / MS + 3599) * MS;
	st = stats(&w, now);
	cr_assert_eq(st.count, 1, "%lu", st.count); /* last slice: 4999 */
	cr_assert_eq(st.min, 4999);
	/* a day of idleness: one step, nothing left, memory given back */
	now += 86400 * SEC;
	st = stats(&w, now);
	cr_assert_eq(st.count, 0);
	cr_assert(!st.has_quantiles);
	cr_assert_eq(st.total_count, 5000);
	cr_assert_null(w.fifo);
	cr_assert(tally__window_asleep(&w));
	cr_assert_eq(tally__window_heap_bytes(&w), 0);
	/* and it works again afterwards */
	tally__window_add(&w, 777);
	cr_assert_eq(tally__window_advance(&w, now + MS), 0);
	st = stats(&w, now + 2 * MS);
	cr_assert_eq(st.count, 1);
	cr_assert_eq(st.p99, 777);
	cr_assert_eq(st.total_count, 5001);
	tally__window_destroy(&w);
}

Test(window, single_slice_window)
{
	struct tally__window w;
	struct tally__window_stats st;

	mk(&w, SEC, SEC, 0);
	tally__window_add(&w, 5);
	st = stats(&w, SEC - 1);
	cr_assert_eq(st.count, 1);
	st = stats(&w, SEC);
	cr_assert_eq(st.count, 0);
	cr_assert_eq(st.total_count, 1);
	tally__window_destroy(&w);
}

Test(window, rate)
{
	struct tally__window w;
	struct tally__window_stats st;

	mk(&w, SEC, 10 * SEC, 0);
	/* 100 values per second, evenly, for 30 s */
	for (uint64_t t = 0; t < 30 * SEC; t += 10 * MS) {
		if (t == 5 * SEC) {
			st = stats(&w, t); /* before a full window: elapsed */
			cr_assert_eq(st.covered_ns, 5 * SEC);
			cr_assert_float_eq(st.rate, 100.0, 1e-9);
		}
		cr_assert_eq(tally__window_advance(&w, t), 0);
		tally__window_add(&w, 1000);
	}
	st = stats(&w, 30 * SEC - 5 * MS);
	cr_assert_float_eq(st.rate, 100.0, 1.0); /* covered: slices 20..29 */
	cr_assert_eq(st.covered_ns, 10 * SEC - 5 * MS);
	st = stats(&w, 30 * SEC); /* slice 30 just opened, empty */
	cr_assert_eq(st.covered_ns, 9 * SEC);
	cr_assert_float_eq(st.rate, 100.0, 1e-9);
	cr_assert_eq(st.total_count, 3000);
	cr_assert_float_eq(st.mean, 1000.0, 1e-9);
	st = stats(&w, 60 * SEC);
	cr_assert_float_eq(st.rate, 0.0, 1e-12);
	/* right at start: the denominator is one slice, never less (2 samples
	 * of a new subject are 2 a second, not 203) */
	tally__window_destroy(&w);
	mk(&w, SEC, 10 * SEC, 7 * SEC);
	tally__window_add(&w, 1);
	tally__window_add(&w, 1);
	st = stats(&w, 7 * SEC + 10 * MS);
	cr_assert_eq(st.covered_ns, SEC);
	cr_assert_float_eq(st.rate, 2.0, 1e-9);
	st = stats(&w, 7 * SEC + 2 * SEC); /* past one slice: the elapsed time */
	cr_assert_eq(st.covered_ns, 2 * SEC);
	cr_assert_float_eq(st.rate, 1.0, 1e-9);
	tally__window_destroy(&w);
}

/* ---- sleep: an idle subject gives its memory back --------------------- */

/* Idle for less than a window: nothing is freed; the values still inside
 * count; stepping one slice at a time (as the engine does), the window
 * sleeps once the last value has left, and wakes on the next one. */
Test(window, idle_within_and_after_a_window)
{
	struct tally__window w;
	struct tally__window_stats st;
	uint64_t t = 1000 * SEC + SEC / 2;

	cr_assert_lt(sizeof(struct tally__window), 1024); /* what a sleeper costs */
	mk(&w, SEC, 10 * SEC, t);
	cr_assert(tally__window_add(&w, 5000));
	for (int k = 1; k <= 5; k++)
		cr_assert_eq(tally__window_advance(&w, t + k * SEC), 0);
	cr_assert(!tally__window_asleep(&w));
	cr_assert(tally__window_add(&w, 7000)); /* back within the window */
	st = stats(&w, t + 5 * SEC);
	cr_assert_eq(st.count, 2);
	st = stats(&w, t + 9 * SEC); /* slice 1000 still in: 1000 .. 1009 */
	cr_assert_eq(st.count, 2);
	cr_assert_eq(st.min, 5000);
	st = stats(&w, t + 10 * SEC);
	cr_assert_eq(st.count, 1);
	cr_assert_eq(st.min, 7000);
	cr_assert(!tally__window_asleep(&w));
	for (int k = 11; k <= 15; k++)
		cr_assert_eq(tally__window_advance(&w, t + k * SEC), 0);
	/* slice 1005 left at 1015: nothing in the window, memory given back */
	cr_assert(tally__window_asleep(&w));
	cr_assert_eq(tally__window_heap_bytes(&w), 0);
	st = stats(&w, t + 16 * SEC);
	cr_assert_eq(st.count, 0);
	cr_assert(!st.has_quantiles);
	cr_assert_eq(st.total_count, 2);
	/* back after the window: woken, exact again */
	cr_assert(tally__window_add(&w, 9000));
	cr_assert(!tally__window_asleep(&w));
	cr_assert_gt(tally__window_heap_bytes(&w), 0);
	st = stats(&w, t + 16 * SEC);
	cr_assert_eq(st.count, 1);
	cr_assert_eq(st.p50, 9000);
	cr_assert_eq(st.min, 9000);
	cr_assert_eq(st.total_count, 3);
	cr_assert_eq(st.lost, 0);
	st = stats(&w, t + 20 * SEC);
	cr_assert_eq(st.count, 1);
	tally__window_destroy(&w);
}

static const char *fail_at;

static bool fail_point(const char *point)
{
	return fail_at != NULL && strcmp(point, fail_at) == 0;
}

/* No memory to wake a sleeping window: the value is counted as lost. */
Test(window, wake_without_memory_counts_the_loss)
{
	struct tally__window w;
	struct tally__window_stats st;

	mk(&w, SEC, 10 * SEC, 0);
	tally__window_add(&w, 1);
	st = stats(&w, 20 * SEC);
	cr_assert(tally__window_asleep(&w));
	tally__hist_nomem_hook = fail_point;
	fail_at = "hist.wake";
	cr_assert(!tally__window_add(&w, 2));
	cr_assert(!tally__window_add(&w, 3));
	cr_assert(tally__window_asleep(&w));
	fail_at = NULL;
	st = stats(&w, 20 * SEC);
	cr_assert_eq(st.count, 0);
	cr_assert_eq(st.lost, 2);
	cr_assert_eq(st.total_count, 1);
	cr_assert(tally__window_add(&w, 4)); /* memory again: recorded */
	st = stats(&w, 20 * SEC);
	cr_assert_eq(st.count, 1);
	cr_assert_eq(st.p50, 4);
	cr_assert_eq(st.lost, 2);
	/* storing a closed slice without memory: the advance fails, nothing
	 * changes, the next one succeeds with every value */
	fail_at = "window.fifo";
	cr_assert_eq(tally__window_advance(&w, 21 * SEC), -ENOMEM);
	cr_assert_eq(w.cur_slice, 20);
	cr_assert_eq(w.cur.count, 1);
	fail_at = NULL;
	cr_assert_eq(tally__window_advance(&w, 21 * SEC), 0);
	st = stats(&w, 21 * SEC);
	cr_assert_eq(st.count, 1);
	cr_assert_eq(w.agg.count, 1);
	tally__hist_nomem_hook = NULL;
	tally__window_destroy(&w);
}

static int wakes;

static bool fail_second_wake(const char *point)
{
	return strcmp(point, "hist.wake") == 0 && ++wakes == 2;
}

/* A wake that gets the aggregate but not the current slice: the value is
 * lost (counted), and the next advance gives the aggregate back too. */
Test(window, half_wake_gives_back_what_it_got)
{
	struct tally__window w;
	struct tally__window_stats st;

	mk(&w, SEC, 10 * SEC, 0);
	tally__window_add(&w, 1);
	st = stats(&w, 20 * SEC);
	cr_assert(tally__window_asleep(&w));
	wakes = 0;
	tally__hist_nomem_hook = fail_second_wake;
	cr_assert(!tally__window_add(&w, 2));
	tally__hist_nomem_hook = NULL;
	cr_assert_not_null(w.agg.counts);
	cr_assert_null(w.cur.counts);
	st = stats(&w, 21 * SEC);
	cr_assert_eq(st.lost, 1);
	cr_assert_eq(st.count, 0);
	cr_assert_null(w.agg.counts);
	cr_assert_eq(tally__window_heap_bytes(&w), 0);
	cr_assert(tally__window_add(&w, 3));
	st = stats(&w, 21 * SEC);
	cr_assert_eq(st.count, 1);
	tally__window_destroy(&w);
}

/* Slices with more than 65,535 values in one bucket: the carry goes into
 * the aggregate and leaves with its slice, exactly. */
Test(window, carry_across_slices)
{
	struct tally__window w;
	struct tally__window_stats st;
	uint32_t i = tally__hist_index(1000);

	mk(&w, SEC, 3 * SEC, 0);
	for (uint64_t k = 0; k < 6; k++) {
		cr_assert_eq(tally__window_advance(&w, k * SEC), 0);
		for (int n = 0; n < 70000; n++)
			tally__window_add(&w, 1000);
		for (uint64_t n = 0; n <= k; n++)
			tally__window_add(&w, 5000 + n);
		uint64_t closed = k < 2 ? k : 2;
		cr_assert_eq(tally__hist_bucket(&w.agg, i), 70000 * closed, "k=%lu", k);
		cr_assert_eq(tally__hist_bucket(&w.cur, i), 70000);
		st = stats(&w, k * SEC);
		cr_assert_eq(st.count, 70000 * (closed + 1) + (closed + 1) * (2 * k + 2 - closed) / 2);
		cr_assert_eq(st.min, 1000);
		cr_assert_eq(st.max, 5000 + k);
		cr_assert_eq(st.p50, tally__hist_bucket_mid(i)); /* 1004: within 1/128 */
		cr_assert(!st.bucket_saturated);
	}
	tally__window_destroy(&w);
}

/* A carry without memory (hist.h, Counters): the bucket sticks at 65,535
 * while the count stays exact, so once that slice closes the aggregate's
 * buckets sum short of its count. Reading the window then, and after the
 * slice leaves it, must answer (the ranks past the buckets with the exact
 * max, flagged bucket_saturated), never abort: before, the quantile walk
 * asserted that it had answered every rank and killed the aggregator. */
Test(window, carry_without_memory_then_the_slice_closes_and_leaves)
{
	struct tally__window w;
	struct tally__window_stats st;

	mk(&w, SEC, 3 * SEC, 0);
	tally__hist_nomem_hook = fail_point;
	fail_at = "hist.carry";
	for (int n = 0; n < 70000; n++)
		tally__window_add(&w, 1000);
	fail_at = NULL;
	tally__hist_nomem_hook = NULL;
	tally__window_add(&w, 9000);
	st = stats(&w, 0);
	cr_assert_eq(st.count, 70001);
	cr_assert(st.bucket_saturated);
	cr_assert_eq(st.max, 9000);
	for (uint64_t k = 1; k <= 5; k++) { /* closed, in the aggregate, then out */
		st = stats(&w, k * SEC);
		/* slices k-2 .. k: slice 0 holds 70,001, slice j >= 1 the value 2000 + j */
		cr_assert_eq(st.count, (k <= 2 ? 70001 : 0) + (k <= 2 ? k - 1 : 2), "k=%lu", k);
		if (k < 3) {
			cr_assert(st.has_quantiles);
			cr_assert(st.bucket_saturated, "k=%lu", k);
			cr_assert_leq(st.p50, st.max);
			cr_assert_leq(st.p999, 9000);
			cr_assert_geq(st.p999, st.p50);
		}
		tally__window_add(&w, 2000 + k); /* a fresh slice each second */
	}
	st = stats(&w, 5 * SEC);
	cr_assert_eq(st.count, 3, "the saturated slice left the window");
	cr_assert_eq(st.min, 2003);
	cr_assert_eq(st.max, 2005);
	tally__window_destroy(&w);
}

/* ---- property test: incremental == from scratch ------------------- */

struct sample {
	uint64_t slice, v;
};

static void scratch(const struct sample *s, size_t n, uint64_t lo,
		    uint64_t hi, struct tally__hist *h)
{
	tally__hist_reset(h);
	for (size_t i = 0; i < n; i++)
		if (s[i].slice >= lo && s[i].slice <= hi)
			tally__hist_add(h, s[i].v);
}

static void check_against(struct tally__window *w, const struct sample *s,
			  size_t n, uint64_t now, struct tally__hist *h)
{
	static const double qs[5] = { 0.5, 0.9, 0.95, 0.99, 0.999 };
	struct tally__window_stats st = stats(w, now);
	uint64_t k = now / w->slice_ns, n1 = w->nslices - 1;
	uint64_t lo = k >= n1 ? k - n1 : 0, q[5];

	/* closed slices in the window: the aggregate, bucket by bucket */
	scratch(s, n, lo, k - (k > 0), h);
	if (k == 0)
		tally__hist_reset(h);
	cr_assert_eq(w->agg.count, h->count, "k=%lu", k);
	cr_assert_eq(w->agg.sum, h->sum);
	for (uint32_t i = 0; i < h->nbuckets; i++)
		cr_assert_eq(tally__hist_bucket(&w->agg, i), tally__hist_bucket(h, i));
	for (uint32_t b = 0; b < h->nblocks; b++) /* a sleeping window has none: 0 */
		cr_assert_eq(w->agg.blocks ? w->agg.blocks[b] : 0, h->blocks[b]);
	if (h->count) {
		cr_assert_eq(w->agg.min, h->min);
		cr_assert_eq(w->agg.max, h->max);
	}
	/* the published stats: closed + current */
	scratch(s, n, lo, k, h);
	cr_assert_eq(st.count, h->count);
	cr_assert_eq(st.sum, h->sum);
	cr_assert_eq(st.has_quantiles, h->count != 0);
	if (!h->count)
		return;
	cr_assert_eq(st.min, h->min);
	cr_assert_eq(st.max, h->max);
	cr_assert_eq(tally__hist_quantiles(h, qs, 5, q), 0);
	cr_assert_eq(st.p50, q[0]);
	cr_assert_eq(st.p90, q[1]);
	cr_assert_eq(st.p95, q[2]);
	cr_assert_eq(st.p99, q[3]);
	cr_assert_eq(st.p999, q[4]);
}

static uint64_t step(uint64_t *r, uint64_t slice, uint32_t n)
{
	switch (rnd(r) % 8) {
	case 0: return 0;
	case 1: return slice;
	case 2: return (n - 1) * slice;
	case 3: return n * slice;
	case 4: return (rnd(r) % (3 * n + 1)) * slice;
	default: return rnd(r) % (slice / 2);
	}
}

static void property(uint64_t slice, uint32_t nslices, uint64_t seed)
{
	struct tally__window w;
	struct tally__hist h;
	size_t cap = 40000, n = 0, total = 0;
	struct sample *s = malloc(cap * sizeof(*s));
	uint64_t r = seed, now = 12345 * slice + rnd(&r) % slice;

	mk(&w, slice, slice * nslices, now);
	cr_assert_eq(tally__hist_init(&h, TALLY__HIST_DEFAULT_MAX), 0);
	for (int it = 0; it < 1500 && n + 64 <= cap; it++) {
		uint64_t k = rnd(&r) % 40;

		now += step(&r, slice, nslices);
		cr_assert_eq(tally__window_advance(&w, now), 0);
		for (uint64_t i = 0; i < k; i++, total++) {
			uint64_t v = rnd(&r) >> (rnd(&r) % 64);

			v = rnd(&r) % 3 ? v % 100000000 : v;
			tally__window_add(&w, v);
			s[n++] = (struct sample){ now / slice, v };
		}
		if (it % 3 == 0)
			check_against(&w, s, n, now, &h);
		cr_assert_eq(stats(&w, now).total_count, total);
	}
	check_against(&w, s, n, now, &h);
	tally__hist_destroy(&h);
	tally__window_destroy(&w);
	free(s);
}

Test(window, incremental_equals_scratch_10x1s) { property(SEC, 10, 1); }
Test(window, incremental_equals_scratch_1) { property(MS, 1, 2); }
Test(window, incremental_equals_scratch_2) { property(100 * MS, 2, 3); }
Test(window, incremental_equals_scratch_7) { property(7 * MS, 7, 4); }
Test(window, incremental_equals_scratch_60) { property(SEC, 60, 5); }
Test(window, incremental_equals_scratch_3600) { property(MS, 3600, 6); }

/* ---- merge (drain_threads) ------------------------------------------------ */

static bool same_stats(const struct tally__window_stats *a, const struct tally__window_stats *b)
{
	return a->count == b->count && a->sum == b->sum && a->min == b->min && a->max == b->max &&
	       a->p50 == b->p50 && a->p90 == b->p90 && a->p95 == b->p95 && a->p99 == b->p99 &&
	       a->p999 == b->p999 && a->has_quantiles == b->has_quantiles && a->clamped == b->clamped &&
	       a->total_count == b->total_count && a->total_sum == b->total_sum &&
	       a->covered_ns == b->covered_ns && a->rate == b->rate && a->mean == b->mean;
}

/* Values dealt at random over n windows give, merged, exactly what one
 * window given every value gives: at every step, across slice closes,
 * expiry and idle gaps; values above the range are clamped alike. */
static void merged_equals_one(uint32_t n, uint64_t slice, uint32_t slices, uint64_t seed)
{
	struct tally__window one, parts[4], *ws[4];
	struct tally__window_config c = TALLY__WINDOW_CONFIG_DEFAULT;
	uint64_t t = 5 * slice + 3;

	c.slice_ns = slice;
	c.window_ns = slice * slices;
	c.max_value = 10 * SEC;
	cr_assert_eq(tally__window_init(&one, &c, t), 0);
	for (uint32_t k = 0; k < n; k++) {
		cr_assert_eq(tally__window_init(&parts[k], &c, t), 0);
		ws[k] = &parts[k];
	}
	for (int step = 0; step < 400; step++) {
		uint64_t r = rnd(&seed), m = r % 500;
		for (uint64_t i = 0; i < m; i++) {
			uint64_t v = rnd(&seed);
			v = (v & 7) == 0 ? v % 100 : (v & 7) == 1 ? 20 * SEC : (v >> 20) % (3 * SEC);
			uint32_t k = (uint32_t)(rnd(&seed) % n);
			tally__window_add(&one, v);
			tally__window_add(&parts[k], v);
		}
		/* mostly within a slice, sometimes a slice or more, sometimes a whole window */
		r = rnd(&seed) % 100;
		t += r < 70 ? slice / 7 : r < 95 ? slice * (1 + r % 3) : slice * (slices + 1);
		for (uint32_t k = 0; k < n; k++) /* the owners advance when they drain */
			if (rnd(&seed) & 1)
				cr_assert_eq(tally__window_advance(&parts[k], t), 0);
		cr_assert_eq(tally__window_advance(&one, t), 0);
		struct tally__window_stats a, b;
		cr_assert_eq(tally__window_stats(&one, t, &a), 0);
		cr_assert_eq(tally__window_stats_merged(ws, n, t, &b), 0);
		cr_assert(same_stats(&a, &b), "n %u step %d: count %llu/%llu p99 %llu/%llu min %llu/%llu",
			  n, step, (unsigned long long)a.count, (unsigned long long)b.count,
			  (unsigned long long)a.p99, (unsigned long long)b.p99, (unsigned long long)a.min,
			  (unsigned long long)b.min);
	}
	tally__window_destroy(&one);
	for (uint32_t k = 0; k < n; k++)
		tally__window_destroy(&parts[k]);
}

Test(window, merged_one_window_is_stats) { merged_equals_one(1, SEC, 10, 11); }
Test(window, merged_two_windows_equal_one) { merged_equals_one(2, SEC, 10, 12); }
Test(window, merged_four_windows_equal_one) { merged_equals_one(4, 10 * MS, 60, 13); }
Test(window, merged_single_slice) { merged_equals_one(2, MS, 1, 14); }

Test(window, merged_rate_counts_from_the_earliest_start)
{
	struct tally__window a, b, one, *ws[2] = { &a, &b };
	struct tally__window_stats m, s;

	mk(&a, SEC, 10 * SEC, 100 * SEC);
	mk(&one, SEC, 10 * SEC, 100 * SEC);
	mk(&b, SEC, 10 * SEC, 103 * SEC); /* another thread saw the subject 3 s later */
	tally__window_add(&a, 5);
	tally__window_add(&b, 7);
	tally__window_add(&one, 5);
	tally__window_add(&one, 7);
	cr_assert_eq(tally__window_stats_merged(ws, 2, 104 * SEC, &m), 0);
	cr_assert_eq(tally__window_stats(&one, 104 * SEC, &s), 0);
	cr_expect_eq(m.covered_ns, 4 * SEC);
	cr_expect(same_stats(&m, &s));
	cr_expect_eq(tally__window_stats_merged(ws, 0, 104 * SEC, &m), -EINVAL);
	tally__window_destroy(&a);
	tally__window_destroy(&b);
	tally__window_destroy(&one);
}
