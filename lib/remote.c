/* SPDX-License-Identifier: MIT */
/*
 * lib/remote.c: the remote section (layout, seqlock and validation in
 * remote.h): other hosts' verdicts as this host's share thread mirrors
 * them. Owns the section's format, the writer's seqlock stores and every
 * reader's checks; who writes what and when is lib/share.c's.
 */
#include "remote.h"
#include "subject.h"

#include <ck_backoff.h>
#include <errno.h>
#include <math.h>
#include <string.h>

#define STATUS_OFF  ((size_t)sizeof(struct tally__remote_header))
#define ENTRIES_OFF (STATUS_OFF + sizeof(struct tally__remote_status))

_Static_assert(ENTRIES_OFF % 64 == 0, "entries start on a cache line");

/* Between tries: back off (doubling, as pending.c), the writer may be preempted mid-write. */
static void pause_try(int i, ck_backoff_t *b)
{
	if (i) {
		ck_backoff_t p = *b;

		ck_backoff_eb(&p);
		if (*b < 4096)
			*b <<= 1;
	}
}

#define LOAD(x) atomic_load_explicit(&(x), memory_order_acquire)
#define SET(x, v) atomic_store_explicit(&(x), (v), memory_order_release)

size_t tally__remote_section_size(uint32_t capacity)
{
	if (capacity == 0 || capacity > TALLY__REMOTE_MAX_CAPACITY)
		return 0;
	return ENTRIES_OFF + (size_t)capacity * sizeof(struct tally__remote_entry);
}

int tally__remote_init(void *section, size_t len, uint32_t capacity)
{
	size_t need = tally__remote_section_size(capacity);
	struct tally__remote_header *h = section;

	if (!section || need == 0 || len < need)
		return -EINVAL;
	memset(section, 0, need);
	h->version = TALLY__REMOTE_VERSION;
	h->header_size = sizeof(struct tally__remote_header);
	h->status_size = sizeof(struct tally__remote_status);
	h->entry_size = sizeof(struct tally__remote_entry);
	h->capacity = capacity;
	h->section_size = need;
	h->magic = TALLY__REMOTE_MAGIC; /* last, as pending.c: published by the segment's ready word */
	return 0;
}

/* One load of a header word: every producer maps the section writable. */
static uint32_t hdr_word(const uint32_t *w)
{
	return __atomic_load_n(w, __ATOMIC_RELAXED);
}

int tally__remote_check(const void *section, size_t len)
{
	const struct tally__remote_header *h = section;
	uint32_t capacity;
	uint64_t size;

	if (!section || len < sizeof(*h))
		return -EBADMSG;
	capacity = hdr_word(&h->capacity);
	size = __atomic_load_n(&h->section_size, __ATOMIC_RELAXED);
	if (hdr_word(&h->magic) != TALLY__REMOTE_MAGIC || hdr_word(&h->version) != TALLY__REMOTE_VERSION ||
	    hdr_word(&h->header_size) != sizeof(struct tally__remote_header) ||
	    hdr_word(&h->status_size) != sizeof(struct tally__remote_status) ||
	    hdr_word(&h->entry_size) != sizeof(struct tally__remote_entry) ||
	    tally__remote_section_size(capacity) == 0 || size != tally__remote_section_size(capacity) ||
	    size > len)
		return -EBADMSG;
	return (int)capacity;
}

/* ---- strings in 64-bit atomic words ---- */

static void store_str(_Atomic uint64_t *words, size_t nwords, const char *s)
{
	char buf[TALLY__REMOTE_SUBJ_MAX] = { 0 };
	size_t cap = nwords * 8;

	if (s)
		memcpy(buf, s, strnlen(s, cap - 1));
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

#define STORE_STR(f, s) store_str((f), sizeof(f) / 8, (s))
#define LOAD_STR(f, d) load_str((f), sizeof(f) / 8, (d))

static uint64_t dbits(double d)
{
	uint64_t u;

	memcpy(&u, &d, sizeof(u));
	return u;
}

static double bitsd(uint64_t u)
{
	double d;

	memcpy(&d, &u, sizeof(d));
	return d;
}

/* ---- validation ---- */

bool tally__remote_host_ok(const char *host)
{
	size_t n = strnlen(host, TALLY__REMOTE_HOST_MAX);

	if (n == 0 || n >= TALLY__REMOTE_HOST_MAX)
		return false;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)host[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
		      c == '-'))
			return false;
	}
	return true;
}

