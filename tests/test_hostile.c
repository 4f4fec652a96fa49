/* SPDX-License-Identifier: MIT */
/*
 * test_hostile.c: the owner trusts nothing (issue 12). Every producer maps
 * the segment writable, so a buggy or hostile one can overwrite any byte
 * of it. The owner (tally_segment_create + tally_engine_start, and the
 * poller) must only ever use the sizes, counts and offsets it validated
 * itself (struct tally_segment), never crash, never touch memory outside
 * the mapping, and keep publishing. Readers must get errors or sane
 * values, never a crash.
 *
 *  - scribble_{zeros,ones,random}_{before,running}: a forked producer
 *    process (TALLY_OPEN_PRODUCER: its own writable mapping, as a real
 *    producer has) overwrites every writable byte that is not a ring
 *    entry: the header (all of its 4 KiB), the subject table, each slot's
 *    control, tail, counter and head blocks, the pending table, the
 *    snapshot section and the alignment gaps between sections, with
 *    zeros, with 0xff, or with seeded random bytes (plus random plausible
 *    words: 0, 1, 1<<24, all ones). "before": once, after the segment is
 *    created and before tally_engine_start; "running": over and over for
 *    a few hundred ms while the engine publishes, the poller (pointed at
 *    a closed port: it still writes its breaker and entries) runs, a
 *    producer thread and a producer process record (detaching and
 *    re-attaching now and then), and readers read: in-process
 *    (tally_engine_read, _read_buckets, and tally_read_* through the
 *    owner's handle and through a read-only handle) and in a reader
 *    process (tally_read_*, and re-opening the segment). Checked: the
 *    publish counter advances after the scribble, stop returns, every
 *    child exits 0 (an ASan report or a crash in a child makes it exit
 *    non-zero), every reader result is an error or sane.
 *  - stop_while_flooded: a producer process keeps every ring full (it
 *    attaches to every slot; as soon as the owner consumes, the tail moves to
 *    head + capacity or the head back to tail - capacity): the owner keeps
 *    publishing, and tally_engine_stop returns (its final drain is
 *    bounded).
 *  - field_{hdr,snap,pending}: for each field of struct tally__shm_hdr
 *    (each section's off and size too), the snapshot section header's
 *    magic, nentries, entry_size and seq, and each pending section header
 *    field, the values 0, 1, 1<<24 and the type's maximum, written through
 *    a separate TALLY_OPEN_PRODUCER mapping: once while the engine runs
 *    (it must keep publishing, readers must stay sane), then once before
 *    each engine start, and for pending fields before a poller start too:
 *    the poller must start (it sizes the table from the owner's
 *    configuration) and the watched consumer must still reach the
 *    owner's verdicts (pending_consumers, source never).
 *
 * TALLY_HOSTILE_SEED replays the random cases (the seed is printed).
 * Everything runs under ASan + UBSan in CI (make check in an ASan build).
 */
#include "config.h"

#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <tally/tally.h>
#include <tally/poller.h>

#include "common/helpers.h"
#include "pending.h"
#include "segment.h"
#include "snapshot.h"

#define NSUBJ 4
#define RUN_SCRIBBLE_MS 300u

static const char *const subj_names[NSUBJ] = { "hostile.a", "hostile.b", "hostile.c.d", "other" };

/* xorshift64*: reproducible from the seed printed. */
static uint64_t rnd_next(uint64_t *s)
{
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 2685821657736338717ull;
}

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t seed_for(const char *what)
{
	const char *env = getenv("TALLY_HOSTILE_SEED");
	uint64_t seed = env && *env ? strtoull(env, NULL, 0)
				    : (uint64_t)time(NULL) * 2654435761u ^ (uint64_t)getpid() << 20;

	if (!seed)
		seed = 1;
	fprintf(stderr, "# test_hostile %s: seed %llu (TALLY_HOSTILE_SEED=%llu replays)\n", what,
		(unsigned long long)seed, (unsigned long long)seed);
	return seed;
}

/* ---- the engine and the poller as the owner runs them ------------------------------ */

static void engine_cfg(struct tally_engine_config *c)
{
	tally_engine_config_init(c);
	c->drain_interval_us = 200;
	c->slice_ns = 10000000;  /* 10 ms */
	c->window_ns = 100000000; /* 100 ms */
	c->publish_interval_ms = 2;
	c->reap_interval_ms = 5;
}

static uint64_t publishes(struct tally_engine *e)
{
	struct tally_engine_counters c;

	tally_engine_counters(e, &c);
	return c.publishes;
}

