/* SPDX-License-Identifier: MIT */
/*
 * shm_layout.h: the layout of the shared-memory segment. NOT PUBLIC: no
 * installed header includes it, and nothing outside lib/ may depend on it.
 *
 *   +-------------------------+ 0
 *   | header (4 KiB)          |  magic, ABI, sizes and offsets of every
 *   |                         |  section, owner identity, ready word (last)
 *   +-------------------------+ subjects.off
 *   | subject table           |  subject_cap entries, open addressing
 *   +-------------------------+ slots.off
 *   | producer slots          |  nslots x slot_stride: control block,
 *   |                         |  tail, counters, head (each 128 B), ring
 *   +-------------------------+ pending.off
 *   | pending table           |  poller's view of JetStream consumers
 *   +-------------------------+ snapshot.off
 *   | snapshot area           |  aggregator's published stats (latch)
 *   +-------------------------+ remote.off (ABI 3.1; only if remote_cap > 0)
 *   | remote section          |  other hosts' verdicts, mirrored from the
 *   |                         |  JetStream KV bucket (remote.h, share.c)
 *   +-------------------------+ rules.off (ABI 3.2)
 *   | rules section           |  the threshold rules the engine judges by
 *   |                         |  (rules.h): which rule judged a subject
 *   +-------------------------+ total_size
 *
 * Every section starts on a 4 KiB boundary. Any change of the layout bumps
 * TALLY__ABI_MAJOR (incompatible) or TALLY__ABI_MINOR (fields appended
 * that old readers may ignore). Readers trust none of it: segment.c checks
 * every offset and size against the mapped length before use.
 *
 * Words shared between processes are C11 atomics. 128-byte blocks keep a
 * word written by one side off the cache lines (and the adjacent-line
 * prefetch pair) that the other side writes.
 */
#ifndef TALLY_SHM_LAYOUT_H
#define TALLY_SHM_LAYOUT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <tally/record.h>

#define TALLY__MAGIC 0x314d4853594c4c41ULL /* "ALLYSHM1" little-endian, "tally shm" v1 */
#define TALLY__ABI_MAJOR 3u /* 2: slot leases (state + generation in one word);
			    * 3: ring entries tagged (waits, pending), 256-byte snapshot entries */
#define TALLY__ABI_MINOR 2u /* 1: remote_cap and the remote section (appended; a 3.0
			    * segment reads as one with remote_cap 0);
			    * 2: the rules section (appended; older segments have none) */
#define TALLY__READY 0x52454459u /* "READ": the ready word's value once complete */
#define TALLY__HDR_SIZE 4096u
#define TALLY__SECTION_ALIGN 4096u
#define TALLY__BLOCK 128u

struct tally__section {
	uint64_t off;
	uint64_t size;
};

enum tally__owner_state {
	TALLY__OWNER_RUNNING = 1,
	TALLY__OWNER_STOPPED = 2, /* closed cleanly */
};

struct tally__shm_hdr {
	uint64_t magic;
	uint32_t abi_major;
	uint32_t abi_minor;
	uint64_t total_size;
	uint32_t hdr_size;
	uint32_t flags;
	int32_t owner_pid;
	uint32_t mode;
	uint64_t owner_start_time;
	uint64_t generation;
	uint64_t created_ns;
	/* configuration the sizes derive from */
	uint32_t nslots;
	uint32_t ring_cap;
	uint32_t subject_cap;
	uint32_t pending_cap;
	uint64_t max_value_ns;
	uint32_t cooloff_ms;
	uint32_t slot_stride;
	uint32_t subject_entry_size;
	uint32_t reserved0;
	struct tally__section subjects, slots, pending, snapshot;
	/* live words */
	_Atomic uint64_t owner_heartbeat_ns; /* CLOCK_MONOTONIC, stored by the owner */
	_Atomic uint32_t owner_state;
	_Atomic uint32_t subjects_used;
	_Atomic uint32_t ready; /* TALLY__READY, stored last with release */
	uint32_t reserved1;
	/* Totals since the segment was created, stored by the owner at every
	 * publish from its own counts (never read back by it): what readers
	 * show as the segment's accounting. Each only grows. */
	struct tally__shm_totals {
		_Atomic uint64_t recorded; /* drained + still in the rings */
		_Atomic uint64_t drained;  /* taken from the rings by the owner */
		_Atomic uint64_t dropped;  /* producers' rings were full (their own counts, per claim) */
		_Atomic uint64_t clamped;  /* values above max_value_ns, stored as it */
		_Atomic uint64_t rejected; /* entries with a subject id not in the table */
		_Atomic uint64_t skipped;  /* ring positions past a producer's ring (a corrupt tail) */
		_Atomic uint64_t updated_ns; /* CLOCK_MONOTONIC of the last store, 0 never */
	} totals;
	/* ABI 3.1: the remote section (0 and {0, 0} in a 3.0 segment, whose
	 * header page is zero past totals). */
	uint32_t remote_cap;
	uint32_t remote_entry_size;
	struct tally__section remote;
	/* ABI 3.2: the rules section (rules.h); zero in older segments. */
	uint32_t rules_cap;
	uint32_t rules_entry_size;
	struct tally__section rules;
};
_Static_assert(sizeof(struct tally__shm_hdr) <= TALLY__HDR_SIZE, "header fits its page");
_Static_assert(offsetof(struct tally__shm_hdr, magic) == 0, "magic first");
_Static_assert(offsetof(struct tally__shm_hdr, abi_major) == 8, "ABI at a fixed place for all versions");
_Static_assert(sizeof(_Atomic uint64_t) == sizeof(uint64_t), "atomic words have plain layout");

