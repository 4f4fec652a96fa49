/* SPDX-License-Identifier: MIT */
/*
 * test_record.c: the record path: exact accounting (recorded = drained +
 * dropped) from threads and forked processes, ring wrap-around, a full
 * ring, clamping, slot release and reclaim, and producers killed with
 * SIGKILL mid-stream.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/helpers.h"
#include "shm_layout.h"

static struct tally_segment *make_cfg(const char *tag, struct tally_segment_config *cfg)
{
	struct tally_segment *seg = NULL;

	cr_assert_eq(tally_segment_create(tt_segname(tag), cfg, 0, &seg), 0, "%s", tally_errmsg());
	return seg;
}

static struct tally_segment *make(const char *tag)
{
	struct tally_segment_config cfg;

	tt_config(&cfg);
	return make_cfg(tag, &cfg);
}

Test(record, single_thread_exact)
{
	struct tally_segment *seg = make("one");
	struct tally_producer *p;
	struct tt_drainer d;
	tally_subject_t a, b;

	tally_subject_intern(seg, "a", &a);
	tally_subject_intern(seg, "b", &b);
	cr_assert_eq(tally_producer_attach(seg, &p), 0, "%s", tally_errmsg());
	tt_drainer_init(&d, seg);
	for (uint64_t i = 0; i < 500; i++)
		cr_assert(tally_record(p, i % 2 ? a : b, i));
	cr_expect(tally_record(p, a, 0), "zero is a valid value");
	tt_drain_once(&d, false);
	cr_expect_eq(d.per_subject[a], 251);
	cr_expect_eq(d.per_subject[b], 250);
	cr_expect_eq(d.sum, 499ull * 500 / 2);
	struct tally_producer_counters c;
	tally_producer_counters(p, &c);
	cr_expect_eq(c.recorded, 501);
	cr_expect_eq(c.dropped, 0);
	tally_producer_detach(&p);
	cr_expect_null(p);
	tally_segment_close(&seg);
}

Test(record, wrap_around_many_times)
{
	struct tally_segment *seg = make("wrap");
	struct tally_producer *p;
	struct tt_drainer d;
	uint64_t want_sum = 0;

	tally_producer_attach(seg, &p);
	tt_drainer_init(&d, seg);
	for (int round = 0; round < 100; round++) {
		for (int i = 0; i < 700; i++) { /* 700 does not divide 1024: positions drift */
			cr_assert(tally_record(p, 3, (uint64_t)round * 1000 + (uint64_t)i));
			want_sum += (uint64_t)round * 1000 + (uint64_t)i;
		}
		tt_drain_once(&d, false);
	}
	cr_expect_eq(d.total, 70000);
	cr_expect_eq(d.per_subject[3], 70000);
	cr_expect_eq(d.sum, want_sum);
	tally_producer_detach(&p);
	tally_segment_close(&seg);
}

Test(record, full_ring_drops_and_counts)
{
	struct tally_segment *seg = make("fullring");
	struct tally_producer *p;
	struct tt_drainer d;
	int stored = 0, dropped = 0;

	tally_producer_attach(seg, &p);
	for (int i = 0; i < 1024 + 100; i++)
		tally_record(p, 1, 5) ? stored++ : dropped++;
	cr_expect_eq(stored, 1024);
	cr_expect_eq(dropped, 100);
	struct tally_producer_counters c;
	tally_producer_counters(p, &c);
	cr_expect_eq(c.dropped, 100);
	cr_expect_eq(c.recorded, 1024);
	struct tt_slot_view v;
	tt_slot_view(seg, c.slot, &v);
	cr_expect_eq(v.dropped, 100, "drops are visible in the segment");
	/* after a drain there is room again */
	tt_drainer_init(&d, seg);
	tt_drain_once(&d, false);
	cr_expect(tally_record(p, 1, 5));
	cr_expect_eq(d.total, 1024);
	tally_producer_detach(&p);
	tally_segment_close(&seg);
}

