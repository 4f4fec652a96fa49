/* SPDX-License-Identifier: MIT */
/*
 * test_engine.c: the aggregator end to end: samples recorded by
 * producers become visible in the RCU snapshot and in the segment's latch
 * with the right counts and quantiles; windows expire; subjects without
 * data say so; totals hold across processes; readers in threads and in
 * another process read while the aggregator publishes flat out; bad
 * subject ids are rejected; a dead owner is reported and its data stale;
 * a reader of a segment with random bytes in it gets errors, not crashes;
 * subjects enough for the drain's look-ahead sleep (their counters given
 * back) and wake, every value counted.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/helpers.h"
#include "arena.h"
#include "engine_priv.h"

/* test_engine_drain2 is this file built with 2: the engine's windows are
 * then kept by two drain threads and merged at publish (issue 18). */
#ifndef TT_DRAIN_THREADS
#define TT_DRAIN_THREADS 1
#endif

static struct tally_segment *make(const char *tag, char *name_out)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg = NULL;

	tt_config(&cfg);
	cfg.ring_capacity = 1u << 16;
	const char *name = tt_segname(tag);
	if (name_out)
		strcpy(name_out, name);
	cr_assert_eq(tally_segment_create(name, &cfg, 0, &seg), 0, "%s", tally_errmsg());
	return seg;
}

static struct tally_engine *start(struct tally_segment *seg, uint64_t slice_ms, uint64_t window_ms,
				  uint32_t publish_ms)
{
	struct tally_engine_config cfg;
	struct tally_engine *e;

	tally_engine_config_init(&cfg);
	cfg.slice_ns = slice_ms * 1000000u;
	cfg.window_ns = window_ms * 1000000u;
	cfg.publish_interval_ms = publish_ms;
	cfg.drain_threads = TT_DRAIN_THREADS;
	cr_assert_eq(tally_engine_start(seg, &cfg, &e), 0, "%s", tally_errmsg());
	return e;
}

