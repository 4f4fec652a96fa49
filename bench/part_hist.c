/* SPDX-License-Identifier: MIT */
/*
 * part_hist.c: the histogram and window hot paths (lib/hist.h,
 * lib/window.h), folded in from the former standalone bench_hist.c:
 * index and add per value beside a plain loop over the same values; a
 * 5-quantile query (p50 .. p99.9) on a histogram of 100,000 log-normal
 * latencies beside the exact P95 of the same 100,000 samples by sorting
 * (qsort) and by selection (quickselect, as nth_element), in the same
 * unit so the ratio shows, and beside a linear walk of every bucket;
 * then a slice close and a window stats call. The exact baselines compute
 * ONE quantile where tally computes five, and they include the copy of
 * the samples that a non-destructive exact quantile needs.
 *
 * The part "error" (bench_part_error) checks the documented error bound:
 * on six distributions (log-normal with a slow tail, uniform, exponential,
 * bimodal, Pareto, and values under 128 ns) it compares p50, p90, p95, p99
 * and p99.9 from a histogram with the exact nearest-rank quantiles of the
 * same 100,000 samples, one seed per repetition, and reports the largest
 * relative error in percent against the bound of 1/128 = 0.78%.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "hist.h"
#include "window.h"

#define PART "hist"
#define NVAL (1u << 16)   /* 512 KB of values: L2, like a drained batch */
#define NEXACT 100000u    /* samples behind the quantile query and the exact P95 */

#define R_SUM "loop baseline: sum of the values"
#define R_QSORT "exact P95: qsort 100k samples"
#define R_QSEL "exact P95: quickselect 100k samples"
#define R_LINEAR "5 q: linear scan of every bucket"

static volatile uint64_t sink;

static const double QS[5] = { 0.5, 0.9, 0.95, 0.99, 0.999 };

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += UINT64_C(0x9e3779b97f4a7c15));

	z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
	return z ^ (z >> 31);
}

/* Log-normal latencies around 200 us (sigma 1.2), 1% slow tail x50. */
static uint64_t latency(uint64_t *s)
{
	double u1 = ((double)(splitmix(s) >> 11) + 0.5) / 9007199254740992.0;
	double u2 = ((double)(splitmix(s) >> 11) + 0.5) / 9007199254740992.0;
	double z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
	double x = exp(log(200000.0) + 1.2 * z);

	return (uint64_t)(splitmix(s) % 100 == 0 ? 50.0 * x : x);
}

static int iters(double base)
{
	double n = base * bench_opts.scale;

	return n < 1 ? 1 : (int)n;
}

/* ---- per value: index and add ------------------------------------------- */

static double per_op_sum(const uint64_t *v, int reps)
{
	uint64_t t0 = bench_now_ns(), acc = 0;

	for (int r = 0; r < reps; r++)
		for (uint32_t i = 0; i < NVAL; i++)
			acc += v[i];
	sink = acc;
	return (double)(bench_now_ns() - t0) / ((double)reps * NVAL);
}

static double per_op_index(const uint64_t *v, int reps)
{
	uint64_t t0 = bench_now_ns(), acc = 0;

	for (int r = 0; r < reps; r++)
		for (uint32_t i = 0; i < NVAL; i++)
			acc += tally__hist_index(v[i]);
	sink = acc;
	return (double)(bench_now_ns() - t0) / ((double)reps * NVAL);
}

static double per_op_add(struct tally__hist *h, const uint64_t *v, int reps)
{
	uint64_t t0 = bench_now_ns();

	for (int r = 0; r < reps; r++)
		for (uint32_t i = 0; i < NVAL; i++)
			tally__hist_add(h, v[i]);
	return (double)(bench_now_ns() - t0) / ((double)reps * NVAL);
}

static void bench_per_value(const uint64_t *v)
{
	struct tally__hist h;
	double base[256], idx[256], add[256];
	int n = bench_opts.reps, inner = iters(100);

	if (tally__hist_init(&h, TALLY__HIST_DEFAULT_MAX) != 0)
		abort();
	for (int k = 0; k < n; k++) {
		base[k] = per_op_sum(v, inner);
		idx[k] = per_op_index(v, inner);
		add[k] = per_op_add(&h, v, inner);
	}
	bench_row(PART, R_SUM, "ns/op", false, base, n, NULL, NVAL);
	bench_row(PART, "tally__hist_index", "ns/op", false, idx, n, NULL, NVAL);
	bench_row(PART, "tally__hist_add (index + add)", "ns/op", false, add, n, NULL, NVAL);
	tally__hist_destroy(&h);
}

