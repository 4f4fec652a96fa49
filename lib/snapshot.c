/* SPDX-License-Identifier: MIT */
/*
 * snapshot.c: the latch behind cross-process snapshots (see snapshot.h for
 * the protocol). The writer is the aggregator thread; readers are any
 * thread of any process, mapping the segment read-only.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include <ck_backoff.h>

#include "common.h"
#include "snapshot.h"

uint64_t tally__snapshot_section_size(uint32_t nentries)
{
	return sizeof(struct tally__snap_hdr) + 2ull * nentries * sizeof(struct tally__snap_entry);
}

void tally__snapshot_section_init(void *section, uint64_t len, uint32_t nentries)
{
	struct tally__snap_hdr *h = section;

	TALLY__ASSERT(len >= tally__snapshot_section_size(nentries));
	h->magic = TALLY__SNAP_MAGIC;
	h->nentries = nentries;
	h->entry_size = sizeof(struct tally__snap_entry);
	atomic_store_explicit(&h->seq, 0, memory_order_relaxed);
}

int tally__snapshot_check(const void *section, uint64_t len, uint32_t want_entries)
{
	const struct tally__snap_hdr *h = section;

	/* Each word loaded once (producers map it writable); only the
	 * caller's want_entries is ever used for geometry. */
	if (len < sizeof(*h) || __atomic_load_n(&h->magic, __ATOMIC_RELAXED) != TALLY__SNAP_MAGIC ||
	    __atomic_load_n(&h->nentries, __ATOMIC_RELAXED) != want_entries ||
	    __atomic_load_n(&h->entry_size, __ATOMIC_RELAXED) != sizeof(struct tally__snap_entry) ||
	    tally__snapshot_section_size(want_entries) > len)
		return TALLY_ECORRUPT;
	return 0;
}

static struct tally__snap_entry *copy_of(const void *section, uint32_t nentries, uint64_t idx)
{
	/* Through void *: the section is page-aligned and the header's size a
	 * multiple of an entry's alignment (clang's -Wcast-align cannot know). */
	struct tally__snap_entry *e = (void *)((const char *)section + sizeof(struct tally__snap_hdr));

	return e + idx * nentries;
}

void tally__snapshot_writer_init(struct tally__snap_writer *w, void *section, uint32_t nentries)
{
	w->hdr = section;
	w->nentries = nentries;
	w->copies[0] = copy_of(section, w->nentries, 0);
	w->copies[1] = copy_of(section, w->nentries, 1);
}

uint32_t tally__snapshot_write_begin(struct tally__snap_writer *w)
{
	uint64_t seq = atomic_load_explicit(&w->hdr->seq, memory_order_relaxed) + 1;

	/* Release store: the copy written before (the other one) is complete
	 * before readers are sent to it. The entry stores that follow are
	 * release stores too (tally__snapshot_store), so each is ordered after
	 * this new seq: a reader that sees any of them sees seq move and
	 * retries. */
	atomic_store_explicit(&w->hdr->seq, seq, memory_order_release);
	return (uint32_t)((seq & 1) ^ 1); /* odd: readers on copy 1, write 0 */
}

int tally__snapshot_read(const void *section, uint32_t nentries, uint32_t id,
			 uint64_t words[TALLY__SW_WORDS], uint64_t meta[8])
{
	struct tally__snap_hdr *h = (struct tally__snap_hdr *)section;

	ck_backoff_t backoff = 16; /* iterations; doubles on every retry */

	if (id >= nentries)
		return -ERANGE;
	for (int tries = 0; tries < TALLY__SNAP_READ_TRIES; tries++) {
		if (tries) /* the writer flipped twice under us: give it room */
			ck_backoff_eb(&backoff);
		uint64_t seq = atomic_load_explicit(&h->seq, memory_order_acquire);
		uint64_t idx = seq & 1; /* odd: copy 0 is being written, read 1 */
		const struct tally__snap_entry *e = copy_of(section, nentries, idx) + id;
		/* Acquire loads (plain moves on x86): each completes before the
		 * re-check of seq below. No standalone fence: ThreadSanitizer does
		 * not model those, and these give the same ordering. */
		for (int i = 0; i < TALLY__SW_WORDS; i++)
			words[i] = atomic_load_explicit(&e->w[i], memory_order_acquire);
		if (meta) { /* only what a reader of one subject needs */
			const struct tally__snap_meta *m = &h->meta[idx];
			memset(meta, 0, 8 * sizeof(meta[0]));
			meta[0] = atomic_load_explicit(&m->published_mono_ns, memory_order_acquire);
			meta[4] = atomic_load_explicit(&m->window_ns, memory_order_acquire);
			meta[5] = atomic_load_explicit(&m->reserved[0], memory_order_acquire);
		}
		if (atomic_load_explicit(&h->seq, memory_order_relaxed) == seq)
			return 0;
	}
	return TALLY_EBUSY_RETRY;
}

void tally__snapshot_reset(struct tally__snap_writer *w)
{
	w->hdr->magic = TALLY__SNAP_MAGIC;
	w->hdr->nentries = w->nentries;
	w->hdr->entry_size = sizeof(struct tally__snap_entry);
	for (int half = 0; half < 2; half++) {
		uint32_t c = tally__snapshot_write_begin(w);
		struct tally__snap_meta *m = &w->hdr->meta[c];
		for (uint32_t i = 0; i < w->nentries; i++)
			for (int k = 0; k < TALLY__SW_WORDS; k++)
				tally__snapshot_store(&w->copies[c][i].w[k], 0);
		tally__snapshot_store(&m->published_mono_ns, 0);
		tally__snapshot_store(&m->published_real_ns, 0);
		tally__snapshot_store(&m->publish_count, 0);
		tally__snapshot_store(&m->subjects_present, 0);
	}
}
