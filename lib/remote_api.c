/* SPDX-License-Identifier: MIT */
/*
 * lib/remote_api.c: the public reads of the remote section (tally/share.h):
 * other hosts' mirrored verdicts and the share thread's status, from any
 * process that maps the segment. Validation is remote.c's; this file turns
 * views into the public structs, with ages and the stale/combined flags,
 * and keeps a reader's index of the section by subject (a hash of chains
 * of entry numbers, rebuilt by a refresh; every read checks the entry).
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tally/share.h>

#include "common.h"
#include "proc.h"
#include "remote.h"
#include "segment.h"

static uint64_t age_ms(uint64_t now, uint64_t then)
{
	return then == 0 ? UINT64_MAX : now > then ? (now - then) / 1000000u : 0;
}

static int remote_error(int rc, const struct tally_segment *seg)
{
	if (rc == -EAGAIN)
		return tally__fail(TALLY_EBUSY_RETRY, "segment \"%s\": its remote section was busy; retry",
				   seg->name);
	return tally__fail(TALLY_ECORRUPT, "segment \"%s\": its remote section is corrupt (%s)", seg->name,
			   tally_strerror(rc));
}

static void to_stats(const struct tally__remote_view *v, uint64_t now, uint32_t stale_after_ms,
		     struct tally_remote_stats *o)
{
	memset(o, 0, sizeof(*o));
	snprintf(o->host, sizeof(o->host), "%s", v->host);
	snprintf(o->subject, sizeof(o->subject), "%s", v->subject);
	o->verdict = (enum tally_verdict)v->verdict;
	o->reasons = v->reasons;
	o->pressure = v->pressure;
	o->shed_probability = v->shed;
	o->p95_ns = v->p95_ns;
	o->pending = v->pending;
	o->retry_after_ms = v->retry_after_ms;
	o->age_ms = now > v->origin_ns ? (now - v->origin_ns) / 1000000u : 0;
	o->stale = o->age_ms > stale_after_ms;
	o->combined = v->combine == TALLY__COMBINE_MAX && !o->stale;
	o->revision = v->revision;
}

/* The section and its stale_after_ms; 0, or 1 when there is none. */
static int section_of(const struct tally_segment *seg, const void **sec, uint32_t *stale_after_ms)
{
	struct tally__remote_status_view st;
	int rc;

	if (!seg->remote_cap)
		return 1;
	*sec = tally__seg_section(seg, &seg->remote);
	rc = tally__remote_read_status(*sec, seg->remote.size, &st);
	if (rc < 0)
		return remote_error(rc, seg);
	*stale_after_ms = st.stale_after_ms;
	return 0;
}

TALLY_API int tally_read_remote(const struct tally_segment *seg, struct tally_remote_stats *out, uint32_t cap)
{
	const void *sec = NULL;
	uint32_t stale = 0, n = 0;
	uint64_t now = tally__mono_ns();
	int rc = section_of(seg, &sec, &stale);

	if (rc != 0)
		return rc > 0 ? 0 : rc;
	for (uint32_t i = 0; i < seg->remote_cap && n < cap; i++) {
		struct tally__remote_view v;

		rc = tally__remote_read_entry(sec, seg->remote.size, i, &v);
		if (rc == -ENOENT)
			continue;
		if (rc < 0)
			return remote_error(rc, seg);
		to_stats(&v, now, stale, &out[n++]);
	}
	return (int)n;
}

static bool worse(const struct tally_remote_stats *a, const struct tally_remote_stats *b)
{
	return a->verdict > b->verdict || (a->verdict == b->verdict && a->pressure > b->pressure);
}

#define NO_ENTRY UINT32_MAX

/* One step of a search for subject's worst combined entry, the full scan's
 * and an index chain's: entry i, if it holds subject and is combined, into
 * *out when it is worse than what *out holds or alike and of a lower entry
 * number (*at), so that both searches answer the same entry whatever the
 * order they visit. 0, or remote_error's negative errno. */
