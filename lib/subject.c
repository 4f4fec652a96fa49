/* SPDX-License-Identifier: MIT */
/*
 * subject.c: NATS subject names and the segment's subject table.
 *
 * The table maps names to small ids that mean the same thing in every
 * process attached to the segment. It is an open-addressing hash table
 * with linear probing, at most half full, whose entries are never removed,
 * so an id is simply the entry's index and stays valid for the segment's
 * life. Interning is lock-free across processes: a new name claims the
 * first empty entry of its probe sequence with one CAS, writes the name,
 * then stores READY with release. Two processes interning the same name
 * walk the same probe sequence, so the loser of the CAS finds the
 * winner's entry, waits (bounded) for READY and returns the same id: a
 * name can never get two ids.
 *
 * Entry states (shm_layout.h) and who moves them:
 *   EMPTY -> CLAIMED      claimer, CAS (and subjects_used counted first)
 *   CLAIMED -> READY      claimer, CAS, after hash, len, pid and name
 *   CLAIMED -> TOMBSTONE  owner's reaper, CAS, once the claimer's pid is
 *                         gone, or the entry has been CLAIMED for
 *                         TALLY__CLAIM_TIMEOUT_MS (timed in the owner's
 *                         memory: the claimer may have died before it
 *                         stored its pid). A claimer that loses this race
 *                         (it stalled) sees its CAS to READY fail and
 *                         probes again; tombstones are skipped by every
 *                         probe, so no name gets two ids.
 * So an entry left CLAIMED by a SIGKILL anywhere in the claim holds up
 * interns and lookups that pass it for at most TALLY__CLAIM_TIMEOUT_MS +
 * one reap interval; each such call waits up to INTERN_WAIT_NS, then
 * returns -EAGAIN (try again) if the owner has not cleared it yet.
 */
#include "config.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <ck_backoff.h>

#include "common.h"
#include "failpoint.h"
#include "proc.h"
#include "segment.h"
#include "subject.h"

#define INTERN_WAIT_NS (200u * 1000u * 1000u) /* wait for a half-written entry */

uint32_t tally__subject_hash(const char *s, size_t len)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < len; i++) {
		h ^= (unsigned char)s[i];
		h *= 16777619u;
	}
	return h;
}

uint32_t tally__subject_table_size(uint32_t capacity)
{
	uint32_t n = 16;

	while (n < 2u * capacity && n < (1u << 30))
		n <<= 1;
	return n;
}

TALLY_API size_t tally_utf8_seq(const unsigned char *s, size_t n)
{
	if (n == 0)
		return 0;
	unsigned char c = s[0];
	if (c < 0x80)
		return 1;
	size_t len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 ? 2 : 0;

	if (len == 0 || c > 0xf4 || len > n)
		return 0;
	for (size_t i = 1; i < len; i++)
		if ((s[i] & 0xc0) != 0x80)
			return 0;
	if ((c == 0xe0 && s[1] < 0xa0) || (c == 0xed && s[1] >= 0xa0) || (c == 0xf0 && s[1] < 0x90) ||
	    (c == 0xf4 && s[1] >= 0x90))
		return 0;
	return len;
}

static int check_token(const char *tok, size_t n, bool last, bool allow_wildcards,
		       size_t at, char *why, size_t why_len)
{
	if (n == 0) {
		snprintf(why, why_len, "empty token at byte %zu (two dots in a row, or a leading or trailing dot)", at);
		return TALLY_EBADNAME;
	}
	bool wild = n == 1 && (tok[0] == '*' || tok[0] == '>');
	if (wild && !allow_wildcards) {
		snprintf(why, why_len, "wildcard '%c' at byte %zu: recorded subjects must be literal", tok[0], at);
		return TALLY_EBADNAME;
	}
	if (wild && tok[0] == '>' && !last) {
		snprintf(why, why_len, "'>' at byte %zu must be the last token", at);
		return TALLY_EBADNAME;
	}
	for (size_t i = 0; i < n && !wild; i++) {
		unsigned char c = (unsigned char)tok[i];
		if (c <= 0x20 || c == 0x7f) {
			snprintf(why, why_len, "%s byte 0x%02x at byte %zu", c == ' ' ? "space" : "control",
				 c, at + i);
			return TALLY_EBADNAME;
		}
		if (c >= 0x80) { /* UTF-8: one whole sequence, and no C1 control */
			size_t len = tally_utf8_seq((const unsigned char *)tok + i, n - i);
			if (len == 0) {
				snprintf(why, why_len, "byte 0x%02x at byte %zu is not valid UTF-8", c, at + i);
				return TALLY_EBADNAME;
			}
			if (c == 0xc2 && (unsigned char)tok[i + 1] < 0xa0) {
				snprintf(why, why_len, "control character U+%04X at byte %zu",
					 (unsigned char)tok[i + 1], at + i);
				return TALLY_EBADNAME;
			}
			i += len - 1;
			continue;
		}
		if (c == '*' || c == '>') {
			snprintf(why, why_len, "'%c' at byte %zu is not a whole token", c, at + i);
			return TALLY_EBADNAME;
		}
	}
	return 0;
}

