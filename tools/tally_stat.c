/* SPDX-License-Identifier: MIT */
/*
 * tally_stat.c: one read of everything a segment publishes (struct
 * cli_view, shared with tally top), and the commands that print it once:
 * `tally stat` (tables), `tally stat --json` (the stable schema of
 * docs/json-schema.md, built with jansson) and `tally status SUBJECT`
 * (one verdict, as an exit status for scripts and health checks).
 *
 * Stale data is never shown as live. When the owner is dead or stopped,
 * or has stopped publishing, stat says so in its first line (and in
 * segment.stale / stale_reason of the JSON), every subject's verdict is
 * reported as unknown with the last published one beside it, and status
 * exits 3 (unknown). The values themselves are still printed: they are
 * what a post-mortem needs.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>
#include <jansson.h>

#include "cli.h"
#include "text.h"

/* ---- reading ------------------------------------------------------------------ */

static uint64_t clock_ns(clockid_t id)
{
	struct timespec ts;

	clock_gettime(id, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int by_name(const void *a, const void *b)
{
	return strcmp(((const struct cli_subject *)a)->name, ((const struct cli_subject *)b)->name);
}

/* Read subject id into s; sets *stale on TALLY_ESTALE. 0, 1 (no such id), or an error. */
static int read_one(struct tally_segment *seg, tally_subject_t id, struct cli_subject *s, bool *stale)
{
	int rc = tally_subject_name(seg, id, s->name, sizeof(s->name));

	if (rc == -ENOENT)
		return 1;
	if (rc)
		return rc;
	/* A reload between the subject's read and its rule's (-ESTALE) or a
	 * publish racing the read: read both again. */
	for (int tries = 0; tries < 5; tries++) {
		rc = tally_read_subject(seg, id, &s->st);
		if (rc == TALLY_EBUSY_RETRY)
			continue;
		if ((rc == 0 || rc == TALLY_ESTALE) &&
		    tally_read_rule(seg, &s->st, &s->rule) == -ESTALE && tries < 4)
			continue;
		break;
	}
	if (rc == 0 || rc == TALLY_ESTALE) {
		s->published = true;
		*stale |= rc == TALLY_ESTALE;
		s->has_rule = tally_read_rule(seg, &s->st, &s->rule) == 0;
		tally_pending_consumer_name(seg, &s->st, s->pending_consumer, sizeof(s->pending_consumer));
		return 0;
	}
	if (rc == -ENOENT) { /* interned after the last publish */
		memset(&s->st, 0, sizeof(s->st));
		s->st.id = id;
		s->published = false;
		s->has_rule = false;
		return 0;
	}
	return rc;
}

static int read_subjects(struct tally_segment *seg, struct cli_view *v, bool *stale)
{
	uint32_t cap = tally_subject_capacity(seg);
	size_t room = 0;

	for (uint32_t id = 0; id < cap; id++) {
		if (v->nsubjects == room) {
			size_t nroom = room ? room * 2 : 64;
			void *p = realloc(v->subjects, nroom * sizeof(*v->subjects));
			if (!p)
				return -ENOMEM;
			v->subjects = p;
			room = nroom;
		}
		int rc = read_one(seg, id, &v->subjects[v->nsubjects], stale);
		if (rc < 0)
			return rc;
		if (rc == 0)
			v->nsubjects++;
	}
	if (v->nsubjects)
		qsort(v->subjects, v->nsubjects, sizeof(*v->subjects), by_name);
	return 0;
}

/* Other hosts' rows and the share thread's status, when the segment has a remote section. */
static int read_remote(struct tally_segment *seg, struct cli_view *v)
{
	uint32_t cap = v->info.config.remote_capacity;
	int rc = TALLY_EBUSY_RETRY;

	if (!cap)
		return 0;
	if (!(v->remote = calloc(cap, sizeof(*v->remote))))
		return -ENOMEM;
	for (int tries = 0; tries < 5 && rc == TALLY_EBUSY_RETRY; tries++)
		rc = tally_read_share(seg, &v->share);
	if (rc < 0)
		return rc;
	v->share_on = true;
	rc = TALLY_EBUSY_RETRY;
	for (int tries = 0; tries < 5 && rc == TALLY_EBUSY_RETRY; tries++)
		rc = tally_read_remote(seg, v->remote, cap);
	if (rc < 0)
		return rc;
	v->nremote = rc;
	return 0;
}

static int read_tables(struct tally_segment *seg, struct cli_view *v)
{
	uint32_t ns = v->info.config.producer_slots, nc = v->info.config.pending_capacity;
	int rc = TALLY_EBUSY_RETRY;

	v->producers = calloc(ns ? ns : 1, sizeof(*v->producers));
	v->consumers = calloc(nc ? nc : 1, sizeof(*v->consumers));
	if (!v->producers || !v->consumers)
		return -ENOMEM;
	v->nproducers = tally_read_producers(seg, v->producers, ns);
	if (v->nproducers < 0)
		return v->nproducers;
	for (int tries = 0; tries < 5 && rc == TALLY_EBUSY_RETRY; tries++)
		rc = tally_read_consumers(seg, v->consumers, nc);
	if (rc < 0)
		return rc;
	v->nconsumers = rc;
	tally_read_totals(seg, &v->totals); /* TALLY_ESTALE: v->stale says so */
	rc = TALLY_EBUSY_RETRY;
	for (int tries = 0; tries < 5 && rc == TALLY_EBUSY_RETRY; tries++)
		rc = tally_read_poller(seg, &v->poller);
	if (rc < 0)
		return rc;
	/* A poller that started wrote its breaker (state_age_ms is known)
	 * before its first connect: one stuck on a server that never answers
	 * is running, not absent. */
	v->poller_ran = v->poller.polls_ok || v->poller.polls_failed || v->poller.connected ||
			v->poller.opens_total || v->nconsumers > 0 || v->poller.state_age_ms != UINT64_MAX;
	return read_remote(seg, v);
}

static void judge_staleness(struct cli_view *v, bool subject_stale)
{
	bool any_published = false;

	for (size_t i = 0; i < v->nsubjects; i++)
		any_published |= v->subjects[i].published;
	if (v->alive == TALLY_EREPLACED)
		v->stale_reason = "segment_replaced";
	else if (v->alive != 1)
		v->stale_reason = v->info.owner_stopped ? "owner_stopped" : "owner_dead";
	else if (subject_stale)
		v->stale_reason = "snapshot_stale";
	else if (!any_published && v->published_age_ms > CLI_STALE_NO_SUBJECT_MS)
		v->stale_reason = "snapshot_stale";
	v->stale = v->stale_reason != NULL;
}

int cli_view_read(struct tally_segment *seg, struct cli_view *v)
{
	bool subject_stale = false;
	int rc;

	memset(v, 0, sizeof(*v));
	if ((rc = tally_segment_info(seg, &v->info)))
		return rc;
	v->alive = tally_segment_owner_alive(seg);
	if (v->alive < 0 && v->alive != TALLY_EREPLACED)
		return v->alive;
	uint64_t mono = clock_ns(CLOCK_MONOTONIC), real = clock_ns(CLOCK_REALTIME);
	uint64_t hb = v->info.owner_heartbeat_ns, ago = mono > hb ? mono - hb : 0;
	v->now_mono_ns = mono;
	v->published_age_ms = ago / 1000000u;
	v->published_at_ms = (int64_t)((real - ago) / 1000000u);
	v->read_at_ms = (int64_t)(real / 1000000u);
	if ((rc = read_subjects(seg, v, &subject_stale)) || (rc = read_tables(seg, v))) {
		cli_view_free(v);
		return rc;
	}
	judge_staleness(v, subject_stale);
	return 0;
}

void cli_view_free(struct cli_view *v)
{
	free(v->subjects);
	free(v->producers);
	free(v->consumers);
	free(v->remote);
	v->remote = NULL;
	v->nremote = 0;
	v->subjects = NULL;
	v->producers = NULL;
	v->consumers = NULL;
	v->nsubjects = 0;
	v->nproducers = v->nconsumers = 0;
}

enum tally_verdict cli_effective_verdict(const struct cli_view *v, const struct cli_subject *s)
{
	return v->stale || !s->published ? TALLY_VERDICT_UNKNOWN : s->st.verdict;
}

/* ---- stat: tables -------------------------------------------------------------- */

static const char stat_help[] =
	"usage: tally stat [-s SEGMENT] [--json] [--watch [SECONDS]] [--count N] [--gateway URL]\n"
	"\n"
	"Print, once, what the segment's owner publishes: per subject the window's\n"
	"count, rate, P50/P95/P99/max, pending (backlog of the JetStream consumers\n"
	"that feed it) and verdict with its reasons; the producer slots (samples,\n"
	"drops, alive); the watched consumers; the poller and its circuit breaker.\n"
	"The first line names the segment, the owner and how old the data is. If the\n"
	"owner is dead or has stopped publishing, it says so and every verdict is\n"
	"shown as unknown (with the last published one): stale data is not live.\n"
	"\n"
	"  -s, --segment NAME   segment (default $TALLY_SEGMENT, else \"tally\")\n"
	"  -j, --json           one JSON document (schema: docs/json-schema.md)\n"
	"  -w, --watch [SECS]   print again every SECS seconds (default 2, 0.1..3600)\n"
	"                       until interrupted: for terminals without curses and\n"
	"                       for logs; each table opens with a line with the time,\n"
	"                       with --json each document is one line; a missing\n"
	"                       segment is reported and watched for\n"
	"  -n, --count N        with --watch: stop after N prints\n"
	"  -g, --gateway URL    also the routes of the tally-gateway at URL\n"
	"                       (http://HOST:PORT, its admin prefix as the path if\n"
	"                       not /_tally): requests per route, and the recent\n"
	"                       requests no route maps (admitted, unjudged)\n"
	"  -h, --help           this help\n"
	"\n"
	"exit status: 0 (also when the data is stale: see the output; --watch: when\n"
	"interrupted), 2 bad usage, 4 error (no segment, no permission, version\n"
	"mismatch, corrupt segment)\n";

static const char *owner_word(const struct cli_view *v)
{
	if (v->alive == TALLY_EREPLACED)
		return "REPLACED";
	if (v->alive == 1)
		return "alive";
	return v->info.owner_stopped ? "STOPPED" : "DEAD";
}

static void print_header(const struct cli_view *v)
{
	char age[32];

	printf("segment \"%s\"  owner pid %d %s  generation %" PRIu64 "  published %s ago\n",
	       v->info.name, (int)v->info.owner_pid, owner_word(v), v->info.generation,
	       cli_fmt_age_ms(age, sizeof(age), v->published_age_ms));
	if (!v->stale)
		return;
	if (strcmp(v->stale_reason, "snapshot_stale") == 0)
		printf("*** STALE: the owner (pid %d) has not published for %s: the values below are old, not live; verdicts are unknown ***\n",
		       (int)v->info.owner_pid, age);
	else if (strcmp(v->stale_reason, "segment_replaced") == 0)
		printf("*** STALE: segment \"%s\" was replaced by a newer one while reading: run again ***\n",
		       v->info.name);
	else
		printf("*** OWNER %s: pid %d %s; the values below are its last publish, %s ago, not live; verdicts are unknown ***\n",
		       v->info.owner_stopped ? "STOPPED" : "DEAD", (int)v->info.owner_pid,
		       v->info.owner_stopped ? "closed the segment" : "is not running", age);
}

static int name_width(const struct cli_view *v)
{
	int w = 7;

	for (size_t i = 0; i < v->nsubjects; i++) {
		int n = cli_width(v->subjects[i].name);
		if (n > w)
			w = n;
	}
	return w > 40 ? 40 : w;
}

static void print_ns_cell(bool has, uint64_t ns)
{
	char b[32];

	putchar(' ');
	cli_pad(stdout, has ? cli_fmt_ns(b, sizeof(b), ns) : "-", 8);
}

static void print_verdict_cell(const struct cli_view *v, const struct cli_subject *s)
{
	char reasons[96];
	enum tally_verdict ev = cli_effective_verdict(v, s);

	if (!s->published) {
		printf("  unknown (no_data: no sample since the owner started)");
		return;
	}
	tally_reasons_format(s->st.reasons, reasons, sizeof(reasons));
	printf("  %s", tally_verdict_name(ev));
	if (v->stale)
		printf(" (%s; last published: %s%s%s%s)", v->stale_reason,
		       tally_verdict_name(s->st.verdict), *reasons ? " (" : "", reasons,
		       *reasons ? ")" : "");
	else if (*reasons)
		printf(" (%s)", reasons);
}

static void print_subjects(const struct cli_view *v)
{
	int w = name_width(v);
	char b[32], cell[40];
	size_t shared = 0;

	printf("\nSUBJECTS (%zu)\n", v->nsubjects);
	if (!v->nsubjects) {
		printf("  none: nothing recorded in this segment yet\n");
		return;
	}
	printf("  %-*s %8s %9s %8s %8s %8s %8s %8s %8s %5s  %s\n", w, "SUBJECT", "COUNT", "RATE/s", "P50",
	       "P95", "P99", "MAX", "PENDING", "WAIT P95", "PRESS", "VERDICT");
	for (size_t i = 0; i < v->nsubjects; i++) {
		const struct cli_subject *s = &v->subjects[i];
		const struct tally_subject_stats *st = &s->st;
		bool has = s->published && st->has_data;
		printf("  ");
		cli_pad(stdout, s->name, -w);
		printf(" %8" PRIu64 " %9.1f", st->count, st->rate);
		print_ns_cell(has, st->p50_ns);
		print_ns_cell(has, st->p95_ns);
		print_ns_cell(has, st->p99_ns);
		print_ns_cell(has, st->max_ns);
		if (st->pending_consumers) {
			/* "*": one consumer's backlog, given to several subjects */
			snprintf(cell, sizeof(cell), "%s%s", cli_fmt_count(b, sizeof(b), st->pending),
				 st->pending_shared ? "*" : "");
			shared += st->pending_shared;
			printf(" %8s", cell);
		} else {
			printf(" %8s", "-");
		}
		print_ns_cell(s->published && st->has_wait, st->wait_p95_ns);
		if (s->published)
			printf(" %5.2f", st->pressure);
		else
			printf(" %5s", "-");
		print_verdict_cell(v, s);
		putchar('\n');
	}
	if (shared)
		printf("  * shared backlog: the consumer behind it also feeds other subjects, and its\n"
		       "    num_pending counts them all (tally status SUBJECT names the consumer)\n");
}

static void print_producers(const struct cli_view *v)
{
	const struct tally_segment_totals *t = &v->totals;

	printf("\nPRODUCERS (%d of %u slots in use)\n", v->nproducers, v->info.config.producer_slots);
	printf("  since the segment was created: recorded %" PRIu64 ", drained %" PRIu64 ", dropped %"
	       PRIu64 ", clamped %" PRIu64 ", rejected %" PRIu64 "\n", t->recorded, t->drained,
	       t->dropped, t->clamped, t->rejected);
	if (t->skipped)
		printf("  skipped %" PRIu64 " ring positions past a producer's ring (a corrupt or hostile "
		       "producer)\n", t->skipped);
	if (!v->nproducers)
		return;
	printf("  %4s %8s %8s %-9s %12s %10s %10s %6s\n", "SLOT", "PID", "TID", "STATE", "SAMPLES",
	       "DROPPED", "LOST", "ALIVE");
	for (int i = 0; i < v->nproducers; i++) {
		const struct tally_producer_stats *p = &v->producers[i];
		printf("  %4u %8d %8d %-9s %12" PRIu64 " %10" PRIu64 " %10" PRIu64 " %6s", p->slot,
		       (int)p->pid, (int)p->tid, p->state, p->samples, p->dropped, p->lost,
		       p->alive ? "yes" : "no");
		if (p->moves)
			printf("  (followed %" PRIu64 " owner restart%s; LOST: records in between)",
			       p->moves, p->moves == 1 ? "" : "s");
		putchar('\n');
	}
}

static void print_consumers(const struct cli_view *v)
{
	char age[32];

	printf("\nCONSUMERS (%d)\n", v->nconsumers);
	if (!v->nconsumers)
		return;
	printf("  %-32s %10s %11s %-7s %7s  %s\n", "STREAM/CONSUMER", "PENDING", "ACK_PENDING",
	       "SOURCE", "AGE", "FILTER");
	for (int i = 0; i < v->nconsumers; i++) {
		const struct tally_consumer_stats *c = &v->consumers[i];
		char sc[260];
		snprintf(sc, sizeof(sc), "%s/%s", c->stream, c->consumer);
		printf("  %-32s %10" PRIu64 " %11" PRIu64 " %-7s %7s  %s\n", sc, c->num_pending,
		       c->num_ack_pending, c->source, cli_fmt_age_ms(age, sizeof(age), c->age_ms),
		       *c->map ? c->map : *c->filter ? c->filter : "-");
	}
}

static void print_remote(const struct cli_view *v)
{
	const struct tally_share_status *sh = &v->share;
	char age[32], p95[32];

	if (!v->share_on)
		return;
	printf("\nREMOTE (%d) host %s, bucket %s: %s%s", v->nremote, *sh->host ? sh->host : "-",
	       *sh->bucket ? sh->bucket : "-", sh->state, sh->connected ? "" : ", not connected");
	printf(", puts %" PRIu64 " (%" PRIu64 " failed), received %" PRIu64 ", rejected %" PRIu64
	       ", expired %" PRIu64 "\n", sh->puts, sh->put_errors, sh->updates, sh->rejected, sh->expired);
	if (*sh->last_error)
		printf("  last error (%s ago): %s\n", cli_fmt_age_ms(age, sizeof(age), sh->last_error_age_ms),
		       sh->last_error);
	if (!v->nremote)
		return;
	printf("  %-16s %-32s %-8s %8s %10s %10s %7s  %s\n", "HOST", "SUBJECT", "VERDICT", "PRESSURE", "P95",
	       "PENDING", "AGE", "COMBINE");
	for (int i = 0; i < v->nremote; i++) {
		const struct tally_remote_stats *r = &v->remote[i];

		printf("  %-16s %-32s %-8s %8.3f %10s %10" PRIu64 " %7s  %s\n", r->host, r->subject,
		       tally_verdict_name(r->verdict), r->pressure, cli_fmt_ns(p95, sizeof(p95), r->p95_ns),
		       r->pending, cli_fmt_age_ms(age, sizeof(age), r->age_ms),
		       r->stale ? "stale" : r->combined ? "max" : "local");
	}
}

static void print_poller(const struct cli_view *v)
{
	const struct tally_poller_stats *p = &v->poller;
	char age[32];

	printf("\nPOLLER\n");
	if (!v->poller_ran) {
		printf("  not running: no JetStream poll has been made on this segment\n");
		return;
	}
	printf("  breaker %s (for %s), %s, polls %" PRIu64 " ok %" PRIu64 " failed, %u consecutive failures\n",
	       p->breaker, cli_fmt_age_ms(age, sizeof(age), p->state_age_ms),
	       p->connected ? "connected" : "NOT CONNECTED", p->polls_ok, p->polls_failed,
	       p->consecutive_failures);
	if (p->polls_ok + p->polls_failed == 0)
		printf("  first poll not finished yet, %s ago: %s\n", cli_fmt_age_ms(age, sizeof(age), p->state_age_ms),
		       p->connected ? "its requests are in flight"
				    : "connecting (the server has not completed the handshake)");
	else if (p->last_ok_age_ms == UINT64_MAX)
		printf("  no good poll yet\n");
	else
		printf("  last good poll %s ago\n", cli_fmt_age_ms(age, sizeof(age), p->last_ok_age_ms));
	if (p->untracked_consumers)
		printf("  PENDING TABLE FULL: %" PRIu64 " consumer(s) found by the last poll are not "
		       "tracked (pending_capacity = %u; raise it in [segment] of tallyd.ini)\n",
		       p->untracked_consumers, v->info.config.pending_capacity);
	if (*p->last_error)
		printf("  last error (%s ago%s): %s\n",
		       cli_fmt_age_ms(age, sizeof(age), p->last_error_age_ms),
		       p->consecutive_failures ? "" : ", recovered since", p->last_error);
}

/* ---- stat: JSON ---------------------------------------------------------------- */

static json_t *jint(uint64_t v)
{
	return json_integer(v > INT64_MAX ? INT64_MAX : (json_int_t)v);
}

static json_t *jns(bool has, uint64_t v)
{
	return has ? jint(v) : json_null();
}

/* A JSON string that is valid UTF-8 whatever the segment held (jansson
 * refuses invalid UTF-8, which would drop the field): see text.h. */
static json_t *jtext(const char *s)
{
	char clean[4 * 256];

	text_utf8_clean(s, clean, sizeof(clean));
	return json_string(clean);
}

static json_t *jstr_or_null(const char *s)
{
	return s && *s ? jtext(s) : json_null();
}

static const char *pending_source_name(uint32_t src)
{
	switch (src) {
	case TALLY_PENDING_LIVE: return "live";
	case TALLY_PENDING_CACHED: return "cached";
	case TALLY_PENDING_NEVER: return "never";
	case TALLY_PENDING_GONE: return "gone";
	case TALLY_PENDING_NOT_FOUND: return "not_found";
	default: return "none";
	}
}

static json_t *json_reasons(uint32_t bits, const char *extra)
{
	char buf[128], *save, *tok;
	json_t *a = json_array();

	if (extra)
		json_array_append_new(a, json_string(extra));
	tally_reasons_format(bits, buf, sizeof(buf));
	for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
		json_array_append_new(a, json_string(tok));
	return a;
}

static json_t *json_segment(const struct cli_view *v)
{
	return json_pack("{s:s, s:i, s:b, s:b, s:I, s:I, s:I, s:I, s:b, s:o, s:i, s:i}",
			 "name", v->info.name, "owner_pid", (int)v->info.owner_pid,
			 "owner_alive", v->alive == 1, "owner_stopped", (int)v->info.owner_stopped,
			 "generation", (json_int_t)v->info.generation,
			 "created_at", (json_int_t)(v->info.created_ns / 1000000u),
			 "published_at", (json_int_t)v->published_at_ms,
			 "published_age_ms", (json_int_t)v->published_age_ms,
			 "stale", (int)v->stale, "stale_reason", jstr_or_null(v->stale_reason),
			 "abi_major", (int)v->info.abi_major, "abi_minor", (int)v->info.abi_minor);
}

static const char *stale_policy_name(enum tally_stale_policy p)
{
	return p == TALLY_STALE_FAIL_CLOSED ? "fail-closed" : "fail-open";
}

/* The threshold rule that judged the subject, as it is in force in the
 * owner (its rules section); null when the owner does not say. */
static json_t *json_rule(const struct cli_subject *s)
{
	const struct tally_threshold_rule *r = &s->rule.levels;

	if (!s->published || !s->has_rule)
		return json_null();
	json_t *o = json_object();
	json_object_set_new(o, "pattern", s->rule.is_default ? json_null() : jtext(s->rule.pattern));
	json_object_set_new(o, "default", json_boolean(s->rule.is_default));
	json_object_set_new(o, "p95_warn_ns", jint(r->p95_warn_ns));
	json_object_set_new(o, "p95_overload_ns", jint(r->p95_overload_ns));
	json_object_set_new(o, "pending_warn", jint(r->pending_warn));
	json_object_set_new(o, "pending_overload", jint(r->pending_overload));
	json_object_set_new(o, "wait_p95_warn_ns", jint(r->wait_p95_warn_ns));
	json_object_set_new(o, "wait_p95_overload_ns", jint(r->wait_p95_overload_ns));
	json_object_set_new(o, "codel_target_ns", jint(r->codel_target_ns));
	json_object_set_new(o, "codel_interval_ms", jint(r->codel_interval_ms));
	json_object_set_new(o, "min_samples", jint(r->min_samples));
	json_object_set_new(o, "stale_after_ms", jint(r->stale_after_ms));
	json_object_set_new(o, "stale_policy", json_string(stale_policy_name(r->stale_policy)));
	json_object_set_new(o, "clear_ratio", json_real(r->clear_ratio));
	json_object_set_new(o, "min_dwell_ms", jint(r->min_dwell_ms));
	json_object_set_new(o, "retry_after_ms", jint(r->retry_after_ms));
	json_object_set_new(o, "retry_after_max_ms", jint(r->retry_after_max_ms));
	json_object_set_new(o, "stall_after_ms", jint(r->stall_after_ms));
	return o;
}

static json_t *json_subject(const struct cli_view *v, const struct cli_subject *s)
{
	const struct tally_subject_stats *st = &s->st;
	bool has = s->published && st->has_data, pend = s->published && st->pending_consumers;
	uint64_t mono = v->now_mono_ns;
	json_t *o = json_object();

	json_object_set_new(o, "name", jtext(s->name));
	json_object_set_new(o, "count", jint(st->count));
	json_object_set_new(o, "rate", json_real(st->rate));
	json_object_set_new(o, "mean_ns", has ? json_real(st->mean) : json_null());
	json_object_set_new(o, "min_ns", jns(has, st->min_ns));
	json_object_set_new(o, "max_ns", jns(has, st->max_ns));
	json_object_set_new(o, "p50_ns", jns(has, st->p50_ns));
	json_object_set_new(o, "p90_ns", jns(has, st->p90_ns));
	json_object_set_new(o, "p95_ns", jns(has, st->p95_ns));
	json_object_set_new(o, "p99_ns", jns(has, st->p99_ns));
	json_object_set_new(o, "p999_ns", jns(has, st->p999_ns));
	json_object_set_new(o, "total_count", jint(st->total_count));
	json_object_set_new(o, "window_ms", s->published ? jint(st->window_ns / 1000000u) : json_null());
	json_object_set_new(o, "pending", pend ? jint(st->pending) : json_null());
	json_object_set_new(o, "pending_consumers", jint(s->published ? st->pending_consumers : 0));
	json_object_set_new(o, "pending_source", json_string(pending_source_name(st->pending_source)));
	json_object_set_new(o, "pending_age_ms", pend && st->pending_age_ns != UINT64_MAX ?
							 jint(st->pending_age_ns / 1000000u) : json_null());
	json_object_set_new(o, "pending_shared", json_boolean(pend && st->pending_shared));
	json_object_set_new(o, "pending_consumer", pend ? jstr_or_null(s->pending_consumer) : json_null());
	json_object_set_new(o, "verdict", json_string(tally_verdict_name(cli_effective_verdict(v, s))));
	json_object_set_new(o, "reasons", !s->published ? json_reasons(TALLY_REASON_NO_DATA, NULL) :
					   json_reasons(st->reasons, v->stale_reason));
	json_object_set_new(o, "published_verdict", s->published ?
					   json_string(tally_verdict_name(st->verdict)) : json_null());
	json_object_set_new(o, "verdict_age_ms", s->published && mono >= st->verdict_since_ns ?
					   jint((mono - st->verdict_since_ns) / 1000000u) : json_null());
	json_object_set_new(o, "retry_after_ms", jint(s->published ? st->retry_after_ms : 0));
	bool wait = s->published && st->has_wait, codel = s->published && st->codel_valid;
	json_object_set_new(o, "wait_count", jint(s->published ? st->wait_count : 0));
	json_object_set_new(o, "wait_p50_ns", jns(wait, st->wait_p50_ns));
	json_object_set_new(o, "wait_p95_ns", jns(wait, st->wait_p95_ns));
	json_object_set_new(o, "wait_p99_ns", jns(wait, st->wait_p99_ns));
	json_object_set_new(o, "wait_min_ns", jns(codel, st->wait_min_ns));
	json_object_set_new(o, "wait_skewed", jint(s->published ? st->wait_skewed : 0));
	json_object_set_new(o, "codel_overloaded", codel ? json_boolean(st->codel_overloaded) : json_null());
	json_object_set_new(o, "pressure", json_real(s->published && !v->stale ? st->pressure : 0.0));
	json_object_set_new(o, "shed_probability", json_real(s->published && !v->stale ? st->shed_probability : 0.0));
	json_object_set_new(o, "rule", json_rule(s));
	return o;
}

static json_t *json_producer(const struct tally_producer_stats *p)
{
	return json_pack("{s:i, s:i, s:i, s:s, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:b}", "slot",
			 (int)p->slot, "pid", (int)p->pid, "tid", (int)p->tid, "state", p->state,
			 "generation", jint(p->generation), "samples", jint(p->samples),
			 "dropped", jint(p->dropped), "clamped", jint(p->clamped),
			 "backlog", jint(p->backlog), "lost", jint(p->lost), "moves", jint(p->moves),
			 "alive", (int)p->alive);
}

static json_t *json_consumer(const struct tally_consumer_stats *c)
{
	return json_pack("{s:s, s:s, s:o, s:o, s:o, s:o, s:o, s:o, s:s, s:o, s:i, s:o, s:o, s:o}",
			 "stream", c->stream, "consumer", c->consumer,
			 "filter", jstr_or_null(c->filter), "map_subject", jstr_or_null(c->map),
			 "num_pending", jint(c->num_pending), "num_ack_pending", jint(c->num_ack_pending),
			 "num_redelivered", jint(c->num_redelivered), "num_waiting", jint(c->num_waiting),
			 "source", c->source,
			 "age_ms", c->age_ms == UINT64_MAX ? json_null() : jint(c->age_ms),
			 "consecutive_failures", (int)c->consecutive_failures,
			 "last_error", jstr_or_null(c->last_error),
			 "server", jstr_or_null(c->server),
			 "is_leader", c->is_leader < 0 ? json_null() : json_boolean(c->is_leader == 1));
}

static json_t *json_poller(const struct cli_view *v)
{
	const struct tally_poller_stats *p = &v->poller;

	return json_pack("{s:b, s:s, s:b, s:o, s:o, s:i, s:o, s:o, s:o, s:o, s:o, s:o}", "running", (int)v->poller_ran,
			 "breaker", p->breaker ? p->breaker : "closed", "connected", (int)p->connected,
			 "polls_ok", jint(p->polls_ok), "polls_failed", jint(p->polls_failed),
			 "consecutive_failures", (int)p->consecutive_failures,
			 "opens_total", jint(p->opens_total),
			 "last_ok_age_ms", p->last_ok_age_ms == UINT64_MAX ? json_null() : jint(p->last_ok_age_ms),
			 "state_age_ms", p->state_age_ms == UINT64_MAX ? json_null() : jint(p->state_age_ms),
			 "last_error", jstr_or_null(p->last_error),
			 "last_error_age_ms", *p->last_error && p->last_error_age_ms != UINT64_MAX ?
			 jint(p->last_error_age_ms) : json_null(),
			 "untracked_consumers", jint(p->untracked_consumers));
}

static json_t *json_totals(const struct cli_view *v)
{
	const struct tally_segment_totals *t = &v->totals;

	return json_pack("{s:o, s:o, s:o, s:o, s:o, s:o}", "recorded", jint(t->recorded), "drained",
			 jint(t->drained), "dropped", jint(t->dropped), "clamped", jint(t->clamped),
			 "rejected", jint(t->rejected), "skipped", jint(t->skipped));
}

static json_t *json_remote(const struct tally_remote_stats *r)
{
	return json_pack("{s:s, s:s, s:s, s:o, s:f, s:f, s:o, s:o, s:i, s:o, s:b, s:b, s:o}", "host", r->host,
			 "subject", r->subject, "verdict", tally_verdict_name(r->verdict),
			 "reasons", json_reasons(r->reasons, NULL),
			 "pressure", r->pressure, "shed_probability", r->shed_probability,
			 "p95_ns", jint(r->p95_ns), "pending", jint(r->pending),
			 "retry_after_ms", (int)r->retry_after_ms, "age_ms", jint(r->age_ms),
			 "stale", (int)r->stale, "combined", (int)r->combined, "revision", jint(r->revision));
}

static json_t *json_share(const struct cli_view *v)
{
	const struct tally_share_status *s = &v->share;

	if (!v->share_on)
		return json_null();
	return json_pack("{s:s, s:b, s:s, s:s, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:i, s:i, s:i, s:i}",
			 "state", s->state, "connected", (int)s->connected, "host", s->host, "bucket", s->bucket,
			 "puts", jint(s->puts), "put_errors", jint(s->put_errors), "received", jint(s->updates),
			 "rejected", jint(s->rejected), "expired", jint(s->expired), "dropped_full", jint(s->full),
			 "last_put_age_ms", s->last_put_age_ms == UINT64_MAX ? json_null() : jint(s->last_put_age_ms),
			 "last_error", jstr_or_null(s->last_error),
			 "last_error_age_ms", s->last_error_age_ms == UINT64_MAX ? json_null()
										: jint(s->last_error_age_ms),
			 "refresh_ms", (int)s->refresh_ms, "stale_after_ms", (int)s->stale_after_ms,
			 "max_age_ms", (int)s->max_age_ms, "remote_capacity", (int)s->remote_capacity);
}

/* ---- a gateway's routes (--gateway URL) ---------------------------------------- */

static size_t gather(char *p, size_t size, size_t n, void *u)
{
	struct { char *buf; size_t len; } *b = u;
	size_t k = size * n;

	if (b->len + k > 1u << 20)
		return 0; /* more than a routes document can be: stop */
	char *nb = realloc(b->buf, b->len + k + 1);
	if (!nb)
		return 0;
	memcpy(nb + b->len, p, k);
	b->buf = nb;
	b->len += k;
	b->buf[b->len] = '\0';
	return k;
}

/* GET the gateway's ADMIN_PREFIX/routes (tally-gateway, docs/gateway.md):
 * url is the gateway's address, http://HOST:PORT, with its admin prefix as
 * the path when it is not /_tally. The parsed document with "url" added,
 * or NULL after a line on stderr that names the URL and the fix. */
static json_t *gateway_routes(const char *url)
{
	struct { char *buf; size_t len; } b = { NULL, 0 };
	char full[512], err[CURL_ERROR_SIZE] = "";
	const char *rest = strstr(url, "://");
	const char *path = rest ? strchr(rest + 3, '/') : NULL;
	size_t ul = strlen(url);
	long status = 0;

	while (ul && url[ul - 1] == '/')
		ul--;
	snprintf(full, sizeof(full), "%.*s%s/routes", (int)ul, url, path && path[1] ? "" : "/_tally");
	CURL *h = curl_easy_init();
	if (!h)
		return NULL;
	curl_easy_setopt(h, CURLOPT_URL, full);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, gather);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, err);
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	CURLcode c = curl_easy_perform(h);
	curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
	curl_easy_cleanup(h);
	json_t *doc = NULL;
	json_error_t je;
	if (c != CURLE_OK)
		fprintf(stderr, "tally stat: gateway %s: %s (is tally-gateway listening there? --gateway takes "
				"its address, http://HOST:PORT)\n", full, *err ? err : curl_easy_strerror(c));
	else if (status != 200)
		fprintf(stderr, "tally stat: gateway %s answered %ld (a tally-gateway of this version answers "
				"200; give its admin prefix as the URL's path if it is not /_tally)\n", full, status);
	else if (!b.buf || !(doc = json_loads(b.buf, 0, &je)) || !json_is_object(doc)) {
		fprintf(stderr, "tally stat: gateway %s: not a routes document (%s)\n", full,
			b.buf ? je.text : "empty");
		json_decref(doc);
		doc = NULL;
	} else
		json_object_set_new(doc, "url", json_string(full));
	free(b.buf);
	return doc;
}

