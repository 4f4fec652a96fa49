/* SPDX-License-Identifier: MIT */
/*
 * test_verdict.c: thresholds (validation, most specific match) and the
 * verdict state machine: immediate escalation, no flapping around a
 * threshold, recovery only below the clear level and after the dwell,
 * stale pending data under both policies, no data, retry-after; and the
 * verdict published by a running engine, read in-process and from the
 * segment; the stalled signal and judging on the backlog alone (fake clock);
 * rows for configured and interned subjects before their first sample.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "common/helpers.h"
#include "verdict.h"

#define MS 1000000ull

static struct tally_threshold_rule rule(uint64_t lw, uint64_t lo, uint64_t pw, uint64_t po)
{
	struct tally_threshold_rule r;

	tally_threshold_rule_init(&r);
	r.p95_warn_ns = lw;
	r.p95_overload_ns = lo;
	r.pending_warn = pw;
	r.pending_overload = po;
	r.min_samples = 1;
	r.min_dwell_ms = 100;
	return r;
}

Test(thresholds, validation_names_subject_and_key)
{
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r = rule(200, 100, 0, 0);

	cr_expect_eq(tally_thresholds_add(t, "orders.*", &r), -EINVAL);
	cr_expect(strstr(tally_errmsg(), "orders.*") && strstr(tally_errmsg(), "p95_warn"), "%s", tally_errmsg());
	r = rule(0, 0, 50, 10);
	cr_expect_eq(tally_thresholds_add(t, "a", &r), -EINVAL);
	cr_expect(strstr(tally_errmsg(), "pending_warn"), "%s", tally_errmsg());
	r = rule(1, 2, 3, 4);
	r.clear_ratio = 1.5;
	cr_expect_eq(tally_thresholds_add(t, "a", &r), -EINVAL);
	cr_expect(strstr(tally_errmsg(), "clear_ratio"), "%s", tally_errmsg());
	r = rule(1, 2, 3, 4);
	cr_expect_eq(tally_thresholds_add(t, "a..b", &r), TALLY_EBADNAME);
	cr_expect(strstr(tally_errmsg(), "a..b"), "%s", tally_errmsg());
	cr_expect_eq(tally_thresholds_add(t, "a.>.b", &r), TALLY_EBADNAME);
	cr_expect_eq(tally_thresholds_add(t, "a", &r), 0);
	cr_expect_eq(tally_thresholds_add(t, "a", &r), -EEXIST);
	tally_thresholds_free(&t);
	cr_expect_null(t);
}

Test(thresholds, most_specific_match_wins)
{
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r1 = rule(1, 10, 0, 0), r2 = rule(2, 20, 0, 0), r3 = rule(3, 30, 0, 0),
				    r4 = rule(4, 40, 0, 0), d = rule(9, 90, 0, 0);
	const char *pat;

	cr_assert_eq(tally_thresholds_add(t, ">", &r1), 0);
	cr_assert_eq(tally_thresholds_add(t, "orders.>", &r2), 0);
	cr_assert_eq(tally_thresholds_add(t, "orders.*", &r3), 0);
	cr_assert_eq(tally_thresholds_add(t, "orders.created", &r4), 0);
	cr_assert_eq(tally_thresholds_add(t, NULL, &d), 0);
	cr_expect_eq(tally_thresholds_match(t, "orders.created", &pat)->p95_warn_ns, 4);
	cr_expect_str_eq(pat, "orders.created");
	cr_expect_eq(tally_thresholds_match(t, "orders.deleted", &pat)->p95_warn_ns, 3);
	cr_expect_str_eq(pat, "orders.*");
	cr_expect_eq(tally_thresholds_match(t, "orders.eu.created", &pat)->p95_warn_ns, 2);
	cr_expect_eq(tally_thresholds_match(t, "billing", &pat)->p95_warn_ns, 1);
	tally_thresholds_free(&t);
	t = tally_thresholds_new();
	tally_thresholds_add(t, "", &d);
	cr_expect_eq(tally_thresholds_match(t, "x", &pat)->p95_warn_ns, 9, "default rule");
	tally_thresholds_free(&t);
}

static struct tally__verdict_out step(struct tally__verdict_state *st, const struct tally_threshold_rule *r,
				      uint64_t p95, uint64_t pending, uint32_t src, uint64_t now)
{
	struct tally__verdict_input in = { .count = 100, .p95_ns = p95, .rate = 1000,
					   .pending_consumers = src ? 1 : 0, .pending_source = src,
					   .pending = pending, .pending_age_ns = 0 };
	struct tally__verdict_out out;

	tally__verdict_update(st, r, &in, now, &out);
	return out;
}

Test(verdict, escalates_at_once_and_recovers_after_clear_and_dwell)
{
	struct tally_threshold_rule r = rule(100, 200, 0, 0);
	struct tally__verdict_state st;
	uint64_t t = 1000 * MS;

	tally__verdict_init(&st, t);
	cr_expect_eq(step(&st, &r, 50, 0, 0, t).verdict, TALLY_VERDICT_OK);
	cr_expect_eq(step(&st, &r, 250, 0, 0, t += MS).verdict, TALLY_VERDICT_OVERLOAD, "at once");
	struct tally__verdict_out o = step(&st, &r, 170, 0, 0, t += MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OVERLOAD, "170 >= 80%% of 200: held");
	cr_expect(o.reasons & TALLY_REASON_LATENCY);
	cr_expect_eq(step(&st, &r, 150, 0, 0, t += 10 * MS).verdict, TALLY_VERDICT_OVERLOAD, "below clear but dwell not over");
	o = step(&st, &r, 150, 0, 0, t += 100 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_WARN, "dwell over: 150 >= 80 (clear of warn): warn");
	cr_expect_eq(o.since_ns, t);
	cr_expect_eq(step(&st, &r, 50, 0, 0, t += 10 * MS).verdict, TALLY_VERDICT_WARN, "dwell of warn");
	cr_expect_eq(step(&st, &r, 50, 0, 0, t += 100 * MS).verdict, TALLY_VERDICT_OK);
}

Test(verdict, value_oscillating_on_a_threshold_does_not_flap)
{
	struct tally_threshold_rule r = rule(100, 1000, 0, 0);
	struct tally__verdict_state st;
	uint64_t t = 1000 * MS;
	int changes = 0;
	enum tally_verdict last = TALLY_VERDICT_UNKNOWN;

	tally__verdict_init(&st, t);
	for (int i = 0; i < 1000; i++) {
		uint64_t v = i % 2 ? 103 : 97; /* around the warn level of 100 */
		enum tally_verdict now = step(&st, &r, v, 0, 0, t += 10 * MS).verdict;
		changes += now != last;
		last = now;
	}
	cr_expect_eq(changes, 2, "unknown->ok->warn once, then held (got %d changes)", changes);
	cr_expect_eq(last, TALLY_VERDICT_WARN);
}

