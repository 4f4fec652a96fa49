/* SPDX-License-Identifier: MIT */
/*
 * lib/pending.c: the pending table section of the segment: formatting it,
 * the single writer's seqlock publication of entries and of the breaker
 * block, the validating readers, and the per-subject combination of
 * backlogs. The layout, the seqlock protocol and the combination rule are
 * described in pending.h.
 */
#include <ck_backoff.h>

#include "pending.h"
#include "subject.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define HDR_OFF     0u
#define BREAKER_OFF ((size_t)sizeof(struct tally__pending_header))
#define ENTRIES_OFF (BREAKER_OFF + sizeof(struct tally__pending_breaker))

_Static_assert(ENTRIES_OFF % 64 == 0, "entries start on a cache line");

uint64_t tally__pending_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

size_t tally__pending_section_size(uint32_t capacity)
{
	if (capacity == 0 || capacity > TALLY__PENDING_MAX_CAPACITY)
		return 0;
	return ENTRIES_OFF + (size_t)capacity * sizeof(struct tally__pending_entry);
}

int tally__pending_init(void *section, size_t len, uint32_t capacity)
{
	size_t need = tally__pending_section_size(capacity);
	struct tally__pending_header *h = section;

	if (!section || need == 0 || len < need)
		return -EINVAL;
	memset(section, 0, need);
	h->version = TALLY__PENDING_VERSION;
	h->header_size = sizeof(struct tally__pending_header);
	h->breaker_size = sizeof(struct tally__pending_breaker);
	h->entry_size = sizeof(struct tally__pending_entry);
	h->capacity = capacity;
	h->section_size = need;
	/* Magic last: a reader that sees it sees a formatted section (the
	 * segment's ready word, stored with release, publishes all of it). */
	h->magic = TALLY__PENDING_MAGIC;
	return 0;
}

/* One load of a header word. Every producer maps the section writable, so
 * a word may change between two plain reads of it; each is read once, and
 * only the copy is checked and used. */
static uint32_t hdr_word(const uint32_t *w)
{
	return __atomic_load_n(w, __ATOMIC_RELAXED);
}

int tally__pending_check(const void *section, size_t len)
{
	const struct tally__pending_header *h = section;

	if (!section || len < sizeof(*h))
		return -EBADMSG;
	uint32_t capacity = hdr_word(&h->capacity);
	uint64_t section_size = __atomic_load_n(&h->section_size, __ATOMIC_RELAXED);
	if (hdr_word(&h->magic) != TALLY__PENDING_MAGIC || hdr_word(&h->version) != TALLY__PENDING_VERSION ||
	    hdr_word(&h->header_size) != sizeof(struct tally__pending_header) ||
	    hdr_word(&h->breaker_size) != sizeof(struct tally__pending_breaker) ||
	    hdr_word(&h->entry_size) != sizeof(struct tally__pending_entry))
		return -EBADMSG;
	if (capacity == 0 || capacity > TALLY__PENDING_MAX_CAPACITY ||
	    section_size != tally__pending_section_size(capacity) || section_size > len)
		return -EBADMSG;
	return (int)capacity;
}

/* The section is page-aligned and ENTRIES_OFF and BREAKER_OFF are
 * multiples of the structs' alignment: through void *, as -Wcast-align
 * (clang) cannot know that. */
struct tally__pending_entry *tally__pending_entry_at(void *section, uint32_t idx)
{
	struct tally__pending_entry *entries = (void *)((char *)section + ENTRIES_OFF);

	return entries + idx;
}

struct tally__pending_breaker *tally__pending_breaker_at(void *section)
{
	return (void *)((char *)section + BREAKER_OFF);
}

static const struct tally__pending_entry *entry_at_c(const void *section, uint32_t idx)
{
	const struct tally__pending_entry *entries = (const void *)((const char *)section + ENTRIES_OFF);

	return entries + idx;
}

/* ---- strings packed into relaxed 64-bit atomic words ---- */

