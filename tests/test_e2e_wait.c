/* SPDX-License-Identifier: MIT */
/*
 * test_e2e_wait.c: queueing delay end to end (issue 17). It owns the
 * scenario in which a router (tools/sim.c) pulls and acks through cnats
 * from a real nats-server and records, per message, its processing time
 * as latency and its wait from the ack reply's own metadata
 * (tally_record_jetstream); no poller runs, so the backlog too comes from
 * the metadata only. The owner's engine judges; the test reads the
 * segment as a gateway does. Every reading that changes something is
 * logged, so a failure explains itself.
 *
 * Expected: a trickle with a burst shorter than the CoDel interval leaves
 * CoDel alone; publishing twice as fast than the router works makes
 * the wait rise while the processing latency stays put, pressure climb
 * through intermediate values, the shed probability rise while the level
 * is still warn (ahead of overload), CoDel trip on the standing queue;
 * back to a trickle, the level comes down no sooner than its dwell.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <nats/nats.h>
#include <stdio.h>
#include <string.h>

#include "../tools/sim.h"
#include "common/helpers.h"
#include "common/nats_server.h"

#define MS 1000000ull
#define DWELL_MS 1000u

struct watch {
	struct tally_segment *rd;
	tally_subject_t id;
	bool have_id;
	uint64_t t0;
	struct tally_subject_stats s, prev;
};

static void log_line(struct watch *w, const char *what)
{
	char reasons[96];

	fprintf(stderr, "[e2e-wait %6.2fs] %-22s %-8s %-20s p95=%6.1fms wait p95=%7.1fms min=%6.1fms "
		"pending=%-5llu pressure=%.3f shed=%.3f\n",
		(double)(tally_now_ns() - w->t0) / 1e9, what, tally_verdict_name(w->s.verdict),
		tally_reasons_format(w->s.reasons, reasons, sizeof(reasons)), (double)w->s.p95_ns / 1e6,
		(double)w->s.wait_p95_ns / 1e6, (double)w->s.wait_min_ns / 1e6,
		(unsigned long long)w->s.pending, w->s.pressure, w->s.shed_probability);
}

static bool poll(struct watch *w)
{
	if (!w->have_id)
		w->have_id = tally_subject_lookup(w->rd, "wait.orders", &w->id) == 0;
	if (!w->have_id || tally_read_subject(w->rd, w->id, &w->s) != 0)
		return false;
	if (w->s.verdict != w->prev.verdict || w->s.reasons != w->prev.reasons)
		log_line(w, "changed");
	w->prev = w->s;
	return true;
}

static struct tally_thresholds *thresholds(void)
{
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r;

	tally_threshold_rule_init(&r);
	r.p95_warn_ns = 200 * MS; /* processing is 2 ms: latency never decides */
	r.p95_overload_ns = 800 * MS;
	r.wait_p95_warn_ns = 100 * MS;
	r.wait_p95_overload_ns = 800 * MS;
	r.pending_warn = 20000; /* the wait decides, not the backlog */
	r.pending_overload = 100000;
	/* CoDel's own defaults are 5 ms and 100 ms; a test on a loaded 2-core
	 * machine sees scheduling delays of several ms on an idle router, so
	 * it asks a standing queue of 20 ms for 200 ms: the burst (30 ms of
	 * work) is still far shorter than the interval */
	r.codel_target_ns = 20 * MS;
	r.codel_interval_ms = 200;
	r.min_samples = 5;
	r.min_dwell_ms = DWELL_MS;
	tally_thresholds_add(t, "wait.>", &r);
	return t;
}

