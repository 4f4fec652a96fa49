/* SPDX-License-Identifier: MIT */
/*
 * snapshot.h (private): the snapshot section of the segment, through which
 * the aggregator publishes every subject's window statistics and verdict
 * to readers in other processes.
 *
 * It is a latch (two copies and one sequence number), the variant of the
 * seqlock that never makes a reader wait for the writer: readers read copy
 * seq & 1, and the writer only rewrites the other one. While it rewrites
 * copy 0 the sequence is odd; then it increments it (readers move to the
 * fresh copy 0) and rewrites copy 1. A reader loads the sequence (acquire), reads the copy
 * seq & 1, and accepts it if the sequence has not moved (its loads are
 * acquire); otherwise it retries, a bounded number of times. Every shared
 * word is a C11 atomic, stored with release and loaded with acquire (plain
 * moves on x86) instead of relaxed accesses between fences, so a reader
 * racing the writer discards a torn copy and ThreadSanitizer, which does
 * not model standalone fences, sees every ordering we rely on.
 *
 * Entries are indexed by subject id (the subject table's index), so one
 * subject's read touches one 256-byte entry, two sequence loads and the
 * copy's metadata.
 */
#ifndef TALLY_LIB_SNAPSHOT_H
#define TALLY_LIB_SNAPSHOT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define TALLY__SNAP_MAGIC 0x50414e53u /* "SNAP" */
#define TALLY__SNAP_READ_TRIES 64

/* The words of one subject's published entry, in order. */
enum tally__snap_word {
	TALLY__SW_FLAGS,        /* see TALLY__SF_* */
	TALLY__SW_COUNT,        /* samples in the window */
	TALLY__SW_SUM,
	TALLY__SW_MIN,
	TALLY__SW_MAX,
	TALLY__SW_P50,
	TALLY__SW_P90,
	TALLY__SW_P95,
	TALLY__SW_P99,
	TALLY__SW_P999,
	TALLY__SW_RATE_MILLI,   /* samples per second x 1000 */
	TALLY__SW_TOTAL_COUNT,  /* since start */
	TALLY__SW_TOTAL_SUM,
	TALLY__SW_PENDING,      /* backlog of the matching consumers */
	TALLY__SW_PENDING_AGE,  /* ns since its last good refresh; UINT64_MAX never */
	TALLY__SW_VERDICT,      /* verdict | reasons << 8 | pending source << 16 | matched << 32 */
	TALLY__SW_VERDICT_SINCE,/* CLOCK_MONOTONIC ns when the verdict began */
	TALLY__SW_RETRY_AFTER,  /* ms, hint for gateways */
	TALLY__SW_DECIDED_P95,  /* the latency the verdict looked at */
	TALLY__SW_DECIDED_PENDING,
	TALLY__SW_CLAMPED,      /* clamped values since start */
	TALLY__SW_WAIT_COUNT,   /* waits in the window */
	TALLY__SW_WAIT_SKEWED,  /* since start: timestamps ahead of now */
	TALLY__SW_PENDING_ENTRY,/* pending-table index + 1 of the consumer that gave the backlog; 0 none */
	TALLY__SW_WAIT_P50,
	TALLY__SW_WAIT_P95,
	TALLY__SW_WAIT_P99,
	TALLY__SW_WAIT_MIN,     /* minimum wait of the last whole CoDel interval */
	TALLY__SW_CODEL,        /* TALLY__SC_* */
	TALLY__SW_PRESSURE_PPM, /* pressure x 1e6 */
	TALLY__SW_SHED_PPM,     /* shed probability x 1e6 */
	TALLY__SW_RULE,         /* rules generation (low 32 bits) << 32 | rules-section entry + 1; 0 none */
	TALLY__SW_WORDS
};

#define TALLY__SF_PRESENT   0x1u /* the subject exists and was published */
#define TALLY__SF_QUANTILES 0x2u /* count > 0: quantiles, min, max are meaningful */
#define TALLY__SF_PENDING_SHARED 0x4u /* the backlog's consumer also feeds other subjects */
#define TALLY__SF_WAIT      0x8u /* wait count > 0: wait quantiles are meaningful */

#define TALLY__SC_VALID      0x1u /* the last CoDel interval saw a wait */
#define TALLY__SC_OVERLOADED 0x2u /* its minimum was above target */
#define TALLY__PPM 1000000.0

struct tally__snap_entry {
	_Atomic uint64_t w[TALLY__SW_WORDS];
};

struct tally__snap_meta {
	_Atomic uint64_t published_mono_ns;
	_Atomic uint64_t published_real_ns;
	_Atomic uint64_t publish_count;
	_Atomic uint64_t subjects_present;
	_Atomic uint64_t window_ns;
	_Atomic uint64_t reserved[3]; /* [0]: publish interval in ns */
};

struct tally__snap_hdr {
	uint32_t magic;
	uint32_t nentries;   /* subject table size */
	uint32_t entry_size; /* sizeof(struct tally__snap_entry) */
	uint32_t reserved0;
	_Atomic uint64_t seq;
	uint64_t reserved1[5];
	struct tally__snap_meta meta[2];
};
_Static_assert(sizeof(struct tally__snap_entry) == 256, "snapshot entry size");
_Static_assert(sizeof(struct tally__snap_hdr) % 64 == 0, "entries start on a cache line");

uint64_t tally__snapshot_section_size(uint32_t nentries);
void tally__snapshot_section_init(void *section, uint64_t len, uint32_t nentries);

/* Validate a mapped section; nentries out. 0 or TALLY_ECORRUPT. */
int tally__snapshot_check(const void *section, uint64_t len, uint32_t want_entries);

/* Writer (one thread). A publish is two halves: begin (seq becomes odd,
 * readers go to copy 1), fill the copy returned (0); begin again (seq even,
 * readers go to the fresh copy 0), fill the copy returned (1). */
struct tally__snap_writer {
	struct tally__snap_hdr *hdr;
	struct tally__snap_entry *copies[2];
	uint32_t nentries;
};
/* The geometry is the owner's own (its table size), never the section
 * header's: every producer maps that header writable. */
void tally__snapshot_writer_init(struct tally__snap_writer *w, void *section, uint32_t nentries);
uint32_t tally__snapshot_write_begin(struct tally__snap_writer *w);
/* Rewrite the section header with the writer's geometry and clear both
 * copies and their meta, through the latch (readers racing it retry and
 * then see no subject). At engine start. */
void tally__snapshot_reset(struct tally__snap_writer *w);
/* Store one word of the copy being written (release; see above). */
static inline void tally__snapshot_store(_Atomic uint64_t *word, uint64_t v)
{
	atomic_store_explicit(word, v, memory_order_release);
}

/* Reader: consistent copy of entry id (words) and of the meta of the copy
 * it came from (meta[0] published_mono_ns, [4] window_ns, [5] publish
 * interval; the rest 0). 0, -ERANGE, TALLY_EBUSY_RETRY. */
int tally__snapshot_read(const void *section, uint32_t nentries, uint32_t id,
			 uint64_t words[TALLY__SW_WORDS], uint64_t meta[8]);

#endif /* TALLY_LIB_SNAPSHOT_H */