int tally__subject_check(const char *subject, size_t len, bool allow_wildcards, char *why,
			 size_t why_len)
{
	char dummy[8];

	if (!why) {
		why = dummy;
		why_len = sizeof(dummy);
	}
	if (len == 0 || len > TALLY_SUBJECT_MAX) {
		snprintf(why, why_len, "length %zu is outside 1..%d bytes", len, TALLY_SUBJECT_MAX);
		return TALLY_EBADNAME;
	}
	size_t start = 0;
	for (size_t i = 0; i <= len; i++) {
		if (i < len && subject[i] == '\0') {
			snprintf(why, why_len, "NUL byte at byte %zu", i);
			return TALLY_EBADNAME;
		}
		if (i < len && subject[i] != '.')
			continue;
		int rc = check_token(subject + start, i - start, i == len, allow_wildcards, start,
				     why, why_len);
		if (rc)
			return rc;
		start = i + 1;
	}
	return 0;
}

/* The first 64 bytes of a refused subject for a message: bytes that are
 * not printable ASCII as \xNN, so that an error never prints what made
 * the name invalid (a control character, a broken UTF-8 sequence). */
static void shown_name(const char *s, size_t len, char *out, size_t cap)
{
	size_t o = 0;

	for (size_t i = 0; i < len && i < 64 && o + 5 < cap; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\')
			out[o++] = (char)c;
		else
			o += (size_t)snprintf(out + o, cap - o, "\\x%02x", c);
	}
	snprintf(out + o, cap - o, "%s", len > 64 ? "..." : "");
}

TALLY_API int tally_subject_validate(const char *subject, bool allow_wildcards)
{
	char why[160], shown[4 * 64 + 8];

	tally__clear_errmsg();
	if (!subject)
		return tally__fail(TALLY_EBADNAME, "subject is NULL");
	size_t len = strnlen(subject, TALLY_SUBJECT_MAX + 1);
	int rc = tally__subject_check(subject, len, allow_wildcards, why, sizeof(why));
	if (rc) {
		shown_name(subject, len, shown, sizeof(shown));
		return tally__fail(rc, "invalid subject \"%s\": %s", shown, why);
	}
	return 0;
}

bool tally__subject_match(const char *p, const char *s)
{
	for (;;) {
		const char *pe = strchr(p, '.'), *se = strchr(s, '.');
		size_t pn = pe ? (size_t)(pe - p) : strlen(p);
		size_t sn = se ? (size_t)(se - s) : strlen(s);

		if (pn == 1 && p[0] == '>')
			return sn > 0 || se; /* one or more tokens remain */
		if (!(pn == 1 && p[0] == '*') && (pn != sn || memcmp(p, s, pn) != 0))
			return false;
		if (!pe || !se)
			return !pe && !se;
		p = pe + 1;
		s = se + 1;
	}
}

TALLY_API int tally_subject_match(const char *pattern, const char *subject)
{
	return pattern && subject && tally__subject_match(pattern, subject);
}

int tally__pattern_specificity(const char *pattern)
{
	int literal = 0, star = 0, gt = 0;
	const char *t = pattern;

	for (;;) {
		const char *e = strchr(t, '.');
		size_t n = e ? (size_t)(e - t) : strlen(t);
		if (n == 1 && t[0] == '*')
			star++;
		else if (n == 1 && t[0] == '>')
			gt++;
		else
			literal++;
		if (!e)
			break;
		t = e + 1;
	}
	/* literal tokens dominate; then a '*' beats a '>' (it matches less) */
	return literal * 1024 + star * 2 - gt * 4 + (gt ? 0 : 1);
}

