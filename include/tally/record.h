/* SPDX-License-Identifier: MIT */
/*
 * tally/record.h: recording latencies from router threads.
 *
 * A thread that records attaches as a producer once and gets a slot of its
 * own in the segment: a single-producer, single-consumer ring plus its
 * counters. tally_record() is the per-message call. It is wait-free: a
 * compare against a cached copy of the consumer's position, a 16-byte
 * store into the ring and a release store of the tail. No lock, no
 * syscall, no read-modify-write atomic, no allocation. A full ring drops
 * the sample and counts the drop; recording never blocks.
 *
 * Threading contract (the _spsc of it): one struct tally_producer belongs
 * to one thread at a time. Give each worker thread its own; never share
 * one between threads. The aggregator in the owner process is the single
 * consumer of every ring.
 *
 * Values are uint64 nanoseconds; 0 is valid; values above the segment's
 * max_value_ns are stored as max_value_ns and counted as clamped.
 */
#ifndef TALLY_RECORD_H
#define TALLY_RECORD_H

#include <tally/common.h>
#include <tally/segment.h>
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One ring entry: 16 bytes, four per cache line. */
struct tally_ring_entry {
	uint64_t value_ns;
	tally_subject_t subject;
	uint32_t reserved; /* 0; keeps entries 16-byte aligned */
};

/*
 * A producer handle. The fields are private: they are visible only so that
 * tally_record() can be inlined. The handle lives in the recording
 * process's own memory; only the ring and the two words it points at are
 * in the segment.
 */
struct tally_producer {
	struct tally_ring_entry *ring; /* slot's ring in the segment */
	uint64_t mask;                 /* capacity - 1 */
	uint64_t capacity;
	uint64_t tail;                 /* next position to write (private copy) */
	uint64_t cached_head;          /* last head seen: refreshed only when the ring looks full */
	uint64_t *shm_tail;            /* published tail, read by the aggregator */
	const uint64_t *shm_head;      /* consumer position, written by the aggregator */
	uint64_t max_value_ns;
};

/*
 * Claim a producer slot for the calling thread. 0 and *out, or -EROFS (a
 * read-only handle), TALLY_EFULL (every slot taken: raise producer_slots),
 * TALLY_EOWNERDEAD, -ENOMEM. Lock-free (one CAS per slot tried); does not
 * block. Thread-safe.
 */
TALLY_API int tally_producer_attach(struct tally_segment *seg, struct tally_producer **out);

/*
 * Release the slot: it becomes free once the aggregator has drained what
 * is left in the ring. NULLs *p. Never blocks. Call from the owning thread
 * (or after it has stopped recording).
 */
TALLY_API void tally_producer_detach(struct tally_producer **p);

/* Store a heartbeat (CLOCK_MONOTONIC) in the slot; for threads that may
 * stay idle for long. Cheap, optional: liveness is judged by pid, tid and
 * process start time. */
TALLY_API void tally_producer_heartbeat(struct tally_producer *p);

struct tally_producer_counters {
	uint64_t recorded; /* samples stored in the ring by this handle */
	uint64_t dropped;  /* samples lost to a full ring */
	uint64_t clamped;  /* values above max_value_ns */
	uint32_t slot;     /* slot index in the segment */
};
/* This handle's own counters. Call from the owning thread. */
TALLY_API void tally_producer_counters(const struct tally_producer *p,
				       struct tally_producer_counters *out);

/* Slow paths of tally_record(); exported only for the inline below. */
TALLY_API bool tally__record_full(struct tally_producer *p, tally_subject_t subject, uint64_t ns);
TALLY_API uint64_t tally__record_clamp(struct tally_producer *p, uint64_t ns);

/*
 * Record one latency for subject. Returns true if stored, false if dropped
 * (ring full; counted). Wait-free; owning thread only. subject is not
 * checked here: an id that is not in the table is counted as rejected by
 * the aggregator, never written anywhere but this producer's own ring.
 */
static inline bool tally_record(struct tally_producer *p, tally_subject_t subject, uint64_t ns)
{
	uint64_t t = p->tail;

	if (__builtin_expect(t - p->cached_head >= p->capacity, 0))
		return tally__record_full(p, subject, ns);
	if (__builtin_expect(ns > p->max_value_ns, 0))
		ns = tally__record_clamp(p, ns);
	struct tally_ring_entry *e = &p->ring[t & p->mask];
	e->value_ns = ns;
	e->subject = subject;
	p->tail = t + 1;
	/* Release: the entry's two stores above become visible to the
	 * aggregator before the tail that covers them (it loads the tail with
	 * acquire). On x86 this is a plain store; no fence is emitted. */
	__atomic_store_n(p->shm_tail, t + 1, __ATOMIC_RELEASE);
	return true;
}

/* CLOCK_MONOTONIC in ns: through the vDSO, no syscall (about 20 ns). */
static inline uint64_t tally_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Record the time elapsed since start_ns (a tally_now_ns() value). */
static inline bool tally_record_since(struct tally_producer *p, tally_subject_t subject,
				      uint64_t start_ns)
{
	uint64_t now = tally_now_ns();

	return tally_record(p, subject, now > start_ns ? now - start_ns : 0);
}

#ifdef __cplusplus
}
#endif
#endif /* TALLY_RECORD_H */
