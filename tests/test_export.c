/* SPDX-License-Identifier: MIT */
/*
 * test_export.c: a subject's since-start export buckets (the cumulative
 * histogram /metrics shows) packed while the subject sleeps (lib/export.h,
 * issue 18). First the packed form itself: every array packs and unpacks
 * exactly, whatever its values. Then a thread-less engine (engine_priv.h)
 * whose subjects sleep and wake many times, with a few always busy:
 * after every publish, tally_engine_read_buckets must equal a reference
 * the test keeps itself (each value of a closed slice counted once below
 * every edge above it), whether the subject's buckets are dense, packed,
 * shown by the published block or freed with it. Then the failures: no
 * memory to pack (the buckets stay dense) and no memory to unpack at a
 * wake or to store the closing slice, for a few tries or through whole
 * publishes (the slice stays open, the publish reads the window without
 * closing it, and it is folded once, later): nothing lost, nothing
 * counted twice. test_export_drain2 is this file built with
 * TT_DRAIN_THREADS 2 (two drain threads, each with its own parts' packs,
 * merged at publish).
 */
#include "config.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "common/helpers.h"
#include "engine_priv.h"
#include "export.h"
#include "hist.h"

#ifndef TT_DRAIN_THREADS
#define TT_DRAIN_THREADS 1
#endif

#define SLICE_NS UINT64_C(10000000) /* 10 ms, synthetic */
#define WINDOW_SLICES 4u
#define NSUBJ 6u

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/* pack, check the length, unpack into zeros and into something */
static void roundtrip(const uint64_t *le, uint32_t n, uint64_t count, uint64_t sum)
{
	uint8_t buf[TALLY__EXPORT_PACKED_MAX(TALLY__HIST_DEFAULT_NEDGES)];
	uint64_t back[TALLY__HIST_DEFAULT_NEDGES], c = 0, s = 0;

	cr_assert_leq(n, TALLY__HIST_DEFAULT_NEDGES);
	size_t len = tally__export_packed_len(le, n, count, sum);
	cr_assert_leq(len, TALLY__EXPORT_PACKED_MAX(n));
	cr_assert_eq((size_t)(tally__export_put(buf, le, n, count, sum) - buf), len);
	memset(back, 0, sizeof(back));
	tally__export_add(buf, (uint32_t)len, back, n, &c, &s);
	for (uint32_t k = 0; k < n; k++)
		cr_assert_eq(back[k], le[k], "edge %u of %u: %llu, packed %llu", k, n, (unsigned long long)back[k],
			     (unsigned long long)le[k]);
	cr_assert_eq(c, count);
	cr_assert_eq(s, sum);
	/* adds: a second time doubles (modulo 2^64), the sum saturates */
	tally__export_add(buf, (uint32_t)len, back, n, &c, &s);
	for (uint32_t k = 0; k < n; k++)
		cr_assert_eq(back[k], le[k] * 2, "edge %u added twice", k);
	cr_assert_eq(c, count * 2);
	cr_assert_eq(s, sum > UINT64_MAX / 2 ? UINT64_MAX : sum * 2);

	struct tally__export_pack *pk = tally__export_pack_new(le, n, count, sum);
	cr_assert_not_null(pk);
	cr_assert_eq(pk->len, len);
	cr_assert(!pk->shown);
	cr_assert_eq(memcmp(pk->bytes, buf, len), 0);
	free(pk);
}

Test(export, packs_and_unpacks_every_array_exactly)
{
	uint64_t le[TALLY__HIST_DEFAULT_NEDGES], seed = 0x9e3779b97f4a7c15ull;
	const uint32_t n = TALLY__HIST_DEFAULT_NEDGES;

	memset(le, 0, sizeof(le));
	roundtrip(le, n, 0, 0); /* all zero: count and sum alone */
	cr_assert_eq(tally__export_packed_len(le, n, 0, 0), 2);
	roundtrip(le, 0, 5, 7); /* no edges */
	for (uint32_t k = 0; k < n; k++)
		le[k] = 1000;
	roundtrip(le, n, 1000, 123456789); /* every value below the first edge */
	cr_assert_eq(tally__export_packed_len(le, n, 1000, 1), 2 + 1 + 1 + 2, "one difference, at edge 0");
	le[n - 1] = 1001;
	roundtrip(le, n, 1001, 1); /* one value in the last bucket */
	for (uint32_t k = 0; k < n; k++)
		le[k] = UINT64_MAX - (n - 1 - k);
	roundtrip(le, n, UINT64_MAX, UINT64_MAX); /* the largest values */
	for (int r = 0; r < 2000; r++) {
		uint64_t run = 0, q = rnd(&seed);
		uint32_t m = (uint32_t)(q % (n + 1));
		for (uint32_t k = 0; k < m; k++) {
			uint64_t x = rnd(&seed);
			/* mostly flat, now and then a step of any size */
			run += x % 4 == 0 ? (x >> 2) >> (x % 61) : 0;
			le[k] = r % 7 == 0 ? rnd(&seed) : run; /* not even nondecreasing, every 7th */
		}
		roundtrip(le, m, q >> 3, rnd(&seed) >> (q % 64));
	}
}

