/* SPDX-License-Identifier: MIT */
/*
 * lib/share.c: the share thread (contract in tally/share.h). It owns its
 * own cnats connection, JetStream context, KV store handle and watcher,
 * the per-subject memory of what it last put, and the private index of the
 * remote section (key -> entry, chained hash); it is the only writer of
 * the remote section (lib/remote.h). It reads this host's snapshot through
 * the public reader (tally_read_subject), never the engine's internals, so
 * the aggregator neither knows nor waits for it.
 *
 * One loop, one thread:
 *   not bound  -> connect, bind the bucket (create it unless no_create),
 *                 start a watch of every key; on failure record the error,
 *                 state failing, wait retry_ms, try again;
 *   bound      -> every interval_ms: scan the snapshot and put what
 *                 changed or is due for refresh; remove mirrored entries
 *                 past max_age; between scans, take watch updates (other
 *                 hosts' puts, deletes, purges) into the section. A put or
 *                 watch failure unbinds (state failing, error recorded):
 *                 a deleted bucket is bound (made again) on the next try;
 *                 so does a watch that stopped delivering (watch_stalled:
 *                 our own puts come back through it, or it is dead).
 * The status block is rewritten after every step, so `tally stat` sees the
 * state, counters and last error within interval_ms.
 *
 * Puts are asynchronous: js_PublishAsync to the bucket's subject
 * ("$KV.<bucket>.<key>", what kvStore_Put sends, without waiting for its
 * ack), at most max_inflight unacknowledged (jsOptions
 * PublishAsync.MaxPending: a put past it waits up to request_timeout_ms
 * for room, then fails), each acknowledged or failed within
 * request_timeout_ms (jsPubOptions.MaxWait: cnats reports a timeout).
 * cnats calls ack_cb on its own reply thread; ack_cb only counts, under
 * acks.lock, and keeps the first failure. The share thread takes the
 * counts at the end of every step (collect_acks): acknowledged puts count
 * as puts, failures as put_errors, and a failure unbinds exactly as a
 * synchronous put's did. What this host last put (last[]) is set when the
 * put is sent; a failure unbinds, and binding again puts everything anew,
 * so a lost put is never taken for a written one. Each unbinding drops
 * the context's unacknowledged puts (quiesce: after it cnats calls ack_cb
 * no more for that context); stopping first waits up to
 * request_timeout_ms for them.
 */
#define _GNU_SOURCE
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <nats/nats.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <tally/share.h>
#include <tally/verdict.h>

#include "common.h"
#include "proc.h"
#include "remote.h"
#include "segment.h"
#include "sharecodec.h"
#include "subject.h"

#define NS_PER_MS 1000000ull
enum { LOG_ERR = 0, LOG_WARN = 1, LOG_INFO = 2, LOG_DEBUG = 3 };

#define MAX_INFLIGHT_DEFAULT 256u

/* What cnats' reply thread reports (ack_cb), taken by the share thread (collect_acks). */
struct acks {
	pthread_mutex_t lock;
	jsCtx *js;                      /* the context whose acks count (others: a dropped one) */
	uint64_t ok, failed;            /* since the last collect */
	uint64_t last_ok_ns;            /* CLOCK_MONOTONIC of the last ack, 0 none since */
	natsStatus err;                 /* the first failure since the last collect */
	char err_key[TALLY__SHARE_KEY_MAX];
	char err_text[128];             /* JetStream's own description, "" none */
};

/* What this host last put for one subject id. */
struct last_put {
	bool valid;
	uint32_t verdict, reasons, retry;
	double pressure, shed;
	uint64_t p95, pending, at_ns;
};

struct tally_share {
	struct tally_share_config cfg;  /* strings and rules are copies */
	char *strings;                  /* one block holding every copied string */
	struct tally_segment *seg;
	void *section;
	size_t len;
	uint32_t cap;                   /* remote entries */
	/* remote index: chain heads per bucket, next per entry (UINT32_MAX end) */
	uint32_t *heads, *next, mask;
	bool *used;
	/* this host's subjects */
	uint32_t nsubj;
	struct last_put *last;
	char **names;                   /* subject name per id, NULL not read yet */
	/* NATS */
	natsOptions *opts;
	natsConnection *nc;
	jsCtx *js;
	kvStore *kv;
	kvWatcher *w;
	struct acks acks;
	char put_pre[TALLY__REMOTE_BUCKET_MAX + 192]; /* "[$JS.<domain>.API.]$KV.<bucket>." */
	size_t put_pre_len;
	char prefix[TALLY__REMOTE_HOST_MAX + 1]; /* "<host>." */
	struct tally__remote_status_view st;
	uint64_t next_scan_ns, retry_at_ns;
	uint64_t last_hb_ns;            /* last put of our heartbeat key "<host>" */
	uint64_t unechoed_ns;           /* first put of ours not yet seen back through the watch, 0 none */
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t wake;
	bool stopping, running;
};

/* ---- small helpers ---- */

static void default_log(void *ctx, int level, const char *msg)
{
	(void)ctx;
	if (level <= LOG_INFO)
		fprintf(stderr, "tally share %s: %s\n", level == LOG_ERR ? "error" : level == LOG_WARN ?
			"warning" : "info", msg);
}

__attribute__((format(printf, 3, 4)))
static void slog(const struct tally_share *s, int level, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	(s->cfg.log ? s->cfg.log : default_log)(s->cfg.log_ctx, level, msg);
}

static uint32_t or_default(uint32_t v, uint32_t def)
{
	return v ? v : def;
}

static bool empty(const char *s)
{
	return !s || !*s;
}