/* Wait until the in-process snapshot of id shows at least `count` in total. */
static bool wait_total(struct tally_engine *e, tally_subject_t id, uint64_t count, unsigned ms)
{
	struct tally_subject_stats s;

	for (unsigned i = 0; i < ms; i++) {
		if (tally_engine_read(e, id, &s) == 0 && s.total_count >= count)
			return true;
		tt_sleep_ms(1);
	}
	return false;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

static uint64_t exact_rank(const uint64_t *sorted, size_t n, double q)
{
	size_t r = (size_t)ceil(q * (double)n);

	return sorted[(r ? r : 1) - 1];
}

static void expect_close(uint64_t est, uint64_t exact, const char *what)
{
	double err = fabs((double)est - (double)exact);

	cr_expect_leq(err, (double)exact / 128.0 + 0.5, "%s: estimate %llu exact %llu", what,
		      (unsigned long long)est, (unsigned long long)exact);
}

Test(engine, samples_become_visible_with_right_quantiles)
{
	struct tally_segment *seg = make("vis", NULL), *rd;
	struct tally_engine *e = start(seg, 1000, 10000, 10);
	struct tally_producer *p, *p2;
	tally_subject_t id;
	enum { N = 20000 };
	static uint64_t v[N];
	uint64_t seed = 42, sum = 0;

	tally_subject_intern(seg, "orders.created", &id);
	/* two slots side by side: with two drain threads, one each */
	tally_producer_attach(seg, &p);
	tally_producer_attach(seg, &p2);
	for (int i = 0; i < N; i++) {
		/* log-normal-ish: exp of a sum of uniforms */
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		double u = (double)(seed >> 11) / 9007199254740992.0;
		v[i] = (uint64_t)(50000.0 * exp(2.0 * (u - 0.5)));
		sum += v[i];
		while (!tally_record(i & 1 ? p2 : p, id, v[i]))
			tt_sleep_ms(1);
	}
	cr_assert(wait_total(e, id, N, 3000), "all samples visible within 3 s");
	struct tally_subject_stats s, x;
	cr_assert_eq(tally_engine_read(e, id, &s), 0);
	cr_expect_eq(s.count, N);
	cr_expect_eq(s.sum, sum);
	cr_expect(s.has_data);
	qsort(v, N, sizeof(v[0]), cmp_u64);
	cr_expect_eq(s.min_ns, v[0]);
	cr_expect_eq(s.max_ns, v[N - 1]);
	expect_close(s.p50_ns, exact_rank(v, N, 0.50), "p50");
	expect_close(s.p90_ns, exact_rank(v, N, 0.90), "p90");
	expect_close(s.p95_ns, exact_rank(v, N, 0.95), "p95");
	expect_close(s.p99_ns, exact_rank(v, N, 0.99), "p99");
	expect_close(s.p999_ns, exact_rank(v, N, 0.999), "p99.9");
	cr_expect_gt(s.rate, 0.0);

	/* the same numbers from another mapping, read-only, through the latch */
	struct tally_segment_info info;
	tally_segment_info(seg, &info);
	cr_assert_eq(tally_segment_open(info.name, TALLY_OPEN_READER, 0, &rd), 0);
	tt_sleep_ms(30);
	cr_assert_eq(tally_read_subject(rd, id, &x), 0);
	cr_expect_eq(x.count, N);
	cr_expect_eq(x.p95_ns, s.p95_ns);
	cr_expect_eq(x.total_count, N);
	cr_expect_eq(x.window_ns, 10000ull * 1000000u);
	tally_segment_close(&rd);
	tally_producer_detach(&p);
	tally_producer_detach(&p2);
	tally_engine_stop(&e);
	cr_expect_null(e);
	tally_segment_close(&seg);
}

Test(engine, window_expiry_and_no_data_is_not_zero_data)
{
	struct tally_segment *seg = make("expire", NULL);
	struct tally_engine *e = start(seg, 20, 100, 5);
	struct tally_producer *p;
	struct tally_subject_stats s;
	tally_subject_t id, idle;

	tally_subject_intern(seg, "a", &id);
	tally_subject_intern(seg, "never", &idle);
	tally_producer_attach(seg, &p);
	for (int i = 0; i < 100; i++)
		tally_record(p, id, 1000);
	cr_assert(wait_total(e, id, 100, 2000));
	cr_assert_eq(tally_engine_read(e, id, &s), 0);
	cr_expect_eq(s.count, 100);
	int rc = tally_engine_read(e, idle, &s);
	cr_expect(rc == -ENOENT || (rc == 0 && s.total_count == 0), "never recorded: no data published");
	tt_sleep_ms(300); /* > window + slice + publish, and > one reap interval */
	/* interned, never recorded: a row (the reaper's table scan), with no data, not zero data */
	cr_assert_eq(tally_engine_read(e, idle, &s), 0);
	cr_expect(s.count == 0 && s.total_count == 0 && !s.has_data && s.p95_ns == 0);
	cr_expect_eq(s.verdict, TALLY_VERDICT_UNKNOWN, "verdict %d reasons %#x", (int)s.verdict, s.reasons);
	cr_expect_eq(s.reasons, TALLY_REASON_NO_DATA);
	cr_assert_eq(tally_engine_read(e, id, &s), 0);
	cr_expect_eq(s.count, 0, "expired from the window");
	cr_expect(!s.has_data);
	cr_expect_eq(s.p95_ns, 0);
	cr_expect_eq(s.total_count, 100, "the since-start counter stays");
	tally_producer_detach(&p);
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}

Test(engine, totals_across_processes)
{
	char name[TALLY_NAME_MAX + 1];
	struct tally_segment *seg = make("procs", name);
	struct tally_engine *e;
	struct tt_gate gate;
	tally_subject_t id;
	int pipes[3][2];
	pid_t pids[3];

	tally_subject_intern(seg, "shared.subject", &id);
	tt_gate_init(&gate); /* the children are forked before the engine's threads */
	for (int c = 0; c < 3; c++) {
		cr_assert_eq(pipe(pipes[c]), 0);
		if ((pids[c] = fork()) == 0) {
			struct tally_segment *ps;
			struct tally_producer *p;
			struct tally_producer_counters cnt;
			tally_subject_t my;
			tt_gate_wait(&gate);
			if (tally_segment_open(name, TALLY_OPEN_PRODUCER, 1000, &ps) ||
			    tally_subject_intern(ps, "shared.subject", &my) || tally_producer_attach(ps, &p))
				_exit(1);
			for (int i = 0; i < 200000; i++)
				tally_record(p, my, (uint64_t)i);
			tally_producer_counters(p, &cnt);
			tally_producer_detach(&p);
			_exit(write(pipes[c][1], &cnt, sizeof(cnt)) == sizeof(cnt) ? 0 : 2);
		}
		close(pipes[c][1]);
	}
	e = start(seg, 1000, 10000, 5);
	tt_gate_open(&gate);
	uint64_t recorded = 0;
	for (int c = 0; c < 3; c++) {
		struct tally_producer_counters cnt;
		int status;
		cr_assert_eq(read(pipes[c][0], &cnt, sizeof(cnt)), (ssize_t)sizeof(cnt));
		waitpid(pids[c], &status, 0);
		cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0);
		cr_expect_eq(cnt.recorded + cnt.dropped, 200000);
		recorded += cnt.recorded;
	}
	cr_expect(wait_total(e, id, recorded, 3000));
	tt_sleep_ms(50);
	struct tally_subject_stats s;
	tally_engine_read(e, id, &s);
	cr_expect_eq(s.total_count, recorded, "every recorded sample counted once");
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}