/* ---- the table ---------------------------------------------------------- */

static bool entry_is(const struct tally__shm_subject *e, uint32_t h, const char *name, size_t len)
{
	return e->hash == h && e->len == len && memcmp(e->name, name, len) == 0;
}

/* Wait (bounded) for a claimed entry to become ready; returns its state. */
static uint32_t wait_ready(struct tally__shm_subject *e)
{
	uint64_t deadline = tally__mono_ns() + INTERN_WAIT_NS;
	ck_backoff_t backoff = 64;
	uint32_t st;

	/* The writer needs a few hundred ns: spin with backoff first, then
	 * yield the CPU (it may be preempted), up to the bound. */
	while ((st = atomic_load_explicit(&e->state, memory_order_acquire)) == TALLY__SUBJ_CLAIMED) {
		if (tally__mono_ns() > deadline)
			break;
		if (backoff < 65536)
			ck_backoff_eb(&backoff);
		else
			sched_yield();
	}
	return st;
}

static int claim(struct tally_segment *seg, struct tally__shm_subject *e, uint32_t h,
		 const char *name, size_t len)
{
	uint32_t expect = TALLY__SUBJ_EMPTY;
	uint32_t used = atomic_fetch_add_explicit(&seg->hdr->subjects_used, 1, memory_order_relaxed);

	if (used >= seg->subject_cap) {
		atomic_fetch_sub_explicit(&seg->hdr->subjects_used, 1, memory_order_relaxed);
		return tally__fail(TALLY_EFULL,
				   "subject table of segment \"%s\" is full (%u subjects): "
				   "raise subject_capacity and restart its owner",
				   seg->name, seg->subject_cap);
	}
	if (!atomic_compare_exchange_strong_explicit(&e->state, &expect, TALLY__SUBJ_CLAIMED,
						     memory_order_acquire, memory_order_acquire)) {
		atomic_fetch_sub_explicit(&seg->hdr->subjects_used, 1, memory_order_relaxed);
		return 1; /* someone else claimed it: look again */
	}
	TALLY__FAILPOINT("intern.claimed");
	atomic_store_explicit(&e->claimer_pid, (int32_t)getpid(), memory_order_relaxed);
	e->hash = h;
	e->len = (uint16_t)len;
	memcpy(e->name, name, len);
	e->name[len] = '\0';
	TALLY__FAILPOINT("intern.named");
	/* Release: hash, len and name are visible before READY. A CAS: the
	 * reaper may have taken a claim this slow (see the header). */
	expect = TALLY__SUBJ_CLAIMED;
	if (!atomic_compare_exchange_strong_explicit(&e->state, &expect, TALLY__SUBJ_READY,
						     memory_order_release, memory_order_relaxed))
		return 2; /* tombstoned under us: probe again from the start */
	return 0;
}

/* Probe for name. With create, claims an empty entry. 0 and *id, -ENOENT, or an error. */
static int probe(struct tally_segment *seg, const char *name, size_t len, bool create,
		 tally_subject_t *id)
{
	uint32_t h = tally__subject_hash(name, len), mask = seg->table_size - 1;
	uint32_t i;
	int restarts = 0;

again:
	i = h & mask;

	for (uint32_t n = 0; n < seg->table_size; n++, i = (i + 1) & mask) {
		struct tally__shm_subject *e = tally__seg_subject(seg, i);
		uint32_t st = atomic_load_explicit(&e->state, memory_order_acquire);

		if (st == TALLY__SUBJ_EMPTY) {
			if (!create)
				return -ENOENT;
			int rc = claim(seg, e, h, name, len);
			if (rc == 0) {
				*id = i;
				return 0;
			}
			if (rc < 0)
				return rc;
			if (rc == 2) { /* our claim was taken back: start over */
				if (++restarts > 8)
					return tally__fail(-EAGAIN, "subject \"%s\": the owner of segment \"%s\" "
							   "took back our claim %d times; try again", name,
							   seg->name, restarts);
				goto again;
			}
			st = atomic_load_explicit(&e->state, memory_order_acquire);
		}
		if (st == TALLY__SUBJ_CLAIMED)
			st = wait_ready(e);
		if (st == TALLY__SUBJ_CLAIMED)
			return tally__fail(-EAGAIN, "subject table entry %u of segment \"%s\" is "
					   "still being written after %u ms; try again", i, seg->name,
					   INTERN_WAIT_NS / 1000000u);
		if (st == TALLY__SUBJ_READY && entry_is(e, h, name, len)) {
			*id = i;
			return 0;
		}
	}
	return create ? tally__fail(TALLY_EFULL, "subject table of segment \"%s\" is full", seg->name)
		      : -ENOENT;
}