static void store_str(_Atomic uint64_t *words, size_t nwords, const char *s)
{
	char buf[TALLY__PENDING_SUBJ_MAX] = { 0 };
	size_t cap = nwords * 8;

	if (s) {
		size_t n = strnlen(s, cap - 1);

		memcpy(buf, s, n);
	}
	for (size_t i = 0; i < nwords; i++) {
		uint64_t w;

		memcpy(&w, buf + i * 8, 8);
		atomic_store_explicit(&words[i], w, memory_order_release);
	}
}

static void load_str(const _Atomic uint64_t *words, size_t nwords, char *dst)
{
	for (size_t i = 0; i < nwords; i++) {
		uint64_t w = atomic_load_explicit(&words[i], memory_order_acquire);

		memcpy(dst + i * 8, &w, 8);
	}
}

/* A string field read from shm must end inside its field. */
static bool str_ok(const char *s, size_t cap)
{
	return memchr(s, '\0', cap) != NULL;
}

#define STORE_STR(field, s) store_str((field), sizeof(field) / 8, (s))
#define LOAD_STR(field, dst) load_str((field), sizeof(field) / 8, (dst))
/* Seqlock fields: stores release and loads acquire instead of relaxed
 * accesses between fences. Same guarantees, no cost on x86 (plain moves),
 * and ThreadSanitizer, which does not model atomic_thread_fence, follows
 * them: a store after the odd sequence is ordered after it (release), and
 * a field load is ordered before the sequence re-check (acquire). */
#define RELAXED(x) atomic_load_explicit(&(x), memory_order_acquire)
#define SET(x, v) atomic_store_explicit(&(x), (v), memory_order_release)

/* ---- writer side ---- */

static uint32_t write_begin(_Atomic uint32_t *seq)
{
	uint32_t s = atomic_load_explicit(seq, memory_order_relaxed);

	/* The field stores that follow are release stores, so each is ordered
	 * after this odd sequence: a reader that sees any new field also sees
	 * the odd (or a later) sequence. */
	atomic_store_explicit(seq, s + 1, memory_order_relaxed);
	return s;
}

static void write_end(_Atomic uint32_t *seq, uint32_t s)
{
	/* Release: the field stores are visible before the even sequence. */
	atomic_store_explicit(seq, s + 2, memory_order_release);
}

static void store_entry_fields(struct tally__pending_entry *e, const struct tally__pending_values *v)
{
	SET(e->source, v->source);
	SET(e->is_leader, v->is_leader);
	SET(e->consecutive_failures, v->consecutive_failures);
	SET(e->num_pending, v->num_pending);
	SET(e->num_ack_pending, v->num_ack_pending);
	SET(e->num_redelivered, v->num_redelivered);
	SET(e->num_waiting, v->num_waiting);
	SET(e->delivered_stream_seq, v->delivered_stream_seq);
	SET(e->ack_floor_stream_seq, v->ack_floor_stream_seq);
	SET(e->last_ok_ns, v->last_ok_ns);
	SET(e->kind, v->kind);
	STORE_STR(e->stream, v->stream);
	STORE_STR(e->consumer, v->consumer);
	STORE_STR(e->filter, v->filter);
	STORE_STR(e->map, v->map);
	STORE_STR(e->last_error, v->last_error);
	STORE_STR(e->server, v->server);
}

void tally__pending_write_entry(struct tally__pending_entry *e, const struct tally__pending_values *v)
{
	uint32_t s = write_begin(&e->seq);

	store_entry_fields(e, v);
	SET(e->used, 1u);
	write_end(&e->seq, s);
}

void tally__pending_clear_entry(struct tally__pending_entry *e)
{
	static const struct tally__pending_values zero = { .is_leader = -1 };
	uint32_t s = write_begin(&e->seq);

	SET(e->used, 0u);
	store_entry_fields(e, &zero);
	write_end(&e->seq, s);
}