/* Subject table entry. state goes EMPTY -> CLAIMED (one CAS by the
 * claimer) -> READY (a CAS by the claimer, after the name is written), or
 * CLAIMED -> TOMBSTONE (a CAS by the owner's reaper, when the claimer died
 * or has held the claim for TALLY__CLAIM_TIMEOUT_MS). Entries are never
 * removed: ids stay valid for the segment's life. subject.c has the
 * whole protocol. */
enum tally__subject_state {
	TALLY__SUBJ_EMPTY = 0,
	TALLY__SUBJ_CLAIMED = 1,
	TALLY__SUBJ_READY = 2,
	TALLY__SUBJ_TOMBSTONE = 3,
};

/* A claim (of a subject entry or a producer slot) that is still pending
 * this long after the owner's reaper first saw it is taken back, whether
 * or not its claimer lives: a claim takes microseconds. The claimer's own
 * final CAS then fails and it tries again elsewhere. */
#define TALLY__CLAIM_TIMEOUT_MS 1000u

struct tally__shm_subject {
	_Atomic uint32_t state;
	uint32_t hash;
	_Atomic int32_t claimer_pid;
	uint16_t len;
	uint16_t reserved;
	char name[256]; /* NUL-terminated, len bytes */
};
_Static_assert(sizeof(struct tally__shm_subject) == 272, "subject entry size");

/* Producer slot states. The state lives in the low 8 bits of the slot's
 * lease word, the claim generation in the other 56: every transition is a
 * CAS from an expected (state, generation), so a handle whose claim has
 * ended can never change a later claim's slot. producer.c's header has
 * the state machine: every transition, who makes it and why it is safe. */
enum tally__slot_state {
	TALLY__SLOT_FREE = 0,
	TALLY__SLOT_CLAIMING = 1,
	TALLY__SLOT_ACTIVE = 2,
	TALLY__SLOT_RELEASING = 3,
	TALLY__SLOT_DEAD = 4,
	TALLY__SLOT_COOLING = 5,
};

static inline uint32_t tally__lease_state(uint64_t lease)
{
	return (uint32_t)(lease & 0xffu);
}

static inline uint64_t tally__lease_gen(uint64_t lease)
{
	return lease >> 8;
}

static inline uint64_t tally__lease(uint64_t gen, uint32_t state)
{
	return gen << 8 | (state & 0xffu);
}

/* The claimer's identity, tagged with its claim's generation so that a
 * claimer stalled past the claim timeout can never overwrite a later
 * claim's identity: each word is installed by a CAS from the value the
 * owner left for exactly this generation (tag, nothing), and the reaper
 * believes an identity only when its tags match the lease. */
static inline uint64_t tally__ident(uint64_t gen, int32_t pid)
{
	return (gen & 0xffffffffu) << 32 | (uint32_t)pid;
}

static inline uint64_t tally__birth(uint64_t gen, uint64_t start_time)
{
	return start_time << 16 | (gen & 0xffffu);
}

