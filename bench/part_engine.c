/* SPDX-License-Identifier: MIT */
/*
 * part_engine.c: the aggregator engine's four measured paths, each beside
 * what it is judged against in the same run.
 *
 *   ingest   samples drained and bucketed per second on one core: the
 *            ingest loop as in engine.c (drain_slot/drain_all are static
 *            there, so the same loop is reproduced here) over rings filled
 *            beforehand by this thread, so no thread competes with the
 *            timed loop, with the samples spread over each --subjects count
 *            (the subject sweep: more subjects, more cache misses), beside
 *            its floor in the same run: a streaming pass over the same
 *            filled rings that loads every entry and hands the ring back,
 *            but buckets nothing; both also per second of the thread's
 *            CPU time (CLOCK_THREAD_CPUTIME_ID), which a loaded machine's
 *            preemptions do not inflate; and per CPU second beside a
 *            second floor, the memory system's: the two cache lines a
 *            sample must touch with a dense histogram per subject, fetched
 *            ahead from addresses computed without a load (floor2_pass).
 *            Then end to end through the real engine at 100 subjects,
 *            one producer thread recording as fast as it can, retrying when its ring is full (sharing the machine's
 *            cores with the aggregator); and delivered samples/s (what
 *            the engine drained, per second) with 1, 2 and 2 x --threads
 *            producers recording flat out without retrying, beside the
 *            share they dropped.
 *   publish  duration of one publish (tally_engine_counters().
 *            last_publish_ns) for each --subjects count of active subjects.
 *   window   the window length sweep, --slices slices of 1 s: the real
 *            engine's publish with 1,000 subjects and that window; and,
 *            on windows driven here with a synthetic clock and filled to
 *            the brim (1,000 values per subject per slice, every slice of
 *            the window closed), the slice close and the stats call of
 *            1,000 subjects and the heap held per subject; and the whole
 *            engine's heap per subject (rows, export buckets, snapshot),
 *            busy and after a whole window idle, at 1,000 and 10,000.
 *   read     tally_engine_read (in-process, RCU) and tally_read_subject
 *            (a second, read-only handle; and a forked process that opens
 *            the segment itself) beside a mutex-protected copy of the
 *            stats struct and a plain memcpy of it.
 *   visible  time from tally_record() until tally_engine_read shows the
 *            sample, at publish intervals of 100 ms and 10 ms.
 *
 * Segments are named tally-bench-<what>-<pid> and removed by their
 * owner's close; an atexit handler unlinks any left by an early exit.
 */
#include "config.h"

#include <malloc.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <tally/tally.h>
#include <urcu-bp.h>

#include "arena.h"
#include "engine_priv.h"
#include "export.h"
#include "hist.h"
#include "harness.h"
#include "pending.h"
#include "proc.h"
#include "producer.h"
#include "remote.h"
#include "segment.h"
#include "window.h"

/* ---- shared helpers ------------------------------------------------------- */

/* Keep a value: the compiler must assume the asm reads it. */
#define KEEP_SINK(v) __asm__ __volatile__("" : : "r"(v) : "memory")

static char live_names[8][64];

static void unlink_live(void)
{
	for (size_t i = 0; i < sizeof(live_names) / sizeof(live_names[0]); i++)
		if (live_names[i][0])
			tally_segment_unlink(live_names[i]);
}

static void die(const char *what, int rc)
{
	fprintf(stderr, "tally-bench: %s: %s (%s)\n", what, tally_strerror(rc), tally_errmsg());
	exit(1);
}

static struct tally_segment *seg_create(const char *what, const struct tally_segment_config *cfg,
					char *name, size_t len)
{
	static bool registered;
	struct tally_segment *seg;
	int rc;

	snprintf(name, len, "tally-bench-%s-%d", what, (int)getpid());
	if ((rc = tally_segment_create(name, cfg, 0, &seg)) != 0)
		die(name, rc);
	if (!registered)
		atexit(unlink_live);
	registered = true;
	for (size_t i = 0; i < sizeof(live_names) / sizeof(live_names[0]); i++)
		if (!live_names[i][0]) {
			snprintf(live_names[i], sizeof(live_names[i]), "%s", name);
			break;
		}
	return seg;
}

static void seg_close(struct tally_segment **seg, const char *name)
{
	tally_segment_close(seg);
	for (size_t i = 0; i < sizeof(live_names) / sizeof(live_names[0]); i++)
		if (!strcmp(live_names[i], name))
			live_names[i][0] = '\0';
}

static tally_subject_t intern(struct tally_segment *seg, const char *tag, uint32_t i)
{
	char subj[64];
	tally_subject_t id;
	int rc;

	snprintf(subj, sizeof(subj), "bench.%s.s%u", tag, i);
	if ((rc = tally_subject_intern(seg, subj, &id)) != 0)
		die(subj, rc);
	return id;
}

static struct tally_engine *engine_start(struct tally_segment *seg, uint32_t publish_ms)
{
	struct tally_engine_config cfg;
	struct tally_engine *e;
	int rc;

	tally_engine_config_init(&cfg);
	cfg.publish_interval_ms = publish_ms;
	if ((rc = tally_engine_start(seg, &cfg, &e)) != 0)
		die("tally_engine_start", rc);
	return e;
}

static struct tally_producer *attach(struct tally_segment *seg)
{
	struct tally_producer *p;
	int rc;

	if ((rc = tally_producer_attach(seg, &p)) != 0)
		die("tally_producer_attach", rc);
	return p;
}

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = { (time_t)(ns / 1000000000u), (long)(ns % 1000000000u) };

	nanosleep(&ts, NULL);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

/* Log-normal latencies around 200 us (sigma 1.2): as part_hist.c. */
static uint64_t latency(uint64_t *s)
{
	double u1 = ((double)(bench_rand(s) >> 11) + 0.5) / 9007199254740992.0;
	double u2 = ((double)(bench_rand(s) >> 11) + 0.5) / 9007199254740992.0;
	double z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);

	return (uint64_t)exp(log(200000.0) + 1.2 * z);
}

static uint64_t scaled(double base, uint64_t floor_)
{
	double n = base * bench_opts.scale;

	return n < (double)floor_ ? floor_ : (uint64_t)n;
}

static void wait_drained(struct tally_engine *e, uint64_t target)
{
	struct tally_engine_counters c;

	for (tally_engine_counters(e, &c); c.drained < target; tally_engine_counters(e, &c))
		sleep_ns(100000);
}

/* ---- ingest ----------------------------------------------------------------- */

#define INGEST_SLOTS 8u
#define INGEST_RING (1u << 16)
#define E2E_SUBJECTS 100u
/* The ingest is engine.c's own loop (tally__engine_ingest), run on an
 * engine without its thread so that it has one core to itself. */

struct ingest_data {
	uint64_t values[INGEST_RING];
	tally_subject_t ids[INGEST_RING];
};

/* Fill every ring to the brim from this thread. */
static uint64_t ingest_fill(struct tally_producer **p, const struct ingest_data *d)
{
	uint64_t n = 0;

	for (uint32_t k = 0; k < INGEST_SLOTS; k++)
		for (uint32_t i = 0; i < INGEST_RING; i++)
			n += tally_record(p[k], d->ids[(i + k * 4099u) & (INGEST_RING - 1)],
					  d->values[(i * 7u + k) & (INGEST_RING - 1)]);
	return n;
}

/* CPU time of the calling thread, ns: what the ingest rows "per CPU
 * second" divide by, so that time the thread spent preempted (a loaded
 * machine) does not count as time spent ingesting. */
static uint64_t thread_cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Drain until empty; returns ns spent, adds the samples taken to *got
 * and the thread's CPU ns to *cpu. */
static uint64_t ingest_drain(struct tally_engine *g, uint64_t *got, uint64_t *cpu)
{
	uint64_t c0 = thread_cpu_ns(), t0 = bench_now_ns(), now = t0, n;

	while ((n = tally__engine_ingest(g, now)) != 0) {
		*got += n;
		now = bench_now_ns();
	}
	*cpu += thread_cpu_ns() - c0;
	return bench_now_ns() - t0;
}

#define R_INGEST "ingest loop as in engine.c, 1 core"
#define R_FLOOR "floor: streaming pass over the rings"

/* The floor: every ring read once, each entry's three words loaded and
 * summed, the ring handed back; no window touched. ns spent. */
