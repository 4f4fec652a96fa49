/* SPDX-License-Identifier: MIT */
/*
 * test_record.c: the record path: exact accounting (recorded = drained +
 * dropped) from threads and forked processes, ring wrap-around, a full
 * ring, clamping, slot release and reclaim, producers killed with
 * SIGKILL mid-stream, and leases: a handle moved between threads, a
 * thread-local handle, a revoked handle, a fork child.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/helpers.h"
#include "segment.h"

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
	/* forked before the drainer thread starts (tt_gate) */
	struct tt_gate gate;
	tt_gate_init(&gate);
	for (int c = 0; c < 4; c++) {
		cr_assert_eq(pipe(pipes[c]), 0);
		pids[c] = fork();
		if (pids[c] == 0) {
			struct tally_segment *ps;
			struct worker wk = { .n = 300000, .subject = (tally_subject_t)(10 + c) };
			tt_gate_wait(&gate);
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
	tt_drainer_init(&d, seg);
	tt_drainer_start(&d);
	tt_gate_open(&gate);
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
	pid_t child = fork(); /* before the drainer thread (tt_gate) */
	if (child == 0) {
		struct tally_segment *ps;
		struct tally_producer *p;
		if (tally_segment_open(info.name, TALLY_OPEN_PRODUCER, 1000, &ps) ||
		    tally_producer_attach(ps, &p))
			_exit(1);
		for (uint64_t i = 0;; i++)
			tally_record(p, 7, i & 0xffff);
	}
	tt_drainer_init(&d, seg);
	tt_drainer_start(&d);
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

/* ---- leases: a slot belongs to its claim, never to a thread ---------------- */

struct handoff {
	struct tally_segment *seg;
	struct tally_producer *p; /* attached by T1, recorded by T2 */
	tally_subject_t subject;
	unsigned n;
	pthread_barrier_t *go;
	struct tally_producer_counters c;
};

static void *attach_and_exit(void *arg)
{
	struct handoff *h = arg;

	cr_assert_eq(tally_producer_attach(h->seg, &h->p), 0, "%s", tally_errmsg());
	return NULL; /* T1 exits; its handle lives on in T2 */
}

/* Record n samples, waiting for room rather than dropping (the drainer is
 * slower than a flat-out producer): the count that must be drained is n. */
static void *record_n(void *arg)
{
	struct handoff *h = arg;

	if (h->go)
		pthread_barrier_wait(h->go);
	for (unsigned i = 0; i < h->n; i++)
		while (!tally_record(h->p, h->subject, i))
			sched_yield();
	tally_producer_counters(h->p, &h->c);
	return NULL;
}

/* The reproduction: T1 attaches and exits, T2 records through
 * T1's handle, T3 attaches meanwhile. The first stage freed T1's slot by
 * its tid and gave T3 the same ring: 60,320 of 120,000 samples arrived. */
Test(record, handle_moved_to_another_thread_keeps_its_slot, .timeout = 60)
{
	struct tally_segment *seg = make("moved");
	struct handoff h2 = { .seg = seg, .n = 60000 }, h3 = { .seg = seg, .n = 60000 };
	struct tally_producer *p4;
	struct tt_drainer d;
	struct tt_slot_view v;
	pthread_barrier_t go;
	pthread_t t1, t2, t3;

	tally_subject_intern(seg, "moved.t2", &h2.subject);
	tally_subject_intern(seg, "moved.t3", &h3.subject);
	pthread_create(&t1, NULL, attach_and_exit, &h2);
	pthread_join(t1, NULL);
	tt_drainer_init(&d, seg);
	for (int i = 0; i < 10; i++) { /* the reaper has every chance to misjudge */
		tt_drain_once(&d, true);
		tt_sleep_ms(10);
	}
	cr_expect_eq(atomic_load(&d.died), 0, "a live process's slot is never dead");
	cr_assert_eq(tally_producer_attach(seg, &h3.p), 0, "%s", tally_errmsg());
	struct tally_producer_counters c2, c3;
	tally_producer_counters(h2.p, &c2);
	tally_producer_counters(h3.p, &c3);
	cr_assert_neq(c2.slot, c3.slot, "T3 got T2's ring");
	pthread_barrier_init(&go, NULL, 2);
	h2.go = h3.go = &go;
	d.reap_every_ms = 1;
	tt_drainer_start(&d);
	pthread_create(&t2, NULL, record_n, &h2);
	pthread_create(&t3, NULL, record_n, &h3);
	pthread_join(t2, NULL);
	pthread_join(t3, NULL);
	/* T2 detaches while T3 is active: T3's slot must be untouched */
	tally_producer_detach(&h2.p);
	tt_slot_view(seg, c3.slot, &v);
	cr_expect_eq(v.state, TALLY__SLOT_ACTIVE, "T3's slot is %u", v.state);
	cr_assert_eq(tally_producer_attach(seg, &p4), 0);
	struct tally_producer_counters c4;
	tally_producer_counters(p4, &c4);
	cr_expect_neq(c4.slot, c3.slot, "T4 was given T3's ring");
	tally_producer_detach(&p4);
	tally_producer_detach(&h3.p);
	tt_drainer_stop(&d);
	tt_drain_once(&d, true);
	cr_expect_eq(h2.c.recorded, 60000);
	cr_expect_eq(h3.c.recorded, 60000);
	cr_expect_eq(h2.c.lost + h3.c.lost, 0);
	cr_expect_eq(d.per_subject[h2.subject], 60000, "T2: %lu drained",
		     (unsigned long)d.per_subject[h2.subject]);
	cr_expect_eq(d.per_subject[h3.subject], 60000, "T3: %lu drained",
		     (unsigned long)d.per_subject[h3.subject]);
	pthread_barrier_destroy(&go);
	tally_segment_close(&seg);
}

/* A start time that reads as 0 (hidepid, a /proc we may not read) is no
 * proof of death: the first stage freed such slots under live handles. */
Test(record, unreadable_start_time_is_not_death)
{
	struct tally_segment *seg = make("st0");
	struct tally_producer *p;
	struct tally_producer_counters c;
	struct tt_drainer d;
	struct tt_slot_view v;

	cr_assert_eq(tally_producer_attach(seg, &p), 0);
	tally_producer_counters(p, &c);
	struct tally__slot *sl = tally__seg_slot(seg, c.slot);
	uint64_t gen = tally__lease_gen(atomic_load(&sl->ctl.lease));
	atomic_store(&sl->ctl.birth, tally__birth(gen, 0));
	tt_drainer_init(&d, seg);
	for (int i = 0; i < 5; i++) {
		tt_drain_once(&d, true);
		tt_sleep_ms(20);
	}
	tt_slot_view(seg, c.slot, &v);
	cr_expect_eq(v.state, TALLY__SLOT_ACTIVE);
	cr_expect_eq(d.died, 0);
	cr_expect_eq(tally_producer_heartbeat(p), 0);
	tally_producer_detach(&p);
	tally_segment_close(&seg);
}

static void *record_forever(void *arg)
{
	struct handoff *h = arg;

	for (uint64_t i = 0;; i++) {
		tally_record(h->p, h->subject, 1);
		if (i % 64 == 0)
			usleep(100);
	}
	return NULL;
}

/* A process whose main thread exits (pthread_exit) while another thread
 * records shows its leader as a zombie: it is alive all the same, and its
 * slot must not be taken back under the recording thread. */
Test(record, main_thread_exit_is_not_process_death, .timeout = 30)
{
	struct tally_segment *seg = make("mainexit");
	struct tt_drainer d;
	struct tt_slot_view v;
	int fds[2];
	uint32_t slot = 0;

	cr_assert_eq(pipe(fds), 0);
	pid_t pid = fork();
	if (pid == 0) {
		static struct handoff h;
		pthread_t th;
		struct tally_producer_counters c;
		h.seg = seg;
		h.subject = 3;
		if (tally_producer_attach(seg, &h.p) != 0)
			_exit(2);
		tally_producer_counters(h.p, &c);
		if (write(fds[1], &c.slot, sizeof(c.slot)) != (ssize_t)sizeof(c.slot))
			_exit(3);
		pthread_create(&th, NULL, record_forever, &h);
		pthread_exit(NULL);
	}
	cr_assert_eq(read(fds[0], &slot, sizeof(slot)), (ssize_t)sizeof(slot));
	tt_drainer_init(&d, seg);
	for (int i = 0; i < 20; i++) {
		tt_drain_once(&d, true);
		tt_sleep_ms(10);
	}
	tt_slot_view(seg, slot, &v);
	cr_expect_eq(v.state, TALLY__SLOT_ACTIVE, "the slot of a live process is %u", v.state);
	cr_expect_eq(d.died, 0);
	uint64_t tail = v.tail;
	tt_drain_once(&d, false);
	tt_sleep_ms(20);
	tt_slot_view(seg, slot, &v);
	cr_expect_gt(v.tail, tail, "the recording thread stopped");
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	for (int i = 0; i < 100 && atomic_load(&d.died) == 0; i++) {
		tt_drain_once(&d, true);
		tt_sleep_ms(5);
	}
	cr_expect_eq(d.died, 1, "the killed process's slot was not reclaimed");
	close(fds[0]);
	close(fds[1]);
	tally_segment_close(&seg);
}

static void *local_records_and_exits(void *arg)
{
	struct handoff *h = arg;
	struct tally_producer *p, *again;

	cr_assert_eq(tally_producer_local(h->seg, &p), 0, "%s", tally_errmsg());
	cr_assert_eq(tally_producer_local(h->seg, &again), 0);
	cr_assert_eq(p, again, "one handle per thread and segment");
	h->p = p;
	for (unsigned i = 0; i < h->n; i++)
		tally_record(p, h->subject, i);
	tally_producer_counters(p, &h->c);
	return NULL; /* never detaches: the thread's exit does */
}

/* A thread that exits without detaching is handled in its own process:
 * its thread-local handle is detached by the thread key's destructor. */
Test(record, local_handle_is_detached_when_its_thread_exits)
{
	struct tally_segment *seg = make("local");
	struct handoff h = { .seg = seg, .n = 100 };
	struct tt_drainer d;
	struct tt_slot_view v;
	pthread_t th;

	tally_subject_intern(seg, "local.a", &h.subject);
	pthread_create(&th, NULL, local_records_and_exits, &h);
	pthread_join(th, NULL);
	tt_slot_view(seg, h.c.slot, &v);
	cr_expect_eq(v.state, TALLY__SLOT_RELEASING, "state %u after the thread exit", v.state);
	tt_drainer_init(&d, seg);
	tt_drain_once(&d, true);
	tt_slot_view(seg, h.c.slot, &v);
	cr_expect_eq(v.state, TALLY__SLOT_FREE);
	cr_expect_eq(d.released, 1);
	cr_expect_eq(d.per_subject[h.subject], 100);
	tally_segment_close(&seg);
}

/* A handle whose slot was taken back (here: the lease word moved on, as
 * an owner's reaper or a new claim would move it) finds out on its next
 * slow path and never writes the slot again. */
Test(record, revoked_handle_stores_nothing_and_counts_the_loss)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	struct tally_producer *p;
	struct tally_producer_counters c;
	struct tt_slot_view before, after;

	tt_config(&cfg);
	cfg.ring_capacity = 64;
	seg = make_cfg("revoked", &cfg);
	cr_assert_eq(tally_producer_attach(seg, &p), 0);
	tally_producer_counters(p, &c);
	struct tally__slot *s = tally__seg_slot(seg, c.slot);
	uint64_t mine = atomic_load(&s->ctl.lease);
	/* another claim now holds the slot: generation + 1, ACTIVE */
	uint64_t theirs = tally__lease(tally__lease_gen(mine) + 1, TALLY__SLOT_ACTIVE);
	atomic_store(&s->ctl.lease, theirs);
	cr_expect_eq(tally_producer_status(p), TALLY_EREVOKED);
	cr_expect_eq(tally_producer_heartbeat(p), TALLY_EREVOKED);
	tt_slot_view(seg, c.slot, &before);
	unsigned stored = 0;
	for (int i = 0; i < 500; i++)
		stored += tally_record(p, 1, 5);
	cr_expect_eq(stored, 0, "a revoked handle stored %u samples", stored);
	cr_expect_eq(tally_record(p, 1, UINT64_MAX), false, "nor through the clamp path");
	tt_slot_view(seg, c.slot, &after);
	cr_expect_eq(after.tail, before.tail, "the ring was written");
	cr_expect_eq(after.dropped, before.dropped);
	cr_expect_eq(after.clamped, before.clamped);
	tally_producer_counters(p, &c);
	cr_expect(c.revoked);
	cr_expect_eq(c.lost, 501);
	tally_producer_detach(&p);
	cr_expect_eq(atomic_load(&s->ctl.lease), theirs, "detach changed the other claim's slot");
	tally_segment_close(&seg);
}

/* A fork child has copies of its parent's handles: recording through them
 * would make two producers of one ring. They are revoked in the child. */
Test(record, fork_child_cannot_record_through_parents_handle)
{
	struct tally_segment *seg = make("forked");
	struct tally_producer *p;
	struct tt_drainer d;
	tally_subject_t a;

	tally_subject_intern(seg, "forked.a", &a);
	cr_assert_eq(tally_producer_attach(seg, &p), 0);
	for (int i = 0; i < 10; i++)
		tally_record(p, a, 1);
	pid_t pid = fork();
	if (pid == 0) {
		struct tally_producer_counters c;
		int bad = 0;
		for (int i = 0; i < 10; i++)
			bad += tally_record(p, a, 2);
		tally_producer_counters(p, &c);
		bad += tally_producer_heartbeat(p) != TALLY_EREVOKED;
		bad += !c.revoked || c.lost != 10;
		tally_producer_detach(&p); /* leaves the parent's slot alone */
		_exit(bad ? 1 : 0);
	}
	int status;
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the child recorded or was not told");
	cr_expect_eq(tally_producer_status(p), 0, "the parent's handle is still good");
	for (int i = 0; i < 10; i++)
		cr_expect(tally_record(p, a, 3));
	tt_drainer_init(&d, seg);
	tt_drain_once(&d, true);
	cr_expect_eq(d.per_subject[a], 20);
	cr_expect_eq(d.sum, 10 * 1 + 10 * 3, "a child's sample arrived");
	tally_producer_detach(&p);
	tally_segment_close(&seg);
}

/* Closing the segment under attached handles revokes them: their next
 * records are lost (counted), not writes into unmapped memory. */
Test(record, segment_closed_under_a_handle_revokes_it)
{
	struct tally_segment *seg = make("closed");
	struct tally_producer *p;
	struct tally_producer_counters c;

	cr_assert_eq(tally_producer_attach(seg, &p), 0);
	cr_expect(tally_record(p, 1, 1));
	tally_segment_close(&seg);
	cr_expect_not(tally_record(p, 1, 1));
	cr_expect_eq(tally_producer_status(p), TALLY_EREVOKED);
	tally_producer_counters(p, &c);
	cr_expect_eq(c.lost, 1);
	tally_producer_detach(&p);
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
