/* SPDX-License-Identifier: MIT */
/*
 * test_lifecycle.c: the life of what processes share, against a real
 * engine in this process and real producer processes forked from it.
 *
 *  - Kill points: a producer process is SIGKILLed at each named point of
 *    the claim, intern and detach protocols (lib/failpoint.h), one test
 *    per point. Whatever it held is reclaimed within the documented bound
 *    (TALLY__CLAIM_TIMEOUT_MS + cool-off + reap intervals) and everything
 *    it published is drained. A claimer that only stalls past the claim
 *    timeout loses its claim and takes another: never two claims on one.
 *  - Restart hygiene: after tally_engine_stop and a new start on the same
 *    segment, no row from before is served as live, with or without the
 *    old subjects recording again.
 *  - A pending entry whose writer is held mid-write keeps its last good
 *    value and age: a pending-driven overload does not fall to ok.
 *  - Bounded stop: tally_engine_stop returns while producers record flat
 *    out, having drained everything published before it was called.
 *
 * Each test prints what it measured (RELIABILITY.md quotes the lines).
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/helpers.h"
#include "failpoint.h"
#include "pending.h"
#include "segment.h"

#define REAP_MS 10u
#define COOLOFF_MS 50u
/* The documented bound for a claim left by a kill, with room for a slow
 * (sanitized, loaded) machine: the test fails past it. */
#define RECLAIM_BOUND_MS (TALLY__CLAIM_TIMEOUT_MS + COOLOFF_MS + 4 * REAP_MS + 2000u)

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

struct owner {
	struct tally_segment *seg;
	struct tally_engine *eng;
	const char *name;
};

static void owner_create(struct owner *o, const char *tag, uint32_t ring)
{
	struct tally_segment_config cfg;

	tt_config(&cfg);
	cfg.producer_cooloff_ms = COOLOFF_MS;
	if (ring)
		cfg.ring_capacity = ring;
	o->name = tt_segname(tag);
	o->eng = NULL;
	cr_assert_eq(tally_segment_create(o->name, &cfg, 0, &o->seg), 0, "%s", tally_errmsg());
}

static void owner_run(struct owner *o)
{
	struct tally_engine_config ec;

	tally_engine_config_init(&ec);
	ec.reap_interval_ms = REAP_MS;
	ec.publish_interval_ms = 20;
	ec.slice_ns = 100000000ull;
	ec.window_ns = 1000000000ull;
	cr_assert_eq(tally_engine_start(o->seg, &ec, &o->eng), 0, "%s", tally_errmsg());
}

static void owner_start(struct owner *o, const char *tag, uint32_t ring)
{
	owner_create(o, tag, ring);
	owner_run(o);
}

static void owner_stop(struct owner *o)
{
	tally_engine_stop(&o->eng);
	tally_segment_close(&o->seg);
}

static bool all_slots_free(struct tally_segment *seg)
{
	struct tt_slot_view v;

	for (uint32_t i = 0; i < 16; i++) {
		tt_slot_view(seg, i, &v);
		if (v.state != TALLY__SLOT_FREE)
			return false;
	}
	return true;
}

/* ---- kill points ------------------------------------------------------------ */

static const char *kill_point;
static unsigned stall_ms;

static void at_point(const char *point)
{
	if (strcmp(point, kill_point) != 0)
		return;
	if (stall_ms) { /* stall once, do not die: the claim times out under us */
		struct timespec ts = { stall_ms / 1000, (long)(stall_ms % 1000) * 1000000L };
		kill_point = "";
		nanosleep(&ts, NULL);
		return;
	}
	raise(SIGKILL);
}

enum act { ACT_ATTACH, ACT_INTERN, ACT_DETACH };

#define KP_SAMPLES 100

/* The child: open as a router would, then act until the point kills it. */
static void child(const char *name, const char *point, enum act act)
{
	struct tally_segment *seg;
	struct tally_producer *p;
	tally_subject_t id;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (tally_segment_open(name, TALLY_OPEN_PRODUCER, 1000, &seg) != 0)
		_exit(2);
	kill_point = point;
	tally__failpoint_hook = at_point;
	switch (act) {
	case ACT_ATTACH:
		tally_producer_attach(seg, &p);
		break;
	case ACT_INTERN:
		tally_subject_intern(seg, "kp.subject", &id);
		break;
	case ACT_DETACH:
		if (tally_subject_intern(seg, "kp.detach", &id) || tally_producer_attach(seg, &p))
			_exit(3);
		for (int i = 0; i < KP_SAMPLES; i++)
			tally_record(p, id, 1000);
		tally_producer_detach(&p);
		break;
	}
	_exit(0); /* the point was never reached: the parent fails the test */
}

