/* SPDX-License-Identifier: MIT */
/*
 * test_pending_map.c: the engine's subject -> pending entries map (issue
 * 18), which replaced matching every subject against every entry at
 * every publish, against that plain scan itself. Random rounds rewrite
 * entries with other patterns (literal, "*", ">", none, map_subject over
 * filter), clear some and add subjects (new rows); after each round every
 * subject's published backlog, consumer count and deciding entry must be
 * what tally__pending_for_subject (one pass over the whole table, no map)
 * says, ties included (the lowest entry index decides, as before).
 */
#include "config.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "common/helpers.h"
#include "pending.h"
#include "segment.h"

#define PM_ENTRIES 48u
#define PM_ROUNDS 10
#define PM_MAX_SUBJECTS 96u

static const char *const patterns[] = {
	"pm.1.2", "pm.3.0", "pm.*.1", "pm.2.*", "pm.>", "pm.*.*", "other.x", "", "pm.0.*", "pm.5.9",
};

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void wait_publishes(struct tally_engine *e, uint64_t n)
{
	struct tally_engine_counters c;

	tally_engine_counters(e, &c);
	uint64_t want = c.publishes + n;
	for (int i = 0; i < 5000 && c.publishes < want; i++) {
		tt_sleep_ms(1);
		tally_engine_counters(e, &c);
	}
	cr_assert_geq(c.publishes, want, "the engine stopped publishing");
}

Test(pending_map, same_as_a_scan_of_every_entry)
{
	struct tally_segment_config cfg;
	struct tally_engine_config ecfg;
	struct tally_segment *seg;
	struct tally_engine *e;
	struct tally_producer *p;
	tally_subject_t ids[PM_MAX_SUBJECTS];
	uint32_t nsubj = 0;
	uint64_t seed = 0x9e3779b97f4a7c15ull;

	tt_config(&cfg);
	cfg.pending_capacity = PM_ENTRIES;
	cr_assert_eq(tally_segment_create(tt_segname("pmap"), &cfg, 0, &seg), 0, "%s", tally_errmsg());
	tally_engine_config_init(&ecfg);
	ecfg.publish_interval_ms = 2;
	cr_assert_eq(tally_engine_start(seg, &ecfg, &e), 0, "%s", tally_errmsg());
	cr_assert_eq(tally_producer_attach(seg, &p), 0, "%s", tally_errmsg());
	void *sec = tally__seg_section(seg, &seg->pending);

	for (int round = 0; round < PM_ROUNDS; round++) {
		/* new subjects: rows the map has not seen */
		for (int k = 0; k < 8 && nsubj < PM_MAX_SUBJECTS; k++, nsubj++) {
			char name[32];
			snprintf(name, sizeof(name), "pm.%u.%u", nsubj % 6, nsubj / 6);
			cr_assert_eq(tally_subject_intern(seg, name, &ids[nsubj]), 0, "%s", tally_errmsg());
			cr_assert(tally_record(p, ids[nsubj], 1000));
		}
		/* entries rewritten (a pattern, maybe the same), cleared or left */
		for (uint32_t j = 0; j < PM_ENTRIES; j++) {
			uint64_t r = rnd(&seed);
			if (round && r % 3 == 0)
				continue;
			if (r % 7 == 1) {
				tally__pending_clear_entry(tally__pending_entry_at(sec, j));
				continue;
			}
			char consumer[16];
			snprintf(consumer, sizeof(consumer), "C%u", j);
			const char *pat = patterns[(r >> 8) % (sizeof(patterns) / sizeof(patterns[0]))];
			bool as_map = (r >> 16) & 1;
			struct tally__pending_values v = {
				.source = TALLY__PENDING_LIVE, .kind = TALLY__PENDING_CONSUMER, .is_leader = 1,
				.num_pending = (r >> 20) % 5 * 100, /* few values: ties */
				.last_ok_ns = tally__pending_now_ns(), .stream = "S", .consumer = consumer,
				.filter = as_map ? "unrelated.filter" : pat, .map = as_map ? pat : "",
				.last_error = "",
			};
			tally__pending_write_entry(tally__pending_entry_at(sec, j), &v);
		}
		wait_publishes(e, 3);
		uint32_t matched_any = 0;
		for (uint32_t i = 0; i < nsubj; i++) {
			struct tally_subject_stats st;
			struct tally__pending_result ref = TALLY__PENDING_RESULT_INIT;
			char name[TALLY_SUBJECT_MAX + 1];
			cr_assert_eq(tally_engine_read(e, ids[i], &st), 0, "subject %u has no row", i);
			cr_assert_eq(tally_subject_name(seg, ids[i], name, sizeof(name)), 0);
			cr_assert_eq(tally__pending_for_subject(sec, seg->pending.size, name, NULL, &ref), 0);
			cr_assert_eq(st.pending, ref.backlog, "round %d, %s: backlog %llu, the scan says %llu", round,
				     name, (unsigned long long)st.pending, (unsigned long long)ref.backlog);
			cr_assert_eq(st.pending_consumers, ref.counted, "round %d, %s: %u consumers, the scan %u",
				     round, name, st.pending_consumers, ref.counted);
			cr_assert_eq(st.pending_entry, ref.top == UINT32_MAX ? 0 : ref.top + 1,
				     "round %d, %s: entry %u decides, the scan says %u", round, name,
				     st.pending_entry, ref.top + 1);
			matched_any += ref.matched != 0;
		}
		cr_expect_gt(matched_any, 0, "round %d: no subject matched anything: the test tests nothing",
			     round);
	}
	tally_producer_detach(&p);
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}
