/* SPDX-License-Identifier: MIT */
/*
 * stress_concurrency.c: the concurrency scenarios as one plain TAP
 * program, so that they also run under ThreadSanitizer (where Criterion
 * cannot start): threads interning the same subjects, threads recording
 * while a drainer consumes with exact accounting, and the engine
 * publishing every millisecond while readers read it in-process (RCU) and
 * through the segment's latch, and recording threads (thread-local
 * handles) following an owner that is stopped and created again while
 * they record (the library's watcher thread against the recorders); and
 * drain_threads 2 and 4 with six producers: exact per-subject counts,
 * min and max in the merged rows, exact totals; and subjects that sleep
 * and wake (their export buckets packed, shown by the published block,
 * given up at a wake) while readers read the buckets: counters that
 * never go back, with one and with two drain threads; and the drain
 * threads merging a publish's rows with the aggregator thread (struct
 * merge_job in lib/engine.c), over more rows than a merge job holds,
 * while slices close: every row read mid-run holds its own subject's
 * values only and never loses a count, and the rows end exact.
 * Runs in every `make check` too.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/helpers.h"
#include "common/tap.h"
#include "engine_priv.h"
#include "hist.h"

static struct tally_segment *make(const char *tag, char *name_out)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg = NULL;
	const char *name = tt_segname(tag);

	tt_config(&cfg);
	cfg.ring_capacity = 1u << 14;
	if (tally_segment_create(name, &cfg, 0, &seg) != 0) {
		fprintf(stderr, "create %s: %s\n", name, tally_errmsg());
		return NULL;
	}
	if (name_out)
		strcpy(name_out, name);
	return seg;
}

/* ---- 1: interning ---------------------------------------------------------- */

struct intern_arg {
	struct tally_segment *seg;
	tally_subject_t ids[32];
};

static void *interner(void *p)
{
	struct intern_arg *a = p;
	char name[32];

	for (int i = 0; i < 32; i++) {
		snprintf(name, sizeof(name), "stress.%d", i);
		if (tally_subject_intern(a->seg, name, &a->ids[i]))
			a->ids[i] = UINT32_MAX;
	}
	return NULL;
}

static void interning(void)
{
	struct tally_segment *seg = make("si", NULL);
	struct intern_arg a[4];
	pthread_t th[4];
	int same = 1;

	for (int t = 0; t < 4; t++) {
		a[t].seg = seg;
		pthread_create(&th[t], NULL, interner, &a[t]);
	}
	for (int t = 0; t < 4; t++)
		pthread_join(th[t], NULL);
	for (int t = 1; t < 4; t++)
		same &= memcmp(a[t].ids, a[0].ids, sizeof(a[0].ids)) == 0;
	tap_ok(same && a[0].ids[0] != UINT32_MAX, "4 threads interning 32 names get one id per name");
	tally_segment_close(&seg);
}

/* ---- 2: recording while draining --------------------------------------------- */

struct rec_arg {
	struct tally_segment *seg;
	tally_subject_t subject;
	struct tally_producer_counters c;
};

static void *recorder(void *p)
{
	struct rec_arg *a = p;
	struct tally_producer *prod;

	if (tally_producer_attach(a->seg, &prod))
		return NULL;
	for (uint64_t i = 0; i < 100000; i++)
		tally_record(prod, a->subject, i);
	tally_producer_counters(prod, &a->c);
	tally_producer_detach(&prod);
	return NULL;
}

static void recording(void)
{
	struct tally_segment *seg = make("sr", NULL);
	struct tt_drainer d;
	struct rec_arg a[3];
	pthread_t th[3];
	uint64_t recorded = 0, per_ok = 1;

	tt_drainer_init(&d, seg);
	tt_drainer_start(&d);
	for (int t = 0; t < 3; t++) {
		a[t] = (struct rec_arg){ .seg = seg, .subject = (tally_subject_t)t };
		pthread_create(&th[t], NULL, recorder, &a[t]);
	}
	for (int t = 0; t < 3; t++) {
		pthread_join(th[t], NULL);
		recorded += a[t].c.recorded;
		per_ok &= a[t].c.recorded + a[t].c.dropped == 100000;
	}
	tt_sleep_ms(20);
	tt_drainer_stop(&d);
	tap_ok(per_ok, "each thread: recorded + dropped = attempts");
	tap_ok(atomic_load(&d.total) == recorded, "drained %llu = recorded %llu",
	       (unsigned long long)atomic_load(&d.total), (unsigned long long)recorded);
	tally_segment_close(&seg);
}