/* The owner is created, not yet running: the child is forked before the
 * engine's threads start (tt_gate), then the engine runs. */
static void fork_and_kill_at(struct owner *o, const char *point, enum act act)
{
	struct tt_gate gate;
	int status;

	tt_gate_init(&gate);
	pid_t pid = fork();
	cr_assert_neq(pid, -1);
	if (pid == 0) {
		tt_gate_wait(&gate);
		child(o->name, point, act);
	}
	owner_run(o);
	tt_gate_open(&gate);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
		  "the child did not die at %s (status %#x)", point, status);
}

static void killed_mid_claim(const char *point)
{
	struct owner o;

	owner_create(&o, "kpc", 0);
	uint64_t t0 = mono_ms();
	fork_and_kill_at(&o, point, ACT_ATTACH);
	cr_expect_not(all_slots_free(o.seg), "the kill left nothing to reclaim");
	while (!all_slots_free(o.seg) && mono_ms() - t0 < RECLAIM_BOUND_MS)
		tt_sleep_ms(5);
	uint64_t took = mono_ms() - t0;
	cr_assert(all_slots_free(o.seg), "a slot is still held %u ms after a kill at %s",
		  RECLAIM_BOUND_MS, point);
	struct tally_engine_counters c;
	tally_engine_counters(o.eng, &c);
	cr_expect_eq(c.claims_expired, 1);
	/* and every slot can be claimed again */
	struct tally_producer *ps[16];
	int n = 0;
	while (n < 16 && tally_producer_attach(o.seg, &ps[n]) == 0)
		n++;
	cr_expect_eq(n, 16);
	while (n > 0)
		tally_producer_detach(&ps[--n]);
	fprintf(stderr, "kill point %s: slot free again after %llu ms (bound %u ms + cool-off)\n",
		point, (unsigned long long)took, TALLY__CLAIM_TIMEOUT_MS);
	owner_stop(&o);
}

Test(lifecycle, killed_after_slot_claim_cas, .timeout = 30)
{
	killed_mid_claim("claim.claimed");
}

Test(lifecycle, killed_after_slot_claim_filled, .timeout = 30)
{
	killed_mid_claim("claim.filled");
}

static void killed_mid_intern(const char *point)
{
	struct owner o;
	tally_subject_t id, again;
	int rc, eagain = 0;

	owner_create(&o, "kpi", 0);
	uint64_t t0 = mono_ms();
	fork_and_kill_at(&o, point, ACT_INTERN);
	/* the same name probes through the stuck entry: it must get an id
	 * within the bound (each try waits at most 200 ms, then -EAGAIN) */
	while ((rc = tally_subject_intern(o.seg, "kp.subject", &id)) == -EAGAIN &&
	       mono_ms() - t0 < RECLAIM_BOUND_MS)
		eagain++;
	uint64_t took = mono_ms() - t0;
	cr_assert_eq(rc, 0, "intern after a kill at %s: %s (%s)", point, tally_strerror(rc),
		     tally_errmsg());
	cr_expect_eq(tally_subject_lookup(o.seg, "kp.subject", &again), 0);
	cr_expect_eq(again, id, "one name, two ids");
	struct tally_engine_counters c;
	tally_engine_counters(o.eng, &c);
	cr_expect_eq(c.subjects_tombstoned, 1);
	/* and later calls do not wait at all */
	uint64_t t1 = mono_ms();
	cr_expect_eq(tally_subject_intern(o.seg, "kp.subject", &again), 0);
	cr_expect_lt(mono_ms() - t1, 100);
	fprintf(stderr, "kill point %s: the name interned again after %llu ms (%d tries "
		"answered -EAGAIN first)\n", point, (unsigned long long)took, eagain);
	owner_stop(&o);
}

Test(lifecycle, killed_after_subject_claim_cas, .timeout = 30)
{
	killed_mid_intern("intern.claimed");
}