static bool unit(double d)
{
	return isfinite(d) && d >= 0.0 && d <= 1.0;
}

bool tally__remote_view_ok(const struct tally__remote_view *v)
{
	size_t n = strnlen(v->subject, sizeof(v->subject));

	return v->verdict <= 3 && v->combine <= TALLY__COMBINE_MAX && unit(v->pressure) && unit(v->shed) &&
	       tally__remote_host_ok(v->host) && n < sizeof(v->subject) &&
	       tally__subject_check(v->subject, n, false, NULL, 0) == 0;
}

const char *tally__share_state_name(uint32_t state)
{
	static const char *const names[] = { "off", "connecting", "running", "failing", "stopped" };

	return state <= TALLY__SHARE_STATE_MAX ? names[state] : "?";
}

/* ---- writer ---- */

struct tally__remote_entry *tally__remote_entry_at(void *section, uint32_t idx)
{
	return (struct tally__remote_entry *)(void *)((char *)section + ENTRIES_OFF) + idx;
}

struct tally__remote_status *tally__remote_status_at(void *section)
{
	return (void *)((char *)section + STATUS_OFF);
}

/* seq+1 (the release stores that follow are ordered after it), ..., seq+2 release: pending.c's. */
static uint32_t write_begin(_Atomic uint32_t *seq)
{
	uint32_t s = atomic_load_explicit(seq, memory_order_relaxed);

	atomic_store_explicit(seq, s + 1, memory_order_relaxed);
	return s;
}

static void write_end(_Atomic uint32_t *seq, uint32_t s)
{
	atomic_store_explicit(seq, s + 2, memory_order_release);
}

static void store_entry(struct tally__remote_entry *e, const struct tally__remote_view *v)
{
	SET(e->verdict, v->verdict);
	SET(e->reasons, v->reasons);
	SET(e->combine, v->combine);
	SET(e->retry_after_ms, v->retry_after_ms);
	SET(e->pressure, dbits(v->pressure));
	SET(e->shed, dbits(v->shed));
	SET(e->p95_ns, v->p95_ns);
	SET(e->pending, v->pending);
	SET(e->origin_ns, v->origin_ns);
	SET(e->received_ns, v->received_ns);
	SET(e->revision, v->revision);
	STORE_STR(e->host, v->host);
	STORE_STR(e->subject, v->subject);
}

void tally__remote_write_entry(struct tally__remote_entry *e, const struct tally__remote_view *v)
{
	uint32_t s = write_begin(&e->seq);

	store_entry(e, v);
	SET(e->used, 1u);
	write_end(&e->seq, s);
}

void tally__remote_clear_entry(struct tally__remote_entry *e)
{
	static const struct tally__remote_view zero;
	uint32_t s = write_begin(&e->seq);

	SET(e->used, 0u);
	store_entry(e, &zero);
	write_end(&e->seq, s);
}

void tally__remote_write_status(struct tally__remote_status *b, const struct tally__remote_status_view *v)
{
	uint32_t s = write_begin(&b->seq);

	SET(b->state, v->state);
	SET(b->connected, v->connected);
	SET(b->stale_after_ms, v->stale_after_ms);
	SET(b->max_age_ms, v->max_age_ms);
	SET(b->refresh_ms, v->refresh_ms);
	SET(b->puts, v->puts);
	SET(b->put_errors, v->put_errors);
	SET(b->updates, v->updates);
	SET(b->rejected, v->rejected);
	SET(b->expired, v->expired);
	SET(b->full, v->full);
	SET(b->since_ns, v->since_ns);
	SET(b->last_put_ns, v->last_put_ns);
	SET(b->last_error_ns, v->last_error_ns);
	STORE_STR(b->host, v->host);
	STORE_STR(b->bucket, v->bucket);
	STORE_STR(b->last_error, v->last_error);
	write_end(&b->seq, s);
}