/* ---- 3: engine publishing while readers read ---------------------------------- */

struct read_arg {
	struct tally_engine *e;
	struct tally_segment *seg;
	tally_subject_t id;
	atomic_bool *stop;
	uint64_t reads, bad, stale;
};

static void *reader(void *p)
{
	struct read_arg *a = p;
	struct tally_subject_stats s;
	struct tally_subject_buckets b;

	while (!atomic_load(a->stop)) {
		int rc = a->e ? tally_engine_read(a->e, a->id, &s) : tally_read_subject(a->seg, a->id, &s);
		if (a->e && tally_engine_read_buckets(a->e, a->id, &b) == 0 && b.n &&
		    b.cumulative[b.n - 1] > b.count)
			a->bad++; /* a cumulative bucket above the total: torn */
		/* TALLY_ESTALE is an honest answer when the engine is starved
		 * (valgrind on a busy machine): its data is checked the same */
		if (rc == 0 || rc == TALLY_ESTALE) {
			a->reads++;
			a->stale += rc == TALLY_ESTALE;
			a->bad += s.has_data && !(s.min_ns <= s.p50_ns && s.p50_ns <= s.p95_ns &&
						  s.p95_ns <= s.max_ns);
		} else if (rc != -ENOENT && rc != TALLY_EBUSY_RETRY) {
			a->bad++;
		}
	}
	return NULL;
}

static void *writer(void *p)
{
	struct read_arg *a = p;
	struct tally_producer *prod;
	uint64_t x = 1;

	if (tally_producer_attach(a->seg, &prod))
		return NULL;
	while (!atomic_load(a->stop)) {
		x = x * 6364136223846793005ull + 1;
		tally_record(prod, a->id, x >> 44);
	}
	tally_producer_detach(&prod);
	return NULL;
}

static void publishing(void)
{
	char name[TALLY_NAME_MAX + 1];
	struct tally_segment *seg = make("sp", name), *rd;
	struct tally_engine_config cfg;
	struct tally_engine *e;
	atomic_bool stop = false;
	tally_subject_t id;
	pthread_t tw, tr1, tr2;

	tally_engine_config_init(&cfg);
	cfg.publish_interval_ms = 1;
	cfg.slice_ns = 10000000;
	cfg.window_ns = 50000000;
	if (tally_engine_start(seg, &cfg, &e) || tally_subject_intern(seg, "hot", &id) ||
	    tally_segment_open(name, TALLY_OPEN_READER, 0, &rd)) {
		tap_ok(0, "engine start: %s", tally_errmsg());
		return;
	}
	struct read_arg w = { .seg = seg, .id = id, .stop = &stop };
	struct read_arg in = { .e = e, .id = id, .stop = &stop };
	struct read_arg cross = { .seg = rd, .id = id, .stop = &stop };
	pthread_create(&tw, NULL, writer, &w);
	pthread_create(&tr1, NULL, reader, &in);
	pthread_create(&tr2, NULL, reader, &cross);
	/* at least 300 ms and 10 publishes (bounded: 10 s; TSan is slow) */
	struct tally_engine_counters c;
	for (int i = 0; i < 1000; i++) {
		tt_sleep_ms(10);
		tally_engine_counters(e, &c);
		if (i >= 30 && c.publishes >= 10)
			break;
	}
	atomic_store(&stop, true);
	pthread_join(tw, NULL);
	pthread_join(tr1, NULL);
	pthread_join(tr2, NULL);
	tally_engine_counters(e, &c);
	tap_ok(in.reads > 0 && in.bad == 0, "in-process reads during publishing: %llu, bad %llu",
	       (unsigned long long)in.reads, (unsigned long long)in.bad);
	tap_ok(cross.reads > 0 && cross.bad == 0, "segment reads during publishing: %llu, bad %llu "
	       "(stale %llu: the engine did not publish in time)", (unsigned long long)cross.reads,
	       (unsigned long long)cross.bad, (unsigned long long)cross.stale);
	tap_ok(c.publishes >= 10, "published %llu times", (unsigned long long)c.publishes);
	tally_segment_close(&rd);
	tally_engine_stop(&e);
	tap_ok(e == NULL, "engine stopped");
	tally_segment_close(&seg);
}

