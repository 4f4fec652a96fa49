/* SPDX-License-Identifier: MIT */
/*
 * lib/poller.c: the JetStream poller thread (contract in poller.h). It owns
 * a private mirror of the pending table (one struct slot per entry, with a
 * hash from stream/consumer to slot), the cnats connection and JetStream
 * context, the circuit breaker and the schedule. Everything but the stats
 * copy is touched only under poll_lock, held by whoever is polling or
 * reconfiguring; the table in shm is written through pending.c's seqlock.
 */
#define _GNU_SOURCE
#include "poller.h"
#include "pending.h"
#include "subject.h"

#include <errno.h>
#include <nats/nats.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEF_INTERVAL_MS   1000u
#define DEF_TIMEOUT_MS    2000u
#define DEF_THRESHOLD     5u
#define DEF_COOLDOWN_MS   5000u
#define DEF_RECONNECT_MS  1000u
#define DEF_JITTER_MS     200u
#define DEF_GONE_GRACE_MS 60000u
#define ERR_LEN           256
#define NS_PER_MS         1000000ull

enum { LOG_ERR = 0, LOG_WARN = 1, LOG_INFO = 2, LOG_DEBUG = 3 };
enum { RET_UNKNOWN = 0, RET_WORKQUEUE = 1, RET_OTHER = 2 }; /* a watched stream's retention */

struct slot {
	char stream[TALLY__PENDING_NAME_MAX];
	char consumer[TALLY__PENDING_NAME_MAX];
	char filter[TALLY__PENDING_SUBJ_MAX];
	char pair_map[TALLY__PENDING_SUBJ_MAX]; /* map_subject of an explicit pair */
	char subject[TALLY__PENDING_SUBJ_MAX];  /* a per-subject entry's subject, "" for a consumer */
	char err[TALLY__PENDING_ERR_MAX];
	char server[TALLY__PENDING_SERVER_MAX]; /* whose numbers these are (pending.h, "In a cluster") */
	struct tally__pending_values v;         /* numbers; strings are set at write */
	int sw;                                 /* whole-stream watch covering it, -1 none */
	uint64_t gone_since_ns;                 /* when it turned gone (for gone_grace_ms) */
	bool used, pair, refreshed;
	bool found;                             /* the server reported it at least once */
	bool seen;                              /* per-subject entry: in this poll's state.subjects */
};

struct tally__poller {
	struct tally_poller_config cfg;         /* deep copy: every string is ours */
	void *section;
	uint32_t cap, nused, free_hint, hash_mask;
	struct slot *slots;
	uint32_t *hash;                         /* slot index + 1; 0 empty */
	bool *sw_missing;                       /* per watch: stream not found (log once) */
	uint8_t *sw_retention;                  /* per watch: enum retention (0 not known yet) */
	natsOptions *opts;
	/* The poller thread alone sets and destroys nc, under nc_lock; a
	 * stopper closes it under nc_lock (closing first), so that a request
	 * or a reconnect blocked on a server that never answers returns at
	 * once instead of after request_timeout_ms. */
	natsConnection *nc;
	pthread_mutex_t nc_lock;
	atomic_bool closing;
	char api[160];                          /* JetStream API prefix, e.g. "$JS.API" */
	char server_id[128];                    /* of the connected server: a standalone reply's server */
	char opts_err[ERR_LEN];
	pthread_mutex_t poll_lock;
	pthread_mutex_t wake_lock;
	pthread_cond_t wake;
	bool stopping, replan, has_thread;
	pthread_t thread;
	struct tally__pending_breaker_view brk;
	uint64_t open_until_ns, fail_since_ns, out_msgs_mark;
	bool failing, full_logged, split_logged;
	uint64_t poll_untracked; /* consumers this poll could not track (table full) */
	int err_code;
	char err[ERR_LEN];
	pthread_mutex_t stats_lock;
	struct tally__poller_stats st;
};

/* ---- small helpers ---- */

static uint64_t now_ns(void)
{
	return tally__pending_now_ns();
}

static void default_log(void *ctx, int level, const char *msg)
{
	static const char *const names[] = { "error", "warning", "info", "debug" };
	struct timespec ts;
	struct tm tm;
	char when[32];

	(void)ctx;
	if (level > LOG_INFO)
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
	fprintf(stderr, "%s.%03ldZ tally poller %s: %s\n", when, ts.tv_nsec / 1000000L,
		names[level < 0 ? 0 : level], msg);
}

__attribute__((format(printf, 3, 4)))
static void plog(const struct tally__poller *p, int level, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (p->cfg.log)
		p->cfg.log(p->cfg.log_ctx, level, msg);
	else
		default_log(NULL, level, msg);
}

/* Copy with truncation to cap - 1 bytes (intended: error texts are cut to fit the table). */
static void copy_str(char *dst, size_t cap, const char *src)
{
	size_t n = 0;

	for (; src && n + 1 < cap && src[n]; n++)
		dst[n] = src[n];
	dst[n] = '\0';
}

static bool empty(const char *s)
{
	return !s || !*s;
}

/* cnats' last error text without its "(file.c:123): " prefix. */
static const char *nats_detail(void)
{
	natsStatus s;
	const char *t = nats_GetLastError(&s), *end;

	if (!t)
		return "";
	if (t[0] == '(' && (end = strstr(t, "): ")) != NULL)
		return end + 3;
	return t;
}

static uint32_t or_default(uint32_t v, uint32_t def)
{
	return v ? v : def;
}

/* ---- configuration: check, deep copy, free ---- */

static int check_name(const char *what, const char *s, char *why, size_t why_len)
{
	if (empty(s) || strlen(s) >= TALLY__PENDING_NAME_MAX || strpbrk(s, " \t\r\n.*>")) {
		snprintf(why, why_len, "%s name '%.40s%s' must be 1..%d bytes without spaces, '.', '*' or '>'",
			 what, s ? s : "", s && strlen(s) > 40 ? "..." : "", TALLY__PENDING_NAME_MAX - 1);
		return -EINVAL;
	}
	return 0;
}

static int check_watch(const struct tally_poller_watch *w, size_t i, char *why, size_t why_len)
{
	char sub[160];

	if (check_name("stream", w->stream, why, why_len) < 0 ||
	    (!empty(w->consumer) && check_name("consumer", w->consumer, why, why_len) < 0))
		return -EINVAL;
	if (empty(w->map_subject))
		return 0;
	if (strlen(w->map_subject) >= TALLY__PENDING_SUBJ_MAX ||
	    tally__subject_check(w->map_subject, strlen(w->map_subject), true, sub, sizeof(sub)) < 0) {
		snprintf(why, why_len, "watch %zu (stream %s): map_subject '%.60s' is not a valid subject "
			 "pattern of at most %d bytes", i, w->stream, w->map_subject,
			 TALLY__PENDING_SUBJ_MAX - 1);
		return -EINVAL;
	}
	return 0;
}

static bool same_watch(const struct tally_poller_watch *a, const struct tally_poller_watch *b)
{
	const char *ca = a->consumer ? a->consumer : "", *cb = b->consumer ? b->consumer : "";

	return strcmp(a->stream, b->stream) == 0 && strcmp(ca, cb) == 0;
}

static int check_watches(const struct tally_poller_config *cfg, char *why, size_t why_len)
{
	if (cfg->nwatches == 0 || !cfg->watches) {
		snprintf(why, why_len, "nothing to watch: give at least one stream or stream/consumer pair");
		return -EINVAL;
	}
	for (size_t i = 0; i < cfg->nwatches; i++) {
		if (check_watch(&cfg->watches[i], i, why, why_len) < 0)
			return -EINVAL;
		for (size_t j = 0; j < i; j++) {
			if (same_watch(&cfg->watches[i], &cfg->watches[j])) {
				snprintf(why, why_len, "watch %zu repeats watch %zu (stream %s)", i, j,
					 cfg->watches[i].stream);
				return -EINVAL;
			}
		}
	}
	return 0;
}

/* One server URL of the comma-separated list: [nats:// | tls://][user[:pass]@]host[:port],
 * host a name, an IPv4 address or [an IPv6 address]. Checked at start and
 * reload so that a typo is an error with its line, not a reconnect loop. */
static int check_url(const char *u, size_t len, char *why, size_t why_len)
{
	char url[512];
	const char *host, *end, *port = NULL, *at, *sch;

	while (len && (*u == ' ' || *u == '\t'))
		u++, len--;
	while (len && (u[len - 1] == ' ' || u[len - 1] == '\t'))
		len--;
	if (len == 0 || len >= sizeof(url)) {
		snprintf(why, why_len, len ? "a server URL is longer than %zu bytes" :
			 "an empty server URL in the list", sizeof(url) - 1);
		return -EINVAL;
	}
	memcpy(url, u, len);
	url[len] = '\0';
	host = url;
	if ((sch = strstr(url, "://"))) {
		if (!((sch - url == 4 && strncmp(url, "nats", 4) == 0) ||
		      (sch - url == 3 && strncmp(url, "tls", 3) == 0))) {
			snprintf(why, why_len, "server URL \"%s\": scheme \"%.*s\" is not nats:// or "
				 "tls://", url, (int)(sch - url), url);
			return -EINVAL;
		}
		host = sch + 3;
	}
	if ((at = strrchr(host, '@')))
		host = at + 1;
	if (*host == '[') {
		if (!(end = strchr(host, ']'))) {
			snprintf(why, why_len, "server URL \"%s\": '[' without ']' around an IPv6 "
				 "address", url);
			return -EINVAL;
		}
		if (end == host + 1)
			goto no_host;
		if (end[1] == ':')
			port = end + 2;
		else if (end[1]) {
			end++;
			goto junk;
		}
	} else {
		end = host + strcspn(host, ":/?#[] \t");
		if (end == host)
			goto no_host;
		if (*end == ':')
			port = end + 1;
		else if (*end)
			goto junk;
	}
	if (port) {
		char *pe;
		unsigned long v = strtoul(port, &pe, 10);
		if (pe == port || *pe || v < 1 || v > 65535) {
			snprintf(why, why_len, "server URL \"%s\": port \"%s\" is not a number in "
				 "1..65535", url, port);
			return -EINVAL;
		}
	}
	return 0;
no_host:
	snprintf(why, why_len, "server URL \"%s\" has no host (e.g. nats://127.0.0.1:4222)", url);
	return -EINVAL;
junk:
	snprintf(why, why_len, "server URL \"%s\": unexpected \"%s\" after the host (a URL is "
		 "[nats://]HOST[:PORT]; separate servers with commas)", url, end);
	return -EINVAL;
}

/* A file the connection will need, readable now rather than at connect. */
static int check_file(const char *what, const char *path, char *why, size_t why_len)
{
	if (empty(path) || access(path, R_OK) == 0)
		return 0;
	snprintf(why, why_len, "%s \"%s\": %s", what, path, strerror(errno));
	return -EINVAL;
}

