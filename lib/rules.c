/* SPDX-License-Identifier: MIT */
/*
 * lib/rules.c: the rules section (its layout, seqlock and checks are in
 * rules.h): the engine writes the threshold rules it judges by, readers
 * turn a subject's rule number into its pattern and levels. Owns the
 * section's format and every check a reader makes on it.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include <tally/common.h>

#include "common.h"
#include "rules.h"
#include "subject.h"
#include "verdict.h"

uint64_t tally__rules_section_size(uint32_t capacity)
{
	return sizeof(struct tally__rules_hdr) + (uint64_t)capacity * sizeof(struct tally__rules_entry);
}

void tally__rules_init(void *section, uint64_t len, uint32_t capacity)
{
	struct tally__rules_hdr *h = section;

	memset(section, 0, len);
	h->magic = TALLY__RULES_MAGIC;
	h->version = TALLY__RULES_VERSION;
	h->capacity = capacity;
	h->entry_size = sizeof(struct tally__rules_entry);
}

static struct tally__rules_entry *entry_at(struct tally__rules_hdr *h, uint32_t i)
{
	return (struct tally__rules_entry *)(h + 1) + i;
}

static void put(_Atomic uint64_t *w, uint64_t v)
{
	atomic_store_explicit(w, v, memory_order_release);
}

static void write_entry(struct tally__rules_entry *e, const char *pattern, const struct tally_threshold_rule *r)
{
	uint64_t words[TALLY__RULES_PATTERN_WORDS] = { 0 };
	size_t n = strnlen(pattern, sizeof(words) - 1);

	memcpy(words, pattern, n);
	for (uint32_t i = 0; i < TALLY__RULES_PATTERN_WORDS; i++)
		put(&e->pattern[i], words[i]);
	put(&e->w[TALLY__RW_P95_WARN], r->p95_warn_ns);
	put(&e->w[TALLY__RW_P95_OVERLOAD], r->p95_overload_ns);
	put(&e->w[TALLY__RW_PENDING_WARN], r->pending_warn);
	put(&e->w[TALLY__RW_PENDING_OVERLOAD], r->pending_overload);
	put(&e->w[TALLY__RW_WAIT_WARN], r->wait_p95_warn_ns);
	put(&e->w[TALLY__RW_WAIT_OVERLOAD], r->wait_p95_overload_ns);
	put(&e->w[TALLY__RW_CODEL_TARGET], r->codel_target_ns);
	put(&e->w[TALLY__RW_CODEL_INTERVAL_MS], r->codel_interval_ms);
	put(&e->w[TALLY__RW_MIN_SAMPLES], r->min_samples);
	put(&e->w[TALLY__RW_STALE_AFTER_MS], r->stale_after_ms);
	put(&e->w[TALLY__RW_STALE_POLICY], (uint64_t)r->stale_policy);
	put(&e->w[TALLY__RW_CLEAR_RATIO_PPM], (uint64_t)(r->clear_ratio * 1e6 + 0.5));
	put(&e->w[TALLY__RW_MIN_DWELL_MS], r->min_dwell_ms);
	put(&e->w[TALLY__RW_RETRY_AFTER_MS], r->retry_after_ms);
	put(&e->w[TALLY__RW_RETRY_AFTER_MAX_MS], r->retry_after_max_ms);
	put(&e->w[TALLY__RW_STALL_AFTER_MS], r->stall_after_ms);
}

void tally__rules_write(void *section, const struct tally_thresholds *t, uint64_t gen)
{
	struct tally__rules_hdr *h = section;
	size_t n = tally__thresholds_count(t);
	uint32_t cap = h->capacity, count = 1;
	uint32_t s = atomic_load_explicit(&h->seq, memory_order_relaxed);

	/* seq odd first: the release stores that follow are ordered after it */
	atomic_store_explicit(&h->seq, s + 1, memory_order_relaxed);
	atomic_thread_fence(memory_order_release);
	write_entry(entry_at(h, 0), "", tally__thresholds_default(t));
	for (size_t i = 0; i < n && count < cap; i++, count++)
		write_entry(entry_at(h, count), tally__thresholds_pattern(t, i), tally__thresholds_rule(t, i));
	atomic_store_explicit(&h->count, count, memory_order_release);
	atomic_store_explicit(&h->gen, gen, memory_order_release);
	atomic_store_explicit(&h->total, (uint64_t)n + 1, memory_order_release);
	atomic_store_explicit(&h->seq, s + 2, memory_order_release);
}

static uint32_t u32_of(uint64_t v)
{
	return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
}

/* The words of one entry, copied out; the checks come after the copy. */
struct entry_copy {
	uint64_t pattern[TALLY__RULES_PATTERN_WORDS];
	uint64_t w[TALLY__RW_WORDS];
};