/* ---- 3b: sleeping and waking while readers read the export buckets ------------- */

static atomic_uint packs_made;
static bool count_packs(const char *point)
{
	if (strcmp(point, "export.pack") == 0)
		atomic_fetch_add(&packs_made, 1);
	return false;
}

struct burst_arg {
	struct tally_segment *seg;
	tally_subject_t ids[4];
	tally_subject_t busy;
	atomic_bool *stop;
};

/* Bursts of 15 ms, then longer than a window of nothing: the subjects
 * sleep, and wake at the next burst. Meanwhile one more subject has a
 * sample every millisecond: its slices close while the others sleep, so
 * the blocks published then point at the sleepers' own packs, which the
 * readers read and the next burst's wake gives up (with one drain
 * thread; with two, packs are never shown: the merged rows are copied). */
static void *burster(void *p)
{
	struct burst_arg *a = p;
	struct tally_producer *prod;
	uint64_t x = 7;

	if (tally_producer_attach(a->seg, &prod))
		return NULL;
	while (!atomic_load(a->stop)) {
		for (int i = 0; i < 15 && !atomic_load(a->stop); i++) {
			for (int k = 0; k < 200; k++) {
				x = x * 6364136223846793005ull + 1;
				tally_record(prod, a->ids[k & 3], 1000 + (x >> 40));
			}
			tt_sleep_ms(1);
		}
		for (int i = 0; i < 45 && !atomic_load(a->stop); i++) { /* the window is 30 ms */
			tally_record(prod, a->busy, 5000);
			tt_sleep_ms(1);
		}
	}
	tally_producer_detach(&prod);
	return NULL;
}

struct mono_arg {
	struct tally_engine *e;
	tally_subject_t ids[4];
	atomic_bool *stop;
	uint64_t reads, back;
};

/* Since-start export counters never decrease, bucket by bucket. */
static void *mono_reader(void *p)
{
	struct mono_arg *a = p;
	static _Thread_local struct tally_subject_buckets last[4], b;

	memset(last, 0, sizeof(last));
	while (!atomic_load(a->stop)) {
		for (int s = 0; s < 4; s++) {
			if (tally_engine_read_buckets(a->e, a->ids[s], &b) != 0)
				continue;
			a->reads++;
			bool back = b.count < last[s].count || (b.n && b.cumulative[b.n - 1] > b.count);
			for (uint32_t k = 0; k < b.n && k < last[s].n; k++)
				back |= b.cumulative[k] < last[s].cumulative[k];
			a->back += back;
			last[s] = b;
		}
	}
	return NULL;
}

static void sleeping(uint32_t nthreads)
{
	struct tally_segment *seg = make("sz", NULL);
	struct tally_engine_config cfg;
	struct tally_engine *e;
	atomic_bool stop = false;
	pthread_t tb, tr[2];

	tally_engine_config_init(&cfg);
	cfg.publish_interval_ms = 1;
	cfg.slice_ns = 5000000;
	cfg.window_ns = 30000000;
	cfg.drain_threads = nthreads;
	atomic_store(&packs_made, 0);
	tally__hist_nomem_hook = count_packs;
	struct burst_arg b = { .seg = seg, .stop = &stop };
	struct mono_arg m[2] = { { .stop = &stop }, { .stop = &stop } };
	if (!seg || tally_engine_start(seg, &cfg, &e)) {
		tap_ok(0, "drain_threads %u: engine start: %s", nthreads, tally_errmsg());
		tally__hist_nomem_hook = NULL;
		return;
	}
	for (int s = 0; s < 4; s++) {
		char name[32];
		snprintf(name, sizeof(name), "sleepy.%d", s);
		if (tally_subject_intern(seg, name, &b.ids[s]))
			b.ids[s] = 0;
		m[0].ids[s] = m[1].ids[s] = b.ids[s];
	}
	if (tally_subject_intern(seg, "sleepy.busy", &b.busy))
		b.busy = b.ids[0];
	m[0].e = m[1].e = e;
	pthread_create(&tb, NULL, burster, &b);
	for (int i = 0; i < 2; i++)
		pthread_create(&tr[i], NULL, mono_reader, &m[i]);
	/* at least 600 ms and 8 packs made (bounded: 20 s; TSan is slow) */
	for (int i = 0; i < 2000; i++) {
		tt_sleep_ms(10);
		if (i >= 60 && atomic_load(&packs_made) >= 8)
			break;
	}
	atomic_store(&stop, true);
	pthread_join(tb, NULL);
	for (int i = 0; i < 2; i++)
		pthread_join(tr[i], NULL);
	tally_engine_stop(&e);
	tally__hist_nomem_hook = NULL;
	tap_ok(m[0].reads + m[1].reads > 0 && m[0].back + m[1].back == 0 && atomic_load(&packs_made) >= 8,
	       "drain_threads %u: subjects slept (%u packs made), reads of their export buckets %llu, "
	       "counters that went back %llu", nthreads, atomic_load(&packs_made),
	       (unsigned long long)(m[0].reads + m[1].reads), (unsigned long long)(m[0].back + m[1].back));
	tally_segment_close(&seg);
}

