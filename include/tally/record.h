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
 * to one thread at a time. Give each worker thread its own; never record
 * through one handle from two threads at once. A handle may be handed to
 * another thread (with the usual happens-before of the hand-over, a mutex
 * or a queue): it belongs to its claim, not to the thread that attached,
 * and the thread that attached may exit meanwhile. The aggregator in the
 * owner process is the single consumer of every ring.
 *
 * Life of a handle. tally_producer_attach() leases a slot; the lease
 * ends with tally_producer_detach() or with the death of the process.
 *
 * Owner restarts. When the segment's owner stops or dies and a new owner
 * (a restarted tallyd) creates a segment of the same name, every handle
 * of this process follows it: a watcher thread (one per segment opened
 * for producing, checking every 200 ms) notices, and each handle moves to
 * a slot of the new segment on its next record (or heartbeat). Subject
 * ids stay the caller's: they are translated to the new segment's, each
 * name interned there on its first record (a lookup more per record from
 * then on; reopen the segment to drop it; that first record of a name may
 * wait, at most 200 ms, on a table entry another process left half
 * written). What could not be recorded in
 * between (records while no owner ran, and what the dead owner left
 * undrained in the old ring) is lost, counted in the handle's counters
 * (lost, moves) and shown by `tally stat` for the new slot. The caller's
 * segment handle stays the old one: reads through it (tally_read_subject)
 * report the old owner dead; readers reopen by name.
 * A thread that exits without detaching keeps its slot leased while the
 * process lives (its handle may have moved on): a thread that wants its
 * slot back at exit uses tally_producer_local() instead, whose handle is
 * detached by the thread's exit. Should the lease end under a handle
 * anyway (the process forked: a child's copies of its parent's handles;
 * the segment closed; the slot taken back by its owner), the handle is
 * revoked: tally_record() then returns false and counts the sample as
 * lost, tally_producer_heartbeat() and tally_producer_status() return
 * TALLY_EREVOKED, and nothing is written into the slot again. Detach a
 * revoked handle as usual.
 *
 * Producers and the owner must share a PID namespace: the owner judges a
 * producer's liveness by its pid and start time in /proc, and a pid from
 * another namespace means nothing there (such a slot would be taken for
 * dead). Containers share the owner's with --pid=host or a shared pod.
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
	uint32_t reserved; /* what value_ns is: 0 a latency; the JetStream record
			    * (tally/jsack.h) tags its wait and pending entries here */
};

/*
 * A producer handle. The fields are private: they are visible only so that
 * tally_record() can be inlined. The handle lives in the recording
 * process's own memory; only the ring and the two words it points at are
 * in the segment.
 */
struct tally_producer {
	/* line 0 (the handle is 64-byte aligned): all the record path reads */
	struct tally_ring_entry *ring; /* slot's ring in the segment */
	uint64_t mask;                 /* ring capacity - 1 */
	uint64_t capacity;             /* 0 sends every record to the slow path (atomic: the
				        * library's watcher may store it from another thread) */
	uint64_t tail;                 /* next position to write (private copy) */
	uint64_t cached_head;          /* last head seen: refreshed only when the ring looks full */
	uint64_t *shm_tail;            /* published tail, read by the aggregator */
	uint64_t max_value_ns;
	const void *remap;             /* NULL, or ids to translate: the handle follows a new owner */
	/* slow path only */
	const uint64_t *shm_head;      /* consumer position, written by the aggregator */
};

/*
 * Lease a producer slot. 0 and *out, or -EROFS (a read-only handle),
 * TALLY_EFULL (every slot taken: raise producer_slots), TALLY_EOWNERDEAD,
 * -ENOMEM. One CAS per slot tried, a read of /proc/self/stat and a
 * process-wide mutex held for a few instructions (the registry of
 * handles); starts the segment's watcher thread on the first attach
 * (see "Owner restarts"). Never waits for the owner. Thread-safe.
 */
TALLY_API int tally_producer_attach(struct tally_segment *seg, struct tally_producer **out);

