/* SPDX-License-Identifier: MIT */
/*
 * test_lazy_advance.c: the engine's slice close in steps (issue 18). When
 * the clock enters a new slice, the aggregator walks its subjects to
 * close the old slice in each, draining the rings between steps; a
 * sample drained for a subject the walk has not reached yet closes that
 * subject's slice first. Two thread-less engines (engine_priv.h) get the
 * same samples at the same synthetic times: one walks every subject
 * before each drain, the other drains with no subject walked (the lazy
 * path alone); what they publish must be the same, field by field,
 * export buckets included (each closed slice folded exactly once).
 * Then a subject idle for a whole window: its window sleeps (window.h),
 * wakes on the next sample, and a wake without memory (injected through
 * tally__hist_nomem_hook) is counted in values_lost.
 * test_lazy_advance_drain2 is this file built with TT_DRAIN_THREADS 2:
 * the lazy side then has two drain threads (run in turn by the caller),
 * each taking one of its two producers' slots, and what it publishes
 * (their windows and export buckets merged) must still be the same as
 * the one-thread walking side's.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "common/helpers.h"
#include "engine_priv.h"
#include "hist.h"

#ifndef TT_DRAIN_THREADS
#define TT_DRAIN_THREADS 1
#endif

#define LA_SUBJECTS 12u
#define LA_ROUNDS 300
#define SLICE_NS UINT64_C(10000000) /* 10 ms, synthetic */

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

struct side {
	struct tally_segment *seg;
	struct tally_engine *e;
	struct tally_producer *p[2]; /* two slots, side by side: drain threads 0 and 1 */
	tally_subject_t ids[LA_SUBJECTS];
};

static void side_open(struct side *x, uint32_t drain_threads)
{
	struct tally_segment_config cfg;
	struct tally_engine_config ecfg;

	tt_config(&cfg);
	cfg.ring_capacity = 1u << 12;
	cr_assert_eq(tally_segment_create(tt_segname("lazy"), &cfg, 0, &x->seg), 0, "%s", tally_errmsg());
	tally_engine_config_init(&ecfg);
	ecfg.slice_ns = SLICE_NS;
	ecfg.window_ns = 5 * SLICE_NS;
	ecfg.drain_threads = drain_threads;
	cr_assert_eq(tally__engine_new(x->seg, &ecfg, &x->e), 0, "%s", tally_errmsg());
	for (int k = 0; k < 2; k++)
		cr_assert_eq(tally_producer_attach(x->seg, &x->p[k]), 0, "%s", tally_errmsg());
	for (uint32_t i = 0; i < LA_SUBJECTS; i++) {
		char name[32];
		snprintf(name, sizeof(name), "lazy.s%u", i);
		cr_assert_eq(tally_subject_intern(x->seg, name, &x->ids[i]), 0, "%s", tally_errmsg());
	}
}

static void side_close(struct side *x)
{
	tally_producer_detach(&x->p[0]);
	tally_producer_detach(&x->p[1]);
	tally__engine_free(&x->e);
	tally_segment_close(&x->seg);
}

