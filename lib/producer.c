/* SPDX-License-Identifier: MIT */
/*
 * producer.c: claiming and releasing producer slots by lease, the slow
 * paths of tally_record(), thread-local handles, and the owner's reaper.
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
 * Leases. A slot is owned by a claim, not by a thread. The slot's lease
 * word holds (generation << 8 | state); a claim increments the
 * generation, and the handle keeps the lease it was granted (ACTIVE,
 * gen). Every slow path of the handle (full ring, clamp, heartbeat,
 * detach) first checks that the slot still holds exactly that lease, and
 * every change of state, by either side, is a CAS from an expected
 * (state, generation). A handle whose claim has ended (its slot was taken
 * back, the process forked, the segment was closed) is revoked: from then
 * on every record goes to the slow path, stores nothing and is counted as
 * lost, and heartbeat returns TALLY_EREVOKED. It never writes into a slot
 * that another claim holds.
 *
 * Liveness is judged per process (pid + start time), never per thread: a
 * handle may move between threads, and the thread that attached may exit
 * while another records. A live process keeps its slots until it detaches
 * them; a thread that wants its slot back when it exits uses
 * tally_producer_local(), whose handles a pthread key destructor detaches.
 *
 * Slot state machine (lease = (gen, state); "owner" is the segment
 * owner's reaper, tally__slots_reap, a single thread):
 *
 *   FREE(g)      -> CLAIMING(g+1)  producer, CAS. The generation is new,
 *                                   so no older handle matches the slot.
 *   CLAIMING(g)  -> ACTIVE(g)      producer, CAS, after installing its
 *                                   identity (ident = g:pid, birth =
 *                                   start time:g, each a CAS from the
 *                                   g:nothing the owner left) and storing
 *                                   base and heartbeat. The release of the
 *                                   CAS publishes them. A claimer whose
 *                                   identity CAS fails (its claim was taken
 *                                   back while it stalled) writes nothing
 *                                   more: no late store can give a later
 *                                   claim a stranger's identity.
 *   CLAIMING(g)  -> COOLING(g)     owner, CAS, when the claim is still
 *                                   pending TALLY__CLAIM_TIMEOUT_MS after the
 *                                   owner first saw it (the claimer was
 *                                   killed, or stalled: a stalled claimer's
 *                                   CAS to ACTIVE fails and it tries another
 *                                   slot), or a cool-off after its pid is
 *                                   known to be gone. The owner times this
 *                                   in its own memory, never from shm.
 *   ACTIVE(g)    -> RELEASING(g)   producer (detach), CAS. Fails if the
 *                                   slot was taken back: then it is left
 *                                   alone.
 *   ACTIVE(g)    -> DEAD(g)        owner, CAS, when the claimer's process
 *                                   (pid + start time, believed only with
 *                                   both tags = g) no longer exists. A dead
 *                                   process cannot write, so nothing still
 *                                   writes the ring. A process whose main
 *                                   thread exited (pthread_exit) but whose
 *                                   other threads run is alive.
 *   RELEASING(g) -> FREE(g)        owner, CAS, once the ring is drained.
 *   DEAD(g)      -> COOLING(g)     owner, CAS, once the ring is drained.
 *   COOLING(g)   -> FREE(g)        owner, CAS, after the cool-off, so that a
 *                                   reader that saw the old claim does not
 *                                   confuse it with the next.
 *   anything else (a state that is not in the enum: the slot was
 *   scribbled on) is timed like CLAIMING and taken to COOLING.
 *
 * Before it moves a slot to FREE(g) the owner stores ident = (g+1):0 and
 * birth = 0:(g+1), what the next claim expects, so a CLAIMING slot holds
 * either no pid or its own claimer's, never the previous owner's. Bounds: a slot whose claimer is killed mid-claim is FREE again
 * within TALLY__CLAIM_TIMEOUT_MS + cool-off + 2 reap intervals; one whose
 * process dies while ACTIVE within a reap interval + the drain + cool-off.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"
#include "failpoint.h"
#include "follow.h"
#include "jsack.h"
#include "proc.h"
#include "producer.h"

/* Why a handle was revoked (0: it was not). */
enum revoke_reason {
	REVOKE_NONE = 0,
	REVOKE_LEASE,  /* the slot no longer holds our lease */
	REVOKE_FORK,   /* this process is a fork child of the one that claimed */
	REVOKE_CLOSED, /* the segment was closed under the handle */
};