static inline bool tally__ident_of(uint64_t ident, uint64_t gen, int32_t *pid)
{
	*pid = (int32_t)(uint32_t)ident;
	return ident >> 32 == (gen & 0xffffffffu);
}

static inline bool tally__birth_of(uint64_t birth, uint64_t gen, uint64_t *start_time)
{
	*start_time = birth >> 16;
	return (birth & 0xffffu) == (gen & 0xffffu);
}

struct tally__slot_ctl { /* block 0: written at claim/release and by the owner's reaper */
	_Atomic uint64_t lease;        /* generation << 8 | state */
	_Atomic uint64_t ident;        /* tally__ident(gen, pid): the claimer's process; pid 0 unclaimed */
	_Atomic uint64_t birth;        /* tally__birth(gen, start time of pid in /proc ticks; 0 unreadable) */
	_Atomic int32_t tid;           /* thread that attached (diagnostics only, never liveness) */
	uint32_t reserved;
	_Atomic uint64_t claims;       /* how many times the slot was claimed */
	_Atomic uint64_t heartbeat_ns; /* CLOCK_MONOTONIC */
	_Atomic uint64_t base;         /* tail when the current claim began */
	_Atomic uint64_t since_ns;     /* CLOCK_MONOTONIC of the last state change */
	_Atomic uint64_t dead_drained; /* samples drained after the owner died (all claims) */
	_Atomic uint64_t rejected;     /* entries with an unknown subject id (all claims) */
	_Atomic uint64_t lost;         /* claimer's records lost to owner restarts before it came here */
	_Atomic uint64_t moves;        /* how many owner restarts the claimer's handle followed */
};

struct tally__slot {
	struct tally__slot_ctl ctl;
	char pad0[TALLY__BLOCK - sizeof(struct tally__slot_ctl)];
	_Atomic uint64_t tail; /* block 1: stored by the producer, release */
	char pad1[TALLY__BLOCK - sizeof(uint64_t)];
	_Atomic uint64_t dropped; /* block 2: producer's rare counters (plain stores) */
	_Atomic uint64_t clamped;
	char pad2[TALLY__BLOCK - 2 * sizeof(uint64_t)];
	_Atomic uint64_t head; /* block 3: stored by the aggregator, release */
	char pad3[TALLY__BLOCK - sizeof(uint64_t)];
	struct tally_ring_entry ring[]; /* ring_cap entries */
};
_Static_assert(sizeof(struct tally__slot_ctl) <= TALLY__BLOCK, "slot control fits a block");
_Static_assert(offsetof(struct tally__slot, tail) == 1 * TALLY__BLOCK, "tail block");
_Static_assert(offsetof(struct tally__slot, dropped) == 2 * TALLY__BLOCK, "counter block");
_Static_assert(offsetof(struct tally__slot, head) == 3 * TALLY__BLOCK, "head block");
_Static_assert(offsetof(struct tally__slot, ring) == 4 * TALLY__BLOCK, "ring after the blocks");
_Static_assert(_Alignof(struct tally__slot) <= TALLY__BLOCK && TALLY__BLOCK % _Alignof(struct tally__slot) == 0,
	       "slot_stride (blocks plus a ring of 16-byte entries, at least 64) keeps every slot aligned");
_Static_assert(sizeof(struct tally_ring_entry) == 16, "ring entry is 16 bytes");

/* A ring entry's tag (its `reserved` word): the kind in the top 4 bits,
 * for a pending entry a hash of "stream.consumer" in the other 28
 * (tally__jsack_consumer_hash). An old owner (ABI 2) would take every
 * entry for a latency: hence ABI 3. */
#define TALLY__TAG_KIND(tag) ((tag) >> 28)
#define TALLY__TAG_HASH(tag) ((tag) & 0x0fffffffu)
#define TALLY__TAG(kind, hash) ((uint32_t)(kind) << 28 | ((hash) & 0x0fffffffu))
enum tally__entry_kind {
	TALLY__ENTRY_LATENCY = 0,   /* value: processing latency, ns */
	TALLY__ENTRY_WAIT = 1,      /* value: wait in the stream, ns */
	TALLY__ENTRY_WAIT_SKEW = 2, /* the timestamp was ahead of now: wait 0, counted; value: the skew, ns */
	TALLY__ENTRY_PENDING = 3,   /* value: the consumer's num_pending at delivery */
};

#endif /* TALLY_SHM_LAYOUT_H */