Test(verdict, pending_signal_and_retry_after)
{
	struct tally_threshold_rule r = rule(0, 0, 100, 1000);
	struct tally__verdict_state st;
	uint64_t t = 1000 * MS;

	tally__verdict_init(&st, t);
	struct tally__verdict_out o = step(&st, &r, 0, 5000, TALLY_PENDING_LIVE, t);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OVERLOAD);
	cr_expect_eq(o.reasons, TALLY_REASON_PENDING);
	cr_expect_eq(o.retry_after_ms, 5000, "5000 pending at 1000/s: 5 s");
	o = step(&st, &r, 0, 50, TALLY_PENDING_LIVE, t += 200 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OK);
	cr_expect_eq(o.retry_after_ms, 0);
}

/* The stretched hint stops at retry_after_max_ms (it was a hard-coded
 * 30 s), and a maximum below the base hint is refused naming both. */
Test(verdict, retry_after_stretches_to_its_configured_maximum)
{
	struct tally_threshold_rule r = rule(0, 0, 100, 1000);
	struct tally__verdict_state st;
	uint64_t t = 1000 * MS;

	r.retry_after_max_ms = 8000;
	tally__verdict_init(&st, t);
	struct tally__verdict_out o = step(&st, &r, 0, 500000, TALLY_PENDING_LIVE, t);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OVERLOAD);
	cr_expect_eq(o.retry_after_ms, 8000, "500 s of backlog, capped at 8 s: %u", o.retry_after_ms);
	struct tally_threshold_rule d;
	tally_threshold_rule_init(&d);
	cr_expect_eq(d.retry_after_max_ms, 30000, "the documented default");
	struct tally_thresholds *th = tally_thresholds_new();
	r.retry_after_ms = 9000;
	cr_expect_eq(tally_thresholds_add(th, "x.>", &r), -EINVAL);
	cr_expect(strstr(tally_errmsg(), "retry_after_max_ms 8000 is below retry_after_ms 9000"), "%s",
		  tally_errmsg());
	tally_thresholds_free(&th);
}