struct producer_full {
	struct tally__producer_head head; /* first, on a cache line of its own start: the handle
					   * (head.pub), then tally_record_jetstream's last consumer key */
	struct tally_segment *seg;    /* the origin: the segment the caller attached to */
	struct tally_segment *target; /* the segment the slot is in: seg, or a successor */
	struct tally__remap *remap;   /* seg's ids -> target's; NULL while target == seg */
	struct tally__slot *slot;
	uint32_t idx;
	uint64_t lease; /* (gen, ACTIVE) granted to this claim */
	uint64_t base_tail, base_dropped, base_clamped;
	uint64_t dropped, clamped; /* cumulative values of the slot, ours to store */
	uint64_t carried_recorded, carried_dropped, carried_clamped; /* of slots left behind */
	uint64_t lost;             /* records refused: revoked, or no live owner */
	uint64_t moves;            /* owner restarts followed */
	uint64_t next_check_ns;    /* orphaned: ask again for an owner no sooner than this */
	uint32_t full_since_check; /* full-ring records since the owner was last asked about */
	bool orphaned;             /* no live owner found at the last check: records are lost */
	pid_t pid;                 /* the claimer: a fork child's copy of the handle is not it */
	_Atomic bool poked;        /* the watcher saw the owner gone */
	enum revoke_reason revoked;
	bool local;                /* a thread-local handle (tally_producer_local) */
	struct producer_full *prev, *next; /* the process's registry of handles */
};

static struct producer_full *full_of(struct tally_producer *p)
{
	return (struct producer_full *)p;
}

_Static_assert(offsetof(struct tally_producer, shm_head) == 64,
	       "the record path's fields fill the handle's first cache line");
_Static_assert(offsetof(struct producer_full, head) == 0,
	       "a handle starts with struct tally__producer_head (lib/jsack.c reads it)");

/* Zeroed, 64-byte aligned: what tally_record() reads is one cache line. */
static struct producer_full *handle_alloc(void)
{
	struct producer_full *f = aligned_alloc(64, (sizeof(*f) + 63) / 64 * 64);

	if (f)
		memset(f, 0, sizeof(*f));
	return f;
}

static bool lease_held(struct producer_full *f);
static void release_slot_locked(struct producer_full *f);

/* ---- the process's registry of handles --------------------------------------- */

/* Every live handle of this process, so that a fork child and a closed
 * segment can revoke them. Taken only on attach, detach, fork and close. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct producer_full *registry;
static pthread_once_t registry_once = PTHREAD_ONCE_INIT;
static pthread_key_t local_key;

static void revoke_handle(struct producer_full *f, enum revoke_reason why)
{
	if (f->revoked)
		return;
	f->revoked = why;
	/* capacity 0: every tally_record() now takes the slow path, where it
	 * sees the revocation; nothing reaches the ring again. */
	__atomic_store_n(&f->head.pub.capacity, 0, __ATOMIC_RELAXED);
}

void tally__producers_poke(struct tally_segment *origin)
{
	pthread_mutex_lock(&registry_lock);
	for (struct producer_full *f = registry; f; f = f->next)
		if (f->seg == origin) {
			/* capacity first, then the flag, both seq_cst: a handle
			 * restoring its capacity looks at the flag after its store
			 * (owner_check), so one of the two sees the other */
			__atomic_store_n(&f->head.pub.capacity, 0, __ATOMIC_SEQ_CST);
			atomic_store_explicit(&f->poked, true, memory_order_seq_cst);
		}
	pthread_mutex_unlock(&registry_lock);
}

static void atfork_prepare(void)
{
	pthread_mutex_lock(&registry_lock);
}

static void atfork_parent(void)
{
	pthread_mutex_unlock(&registry_lock);
}

/* The child has copies of the parent's handles pointing at the parent's
 * rings: recording through them would make two producers of one ring. */
static void atfork_child(void)
{
	for (struct producer_full *f = registry; f; f = f->next)
		revoke_handle(f, REVOKE_FORK);
	pthread_mutex_unlock(&registry_lock);
}

static void local_destroy(void *list);

static void registry_init(void)
{
	if (pthread_atfork(atfork_prepare, atfork_parent, atfork_child) != 0 ||
	    pthread_key_create(&local_key, local_destroy) != 0)
		tally__die(__FILE__, __LINE__, "cannot register the fork handler or thread key");
}

static void registry_add(struct producer_full *f)
{
	pthread_once(&registry_once, registry_init);
	pthread_mutex_lock(&registry_lock);
	f->prev = NULL;
	f->next = registry;
	if (registry)
		registry->prev = f;
	registry = f;
	pthread_mutex_unlock(&registry_lock);
}

static void registry_unlink_locked(struct producer_full *f)
{
	if (f->prev)
		f->prev->next = f->next;
	else
		registry = f->next;
	if (f->next)
		f->next->prev = f->prev;
}

uint32_t tally__producers_revoke_segment(struct tally_segment *seg)
{
	uint32_t n = 0;

	pthread_mutex_lock(&registry_lock);
	for (struct producer_full *f = registry; f; f = f->next)
		if (f->seg == seg) {
			release_slot_locked(f); /* the slot goes back; the handle stays the caller's */
			revoke_handle(f, REVOKE_CLOSED);
			f->seg = NULL;
			n++;
		}
	pthread_mutex_unlock(&registry_lock);
	return n;
}

/* ---- claiming --------------------------------------------------------------- */