int tally__poller_config_check(const struct tally_poller_config *cfg, char *why, size_t why_len)
{
	char scratch[8];

	if (!why) {
		why = scratch;
		why_len = sizeof(scratch);
	}
	if (!cfg || empty(cfg->urls)) {
		snprintf(why, why_len, "no NATS server URL given");
		return -EINVAL;
	}
	for (const char *u = cfg->urls, *c;; u = c + 1) {
		c = strchr(u, ',');
		if (check_url(u, c ? (size_t)(c - u) : strlen(u), why, why_len) != 0)
			return -EINVAL;
		if (!c)
			break;
	}
	if (check_file("creds file", cfg->creds_file, why, why_len) ||
	    check_file("tls_ca file", cfg->tls_ca_file, why, why_len))
		return -EINVAL;
	if (!empty(cfg->js_domain) && !empty(cfg->js_prefix)) {
		snprintf(why, why_len, "give a JetStream domain or an API prefix, not both");
		return -EINVAL;
	}
	if (!empty(cfg->password) && empty(cfg->user)) {
		snprintf(why, why_len, "a password was given without a user");
		return -EINVAL;
	}
	return check_watches(cfg, why, why_len);
}

static char *dup_opt(const char *s, bool *oom)
{
	char *d;

	if (!s)
		return NULL;
	d = strdup(s);
	if (!d)
		*oom = true;
	return d;
}

static void cfg_free(struct tally_poller_config *c)
{
	struct tally_poller_watch *w = (struct tally_poller_watch *)c->watches;

	for (size_t i = 0; w && i < c->nwatches; i++) {
		free((char *)w[i].stream);
		free((char *)w[i].consumer);
		free((char *)w[i].map_subject);
	}
	free(w);
	free((char *)c->urls);
	free((char *)c->creds_file);
	free((char *)c->user);
	free((char *)c->password);
	free((char *)c->token);
	free((char *)c->tls_ca_file);
	free((char *)c->js_domain);
	free((char *)c->js_prefix);
	memset(c, 0, sizeof(*c));
}

/* Deep copy with defaults applied. Returns 0 or -ENOMEM (dst freed). */
static int cfg_dup(struct tally_poller_config *dst, const struct tally_poller_config *src)
{
	struct tally_poller_watch *w = calloc(src->nwatches, sizeof(*w));
	bool oom = w == NULL;

	*dst = *src;
	dst->watches = w;
	dst->urls = dup_opt(src->urls, &oom);
	dst->creds_file = dup_opt(src->creds_file, &oom);
	dst->user = dup_opt(src->user, &oom);
	dst->password = dup_opt(src->password, &oom);
	dst->token = dup_opt(src->token, &oom);
	dst->tls_ca_file = dup_opt(src->tls_ca_file, &oom);
	dst->js_domain = dup_opt(src->js_domain, &oom);
	dst->js_prefix = dup_opt(src->js_prefix, &oom);
	for (size_t i = 0; w && i < src->nwatches; i++) {
		w[i].stream = dup_opt(src->watches[i].stream, &oom);
		w[i].consumer = dup_opt(empty(src->watches[i].consumer) ? NULL : src->watches[i].consumer, &oom);
		w[i].map_subject = dup_opt(empty(src->watches[i].map_subject) ? NULL
					    : src->watches[i].map_subject, &oom);
	}
	dst->poll_interval_ms = or_default(src->poll_interval_ms, DEF_INTERVAL_MS);
	dst->request_timeout_ms = or_default(src->request_timeout_ms, DEF_TIMEOUT_MS);
	dst->breaker_threshold = or_default(src->breaker_threshold, DEF_THRESHOLD);
	dst->breaker_cooldown_ms = or_default(src->breaker_cooldown_ms, DEF_COOLDOWN_MS);
	dst->reconnect_wait_ms = or_default(src->reconnect_wait_ms, DEF_RECONNECT_MS);
	dst->reconnect_jitter_ms = or_default(src->reconnect_jitter_ms, DEF_JITTER_MS);
	dst->gone_grace_ms = or_default(src->gone_grace_ms, DEF_GONE_GRACE_MS);
	if (!oom)
		return 0;
	cfg_free(dst);
	return -ENOMEM;
}

static bool str_eq(const char *a, const char *b)
{
	return strcmp(a ? a : "", b ? b : "") == 0;
}

/* Does moving from a to b need a new connection? */
static bool conn_changed(const struct tally_poller_config *a, const struct tally_poller_config *b)
{
	return !str_eq(a->urls, b->urls) || !str_eq(a->creds_file, b->creds_file) ||
	       !str_eq(a->user, b->user) || !str_eq(a->password, b->password) ||
	       !str_eq(a->token, b->token) || !str_eq(a->tls_ca_file, b->tls_ca_file) ||
	       a->request_timeout_ms != b->request_timeout_ms ||
	       a->reconnect_wait_ms != b->reconnect_wait_ms ||
	       a->reconnect_jitter_ms != b->reconnect_jitter_ms;
}

/* ---- slots and their hash ---- */

static uint32_t key_hash(const char *stream, const char *consumer, const char *subject)
{
	uint32_t h = 2166136261u;

	for (const char *s = stream; *s; s++)
		h = (h ^ (uint8_t)*s) * 16777619u;
	h = (h ^ 0xffu) * 16777619u;
	for (const char *s = consumer; *s; s++)
		h = (h ^ (uint8_t)*s) * 16777619u;
	h = (h ^ 0xffu) * 16777619u;
	for (const char *s = subject; *s; s++)
		h = (h ^ (uint8_t)*s) * 16777619u;
	return h;
}

static void hash_insert(struct tally__poller *p, uint32_t idx)
{
	uint32_t h = key_hash(p->slots[idx].stream, p->slots[idx].consumer, p->slots[idx].subject) &
		     p->hash_mask;

	while (p->hash[h] != 0)
		h = (h + 1) & p->hash_mask;
	p->hash[h] = idx + 1;
}

static void hash_rebuild(struct tally__poller *p)
{
	memset(p->hash, 0, ((size_t)p->hash_mask + 1) * sizeof(*p->hash));
	p->nused = 0;
	for (uint32_t i = 0; i < p->cap; i++) {
		if (p->slots[i].used) {
			hash_insert(p, i);
			p->nused++;
		}
	}
	p->free_hint = 0;
}

/* The slot of a consumer (subject "") or of one of its per-subject entries. */
static struct slot *slot_find3(struct tally__poller *p, const char *stream, const char *consumer,
			       const char *subject)
{
	uint32_t h = key_hash(stream, consumer, subject) & p->hash_mask;

	for (; p->hash[h] != 0; h = (h + 1) & p->hash_mask) {
		struct slot *s = &p->slots[p->hash[h] - 1];

		if (strcmp(s->stream, stream) == 0 && strcmp(s->consumer, consumer) == 0 &&
		    strcmp(s->subject, subject) == 0)
			return s;
	}
	return NULL;
}

static struct slot *slot_find(struct tally__poller *p, const char *stream, const char *consumer)
{
	return slot_find3(p, stream, consumer, "");
}

static bool is_subject_slot(const struct slot *s)
{
	return s->v.kind == TALLY__PENDING_SUBJECT;
}

static uint32_t slot_index(const struct tally__poller *p, const struct slot *s)
{
	return (uint32_t)(s - p->slots);
}

/* Publish a slot to the shm table. */
static void slot_write(struct tally__poller *p, struct slot *s, const char *map)
{
	struct tally__pending_values v = s->v;

	v.stream = s->stream;
	v.consumer = s->consumer;
	v.filter = s->filter;
	v.map = map;
	v.last_error = s->err;
	v.server = s->server;
	tally__pending_write_entry(tally__pending_entry_at(p->section, slot_index(p, s)), &v);
}

/* The pattern the backlog of s applies to besides its filter (see poller.h). */
static const char *slot_map(const struct tally__poller *p, const struct slot *s)
{
	if (is_subject_slot(s))
		return s->subject;
	if (s->pair_map[0])
		return s->pair_map;
	if (s->sw >= 0 && !s->filter[0] && p->cfg.watches[s->sw].map_subject)
		return p->cfg.watches[s->sw].map_subject;
	return "";
}

static void slot_publish(struct tally__poller *p, struct slot *s)
{
	slot_write(p, s, slot_map(p, s));
}

static void slot_clear(struct tally__poller *p, struct slot *s)
{
	tally__pending_clear_entry(tally__pending_entry_at(p->section, slot_index(p, s)));
	memset(s, 0, sizeof(*s));
	s->sw = -1;
}

/* Drop gone entries that only a whole-stream watch holds. Returns how many. */
static uint32_t compact(struct tally__poller *p)
{
	uint32_t freed = 0;

	for (uint32_t i = 0; i < p->cap; i++) {
		struct slot *s = &p->slots[i];

		if (s->used && !s->pair && s->v.source == TALLY__PENDING_GONE) {
			slot_clear(p, s);
			freed++;
		}
	}
	if (freed)
		hash_rebuild(p);
	return freed;
}

static struct slot *slot_take_free(struct tally__poller *p)
{
	for (uint32_t n = 0; n < p->cap; n++) {
		uint32_t i = (p->free_hint + n) % p->cap;

		if (!p->slots[i].used) {
			p->free_hint = (i + 1) % p->cap;
			return &p->slots[i];
		}
	}
	return NULL;
}

/* New slot (source never), or NULL when the table is full even after compaction. */
static struct slot *slot_add3(struct tally__poller *p, const char *stream, const char *consumer,
			      const char *subject, int sw)
{
	struct slot *s = p->nused < p->cap ? slot_take_free(p) : NULL;

	if (!s && compact(p) > 0)
		s = slot_take_free(p);
	if (!s)
		return NULL;
	memset(s, 0, sizeof(*s));
	copy_str(s->stream, sizeof(s->stream), stream);
	copy_str(s->consumer, sizeof(s->consumer), consumer);
	copy_str(s->subject, sizeof(s->subject), subject);
	s->v.is_leader = -1;
	s->v.source = TALLY__PENDING_NEVER;
	s->sw = sw;
	s->used = true;
	hash_insert(p, slot_index(p, s));
	p->nused++;
	return s;
}

static struct slot *slot_add(struct tally__poller *p, const char *stream, const char *consumer, int sw)
{
	return slot_add3(p, stream, consumer, "", sw);
}

/* ---- watches ---- */

/* Index of the whole-stream watch for stream, or -1. */
static int stream_watch(const struct tally__poller *p, const char *stream)
{
	for (size_t i = 0; i < p->cfg.nwatches; i++) {
		const struct tally_poller_watch *w = &p->cfg.watches[i];

		if (!w->consumer && strcmp(w->stream, stream) == 0)
			return (int)i;
	}
	return -1;
}

static const struct tally_poller_watch *pair_watch(const struct tally__poller *p, const struct slot *s)
{
	for (size_t i = 0; i < p->cfg.nwatches; i++) {
		const struct tally_poller_watch *w = &p->cfg.watches[i];

		if (w->consumer && strcmp(w->stream, s->stream) == 0 && strcmp(w->consumer, s->consumer) == 0)
			return w;
	}
	return NULL;
}