static int entry_check(const struct entry_copy *c, uint32_t entry, struct tally_rule_info *out)
{
	const char *p = (const char *)c->pattern;
	size_t len = strnlen(p, sizeof(c->pattern));

	if (len == sizeof(c->pattern))
		return tally__fail(TALLY_ECORRUPT, "rules section: entry %u: the pattern is not terminated", entry);
	if ((entry == 0) != (len == 0) || (len && tally__subject_check(p, len, true, NULL, 0)))
		return tally__fail(TALLY_ECORRUPT, "rules section: entry %u: not a valid pattern", entry);
	if (c->w[TALLY__RW_STALE_POLICY] > TALLY_STALE_FAIL_CLOSED || c->w[TALLY__RW_CLEAR_RATIO_PPM] == 0 ||
	    c->w[TALLY__RW_CLEAR_RATIO_PPM] > 1000000)
		return tally__fail(TALLY_ECORRUPT, "rules section: entry %u: levels out of range", entry);
	memset(out, 0, sizeof(*out));
	memcpy(out->pattern, p, len + 1);
	out->is_default = entry == 0;
	out->index = entry;
	struct tally_threshold_rule *r = &out->levels;
	r->p95_warn_ns = c->w[TALLY__RW_P95_WARN];
	r->p95_overload_ns = c->w[TALLY__RW_P95_OVERLOAD];
	r->pending_warn = c->w[TALLY__RW_PENDING_WARN];
	r->pending_overload = c->w[TALLY__RW_PENDING_OVERLOAD];
	r->wait_p95_warn_ns = c->w[TALLY__RW_WAIT_WARN];
	r->wait_p95_overload_ns = c->w[TALLY__RW_WAIT_OVERLOAD];
	r->codel_target_ns = c->w[TALLY__RW_CODEL_TARGET];
	r->codel_interval_ms = u32_of(c->w[TALLY__RW_CODEL_INTERVAL_MS]);
	r->min_samples = c->w[TALLY__RW_MIN_SAMPLES];
	r->stale_after_ms = u32_of(c->w[TALLY__RW_STALE_AFTER_MS]);
	r->stale_policy = (enum tally_stale_policy)c->w[TALLY__RW_STALE_POLICY];
	r->clear_ratio = (double)c->w[TALLY__RW_CLEAR_RATIO_PPM] / 1e6;
	r->min_dwell_ms = u32_of(c->w[TALLY__RW_MIN_DWELL_MS]);
	r->retry_after_ms = u32_of(c->w[TALLY__RW_RETRY_AFTER_MS]);
	r->retry_after_max_ms = u32_of(c->w[TALLY__RW_RETRY_AFTER_MAX_MS]);
	r->stall_after_ms = u32_of(c->w[TALLY__RW_STALL_AFTER_MS]);
	return 0;
}

int tally__rules_read(const void *section, uint64_t len, uint32_t entry, uint32_t gen,
		      struct tally_rule_info *out)
{
	const struct tally__rules_hdr *h = section;

	if (len < sizeof(*h) || h->magic != TALLY__RULES_MAGIC || h->version != TALLY__RULES_VERSION ||
	    h->entry_size != sizeof(struct tally__rules_entry) || h->capacity == 0 ||
	    tally__rules_section_size(h->capacity) > len)
		return tally__fail(TALLY_ECORRUPT, "rules section: its header does not match its size");
	uint32_t cap = h->capacity; /* read once: the checks above hold for this value */
	if (cap > TALLY__RULES_CAP * 16u || entry >= cap)
		return -ENOENT;
	const struct tally__rules_entry *e = (const struct tally__rules_entry *)(h + 1) + entry;
	for (int tries = 0; tries < TALLY__RULES_READ_TRIES; tries++) {
		struct entry_copy c;
		uint32_t s1 = atomic_load_explicit(&h->seq, memory_order_acquire);
		if (s1 & 1u)
			continue;
		uint32_t count = atomic_load_explicit(&h->count, memory_order_acquire);
		uint64_t g = atomic_load_explicit(&h->gen, memory_order_acquire);
		uint64_t total = atomic_load_explicit(&h->total, memory_order_acquire);
		for (uint32_t i = 0; i < TALLY__RULES_PATTERN_WORDS; i++)
			c.pattern[i] = atomic_load_explicit(&e->pattern[i], memory_order_acquire);
		for (uint32_t i = 0; i < TALLY__RW_WORDS; i++)
			c.w[i] = atomic_load_explicit(&e->w[i], memory_order_acquire);
		atomic_thread_fence(memory_order_acquire);
		if (atomic_load_explicit(&h->seq, memory_order_relaxed) != s1)
			continue;
		if (count == 0 || entry >= count || count > cap)
			return -ENOENT;
		if ((uint32_t)g != gen)
			return -ESTALE;
		int rc = entry_check(&c, entry, out);
		if (rc)
			return rc;
		out->rules_total = total;
		return 0;
	}
	return -EAGAIN;
}