static bool lease_cas(struct tally__slot *s, uint64_t from, uint64_t to)
{
	return atomic_compare_exchange_strong_explicit(&s->ctl.lease, &from, to, memory_order_acq_rel,
						       memory_order_relaxed);
}

/* FREE(g) -> CLAIMING(g+1). Returns the new lease, or 0. */
static uint64_t try_claim(struct tally__slot *s)
{
	uint64_t l = atomic_load_explicit(&s->ctl.lease, memory_order_acquire);

	if (tally__lease_state(l) != TALLY__SLOT_FREE)
		return 0;
	uint64_t next = tally__lease(tally__lease_gen(l) + 1, TALLY__SLOT_CLAIMING);
	return lease_cas(s, l, next) ? next : 0;
}

static void fill_handle(struct producer_full *f, struct tally__slot *s, uint32_t idx)
{
	struct tally_segment *t = f->target;

	f->slot = s;
	f->idx = idx;
	/* A FREE slot is drained: head == tail, and we continue from there.
	 * Its counters belong to the claim: they start at 0 (the owner added
	 * the last claim's to its totals before it freed the slot). */
	f->base_tail = atomic_load_explicit(&s->tail, memory_order_relaxed);
	atomic_store_explicit(&s->dropped, 0, memory_order_relaxed);
	atomic_store_explicit(&s->clamped, 0, memory_order_relaxed);
	f->dropped = f->base_dropped = 0;
	f->clamped = f->base_clamped = 0;
	f->head.pub.ring = s->ring;
	__atomic_store_n(&f->head.pub.capacity, t->ring_cap, __ATOMIC_RELAXED);
	f->head.pub.mask = t->ring_cap - 1;
	f->head.pub.tail = f->base_tail;
	f->head.pub.cached_head = atomic_load_explicit(&s->head, memory_order_acquire);
	f->head.pub.shm_tail = (uint64_t *)&s->tail;
	f->head.pub.shm_head = (const uint64_t *)&s->head;
	f->head.pub.max_value_ns = t->max_value_ns;
}

/* CLAIMING(g): fill in the claim and publish ACTIVE(g). false if the
 * owner took the claim back meanwhile (we stalled past the claim
 * timeout): then the slot is not ours and we look for another. */
static bool activate(struct producer_full *f, struct tally__slot *s, uint32_t idx, uint64_t claiming)
{
	pid_t pid = getpid();
	uint64_t now = tally__mono_ns(), gen = tally__lease_gen(claiming);
	uint64_t ident = tally__ident(gen, 0), birth = tally__birth(gen, 0);

	TALLY__FAILPOINT("claim.claimed");
	/* Identity first, each word by a CAS from what the owner left for
	 * this generation: if we stalled and the claim was taken back (and
	 * maybe given to another), the CAS fails and we write nothing more. */
	if (!atomic_compare_exchange_strong_explicit(&s->ctl.ident, &ident, tally__ident(gen, pid),
						     memory_order_relaxed, memory_order_relaxed) ||
	    !atomic_compare_exchange_strong_explicit(&s->ctl.birth, &birth,
						     tally__birth(gen, tally__proc_start_time(pid)),
						     memory_order_relaxed, memory_order_relaxed))
		return false;
	/* diagnostics: a stalled claimer may still store these late */
	atomic_store_explicit(&s->ctl.tid, (int32_t)syscall(SYS_gettid), memory_order_relaxed);
	atomic_store_explicit(&s->ctl.heartbeat_ns, now, memory_order_relaxed);
	atomic_store_explicit(&s->ctl.since_ns, now, memory_order_relaxed);
	atomic_fetch_add_explicit(&s->ctl.claims, 1, memory_order_relaxed);
	fill_handle(f, s, idx);
	atomic_store_explicit(&s->ctl.base, f->base_tail, memory_order_relaxed);
	atomic_store_explicit(&s->ctl.lost, f->lost, memory_order_relaxed);
	atomic_store_explicit(&s->ctl.moves, f->moves, memory_order_relaxed);
	TALLY__FAILPOINT("claim.filled");
	f->lease = tally__lease(gen, TALLY__SLOT_ACTIVE);
	f->pid = pid;
	/* Release (in the acq_rel CAS): identity and base are visible to the
	 * reaper that sees ACTIVE. */
	return lease_cas(s, claiming, f->lease);
}

/* Claim a slot of f->target for f. 0 or TALLY_EFULL. */
static int claim_slot(struct producer_full *f)
{
	struct tally_segment *t = f->target;
	/* Start the search at a spot that depends on the thread, so threads
	 * attaching together do not all race for slot 0. */
	uint32_t start = (uint32_t)syscall(SYS_gettid) % t->nslots;

	for (uint32_t n = 0; n < t->nslots; n++) {
		uint32_t i = (start + n) % t->nslots;
		struct tally__slot *s = tally__seg_slot(t, i);
		uint64_t claiming = try_claim(s);
		if (claiming && activate(f, s, i, claiming))
			return 0;
	}
	return TALLY_EFULL;
}