static uint64_t stream_pass(struct tally_segment *seg, uint64_t *got)
{
	uint64_t t0 = bench_now_ns(), sink = 0, mask = seg->ring_cap - 1;

	for (uint32_t i = 0; i < seg->nslots; i++) {
		struct tally__slot *s = tally__seg_slot(seg, i);
		uint64_t head, n;
		while ((n = tally__slot_ready(seg, s, &head)) != 0) {
			for (uint64_t k = 0; k < n; k++) {
				const struct tally_ring_entry *r = &s->ring[(head + k) & mask];
				sink += __atomic_load_n(&r->subject, __ATOMIC_RELAXED) +
					__atomic_load_n(&r->value_ns, __ATOMIC_RELAXED) +
					__atomic_load_n(&r->reserved, __ATOMIC_RELAXED);
			}
			tally__slot_consume(s, head, n);
			*got += n;
		}
	}
	uint64_t ns = bench_now_ns() - t0;
	KEEP_SINK(sink);
	return ns;
}

#define R_FLOOR2 "floor: 2 lines a sample, ideal prefetch"

/* The second floor, the memory system's: per sample, the least the ingest
 * touches with one dense histogram per subject (hist.h), its subject's hot
 * line (count, sum) and the 16-bit counter of its bucket, in huge pages
 * (as the arena gives them), both fetched ahead as far as engine.c does
 * (both TALLY__PF_FAR entries ahead, from TALLY__PF_MIN_SUBJECTS
 * subjects on, and the ring TALLY__RING_PF ahead: engine_priv.h), but from
 * addresses computed without a load (the engine reads two pointers per
 * sample to find them, and one to find them again). What it reaches is what
 * prefetching alone can give with this working set on this machine;
 * the ingest as a ratio of it is what the engine's own work costs. */
#define FLOOR_BUCKETS 2368u /* tally__hist_index(default max) + 1 = 2345, in whole lines */
struct floor_subject {
	uint64_t count, sum, pad[6];
	uint16_t counts[FLOOR_BUCKETS];
};
_Static_assert(sizeof(struct floor_subject) % 64 == 0, "whole lines");

struct floor2 {
	struct floor_subject *fs;
	size_t bytes;
	uint32_t *slot_of; /* subject id -> index in fs */
	uint32_t table_size;
};