/* ---- exact quantile baselines -------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

static void swap_u64(uint64_t *a, uint64_t *b)
{
	uint64_t t = *a;

	*a = *b;
	*b = t;
}

/* The k-th smallest of a[0..n) (0-based), reordering a: Hoare partition
 * around a median of three, iterating into the side that holds k, as
 * std::nth_element does (without its introselect fallback). */
static uint64_t quickselect(uint64_t *a, size_t n, size_t k)
{
	size_t lo = 0, hi = n - 1;

	while (hi > lo) {
		size_t mid = lo + (hi - lo) / 2;
		if (a[mid] < a[lo])
			swap_u64(&a[mid], &a[lo]);
		if (a[hi] < a[lo])
			swap_u64(&a[hi], &a[lo]);
		if (a[hi] < a[mid])
			swap_u64(&a[hi], &a[mid]);
		uint64_t pivot = a[mid];
		size_t i = lo, j = hi;
		while (i <= j) {
			while (a[i] < pivot)
				i++;
			while (a[j] > pivot)
				j--;
			if (i <= j) {
				swap_u64(&a[i], &a[j]);
				i++;
				if (j == 0)
					break;
				j--;
			}
		}
		if (k <= j)
			hi = j;
		else if (k >= i)
			lo = i;
		else
			return a[k];
	}
	return a[k];
}

/* Nearest rank of q among n, 0-based, as tally__hist_quantiles defines it. */
static size_t rank0(double q, size_t n)
{
	size_t r = (size_t)ceil(q * (double)n);

	return r ? r - 1 : 0;
}

static uint64_t exact_p95(const uint64_t *v, uint64_t *scratch, size_t n, bool select)
{
	memcpy(scratch, v, n * sizeof(*v));
	if (select)
		return quickselect(scratch, n, rank0(0.95, n));
	qsort(scratch, n, sizeof(*scratch), cmp_u64);
	return scratch[rank0(0.95, n)];
}

static double per_exact(const uint64_t *v, uint64_t *scratch, int reps, bool select, uint64_t *p95)
{
	uint64_t t0 = bench_now_ns();

	for (int r = 0; r < reps; r++)
		*p95 = exact_p95(v, scratch, NEXACT, select);
	return (double)(bench_now_ns() - t0) / reps;
}

/* ---- quantile queries ------------------------------------------------------ */

/* The same nearest-rank walk over every bucket, without the block
 * subtotals (ranks computed once, as the real one). */
static void linear_quantiles(const struct tally__hist *h, const double *qs, size_t n, uint64_t *out)
{
	uint64_t cum = 0, r[8];
	size_t q = 0;

	for (size_t k = 0; k < n && k < 8; k++)
		r[k] = (uint64_t)ceil(qs[k] * (double)h->count);
	for (uint32_t i = 0; i < h->nbuckets && q < n; i++) {
		cum += tally__hist_bucket(h, i);
		while (q < n && r[q] <= cum)
			out[q++] = tally__hist_bucket_mid(i);
	}
}

static double per_query(const struct tally__hist *const *hs, size_t nh, int reps, bool linear)
{
	uint64_t out[5], t0 = bench_now_ns();

	for (int r = 0; r < reps; r++) {
		if (linear)
			linear_quantiles(hs[0], QS, 5, out);
		else if (tally__hist_quantiles_n(hs, nh, QS, 5, out) != 0)
			abort();
		sink = out[2];
	}
	return (double)(bench_now_ns() - t0) / reps;
}

static void check_p95(const struct tally__hist *h, uint64_t exact)
{
	uint64_t q[5];

	if (tally__hist_quantiles(h, QS, 5, q) != 0)
		abort();
	double err = 100.0 * ((double)q[2] - (double)exact) / (double)exact;
	printf("  %-10s P95 of the %u samples: exact %llu ns, tally %llu ns (%+.3f%%, bound 0.79%%)\n",
	       PART, NEXACT, (unsigned long long)exact, (unsigned long long)q[2], err);
}