/* ---- 4: following an owner restart while recording ------------------------------ */

struct follow_arg {
	struct tally_segment *seg; /* opened by name for producing: it follows */
	tally_subject_t id;
	atomic_bool *stop;
	struct tally_producer_counters c;
};

static void *follow_recorder(void *p)
{
	struct follow_arg *a = p;
	struct tally_producer *prod;

	if (tally_producer_local(a->seg, &prod))
		return NULL;
	for (uint64_t i = 0; !atomic_load_explicit(a->stop, memory_order_relaxed); i++) {
		tally_record(prod, a->id, i & 0xffff);
		if ((i & 1023) == 0)
			tt_sleep_ms(1);
	}
	tally_producer_counters(prod, &a->c);
	return NULL; /* the thread's exit detaches the local handle */
}

static struct tally_engine *own(const char *name, struct tally_segment **seg)
{
	struct tally_segment_config cfg;
	struct tally_engine_config ec;
	struct tally_engine *e = NULL;

	tt_config(&cfg);
	tally_engine_config_init(&ec);
	ec.publish_interval_ms = 5;
	ec.reap_interval_ms = 5;
	if (tally_segment_create(name, &cfg, 0, seg) || tally_engine_start(*seg, &ec, &e))
		fprintf(stderr, "owner %s: %s\n", name, tally_errmsg());
	return e;
}

static void following(void)
{
	const char *name = tt_segname("sf");
	struct tally_segment *owner = NULL, *prod = NULL;
	struct tally_engine *e = own(name, &owner);
	struct follow_arg a[2];
	pthread_t th[2];
	atomic_bool stop = false;
	tally_subject_t id = 0;

	if (!e || tally_segment_open(name, TALLY_OPEN_PRODUCER, 1000, &prod) ||
	    tally_subject_intern(prod, "stress.follow", &id)) {
		tap_ok(0, "following: set up: %s", tally_errmsg());
		tap_ok(0, "following: no data");
		return;
	}
	for (int t = 0; t < 2; t++) {
		a[t] = (struct follow_arg){ .seg = prod, .id = id, .stop = &stop };
		pthread_create(&th[t], NULL, follow_recorder, &a[t]);
	}
	tt_sleep_ms(200);
	tally_engine_stop(&e); /* the owner goes away: a clean stop and unlink */
	tally_segment_close(&owner);
	tt_sleep_ms(100);
	e = own(name, &owner); /* and comes back under the same name */
	tt_sleep_ms(600);
	atomic_store(&stop, true);
	for (int t = 0; t < 2; t++)
		pthread_join(th[t], NULL);
	struct tally_subject_stats st = { 0 };
	tally_subject_t nid;
	int rc = tally_subject_lookup(owner, "stress.follow", &nid);
	for (int i = 0; rc == 0 && i < 100 && tally_engine_read(e, nid, &st) != 0; i++)
		tt_sleep_ms(5);
	tap_ok(a[0].c.moves == 1 && a[1].c.moves == 1, "following: both handles moved once (%llu, %llu)",
	       (unsigned long long)a[0].c.moves, (unsigned long long)a[1].c.moves);
	tap_ok(rc == 0 && st.total_count > 0, "following: the new owner drained %llu samples",
	       (unsigned long long)st.total_count);
	tally_segment_close(&prod);
	tally_engine_stop(&e);
	tally_segment_close(&owner);
}

/* ---- 5: several drain threads, exact accounting ------------------------------------ */

#define DT_SUBJECTS 8
#define DT_PRODUCERS 6
#define DT_PER_PHASE 20000

