/* SPDX-License-Identifier: MIT */
/*
 * bench/part_hosts.c: the part "hosts" (issue 19, BENCHMARKS.md "Many
 * hosts"). A real 3-node JetStream cluster on loopback
 * (tests/common/nats_cluster.c) and two hosts in this process: segments
 * A and B, each with its own engine and share thread (hosts "a", "b"),
 * sharing through an R3 KV bucket, exactly as two tallyd would.
 *   - propagation: B's verdict for a subject flips (ok <-> overload); the
 *     time from B's own segment showing it to A's remote section showing
 *     it, p50 and p99 of 20 flips per repetition (B publishes every
 *     100 ms, its share thread looks every 90 ms: the phase between the
 *     two drifts from flip to flip, where equal periods kept one phase for
 *     a whole run and made its p50 anything from 5 to 95 ms);
 *   - KV writes per second of host B at 1,000 subjects: steady (nothing
 *     changes: refreshes only, refresh_ms 2,000) and changing (every
 *     subject's latency level is drawn again every 100 ms from 1..32 ms,
 *     and the window is two 100 ms slices, so that most subjects' P95
 *     moves by more than the 20% that makes a put due at most publishes:
 *     thousands of puts due per second, more than one host can write),
 *     beside the puts that failed in the same time (must be 0);
 *   - the aggregator's cost: B's publish time at 1,000 subjects with its
 *     share thread running, beside the same with it stopped (baseline).
 */
#define _GNU_SOURCE
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <tally/tally.h>

#include "harness.h"
#include "nats_cluster.h"

#define PART "hosts"
#define NSUBJ 1000

struct host {
	struct tally_segment *seg;
	struct tally_engine *eng;
	struct tally_share *share;
	char name[64];
};

static void quiet(void *ctx, int level, const char *msg)
{
	(void)ctx;
	if (level == 0 && getenv("TALLY_BENCH_LOG"))
		fprintf(stderr, "share: %s\n", msg);
}

static void sleep_us(unsigned us)
{
	usleep(us);
}

static int host_start(struct host *h, const char *host, const char *urls)
{
	struct tally_segment_config sc;
	struct tally_engine_config ec;
	struct tally_share_config sh;
	struct tally_threshold_rule r;
	struct tally_thresholds *t;

	snprintf(h->name, sizeof(h->name), "tally-bench-host-%s-%d", host, (int)getpid());
	tally_segment_config_init(&sc);
	sc.subject_capacity = 2048;
	sc.remote_capacity = 4096;
	sc.producer_slots = 4;
	tally_engine_config_init(&ec);
	ec.slice_ns = 100000000;
	ec.window_ns = 200000000; /* two slices: a P95 follows the last ~100 ms */
	if (tally_segment_create(h->name, &sc, TALLY_CREATE_REPLACE_DEAD, &h->seg) ||
	    tally_engine_start(h->seg, &ec, &h->eng))
		return -1;
	t = tally_thresholds_new();
	tally_threshold_rule_init(&r);
	r.p95_warn_ns = 20000000;
	r.p95_overload_ns = 50000000;
	r.min_samples = 5;
	r.min_dwell_ms = 0;
	tally_thresholds_add(t, NULL, &r);
	tally_engine_set_thresholds(h->eng, &t);
	tally_share_config_init(&sh);
	sh.urls = urls;
	sh.host = host;
	sh.replicas = 3;
	sh.interval_ms = 90; /* against publish 100 ms: see propagation above */
	sh.refresh_ms = 2000;
	sh.max_age_ms = 12000;
	sh.log = quiet;
	return tally_share_start(h->seg, &sh, &h->share);
}