/* cnats' last error without its "(file.c:123): " prefix. */
static const char *nats_detail(void)
{
	natsStatus st;
	const char *t = nats_GetLastError(&st), *end;

	if (!t)
		return "";
	if (t[0] == '(' && (end = strstr(t, "): ")))
		return end + 3;
	return t;
}

static void publish_status(struct tally_share *s)
{
	tally__remote_write_status(tally__remote_status_at(s->section), &s->st);
}

static void set_state(struct tally_share *s, uint32_t state)
{
	if (s->st.state != state) {
		s->st.state = state;
		s->st.since_ns = tally__mono_ns();
	}
	s->st.connected = s->nc && natsConnection_Status(s->nc) == NATS_CONN_STATUS_CONNECTED;
	publish_status(s);
}

/* Record a failure (once per distinct text in the log), state failing. */
__attribute__((format(printf, 2, 3)))
static void failure(struct tally_share *s, const char *fmt, ...)
{
	char msg[TALLY__REMOTE_ERR_MAX * 2];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (strncmp(msg, s->st.last_error, sizeof(s->st.last_error) - 1) != 0 ||
	    s->st.state != TALLY__SHARE_FAILING)
		slog(s, LOG_ERR, "%s (local verdicts are not affected; retrying every %u ms)", msg,
		     s->cfg.retry_ms);
	{ /* cut to the status block's field (intended: the log line has it whole) */
		size_t n = strnlen(msg, sizeof(s->st.last_error) - 1);

		memcpy(s->st.last_error, msg, n);
		s->st.last_error[n] = '\0';
	}
	s->st.last_error_ns = tally__mono_ns();
	s->retry_at_ns = s->st.last_error_ns + (uint64_t)s->cfg.retry_ms * NS_PER_MS;
	set_state(s, TALLY__SHARE_FAILING);
}

/* ---- configuration ---- */

TALLY_API void tally_share_config_init(struct tally_share_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->default_combine = TALLY_SHARE_MAX;
}

static void resolve(struct tally_share_config *c)
{
	c->interval_ms = or_default(c->interval_ms, 100);
	c->refresh_ms = or_default(c->refresh_ms, 5000);
	c->max_age_ms = or_default(c->max_age_ms, c->refresh_ms * 6 > 30000 ? c->refresh_ms * 6 : 30000);
	c->stale_after_ms = or_default(c->stale_after_ms, c->refresh_ms * 3 < c->max_age_ms ?
				       c->refresh_ms * 3 : c->max_age_ms);
	c->replicas = or_default(c->replicas, 1);
	c->request_timeout_ms = or_default(c->request_timeout_ms, 2000);
	c->retry_ms = or_default(c->retry_ms, 1000);
	c->max_inflight = or_default(c->max_inflight, MAX_INFLIGHT_DEFAULT);
	if (empty(c->bucket))
		c->bucket = TALLY_SHARE_BUCKET_DEFAULT;
}

static int bad(char *why, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int bad(char *why, size_t len, const char *fmt, ...)
{
	va_list ap;

	if (why && len) {
		va_start(ap, fmt);
		vsnprintf(why, len, fmt, ap);
		va_end(ap);
	}
	return -EINVAL;
}

static bool bucket_ok(const char *b)
{
	size_t n = strlen(b);

	if (n == 0 || n >= TALLY__REMOTE_BUCKET_MAX)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!((b[i] >= 'a' && b[i] <= 'z') || (b[i] >= 'A' && b[i] <= 'Z') ||
		      (b[i] >= '0' && b[i] <= '9') || b[i] == '_' || b[i] == '-'))
			return false;
	return true;
}

static int check_rules(const struct tally_share_config *c, char *why, size_t len)
{
	for (size_t i = 0; i < c->nrules; i++) {
		const struct tally_share_rule *r = &c->rules[i];

		if (empty(r->pattern) || tally__subject_check(r->pattern, strlen(r->pattern), true, NULL, 0))
			return bad(why, len, "combine rule %zu: \"%s\" is not a subject or NATS wildcard pattern",
				   i + 1, r->pattern ? r->pattern : "");
		if (r->combine != TALLY_SHARE_LOCAL && r->combine != TALLY_SHARE_MAX)
			return bad(why, len, "combine rule \"%s\": mode must be max or local", r->pattern);
	}
	return 0;
}

TALLY_API int tally_share_config_check(const struct tally_share_config *cfg, char *why, size_t len)
{
	struct tally_share_config c;

	if (!cfg)
		return bad(why, len, "no share configuration");
	c = *cfg;
	resolve(&c);
	if (empty(c.urls))
		return bad(why, len, "no NATS server URL: set url in [share] (or in [nats])");
	if (empty(c.host) || !tally__remote_host_ok(c.host))
		return bad(why, len, "host \"%s\" must be 1..%d bytes of letters, digits, '_' and '-' (it is "
			   "the first token of every key): set host in [share]", c.host ? c.host : "",
			   TALLY_SHARE_HOST_MAX);
	if (!bucket_ok(c.bucket))
		return bad(why, len, "bucket \"%s\" must be 1..63 bytes of letters, digits, '_' and '-'",
			   c.bucket);
	if (c.max_age_ms < 2 * c.refresh_ms)
		return bad(why, len, "max_age_ms %u must be at least twice refresh_ms %u, so that a live "
			   "host's entries never expire", c.max_age_ms, c.refresh_ms);
	if (c.stale_after_ms > c.max_age_ms || c.stale_after_ms < c.refresh_ms)
		return bad(why, len, "stale_after_ms %u must lie between refresh_ms %u and max_age_ms %u",
			   c.stale_after_ms, c.refresh_ms, c.max_age_ms);
	if (c.replicas > 5)
		return bad(why, len, "replicas %u is outside 1..5", c.replicas);
	if (c.max_inflight > 65536)
		return bad(why, len, "max_inflight %u is outside 1..65536", c.max_inflight);
	if (c.default_combine != TALLY_SHARE_LOCAL && c.default_combine != TALLY_SHARE_MAX)
		return bad(why, len, "default combine mode must be max or local");
	return check_rules(&c, why, len);
}