/* One engine, and what it must export: per subject, the counts below each
 * edge of every value whose slice has closed, and those values' count and
 * sum; values of the slice still open wait in open[]. */
struct model {
	struct tally_segment *seg;
	struct tally_engine *e;
	struct tally_producer *p[2];
	tally_subject_t ids[NSUBJ];
	uint64_t edges[TALLY__HIST_DEFAULT_NEDGES];
	uint32_t nedges;
	uint64_t le[NSUBJ][TALLY__HIST_DEFAULT_NEDGES], count[NSUBJ], sum[NSUBJ];
	uint64_t open[NSUBJ][64];
	uint32_t nopen[NSUBJ];
	uint64_t open_slice;
	/* what the last publish showed (model_check copies it): readers see
	 * it until the next publish, while the subjects wake and sleep */
	uint64_t pub_le[NSUBJ][TALLY__HIST_DEFAULT_NEDGES], pub_count[NSUBJ], pub_sum[NSUBJ];
	bool published;
};

static void model_open(struct model *m)
{
	struct tally_segment_config cfg;
	struct tally_engine_config ecfg;

	memset(m, 0, sizeof(*m));
	tt_config(&cfg);
	cfg.ring_capacity = 1u << 12;
	cr_assert_eq(tally_segment_create(tt_segname("export"), &cfg, 0, &m->seg), 0, "%s", tally_errmsg());
	tally_engine_config_init(&ecfg);
	ecfg.slice_ns = SLICE_NS;
	ecfg.window_ns = WINDOW_SLICES * SLICE_NS;
	ecfg.drain_threads = TT_DRAIN_THREADS;
	cr_assert_eq(tally__engine_new(m->seg, &ecfg, &m->e), 0, "%s", tally_errmsg());
	for (int k = 0; k < 2; k++)
		cr_assert_eq(tally_producer_attach(m->seg, &m->p[k]), 0, "%s", tally_errmsg());
	for (uint32_t i = 0; i < NSUBJ; i++) {
		char name[32];
		snprintf(name, sizeof(name), "export.s%u", i);
		cr_assert_eq(tally_subject_intern(m->seg, name, &m->ids[i]), 0, "%s", tally_errmsg());
	}
	m->nedges = (uint32_t)tally__hist_default_edges(m->edges, TALLY__HIST_DEFAULT_NEDGES);
}

static void model_close(struct model *m)
{
	tally_producer_detach(&m->p[0]);
	tally_producer_detach(&m->p[1]);
	tally__engine_free(&m->e);
	tally_segment_close(&m->seg);
}

/* The open slice's values are exported once time leaves their slice. */
static void model_close_slice(struct model *m, uint64_t now)
{
	if (now / SLICE_NS == m->open_slice)
		return;
	for (uint32_t s = 0; s < NSUBJ; s++) {
		for (uint32_t j = 0; j < m->nopen[s]; j++) {
			uint64_t v = m->open[s][j];
			for (uint32_t k = 0; k < m->nedges; k++)
				m->le[s][k] += v < m->edges[k];
			m->count[s]++;
			m->sum[s] += v;
		}
		m->nopen[s] = 0;
	}
	m->open_slice = now / SLICE_NS;
}

static void model_record(struct model *m, uint32_t s, uint64_t v, uint64_t now)
{
	cr_assert_eq(now / SLICE_NS, m->open_slice);
	cr_assert_lt(m->nopen[s], 64u);
	cr_assert(tally_record(m->p[m->nopen[s] & 1], m->ids[s], v));
	m->open[s][m->nopen[s]++] = v;
}

