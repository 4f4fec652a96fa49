/* SPDX-License-Identifier: MIT */
/*
 * part_record.c: the record path against its baselines, same process,
 * same run: a tally ring per thread (with no consumer, and with a drain
 * thread on another core), a mutex-protected shared histogram and an
 * atomic-increment shared histogram (both with tally's own bucket layout,
 * so only the sharing differs), for every thread count 1..--threads: the
 * thread sweep, one series per recorder (bench/plot.sh draws it). Every op
 * records a pseudo-random latency (xorshift, about 1 ns); one more row at
 * 1 thread records values read from a small table instead, to show what
 * the draw costs. With draining, the drain thread needs a core of its own:
 * at N threads on an N-core machine it shares one with a recorder.
 *
 * Honest rows (issue 18). Flat out against a drain thread, most records
 * meet a full ring, so that row measures the drop path and is labelled
 * so. The cost of a record while a consumer keeps up is measured paced:
 * each thread records at a fixed rate (bursts of 256, then a wait for the
 * burst's deadline) into the real engine (tally_engine_start, the default
 * 16,384-entry ring), and only the time inside the bursts counts. The
 * rate sweep goes up until drops begin; the highest rate with no drop is
 * a row of its own. The drop path alone is timed on a ring kept full
 * with no consumer.
 *
 * HdrHistogram_c (hdr_record_value_atomic) would be the obvious further
 * baseline, but Debian does not package it (only its Go and Java ports):
 * see BENCHMARKS.md.
 */
#include "config.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <tally/tally.h>

#include "harness.h"
#include "hist.h"
#include "producer.h"
#include "segment.h"

#define VALUE_MASK ((1u << 20) - 1) /* latencies up to ~1 ms */

/* ---- baselines ---------------------------------------------------------- */

struct shared_hist {
	pthread_mutex_t lock;
	_Atomic uint64_t count, sum;
	_Atomic uint64_t counts[TALLY__HIST_MAX_BUCKETS];
};

static struct shared_hist shared;

static void mutex_record(uint64_t v)
{
	uint32_t i = tally__hist_index(v);

	pthread_mutex_lock(&shared.lock);
	/* relaxed atomics under the lock compile to plain adds on x86 */
	atomic_store_explicit(&shared.counts[i], atomic_load_explicit(&shared.counts[i], memory_order_relaxed) + 1, memory_order_relaxed);
	atomic_store_explicit(&shared.count, atomic_load_explicit(&shared.count, memory_order_relaxed) + 1, memory_order_relaxed);
	atomic_store_explicit(&shared.sum, atomic_load_explicit(&shared.sum, memory_order_relaxed) + v, memory_order_relaxed);
	pthread_mutex_unlock(&shared.lock);
}

static void atomic_record(uint64_t v)
{
	uint32_t i = tally__hist_index(v);

	atomic_fetch_add_explicit(&shared.counts[i], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&shared.count, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&shared.sum, v, memory_order_relaxed);
}

/* ---- runs ------------------------------------------------------------------ */

enum variant { V_TALLY_NODRAIN, V_TALLY_TABLE, V_TALLY_DRAIN, V_MUTEX, V_ATOMIC };

#define TABLE_LEN 4096u /* 32 KB of values: stays in L1/L2 */
static uint64_t table[TABLE_LEN];

struct run {
	enum variant v;
	int nthreads;
	uint64_t ops;
	struct tally_segment *seg;
	pthread_barrier_t start;
	atomic_bool stop_drain;
	double ns_per_op[64];
	uint64_t dropped[64];
};

struct targ {
	struct run *r;
	int idx;
};

static void tally_loop(struct run *r, int idx, uint64_t *seed)
{
	struct tally_producer *p;

	if (tally_producer_attach(r->seg, &p) != 0) {
		fprintf(stderr, "bench: attach: %s\n", tally_errmsg());
		exit(1);
	}
	pthread_barrier_wait(&r->start);
	uint64_t t0 = bench_now_ns();
	if (r->v == V_TALLY_TABLE) {
		for (uint64_t i = 0; i < r->ops; i++) {
			tally_record(p, (tally_subject_t)(i & 7), table[i & (TABLE_LEN - 1)]);
			if ((i & 511) == 511)
				__atomic_store_n((uint64_t *)p->shm_head, p->tail, __ATOMIC_RELEASE);
		}
	} else if (r->v == V_TALLY_NODRAIN) {
		/* No consumer: the thread hands the ring back itself every 512
		 * records (one store), so it never fills. */
		for (uint64_t i = 0; i < r->ops; i++) {
			tally_record(p, (tally_subject_t)(i & 7), bench_rand(seed) & VALUE_MASK);
			if ((i & 511) == 511)
				__atomic_store_n((uint64_t *)p->shm_head, p->tail, __ATOMIC_RELEASE);
		}
	} else {
		for (uint64_t i = 0; i < r->ops; i++)
			tally_record(p, (tally_subject_t)(i & 7), bench_rand(seed) & VALUE_MASK);
	}
	r->ns_per_op[idx] = (double)(bench_now_ns() - t0) / (double)r->ops;
	struct tally_producer_counters c;
	tally_producer_counters(p, &c);
	r->dropped[idx] = c.dropped;
	tally_producer_detach(&p);
}