/* Deep copy of every string of src into one block. */
static int cfg_copy(struct tally_share *s, const struct tally_share_config *src)
{
	const char *const *from[] = { &src->urls, &src->creds_file, &src->user, &src->password, &src->token,
				      &src->tls_ca_file, &src->js_domain, &src->bucket, &src->host };
	const char **to[] = { &s->cfg.urls, &s->cfg.creds_file, &s->cfg.user, &s->cfg.password,
			      &s->cfg.token, &s->cfg.tls_ca_file, &s->cfg.js_domain, &s->cfg.bucket,
			      &s->cfg.host };
	size_t total = 0, off = 0, n = sizeof(from) / sizeof(from[0]);
	struct tally_share_rule *rules = NULL;

	s->cfg = *src;
	for (size_t i = 0; i < n; i++)
		total += *from[i] ? strlen(*from[i]) + 1 : 0;
	for (size_t i = 0; i < src->nrules; i++)
		total += strlen(src->rules[i].pattern) + 1;
	s->strings = malloc(total + 1);
	if (src->nrules)
		rules = calloc(src->nrules, sizeof(*rules));
	if (!s->strings || (src->nrules && !rules)) {
		free(rules);
		return -ENOMEM;
	}
	for (size_t i = 0; i < n; i++) {
		if (!*from[i])
			continue;
		*to[i] = memcpy(s->strings + off, *from[i], strlen(*from[i]) + 1);
		off += strlen(*from[i]) + 1;
	}
	for (size_t i = 0; i < src->nrules; i++) {
		rules[i].combine = src->rules[i].combine;
		rules[i].pattern = memcpy(s->strings + off, src->rules[i].pattern,
					  strlen(src->rules[i].pattern) + 1);
		off += strlen(src->rules[i].pattern) + 1;
	}
	s->cfg.rules = rules;
	resolve(&s->cfg);
	return 0;
}

/* The longest matching pattern decides; none: the default. */
static uint32_t combine_of(const struct tally_share *s, const char *subject)
{
	size_t best = 0;
	uint32_t mode = s->cfg.default_combine == TALLY_SHARE_LOCAL ? TALLY__COMBINE_LOCAL : TALLY__COMBINE_MAX;

	for (size_t i = 0; i < s->cfg.nrules; i++) {
		const struct tally_share_rule *r = &s->cfg.rules[i];
		size_t n = strlen(r->pattern);

		if (n > best && tally__subject_match(r->pattern, subject)) {
			best = n;
			mode = r->combine == TALLY_SHARE_LOCAL ? TALLY__COMBINE_LOCAL : TALLY__COMBINE_MAX;
		}
	}
	return mode;
}

/* ---- the remote index ---- */

static uint32_t key_hash(const char *host, const char *subject)
{
	return tally__subject_hash(host, strlen(host)) * 31u ^ tally__subject_hash(subject, strlen(subject));
}

static int index_alloc(struct tally_share *s)
{
	uint32_t b = 1;

	while (b < s->cap * 2)
		b <<= 1;
	s->mask = b - 1;
	s->heads = malloc(sizeof(uint32_t) * b);
	s->next = malloc(sizeof(uint32_t) * s->cap);
	s->used = calloc(s->cap, sizeof(bool));
	if (!s->heads || !s->next || !s->used)
		return -ENOMEM;
	memset(s->heads, 0xff, sizeof(uint32_t) * b);
	return 0;
}

/* Entry of (host, subject) and its view, or UINT32_MAX. */
static uint32_t index_find(struct tally_share *s, const char *host, const char *subject,
			   struct tally__remote_view *v)
{
	for (uint32_t i = s->heads[key_hash(host, subject) & s->mask]; i != UINT32_MAX; i = s->next[i])
		if (tally__remote_read_entry(s->section, s->len, i, v) == 0 && strcmp(v->host, host) == 0 &&
		    strcmp(v->subject, subject) == 0)
			return i;
	return UINT32_MAX;
}

static uint32_t index_add(struct tally_share *s, const char *host, const char *subject)
{
	uint32_t h = key_hash(host, subject) & s->mask;

	for (uint32_t i = 0; i < s->cap; i++) {
		if (s->used[i])
			continue;
		s->used[i] = true;
		s->next[i] = s->heads[h];
		s->heads[h] = i;
		return i;
	}
	return UINT32_MAX;
}

static void index_remove(struct tally_share *s, uint32_t idx, const char *host, const char *subject)
{
	uint32_t *link = &s->heads[key_hash(host, subject) & s->mask];

	while (*link != UINT32_MAX && *link != idx)
		link = &s->next[*link];
	if (*link == idx)
		*link = s->next[idx];
	s->used[idx] = false;
	tally__remote_clear_entry(tally__remote_entry_at(s->section, idx));
}

/* ---- NATS ---- */