Test(lifecycle, killed_after_subject_name_written, .timeout = 30)
{
	killed_mid_intern("intern.named");
}

Test(lifecycle, killed_in_detach, .timeout = 30)
{
	struct owner o;
	tally_subject_t id;
	struct tally_subject_stats st;

	owner_create(&o, "kpd", 0);
	uint64_t t0 = mono_ms();
	fork_and_kill_at(&o, "detach.before", ACT_DETACH);
	while (!all_slots_free(o.seg) && mono_ms() - t0 < RECLAIM_BOUND_MS)
		tt_sleep_ms(5);
	uint64_t took = mono_ms() - t0;
	cr_assert(all_slots_free(o.seg), "the slot of a producer killed in detach is still held");
	struct tally_engine_counters c;
	tally_engine_counters(o.eng, &c);
	cr_expect_eq(c.producers_died, 1);
	cr_assert_eq(tally_subject_lookup(o.seg, "kp.detach", &id), 0);
	uint64_t t1 = mono_ms();
	while ((tally_engine_read(o.eng, id, &st) != 0 || st.total_count < KP_SAMPLES) &&
	       mono_ms() - t1 < 2000)
		tt_sleep_ms(5);
	cr_expect_eq(st.total_count, KP_SAMPLES, "drained %llu of the %d recorded",
		     (unsigned long long)st.total_count, KP_SAMPLES);
	fprintf(stderr, "kill point detach.before: slot free again after %llu ms, all %d samples "
		"drained\n", (unsigned long long)took, KP_SAMPLES);
	owner_stop(&o);
}

/* A claimer that stalls (not killed) past the claim timeout loses its
 * claim: its CAS to ACTIVE fails and it takes another slot. The slot it
 * first held is never ACTIVE for two claims. */
Test(lifecycle, stalled_claimer_loses_its_claim_and_takes_another, .timeout = 30)
{
	struct owner o;
	struct tally_producer *p;
	struct tally_producer_counters c;
	struct tt_slot_view v;

	owner_start(&o, "stall", 0);
	kill_point = "claim.filled";
	stall_ms = TALLY__CLAIM_TIMEOUT_MS + 300;
	tally__failpoint_hook = at_point;
	int rc = tally_producer_attach(o.seg, &p);
	tally__failpoint_hook = NULL;
	stall_ms = 0;
	cr_assert_eq(rc, 0, "%s", tally_errmsg());
	tally_producer_counters(p, &c);
	uint32_t active = 0;
	for (uint32_t i = 0; i < 16; i++) {
		tt_slot_view(o.seg, i, &v);
		active += v.state == TALLY__SLOT_ACTIVE;
		if (i != c.slot)
			cr_expect_neq(v.state, TALLY__SLOT_ACTIVE, "slot %u ACTIVE beside ours", i);
	}
	cr_expect_eq(active, 1);
	struct tally_engine_counters ec;
	tally_engine_counters(o.eng, &ec);
	cr_expect_geq(ec.claims_expired, 1, "the stalled claim was not taken back");
	cr_expect_eq(tally_producer_status(p), 0);
	tally_producer_detach(&p);
	owner_stop(&o);
}

struct stalled_attach {
	struct tally_segment *seg;
	int rc;
};

static void *stalled_attach_main(void *arg)
{
	struct stalled_attach *a = arg;
	struct tally_producer *p = NULL;

	a->rc = tally_producer_attach(a->seg, &p);
	if (a->rc == 0)
		tally_producer_detach(&p);
	return NULL;
}

/* The review's case: a claimer stalls before it installs its identity,
 * the owner takes the claim back, frees the slot, and another claims it.
 * The stalled claimer's late identity must not land on the new claim
 * (that would make the reaper judge the new claim by the wrong process). */