/* The owner keeps publishing: n more publishes within 3 s. */
static void expect_publishing(struct tally_engine *e, unsigned n, const char *when)
{
	uint64_t p0 = publishes(e), end = mono_ms() + 3000;

	while (publishes(e) < p0 + n && mono_ms() < end)
		tt_sleep_ms(1);
	cr_assert_geq(publishes(e), p0 + n, "the owner stopped publishing %s (%llu -> %llu)", when,
		      (unsigned long long)p0, (unsigned long long)publishes(e));
}

static void quiet_log(void *ctx, int level, const char *msg)
{
	(void)ctx;
	(void)level;
	(void)msg;
}

/* A loopback port nobody listens on. */
static int closed_port(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port;

	cr_assert_geq(fd, 0);
	cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
	cr_assert_eq(getsockname(fd, (struct sockaddr *)&a, &len), 0);
	port = ntohs(a.sin_port);
	close(fd);
	return port;
}

/* The poller of a server that is down still writes its breaker block and
 * an entry per watched pair (source never) into the pending table. */
static int poller_start(struct tally_segment *seg, struct tally_poller **out)
{
	static const struct tally_poller_watch w[] = {
		{ .stream = "HOSTILE", .consumer = "c1", .map_subject = "hostile.>" },
		{ .stream = "HOSTILE", .consumer = "c2", .map_subject = NULL },
	};
	static char url[64];
	struct tally_poller_config pc = {
		.urls = url, .poll_interval_ms = 5, .request_timeout_ms = 50,
		.breaker_threshold = 3, .breaker_cooldown_ms = 20, .reconnect_wait_ms = 10,
		.reconnect_jitter_ms = 1, .watches = w, .nwatches = 2, .log = quiet_log,
	};

	snprintf(url, sizeof(url), "nats://127.0.0.1:%d", closed_port());
	return tally_poller_start(seg, &pc, out);
}

/* ---- what readers may see ------------------------------------------------------------ */

static bool rc_in(int rc, const int *ok, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (rc == ok[i])
			return true;
	return false;
}

static bool stats_sane(const struct tally_subject_stats *s, tally_subject_t id)
{
	return s->id == id && s->verdict <= TALLY_VERDICT_OVERLOAD &&
	       s->pending_source <= TALLY_PENDING_NOT_FOUND;
}

/* One pass of every segment reader over seg; returns a description of the
 * first insane result, or NULL. Used by threads and by the reader process. */
static const char *read_segment(const struct tally_segment *seg, uint32_t table_size,
				uint32_t nslots, uint32_t pending_cap, uint64_t *rng)
{
	static const int subject_ok[] = { 0, -ENOENT, -ERANGE, TALLY_EBUSY_RETRY, TALLY_ESTALE };
	static const int table_ok[] = { TALLY_EBUSY_RETRY, TALLY_ECORRUPT };
	static __thread struct tally_producer_stats prod[64];
	static __thread struct tally_consumer_stats cons[64];
	struct tally_subject_stats st;
	struct tally_poller_stats ps;
	struct tally_segment_info info;
	char name[TALLY_SUBJECT_MAX + 1];
	tally_subject_t id;
	int rc;

	for (int k = 0; k < 8; k++) {
		tally_subject_t i = k < 4 ? (tally_subject_t)(rnd_next(rng) % table_size)
					  : k == 4 ? table_size : k == 5 ? UINT32_MAX : (tally_subject_t)k;
		rc = tally_read_subject(seg, i, &st);
		if (!rc_in(rc, subject_ok, 5))
			return "tally_read_subject: unexpected return";
		if ((rc == 0 || rc == TALLY_ESTALE) && !stats_sane(&st, i))
			return "tally_read_subject: insane stats";
		if (rc == 0 || rc == TALLY_ESTALE) {
			static const int rule_ok[] = { 0, -ENOENT, -ESTALE, -EAGAIN, TALLY_ECORRUPT };
			struct tally_rule_info ri;
			rc = tally_read_rule(seg, &st, &ri);
			if (!rc_in(rc, rule_ok, 5))
				return "tally_read_rule: unexpected return";
			if (rc == 0 && (strnlen(ri.pattern, sizeof(ri.pattern)) == sizeof(ri.pattern) ||
					ri.is_default != (ri.pattern[0] == '\0') ||
					(!ri.is_default && tally_subject_validate(ri.pattern, true) != 0) ||
					!(ri.levels.clear_ratio > 0 && ri.levels.clear_ratio <= 1)))
				return "tally_read_rule: invalid rule";
		}
		rc = tally_subject_name(seg, i, name, sizeof(name));
		if (rc == 0 && (strnlen(name, sizeof(name)) == sizeof(name) ||
				tally_subject_validate(name, false) != 0))
			return "tally_subject_name: invalid name";
	}
	for (int k = 0; k < NSUBJ; k++) {
		rc = tally_subject_lookup(seg, subj_names[k], &id);
		if (rc == 0 && id >= table_size)
			return "tally_subject_lookup: id outside the table";
	}
	rc = tally_read_producers(seg, prod, 64);
	if (rc < 0 || (uint32_t)rc > nslots)
		return "tally_read_producers: count";
	for (int i = 0; i < rc; i++)
		if (prod[i].slot >= nslots || !prod[i].state)
			return "tally_read_producers: slot or state";
	rc = tally_read_consumers(seg, cons, 64);
	if ((rc < 0 && !rc_in(rc, table_ok, 2)) || rc > (int)pending_cap)
		return "tally_read_consumers: count";
	for (int i = 0; i < rc; i++)
		if (!cons[i].source || strnlen(cons[i].stream, sizeof(cons[i].stream)) == sizeof(cons[i].stream))
			return "tally_read_consumers: entry";
	rc = tally_read_poller(seg, &ps);
	if (rc < 0 && !rc_in(rc, table_ok, 2))
		return "tally_read_poller: unexpected return";
	if (rc == 0 && !ps.breaker)
		return "tally_read_poller: breaker name";
	rc = tally_segment_info(seg, &info);
	(void)rc;
	if (info.config.producer_slots != nslots || info.total_size != seg->len)
		return "tally_segment_info: layout moved";
	(void)tally_segment_owner_alive(seg);
	return NULL;
}