/* cnats' reply thread: one put acknowledged (pa) or failed (pae: an error, no responders, a timeout). */
static void ack_cb(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
	struct tally_share *s = closure;
	struct acks *a = &s->acks;

	pthread_mutex_lock(&a->lock);
	if (js == a->js && pa) {
		a->ok++;
		a->last_ok_ns = tally__mono_ns();
	} else if (js == a->js && pae && a->failed++ == 0) {
		const char *subj = msg ? natsMsg_GetSubject(msg) : NULL;

		a->err = pae->Err;
		snprintf(a->err_key, sizeof(a->err_key), "%s", subj && strlen(subj) > s->put_pre_len ?
			 subj + s->put_pre_len : "?");
		snprintf(a->err_text, sizeof(a->err_text), "%s", pae->Err == NATS_ERR && pae->ErrText ?
			 pae->ErrText : "");
	}
	pthread_mutex_unlock(&a->lock);
	natsMsg_Destroy(msg);
}

/* What ack_cb counted since the last take, into *got, and from there into
 * the status: acknowledged puts into puts (and last_put_ns), failures into
 * put_errors. Zeroes the counts. */
static void take_acks(struct tally_share *s, struct acks *got)
{
	struct acks *a = &s->acks;

	pthread_mutex_lock(&a->lock);
	got->ok = a->ok;
	got->failed = a->failed;
	got->last_ok_ns = a->last_ok_ns;
	got->err = a->err;
	memcpy(got->err_key, a->err_key, sizeof(got->err_key));
	memcpy(got->err_text, a->err_text, sizeof(got->err_text));
	a->ok = a->failed = a->last_ok_ns = 0;
	a->err = NATS_OK;
	pthread_mutex_unlock(&a->lock);
	s->st.puts += got->ok;
	if (got->last_ok_ns)
		s->st.last_put_ns = got->last_ok_ns;
	s->st.put_errors += got->failed;
}

/*
 * After this, cnats calls ack_cb no more for s->js: its unacknowledged
 * puts, if any are left after waiting wait_ms for them, are taken back
 * and dropped, and an ack_cb already running is waited for (cnats counts
 * a put pending until its callback returned). Returns how many were
 * dropped.
 */
static int quiesce(struct tally_share *s, int64_t wait_ms)
{
	jsPubOptions po;
	natsMsgList left = { 0 };
	int dropped = 0;

	jsPubOptions_Init(&po);
	po.MaxWait = wait_ms > 0 ? wait_ms : 1;
	if (js_PublishAsyncComplete(s->js, &po) == NATS_OK)
		return 0;
	if (js_PublishAsyncGetPendingList(&left, s->js) == NATS_OK) {
		dropped = left.Count;
		natsMsgList_Destroy(&left);
	}
	po.MaxWait = 1000; /* only a callback still running */
	js_PublishAsyncComplete(s->js, &po);
	return dropped;
}

/*
 * Drop the JetStream context after waiting up to wait_ms for its puts in
 * flight; what was acknowledged by then counts, the rest is lost (binding
 * again puts everything). why: log what was lost (stopping), else only
 * at debug level.
 */
static void drop_js(struct tally_share *s, int64_t wait_ms, const char *why)
{
	struct acks got;
	int dropped;

	if (!s->js)
		return;
	dropped = quiesce(s, wait_ms);
	take_acks(s, &got);
	s->st.put_errors += (uint64_t)dropped; /* never acknowledged: as good as failed */
	if (dropped || got.failed)
		slog(s, why ? LOG_WARN : LOG_DEBUG, "%s: of the puts in flight to KV bucket %s, %" PRIu64
		     " failed and %d were not acknowledged within %" PRId64 " ms", why ? why : "unbinding",
		     s->cfg.bucket, got.failed, dropped, wait_ms);
	pthread_mutex_lock(&s->acks.lock);
	s->acks.js = NULL;
	pthread_mutex_unlock(&s->acks.lock);
	jsCtx_Destroy(s->js);
	s->js = NULL;
}

static void unbind(struct tally_share *s)
{
	kvWatcher_Destroy(s->w);
	s->w = NULL;
	kvStore_Destroy(s->kv);
	s->kv = NULL;
	drop_js(s, 1, NULL);
}

static void disconnect(struct tally_share *s)
{
	unbind(s);
	natsConnection_Destroy(s->nc);
	s->nc = NULL;
}

static natsStatus build_opts(struct tally_share *s)
{
	const struct tally_share_config *c = &s->cfg;
	char copy[4096], *list[64], *save = NULL;
	natsStatus st = natsOptions_Create(&s->opts);
	int n = 0;

	snprintf(copy, sizeof(copy), "%s", c->urls);
	for (char *u = strtok_r(copy, ", \t", &save); u && n < 64; u = strtok_r(NULL, ", \t", &save))
		list[n++] = u; /* one URL each: cnats 3.4.1's SetURL with a list never connects */
	if (st == NATS_OK)
		st = natsOptions_SetServers(s->opts, (const char **)list, n);
	if (st == NATS_OK && !empty(c->user))
		st = natsOptions_SetUserInfo(s->opts, c->user, c->password);
	if (st == NATS_OK && !empty(c->token))
		st = natsOptions_SetToken(s->opts, c->token);
	if (st == NATS_OK && !empty(c->creds_file))
		st = natsOptions_SetUserCredentialsFromFiles(s->opts, c->creds_file, NULL);
	if (st == NATS_OK && !empty(c->tls_ca_file))
		st = natsOptions_SetSecure(s->opts, true);
	if (st == NATS_OK && !empty(c->tls_ca_file))
		st = natsOptions_LoadCATrustedCertificates(s->opts, c->tls_ca_file);
	if (st == NATS_OK)
		st = natsOptions_SetTimeout(s->opts, c->request_timeout_ms);
	if (st == NATS_OK)
		st = natsOptions_SetMaxReconnect(s->opts, -1);
	if (st == NATS_OK)
		st = natsOptions_SetReconnectWait(s->opts, 250);
	if (st == NATS_OK)
		st = natsOptions_SetName(s->opts, "tally share");
	return st;
}