Test(verdict, stale_pending_fail_open_and_fail_closed)
{
	struct tally_threshold_rule r = rule(100, 200, 100, 1000);
	struct tally__verdict_state st;
	struct tally__verdict_input in = { .count = 100, .p95_ns = 150, .rate = 10, .pending_consumers = 1,
					   .pending_source = TALLY_PENDING_CACHED, .pending = 99999,
					   .pending_age_ns = 60000 * MS };
	struct tally__verdict_out o;

	tally__verdict_init(&st, 0);
	tally__verdict_update(&st, &r, &in, 1, &o);
	cr_expect_eq(o.verdict, TALLY_VERDICT_WARN, "fail-open: judged on latency alone");
	cr_expect_eq(o.reasons, TALLY_REASON_LATENCY | TALLY_REASON_STALE | TALLY_REASON_FAIL_OPEN);
	r.stale_policy = TALLY_STALE_FAIL_CLOSED;
	tally__verdict_update(&st, &r, &in, 2, &o);
	cr_expect_eq(o.verdict, TALLY_VERDICT_UNKNOWN, "fail-closed: unknown");
	cr_expect(o.reasons & TALLY_REASON_STALE);
	in.pending_age_ns = 0;
	in.pending_source = TALLY_PENDING_LIVE;
	tally__verdict_update(&st, &r, &in, 3, &o);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OVERLOAD, "fresh again: the backlog counts");
	in.pending_source = TALLY_PENDING_GONE;
	tally__verdict_update(&st, &r, &in, 4, &o);
	cr_expect(o.reasons & TALLY_REASON_STALE, "a gone consumer is not a live signal");
}

Test(verdict, no_data_is_unknown)
{
	struct tally_threshold_rule r = rule(100, 200, 100, 1000);
	struct tally__verdict_state st;
	struct tally__verdict_input in = { .count = 3 };
	struct tally__verdict_out o;

	r.min_samples = 10;
	tally__verdict_init(&st, 0);
	tally__verdict_update(&st, &r, &in, 1, &o);
	cr_expect_eq(o.verdict, TALLY_VERDICT_UNKNOWN);
	cr_expect_eq(o.reasons, TALLY_REASON_NO_DATA);
	char buf[64];
	cr_expect_str_eq(tally_reasons_format(TALLY_REASON_STALE | TALLY_REASON_FAIL_OPEN, buf, sizeof(buf)),
			 "stale,fail_open");
	cr_expect_str_eq(tally_verdict_name(TALLY_VERDICT_OVERLOAD), "overload");
}

