/* SPDX-License-Identifier: MIT */
/*
 * judge.c: a subject's level as the gateway acts on it, read from the
 * segment read-only. A verdict ok, warn or overload is acted on as it is.
 * No usable verdict (no segment, permission denied, its owner dead or not
 * publishing, no row for the subject yet, verdict unknown) is GW_LEVEL_OPEN
 * (admit, and say why in X-Tally-Fail-Open), except that it is
 * GW_LEVEL_CLOSED (shed, X-Tally-Fail-Closed) when
 *   - the subject's rule says so: pending data is stale and its
 *     stale_policy is fail-closed (the verdict is unknown with reason
 *     STALE and without FAIL_OPEN), or
 *   - the operator said so for no data at all (fail_closed = true).
 *
 * The segment handle is shared by the server's threads under a
 * read-write lock: reads take it shared, (re)attaching exclusive. An
 * attach that fails is retried at most every ATTACH_RETRY_NS, and the
 * owner's liveness (a kill(0) and a /proc read) is checked at most every
 * ALIVE_CHECK_NS, so that the per-request cost stays one lookup and one
 * seqlock read of the snapshot. Other hosts' verdicts (the remote
 * section, 4,096 entries with tallyd's defaults) are read through an
 * index by subject (tally_remote_index), refreshed every INDEX_REFRESH_NS
 * by one caller under the exclusive lock: a check reads the entries of
 * its subject, not the whole section.
 */
#include "config.h"

#include <errno.h>
#include <pwd.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "gateway.h"

#define ATTACH_RETRY_NS 200000000ull /* 200 ms */
#define ALIVE_CHECK_NS 100000000ull  /* 100 ms */
#define INDEX_REFRESH_NS 100000000ull /* 100 ms: a new host's entry for a subject shows within it */

void gw_reader_init(struct gw_reader *r, const char *segment, bool fail_closed)
{
	struct passwd pw, *found = NULL;
	char buf[1024];

	memset(r, 0, sizeof(*r));
	r->segment = segment;
	r->fail_closed = fail_closed;
	/* named in "permission denied": the gateway's user, or nginx's workers' */
	if (getpwuid_r(geteuid(), &pw, buf, sizeof(buf), &found) == 0 && found)
		snprintf(r->user, sizeof(r->user), "%s", found->pw_name);
	else
		snprintf(r->user, sizeof(r->user), "uid %u", (unsigned)geteuid());
	pthread_rwlock_init(&r->lock, NULL);
}

void gw_reader_close(struct gw_reader *r)
{
	pthread_rwlock_wrlock(&r->lock);
	tally_remote_index_free(&r->ix);
	tally_segment_close(&r->seg);
	pthread_rwlock_unlock(&r->lock);
	pthread_rwlock_destroy(&r->lock);
}

/* Attach, or re-attach after the owner was replaced. With the lock held
 * exclusively. Sets out->why on failure. */
static void attach(struct gw_reader *r, bool replaced, struct gw_reading *out)
{
	uint64_t now = gw_now_ns();

	if (r->seg && !replaced)
		return;
	if (replaced) {
		tally_remote_index_free(&r->ix);
		tally_segment_close(&r->seg);
	}
	if (now < atomic_load(&r->next_open_ns)) {
		out->why = "no segment";
		return;
	}
	int rc = tally_segment_open(r->segment, TALLY_OPEN_READER, 0, &r->seg);
	atomic_store(&r->open_error, rc);
	if (rc == 0) {
		atomic_store(&r->alive_checked_ns, 0);
		/* without an index (no memory), other hosts are read by the full
		 * scan; an index whose first refresh failed (the section busy)
		 * is refreshed again at the next request */
		bool built = tally_remote_index_new(r->seg, &r->ix) == 0 && tally_remote_index_refresh(r->ix) == 0;
		atomic_store(&r->index_due_ns, built ? now + INDEX_REFRESH_NS : now);
		return;
	}
	atomic_store(&r->next_open_ns, now + ATTACH_RETRY_NS);
	out->why = "no segment";
}