static size_t count_pairs(const struct tally_poller_config *c)
{
	size_t n = 0;

	for (size_t i = 0; i < c->nwatches; i++)
		n += c->watches[i].consumer != NULL;
	return n;
}

/* Free one entry that only a whole-stream watch holds (to make room for a pair). */
static void drop_subjects(struct tally__poller *p, const char *stream, const char *consumer);

static bool evict_one(struct tally__poller *p)
{
	for (uint32_t j = 0; j < p->cap; j++) {
		struct slot *s = &p->slots[j], *o;

		if (!s->used || s->pair)
			continue;
		/* a consumer takes its per-subject entries along; a per-subject
		 * entry takes its siblings and makes its consumer shared again */
		o = is_subject_slot(s) ? slot_find(p, s->stream, s->consumer) : s;
		drop_subjects(p, s->stream, s->consumer);
		if (o && o->used && o->v.kind == TALLY__PENDING_SPLIT) {
			o->v.kind = TALLY__PENDING_CONSUMER;
			slot_publish(p, o);
		}
		if (s->used)
			slot_clear(p, s);
		hash_rebuild(p);
		return true;
	}
	return false;
}

/* Bring the slots in line with p->cfg: keep what is still watched (values
 * intact), clear the rest, add new pairs as never. */
static void apply_watches(struct tally__poller *p)
{
	for (uint32_t i = 0; i < p->cap; i++) {
		struct slot *s = &p->slots[i];
		const struct tally_poller_watch *w;

		if (!s->used)
			continue;
		if (is_subject_slot(s)) { /* the next poll of a work-queue stream makes them again */
			slot_clear(p, s);
			continue;
		}
		s->v.kind = TALLY__PENDING_CONSUMER;
		w = pair_watch(p, s);
		s->sw = stream_watch(p, s->stream);
		s->pair = w != NULL;
		copy_str(s->pair_map, sizeof(s->pair_map), w ? w->map_subject : NULL);
		if (!s->pair && s->sw < 0)
			slot_clear(p, s);
		else
			slot_publish(p, s);
	}
	hash_rebuild(p);
	for (size_t i = 0; i < p->cfg.nwatches; i++) {
		const struct tally_poller_watch *w = &p->cfg.watches[i];
		struct slot *s;

		if (!w->consumer || slot_find(p, w->stream, w->consumer))
			continue;
		s = slot_add(p, w->stream, w->consumer, stream_watch(p, w->stream));
		if (!s && evict_one(p))
			s = slot_add(p, w->stream, w->consumer, stream_watch(p, w->stream));
		if (!s)
			continue; /* cannot happen: validate() checked pairs <= capacity */
		s->pair = true;
		copy_str(s->pair_map, sizeof(s->pair_map), w->map_subject);
		slot_publish(p, s);
	}
}

/* ---- connection ---- */

static void drop_connection(struct tally__poller *p)
{
	if (!p->nc)
		return;
	pthread_mutex_lock(&p->nc_lock);
	natsConnection_Close(p->nc);
	natsConnection_Destroy(p->nc);
	p->nc = NULL;
	pthread_mutex_unlock(&p->nc_lock);
}

static natsStatus set_auth(natsOptions *o, const struct tally_poller_config *c)
{
	natsStatus s = NATS_OK;

	if (!empty(c->user))
		s = natsOptions_SetUserInfo(o, c->user, c->password);
	if (s == NATS_OK && !empty(c->token))
		s = natsOptions_SetToken(o, c->token);
	if (s == NATS_OK && !empty(c->creds_file))
		s = natsOptions_SetUserCredentialsFromFiles(o, c->creds_file, NULL);
	if (s == NATS_OK && !empty(c->tls_ca_file)) {
		s = natsOptions_SetSecure(o, true);
		if (s == NATS_OK)
			s = natsOptions_LoadCATrustedCertificates(o, c->tls_ca_file);
	}
	return s;
}

static natsStatus set_reconnect(natsOptions *o, const struct tally_poller_config *c)
{
	natsStatus s = natsOptions_SetAllowReconnect(o, true);

	if (s == NATS_OK)
		s = natsOptions_SetMaxReconnect(o, -1);
	if (s == NATS_OK)
		s = natsOptions_SetReconnectWait(o, c->reconnect_wait_ms);
	if (s == NATS_OK)
		s = natsOptions_SetReconnectJitter(o, c->reconnect_jitter_ms, c->reconnect_jitter_ms);
	if (s == NATS_OK)
		s = natsOptions_SetTimeout(o, c->request_timeout_ms < TALLY__POLLER_CONNECT_MAX_MS
					      ? c->request_timeout_ms : TALLY__POLLER_CONNECT_MAX_MS);
	if (s == NATS_OK)
		s = natsOptions_SetFailRequestsOnDisconnect(o, true);
	if (s == NATS_OK)
		s = natsOptions_SetName(o, "tally poller");
	return s;
}

/* The server list, split here: cnats 3.4.1's natsOptions_SetURL takes a
 * comma-separated list but its connect then fails with "No server
 * available" even with every server up (a cluster's URLs, issue 19);
 * natsOptions_SetServers with one URL each works. Spaces around a URL are
 * dropped, as check_url allows them. */
static natsStatus set_servers(natsOptions *o, const char *urls)
{
	char copy[4096], *list[64], *save = NULL;
	int n = 0;

	if (strlen(urls) >= sizeof(copy))
		return natsOptions_SetURL(o, urls);
	snprintf(copy, sizeof(copy), "%s", urls);
	for (char *u = strtok_r(copy, ",", &save); u && n < 64; u = strtok_r(NULL, ",", &save)) {
		size_t len;

		while (*u == ' ' || *u == '\t')
			u++;
		len = strlen(u);
		while (len && (u[len - 1] == ' ' || u[len - 1] == '\t'))
			u[--len] = '\0';
		if (len)
			list[n++] = u;
	}
	return n ? natsOptions_SetServers(o, (const char **)list, n) : natsOptions_SetURL(o, urls);
}

/* (Re)build the cnats options; on failure p->opts stays NULL and p->opts_err says why. */
static void build_opts(struct tally__poller *p)
{
	natsOptions *o = NULL;
	natsStatus s = natsOptions_Create(&o);

	if (s == NATS_OK)
		s = set_servers(o, p->cfg.urls);
	if (s == NATS_OK)
		s = set_auth(o, &p->cfg);
	if (s == NATS_OK)
		s = set_reconnect(o, &p->cfg);
	natsOptions_Destroy(p->opts);
	p->opts = NULL;
	if (s == NATS_OK) {
		p->opts = o;
		p->opts_err[0] = '\0';
		return;
	}
	snprintf(p->opts_err, sizeof(p->opts_err), "bad connection settings (URL '%.80s', credentials "
		 "or TLS files): %s: %s", p->cfg.urls, natsStatus_GetText(s), nats_detail());
	natsOptions_Destroy(o);
}

__attribute__((format(printf, 3, 4)))
static int fail(struct tally__poller *p, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(p->err, sizeof(p->err), fmt, ap);
	va_end(ap);
	p->err_code = code;
	return code;
}

/* "$JS.API", "$JS.<domain>.API" or the configured prefix (without a trailing '.'). */
static void set_api_prefix(struct tally__poller *p)
{
	const struct tally_poller_config *c = &p->cfg;

	if (!empty(c->js_prefix))
		snprintf(p->api, sizeof(p->api), "%.*s", (int)strcspn(c->js_prefix, " "), c->js_prefix);
	else if (!empty(c->js_domain))
		snprintf(p->api, sizeof(p->api), "$JS.%s.API", c->js_domain);
	else
		snprintf(p->api, sizeof(p->api), "$JS.API");
	for (size_t n = strlen(p->api); n > 0 && p->api[n - 1] == '.'; n--)
		p->api[n - 1] = '\0';
}

static int connect_now(struct tally__poller *p)
{
	natsStatus s;

	if (atomic_load(&p->closing))
		return fail(p, -ECANCELED, "the poller is stopping");
	if (!p->opts)
		build_opts(p);
	if (!p->opts)
		return fail(p, -EINVAL, "%s", p->opts_err);
	natsConnection *nc = NULL;
	s = natsConnection_Connect(&nc, p->opts);
	if (s == NATS_OK) {
		pthread_mutex_lock(&p->nc_lock);
		p->nc = nc;
		if (atomic_load(&p->closing)) /* a stop came during the connect */
			natsConnection_Close(nc);
		pthread_mutex_unlock(&p->nc_lock);
	}
	if (s != NATS_OK) {
		const char *detail = nats_detail();

		p->nc = NULL; /* cnats leaves it NULL on failure; be explicit */
		if (strcmp(detail, natsStatus_GetText(s)) == 0)
			detail = "";
		return fail(p, s == NATS_CONNECTION_AUTH_FAILED || s == NATS_NOT_PERMITTED ? -EACCES
			    : s == NATS_INVALID_ARG ? -EINVAL : -ENOTCONN,
			    "cannot connect to %.100s: %s%s%s", p->cfg.urls, natsStatus_GetText(s),
			    *detail ? ": " : "", detail);
	}
	plog(p, LOG_DEBUG, "connected to %s", p->cfg.urls);
	return 0;
}

static int ensure_connected(struct tally__poller *p)
{
	const char *last = NULL;
	natsConnStatus cs;

	if (p->nc && natsConnection_Status(p->nc) == NATS_CONN_STATUS_CLOSED)
		drop_connection(p);
	if (!p->nc && connect_now(p) < 0)
		return p->err_code;
	cs = natsConnection_Status(p->nc);
	if (cs == NATS_CONN_STATUS_CONNECTED) {
		if (natsConnection_GetConnectedServerId(p->nc, p->server_id, sizeof(p->server_id)) != NATS_OK)
			p->server_id[0] = '\0';
		return 0;
	}
	natsConnection_GetLastError(p->nc, &last);
	return fail(p, -ENOTCONN, "not connected to %.100s (%s): %s", p->cfg.urls,
		    cs == NATS_CONN_STATUS_RECONNECTING ? "reconnecting" : "connecting",
		    last && *last ? last : "connection lost");
}

/* A failed JetStream request: set p->err and return the code (see poller.h). */
static int js_failure(struct tally__poller *p, const char *what, natsStatus s, jsErrCode ec)
{
	if (s == NATS_NO_RESPONDERS || ec == JSNotEnabledErr || ec == JSNotEnabledForAccountErr)
		return fail(p, -ENOTSUP, "%s: JetStream not available (not enabled on the server or "
			    "account, or wrong domain/prefix): %s", what, natsStatus_GetText(s));
	if (s == NATS_TIMEOUT)
		return fail(p, -ETIMEDOUT, "%s: no reply within %u ms", what, p->cfg.request_timeout_ms);
	if (s == NATS_CONNECTION_CLOSED || s == NATS_CONNECTION_DISCONNECTED || s == NATS_NOT_YET_CONNECTED)
		return fail(p, -ENOTCONN, "%s: connection lost: %s", what, natsStatus_GetText(s));
	if (s == NATS_NOT_PERMITTED || s == NATS_CONNECTION_AUTH_FAILED)
		return fail(p, -EACCES, "%s: not permitted: %s", what, nats_detail());
	return fail(p, -EIO, "%s: %s (JetStream error %d): %s", what, natsStatus_GetText(s), (int)ec,
		    nats_detail());
}

