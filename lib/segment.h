/* SPDX-License-Identifier: MIT */
/*
 * segment.h (private): the in-process handle of a mapped segment and the
 * bounds-checked accessors every other lib/ file uses to reach a section.
 *
 * The header is validated once, at open, and its layout numbers are
 * copied into the handle. Later code indexes with those copies only, so a
 * header scribbled on after open cannot move an access outside the
 * mapping. Live words (states, counters, positions) are still read from
 * the segment and each is checked where it is used.
 */
#ifndef TALLY_LIB_SEGMENT_H
#define TALLY_LIB_SEGMENT_H

#include <sys/types.h>
#include <tally/segment.h>

#include "shm_layout.h"

#define TALLY__SEGMENT_MAGIC 0x5e6a11e7u

/* The owner's reaper keeps its clocks in its own memory, never in the
 * segment: a producer could write a timestamp there that never expires. */
struct tally__reap_memory {
	uint64_t *slot_lease;   /* [nslots]: the pending lease last seen */
	uint64_t *slot_seen_ns; /* [nslots]: when the reaper first saw it, 0 none */
	uint64_t *subj_seen_ns; /* [table_size]: when a CLAIMED entry was first seen, 0 none */
	/* accounting of the claims' own counters (tally__slots_reap) */
	struct tally__claim_seen {
		uint64_t gen;              /* the claim the values below belong to */
		uint64_t dropped, clamped; /* its counters as last added to the totals */
	} *claim_seen;                     /* [nslots] */
	uint64_t dropped, clamped, skipped; /* totals since creation, the owner's own */
};

struct tally_segment {
	uint32_t magic; /* TALLY__SEGMENT_MAGIC while open */
	bool read_only, is_owner, keep;
	bool engine_attached; /* an engine runs on this handle */
	bool revoked_at_close; /* producer handles were still attached when it closed */
	int fd;
	unsigned char *base;
	size_t len;
	dev_t dev;
	ino_t ino;
	char name[TALLY_NAME_MAX + 1];
	struct tally__shm_hdr *hdr;
	/* validated copies of the layout */
	uint32_t nslots, ring_cap, subject_cap, table_size, pending_cap, slot_stride, cooloff_ms;
	uint64_t max_value_ns, generation, owner_start_time, created_ns;
	pid_t owner_pid;
	struct tally__section subjects, slots, pending, snapshot;
	uint32_t remote_cap;            /* 0: no remote section (remote is {0, 0}) */
	struct tally__section remote;
	struct tally__section rules;    /* {0, 0}: an owner of ABI 3.0/3.1 keeps none */
	struct tally__reap_memory reap; /* owner only */
	struct tally__follow *follow;   /* producer mode: successors (follow.c) */
	struct tally_segment *follower_of; /* a successor: the origin that opened it */
};

/*
 * Typed pointers into the mapping go through void *: base is the page-
 * aligned start of the mmap, every section offset is a multiple of
 * TALLY__SECTION_ALIGN and slot_stride a multiple of the slot's alignment
 * (layout() computes them; open checks the header against it), so the
 * alignment the casts assume holds; clang's -Wcast-align, which warns on
 * any cast from unsigned char * on every target, cannot know that.
 */
static inline void *tally__seg_section(const struct tally_segment *s, const struct tally__section *sec)
{
	return s->base + sec->off;
}

static inline struct tally__shm_subject *tally__seg_subject(const struct tally_segment *s, uint32_t i)
{
	struct tally__shm_subject *table = tally__seg_section(s, &s->subjects);

	return table + i;
}

static inline struct tally__slot *tally__seg_slot(const struct tally_segment *s, uint32_t i)
{
	void *slot = s->base + s->slots.off + (uint64_t)i * s->slot_stride;

	return slot;
}

/* The header at the start of the mapping (page-aligned). */
static inline struct tally__shm_hdr *tally__seg_hdr(const struct tally_segment *s)
{
	void *hdr = s->base;

	return hdr;
}

/* Size of the subject hash table for a capacity: a power of two, at least
 * twice the capacity, so probes stay short. */
uint32_t tally__subject_table_size(uint32_t capacity);

/* Owner's reaper for the subject table: entries whose claimer died, or
 * that stayed CLAIMED for TALLY__CLAIM_TIMEOUT_MS, become tombstones.
 * Returns how many it turned. */
uint32_t tally__subjects_reap(struct tally_segment *seg, uint64_t now_ns);

/* Revoke every producer handle of this process on seg (segment close).
 * Returns how many there were. producer.c. */
uint32_t tally__producers_revoke_segment(struct tally_segment *seg);

/* The pending section is pending.c's (tally__pending_section_size), the
 * snapshot section snapshot.c's (tally__snapshot_section_size). */

#endif /* TALLY_LIB_SEGMENT_H */
