/* SPDX-License-Identifier: MIT */
/*
 * test_e2e_overload.c: the end-to-end overload scenario, for real: a
 * nats-server with a stream and a durable consumer; a simulated router
 * (tools/sim.c) that pulls, spends a processing time on each message,
 * records its latency through libtally and acks; a publisher that first
 * stays below the router's capacity, then outpaces it, then stops. The
 * owner runs the engine and the poller; the test watches the verdict the
 * way a gateway does, through the segment. Every transition is logged
 * with its time, so a failure explains itself.
 *
 * Expected: ok; pending and P95 rise; warn, then overload; the publisher
 * stops and the router catches up; ok again, but only after the
 * hysteresis (clear level and dwell); nats-server killed: pending turns
 * cached and then stale, judged fail-open as configured; restarted: live
 * values come back without restarting the poller.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "../tools/sim.h"
#include "common/helpers.h"
#include "common/nats_server.h"

#define MS 1000000ull

struct watch {
	struct tally_segment *rd;
	tally_subject_t id;
	uint64_t t0;
	enum tally_verdict last;
	uint64_t last_change_ns, prev_change_ns; /* when the verdict last changed, and before */
	struct tally_subject_stats s;
	uint64_t max_pending; /* the largest backlog read so far */
};

static void log_line(struct watch *w, const char *what)
{
	char reasons[64];

	fprintf(stderr, "[e2e %6.2fs] %-34s verdict=%-8s reasons=%-24s p95=%.1fms n=%llu pending=%llu (%s, age %llums)\n",
		(double)(tally_now_ns() - w->t0) / 1e9, what, tally_verdict_name(w->s.verdict),
		tally_reasons_format(w->s.reasons, reasons, sizeof(reasons)), (double)w->s.p95_ns / 1e6,
		(unsigned long long)w->s.count, (unsigned long long)w->s.pending,
		w->s.pending_source == TALLY_PENDING_LIVE ? "live" :
		w->s.pending_source == TALLY_PENDING_CACHED ? "cached" :
		w->s.pending_source == TALLY_PENDING_NONE ? "none" : "never/gone",
		(unsigned long long)(w->s.pending_age_ns / MS));
}

/* Read the verdict from the segment; log when it changes. */
static void poll_verdict(struct watch *w)
{
	if (tally_subject_lookup(w->rd, "e2e.orders", &w->id) != 0)
		return;
	if (tally_read_subject(w->rd, w->id, &w->s) != 0)
		return;
	if (w->s.pending > w->max_pending)
		w->max_pending = w->s.pending;
	if (w->s.verdict != w->last) {
		log_line(w, "verdict changed");
		w->last = w->s.verdict;
		w->prev_change_ns = w->last_change_ns;
		w->last_change_ns = tally_now_ns();
	}
}

/* Wait until cond holds (checked every 20 ms), at most ms. */
#define WAIT_FOR(w, ms, cond)                                                      \
	({                                                                         \
		bool ok_ = false;                                                  \
		for (unsigned i_ = 0; i_ < (ms) / 20 && !(ok_ = (cond)); i_++) {   \
			tt_sleep_ms(20);                                           \
			poll_verdict(w);                                           \
		}                                                                  \
		ok_;                                                               \
	})

static struct tally_thresholds *thresholds(void)
{
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r;

	tally_threshold_rule_init(&r);
	r.p95_warn_ns = 200 * MS;
	r.p95_overload_ns = 800 * MS;
	r.pending_warn = 100;
	r.pending_overload = 600;
	r.min_samples = 5;
	r.min_dwell_ms = 1000;
	r.clear_ratio = 0.8;
	r.stale_after_ms = 1500;
	r.stale_policy = TALLY_STALE_FAIL_OPEN;
	tally_thresholds_add(t, "e2e.>", &r);
	return t;
}

/* A crash in this test must leave the stack of the thread that died in
 * the log: Criterion reports only the signal. (The one seen, glibc's
 * "double free or corruption" at the nats-server restart, was cnats'
 * _fetch overflow: tools/sim.c fetch_batch, tests/test_reconnect.c.) */
static void on_fatal(int sig)
{
	void *pc[64];
	int n = backtrace(pc, 64);

	(void)!write(2, "test_e2e_overload: fatal signal, stack:\n", 40);
	backtrace_symbols_fd(pc, n, 2);
	signal(sig, SIG_DFL);
	raise(sig);
}