/* ---- the world: an owner, producers and readers ---------------------------------------- */

/* Shared with the children through an anonymous shared page. */
struct page {
	_Atomic int go_scribble, stop, go_read;
	_Atomic int ready_prod, ready_read, ready_scribble;
	_Atomic uint64_t passes, reads, records;
	char why[160];
};

enum mode { M_ZERO, M_ONES, M_RANDOM };

struct world {
	char name[128];
	struct tally_segment *seg, *rd;
	struct tally_engine *eng;
	struct tally_poller *pol;
	tally_subject_t ids[NSUBJ];
	struct page *pg;
	pid_t kid_prod, kid_read, kid_scribble;
	pthread_t prod_thread, read_thread;
	atomic_bool stop_threads;
	_Atomic uint64_t thread_reads;
	const char *_Atomic thread_why;
	struct tally_producer *prod; /* the producer thread's, attached before any scribble */
	uint64_t seed;
};

static struct page *page_new(void)
{
	void *p = mmap(NULL, sizeof(struct page), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	cr_assert_neq(p, MAP_FAILED);
	memset(p, 0, sizeof(struct page));
	return p;
}

static void wait_flag(_Atomic int *f, unsigned ms, const char *what)
{
	uint64_t end = mono_ms() + ms;

	while (!atomic_load(f) && mono_ms() < end)
		tt_sleep_ms(1);
	cr_assert(atomic_load(f), "%s did not get ready", what);
}

static void kid_wait(_Atomic int *f, struct page *pg)
{
	while (!atomic_load(f) && !atomic_load(&pg->stop))
		usleep(200);
}

/* Records flat out; detaches and re-attaches every few thousand records
 * (attach may fail once the header is scribbled: it keeps trying). */
static void record_loop(struct tally_segment *seg, struct tally_producer **pp, const tally_subject_t *ids,
			_Atomic int *stop_flag, atomic_bool *stop_flag2, _Atomic uint64_t *records, uint64_t seed)
{
	uint64_t rng = seed | 1;
	tally_subject_t late = ids[0];
	unsigned nlate = 0;

	for (uint64_t i = 0;; i++) {
		if ((stop_flag && atomic_load(stop_flag)) || (stop_flag2 && atomic_load(stop_flag2)))
			break;
		if (!*pp) {
			if (tally_producer_attach(seg, pp) != 0) {
				usleep(500);
				continue;
			}
			/* a subject interned after the scribble (the table may refuse) */
			char name[64];
			snprintf(name, sizeof(name), "late.%d.%u", (int)getpid(), nlate++ % 8);
			if (tally_subject_intern(seg, name, &late) != 0)
				late = ids[0];
		}
		uint64_t r = rnd_next(&rng);
		/* an id from the table, now and then one outside it */
		tally_subject_t id = (r & 255) == 0 ? (tally_subject_t)(r >> 32)
				   : (r & 7) == 1 ? late : ids[(r >> 8) % NSUBJ];
		tally_record(*pp, id, (r >> 16) & 0xfffff);
		if ((i & 4095) == 4095) {
			tally_producer_detach(pp);
			atomic_fetch_add(records, 4096);
			usleep(100);
		}
	}
	tally_producer_detach(pp);
}

_Noreturn static void kid_producer(struct world *w)
{
	struct tally_segment *seg = NULL;
	struct tally_producer *p = NULL;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (tally_segment_open(w->name, TALLY_OPEN_PRODUCER, 1000, &seg) || tally_producer_attach(seg, &p))
		_exit(2);
	atomic_store(&w->pg->ready_prod, 1);
	record_loop(seg, &p, w->ids, &w->pg->stop, NULL, &w->pg->records, w->seed ^ 0x1234);
	tally_segment_close(&seg);
	_exit(0);
}

_Noreturn static void kid_reader(struct world *w)
{
	struct tally_segment *seg = NULL, *again = NULL;
	uint64_t rng = w->seed ^ 0x5678;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (tally_segment_open(w->name, TALLY_OPEN_READER, 1000, &seg))
		_exit(2);
	uint32_t ts = tally_subject_capacity(seg), ns = seg->nslots, pc = seg->pending_cap;
	atomic_store(&w->pg->ready_read, 1);
	kid_wait(&w->pg->go_read, w->pg);
	while (!atomic_load(&w->pg->stop)) {
		const char *why = read_segment(seg, ts, ns, pc, &rng);
		if (why) {
			snprintf(w->pg->why, sizeof(w->pg->why), "reader process: %s", why);
			_exit(3);
		}
		/* A reader that attaches now: an error, or a handle that reads sanely. */
		if ((atomic_fetch_add(&w->pg->reads, 1) & 15) == 0 &&
		    tally_segment_open(w->name, TALLY_OPEN_READER, 0, &again) == 0) {
			why = read_segment(again, tally_subject_capacity(again), again->nslots,
					   again->pending_cap, &rng);
			tally_segment_close(&again);
			if (why) {
				snprintf(w->pg->why, sizeof(w->pg->why), "reader process (reopened): %s", why);
				_exit(3);
			}
		}
	}
	tally_segment_close(&seg);
	_exit(0);
}

struct range {
	uint64_t off, len;
};

/* Every writable byte of the mapping that is not a ring entry. */
static void scribble_pass(struct tally_segment *seg, enum mode m, uint64_t *rng)
{
	uint64_t slots_end = seg->slots.off + (uint64_t)seg->nslots * seg->slot_stride;
	static const uint64_t plausible[] = { 0, 1, 1u << 24, UINT32_MAX, UINT64_MAX, 2, 16, 4096 };

	struct range r[2 + 4096];
	uint32_t n = 0;

	r[n++] = (struct range){ 0, seg->slots.off };
	for (uint32_t i = 0; i < seg->nslots; i++)
		r[n++] = (struct range){ seg->slots.off + (uint64_t)i * seg->slot_stride,
					 offsetof(struct tally__slot, ring) };
	r[n++] = (struct range){ slots_end, seg->len - slots_end };
	for (uint32_t k = 0; k < n; k++) {
		unsigned char *p = seg->base + r[k].off;
		if (m == M_ZERO || m == M_ONES) {
			memset(p, m == M_ZERO ? 0 : 0xff, r[k].len);
			continue;
		}
		for (uint64_t j = 0; j + 8 <= r[k].len; j += 8) {
			uint64_t v = rnd_next(rng);
			memcpy(p + j, &v, 8);
		}
	}
	if (m != M_RANDOM)
		return;
	/* Plausible values in random places of the non-ring ranges. */
	for (int j = 0; j < 256; j++) {
		uint32_t k = (uint32_t)(rnd_next(rng) % n);
		if (r[k].len < 8)
			continue;
		uint64_t off = r[k].off + (rnd_next(rng) % (r[k].len - 7) & ~3ull);
		uint64_t v = plausible[rnd_next(rng) % 8];
		memcpy(seg->base + off, &v, (rnd_next(rng) & 1) ? 4 : 8);
	}
}

_Noreturn static void kid_scribbler(struct world *w, enum mode m, bool running)
{
	struct tally_segment *seg = NULL;
	uint64_t rng = w->seed;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (tally_segment_open(w->name, TALLY_OPEN_PRODUCER, 1000, &seg))
		_exit(2);
	atomic_store(&w->pg->ready_scribble, 1);
	kid_wait(&w->pg->go_scribble, w->pg);
	uint64_t end = mono_ms() + (running ? RUN_SCRIBBLE_MS : 0);
	do {
		scribble_pass(seg, m, &rng);
		atomic_fetch_add(&w->pg->passes, 1);
		if (running)
			usleep(200);
	} while (running && mono_ms() < end && !atomic_load(&w->pg->stop));
	/* Close without unmapping what we did: the handle is not the owner's. */
	tally_segment_close(&seg);
	_exit(0);
}

static void *prod_thread(void *arg)
{
	struct world *w = arg;
	_Atomic uint64_t n = 0;

	record_loop(w->seg, &w->prod, w->ids, NULL, &w->stop_threads, &n, w->seed ^ 0x9abc);
	return NULL;
}

static void *read_thread(void *arg)
{
	struct world *w = arg;
	uint64_t rng = w->seed ^ 0xdef0;
	uint32_t ts = tally_subject_capacity(w->seg);
	struct tally_subject_stats st;
	struct tally_subject_buckets b;

	while (!atomic_load(&w->stop_threads)) {
		const char *why = read_segment(w->seg, ts, w->seg->nslots, w->seg->pending_cap, &rng);
		if (!why)
			why = read_segment(w->rd, ts, w->rd->nslots, w->rd->pending_cap, &rng);
		for (uint32_t i = 0; i < NSUBJ && !why; i++) {
			int rc = tally_engine_read(w->eng, w->ids[i], &st);
			if (rc != 0 && rc != -ENOENT)
				why = "tally_engine_read: unexpected return";
			else if (rc == 0 && (!stats_sane(&st, w->ids[i]) || st.count > st.total_count + 1000000000u))
				why = "tally_engine_read: insane stats";
			rc = tally_engine_read_buckets(w->eng, w->ids[i], &b);
			if (rc == 0 && b.n > TALLY_BUCKETS_MAX)
				why = "tally_engine_read_buckets: n";
		}
		for (uint32_t k = 0; k < 4 && !why; k++) {
			tally_subject_t id = k == 3 ? UINT32_MAX : (tally_subject_t)(rnd_next(&rng) % (ts + 1));
			int rc = tally_engine_read(w->eng, id, &st);
			if (rc == 0 && !stats_sane(&st, id))
				why = "tally_engine_read: insane stats (any id)";
		}
		if (why) {
			atomic_store(&w->thread_why, why);
			break;
		}
		atomic_fetch_add(&w->thread_reads, 1);
		usleep(100);
	}
	return NULL;
}

static void world_create(struct world *w, const char *tag)
{
	struct tally_segment_config cfg;

	memset(w, 0, sizeof(*w));
	snprintf(w->name, sizeof(w->name), "%s", tt_segname(tag));
	tt_config(&cfg);
	cfg.producer_cooloff_ms = 5;
	cr_assert_eq(tally_segment_create(w->name, &cfg, 0, &w->seg), 0, "%s", tally_errmsg());
	for (int i = 0; i < NSUBJ; i++)
		cr_assert_eq(tally_subject_intern(w->seg, subj_names[i], &w->ids[i]), 0);
	cr_assert_eq(tally_segment_open(w->name, TALLY_OPEN_READER, 1000, &w->rd), 0);
	w->pg = page_new();
}

static int kid_status(pid_t pid)
{
	int status = 0;

	cr_assert_eq(waitpid(pid, &status, 0), pid);
	return status;
}

static void expect_kid_ok(struct world *w, pid_t pid, const char *what)
{
	int status = kid_status(pid);

	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "%s (pid %d) %s %d%s%s", what, (int)pid, WIFEXITED(status) ? "exited" : "died of signal",
		  WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status),
		  w->pg->why[0] ? ": " : "", w->pg->why);
}