Test(verdict, published_by_the_engine_in_process_and_in_the_segment)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg, *rd;
	struct tally_engine_config ec;
	struct tally_engine *e;
	struct tally_producer *p;
	tally_subject_t slow, fast;
	const char *name = tt_segname("verdict");

	tt_config(&cfg);
	cr_assert_eq(tally_segment_create(name, &cfg, 0, &seg), 0);
	tally_engine_config_init(&ec);
	ec.publish_interval_ms = 5;
	cr_assert_eq(tally_engine_start(seg, &ec, &e), 0);
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r = rule(1000, 10000, 0, 0);
	cr_assert_eq(tally_thresholds_add(t, "svc.slow", &r), 0);
	r = rule(1000000, 10000000, 0, 0);
	cr_assert_eq(tally_thresholds_add(t, NULL, &r), 0);
	cr_assert_eq(tally_engine_set_thresholds(e, &t), 0);
	cr_expect_null(t);
	tally_subject_intern(seg, "svc.slow", &slow);
	tally_subject_intern(seg, "svc.fast", &fast);
	tally_producer_attach(seg, &p);
	for (int i = 0; i < 100; i++) {
		tally_record(p, slow, 50000);
		tally_record(p, fast, 500);
	}
	struct tally_subject_stats s, x;
	for (int i = 0; i < 200; i++) {
		if (tally_engine_read(e, slow, &s) == 0 && s.count == 100 &&
		    s.verdict == TALLY_VERDICT_OVERLOAD)
			break;
		tt_sleep_ms(5);
	}
	cr_expect_eq(s.verdict, TALLY_VERDICT_OVERLOAD);
	cr_expect_eq(s.reasons, TALLY_REASON_LATENCY);
	cr_expect_gt(s.retry_after_ms, 0);
	cr_assert_eq(tally_engine_read(e, fast, &s), 0);
	cr_expect_eq(s.verdict, TALLY_VERDICT_OK, "default rule: 500 ns is fine");
	cr_assert_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), 0);
	cr_assert_eq(tally_read_subject(rd, slow, &x), 0);
	cr_expect_eq(x.verdict, TALLY_VERDICT_OVERLOAD);
	cr_expect_eq(x.reasons, TALLY_REASON_LATENCY);
	cr_expect_eq(x.pending_source, TALLY_PENDING_NONE);
	tally_segment_close(&rd);
	tally_producer_detach(&p);
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}

/* ---- stalled, and judged on the backlog alone ------------------------------ */

/* One publish of a subject with no latency data: total completions since
 * start, and a live backlog (src 0: no consumer). */
static struct tally__verdict_out backlog_step(struct tally__verdict_state *st,
					      const struct tally_threshold_rule *r, uint64_t total,
					      uint64_t pending, uint32_t src, uint64_t now)
{
	struct tally__verdict_input in = { .count = 0, .total_count = total, .pending_consumers = src ? 1 : 0,
					   .pending_source = src, .pending = pending };
	struct tally__verdict_out out;

	tally__verdict_update(st, r, &in, now, &out);
	return out;
}

Test(stall, waiting_backlog_and_no_completion_is_stalled_overload)
{
	struct tally_threshold_rule r = rule(100, 200, 1000, 10000);
	struct tally__verdict_state st;
	uint64_t t = 1000 * MS;
	struct tally__verdict_out o;

	r.stall_after_ms = 1000;
	tally__verdict_init(&st, t);
	o = backlog_step(&st, &r, 0, 5, TALLY_PENDING_LIVE, t);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OK, "count 0 but a live backlog: judged on it, not unknown");
	cr_expect_eq(o.reasons, 0);
	for (int i = 1; i < 10; i++) { /* the backlog grows, nothing completes */
		o = backlog_step(&st, &r, 0, 5 + (uint64_t)i, TALLY_PENDING_LIVE, t + (uint64_t)i * 100 * MS);
		cr_expect_eq(o.verdict, TALLY_VERDICT_OK, "not yet: %d00 ms", i);
	}
	o = backlog_step(&st, &r, 0, 15, TALLY_PENDING_LIVE, t += 1000 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OVERLOAD, "stalled after stall_after_ms");
	cr_expect_eq(o.reasons, TALLY_REASON_STALLED);
	cr_expect_eq(o.since_ns, t);
	cr_expect_eq(o.retry_after_ms, r.retry_after_ms);
	char buf[64];
	cr_expect_str_eq(tally_reasons_format(o.reasons, buf, sizeof(buf)), "stalled");

	/* completions resume: the stall holds for its dwell, then clears */
	o = backlog_step(&st, &r, 3, 15, TALLY_PENDING_LIVE, t += 50 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OVERLOAD, "min_dwell_ms not over yet");
	o = backlog_step(&st, &r, 3, 15, TALLY_PENDING_LIVE, t += 60 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OK, "completed recently and dwelt: clear");
	cr_expect_eq(o.reasons, 0);
	/* and it stops again: stalled stall_after_ms after the last completion */
	o = backlog_step(&st, &r, 3, 16, TALLY_PENDING_LIVE, t += 880 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OK, "940 ms since the last completion");
	o = backlog_step(&st, &r, 3, 16, TALLY_PENDING_LIVE, t += 60 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OVERLOAD);
	cr_expect_eq(o.reasons, TALLY_REASON_STALLED);
}