static const char *why_kv(natsStatus st)
{
	if (st == NATS_NOT_PERMITTED)
		return ": not permitted: grant tallyd's NATS user publish on $KV.BUCKET.> and $JS.API.> "
		       "(and subscribe on _INBOX.>)";
	if (st == NATS_NOT_FOUND || st == NATS_NO_RESPONDERS)
		return ": the bucket does not exist (deleted?) or JetStream is not enabled";
	if (st == NATS_TIMEOUT)
		return ": no reply in time (JetStream unavailable, an election, or not permitted)";
	return "";
}

static int bind_bucket(struct tally_share *s)
{
	jsOptions jo;
	kvConfig kc;
	kvWatchOptions wo;
	natsStatus st;

	jsOptions_Init(&jo);
	jo.Wait = s->cfg.request_timeout_ms;
	jo.Domain = s->cfg.js_domain;
	jo.PublishAsync.MaxPending = s->cfg.max_inflight;
	jo.PublishAsync.StallWait = s->cfg.request_timeout_ms;
	jo.PublishAsync.AckHandler = ack_cb;
	jo.PublishAsync.AckHandlerClosure = s;
	if (!s->js && (st = natsConnection_JetStream(&s->js, s->nc, &jo)) != NATS_OK) {
		s->js = NULL;
		failure(s, "KV: no JetStream context: %s", natsStatus_GetText(st));
		return -1;
	}
	pthread_mutex_lock(&s->acks.lock);
	s->acks.js = s->js;
	pthread_mutex_unlock(&s->acks.lock);
	st = js_KeyValue(&s->kv, s->js, s->cfg.bucket);
	if (st != NATS_OK && !s->cfg.no_create) {
		kvConfig_Init(&kc);
		kc.Bucket = s->cfg.bucket;
		kc.History = 1;
		kc.TTL = (int64_t)s->cfg.max_age_ms * 1000000; /* cnats: nanoseconds, the stream's max_age */
		kc.Replicas = (int)s->cfg.replicas;
		kc.StorageType = js_MemoryStorage;
		st = js_CreateKeyValue(&s->kv, s->js, &kc);
	}
	if (st != NATS_OK) {
		s->kv = NULL;
		const char *detail = nats_detail();

		failure(s, "KV bucket %s: %s%s%s%s%s", s->cfg.bucket, s->cfg.no_create ? "cannot bind (no_create "
			"is set: make it with max_age) " : "cannot bind or create: ", natsStatus_GetText(st),
			why_kv(st), *detail ? ": " : "", detail);
		return -1;
	}
	kvWatchOptions_Init(&wo);
	wo.Timeout = s->cfg.request_timeout_ms;
	st = kvStore_WatchAll(&s->w, s->kv, &wo);
	if (st != NATS_OK) {
		s->w = NULL;
		failure(s, "KV bucket %s: cannot watch: %s%s", s->cfg.bucket, natsStatus_GetText(st), why_kv(st));
		unbind(s);
		return -1;
	}
	s->unechoed_ns = 0;
	slog(s, LOG_INFO, "sharing verdicts as host %s through KV bucket %s (max_age %u ms, refresh %u ms)",
	     s->cfg.host, s->cfg.bucket, s->cfg.max_age_ms, s->cfg.refresh_ms);
	for (uint32_t i = 0; i < s->nsubj; i++)
		s->last[i].valid = false; /* a new bucket holds nothing of ours: put everything again */
	s->last_hb_ns = 0;
	set_state(s, TALLY__SHARE_RUNNING);
	return 0;
}

static int ensure_bound(struct tally_share *s)
{
	natsStatus st;

	if (s->kv && s->w)
		return 0;
	if (tally__mono_ns() < s->retry_at_ns)
		return -1;
	if (s->nc && natsConnection_Status(s->nc) == NATS_CONN_STATUS_CLOSED)
		disconnect(s);
	if (!s->nc) {
		st = natsConnection_Connect(&s->nc, s->opts);
		if (st != NATS_OK) {
			s->nc = NULL;
			failure(s, "KV: cannot connect to %.100s: %s", s->cfg.urls, natsStatus_GetText(st));
			return -1;
		}
	}
	return bind_bucket(s);
}

/* ---- this host's entries: scan and put ---- */

static bool moved(double a, double b, double by)
{
	return fabs(a - b) >= by;
}

static bool moved_rel(uint64_t a, uint64_t b)
{
	uint64_t hi = a > b ? a : b, lo = a > b ? b : a;

	return hi - lo > hi / 5; /* 20% */
}

static bool changed(const struct last_put *l, const struct tally_subject_stats *st)
{
	return !l->valid || l->verdict != (uint32_t)st->verdict || l->reasons != st->reasons ||
	       moved(l->pressure, st->pressure, 0.05) || moved(l->shed, st->shed_probability, 0.05) ||
	       moved_rel(l->p95, st->p95_ns) || moved_rel(l->pending, st->pending);
}

static double clamp_unit(double d)
{
	return isfinite(d) ? (d < 0 ? 0 : d > 1 ? 1 : d) : 0;
}

static const char *subject_name(struct tally_share *s, uint32_t id)
{
	char buf[TALLY_SUBJECT_MAX + 1];

	if (!s->names[id] && tally_subject_name(s->seg, id, buf, sizeof(buf)) == 0)
		s->names[id] = strdup(buf);
	return s->names[id];
}

