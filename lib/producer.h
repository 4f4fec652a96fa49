/* SPDX-License-Identifier: MIT */
/*
 * producer.h (private): the owner's side of producer slots: draining a
 * ring, and the reaper that notices dead producers and frees slots; and,
 * for lib/jsack.c, the tagged records of a handle (the two-entry store
 * inline) and the start of the handle it reaches with no call.
 *
 * Only the owner's aggregator thread calls the drain and reap functions
 * (one consumer per ring); the record ones, the handle's owning thread.
 */
#ifndef TALLY_LIB_PRODUCER_H
#define TALLY_LIB_PRODUCER_H

#include "jsack.h"
#include "segment.h"

/*
 * Entries ready in slot s: [*head, *head + n). The tail is loaded with
 * acquire (pairs with the producer's release store), so the n entries are
 * complete. A tail that is behind head or more than a ring ahead cannot
 * come from a correct producer: the slot is resynchronised (head = tail),
 * counted as corrupt, and 0 is returned.
 */
static inline uint64_t tally__slot_ready(struct tally_segment *seg, struct tally__slot *s,
					 uint64_t *head)
{
	uint64_t h = atomic_load_explicit(&s->head, memory_order_relaxed);
	uint64_t t = atomic_load_explicit(&s->tail, memory_order_acquire);

	*head = h;
	if (__builtin_expect(t - h > seg->ring_cap, 0)) {
		atomic_store_explicit(&s->head, t, memory_order_release);
		atomic_fetch_add_explicit(&s->ctl.rejected, t - h, memory_order_relaxed);
		seg->reap.skipped += t - h; /* the owner's own total (one drainer) */
		return 0;
	}
	return t - h;
}

/* Hand n consumed entries back to the producer. Release: our reads of
 * them happen before the producer may overwrite them. */
static inline void tally__slot_consume(struct tally__slot *s, uint64_t head, uint64_t n)
{
	atomic_store_explicit(&s->head, head + n, memory_order_release);
}

/* A tagged ring entry (shm_layout.h, enum tally__entry_kind) for subject,
 * through the same slow paths as tally_record() (full ring, owner
 * restart, remap); v is stored as it is. For lib/jsack.c. */
bool tally__record_tagged(struct tally_producer *p, tally_subject_t subject, uint64_t v, uint32_t tag);
/* The same at max_value_ns, counted as clamped. */
bool tally__record_tagged_clamped(struct tally_producer *p, tally_subject_t subject, uint32_t tag);
/* The start of every producer handle (lib/producer.c's struct
 * producer_full): the public part, then the consumer-key cache of
 * tally_record_jetstream (lib/jsack.h), so that lib/jsack.c reaches both
 * with no call. The cache is the owning thread's only. */
struct tally__producer_head {
	struct tally_producer pub;
	struct tally__jsack_cache jsack;
};

static inline struct tally__jsack_cache *tally__producer_jsack_cache(struct tally_producer *p)
{
	return &((struct tally__producer_head *)(void *)p)->jsack;
}

/* tally__record_tagged2 when the inline path cannot store both entries at
 * once (followed a new owner, the ring nearly full, capacity 0): one at a
 * time, as tally__record_tagged. true if both were stored. */
bool tally__record_tagged2_slow(struct tally_producer *p, tally_subject_t subject, uint64_t v0, uint32_t tag0,
				uint64_t v1, uint32_t tag1);

/* Two tagged entries for subject behind one tail store (the aggregator
 * sees both or neither); near a full ring, after an owner restart, one
 * at a time through the slow path. true if both were stored. */
static inline bool tally__record_tagged2(struct tally_producer *p, tally_subject_t subject, uint64_t v0,
					 uint32_t tag0, uint64_t v1, uint32_t tag1)
{
	uint64_t t = p->tail;

	/* relaxed capacity: as in tally__record_raw */
	if (__builtin_expect(p->remap != NULL ||
				     t + 2 - p->cached_head > __atomic_load_n(&p->capacity, __ATOMIC_RELAXED),
			     0))
		return tally__record_tagged2_slow(p, subject, v0, tag0, v1, tag1);
	struct tally_ring_entry *e0 = &p->ring[t & p->mask], *e1 = &p->ring[(t + 1) & p->mask];
	e0->value_ns = v0;
	e0->subject = subject;
	e0->reserved = tag0;
	e1->value_ns = v1;
	e1->subject = subject;
	e1->reserved = tag1;
	p->tail = t + 2;
	/* Release: both entries before the tail that covers them. */
	__atomic_store_n(p->shm_tail, t + 2, __ATOMIC_RELEASE);
	return true;
}

struct tally__reap_stats {
	uint32_t died;     /* ACTIVE slots found with their process or thread gone */
	uint32_t released; /* RELEASING slots drained and freed */
	uint32_t reused;   /* COOLING slots freed after the cool-off */
	uint32_t claims_expired; /* CLAIMING (or scribbled) slots taken back after the claim timeout */
};

/* Walk every slot once: detect dead producers, free drained slots. Call
 * after a drain pass, at most every few hundred ms (reads /proc). */
void tally__slots_reap(struct tally_segment *seg, uint64_t now_ns, struct tally__reap_stats *st);

#endif /* TALLY_LIB_PRODUCER_H */