static void *thread_main(void *arg)
{
	struct targ *a = arg;
	struct run *r = a->r;
	uint64_t seed = 0x9e3779b97f4a7c15ull ^ (uint64_t)(a->idx + 1);

	bench_pin(a->idx);
	if (r->v == V_TALLY_NODRAIN || r->v == V_TALLY_TABLE || r->v == V_TALLY_DRAIN) {
		tally_loop(r, a->idx, &seed);
		return NULL;
	}
	void (*rec)(uint64_t) = r->v == V_MUTEX ? mutex_record : atomic_record;
	pthread_barrier_wait(&r->start);
	uint64_t t0 = bench_now_ns();
	for (uint64_t i = 0; i < r->ops; i++)
		rec(bench_rand(&seed) & VALUE_MASK);
	r->ns_per_op[a->idx] = (double)(bench_now_ns() - t0) / (double)r->ops;
	return NULL;
}

/* The drain thread: what the aggregator's ingest does minus the windows. */
static void *drain_main(void *arg)
{
	struct run *r = arg;
	struct tally_segment *seg = r->seg;
	uint64_t sink = 0;

	bench_pin(r->nthreads);
	while (!atomic_load_explicit(&r->stop_drain, memory_order_relaxed)) {
		for (uint32_t s = 0; s < seg->nslots; s++) {
			struct tally__slot *slot = tally__seg_slot(seg, s);
			uint64_t head, n = tally__slot_ready(seg, slot, &head);
			for (uint64_t k = 0; k < n; k++)
				sink += slot->ring[(head + k) & (seg->ring_cap - 1)].value_ns;
			if (n)
				tally__slot_consume(slot, head, n);
		}
	}
	return (void *)(uintptr_t)(sink & 1);
}

static double run_once(enum variant v, int nthreads, uint64_t ops, struct tally_segment *seg,
		       uint64_t *dropped)
{
	struct run r = { .v = v, .nthreads = nthreads, .ops = ops, .seg = seg };
	pthread_t th[64], drain;
	struct targ args[64];

	pthread_barrier_init(&r.start, NULL, (unsigned)nthreads);
	memset(&shared.counts, 0, sizeof(shared.counts));
	if (v == V_TALLY_DRAIN)
		pthread_create(&drain, NULL, drain_main, &r);
	for (int t = 0; t < nthreads; t++) {
		args[t] = (struct targ){ &r, t };
		pthread_create(&th[t], NULL, thread_main, &args[t]);
	}
	for (int t = 0; t < nthreads; t++)
		pthread_join(th[t], NULL);
	if (v == V_TALLY_DRAIN) {
		atomic_store(&r.stop_drain, true);
		pthread_join(drain, NULL);
	}
	pthread_barrier_destroy(&r.start);
	double sum = 0;
	*dropped = 0;
	for (int t = 0; t < nthreads; t++) {
		sum += r.ns_per_op[t];
		*dropped += r.dropped[t];
	}
	return sum / nthreads; /* mean over threads of each thread's ns/op */
}

static void measure(const char *series, enum variant v, int nthreads, uint64_t ops,
		    struct tally_segment *seg, const char *baseline)
{
	char name[72];
	double samples[256] = { 0 }, pct[256];
	uint64_t dropped;

	for (int i = 0; i < bench_opts.reps; i++) {
		samples[i] = run_once(v, nthreads, ops, seg, &dropped);
		pct[i] = 100.0 * (double)dropped / ((double)ops * nthreads);
	}
	snprintf(name, sizeof(name), "%s, %d thr", series, nthreads);
	bench_row_series("record", series, name, "ns/op", false, samples, bench_opts.reps, baseline, nthreads);
	/* A full ring drops (and counts) the sample: say how often the
	 * drainer fell behind, since a drop costs a look at the consumer's
	 * line that a stored record does not. */
	if (v == V_TALLY_DRAIN) {
		snprintf(name, sizeof(name), "dropped (ring full), flat out vs drain thread, %d thr", nthreads);
		bench_row_series("record", "dropped, flat out vs drain thread", name, "%", false, pct, bench_opts.reps,
				 NULL, nthreads);
	}
}

/* ---- paced, real engine draining ------------------------------------------- */

#define PACE_BURST 256u
#define PACE_SUBJECTS 8u