static int attach(struct tally_segment *seg, bool local, struct tally_producer **out)
{
	struct producer_full *f;

	tally__clear_errmsg();
	*out = NULL;
	if (seg->read_only)
		return tally__fail(-EROFS, "segment \"%s\" is open read-only: open it with "
				   "TALLY_OPEN_PRODUCER to record", seg->name);
	if (tally_segment_owner_alive(seg) != 1)
		return tally__fail(TALLY_EOWNERDEAD, "segment \"%s\": its owner (pid %d) is not running, "
				   "so nothing would drain the ring; open the segment again once its "
				   "owner (tallyd -s %s) runs", seg->name, (int)seg->owner_pid, seg->name);
	if (!(f = handle_alloc()))
		return -ENOMEM;
	f->seg = f->target = seg;
	f->local = local;
	if (claim_slot(f) != 0) {
		free(f);
		/* Say whether waiting helps: a released slot is free again only
		 * after the owner's reaper has seen it and its cool-off passed. */
		uint32_t returning = 0;
		for (uint32_t i = 0; i < seg->nslots; i++) {
			uint32_t st = tally__lease_state(atomic_load_explicit(&tally__seg_slot(seg, i)->ctl.lease,
									       memory_order_relaxed));
			returning += st == TALLY__SLOT_RELEASING || st == TALLY__SLOT_DEAD ||
				     st == TALLY__SLOT_COOLING;
		}
		if (returning)
			return tally__fail(TALLY_EFULL, "all %u producer slots of segment \"%s\" are taken, %u "
					   "of them released and returning (free again after the owner's "
					   "cool-off of %u ms): retry then, or raise producer_slots",
					   seg->nslots, seg->name, returning, seg->cooloff_ms);
		return tally__fail(TALLY_EFULL, "all %u producer slots of segment \"%s\" are taken by "
				   "attached producers: raise producer_slots, or detach idle threads",
				   seg->nslots, seg->name);
	}
	registry_add(f);
	if (seg->follow)
		tally__follow_watch(seg);
	*out = &f->head.pub;
	return 0;
}

TALLY_API int tally_producer_attach(struct tally_segment *seg, struct tally_producer **out)
{
	return attach(seg, false, out);
}

/* Is the slot still ours? Revokes the handle if not. */
static bool lease_held(struct producer_full *f)
{
	if (f->revoked)
		return false;
	if (atomic_load_explicit(&f->slot->ctl.lease, memory_order_acquire) == f->lease)
		return true;
	revoke_handle(f, REVOKE_LEASE);
	return false;
}

/* A fork the atfork handler did not see (raw clone, _Fork): a getpid()
 * (a system call), so only on the rare paths: heartbeat, status, detach. */
static bool same_process(struct producer_full *f)
{
	if (f->revoked || f->pid == getpid())
		return !f->revoked;
	revoke_handle(f, REVOKE_FORK);
	return false;
}

/* ACTIVE(g) -> RELEASING(g) only while the claim is ours: a handle whose
 * slot was taken back leaves the next claim alone. Registry lock held, so
 * a segment close cannot unmap the slot under us. */
static void release_slot_locked(struct producer_full *f)
{
	if (!same_process(f) || !lease_held(f))
		return;
	atomic_store_explicit(&f->slot->ctl.since_ns, tally__mono_ns(), memory_order_relaxed);
	TALLY__FAILPOINT("detach.before");
	lease_cas(f->slot, f->lease, tally__lease(tally__lease_gen(f->lease), TALLY__SLOT_RELEASING));
}

static void release(struct producer_full *f)
{
	pthread_mutex_lock(&registry_lock);
	release_slot_locked(f);
	registry_unlink_locked(f);
	pthread_mutex_unlock(&registry_lock);
	memset(f, 0, sizeof(*f));
	free(f);
}

TALLY_API void tally_producer_detach(struct tally_producer **pp)
{
	struct producer_full *f = pp && *pp ? full_of(*pp) : NULL;

	if (!f)
		return;
	/* A thread-local handle is its thread's until that thread exits;
	 * detaching one only forgets the caller's pointer. */
	if (!f->local)
		release(f);
	*pp = NULL;
}

/* ---- following a new owner (follow.c) ------------------------------------------ */

/* Leave the current slot for one in the segment that now has the name:
 * what the dead owner left in the old ring is lost, and counted. The new
 * slot is claimed through a scratch handle first, so that a new segment
 * with every slot taken leaves this handle as it was (it tries again). */