struct reader_arg {
	struct tally_engine *e;
	const struct tally_segment *seg;
	tally_subject_t id;
	atomic_bool stop;
	uint64_t reads, bad;
};

static bool consistent(const struct tally_subject_stats *s)
{
	if (!s->has_data)
		return s->p95_ns == 0 && s->max_ns == 0;
	return s->min_ns <= s->p50_ns && s->p50_ns <= s->p90_ns && s->p90_ns <= s->p95_ns &&
	       s->p95_ns <= s->p99_ns && s->p99_ns <= s->p999_ns && s->p999_ns <= s->max_ns &&
	       s->count <= s->total_count;
}

static void *reader_thread(void *p)
{
	struct reader_arg *a = p;
	struct tally_subject_stats s;
	uint64_t last = 0;

	while (!atomic_load(&a->stop)) {
		int rc = a->e ? tally_engine_read(a->e, a->id, &s) : tally_read_subject(a->seg, a->id, &s);
		if (rc == 0) {
			a->reads++;
			if (!consistent(&s) || s.published_ns < last)
				a->bad++;
			last = s.published_ns;
		} else if (rc != -ENOENT && rc != TALLY_EBUSY_RETRY) {
			a->bad++;
		}
	}
	return NULL;
}

static void *writer_thread(void *p)
{
	struct reader_arg *a = p;
	struct tally_producer *prod;
	uint64_t seed = 7;

	if (tally_producer_attach((struct tally_segment *)a->seg, &prod))
		return NULL;
	while (!atomic_load(&a->stop)) {
		seed = seed * 6364136223846793005ull + 1;
		tally_record(prod, a->id, seed >> 44);
	}
	tally_producer_detach(&prod);
	return NULL;
}

