/* SPDX-License-Identifier: MIT */
/*
 * test_hist.c - Criterion tests of the log-linear histogram (lib/hist.c):
 * the bucket layout and its edges, clamping, merge/subtract (dense and
 * sparse and packed) as inverses, the 16-bit counters' carry at 65,535 /
 * 65,536, saturation only without memory, release and wake, quantile accuracy against an exact
 * sorted oracle with the same nearest-rank definition on several
 * distributions, and cumulative counts at the default exporter edges;
 * sums of several histograms with empty ones among them (merged windows).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "hist.h"

/* splitmix64: small, seedable, good enough for test data. */
static uint64_t rnd(uint64_t *s)
{
	uint64_t z = (*s += UINT64_C(0x9e3779b97f4a7c15));

	z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
	return z ^ (z >> 31);
}

static double rnd_unit(uint64_t *s) /* (0, 1) */
{
	return ((double)(rnd(s) >> 11) + 0.5) / 9007199254740992.0;
}

static double rnd_normal(uint64_t *s)
{
	return sqrt(-2.0 * log(rnd_unit(s))) * cos(6.283185307179586 * rnd_unit(s));
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

static uint64_t absdiff(uint64_t a, uint64_t b)
{
	return a > b ? a - b : b - a;
}

static struct tally__hist mk(uint64_t max)
{
	struct tally__hist h;

	cr_assert_eq(tally__hist_init(&h, max), 0);
	return h;
}

Test(hist, layout_every_bucket_edge)
{
	for (uint32_t i = 0; i < TALLY__HIST_MAX_BUCKETS; i++) {
		uint64_t lo = tally__hist_bucket_lower(i);
		uint64_t up = tally__hist_bucket_upper(i);

		cr_assert_eq(tally__hist_index(lo), i, "lower of %u", i);
		cr_assert_eq(tally__hist_index(up - 1), i, "upper-1 of %u", i);
		cr_assert(tally__hist_is_edge(lo));
		cr_assert_lt(lo, up);
		if (i > 0)
			cr_assert_eq(tally__hist_bucket_upper(i - 1), lo);
		if (i >= 128) /* width <= lower / 64 */
			cr_assert_leq(tally__hist_bucket_width(i) * 64, lo);
		if (i + 1 < TALLY__HIST_MAX_BUCKETS)
			cr_assert_eq(tally__hist_index(up), i + 1);
	}
	cr_assert_eq(tally__hist_index(UINT64_MAX), TALLY__HIST_MAX_BUCKETS - 1);
	cr_assert_eq(tally__hist_bucket_upper(TALLY__HIST_MAX_BUCKETS - 1),
		     UINT64_MAX);
}

Test(hist, small_values_exact)
{
	for (uint64_t v = 0; v < 128; v++) {
		cr_assert_eq(tally__hist_index(v), v);
		cr_assert_eq(tally__hist_bucket_lower((uint32_t)v), v);
		cr_assert_eq(tally__hist_bucket_upper((uint32_t)v), v + 1);
		cr_assert_eq(tally__hist_bucket_mid((uint32_t)v), v);
	}
	cr_assert_eq(tally__hist_index(128), 128);
	cr_assert_eq(tally__hist_index(129), 128);
	cr_assert_eq(tally__hist_index(130), 129);
}

Test(hist, random_values_in_their_bucket)
{
	uint64_t s = 1;

	for (int k = 0; k < 1000000; k++) {
		uint64_t v = rnd(&s) >> (rnd(&s) % 64);
		uint32_t i = tally__hist_index(v);
		uint64_t lo = tally__hist_bucket_lower(i);
		uint64_t mid = tally__hist_bucket_mid(i);
		uint64_t err = mid > v ? mid - v : v - mid;

		cr_assert_leq(lo, v);
		cr_assert(v < tally__hist_bucket_upper(i) ||
			  tally__hist_bucket_upper(i) == UINT64_MAX);
		cr_assert(v < 128 ? v == lo : (v - lo) < lo / 64 + 1);
		/* the documented bound: |mid - v| <= v / 128 */
		cr_assert_leq(err, v / 128, "v=%lu mid=%lu", v, mid);
	}
}

Test(hist, prometheus_edges_are_bucket_edges)
{
	uint64_t e[TALLY__HIST_DEFAULT_NEDGES + 1];

	for (unsigned k = 6; k < 64; k++) /* (1 + j/64) * 2^k */
		for (uint64_t j = 0; j < 64; j++)
			cr_assert(tally__hist_is_edge((64 + j) << (k - 6)),
				  "k=%u j=%lu", k, j);
	cr_assert(!tally__hist_is_edge(129));
	cr_assert(!tally__hist_is_edge(1000000));
	cr_assert_eq(tally__hist_default_edges(e, 3), TALLY__HIST_DEFAULT_NEDGES);
	cr_assert_eq(tally__hist_default_edges(e, TALLY__HIST_DEFAULT_NEDGES + 1),
		     TALLY__HIST_DEFAULT_NEDGES);
	cr_assert_eq(e[0], 1024);
	cr_assert_eq(e[TALLY__HIST_DEFAULT_NEDGES - 1], UINT64_C(1) << 41);
	for (unsigned i = 0; i < TALLY__HIST_DEFAULT_NEDGES; i++) {
		cr_assert(tally__hist_is_edge(e[i]));
		if (i > 0)
			cr_assert_gt(e[i], e[i - 1]);
	}
}

Test(hist, range_and_clamp)
{
	struct tally__hist h = mk(TALLY__HIST_DEFAULT_MAX);
	const double q1 = 1.0;
	uint64_t out;

	cr_assert_eq(h.nbuckets, 2345);
	cr_assert_eq(h.nblocks, 37);
	cr_assert_eq(tally__hist_index(TALLY__HIST_DEFAULT_MAX), h.nbuckets - 1);
	tally__hist_add(&h, UINT64_MAX);
	tally__hist_add(&h, TALLY__HIST_DEFAULT_MAX + 1);
	tally__hist_add(&h, TALLY__HIST_DEFAULT_MAX);
	cr_assert_eq(h.clamped, 2);
	cr_assert_eq(h.count, 3);
	cr_assert_eq(tally__hist_bucket(&h, h.nbuckets - 1), 3);
	cr_assert_eq(h.max, TALLY__HIST_DEFAULT_MAX);
	cr_assert_eq(h.sum, 3 * TALLY__HIST_DEFAULT_MAX);
	cr_assert_eq(tally__hist_quantiles(&h, &q1, 1, &out), 0);
	cr_assert_eq(out, TALLY__HIST_DEFAULT_MAX);
	cr_assert_eq(tally__hist_init(&h, 0), -EINVAL);
	tally__hist_destroy(&h);
}

static void fill_random(struct tally__hist *h, uint64_t *s, int n)
{
	for (int k = 0; k < n; k++)
		tally__hist_add(h, rnd(s) >> (rnd(s) % 64));
}

static void assert_same(const struct tally__hist *a, const struct tally__hist *b)
{
	cr_assert_eq(a->count, b->count);
	cr_assert_eq(a->sum, b->sum);
	cr_assert_eq(a->clamped, b->clamped);
	cr_assert_eq(a->flags & ~(uint32_t)TALLY__HIST_BOUNDS_LOOSE,
		     b->flags & ~(uint32_t)TALLY__HIST_BOUNDS_LOOSE);
	for (uint32_t i = 0; i < a->nbuckets; i++)
		cr_assert_eq(tally__hist_bucket(a, i), tally__hist_bucket(b, i), "bucket %u", i);
	cr_assert_eq(memcmp(a->blocks, b->blocks, a->nblocks * 8), 0);
}

Test(hist, merge_sub_inverse)
{
	struct tally__hist a = mk(TALLY__HIST_DEFAULT_MAX);
	struct tally__hist b = mk(TALLY__HIST_DEFAULT_MAX);
	struct tally__hist c = mk(TALLY__HIST_DEFAULT_MAX);
	struct tally__hist_sparse sb = { 0 };
	uint64_t s = 7;

	fill_random(&a, &s, 5000);
	fill_random(&b, &s, 3000);
	tally__hist_merge(&c, &a);
	assert_same(&c, &a);
	cr_assert_eq(c.min, a.min);
	cr_assert_eq(c.max, a.max);
	tally__hist_merge(&c, &b);
	cr_assert_eq(c.count, 8000);
	tally__hist_sub(&c, &b);
	assert_same(&c, &a);
	/* sparse path */
	cr_assert_eq(tally__hist_sparse_from(&sb, &b), 0);
	cr_assert_eq(sb.len, tally__hist_nonzero(&b));
	tally__hist_merge_sparse(&c, &sb);
	tally__hist_sub(&c, &b);
	assert_same(&c, &a);
	tally__hist_merge(&c, &b);
	tally__hist_sub_sparse(&c, &sb);
	assert_same(&c, &a);
	/* down to empty: fully reset */
	tally__hist_sub(&c, &a);
	cr_assert_eq(c.count, 0);
	cr_assert_eq(c.min, UINT64_MAX);
	cr_assert_eq(c.max, 0);
	cr_assert_eq(tally__hist_nonzero(&c), 0);
	tally__hist_sparse_free(&sb);
	tally__hist_destroy(&a);
	tally__hist_destroy(&b);
	tally__hist_destroy(&c);
}

Test(hist, reset_empties)
{
	struct tally__hist a = mk(1000000);
	uint64_t s = 3, out;
	const double q = 0.5;

	fill_random(&a, &s, 1000);
	tally__hist_reset(&a);
	cr_assert_eq(tally__hist_nonzero(&a), 0);
	cr_assert_eq(a.count, 0);
	cr_assert_eq(tally__hist_quantiles(&a, &q, 1, &out), -ENODATA);
	for (uint32_t b = 0; b < a.nblocks; b++)
		cr_assert_eq(a.blocks[b], 0);
	tally__hist_destroy(&a);
}

static const double QS[] = { 0,    0.001, 0.01, 0.1,   0.25,   0.5, 0.75,
			     0.9,  0.95,  0.99, 0.999, 0.9999, 1.0 };
#define NQS (sizeof(QS) / sizeof(QS[0]))

/* Exact nearest-rank quantile of sorted data. */
static uint64_t oracle(const uint64_t *sorted, size_t n, double q)
{
	double r = ceil(q * (double)n);
	size_t rank = r < 1 ? 1 : (r > (double)n ? n : (size_t)r);

	return sorted[rank - 1];
}

/* Record data (clamped to max) in one histogram and, split, in two; check
 * every quantile against the oracle within |est - exact| <= exact / 128,
 * and cumulative counts at the default edges exactly. */
static void check_dist(uint64_t *v, size_t n, uint64_t max)
{
	struct tally__hist h = mk(max), p = mk(max), r = mk(max);
	const struct tally__hist *two[2] = { &p, &r };
	uint64_t est[NQS], est2[NQS], edges[TALLY__HIST_DEFAULT_NEDGES];
	uint64_t cum[TALLY__HIST_DEFAULT_NEDGES];
	size_t ne = tally__hist_default_edges(edges, TALLY__HIST_DEFAULT_NEDGES);

	for (size_t i = 0; i < n; i++) {
		tally__hist_add(&h, v[i]);
		tally__hist_add(i % 3 ? &p : &r, v[i]);
		v[i] = v[i] > max ? max : v[i];
	}
	qsort(v, n, sizeof(*v), cmp_u64);
	cr_assert_eq(tally__hist_quantiles(&h, QS, NQS, est), 0);
	cr_assert_eq(tally__hist_quantiles_n(two, 2, QS, NQS, est2), 0);
	for (size_t i = 0; i < NQS; i++) {
		uint64_t x = oracle(v, n, QS[i]);
		uint64_t err = est[i] > x ? est[i] - x : x - est[i];

		cr_assert_leq(err * 128, x, "q=%g est=%lu exact=%lu", QS[i],
			      est[i], x);
		cr_assert_eq(est2[i], est[i], "q=%g", QS[i]);
	}
	cr_assert_eq(est[0], v[0]);         /* q=0 is the exact min */
	cr_assert_eq(est[NQS - 1], v[n - 1]); /* q=1 is the exact max */
	cr_assert_eq(tally__hist_cumulative_le(&h, edges, ne, cum), 0);
	for (size_t i = 0, j = 0; i < ne; i++) {
		while (j < n && v[j] < edges[i])
			j++;
		cr_assert_eq(cum[i], j, "edge %lu", edges[i]);
	}
	tally__hist_destroy(&h);
	tally__hist_destroy(&p);
	tally__hist_destroy(&r);
}

#define N_DIST 200000

Test(hist, quantiles_uniform)
{
	uint64_t *v = malloc(N_DIST * sizeof(*v)), s = 11;

	for (size_t i = 0; i < N_DIST; i++)
		v[i] = rnd(&s) % 50000000; /* 0 .. 50 ms */
	check_dist(v, N_DIST, TALLY__HIST_DEFAULT_MAX);
	free(v);
}

Test(hist, quantiles_lognormal_with_zeros_and_clamped)
{
	uint64_t *v = malloc(N_DIST * sizeof(*v)), s = 12;

	for (size_t i = 0; i < N_DIST; i++) {
		double x = exp(log(200000.0) + 1.5 * rnd_normal(&s));

		v[i] = i % 97 == 0 ? 0 : (uint64_t)x;
		if (i % 499 == 0)
			v[i] = UINT64_MAX; /* clamped to max */
	}
	check_dist(v, N_DIST, TALLY__HIST_DEFAULT_MAX);
	free(v);
}

Test(hist, quantiles_bimodal)
{
	uint64_t *v = malloc(N_DIST * sizeof(*v)), s = 13;

	for (size_t i = 0; i < N_DIST; i++) {
		double mu = rnd(&s) % 10 < 8 ? 50000.0 : 20000000.0;
		double x = mu * (1.0 + 0.1 * rnd_normal(&s));

		v[i] = x < 0 ? 0 : (uint64_t)x;
	}
	check_dist(v, N_DIST, TALLY__HIST_DEFAULT_MAX);
	free(v);
}

Test(hist, quantiles_pareto_heavy_tail)
{
	uint64_t *v = malloc(N_DIST * sizeof(*v)), s = 14;

	for (size_t i = 0; i < N_DIST; i++) {
		double x = 1000.0 / pow(rnd_unit(&s), 1.0 / 1.1); /* alpha 1.1 */

		v[i] = x > 1e18 ? UINT64_C(1000000000000000000) : (uint64_t)x;
	}
	check_dist(v, N_DIST, TALLY__HIST_DEFAULT_MAX);
	free(v);
}

Test(hist, quantiles_small_and_constant)
{
	uint64_t *v = malloc(N_DIST * sizeof(*v)), s = 15;
	uint64_t c[] = { 0, 1, 127, 128, 129, 1000003, 999999999,
			 TALLY__HIST_DEFAULT_MAX };

	for (size_t i = 0; i < N_DIST; i++)
		v[i] = rnd(&s) % 130; /* exact region and its border */
	check_dist(v, N_DIST, TALLY__HIST_DEFAULT_MAX);
	for (size_t k = 0; k < sizeof(c) / sizeof(c[0]); k++) {
		struct tally__hist h = mk(TALLY__HIST_DEFAULT_MAX);
		uint64_t out[NQS];

		for (int i = 0; i < 1000; i++)
			tally__hist_add(&h, c[k]);
		cr_assert_eq(tally__hist_quantiles(&h, QS, NQS, out), 0);
		for (size_t i = 0; i < NQS; i++) /* constant data: exact */
			cr_assert_eq(out[i], c[k], "const %lu q=%g", c[k], QS[i]);
		tally__hist_destroy(&h);
	}
	for (size_t i = 0; i < 1000; i++)
		v[i] = rnd(&s) % 4000;
	check_dist(v, 1, TALLY__HIST_DEFAULT_MAX); /* a single value */
	check_dist(v, 1000, 3000);                /* a small max_value */
	free(v);
}

Test(hist, quantile_errors)
{
	struct tally__hist h = mk(TALLY__HIST_DEFAULT_MAX);
	const struct tally__hist *none[1] = { &h };
	const double bad[] = { 0.5, 0.4 }, nan_q[] = { (double)NAN }, big[] = { 1.5 };
	uint64_t out[2] = { 42, 42 }, edge = 1000000, half = 1 << 19;

	cr_assert_eq(tally__hist_quantiles(&h, QS, 2, out), -ENODATA);
	cr_assert_eq(out[0], 42); /* untouched: no fake zeros */
	cr_assert_eq(tally__hist_quantiles_n(none, 0, QS, 1, out), -EINVAL);
	tally__hist_add(&h, 5);
	cr_assert_eq(tally__hist_quantiles(&h, bad, 2, out), -EINVAL);
	cr_assert_eq(tally__hist_quantiles(&h, nan_q, 1, out), -EINVAL);
	cr_assert_eq(tally__hist_quantiles(&h, big, 1, out), -EINVAL);
	cr_assert_eq(tally__hist_cumulative_le(&h, &edge, 1, out), -EINVAL);
	cr_assert_eq(tally__hist_cumulative_le(&h, &half, 1, out), 0);
	cr_assert_eq(out[0], 1);
	edge = UINT64_MAX; /* above the range: everything */
	cr_assert_eq(tally__hist_cumulative_le(&h, &edge, 1, out), 0);
	cr_assert_eq(out[0], 1);
	tally__hist_destroy(&h);
}

Test(hist, bucket_exact_past_uint32)
{
	struct tally__hist h = mk(TALLY__HIST_DEFAULT_MAX);
	struct tally__hist_entry e = { tally__hist_index(5024), UINT32_MAX - 1 };
	struct tally__hist_sparse s = { .e = &e, .len = 1, .cap = 1,
					.count = UINT32_MAX - 1,
					.sum = (UINT32_MAX - 1) * UINT64_C(5024),
					.min = 5024, .max = 5024 };
	const double qs[] = { 0.5, 1.0 };
	uint64_t out[2];

	tally__hist_merge_sparse(&h, &s);
	cr_assert_eq(h.flags, 0);
	for (int i = 0; i < 3; i++)
		tally__hist_add(&h, 5024);
	/* 2^32 + 1 in one bucket: exact (a carry), not saturated */
	cr_assert_eq(tally__hist_bucket(&h, e.idx), UINT64_C(1) + UINT32_MAX + 1);
	cr_assert_eq(h.flags, 0);
	cr_assert_eq(h.count, UINT64_C(1) + UINT32_MAX + 1);
	cr_assert_eq(h.blocks[e.idx / 64], h.count);
	tally__hist_add(&h, 7000);
	cr_assert_eq(tally__hist_quantiles(&h, qs, 2, out), 0);
	cr_assert_eq(out[0], 5024);
	cr_assert_eq(out[1], 7000);
	tally__hist_sub_sparse(&h, &s);
	cr_assert_eq(h.count, 4);
	cr_assert_eq(tally__hist_bucket(&h, e.idx), 3);
	cr_assert_eq(h.ncarry, 0);
	cr_assert_eq(h.carry_blocks, 0);
	tally__hist_reset(&h);
	cr_assert_eq(tally__hist_bucket(&h, e.idx), 0);
	cr_assert_eq(h.flags, 0);
	tally__hist_destroy(&h);
}

/* A 16-bit counter at exactly 65,535 and 65,536: the carry. */
Test(hist, counter_carry_at_65535_and_65536)
{
	struct tally__hist h = mk(TALLY__HIST_DEFAULT_MAX), g = mk(TALLY__HIST_DEFAULT_MAX);
	uint32_t i = tally__hist_index(300000), j = tally__hist_index(310000);
	const double qs[] = { 0.0, 0.5, 1.0 };
	uint64_t out[3];

	for (int k = 0; k < 65535; k++)
		tally__hist_add(&h, 300000);
	cr_assert_eq(h.counts[i], 65535);
	cr_assert_eq(h.ncarry, 0);
	cr_assert_eq(tally__hist_bucket(&h, i), 65535);
	tally__hist_add(&h, 300000); /* 65,536: the counter wraps into the carry */
	cr_assert_eq(h.counts[i], 0);
	cr_assert_eq(h.ncarry, 1);
	cr_assert_neq(h.carry_blocks & (UINT64_C(1) << (i / 64)), 0);
	cr_assert_eq(tally__hist_bucket(&h, i), 65536);
	cr_assert_eq(tally__hist_nonzero(&h), 1);
	cr_assert_eq(h.flags, 0);
	/* one more value just above in the same block: quantiles see both */
	tally__hist_add(&h, 310000);
	cr_assert_eq(tally__hist_quantiles(&h, qs, 3, out), 0);
	cr_assert_eq(out[0], 300000);
	cr_assert_leq(absdiff(out[1], 300000) * 128, 300000);
	cr_assert_eq(out[2], 310000);
	/* merge carries too: 65,536 + 65,535 + 1 */
	for (int k = 0; k < 65535; k++)
		tally__hist_add(&g, 300000);
	tally__hist_add(&g, 310000);
	tally__hist_merge(&h, &g);
	cr_assert_eq(tally__hist_bucket(&h, i), 131071);
	cr_assert_eq(tally__hist_bucket(&h, j), 2);
	cr_assert_eq(h.blocks[i / 64], 131073);
	/* packed and back, counts beyond 16 bits included */
	size_t n = tally__hist_packed_size(&h);
	uint8_t *buf = malloc(n);
	cr_assert_eq(tally__hist_pack(&h, buf), n);
	tally__hist_sub_packed(&h, buf, n);
	cr_assert_eq(h.count, 0);
	cr_assert_eq(h.ncarry, 0);
	cr_assert_eq(h.carry_blocks, 0);
	tally__hist_merge_packed(&h, buf, n);
	cr_assert_eq(tally__hist_bucket(&h, i), 131071);
	/* down across the boundary: 131,071 - 65,536 = 65,535, no carry left */
	tally__hist_reset(&g);
	for (int k = 0; k < 65536; k++)
		tally__hist_add(&g, 300000);
	tally__hist_sub(&h, &g);
	cr_assert_eq(tally__hist_bucket(&h, i), 65535);
	cr_assert_eq(h.counts[i], 65535);
	cr_assert_eq(h.ncarry, 0);
	cr_assert_eq(h.carry_blocks, 0);
	free(buf);
	tally__hist_destroy(&h);
	tally__hist_destroy(&g);
}

static bool fail_carry(const char *point)
{
	return strcmp(point, "hist.carry") == 0;
}

/* No memory for a carry: the bucket saturates (flagged), never wraps. */
Test(hist, bucket_saturates_without_memory)
{
	struct tally__hist h = mk(TALLY__HIST_DEFAULT_MAX);
	uint32_t i = tally__hist_index(5024);
	const double qs[] = { 0.5, 1.0 };
	uint64_t out[2];

	tally__hist_nomem_hook = fail_carry;
	for (int k = 0; k < 65537; k++)
		tally__hist_add(&h, 5024);
	tally__hist_nomem_hook = NULL;
	cr_assert_eq(h.counts[i], UINT16_MAX);
	cr_assert(h.flags & TALLY__HIST_BUCKET_SATURATED);
	cr_assert_eq(h.count, 65537);
	cr_assert_eq(h.blocks[i / 64], h.count); /* subtotal stays exact */
	tally__hist_add(&h, 7000); /* same block: q=1 takes the fallback */
	cr_assert_eq(tally__hist_quantiles(&h, qs, 2, out), 0);
	cr_assert_eq(out[0], 5024);
	cr_assert_eq(out[1], 7000);
	tally__hist_reset(&h);
	cr_assert_eq(h.counts[i], 0);
	cr_assert_eq(h.flags, 0);
	tally__hist_destroy(&h);
}

/* Packed form: every bucket and summary back exactly, in few bytes. */
Test(hist, packed_round_trip)
{
	struct tally__hist a = mk(TALLY__HIST_DEFAULT_MAX), b = mk(TALLY__HIST_DEFAULT_MAX);
	struct tally__hist_packed_info in;
	uint64_t s = 21;

	for (int round = 0; round < 20; round++) {
		fill_random(&a, &s, (int)(rnd(&s) % 5000) + 1);
		size_t n = tally__hist_packed_size(&a);
		uint8_t *buf = malloc(n);

		cr_assert_eq(tally__hist_pack(&a, buf), n);
		tally__hist_packed_info(buf, n, &in);
		cr_assert_eq(in.count, a.count);
		cr_assert_eq(in.sum, a.sum);
		cr_assert_eq(in.min, a.min);
		cr_assert_eq(in.max, a.max);
		tally__hist_merge_packed(&b, buf, n);
		assert_same(&b, &a);
		cr_assert_eq(b.min, a.min);
		cr_assert_eq(b.max, a.max);
		tally__hist_sub_packed(&b, buf, n);
		cr_assert_eq(b.count, 0);
		cr_assert_eq(tally__hist_nonzero(&b), 0);
		free(buf);
		tally__hist_reset(&a);
	}
	/* 1,000 log-normal values: a few bits per nonzero bucket */
	for (int k = 0; k < 1000; k++)
		tally__hist_add(&a, (uint64_t)exp(log(200000.0) + 1.2 * rnd_normal(&s)));
	cr_assert_lt(tally__hist_packed_size(&a), tally__hist_nonzero(&a));
	tally__hist_destroy(&a);
	tally__hist_destroy(&b);
}

Test(hist, release_and_wake)
{
	struct tally__hist h = mk(TALLY__HIST_DEFAULT_MAX), g = mk(TALLY__HIST_DEFAULT_MAX);
	const struct tally__hist *two[2] = { &h, &g };
	const double q = 0.5;
	uint64_t out, edge = 1024;

	tally__hist_release(&h);
	cr_assert_null(h.counts);
	cr_assert_eq(h.nbuckets, 2345);
	/* a released histogram reads as empty everywhere */
	cr_assert_eq(tally__hist_quantiles(&h, &q, 1, &out), -ENODATA);
	cr_assert_eq(tally__hist_nonzero(&h), 0);
	cr_assert_eq(tally__hist_cumulative_le(&h, &edge, 1, &out), 0);
	cr_assert_eq(out, 0);
	tally__hist_add(&g, 100);
	cr_assert_eq(tally__hist_quantiles_n(two, 2, &q, 1, &out), 0);
	cr_assert_eq(out, 100);
	tally__hist_merge(&g, &h); /* merging an empty one: nothing */
	tally__hist_reset(&h);
	cr_assert_eq(tally__hist_wake(&h), 0);
	cr_assert_not_null(h.counts);
	tally__hist_merge(&h, &g);
	cr_assert_eq(tally__hist_bucket(&h, 100), 1);
	tally__hist_destroy(&h);
	tally__hist_destroy(&g);
}

Test(hist, sum_saturates)
{
	struct tally__hist h = mk(UINT64_MAX), g = mk(UINT64_MAX);

	tally__hist_add(&h, UINT64_MAX - 1);
	cr_assert_eq(h.flags, 0);
	tally__hist_add(&h, 2);
	cr_assert_eq(h.sum, UINT64_MAX);
	cr_assert(h.flags & TALLY__HIST_SUM_SATURATED);
	tally__hist_add(&g, 1);
	tally__hist_merge(&h, &g);
	cr_assert_eq(h.sum, UINT64_MAX);
	tally__hist_sub(&h, &g); /* stays saturated: a lower bound */
	cr_assert_eq(h.sum, UINT64_MAX);
	cr_assert_eq(h.count, 2);
	tally__hist_destroy(&h);
	tally__hist_destroy(&g);
}

Test(hist, loose_bounds_after_sub)
{
	struct tally__hist a = mk(TALLY__HIST_DEFAULT_MAX);
	struct tally__hist b = mk(TALLY__HIST_DEFAULT_MAX);
	const double q[] = { 0.0, 1.0 };
	uint64_t out[2];

	/* stale max: a = {10, 1e6} remembering max 3e6 */
	tally__hist_add(&a, 10);
	tally__hist_add(&a, 1000000);
	tally__hist_add(&a, 3000000);
	tally__hist_add(&b, 3000000);
	tally__hist_sub(&a, &b);
	cr_assert(a.flags & TALLY__HIST_BOUNDS_LOOSE);
	cr_assert_eq(a.max, 3000000);
	cr_assert_eq(tally__hist_quantiles(&a, q, 2, out), 0);
	cr_assert_eq(out[0], 10);
	cr_assert_leq(absdiff(out[1], 1000000) * 128, 1000000, "%lu", out[1]);
	tally__hist_set_bounds(&a, 10, 1000000);
	cr_assert_eq(a.flags & TALLY__HIST_BOUNDS_LOOSE, 0);
	cr_assert_eq(tally__hist_quantiles(&a, q, 2, out), 0);
	cr_assert_eq(out[1], 1000000);
	/* stale min: a = {1e6} remembering min 10 */
	tally__hist_reset(&b);
	tally__hist_add(&b, 10);
	tally__hist_sub(&a, &b);
	cr_assert_eq(a.min, 10);
	cr_assert_eq(tally__hist_quantiles(&a, q, 2, out), 0);
	cr_assert_leq(absdiff(out[0], 1000000) * 128, 1000000, "%lu", out[0]);
	cr_assert_eq(out[1], 1000000); /* clamped to max */
	tally__hist_destroy(&a);
	tally__hist_destroy(&b);
}

/* A merged window (drain_threads) sums several histograms, some empty
 * (dense, released, reset): the walk leaves those out,
 * and what it answers must be what the sum of the others answers, with
 * three or more summed (the loop for more than two) and with one. */
Test(hist, quantiles_of_several_with_empty_ones)
{
	struct tally__hist h = mk(TALLY__HIST_DEFAULT_MAX), p = mk(TALLY__HIST_DEFAULT_MAX);
	struct tally__hist r = mk(TALLY__HIST_DEFAULT_MAX), t = mk(TALLY__HIST_DEFAULT_MAX);
	struct tally__hist e1 = mk(TALLY__HIST_DEFAULT_MAX), e2 = mk(TALLY__HIST_DEFAULT_MAX);
	struct tally__hist e3 = mk(TALLY__HIST_DEFAULT_MAX);
	const struct tally__hist *six[6] = { &e1, &p, &e2, &r, &e3, &t }, *one[3] = { &e1, &p, &e2 };
	uint64_t edges[TALLY__HIST_DEFAULT_NEDGES], c1[TALLY__HIST_DEFAULT_NEDGES], c6[TALLY__HIST_DEFAULT_NEDGES];
	size_t ne = tally__hist_default_edges(edges, TALLY__HIST_DEFAULT_NEDGES);
	uint64_t est[NQS], got[NQS], s = 7;

	tally__hist_release(&e2);
	tally__hist_add(&e3, 5000);
	tally__hist_reset(&e3); /* storage that held a value, empty again */
	for (int i = 0; i < 100000; i++) {
		uint64_t v = (uint64_t)(exp(10.0 + 2.0 * rnd_normal(&s)));
		tally__hist_add(&h, v);
		tally__hist_add(i % 3 == 0 ? &p : i % 3 == 1 ? &r : &t, v);
	}
	cr_assert_eq(tally__hist_quantiles(&h, QS, NQS, est), 0);
	cr_assert_eq(tally__hist_quantiles_n(six, 6, QS, NQS, got), 0);
	for (size_t i = 0; i < NQS; i++)
		cr_assert_eq(got[i], est[i], "q=%g: %lu, the sum alone %lu", QS[i], got[i], est[i]);
	cr_assert_eq(tally__hist_cumulative_le(&h, edges, ne, c1), 0);
	cr_assert_eq(tally__hist_cumulative_le_n(six, 6, edges, ne, c6), 0);
	cr_assert_arr_eq(c6, c1, ne * sizeof(c1[0]));
	/* one summed, two empty: the same as it alone */
	cr_assert_eq(tally__hist_quantiles(&p, QS, NQS, est), 0);
	cr_assert_eq(tally__hist_quantiles_n(one, 3, QS, NQS, got), 0);
	cr_assert_arr_eq(got, est, sizeof(est));
	/* all empty: no data, and counts of 0 */
	const struct tally__hist *none[3] = { &e1, &e2, &e3 };
	cr_assert_eq(tally__hist_quantiles_n(none, 3, QS, NQS, got), -ENODATA);
	cr_assert_eq(tally__hist_cumulative_le_n(none, 3, edges, ne, c6), 0);
	for (size_t i = 0; i < ne; i++)
		cr_assert_eq(c6[i], 0);
	struct tally__hist *all[7] = { &h, &p, &r, &t, &e1, &e2, &e3 };
	for (int i = 0; i < 7; i++)
		tally__hist_destroy(all[i]);
}

Test(hist, nearest_rank_definition)
{
	struct tally__hist h = mk(TALLY__HIST_DEFAULT_MAX);
	/* rank = ceil(q * 10), at least 1 */
	const double q[] = { 0.0, 0.1, 0.15, 0.5, 0.51, 0.9, 0.95, 1.0 };
	const uint64_t rank[] = { 1, 1, 2, 5, 6, 9, 10, 10 };
	uint64_t out[8];

	for (uint64_t i = 1; i <= 10; i++)
		tally__hist_add(&h, 1000 * i);
	cr_assert_eq(tally__hist_quantiles(&h, q, 8, out), 0);
	for (int i = 0; i < 8; i++) {
		uint64_t x = 1000 * rank[i];

		cr_assert_leq((out[i] > x ? out[i] - x : x - out[i]) * 128, x,
			      "q=%g got %lu want %lu", q[i], out[i], x);
	}
	tally__hist_destroy(&h);
}

/* The lazy add (the window's hot path) against the plain one, value for
 * value: same buckets, same summary, subtotals equal through
 * tally__hist_block(), same quantiles, cumulative counts and packed bytes;
 * and a merge of each into a third gives the same result. */
static void assert_lazy_same(const struct tally__hist *lazy, const struct tally__hist *plain)
{
	static const uint64_t edges[] = { 1024, 4096, 65536, UINT64_C(1) << 20, UINT64_C(1) << 30 };
	uint64_t ql[NQS], qp[NQS], cl[5], cp[5];
	size_t nl = tally__hist_packed_size(lazy), np = tally__hist_packed_size(plain);
	uint8_t *bl = malloc(nl), *bp = malloc(np);

	cr_assert_eq(lazy->count, plain->count);
	cr_assert_eq(lazy->sum, plain->sum);
	cr_assert_eq(lazy->min, plain->min);
	cr_assert_eq(lazy->max, plain->max);
	cr_assert_eq(lazy->clamped, plain->clamped);
	cr_assert_eq(lazy->flags, plain->flags);
	for (uint32_t i = 0; i < plain->nbuckets; i++)
		cr_assert_eq(tally__hist_bucket(lazy, i), tally__hist_bucket(plain, i), "bucket %u", i);
	for (uint32_t b = 0; b < plain->nblocks; b++)
		cr_assert_eq(tally__hist_block(lazy, b), plain->blocks[b], "block %u", b);
	cr_assert_eq(tally__hist_quantiles(lazy, QS, NQS, ql), tally__hist_quantiles(plain, QS, NQS, qp));
	cr_assert_eq(memcmp(ql, qp, sizeof(ql)), 0);
	cr_assert_eq(tally__hist_cumulative_le(lazy, edges, 5, cl), 0);
	cr_assert_eq(tally__hist_cumulative_le(plain, edges, 5, cp), 0);
	cr_assert_eq(memcmp(cl, cp, sizeof(cl)), 0);
	cr_assert_eq(nl, np);
	cr_assert_eq(tally__hist_pack(lazy, bl), nl);
	cr_assert_eq(tally__hist_pack(plain, bp), np);
	cr_assert_eq(memcmp(bl, bp, nl), 0);
	free(bl);
	free(bp);
}

Test(hist, lazy_add_equals_add)
{
	struct tally__hist l = mk(TALLY__HIST_DEFAULT_MAX), p = mk(TALLY__HIST_DEFAULT_MAX);
	struct tally__hist m = mk(TALLY__HIST_DEFAULT_MAX), n = mk(TALLY__HIST_DEFAULT_MAX);
	uint64_t s = 11;

	for (int k = 0; k < 20000; k++) {
		uint64_t v = rnd(&s) >> (rnd(&s) % 64);

		tally__hist_add_lazy(&l, v);
		tally__hist_add(&p, v);
	}
	cr_assert_neq(l.stale, 0);
	assert_lazy_same(&l, &p);
	/* a counter past 65,535 on the lazy path: the carry, still exact */
	for (int k = 0; k < 150000; k++) {
		tally__hist_add_lazy(&l, 300000 + (uint64_t)(k & 1) * 6000);
		tally__hist_add(&p, 300000 + (uint64_t)(k & 1) * 6000);
	}
	cr_assert_gt(l.ncarry, 0);
	assert_lazy_same(&l, &p);
	/* merged into a third, and subtracted again: as the plain one */
	tally__hist_merge(&m, &l);
	tally__hist_merge(&n, &p);
	assert_same(&m, &n);
	tally__hist_add_lazy(&m, 777);
	tally__hist_add(&n, 777);
	tally__hist_sub(&m, &l); /* settles m's stale block first */
	tally__hist_sub(&n, &p);
	cr_assert_eq(m.stale, 0);
	assert_same(&m, &n);
	/* reset clears stale blocks too */
	tally__hist_reset(&l);
	cr_assert_eq(l.stale, 0);
	cr_assert_eq(tally__hist_nonzero(&l), 0);
	for (uint32_t i = 0; i < l.nbuckets; i++)
		cr_assert_eq(l.counts[i], 0);
	tally__hist_destroy(&l);
	tally__hist_destroy(&p);
	tally__hist_destroy(&m);
	tally__hist_destroy(&n);
}

/* No memory for a carry on the lazy path: the bucket saturates, and its
 * block's subtotal (never stale from then on) stays exact. */
Test(hist, lazy_add_saturates_exactly)
{
	struct tally__hist l = mk(TALLY__HIST_DEFAULT_MAX), p = mk(TALLY__HIST_DEFAULT_MAX);
	uint32_t i = tally__hist_index(5024);

	for (int k = 0; k < 100; k++) {
		tally__hist_add_lazy(&l, 5000 + (uint64_t)k);
		tally__hist_add(&p, 5000 + (uint64_t)k);
	}
	tally__hist_nomem_hook = fail_carry;
	for (int k = 0; k < 65537; k++) {
		tally__hist_add_lazy(&l, 5024);
		tally__hist_add(&p, 5024);
	}
	tally__hist_nomem_hook = NULL;
	cr_assert(l.flags & TALLY__HIST_BUCKET_SATURATED);
	cr_assert_eq(l.counts[i], UINT16_MAX);
	cr_assert_eq(l.stale, 0);
	for (int k = 0; k < 100; k++) { /* same block and others, after it */
		tally__hist_add_lazy(&l, 5100 + (uint64_t)k * 50);
		tally__hist_add(&p, 5100 + (uint64_t)k * 50);
	}
	cr_assert_eq(l.stale, 0);
	cr_assert_eq(tally__hist_block(&l, i / 64), p.blocks[i / 64]);
	assert_lazy_same(&l, &p);
	tally__hist_destroy(&l);
	tally__hist_destroy(&p);
}

static bool fail_arena(const char *point)
{
	return strcmp(point, "hist.arena") == 0;
}

/* Storage comes from the huge-page arena (lib/arena.h), 64-byte aligned,
 * in 2 MiB chunks that are unmapped once every histogram in them is gone;
 * without the arena, from malloc, and the histogram works the same. */
Test(hist, storage_in_arena_given_back)
{
	enum { N = 1000 }; /* more than two chunks' worth */
	struct tally__hist *h = calloc(N, sizeof(*h));
	struct tally__hist m = { 0 };
	const double q = 0.5;
	uint64_t out;

	cr_assert_eq(tally__arena_bytes(), 0);
	for (int k = 0; k < N; k++) {
		cr_assert_eq(tally__hist_init(&h[k], TALLY__HIST_DEFAULT_MAX), 0);
		cr_assert(h[k].in_arena);
		cr_assert_eq((uintptr_t)h[k].blocks % 64, 0);
		tally__hist_add_lazy(&h[k], 1000u + (uint64_t)k);
	}
	cr_assert_geq(tally__arena_bytes(), 3 * TALLY__ARENA_CHUNK);
	/* every other one asleep and awake again: reused objects come back zeroed */
	for (int k = 0; k < N; k += 2) {
		tally__hist_reset(&h[k]);
		tally__hist_release(&h[k]);
	}
	for (int k = 0; k < N; k += 2) {
		cr_assert_eq(tally__hist_wake(&h[k]), 0);
		cr_assert_eq(tally__hist_nonzero(&h[k]), 0);
		for (uint32_t i = 0; i < h[k].nbuckets; i++)
			cr_assert_eq(h[k].counts[i], 0);
	}
	for (int k = 1; k < N; k += 2)
		cr_assert_eq(tally__hist_bucket(&h[k], tally__hist_index(1000u + (uint64_t)k)), 1);
	for (int k = 0; k < N; k++)
		tally__hist_destroy(&h[k]);
	cr_assert_eq(tally__arena_bytes(), 0);
	/* no arena: malloc */
	tally__hist_nomem_hook = fail_arena;
	cr_assert_eq(tally__hist_init(&m, TALLY__HIST_DEFAULT_MAX), 0);
	tally__hist_nomem_hook = NULL;
	cr_assert(!m.in_arena);
	cr_assert_eq(tally__arena_bytes(), 0);
	tally__hist_add_lazy(&m, 5000);
	cr_assert_eq(tally__hist_quantiles(&m, &q, 1, &out), 0);
	cr_assert_eq(out, 5000);
	tally__hist_destroy(&m);
	free(h);
}