static const char *jstr(const json_t *o, const char *key)
{
	const char *s = json_string_value(json_object_get(o, key));
	return s ? s : "?";
}

static uint64_t jnum(const json_t *o, const char *key)
{
	json_int_t v = json_integer_value(json_object_get(o, key));
	return v > 0 ? (uint64_t)v : 0;
}

/* The gateway's section of `tally stat`: its unmapped requests (the
 * recent distinct ones, oldest first), then its routes. The strings come
 * from the network: printed through the same cleaning as names. */
/* s cleaned into buf (text.h): its bytes came from the network. */
static const char *clean(const char *s, char *buf, size_t len)
{
	text_utf8_clean(s, buf, len);
	return buf;
}

static void print_gateway(const json_t *gw)
{
	const json_t *recent = json_object_get(gw, "recent_unmapped"), *routes = json_object_get(gw, "routes");
	char a[512], b[192], c[192];
	size_t i;
	json_t *e;

	printf("\nGATEWAY %s (%s mode, segment %s): %" PRIu64 " unmapped request%s, admitted\n",
	       clean(jstr(gw, "url"), a, sizeof(a)), clean(jstr(gw, "mode"), b, sizeof(b)),
	       clean(jstr(gw, "segment"), c, sizeof(c)), jnum(gw, "unmapped"), jnum(gw, "unmapped") == 1 ? "" : "s");
	if (json_array_size(recent)) {
		printf("  %-60s %10s\n", "UNMAPPED (the last distinct ones, no route matches them)", "COUNT");
		json_array_foreach(recent, i, e)
			printf("  %-60s %10" PRIu64 "\n", clean(jstr(e, "request"), a, sizeof(a)), jnum(e, "count"));
	}
	if (json_array_size(routes)) {
		printf("  %-36s %-23s %10s %10s\n", "ROUTE", "SUBJECT", "ADMITTED", "SHED");
		json_array_foreach(routes, i, e)
			printf("  %-36s %-23s %10" PRIu64 " %10" PRIu64 "\n", clean(jstr(e, "route"), a, sizeof(a)),
			       clean(jstr(e, "subject"), b, sizeof(b)), jnum(e, "admitted"), jnum(e, "shed"));
	}
}