Test(engine, readers_in_threads_and_another_process_during_publishing)
{
	char name[TALLY_NAME_MAX + 1];
	struct tally_segment *seg = make("readers", name), *rd;
	struct tally_engine *e;
	struct tt_gate gate;
	tally_subject_t id;
	struct reader_arg in = { 0 }, cross = { 0 }, wr = { 0 };
	pthread_t t1, t2, tw;

	tally_subject_intern(seg, "hot", &id);
	cr_assert_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), 0);
	tt_gate_init(&gate); /* the child is forked before the engine's threads */
	pid_t child = fork();
	if (child == 0) {
		struct tally_segment *crd;
		struct reader_arg ca;
		tt_gate_wait(&gate);
		if (tally_segment_open(name, TALLY_OPEN_READER, 1000, &crd))
			_exit(1);
		ca = (struct reader_arg){ .seg = crd, .id = id };
		/* at least 400 ms and 100 good reads (bounded: 20 s, for valgrind) */
		uint64_t start = tally_now_ns(), end = start + 20000000000ull;
		struct tally_subject_stats s;
		while (tally_now_ns() < end &&
		       (ca.reads < 100 || tally_now_ns() - start < 400000000ull)) {
			int rc = tally_read_subject(crd, id, &s);
			if (rc == 0) {
				ca.reads++;
				ca.bad += !consistent(&s);
			} else if (rc != -ENOENT && rc != TALLY_EBUSY_RETRY) {
				ca.bad++;
			}
		}
		_exit(ca.bad ? 2 : ca.reads ? 0 : 3);
	}
	e = start(seg, 10, 50, 1);
	in = (struct reader_arg){ .e = e, .seg = seg, .id = id };
	cross = (struct reader_arg){ .seg = rd, .id = id };
	wr = (struct reader_arg){ .seg = seg, .id = id };
	tt_gate_open(&gate);
	pthread_create(&tw, NULL, writer_thread, &wr);
	pthread_create(&t1, NULL, reader_thread, &in);
	pthread_create(&t2, NULL, reader_thread, &cross);
	/* readers run across at least 50 publishes (bounded: 10 s) */
	struct tally_engine_counters c0, c1;
	tally_engine_counters(e, &c0);
	for (int i = 0; i < 1000; i++) {
		tt_sleep_ms(10);
		tally_engine_counters(e, &c1);
		if (i >= 40 && c1.publishes >= c0.publishes + 50)
			break;
	}
	atomic_store(&in.stop, true);
	atomic_store(&cross.stop, true);
	atomic_store(&wr.stop, true);
	pthread_join(t1, NULL);
	pthread_join(t2, NULL);
	pthread_join(tw, NULL);
	int status;
	waitpid(child, &status, 0);
	cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child reader status %d", status);
	cr_expect_gt(in.reads, 0);
	cr_expect_gt(cross.reads, 0);
	cr_expect_eq(in.bad, 0);
	cr_expect_eq(cross.bad, 0);
	cr_expect_geq(c1.publishes, c0.publishes + 50, "readers ran across 50 publishes: %llu",
		      (unsigned long long)(c1.publishes - c0.publishes));
	tally_segment_close(&rd);
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}

Test(engine, bad_subject_ids_are_rejected_and_counted)
{
	struct tally_segment *seg = make("reject", NULL);
	struct tally_engine *e = start(seg, 1000, 10000, 5);
	struct tally_producer *p;
	tally_subject_t good;

	tally_subject_intern(seg, "good", &good);
	tally_producer_attach(seg, &p);
	tally_record(p, 0xfffffff0u, 1); /* outside the table */
	tally_record(p, (good + 1) % tally_subject_capacity(seg), 1); /* in range, never interned */
	tally_record(p, good, 5);
	cr_assert(wait_total(e, good, 1, 2000));
	struct tally_engine_counters c;
	tally_engine_counters(e, &c);
	cr_expect_eq(c.rejected, 2);
	cr_expect_eq(c.drained, 1);
	struct tally_subject_stats s;
	cr_expect_eq(tally_engine_read(e, (good + 1) % tally_subject_capacity(seg), &s), -ENOENT);
	tally_producer_detach(&p);
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}

Test(engine, producers_are_listed)
{
	struct tally_segment *seg = make("prod", NULL);
	struct tally_engine *e = start(seg, 1000, 10000, 5);
	struct tally_producer *p;
	struct tally_producer_stats ps[16];

	tally_producer_attach(seg, &p);
	for (int i = 0; i < 10; i++)
		tally_record(p, 1, 1);
	int n = tally_read_producers(seg, ps, 16);
	cr_assert_eq(n, 1);
	cr_expect_eq(ps[0].pid, getpid());
	cr_expect(ps[0].alive);
	cr_expect_eq(ps[0].samples, 10);
	cr_expect_str_eq(ps[0].state, "active");
	tally_producer_detach(&p);
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}