Test(lifecycle, stalled_claimer_cannot_overwrite_the_next_claims_identity, .timeout = 30)
{
	struct tally_segment_config cfg;
	struct tally_engine_config ec;
	struct tally_segment *seg;
	struct tally_engine *eng;
	struct tally_producer *b;
	struct stalled_attach a;
	pthread_t th;

	tt_config(&cfg);
	cfg.producer_slots = 1;
	cfg.producer_cooloff_ms = COOLOFF_MS;
	cr_assert_eq(tally_segment_create(tt_segname("ident"), &cfg, 0, &seg), 0);
	tally_engine_config_init(&ec);
	ec.reap_interval_ms = REAP_MS;
	cr_assert_eq(tally_engine_start(seg, &ec, &eng), 0);
	a.seg = seg;
	kill_point = "claim.claimed";
	stall_ms = TALLY__CLAIM_TIMEOUT_MS + 600;
	tally__failpoint_hook = at_point;
	pthread_create(&th, NULL, stalled_attach_main, &a);
	/* wait for the claim to be taken back and the slot freed */
	struct tt_slot_view v;
	uint64_t t0 = mono_ms();
	do {
		tt_sleep_ms(10);
		tt_slot_view(seg, 0, &v);
	} while (!(v.state == TALLY__SLOT_FREE && v.generation >= 1) && mono_ms() - t0 < 3000);
	cr_assert_eq(v.state, TALLY__SLOT_FREE, "the stalled claim was not taken back");
	cr_assert_eq(tally_producer_attach(seg, &b), 0, "%s", tally_errmsg());
	pthread_join(th, NULL);
	tally__failpoint_hook = NULL;
	stall_ms = 0;
	cr_expect_eq(a.rc, TALLY_EFULL, "the stalled claimer got %d", a.rc);
	struct tally__slot *s = tally__seg_slot(seg, 0);
	uint64_t lease = atomic_load(&s->ctl.lease);
	int32_t pid;
	uint64_t st;
	cr_expect_eq(tally__lease_state(lease), TALLY__SLOT_ACTIVE);
	cr_expect(tally__ident_of(atomic_load(&s->ctl.ident), tally__lease_gen(lease), &pid) &&
		  pid == getpid(), "the new claim's identity is not its own");
	cr_expect(tally__birth_of(atomic_load(&s->ctl.birth), tally__lease_gen(lease), &st));
	cr_expect_eq(tally_producer_status(b), 0);
	tally_producer_detach(&b);
	tally_engine_stop(&eng);
	tally_segment_close(&seg);
}

Test(lifecycle, stalled_interner_probes_again_and_gets_one_id, .timeout = 30)
{
	struct owner o;
	tally_subject_t id, again;

	owner_start(&o, "stalli", 0);
	kill_point = "intern.named";
	stall_ms = TALLY__CLAIM_TIMEOUT_MS + 300;
	tally__failpoint_hook = at_point;
	int rc = tally_subject_intern(o.seg, "kp.stalled", &id);
	tally__failpoint_hook = NULL;
	stall_ms = 0;
	cr_assert_eq(rc, 0, "%s", tally_errmsg());
	cr_expect_eq(tally_subject_lookup(o.seg, "kp.stalled", &again), 0);
	cr_expect_eq(again, id);
	struct tally_engine_counters ec;
	tally_engine_counters(o.eng, &ec);
	cr_expect_eq(ec.subjects_tombstoned, 1);
	owner_stop(&o);
}

/* ---- restart hygiene ---------------------------------------------------------- */

static void restart(struct owner *o)
{
	struct tally_engine_config ec;

	tally_engine_stop(&o->eng);
	tally_engine_config_init(&ec);
	ec.reap_interval_ms = REAP_MS;
	ec.publish_interval_ms = 20;
	cr_assert_eq(tally_engine_start(o->seg, &ec, &o->eng), 0, "%s", tally_errmsg());
}

static void record_some(struct tally_segment *seg, tally_subject_t id, unsigned n, uint64_t ns)
{
	struct tally_producer *p;

	cr_assert_eq(tally_producer_attach(seg, &p), 0);
	for (unsigned i = 0; i < n; i++)
		while (!tally_record(p, id, ns))
			tt_sleep_ms(1);
	tally_producer_detach(&p);
}

static bool wait_count(struct owner *o, tally_subject_t id, uint64_t want)
{
	struct tally_subject_stats st;

	for (int i = 0; i < 400; i++) {
		if (tally_read_subject(o->seg, id, &st) == 0 && st.total_count == want)
			return true;
		tt_sleep_ms(5);
	}
	return false;
}