static void floor2_init(struct floor2 *f, const struct tally_segment *seg, const struct ingest_data *d)
{
	uint32_t next = 0;

	f->table_size = seg->table_size;
	f->slot_of = calloc(f->table_size, sizeof(*f->slot_of));
	if (!f->slot_of)
		abort();
	for (uint32_t i = 0; i < INGEST_RING; i++)
		if (d->ids[i] < f->table_size && f->slot_of[d->ids[i]] == 0)
			f->slot_of[d->ids[i]] = ++next; /* 0: not seen */
	for (uint32_t id = 0; id < f->table_size; id++)
		f->slot_of[id] = f->slot_of[id] ? f->slot_of[id] - 1 : 0;
	f->bytes = ((size_t)(next ? next : 1) * sizeof(struct floor_subject) + TALLY__ARENA_CHUNK - 1) &
		   ~(TALLY__ARENA_CHUNK - 1);
	void *m = mmap(NULL, f->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		abort();
	/* 4 KiB pages if refused: the floor is then pessimistic */
	(void)madvise(m, f->bytes, MADV_HUGEPAGE);
	memset(m, 0, f->bytes);
	f->fs = m;
}

static void floor2_fini(struct floor2 *f)
{
	munmap(f->fs, f->bytes);
	free(f->slot_of);
}

/* Entry r's subject, its (clamped) value in *v and its bucket in *idx. */
static inline struct floor_subject *floor2_of(const struct floor2 *f, const struct tally_ring_entry *r,
					      uint32_t *idx, uint64_t *v)
{
	uint32_t id = __atomic_load_n(&r->subject, __ATOMIC_RELAXED);

	*v = __atomic_load_n(&r->value_ns, __ATOMIC_RELAXED);
	*v = *v < TALLY__HIST_DEFAULT_MAX ? *v : TALLY__HIST_DEFAULT_MAX;
	*idx = tally__hist_index(*v);
	return &f->fs[f->slot_of[id < f->table_size ? id : 0]];
}

/* One pass of the second floor over the rings of slots first, first +
 * step, ...; ns spent. */
static uint64_t floor2_pass_slots(struct tally_segment *seg, const struct floor2 *f, uint32_t nsubjects,
				  uint32_t first, uint32_t step, uint64_t *got)
{
	uint64_t t0 = bench_now_ns(), mask = seg->ring_cap - 1;
	const bool pf = nsubjects >= TALLY__PF_MIN_SUBJECTS;
	uint32_t idx;

	for (uint32_t i = first; i < seg->nslots; i += step) {
		struct tally__slot *s = tally__seg_slot(seg, i);
		uint64_t head, n;
		while ((n = tally__slot_ready(seg, s, &head)) != 0) {
			for (uint64_t k = 0; k < n; k++) {
				const struct tally_ring_entry *ring = s->ring;
				uint64_t v;
				if ((k & 3) == 0 && k + TALLY__RING_PF < n)
					__builtin_prefetch(&ring[(head + k + TALLY__RING_PF) & mask], 0);
				if (pf && k + TALLY__PF_FAR < n) {
					struct floor_subject *q =
						floor2_of(f, &ring[(head + k + TALLY__PF_FAR) & mask], &idx, &v);
					__builtin_prefetch(q, 1);
					__builtin_prefetch(&q->counts[idx], 1);
				}
				struct floor_subject *q = floor2_of(f, &ring[(head + k) & mask], &idx, &v);
				q->count++;
				q->sum += v;
				q->counts[idx]++;
			}
			tally__slot_consume(s, head, n);
			*got += n;
		}
	}
	return bench_now_ns() - t0;
}

/* One pass of the second floor over every ring; ns spent. */
static uint64_t floor2_pass(struct tally_segment *seg, const struct floor2 *f, uint32_t nsubjects,
			    uint64_t *got)
{
	return floor2_pass_slots(seg, f, nsubjects, 0, 1, got);
}

static void ingest_loop(struct tally_segment *seg, const struct ingest_data *d, uint32_t nsubjects)
{
	char row[72];
	struct tally_engine *g;
	struct tally_producer *p[INGEST_SLOTS];
	double rate[256], floor_[256], crate[256], cfloor[256], cfloor2[256];
	uint64_t fills = scaled(16, 1);
	struct floor2 f2;

	floor2_init(&f2, seg, d);

	if (tally__engine_new(seg, NULL, &g) != 0) {
		fprintf(stderr, "bench: ingest: %s\n", tally_errmsg());
		abort();
	}
	for (uint32_t k = 0; k < INGEST_SLOTS; k++)
		p[k] = attach(seg);
	uint64_t warm = 0, wcpu = 0;
	ingest_fill(p, d); /* warm-up: creates the windows, faults their pages */
	ingest_drain(g, &warm, &wcpu);
	for (int r = 0; r < bench_opts.reps; r++) {
		uint64_t ns = 0, got = 0, filled = 0, cpu = 0;
		for (uint64_t f = 0; f < fills; f++) {
			filled += ingest_fill(p, d);
			ns += ingest_drain(g, &got, &cpu);
		}
		if (got != filled || tally__engine_rejected(g))
			fprintf(stderr, "bench: ingest drained %llu of %llu, %llu rejected\n",
				(unsigned long long)got, (unsigned long long)filled,
				(unsigned long long)tally__engine_rejected(g));
		rate[r] = (double)got / (double)ns * 1e3; /* Msamples/s */
		crate[r] = (double)got / (double)cpu * 1e3;
		uint64_t fns = 0, fgot = 0, fcpu = 0;
		for (uint64_t f = 0; f < fills; f++) {
			ingest_fill(p, d);
			uint64_t c0 = thread_cpu_ns();
			fns += stream_pass(seg, &fgot);
			fcpu += thread_cpu_ns() - c0;
		}
		floor_[r] = (double)fgot / (double)fns * 1e3;
		cfloor[r] = (double)fgot / (double)fcpu * 1e3;
		fgot = fcpu = 0;
		for (uint64_t f = 0; f < fills; f++) {
			ingest_fill(p, d);
			uint64_t c0 = thread_cpu_ns();
			(void)floor2_pass(seg, &f2, nsubjects, &fgot);
			fcpu += thread_cpu_ns() - c0;
		}
		cfloor2[r] = (double)fgot / (double)fcpu * 1e3;
	}
	char frow[72];
	snprintf(frow, sizeof(frow), R_FLOOR ", %u subj", nsubjects);
	bench_row_series("ingest", R_FLOOR, frow, "Msamples/s", true, floor_, bench_opts.reps, NULL, nsubjects);
	snprintf(row, sizeof(row), R_INGEST ", %u subj", nsubjects);
	bench_row_series("ingest", R_INGEST, row, "Msamples/s", true, rate, bench_opts.reps, frow, nsubjects);
	snprintf(frow, sizeof(frow), R_FLOOR ", %u subj, per CPU s", nsubjects);
	bench_row_series("ingest", R_FLOOR " (per CPU second)", frow, "Msamples/s", true, cfloor, bench_opts.reps,
			 NULL, nsubjects);
	snprintf(row, sizeof(row), R_INGEST ", %u subj, per CPU s", nsubjects);
	bench_row_series("ingest", R_INGEST " (per CPU second)", row, "Msamples/s", true, crate, bench_opts.reps,
			 frow, nsubjects);
	snprintf(frow, sizeof(frow), R_FLOOR2 ", %u subj, per CPU s", nsubjects);
	bench_row_series("ingest", R_FLOOR2 " (per CPU second)", frow, "Msamples/s", true, cfloor2, bench_opts.reps,
			 NULL, nsubjects);
	snprintf(row, sizeof(row), "ingest loop, %u subj, per CPU s, of the 2-line floor", nsubjects);
	bench_row_series("ingest", R_INGEST " (per CPU second, of the 2-line floor)", row, "Msamples/s", true, crate,
			 bench_opts.reps, frow, nsubjects);
	floor2_fini(&f2);
	for (uint32_t k = 0; k < INGEST_SLOTS; k++)
		tally_producer_detach(&p[k]);
	tally__engine_free(&g);
}

/* End to end: one producer thread, the real aggregator thread. */
struct e2e {
	struct tally_segment *seg;
	const struct ingest_data *d;
	uint64_t n;
	atomic_int go, done;            /* rep number released / finished */
	_Atomic uint64_t t_start, spins;
};

static void *e2e_producer(void *arg)
{
	struct e2e *x = arg;
	struct tally_producer *p = attach(x->seg);
	uint64_t spins = 0;

	for (int r = 1; r <= bench_opts.reps; r++) {
		while (atomic_load(&x->go) < r)
			sleep_ns(50000);
		atomic_store(&x->t_start, bench_now_ns());
		for (uint64_t i = 0; i < x->n; i++) {
			uint32_t j = (uint32_t)i & (INGEST_RING - 1);
			while (!tally_record(p, x->d->ids[j], x->d->values[j])) {
				spins++; /* ring full: retry (each retry counts as dropped) */
				cpu_relax();
			}
		}
		atomic_store(&x->done, r);
	}
	atomic_store(&x->spins, spins);
	tally_producer_detach(&p);
	return NULL;
}

static void ingest_e2e(struct tally_segment *seg, const struct ingest_data *d)
{
	struct e2e x = { .seg = seg, .d = d, .n = scaled(20e6, 100000) };
	struct tally_engine *e = engine_start(seg, 100);
	struct tally_engine_counters c;
	double rate[256];
	pthread_t th;

	pthread_create(&th, NULL, e2e_producer, &x);
	for (int r = 1; r <= bench_opts.reps; r++) {
		tally_engine_counters(e, &c);
		uint64_t base = c.drained;
		atomic_store(&x.go, r);
		wait_drained(e, base + x.n);
		uint64_t t1 = bench_now_ns();
		while (atomic_load(&x.done) < r)
			sleep_ns(50000);
		rate[r - 1] = (double)x.n / (double)(t1 - atomic_load(&x.t_start)) * 1e3;
	}
	pthread_join(th, NULL);
	char base[72];
	snprintf(base, sizeof(base), R_INGEST ", %u subj", E2E_SUBJECTS);
	bench_row("ingest", "end to end: 1 producer thread + engine", "Msamples/s", true, rate, bench_opts.reps,
		  base, E2E_SUBJECTS);
	printf("  %-10s %-44s producer found its ring full %llu times (retried)\n", "ingest",
	       "end to end: 1 producer thread + engine", (unsigned long long)atomic_load(&x.spins));
	tally_engine_stop(&e);
}

/* Delivered: nprod producers record flat out for a while, dropping what
 * meets a full ring; the rate is what the engine drained. */
struct deliv {
	struct tally_segment *seg;
	const struct ingest_data *d;
	atomic_bool stop;
	pthread_barrier_t start;
	_Atomic uint64_t recorded, dropped;
};

static void *deliv_producer(void *arg)
{
	struct deliv *x = arg;
	struct tally_producer *p = attach(x->seg);
	struct tally_producer_counters c;
	uint64_t n = 0;

	pthread_barrier_wait(&x->start);
	while (!atomic_load_explicit(&x->stop, memory_order_relaxed)) {
		for (uint32_t i = 0; i < 1024; i++, n++) {
			uint32_t j = (uint32_t)n & (INGEST_RING - 1);
			tally_record(p, x->d->ids[j], x->d->values[j]);
		}
	}
	tally_producer_counters(p, &c);
	atomic_fetch_add(&x->recorded, n);
	atomic_fetch_add(&x->dropped, c.dropped);
	tally_producer_detach(&p);
	return NULL;
}

static void ingest_delivered(struct tally_segment *seg, const struct ingest_data *d, int nprod)
{
	struct tally_engine *e = engine_start(seg, 100);
	struct tally_engine_counters c0, c1;
	double rate[256], pct[256];
	uint64_t dur = scaled(3e8, 50000000);
	pthread_t th[64];
	char row[72];

	for (int r = 0; r < bench_opts.reps; r++) {
		struct deliv x = { .seg = seg, .d = d };
		pthread_barrier_init(&x.start, NULL, (unsigned)nprod + 1);
		for (int t = 0; t < nprod; t++)
			pthread_create(&th[t], NULL, deliv_producer, &x);
		pthread_barrier_wait(&x.start);
		tally_engine_counters(e, &c0);
		uint64_t t0 = bench_now_ns();
		sleep_ns(dur);
		tally_engine_counters(e, &c1);
		uint64_t t1 = bench_now_ns();
		atomic_store(&x.stop, true);
		for (int t = 0; t < nprod; t++)
			pthread_join(th[t], NULL);
		pthread_barrier_destroy(&x.start);
		rate[r] = (double)(c1.drained - c0.drained) / (double)(t1 - t0) * 1e3;
		pct[r] = 100.0 * (double)atomic_load(&x.dropped) / (double)atomic_load(&x.recorded);
		sleep_ns(20000000); /* let the engine empty the rings before the next rep */
	}
	char base[72];
	snprintf(base, sizeof(base), R_INGEST ", %u subj", E2E_SUBJECTS);
	snprintf(row, sizeof(row), "delivered end to end, %d producers flat out", nprod);
	bench_row_series("ingest", "delivered end to end", row, "Msamples/s", true, rate, bench_opts.reps, base,
			 nprod);
	snprintf(row, sizeof(row), "dropped, %d producers flat out", nprod);
	bench_row_series("ingest", "dropped, producers flat out", row, "%", false, pct, bench_opts.reps, NULL, nprod);
	tally_engine_stop(&e);
}

/* A segment with n subjects interned, and d's ids spread over them. */
static struct tally_segment *ingest_segment_ring(const char *tag, uint32_t n, uint32_t slots, uint32_t ring,
						 struct ingest_data *d, char *name, size_t len)
{
	struct tally_segment_config cfg;
	tally_subject_t *ids = malloc(n * sizeof(*ids));
	uint64_t seed = 0x1234567u;

	if (!ids)
		abort();
	tally_segment_config_init(&cfg);
	cfg.producer_slots = slots;
	cfg.ring_capacity = ring;
	cfg.subject_capacity = n + n / 4 + 16;
	struct tally_segment *seg = seg_create(tag, &cfg, name, len);
	for (uint32_t i = 0; i < n; i++)
		ids[i] = intern(seg, "ingest", i);
	for (uint32_t i = 0; i < INGEST_RING; i++) {
		d->values[i] = latency(&seed);
		d->ids[i] = ids[bench_rand(&seed) % n];
	}
	free(ids);
	return seg;
}

static struct tally_segment *ingest_segment_slots(const char *tag, uint32_t n, uint32_t slots,
						  struct ingest_data *d, char *name, size_t len)
{
	return ingest_segment_ring(tag, n, slots, INGEST_RING, d, name, len);
}

static struct tally_segment *ingest_segment(const char *tag, uint32_t n, struct ingest_data *d,
					    char *name, size_t len)
{
	return ingest_segment_slots(tag, n, INGEST_SLOTS + 1, d, name, len);
}

void bench_part_ingest(void)
{
	struct ingest_data *d = malloc(sizeof(*d));
	const char *list = bench_opts.subjects;
	unsigned long n;
	char name[64];

	if (!d)
		abort();
	while ((n = bench_next_size(&list, "--subjects", 1000000)) != 0) {
		/* a fresh segment each time: the loop's slots stay releasing */
		struct tally_segment *seg = ingest_segment("ingest", (uint32_t)n, d, name, sizeof(name));
		ingest_loop(seg, d, (uint32_t)n);
		seg_close(&seg, name);
	}
	struct tally_segment *seg = ingest_segment("ingest2", E2E_SUBJECTS, d, name, sizeof(name));
	ingest_e2e(seg, d);
	seg_close(&seg, name);
	int many = 2 * bench_opts.max_threads > 2 ? 2 * bench_opts.max_threads : 4;
	many = many > 16 ? 16 : many;
	const int nprods[3] = { 1, 2, many };
	for (int k = 0; k < 3; k++) {
		/* producers attach every rep: a slot each, released when they detach */
		seg = ingest_segment_slots("ingest3", E2E_SUBJECTS, (uint32_t)(nprods[k] * bench_opts.reps + 1), d,
					   name, sizeof(name));
		ingest_delivered(seg, d, nprods[k]);
		seg_close(&seg, name);
	}
	free(d);
}

/* ---- drain threads (issue 18) ------------------------------------------------- */

/* The drain with N drain threads (drain_threads), measured on the real
 * engine and its threads: DRAIN_SLOTS rings of DRAIN_RING entries are
 * filled beforehand by this thread while the engine is held
 * (tally__engine_hold), so no producer competes with the drain; the clock
 * runs from the release until the engine's drained counter has every
 * sample (polled from here, asleep in between: drain_wait). Each rep
 * starts a fresh engine for every N in turn (A/B/C alternation, same
 * segment, same samples), warmed by one fill first (windows made, pages
 * touched). Slots are 8 in a row, so N = 1, 2, 4 take equal shares.
 * Beside each, the same drain per second of the process's CPU time: on a
 * shared machine the wall-clock ratio says how much CPU the threads got,
 * this one how much work per CPU-second the split costs (1.00x: none).
 * A fill is 16.8 M samples (256 MiB of ring), 60 to 300 ms of draining:
 * with a quarter of that (10 to 70 ms) the spread of two threads' start
 * and finish on a 2-vCPU VM was most of a two-thread drain at 10 subjects
 * (the ceiling below measured 1.20x of one thread with the short fill,
 * 1.50-1.95x with this one). After them the ceiling (drain_ceiling).
 *
 * A fill is timed between two slice closes. At a close, every window
 * closes its slice (packed into the aggregate, folded into the export
 * buckets): at 10,000 subjects about 50 ms of one thread's time, and
 * with drain threads each closes its own part of every subject. A fill
 * of 150 to 300 ms crossed a close in about one rep in four, and those
 * reps drained 15% (one thread) to 40% (two) less, so the medians moved
 * with the clock's phase (BENCHMARKS.md, issue 18, ninth pass). The fill
 * now starts DRAIN_AFTER_CLOSE_NS after a close, the engine running
 * meanwhile (so the close's walk is done), and ends long before the
 * next; a fill that still crosses one (a slow machine) is counted in a
 * row of its own. The close's cost is the `window` part's "close a
 * slice" rows. */
#define DRAIN_AFTER_CLOSE_NS UINT64_C(150000000)
#define DRAIN_SLOTS 8u
#define DRAIN_RING (1u << 21)
#define DRAIN_SUBJECTS "10,1000,10000"
#define DRAIN_MAX_N 16

static uint64_t drain_fill(struct tally_producer **p, const struct ingest_data *d)
{
	uint64_t n = 0;

	for (uint32_t k = 0; k < DRAIN_SLOTS; k++)
		for (uint32_t i = 0; i < DRAIN_RING; i++)
			n += tally_record(p[k], d->ids[(i + k * 4099u) & (INGEST_RING - 1)],
					  d->values[(i * 7u + k) & (INGEST_RING - 1)]);
	return n;
}

/* Until the engine has drained target samples (of the n filled); false
 * after 60 s (said). Polled every 1 ms until the last sixteenth, then
 * every 50 us: a poll is a wake-up that takes a vCPU from a drain thread
 * (every 100 us, they cost the process a tenth of a CPU), and the end is
 * still seen within 50 us. */
static bool drain_wait(struct tally_engine *e, uint64_t target, uint64_t n)
{
	struct tally_engine_counters c;
	uint64_t t0 = bench_now_ns();

	for (tally_engine_counters(e, &c); c.drained < target; tally_engine_counters(e, &c)) {
		if (bench_now_ns() - t0 > UINT64_C(60000000000)) {
			fprintf(stderr, "bench: drain: %llu drained of %llu after 60 s, %llu rejected\n",
				(unsigned long long)c.drained, (unsigned long long)target,
				(unsigned long long)c.rejected);
			bench_failed = true;
			return false;
		}
		sleep_ns(target - c.drained > n / 16 ? 1000000 : 50000);
	}
	return true;
}

static uint64_t process_cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* One measurement: Msamples/s drained by n drain threads (wall clock),
 * and into *per_cpu Msamples per second of the process's CPU time over
 * the same span (every thread of it: the drain, the publishing thread,
 * this one's polls), which a loaded machine's preemption does not
 * stretch. */
static double drain_once(struct tally_segment *seg, struct tally_producer **p, const struct ingest_data *d,
			 uint32_t n, double *per_cpu, bool *crossed)
{
	struct tally_engine_config cfg;
	struct tally_engine_counters c;
	struct tally_engine *e;
	int rc;

	tally_engine_config_init(&cfg);
	cfg.drain_threads = n;
	if (bench_opts.drain_publish_ms)
		cfg.publish_interval_ms = bench_opts.drain_publish_ms;
	cfg.drain_interval_us = 100; /* wakes soon after the release, and an idle thread costs little */
	if ((rc = tally_engine_start(seg, &cfg, &e)) != 0)
		die("tally_engine_start (drain)", rc);
	tally_engine_counters(e, &c);
	uint64_t warm = drain_fill(p, d);
	drain_wait(e, c.drained + warm, warm); /* warm-up */
	uint64_t slice = cfg.slice_ns, at = bench_now_ns();
	sleep_ns((at / slice + 1) * slice - at + DRAIN_AFTER_CLOSE_NS); /* a close, and its walk done */
	tally__engine_hold(e, true);
	sleep_ns(2000000); /* a pass under way ends */
	tally_engine_counters(e, &c);
	uint64_t filled = drain_fill(p, d);
	uint64_t t0 = bench_now_ns(), cpu0 = process_cpu_ns();
	tally__engine_hold(e, false);
	drain_wait(e, c.drained + filled, filled);
	uint64_t t1 = bench_now_ns(), ns = t1 - t0, cpu = process_cpu_ns() - cpu0;
	*crossed = t1 / slice != t0 / slice;
	*per_cpu = (double)filled / (double)cpu * 1e3;
	if (tally__engine_rejected(e))
		fprintf(stderr, "bench: drain: %llu rejected\n", (unsigned long long)tally__engine_rejected(e));
	tally_engine_stop(&e);
	return (double)filled / (double)ns * 1e3;
}

/* The ceiling of a split on this machine: the same filled rings drained
 * by n plain threads, thread t taking the slots t, t + n, ... as drain
 * thread t does, each with its own dense state for every subject (as each
 * drain thread keeps a window of every subject), doing the second floor's
 * work (floor2_pass: two lines a sample, ideally prefetched), released
 * together from a barrier; wall clock from the release until the last
 * one is done. No engine, no lock, no publish: what two threads can get
 * out of this machine's two vCPUs for this work in this span, the bar
 * for "2 drain threads >= 1.6x of one". */
struct drain_ceiling {
	struct tally_segment *seg;
	struct floor2 f[DRAIN_MAX_N];
	uint32_t nsubjects, n;
	pthread_barrier_t go;
	uint64_t done_ns[DRAIN_MAX_N];
};

struct ceiling_arg {
	struct drain_ceiling *c;
	uint32_t t;
};

static void *ceiling_thread(void *arg)
{
	struct ceiling_arg *a = arg;
	struct drain_ceiling *c = a->c;
	uint64_t got = 0;

	pthread_barrier_wait(&c->go);
	(void)floor2_pass_slots(c->seg, &c->f[a->t], c->nsubjects, a->t, c->n, &got);
	c->done_ns[a->t] = bench_now_ns();
	return NULL;
}

static double ceiling_once(struct drain_ceiling *c, struct tally_producer **p, const struct ingest_data *d,
			   uint32_t n)
{
	pthread_t th[DRAIN_MAX_N];
	struct ceiling_arg a[DRAIN_MAX_N];

	c->n = n;
	pthread_barrier_init(&c->go, NULL, n + 1);
	for (uint32_t t = 0; t < n; t++) {
		a[t] = (struct ceiling_arg){ c, t };
		if (pthread_create(&th[t], NULL, ceiling_thread, &a[t]))
			die("pthread_create (drain ceiling)", -1);
	}
	uint64_t filled = drain_fill(p, d);
	sleep_ns(2000000); /* the threads are asleep on the barrier, as the engine's on their interval */
	uint64_t t0 = bench_now_ns(), end = t0;
	pthread_barrier_wait(&c->go);
	for (uint32_t t = 0; t < n; t++) {
		pthread_join(th[t], NULL);
		end = c->done_ns[t] > end ? c->done_ns[t] : end;
	}
	pthread_barrier_destroy(&c->go);
	return (double)filled / (double)(end - t0) * 1e3;
}

void bench_part_drain(void)
{
	struct ingest_data *d = malloc(sizeof(*d));
	const char *list = bench_opts.subjects_given ? bench_opts.subjects : DRAIN_SUBJECTS;
	unsigned long nsubj;
	char name[64];

	if (!d)
		abort();
	while ((nsubj = bench_next_size(&list, "drain subjects", 1000000)) != 0) {
		uint32_t ns[DRAIN_MAX_N];
		int nn = 0;
		const char *tl = bench_opts.drain_threads;
		unsigned long t;
		while ((t = bench_next_size(&tl, "--drain-threads", TALLY_DRAIN_THREADS_MAX)) != 0 && nn < DRAIN_MAX_N)
			ns[nn++] = (uint32_t)t;
		struct tally_segment *seg = ingest_segment_ring("drain", (uint32_t)nsubj, DRAIN_SLOTS, DRAIN_RING, d,
								name, sizeof(name));
		struct tally_producer *p[DRAIN_SLOTS];
		for (uint32_t k = 0; k < DRAIN_SLOTS; k++)
			p[k] = attach(seg);
		static double rate[DRAIN_MAX_N][256], cpu[DRAIN_MAX_N][256], ceil_[DRAIN_MAX_N][256];
		static double crossing[DRAIN_MAX_N][256];
		static struct drain_ceiling ceiling;
		uint32_t nmax = 1;
		for (int k = 0; k < nn; k++)
			nmax = ns[k] > nmax ? ns[k] : nmax;
		ceiling.seg = seg;
		ceiling.nsubjects = (uint32_t)nsubj;
		for (uint32_t i = 0; i < nmax; i++)
			floor2_init(&ceiling.f[i], seg, d);
		for (int r = 0; r < bench_opts.reps; r++)
			for (int k = 0; k < nn; k++) {
				bool crossed = false;
				rate[k][r] = drain_once(seg, p, d, ns[k], &cpu[k][r], &crossed);
				crossing[k][r] = crossed ? 100.0 : 0.0;
				ceil_[k][r] = ceiling_once(&ceiling, p, d, ns[k]);
			}
		for (uint32_t i = 0; i < nmax; i++)
			floor2_fini(&ceiling.f[i]);
		char base[96], row[96], pub[32] = "";
		if (bench_opts.drain_publish_ms) /* not the engine's default: the rows say so */
			snprintf(pub, sizeof(pub), ", publish %u ms", bench_opts.drain_publish_ms);
		snprintf(base, sizeof(base), "ingest, %u drain thread%s, %lu subj%s", ns[0], ns[0] > 1 ? "s" : "", nsubj,
			 pub);
		for (int k = 0; k < nn; k++) {
			snprintf(row, sizeof(row), "ingest, %u drain thread%s, %lu subj%s", ns[k], ns[k] > 1 ? "s" : "",
				 nsubj, pub);
			snprintf(name, sizeof(name), "drain threads, %lu subj", nsubj);
			bench_row_series("drain", name, row, "Msamples/s", true, rate[k], bench_opts.reps,
					 k ? base : NULL, ns[k]);
		}
		snprintf(base, sizeof(base), "per CPU-s, %u drain thread%s, %lu subj%s", ns[0], ns[0] > 1 ? "s" : "",
			 nsubj, pub);
		for (int k = 0; k < nn; k++) {
			snprintf(row, sizeof(row), "per CPU-s, %u drain thread%s, %lu subj%s", ns[k], ns[k] > 1 ? "s" : "",
				 nsubj, pub);
			snprintf(name, sizeof(name), "drain threads per CPU-s, %lu subj", nsubj);
			bench_row_series("drain", name, row, "Msamples/s", true, cpu[k], bench_opts.reps,
					 k ? base : NULL, ns[k]);
		}
		for (int k = 0; k < nn; k++) {
			snprintf(row, sizeof(row), "fills crossing a slice close, %u drain thread%s, %lu subj%s", ns[k],
				 ns[k] > 1 ? "s" : "", nsubj, pub);
			snprintf(name, sizeof(name), "drain fills crossing a close, %lu subj", nsubj);
			bench_row_series("drain", name, row, "%", false, crossing[k], bench_opts.reps, NULL, ns[k]);
		}
		snprintf(base, sizeof(base), "ceiling: floor2 split, %u thread%s, %lu subj", ns[0], ns[0] > 1 ? "s" : "",
			 nsubj);
		for (int k = 0; k < nn; k++) {
			snprintf(row, sizeof(row), "ceiling: floor2 split, %u thread%s, %lu subj", ns[k],
				 ns[k] > 1 ? "s" : "", nsubj);
			snprintf(name, sizeof(name), "drain ceiling, %lu subj", nsubj);
			bench_row_series("drain", name, row, "Msamples/s", true, ceil_[k], bench_opts.reps,
					 k ? base : NULL, ns[k]);
		}
		for (uint32_t k = 0; k < DRAIN_SLOTS; k++)
			tally_producer_detach(&p[k]);
		snprintf(name, sizeof(name), "tally-bench-drain-%d", (int)getpid());
		seg_close(&seg, name);
	}
	free(d);
}

/* ---- publish ---------------------------------------------------------------- */

#define PUBLISHES_PER_REP 25

/* npending watched consumers, each matching one subject: entry j names
 * subject 4j mod n, half of them literally, half through a wildcard
 * ("bench.*.sK"), as the poller would write them. */
static void pending_fill(struct tally_segment *seg, uint32_t n, uint32_t npending)
{
	void *sec = tally__seg_section(seg, &seg->pending);

	for (uint32_t j = 0; j < npending && j < seg->pending_cap; j++) {
		char filter[64], consumer[32];
		snprintf(filter, sizeof(filter), j % 2 ? "bench.*.s%u" : "bench.publish.s%u", (j * 4u) % n);
		snprintf(consumer, sizeof(consumer), "C%u", j);
		struct tally__pending_values v = {
			.source = TALLY__PENDING_LIVE, .kind = TALLY__PENDING_CONSUMER, .is_leader = 1,
			.num_pending = j, .last_ok_ns = tally__pending_now_ns(), .stream = "S",
			.consumer = consumer, .filter = filter, .map = "", .last_error = "",
		};
		tally__pending_write_entry(tally__pending_entry_at(sec, j), &v);
	}
}

/* The medians of PUBLISHES_PER_REP publishes of n subjects, one per rep,
 * into ms[]; the window is slices x 1 s; npending watched consumers. The
 * longest stretch the aggregator went without draining, over each rep,
 * into stall_ms[] (if not NULL). */
static void publish_run_p(uint32_t n, uint32_t slices, uint32_t npending, double *ms, double *stall_ms)
{
	struct tally_segment_config cfg;
	struct tally_engine_config ecfg;
	struct tally_engine_counters c;
	struct tally_engine *e;
	char name[64], tag[32];
	uint64_t seed = n;
	int rc;

	tally_segment_config_init(&cfg);
	cfg.producer_slots = 4;
	cfg.subject_capacity = n + n / 4 + 16;
	snprintf(tag, sizeof(tag), "publish%u-%u-%u", n, slices, npending);
	struct tally_segment *seg = seg_create(tag, &cfg, name, sizeof(name));
	tally_engine_config_init(&ecfg);
	ecfg.publish_interval_ms = 1;
	ecfg.window_ns = (uint64_t)slices * ecfg.slice_ns;
	if ((rc = tally_engine_start(seg, &ecfg, &e)) != 0)
		die("tally_engine_start", rc);
	struct tally_producer *p = attach(seg);
	for (uint32_t i = 0; i < n; i++) {
		tally_subject_t id = intern(seg, "publish", i);
		while (!tally_record(p, id, latency(&seed)))
			sleep_ns(100000);
	}
	wait_drained(e, n);
	pending_fill(seg, n, npending);
	tally_engine_counters(e, &c);
	uint64_t seen = c.publishes + 2; /* skip publishes that began before the last drain */
	for (int r = 0; r < bench_opts.reps; r++) {
		double one[PUBLISHES_PER_REP];
		if (r == 0) { /* the first publishes see the entries appear: not in the stall */
			while (c.publishes <= seen) {
				sleep_ns(100000);
				tally_engine_counters(e, &c);
			}
			seen = c.publishes;
		}
		tally__engine_max_stall_ns(e, true);
		for (int k = 0; k < PUBLISHES_PER_REP;) {
			sleep_ns(100000);
			tally_engine_counters(e, &c);
			if (c.publishes <= seen)
				continue;
			seen = c.publishes;
			one[k++] = (double)c.last_publish_ns / 1e6;
		}
		ms[r] = bench_median(one, PUBLISHES_PER_REP);
		if (stall_ms)
			stall_ms[r] = (double)tally__engine_max_stall_ns(e, false) / 1e6;
	}
	tally_producer_detach(&p);
	tally_engine_stop(&e);
	seg_close(&seg, name);
}

static void publish_run(uint32_t n, uint32_t slices, double *ms)
{
	publish_run_p(n, slices, 0, ms, NULL);
}

#define PUB_PENDING_SUBJECTS 4096u

void bench_part_publish(void)
{
	const char *list = bench_opts.subjects;
	unsigned long n;
	double ms[256];
	char row[72];

	while ((n = bench_next_size(&list, "--subjects", 1000000)) != 0) {
		publish_run((uint32_t)n, 10, ms);
		snprintf(row, sizeof(row), "publish, %lu active subjects", n);
		bench_row_series("publish", "publish (real engine, 10 s window)", row, "ms", false, ms,
				 bench_opts.reps, NULL, (double)n);
	}
	/* watched consumers (pending entries): the publish and the longest
	 * time the aggregator did not drain, against the same without entries */
	static const uint32_t np[] = { 0, 100, 1024 };
	char base[72];
	snprintf(base, sizeof(base), "publish, %u subj, 0 pending entries", PUB_PENDING_SUBJECTS);
	for (size_t k = 0; k < sizeof(np) / sizeof(np[0]); k++) {
		double stall[256];
		publish_run_p(PUB_PENDING_SUBJECTS, 10, np[k], ms, stall);
		snprintf(row, sizeof(row), "publish, %u subj, %u pending entries", PUB_PENDING_SUBJECTS, np[k]);
		bench_row_series("publish", "publish, 4096 subjects, pending entries", row, "ms", false, ms,
				 bench_opts.reps, k ? base : NULL, np[k]);
		snprintf(row, sizeof(row), "longest drain stall, %u subj, %u pending", PUB_PENDING_SUBJECTS, np[k]);
		bench_row_series("publish", "longest drain stall, 4096 subjects", row, "ms", false, stall,
				 bench_opts.reps, NULL, np[k]);
	}
}

/* ---- window ------------------------------------------------------------------ */

#define WIN_SUBJECTS 1000u
#define WIN_VALUES 1000u    /* per subject per slice */
#define WIN_TABLE (1u << 16)

/* Heap bytes in use by this thread's malloc arena (the main one), plus
 * the whole chunks the histograms' huge-page arena has mapped (lib/arena.h):
 * windows are made here, so the difference is what they hold. */
static size_t heap_in_use(void)
{
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
	return mallinfo2().uordblks + tally__arena_bytes();
#else
	return 0; /* unknown: the memory row is left out */
#endif
}

static void win_fill(struct tally__window *w, const uint64_t *tab, uint64_t *seed)
{
	for (uint32_t s = 0; s < WIN_SUBJECTS; s++) {
		uint32_t off = (uint32_t)bench_rand(seed);
		for (uint32_t i = 0; i < WIN_VALUES; i++)
			tally__window_add(&w[s], tab[(off + i) & (WIN_TABLE - 1)]);
	}
}

/* Advance every window to t, then read its stats: ms for each loop. */
static void win_step(struct tally__window *w, uint64_t t, double *adv_ms, double *stats_ms)
{
	struct tally__window_stats st;
	uint64_t t0 = bench_now_ns();

	for (uint32_t s = 0; s < WIN_SUBJECTS; s++)
		if (tally__window_advance(&w[s], t) != 0)
			abort();
	uint64_t t1 = bench_now_ns();
	for (uint32_t s = 0; s < WIN_SUBJECTS; s++)
		if (tally__window_stats(&w[s], t + 1, &st) != 0)
			abort();
	*adv_ms = (double)(t1 - t0) / 1e6;
	*stats_ms = (double)(bench_now_ns() - t1) / 1e6;
}

static void window_direct(uint32_t slices, const uint64_t *tab)
{
	const uint64_t slice = TALLY__WINDOW_DEFAULT_SLICE_NS;
	struct tally__window_config wc = { slice, slices * slice, TALLY__HIST_DEFAULT_MAX };
	double adv[256], sta[256], kb;
	uint64_t t = 1000 * slice, seed = slices;
	char row[72];

	size_t before = heap_in_use();
	struct tally__window *w = calloc(WIN_SUBJECTS, sizeof(*w));
	if (!w)
		abort();
	for (uint32_t s = 0; s < WIN_SUBJECTS; s++)
		if (tally__window_init(&w[s], &wc, t) != 0)
			abort();
	for (uint32_t k = 0; k <= slices; k++, t += slice) { /* every slice of the window closed */
		win_fill(w, tab, &seed);
		if (k < slices)
			win_step(w, t + slice, &adv[0], &sta[0]);
	}
	kb = (double)(heap_in_use() - before) / WIN_SUBJECTS / 1024;
	for (int r = 0; r < bench_opts.reps; r++, t += slice) {
		win_step(w, t, &adv[r], &sta[r]);
		win_fill(w, tab, &seed);
	}
	snprintf(row, sizeof(row), "close a slice, 1,000 subj, window %u x 1 s", slices);
	bench_row_series("window", "close a slice, 1,000 subjects", row, "ms", false, adv, bench_opts.reps,
			 NULL, slices);
	snprintf(row, sizeof(row), "stats of 1,000 subj, window %u x 1 s", slices);
	bench_row_series("window", "stats of 1,000 subjects (publish's share)", row, "ms", false, sta,
			 bench_opts.reps, NULL, slices);
	if (before || kb > 0) {
		snprintf(row, sizeof(row), "heap per subject, window %u x 1 s", slices);
		bench_row_series("window", "heap per subject", row, "KB", false, &kb, 1, NULL, slices);
	}
	/* idle: one whole window (and a slice) with no value at all */
	t += (uint64_t)(slices + 1) * slice;
	for (uint32_t s = 0; s < WIN_SUBJECTS; s++)
		if (tally__window_advance(&w[s], t) != 0)
			abort();
	double idle = (double)(heap_in_use() - before) / WIN_SUBJECTS / 1024;
	if (before || idle > 0) {
		snprintf(row, sizeof(row), "heap per idle subject, window %u x 1 s", slices);
		bench_row_series("window", "heap per idle subject (a window without values)", row, "KB", false, &idle,
				 1, NULL, slices);
	}
	for (uint32_t s = 0; s < WIN_SUBJECTS; s++)
		tally__window_destroy(&w[s]);
	free(w);
}

/* The whole engine's heap per subject (not only the window): the
 * subject's row, its since-start export buckets and their published
 * copy, the snapshot rows, the windows; while every subject has samples
 * and again after a whole window (10 x 1 s, the default) without any, the
 * windows then asleep. A thread-less engine driven with a synthetic
 * clock; call_rcu's callbacks are waited for (rcu_barrier) before each
 * reading. Per subject: the heap the engine holds over the heap before
 * it was made, divided by the subjects; and over the heap of the same
 * engine before its first sample (what does not grow with subjects:
 * arrays sized by the segment's subject table and its pending table),
 * which is also shown alone. */
static void engine_memory(uint32_t n)
{
	struct ingest_data *d = malloc(sizeof(*d));
	struct tally_producer *p[INGEST_SLOTS];
	struct tally_engine *g;
	char name[64], row[80];
	double busy[256], idle[256], over[256], empty[256];

	if (!d)
		abort();
	for (int r = 0; r < bench_opts.reps; r++) {
		struct tally_segment *seg = ingest_segment("engmem", n, d, name, sizeof(name));
		rcu_barrier_bp();
		size_t h0 = heap_in_use();
		if (tally__engine_new(seg, NULL, &g) != 0)
			abort();
		for (uint32_t k = 0; k < INGEST_SLOTS; k++)
			p[k] = attach(seg);
		uint64_t t = bench_now_ns();
		tally__engine_publish(g, t - 2000000);
		tally__engine_publish(g, t - 1000000);
		rcu_barrier_bp();
		size_t he = heap_in_use();
		empty[r] = (double)(he - h0) / 1048576.0;
		ingest_fill(p, d);
		while (tally__engine_ingest(g, t) != 0)
			;
		tally__engine_publish(g, t);
		tally__engine_publish(g, t + 1000000); /* the old snapshot retired */
		rcu_barrier_bp();
		busy[r] = (double)(heap_in_use() - h0) / n / 1024.0;
		t += UINT64_C(12000000000); /* a whole window and two slices later */
		tally__engine_ingest(g, t);
		tally__engine_publish(g, t);
		tally__engine_publish(g, t + 1000000);
		rcu_barrier_bp();
		idle[r] = (double)(heap_in_use() - h0) / n / 1024.0;
		over[r] = (double)(heap_in_use() - he) / n / 1024.0;
		for (uint32_t k = 0; k < INGEST_SLOTS; k++)
			tally_producer_detach(&p[k]);
		tally__engine_free(&g);
		seg_close(&seg, name);
	}
	snprintf(row, sizeof(row), "engine heap per subject, busy, %u subj", n);
	bench_row_series("window", "engine heap per subject, busy", row, "KB", false, busy, bench_opts.reps, NULL,
			 n);
	snprintf(row, sizeof(row), "engine heap per subject, idle a window, %u subj", n);
	bench_row_series("window", "engine heap per subject, idle a whole window", row, "KB", false, idle,
			 bench_opts.reps, NULL, n);
	snprintf(row, sizeof(row), "engine heap before any sample, %u-subj segment", n);
	bench_row_series("window", "engine heap before any sample", row, "MB", false, empty, bench_opts.reps, NULL,
			 n);
	snprintf(row, sizeof(row), "engine heap per subject over that, idle a window, %u subj", n);
	bench_row_series("window", "engine heap per subject over an empty engine's, idle a whole window", row, "KB",
			 false, over, bench_opts.reps, NULL, n);
	free(d);
}

/* An idle subject's export buckets (export.h): packed bytes for a subject
 * that has seen one slice, and ten, of WIN_VALUES log-normal values each,
 * against their dense 92 x 8 bytes. */
static void export_packed(const uint64_t *tab)
{
	uint64_t edges[TALLY__HIST_DEFAULT_NEDGES], le[TALLY__HIST_DEFAULT_NEDGES];
	uint32_t ne = (uint32_t)tally__hist_default_edges(edges, TALLY__HIST_DEFAULT_NEDGES);
	struct tally__hist h;
	char row[80];

	if (tally__hist_init(&h, TALLY__HIST_DEFAULT_MAX) != 0)
		abort();
	for (uint32_t slices = 1, i = 0; slices <= 10; slices++) {
		for (; i < slices * WIN_VALUES; i++)
			tally__hist_add(&h, tab[(i * 7919u) & (WIN_TABLE - 1)]);
		if (slices != 1 && slices != 10)
			continue;
		if (tally__hist_cumulative_le(&h, edges, ne, le) != 0)
			abort();
		double b = (double)(offsetof(struct tally__export_pack, bytes) +
				    tally__export_packed_len(le, ne, h.count, h.sum));
		snprintf(row, sizeof(row), "export buckets packed, %u log-normal values (dense 752)",
			 slices * WIN_VALUES);
		bench_row_series("window", "an idle subject's export buckets, packed", row, "B", false, &b, 1,
				 NULL, slices);
	}
	tally__hist_destroy(&h);
}

void bench_part_window(void)
{
	const char *list = bench_opts.slices;
	uint64_t *tab = malloc(WIN_TABLE * sizeof(*tab)), seed = 11;
	unsigned long n;
	double ms[256];
	char row[72];

	if (!tab)
		abort();
	for (uint32_t i = 0; i < WIN_TABLE; i++)
		tab[i] = latency(&seed);
	printf("  %-8s synthetic windows: %u subjects, %u values per subject per slice, all slices closed\n",
	       "window", WIN_SUBJECTS, WIN_VALUES);
	while ((n = bench_next_size(&list, "--slices", TALLY__WINDOW_MAX_SLICES)) != 0) {
		publish_run(WIN_SUBJECTS, (uint32_t)n, ms);
		snprintf(row, sizeof(row), "publish, 1,000 subj, window %lu x 1 s", n);
		bench_row_series("window", "publish, 1,000 subjects (real engine)", row, "ms", false, ms,
				 bench_opts.reps, NULL, (double)n);
		window_direct((uint32_t)n, tab);
	}
	export_packed(tab);
	free(tab);
	engine_memory(1000);
	engine_memory(10000);
}

/* ---- read ------------------------------------------------------------------- */

#define R_MUTEX "baseline: mutex + memcpy of the stats"
#define R_MEMCPY "baseline: memcpy of the stats"

/* Keep the copy: the compiler must assume the asm reads *p. */
#define KEEP(p) __asm__ __volatile__("" : : "r"(p) : "memory")

static double read_inproc(struct tally_engine *e, tally_subject_t id, uint64_t n)
{
	struct tally_subject_stats st;
	uint64_t t0 = bench_now_ns(), acc = 0;

	for (uint64_t i = 0; i < n; i++) {
		if (tally_engine_read(e, id, &st) != 0)
			abort();
		acc += st.count;
	}
	double ns = (double)(bench_now_ns() - t0) / (double)n;
	KEEP(&acc);
	return ns;
}

/* -1 when a read fails (printed). */
static double read_shm(const struct tally_segment *seg, tally_subject_t id, uint64_t n)
{
	struct tally_subject_stats st;
	uint64_t t0 = bench_now_ns(), acc = 0;
	int rc;

	for (uint64_t i = 0; i < n; i++) {
		if ((rc = tally_read_subject(seg, id, &st)) != 0) {
			fprintf(stderr, "bench: tally_read_subject: %s\n", tally_strerror(rc));
			return -1;
		}
		acc += st.count;
	}
	double ns = (double)(bench_now_ns() - t0) / (double)n;
	KEEP(&acc);
	return ns;
}

static double read_mutex(pthread_mutex_t *m, const struct tally_subject_stats *src, uint64_t n)
{
	struct tally_subject_stats st;
	uint64_t t0 = bench_now_ns();

	for (uint64_t i = 0; i < n; i++) {
		pthread_mutex_lock(m);
		memcpy(&st, src, sizeof(st));
		pthread_mutex_unlock(m);
		KEEP(&st);
	}
	return (double)(bench_now_ns() - t0) / (double)n;
}

static double read_memcpy(const struct tally_subject_stats *src, uint64_t n)
{
	struct tally_subject_stats st;
	uint64_t t0 = bench_now_ns();

	for (uint64_t i = 0; i < n; i++) {
		memcpy(&st, src, sizeof(st));
		KEEP(&st);
	}
	return (double)(bench_now_ns() - t0) / (double)n;
}

/* In a forked child: open the segment read-only by name, as another
 * process would, and send reps ns/op values (or -1) through fd. */
static void read_child(const char *name, tally_subject_t id, uint64_t n, int fd)
{
	struct tally_segment *ro;
	double ns[256];
	int reps = bench_opts.reps;

	if (tally_segment_open(name, TALLY_OPEN_READER, 1000, &ro) != 0) {
		fprintf(stderr, "bench: child: open %s: %s\n", name, tally_errmsg());
		_exit(1);
	}
	for (int r = 0; r < reps; r++)
		ns[r] = read_shm(ro, id, n);
	tally_segment_close(&ro);
	ssize_t w = write(fd, ns, (size_t)reps * sizeof(ns[0]));
	_exit(w == (ssize_t)((size_t)reps * sizeof(ns[0])) ? 0 : 1);
}

static bool read_other_process(const char *name, tally_subject_t id, uint64_t n, double *out)
{
	int fds[2], status = 0;
	size_t want = (size_t)bench_opts.reps * sizeof(out[0]), got = 0;

	fflush(stdout);
	if (pipe(fds) != 0)
		return false;
	pid_t pid = fork();
	if (pid < 0)
		return false;
	if (pid == 0) {
		close(fds[0]);
		read_child(name, id, n, fds[1]);
	}
	close(fds[1]);
	while (got < want) {
		ssize_t k = read(fds[0], (char *)out + got, want - got);
		if (k <= 0)
			break;
		got += (size_t)k;
	}
	close(fds[0]);
	waitpid(pid, &status, 0);
	if (got != want || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		return false;
	for (int r = 0; r < bench_opts.reps; r++)
		if (out[r] < 0)
			return false;
	return true;
}

/* Other hosts' verdicts, as a gateway reads them for every request: a
 * segment with tallyd's default remote section (4,096 entries), 2 hosts x
 * 50 subjects mirrored into it (written as the share thread writes them),
 * one subject asked for: the full scan (tally_read_remote_worst) against
 * the index by subject (tally_remote_index). */
#define REMOTE_CAP 4096u
static void read_remote(void)
{
	struct tally_segment_config cfg;
	struct tally_remote_index *ix;
	struct tally_remote_stats rs;
	double full[256], indexed[256], refresh[256];
	uint64_t n = scaled(2e4, 100);
	char name[64];
	int reps = bench_opts.reps;

	tally_segment_config_init(&cfg);
	cfg.remote_capacity = REMOTE_CAP;
	struct tally_segment *seg = seg_create("read", &cfg, name, sizeof(name));
	void *sec = tally__seg_section(seg, &seg->remote);
	struct tally__remote_status_view stv = { .state = 2, .connected = 1, .stale_after_ms = 600000,
						 .max_age_ms = 1200000, .refresh_ms = 1000 };
	tally__remote_write_status(tally__remote_status_at(sec), &stv);
	for (uint32_t i = 0; i < 100; i++) {
		struct tally__remote_view v = { .verdict = TALLY_VERDICT_OK, .combine = TALLY__COMBINE_MAX,
						.origin_ns = tally__mono_ns(), .received_ns = tally__mono_ns() };
		snprintf(v.host, sizeof(v.host), "%s", i % 2 ? "b" : "a");
		snprintf(v.subject, sizeof(v.subject), "orders.s%u", i / 2);
		tally__remote_write_entry(tally__remote_entry_at(sec, i), &v);
	}
	if (tally_remote_index_new(seg, &ix) != 0 || tally_remote_index_refresh(ix) != 0)
		die("tally_remote_index", -1);
	for (int r = 0; r < reps; r++) {
		uint64_t t0 = bench_now_ns();
		for (uint64_t i = 0; i < n; i++)
			if (tally_read_remote_worst(seg, "orders.s7", &rs) != 0)
				die("tally_read_remote_worst", -1);
		full[r] = (double)(bench_now_ns() - t0) / (double)n;
		t0 = bench_now_ns();
		for (uint64_t i = 0; i < n * 100; i++)
			if (tally_read_remote_worst_indexed(ix, "orders.s7", &rs) != 0)
				die("tally_read_remote_worst_indexed", -1);
		indexed[r] = (double)(bench_now_ns() - t0) / (double)(n * 100);
		t0 = bench_now_ns();
		for (uint64_t i = 0; i < n; i++)
			tally_remote_index_refresh(ix);
		refresh[r] = (double)(bench_now_ns() - t0) / (double)n;
	}
	bench_row("read", "other hosts' worst, full scan (4,096 entries, 100 used)", "ns/op", false, full, reps,
		  NULL, 0);
	bench_row("read", "other hosts' worst, through the index (2 entries)", "ns/op", false, indexed, reps,
		  "other hosts' worst, full scan (4,096 entries, 100 used)", 0);
	bench_row("read", "the index's refresh (4,096 entries, 100 used)", "ns/op", false, refresh, reps, NULL, 0);
	tally_remote_index_free(&ix);
	seg_close(&seg, name);
}

void bench_part_read(void)
{
	struct tally_segment_config cfg;
	struct tally_subject_stats st;
	struct tally_segment *ro;
	pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
	double inproc[256], shm[256], other[256], mtx[256], cpy[256];
	uint64_t n = scaled(2e6, 1000), seed = 7;
	char name[64];
	int reps = bench_opts.reps, rc;

	tally_segment_config_init(&cfg);
	struct tally_segment *seg = seg_create("read", &cfg, name, sizeof(name));
	tally_subject_t id = intern(seg, "read", 0);
	struct tally_engine *e = engine_start(seg, 100);
	struct tally_producer *p = attach(seg);
	for (int i = 0; i < 1000; i++)
		tally_record(p, id, latency(&seed));
	while (tally_engine_read(e, id, &st) != 0 || st.total_count < 1000)
		sleep_ns(1000000);
	if ((rc = tally_segment_open(name, TALLY_OPEN_READER, 1000, &ro)) != 0)
		die("tally_segment_open (reader)", rc);
	while (tally_read_subject(ro, id, &st) != 0)
		sleep_ns(1000000);
	for (int r = 0; r < reps; r++) {
		mtx[r] = read_mutex(&m, &st, n);
		cpy[r] = read_memcpy(&st, n);
		inproc[r] = read_inproc(e, id, n);
		shm[r] = read_shm(ro, id, n);
	}
	bool have_other = read_other_process(name, id, n, other);
	bench_row("read", R_MUTEX, "ns/op", false, mtx, reps, NULL, sizeof(st));
	bench_row("read", R_MEMCPY, "ns/op", false, cpy, reps, NULL, sizeof(st));
	bench_row("read", "tally_engine_read (in-process, RCU)", "ns/op", false, inproc, reps,
		  R_MUTEX "|" R_MEMCPY, sizeof(st));
	bench_row("read", "tally_read_subject (2nd, read-only handle)", "ns/op", false, shm, reps,
		  R_MUTEX "|" R_MEMCPY, sizeof(st));
	if (have_other)
		bench_row("read", "tally_read_subject (other process)", "ns/op", false, other, reps,
			  R_MUTEX "|" R_MEMCPY, sizeof(st));
	else
		fprintf(stderr, "bench: read: the forked reader failed; no \"other process\" row\n");
	tally_segment_close(&ro);
	tally_producer_detach(&p);
	tally_engine_stop(&e);
	seg_close(&seg, name);
	pthread_mutex_destroy(&m);
	read_remote();
}

/* ---- visible ---------------------------------------------------------------- */

#define VISIBLE_MAX 256 /* bench_median() looks at 256 samples at most */

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* Record one sample, spin on tally_engine_read until total_count shows it. */
static double one_visible(struct tally_engine *e, struct tally_producer *p, tally_subject_t id,
			  uint64_t value, uint64_t before)
{
	struct tally_subject_stats st;
	uint64_t t0 = bench_now_ns();

	if (!tally_record(p, id, value))
		abort(); /* one sample at a time: the ring cannot be full */
	for (;;) {
		if (tally_engine_read(e, id, &st) == 0 && st.total_count > before)
			return (double)(bench_now_ns() - t0) / 1e6;
		cpu_relax();
	}
}

static void visible_interval(uint32_t interval_ms)
{
	struct tally_segment_config cfg;
	struct tally_subject_stats st;
	double lat[VISIBLE_MAX], sorted[VISIBLE_MAX];
	uint64_t seed = interval_ms, n = scaled(200, 20), count = 0;
	char name[64], tag[32], row[64];

	if (n > VISIBLE_MAX)
		n = VISIBLE_MAX;
	tally_segment_config_init(&cfg);
	snprintf(tag, sizeof(tag), "visible%u", interval_ms);
	struct tally_segment *seg = seg_create(tag, &cfg, name, sizeof(name));
	tally_subject_t id = intern(seg, "visible", 0);
	struct tally_engine *e = engine_start(seg, interval_ms);
	struct tally_producer *p = attach(seg);
	for (uint64_t i = 0; i < n; i++) {
		/* a random phase against the publish clock */
		sleep_ns(bench_rand(&seed) % ((uint64_t)interval_ms * 1000000u));
		lat[i] = one_visible(e, p, id, 1000 + i, count);
		if (tally_engine_read(e, id, &st) != 0)
			abort();
		count = st.total_count;
	}
	memcpy(sorted, lat, (size_t)n * sizeof(lat[0]));
	qsort(sorted, (size_t)n, sizeof(sorted[0]), cmp_double);
	double p99 = sorted[(size_t)ceil(0.99 * (double)n) - 1];
	double x = p99 / interval_ms;

	snprintf(row, sizeof(row), "p50, publish every %u ms (%llu samples)", interval_ms,
		 (unsigned long long)n);
	bench_row("visible", row, "ms", false, lat, (int)n, NULL, interval_ms);
	snprintf(row, sizeof(row), "p99, publish every %u ms (%.2fx interval)", interval_ms, x);
	bench_row("visible", row, "ms", false, &p99, 1, NULL, interval_ms);
	snprintf(row, sizeof(row), "p99 / interval, every %u ms (target <= 2)", interval_ms);
	bench_row("visible", row, "x interval", false, &x, 1, NULL, interval_ms);
	tally_producer_detach(&p);
	tally_engine_stop(&e);
	seg_close(&seg, name);
}

void bench_part_visible(void)
{
	visible_interval(100);
	visible_interval(10);
}