static int print_json(const struct cli_view *v, bool compact, json_t *gateway)
{
	json_t *subjects = json_array(), *producers = json_array(), *consumers = json_array();
	json_t *remote = json_array();

	for (size_t i = 0; i < v->nsubjects; i++)
		json_array_append_new(subjects, json_subject(v, &v->subjects[i]));
	for (int i = 0; i < v->nproducers; i++)
		json_array_append_new(producers, json_producer(&v->producers[i]));
	for (int i = 0; i < v->nconsumers; i++)
		json_array_append_new(consumers, json_consumer(&v->consumers[i]));
	for (int i = 0; i < v->nremote; i++)
		json_array_append_new(remote, json_remote(&v->remote[i]));
	json_t *doc = json_pack("{s:i, s:I, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o}", "version", 1,
				"read_at", (json_int_t)v->read_at_ms,
				"segment", json_segment(v), "subjects", subjects,
				"consumers", consumers, "producers", producers,
				"poller", json_poller(v), "totals", json_totals(v),
				"remote", remote, "share", json_share(v));
	if (doc && gateway)
		json_object_set(doc, "gateway", gateway);
	if (!doc) {
		fprintf(stderr, "tally stat: could not build the JSON document (out of memory?)\n");
		return CLI_EXIT_ERROR;
	}
	int rc = json_dumpf(doc, stdout, (compact ? JSON_COMPACT : JSON_INDENT(2)) | JSON_PRESERVE_ORDER |
					 JSON_REAL_PRECISION(12));
	putchar('\n');
	json_decref(doc);
	if (rc || fflush(stdout)) {
		fprintf(stderr, "tally stat: writing the JSON document failed: %s\n", strerror(errno));
		return CLI_EXIT_ERROR;
	}
	return CLI_EXIT_OK;
}