void tally__pending_write_breaker(struct tally__pending_breaker *b,
				  const struct tally__pending_breaker_view *v)
{
	uint32_t s = write_begin(&b->seq);

	SET(b->state, v->state);
	SET(b->consecutive_failures, v->consecutive_failures);
	SET(b->connected, v->connected ? 1u : 0u);
	SET(b->opens_total, v->opens_total);
	SET(b->polls_ok, v->polls_ok);
	SET(b->polls_failed, v->polls_failed);
	SET(b->skipped_overrun, v->skipped_overrun);
	SET(b->skipped_open, v->skipped_open);
	SET(b->since_ns, v->since_ns);
	SET(b->last_ok_ns, v->last_ok_ns);
	SET(b->untracked, v->untracked);
	SET(b->last_error_ns, v->last_error_ns);
	STORE_STR(b->last_error, v->last_error);
	write_end(&b->seq, s);
}

/* ---- reader side ---- */

/* Copy what tally__pending_for_subject needs, or everything when full. */
static void load_entry_fields(const struct tally__pending_entry *e, struct tally__pending_view *o,
			      bool full)
{
	o->source = RELAXED(e->source);
	o->kind = RELAXED(e->kind);
	o->num_pending = RELAXED(e->num_pending);
	o->num_ack_pending = RELAXED(e->num_ack_pending);
	o->last_ok_ns = RELAXED(e->last_ok_ns);
	LOAD_STR(e->filter, o->filter);
	LOAD_STR(e->map, o->map);
	if (!full)
		return;
	o->is_leader = RELAXED(e->is_leader);
	o->consecutive_failures = RELAXED(e->consecutive_failures);
	o->num_redelivered = RELAXED(e->num_redelivered);
	o->num_waiting = RELAXED(e->num_waiting);
	o->delivered_stream_seq = RELAXED(e->delivered_stream_seq);
	o->ack_floor_stream_seq = RELAXED(e->ack_floor_stream_seq);
	LOAD_STR(e->stream, o->stream);
	LOAD_STR(e->consumer, o->consumer);
	LOAD_STR(e->last_error, o->last_error);
	LOAD_STR(e->server, o->server);
}

static bool view_ok(const struct tally__pending_view *o, bool full)
{
	if (o->source > TALLY__PENDING_SOURCE_MAX || o->kind > TALLY__PENDING_KIND_MAX || !str_ok(o->filter, sizeof(o->filter)) ||
	    !str_ok(o->map, sizeof(o->map)))
		return false;
	return !full || (str_ok(o->stream, sizeof(o->stream)) &&
			 str_ok(o->consumer, sizeof(o->consumer)) &&
			 str_ok(o->last_error, sizeof(o->last_error)) &&
			 str_ok(o->server, sizeof(o->server)) &&
			 o->is_leader >= -1 && o->is_leader <= 1);
}

static int read_entry(const struct tally__pending_entry *e, struct tally__pending_view *o, bool full,
		      int tries)
{
	ck_backoff_t backoff = 16; /* iterations; doubles on every retry */

	for (int i = 0; i < tries; i++) {
		uint32_t s1, used;

		/* A writer inside (odd) or one that moved under us: back off
		 * instead of spinning, it may be preempted mid-write. The
		 * wait (a compiler-barrier loop, ck_backoff_eb) doubles up to
		 * 4096 iterations, about 2^18 in all at 64 tries: a writer held
		 * longer is the caller's to judge (the engine keeps the last
		 * good copy, and spends fewer tries once several failed). */
		if (i) {
			ck_backoff_t pause = backoff;
			ck_backoff_eb(&pause);
			if (backoff < 4096)
				backoff <<= 1;
		}
		s1 = atomic_load_explicit(&e->seq, memory_order_acquire);
		if (s1 & 1u)
			continue;
		used = RELAXED(e->used);
		if (used)
			load_entry_fields(e, o, full);
		/* The field loads are acquire: they complete before the re-check. */
		if (atomic_load_explicit(&e->seq, memory_order_relaxed) != s1)
			continue;
		if (used == 0)
			return -ENOENT;
		return view_ok(o, full) ? 0 : -EBADMSG;
	}
	return -EAGAIN;
}

int tally__pending_read_entry(const void *section, size_t len, uint32_t idx,
			      struct tally__pending_view *out)
{
	int cap = tally__pending_check(section, len);

	if (cap < 0)
		return cap;
	if (idx >= (uint32_t)cap)
		return -ERANGE;
	return read_entry(entry_at_c(section, idx), out, true, TALLY__PENDING_READ_TRIES);
}