static int worst_step(const struct tally_segment *seg, const void *sec, uint32_t stale, uint64_t now, uint32_t i,
		      const char *subject, struct tally_remote_stats *out, bool *found, uint32_t *at)
{
	struct tally__remote_view v;
	struct tally_remote_stats st;
	int rc = tally__remote_read_entry(sec, seg->remote.size, i, &v);

	if (rc == -ENOENT)
		return 0;
	if (rc < 0)
		return remote_error(rc, seg);
	if (strcmp(v.subject, subject) != 0)
		return 0; /* another subject (or, on a chain, it holds another now) */
	to_stats(&v, now, stale, &st);
	if (st.combined && (!*found || worse(&st, out) || (!worse(out, &st) && i < *at))) {
		*out = st;
		*found = true;
		*at = i;
	}
	return 0;
}

TALLY_API int tally_read_remote_worst(const struct tally_segment *seg, const char *subject,
				      struct tally_remote_stats *out)
{
	const void *sec = NULL;
	uint32_t stale = 0, at = NO_ENTRY;
	uint64_t now = tally__mono_ns();
	bool found = false;
	int rc = section_of(seg, &sec, &stale);

	if (rc != 0)
		return rc > 0 ? -ENOENT : rc;
	for (uint32_t i = 0; i < seg->remote_cap; i++)
		if ((rc = worst_step(seg, sec, stale, now, i, subject, out, &found, &at)) != 0)
			return rc;
	return found ? 0 : -ENOENT;
}

/* ---- the index by subject (tally/share.h) ---- */

struct tally_remote_index {
	const struct tally_segment *seg;
	uint32_t cap, mask;   /* cap: the section's entries; mask + 1 chains */
	uint32_t *heads;      /* [mask + 2]: a chain per subject hash; the last, entries a refresh found busy */
	uint32_t *next;       /* [cap] */
};

static uint32_t subject_hash(const char *s)
{
	uint32_t h = 2166136261u; /* FNV-1a */

	for (; *s; s++)
		h = (h ^ (uint8_t)*s) * 16777619u;
	return h;
}

TALLY_API int tally_remote_index_new(const struct tally_segment *seg, struct tally_remote_index **out)
{
	struct tally_remote_index *ix = calloc(1, sizeof(*ix));
	uint32_t chains = 1;

	*out = NULL;
	if (!ix)
		return tally__fail(-ENOMEM, "out of memory for a remote index");
	ix->seg = seg;
	ix->cap = seg->remote_cap;
	while (chains < ix->cap)
		chains <<= 1;
	ix->mask = chains - 1;
	ix->heads = malloc(sizeof(uint32_t) * ((size_t)chains + 1));
	ix->next = malloc(sizeof(uint32_t) * (ix->cap ? ix->cap : 1));
	if (!ix->heads || !ix->next) {
		tally_remote_index_free(&ix);
		return tally__fail(-ENOMEM, "out of memory for a remote index of %u entries", seg->remote_cap);
	}
	memset(ix->heads, 0xff, sizeof(uint32_t) * ((size_t)chains + 1));
	*out = ix;
	return 0;
}

TALLY_API void tally_remote_index_free(struct tally_remote_index **ix)
{
	if (!*ix)
		return;
	free((*ix)->heads);
	free((*ix)->next);
	free(*ix);
	*ix = NULL;
}