struct dt_arg {
	struct tally_segment *seg;
	const tally_subject_t *ids;
	int index;
	uint64_t attempts, recorded, dropped;
	uint64_t count[DT_SUBJECTS], min[DT_SUBJECTS], max[DT_SUBJECTS];
	uint64_t waits_sure[DT_SUBJECTS], waits_maybe[DT_SUBJECTS];
};

/* Two phases, each on a handle (and so a slot, and so maybe another
 * drain thread) of its own: latencies without retrying, and every 64th
 * an ack reply (a wait and a pending entry). */
static void *dt_producer(void *p)
{
	struct dt_arg *a = p;
	uint64_t x = 0x9e3779b97f4a7c15ull * (uint64_t)(a->index + 1);
	char reply[128];

	for (int s = 0; s < DT_SUBJECTS; s++)
		a->min[s] = UINT64_MAX;
	for (int phase = 0; phase < 2; phase++) {
		struct tally_producer *prod;
		struct tally_producer_counters c0, c1;
		if (tally_producer_attach(a->seg, &prod))
			return NULL;
		for (int i = 0; i < DT_PER_PHASE; i++) {
			x = x * 6364136223846793005ull + 1442695040888963407ull;
			int s = (int)((x >> 33) % DT_SUBJECTS);
			uint64_t v = 1000 + (x >> 45);
			if (i % 64 == 63) {
				uint64_t now = tally_real_ns();
				snprintf(reply, sizeof(reply), "$JS.ACK.S.c%d.1.%d.%d.%llu.3", s, i, i,
					 (unsigned long long)(now - v));
				tally_producer_counters(prod, &c0);
				tally_record_jetstream_at(prod, a->ids[s], reply, strlen(reply), now);
				tally_producer_counters(prod, &c1);
				a->waits_sure[s] += c1.recorded - c0.recorded == 2;
				a->waits_maybe[s] += c1.recorded - c0.recorded == 1;
				continue;
			}
			a->attempts++;
			if (!tally_record(prod, a->ids[s], v))
				continue;
			a->count[s]++;
			a->min[s] = v < a->min[s] ? v : a->min[s];
			a->max[s] = v > a->max[s] ? v : a->max[s];
		}
		tally_producer_counters(prod, &c1);
		a->recorded += c1.recorded;
		a->dropped += c1.dropped;
		tally_producer_detach(&prod);
	}
	return NULL;
}

/* Every latency, and at least every wait known to be stored, is in the
 * rows: waits reach the aggregator thread through the drain threads'
 * queues, so they may show a publish or two after the latencies. */
static bool dt_all_visible(struct tally_engine *e, const tally_subject_t *ids, const uint64_t *want,
			   const uint64_t *waits)
{
	struct tally_subject_stats st;

	for (int s = 0; s < DT_SUBJECTS; s++)
		if (tally_engine_read(e, ids[s], &st) != 0 || st.total_count != want[s] || st.wait_count < waits[s])
			return false;
	return true;
}