Test(e2e_wait, wait_rises_first_pressure_grades_codel_ignores_bursts, .timeout = 150)
{
	struct tally_test_nats nats = { 0 };
	char err[256], name[TALLY_NAME_MAX + 1];
	struct tally_segment_config scfg;
	struct tally_segment *seg;
	struct tally_engine_config ecfg;
	struct tally_engine *eng;
	struct watch w = { .t0 = tally_now_ns() };

	cr_assert_eq(tally_test_nats_start(&nats, NULL, true), 0, "%s", nats.errmsg);
	cr_assert_eq(sim_setup(nats.url, "WAIT", "wait.>", false, "router", "wait.>", err, sizeof(err)), 0,
		     "%s", err);
	tt_config(&scfg);
	strcpy(name, tt_segname("e2ewait"));
	cr_assert_eq(tally_segment_create(name, &scfg, 0, &seg), 0, "%s", tally_errmsg());
	tally_engine_config_init(&ecfg);
	ecfg.publish_interval_ms = 20;
	ecfg.slice_ns = 250 * MS;
	ecfg.window_ns = 1000 * MS;
	cr_assert_eq(tally_engine_start(seg, &ecfg, &eng), 0, "%s", tally_errmsg());
	struct tally_thresholds *t = thresholds();
	tally_engine_set_thresholds(eng, &t);
	cr_assert_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &w.rd), 0);

	/* one worker, 2 ms a message: about 500 messages/s */
	struct sim_router_config rcfg = { .url = nats.url, .stream = "WAIT", .consumer = "router",
					  .filter = "wait.>", .seg = seg, .workers = 1, .sigma = 0.1,
					  .jetstream_wait = true };
	atomic_store(&rcfg.processing_ns, 2 * MS);
	struct sim_router *router;
	cr_assert_eq(sim_router_start(&rcfg, &router, err, sizeof(err)), 0, "%s", err);
	const char *subjects[] = { "wait.orders" };
	struct sim_publisher_config pubcfg = { .url = nats.url, .subjects = subjects, .nsubjects = 1 };
	atomic_store(&pubcfg.rate, 50);
	struct sim_publisher *pub;
	cr_assert_eq(sim_publisher_start(&pubcfg, &pub, err, sizeof(err)), 0, "%s", err);

	/* 1. a trickle (50/s, the router 10% busy), with a burst of 15
	 * messages (30 ms of work, less than the 200 ms interval) halfway:
	 * CoDel must stay quiet */
	natsConnection *nc = NULL;
	cr_assert_eq(natsConnection_ConnectTo(&nc, nats.url), NATS_OK);
	jsCtx *js = NULL;
	cr_assert_eq(natsConnection_JetStream(&js, nc, NULL), NATS_OK);
	for (int i = 0; i < 150; i++) { /* 3 s */
		if (i == 75) {
			for (int b = 0; b < 15; b++)
				cr_assert_eq(js_Publish(NULL, js, "wait.orders", "b", 1, NULL, NULL), NATS_OK);
			log_line(&w, "burst published");
		}
		tt_sleep_ms(20);
		if (!poll(&w))
			continue;
		cr_assert(!(w.s.reasons & TALLY_REASON_CODEL) && !w.s.codel_overloaded,
			  "CoDel tripped on a trickle and a short burst: wait min %.1f ms",
			  (double)w.s.wait_min_ns / 1e6);
	}
	cr_assert(w.have_id && w.s.has_wait && w.s.codel_valid, "waits were recorded from the metadata");
	/* the burst's own wait is its length in work: 15 x 2 ms here, but
	 * under ASan on a loaded 2-core VM the same messages took 6.7 ms each
	 * (p95), and the burst's last one waited 103 ms, just over the 100 ms
	 * warn level (pressure 0.502, seen once in CI). What must hold on any
	 * machine is that CoDel stays quiet (above) and the burst never reads
	 * as an overload */
	cr_expect_neq(w.s.verdict, TALLY_VERDICT_OVERLOAD);
	cr_expect_lt(w.s.pressure, 0.75, "a short burst grazes warn at most: %.3f", w.s.pressure);
	cr_expect_eq(w.s.wait_skewed, 0, "one host, one clock");
	log_line(&w, "trickle done");

	/* 2. twice the router's capacity: a standing queue */
	atomic_store(&pubcfg.rate, 1000);
	double rising[3] = { 0 };
	int nrising = 0;
	bool latency_reason = false, wait_first = false, codel = false, shed_before_overload = false;
	uint64_t max_pending = 0;
	for (int i = 0; i < 1500 && w.s.verdict != TALLY_VERDICT_OVERLOAD; i++) { /* at most 30 s */
		tt_sleep_ms(20);
		if (!poll(&w))
			continue;
		latency_reason |= (w.s.reasons & TALLY_REASON_LATENCY) != 0;
		if (!latency_reason && (w.s.reasons & (TALLY_REASON_WAIT | TALLY_REASON_CODEL)))
			wait_first = true;
		codel |= w.s.codel_overloaded;
		if (w.s.verdict == TALLY_VERDICT_WARN && w.s.shed_probability > 0.0 && w.s.shed_probability < 1.0)
			shed_before_overload = true;
		if (w.s.pending_source == TALLY_PENDING_LIVE && w.s.pending > max_pending)
			max_pending = w.s.pending;
		if (w.s.pressure > 0.0 && w.s.pressure < 1.0 && nrising < 3 &&
		    (nrising == 0 || w.s.pressure > rising[nrising - 1] + 0.05))
			rising[nrising++] = w.s.pressure;
	}
	log_line(&w, "overload phase done");
	cr_assert_eq(w.s.verdict, TALLY_VERDICT_OVERLOAD, "the standing queue never made an overload");
	cr_expect(wait_first, "the wait (or CoDel) raised the level before the latency did");
	cr_expect(!latency_reason, "the processing latency stayed under its thresholds");
	cr_expect_lt(w.s.p95_ns, 200 * MS);
	cr_expect(w.s.reasons & TALLY_REASON_WAIT, "overload by wait");
	cr_expect(codel, "a standing queue trips CoDel");
	cr_expect_eq(nrising, 3, "pressure climbed through intermediate values: %g %g %g", rising[0], rising[1],
		     rising[2]);
	cr_expect(shed_before_overload, "shed probability rose while the level was still warn");
	cr_expect_gt(max_pending, 0, "the backlog came from the ack metadata alone (no poller runs)");
	cr_expect(w.s.pressure >= 1.0 && w.s.shed_probability >= 1.0);

	/* 3. back to a trickle: the queue drains, the level comes down, each
	 * step no sooner than the dwell after the last */
	atomic_store(&pubcfg.rate, 50);
	uint64_t since = w.s.verdict_since_ns;
	enum tally_verdict at = w.s.verdict;
	for (int i = 0; i < 3000 && !(w.s.verdict == TALLY_VERDICT_OK); i++) { /* at most 60 s */
		tt_sleep_ms(20);
		if (!poll(&w) || w.s.verdict == at)
			continue;
		cr_expect_lt(w.s.verdict, at, "only down while recovering");
		cr_expect_geq(w.s.verdict_since_ns - since, (uint64_t)DWELL_MS * MS, "left %s before its dwell",
			      tally_verdict_name(at));
		since = w.s.verdict_since_ns;
		at = w.s.verdict;
	}
	cr_expect_eq(w.s.verdict, TALLY_VERDICT_OK, "recovered");
	cr_expect_lt(w.s.pressure, 0.5);
	cr_expect_eq(w.s.shed_probability, 0.0);

	sim_publisher_stop(&pub);
	sim_router_stop(&router);
	jsCtx_Destroy(js);
	natsConnection_Destroy(nc);
	tally_segment_close(&w.rd);
	tally_engine_stop(&eng);
	tally_segment_close(&seg);
	tally_test_nats_stop(&nats);
}