/*
 * The calling thread's own handle for seg: attached on the first call in
 * each thread (as tally_producer_attach, same errors), the same handle on
 * every later call (a thread-local lookup, a few ns), and detached when
 * the thread exits (a pthread key destructor). For threads the
 * application does not control (an Erlang scheduler, a thread pool).
 * Never hand it to another thread; tally_producer_detach() of it only
 * NULLs the pointer. Close the segment only after those threads exit,
 * or their handles are revoked. Thread-safe.
 */
TALLY_API int tally_producer_local(struct tally_segment *seg, struct tally_producer **out);

/*
 * Release the slot: it becomes free once the aggregator has drained what
 * is left in the ring. Changes the slot only while the handle still
 * holds its lease (a revoked handle leaves the slot alone). NULLs *p.
 * Never blocks on the owner (a process-wide mutex, held for a few
 * instructions). Call from the thread that holds the handle now.
 */
TALLY_API void tally_producer_detach(struct tally_producer **p);

/* Store a heartbeat (CLOCK_MONOTONIC) in the slot; for threads that may
 * stay idle for long, and to find out that the lease ended. 0, or
 * TALLY_EREVOKED (the handle is revoked; detach it and attach again).
 * Cheap, optional: liveness is judged by process (pid + start time). */
TALLY_API int tally_producer_heartbeat(struct tally_producer *p);

/* 0 while the handle holds its lease, TALLY_EREVOKED once it does not.
 * One load of the slot's lease word. Call from the holding thread. */
TALLY_API int tally_producer_status(const struct tally_producer *p);

struct tally_producer_counters {
	uint64_t recorded; /* samples stored in the ring by this handle */
	uint64_t dropped;  /* samples lost to a full ring */
	uint64_t clamped;  /* values above max_value_ns */
	uint64_t lost;     /* samples refused (revoked; no live owner) or left undrained by a dead owner */
	uint64_t moves;    /* owner restarts this handle followed to a new segment */
	uint32_t slot;     /* slot index in the segment it records into now */
	bool revoked;      /* the lease ended under the handle */
};
/* This handle's own counters. Call from the owning thread. */
TALLY_API void tally_producer_counters(const struct tally_producer *p,
				       struct tally_producer_counters *out);

/* Slow paths of tally_record(); exported only for the inlines below. */
TALLY_API bool tally__record_full(struct tally_producer *p, tally_subject_t subject, uint64_t ns);
TALLY_API bool tally__record_clamped(struct tally_producer *p, tally_subject_t subject, uint64_t ns);
TALLY_API bool tally__record_remapped(struct tally_producer *p, tally_subject_t subject, uint64_t ns);

/* The record path proper, for a subject id of the segment the slot is in. */
static inline bool tally__record_raw(struct tally_producer *p, tally_subject_t subject, uint64_t ns)
{
	uint64_t t = p->tail;

	/* Relaxed load: a plain move; the library may zero capacity from
	 * another thread to send us to the slow path (see above). */
	if (__builtin_expect(t - p->cached_head >= __atomic_load_n(&p->capacity, __ATOMIC_RELAXED), 0))
		return tally__record_full(p, subject, ns);
	if (__builtin_expect(ns > p->max_value_ns, 0))
		return tally__record_clamped(p, subject, ns);
	struct tally_ring_entry *e = &p->ring[t & p->mask];
	e->value_ns = ns;
	e->subject = subject;
	e->reserved = 0; /* a latency; beside subject, one 8-byte store */
	p->tail = t + 1;
	/* Release: the entry's two stores above become visible to the
	 * aggregator before the tail that covers them (it loads the tail with
	 * acquire). On x86 this is a plain store; no fence is emitted. */
	__atomic_store_n(p->shm_tail, t + 1, __ATOMIC_RELEASE);
	return true;
}

/*
 * Record one latency for subject. Returns true if stored, false if dropped
 * (ring full; counted) or lost (no owner to record to: counted, see "Life
 * of a handle"). Wait-free; owning thread only. subject is not checked
 * here: an id that is not in the table is counted as rejected by the
 * aggregator, never written anywhere but this producer's own ring. After
 * the handle followed a new owner, ids are translated to the new
 * segment's (one lookup more, out of line).
 */
static inline bool tally_record(struct tally_producer *p, tally_subject_t subject, uint64_t ns)
{
	if (__builtin_expect(p->remap != NULL, 0))
		return tally__record_remapped(p, subject, ns);
	return tally__record_raw(p, subject, ns);
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