struct paced {
	struct tally_segment *seg;
	const tally_subject_t *ids;
	double rate;         /* records per second per thread */
	uint64_t dur_ns;
	pthread_barrier_t start;
	double ns_per_op[64];
	uint64_t dropped[64], done[64];
};

struct parg {
	struct paced *x;
	int idx;
};

static void *paced_main(void *arg)
{
	struct parg *a = arg;
	struct paced *x = a->x;
	struct tally_producer *p;
	uint64_t seed = 0x51ed27u + (uint64_t)a->idx, inside = 0, n = 0;
	double gap = (double)PACE_BURST * 1e9 / x->rate;

	bench_pin(a->idx);
	if (tally_producer_attach(x->seg, &p) != 0) {
		fprintf(stderr, "bench: attach: %s\n", tally_errmsg());
		exit(1);
	}
	pthread_barrier_wait(&x->start);
	uint64_t t0 = bench_now_ns();
	for (uint64_t k = 0;; k++) {
		uint64_t deadline = t0 + (uint64_t)((double)k * gap), now;
		while ((now = bench_now_ns()) < deadline)
			;
		if (now - t0 >= x->dur_ns)
			break;
		for (uint32_t i = 0; i < PACE_BURST; i++)
			tally_record(p, x->ids[(n + i) & (PACE_SUBJECTS - 1)], bench_rand(&seed) & VALUE_MASK);
		inside += bench_now_ns() - now;
		n += PACE_BURST;
	}
	struct tally_producer_counters c;
	tally_producer_counters(p, &c);
	x->ns_per_op[a->idx] = n ? (double)inside / (double)n : 0;
	x->dropped[a->idx] = c.dropped;
	x->done[a->idx] = n;
	tally_producer_detach(&p);
	return NULL;
}

/* One paced run: mean ns/op over threads; *drop_pct of all records. */
static double paced_once(struct tally_segment *seg, const tally_subject_t *ids, int nthreads, double rate,
			 double *drop_pct)
{
	struct paced x = { .seg = seg, .ids = ids, .rate = rate, .dur_ns = (uint64_t)(2e8 * bench_opts.scale) };
	struct parg args[64];
	pthread_t th[64];
	uint64_t drops = 0, n = 0;
	double sum = 0;

	if (x.dur_ns < 20000000u)
		x.dur_ns = 20000000u;
	pthread_barrier_init(&x.start, NULL, (unsigned)nthreads);
	for (int t = 0; t < nthreads; t++) {
		args[t] = (struct parg){ &x, t };
		pthread_create(&th[t], NULL, paced_main, &args[t]);
	}
	for (int t = 0; t < nthreads; t++) {
		pthread_join(th[t], NULL);
		sum += x.ns_per_op[t];
		drops += x.dropped[t];
		n += x.done[t];
	}
	pthread_barrier_destroy(&x.start);
	*drop_pct = n ? 100.0 * (double)drops / (double)n : 0;
	return sum / nthreads;
}

static const double pace_rates[] = { 0.5e6, 1e6, 2e6, 5e6, 10e6, 20e6, 50e6 };

/* The rate sweep at nthreads: ns/op and drops at each rate, then the
 * highest rate whose median drop share is 0. */
static void paced_sweep(int nthreads, const char *baseline)
{
	struct tally_segment_config cfg;
	struct tally_engine_config ecfg;
	struct tally_segment *seg;
	struct tally_engine *e;
	tally_subject_t ids[PACE_SUBJECTS];
	char seg_name[64], name[72], series[64];
	double best = 0;

	tally_segment_config_init(&cfg); /* the default ring: 16,384 entries */
	cfg.producer_slots = 64;
	snprintf(seg_name, sizeof(seg_name), "tally-bench-paced-%d", (int)getpid());
	if (tally_segment_create(seg_name, &cfg, 0, &seg) != 0) {
		fprintf(stderr, "bench: %s\n", tally_errmsg());
		exit(1);
	}
	for (uint32_t i = 0; i < PACE_SUBJECTS; i++) {
		char subj[32];
		snprintf(subj, sizeof(subj), "bench.paced.s%u", i);
		if (tally_subject_intern(seg, subj, &ids[i]) != 0)
			exit(1);
	}
	tally_engine_config_init(&ecfg);
	if (tally_engine_start(seg, &ecfg, &e) != 0) {
		fprintf(stderr, "bench: engine: %s\n", tally_errmsg());
		exit(1);
	}
	for (size_t k = 0; k < sizeof(pace_rates) / sizeof(pace_rates[0]); k++) {
		double ns[256], pct[256];
		for (int r = 0; r < bench_opts.reps; r++)
			ns[r] = paced_once(seg, ids, nthreads, pace_rates[k], &pct[r]);
		double m = bench_median(pct, bench_opts.reps);
		snprintf(series, sizeof(series), "tally ring, paced, engine draining, %d thr", nthreads);
		snprintf(name, sizeof(name), "paced %g M/s/thr, engine draining, %d thr", pace_rates[k] / 1e6, nthreads);
		/* the baselines only where nothing was dropped: the cost of a stored record */
		bench_row_series("record", series, name, "ns/op", false, ns, bench_opts.reps, m == 0 ? baseline : NULL,
				 pace_rates[k] / 1e6);
		snprintf(series, sizeof(series), "dropped, paced, %d thr", nthreads);
		snprintf(name, sizeof(name), "dropped, paced %g M/s/thr, %d thr", pace_rates[k] / 1e6, nthreads);
		bench_row_series("record", series, name, "%", false, pct, bench_opts.reps, NULL, pace_rates[k] / 1e6);
		if (m == 0)
			best = pace_rates[k] / 1e6;
		else
			break; /* drops have begun: the sweep stops here */
	}
	snprintf(name, sizeof(name), "highest paced rate with 0 drops, %d thr", nthreads);
	bench_row("record", name, "M/s/thr", true, &best, 1, NULL, nthreads);
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}