/* ---- a small JSON reader for JetStream API replies ----
 *
 * Why not cnats' js_Consumers / js_GetConsumerInfo: they decode every
 * field of every consumer into allocated objects, about 70 us per consumer
 * here, which is 20 times the cost of the request itself for a page of 256
 * (measured by tally-bench --part pending). This reader pulls out the dozen fields the
 * table needs and skips the rest. It trusts nothing: every read is bounded
 * by the buffer end, nesting by JR_MAX_DEPTH, strings are copied with
 * truncation into fixed buffers, numbers saturate, and anything malformed
 * is -EBADMSG. No allocation. The entry points are tally__js_parse_list and
 * tally__js_parse_info (poller.h), the fuzz targets.
 */

#define JR_MAX_DEPTH 32

struct jr {
	const char *p, *end;
	int depth;
};

typedef int (*jr_field_fn)(struct jr *j, const char *key, void *ctx);
typedef int (*jr_elem_fn)(struct jr *j, void *ctx);

static void jr_ws(struct jr *j)
{
	while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
		j->p++;
}

static bool jr_eat(struct jr *j, char c)
{
	jr_ws(j);
	if (j->p < j->end && *j->p == c) {
		j->p++;
		return true;
	}
	return false;
}

static char jr_peek(struct jr *j)
{
	jr_ws(j);
	return j->p < j->end ? *j->p : '\0';
}

/* \uXXXX as UTF-8 into buf (NUL and surrogates become '?'); bytes written or 0. */
static size_t jr_unicode(struct jr *j, char *buf)
{
	unsigned cp = 0;

	if (j->end - j->p < 4)
		return 0;
	for (int i = 0; i < 4; i++) {
		char c = *j->p++;
		unsigned d = c >= '0' && c <= '9' ? (unsigned)(c - '0')
			   : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
			   : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10) : 16u;

		if (d > 15)
			return 0;
		cp = cp << 4 | d;
	}
	if (cp == 0 || (cp >= 0xd800 && cp <= 0xdfff))
		cp = '?';
	if (cp < 0x80)
		return buf[0] = (char)cp, 1;
	if (cp < 0x800)
		return buf[0] = (char)(0xc0 | cp >> 6), buf[1] = (char)(0x80 | (cp & 0x3f)), 2;
	buf[0] = (char)(0xe0 | cp >> 12);
	buf[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
	buf[2] = (char)(0x80 | (cp & 0x3f));
	return 3;
}

/* The character after a backslash, decoded into buf; bytes written or 0. */
static size_t jr_escape(struct jr *j, char *buf)
{
	static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
	const char *hit;

	if (j->p >= j->end)
		return 0;
	if (*j->p == 'u') {
		j->p++;
		return jr_unicode(j, buf);
	}
	hit = strchr(from, *j->p);
	if (!hit || !*j->p)
		return 0;
	j->p++;
	buf[0] = to[hit - from];
	return 1;
}

/* A string into out (NULL: skip). Returns 0, 1 if cut to cap - 1 bytes, -EBADMSG. */
static int jr_string(struct jr *j, char *out, size_t cap)
{
	size_t n = 0;
	bool cut = out == NULL;

	if (!jr_eat(j, '"'))
		return -EBADMSG;
	while (j->p < j->end) {
		char c = *j->p++, buf[4];
		size_t k = 1;

		if (c == '"') {
			if (out)
				out[n] = '\0';
			return cut && out ? 1 : 0;
		}
		if ((unsigned char)c < 0x20)
			return -EBADMSG;
		buf[0] = c;
		if (c == '\\' && (k = jr_escape(j, buf)) == 0)
			return -EBADMSG;
		if (!cut && n + k < cap) {
			memcpy(out + n, buf, k);
			n += k;
		} else {
			cut = true;
		}
	}
	return -EBADMSG;
}

/* A number as uint64: negative gives 0, too large saturates, fraction and exponent ignored. */
static int jr_u64(struct jr *j, uint64_t *v)
{
	bool neg = jr_eat(j, '-'), digits = false;
	uint64_t x = 0;

	for (; j->p < j->end && *j->p >= '0' && *j->p <= '9'; j->p++, digits = true) {
		unsigned d = (unsigned)(*j->p - '0');

		x = x > (UINT64_MAX - d) / 10 ? UINT64_MAX : x * 10 + d;
	}
	if (!digits)
		return -EBADMSG;
	if (j->p < j->end && *j->p == '.')
		for (j->p++; j->p < j->end && *j->p >= '0' && *j->p <= '9'; j->p++)
			;
	if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
		j->p++;
		if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
			j->p++;
		for (; j->p < j->end && *j->p >= '0' && *j->p <= '9'; j->p++)
			;
	}
	*v = neg ? 0 : x;
	return 0;
}

static int jr_literal(struct jr *j, const char *word)
{
	size_t n = strlen(word);

	if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0)
		return -EBADMSG;
	j->p += n;
	return 0;
}

static int jr_object(struct jr *j, jr_field_fn fn, void *ctx);
static int jr_array(struct jr *j, jr_elem_fn fn, void *ctx);

static int jr_skip(struct jr *j)
{
	uint64_t v;

	switch (jr_peek(j)) {
	case '"': return jr_string(j, NULL, 0);
	case '{': return jr_object(j, NULL, NULL);
	case '[': return jr_array(j, NULL, NULL);
	case 't': return jr_literal(j, "true");
	case 'f': return jr_literal(j, "false");
	case 'n': return jr_literal(j, "null");
	default: return jr_u64(j, &v);
	}
}

/* Calls fn for each key (fn consumes the value); fn NULL skips the values. */
static int jr_object(struct jr *j, jr_field_fn fn, void *ctx)
{
	char key[64];
	int rc;

	if (++j->depth > JR_MAX_DEPTH || !jr_eat(j, '{'))
		return -EBADMSG;
	if (!jr_eat(j, '}')) {
		do {
			rc = jr_string(j, key, sizeof(key));
			if (rc < 0 || !jr_eat(j, ':'))
				return -EBADMSG;
			if (rc == 1)
				key[0] = '\0'; /* longer than any key we know */
			rc = fn ? fn(j, key, ctx) : jr_skip(j);
			if (rc < 0)
				return rc;
		} while (jr_eat(j, ','));
		if (!jr_eat(j, '}'))
			return -EBADMSG;
	}
	j->depth--;
	return 0;
}

static int jr_array(struct jr *j, jr_elem_fn fn, void *ctx)
{
	int rc;

	if (++j->depth > JR_MAX_DEPTH || !jr_eat(j, '['))
		return -EBADMSG;
	if (!jr_eat(j, ']')) {
		do {
			rc = fn ? fn(j, ctx) : jr_skip(j);
			if (rc < 0)
				return rc;
		} while (jr_eat(j, ','));
		if (!jr_eat(j, ']'))
			return -EBADMSG;
	}
	j->depth--;
	return 0;
}

/* An object, or null (skipped). */
static int jr_object_or_null(struct jr *j, jr_field_fn fn, void *ctx)
{
	return jr_peek(j) == 'n' ? jr_literal(j, "null") : jr_object(j, fn, ctx);
}

static int jr_string_or_null(struct jr *j, char *out, size_t cap)
{
	if (jr_peek(j) == 'n') {
		out[0] = '\0';
		return jr_literal(j, "null");
	}
	return jr_string(j, out, cap);
}

/* ---- JetStream reply shapes ---- */

static int seq_field(struct jr *j, const char *key, void *ctx)
{
	return strcmp(key, "stream_seq") == 0 ? jr_u64(j, ctx) : jr_skip(j);
}

static int config_field(struct jr *j, const char *key, void *ctx)
{
	struct tally__js_consumer *c = ctx;
	int rc;

	if (strcmp(key, "filter_subject") != 0)
		return jr_skip(j);
	rc = jr_string_or_null(j, c->filter, sizeof(c->filter));
	c->filter_too_long = rc == 1;
	return rc < 0 ? rc : 0;
}

static int cluster_field(struct jr *j, const char *key, void *ctx)
{
	struct tally__js_consumer *c = ctx;

	if (strcmp(key, "leader") != 0)
		return jr_skip(j);
	return jr_string_or_null(j, c->leader, sizeof(c->leader)) < 0 ? -EBADMSG : 0;
}

static int consumer_field(struct jr *j, const char *key, void *ctx)
{
	static const struct { const char *key; size_t off; } nums[] = {
		{ "num_pending", offsetof(struct tally__js_consumer, num_pending) },
		{ "num_ack_pending", offsetof(struct tally__js_consumer, num_ack_pending) },
		{ "num_redelivered", offsetof(struct tally__js_consumer, num_redelivered) },
		{ "num_waiting", offsetof(struct tally__js_consumer, num_waiting) },
	};
	struct tally__js_consumer *c = ctx;
	int rc;

	for (size_t i = 0; i < sizeof(nums) / sizeof(nums[0]); i++)
		if (strcmp(key, nums[i].key) == 0)
			return jr_u64(j, (uint64_t *)(void *)((char *)c + nums[i].off));
	if (strcmp(key, "name") == 0) {
		rc = jr_string(j, c->name, sizeof(c->name));
		c->name_too_long = rc == 1;
		return rc < 0 ? rc : 0;
	}
	if (strcmp(key, "stream_name") == 0)
		return jr_string(j, c->stream, sizeof(c->stream)) < 0 ? -EBADMSG : 0;
	if (strcmp(key, "config") == 0)
		return jr_object_or_null(j, config_field, c);
	if (strcmp(key, "delivered") == 0)
		return jr_object_or_null(j, seq_field, &c->delivered_stream_seq);
	if (strcmp(key, "ack_floor") == 0)
		return jr_object_or_null(j, seq_field, &c->ack_floor_stream_seq);
	if (strcmp(key, "cluster") == 0) {
		/* An object, even one without "leader" (Go omits an empty one):
		 * a cluster answered, and who leads matters (pending.h). */
		c->has_cluster = jr_peek(j) == '{';
		return jr_object_or_null(j, cluster_field, c);
	}
	return jr_skip(j);
}

static int error_field(struct jr *j, const char *key, void *ctx)
{
	struct tally__js_error *e = ctx;
	uint64_t v = 0; /* jr_u64 leaves it unset on a bad number */
	int rc;

	if (strcmp(key, "description") == 0)
		return jr_string(j, e->description, sizeof(e->description)) < 0 ? -EBADMSG : 0;
	if (strcmp(key, "code") != 0 && strcmp(key, "err_code") != 0)
		return jr_skip(j);
	rc = jr_u64(j, &v);
	v = v > 1000000 ? 1000000 : v;
	if (key[0] == 'c')
		e->code = (int)v;
	else
		e->err_code = (int)v;
	return rc;
}

