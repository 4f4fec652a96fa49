/* SPDX-License-Identifier: MIT */
/*
 * test_pressure.c: graded decisions (issue 17). It owns the pressure and
 * shed-probability formulas (tally/verdict.h) checked value by value; the
 * wait and CoDel signals of the state machine, their reasons and their
 * hysteresis (fake clock); and the CoDel interval run by a real engine on
 * waits recorded through tally_record_jetstream_at: a burst worked off
 * within an interval never trips it, a standing queue does, and it
 * clears once waits are short again.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "common/helpers.h"
#include "verdict.h"

#define MS 1000000ull

static bool near(double a, double b)
{
	return fabs(a - b) < 1e-9;
}

Test(pressure, formula_point_by_point)
{
	/* two levels: 0.5 at warn, 1 at overload, linear on each side */
	cr_expect(near(tally__pressure_of(0, 100, 500), 0.0));
	cr_expect(near(tally__pressure_of(50, 100, 500), 0.25));
	cr_expect(near(tally__pressure_of(100, 100, 500), 0.5));
	cr_expect(near(tally__pressure_of(300, 100, 500), 0.75));
	cr_expect(near(tally__pressure_of(500, 100, 500), 1.0));
	cr_expect(near(tally__pressure_of(5000, 100, 500), 1.0));
	/* one level: a ramp to 1 at it; none: 0 */
	cr_expect(near(tally__pressure_of(50, 0, 200), 0.25));
	cr_expect(near(tally__pressure_of(50, 100, 0), 0.5));
	cr_expect(near(tally__pressure_of(50, 0, 0), 0.0));
	cr_expect(near(tally__pressure_of(100, 100, 100), 1.0));
	/* shed: nothing below warn, linear to 1 at overload */
	cr_expect(near(tally__shed_probability(0.0), 0.0));
	cr_expect(near(tally__shed_probability(0.5), 0.0));
	cr_expect(near(tally__shed_probability(0.75), 0.5));
	cr_expect(near(tally__shed_probability(1.0), 1.0));
	/* monotonic over the whole range */
	double last = -1;
	for (uint64_t v = 0; v <= 600; v += 7) {
		double p = tally__pressure_of(v, 100, 500);
		cr_expect(p >= last && p >= 0.0 && p <= 1.0, "v %llu: %g after %g", (unsigned long long)v, p, last);
		last = p;
	}
}

static struct tally_threshold_rule rule(void)
{
	struct tally_threshold_rule r;

	tally_threshold_rule_init(&r);
	r.min_samples = 1;
	r.min_dwell_ms = 100;
	r.wait_p95_warn_ns = 100 * MS;
	r.wait_p95_overload_ns = 500 * MS;
	r.pending_warn = 1000;
	r.pending_overload = 10000;
	return r;
}

static struct tally__verdict_out step(struct tally__verdict_state *st, const struct tally_threshold_rule *r,
				      struct tally__verdict_input *in, uint64_t now)
{
	struct tally__verdict_out o;

	tally__verdict_update(st, r, in, now, &o);
	return o;
}

Test(pressure, the_maximum_of_the_signals_and_shed_ahead_of_overload)
{
	struct tally_threshold_rule r = rule();
	struct tally__verdict_state st;
	struct tally__verdict_input in = { .count = 10, .total_count = 10, .p95_ns = 50 * MS, .wait_count = 10,
					   .wait_p95_ns = 300 * MS, .pending_consumers = 1,
					   .pending_source = TALLY_PENDING_LIVE, .pending = 500 };
	uint64_t t = 1000 * MS;

	tally__verdict_init(&st, t);
	struct tally__verdict_out o = step(&st, &r, &in, t);
	/* latency 0.25, wait 0.75, pending 0.25: the wait decides */
	cr_expect(near(o.pressure, 0.75), "%g", o.pressure);
	cr_expect(near(o.shed_probability, 0.5), "%g", o.shed_probability);
	cr_expect_eq(o.verdict, TALLY_VERDICT_WARN);
	cr_expect_eq(o.reasons, TALLY_REASON_WAIT, "%#x", o.reasons);
	/* the backlog overtakes it */
	in.pending = 5500;
	o = step(&st, &r, &in, t += 10 * MS);
	cr_expect(near(o.pressure, 0.75), "%g", o.pressure);
	cr_expect_eq(o.reasons, TALLY_REASON_WAIT | TALLY_REASON_PENDING, "%#x", o.reasons);
	in.pending = 9000;
	o = step(&st, &r, &in, t += 10 * MS);
	cr_expect(near(o.pressure, 0.5 + 0.5 * 8000.0 / 9000.0), "%g", o.pressure);
	cr_expect_eq(o.verdict, TALLY_VERDICT_WARN, "shed rises ahead of overload");
	cr_expect(o.shed_probability > 0.8 && o.shed_probability < 1.0);
	in.wait_p95_ns = 600 * MS;
	o = step(&st, &r, &in, t += 10 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OVERLOAD);
	cr_expect(near(o.pressure, 1.0) && near(o.shed_probability, 1.0));
	/* pressure follows at once, the level keeps its hysteresis */
	in.wait_p95_ns = 10 * MS;
	in.pending = 0;
	o = step(&st, &r, &in, t += 10 * MS);
	cr_expect(near(o.pressure, 0.25), "latency alone now: %g", o.pressure);
	cr_expect(near(o.shed_probability, 0.0));
	cr_expect_eq(o.verdict, TALLY_VERDICT_OVERLOAD, "held for the dwell");
	o = step(&st, &r, &in, t += 200 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OK, "after the dwell, below every clear level");
}