Test(engine, dead_owner_is_reported_and_its_data_stale)
{
	char name[TALLY_NAME_MAX + 1];
	strcpy(name, tt_segname("deadowner"));
	int ready[2];
	cr_assert_eq(pipe(ready), 0);
	pid_t child = fork();
	if (child == 0) {
		struct tally_segment_config cfg;
		struct tally_segment *s;
		struct tally_engine *en;
		struct tally_producer *p;
		tally_subject_t id;
		tt_config(&cfg);
		if (tally_segment_create(name, &cfg, 0, &s) || tally_engine_start(s, NULL, &en) ||
		    tally_subject_intern(s, "x", &id) || tally_producer_attach(s, &p))
			_exit(1);
		tally_record(p, id, 100);
		tt_sleep_ms(300);
		char c = 1;
		if (write(ready[1], &c, 1) != 1)
			_exit(2);
		for (;;)
			pause();
	}
	char c;
	cr_assert_eq(read(ready[0], &c, 1), 1);
	struct tally_segment *rd;
	tally_subject_t id;
	struct tally_subject_stats s;
	cr_assert_eq(tally_segment_open(name, TALLY_OPEN_READER, 1000, &rd), 0);
	cr_assert_eq(tally_subject_lookup(rd, "x", &id), 0);
	cr_expect_eq(tally_read_subject(rd, id, &s), 0, "live owner: fresh data");
	cr_expect_eq(s.count, 1);
	cr_expect_eq(tally_segment_owner_alive(rd), 1);
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	cr_expect_eq(tally_segment_owner_alive(rd), 0, "owner dead");
	tt_sleep_ms(1100);
	cr_expect_eq(tally_read_subject(rd, id, &s), TALLY_ESTALE, "old data is not presented as live");
	tally_segment_close(&rd);
	tally_segment_unlink(name);
}