Test(lazy_advance, same_as_walking_every_subject_first)
{
	struct side walk, lazy;
	uint64_t seed = 0x2545f4914f6cdd1dull, now = 1000 * SLICE_NS;
	int published = 0;

	side_open(&walk, 1);
	side_open(&lazy, TT_DRAIN_THREADS);
	for (int round = 0; round < LA_ROUNDS; round++) {
		uint64_t r = rnd(&seed);
		/* time moves by 0 .. 2.5 slices, now and then by a whole window */
		now += r % 16 == 0 ? 6 * SLICE_NS : (r >> 8) % (5 * SLICE_NS / 2);
		uint32_t n = (uint32_t)((r >> 24) % 40);
		for (uint32_t k = 0; k < n; k++) {
			uint64_t q = rnd(&seed);
			uint32_t s = (uint32_t)(q % (LA_SUBJECTS / (round % 3 + 1))); /* some subjects go idle */
			uint64_t v = 1000 + (q >> 16) % 5000000;
			cr_assert(tally_record(walk.p[k & 1], walk.ids[s], v));
			cr_assert(tally_record(lazy.p[k & 1], lazy.ids[s], v));
		}
		cr_assert_eq(tally__engine_ingest(walk.e, now), n);
		cr_assert_eq(tally__engine_ingest_lazy(lazy.e, now), n);
		if (r % 4 != 0)
			continue;
		tally__engine_publish(walk.e, now);
		tally__engine_publish(lazy.e, now);
		published++;
		for (uint32_t i = 0; i < LA_SUBJECTS; i++) {
			struct tally_subject_stats a, b;
			struct tally_subject_buckets ba, bb;
			int ra = tally_engine_read(walk.e, walk.ids[i], &a);
			cr_assert_eq(tally_engine_read(lazy.e, lazy.ids[i], &b), ra, "round %d: subject %u", round, i);
			if (ra != 0)
				continue;
			cr_assert_eq(a.count, b.count, "round %d, subject %u: count %llu walked, %llu lazy", round, i,
				     (unsigned long long)a.count, (unsigned long long)b.count);
			cr_assert_eq(a.total_count, b.total_count, "round %d, subject %u: total", round, i);
			cr_assert_eq(a.sum, b.sum, "round %d, subject %u: sum", round, i);
			cr_assert_eq(a.min_ns, b.min_ns, "round %d, subject %u: min", round, i);
			cr_assert_eq(a.max_ns, b.max_ns, "round %d, subject %u: max", round, i);
			cr_assert_eq(a.p50_ns, b.p50_ns, "round %d, subject %u: p50", round, i);
			cr_assert_eq(a.p99_ns, b.p99_ns, "round %d, subject %u: p99", round, i);
			cr_assert_eq(a.p999_ns, b.p999_ns, "round %d, subject %u: p99.9", round, i);
			cr_assert_eq(tally_engine_read_buckets(walk.e, walk.ids[i], &ba), 0);
			cr_assert_eq(tally_engine_read_buckets(lazy.e, lazy.ids[i], &bb), 0);
			cr_assert_eq(ba.count, bb.count, "round %d, subject %u: export count %llu walked, %llu lazy",
				     round, i, (unsigned long long)ba.count, (unsigned long long)bb.count);
			cr_assert_eq(ba.sum_ns, bb.sum_ns, "round %d, subject %u: export sum", round, i);
			cr_assert_eq(ba.n, bb.n);
			for (uint32_t k = 0; k < ba.n; k++)
				cr_assert_eq(ba.cumulative[k], bb.cumulative[k], "round %d, subject %u: bucket %u", round,
					     i, k);
		}
	}
	cr_expect_gt(published, 20);
	side_close(&walk);
	side_close(&lazy);
}

static bool fail_wake(const char *point)
{
	return strcmp(point, "hist.wake") == 0;
}

/* A subject idle for a whole window gives its window's memory back; its
 * next samples wake it. When that wake finds no memory (injected), the
 * samples are drained but lost, and counted (values_lost), never silent. */
Test(lazy_advance, idle_subject_sleeps_and_a_failed_wake_is_counted)
{
	struct side x;
	struct tally_subject_stats st;
	struct tally_engine_counters c;
	uint64_t now = 1000 * SLICE_NS + 1;

	side_open(&x, TT_DRAIN_THREADS);
	for (int k = 0; k < 10; k++)
		cr_assert(tally_record(x.p[0], x.ids[0], 5000));
	cr_assert_eq(tally__engine_ingest(x.e, now), 10);
	tally__engine_publish(x.e, now);
	cr_assert_eq(tally_engine_read(x.e, x.ids[0], &st), 0);
	cr_assert_eq(st.count, 10);
	for (int k = 1; k <= 6; k++) /* a whole window (5 slices) and one more, slice by slice */
		tally__engine_ingest(x.e, now + (uint64_t)k * SLICE_NS);
	now += 6 * SLICE_NS;
	tally__engine_publish(x.e, now);
	cr_assert_eq(tally_engine_read(x.e, x.ids[0], &st), 0);
	cr_assert_eq(st.count, 0);
	cr_assert_eq(st.total_count, 10);
	/* asleep: the wake fails for want of memory */
	tally__hist_nomem_hook = fail_wake;
	for (int k = 0; k < 3; k++)
		cr_assert(tally_record(x.p[0], x.ids[0], 7000));
	cr_assert_eq(tally__engine_ingest(x.e, now), 3);
	tally__hist_nomem_hook = NULL;
	tally_engine_counters(x.e, &c);
	cr_assert_eq(c.values_lost, 3);
	cr_assert_eq(c.rejected, 0);
	tally__engine_publish(x.e, now);
	cr_assert_eq(tally_engine_read(x.e, x.ids[0], &st), 0);
	cr_assert_eq(st.count, 0);
	/* memory again: the next samples wake it and count */
	for (int k = 0; k < 2; k++)
		cr_assert(tally_record(x.p[0], x.ids[0], 9000));
	cr_assert_eq(tally__engine_ingest(x.e, now), 2);
	tally__engine_publish(x.e, now);
	cr_assert_eq(tally_engine_read(x.e, x.ids[0], &st), 0);
	cr_assert_eq(st.count, 2);
	cr_assert_eq(st.min_ns, 9000);
	cr_assert_eq(st.total_count, 12);
	tally_engine_counters(x.e, &c);
	cr_assert_eq(c.values_lost, 3);
	side_close(&x);
}