/* Start the children (before any thread: fork a single-threaded process). */
static void world_fork(struct world *w, enum mode m, bool running)
{
	/* before the producer process, which fills free slots with RELEASING
	 * ones (re-attaching) until the engine reaps them */
	cr_assert_eq(tally_producer_attach(w->seg, &w->prod), 0, "%s", tally_errmsg());
	fflush(NULL);
	if ((w->kid_prod = fork()) == 0)
		kid_producer(w);
	if ((w->kid_read = fork()) == 0)
		kid_reader(w);
	if ((w->kid_scribble = fork()) == 0)
		kid_scribbler(w, m, running);
	cr_assert(w->kid_prod > 0 && w->kid_read > 0 && w->kid_scribble > 0);
	wait_flag(&w->pg->ready_prod, 5000, "the producer process");
	wait_flag(&w->pg->ready_read, 5000, "the reader process");
	wait_flag(&w->pg->ready_scribble, 5000, "the scribbler process");
}

static void world_engine_start(struct world *w)
{
	struct tally_engine_config ec;

	engine_cfg(&ec);
	cr_assert_eq(tally_engine_start(w->seg, &ec, &w->eng), 0, "engine start: %s", tally_errmsg());
	/* The poller takes its capacity from the owner, not from the table's header. */
	int rc = poller_start(w->seg, &w->pol);
	cr_assert_eq(rc, 0, "poller start: %d %s", rc, tally_errmsg());
}