static bool move_to_current(struct producer_full *f)
{
	struct tally_segment *to;
	struct tally__remap *m;
	struct producer_full *n;

	if (!f->seg->follow || tally__follow_current(f->seg, &to, &m) != 0)
		return false;
	if (to == f->target)
		return true;
	uint64_t head = atomic_load_explicit(&f->slot->head, memory_order_acquire);
	uint64_t left = f->head.pub.tail - head <= f->target->ring_cap ? f->head.pub.tail - head : 0;
	if (!(n = handle_alloc()))
		return false;
	n->seg = f->seg;
	n->target = to;
	n->lost = f->lost + left;
	n->moves = f->moves + 1;
	if (claim_slot(n) != 0) {
		free(n);
		return false;
	}
	struct tally_producer_counters c;
	tally_producer_counters(&f->head.pub, &c);
	lease_cas(f->slot, f->lease, tally__lease(tally__lease_gen(f->lease), TALLY__SLOT_RELEASING));
	f->carried_recorded = c.recorded;
	f->carried_dropped = c.dropped;
	f->carried_clamped = c.clamped;
	f->target = to;
	f->remap = m;
	f->slot = n->slot;
	f->idx = n->idx;
	f->lease = n->lease;
	f->base_tail = n->base_tail;
	f->base_dropped = n->base_dropped;
	f->base_clamped = n->base_clamped;
	f->dropped = n->dropped;
	f->clamped = n->clamped;
	f->lost = n->lost;
	f->moves = n->moves;
	f->head.pub.ring = n->head.pub.ring;
	f->head.pub.mask = n->head.pub.mask;
	f->head.pub.tail = n->head.pub.tail;
	f->head.pub.cached_head = n->head.pub.cached_head;
	f->head.pub.shm_tail = n->head.pub.shm_tail;
	f->head.pub.shm_head = n->head.pub.shm_head;
	f->head.pub.max_value_ns = n->head.pub.max_value_ns;
	f->head.pub.remap = m;
	__atomic_store_n(&f->head.pub.capacity, to->ring_cap, __ATOMIC_RELAXED);
	free(n);
	return true;
}

/* Does the handle's segment still have a live owner? If not, move to the
 * one that has the name now. false: no live owner for now (the record is
 * lost). Restores capacity after a poke. */
static bool owner_check(struct producer_full *f, uint64_t now)
{
	f->next_check_ns = now + (uint64_t)TALLY__FOLLOW_RETRY_MS * 1000000u;
	atomic_store_explicit(&f->poked, false, memory_order_seq_cst);
	/* capacity stays 0 while orphaned: every record comes here */
	f->orphaned = tally_segment_owner_alive(f->target) != 1 && !move_to_current(f);
	if (f->orphaned)
		return false;
	if (!f->revoked) {
		__atomic_store_n(&f->head.pub.capacity, f->target->ring_cap, __ATOMIC_SEQ_CST);
		if (atomic_load_explicit(&f->poked, memory_order_seq_cst)) /* poked meanwhile */
			__atomic_store_n(&f->head.pub.capacity, 0, __ATOMIC_SEQ_CST);
	}
	return true;
}

TALLY_API int tally_producer_heartbeat(struct tally_producer *p)
{
	struct producer_full *f = full_of(p);

	if (!same_process(f))
		return TALLY_EREVOKED;
	if (!owner_check(f, tally__mono_ns()))
		return TALLY_EOWNERDEAD;
	if (!lease_held(f))
		return TALLY_EREVOKED;
	atomic_store_explicit(&f->slot->ctl.heartbeat_ns, tally__mono_ns(), memory_order_relaxed);
	return 0;
}

TALLY_API int tally_producer_status(const struct tally_producer *p)
{
	struct producer_full *f = full_of((struct tally_producer *)p);

	return same_process(f) && lease_held(f) ? 0 : TALLY_EREVOKED;
}

TALLY_API void tally_producer_counters(const struct tally_producer *p,
				       struct tally_producer_counters *out)
{
	const struct producer_full *f = (const struct producer_full *)p;

	out->recorded = f->carried_recorded + (p->tail - f->base_tail);
	out->dropped = f->carried_dropped + (f->dropped - f->base_dropped);
	out->clamped = f->carried_clamped + (f->clamped - f->base_clamped);
	out->lost = f->lost;
	out->moves = f->moves;
	out->slot = f->idx;
	out->revoked = f->revoked != REVOKE_NONE;
}

/* The rare reasons to be here: revoked, poked by the watcher, orphaned
 * (capacity is 0 in all three). false: the record is lost (counted). */
static bool record_unusual(struct producer_full *f)
{
	if (f->revoked)
		return false;
	bool poked = atomic_load_explicit(&f->poked, memory_order_relaxed) ||
		     __atomic_load_n(&f->head.pub.capacity, __ATOMIC_RELAXED) == 0;
	uint64_t now = tally__mono_ns();
	/* orphaned: ask again once the retry period is over; poked, or a
	 * capacity left at 0 by a poke we raced: ask now */
	if (f->orphaned && !poked && now < f->next_check_ns)
		return false;
	return owner_check(f, now) && lease_held(f);
}

static bool record_tagged_raw(struct tally_producer *p, tally_subject_t subject, uint64_t v, uint32_t tag);