static void draining_threads(uint32_t nthreads)
{
	struct tally_segment *seg = make("sd", NULL);
	struct tally_engine_config cfg;
	struct tally_engine *e;
	tally_subject_t ids[DT_SUBJECTS];
	struct dt_arg a[DT_PRODUCERS];
	pthread_t th[DT_PRODUCERS], tr;
	atomic_bool stop = false;
	char name[32];

	tally_engine_config_init(&cfg);
	cfg.drain_threads = nthreads;
	cfg.publish_interval_ms = 1;
	cfg.reap_interval_ms = 5;
	cfg.slice_ns = 20000000;    /* slices close while it runs: walks, lazy advances, folds */
	cfg.window_ns = 60000000000; /* and nothing leaves the window */
	for (int s = 0; s < DT_SUBJECTS; s++) {
		snprintf(name, sizeof(name), "stress.drain.%d", s);
		tally_subject_intern(seg, name, &ids[s]);
	}
	if (!seg || tally_engine_start(seg, &cfg, &e)) {
		tap_ok(0, "drain_threads %u: engine start: %s", nthreads, tally_errmsg());
		return;
	}
	struct read_arg in = { .e = e, .id = ids[0], .stop = &stop };
	pthread_create(&tr, NULL, reader, &in);
	for (int t = 0; t < DT_PRODUCERS; t++) {
		a[t] = (struct dt_arg){ .seg = seg, .ids = ids, .index = t };
		pthread_create(&th[t], NULL, dt_producer, &a[t]);
	}
	uint64_t want[DT_SUBJECTS] = { 0 }, min[DT_SUBJECTS], max[DT_SUBJECTS] = { 0 };
	uint64_t sure[DT_SUBJECTS] = { 0 }, maybe[DT_SUBJECTS] = { 0 };
	uint64_t attempts = 0, counted = 0, recorded = 0, dropped = 0;
	for (int s = 0; s < DT_SUBJECTS; s++)
		min[s] = UINT64_MAX;
	for (int t = 0; t < DT_PRODUCERS; t++) {
		pthread_join(th[t], NULL);
		attempts += a[t].attempts;
		recorded += a[t].recorded;
		dropped += a[t].dropped;
		for (int s = 0; s < DT_SUBJECTS; s++) {
			want[s] += a[t].count[s];
			counted += a[t].count[s];
			min[s] = a[t].min[s] < min[s] ? a[t].min[s] : min[s];
			max[s] = a[t].max[s] > max[s] ? a[t].max[s] : max[s];
			sure[s] += a[t].waits_sure[s];
			maybe[s] += a[t].waits_maybe[s];
		}
	}
	/* what was recorded shows, exactly, in the merged rows (bounded: TSan is slow) */
	bool visible = false;
	for (int i = 0; i < 2000 && !(visible = dt_all_visible(e, ids, want, sure)); i++)
		tt_sleep_ms(5);
	bool exact = true, waits = true;
	for (int s = 0; s < DT_SUBJECTS; s++) {
		struct tally_subject_stats st = { 0 };
		struct tally_subject_buckets b = { 0 };
		tally_engine_read(e, ids[s], &st);
		exact &= st.count == want[s] && st.min_ns == min[s] && st.max_ns == max[s];
		waits &= st.wait_count >= sure[s] && st.wait_count <= sure[s] + maybe[s];
		(void)tally_engine_read_buckets(e, ids[s], &b);
		exact &= b.count <= want[s];
	}
	/* a claim's drops reach the segment's totals when the reaper has seen
	 * its slot released (every 5 ms here; bounded wait, TSan is slow) */
	struct tally_segment_totals tot;
	for (int i = 0; i < 2000; i++) {
		int trc = tally_read_totals(seg, &tot);
		if ((trc == 0 || trc == TALLY_ESTALE) && tot.dropped == dropped && tot.drained == recorded)
			break;
		tt_sleep_ms(5);
	}
	atomic_store(&stop, true);
	pthread_join(tr, NULL);
	tap_ok(visible && exact, "drain_threads %u: %d producers on two slots each, per-subject counts, "
	       "min and max exact (%llu latencies over %d subjects)", nthreads, DT_PRODUCERS,
	       (unsigned long long)counted, DT_SUBJECTS);
	tap_ok(waits, "drain_threads %u: every wait recorded is in its subject's series", nthreads);
	tap_ok(in.reads > 0 && in.bad == 0, "drain_threads %u: in-process reads while it publishes: %llu, bad %llu",
	       nthreads, (unsigned long long)in.reads, (unsigned long long)in.bad);
	tally_engine_stop(&e);
	int rc = tally_read_totals(seg, &tot);
	tap_ok((rc == 0 || rc == TALLY_ESTALE) && tot.drained == recorded && tot.recorded == recorded &&
	       tot.dropped == dropped && tot.rejected == 0 && recorded + dropped >= attempts,
	       "drain_threads %u: recorded %llu = drained %llu, dropped %llu (segment: %llu), of %llu latencies "
	       "tried and the entries of the ack replies",
	       nthreads, (unsigned long long)recorded, (unsigned long long)tot.drained,
	       (unsigned long long)dropped, (unsigned long long)tot.dropped, (unsigned long long)attempts);
	tally_segment_close(&seg);
}

/* ---- 6: the drain threads merge a publish with thread 0 ------------------------- */

/* More rows than a merge job takes (LANE_GROUP, 512), so that a publish
 * has several jobs and each job many claims; subject s records only
 * values in [mg_lo(s), mg_lo(s) + 999], ranges that do not overlap, so a
 * row merged from another row's windows shows a min or max outside its
 * own. */
#define MG_SUBJECTS 1200
#define MG_PRODUCERS 4

static uint64_t mg_lo(int s)
{
	return 1000000u + (uint64_t)s * 1000u;
}