Test(pressure, codel_raises_warn_and_clears_after_the_dwell)
{
	struct tally_threshold_rule r = rule();
	struct tally__verdict_state st;
	struct tally__verdict_input in = { .wait_count = 100, .wait_p95_ns = 20 * MS, .codel_valid = true,
					   .wait_min_ns = 2 * MS };
	uint64_t t = 1000 * MS;

	tally__verdict_init(&st, t);
	struct tally__verdict_out o = step(&st, &r, &in, t);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OK, "judged on waits alone");
	/* wait p95 20 ms of 100 gives 0.1; the minimum 2 ms of a 5 ms target 0.2 */
	cr_expect(near(o.pressure, 0.2), "%g", o.pressure);
	in.wait_min_ns = 10 * MS;
	in.codel_overloaded = true;
	o = step(&st, &r, &in, t += 10 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_WARN);
	cr_expect_eq(o.reasons, TALLY_REASON_CODEL, "%#x", o.reasons);
	/* 0.5 at the target, 1 at wait_p95_overload */
	cr_expect(near(o.pressure, 0.5 + 0.5 * 5.0 / 495.0), "%g", o.pressure);
	cr_expect(o.shed_probability > 0.0);
	in.codel_overloaded = false;
	in.wait_min_ns = 1 * MS;
	o = step(&st, &r, &in, t += 10 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_WARN, "held for the dwell");
	o = step(&st, &r, &in, t += 200 * MS);
	cr_expect_eq(o.verdict, TALLY_VERDICT_OK);
	char buf[64];
	cr_expect_str_eq(tally_reasons_format(TALLY_REASON_WAIT | TALLY_REASON_CODEL | TALLY_REASON_LATENCY |
					      TALLY_REASON_PENDING, buf, sizeof(buf)),
			 "latency,pending,wait,codel");
}

Test(pressure, stalled_is_full_pressure_unknown_is_none)
{
	struct tally_threshold_rule r = rule();
	struct tally__verdict_state st;
	struct tally__verdict_input in = { 0 };
	uint64_t t = 1000 * MS;

	r.stall_after_ms = 100;
	tally__verdict_init(&st, t);
	struct tally__verdict_out o = step(&st, &r, &in, t);
	cr_expect_eq(o.verdict, TALLY_VERDICT_UNKNOWN);
	cr_expect(near(o.pressure, 0.0) && near(o.shed_probability, 0.0));
	in = (struct tally__verdict_input){ .pending_consumers = 1, .pending_source = TALLY_PENDING_LIVE,
					    .pending = 10 };
	o = step(&st, &r, &in, t += 10 * MS);
	cr_expect(near(o.pressure, 0.005), "backlog 10 of warn 1000: %g", o.pressure);
	o = step(&st, &r, &in, t += 200 * MS);
	cr_expect_eq(o.reasons, TALLY_REASON_STALLED);
	cr_expect(near(o.pressure, 1.0) && near(o.shed_probability, 1.0));
}

Test(pressure, codel_settings_are_validated)
{
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r = rule();

	r.codel_interval_ms = 0;
	cr_expect_eq(tally_thresholds_add(t, "a", &r), -EINVAL);
	cr_expect(strstr(tally_errmsg(), "codel_interval_ms") && strstr(tally_errmsg(), "\"a\""), "%s",
		  tally_errmsg());
	r = rule();
	r.wait_p95_warn_ns = 2;
	r.wait_p95_overload_ns = 1;
	cr_expect_eq(tally_thresholds_add(t, "a", &r), -EINVAL);
	cr_expect(strstr(tally_errmsg(), "wait_p95_warn"), "%s", tally_errmsg());
	tally_thresholds_free(&t);
}

/* ---- CoDel on a real engine ------------------------------------------------ */

struct rig {
	char name[64];
	struct tally_segment *seg, *rd;
	struct tally_engine *eng;
	struct tally_producer *p;
	tally_subject_t id;
	uint64_t seq;
};