/* Store again once the slow path made room: a latency goes through the
 * inline path (clamped there), a tagged entry through its own. */
static bool record_again(struct tally_producer *p, tally_subject_t subject, uint64_t v, uint32_t tag)
{
	return tag ? record_tagged_raw(p, subject, v, tag) : tally__record_raw(p, subject, v);
}

/* The ring looked full, or capacity is 0 (see record_unusual). */
static bool full_path(struct tally_producer *p, tally_subject_t subject, uint64_t ns, uint32_t tag)
{
	struct producer_full *f = full_of(p);
	struct tally_segment *before = f->target;
	uint64_t cap = __atomic_load_n(&p->capacity, __ATOMIC_RELAXED);

	if (TALLY__UNLIKELY(cap == 0)) {
		if (!record_unusual(f)) {
			f->lost++;
			return false;
		}
		if (f->target != before) { /* moved: subject is an id of the segment we left */
			uint32_t id = before == f->seg ? tally__remap_id(f->remap, subject) : UINT32_MAX;
			if (id == UINT32_MAX) {
				f->lost++;
				return false;
			}
			subject = id;
		}
		return record_again(p, subject, ns, tag);
	}
	/* The ring looks full. Acquire: pairs with the aggregator's release
	 * of head, so the entries it has consumed are no longer being read
	 * when we overwrite them. */
	p->cached_head = __atomic_load_n(p->shm_head, __ATOMIC_ACQUIRE);
	if (TALLY__UNLIKELY(!lease_held(f))) {
		f->lost++;
		return false;
	}
	if (p->tail - p->cached_head < cap)
		return record_again(p, subject, ns, tag);
	/* Full: is anyone draining it? The watcher thread tells within its
	 * period; without it (it could not start), ask ourselves every 4096
	 * full-ring records: a drop stays a few loads and one store. */
	if (TALLY__UNLIKELY(++f->full_since_check >= 4096)) {
		f->full_since_check = 0;
		atomic_store_explicit(&f->poked, true, memory_order_relaxed);
		__atomic_store_n(&p->capacity, 0, __ATOMIC_RELAXED); /* the next record asks */
	}
	/* Single writer: a plain store of our own count, no atomic add. */
	atomic_store_explicit(&f->slot->dropped, ++f->dropped, memory_order_relaxed);
	return false;
}

TALLY_API bool tally__record_full(struct tally_producer *p, tally_subject_t subject, uint64_t ns)
{
	return full_path(p, subject, ns, 0);
}

static inline void entry_put(struct tally_ring_entry *e, tally_subject_t subject, uint64_t v, uint32_t tag)
{
	e->value_ns = v;
	e->subject = subject;
	e->reserved = tag;
}

/* tally__record_raw with a tag (shm_layout.h) and no clamp: the caller
 * clamps a wait; a pending count is no time. */
static bool record_tagged_raw(struct tally_producer *p, tally_subject_t subject, uint64_t v, uint32_t tag)
{
	uint64_t t = p->tail;

	if (TALLY__UNLIKELY(t - p->cached_head >= __atomic_load_n(&p->capacity, __ATOMIC_RELAXED)))
		return full_path(p, subject, v, tag);
	entry_put(&p->ring[t & p->mask], subject, v, tag);
	p->tail = t + 1;
	/* Release: as in tally__record_raw, the entry before the tail. */
	__atomic_store_n(p->shm_tail, t + 1, __ATOMIC_RELEASE);
	return true;
}

bool tally__record_tagged(struct tally_producer *p, tally_subject_t subject, uint64_t v, uint32_t tag)
{
	if (TALLY__UNLIKELY(p->remap != NULL)) { /* as tally__record_remapped */
		struct producer_full *f = full_of(p);
		uint32_t id = f->revoked ? UINT32_MAX : tally__remap_id(f->remap, subject);
		if (id == UINT32_MAX) {
			f->lost++;
			return false;
		}
		subject = id;
	}
	return record_tagged_raw(p, subject, v, tag);
}

bool tally__record_tagged2_slow(struct tally_producer *p, tally_subject_t subject, uint64_t v0, uint32_t tag0,
				uint64_t v1, uint32_t tag1)
{
	bool ok = tally__record_tagged(p, subject, v0, tag0); /* first, as on the fast path */

	return tally__record_tagged(p, subject, v1, tag1) && ok;
}

/* A wait above max_value_ns: stored at the maximum and counted clamped,
 * as a latency would be. */
bool tally__record_tagged_clamped(struct tally_producer *p, tally_subject_t subject, uint32_t tag)
{
	struct producer_full *f = full_of(p);

	if (!lease_held(f)) {
		f->lost++;
		return false;
	}
	atomic_store_explicit(&f->slot->clamped, ++f->clamped, memory_order_relaxed);
	return tally__record_tagged(p, subject, p->max_value_ns, tag);
}

