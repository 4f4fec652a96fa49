/* SPDX-License-Identifier: MIT */
/*
 * follow.c: producers that survive a restart of their segment's owner.
 *
 * A router opens the segment once and keeps recording for days; tallyd
 * may be restarted under it (a clean restart, a SIGKILL and a restart, a
 * `tallyd --replace`). Each of these leaves the router's mapping pointing
 * at a segment nobody drains any more: unlinked, or with a dead or
 * stopped owner. This file notices that and finds the new segment of the
 * same name, so that producer handles can move to it (producer.c).
 *
 * Segments. The handle the application opened is the origin. When its
 * owner is gone and a segment of the same name with a live owner and
 * another generation exists, it is opened (producer mode) as a successor;
 * the origin keeps every successor it opened, in order, and the last one
 * is current. Nothing is unmapped before the origin is closed: a handle
 * still on an older one may be writing to it until its next slow path.
 *
 * Subject ids. The application's ids are the origin's. Each successor
 * has a remap table, origin id -> successor id, filled lazily: the first
 * record of an id after the move reads the name from the origin's table
 * (still mapped) and interns it into the successor. Entries are written
 * once (0 -> id + 1) with a CAS, so racing threads agree; interning is
 * itself idempotent per name.
 *
 * The watcher. One thread per origin, started at the first attach, wakes
 * every TALLY__FOLLOW_CHECK_MS and asks whether the current segment's
 * owner is alive (owner state, pid + start time, and whether the name
 * still refers to the same object). When it is not, it pokes the
 * origin's handles (producer.c): each goes to its slow path on its next
 * record and moves itself. The record path pays nothing for this. The
 * watcher itself never touches a handle's ring or slot.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "follow.h"
#include "proc.h"
#include "segment.h"

struct tally__remap {
	struct tally_segment *origin, *target;
	uint32_t n;             /* the origin's table size */
	_Atomic uint32_t id[];  /* 0 unresolved, UINT32_MAX unresolvable, else target id + 1 */
};

struct tally__follow {
	pthread_mutex_t lock;     /* successors, opening one */
	struct tally_segment **succ;
	struct tally__remap **remap;
	uint32_t n, cap;
	uint64_t next_open_ns;    /* do not try to open again before (rate limit) */
	pid_t watcher_pid;        /* the process that started the watcher (fork) */
	pthread_t watcher;
	bool watching;
	pthread_mutex_t wake_lock;
	pthread_cond_t wake;
	bool stop;
	_Atomic uint64_t moves;   /* successors opened */
};

static struct tally__follow *follow_of(struct tally_segment *origin)
{
	return origin->follow;
}

int tally__follow_init(struct tally_segment *origin)
{
	struct tally__follow *fo = calloc(1, sizeof(*fo));

	if (!fo)
		return -ENOMEM;
	pthread_mutex_init(&fo->lock, NULL);
	pthread_mutex_init(&fo->wake_lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&fo->wake, &ca);
	pthread_condattr_destroy(&ca);
	origin->follow = fo;
	return 0;
}

/* ---- the remap ------------------------------------------------------------ */

uint32_t tally__remap_id(struct tally__remap *m, uint32_t id)
{
	if (id >= m->n)
		return id; /* not an origin id: the owner counts it as rejected */
	uint32_t v = atomic_load_explicit(&m->id[id], memory_order_relaxed);
	if (TALLY__LIKELY(v != 0 && v != UINT32_MAX))
		return v - 1;
	if (v == UINT32_MAX)
		return UINT32_MAX;
	char name[TALLY_SUBJECT_MAX + 1];
	tally_subject_t to;
	uint32_t want = UINT32_MAX, expect = 0;
	int rc = tally_subject_name(m->origin, id, name, sizeof(name));
	if (rc == 0) {
		rc = tally_subject_intern(m->target, name, &to);
		if (rc == 0)
			want = to + 1;
		else if (rc == -EAGAIN || rc == TALLY_EFULL)
			return UINT32_MAX; /* try again next time, do not remember */
	}
	atomic_compare_exchange_strong_explicit(&m->id[id], &expect, want, memory_order_relaxed,
						memory_order_relaxed);
	v = atomic_load_explicit(&m->id[id], memory_order_relaxed);
	return v == UINT32_MAX ? UINT32_MAX : v - 1;
}

static struct tally__remap *remap_new(struct tally_segment *origin, struct tally_segment *target)
{
	struct tally__remap *m = calloc(1, sizeof(*m) + (size_t)origin->table_size * sizeof(m->id[0]));

	if (!m)
		return NULL;
	m->origin = origin;
	m->target = target;
	m->n = origin->table_size;
	return m;
}

/* ---- successors ------------------------------------------------------------ */

static bool alive(const struct tally_segment *seg)
{
	return tally_segment_owner_alive(seg) == 1;
}

/* Open the segment that now has the origin's name, if it has a live owner
 * and is not one we know. Called with fo->lock held. */