static void world_threads(struct world *w)
{
	cr_assert_eq(pthread_create(&w->prod_thread, NULL, prod_thread, w), 0);
	cr_assert_eq(pthread_create(&w->read_thread, NULL, read_thread, w), 0);
	atomic_store(&w->pg->go_read, 1);
}

static void world_end(struct world *w)
{
	atomic_store(&w->pg->stop, 1);
	atomic_store(&w->stop_threads, true);
	pthread_join(w->prod_thread, NULL);
	pthread_join(w->read_thread, NULL);
	const char *why = atomic_load(&w->thread_why);
	cr_assert_null(why, "in-process reader: %s", why ? why : "");
	cr_assert_gt(atomic_load(&w->thread_reads), 0, "the in-process reader never completed a pass");
	expect_kid_ok(w, w->kid_prod, "producer process");
	expect_kid_ok(w, w->kid_read, "reader process");
	cr_assert_gt(atomic_load(&w->pg->reads), 0, "the reader process never completed a pass");
	tally_poller_stop(&w->pol);
	tally_engine_stop(&w->eng);
	cr_assert_null(w->eng);
	tally_segment_close(&w->rd);
	tally_segment_close(&w->seg);
	munmap(w->pg, sizeof(*w->pg));
}

/* Once the scribbling stops, the owner's reaper gives slots in states no
 * producer could have left back (after the cool-off), and the owner's own
 * threads can attach again, whatever the header says of the owner. */