TALLY_API bool tally__record_remapped(struct tally_producer *p, tally_subject_t subject, uint64_t ns)
{
	struct producer_full *f = full_of(p);

	if (TALLY__UNLIKELY(f->revoked)) { /* the segment closed: its remaps are gone */
		f->lost++;
		return false;
	}
	uint32_t id = tally__remap_id(f->remap, subject);
	if (id == UINT32_MAX) { /* the name cannot be interned there now */
		f->lost++;
		return false;
	}
	return tally__record_raw(p, id, ns);
}

TALLY_API bool tally__record_clamped(struct tally_producer *p, tally_subject_t subject, uint64_t ns)
{
	struct producer_full *f = full_of(p);

	(void)ns;
	if (!lease_held(f)) { /* revoked: nothing reaches the ring */
		f->lost++;
		return false;
	}
	atomic_store_explicit(&f->slot->clamped, ++f->clamped, memory_order_relaxed);
	return tally__record_raw(p, subject, p->max_value_ns); /* at the maximum: no recursion */
}

/* ---- thread-local handles ------------------------------------------------------ */

/* The calling thread's handles, one per segment it records into. Looked
 * up by segment handle and generation, so a segment closed and reopened at
 * the same address is not mistaken for the old one. */
struct local_entry {
	struct tally_segment *seg;
	uint64_t generation;
	struct producer_full *f;
};

struct local_list {
	uint32_t n, cap;
	struct local_entry e[];
};

static __thread struct local_list *local_list;

static void local_destroy(void *arg)
{
	struct local_list *l = arg;

	for (uint32_t i = 0; i < l->n; i++)
		if (l->e[i].f)
			release(l->e[i].f);
	free(l);
	local_list = NULL;
}

static struct local_entry *local_find(struct tally_segment *seg)
{
	struct local_list *l = local_list;

	for (uint32_t i = 0; l && i < l->n; i++)
		if (l->e[i].seg == seg && l->e[i].generation == seg->generation && l->e[i].f &&
		    l->e[i].f->seg == seg && !l->e[i].f->revoked)
			return &l->e[i];
	return NULL;
}

static int local_add(struct tally_segment *seg, struct producer_full *f)
{
	struct local_list *l = local_list;

	/* reuse the entry of a handle whose segment was closed, or that was
	 * revoked (a fork child's copy, a lost lease) */
	for (uint32_t i = 0; l && i < l->n; i++)
		if (!l->e[i].f || l->e[i].f->seg != l->e[i].seg || l->e[i].f->revoked) {
			if (l->e[i].f)
				release(l->e[i].f);
			l->e[i] = (struct local_entry){ seg, seg->generation, f };
			return 0;
		}
	if (!l || l->n == l->cap) {
		uint32_t cap = l ? l->cap * 2 : 4;
		struct local_list *m = realloc(l, sizeof(*m) + cap * sizeof(m->e[0]));
		if (!m)
			return -ENOMEM;
		if (!l)
			m->n = 0;
		m->cap = cap;
		l = local_list = m;
		pthread_setspecific(local_key, l);
	}
	l->e[l->n++] = (struct local_entry){ seg, seg->generation, f };
	return 0;
}

TALLY_API int tally_producer_local(struct tally_segment *seg, struct tally_producer **out)
{
	struct local_entry *le = local_find(seg);
	struct tally_producer *p;
	int rc;

	if (TALLY__LIKELY(le != NULL)) {
		*out = &le->f->head.pub;
		return 0;
	}
	if ((rc = attach(seg, true, &p)) != 0)
		return rc;
	if ((rc = local_add(seg, full_of(p))) != 0) {
		release(full_of(p));
		return rc;
	}
	*out = p;
	return 0;
}

/* ---- the owner's reaper ------------------------------------------------- */

/* Reaper transitions are CASes from the lease it saw: a producer that
 * changes the lease meanwhile (detach, a new claim) wins. */
static bool move(struct tally__slot *s, uint64_t from, uint32_t to, uint64_t now)
{
	uint64_t gen = tally__lease_gen(from);

	/* Before FREE(g): the identity words the claim of g + 1 expects (see
	 * activate); a claimer of g or older finds its CAS failing. */
	if (to == TALLY__SLOT_FREE) {
		atomic_store_explicit(&s->ctl.ident, tally__ident(gen + 1, 0), memory_order_relaxed);
		atomic_store_explicit(&s->ctl.birth, tally__birth(gen + 1, 0), memory_order_relaxed);
	}
	atomic_store_explicit(&s->ctl.since_ns, now, memory_order_relaxed);
	return lease_cas(s, from, tally__lease(gen, to));
}

/* Is the process of the claim `lease` proved gone? Only an identity whose
 * tags are this claim's is believed: anything else (a scribbled word)
 * proves nothing, and the slot is left alone. */
static bool process_gone(struct tally__slot *s, uint64_t lease)
{
	uint64_t gen = tally__lease_gen(lease), st;
	int32_t pid;

	if (!tally__ident_of(atomic_load_explicit(&s->ctl.ident, memory_order_relaxed), gen, &pid) ||
	    !tally__birth_of(atomic_load_explicit(&s->ctl.birth, memory_order_relaxed), gen, &st))
		return false;
	return !tally__proc_alive(pid, st);
}

