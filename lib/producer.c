/* SPDX-License-Identifier: MIT */
/*
 * producer.c: claiming and releasing producer slots, the slow paths of
 * tally_record(), and the owner's reaper.
 *
 * Ring design. Each slot is a single-producer single-consumer ring of
 * 16-byte entries with two free-running 64-bit positions: tail, stored by
 * the producer with release after writing an entry, and head, stored by
 * the owner's aggregator with release after reading entries. Positions
 * never wrap in practice (2^64 records), so "full" is tail - head ==
 * capacity and no slot is wasted. The producer keeps a private copy of
 * head and reloads the shared one only when the ring looks full, so in
 * steady state it touches only its own entries and its own tail line;
 * head, tail and the rare counters each sit in a 128-byte block of their
 * own. Drop and clamp counters have a single writer (the producer), so
 * they are updated with a plain load and store, never an atomic add.
 *
 * Slot life. A producer claims a FREE slot with one CAS, fills in its
 * pid, tid and process start time, and publishes ACTIVE. Detaching stores
 * RELEASING; the owner frees the slot once the ring is drained. If the
 * process or thread dies without detaching, the reaper sees it (pid +
 * start time, then /proc/<pid>/task/<tid>), marks the slot DEAD, lets the
 * aggregator drain what was published, and frees it after a cool-off so
 * that a stale reader never confuses the old producer with a new one.
 */
#include "config.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"
#include "proc.h"
#include "producer.h"

struct producer_full {
	struct tally_producer pub; /* first: the handle the caller holds */
	struct tally_segment *seg;
	struct tally__slot *slot;
	uint32_t idx;
	uint64_t base_tail, base_dropped, base_clamped;
	uint64_t dropped, clamped; /* cumulative values of the slot, ours to store */
};

static struct producer_full *full_of(struct tally_producer *p)
{
	return (struct producer_full *)p;
}

static void set_state(struct tally__slot *s, uint32_t state, uint64_t now)
{
	atomic_store_explicit(&s->ctl.since_ns, now, memory_order_relaxed);
	atomic_store_explicit(&s->ctl.state, state, memory_order_release);
}

static bool try_claim(struct tally__slot *s)
{
	uint32_t expect = TALLY__SLOT_FREE;

	return atomic_compare_exchange_strong_explicit(&s->ctl.state, &expect, TALLY__SLOT_CLAIMING,
						       memory_order_acquire, memory_order_relaxed);
}

static bool fill_claim(struct producer_full *f, struct tally__slot *s, uint32_t idx)
{
	pid_t pid = getpid();
	uint64_t now = tally__mono_ns();

	/* since first: the reaper leaves a CLAIMING slot alone for a cool-off
	 * counted from here. */
	atomic_store_explicit(&s->ctl.since_ns, now, memory_order_relaxed);
	atomic_store_explicit(&s->ctl.pid, pid, memory_order_relaxed);
	atomic_store_explicit(&s->ctl.tid, (int32_t)syscall(SYS_gettid), memory_order_relaxed);
	atomic_store_explicit(&s->ctl.start_time, tally__proc_start_time(pid), memory_order_relaxed);
	atomic_store_explicit(&s->ctl.heartbeat_ns, now, memory_order_relaxed);
	atomic_fetch_add_explicit(&s->ctl.claims, 1, memory_order_relaxed);
	f->slot = s;
	f->idx = idx;
	/* A FREE slot is drained: head == tail, and we continue from there. */
	f->base_tail = atomic_load_explicit(&s->tail, memory_order_relaxed);
	f->dropped = f->base_dropped = atomic_load_explicit(&s->dropped, memory_order_relaxed);
	f->clamped = f->base_clamped = atomic_load_explicit(&s->clamped, memory_order_relaxed);
	atomic_store_explicit(&s->ctl.base, f->base_tail, memory_order_relaxed);
	f->pub.ring = s->ring;
	f->pub.capacity = f->seg->ring_cap;
	f->pub.mask = f->seg->ring_cap - 1;
	f->pub.tail = f->base_tail;
	f->pub.cached_head = atomic_load_explicit(&s->head, memory_order_acquire);
	f->pub.shm_tail = (uint64_t *)&s->tail;
	f->pub.shm_head = (const uint64_t *)&s->head;
	f->pub.max_value_ns = f->seg->max_value_ns;
	/* A CAS, not a store: if we stalled here longer than the cool-off, the
	 * reaper may have taken the slot back (CLAIMING -> COOLING); then it
	 * is not ours, and we look for another. */
	uint32_t expect = TALLY__SLOT_CLAIMING;
	if (!atomic_compare_exchange_strong_explicit(&s->ctl.state, &expect, TALLY__SLOT_ACTIVE,
						     memory_order_release, memory_order_relaxed))
		return false;
	atomic_store_explicit(&s->ctl.since_ns, now, memory_order_relaxed);
	return true;
}