static void expect_attach(struct world *w)
{
	struct tally_producer *p = NULL;
	uint64_t end = mono_ms() + 3000;
	int rc;

	while ((rc = tally_producer_attach(w->seg, &p)) != 0 && mono_ms() < end)
		tt_sleep_ms(2);
	cr_assert_eq(rc, 0, "the owner cannot attach a producer after the scribble: %s", tally_errmsg());
	tally_producer_detach(&p);
}

static void scribble_before(enum mode m, const char *tag)
{
	struct world w;

	world_create(&w, tag);
	w.seed = seed_for(tag);
	world_fork(&w, m, false);
	atomic_store(&w.pg->go_scribble, 1);
	expect_kid_ok(&w, w.kid_scribble, "scribbler process");
	cr_assert_eq(atomic_load(&w.pg->passes), 1);
	world_engine_start(&w);
	world_threads(&w);
	expect_publishing(w.eng, 5, "after a scribble before its start");
	tt_sleep_ms(50);
	expect_publishing(w.eng, 5, "with readers and producers on a scribbled segment");
	expect_attach(&w);
	world_end(&w);
}

static void scribble_running(enum mode m, const char *tag)
{
	struct world w;

	world_create(&w, tag);
	w.seed = seed_for(tag);
	world_fork(&w, m, true);
	world_engine_start(&w);
	world_threads(&w);
	expect_publishing(w.eng, 5, "before the scribble");
	atomic_store(&w.pg->go_scribble, 1);
	tt_sleep_ms(RUN_SCRIBBLE_MS / 2);
	expect_publishing(w.eng, 3, "while a producer scribbles");
	expect_kid_ok(&w, w.kid_scribble, "scribbler process");
	cr_assert_gt(atomic_load(&w.pg->passes), 1);
	expect_publishing(w.eng, 5, "after the scribble");
	expect_attach(&w);
	world_end(&w);
}

TestSuite(hostile, .timeout = 60);

Test(hostile, scribble_zeros_before) { scribble_before(M_ZERO, "hz-b"); }
Test(hostile, scribble_ones_before) { scribble_before(M_ONES, "hf-b"); }
Test(hostile, scribble_random_before) { scribble_before(M_RANDOM, "hr-b"); }
Test(hostile, scribble_zeros_running) { scribble_running(M_ZERO, "hz-r"); }
Test(hostile, scribble_ones_running) { scribble_running(M_ONES, "hf-r"); }
Test(hostile, scribble_random_running) { scribble_running(M_RANDOM, "hr-r"); }

/* ---- a producer that never lets the rings drain ---------------------------------------- */

/* Attaches a producer to every slot and keeps each ring full as soon as the owner
 * consumes: the tail moved to head + capacity, or the head moved back to
 * tail - capacity (a stop that drains "up to the tails it saw" is not
 * bounded by that alone: the head is the producer's to write too). */