/* The drop path alone: a full ring, no consumer. */
static void drop_path(void)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	struct tally_producer *p;
	char seg_name[64];
	double ns[256];
	uint64_t ops = (uint64_t)(20e6 * bench_opts.scale), seed = 5;

	if (ops < 10000)
		ops = 10000;
	tally_segment_config_init(&cfg);
	cfg.producer_slots = 2;
	snprintf(seg_name, sizeof(seg_name), "tally-bench-drop-%d", (int)getpid());
	if (tally_segment_create(seg_name, &cfg, 0, &seg) != 0 || tally_producer_attach(seg, &p) != 0) {
		fprintf(stderr, "bench: %s\n", tally_errmsg());
		exit(1);
	}
	while (tally_record(p, 0, 1))
		; /* fill the ring: every later record is a drop */
	for (int r = 0; r < bench_opts.reps; r++) {
		uint64_t t0 = bench_now_ns();
		for (uint64_t i = 0; i < ops; i++)
			tally_record(p, (tally_subject_t)(i & 7), bench_rand(&seed) & VALUE_MASK);
		ns[r] = (double)(bench_now_ns() - t0) / (double)ops;
	}
	bench_row("record", "drop path: full ring, no consumer, 1 thr", "ns/op", false, ns, bench_opts.reps,
		  "tally ring, no drain, 1 thr", 1);
	tally_producer_detach(&p);
	tally_segment_close(&seg);
}

void bench_part_record(void)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	char seg_name[64];
	uint64_t fast_ops = (uint64_t)(20e6 * bench_opts.scale), slow_ops = (uint64_t)(2e6 * bench_opts.scale);
	uint64_t seed = 99;

	if (fast_ops < 10000)
		fast_ops = 10000;
	if (slow_ops < 10000)
		slow_ops = 10000;
	for (uint32_t i = 0; i < TABLE_LEN; i++)
		table[i] = bench_rand(&seed) & VALUE_MASK;
	pthread_mutex_init(&shared.lock, NULL);
	tally_segment_config_init(&cfg);
	cfg.producer_slots = 64;
	cfg.ring_capacity = 1u << 16;
	snprintf(seg_name, sizeof(seg_name), "tally-bench-%d", (int)getpid());
	if (tally_segment_create(seg_name, &cfg, 0, &seg) != 0) {
		fprintf(stderr, "bench: %s\n", tally_errmsg());
		exit(1);
	}
	for (int t = 1; t <= bench_opts.max_threads; t++) {
		char both[160];
		snprintf(both, sizeof(both), "mutex histogram, %d thr|atomic histogram, %d thr", t, t);
		measure("mutex histogram", V_MUTEX, t, slow_ops, NULL, NULL);
		measure("atomic histogram", V_ATOMIC, t, slow_ops, NULL, NULL);
		measure("tally ring, no drain", V_TALLY_NODRAIN, t, fast_ops, seg, both);
		if (t == 1)
			measure("tally ring, no drain, table values", V_TALLY_TABLE, t, fast_ops, seg, both);
		/* flat out, the drain thread cannot keep up: most records are
		 * drops, so no ratio to the histograms (see the paced rows) */
		measure("tally ring, flat out vs drain thread (mostly drops)", V_TALLY_DRAIN, t, fast_ops, seg, NULL);
	}
	tally_segment_close(&seg);
	drop_path();
	for (int t = 1; t <= bench_opts.max_threads; t++) {
		char both[160];
		snprintf(both, sizeof(both), "mutex histogram, %d thr|atomic histogram, %d thr", t, t);
		paced_sweep(t, both);
	}
	pthread_mutex_destroy(&shared.lock);
}