TALLY_API int tally_producer_attach(struct tally_segment *seg, struct tally_producer **out)
{
	struct producer_full *f;

	tally__clear_errmsg();
	*out = NULL;
	if (seg->read_only)
		return tally__fail(-EROFS, "segment \"%s\" is open read-only: open it with "
				   "TALLY_OPEN_PRODUCER to record", seg->name);
	if (tally_segment_owner_alive(seg) != 1)
		return tally__fail(TALLY_EOWNERDEAD, "segment \"%s\": its owner (pid %d) is not running, "
				   "so nothing would drain the ring", seg->name, (int)seg->owner_pid);
	if (!(f = calloc(1, sizeof(*f))))
		return -ENOMEM;
	f->seg = seg;
	/* Start the search at a spot that depends on the thread, so threads
	 * attaching together do not all race for slot 0. */
	uint32_t start = (uint32_t)syscall(SYS_gettid) % seg->nslots;
	for (uint32_t n = 0; n < seg->nslots; n++) {
		uint32_t i = (start + n) % seg->nslots;
		struct tally__slot *s = tally__seg_slot(seg, i);
		if (try_claim(s) && fill_claim(f, s, i)) {
			*out = &f->pub;
			return 0;
		}
	}
	free(f);
	return tally__fail(TALLY_EFULL, "all %u producer slots of segment \"%s\" are taken: raise "
			   "producer_slots, or detach idle threads", seg->nslots, seg->name);
}

TALLY_API void tally_producer_detach(struct tally_producer **pp)
{
	struct producer_full *f = pp && *pp ? full_of(*pp) : NULL;

	if (!f)
		return;
	set_state(f->slot, TALLY__SLOT_RELEASING, tally__mono_ns());
	memset(f, 0, sizeof(*f));
	free(f);
	*pp = NULL;
}

TALLY_API void tally_producer_heartbeat(struct tally_producer *p)
{
	atomic_store_explicit(&full_of(p)->slot->ctl.heartbeat_ns, tally__mono_ns(),
			      memory_order_relaxed);
}

TALLY_API void tally_producer_counters(const struct tally_producer *p,
				       struct tally_producer_counters *out)
{
	const struct producer_full *f = (const struct producer_full *)p;

	out->recorded = p->tail - f->base_tail;
	out->dropped = f->dropped - f->base_dropped;
	out->clamped = f->clamped - f->base_clamped;
	out->slot = f->idx;
}

TALLY_API bool tally__record_full(struct tally_producer *p, tally_subject_t subject, uint64_t ns)
{
	struct producer_full *f = full_of(p);

	/* Acquire: pairs with the aggregator's release of head, so the entries
	 * it has consumed are no longer being read when we overwrite them. */
	p->cached_head = __atomic_load_n(p->shm_head, __ATOMIC_ACQUIRE);
	if (p->tail - p->cached_head < p->capacity)
		return tally_record(p, subject, ns);
	/* Single writer: a plain store of our own count, no atomic add. */
	atomic_store_explicit(&f->slot->dropped, ++f->dropped, memory_order_relaxed);
	return false;
}

TALLY_API uint64_t tally__record_clamp(struct tally_producer *p, uint64_t ns)
{
	struct producer_full *f = full_of(p);

	(void)ns;
	atomic_store_explicit(&f->slot->clamped, ++f->clamped, memory_order_relaxed);
	return p->max_value_ns;
}

/* ---- the owner's reaper ------------------------------------------------- */