static int open_successor(struct tally_segment *origin, struct tally__follow *fo, uint64_t now)
{
	struct tally_segment *s = NULL;
	struct tally__remap *m;
	int rc;

	if (now < fo->next_open_ns)
		return TALLY_EOWNERDEAD;
	fo->next_open_ns = now + (uint64_t)TALLY__FOLLOW_RETRY_MS * 1000000u;
	if ((rc = tally_segment_open(origin->name, TALLY_OPEN_PRODUCER, 0, &s)) != 0)
		return rc;
	struct tally_segment *last = fo->n ? fo->succ[fo->n - 1] : origin;
	if (!alive(s) || s->generation == last->generation || s->generation == origin->generation) {
		tally_segment_close(&s);
		return TALLY_EOWNERDEAD;
	}
	if (fo->n == fo->cap) {
		uint32_t cap = fo->cap ? fo->cap * 2 : 4;
		struct tally_segment **ns = realloc(fo->succ, cap * sizeof(*ns));
		if (ns)
			fo->succ = ns;
		struct tally__remap **nm = realloc(fo->remap, cap * sizeof(*nm));
		if (nm)
			fo->remap = nm;
		if (!ns || !nm) {
			tally_segment_close(&s);
			return -ENOMEM;
		}
		fo->cap = cap;
	}
	if (!(m = remap_new(origin, s))) {
		tally_segment_close(&s);
		return -ENOMEM;
	}
	s->follower_of = origin;
	fo->succ[fo->n] = s;
	fo->remap[fo->n] = m;
	fo->n++;
	atomic_fetch_add_explicit(&fo->moves, 1, memory_order_relaxed);
	return 0;
}

int tally__follow_current(struct tally_segment *origin, struct tally_segment **to,
			  struct tally__remap **remap)
{
	struct tally__follow *fo = follow_of(origin);
	int rc = 0;

	pthread_mutex_lock(&fo->lock);
	struct tally_segment *cur = fo->n ? fo->succ[fo->n - 1] : origin;
	if (!alive(cur))
		rc = open_successor(origin, fo, tally__mono_ns());
	if (rc == 0) {
		*to = fo->n ? fo->succ[fo->n - 1] : origin;
		*remap = fo->n ? fo->remap[fo->n - 1] : NULL;
	}
	pthread_mutex_unlock(&fo->lock);
	return rc;
}

uint64_t tally__follow_moves(struct tally_segment *origin)
{
	struct tally__follow *fo = follow_of(origin);

	return fo ? atomic_load_explicit(&fo->moves, memory_order_relaxed) : 0;
}

/* ---- the watcher ------------------------------------------------------------- */

static void *watcher_main(void *arg)
{
	struct tally_segment *origin = arg;
	struct tally__follow *fo = follow_of(origin);
	struct timespec ts;

	pthread_setname_np(pthread_self(), "tally-follow");
	pthread_mutex_lock(&fo->wake_lock);
	while (!fo->stop) {
		clock_gettime(CLOCK_MONOTONIC, &ts);
		ts.tv_nsec += (long)TALLY__FOLLOW_CHECK_MS * 1000000L;
		ts.tv_sec += ts.tv_nsec / 1000000000L;
		ts.tv_nsec %= 1000000000L;
		pthread_cond_timedwait(&fo->wake, &fo->wake_lock, &ts);
		if (fo->stop)
			break;
		pthread_mutex_unlock(&fo->wake_lock);
		pthread_mutex_lock(&fo->lock);
		struct tally_segment *cur = fo->n ? fo->succ[fo->n - 1] : origin;
		bool ok = alive(cur);
		pthread_mutex_unlock(&fo->lock);
		if (!ok)
			tally__producers_poke(origin);
		pthread_mutex_lock(&fo->wake_lock);
	}
	pthread_mutex_unlock(&fo->wake_lock);
	return NULL;
}

void tally__follow_watch(struct tally_segment *origin)
{
	struct tally__follow *fo = follow_of(origin);

	pthread_mutex_lock(&fo->lock);
	if (!fo->watching || fo->watcher_pid != getpid()) {
		fo->stop = false;
		if (pthread_create(&fo->watcher, NULL, watcher_main, origin) == 0) {
			fo->watching = true;
			fo->watcher_pid = getpid();
		}
		/* no thread: handles still notice on their full rings */
	}
	pthread_mutex_unlock(&fo->lock);
}

void tally__follow_free(struct tally_segment *origin)
{
	struct tally__follow *fo = follow_of(origin);

	if (!fo)
		return;
	if (fo->watching && fo->watcher_pid == getpid()) {
		pthread_mutex_lock(&fo->wake_lock);
		fo->stop = true;
		pthread_cond_signal(&fo->wake);
		pthread_mutex_unlock(&fo->wake_lock);
		pthread_join(fo->watcher, NULL);
	}
	for (uint32_t i = 0; i < fo->n; i++) {
		/* handles still attached at the origin's close may be on a
		 * successor's ring: it gets the same private pages (segment.c) */
		fo->succ[i]->revoked_at_close = origin->revoked_at_close;
		tally_segment_close(&fo->succ[i]);
		free(fo->remap[i]);
	}
	free(fo->succ);
	free(fo->remap);
	pthread_mutex_destroy(&fo->lock);
	pthread_mutex_destroy(&fo->wake_lock);
	pthread_cond_destroy(&fo->wake);
	free(fo);
	origin->follow = NULL;
}