static void bench_query(uint64_t *seed)
{
	struct tally__hist a, c;
	const struct tally__hist *one[1] = { &a }, *two[2] = { &a, &c };
	uint64_t *v = malloc(NEXACT * sizeof(*v)), *scratch = malloc(NEXACT * sizeof(*v));
	double srt[256], sel[256], lin[256], q1[256], q2[256];
	uint64_t p_sort = 0, p_sel = 0;
	int n = bench_opts.reps, nq = iters(20000), ne = iters(3);

	if (!v || !scratch || tally__hist_init(&a, TALLY__HIST_DEFAULT_MAX) != 0 ||
	    tally__hist_init(&c, TALLY__HIST_DEFAULT_MAX) != 0)
		abort();
	for (uint32_t i = 0; i < NEXACT; i++) { /* a 10 s window, 1 s slice */
		v[i] = latency(seed);
		tally__hist_add(i % 10 ? &a : &c, v[i]);
	}
	for (int k = 0; k < n; k++) {
		srt[k] = per_exact(v, scratch, ne, false, &p_sort);
		sel[k] = per_exact(v, scratch, ne * 4, true, &p_sel);
		lin[k] = per_query(one, 1, nq, true);
		q1[k] = per_query(one, 1, nq, false);
		q2[k] = per_query(two, 2, nq, false);
	}
	if (p_sort != p_sel) {
		fprintf(stderr, "bench: quickselect P95 %llu != qsort P95 %llu\n",
			(unsigned long long)p_sel, (unsigned long long)p_sort);
		abort();
	}
	struct tally__hist all;
	if (tally__hist_init(&all, TALLY__HIST_DEFAULT_MAX) != 0)
		abort();
	tally__hist_merge(&all, &a);
	tally__hist_merge(&all, &c);
	check_p95(&all, p_sort);
	printf("  %-10s query data: %u values, %u nonzero buckets of %u (agg 90%%, cur 10%%)\n", PART,
	       NEXACT, tally__hist_nonzero(&all), all.nbuckets);
	const char *vs = R_QSORT "|" R_QSEL "|" R_LINEAR;
	bench_row(PART, R_QSORT, "ns", false, srt, n, NULL, NEXACT);
	bench_row(PART, R_QSEL, "ns", false, sel, n, NULL, NEXACT);
	bench_row(PART, R_LINEAR, "ns", false, lin, n, NULL, NEXACT);
	bench_row(PART, "tally__hist_quantiles, 5 q, one hist", "ns", false, q1, n, vs, NEXACT);
	bench_row(PART, "tally__hist_quantiles_n, 5 q, agg + cur", "ns", false, q2, n, vs, NEXACT);
	tally__hist_destroy(&all);
	tally__hist_destroy(&a);
	tally__hist_destroy(&c);
	free(v);
	free(scratch);
}

/* ---- window: one subject at 10k values/s ---------------------------------- */

static void bench_window(uint64_t *seed)
{
	struct tally__window w;
	struct tally__window_stats st;
	double adv[256], sta[256];
	uint64_t t = 0, slice = 1000000000u;
	int n = bench_opts.reps, nslices = iters(100);

	if (tally__window_init(&w, NULL, 0) != 0)
		abort();
	for (int k = 0; k < n; k++) {
		uint64_t tadv = 0, tsta = 0;

		for (int s = 0; s < nslices; s++, t += slice) {
			uint64_t t0;

			for (int i = 0; i < 10000; i++)
				tally__window_add(&w, latency(seed));
			t0 = bench_now_ns();
			if (tally__window_advance(&w, t + slice) != 0)
				abort();
			tadv += bench_now_ns() - t0;
			t0 = bench_now_ns();
			if (tally__window_stats(&w, t + slice + 1, &st) != 0)
				abort();
			tsta += bench_now_ns() - t0;
		}
		adv[k] = (double)tadv / nslices;
		sta[k] = (double)tsta / nslices;
	}
	bench_row(PART, "tally__window_advance (close 1 slice)", "ns", false, adv, n, NULL, 10000);
	bench_row(PART, "tally__window_stats (5 q, agg + cur)", "ns", false, sta, n, NULL, 10000);
	printf("  %-10s window: p50 %llu p99 %llu ns, %.0f/s, %u closed slices packed in %u bytes\n", PART,
	       (unsigned long long)st.p50, (unsigned long long)st.p99, st.rate, w.nclosed,
	       w.ftail - w.fhead);
	tally__window_destroy(&w);
}