static int owner_alive(struct gw_reader *r)
{
	uint64_t now = gw_now_ns(), last = atomic_load(&r->alive_checked_ns);

	if (last && now - last < ALIVE_CHECK_NS)
		return atomic_load(&r->alive);
	int a = tally_segment_owner_alive(r->seg);
	atomic_store(&r->alive, a);
	atomic_store(&r->alive_checked_ns, now);
	return a;
}

/* Why there is no segment, with the library's sentence for it. */
static void no_segment_why(struct gw_reader *r, struct gw_reading *out)
{
	int rc = atomic_load(&r->open_error);

	if (rc == -EACCES || rc == -EPERM)
		snprintf(out->whybuf, sizeof(out->whybuf), "permission denied on segment %s (user %s needs "
			 "read access: group_readable = 1 and its group in tallyd.ini)", r->segment, r->user);
	else if (rc == -ENOENT)
		snprintf(out->whybuf, sizeof(out->whybuf), "no segment %s (is its owner, tallyd, running?)",
			 r->segment);
	else
		snprintf(out->whybuf, sizeof(out->whybuf), "segment %s: %s", r->segment,
			 rc ? tally_strerror(rc) : "not attached yet");
	out->why = out->whybuf;
}

/* Read subject with the lock held shared; returns 1 to re-attach. */
static int read_local_locked(struct gw_reader *r, const char *subject, struct gw_reading *out)
{
	struct tally_subject_stats s;
	tally_subject_t id;
	int rc;

	out->no_data = true; /* until a verdict is read */
	if (!r->seg) {
		no_segment_why(r, out);
		return 1;
	}
	int alive = owner_alive(r);
	if (alive == TALLY_EREPLACED) {
		out->why = "the segment's owner was replaced: attaching the new one";
		return 1;
	}
	if ((rc = tally_subject_lookup(r->seg, subject, &id)) != 0 ||
	    (rc = tally_read_subject(r->seg, id, &s)) == -ENOENT) {
		out->why = "no data for this subject yet";
		return 0;
	}
	if (rc == TALLY_ESTALE || alive != 1) {
		if (alive != 1)
			snprintf(out->whybuf, sizeof(out->whybuf), "the owner of segment %s is not alive: data is "
				 "stale (start tallyd -s %s; --replace takes over the dead owner's segment)",
				 r->segment, r->segment);
		else
			snprintf(out->whybuf, sizeof(out->whybuf), "the owner of segment %s stopped publishing: "
				 "data is stale (is tallyd stuck? tally status -s %s)", r->segment, r->segment);
		out->why = out->whybuf;
		return 0;
	}
	if (rc != 0) {
		snprintf(out->whybuf, sizeof(out->whybuf), "reading %s: %s", subject, tally_strerror(rc));
		out->why = out->whybuf;
		return 0;
	}
	out->no_data = false;
	out->verdict = s.verdict;
	out->reasons = s.reasons;
	out->retry_after_ms = s.retry_after_ms;
	/* the engine's graded probability (pressure past its warn point) */
	out->shed_probability = s.shed_probability;
	if (s.verdict == TALLY_VERDICT_UNKNOWN) {
		bool by_rule = (s.reasons & TALLY_REASON_STALE) && !(s.reasons & TALLY_REASON_FAIL_OPEN);
		out->why = by_rule ? "pending data is stale and stale_policy = fail-closed"
				   : "verdict unknown (too few samples)";
		out->level = by_rule ? GW_LEVEL_CLOSED : GW_LEVEL_OPEN;
		return 0;
	}
	out->level = s.verdict == TALLY_VERDICT_OVERLOAD ? GW_LEVEL_OVERLOAD
		     : s.verdict == TALLY_VERDICT_WARN  ? GW_LEVEL_WARN : GW_LEVEL_OK;
	if ((s.reasons & TALLY_REASON_STALE) && (s.reasons & TALLY_REASON_FAIL_OPEN))
		out->why = "pending data is stale: judged on latency alone (stale_policy = fail-open)";
	return 0;
}