/* Send one put of key (no wait for its ack: ack_cb counts it). 0, or -1
 * when it could not be sent (recorded; the caller unbinds). */
static int put_async(struct tally_share *s, const char *key, const char *val, int n)
{
	char subj[sizeof(s->put_pre) + TALLY__SHARE_KEY_MAX];
	jsPubOptions po;
	natsStatus rc;

	snprintf(subj, sizeof(subj), "%s%s", s->put_pre, key);
	jsPubOptions_Init(&po);
	po.MaxWait = s->cfg.request_timeout_ms;
	rc = js_PublishAsync(s->js, subj, val, n, &po);
	if (rc != NATS_OK) {
		const char *detail = nats_detail();

		s->st.put_errors++;
		failure(s, "KV bucket %s: put %.80s failed: %s%s%s%s", s->cfg.bucket, key, natsStatus_GetText(rc),
			why_kv(rc), *detail ? ": " : "", detail);
		return -1;
	}
	return 0;
}

/* Take what ack_cb counted (see take_acks); the first failure, with its
 * key, becomes the error. 0, or -1 after a failure (recorded; the caller
 * unbinds). */
static int collect_acks(struct tally_share *s)
{
	struct acks got;

	take_acks(s, &got);
	if (!got.failed)
		return 0;
	failure(s, "KV bucket %s: put %.80s failed: %s%s%s%s%s", s->cfg.bucket, got.err_key,
		natsStatus_GetText(got.err), why_kv(got.err), *got.err_text ? ": " : "", got.err_text,
		got.failed > 1 ? " (and more puts of this batch)" : "");
	return -1;
}

/* Put one subject. 0, or -1 after a failure (recorded; the caller unbinds). */
static int put_one(struct tally_share *s, uint32_t id, const struct tally_subject_stats *st, uint64_t now)
{
	struct tally__remote_view v = { .verdict = (uint32_t)st->verdict, .reasons = st->reasons & 0xffu,
					.pressure = clamp_unit(st->pressure),
					.shed = clamp_unit(st->shed_probability), .p95_ns = st->p95_ns,
					.pending = st->pending, .retry_after_ms = st->retry_after_ms };
	char key[TALLY__SHARE_KEY_MAX], val[TALLY__SHARE_VALUE_MAX];
	const char *name = subject_name(s, id);
	int n;

	if (!name)
		return 0;
	snprintf(v.host, sizeof(v.host), "%s", s->cfg.host);
	snprintf(v.subject, sizeof(v.subject), "%s", name);
	if (tally__share_key(key, sizeof(key), v.host, v.subject) < 0 ||
	    (n = tally__share_encode(val, sizeof(val), &v)) < 0)
		return 0; /* cannot happen for a subject of the table; never stop sharing for it */
	if (put_async(s, key, val, n) < 0)
		return -1;
	s->last[id] = (struct last_put){ true, v.verdict, v.reasons, v.retry_after_ms, st->pressure,
					 st->shed_probability, st->p95_ns, st->pending, now };
	return 0;
}

/* The key "<host>" (one token: never a verdict's key) put every refresh_ms:
 * it comes back through our watch even when this host has no subject, so
 * watch_stalled can tell a dead watch on every host. Others ignore it. */
static int heartbeat(struct tally_share *s, uint64_t now)
{
	if (s->last_hb_ns && now - s->last_hb_ns < (uint64_t)s->cfg.refresh_ms * NS_PER_MS)
		return 0;
	if (put_async(s, s->cfg.host, "alive", 5) < 0)
		return -1;
	s->last_hb_ns = now;
	if (!s->unechoed_ns)
		s->unechoed_ns = now;
	return 0;
}

static int scan(struct tally_share *s, uint64_t now)
{
	uint64_t refresh = (uint64_t)s->cfg.refresh_ms * NS_PER_MS;

	if (heartbeat(s, now) < 0)
		return -1;
	for (uint32_t id = 0; id < s->nsubj; id++) {
		struct tally_subject_stats st;
		int rc = tally_read_subject(s->seg, id, &st);

		if (rc == TALLY_ESTALE)
			return 0; /* our own snapshot is not current: let our entries age out */
		if (rc < 0)
			continue;
		if (!changed(&s->last[id], &st) && now - s->last[id].at_ns < refresh)
			continue;
		if (put_one(s, id, &st, now) < 0)
			return -1;
	}
	return 0;
}

/* ---- other hosts' entries: watch and mirror ---- */

static void mirror_put(struct tally_share *s, kvEntry *e, const char *key)
{
	struct tally__remote_view v, old;
	uint64_t now = tally__mono_ns(), max_age = (uint64_t)s->cfg.max_age_ms * NS_PER_MS, age = 0;
	int64_t created = kvEntry_Created(e), real = (int64_t)tally__real_ns();
	uint32_t idx;

	if (tally__share_decode(key, strlen(key), kvEntry_Value(e), kvEntry_ValueLen(e) < 0 ? 0 :
				(size_t)kvEntry_ValueLen(e), &v) < 0) {
		if (s->st.rejected++ == 0)
			slog(s, LOG_WARN, "KV bucket %s: entry %.100s is not a valid shared verdict: ignored "
			     "(and later ones: see rejected in tally stat)", s->cfg.bucket, key);
		return;
	}
	if (created > 0 && real > created)
		age = (uint64_t)(real - created);
	if (age >= max_age)
		return; /* already past max_age: the bucket drops it too */
	v.combine = combine_of(s, v.subject);
	v.origin_ns = now > age ? now - age : 0;
	v.received_ns = now;
	v.revision = kvEntry_Revision(e);
	idx = index_find(s, v.host, v.subject, &old);
	if (idx == UINT32_MAX && (idx = index_add(s, v.host, v.subject)) == UINT32_MAX) {
		if (s->st.full++ == 0)
			slog(s, LOG_WARN, "remote section full (%u entries): %s of host %s and later ones are "
			     "not mirrored; raise remote_capacity in [share]", s->cap, v.subject, v.host);
		return;
	}
	tally__remote_write_entry(tally__remote_entry_at(s->section, idx), &v);
	s->st.updates++;
}