/* Open the segment, read one view of it, close it: 0 or the exit status
 * (the error printed). */
static int view_of(const char *segment, struct cli_view *v)
{
	struct tally_segment *seg;
	int rc;

	if ((rc = cli_open_reader(segment, &seg)))
		return rc;
	rc = cli_view_read(seg, v);
	tally_segment_close(&seg);
	return rc ? cli_fail(segment, rc) : 0;
}

/* One read of the segment, printed, and of the gateway at gateway_url
 * when given. compact: JSON on one line (--watch). A gateway that cannot
 * be read is said on stderr and makes the exit status 4; the segment's
 * part is printed all the same. */
static int stat_once(const char *segment, bool json, bool compact, const char *gateway_url)
{
	struct cli_view v;
	json_t *gw = NULL;
	int rc;

	if ((rc = view_of(segment, &v)))
		return rc;
	if (gateway_url)
		gw = gateway_routes(gateway_url);
	if (json) {
		rc = print_json(&v, compact, gw);
	} else {
		print_header(&v);
		print_subjects(&v);
		print_producers(&v);
		print_consumers(&v);
		print_remote(&v);
		print_poller(&v);
		if (gw)
			print_gateway(gw);
		rc = CLI_EXIT_OK;
	}
	cli_view_free(&v);
	json_decref(gw);
	return rc == CLI_EXIT_OK && gateway_url && !gw ? CLI_EXIT_ERROR : rc;
}