static void rig_start(struct rig *r, const char *subject)
{
	struct tally_segment_config cfg;
	struct tally_engine_config ec;
	struct tally_threshold_rule tr;
	struct tally_thresholds *t = tally_thresholds_new();

	tt_config(&cfg);
	snprintf(r->name, sizeof(r->name), "%s", tt_segname("codel"));
	cr_assert_eq(tally_segment_create(r->name, &cfg, 0, &r->seg), 0, "%s", tally_errmsg());
	tally_engine_config_init(&ec);
	ec.publish_interval_ms = 5;
	ec.drain_interval_us = 200;
	cr_assert_eq(tally_engine_start(r->seg, &ec, &r->eng), 0, "%s", tally_errmsg());
	tally_threshold_rule_init(&tr);
	tr.min_dwell_ms = 60000; /* once tripped it holds: no reading can miss it */
	tr.codel_target_ns = 5 * MS;
	tr.codel_interval_ms = 100;
	cr_assert_eq(tally_thresholds_add(t, subject, &tr), 0);
	tally_engine_set_thresholds(r->eng, &t);
	cr_assert_eq(tally_segment_open(r->name, TALLY_OPEN_READER, 0, &r->rd), 0);
	cr_assert_eq(tally_producer_attach(r->seg, &r->p), 0);
	cr_assert_eq(tally_subject_intern(r->seg, subject, &r->id), 0);
}

static void rig_stop(struct rig *r)
{
	tally_producer_detach(&r->p);
	tally_engine_stop(&r->eng);
	tally_segment_close(&r->rd);
	tally_segment_close(&r->seg);
}

/* One message that waited wait_ns, recorded now. */
static void one(struct rig *r, uint64_t wait_ns)
{
	char reply[128];
	uint64_t now = tally_real_ns();

	r->seq++;
	snprintf(reply, sizeof(reply), "$JS.ACK.S.C.1.%llu.%llu.%llu.0", (unsigned long long)r->seq,
		 (unsigned long long)r->seq, (unsigned long long)(now - wait_ns));
	cr_assert_eq(tally_record_jetstream_at(r->p, r->id, reply, strlen(reply), now), 0);
}

static void read_row(struct rig *r, struct tally_subject_stats *s)
{
	int rc = -ENOENT;

	for (int i = 0; i < 400 && (rc = tally_read_subject(r->rd, r->id, s)) == -ENOENT; i++)
		tt_sleep_ms(5); /* its first publish */
	cr_assert_eq(rc, 0, "%s", tally_strerror(rc));
}

Test(pressure, codel_ignores_a_burst_and_trips_on_a_standing_queue, .timeout = 60)
{
	struct rig r = { 0 };
	struct tally_subject_stats s;
	int i;

	rig_start(&r, "codel.orders");
	/* 400 ms of a steady trickle with short waits, a burst of 50 long
	 * waits (up to 80 ms) in the middle: every interval still sees a
	 * message that waited 1 ms */
	for (i = 0; i < 200; i++) {
		one(&r, 1 * MS);
		if (i == 100)
			for (int b = 0; b < 50; b++)
				one(&r, (uint64_t)(b + 30) * MS);
		tt_sleep_ms(2);
		read_row(&r, &s);
		cr_assert(!s.codel_overloaded && !(s.reasons & TALLY_REASON_CODEL),
			  "tripped by a burst at message %d: wait_min %llu ns", i, (unsigned long long)s.wait_min_ns);
	}
	cr_expect(s.codel_valid && s.wait_min_ns <= 2 * MS, "wait_min %llu", (unsigned long long)s.wait_min_ns);
	cr_expect_gt(s.wait_p99_ns, 30 * MS, "the burst is in the wait quantiles all the same");
	/* a standing queue: every message waits 20 ms, for as long as it takes
	 * an interval to end with that as its minimum (bounded) */
	for (i = 0; i < 2000; i++) {
		one(&r, 20 * MS);
		tt_sleep_ms(2);
		read_row(&r, &s);
		if (s.reasons & TALLY_REASON_CODEL)
			break;
	}
	cr_assert_lt(i, 2000, "a standing 20 ms queue never tripped CoDel");
	cr_expect(s.codel_overloaded);
	cr_expect_eq(s.verdict, TALLY_VERDICT_WARN);
	cr_expect(s.wait_min_ns >= 20 * MS * 127 / 128, "%llu", (unsigned long long)s.wait_min_ns);
	cr_expect(s.pressure > 0.5 && s.shed_probability > 0.0, "pressure %g shed %g", s.pressure,
		  s.shed_probability);
	/* short waits again: the next whole interval clears the CoDel flag
	 * (the level itself holds for the long dwell set above) */
	for (i = 0; i < 2000; i++) {
		one(&r, 1 * MS);
		tt_sleep_ms(2);
		read_row(&r, &s);
		if (!s.codel_overloaded)
			break;
	}
	cr_assert_lt(i, 2000, "CoDel never cleared");
	cr_expect(s.wait_min_ns <= 2 * MS);
	rig_stop(&r);
}