static int name_arg(const char *subject, size_t *len)
{
	if (!subject)
		return tally__fail(TALLY_EBADNAME, "subject is NULL");
	*len = strnlen(subject, TALLY_SUBJECT_MAX + 1);
	return tally_subject_validate(subject, false);
}

TALLY_API int tally_subject_intern(struct tally_segment *seg, const char *subject, tally_subject_t *id)
{
	size_t len = 0;
	int rc;

	tally__clear_errmsg();
	if ((rc = name_arg(subject, &len)) != 0)
		return rc;
	if (seg->read_only)
		return tally__fail(-EROFS, "segment \"%s\" is open read-only: cannot add subject \"%s\"",
				   seg->name, subject);
	return probe(seg, subject, len, true, id);
}

TALLY_API int tally_subject_lookup(const struct tally_segment *seg, const char *subject,
				   tally_subject_t *id)
{
	size_t len = 0;
	int rc;

	tally__clear_errmsg();
	if ((rc = name_arg(subject, &len)) != 0)
		return rc;
	return probe((struct tally_segment *)seg, subject, len, false, id);
}

TALLY_API int tally_subject_name(const struct tally_segment *seg, tally_subject_t id, char *buf,
				 size_t len)
{
	if (id >= seg->table_size)
		return -ENOENT;
	const struct tally__shm_subject *e = tally__seg_subject(seg, id);
	uint32_t st = atomic_load_explicit(&((struct tally__shm_subject *)e)->state,
					   memory_order_acquire);
	if (st != TALLY__SUBJ_READY)
		return -ENOENT;
	/* One load: the length is checked and then used for the copy, and any
	 * producer may rewrite it in between (a plain read may be re-done). */
	uint16_t n = __atomic_load_n(&e->len, __ATOMIC_RELAXED);
	if (n == 0 || n > TALLY_SUBJECT_MAX)
		return tally__fail(TALLY_ECORRUPT, "subject entry %u of segment \"%s\" has length %u",
				   id, seg->name, n);
	if (len <= n)
		return -ENOSPC;
	memcpy(buf, e->name, n);
	buf[n] = '\0';
	if (tally__subject_check(buf, n, false, NULL, 0) != 0)
		return tally__fail(TALLY_ECORRUPT, "subject entry %u of segment \"%s\" is not a valid name",
				   id, seg->name);
	return 0;
}

TALLY_API uint32_t tally_subject_capacity(const struct tally_segment *seg)
{
	return seg->table_size;
}

uint32_t tally__subjects_reap(struct tally_segment *seg, uint64_t now)
{
	uint64_t *seen = seg->reap.subj_seen_ns;
	uint32_t turned = 0;

	TALLY__ASSERT(seg->is_owner && seen);
	for (uint32_t i = 0; i < seg->table_size; i++) {
		struct tally__shm_subject *e = tally__seg_subject(seg, i);
		uint32_t expect = TALLY__SUBJ_CLAIMED;

		if (atomic_load_explicit(&e->state, memory_order_relaxed) != TALLY__SUBJ_CLAIMED) {
			seen[i] = 0;
			continue;
		}
		if (!seen[i])
			seen[i] = now ? now : 1;
		pid_t pid = atomic_load_explicit(&e->claimer_pid, memory_order_relaxed);
		bool gone = pid > 0 && kill(pid, 0) != 0 && errno == ESRCH;
		bool expired = now - seen[i] >= (uint64_t)TALLY__CLAIM_TIMEOUT_MS * 1000000u;
		if ((gone || expired) &&
		    atomic_compare_exchange_strong_explicit(&e->state, &expect, TALLY__SUBJ_TOMBSTONE,
							    memory_order_relaxed, memory_order_relaxed)) {
			/* the claim's count back: a tombstone holds no subject
			 * (the table is twice the capacity, probes stay short) */
			atomic_fetch_sub_explicit(&seg->hdr->subjects_used, 1, memory_order_relaxed);
			seen[i] = 0;
			turned++;
		}
	}
	return turned;
}