static volatile sig_atomic_t watch_stop;

static void on_watch_signal(int sig)
{
	(void)sig;
	watch_stop = 1;
}

/* --watch: print every interval until SIGINT/SIGTERM (or count times),
 * for terminals without curses and for logs. Each table opens with a
 * line that carries the time; with --json each document is one line.
 * A missing segment or a dead owner is reported and watched on: the
 * segment is opened again at every interval, so a restarted tallyd is
 * followed. Exit 0 when stopped by a signal or after count prints. */
static int stat_watch(const char *segment, bool json, double seconds, uint64_t count, const char *gateway_url)
{
	struct sigaction sa = { .sa_handler = on_watch_signal };

	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (uint64_t n = 0; !watch_stop && (count == 0 || n < count); n++) {
		if (n) {
			struct timespec ts = { (time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9) };
			while (!watch_stop && nanosleep(&ts, &ts) != 0)
				;
			if (watch_stop)
				break;
		}
		if (!json) {
			struct timespec now;
			struct tm tm;
			char when[32] = "?";
			clock_gettime(CLOCK_REALTIME, &now);
			if (gmtime_r(&now.tv_sec, &tm))
				strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
			printf("%s--- %s, every %gs (tally stat --watch; Ctrl-C stops) ---\n", n ? "\n" : "",
			       when, seconds);
		}
		fflush(stdout);
		(void)stat_once(segment, json, true, gateway_url); /* errors are on stderr; go on watching */
		fflush(stdout);
	}
	return CLI_EXIT_OK;
}