TALLY_API int tally_remote_index_refresh(struct tally_remote_index *ix)
{
	const void *sec = NULL;
	uint32_t stale = 0, chains = ix->mask + 1;
	int rc = section_of(ix->seg, &sec, &stale);

	if (rc != 0)
		return rc > 0 ? 0 : rc;
	/* built aside, then copied: a failed refresh leaves the index as it was */
	uint32_t *heads = malloc(sizeof(uint32_t) * ((size_t)chains + 1));
	uint32_t *next = malloc(sizeof(uint32_t) * ix->cap);
	if (!heads || !next) {
		free(heads);
		free(next);
		return tally__fail(-ENOMEM, "out of memory to refresh a remote index");
	}
	memset(heads, 0xff, sizeof(uint32_t) * ((size_t)chains + 1));
	for (uint32_t i = 0; i < ix->cap; i++) {
		struct tally__remote_view v;
		uint32_t h;

		/* one try: an entry mid-write, or one that does not validate, goes
		 * on the chain every read follows, which reports it as the full
		 * scan would; a refresh never waits on a writer */
		rc = tally__remote_read_entry_tries(sec, ix->seg->remote.size, i, &v, 1);
		if (rc == -ENOENT)
			continue;
		h = rc == 0 ? subject_hash(v.subject) & ix->mask : chains;
		next[i] = heads[h];
		heads[h] = i;
	}
	memcpy(ix->heads, heads, sizeof(uint32_t) * ((size_t)chains + 1));
	memcpy(ix->next, next, sizeof(uint32_t) * ix->cap);
	free(heads);
	free(next);
	return 0;
}

/* The worst combined entry for subject along one chain (worst_step). */
static int worst_along(const struct tally_remote_index *ix, const void *sec, uint32_t stale, uint64_t now,
		       uint32_t first, const char *subject, struct tally_remote_stats *out, bool *found,
		       uint32_t *at)
{
	int rc;

	for (uint32_t i = first, n = 0; i != NO_ENTRY && n < ix->cap; i = ix->next[i], n++)
		if ((rc = worst_step(ix->seg, sec, stale, now, i, subject, out, found, at)) != 0)
			return rc;
	return 0;
}

TALLY_API int tally_read_remote_worst_indexed(const struct tally_remote_index *ix, const char *subject,
					      struct tally_remote_stats *out)
{
	const void *sec = NULL;
	uint32_t stale = 0;
	uint64_t now = tally__mono_ns();
	bool found = false;
	uint32_t at = NO_ENTRY;
	int rc = section_of(ix->seg, &sec, &stale);

	if (rc != 0)
		return rc > 0 ? -ENOENT : rc;
	if ((rc = worst_along(ix, sec, stale, now, ix->heads[subject_hash(subject) & ix->mask], subject, out,
			      &found, &at)) != 0 ||
	    (rc = worst_along(ix, sec, stale, now, ix->heads[ix->mask + 1], subject, out, &found, &at)) != 0)
		return rc;
	return found ? 0 : -ENOENT;
}

TALLY_API int tally_read_share(const struct tally_segment *seg, struct tally_share_status *out)
{
	struct tally__remote_status_view v;
	uint64_t now = tally__mono_ns();
	int rc;

	if (!seg->remote_cap)
		return -ENOENT;
	rc = tally__remote_read_status(tally__seg_section(seg, &seg->remote), seg->remote.size, &v);
	if (rc < 0)
		return remote_error(rc, seg);
	memset(out, 0, sizeof(*out));
	out->state = tally__share_state_name(v.state);
	out->connected = v.connected != 0;
	snprintf(out->host, sizeof(out->host), "%s", v.host);
	snprintf(out->bucket, sizeof(out->bucket), "%s", v.bucket);
	snprintf(out->last_error, sizeof(out->last_error), "%s", v.last_error);
	out->puts = v.puts;
	out->put_errors = v.put_errors;
	out->updates = v.updates;
	out->rejected = v.rejected;
	out->expired = v.expired;
	out->full = v.full;
	out->last_put_age_ms = age_ms(now, v.last_put_ns);
	out->last_error_age_ms = v.last_error[0] ? age_ms(now, v.last_error_ns) : UINT64_MAX;
	out->refresh_ms = v.refresh_ms;
	out->stale_after_ms = v.stale_after_ms;
	out->max_age_ms = v.max_age_ms;
	out->remote_capacity = seg->remote_cap;
	return 0;
}