Test(stall, falling_backlog_clears_and_an_empty_one_never_stalls)
{
	struct tally_threshold_rule r = rule(100, 200, 1000, 10000);
	struct tally__verdict_state st;
	uint64_t t = 1000 * MS;

	r.stall_after_ms = 1000;
	tally__verdict_init(&st, t);
	backlog_step(&st, &r, 0, 50, TALLY_PENDING_LIVE, t);
	cr_expect_eq(backlog_step(&st, &r, 0, 50, TALLY_PENDING_LIVE, t += 1000 * MS).verdict,
		     TALLY_VERDICT_OVERLOAD, "a flat backlog is not falling");
	cr_expect_eq(backlog_step(&st, &r, 0, 40, TALLY_PENDING_LIVE, t += 200 * MS).verdict,
		     TALLY_VERDICT_OK, "the backlog fell (someone consumes): clear after the dwell");
	cr_expect_eq(backlog_step(&st, &r, 0, 45, TALLY_PENDING_LIVE, t += 900 * MS).verdict,
		     TALLY_VERDICT_OK, "rising again, 900 ms since it fell");
	cr_expect_eq(backlog_step(&st, &r, 0, 45, TALLY_PENDING_LIVE, t += 100 * MS).verdict,
		     TALLY_VERDICT_OVERLOAD);

	tally__verdict_init(&st, t);
	for (int i = 0; i < 50; i++)
		cr_expect_eq(backlog_step(&st, &r, 0, 0, TALLY_PENDING_LIVE, t += 100 * MS).verdict,
			     TALLY_VERDICT_OK, "nothing waits: an idle router is not stalled");
}

Test(stall, needs_a_live_backlog_and_can_be_turned_off)
{
	struct tally_threshold_rule r = rule(100, 200, 1000, 10000);
	struct tally__verdict_state st;
	uint64_t t = 1000 * MS;
	struct tally__verdict_out o;

	r.stall_after_ms = 1000;
	tally__verdict_init(&st, t);
	backlog_step(&st, &r, 0, 50, TALLY_PENDING_LIVE, t);
	o = backlog_step(&st, &r, 0, 50, TALLY_PENDING_NEVER, t += 5000 * MS);
	cr_expect_neq(o.verdict, TALLY_VERDICT_OVERLOAD, "stale pending: no one knows it waits");
	cr_expect_eq(o.reasons & TALLY_REASON_STALLED, 0);
	o = backlog_step(&st, &r, 0, 50, 0, t += 5000 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_UNKNOWN, "no consumer, no samples: unknown");
	cr_expect_eq(o.reasons, TALLY_REASON_NO_DATA);
	o = backlog_step(&st, &r, 0, 50, TALLY_PENDING_LIVE, t += 100 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OVERLOAD, "live again and still no progress: stalled at once");
	cr_expect_eq(o.reasons, TALLY_REASON_STALLED);

	r.stall_after_ms = 0;
	tally__verdict_init(&st, t);
	backlog_step(&st, &r, 0, 50, TALLY_PENDING_LIVE, t);
	cr_expect_eq(backlog_step(&st, &r, 0, 50, TALLY_PENDING_LIVE, t += 3600000 * MS).verdict,
		     TALLY_VERDICT_OK, "stall_after_ms = 0: off");
}