struct list_parse {
	struct tally__js_page *page;
	tally__js_consumer_fn fn;
	void *ctx;
};

static int list_consumer(struct jr *j, void *ctx)
{
	struct list_parse *lp = ctx;
	struct tally__js_consumer c;
	int rc;

	memset(&c, 0, sizeof(c));
	rc = jr_object(j, consumer_field, &c);
	if (rc < 0)
		return rc;
	lp->page->count++;
	return lp->fn ? lp->fn(lp->ctx, &c, false) : 0;
}

static int list_missing(struct jr *j, void *ctx)
{
	struct list_parse *lp = ctx;
	struct tally__js_consumer c;
	int rc;

	memset(&c, 0, sizeof(c));
	rc = jr_string(j, c.name, sizeof(c.name));
	if (rc < 0)
		return rc;
	c.name_too_long = rc == 1;
	lp->page->missing++;
	return lp->fn ? lp->fn(lp->ctx, &c, true) : 0;
}

static int list_field(struct jr *j, const char *key, void *ctx)
{
	struct list_parse *lp = ctx;

	if (strcmp(key, "total") == 0)
		return jr_u64(j, &lp->page->total);
	if (strcmp(key, "offset") == 0)
		return jr_u64(j, &lp->page->offset);
	if (strcmp(key, "consumers") == 0)
		return jr_peek(j) == 'n' ? jr_literal(j, "null") : jr_array(j, list_consumer, lp);
	if (strcmp(key, "missing") == 0)
		return jr_peek(j) == 'n' ? jr_literal(j, "null") : jr_array(j, list_missing, lp);
	if (strcmp(key, "error") == 0)
		return jr_object(j, error_field, &lp->page->error);
	return jr_skip(j);
}

/* Nothing but whitespace may follow the top-level value. */
/* The parse's result: a negative rc as it is (a syntax error is -EBADMSG,
 * a callback's own error passes through), else -EBADMSG for trailing junk. */
static int jr_done(struct jr *j, int rc)
{
	if (rc < 0)
		return rc;
	jr_ws(j);
	return j->p != j->end ? -EBADMSG : 0;
}

int tally__js_parse_list(const char *json, size_t len, struct tally__js_page *page,
			 tally__js_consumer_fn fn, void *ctx)
{
	struct jr j = { .p = json, .end = json ? json + len : json }; /* NULL + 0 is UB */
	struct list_parse lp = { .page = page, .fn = fn, .ctx = ctx };

	memset(page, 0, sizeof(*page));
	if (!json)
		return -EBADMSG;
	return jr_done(&j, jr_object(&j, list_field, &lp));
}

struct info_parse {
	struct tally__js_consumer *c;
	struct tally__js_error *e;
};

static int info_field(struct jr *j, const char *key, void *ctx)
{
	struct info_parse *ip = ctx;

	if (strcmp(key, "error") == 0)
		return jr_object(j, error_field, ip->e);
	return consumer_field(j, key, ip->c);
}

int tally__js_parse_info(const char *json, size_t len, struct tally__js_consumer *out,
			 struct tally__js_error *err)
{
	struct jr j = { .p = json, .end = json ? json + len : json }; /* NULL + 0 is UB */
	struct info_parse ip = { .c = out, .e = err };

	memset(out, 0, sizeof(*out));
	memset(err, 0, sizeof(*err));
	if (!json)
		return -EBADMSG;
	return jr_done(&j, jr_object(&j, info_field, &ip));
}

/* STREAM.INFO: {"total":N,"offset":O,"config":{"retention":"workqueue",..},
 * "state":{..,"subjects":{"orders.a":30,..}},"error":{..}} (nats-server 2.9:
 * "subjects" only with a subjects_filter, absent when nothing matches; up
 * to 100000 subjects a page, "total" counts them all). */
#define stream_info tally__js_stream_info

static int sinfo_config(struct jr *j, const char *key, void *ctx)
{
	struct stream_info *si = ctx;

	if (strcmp(key, "retention") != 0)
		return jr_skip(j);
	return jr_string(j, si->retention, sizeof(si->retention)) < 0 ? -EBADMSG : 0;
}

/* state.subjects: an object whose keys are subjects (longer than jr_object's keys). */
static int sinfo_subjects(struct jr *j, struct stream_info *si)
{
	char subj[TALLY__PENDING_SUBJ_MAX];
	uint64_t count;
	int rc;

	if (jr_peek(j) == 'n')
		return jr_literal(j, "null");
	if (++j->depth > JR_MAX_DEPTH || !jr_eat(j, '{'))
		return -EBADMSG;
	if (!jr_eat(j, '}')) {
		do {
			int cut = jr_string(j, subj, sizeof(subj));

			if (cut < 0 || !jr_eat(j, ':') || jr_u64(j, &count) < 0)
				return -EBADMSG;
			si->subjects++;
			rc = si->fn ? si->fn(si->ctx, subj, cut == 1, count) : 0;
			if (rc < 0)
				return rc;
		} while (jr_eat(j, ','));
		if (!jr_eat(j, '}'))
			return -EBADMSG;
	}
	j->depth--;
	return 0;
}

static int sinfo_state(struct jr *j, const char *key, void *ctx)
{
	return strcmp(key, "subjects") == 0 ? sinfo_subjects(j, ctx) : jr_skip(j);
}

static int sinfo_field(struct jr *j, const char *key, void *ctx)
{
	struct stream_info *si = ctx;

	if (strcmp(key, "error") == 0)
		return jr_object(j, error_field, &si->error);
	if (strcmp(key, "total") == 0)
		return jr_u64(j, &si->total);
	if (strcmp(key, "offset") == 0)
		return jr_u64(j, &si->offset);
	if (strcmp(key, "config") == 0)
		return jr_object_or_null(j, sinfo_config, si);
	if (strcmp(key, "state") == 0)
		return jr_object_or_null(j, sinfo_state, si);
	return jr_skip(j);
}

int tally__js_parse_stream_info(const char *json, size_t len, struct tally__js_stream_info *si)
{
	struct jr j = { .p = json, .end = json ? json + len : json };

	if (!json)
		return -EBADMSG;
	return jr_done(&j, jr_object(&j, sinfo_field, si));
}

/* ---- refreshing entries ---- */

/* A reply that names a cluster but no leader: its numbers are a
 * placeholder, not the consumer leader's (pending.h, "In a cluster"). */
static bool leaderless(const struct tally__js_consumer *c)
{
	return c->has_cluster && !c->leader[0];
}

static void slot_stale(struct tally__poller *p, struct slot *s, const char *why);

static void slot_leaderless(struct tally__poller *p, struct slot *s)
{
	slot_stale(p, s, "reply names no consumer leader (an election under way?): last values kept");
	s->v.is_leader = 0;
	s->found = true;
	s->refreshed = true;
	slot_publish(p, s);
}

/* Returns 1 when the consumer was gone before (for the caller's one log line). */
static int slot_live(struct tally__poller *p, struct slot *s, const struct tally__js_consumer *c,
		     uint64_t now)
{
	int back = s->v.source == TALLY__PENDING_GONE ||
		   (s->v.source == TALLY__PENDING_NOTFOUND && s->found);

	if (leaderless(c)) {
		slot_leaderless(p, s);
		return 0;
	}
	s->found = true;
	s->v.source = TALLY__PENDING_LIVE;
	s->v.num_pending = c->num_pending;
	s->v.num_ack_pending = c->num_ack_pending;
	s->v.num_redelivered = c->num_redelivered;
	s->v.num_waiting = c->num_waiting;
	s->v.delivered_stream_seq = c->delivered_stream_seq;
	s->v.ack_floor_stream_seq = c->ack_floor_stream_seq;
	s->v.is_leader = 1; /* a leader's numbers, or a standalone server's own */
	copy_str(s->server, sizeof(s->server), c->leader[0] ? c->leader : p->server_id);
	s->v.consecutive_failures = 0;
	s->v.last_ok_ns = now;
	s->err[0] = '\0';
	copy_str(s->filter, sizeof(s->filter), c->filter_too_long ? "" : c->filter);
	if (c->filter_too_long)
		copy_str(s->err, sizeof(s->err), "filter subject too long to store: set map_subject");
	s->refreshed = true;
	slot_publish(p, s);
	return back;
}

static bool absent(uint32_t source)
{
	return source == TALLY__PENDING_GONE || source == TALLY__PENDING_NOTFOUND;
}

/* The server says s does not exist: gone if it was seen before (and its
 * grace period starts), not found if it never was. Returns 1 if this
 * turned the slot gone or not found (for the caller's one log line). */
static int slot_gone(struct tally__poller *p, struct slot *s, const char *why, uint64_t now)
{
	int turned = !absent(s->v.source);
	uint32_t source = s->found && s->v.source != TALLY__PENDING_NOTFOUND ? TALLY__PENDING_GONE
									    : TALLY__PENDING_NOTFOUND;

	if (turned)
		s->gone_since_ns = now;
	memset(&s->v, 0, sizeof(s->v));
	s->server[0] = '\0';
	s->v.source = source;
	s->v.is_leader = -1;
	s->v.last_ok_ns = now; /* the server said so: an answer, not a failure */
	copy_str(s->err, sizeof(s->err), why);
	s->refreshed = true;
	slot_publish(p, s);
	return turned;
}

/* After a good poll: gone entries past gone_grace_ms leave the table (a
 * whole-stream watch's) or turn not found (a configured pair stays). */
static void expire_gone(struct tally__poller *p, uint64_t now)
{
	uint64_t grace = (uint64_t)p->cfg.gone_grace_ms * NS_PER_MS;
	uint32_t cleared = 0;
	char first[2 * TALLY__PENDING_NAME_MAX] = "";

	for (uint32_t i = 0; i < p->cap; i++) {
		struct slot *s = &p->slots[i];

		if (!s->used || s->v.source != TALLY__PENDING_GONE || now - s->gone_since_ns < grace)
			continue;
		if (s->pair) {
			s->v.source = TALLY__PENDING_NOTFOUND;
			slot_publish(p, s);
			continue;
		}
		if (cleared++ == 0)
			snprintf(first, sizeof(first), "%s/%s", s->stream, s->consumer);
		slot_clear(p, s);
	}
	if (cleared) {
		plog(p, LOG_INFO, "%u consumer(s) gone for %u ms removed from the pending table, first %s",
		     cleared, p->cfg.gone_grace_ms, first);
		hash_rebuild(p);
	}
}

/* Values stay, live turns cached; never and gone stay what they are. */
static void slot_stale(struct tally__poller *p, struct slot *s, const char *why)
{
	if (s->v.source == TALLY__PENDING_LIVE)
		s->v.source = TALLY__PENDING_CACHED;
	s->v.consecutive_failures++;
	copy_str(s->err, sizeof(s->err), why);
	slot_publish(p, s);
}