/* A delete or purge of key: its entry goes. The key names host and subject only in encoded form. */
static void mirror_delete(struct tally_share *s, const char *key)
{
	char want[TALLY__SHARE_KEY_MAX];

	for (uint32_t i = 0; i < s->cap; i++) {
		struct tally__remote_view v;

		if (!s->used[i] || tally__remote_read_entry(s->section, s->len, i, &v) != 0)
			continue;
		if (tally__share_key(want, sizeof(want), v.host, v.subject) > 0 && strcmp(want, key) == 0) {
			index_remove(s, i, v.host, v.subject);
			s->st.expired++;
			return;
		}
	}
}

static void apply(struct tally_share *s, kvEntry *e)
{
	const char *key = kvEntry_Key(e);

	if (key && strcmp(key, s->cfg.host) == 0)
		s->unechoed_ns = 0; /* our heartbeat came back: the watch lives */
	if (!key || strncmp(key, s->prefix, strlen(s->prefix)) == 0 || !strchr(key, '.'))
		return; /* our own, or a host's heartbeat */
	if (kvEntry_Operation(e) == kvOp_Put)
		mirror_put(s, e, key);
	else if (kvEntry_Operation(e) == kvOp_Delete || kvEntry_Operation(e) == kvOp_Purge)
		mirror_delete(s, key);
}

/* Remove mirrored entries past max_age (nats-server 2.9 tells watchers nothing when they expire). */
static void expire(struct tally_share *s, uint64_t now)
{
	uint64_t max_age = (uint64_t)s->cfg.max_age_ms * NS_PER_MS;

	for (uint32_t i = 0; i < s->cap; i++) {
		struct tally__remote_view v;

		if (!s->used[i] || tally__remote_read_entry(s->section, s->len, i, &v) != 0)
			continue;
		if (now - v.origin_ns > max_age) {
			index_remove(s, i, v.host, v.subject);
			s->st.expired++;
		}
	}
}

/* Take watch updates until deadline. -1 when the watch failed (recorded). */
static int drain_watch(struct tally_share *s, uint64_t deadline)
{
	for (;;) {
		uint64_t now = tally__mono_ns();
		int64_t wait = now >= deadline ? 1 : (int64_t)((deadline - now) / NS_PER_MS) + 1;
		kvEntry *e = NULL;
		natsStatus st = kvWatcher_Next(&e, s->w, wait);

		if (st == NATS_TIMEOUT)
			return 0;
		if (st != NATS_OK) {
			failure(s, "KV bucket %s: watch failed: %s%s", s->cfg.bucket, natsStatus_GetText(st),
				why_kv(st));
			return -1;
		}
		if (e) /* NULL: the initial values are all in */
			apply(s, e);
		kvEntry_Destroy(e);
		if (tally__mono_ns() >= deadline)
			return 0;
	}
}

/* ---- the thread ---- */

static bool stopping(struct tally_share *s)
{
	bool v;

	pthread_mutex_lock(&s->lock);
	v = s->stopping;
	pthread_mutex_unlock(&s->lock);
	return v;
}

static void sleep_until(struct tally_share *s, uint64_t mono_deadline)
{
	struct timespec ts;
	uint64_t now = tally__mono_ns(), left = mono_deadline > now ? mono_deadline - now : 0;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	ts.tv_sec += (time_t)(left / 1000000000u);
	ts.tv_nsec += (long)(left % 1000000000u);
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&s->lock);
	if (!s->stopping)
		pthread_cond_timedwait(&s->wake, &s->lock, &ts);
	pthread_mutex_unlock(&s->lock);
}

/*
 * The watch's own liveness: our heartbeat key comes back through it (we
 * watch every key) within milliseconds. A heartbeat not back after
 * 2 x refresh_ms means the watch stopped (its consumer's server died: no
 * error reaches us, the connection is fine): watch again.
 */
static bool watch_stalled(struct tally_share *s)
{
	uint64_t refresh = (uint64_t)s->cfg.refresh_ms * NS_PER_MS, now = tally__mono_ns();

	if (!s->w || !s->unechoed_ns || now - s->unechoed_ns < 2 * refresh)
		return false;
	failure(s, "KV bucket %s: our heartbeat did not come back through the watch within %u ms (its "
		"server died?): watching again", s->cfg.bucket, 2 * s->cfg.refresh_ms);
	s->retry_at_ns = 0; /* at once */
	return true;
}

static void step(struct tally_share *s)
{
	uint64_t now = tally__mono_ns(), interval = (uint64_t)s->cfg.interval_ms * NS_PER_MS;

	if (ensure_bound(s) < 0) {
		expire(s, now);
		publish_status(s);
		sleep_until(s, now + interval);
		return;
	}
	if (now >= s->next_scan_ns) {
		s->next_scan_ns = now + interval;
		if (scan(s, now) < 0) {
			unbind(s);
			return;
		}
		expire(s, now);
		set_state(s, TALLY__SHARE_RUNNING);
	}
	if (drain_watch(s, s->next_scan_ns) < 0 || collect_acks(s) < 0 || watch_stalled(s))
		unbind(s);
}