_Noreturn static void kid_flooder(struct world *w)
{
	struct tally_segment *seg = NULL;
	struct tally_producer *p[64] = { 0 };
	uint32_t np = 0;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (tally_segment_open(w->name, TALLY_OPEN_PRODUCER, 1000, &seg))
		_exit(2);
	/* every slot claimed the ordinary way, so the owner drains them all */
	while (np < 64 && tally_producer_attach(seg, &p[np]) == 0)
		np++;
	if (np != seg->nslots)
		_exit(4);
	/* entries of a real subject, as a producer recording flat out leaves them */
	for (uint32_t i = 0; i < seg->nslots; i++)
		for (uint32_t k = 0; k < seg->ring_cap; k++)
			tally__seg_slot(seg, i)->ring[k] = (struct tally_ring_entry){ .subject = w->ids[0],
										       .value_ns = 1000 + k };
	atomic_store(&w->pg->ready_scribble, 1);
	for (uint64_t k = 0; !atomic_load(&w->pg->stop); k++) {
		for (uint32_t i = 0; i < seg->nslots; i++) {
			struct tally__slot *s = tally__seg_slot(seg, i);
			uint64_t h = atomic_load(&s->head), t = atomic_load(&s->tail);
			if (t - h == seg->ring_cap)
				continue;
			/* Refill: a tail moved ahead, or (head is in the segment too)
			 * a head moved back under a tail that stays put. */
			if ((k + i) & 1)
				atomic_store_explicit(&s->tail, h + seg->ring_cap, memory_order_release);
			else
				atomic_store_explicit(&s->head, t - seg->ring_cap, memory_order_relaxed);
		}
		atomic_fetch_add(&w->pg->passes, 1);
	}
	while (np)
		tally_producer_detach(&p[--np]);
	tally_segment_close(&seg);
	_exit(0);
}

struct stopper {
	struct tally_engine *eng;
	_Atomic int done;
};

static void *stop_thread(void *arg)
{
	struct stopper *st = arg;

	tally_engine_stop(&st->eng);
	atomic_store(&st->done, 1);
	return NULL;
}

/* Stop drains what was published before it, not what a producer keeps
 * publishing after: it returns even while every ring is kept full. */
Test(hostile, stop_while_flooded)
{
	struct tally_engine_config ec;
	struct stopper st = { 0 };
	struct world w;
	pthread_t t;

	world_create(&w, "hflood");
	engine_cfg(&ec);
	fflush(NULL);
	if ((w.kid_scribble = fork()) == 0)
		kid_flooder(&w);
	wait_flag(&w.pg->ready_scribble, 5000, "the flooding process");
	cr_assert_eq(tally_engine_start(w.seg, &ec, &w.eng), 0);
	tt_sleep_ms(30);
	expect_publishing(w.eng, 3, "while every ring is kept full");
	cr_assert_gt(atomic_load(&w.pg->passes), 1);
	st.eng = w.eng;
	w.eng = NULL;
	cr_assert_eq(pthread_create(&t, NULL, stop_thread, &st), 0);
	uint64_t end = mono_ms() + 5000;
	while (!atomic_load(&st.done) && mono_ms() < end)
		tt_sleep_ms(2);
	cr_assert(atomic_load(&st.done), "tally_engine_stop did not return within 5 s while rings were flooded");
	pthread_join(t, NULL);
	atomic_store(&w.pg->stop, 1);
	expect_kid_ok(&w, w.kid_scribble, "flooding process");
	tally_segment_close(&w.rd);
	tally_segment_close(&w.seg);
	munmap(w.pg, sizeof(*w.pg));
}

/* ---- one geometry field at a time ----------------------------------------------------- */

enum where { W_HDR, W_SNAP, W_PENDING };

struct field {
	enum where where;
	const char *name;
	uint32_t off, width;
};

#define HF(f) { W_HDR, #f, offsetof(struct tally__shm_hdr, f), sizeof(((struct tally__shm_hdr *)0)->f) }
static struct field hdr_fields[] = {
	HF(magic), HF(abi_major), HF(abi_minor), HF(total_size), HF(hdr_size), HF(flags),
	HF(owner_pid), HF(mode), HF(owner_start_time), HF(generation), HF(created_ns),
	HF(nslots), HF(ring_cap), HF(subject_cap), HF(pending_cap), HF(max_value_ns),
	HF(cooloff_ms), HF(slot_stride), HF(subject_entry_size), HF(reserved0),
	HF(subjects.off), HF(subjects.size), HF(slots.off), HF(slots.size),
	HF(pending.off), HF(pending.size), HF(snapshot.off), HF(snapshot.size),
	HF(owner_heartbeat_ns), HF(owner_state), HF(subjects_used), HF(ready),
};
#define SF(f) { W_SNAP, #f, offsetof(struct tally__snap_hdr, f), sizeof(((struct tally__snap_hdr *)0)->f) }
static struct field snap_fields[] = { SF(magic), SF(nentries), SF(entry_size), SF(seq) };
#define PF(f) { W_PENDING, #f, offsetof(struct tally__pending_header, f), \
		sizeof(((struct tally__pending_header *)0)->f) }
static struct field pending_fields[] = {
	PF(magic), PF(version), PF(header_size), PF(breaker_size), PF(entry_size), PF(capacity),
	PF(section_size),
};

static void set_field(struct tally_segment *h, const struct field *f, uint64_t v)
{
	uint64_t base = f->where == W_HDR ? 0 : f->where == W_SNAP ? h->snapshot.off : h->pending.off;
	unsigned char *p = h->base + base + f->off;

	if (f->width == 4) {
		uint32_t v32 = (uint32_t)v;
		memcpy(p, &v32, 4);
	} else {
		memcpy(p, &v, 8);
	}
}