struct mg_arg {
	struct tally_segment *seg;
	const tally_subject_t *ids;
	int index;
	atomic_bool *stop;
	uint64_t count[MG_SUBJECTS];
};

static void *mg_producer(void *p)
{
	struct mg_arg *a = p;
	uint64_t x = 0x2545f4914f6cdd1dull * (uint64_t)(a->index + 1);
	struct tally_producer *prod;

	if (tally_producer_attach(a->seg, &prod))
		return NULL;
	/* in bursts: producers spinning on every vCPU would starve the
	 * aggregator thread, and the run would see a publish or two */
	for (uint32_t n = 1; !atomic_load_explicit(a->stop, memory_order_relaxed); n++) {
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		int s = (int)((x >> 33) % MG_SUBJECTS);
		if (tally_record(prod, a->ids[s], mg_lo(s) + (x >> 54) % 1000))
			a->count[s]++;
		if (n % 2048 == 0)
			tt_sleep_ms(1);
	}
	tally_producer_detach(&prod);
	return NULL;
}

/* The scenario's window: longer than any run of it, valgrind's included
 * (about 2 minutes), so that nothing may leave it while the rows are
 * read. */
#define MG_WINDOW_NS UINT64_C(300000000000)

/* Every row once: false at a row that is not its subject's, whose count
 * since start went back (prev: the counts read last time), or, while the
 * scenario is younger than its window (whole: nothing can have left it),
 * whose window count is not its count since start: every value recorded
 * is still in the window, so a window count below it is a value lost
 * from the window, and one that fell between reads fails here too (a
 * run longer than the window, as under valgrind with a 30 s window,
 * sees its counts fall as slices leave: 2026-12-07, RELIABILITY.md).
 * whole_reads: the reads that were checked so. */
static bool mg_rows_sane(struct tally_engine *e, const tally_subject_t *ids, uint64_t *prev, uint64_t *reads,
			 uint64_t started_ns, uint64_t *whole_reads)
{
	struct tally_subject_stats st;
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	uint64_t age = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec - started_ns;
	bool whole = age < MG_WINDOW_NS - UINT64_C(10000000000);
	for (int s = 0; s < MG_SUBJECTS; s++) {
		int rc = tally_engine_read(e, ids[s], &st);
		if (rc == -ENOENT || rc == TALLY_EBUSY_RETRY)
			continue;
		if (rc != 0 && rc != TALLY_ESTALE)
			return false;
		++*reads;
		*whole_reads += whole;
		if (st.total_count < prev[s] || (whole && st.count != st.total_count) || (st.count &&
		    (st.min_ns < mg_lo(s) || st.max_ns > mg_lo(s) + 999 || st.p50_ns < st.min_ns || st.p50_ns > st.max_ns))) {
			fprintf(stderr, "merge: subject %d (values %llu .. %llu), %.3f s in: count since start %llu (was %llu), "
				"in the window %llu, min %llu, p50 %llu, max %llu\n",
				s, (unsigned long long)mg_lo(s), (unsigned long long)mg_lo(s) + 999, (double)age / 1e9,
				(unsigned long long)st.total_count, (unsigned long long)prev[s], (unsigned long long)st.count,
				(unsigned long long)st.min_ns, (unsigned long long)st.p50_ns, (unsigned long long)st.max_ns);
			return false;
		}
		prev[s] = st.total_count;
	}
	return true;
}