Test(engine, reader_survives_random_bytes_in_the_segment)
{
	char name[TALLY_NAME_MAX + 1], path[300];
	struct tally_segment *seg = make("fuzzish", name);
	struct tally_engine *e = start(seg, 1000, 10000, 5);
	struct tally_producer *p;
	tally_subject_t id;

	tally_subject_intern(seg, "a.b", &id);
	tally_producer_attach(seg, &p);
	tally_record(p, id, 7);
	tt_sleep_ms(30);
	tally_producer_detach(&p);
	tally_engine_stop(&e);
	tally_segment_keep(seg, true);
	struct tally_segment_info info;
	tally_segment_info(seg, &info);
	tally_segment_close(&seg);

	snprintf(path, sizeof(path), "/%s", name);
	int fd = shm_open(path, O_RDWR, 0);
	cr_assert_geq(fd, 0);
	unsigned char *m = mmap(NULL, info.total_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	cr_assert_neq(m, MAP_FAILED);
	unsigned char *pristine = malloc(info.total_size);
	memcpy(pristine, m, info.total_size);
	uint64_t seed = 12345;
	int opened = 0;
	for (int round = 0; round < 300; round++) {
		memcpy(m, pristine, info.total_size);
		for (int k = 0; k < 8; k++) {
			seed = seed * 6364136223846793005ull + 1442695040888963407ull;
			/* half the hits in the header, the rest anywhere in the tables */
			uint64_t off = (k & 1) ? (seed >> 20) % 4096
					       : (seed >> 20) % (info.snapshot.off + info.snapshot.size);
			m[off] = (unsigned char)(seed >> 56);
		}
		struct tally_segment *rd;
		if (tally_segment_open(name, TALLY_OPEN_READER, 0, &rd) != 0)
			continue;
		opened++;
		struct tally_subject_stats s;
		struct tally_producer_stats ps[16];
		char buf[300];
		for (uint32_t i = 0; i < tally_subject_capacity(rd) + 2; i++) {
			(void)tally_subject_name(rd, i, buf, sizeof(buf));
			(void)tally_read_subject(rd, i, &s);
		}
		(void)tally_read_producers(rd, ps, 16);
		tally_subject_t l;
		(void)tally_subject_lookup(rd, "a.b", &l);
		tally_segment_close(&rd);
	}
	cr_expect_gt(opened, 0, "some damage leaves the segment usable");
	free(pristine);
	munmap(m, info.total_size);
	tally_segment_unlink(name);
}

Test(engine, export_buckets_are_exact_cumulative_counters)
{
	struct tally_segment *seg = make("buckets", NULL);
	struct tally_engine *e = start(seg, 20, 100, 5);
	struct tally_producer *p;
	struct tally_subject_buckets b;
	tally_subject_t id;
	enum { N = 3000 };
	static uint64_t v[N];
	uint64_t seed = 9, sum = 0;

	tally_subject_intern(seg, "b", &id);
	tally_producer_attach(seg, &p);
	for (int i = 0; i < N; i++) {
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		v[i] = (seed >> 40) % 5000000; /* 0 .. 5 ms */
		sum += v[i];
		while (!tally_record(p, id, v[i]))
			tt_sleep_ms(1);
	}
	/* the buckets cover closed slices: wait until all samples are in them */
	bool done = false;
	for (int i = 0; i < 300 && !done; i++) {
		tt_sleep_ms(10);
		done = tally_engine_read_buckets(e, id, &b) == 0 && b.count == N;
	}
	cr_assert(done, "all samples in closed slices within 3 s (count %llu)", (unsigned long long)b.count);
	cr_expect_eq(b.sum_ns, sum);
	cr_expect_gt(b.n, 40);
	for (uint32_t k = 0; k < b.n; k++) {
		uint64_t exact = 0;
		for (int i = 0; i < N; i++)
			exact += v[i] <= b.le_ns[k];
		cr_expect_eq(b.cumulative[k], exact, "le %llu ns", (unsigned long long)b.le_ns[k]);
		if (k)
			cr_expect_gt(b.le_ns[k], b.le_ns[k - 1]);
	}
	/* counters never go down, even after the window has expired */
	tt_sleep_ms(200);
	struct tally_subject_buckets later;
	cr_assert_eq(tally_engine_read_buckets(e, id, &later), 0);
	cr_expect_eq(later.count, N);
	struct tally_subject_stats s;
	tally_engine_read(e, id, &s);
	cr_expect_eq(s.count, 0, "the window itself has expired");
	tally_producer_detach(&p);
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}

/* The segment's totals count every claim, whatever producers came and
 * went (issue 15): a slot's counters belong to its claim, so the next
 * claimer of the same slot starts at 0, and the totals keep the first
 * one's drops after its slot was freed and reused. */
Test(engine, totals_outlive_the_producers_that_made_them, .timeout = 30)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	struct tally_engine_config ec;
	struct tally_engine *e;
	struct tally_producer *p1, *p2;
	struct tally_producer_counters c1;
	struct tally_segment_totals t;
	struct tally_producer_stats ps[1];
	tally_subject_t id;

	tt_config(&cfg);
	cfg.producer_slots = 1; /* the second producer must take the first one's slot */
	cfg.ring_capacity = 64; /* small: a flat-out producer drops */
	cr_assert_eq(tally_segment_create(tt_segname("totals"), &cfg, 0, &seg), 0, "%s", tally_errmsg());
	tally_engine_config_init(&ec);
	ec.reap_interval_ms = 5;
	ec.publish_interval_ms = 5;
	ec.drain_threads = TT_DRAIN_THREADS;
	cr_assert_eq(tally_engine_start(seg, &ec, &e), 0, "%s", tally_errmsg());
	cr_assert_eq(tally_subject_intern(seg, "totals.x", &id), 0);

	cr_assert_eq(tally_producer_attach(seg, &p1), 0, "%s", tally_errmsg());
	for (int i = 0; i < 200000; i++)
		tally_record(p1, id, 1000);
	tally_record(p1, id, 7200ull * 1000000000ull); /* 2 h: clamped, or dropped */
	tally_producer_counters(p1, &c1);
	tally_producer_detach(&p1);
	cr_assert_gt(c1.dropped, 0, "a 64-entry ring drops under a flat-out producer");

	int rc = TALLY_EFULL;
	for (int i = 0; i < 400 && (rc = tally_producer_attach(seg, &p2)) == TALLY_EFULL; i++)
		tt_sleep_ms(5);
	cr_assert_eq(rc, 0, "the only slot was not freed after the first producer left");
	cr_assert(tally_record(p2, id, 1000));
	cr_assert_eq(tally_read_producers(seg, ps, 1), 1);
	cr_expect_eq(ps[0].dropped, 0, "the new claim of the slot shows the old claim's drops (%llu)",
		     (unsigned long long)ps[0].dropped);
	cr_expect_eq(ps[0].samples, 1);

	uint64_t want = c1.recorded + 1;
	for (int i = 0; i < 1000; i++) {
		cr_assert_eq(tally_read_totals(seg, &t), 0);
		if (t.drained == want && t.recorded == want)
			break;
		tt_sleep_ms(5);
	}
	cr_expect_eq(t.recorded, want, "recorded %llu, want %llu", (unsigned long long)t.recorded,
		     (unsigned long long)want);
	cr_expect_eq(t.drained, want);
	cr_expect_eq(t.dropped, c1.dropped, "dropped %llu, the first producer counted %llu",
		     (unsigned long long)t.dropped, (unsigned long long)c1.dropped);
	cr_expect_eq(t.clamped, c1.clamped);
	cr_expect_eq(t.rejected, 0);
	cr_expect_eq(t.skipped, 0);
	tally_producer_detach(&p2);
	tt_sleep_ms(50);
	struct tally_segment_totals after;
	cr_assert_eq(tally_read_totals(seg, &after), 0);
	cr_expect(after.recorded == t.recorded && after.dropped == t.dropped && after.drained == t.drained,
		  "totals moved after the last producer left");
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}