static void note_table_full(struct tally__poller *p, const char *stream, const char *consumer)
{
	pthread_mutex_lock(&p->stats_lock);
	p->st.table_full++;
	pthread_mutex_unlock(&p->stats_lock);
	p->poll_untracked++;
	if (!p->full_logged)
		plog(p, LOG_WARN, "pending table full (%u entries): consumer %s/%s and later ones are "
		     "not tracked; raise pending_capacity in [segment] of tallyd.ini", p->cap, stream, consumer);
	p->full_logged = true;
}

/* Entries of watch sw that the listing did not mention are gone; one line
 * says how many turned gone, unless the caller already said why (quiet). */
static void sweep_stream(struct tally__poller *p, int sw, const char *why, uint64_t now, bool quiet)
{
	uint32_t turned = 0;
	const char *first = NULL;

	for (uint32_t i = 0; i < p->cap; i++) {
		struct slot *s = &p->slots[i];

		if (!s->used || s->sw != sw || s->refreshed || is_subject_slot(s))
			continue;
		if (slot_gone(p, s, why, now) && turned++ == 0)
			first = s->consumer;
	}
	if (turned && !quiet)
		plog(p, LOG_WARN, "stream %s: %u consumer(s) gone (%s), first %s; marked gone",
		     p->cfg.watches[sw].stream, turned, why, first);
}

struct list_apply {
	struct tally__poller *p;
	int sw;
	uint64_t now;
	uint32_t back;
};

/* One consumer of a LIST page. "missing": listed by name only (an offline
 * replica in a cluster): it exists, so it turns cached, not gone. */
static int apply_consumer(void *ctx, const struct tally__js_consumer *c, bool missing)
{
	struct list_apply *la = ctx;
	const char *stream = la->p->cfg.watches[la->sw].stream;
	struct slot *s;

	if (c->name_too_long || !c->name[0])
		return 0;
	s = slot_find(la->p, stream, c->name);
	if (!s && !missing)
		s = slot_add(la->p, stream, c->name, la->sw);
	if (!s) {
		if (!missing)
			note_table_full(la->p, stream, c->name);
		return 0;
	}
	if (missing) {
		slot_stale(la->p, s, "listed as missing (consumer leader offline?)");
		s->refreshed = true;
		return 0;
	}
	la->back += (uint32_t)slot_live(la->p, s, c, la->now);
	return 0;
}

/* Send a JetStream API request; *reply on success. p->err on failure. */
static int api_request(struct tally__poller *p, const char *subj, const char *body, natsMsg **reply)
{
	natsStatus s = natsConnection_RequestString(reply, p->nc, subj, body,
						    p->cfg.request_timeout_ms);

	if (s == NATS_OK)
		return 0;
	*reply = NULL;
	return js_failure(p, subj, s, 0);
}

/* A server error in a reply that is not "not found". */
static int api_error(struct tally__poller *p, const char *what, const struct tally__js_error *e)
{
	if (e->err_code == JSNotEnabledErr || e->err_code == JSNotEnabledForAccountErr)
		return fail(p, -ENOTSUP, "%s: JetStream not enabled for this account: %s", what,
			    e->description);
	return fail(p, -EIO, "%s: server error %d (%d): %s", what, e->code, e->err_code, e->description);
}

static void drop_watch_subjects(struct tally__poller *p, int sw);

/* The entry that shows a whole-stream watch whose stream does not exist
 * (stat, JSON, /metrics list it as STREAM/"*", not_found): no consumer
 * can be named "*". Removed when the stream appears. */
#define STREAM_MARKER "*"

static void stream_missing(struct tally__poller *p, int sw, uint64_t now)
{
	const char *stream = p->cfg.watches[sw].stream;
	struct slot *m = slot_find(p, stream, STREAM_MARKER);

	drop_watch_subjects(p, sw);
	p->sw_retention[sw] = RET_UNKNOWN; /* a stream made again may differ */
	if (!p->sw_missing[sw])
		plog(p, LOG_WARN, "stream %s not found; its consumers are marked gone",
		     p->cfg.watches[sw].stream);
	p->sw_missing[sw] = true;
	sweep_stream(p, sw, "stream not found", now, true);
	if (!m && !(m = slot_add(p, stream, STREAM_MARKER, sw)))
		note_table_full(p, stream, STREAM_MARKER);
	if (m) {
		m->found = false;
		slot_gone(p, m, "stream not found", now);
	}
}

static void stream_exists(struct tally__poller *p, int sw)
{
	struct slot *m = slot_find(p, p->cfg.watches[sw].stream, STREAM_MARKER);

	if (m) {
		slot_clear(p, m);
		hash_rebuild(p);
	}
}

/* One page from offset; *count consumers in it, *total in the stream. 1: stream not found. */
static int list_page(struct tally__poller *p, struct list_apply *la, uint64_t offset,
		     uint64_t *count, uint64_t *total)
{
	char subj[320], body[48];
	struct tally__js_page page;
	natsMsg *m = NULL;
	int rc;

	snprintf(subj, sizeof(subj), "%s.CONSUMER.LIST.%s", p->api, p->cfg.watches[la->sw].stream);
	snprintf(body, sizeof(body), "{\"offset\":%llu}", (unsigned long long)offset);
	rc = api_request(p, subj, body, &m);
	if (rc < 0)
		return rc;
	rc = tally__js_parse_list(natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), &page,
				  apply_consumer, la);
	natsMsg_Destroy(m);
	if (rc < 0)
		return fail(p, -EIO, "%s: malformed reply at offset %llu", subj, (unsigned long long)offset);
	if (page.error.err_code == JSStreamNotFoundErr)
		return 1;
	if (page.error.code != 0)
		return api_error(p, subj, &page.error);
	*count = page.count + page.missing;
	*total = page.total;
	return 0;
}

/* ---- per-subject backlog of work-queue streams (pending.h, "Shared backlog") ---- */

/* Clear the per-subject entries of one consumer and make it a plain consumer again. */
static void drop_subjects(struct tally__poller *p, const char *stream, const char *consumer)
{
	bool cleared = false;

	for (uint32_t i = 0; i < p->cap; i++) {
		struct slot *s = &p->slots[i];

		if (s->used && is_subject_slot(s) && strcmp(s->stream, stream) == 0 &&
		    strcmp(s->consumer, consumer) == 0) {
			slot_clear(p, s);
			cleared = true;
		}
	}
	if (cleared)
		hash_rebuild(p);
}

/* Consumers of watch sw back to plain (shared) consumers, per-subject entries cleared. */
static void drop_watch_subjects(struct tally__poller *p, int sw)
{
	bool cleared = false;

	for (uint32_t i = 0; i < p->cap; i++) {
		struct slot *s = &p->slots[i];

		if (!s->used || s->sw != sw)
			continue;
		if (is_subject_slot(s)) {
			slot_clear(p, s);
			cleared = true;
		} else if (s->v.kind == TALLY__PENDING_SPLIT) {
			s->v.kind = TALLY__PENDING_CONSUMER;
			slot_publish(p, s);
		}
	}
	if (cleared)
		hash_rebuild(p);
}

struct split_apply {
	struct tally__poller *p;
	struct slot *owner;
	uint64_t now;
	uint32_t added;
	bool incomplete;   /* table full, too many subjects, a subject too long */
};

static int apply_subject(void *ctx, const char *subject, bool cut, uint64_t count)
{
	struct split_apply *sa = ctx;
	struct slot *o = sa->owner, *s;

	if (sa->incomplete)
		return 0;
	if (cut || !subject[0] || sa->added >= TALLY__PENDING_SUBJECTS_MAX) {
		sa->incomplete = true;
		return 0;
	}
	s = slot_find3(sa->p, o->stream, o->consumer, subject);
	if (!s)
		s = slot_add3(sa->p, o->stream, o->consumer, subject, o->sw);
	if (!s) {
		sa->incomplete = true;
		return 0;
	}
	sa->added++;
	memset(&s->v, 0, sizeof(s->v));
	s->v.kind = TALLY__PENDING_SUBJECT;
	s->v.source = TALLY__PENDING_LIVE;
	s->v.is_leader = o->v.is_leader;
	copy_str(s->server, sizeof(s->server), o->server);
	s->v.num_pending = count; /* stored = unacked: num_pending + num_ack_pending */
	s->v.last_ok_ns = sa->now;
	s->filter[0] = '\0';
	s->err[0] = '\0';
	s->seen = s->refreshed = true;
	slot_publish(sa->p, s);
	return 0;
}

static void note_unsplit(struct tally__poller *p, const struct slot *o, const char *why)
{
	pthread_mutex_lock(&p->stats_lock);
	p->st.subjects_unsplit++;
	pthread_mutex_unlock(&p->stats_lock);
	if (!p->split_logged)
		plog(p, LOG_WARN, "work-queue consumer %s/%s: per-subject backlog not kept (%s); its "
		     "whole backlog is shared by its subjects (at most %u subjects a consumer, and "
		     "the pending capacity); later ones are not logged", o->stream, o->consumer, why,
		     TALLY__PENDING_SUBJECTS_MAX);
	p->split_logged = true;
}

/* One consumer of a work-queue stream: its subjects' stored counts. */
static int split_consumer(struct tally__poller *p, struct slot *o, const char *pattern, uint64_t now)
{
	struct split_apply sa = { .p = p, .owner = o, .now = now };
	struct stream_info si = { .fn = apply_subject, .ctx = &sa };
	char subj[320], body[TALLY__PENDING_SUBJ_MAX + 32];
	natsMsg *m = NULL;
	int rc;

	if (strpbrk(pattern, "\"\\")) {
		note_unsplit(p, o, "filter not expressible in a request");
		drop_subjects(p, o->stream, o->consumer);
		return 0;
	}
	snprintf(subj, sizeof(subj), "%s.STREAM.INFO.%s", p->api, o->stream);
	snprintf(body, sizeof(body), "{\"subjects_filter\":\"%s\"}", pattern);
	rc = api_request(p, subj, body, &m);
	if (rc < 0)
		return rc;
	rc = tally__js_parse_stream_info(natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), &si);
	natsMsg_Destroy(m);
	if (rc < 0)
		return fail(p, -EIO, "%s: malformed reply", subj);
	if (si.error.err_code == JSStreamNotFoundErr || strcmp(si.retention, "workqueue") != 0)
		return 1; /* deleted, or made again with another retention, since the listing */
	if (si.error.code != 0)
		return api_error(p, subj, &si.error);
	if (!sa.incomplete && si.total > si.subjects)
		sa.incomplete = true; /* paged: more than one page of subjects */
	if (sa.incomplete) {
		note_unsplit(p, o, si.total > TALLY__PENDING_SUBJECTS_MAX ? "too many subjects"
					: "pending table full or a subject too long");
		drop_subjects(p, o->stream, o->consumer);
		if (o->v.kind == TALLY__PENDING_SPLIT) {
			o->v.kind = TALLY__PENDING_CONSUMER;
			slot_publish(p, o);
		}
		return 0;
	}
	if (o->v.kind != TALLY__PENDING_SPLIT) {
		o->v.kind = TALLY__PENDING_SPLIT;
		slot_publish(p, o);
	}
	return 0;
}