/* A few records, then the owner must publish, and the readers stay sane. */
static void poke(struct world *w, uint64_t *rng)
{
	for (int i = 0; i < 64; i++)
		tally_record(w->prod, w->ids[i % NSUBJ], 1000 + (uint64_t)i);
	expect_publishing(w->eng, 2, "after a field was set");
	uint32_t ts = tally_subject_capacity(w->seg);
	const char *why = read_segment(w->seg, ts, w->seg->nslots, w->seg->pending_cap, rng);
	if (!why)
		why = read_segment(w->rd, ts, w->rd->nslots, w->rd->pending_cap, rng);
	cr_assert_null(why, "%s", why ? why : "");
	struct tally_subject_stats st;
	for (int i = 0; i < NSUBJ; i++)
		if (tally_engine_read(w->eng, w->ids[i], &st) == 0)
			cr_assert(stats_sane(&st, w->ids[i]));
}

/* The watched pair mapped to hostile.> (never refreshed: the server is
 * down) reaches the owner's verdicts whatever the table's header says. */
static void expect_pending_seen(struct world *w, const struct field *f, uint64_t v)
{
	struct tally_subject_stats st = { 0 };
	uint64_t end = mono_ms() + 2000;

	while (mono_ms() < end) {
		if (tally_engine_read(w->eng, w->ids[0], &st) == 0 && st.pending_consumers >= 1)
			break;
		tally_record(w->prod, w->ids[0], 1000);
		tt_sleep_ms(2);
	}
	cr_assert_geq(st.pending_consumers, 1, "pending header %s = %llu hid the table from the owner",
		      f->name, (unsigned long long)v);
	cr_assert_eq(st.pending_source, TALLY_PENDING_NEVER);
}

static void field_case(const struct field *f)
{
	const uint64_t vals[] = { 0, 1, 1u << 24, f->width == 4 ? UINT32_MAX : UINT64_MAX };
	struct tally_engine_config ec;
	struct tally_segment *h = NULL;
	struct world w;
	uint64_t rng = 42;

	world_create(&w, "hfield");
	/* The hostile producer's own writable mapping, opened while the segment is intact. */
	cr_assert_eq(tally_segment_open(w.name, TALLY_OPEN_PRODUCER, 1000, &h), 0);
	cr_assert_eq(tally_producer_attach(w.seg, &w.prod), 0);
	engine_cfg(&ec);
	/* While the engine runs. */
	cr_assert_eq(tally_engine_start(w.seg, &ec, &w.eng), 0);
	for (size_t i = 0; i < 4; i++) {
		set_field(h, f, vals[i]);
		poke(&w, &rng);
	}
	tally_engine_stop(&w.eng);
	/* Before each start (of the engine; of the poller for the pending table). */
	for (size_t i = 0; i < 4; i++) {
		set_field(h, f, vals[i]);
		cr_assert_eq(tally_engine_start(w.seg, &ec, &w.eng), 0, "%s = %llu: %s", f->name,
			     (unsigned long long)vals[i], tally_errmsg());
		if (f->where == W_PENDING) {
			int rc = poller_start(w.seg, &w.pol);
			cr_assert_eq(rc, 0, "poller start, %s = %llu: %d %s", f->name,
				     (unsigned long long)vals[i], rc, tally_errmsg());
		}
		poke(&w, &rng);
		if (f->where == W_PENDING)
			expect_pending_seen(&w, f, vals[i]);
		tally_poller_stop(&w.pol);
		tally_engine_stop(&w.eng);
	}
	tally_producer_detach(&w.prod);
	tally_segment_close(&h);
	tally_segment_close(&w.rd);
	tally_segment_close(&w.seg);
	munmap(w.pg, sizeof(*w.pg));
}

ParameterizedTestParameters(hostile, field_hdr)
{
	return cr_make_param_array(struct field, hdr_fields, sizeof(hdr_fields) / sizeof(hdr_fields[0]));
}
ParameterizedTest(struct field *f, hostile, field_hdr) { field_case(f); }

ParameterizedTestParameters(hostile, field_snap)
{
	return cr_make_param_array(struct field, snap_fields, sizeof(snap_fields) / sizeof(snap_fields[0]));
}
ParameterizedTest(struct field *f, hostile, field_snap) { field_case(f); }

ParameterizedTestParameters(hostile, field_pending)
{
	return cr_make_param_array(struct field, pending_fields,
				   sizeof(pending_fields) / sizeof(pending_fields[0]));
}
ParameterizedTest(struct field *f, hostile, field_pending) { field_case(f); }