Test(lifecycle, restart_serves_no_row_from_before, .timeout = 30)
{
	struct owner o;
	struct tally_subject_stats st;
	tally_subject_t quiet, busy;

	owner_start(&o, "restart", 0);
	tally_subject_intern(o.seg, "restart.quiet", &quiet);
	tally_subject_intern(o.seg, "restart.busy", &busy);
	record_some(o.seg, quiet, 500, 5000000);
	record_some(o.seg, busy, 500, 5000000);
	cr_assert(wait_count(&o, quiet, 500) && wait_count(&o, busy, 500));
	restart(&o);
	/* the busy subject records again, the quiet one does not */
	record_some(o.seg, busy, 7, 1000);
	cr_assert(wait_count(&o, busy, 7), "the busy subject's new row");
	tt_sleep_ms(100); /* several publishes of the new engine */
	/* The quiet subject is in the table, so the new engine gives it a row
	 * (issue 13: subjects known before their first sample), but a fresh
	 * one: nothing of the old engine's window or counters. */
	int rc = tally_read_subject(o.seg, quiet, &st);
	cr_expect(rc == 0 && st.count == 0 && st.total_count == 0 && !st.has_data &&
		  st.verdict == TALLY_VERDICT_UNKNOWN,
		  "a row from before the restart is served: rc %d, count %llu, total %llu",
		  rc, (unsigned long long)st.count, (unsigned long long)st.total_count);
	cr_expect_eq(tally_engine_read(o.eng, quiet, &st), 0);
	cr_expect_eq(st.total_count, 0, "in process, the same fresh row");
	cr_assert_eq(tally_read_subject(o.seg, busy, &st), 0);
	cr_expect_eq(st.count, 7, "the old window leaked into the new row");
	cr_expect_lt(st.max_ns, 5000000);
	owner_stop(&o);
}

/* ---- a pending writer held mid-write ------------------------------------------- */

Test(lifecycle, pending_writer_held_mid_write_keeps_the_last_good_view, .timeout = 30)
{
	struct owner o;
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r;
	struct tally_subject_stats st;
	tally_subject_t id;

	owner_start(&o, "pheld", 0);
	tally_threshold_rule_init(&r);
	r.pending_warn = 100;
	r.pending_overload = 1000;
	r.min_dwell_ms = 300;
	r.min_samples = 1;
	cr_assert_eq(tally_thresholds_add(t, "held.subject", &r), 0, "%s", tally_errmsg());
	cr_assert_eq(tally_engine_set_thresholds(o.eng, &t), 0);
	tally_subject_intern(o.seg, "held.subject", &id);
	void *sec = tally__seg_section(o.seg, &o.seg->pending);
	struct tally__pending_entry *e = tally__pending_entry_at(sec, 0);
	struct tally__pending_values v = {
		.source = TALLY__PENDING_LIVE, .is_leader = 1, .num_pending = 5000,
		.last_ok_ns = tally__pending_now_ns(), .stream = "S", .consumer = "C",
		.filter = "held.subject", .map = "", .last_error = "",
	};
	tally__pending_write_entry(e, &v);
	record_some(o.seg, id, 10, 1000);
	int i;
	for (i = 0; i < 200; i++) {
		if (tally_engine_read(o.eng, id, &st) == 0 && st.verdict == TALLY_VERDICT_OVERLOAD)
			break;
		tt_sleep_ms(5);
	}
	cr_assert_eq(st.verdict, TALLY_VERDICT_OVERLOAD, "verdict %d", st.verdict);
	/* the writer stops half-way: seq odd, as a preempted poller leaves it */
	uint32_t seq = atomic_load(&e->seq);
	atomic_store(&e->seq, seq + 1);
	uint64_t age_before = st.pending_age_ns;
	struct tally_engine_counters c0, c1;
	tally_engine_counters(o.eng, &c0);
	for (i = 0; i < 25; i++) { /* 500 ms: 25 publishes, well past the dwell */
		tt_sleep_ms(20);
		cr_assert_eq(tally_engine_read(o.eng, id, &st), 0);
		cr_assert_eq(st.verdict, TALLY_VERDICT_OVERLOAD, "fell to %d with the writer held",
			     st.verdict);
		cr_assert_eq(st.pending, 5000, "pending %llu", (unsigned long long)st.pending);
		cr_assert_eq(st.pending_consumers, 1);
	}
	tally_engine_counters(o.eng, &c1);
	cr_expect_gt(c1.pending_kept, c0.pending_kept);
	cr_expect_gt(st.pending_age_ns, age_before, "the age does not grow");
	fprintf(stderr, "pending held mid-write for 500 ms: verdict stayed overload, pending 5000, "
		"age grew to %llu ms, %llu publishes used the last good copy\n",
		(unsigned long long)(st.pending_age_ns / 1000000u),
		(unsigned long long)(c1.pending_kept - c0.pending_kept));
	/* the writer finishes with a backlog at warn level: overload (held
	 * past its dwell) steps to warn; then no backlog: warn falls to ok
	 * only after warn's own dwell */
	v.num_pending = 300;
	v.last_ok_ns = tally__pending_now_ns();
	atomic_store(&e->seq, seq); /* undo our odd half, let the writer write whole */
	tally__pending_write_entry(e, &v);
	uint64_t t0 = mono_ms();
	while (tally_engine_read(o.eng, id, &st) == 0 && st.verdict != TALLY_VERDICT_WARN &&
	       mono_ms() - t0 < 3000)
		tt_sleep_ms(2);
	cr_assert_eq(st.verdict, TALLY_VERDICT_WARN);
	v.num_pending = 0;
	v.last_ok_ns = tally__pending_now_ns();
	tally__pending_write_entry(e, &v);
	t0 = mono_ms();
	while (tally_engine_read(o.eng, id, &st) == 0 && st.verdict != TALLY_VERDICT_OK &&
	       mono_ms() - t0 < 3000)
		tt_sleep_ms(2);
	uint64_t fell = mono_ms() - t0;
	cr_expect_eq(st.verdict, TALLY_VERDICT_OK);
	cr_expect_geq(fell, 200, "ok after %llu ms, before warn's 300 ms dwell",
		      (unsigned long long)fell);
	owner_stop(&o);
}