Test(e2e, overload_scenario, .timeout = 150)
{
	signal(SIGABRT, on_fatal);
	signal(SIGSEGV, on_fatal);
	struct tally_test_nats nats = { 0 };
	char err[256], name[TALLY_NAME_MAX + 1];
	struct tally_segment_config scfg;
	struct tally_segment *seg;
	struct tally_engine_config ecfg;
	struct tally_engine *eng;
	struct tally_poller *poller;
	struct watch w = { .t0 = tally_now_ns(), .last = TALLY_VERDICT_UNKNOWN };

	cr_assert_eq(tally_test_nats_start(&nats, NULL, true), 0, "%s", nats.errmsg);
	cr_assert_eq(sim_setup(nats.url, "E2E", "e2e.>", true, "router", "e2e.>", err, sizeof(err)), 0,
		     "%s", err);

	tt_config(&scfg);
	strcpy(name, tt_segname("e2e"));
	cr_assert_eq(tally_segment_create(name, &scfg, 0, &seg), 0, "%s", tally_errmsg());
	tally_engine_config_init(&ecfg);
	ecfg.publish_interval_ms = 50;
	ecfg.slice_ns = 250 * MS;
	ecfg.window_ns = 1000 * MS;
	cr_assert_eq(tally_engine_start(seg, &ecfg, &eng), 0, "%s", tally_errmsg());
	struct tally_thresholds *t = thresholds();
	tally_engine_set_thresholds(eng, &t);
	struct tally_poller_watch pw = { .stream = "E2E", .consumer = "router" };
	struct tally_poller_config pcfg = {
		.urls = nats.url, .poll_interval_ms = 100, .request_timeout_ms = 500,
		.breaker_threshold = 3, .breaker_cooldown_ms = 500, .reconnect_wait_ms = 200,
		.watches = &pw, .nwatches = 1,
	};
	cr_assert_eq(tally_poller_start(seg, &pcfg, &poller), 0, "%s", tally_errmsg());
	cr_assert_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &w.rd), 0);

	/* Router: 2 workers x 10 ms each: capacity about 200 messages/s. */
	struct sim_router_config rcfg = { .url = nats.url, .stream = "E2E", .consumer = "router",
					  .filter = "e2e.>", .seg = seg, .workers = 2, .sigma = 0.2 };
	atomic_store(&rcfg.processing_ns, 10 * MS);
	struct sim_router *router;
	cr_assert_eq(sim_router_start(&rcfg, &router, err, sizeof(err)), 0, "%s", err);
	const char *subjects[] = { "e2e.orders" };
	struct sim_publisher_config pubcfg = { .url = nats.url, .subjects = subjects, .nsubjects = 1 };
	atomic_store(&pubcfg.rate, 50);
	struct sim_publisher *pub;
	cr_assert_eq(sim_publisher_start(&pubcfg, &pub, err, sizeof(err)), 0, "%s", err);

	/* 1: below capacity: ok, with a live backlog signal */
	cr_expect(WAIT_FOR(&w, 10000, w.s.verdict == TALLY_VERDICT_OK && w.s.pending_source == TALLY_PENDING_LIVE),
		  "ok at 50 msg/s");
	log_line(&w, "phase 1: steady below capacity");

	/* 2: the publisher outpaces the router */
	atomic_store(&pubcfg.rate, 1000);
	log_line(&w, "phase 2: publisher at 1000 msg/s");
	cr_expect(WAIT_FOR(&w, 20000, w.s.verdict >= TALLY_VERDICT_WARN), "warn");
	cr_expect(WAIT_FOR(&w, 20000, w.s.verdict == TALLY_VERDICT_OVERLOAD), "then overload");
	log_line(&w, "overload reached");
	/* the level may turn overload on latency first (a slowed router: ASan
	 * on a busy machine); the backlog keeps rising while the publisher runs */
	cr_expect(WAIT_FOR(&w, 10000, w.max_pending >= 600), "backlog rose past the overload level "
		  "(largest read %llu)", (unsigned long long)w.max_pending);
	cr_expect_gt(w.s.p95_ns, 10 * MS * 2, "P95 rose well above the processing time");
	cr_expect(w.s.reasons & (TALLY_REASON_PENDING | TALLY_REASON_LATENCY));
	cr_expect_gt(w.s.retry_after_ms, 0, "a retry-after hint for gateways");

	/* 3: the publisher stops; the router catches up; ok only after the hysteresis */
	atomic_store(&pubcfg.rate, 0);
	log_line(&w, "phase 3: publisher stopped");
	bool ok = WAIT_FOR(&w, 60000, w.s.verdict == TALLY_VERDICT_OK);
	cr_expect(ok, "back to ok after the backlog is worked off");
	/* hysteresis: when ok came, both signals were below the clear level
	 * of warn (80%), and the state it left had held for min_dwell */
	cr_expect_lt(w.s.pending, 80, "backlog below the clear level");
	cr_expect(w.s.count < 5 || w.s.p95_ns < 160 * MS, "P95 below the clear level, or too few samples");
	cr_expect_geq(w.last_change_ns - w.prev_change_ns, 1000 * MS - 60 * MS,
		      "the previous state held at least min_dwell (%.3f s)",
		      (double)(w.last_change_ns - w.prev_change_ns) / 1e9);
	log_line(&w, "recovered");

	/* 4: nats-server killed: cached, then stale, judged fail-open */
	atomic_store(&pubcfg.rate, 20);
	tally_test_nats_kill(&nats);
	log_line(&w, "phase 4: nats-server killed");
	cr_expect(WAIT_FOR(&w, 10000, w.s.pending_source == TALLY_PENDING_CACHED), "pending turns cached");
	uint64_t age1 = w.s.pending_age_ns;
	cr_expect(WAIT_FOR(&w, 10000, (w.s.reasons & TALLY_REASON_STALE) != 0), "then stale");
	cr_expect(w.s.reasons & TALLY_REASON_FAIL_OPEN, "judged fail-open, as configured");
	cr_expect_gt(w.s.pending_age_ns, age1, "its age grows");
	struct tally_poller_stats ps;
	cr_expect(WAIT_FOR(&w, 5000, tally_read_poller(w.rd, &ps) == 0 && strcmp(ps.breaker, "closed") != 0),
		  "the breaker opens");
	log_line(&w, "stale, fail-open");

	/* 5: restarted: live values again, same poller */
	cr_assert_eq(tally_test_nats_restart(&nats), 0, "%s", nats.errmsg);
	log_line(&w, "phase 5: nats-server restarted");
	cr_expect(WAIT_FOR(&w, 20000, w.s.pending_source == TALLY_PENDING_LIVE &&
					   !(w.s.reasons & TALLY_REASON_STALE)),
		  "live values come back without restarting the poller");
	log_line(&w, "live again");

	sim_publisher_stop(&pub);
	sim_router_stop(&router);
	tally_poller_stop(&poller);
	tally_segment_close(&w.rd);
	tally_engine_stop(&eng);
	tally_segment_close(&seg);
	tally_test_nats_stop(&nats);
}