/* A pending claim (or a state no claim can be in): has it been pending
 * long enough to take back? Timed in the owner's own memory, from when
 * the reaper first saw this exact lease. */
static bool claim_expired(struct tally_segment *seg, uint32_t i, uint64_t lease, uint64_t now)
{
	struct tally__reap_memory *m = &seg->reap;
	uint64_t cooloff = (uint64_t)seg->cooloff_ms * 1000000u;

	if (m->slot_lease[i] != lease || !m->slot_seen_ns[i]) {
		m->slot_lease[i] = lease;
		m->slot_seen_ns[i] = now;
		return false;
	}
	uint64_t age = now - m->slot_seen_ns[i];
	if (age >= (uint64_t)TALLY__CLAIM_TIMEOUT_MS * 1000000u)
		return true;
	/* A claimer that wrote its pid and is gone need not wait the timeout. */
	int32_t pid;
	uint64_t ident = atomic_load_explicit(&tally__seg_slot(seg, i)->ctl.ident, memory_order_relaxed);
	return age >= cooloff && tally__ident_of(ident, tally__lease_gen(lease), &pid) && pid > 0 &&
	       kill(pid, 0) != 0 && errno == ESRCH;
}

static bool drained(struct tally__slot *s)
{
	return atomic_load_explicit(&s->head, memory_order_relaxed) ==
	       atomic_load_explicit(&s->tail, memory_order_acquire);
}

/* Add what slot i's claim counted since the last pass to the owner's
 * totals. The counters are the producer's to store: a claim's start at 0
 * (fill_handle, before it turns ACTIVE), and a value that went down
 * (scribbled) adds nothing. Only a claim that reached ACTIVE starts an
 * account: a COOLING slot of an expired claim may still hold the previous
 * claim's values, already counted. */
static void account_claim(struct tally_segment *seg, uint32_t i, const struct tally__slot *s, uint64_t l)
{
	struct tally__claim_seen *c = &seg->reap.claim_seen[i];
	uint32_t state = tally__lease_state(l);

	if (state < TALLY__SLOT_ACTIVE || state > TALLY__SLOT_COOLING ||
	    (state == TALLY__SLOT_COOLING && c->gen != tally__lease_gen(l)))
		return;
	uint64_t d = atomic_load_explicit(&s->dropped, memory_order_relaxed);
	uint64_t k = atomic_load_explicit(&s->clamped, memory_order_relaxed);

	if (c->gen != tally__lease_gen(l)) {
		c->gen = tally__lease_gen(l);
		c->dropped = c->clamped = 0;
	}
	if (d > c->dropped) {
		seg->reap.dropped += d - c->dropped;
		c->dropped = d;
	}
	if (k > c->clamped) {
		seg->reap.clamped += k - c->clamped;
		c->clamped = k;
	}
}

void tally__slots_reap(struct tally_segment *seg, uint64_t now, struct tally__reap_stats *st)
{
	uint64_t cooloff = (uint64_t)seg->cooloff_ms * 1000000u;

	memset(st, 0, sizeof(*st));
	TALLY__ASSERT(seg->is_owner && seg->reap.slot_lease);
	for (uint32_t i = 0; i < seg->nslots; i++) {
		struct tally__slot *s = tally__seg_slot(seg, i);
		uint64_t l = atomic_load_explicit(&s->ctl.lease, memory_order_acquire);
		uint64_t since = atomic_load_explicit(&s->ctl.since_ns, memory_order_relaxed);

		account_claim(seg, i, s, l);
		switch (tally__lease_state(l)) {
		case TALLY__SLOT_FREE:
			break;
		case TALLY__SLOT_ACTIVE:
			st->died += process_gone(s, l) && move(s, l, TALLY__SLOT_DEAD, now);
			break;
		case TALLY__SLOT_RELEASING:
			st->released += drained(s) && move(s, l, TALLY__SLOT_FREE, now);
			break;
		case TALLY__SLOT_DEAD:
			if (drained(s))
				move(s, l, TALLY__SLOT_COOLING, now);
			break;
		case TALLY__SLOT_COOLING:
			/* since_ns is the producer side's to scribble on: a value
			 * from the future counts from now, never forever. */
			if (since > now)
				atomic_store_explicit(&s->ctl.since_ns, now, memory_order_relaxed);
			st->reused += now - since >= cooloff && since <= now &&
				      move(s, l, TALLY__SLOT_FREE, now);
			break;
		case TALLY__SLOT_CLAIMING:
		default: /* not a state: the slot was scribbled on */
			if (claim_expired(seg, i, l, now) && move(s, l, TALLY__SLOT_COOLING, now))
				st->claims_expired++;
			continue;
		}
		seg->reap.slot_seen_ns[i] = 0;
	}
}