static bool producer_gone(struct tally__slot *s)
{
	pid_t pid = atomic_load_explicit(&s->ctl.pid, memory_order_relaxed);
	pid_t tid = atomic_load_explicit(&s->ctl.tid, memory_order_relaxed);
	uint64_t st = atomic_load_explicit(&s->ctl.start_time, memory_order_relaxed);

	return !tally__proc_alive(pid, st) || !tally__thread_alive(pid, tid);
}

/* Reaper transitions are CASes from the state it saw: a producer that
 * changes the state meanwhile (detach, a new claim) wins. */
static bool move(struct tally__slot *s, uint32_t from, uint32_t to, uint64_t now)
{
	if (!atomic_compare_exchange_strong_explicit(&s->ctl.state, &from, to, memory_order_acq_rel,
						     memory_order_relaxed))
		return false;
	atomic_store_explicit(&s->ctl.since_ns, now, memory_order_relaxed);
	return true;
}

/* A claimer writes its pid first, then its tid and start time: judge a
 * CLAIMING slot by the pid alone (a process that no longer exists). */
static bool claimer_gone(struct tally__slot *s)
{
	pid_t pid = atomic_load_explicit(&s->ctl.pid, memory_order_relaxed);

	return pid <= 0 || (kill(pid, 0) != 0 && errno == ESRCH);
}

static bool drained(struct tally__slot *s)
{
	return atomic_load_explicit(&s->head, memory_order_relaxed) ==
	       atomic_load_explicit(&s->tail, memory_order_acquire);
}

void tally__slots_reap(struct tally_segment *seg, uint64_t now, struct tally__reap_stats *st)
{
	uint64_t cooloff = (uint64_t)seg->cooloff_ms * 1000000u;

	memset(st, 0, sizeof(*st));
	for (uint32_t i = 0; i < seg->nslots; i++) {
		struct tally__slot *s = tally__seg_slot(seg, i);
		uint32_t state = atomic_load_explicit(&s->ctl.state, memory_order_acquire);
		uint64_t since = atomic_load_explicit(&s->ctl.since_ns, memory_order_relaxed);

		if (state != TALLY__SLOT_CLAIMING &&
		    atomic_load_explicit(&s->ctl.reaper_seen_ns, memory_order_relaxed))
			atomic_store_explicit(&s->ctl.reaper_seen_ns, 0, memory_order_relaxed);

		switch (state) {
		case TALLY__SLOT_ACTIVE:
			st->died += producer_gone(s) && move(s, state, TALLY__SLOT_DEAD, now);
			break;
		case TALLY__SLOT_RELEASING:
			st->released += drained(s) && move(s, state, TALLY__SLOT_FREE, now);
			break;
		case TALLY__SLOT_DEAD:
			if (drained(s))
				move(s, state, TALLY__SLOT_COOLING, now);
			break;
		case TALLY__SLOT_COOLING:
			st->reused += now - since >= cooloff && move(s, state, TALLY__SLOT_FREE, now);
			break;
		case TALLY__SLOT_CLAIMING:
			/* A claimer killed between its CAS and ACTIVE. since_ns
			 * cannot tell (the claimer writes it after its CAS), so
			 * the reaper times the state itself: a claim takes
			 * microseconds, one still pending a cool-off after the
			 * reaper first saw it is dead. */
			if (!atomic_load_explicit(&s->ctl.reaper_seen_ns, memory_order_relaxed))
				atomic_store_explicit(&s->ctl.reaper_seen_ns, now, memory_order_relaxed);
			else if (now - atomic_load_explicit(&s->ctl.reaper_seen_ns, memory_order_relaxed) >= cooloff &&
				 claimer_gone(s) && move(s, state, TALLY__SLOT_COOLING, now))
				atomic_store_explicit(&s->ctl.reaper_seen_ns, 0, memory_order_relaxed);
			continue;
		default:
			/* No producer leaves a state outside the enum: a scribbled
			 * slot. Taken back like a dead producer's, after the cool-off. */
			if (state > TALLY__SLOT_COOLING)
				move(s, state, TALLY__SLOT_COOLING, now);
			break;
		}
	}
}