int tally_cmd_stat(const char *segment, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "segment", required_argument, NULL, 's' },
		{ "json", no_argument, NULL, 'j' },
		{ "watch", optional_argument, NULL, 'w' },
		{ "count", required_argument, NULL, 'n' },
		{ "gateway", required_argument, NULL, 'g' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *gateway_url = NULL;
	bool json = false, watch = false;
	double seconds = 2.0;
	uint64_t count = 0;
	const char *interval = NULL;
	int c;

	optind = 0;
	while ((c = getopt_long(argc, argv, "+s:jw::n:g:h", opts, NULL)) != -1) {
		switch (c) {
		case 's': segment = optarg; break;
		case 'g':
			if (strncmp(optarg, "http://", 7) != 0 && strncmp(optarg, "https://", 8) != 0) {
				fprintf(stderr, "tally stat: --gateway \"%s\": give the gateway's address, "
						"e.g. http://127.0.0.1:8090\n", optarg);
				return CLI_EXIT_USAGE;
			}
			gateway_url = optarg;
			break;
		case 'j': json = true; break;
		case 'w':
			watch = true;
			/* --watch 5 as well as --watch=5 */
			if (optarg)
				interval = optarg;
			else if (optind < argc && argv[optind][0] >= '0' && argv[optind][0] <= '9')
				interval = argv[optind++];
			break;
		case 'n':
			if (cli_parse_u64(optarg, &count) || count == 0) {
				fprintf(stderr, "tally stat: --count \"%s\": give a whole number >= 1\n", optarg);
				return CLI_EXIT_USAGE;
			}
			break;
		case 'h': fputs(stat_help, stdout); return CLI_EXIT_OK;
		default: fputs(stat_help, stderr); return CLI_EXIT_USAGE;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "tally stat: unexpected argument \"%s\"\n", argv[optind]);
		fputs(stat_help, stderr);
		return CLI_EXIT_USAGE;
	}
	if (interval) {
		char *end;
		errno = 0;
		seconds = strtod(interval, &end);
		if (errno || end == interval || *end || !(seconds >= 0.1 && seconds <= 3600)) {
			fprintf(stderr, "tally stat: --watch \"%s\": give the interval in seconds, 0.1 to 3600\n",
				interval);
			return CLI_EXIT_USAGE;
		}
	}
	if (count && !watch) {
		fprintf(stderr, "tally stat: --count goes with --watch\n");
		return CLI_EXIT_USAGE;
	}
	return watch ? stat_watch(segment, json, seconds, count, gateway_url)
		     : stat_once(segment, json, false, gateway_url);
}