/* Enough subjects that the drain looks ahead (TALLY__PF_MIN_SUBJECTS),
 * every one asleep between bursts with its counters given back, so that
 * the arena unmaps their chunks: the look-ahead's addresses of those
 * counters (pf_counts in lib/engine.c) then point at unmapped memory,
 * which a prefetch may be given and a load may not. Each wake gets new
 * counters, and every value is counted. */
#define PF_SUBJECTS ((int)TALLY__PF_MIN_SUBJECTS + 144)
#define PF_ROUNDS 4
#define PF_PER_BURST 20

Test(engine, subjects_that_sleep_and_wake_under_the_look_ahead, .timeout = 60)
{
	struct tally_segment_config scfg;
	struct tally_segment *seg = NULL;
	struct tally_producer *prod;
	static tally_subject_t ids[PF_SUBJECTS];
	char name[32];

	tt_config(&scfg);
	scfg.ring_capacity = 1u << 16;
	scfg.subject_capacity = 4 * PF_SUBJECTS;
	cr_assert_eq(tally_segment_create(tt_segname("pfw"), &scfg, 0, &seg), 0, "%s", tally_errmsg());
	for (int s = 0; s < PF_SUBJECTS; s++) {
		snprintf(name, sizeof(name), "pf.wake.%d", s);
		cr_assert_eq(tally_subject_intern(seg, name, &ids[s]), 0, "%s", tally_errmsg());
	}
	struct tally_engine *e = start(seg, 5, 20, 1);
	cr_assert_eq(tally_producer_attach(seg, &prod), 0);
	for (int round = 1; round <= PF_ROUNDS; round++) {
		/* a subject after another, so that the look-ahead sees them all */
		for (int k = 0; k < PF_PER_BURST; k++)
			for (int s = 0; s < PF_SUBJECTS; s++)
				cr_assert(tally_record(prod, ids[s], 1000 + (uint64_t)s), "ring full");
		for (int s = 0; s < PF_SUBJECTS; s++)
			cr_assert(wait_total(e, ids[s], (uint64_t)round * PF_PER_BURST, 5000),
				  "round %d: subject %d did not show its values", round, s);
		size_t busy = tally__arena_bytes();
		/* longer than a window, a slice and a publish without a value:
		 * every window asleep, its counters given back */
		size_t idle = busy;
		for (int i = 0; i < 500 && idle >= busy; i++) {
			tt_sleep_ms(10);
			idle = tally__arena_bytes();
		}
		cr_assert_lt(idle, busy, "round %d: the arena kept %zu bytes of %zu: no window slept", round, idle,
			     busy);
	}
	struct tally_subject_stats st;
	for (int s = 0; s < PF_SUBJECTS; s++) {
		/* the snapshot read may be one published before the window
		 * emptied: wait (bounded) for one after it */
		for (int i = 0; i < 2000; i++) {
			cr_assert_eq(tally_engine_read(e, ids[s], &st), 0);
			if (st.count == 0)
				break;
			tt_sleep_ms(1);
		}
		cr_assert_eq(st.total_count, (uint64_t)PF_ROUNDS * PF_PER_BURST, "subject %d: %llu values", s,
			     (unsigned long long)st.total_count);
		cr_assert_eq(st.count, 0, "subject %d: %llu values still in the window", s,
			     (unsigned long long)st.count);
	}
	tally_producer_detach(&prod);
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}