/*
 * The combined verdict (many hosts, tally/share.h): the worst fresh entry
 * another host shared for this subject, mirrored into this segment by
 * tallyd, wins when it is worse than the local verdict (or there is no
 * local one). Subjects tallyd combines `local`, and stale entries, never
 * come back from tally_read_remote_worst. X-Tally-Host names the host.
 */
static void combine_remote(struct gw_reader *r, const char *subject, struct gw_reading *out)
{
	struct tally_remote_stats rs;
	bool local_usable = !out->no_data && out->verdict != TALLY_VERDICT_UNKNOWN;

	int rc = r->ix ? tally_read_remote_worst_indexed(r->ix, subject, &rs)
		       : tally_read_remote_worst(r->seg, subject, &rs);
	if (rc != 0 || rs.verdict == TALLY_VERDICT_UNKNOWN)
		return;
	if (local_usable && rs.verdict <= out->verdict) {
		if (rs.verdict == out->verdict && rs.shed_probability > out->shed_probability)
			out->shed_probability = rs.shed_probability;
		return;
	}
	out->no_data = false;
	out->why = NULL;
	out->verdict = rs.verdict;
	out->reasons = rs.reasons;
	out->retry_after_ms = rs.retry_after_ms;
	out->shed_probability = rs.shed_probability;
	out->level = rs.verdict == TALLY_VERDICT_OVERLOAD ? GW_LEVEL_OVERLOAD
		     : rs.verdict == TALLY_VERDICT_WARN  ? GW_LEVEL_WARN : GW_LEVEL_OK;
	snprintf(out->host, sizeof(out->host), "%s", rs.host);
}

/* Every INDEX_REFRESH_NS one caller refreshes the index of other hosts'
 * entries (one pass over the remote section), the lock held exclusively;
 * a refresh that fails keeps the index it had. */
static void refresh_index(struct gw_reader *r)
{
	uint64_t now = gw_now_ns(), due = atomic_load(&r->index_due_ns);

	if (now < due || !atomic_compare_exchange_strong(&r->index_due_ns, &due, now + INDEX_REFRESH_NS))
		return;
	pthread_rwlock_wrlock(&r->lock);
	if (r->ix)
		(void)tally_remote_index_refresh(r->ix);
	pthread_rwlock_unlock(&r->lock);
}

static int read_locked(struct gw_reader *r, const char *subject, struct gw_reading *out)
{
	int rc = read_local_locked(r, subject, out);

	if (rc == 0 && r->seg)
		combine_remote(r, subject, out);
	return rc;
}

void gw_read(struct gw_reader *r, const char *subject, struct gw_reading *out)
{
	int again;

	memset(out, 0, sizeof(*out));
	out->shed_probability = -1;
	out->verdict = TALLY_VERDICT_UNKNOWN;
	refresh_index(r);
	pthread_rwlock_rdlock(&r->lock);
	again = read_locked(r, subject, out);
	pthread_rwlock_unlock(&r->lock);
	if (again) {
		pthread_rwlock_wrlock(&r->lock);
		bool replaced = r->seg && owner_alive(r) == TALLY_EREPLACED;
		out->why = NULL;
		attach(r, replaced, out);
		pthread_rwlock_unlock(&r->lock);
		memset(out, 0, sizeof(*out));
		out->shed_probability = -1;
		out->verdict = TALLY_VERDICT_UNKNOWN;
		pthread_rwlock_rdlock(&r->lock);
		read_locked(r, subject, out);
		pthread_rwlock_unlock(&r->lock);
	}
	if (out->no_data)
		out->level = r->fail_closed ? GW_LEVEL_CLOSED : GW_LEVEL_OPEN;
	/* the episode is logged once, when it starts and when it ends */
	/* why is set on every no-data path; the test is for a path that
	 * forgets (a second replacement between the attach and the read
	 * once returned here with none, and strstr(NULL) crashed) */
	bool nodata = out->no_data && out->why && strstr(out->why, "segment");
	if (atomic_load(&r->failing) != nodata && atomic_exchange(&r->failing, nodata) != nodata) {
		if (nodata)
			gw_log("failing %s: %s", r->fail_closed ? "closed" : "open", out->why);
		else
			gw_log("segment %s is live again", r->segment);
	}
}