Test(record, values_above_max_are_clamped_and_counted)
{
	struct tally_segment_config cfg;
	struct tally_producer *p;
	struct tt_drainer d;

	tt_config(&cfg);
	cfg.max_value_ns = 1000;
	struct tally_segment *seg = make_cfg("clamp", &cfg);
	tally_producer_attach(seg, &p);
	tally_record(p, 1, 999);
	tally_record(p, 1, 1000);
	tally_record(p, 1, 1001);
	tally_record(p, 1, UINT64_MAX);
	tt_drainer_init(&d, seg);
	tt_drain_once(&d, false);
	cr_expect_eq(d.max_seen, 1000);
	cr_expect_eq(d.sum, 999 + 3000);
	struct tally_producer_counters c;
	tally_producer_counters(p, &c);
	cr_expect_eq(c.clamped, 2);
	tally_producer_detach(&p);
	tally_segment_close(&seg);
}

struct worker {
	struct tally_segment *seg;
	uint64_t n;
	tally_subject_t subject;
	struct tally_producer_counters c;
};

static void *record_worker(void *arg)
{
	struct worker *w = arg;
	struct tally_producer *p;

	if (tally_producer_attach(w->seg, &p) != 0)
		return (void *)1;
	for (uint64_t i = 0; i < w->n; i++)
		tally_record(p, w->subject, i & 1023);
	tally_producer_counters(p, &w->c);
	tally_producer_detach(&p);
	return NULL;
}

Test(record, many_threads_recorded_equals_drained_plus_dropped)
{
	struct tally_segment *seg = make("threads");
	struct tt_drainer d;
	struct worker w[8];
	pthread_t th[8];

	tt_drainer_init(&d, seg);
	tt_drainer_start(&d);
	for (int t = 0; t < 8; t++) {
		w[t] = (struct worker){ .seg = seg, .n = 200000, .subject = (tally_subject_t)t };
		pthread_create(&th[t], NULL, record_worker, &w[t]);
	}
	uint64_t recorded = 0, dropped = 0;
	for (int t = 0; t < 8; t++) {
		void *ret;
		pthread_join(th[t], &ret);
		cr_assert_null(ret, "attach failed");
		cr_expect_eq(w[t].c.recorded + w[t].c.dropped, 200000);
		recorded += w[t].c.recorded;
		dropped += w[t].c.dropped;
	}
	tt_sleep_ms(20);
	tt_drainer_stop(&d);
	cr_expect_eq(d.total, recorded, "drained %llu recorded %llu dropped %llu",
		     (unsigned long long)d.total, (unsigned long long)recorded,
		     (unsigned long long)dropped);
	for (int t = 0; t < 8; t++)
		cr_expect_eq(d.per_subject[t], w[t].c.recorded, "subject %d", t);
	cr_expect_eq(d.released, 8, "every detached slot was freed once drained");
	tally_segment_close(&seg);
}

Test(record, forked_processes_exact_accounting)
{
	struct tally_segment *seg = make("procs");
	struct tt_drainer d;
	int pipes[4][2];
	pid_t pids[4];
	char name[TALLY_NAME_MAX + 1];
	struct tally_segment_info info;

	tally_segment_info(seg, &info);
	snprintf(name, sizeof(name), "%s", info.name);
	tt_drainer_init(&d, seg);
	tt_drainer_start(&d);
	for (int c = 0; c < 4; c++) {
		cr_assert_eq(pipe(pipes[c]), 0);
		pids[c] = fork();
		if (pids[c] == 0) {
			struct tally_segment *ps;
			struct worker wk = { .n = 300000, .subject = (tally_subject_t)(10 + c) };
			if (tally_segment_open(name, TALLY_OPEN_PRODUCER, 1000, &ps) != 0)
				_exit(1);
			wk.seg = ps;
			if (record_worker(&wk))
				_exit(2);
			tally_segment_close(&ps);
			_exit(write(pipes[c][1], &wk.c, sizeof(wk.c)) == sizeof(wk.c) ? 0 : 3);
		}
		close(pipes[c][1]);
	}
	uint64_t recorded = 0;
	struct tally_producer_counters got[4];
	for (int c = 0; c < 4; c++) {
		int status;
		cr_assert_eq(read(pipes[c][0], &got[c], sizeof(got[c])), (ssize_t)sizeof(got[c]));
		waitpid(pids[c], &status, 0);
		cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0);
		cr_expect_eq(got[c].recorded + got[c].dropped, 300000);
		recorded += got[c].recorded;
	}
	tt_sleep_ms(20);
	tt_drainer_stop(&d);
	cr_expect_eq(d.total, recorded);
	for (int c = 0; c < 4; c++)
		cr_expect_eq(d.per_subject[10 + c], got[c].recorded);
	tally_segment_close(&seg);
}