int tally__pending_read_entry_cap(const void *section, size_t len, uint32_t capacity, uint32_t idx,
				  struct tally__pending_view *out, int tries)
{
	size_t need = tally__pending_section_size(capacity);

	if (!section || need == 0 || need > len)
		return -EINVAL;
	if (idx >= capacity)
		return -ERANGE;
	return read_entry(entry_at_c(section, idx), out, true, tries < 1 ? 1 : tries);
}

static void load_breaker_fields(const struct tally__pending_breaker *b,
				struct tally__pending_breaker_view *o)
{
	o->state = RELAXED(b->state);
	o->consecutive_failures = RELAXED(b->consecutive_failures);
	o->connected = RELAXED(b->connected) != 0;
	o->opens_total = RELAXED(b->opens_total);
	o->polls_ok = RELAXED(b->polls_ok);
	o->polls_failed = RELAXED(b->polls_failed);
	o->skipped_overrun = RELAXED(b->skipped_overrun);
	o->skipped_open = RELAXED(b->skipped_open);
	o->since_ns = RELAXED(b->since_ns);
	o->last_ok_ns = RELAXED(b->last_ok_ns);
	o->untracked = RELAXED(b->untracked);
	o->last_error_ns = RELAXED(b->last_error_ns);
	LOAD_STR(b->last_error, o->last_error);
}

int tally__pending_read_breaker(const void *section, size_t len,
				struct tally__pending_breaker_view *out)
{
	const struct tally__pending_breaker *b;
	int cap = tally__pending_check(section, len);

	if (cap < 0)
		return cap;
	b = (const void *)((const char *)section + BREAKER_OFF);
	for (int i = 0; i < TALLY__PENDING_READ_TRIES; i++) {
		uint32_t s1 = atomic_load_explicit(&b->seq, memory_order_acquire);

		if (s1 & 1u)
			continue;
		load_breaker_fields(b, out);
		if (atomic_load_explicit(&b->seq, memory_order_relaxed) != s1)
			continue;
		if (out->state > TALLY__BREAKER_HALF_OPEN ||
		    !str_ok(out->last_error, sizeof(out->last_error)))
			return -EBADMSG;
		return 0;
	}
	return -EAGAIN;
}

int tally__pending_read_name(const void *section, size_t len, uint32_t idx, char *buf, size_t cap)
{
	char stream[TALLY__PENDING_NAME_MAX], consumer[TALLY__PENDING_NAME_MAX];
	const struct tally__pending_entry *e;
	int cnt = tally__pending_check(section, len);

	if (cap)
		buf[0] = '\0';
	if (cnt < 0)
		return cnt;
	if (idx >= (uint32_t)cnt)
		return -ERANGE;
	e = entry_at_c(section, idx);
	for (int i = 0; i < TALLY__PENDING_READ_TRIES; i++) {
		uint32_t s1 = atomic_load_explicit(&e->seq, memory_order_acquire), used;

		if (s1 & 1u)
			continue;
		used = RELAXED(e->used);
		LOAD_STR(e->stream, stream);
		LOAD_STR(e->consumer, consumer);
		if (atomic_load_explicit(&e->seq, memory_order_relaxed) != s1)
			continue;
		if (!used)
			return -ENOENT;
		if (!str_ok(stream, sizeof(stream)) || !str_ok(consumer, sizeof(consumer)))
			return -EBADMSG;
		if (cap)
			snprintf(buf, cap, "%s/%s", stream, consumer);
		return 0;
	}
	return -EAGAIN;
}

/* ---- combination per subject ---- */

/* Trust rank within a tier: higher is less trustworthy (struct tally__pending_result). */
static int rank(uint32_t source)
{
	static const int r[] = { [TALLY__PENDING_LIVE] = 0, [TALLY__PENDING_CACHED] = 1,
				 [TALLY__PENDING_NEVER] = 2, [TALLY__PENDING_NOTFOUND] = 0,
				 [TALLY__PENDING_GONE] = 1 };

	return r[source];
}

static uint64_t entry_age(const struct tally__pending_view *v, uint64_t now)
{
	if (v->last_ok_ns == 0)
		return UINT64_MAX;
	return now > v->last_ok_ns ? now - v->last_ok_ns : 0;
}