/* ---- readers ---- */

static void load_entry(const struct tally__remote_entry *e, struct tally__remote_view *o)
{
	o->verdict = LOAD(e->verdict);
	o->reasons = LOAD(e->reasons);
	o->combine = LOAD(e->combine);
	o->retry_after_ms = LOAD(e->retry_after_ms);
	o->pressure = bitsd(LOAD(e->pressure));
	o->shed = bitsd(LOAD(e->shed));
	o->p95_ns = LOAD(e->p95_ns);
	o->pending = LOAD(e->pending);
	o->origin_ns = LOAD(e->origin_ns);
	o->received_ns = LOAD(e->received_ns);
	o->revision = LOAD(e->revision);
	LOAD_STR(e->host, o->host);
	LOAD_STR(e->subject, o->subject);
}

int tally__remote_read_entry(const void *section, size_t len, uint32_t idx, struct tally__remote_view *out)
{
	return tally__remote_read_entry_tries(section, len, idx, out, TALLY__REMOTE_READ_TRIES);
}

int tally__remote_read_entry_tries(const void *section, size_t len, uint32_t idx, struct tally__remote_view *out,
				   int tries)
{
	const struct tally__remote_entry *e;
	int cap = tally__remote_check(section, len);

	if (cap < 0)
		return cap;
	if (idx >= (uint32_t)cap)
		return -ERANGE;
	e = (const struct tally__remote_entry *)(const void *)((const char *)section + ENTRIES_OFF) + idx;
	ck_backoff_t backoff = 16;

	for (int i = 0; i < tries; i++) {
		uint32_t s1, used;

		pause_try(i, &backoff);
		s1 = atomic_load_explicit(&e->seq, memory_order_acquire);
		if (s1 & 1u)
			continue;
		used = LOAD(e->used);
		if (used)
			load_entry(e, out);
		if (atomic_load_explicit(&e->seq, memory_order_relaxed) != s1)
			continue;
		if (!used)
			return -ENOENT;
		return tally__remote_view_ok(out) ? 0 : -EBADMSG;
	}
	return -EAGAIN;
}

static void load_status(const struct tally__remote_status *b, struct tally__remote_status_view *o)
{
	o->state = LOAD(b->state);
	o->connected = LOAD(b->connected);
	o->stale_after_ms = LOAD(b->stale_after_ms);
	o->max_age_ms = LOAD(b->max_age_ms);
	o->refresh_ms = LOAD(b->refresh_ms);
	o->puts = LOAD(b->puts);
	o->put_errors = LOAD(b->put_errors);
	o->updates = LOAD(b->updates);
	o->rejected = LOAD(b->rejected);
	o->expired = LOAD(b->expired);
	o->full = LOAD(b->full);
	o->since_ns = LOAD(b->since_ns);
	o->last_put_ns = LOAD(b->last_put_ns);
	o->last_error_ns = LOAD(b->last_error_ns);
	LOAD_STR(b->host, o->host);
	LOAD_STR(b->bucket, o->bucket);
	LOAD_STR(b->last_error, o->last_error);
}

int tally__remote_read_status(const void *section, size_t len, struct tally__remote_status_view *out)
{
	const struct tally__remote_status *b;
	int cap = tally__remote_check(section, len);

	if (cap < 0)
		return cap;
	ck_backoff_t backoff = 16;

	b = (const void *)((const char *)section + STATUS_OFF);
	for (int i = 0; i < TALLY__REMOTE_READ_TRIES; i++) {
		uint32_t s1;

		pause_try(i, &backoff);
		s1 = atomic_load_explicit(&b->seq, memory_order_acquire);
		if (s1 & 1u)
			continue;
		load_status(b, out);
		if (atomic_load_explicit(&b->seq, memory_order_relaxed) != s1)
			continue;
		if (out->state > TALLY__SHARE_STATE_MAX || !memchr(out->host, 0, sizeof(out->host)) ||
		    !memchr(out->bucket, 0, sizeof(out->bucket)) ||
		    !memchr(out->last_error, 0, sizeof(out->last_error)))
			return -EBADMSG;
		return 0;
	}
	return -EAGAIN;
}