Test(record, producer_killed_mid_stream_is_drained_and_reclaimed)
{
	struct tally_segment *seg = make("kill");
	struct tally_segment_info info;
	struct tt_drainer d;

	tally_segment_info(seg, &info);
	tt_drainer_init(&d, seg);
	tt_drainer_start(&d);
	pid_t child = fork();
	if (child == 0) {
		struct tally_segment *ps;
		struct tally_producer *p;
		if (tally_segment_open(info.name, TALLY_OPEN_PRODUCER, 1000, &ps) ||
		    tally_producer_attach(ps, &p))
			_exit(1);
		for (uint64_t i = 0;; i++)
			tally_record(p, 7, i & 0xffff);
	}
	tt_sleep_ms(100);
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);

	/* find the child's slot */
	struct tt_slot_view v;
	uint32_t slot = UINT32_MAX;
	for (uint32_t i = 0; i < info.config.producer_slots; i++) {
		tt_slot_view(seg, i, &v);
		if (v.pid == child)
			slot = i;
	}
	cr_assert_neq(slot, UINT32_MAX, "the child claimed a slot");
	/* dead -> drained -> cooling -> free, within a generous bound */
	for (int i = 0; i < 200; i++) {
		tt_slot_view(seg, slot, &v);
		if (v.state == TALLY__SLOT_FREE)
			break;
		tt_sleep_ms(10);
	}
	tt_drainer_stop(&d);
	tt_slot_view(seg, slot, &v);
	cr_expect_eq(v.state, TALLY__SLOT_FREE, "state %u", v.state);
	cr_expect_eq(d.died, 1);
	cr_expect_eq(v.head, v.tail, "everything published was drained");
	cr_expect_eq(d.per_subject[7], v.tail - v.base, "samples seen = published before the kill");
	cr_expect_gt(d.per_subject[7], 0);
	/* the slot can be claimed again */
	struct tally_producer *ps[16];
	int n = 0;
	while (n < 16 && tally_producer_attach(seg, &ps[n]) == 0)
		n++;
	cr_expect_eq(n, 16, "all 16 slots usable again");
	struct tally_producer *extra;
	cr_expect_eq(tally_producer_attach(seg, &extra), TALLY_EFULL);
	cr_expect(strstr(tally_errmsg(), "producer_slots"), "%s", tally_errmsg());
	while (n > 0)
		tally_producer_detach(&ps[--n]);
	tally_segment_close(&seg);
}

/* The handle the thread below abandons: kept reachable so that valgrind
 * (tests/run-valgrind) does not call it a leak. */
static struct tally_producer *volatile abandoned; /* volatile: the store must stay */

static void *exit_without_detach(void *arg)
{
	struct tally_producer *p;

	if (tally_producer_attach(arg, &p) == 0)
		for (int i = 0; i < 100; i++)
			tally_record(p, 2, 1);
	abandoned = p;
	return NULL; /* never detaches, on purpose: the reaper must notice */
}

Test(record, thread_exit_without_detach_frees_slot)
{
	struct tally_segment *seg = make("thr");
	struct tt_drainer d;
	pthread_t th;

	pthread_create(&th, NULL, exit_without_detach, seg);
	pthread_join(th, NULL);
	tt_drainer_init(&d, seg);
	for (int i = 0; i < 100 && atomic_load(&d.reused) == 0; i++) {
		tt_drain_once(&d, true);
		tt_sleep_ms(10);
	}
	cr_expect_eq(d.died, 1);
	cr_expect_eq(d.reused, 1);
	cr_expect_eq(d.per_subject[2], 100);
	tally_segment_close(&seg);
}

Test(record, attach_refused_when_owner_is_gone)
{
	struct tally_segment *seg = make("noowner"), *ps;
	struct tally_segment_info info;
	struct tally_producer *p;

	tally_segment_info(seg, &info);
	tally_segment_keep(seg, true);
	tally_segment_close(&seg);
	cr_assert_eq(tally_segment_open(info.name, TALLY_OPEN_PRODUCER, 0, &ps), 0);
	cr_expect_eq(tally_producer_attach(ps, &p), TALLY_EOWNERDEAD);
	tally_segment_close(&ps);
	tally_segment_unlink(info.name);
}