void bench_part_hist(void)
{
	uint64_t *v = malloc(NVAL * sizeof(*v)), seed = 42;

	if (!v)
		abort();
	for (uint32_t i = 0; i < NVAL; i++)
		v[i] = latency(&seed);
	bench_per_value(v);
	bench_query(&seed);
	bench_window(&seed);
	free(v);
}

/* ---- error: quantile error against the exact quantiles ------------------- */

#define ERR_BOUND_PCT (100.0 / 128.0)

static double unit(uint64_t *s)
{
	return ((double)(splitmix(s) >> 11) + 0.5) / 9007199254740992.0;
}

static uint64_t d_uniform(uint64_t *s) { return 1000 + splitmix(s) % 10000000u; }
static uint64_t d_expo(uint64_t *s) { return (uint64_t)(-100000.0 * log(unit(s))) + 1; }
static uint64_t d_pareto(uint64_t *s) { return (uint64_t)(10000.0 / pow(unit(s), 1 / 1.5)); }
static uint64_t d_small(uint64_t *s) { return 1 + splitmix(s) % 127u; }

static uint64_t d_bimodal(uint64_t *s)
{
	double base = splitmix(s) & 1 ? 100000.0 : 10000000.0;

	return (uint64_t)(base * (0.9 + 0.2 * unit(s)));
}

static const struct {
	const char *name;
	uint64_t (*draw)(uint64_t *);
} dists[] = {
	{ "log-normal 200 us, 1% tail x50", latency },
	{ "uniform 1 us .. 10 ms", d_uniform },
	{ "exponential mean 100 us", d_expo },
	{ "bimodal 100 us / 10 ms", d_bimodal },
	{ "Pareto a=1.5 from 10 us", d_pareto },
	{ "values < 128 ns (exact)", d_small },
};

/* Largest |estimate - exact| / exact over the five quantiles, in percent. */
static double max_error_pct(uint64_t (*draw)(uint64_t *), uint64_t seed, uint64_t *v)
{
	struct tally__hist h;
	uint64_t q[5];
	double worst = 0;

	if (tally__hist_init(&h, TALLY__HIST_DEFAULT_MAX) != 0)
		abort();
	for (uint32_t i = 0; i < NEXACT; i++)
		tally__hist_add(&h, v[i] = draw(&seed));
	if (tally__hist_quantiles(&h, QS, 5, q) != 0)
		abort();
	qsort(v, NEXACT, sizeof(*v), cmp_u64);
	for (int k = 0; k < 5; k++) {
		double exact = (double)v[rank0(QS[k], NEXACT)];
		double e = fabs((double)q[k] - exact) / exact * 100;
		if (e > worst)
			worst = e;
	}
	tally__hist_destroy(&h);
	return worst;
}

void bench_part_error(void)
{
	uint64_t *v = malloc(NEXACT * sizeof(*v));
	double err[256], worst_all = 0;
	char row[72];

	if (!v)
		abort();
	for (size_t d = 0; d < sizeof(dists) / sizeof(dists[0]); d++) {
		for (int r = 0; r < bench_opts.reps; r++) {
			err[r] = max_error_pct(dists[d].draw, 0x5eed0000u + (uint64_t)r * 7919u + d, v);
			if (err[r] > worst_all)
				worst_all = err[r];
		}
		snprintf(row, sizeof(row), "max rel. err, %s", dists[d].name);
		bench_row_series("error", "max relative error", row, "%", false, err, bench_opts.reps, NULL,
				 (double)d);
	}
	printf("  %-8s worst over all: %.3f%%, bound %.3f%%: %s\n", "error", worst_all, ERR_BOUND_PCT,
	       worst_all <= ERR_BOUND_PCT ? "within" : "OUTSIDE THE BOUND");
	if (worst_all > ERR_BOUND_PCT)
		bench_failed = true;
	free(v);
}