/* After a good listing of watch sw: for a work-queue stream, every live
 * consumer with a pattern gets per-subject entries (one STREAM.INFO with
 * subjects_filter each); entries of subjects no longer stored leave. */
static int poll_subjects(struct tally__poller *p, int sw, uint64_t now)
{
	struct stream_info si = { 0 };
	char subj[320];
	natsMsg *m = NULL;
	bool cleared = false;
	int rc = 0;

	if (p->sw_retention[sw] == RET_UNKNOWN) {
		/* once per stream (again after it was not found, or a reconfigure):
		 * retention cannot change on a stream update */
		snprintf(subj, sizeof(subj), "%s.STREAM.INFO.%s", p->api, p->cfg.watches[sw].stream);
		rc = api_request(p, subj, "", &m);
		if (rc < 0)
			return rc;
		rc = tally__js_parse_stream_info(natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), &si);
		natsMsg_Destroy(m);
		if (rc < 0)
			return fail(p, -EIO, "%s: malformed reply", subj);
		if (si.error.err_code == JSStreamNotFoundErr)
			return 0; /* the next listing says so */
		if (si.error.code != 0)
			return api_error(p, subj, &si.error);
		p->sw_retention[sw] = strcmp(si.retention, "workqueue") == 0 ? RET_WORKQUEUE : RET_OTHER;
	}
	if (p->sw_retention[sw] != RET_WORKQUEUE) {
		drop_watch_subjects(p, sw);
		return 0;
	}
	for (uint32_t i = 0; i < p->cap; i++)
		if (p->slots[i].used && p->slots[i].sw == sw && is_subject_slot(&p->slots[i]))
			p->slots[i].seen = false;
	for (uint32_t i = 0; i < p->cap && rc == 0; i++) {
		struct slot *o = &p->slots[i];
		const char *pattern;

		if (!o->used || o->sw != sw || is_subject_slot(o))
			continue;
		pattern = slot_map(p, o)[0] ? slot_map(p, o) : o->filter;
		if (o->v.source != TALLY__PENDING_LIVE || !pattern[0]) {
			if (o->v.kind == TALLY__PENDING_SPLIT) { /* its entries leave below */
				o->v.kind = TALLY__PENDING_CONSUMER;
				slot_publish(p, o);
			}
			continue;
		}
		rc = split_consumer(p, o, pattern, now);
	}
	if (rc < 0)
		return rc;
	if (rc == 1) {
		drop_watch_subjects(p, sw);
		p->sw_retention[sw] = RET_UNKNOWN;
		return 0;
	}
	for (uint32_t i = 0; i < p->cap; i++) {
		struct slot *s = &p->slots[i];
		struct slot *o;

		if (!s->used || s->sw != sw || !is_subject_slot(s))
			continue;
		o = slot_find(p, s->stream, s->consumer);
		if (!s->seen || !o || o->v.kind != TALLY__PENDING_SPLIT) {
			slot_clear(p, s);
			cleared = true;
		}
	}
	if (cleared)
		hash_rebuild(p);
	return 0;
}

static int poll_stream(struct tally__poller *p, int sw, uint64_t now)
{
	struct list_apply la = { .p = p, .sw = sw, .now = now };
	uint64_t offset = 0, count = 0, total = 0;
	int rc;

	do {
		rc = list_page(p, &la, offset, &count, &total);
		offset += count;
	} while (rc == 0 && count > 0 && offset < total);
	if (rc < 0)
		return rc;
	if (rc == 1) {
		stream_missing(p, sw, now);
		return 0;
	}
	if (p->sw_missing[sw])
		plog(p, LOG_INFO, "stream %s exists again", p->cfg.watches[sw].stream);
	p->sw_missing[sw] = false;
	stream_exists(p, sw);
	if (la.back)
		plog(p, LOG_INFO, "stream %s: %u consumer(s) marked gone exist again",
		     p->cfg.watches[sw].stream, la.back);
	sweep_stream(p, sw, "consumer not found", now, false);
	return poll_subjects(p, sw, now);
}

/* Whether a CONSUMER.INFO reply without an error is about s at all. While
 * it deletes a consumer, nats-server answers its INFO with the response
 * type alone ({"type":"io.nats.jetstream.api.v1.consumer_info_response"}):
 * no error, no name, no config. Read as live, that reply was a backlog of
 * 0 with no filter: the row lost the consumer's pattern, and when the next
 * poll said "not found" the deleted consumer matched no row, so the row
 * never read gone (test_backlog caught it on 2 busy cores). */
static bool reply_is_of(const struct tally__js_consumer *c, const struct slot *s)
{
	if (!c->name[0] || c->name_too_long || strcmp(c->name, s->consumer) != 0)
		return false;
	return !c->stream[0] || strcmp(c->stream, s->stream) == 0;
}

/* An answer that names no consumer (or another): the last values stay, cached. */
static void slot_unnamed(struct tally__poller *p, struct slot *s)
{
	slot_stale(p, s, "reply names no consumer (being deleted?): last values kept");
	s->refreshed = true;
}

static int poll_pair(struct tally__poller *p, struct slot *s, uint64_t now)
{
	struct tally__js_consumer c;
	struct tally__js_error e;
	char subj[448];
	natsMsg *m = NULL;
	int rc;

	snprintf(subj, sizeof(subj), "%s.CONSUMER.INFO.%s.%s", p->api, s->stream, s->consumer);
	rc = api_request(p, subj, "", &m);
	if (rc < 0)
		return rc;
	rc = tally__js_parse_info(natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), &c, &e);
	natsMsg_Destroy(m);
	if (rc < 0)
		return fail(p, -EIO, "%s: malformed reply", subj);
	if (e.err_code == JSStreamNotFoundErr || e.err_code == JSConsumerNotFoundErr) {
		const char *why = e.err_code == JSStreamNotFoundErr ? "stream not found" : "consumer not found";

		if (slot_gone(p, s, why, now))
			plog(p, LOG_WARN, "consumer %s/%s: %s; marked %s", s->stream, s->consumer, why,
			     tally__pending_source_name(s->v.source));
		return 0;
	}
	if (e.code != 0)
		return api_error(p, subj, &e);
	if (!reply_is_of(&c, s)) {
		slot_unnamed(p, s);
		return 0;
	}
	if (slot_live(p, s, &c, now))
		plog(p, LOG_INFO, "consumer %s/%s exists again", s->stream, s->consumer);
	return 0;
}

static int poll_targets(struct tally__poller *p, uint64_t now)
{
	int rc = 0;

	for (size_t i = 0; i < p->cfg.nwatches && rc == 0; i++)
		if (!p->cfg.watches[i].consumer)
			rc = poll_stream(p, (int)i, now);
	for (uint32_t i = 0; i < p->cap && rc == 0; i++) {
		struct slot *s = &p->slots[i];

		if (s->used && s->pair && s->sw < 0)
			rc = poll_pair(p, s, now);
	}
	return rc;
}

/* ---- breaker, stats, one poll ---- */

static void publish_breaker(struct tally__poller *p)
{
	p->brk.connected = p->nc && natsConnection_Status(p->nc) == NATS_CONN_STATUS_CONNECTED;
	tally__pending_write_breaker(tally__pending_breaker_at(p->section), &p->brk);
	pthread_mutex_lock(&p->stats_lock);
	p->st.polls_ok = p->brk.polls_ok;
	p->st.polls_failed = p->brk.polls_failed;
	p->st.skipped_overrun = p->brk.skipped_overrun;
	p->st.skipped_open = p->brk.skipped_open;
	p->st.breaker_opens = p->brk.opens_total;
	p->st.breaker_state = p->brk.state;
	p->st.connected = p->brk.connected;
	p->st.consumers = p->nused;
	pthread_mutex_unlock(&p->stats_lock);
}

static void breaker_set(struct tally__poller *p, uint32_t state, uint64_t now)
{
	p->brk.state = state;
	p->brk.since_ns = now;
	if (state == TALLY__BREAKER_OPEN) {
		p->brk.opens_total++;
		p->open_until_ns = now + p->cfg.breaker_cooldown_ms * NS_PER_MS;
	}
}

static void poll_succeeded(struct tally__poller *p, uint64_t now)
{
	if (p->failing)
		plog(p, LOG_INFO, "JetStream polling recovered after %u failed poll(s) in %.1f s",
		     p->brk.consecutive_failures, (double)(now - p->fail_since_ns) / 1e9);
	if (p->brk.state != TALLY__BREAKER_CLOSED) {
		plog(p, LOG_INFO, "circuit breaker closed");
		breaker_set(p, TALLY__BREAKER_CLOSED, now);
	}
	p->failing = false;
	p->brk.consecutive_failures = 0;
	p->brk.polls_ok++;
	p->brk.last_ok_ns = now;
}

static void poll_failed(struct tally__poller *p, uint64_t now)
{
	bool changed = strncmp(p->brk.last_error, p->err, sizeof(p->brk.last_error) - 1) != 0;

	if (!p->failing)
		plog(p, LOG_ERR, "JetStream polling failed: %s (last good values kept as cached; "
		     "next line when it recovers)", p->err);
	else if (changed)
		plog(p, LOG_DEBUG, "still failing: %s", p->err);
	if (!p->failing)
		p->fail_since_ns = now;
	p->failing = true;
	p->brk.consecutive_failures++;
	p->brk.polls_failed++;
	copy_str(p->brk.last_error, sizeof(p->brk.last_error), p->err);
	p->brk.last_error_ns = now;
	if (p->brk.state == TALLY__BREAKER_HALF_OPEN) {
		plog(p, LOG_DEBUG, "probe failed: circuit breaker open again");
		breaker_set(p, TALLY__BREAKER_OPEN, now);
	} else if (p->brk.state == TALLY__BREAKER_CLOSED &&
		   p->brk.consecutive_failures >= p->cfg.breaker_threshold) {
		plog(p, LOG_WARN, "circuit breaker open after %u consecutive failed polls; one probe "
		     "every %u ms", p->brk.consecutive_failures, p->cfg.breaker_cooldown_ms);
		breaker_set(p, TALLY__BREAKER_OPEN, now);
	}
}

static uint64_t out_msgs(struct tally__poller *p)
{
	natsStatistics *st = NULL;
	uint64_t out = 0;

	if (p->nc && natsStatistics_Create(&st) == NATS_OK &&
	    natsConnection_GetStats(p->nc, st) == NATS_OK)
		natsStatistics_GetCounts(st, NULL, NULL, &out, NULL, NULL);
	natsStatistics_Destroy(st);
	return out;
}

static void count_poll(struct tally__poller *p, uint64_t t0, uint64_t msgs0)
{
	uint64_t msgs = out_msgs(p);
	uint64_t sent = msgs >= msgs0 ? msgs - msgs0 : msgs; /* new connection: from 0 */

	pthread_mutex_lock(&p->stats_lock);
	p->st.last_requests = sent;
	p->st.requests += sent;
	p->st.last_poll_ns = now_ns() - t0;
	pthread_mutex_unlock(&p->stats_lock);
}