/* Publish at now. With drain threads, a fold a lane makes while the
 * publish advances its parts shows at the next publish (lib/engine.c,
 * Drain threads): a second one at the same time collects it. */
static void model_publish(struct model *m, uint64_t now)
{
	tally__engine_publish(m->e, now);
	if (TT_DRAIN_THREADS > 1)
		tally__engine_publish(m->e, now);
}

static void check_against(struct model *m, uint64_t (*le)[TALLY__HIST_DEFAULT_NEDGES], const uint64_t *count,
			  const uint64_t *sum, const char *when, int round)
{
	for (uint32_t s = 0; s < NSUBJ; s++) {
		struct tally_subject_buckets b;
		if (tally_engine_read_buckets(m->e, m->ids[s], &b) != 0) {
			cr_assert_eq(count[s], 0, "%s, round %d: subject %u has no buckets", when, round, s);
			continue;
		}
		cr_assert_eq(b.n, m->nedges);
		cr_assert_eq(b.count, count[s], "%s, round %d, subject %u: count %llu, expected %llu", when, round, s,
			     (unsigned long long)b.count, (unsigned long long)count[s]);
		cr_assert_eq(b.sum_ns, sum[s], "%s, round %d, subject %u: sum", when, round, s);
		for (uint32_t k = 0; k < b.n; k++) {
			cr_assert_eq(b.le_ns[k], m->edges[k] - 1);
			cr_assert_eq(b.cumulative[k], le[s][k], "%s, round %d, subject %u, edge %u: %llu, expected %llu",
				     when, round, s, k, (unsigned long long)b.cumulative[k], (unsigned long long)le[s][k]);
		}
	}
}

/* After a publish: what it shows is the reference. */
static void model_check(struct model *m, const char *when, int round)
{
	check_against(m, m->le, m->count, m->sum, when, round);
	memcpy(m->pub_le, m->le, sizeof(m->le));
	memcpy(m->pub_count, m->count, sizeof(m->count));
	memcpy(m->pub_sum, m->sum, sizeof(m->sum));
	m->published = true;
}

/* Between publishes: still what the last one showed, though the subjects
 * have woken (their packs given up) or gone to sleep since. */
static void model_check_published(struct model *m, const char *when, int round)
{
	if (m->published)
		check_against(m, m->pub_le, m->pub_count, m->pub_sum, when, round);
}

static int packs_tried;
static bool count_packs(const char *point)
{
	packs_tried += strcmp(point, "export.pack") == 0;
	return false;
}

/* Subjects 0 and 1 busy every slice; the others sleep for whole windows
 * and wake, again and again: the published buckets always equal the
 * reference, and the sleeping ones were packed. */
Test(export, sleeping_subjects_export_exactly_what_a_busy_one_would)
{
	struct model m;
	uint64_t seed = 0x2545f4914f6cdd1dull, now = 1000 * SLICE_NS + 3;

	model_open(&m);
	m.open_slice = now / SLICE_NS;
	tally__hist_nomem_hook = count_packs;
	for (int round = 0; round < 400; round++) {
		uint64_t r = rnd(&seed);
		/* next slice, or a whole window and more later */
		uint64_t next = now + (r % 9 == 0 ? (WINDOW_SLICES + 1 + r % 3) * SLICE_NS : SLICE_NS);
		tally__engine_ingest(m.e, next);
		now = next;
		model_close_slice(&m, now);
		model_check_published(&m, "after a slice closed", round);
		for (uint32_t s = 0; s < NSUBJ; s++) {
			/* 2..5 wake a few rounds in every twenty */
			if (s >= 2 && (round / 20 + s) % 4 != 0)
				continue;
			uint32_t n = 1 + (uint32_t)(rnd(&seed) % 20);
			for (uint32_t j = 0; j < n; j++) {
				uint64_t q = rnd(&seed);
				model_record(&m, s, 500 + (q >> 20) % (UINT64_C(1) << (10 + q % 24)), now);
			}
		}
		cr_assert_gt(tally__engine_ingest(m.e, now), 0);
		model_check_published(&m, "after samples", round);
		if (r % 3 == 0) {
			model_publish(&m, now + SLICE_NS);
			model_close_slice(&m, now + SLICE_NS);
			model_check(&m, "publish", round);
			now += SLICE_NS;
		}
	}
	tally__hist_nomem_hook = NULL;
	cr_assert_gt(packs_tried, 40, "export buckets packed %d times", packs_tried);
	model_close(&m);
}