static void merging(uint32_t nthreads)
{
	struct tally_segment_config scfg;
	struct tally_segment *seg = NULL;
	struct tally_engine_config cfg;
	struct tally_engine *e = NULL;
	static tally_subject_t ids[MG_SUBJECTS];
	static struct mg_arg a[MG_PRODUCERS];
	static uint64_t prev[MG_SUBJECTS];
	pthread_t th[MG_PRODUCERS];
	atomic_bool stop = false;
	char name[32];

	tally_engine_config_init(&cfg);
	cfg.drain_threads = nthreads;
	cfg.publish_interval_ms = 1;
	cfg.drain_interval_us = 50;  /* a drain thread wakes often: often parked when a merge opens */
	cfg.slice_ns = 100000000;    /* slices close while it runs: rows left to thread 0 too */
	cfg.window_ns = MG_WINDOW_NS; /* and nothing leaves the window */
	tt_config(&scfg);
	scfg.ring_capacity = 1u << 14;
	scfg.subject_capacity = 4 * MG_SUBJECTS;
	struct timespec ts0;
	clock_gettime(CLOCK_MONOTONIC, &ts0);
	uint64_t started_ns = (uint64_t)ts0.tv_sec * 1000000000u + (uint64_t)ts0.tv_nsec, whole = 0;
	bool made = tally_segment_create(tt_segname("sm"), &scfg, 0, &seg) == 0;
	for (int s = 0; made && s < MG_SUBJECTS; s++) {
		snprintf(name, sizeof(name), "stress.merge.%d", s);
		made = tally_subject_intern(seg, name, &ids[s]) == 0;
	}
	if (!made || tally_engine_start(seg, &cfg, &e)) {
		tap_ok(0, "merge, drain_threads %u: engine start: %s", nthreads, tally_errmsg());
		tap_ok(0, "merge, drain_threads %u: no rows", nthreads);
		tally_segment_close(&seg);
		return;
	}
	memset(prev, 0, sizeof(prev));
	for (int t = 0; t < MG_PRODUCERS; t++) {
		memset(&a[t], 0, sizeof(a[t]));
		a[t] = (struct mg_arg){ .seg = seg, .ids = ids, .index = t, .stop = &stop };
		pthread_create(&th[t], NULL, mg_producer, &a[t]);
	}
	/* read every row while it publishes, for 60 sweeps and until it has
	 * published 50 times and the drain threads have merged rows of their
	 * own, for 8 s at most (TSan: a publish can take seconds there) */
	struct tally_engine_counters ec, ec0;
	uint64_t reads = 0, sweeps = 0;
	bool sane = true, vg = getenv("TALLY_VALGRIND") != NULL;
	struct timespec t0, tn;
	tally_engine_counters(e, &ec0);
	ec = ec0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	tn = t0;
	for (int i = 0; sane && tn.tv_sec - t0.tv_sec < 8 && (i < 60 || tally__engine_merge_helped(e) == 0 ||
							      ec.publishes - ec0.publishes < 50); i++, sweeps++) {
		sane = mg_rows_sane(e, ids, prev, &reads, started_ns, &whole);
		tt_sleep_ms(5);
		tally_engine_counters(e, &ec);
		clock_gettime(CLOCK_MONOTONIC, &tn);
	}
	uint64_t helped = tally__engine_merge_helped(e);
	tally_engine_counters(e, &ec);
	atomic_store(&stop, true);
	uint64_t want[MG_SUBJECTS] = { 0 };
	for (int t = 0; t < MG_PRODUCERS; t++) {
		pthread_join(th[t], NULL);
		for (int s = 0; s < MG_SUBJECTS; s++)
			want[s] += a[t].count[s];
	}
	/* and the rows end exact: every count (bounded wait: under valgrind
	 * a publish of these rows takes seconds) */
	bool exact = false;
	for (int i = 0; i < (vg ? 6000 : 2000) && sane && !exact; i++) {
		exact = sane = mg_rows_sane(e, ids, prev, &reads, started_ns, &whole);
		for (int s = 0; exact && s < MG_SUBJECTS; s++)
			exact = prev[s] == want[s];
		if (!exact)
			tt_sleep_ms(5);
	}
	tap_ok(sane && exact && whole > 0, "merge, drain_threads %u: %d rows read %llu times in %llu sweeps while it published "
	       "%llu times (the last took %.1f ms), each its own subject's, counts never going back, every value in "
	       "the window (%llu reads), ending exact",
	       nthreads, MG_SUBJECTS, (unsigned long long)reads, (unsigned long long)sweeps,
	       (unsigned long long)(ec.publishes - ec0.publishes), (double)ec.last_publish_ns / 1e6,
	       (unsigned long long)whole);
	/* valgrind runs one thread at a time: a drain thread parked on a job
	 * runs only once the aggregator thread waits, after its claims */
	tap_ok(helped > 0 || vg, "merge, drain_threads %u: the drain threads merged %llu rows of publishes themselves%s",
	       nthreads, (unsigned long long)helped, vg ? " (not required under valgrind)" : "");
	tally_engine_stop(&e);
	tally_segment_close(&seg);
}

int main(void)
{
	tap_plan(23);
	interning();
	recording();
	publishing();
	sleeping(1);
	sleeping(2);
	following();
	draining_threads(2);
	draining_threads(4);
	merging(2);
	merging(4);
	return tap_done();
}