static void host_stop(struct host *h)
{
	tally_share_stop(&h->share);
	tally_engine_stop(&h->eng);
	tally_segment_close(&h->seg);
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* Record v on id until B's own row is `want`; returns false after 10 s. */
static bool drive(struct tally_producer *p, struct tally_segment *b, tally_subject_t id, uint64_t v,
		  enum tally_verdict want)
{
	struct tally_subject_stats st;
	uint64_t end = bench_now_ns() + 10000000000ull;

	while (bench_now_ns() < end) {
		for (int i = 0; i < 5; i++)
			tally_record(p, id, v);
		if (tally_read_subject(b, id, &st) == 0 && st.verdict == want)
			return true;
		sleep_us(500);
	}
	return false;
}

/* One flip: ms from B showing want to A's remote row showing it; < 0 on a timeout. */
static double flip(struct tally_producer *p, struct host *a, struct host *b, tally_subject_t id, uint64_t v,
		   enum tally_verdict want)
{
	struct tally_remote_stats rs;
	uint64_t t0, end;

	if (!drive(p, b->seg, id, v, want))
		return -1;
	t0 = bench_now_ns();
	for (end = t0 + 10000000000ull; bench_now_ns() < end; sleep_us(200)) {
		tally_record(p, id, v);
		if (tally_read_remote_worst(a->seg, "bench.flip", &rs) == 0 && rs.verdict == want)
			return (double)(bench_now_ns() - t0) / 1e6;
	}
	return -1;
}

static void propagation(struct host *a, struct host *b)
{
	struct tally_producer *p = NULL;
	tally_subject_t id;
	int reps = bench_opts.reps, trials = 20;
	double p50[16], p99[16], lat[32];

	if (tally_subject_intern(b->seg, "bench.flip", &id) || tally_producer_attach(b->seg, &p)) {
		bench_failed = true;
		return;
	}
	for (int r = 0; r < reps && r < 16; r++) {
		int n = 0;

		for (int t = 0; t < trials; t++) {
			double ms = flip(p, a, b, id, t % 2 ? 1000000 : 200000000,
					 t % 2 ? TALLY_VERDICT_OK : TALLY_VERDICT_OVERLOAD);

			if (ms >= 0)
				lat[n++] = ms;
		}
		if (n == 0) {
			fprintf(stderr, "  %s: no flip reached host A\n", PART);
			bench_failed = true;
			break;
		}
		qsort(lat, (size_t)n, sizeof(double), cmp);
		p50[r] = lat[n / 2];
		p99[r] = lat[n - 1 - (n - 1) / 100];
	}
	bench_row(PART, "propagation B verdict -> A segment, p50", "ms", false, p50, reps < 16 ? reps : 16, NULL, 0);
	bench_row(PART, "propagation B verdict -> A segment, p99", "ms", false, p99, reps < 16 ? reps : 16, NULL, 0);
	tally_producer_detach(&p);
}

static uint64_t puts_of(struct host *h, uint64_t *errors)
{
	struct tally_share_status st;

	if (tally_read_share(h->seg, &st) != 0)
		return 0;
	*errors = st.put_errors;
	return st.puts;
}

/* Subject i's latency level in 100 ms round r: 1, 2, 4 .. 32 ms. */
static uint64_t level(int i, uint64_t r)
{
	uint64_t x = (uint64_t)i * 0x9e3779b97f4a7c15ull ^ r * 0xbf58476d1ce4e5b9ull;

	x ^= x >> 31;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 29;
	return 1000000ull << (x % 6);
}

/* Record into all subjects for secs: steady (the same value) or changing
 * (each subject's level drawn again every 100 ms, small noise around it). */
static void load(struct tally_producer *p, const tally_subject_t *ids, double secs, bool changing, uint64_t *rng)
{
	uint64_t end = bench_now_ns() + (uint64_t)(secs * 1e9);

	while (bench_now_ns() < end) {
		uint64_t round = bench_now_ns() / 100000000ull;

		for (int i = 0; i < NSUBJ; i++)
			for (int k = 0; k < 3; k++)
				tally_record(p, ids[i], changing ? level(i, round) + bench_rand(rng) % 100000 : 1000000);
		sleep_us(changing ? 20000 : 50000);
	}
}

static double publish_ms(struct host *h, struct tally_producer *p, const tally_subject_t *ids, uint64_t *rng)
{
	double v[30];
	int n = 0;

	for (int i = 0; i < 30; i++) {
		struct tally_engine_counters c;

		load(p, ids, 0.1, true, rng);
		tally_engine_counters(h->eng, &c);
		v[n++] = (double)c.last_publish_ns / 1e6;
	}
	return bench_median(v, n);
}

static void writes_and_cost(struct host *b, const char *urls)
{
	struct tally_producer *p = NULL;
	tally_subject_t ids[NSUBJ];
	int reps = bench_opts.reps < 5 ? bench_opts.reps : 5;
	double steady[8], changing[8], failed[8], on[8], off[8];
	uint64_t rng = 88172645463325252ull;
	char name[64];

	for (int i = 0; i < NSUBJ; i++) {
		snprintf(name, sizeof(name), "bench.k.%d", i);
		if (tally_subject_intern(b->seg, name, &ids[i])) {
			bench_failed = true;
			return;
		}
	}
	if (tally_producer_attach(b->seg, &p)) {
		bench_failed = true;
		return;
	}
	load(p, ids, 3.0, false, &rng); /* every subject put once, then steady */
	for (int r = 0; r < reps; r++) {
		uint64_t e0 = 0, e1 = 0, p0;

		if (r)
			load(p, ids, 2.0, false, &rng); /* calm again after the last round's changes */
		p0 = puts_of(b, &e0);
		load(p, ids, 4.0, false, &rng);
		steady[r] = (double)(puts_of(b, &e1) - p0) / 4.0;
		p0 = puts_of(b, &e0);
		load(p, ids, 4.0, true, &rng);
		changing[r] = (double)(puts_of(b, &e1) - p0) / 4.0;
		failed[r] = (double)(e1 - e0);
		on[r] = publish_ms(b, p, ids, &rng);
	}
	tally_share_stop(&b->share);
	for (int r = 0; r < reps; r++)
		off[r] = publish_ms(b, p, ids, &rng);
	bench_row(PART, "KV writes/s, host B, 1000 subjects steady (refresh 2 s)", "writes/s", false, steady, reps,
		  NULL, NSUBJ);
	bench_row(PART, "KV writes/s, host B, 1000 subjects changing", "writes/s", true, changing, reps, NULL, NSUBJ);
	bench_row(PART, "KV puts failed while changing (4 s)", "puts", false, failed, reps, NULL, 0);
	bench_row(PART, "aggregator publish, 1000 subjects, sharing off", "ms", false, off, reps, NULL, NSUBJ);
	bench_row(PART, "aggregator publish, 1000 subjects, sharing on", "ms", false, on, reps,
		  "aggregator publish, 1000 subjects, sharing off", NSUBJ);
	(void)urls;
	tally_producer_detach(&p);
}

void bench_part_hosts(void)
{
	struct tally_test_cluster cl;
	struct host a = { 0 }, b = { 0 };

	if (tally_test_cluster_start(&cl) != 0) {
		fprintf(stderr, "  %s: %s\n", PART, cl.errmsg);
		bench_failed = true;
		return;
	}
	if (host_start(&a, "a", cl.urls) || host_start(&b, "b", cl.urls)) {
		fprintf(stderr, "  %s: cannot start the hosts: %s\n", PART, tally_errmsg());
		bench_failed = true;
	} else {
		sleep(2); /* both bound, the bucket made */
		propagation(&a, &b);
		writes_and_cost(&b, cl.urls);
	}
	host_stop(&b);
	host_stop(&a);
	tally_test_cluster_stop(&cl);
}