uint32_t tally__pending_tier(const struct tally__pending_view *v, const struct tally__pending_policy *pol,
			     uint64_t now)
{
	if (v->source == TALLY__PENDING_GONE || v->source == TALLY__PENDING_NOTFOUND)
		return TALLY__PENDING_TIER_ABSENT;
	if (v->source == TALLY__PENDING_NEVER || v->last_ok_ns == 0)
		return TALLY__PENDING_TIER_STALE;
	if (pol->stale_after_ns && entry_age(v, now) > pol->stale_after_ns)
		return TALLY__PENDING_TIER_STALE;
	return TALLY__PENDING_TIER_FRESH;
}

static uint64_t entry_backlog(const struct tally__pending_view *v, const struct tally__pending_policy *pol)
{
	uint64_t b;

	if ((v->source != TALLY__PENDING_LIVE && v->source != TALLY__PENDING_CACHED) ||
	    v->kind == TALLY__PENDING_SPLIT)
		return 0; /* a split consumer's backlog is in its per-subject entries */
	b = v->num_pending;
	if (pol->include_ack_pending)
		b = b + v->num_ack_pending < b ? UINT64_MAX : b + v->num_ack_pending;
	return b;
}

void tally__pending_combine(struct tally__pending_result *out, const struct tally__pending_view *v,
			    uint32_t idx, const struct tally__pending_policy *pol, uint64_t now)
{
	uint32_t tier = tally__pending_tier(v, pol, now);
	uint64_t backlog = entry_backlog(v, pol);
	uint64_t age = tier == TALLY__PENDING_TIER_ABSENT ? 0 : entry_age(v, now);

	out->matched++;
	if (tier != TALLY__PENDING_TIER_ABSENT)
		out->counted++;
	if (out->matched == 1 || tier > out->tier) {
		/* first entry, or the first of a better tier: it alone decides so far */
		out->tier = tier;
		out->source = v->source;
		out->backlog = backlog;
		out->oldest_age_ns = age;
		out->top = tier == TALLY__PENDING_TIER_ABSENT ? UINT32_MAX : idx;
		return;
	}
	if (tier < out->tier)
		return; /* a worse tier never counts beside a better one */
	if (rank(v->source) > rank(out->source))
		out->source = v->source;
	if (tier != TALLY__PENDING_TIER_ABSENT && backlog > out->backlog) {
		out->backlog = backlog;
		out->top = idx;
	}
	if (age > out->oldest_age_ns)
		out->oldest_age_ns = age;
}

int tally__pending_for_subject(const void *section, size_t len, const char *subject,
			       const struct tally__pending_policy *pol,
			       struct tally__pending_result *out)
{
	static const struct tally__pending_policy def = { .include_ack_pending = true };
	struct tally__pending_view v;
	uint64_t now = tally__pending_now_ns();
	int cap = tally__pending_check(section, len), rc = 0;

	if (cap < 0)
		return cap;
	if (!subject || !out)
		return -EINVAL;
	*out = TALLY__PENDING_RESULT_INIT;
	for (uint32_t i = 0; i < (uint32_t)cap; i++) {
		int r = read_entry(entry_at_c(section, i), &v, false, TALLY__PENDING_READ_TRIES);
		const char *pattern;

		if (r == -ENOENT)
			continue;
		if (r < 0) {
			rc = r == -EBADMSG ? r : (rc ? rc : r);
			continue;
		}
		pattern = v.map[0] ? v.map : v.filter;
		if (pattern[0] && tally__subject_match(pattern, subject))
			tally__pending_combine(out, &v, i, pol ? pol : &def, now);
	}
	return rc;
}

const char *tally__pending_source_name(uint32_t source)
{
	static const char *const names[] = { "never", "live", "cached", "gone", "not_found" };

	return source <= TALLY__PENDING_SOURCE_MAX ? names[source] : "?";
}

const char *tally__breaker_state_name(uint32_t state)
{
	static const char *const names[] = { "closed", "open", "half-open" };

	return state < 3 ? names[state] : "?";
}