/* ---- status ------------------------------------------------------------------- */

static const char status_help[] =
	"usage: tally status [-s SEGMENT] SUBJECT\n"
	"\n"
	"Print the backpressure verdict of SUBJECT as its owner last published it,\n"
	"its reasons and the values that decided it (P95, pending, since when,\n"
	"retry-after), and exit with it, for scripts and health checks:\n"
	"\n"
	"  0  ok\n"
	"  1  warn\n"
	"  2  overload\n"
	"  3  unknown: too few samples and no pending signal, pending stale under a\n"
	"     fail-closed policy, nothing published for SUBJECT yet, or the data is\n"
	"     not live: the segment's owner is dead or stopped, or has stopped\n"
	"     publishing (the last published verdict is printed beside it)\n"
	"  4  error: no such segment, no such subject in it, a subject name that is\n"
	"     not a valid NATS subject, no permission, version mismatch; and bad\n"
	"     usage too (message on stderr): exit 2 means overload here, so a\n"
	"     mistyped health check never reads as a verdict\n"
	"\n"
	"  -s, --segment NAME   segment (default $TALLY_SEGMENT, else \"tally\")\n"
	"  -q, --quiet          print nothing on stdout, only exit with the status\n"
	"                       (an error still says what went wrong, on stderr)\n"
	"  -h, --help           this help\n";

/* "p95 100 ms / 500 ms" or "p95 off": a level pair of the rule. */
static const char *level_pair(char *buf, size_t len, const char *what, uint64_t warn, uint64_t over, bool ns)
{
	char a[32], b[32];

	if (!warn && !over) {
		snprintf(buf, len, "%s off", what);
		return buf;
	}
	if (ns) {
		cli_fmt_ns(a, sizeof(a), warn);
		cli_fmt_ns(b, sizeof(b), over);
	} else {
		snprintf(a, sizeof(a), "%" PRIu64, warn);
		snprintf(b, sizeof(b), "%" PRIu64, over);
	}
	snprintf(buf, len, "%s %s / %s", what, warn ? a : "-", over ? b : "-");
	return buf;
}