/* ---- bounded stop ------------------------------------------------------------- */

struct flat_out {
	struct tally_segment *seg;
	tally_subject_t id;
	atomic_bool stop;
	_Atomic uint64_t recorded;
};

static void *flat_out_main(void *arg)
{
	struct flat_out *f = arg;
	struct tally_producer *p;
	uint64_t n = 0;

	cr_assert_eq(tally_producer_attach(f->seg, &p), 0);
	while (!atomic_load_explicit(&f->stop, memory_order_relaxed))
		n += tally_record(p, f->id, 100);
	atomic_fetch_add(&f->recorded, n);
	tally_producer_detach(&p);
	return NULL;
}

Test(lifecycle, stop_returns_while_producers_record_flat_out, .timeout = 60)
{
	struct owner o;
	struct flat_out f = { 0 };
	pthread_t th[2];

	owner_start(&o, "stop", 65536);
	f.seg = o.seg;
	tally_subject_intern(o.seg, "stop.flat", &f.id);
	for (int i = 0; i < 2; i++)
		pthread_create(&th[i], NULL, flat_out_main, &f);
	tt_sleep_ms(300);
	/* what was published before the stop: the engine must drain it all */
	uint64_t published = 0;
	struct tt_slot_view v;
	for (uint32_t i = 0; i < 16; i++) {
		tt_slot_view(o.seg, i, &v);
		published += v.tail;
	}
	uint64_t t0 = mono_ms();
	/* the engine is gone after stop: its last publish, in the segment,
	 * tells what it drained */
	tally_engine_stop(&o.eng);
	uint64_t took = mono_ms() - t0;
	atomic_store(&f.stop, true);
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	struct tally_subject_stats st;
	cr_assert_eq(tally_read_subject(o.seg, f.id, &st), 0);
	cr_expect_geq(st.total_count, published, "stop returned before draining what was "
		      "published when it began: %llu of %llu", (unsigned long long)st.total_count,
		      (unsigned long long)published);
	fprintf(stderr, "stop with 2 producers flat out: returned in %llu ms; drained %llu, "
		"%llu published before the call, %llu recorded in all\n", (unsigned long long)took,
		(unsigned long long)st.total_count, (unsigned long long)published,
		(unsigned long long)atomic_load(&f.recorded));
	tally_segment_close(&o.seg);
}