/* One poll; poll_lock held. Returns 0 or the failure code. */
static int poll_locked(struct tally__poller *p)
{
	uint64_t t0 = now_ns(), msgs0 = out_msgs(p);
	int rc;

	for (uint32_t i = 0; i < p->cap; i++)
		p->slots[i].refreshed = false;
	p->poll_untracked = 0;
	rc = ensure_connected(p);
	if (rc == 0)
		rc = poll_targets(p, t0);
	if (rc == 0) {
		expire_gone(p, now_ns());
		poll_succeeded(p, now_ns());
		/* a complete poll says how many it could not track */
		if (p->full_logged && !p->poll_untracked)
			plog(p, LOG_INFO, "pending table has room again: every consumer is tracked");
		p->full_logged = p->poll_untracked != 0;
		p->brk.untracked = p->poll_untracked;
	} else {
		for (uint32_t i = 0; i < p->cap; i++)
			if (p->slots[i].used && !p->slots[i].refreshed)
				slot_stale(p, &p->slots[i], p->err);
		poll_failed(p, now_ns());
	}
	count_poll(p, t0, msgs0);
	publish_breaker(p);
	return rc;
}

/* Breaker gate before a poll; counts a skipped tick. poll_lock held. */
static bool breaker_allows(struct tally__poller *p, uint64_t now)
{
	if (p->brk.state != TALLY__BREAKER_OPEN)
		return true;
	if (now < p->open_until_ns) {
		p->brk.skipped_open++;
		publish_breaker(p);
		return false;
	}
	breaker_set(p, TALLY__BREAKER_HALF_OPEN, now);
	plog(p, LOG_DEBUG, "circuit breaker half-open: one probe");
	return true;
}

int tally__poller_poll_once(struct tally__poller *p)
{
	int rc = -EBUSY;

	pthread_mutex_lock(&p->poll_lock);
	if (breaker_allows(p, now_ns()))
		rc = poll_locked(p);
	pthread_mutex_unlock(&p->poll_lock);
	return rc;
}

/* ---- the thread ---- */

/* Poll if the breaker allows; return the next due time (skipping overrun ticks). */
static uint64_t tick(struct tally__poller *p, uint64_t due)
{
	uint64_t interval, now, late;

	pthread_mutex_lock(&p->poll_lock);
	interval = p->cfg.poll_interval_ms * NS_PER_MS;
	if (breaker_allows(p, now_ns()))
		poll_locked(p);
	now = now_ns();
	late = now > due ? (now - due) / interval : 0;
	if (late) {
		p->brk.skipped_overrun += late;
		publish_breaker(p);
		plog(p, LOG_DEBUG, "poll took %.1f ms: %llu tick(s) skipped",
		     (double)(now - due) / 1e6, (unsigned long long)late);
	}
	pthread_mutex_unlock(&p->poll_lock);
	return due + (late + 1) * interval;
}

/* Sleep until *due; false when stopping. A reconfigure makes the tick due now. */
static bool wait_tick(struct tally__poller *p, uint64_t *due)
{
	bool go;

	pthread_mutex_lock(&p->wake_lock);
	while (!p->stopping && !p->replan && now_ns() < *due) {
		struct timespec ts = { .tv_sec = (time_t)(*due / 1000000000u),
				       .tv_nsec = (long)(*due % 1000000000u) };

		pthread_cond_timedwait(&p->wake, &p->wake_lock, &ts);
	}
	if (p->replan)
		*due = now_ns();
	p->replan = false;
	go = !p->stopping;
	pthread_mutex_unlock(&p->wake_lock);
	return go;
}

static void *poller_main(void *arg)
{
	struct tally__poller *p = arg;
	uint64_t due = now_ns();

	while (wait_tick(p, &due))
		due = tick(p, due);
	return NULL;
}

/* ---- lifecycle ---- */

static int init_sync(struct tally__poller *p)
{
	pthread_condattr_t ca;
	int rc = pthread_condattr_init(&ca);

	if (rc == 0)
		rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	if (rc == 0)
		rc = pthread_cond_init(&p->wake, &ca);
	pthread_condattr_destroy(&ca);
	if (rc == 0)
		rc = pthread_mutex_init(&p->poll_lock, NULL);
	if (rc == 0)
		rc = pthread_mutex_init(&p->wake_lock, NULL);
	if (rc == 0)
		rc = pthread_mutex_init(&p->stats_lock, NULL);
	if (rc == 0)
		rc = pthread_mutex_init(&p->nc_lock, NULL);
	return -rc;
}

static void poller_free(struct tally__poller *p)
{
	drop_connection(p);
	natsOptions_Destroy(p->opts);
	cfg_free(&p->cfg);
	free(p->slots);
	free(p->hash);
	free(p->sw_missing);
	free(p->sw_retention);
	free(p);
}

static int poller_alloc(struct tally__poller **out, uint32_t cap, const struct tally_poller_config *cfg)
{
	struct tally__poller *p = calloc(1, sizeof(*p));
	uint32_t hsize = 16;

	while (hsize < 2 * cap)
		hsize <<= 1;
	if (!p)
		return -ENOMEM;
	p->cap = cap;
	p->hash_mask = hsize - 1;
	p->slots = calloc(cap, sizeof(*p->slots));
	p->hash = calloc(hsize, sizeof(*p->hash));
	p->sw_missing = calloc(cfg->nwatches, sizeof(*p->sw_missing));
	p->sw_retention = calloc(cfg->nwatches, sizeof(*p->sw_retention));
	*out = p;
	if (!p->slots || !p->hash || !p->sw_missing || !p->sw_retention || cfg_dup(&p->cfg, cfg) < 0)
		return -ENOMEM;
	return 0;
}

static int validate(const struct tally_poller_config *cfg, uint32_t cap, const struct tally__poller *p)
{
	char why[300];

	if (tally__poller_config_check(cfg, why, sizeof(why)) < 0) {
		if (cfg && p)
			plog(p, LOG_ERR, "poller configuration rejected: %s", why);
		else if (cfg)
			(cfg->log ? cfg->log : default_log)(cfg->log_ctx, LOG_ERR, why);
		return -EINVAL;
	}
	if (count_pairs(cfg) > cap) {
		snprintf(why, sizeof(why), "%zu stream/consumer pairs but the pending table holds %u",
			 count_pairs(cfg), cap);
		(cfg->log ? cfg->log : default_log)(cfg->log_ctx, LOG_ERR, why);
		return -ENOSPC;
	}
	return 0;
}

static void first_state(struct tally__poller *p)
{
	for (uint32_t i = 0; i < p->cap; i++)
		tally__pending_clear_entry(tally__pending_entry_at(p->section, i));
	for (uint32_t i = 0; i < p->cap; i++)
		p->slots[i].sw = -1;
	p->brk.state = TALLY__BREAKER_CLOSED;
	p->brk.since_ns = now_ns();
	apply_watches(p);
	build_opts(p);
	set_api_prefix(p);
	publish_breaker(p);
}

int tally__poller_start(const struct tally_poller_config *cfg, void *pending_section, size_t len,
			uint32_t capacity, struct tally__poller **out)
{
	struct tally__poller *p = NULL;
	size_t need = tally__pending_section_size(capacity);
	int cap = (int)capacity, rc;

	*out = NULL;
	if (!pending_section || need == 0 || need > len)
		return -EBADMSG;
	rc = validate(cfg, (uint32_t)cap, NULL);
	if (rc < 0)
		return rc;
	rc = poller_alloc(&p, (uint32_t)cap, cfg);
	if (rc == 0)
		rc = init_sync(p);
	if (rc < 0) {
		if (p)
			poller_free(p);
		return rc;
	}
	p->section = pending_section;
	first_state(p);
	if (!p->cfg.manual) {
		rc = -pthread_create(&p->thread, NULL, poller_main, p);
		if (rc < 0) {
			poller_free(p);
			return rc;
		}
		p->has_thread = true;
	}
	*out = p;
	return 0;
}

void tally__poller_stop(struct tally__poller **pp)
{
	struct tally__poller *p = pp ? *pp : NULL;

	if (!p)
		return;
	if (p->has_thread) {
		/* Close first: a request (or reconnect) waiting on a server that
		 * accepted but never answers returns now. A connect in progress
		 * waits at most TALLY__POLLER_CONNECT_MAX_MS per server. */
		atomic_store(&p->closing, true);
		pthread_mutex_lock(&p->nc_lock);
		if (p->nc)
			natsConnection_Close(p->nc);
		pthread_mutex_unlock(&p->nc_lock);
		pthread_mutex_lock(&p->wake_lock);
		p->stopping = true;
		pthread_cond_signal(&p->wake);
		pthread_mutex_unlock(&p->wake_lock);
		pthread_join(p->thread, NULL);
	}
	drop_connection(p);
	pthread_mutex_destroy(&p->nc_lock);
	pthread_mutex_destroy(&p->poll_lock);
	pthread_mutex_destroy(&p->wake_lock);
	pthread_mutex_destroy(&p->stats_lock);
	pthread_cond_destroy(&p->wake);
	poller_free(p);
	*pp = NULL;
}

int tally__poller_reconfigure(struct tally__poller *p, const struct tally_poller_config *cfg)
{
	struct tally_poller_config next, old;
	bool *missing;
	uint8_t *retention;
	int rc = validate(cfg, p->cap, p);

	if (rc < 0)
		return rc;
	missing = calloc(cfg->nwatches, sizeof(*missing));
	retention = calloc(cfg->nwatches, sizeof(*retention));
	if (!missing || !retention || cfg_dup(&next, cfg) < 0) {
		free(missing);
		free(retention);
		return -ENOMEM;
	}
	pthread_mutex_lock(&p->poll_lock);
	old = p->cfg;
	p->cfg = next;
	free(p->sw_missing);
	p->sw_missing = missing;
	free(p->sw_retention);
	p->sw_retention = retention;
	if (conn_changed(&old, &p->cfg)) {
		drop_connection(p);
		build_opts(p);
	}
	set_api_prefix(p);
	apply_watches(p);
	publish_breaker(p);
	pthread_mutex_unlock(&p->poll_lock);
	cfg_free(&old);
	plog(p, LOG_INFO, "reconfigured: %zu watch(es), %u entries kept or added", cfg->nwatches, p->nused);
	pthread_mutex_lock(&p->wake_lock);
	p->replan = true;
	pthread_cond_signal(&p->wake);
	pthread_mutex_unlock(&p->wake_lock);
	return 0;
}

void tally__poller_stats(struct tally__poller *p, struct tally__poller_stats *out)
{
	pthread_mutex_lock(&p->stats_lock);
	*out = p->st;
	pthread_mutex_unlock(&p->stats_lock);
}

struct tally__pending_policy tally__poller_policy(const struct tally__poller *p)
{
	return (struct tally__pending_policy){ .include_ack_pending = !p->cfg.exclude_ack_pending };
}