static void *share_main(void *arg)
{
	struct tally_share *s = arg;

	while (!stopping(s))
		step(s);
	/* stopping: the puts in flight get request_timeout_ms to be acknowledged */
	kvWatcher_Destroy(s->w);
	s->w = NULL;
	drop_js(s, s->cfg.request_timeout_ms, "stopping");
	return NULL;
}

/* ---- start, stop ---- */

static void share_free(struct tally_share *s)
{
	if (!s)
		return;
	disconnect(s);
	natsOptions_Destroy(s->opts);
	for (uint32_t i = 0; s->names && i < s->nsubj; i++)
		free(s->names[i]);
	free(s->names);
	free(s->last);
	free(s->heads);
	free(s->next);
	free(s->used);
	free((void *)s->cfg.rules);
	free(s->strings);
	pthread_mutex_destroy(&s->lock);
	pthread_mutex_destroy(&s->acks.lock);
	pthread_cond_destroy(&s->wake);
	free(s);
}

static int prepare(struct tally_share *s, struct tally_segment *seg)
{
	int n;

	s->seg = seg;
	s->section = tally__seg_section(seg, &seg->remote);
	s->len = seg->remote.size;
	s->cap = seg->remote_cap;
	s->nsubj = tally_subject_capacity(seg);
	s->last = calloc(s->nsubj ? s->nsubj : 1, sizeof(*s->last));
	s->names = calloc(s->nsubj ? s->nsubj : 1, sizeof(*s->names));
	if (!s->last || !s->names || index_alloc(s) < 0)
		return -ENOMEM;
	snprintf(s->prefix, sizeof(s->prefix), "%s.", s->cfg.host);
	/* kvStore_Put's subject: the API prefix first when a domain changes it */
	if (empty(s->cfg.js_domain)) {
		n = snprintf(s->put_pre, sizeof(s->put_pre), "$KV.%s.", s->cfg.bucket);
	} else {
		const char *d = s->cfg.js_domain;
		int dl = (int)strlen(d) - (d[strlen(d) - 1] == '.'); /* cnats drops a trailing dot too */

		n = snprintf(s->put_pre, sizeof(s->put_pre), "$JS.%.*s.API.$KV.%s.", dl, d, s->cfg.bucket);
	}
	if (n < 0 || (size_t)n >= sizeof(s->put_pre))
		return tally__fail(-EINVAL, "[share]: js_domain \"%.40s...\" is too long", s->cfg.js_domain);
	s->put_pre_len = (size_t)n;
	/* Entries a previous owner left here are not ours to trust: start empty. */
	for (uint32_t i = 0; i < s->cap; i++)
		tally__remote_clear_entry(tally__remote_entry_at(s->section, i));
	s->st = (struct tally__remote_status_view){ .stale_after_ms = s->cfg.stale_after_ms,
						    .max_age_ms = s->cfg.max_age_ms,
						    .refresh_ms = s->cfg.refresh_ms };
	snprintf(s->st.host, sizeof(s->st.host), "%s", s->cfg.host);
	snprintf(s->st.bucket, sizeof(s->st.bucket), "%s", s->cfg.bucket);
	set_state(s, TALLY__SHARE_CONNECTING);
	return build_opts(s) == NATS_OK ? 0 : tally__fail(-EINVAL, "[share]: bad connection settings: %s",
							  nats_detail());
}

TALLY_API int tally_share_start(struct tally_segment *seg, const struct tally_share_config *cfg,
				struct tally_share **out)
{
	struct tally_share *s;
	char why[256];
	int rc;

	*out = NULL;
	if (!cfg)
		return tally__fail(-EINVAL, "[share]: no configuration");
	if (tally_share_config_check(cfg, why, sizeof(why)) < 0)
		return tally__fail(-EINVAL, "[share]: %s", why);
	if (!seg || !seg->is_owner)
		return tally__fail(-EPERM, "sharing needs the segment's owner (tallyd)");
	if (!seg->remote_cap)
		return tally__fail(-ENOTSUP, "segment \"%s\" has no remote section: set remote_capacity "
				   "(tallyd: [share] remote_capacity, default 4096)", seg->name);
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	pthread_condattr_t ca;

	pthread_mutex_init(&s->lock, NULL);
	pthread_mutex_init(&s->acks.lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* sleep_until's deadlines are monotonic */
	pthread_cond_init(&s->wake, &ca);
	pthread_condattr_destroy(&ca);
	if ((rc = cfg_copy(s, cfg)) < 0 || (rc = prepare(s, seg)) < 0 ||
	    (rc = -pthread_create(&s->thread, NULL, share_main, s)) < 0) {
		share_free(s);
		return rc == -ENOMEM ? tally__fail(rc, "share: out of memory") : rc;
	}
	s->running = true;
	*out = s;
	return 0;
}

TALLY_API void tally_share_stop(struct tally_share **sp)
{
	struct tally_share *s = sp ? *sp : NULL;

	if (!s)
		return;
	pthread_mutex_lock(&s->lock);
	s->stopping = true;
	pthread_cond_broadcast(&s->wake);
	pthread_mutex_unlock(&s->lock);
	if (s->running)
		pthread_join(s->thread, NULL);
	disconnect(s);
	s->st.connected = 0;
	set_state(s, TALLY__SHARE_STOPPED);
	share_free(s);
	*sp = NULL;
}