/* Which threshold rule judged the subject, and its levels (warn / overload). */
static void print_rule(const struct cli_subject *s)
{
	const struct tally_threshold_rule *r = &s->rule.levels;
	char p[96], q[96], w[96], c[32];

	if (!s->has_rule) {
		printf("  rule: not known (the owner keeps no rules section: an older tallyd)\n");
		return;
	}
	if (s->rule.is_default)
		printf("  rule: the default ([thresholds]), no pattern matches\n");
	else
		printf("  rule: [thresholds \"%s\"]\n", s->rule.pattern); /* a valid pattern: checked by the reader */
	printf("    warn / overload: %s, %s, %s\n",
	       level_pair(p, sizeof(p), "p95", r->p95_warn_ns, r->p95_overload_ns, true),
	       level_pair(q, sizeof(q), "pending", r->pending_warn, r->pending_overload, false),
	       level_pair(w, sizeof(w), "wait p95", r->wait_p95_warn_ns, r->wait_p95_overload_ns, true));
	if (r->codel_target_ns)
		printf("    codel target %s per %u ms, stale after %u ms (%s), at least %" PRIu64 " samples\n",
		       cli_fmt_ns(c, sizeof(c), r->codel_target_ns), r->codel_interval_ms, r->stale_after_ms,
		       stale_policy_name(r->stale_policy), r->min_samples);
	else
		printf("    codel off, stale after %u ms (%s), at least %" PRIu64 " samples\n", r->stale_after_ms,
		       stale_policy_name(r->stale_policy), r->min_samples);
}

static void print_status(const struct cli_view *v, const struct cli_subject *s)
{
	const struct tally_subject_stats *st = &s->st;
	char b1[32], b2[32], reasons[96];

	tally_reasons_format(st->reasons, reasons, sizeof(reasons));
	if (v->stale) {
		printf("%s: unknown (%s)\n", s->name, v->stale_reason);
		printf("  not live: owner pid %d %s, last publish %s ago; it said %s%s%s%s\n",
		       (int)v->info.owner_pid, owner_word(v),
		       cli_fmt_age_ms(b1, sizeof(b1), v->published_age_ms), tally_verdict_name(st->verdict),
		       *reasons ? " (" : "", reasons, *reasons ? ")" : "");
		return;
	}
	printf("%s: %s%s%s%s\n", s->name, tally_verdict_name(st->verdict), *reasons ? " (" : "",
	       reasons, *reasons ? ")" : "");
	if (st->has_data)
		printf("  p95 %s over %" PRIu64 " samples (%.1f/s) in the last %s\n",
		       cli_fmt_ns(b1, sizeof(b1), st->p95_ns), st->count, st->rate,
		       cli_fmt_age_ms(b2, sizeof(b2), st->window_ns / 1000000u));
	else
		printf("  p95 -: no sample in the last %s\n",
		       cli_fmt_age_ms(b2, sizeof(b2), st->window_ns / 1000000u));
	if (st->pending_consumers) {
		printf("  pending %" PRIu64 " from %u consumer%s (%s, %s old)\n", st->pending,
		       st->pending_consumers, st->pending_consumers == 1 ? "" : "s",
		       pending_source_name(st->pending_source),
		       st->pending_age_ns == UINT64_MAX ? "never fetched" :
		       cli_fmt_age_ms(b1, sizeof(b1), st->pending_age_ns / 1000000u));
		if (s->pending_consumer[0])
			printf("  backlog of %s%s\n", s->pending_consumer,
			       st->pending_shared ? ", shared: its filter covers other subjects too" : "");
	} else if (st->pending_source == TALLY_PENDING_GONE || st->pending_source == TALLY_PENDING_NOT_FOUND) {
		printf("  pending -: the consumer feeding this subject %s\n",
		       st->pending_source == TALLY_PENDING_GONE ? "was deleted" : "was not found");
	} else {
		printf("  pending -: no watched consumer feeds this subject\n");
	}
	if (st->has_wait)
		printf("  wait p50 %s, p95 %s, p99 %s over %" PRIu64 " messages (from their ack replies)%s\n",
		       cli_fmt_ns(b1, sizeof(b1), st->wait_p50_ns), cli_fmt_ns(b2, sizeof(b2), st->wait_p95_ns),
		       cli_fmt_ns(reasons, sizeof(reasons), st->wait_p99_ns), st->wait_count,
		       st->wait_skewed ? ", some with clock skew (counted as 0)" : "");
	else
		printf("  wait -: no ack reply recorded (tally_record_jetstream)\n");
	if (st->codel_valid)
		printf("  codel: minimum wait %s over the last interval, %s\n",
		       cli_fmt_ns(b1, sizeof(b1), st->wait_min_ns),
		       st->codel_overloaded ? "above target: a standing queue" : "within target");
	printf("  pressure %.2f, shed probability %.2f\n", st->pressure, st->shed_probability);
	print_rule(s);
	uint64_t since = v->now_mono_ns > st->verdict_since_ns ? v->now_mono_ns - st->verdict_since_ns : 0;
	printf("  since %s ago, retry-after %u ms\n", cli_fmt_age_ms(b1, sizeof(b1), since / 1000000u),
	       st->retry_after_ms);
}

static int status_exit(enum tally_verdict v)
{
	switch (v) {
	case TALLY_VERDICT_OK: return 0;
	case TALLY_VERDICT_WARN: return 1;
	case TALLY_VERDICT_OVERLOAD: return 2;
	default: return 3;
	}
}

/* Find subject in the view; NULL and exit 4 printed if it is not there. */
static const struct cli_subject *status_find(const struct cli_view *v, const char *segment,
					     const char *subject)
{
	for (size_t i = 0; i < v->nsubjects; i++)
		if (strcmp(v->subjects[i].name, subject) == 0)
			return &v->subjects[i];
	fprintf(stderr, "tally status: no subject \"%s\" in segment \"%s\": no threshold rule or watched consumer names it and nothing was ever recorded for it (list them with: tally -s %s stat)\n",
		subject, segment, segment);
	return NULL;
}

int tally_cmd_status(const char *segment, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "segment", required_argument, NULL, 's' },
		{ "quiet", no_argument, NULL, 'q' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_view v;
	bool quiet = false;
	int c, rc;

	optind = 0;
	while ((c = getopt_long(argc, argv, "s:qh", opts, NULL)) != -1) {
		switch (c) {
		case 's': segment = optarg; break;
		case 'q': quiet = true; break;
		case 'h': fputs(status_help, stdout); return CLI_EXIT_OK;
		default: fputs(status_help, stderr); return CLI_EXIT_ERROR;
		}
	}
	if (argc - optind != 1) {
		fprintf(stderr, "tally status: give exactly one SUBJECT\n");
		fputs(status_help, stderr);
		return CLI_EXIT_ERROR;
	}
	const char *subject = argv[optind];
	if ((rc = tally_subject_validate(subject, false))) {
		fprintf(stderr, "tally status: %s\n", *tally_errmsg() ? tally_errmsg() : tally_strerror(rc));
		return CLI_EXIT_ERROR;
	}
	if ((rc = view_of(segment, &v)))
		return rc;
	const struct cli_subject *s = status_find(&v, segment, subject);
	if (!s) {
		rc = CLI_EXIT_ERROR;
	} else if (!s->published) {
		if (!quiet)
			printf("%s: unknown (no_data)\n  no sample of it since the owner started (nothing published for it)\n",
			       s->name);
		rc = 3;
	} else {
		if (!quiet)
			print_status(&v, s);
		rc = status_exit(cli_effective_verdict(&v, s));
	}
	cli_view_free(&v);
	return rc;
}