static int fail_point_left;
static const char *fail_point;
static bool fail_at(const char *point)
{
	if (strcmp(point, fail_point) != 0 || fail_point_left == 0)
		return false;
	fail_point_left--;
	return true;
}

/* No memory to pack or to unpack: exports stay exact. */
static void failures(const char *point)
{
	struct model m;
	uint64_t now = 1000 * SLICE_NS + 5;

	model_open(&m);
	m.open_slice = now / SLICE_NS;
	fail_point = point;
	tally__hist_nomem_hook = fail_at;
	for (int round = 0; round < 12; round++) {
		/* a burst, then a whole window and more of nothing: it sleeps */
		for (uint32_t s = 0; s < NSUBJ; s++)
			for (uint32_t j = 0; j < 5 + s; j++)
				model_record(&m, s, 1000u * (1u + j + (uint32_t)round * 7u), now);
		cr_assert_gt(tally__engine_ingest(m.e, now), 0);
		fail_point_left = 3; /* a few of the subjects below */
		for (uint32_t k = 1; k <= WINDOW_SLICES + 2; k++) {
			tally__engine_ingest(m.e, now + k * SLICE_NS);
			model_publish(&m, now + k * SLICE_NS);
		}
		now += (WINDOW_SLICES + 2) * SLICE_NS;
		model_close_slice(&m, now);
		model_check(&m, point, round);
	}
	tally__hist_nomem_hook = NULL;
	/* memory again: all of it still there, and one more slice of each */
	for (uint32_t s = 0; s < NSUBJ; s++)
		model_record(&m, s, 77777, now);
	tally__engine_ingest(m.e, now);
	model_publish(&m, now + SLICE_NS);
	model_close_slice(&m, now + SLICE_NS);
	model_check(&m, "after", 0);
	model_close(&m);
}

Test(export, no_memory_to_pack_leaves_them_dense)
{
	failures("export.pack");
}

Test(export, no_memory_to_unpack_keeps_the_slice_open_and_folds_it_once)
{
	failures("export.unpack");
}

/* No memory at a slice's close for as long as several publishes: the
 * publishes read the window at the end of its open slice (the stats must
 * not close it behind the fold's back), and once memory is back the
 * slice is folded once. Found by review: the stats' own advance closed
 * the slice, which was then never exported. */
static bool fail_always(const char *point)
{
	return strcmp(point, fail_point) == 0;
}

static void failing_through_publishes(const char *point)
{
	struct model m;
	uint64_t now = 1000 * SLICE_NS + 5;

	model_open(&m);
	m.open_slice = now / SLICE_NS;
	for (uint32_t s = 0; s < NSUBJ; s++)
		model_record(&m, s, 1000 + s, now);
	cr_assert_eq(tally__engine_ingest(m.e, now), NSUBJ);
	/* a whole window and more of nothing: every subject sleeps, packed */
	for (uint32_t k = 1; k <= WINDOW_SLICES + 2; k++) {
		tally__engine_ingest(m.e, now + k * SLICE_NS);
		model_publish(&m, now + k * SLICE_NS);
	}
	now += (WINDOW_SLICES + 2) * SLICE_NS;
	model_close_slice(&m, now);
	model_check(&m, "asleep", 0);
	/* they wake; their slice ends while there is no memory */
	for (uint32_t s = 0; s < NSUBJ; s++)
		model_record(&m, s, 5000 + s, now);
	cr_assert_eq(tally__engine_ingest(m.e, now), NSUBJ);
	fail_point = point;
	tally__hist_nomem_hook = fail_always;
	for (uint32_t k = 1; k <= 3; k++) {
		tally__engine_ingest(m.e, now + k * SLICE_NS);
		model_publish(&m, now + k * SLICE_NS);
		/* not exported yet: what the subjects had before they woke */
		model_check_published(&m, point, (int)k);
	}
	tally__hist_nomem_hook = NULL;
	now += 4 * SLICE_NS;
	tally__engine_ingest(m.e, now);
	model_publish(&m, now);
	model_close_slice(&m, now);
	model_check(&m, point, 9);
	model_close(&m);
}

Test(export, no_memory_to_unpack_through_publishes_folds_the_slice_once_later)
{
	failing_through_publishes("export.unpack");
}

Test(export, no_memory_to_store_the_slice_through_publishes_folds_it_once_later)
{
	failing_through_publishes("window.fifo");
}