Test(stall, no_latency_data_is_judged_on_pending_alone)
{
	struct tally_threshold_rule r = rule(100, 200, 100, 1000);
	struct tally__verdict_state st;
	uint64_t t = 1000 * MS;
	struct tally__verdict_out o;

	r.min_samples = 20;
	r.stall_after_ms = 10000;
	tally__verdict_init(&st, t);
	o = backlog_step(&st, &r, 0, 5000, TALLY_PENDING_LIVE, t);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OVERLOAD, "count 0, backlog above pending_overload");
	cr_expect_eq(o.reasons, TALLY_REASON_PENDING, "on pending alone, not stalled yet");
	o = backlog_step(&st, &r, 0, 6000, TALLY_PENDING_LIVE, t += 10000 * MS);
	cr_expect_eq(o.reasons, TALLY_REASON_PENDING | TALLY_REASON_STALLED, "then stalled too");
	tally__verdict_init(&st, t);
	o = backlog_step(&st, &r, 0, 500, TALLY_PENDING_LIVE, t);
	cr_expect_eq(o.verdict, TALLY_VERDICT_WARN);
	cr_expect_eq(o.reasons, TALLY_REASON_PENDING);
}

Test(stall, stall_after_ms_is_validated_and_defaults_to_10_s)
{
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r;

	tally_threshold_rule_init(&r);
	cr_expect_eq(r.stall_after_ms, 10000);
	r.stall_after_ms = 50;
	cr_expect_eq(tally_thresholds_add(t, "orders.created", &r), -EINVAL);
	cr_expect(strstr(tally_errmsg(), "orders.created") && strstr(tally_errmsg(), "stall_after_ms"),
		  "%s", tally_errmsg());
	r.stall_after_ms = 0;
	cr_expect_eq(tally_thresholds_add(t, "orders.created", &r), 0, "0 turns it off");
	r.stall_after_ms = 100;
	cr_expect_eq(tally_thresholds_add(t, "orders.paid", &r), 0);
	tally_thresholds_free(&t);
}

/* The engine gives configured literal subjects, and subjects interned but
 * never recorded, a row (count 0) before any sample. */
Test(stall, configured_and_interned_subjects_have_rows_before_a_sample)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg, *rd;
	struct tally_engine_config ec;
	struct tally_engine *e;
	struct tally_threshold_rule r = rule(1000, 10000, 0, 0);
	tally_subject_t id, stuck;
	struct tally_subject_stats s;
	const char *name = tt_segname("known");

	tt_config(&cfg);
	cr_assert_eq(tally_segment_create(name, &cfg, 0, &seg), 0);
	tally_engine_config_init(&ec);
	ec.publish_interval_ms = 5;
	ec.reap_interval_ms = 10;
	cr_assert_eq(tally_engine_start(seg, &ec, &e), 0);
	struct tally_thresholds *t = tally_thresholds_new();
	cr_assert_eq(tally_thresholds_add(t, "cfg.literal", &r), 0);
	cr_assert_eq(tally_thresholds_add(t, "cfg.*", &r), 0);
	cr_assert_eq(tally_engine_set_thresholds(e, &t), 0);
	cr_assert_eq(tally_subject_intern(seg, "router.stuck", &stuck), 0);
	cr_assert_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), 0);
	int rc = -1;
	for (int i = 0; i < 200 && rc != 0; i++) {
		tt_sleep_ms(5);
		if (tally_subject_lookup(rd, "cfg.literal", &id) == 0)
			rc = tally_read_subject(rd, id, &s);
	}
	cr_assert_eq(rc, 0, "the threshold rule's subject was interned and published");
	cr_expect_eq(s.count, 0);
	cr_expect_eq(s.verdict, TALLY_VERDICT_UNKNOWN);
	cr_expect_eq(s.reasons, TALLY_REASON_NO_DATA);
	cr_expect_eq(tally_engine_read(e, id, &s), 0, "in process too");
	cr_expect_eq(tally_subject_lookup(rd, "cfg.*", &id), TALLY_EBADNAME, "a wildcard names no subject");
	rc = -1;
	for (int i = 0; i < 200 && rc != 0; i++, tt_sleep_ms(5))
		rc = tally_read_subject(rd, stuck, &s);
	cr_expect_eq(rc, 0, "a subject interned and never recorded has a row");
	cr_expect_eq(s.count, 0);
	tally_segment_close(&rd);
	tally_engine_stop(&e);
	tally_segment_close(&seg);
	tally_segment_unlink(name);
}
