/* SPDX-License-Identifier: MIT */
/*
 * tallyd_config.c: tallyd's configuration file (format in tallyd_config.h,
 * every key in etc/tallyd.ini).
 *
 * inih splits KEY = VALUE lines, trims them and strips comments; it gives
 * its handler no line number and tracks sections by a name we would have to
 * parse again, so we feed it lines through our own reader, which counts
 * them, parses the section headers itself (the argument of [watch ...] and
 * [thresholds ...] is ours to split), rejects what inih would only report
 * as "an error somewhere", and strips leading blanks (no continuation
 * lines: a value is one line). Each section kind has a table of its keys:
 * name, how to parse the value, where it goes, its bounds. The tables are
 * also where the "valid keys" of an error message come from.
 */
#include "config.h"

#include <errno.h>
#include <grp.h>
#include <ini.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "exporter.h"
#include "tallyd_config.h"

#define MAX_ERRORS 20
#define TALLYD_MAX_SLICES 3600u /* libtally's TALLY__WINDOW_MAX_SLICES (window.c) */
#define MAX_KEYS 24

/* ---- key tables ---- */

enum kind {
	K_STR,     /* char *, "" means unset */
	K_SEGNAME, /* char *, a valid segment name */
	K_LISTEN,  /* char *, ADDR:PORT */
	K_SUBJECT, /* char *, a subject or pattern */
	K_BOOL,    /* bool */
	K_BOOLINT, /* int 0/1 */
	K_U32,     /* uint32_t in [min, max] */
	K_POW2,    /* uint32_t, a power of two in [min, max] */
	K_U64,     /* uint64_t in [min, max] */
	K_MS_NS,   /* uint64_t ns, written in ms with up to 6 decimals */
	K_RATIO,   /* double in (0, 1] */
	K_POLICY,  /* enum tally_stale_policy */
};

struct key {
	const char *name;
	enum kind kind;
	size_t off;
	uint64_t min, max;
};

enum sect { S_SEGMENT, S_ENGINE, S_HTTP, S_NATS, S_WATCH, S_THRESH, S_SHARE, S__COUNT };

#define CF(f) offsetof(struct tallyd_config, f)
#define TR(f) offsetof(struct tally_threshold_rule, f)
#define U32MAX UINT32_MAX

static const struct key segment_keys[] = {
	{ "name", K_SEGNAME, CF(segment_name), 0, 0 },
	/* the bounds are libtally's (segment.c config_check): an error names
	 * the key and its line here rather than failing at segment creation */
	{ "producer_slots", K_U32, CF(seg.producer_slots), 1, 4096 },
	{ "ring_capacity", K_POW2, CF(seg.ring_capacity), 64, 1u << 24 },
	{ "subject_capacity", K_U32, CF(seg.subject_capacity), 1, 1u << 20 },
	{ "pending_capacity", K_U32, CF(seg.pending_capacity), 1, 65536 },
	{ "max_value_ms", K_MS_NS, CF(seg.max_value_ns), 1, 0 },
	{ "producer_cooloff_ms", K_U32, CF(seg.producer_cooloff_ms), 0, U32MAX },
	{ "group_readable", K_BOOLINT, CF(seg.group_readable), 0, 0 },
	{ "group_writable", K_BOOLINT, CF(seg.group_writable), 0, 0 },
	{ "group", K_STR, CF(group), 0, 0 },
	{ NULL, 0, 0, 0, 0 },
};

static const struct key engine_keys[] = {
	{ "slice_ms", K_MS_NS, CF(engine.slice_ns), 1, 0 },
	{ "window_ms", K_MS_NS, CF(engine.window_ns), 1, 0 },
	{ "publish_interval_ms", K_U32, CF(engine.publish_interval_ms), 1, 60000 },
	{ "drain_interval_us", K_U32, CF(engine.drain_interval_us), 1, 1000000 },
	{ "reap_interval_ms", K_U32, CF(engine.reap_interval_ms), 1, 3600000 },
	{ "drain_threads", K_U32, CF(engine.drain_threads), 1, TALLY_DRAIN_THREADS_MAX },
	{ NULL, 0, 0, 0, 0 },
};

static const struct key http_keys[] = {
	{ "listen", K_LISTEN, CF(http_listen), 0, 0 },
	{ "enabled", K_BOOL, CF(http_enabled), 0, 0 },
	{ "latency_histogram", K_BOOL, CF(http.histogram), 0, 0 },
	{ "histogram_buckets_ms", K_STR, CF(http_buckets), 0, 0 },
	{ "tls_cert_file", K_STR, CF(http_tls_cert), 0, 0 },
	{ "tls_key_file", K_STR, CF(http_tls_key), 0, 0 },
	{ "basic_auth_users", K_STR, CF(http_users), 0, 0 },
	{ "basic_auth_file", K_STR, CF(http_users_file), 0, 0 },
	{ NULL, 0, 0, 0, 0 },
};

static const struct key nats_keys[] = {
	{ "url", K_STR, CF(nats_url), 0, 0 },
	{ "creds", K_STR, CF(creds), 0, 0 },
	{ "user", K_STR, CF(user), 0, 0 },
	{ "password", K_STR, CF(password), 0, 0 },
	{ "token", K_STR, CF(token), 0, 0 },
	{ "tls_ca", K_STR, CF(tls_ca), 0, 0 },
	{ "js_domain", K_STR, CF(js_domain), 0, 0 },
	{ "js_prefix", K_STR, CF(js_prefix), 0, 0 },
	{ "poll_interval_ms", K_U32, CF(nats.poll_interval_ms), 1, 3600000 },
	{ "request_timeout_ms", K_U32, CF(nats.request_timeout_ms), 1, 600000 },
	{ "breaker_threshold", K_U32, CF(nats.breaker_threshold), 1, 1000000 },
	{ "breaker_cooldown_ms", K_U32, CF(nats.breaker_cooldown_ms), 1, 3600000 },
	{ "reconnect_wait_ms", K_U32, CF(nats.reconnect_wait_ms), 1, 3600000 },
	{ "reconnect_jitter_ms", K_U32, CF(nats.reconnect_jitter_ms), 1, 3600000 },
	{ "gone_grace_ms", K_U32, CF(nats.gone_grace_ms), 1, 86400000 },
	{ "include_ack_pending", K_BOOL, CF(include_ack_pending), 0, 0 },
	{ NULL, 0, 0, 0, 0 },
};

static const struct key share_keys[] = {
	{ "host", K_STR, CF(share_host), 0, 0 },
	{ "bucket", K_STR, CF(share_bucket), 0, 0 },
	{ "url", K_STR, CF(share_url), 0, 0 },
	{ "interval_ms", K_U32, CF(share.interval_ms), 1, 60000 },
	{ "refresh_ms", K_U32, CF(share.refresh_ms), 1, 3600000 },
	{ "max_age_ms", K_U32, CF(share.max_age_ms), 1, 86400000 },
	{ "stale_after_ms", K_U32, CF(share.stale_after_ms), 1, 86400000 },
	{ "replicas", K_U32, CF(share.replicas), 1, 5 },
	{ "request_timeout_ms", K_U32, CF(share.request_timeout_ms), 1, 600000 },
	{ "retry_ms", K_U32, CF(share.retry_ms), 1, 3600000 },
	{ "max_inflight", K_U32, CF(share.max_inflight), 1, 65536 },
	{ "create_bucket", K_BOOL, CF(share_create), 0, 0 },
	{ "remote_capacity", K_U32, CF(seg.remote_capacity), 1, 65536 },
	{ "combine", K_STR, CF(share_combine), 0, 0 },
	{ "local", K_STR, CF(share_local), 0, 0 },
	{ "max", K_STR, CF(share_max), 0, 0 },
	{ NULL, 0, 0, 0, 0 },
};

static const struct key watch_keys[] = {
	{ "map_subject", K_SUBJECT, offsetof(struct tallyd_watch, map_subject), 0, 0 },
	{ NULL, 0, 0, 0, 0 },
};

static const struct key thresh_keys[] = {
	{ "p95_warn_ms", K_MS_NS, TR(p95_warn_ns), 0, 0 },
	{ "p95_overload_ms", K_MS_NS, TR(p95_overload_ns), 0, 0 },
	{ "pending_warn", K_U64, TR(pending_warn), 0, UINT64_MAX },
	{ "pending_overload", K_U64, TR(pending_overload), 0, UINT64_MAX },
	{ "min_samples", K_U64, TR(min_samples), 0, UINT64_MAX },
	{ "stale_after_ms", K_U32, TR(stale_after_ms), 0, U32MAX },
	{ "stale_policy", K_POLICY, TR(stale_policy), 0, 0 },
	{ "clear_ratio", K_RATIO, TR(clear_ratio), 0, 0 },
	{ "min_dwell_ms", K_U32, TR(min_dwell_ms), 0, U32MAX },
	{ "retry_after_ms", K_U32, TR(retry_after_ms), 0, U32MAX },
	{ "retry_after_max_ms", K_U32, TR(retry_after_max_ms), 0, 86400000 },
	{ "stall_after_ms", K_U32, TR(stall_after_ms), 0, U32MAX },
	{ "wait_p95_warn_ms", K_MS_NS, TR(wait_p95_warn_ns), 0, 0 },
	{ "wait_p95_overload_ms", K_MS_NS, TR(wait_p95_overload_ns), 0, 0 },
	{ "codel_target_ms", K_MS_NS, TR(codel_target_ns), 0, 0 },
	{ "codel_interval_ms", K_U32, TR(codel_interval_ms), 1, 60000 },
	{ NULL, 0, 0, 0, 0 },
};

static const struct {
	const char *name;
	const struct key *keys;
} sects[S__COUNT] = {
	[S_SEGMENT] = { "segment", segment_keys }, [S_ENGINE] = { "engine", engine_keys },
	[S_HTTP] = { "http", http_keys },          [S_NATS] = { "nats", nats_keys },
	[S_WATCH] = { "watch", watch_keys },       [S_THRESH] = { "thresholds", thresh_keys },
	[S_SHARE] = { "share", share_keys },
};

#define VALID_SECTIONS                                                                  \
	"[segment], [engine], [http], [nats], [watch STREAM], [watch STREAM/CONSUMER], " \
	"[thresholds], [thresholds PATTERN], [share]"

/* ---- parse state ---- */

/* One section instance: a singleton, a watch or a rule (by index: the arrays move). */
struct inst {
	enum sect kind;
	size_t idx;
	int line;
	int keyline[MAX_KEYS];
};

struct parser {
	const char *file;
	FILE *f;
	struct tallyd_config *cfg;
	char *line;
	size_t linecap;
	int lineno;
	struct inst *insts;
	size_t ninsts;
	struct inst *cur;     /* NULL: before any section, or after a bad header */
	bool bad_header;
	char *err;
	size_t errlen, errused;
	int nerrors;
};

__attribute__((format(printf, 3, 4))) static void perr(struct parser *p, int line,
							 const char *fmt, ...)
{
	char msg[768];
	va_list ap;
	int n;

	if (++p->nerrors > MAX_ERRORS)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (p->nerrors == MAX_ERRORS)
		snprintf(msg, sizeof(msg), "(stopping at %d errors)", MAX_ERRORS);
	if (line < 0)
		n = snprintf(p->err + p->errused, p->errlen - p->errused, "%s\n", msg);
	else if (line > 0)
		n = snprintf(p->err + p->errused, p->errlen - p->errused, "%s:%d: %s\n", p->file,
			     line, msg);
	else
		n = snprintf(p->err + p->errused, p->errlen - p->errused, "%s: %s\n", p->file, msg);
	if (n > 0)
		p->errused += (size_t)n < p->errlen - p->errused ? (size_t)n : p->errlen - p->errused - 1;
}

static void *inst_base(struct parser *p, const struct inst *in)
{
	switch (in->kind) {
	case S_WATCH:
		return &p->cfg->watches[in->idx];
	case S_THRESH:
		return &p->cfg->rules[in->idx].rule;
	default:
		return p->cfg;
	}
}

static struct inst *inst_find(struct parser *p, enum sect kind, size_t idx)
{
	for (size_t i = 0; i < p->ninsts; i++)
		if (p->insts[i].kind == kind && p->insts[i].idx == idx)
			return &p->insts[i];
	return NULL;
}

static struct inst *inst_add(struct parser *p, enum sect kind, size_t idx, int line)
{
	struct inst *in = inst_find(p, kind, idx);

	if (in)
		return in;
	in = realloc(p->insts, (p->ninsts + 1) * sizeof(*in));
	if (!in)
		return NULL;
	p->insts = in;
	in = &p->insts[p->ninsts++];
	memset(in, 0, sizeof(*in));
	in->kind = kind;
	in->idx = idx;
	in->line = line;
	return in;
}

/* ---- values ---- */

static bool parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;

	if (!*s)
		return false;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || v > (UINT64_MAX - (uint64_t)(*s - '0')) / 10)
			return false;
		v = v * 10 + (uint64_t)(*s - '0');
	}
	*out = v;
	return true;
}

/* "250" or "0.25" milliseconds (at most 6 decimals) into ns. */
static bool parse_ms_ns(const char *s, uint64_t *out)
{
	char whole[32];
	const char *dot = strchr(s, '.');
	size_t wl = dot ? (size_t)(dot - s) : strlen(s);
	uint64_t w, frac = 0, scale = 1000000;

	if (wl == 0 || wl >= sizeof(whole))
		return false;
	memcpy(whole, s, wl);
	whole[wl] = '\0';
	if (!parse_u64(whole, &w) || w > UINT64_MAX / 1000000 - 1)
		return false;
	if (dot) {
		const char *d = dot + 1;

		if (!*d || strlen(d) > 6)
			return false;
		for (; *d; d++) {
			if (*d < '0' || *d > '9')
				return false;
			scale /= 10;
			frac += (uint64_t)(*d - '0') * scale;
		}
	}
	*out = w * 1000000 + frac;
	return true;
}

static int parse_bool(const char *s)
{
	static const char *const t[] = { "true", "yes", "on", "1" };
	static const char *const f[] = { "false", "no", "off", "0" };

	for (size_t i = 0; i < 4; i++) {
		if (strcmp(s, t[i]) == 0)
			return 1;
		if (strcmp(s, f[i]) == 0)
			return 0;
	}
	return -1;
}

static bool has_unit(const char *s)
{
	size_t n = strlen(s);

	return n > 0 && s[0] >= '0' && s[0] <= '9' &&
	       ((s[n - 1] >= 'a' && s[n - 1] <= 'z') || (s[n - 1] >= 'A' && s[n - 1] <= 'Z'));
}

static int set_str(char **dst, const char *v)
{
	char *d = *v ? strdup(v) : NULL;

	if (*v && !d)
		return -ENOMEM;
	free(*dst);
	*dst = d;
	return 0;
}

/* Checks and stores one value of a string kind. */
static void set_string(struct parser *p, const struct key *k, char **dst, const char *v)
{
	char why[256];
	struct sockaddr_storage ss;
	socklen_t sl;

	if (k->kind == K_SEGNAME && tally_segment_name_validate(v) != 0) {
		perr(p, p->lineno, "name = \"%s\": %s", v, tally_errmsg());
		return;
	}
	if (k->kind == K_LISTEN && tallyd_parse_listen(v, &ss, &sl, why, sizeof(why)) != 0) {
		perr(p, p->lineno, "listen: %s", why);
		return;
	}
	if (k->kind == K_SUBJECT && tally_subject_validate(v, true) != 0) {
		perr(p, p->lineno, "%s = \"%s\": %s", k->name, v, tally_errmsg());
		return;
	}
	if ((k->kind == K_SEGNAME || k->kind == K_LISTEN || k->kind == K_SUBJECT) && !*v) {
		perr(p, p->lineno, "%s: empty value", k->name);
		return;
	}
	if (set_str(dst, v))
		perr(p, p->lineno, "out of memory");
}

static void bad_number(struct parser *p, const struct key *k, const char *v)
{
	const char *unit = strstr(k->name, "_ms") ? "milliseconds" :
			   strstr(k->name, "_us") ? "microseconds" : NULL;

	if (has_unit(v) && unit)
		perr(p, p->lineno, "%s = \"%s\": give a number of %s without a unit (the key's "
			"name says the unit)", k->name, v, unit);
	else if (k->kind == K_MS_NS)
		perr(p, p->lineno, "%s = \"%s\": expected milliseconds, e.g. 250 or 0.5 (at most 6 "
			"decimals)", k->name, v);
	else if (k->kind == K_POW2)
		perr(p, p->lineno, "%s = \"%s\": expected a power of two from %" PRIu64 " to %" PRIu64,
		     k->name, v, k->min, k->max);
	else if (k->max == UINT64_MAX)
		perr(p, p->lineno, "%s = \"%s\": expected a whole number >= %" PRIu64, k->name, v,
		     k->min);
	else
		perr(p, p->lineno, "%s = \"%s\": expected a whole number from %" PRIu64 " to %" PRIu64,
		     k->name, v, k->min, k->max);
}

static void set_number(struct parser *p, const struct key *k, void *dst, const char *v)
{
	uint64_t x;
	uint32_t x32;

	if (k->kind == K_MS_NS) {
		if (!parse_ms_ns(v, &x) || x < k->min)
			return bad_number(p, k, v);
		memcpy(dst, &x, sizeof(x));
		return;
	}
	if (!parse_u64(v, &x) || x < k->min || x > k->max)
		return bad_number(p, k, v);
	if (k->kind == K_U64) {
		memcpy(dst, &x, sizeof(x));
		return;
	}
	if (k->kind == K_POW2 && (x & (x - 1)) != 0) {
		perr(p, p->lineno, "%s = %s: must be a power of two (e.g. %" PRIu64 ")", k->name, v,
		     x > 2 ? (uint64_t)1 << (63 - __builtin_clzll(x)) : 2);
		return;
	}
	x32 = (uint32_t)x;
	memcpy(dst, &x32, sizeof(x32));
}

static void set_value(struct parser *p, const struct key *k, void *base, const char *v)
{
	void *dst = (char *)base + k->off;
	int b;

	switch (k->kind) {
	case K_STR:
	case K_SEGNAME:
	case K_LISTEN:
	case K_SUBJECT:
		return set_string(p, k, dst, v);
	case K_BOOL:
	case K_BOOLINT:
		if ((b = parse_bool(v)) < 0) {
			perr(p, p->lineno, "%s = \"%s\": expected true or false (yes/no, on/off, 1/0)",
			     k->name, v);
			return;
		}
		if (k->kind == K_BOOL)
			*(bool *)dst = b;
		else
			*(int *)dst = b;
		return;
	case K_RATIO: {
		char *end;
		double d = strtod(v, &end);

		if (!*v || *end || !(d > 0.0 && d <= 1.0)) {
			perr(p, p->lineno, "%s = \"%s\": expected a number in (0, 1], e.g. 0.8",
			     k->name, v);
			return;
		}
		*(double *)dst = d;
		return;
	}
	case K_POLICY:
		if (strcmp(v, "fail-open") == 0)
			*(enum tally_stale_policy *)dst = TALLY_STALE_FAIL_OPEN;
		else if (strcmp(v, "fail-closed") == 0)
			*(enum tally_stale_policy *)dst = TALLY_STALE_FAIL_CLOSED;
		else
			perr(p, p->lineno, "%s = \"%s\": expected fail-open or fail-closed", k->name, v);
		return;
	default:
		return set_number(p, k, dst, v);
	}
}

static void unknown_key(struct parser *p, enum sect kind, const char *name)
{
	char valid[512] = "";
	size_t used = 0;

	for (const struct key *k = sects[kind].keys; k->name; k++) {
		int n = snprintf(valid + used, sizeof(valid) - used, "%s%s", used ? ", " : "",
				 k->name);

		if (n < 0 || (size_t)n >= sizeof(valid) - used)
			break;
		used += (size_t)n;
	}
	perr(p, p->lineno, "unknown key \"%s\" in [%s]; valid keys: %s", name, sects[kind].name,
	     valid);
}

/* inih's handler: always returns 1 (errors are ours, with their lines). */
static int on_key(void *user, const char *section, const char *name, const char *value)
{
	struct parser *p = user;
	const struct key *k;

	(void)section;
	if (!p->cur) {
		if (!p->bad_header)
			perr(p, p->lineno, "key \"%s\" outside a section; sections: " VALID_SECTIONS,
			     name);
		return 1;
	}
	for (k = sects[p->cur->kind].keys; k->name && strcmp(k->name, name) != 0; k++)
		;
	if (!k->name) {
		unknown_key(p, p->cur->kind, name);
		return 1;
	}
	if (p->cur->keyline[k - sects[p->cur->kind].keys]) {
		perr(p, p->lineno, "key \"%s\" given twice in this section (first at line %d)", name,
		     p->cur->keyline[k - sects[p->cur->kind].keys]);
		return 1;
	}
	p->cur->keyline[k - sects[p->cur->kind].keys] = p->lineno;
	set_value(p, k, inst_base(p, p->cur), value);
	return 1;
}

/* ---- section headers ---- */

/* A JetStream stream or consumer name: 1..127 printable bytes, none of " .*>/\". */
static bool js_name_ok(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > 127)
		return false;
	for (; *s; s++)
		if ((unsigned char)*s <= ' ' || *s == 0x7f || strchr(".*>/\\", *s))
			return false;
	return true;
}

static int open_watch(struct parser *p, const char *arg)
{
	struct tallyd_config *c = p->cfg;
	const char *slash = strchr(arg, '/');
	char stream[256];
	const char *consumer = slash ? slash + 1 : NULL;
	size_t sl = slash ? (size_t)(slash - arg) : strlen(arg);
	size_t i;

	if (sl >= sizeof(stream) || (memcpy(stream, arg, sl), stream[sl] = '\0', !js_name_ok(stream)) ||
	    (consumer && !js_name_ok(consumer))) {
		perr(p, p->lineno, "[watch %s]: expected [watch STREAM] or [watch STREAM/CONSUMER]; "
			"names are 1-127 bytes without spaces, '.', '*', '>', '/' or '\\'", arg);
		return -1;
	}
	for (i = 0; i < c->nwatches; i++)
		if (strcmp(c->watches[i].stream, stream) == 0 &&
		    strcmp(c->watches[i].consumer ? c->watches[i].consumer : "",
			   consumer ? consumer : "") == 0)
			break;
	if (i < c->nwatches) {
		perr(p, p->lineno, "[watch %s] again: it was opened at line %d; give each watch one "
			"section", arg, c->watches[i].line);
		return -1;
	}
	{
		struct tallyd_watch *w = realloc(c->watches, (i + 1) * sizeof(*w));

		if (!w)
			return -ENOMEM;
		c->watches = w;
		memset(&w[i], 0, sizeof(w[i]));
		w[i].line = p->lineno;
		w[i].stream = strdup(stream);
		w[i].consumer = consumer ? strdup(consumer) : NULL;
		c->nwatches++;
		if (!w[i].stream || (consumer && !w[i].consumer))
			return -ENOMEM;
	}
	p->cur = inst_add(p, S_WATCH, i, p->lineno);
	return p->cur ? 0 : -ENOMEM;
}

static int open_rule(struct parser *p, const char *arg)
{
	struct tallyd_config *c = p->cfg;
	size_t i = 0;

	if (*arg) {
		if (tally_subject_validate(arg, true) != 0) {
			perr(p, p->lineno, "[thresholds %s]: %s", arg, tally_errmsg());
			return -1;
		}
		for (i = 1; i < c->nrules && strcmp(c->rules[i].pattern, arg) != 0; i++)
			;
		if (i < c->nrules) {
			perr(p, p->lineno, "[thresholds %s] again: it was opened at line %d; give each "
				"pattern one section", arg, c->rules[i].line);
			return -1;
		}
		{
			struct tallyd_rule *r = realloc(c->rules, (i + 1) * sizeof(*r));

			if (!r)
				return -ENOMEM;
			c->rules = r;
			memset(&r[i], 0, sizeof(r[i]));
			tally_threshold_rule_init(&r[i].rule);
			r[i].line = p->lineno;
			c->nrules++;
			if (!(r[i].pattern = strdup(arg)))
				return -ENOMEM;
		}
	} else if (c->rules[0].line) {
		perr(p, p->lineno, "[thresholds] again: it was opened at line %d; give the default "
			"rule one section", c->rules[0].line);
		return -1;
	} else {
		c->rules[0].line = p->lineno;
	}
	p->cur = inst_add(p, S_THRESH, i, p->lineno);
	return p->cur ? 0 : -ENOMEM;
}

/* "[kind arg]" (line without leading blanks). Sets p->cur, or NULL on error. */
static void open_section(struct parser *p, char *line)
{
	char *end = strchr(line, ']');
	char *arg, *tail;
	int k;

	p->cur = NULL;
	p->bad_header = true;
	if (!end) {
		perr(p, p->lineno, "section header without ']'");
		return;
	}
	for (tail = end + 1; *tail == ' ' || *tail == '\t' || *tail == '\r' || *tail == '\n'; tail++)
		;
	if (*tail && *tail != ';' && *tail != '#') {
		perr(p, p->lineno, "unexpected text after ']': \"%s\"", tail);
		return;
	}
	*end = '\0';
	for (arg = line + 1; *arg && *arg != ' ' && *arg != '\t'; arg++)
		;
	if (*arg)
		*arg++ = '\0';
	while (*arg == ' ' || *arg == '\t')
		arg++;
	for (size_t n = strlen(arg); n > 0 && (arg[n - 1] == ' ' || arg[n - 1] == '\t');)
		arg[--n] = '\0';
	size_t alen = strlen(arg);
	bool opens = alen > 0 && arg[0] == '"', closes = alen > 1 && arg[alen - 1] == '"';
	if (opens != closes || (alen == 1 && opens)) {
		perr(p, p->lineno, "[%s %s]: unbalanced quote: write [%s \"NAME\"] or [%s NAME]",
		     line + 1, arg, line + 1, line + 1);
		return;
	}
	if (opens) {
		arg[alen - 1] = '\0';
		arg++;
	}
	for (k = 0; k < S__COUNT && strcmp(sects[k].name, line + 1) != 0; k++)
		;
	if (k == S__COUNT) {
		perr(p, p->lineno, "unknown section [%s%s%s]; valid sections: " VALID_SECTIONS,
		     line + 1, *arg ? " " : "", arg);
		return;
	}
	if (k == S_WATCH && !*arg) {
		perr(p, p->lineno, "[watch] needs a stream: [watch STREAM] or [watch STREAM/CONSUMER]");
		return;
	}
	if (k != S_WATCH && k != S_THRESH && *arg) {
		perr(p, p->lineno, "[%s] takes no argument (got \"%s\")", sects[k].name, arg);
		return;
	}
	if (k != S_WATCH && k != S_THRESH && inst_find(p, (enum sect)k, 0)) {
		perr(p, p->lineno, "[%s] again: it was opened at line %d; give each section once",
		     sects[k].name, inst_find(p, (enum sect)k, 0)->line);
		return;
	}
	if ((k == S_WATCH ? open_watch(p, arg) : k == S_THRESH ? open_rule(p, arg) :
			    ((p->cur = inst_add(p, (enum sect)k, 0, p->lineno)) ? 0 : -ENOMEM)) == 0)
		p->bad_header = false;
	else if (!p->cur && p->nerrors == 0)
		perr(p, p->lineno, "out of memory");
}

/*
 * inih's reader: one line per call, counted. Section headers, lines that
 * are too long and lines without '=' are handled here; inih gets a blank
 * line for those.
 */
static char *reader(char *buf, int num, void *stream)
{
	struct parser *p = stream;
	ssize_t n = getline(&p->line, &p->linecap, p->f);
	const char *out;
	char *s;

	if (n < 0)
		return NULL;
	p->lineno++;
	s = p->line;
	/* a UTF-8 byte order mark, as some editors write one, on line 1 */
	if (p->lineno == 1 && n >= 3 && memcmp(s, "\xef\xbb\xbf", 3) == 0)
		s += 3;
	for (; *s == ' ' || *s == '\t'; s++)
		;
	n -= s - p->line;
	out = s;
	if (n > num - 1) {
		perr(p, p->lineno, "line longer than %d bytes", num - 2);
		out = "\n";
	} else if (*s == '[') {
		open_section(p, s);
		out = "\n";
	} else if (*s && *s != '\n' && *s != '\r' && *s != ';' && *s != '#' &&
		   !strpbrk(s, "=:")) {
		perr(p, p->lineno, "expected KEY = VALUE, a [section] or a comment");
		out = "\n";
	}
	snprintf(buf, (size_t)num, "%s", out);
	return buf;
}

/* ---- after the file ---- */

static void defaults(struct tallyd_config *c)
{
	memset(c, 0, sizeof(*c));
	tally_segment_config_init(&c->seg);
	tally_engine_config_init(&c->engine);
	c->http_enabled = true;
	tallyd_http_opts_init(&c->http);
	c->include_ack_pending = true;
	c->share_create = true;
	tally_share_config_init(&c->share);
	c->rules = calloc(1, sizeof(*c->rules));
	if (c->rules) {
		tally_threshold_rule_init(&c->rules[0].rule);
		c->nrules = 1;
	}
}

/* A pattern's keys not given take the default rule's values. */
static void inherit_rules(struct parser *p)
{
	struct tallyd_config *c = p->cfg;

	for (size_t i = 1; i < c->nrules; i++) {
		struct inst *in = inst_find(p, S_THRESH, i);

		for (size_t k = 0; thresh_keys[k].name; k++) {
			size_t sz = thresh_keys[k].kind == K_RATIO ? sizeof(double) :
				    thresh_keys[k].kind == K_U64 || thresh_keys[k].kind == K_MS_NS ?
				    sizeof(uint64_t) : sizeof(uint32_t);

			if (in && in->keyline[k]) {
				c->rules[i].set |= 1u << k;
				continue;
			}
			memcpy((char *)&c->rules[i].rule + thresh_keys[k].off,
			       (char *)&c->rules[0].rule + thresh_keys[k].off, sz);
		}
	}
}

static int keyline(struct parser *p, enum sect kind, const char *key)
{
	struct inst *in = inst_find(p, kind, 0);

	if (!in)
		return 0;
	for (size_t k = 0; sects[kind].keys[k].name; k++)
		if (strcmp(sects[kind].keys[k].name, key) == 0)
			return in->keyline[k] ? in->keyline[k] : in->line;
	return in->line;
}

static int apply_overrides(struct parser *p, const struct tallyd_overrides *ov)
{
	struct tallyd_config *c = p->cfg;
	char why[256];
	struct sockaddr_storage ss;
	socklen_t sl;

	if (ov && ov->segment) {
		if (tally_segment_name_validate(ov->segment) != 0) {
			perr(p, -1, "segment name \"%s\" (-s or TALLY_SEGMENT): %s", ov->segment,
			     tally_errmsg());
			return -EINVAL;
		}
		if (set_str(&c->segment_name, ov->segment))
			return -ENOMEM;
	}
	if (!c->segment_name && !(c->segment_name = strdup("tally")))
		return -ENOMEM;
	if (ov && ov->http) {
		if (tallyd_parse_listen(ov->http, &ss, &sl, why, sizeof(why)) != 0) {
			perr(p, -1, "--http: %s", why);
			return -EINVAL;
		}
		if (set_str(&c->http_listen, ov->http))
			return -ENOMEM;
		c->http_enabled = true;
	}
	if (ov && ov->no_http)
		c->http_enabled = false;
	if (!c->http_listen && !(c->http_listen = strdup(TALLYD_HTTP_DEFAULT_LISTEN)))
		return -ENOMEM;
	if (ov && ov->nats_url && set_str(&c->nats_url, ov->nats_url))
		return -ENOMEM;
	return 0;
}

static void check_segment_engine(struct parser *p)
{
	struct tallyd_config *c = p->cfg;

	c->seg.group = c->group;
	if (tally_segment_size(&c->seg) == 0)
		perr(p, keyline(p, S_SEGMENT, ""), "[segment]: %s", tally_errmsg());
	/* found now, not at the segment's creation: --check-config says so */
	if (c->group && *c->group && !getgrnam(c->group))
		perr(p, keyline(p, S_SEGMENT, "group"), "[segment]: group = \"%s\": no such group (getent group "
		     "lists them)", c->group);
	if (c->group && *c->group && !c->seg.group_readable && !c->seg.group_writable)
		perr(p, keyline(p, S_SEGMENT, "group"), "[segment]: group = \"%s\" has no effect without "
		     "group_readable = true (readers of the group) or group_writable = true (producers too)",
		     c->group);
	if (c->engine.slice_ns < 1000000)
		perr(p, keyline(p, S_ENGINE, "slice_ms"), "[engine]: slice_ms = %g: at least 1 ms",
		     (double)c->engine.slice_ns / 1e6);
	else if (c->engine.window_ns < c->engine.slice_ns || c->engine.window_ns % c->engine.slice_ns)
		perr(p, keyline(p, S_ENGINE, "window_ms"),
		     "[engine]: window_ms (%g) must be a whole multiple of slice_ms (%g)",
		     (double)c->engine.window_ns / 1e6, (double)c->engine.slice_ns / 1e6);
	else if (c->engine.window_ns / c->engine.slice_ns > TALLYD_MAX_SLICES)
		perr(p, keyline(p, S_ENGINE, "window_ms"),
		     "[engine]: window_ms / slice_ms = %" PRIu64 " slices, at most %u: raise slice_ms "
		     "to at least %g or shorten window_ms", c->engine.window_ns / c->engine.slice_ns,
		     TALLYD_MAX_SLICES,
		     (double)((c->engine.window_ns + TALLYD_MAX_SLICES - 1) / TALLYD_MAX_SLICES) / 1e6);
	c->engine.pending_include_ack = c->include_ack_pending;
}

/* histogram_buckets_ms: ascending bounds in ms, commas or blanks between. */
static void build_buckets(struct parser *p)
{
	struct tallyd_config *c = p->cfg;
	int line = keyline(p, S_HTTP, "histogram_buckets_ms");
	char *copy, *save = NULL;
	uint64_t ns;
	bool bad = false;

	if (!c->http_buckets)
		return;
	if (!c->http.histogram) {
		perr(p, line, "[http]: histogram_buckets_ms with latency_histogram = false: there is no "
		     "histogram to give buckets to; remove one of the two");
		return;
	}
	if (!(copy = strdup(c->http_buckets))) {
		perr(p, line, "out of memory");
		return;
	}
	for (char *t = strtok_r(copy, ", \t", &save); t; t = strtok_r(NULL, ", \t", &save)) {
		if (!parse_ms_ns(t, &ns) || ns == 0) {
			perr(p, line, "[http]: histogram_buckets_ms: \"%s\" is not a bound in milliseconds "
			     "above 0 (e.g. 0.5, 10, 250)", t);
			bad = true;
			break;
		}
		if (c->http.nbuckets == TALLYD_HTTP_MAX_BUCKETS) {
			perr(p, line, "[http]: histogram_buckets_ms: more than %d bounds",
			     TALLYD_HTTP_MAX_BUCKETS);
			bad = true;
			break;
		}
		if (c->http.nbuckets && ns <= c->http.bucket_ns[c->http.nbuckets - 1]) {
			perr(p, line, "[http]: histogram_buckets_ms: \"%s\" is not above the bound before "
			     "it: give the bounds in ascending order", t);
			bad = true;
			break;
		}
		c->http.bucket_ns[c->http.nbuckets++] = ns;
	}
	if (!bad && c->http.nbuckets == 0)
		perr(p, line, "[http]: histogram_buckets_ms: no bound given (leave it out for the "
		     "default, two bounds per octave)");
	free(copy);
}

/* A file a key names, readable now (tls_cert_file, tls_key_file). */
static void check_file(struct parser *p, const char *key, const char *path)
{
	FILE *f = fopen(path, "r");
	struct stat st;

	if (!f) {
		perr(p, keyline(p, S_HTTP, key), "[http]: %s %s: %s", key, path, strerror(errno));
		return;
	}
	if (fstat(fileno(f), &st) == 0 && !S_ISREG(st.st_mode))
		perr(p, keyline(p, S_HTTP, key), "[http]: %s %s: not a regular file", key, path);
	fclose(f);
}

/* One NAME:HASH entry into the users; why names where it came from. */
static void add_user(struct parser *p, const char *entry, const char *where)
{
	struct tallyd_config *c = p->cfg;
	int line = keyline(p, S_HTTP, strncmp(where, "basic_auth_users", 16) == 0 ?
				      "basic_auth_users" : "basic_auth_file");
	char why[256];

	if (c->http.nusers == TALLYD_HTTP_MAX_USERS) {
		perr(p, line, "[http]: %s: more than %d users", where, TALLYD_HTTP_MAX_USERS);
		return;
	}
	if (tallyd_http_user_parse(entry, &c->http.users[c->http.nusers], why, sizeof(why)) != 0) {
		perr(p, line, "[http]: %s: %s", where, why);
		return;
	}
	for (uint32_t i = 0; i < c->http.nusers; i++)
		if (strcmp(c->http.users[i].name, c->http.users[c->http.nusers].name) == 0) {
			perr(p, line, "[http]: %s: user %s given twice", where, c->http.users[i].name);
			return;
		}
	c->http.nusers++;
}

/* basic_auth_file: htpasswd lines NAME:HASH; blank lines and # comments skipped. */
static void read_users_file(struct parser *p, const char *path)
{
	char *line = NULL, where[300];
	size_t cap = 0;
	ssize_t n;
	int no = 0;
	FILE *f = fopen(path, "r");

	if (!f) {
		perr(p, keyline(p, S_HTTP, "basic_auth_file"), "[http]: basic_auth_file %s: %s", path,
		     strerror(errno));
		return;
	}
	while ((n = getline(&line, &cap, f)) >= 0) {
		char *t = line + strspn(line, " \t");

		no++;
		t[strcspn(t, "\r\n")] = '\0';
		for (size_t l = strlen(t); l > 0 && (t[l - 1] == ' ' || t[l - 1] == '\t');)
			t[--l] = '\0';
		if (!*t || *t == '#')
			continue;
		snprintf(where, sizeof(where), "basic_auth_file %.200s:%d", path, no);
		add_user(p, t, where);
	}
	if (line)
		explicit_bzero(line, cap);
	free(line);
	fclose(f);
}

/* [http]: buckets, TLS files, basic-auth users. */
static void build_http(struct parser *p)
{
	struct tallyd_config *c = p->cfg;
	char *copy, *save = NULL;

	c->http.listen = c->http_listen;
	build_buckets(p);
	c->http.tls_cert_file = c->http_tls_cert;
	c->http.tls_key_file = c->http_tls_key;
	if (!c->http_tls_cert != !c->http_tls_key)
		perr(p, keyline(p, S_HTTP, c->http_tls_cert ? "tls_cert_file" : "tls_key_file"),
		     "[http]: TLS needs both tls_cert_file and tls_key_file");
	else if (c->http_tls_cert && !tallyd_http_tls_supported())
		perr(p, keyline(p, S_HTTP, "tls_cert_file"), "[http]: this libmicrohttpd was built "
		     "without TLS (Debian's libmicrohttpd12 has it, through GnuTLS)");
	if (c->http_tls_cert)
		check_file(p, "tls_cert_file", c->http_tls_cert);
	if (c->http_tls_key) /* one without the other: said above, and each file looked at */
		check_file(p, "tls_key_file", c->http_tls_key);
	if (c->http_users) {
		if (!(copy = strdup(c->http_users))) {
			perr(p, keyline(p, S_HTTP, "basic_auth_users"), "out of memory");
			return;
		}
		for (char *t = strtok_r(copy, ", \t", &save); t; t = strtok_r(NULL, ", \t", &save))
			add_user(p, t, "basic_auth_users");
		free(copy);
	}
	if (c->http_users_file)
		read_users_file(p, c->http_users_file);
}

static int build_nats(struct parser *p)
{
	struct tallyd_config *c = p->cfg;
	struct tally_poller_config *n = &c->nats;
	char why[256];

	if (!c->nats_url) {
		if (c->nwatches)
			perr(p, c->watches[0].line, "[watch %s] needs a NATS server: set url in [nats] "
				"or give --nats URL", c->watches[0].stream);
		return 0;
	}
	if (c->nwatches && !(c->pwatches = calloc(c->nwatches, sizeof(*c->pwatches))))
		return -ENOMEM;
	for (size_t i = 0; i < c->nwatches; i++) {
		c->pwatches[i].stream = c->watches[i].stream;
		c->pwatches[i].consumer = c->watches[i].consumer;
		c->pwatches[i].map_subject = c->watches[i].map_subject;
	}
	n->urls = c->nats_url;
	n->creds_file = c->creds;
	n->user = c->user;
	n->password = c->password;
	n->token = c->token;
	n->tls_ca_file = c->tls_ca;
	n->js_domain = c->js_domain;
	n->js_prefix = c->js_prefix;
	n->watches = c->pwatches;
	n->nwatches = c->nwatches;
	n->exclude_ack_pending = !c->include_ack_pending;
	if (tally_poller_config_check(n, why, sizeof(why)) != 0)
		perr(p, keyline(p, S_NATS, strncmp(why, "creds file", 10) == 0 ? "creds" :
				strncmp(why, "tls_ca file", 11) == 0 ? "tls_ca" : "url"),
		     "[nats]: %s", why);
	return 0;
}

/* Patterns of a `local` or `max` list (commas or blanks between) as combine rules. */
static int add_share_rules(struct parser *p, const char *key, const char *list,
			   enum tally_share_combine mode)
{
	struct tallyd_config *c = p->cfg;
	char *copy, *save = NULL;

	if (!list)
		return 0;
	if (!(copy = strdup(list)))
		return -ENOMEM;
	for (char *t = strtok_r(copy, ", \t", &save); t; t = strtok_r(NULL, ", \t", &save)) {
		struct tally_share_rule *r;

		if (tally_subject_validate(t, true) != 0) {
			perr(p, keyline(p, S_SHARE, key), "[share]: %s = \"%s\": %s", key, t, tally_errmsg());
			continue;
		}
		if (!(r = realloc(c->share_rules, (c->nshare_rules + 1) * sizeof(*r)))) {
			free(copy);
			return -ENOMEM;
		}
		c->share_rules = r;
		r[c->nshare_rules++] = (struct tally_share_rule){ .pattern = t, .combine = mode };
	}
	/* The patterns point into copy: kept until free (share_patterns). */
	if (mode == TALLY_SHARE_LOCAL)
		c->share_patterns[0] = copy;
	else
		c->share_patterns[1] = copy;
	return 0;
}

static int build_share(struct parser *p)
{
	struct tallyd_config *c = p->cfg;
	struct tally_share_config *s = &c->share;
	char why[320];
	int rc;

	if (!inst_find(p, S_SHARE, 0))
		return 0;
	c->share_enabled = true;
	if (!c->seg.remote_capacity)
		c->seg.remote_capacity = 4096;
	s->urls = c->share_url ? c->share_url : c->nats_url;
	s->creds_file = c->creds;
	s->user = c->user;
	s->password = c->password;
	s->token = c->token;
	s->tls_ca_file = c->tls_ca;
	s->js_domain = c->js_domain;
	s->bucket = c->share_bucket;
	s->host = c->share_host;
	s->no_create = !c->share_create;
	if (c->share_combine && strcmp(c->share_combine, "max") != 0 && strcmp(c->share_combine, "local") != 0)
		perr(p, keyline(p, S_SHARE, "combine"), "[share]: combine = \"%s\": expected max (the worst "
		     "host wins) or local (ignore other hosts)", c->share_combine);
	s->default_combine = c->share_combine && strcmp(c->share_combine, "local") == 0 ? TALLY_SHARE_LOCAL
											 : TALLY_SHARE_MAX;
	if ((rc = add_share_rules(p, "local", c->share_local, TALLY_SHARE_LOCAL)) ||
	    (rc = add_share_rules(p, "max", c->share_max, TALLY_SHARE_MAX)))
		return rc;
	s->rules = c->share_rules;
	s->nrules = c->nshare_rules;
	if (!s->urls) {
		perr(p, keyline(p, S_SHARE, "url"), "[share] needs a NATS server: set url in [share] or "
		     "in [nats] (or give --nats URL)");
		return 0;
	}
	if (!s->host) {
		perr(p, keyline(p, S_SHARE, "host"), "[share]: set host, this host's name in the bucket "
		     "(1..63 letters, digits, '_' or '-'; unique per host)");
		return 0;
	}
	if (tally_share_config_check(s, why, sizeof(why)) != 0)
		perr(p, keyline(p, S_SHARE, strstr(why, "host") == why ? "host" : strstr(why, "bucket") == why ?
				"bucket" : strstr(why, "max_age") == why ? "max_age_ms" : "stale_after_ms"),
		     "[share]: %s", why);
	return 0;
}

static void check_rules(struct parser *p)
{
	char why[512];
	struct tally_thresholds *t = tallyd_config_thresholds(p->cfg, why, sizeof(why));

	if (!t)
		perr(p, -1, "%s", why);
	tally_thresholds_free(&t);
}

struct tally_thresholds *tallyd_config_thresholds(const struct tallyd_config *cfg, char *err,
						  size_t errlen)
{
	struct tally_thresholds *t = tally_thresholds_new();

	if (!t) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	for (size_t i = 0; i < cfg->nrules; i++) {
		if (tally_thresholds_add(t, cfg->rules[i].pattern, &cfg->rules[i].rule) != 0) {
			snprintf(err, errlen, "%s:%d: [thresholds%s%s]: %s", cfg->path ? cfg->path : "-",
				 cfg->rules[i].line, cfg->rules[i].pattern ? " " : "",
				 cfg->rules[i].pattern ? cfg->rules[i].pattern : "", tally_errmsg());
			tally_thresholds_free(&t);
			return NULL;
		}
	}
	return t;
}

static int parse_file(struct parser *p, const char *path)
{
	int rc;

	struct stat st;

	if (!(p->f = fopen(path, "r"))) {
		rc = -errno;
		snprintf(p->err, p->errlen, "%s: cannot read: %s\n", path, strerror(errno));
		return rc;
	}
	if (fstat(fileno(p->f), &st) == 0 && S_ISDIR(st.st_mode)) {
		snprintf(p->err, p->errlen, "%s: is a directory: give the configuration file itself "
			 "(e.g. %s/tallyd.ini)\n", path, path);
		fclose(p->f);
		return -EISDIR;
	}
	rc = ini_parse_stream(reader, p, on_key, p);
	fclose(p->f);
	free(p->line);
	if (rc > 0 && p->nerrors == 0)
		perr(p, rc, "syntax error");
	else if (rc < 0)
		perr(p, 0, "cannot parse (%d)", rc);
	return 0;
}

int tallyd_config_load(const char *path, const struct tallyd_overrides *ov,
		       struct tallyd_config *cfg, char *err, size_t errlen)
{
	struct parser p = { .file = path ? path : "(command line)", .cfg = cfg, .err = err,
			    .errlen = errlen };
	int rc = 0;

	defaults(cfg);
	err[0] = '\0';
	if (!cfg->rules)
		return -ENOMEM;
	if (path) {
		if (!(cfg->path = strdup(path)))
			rc = -ENOMEM;
		else if ((rc = parse_file(&p, path)) != 0)
			goto out;
	}
	if (rc == 0)
		rc = apply_overrides(&p, ov);
	if (rc == 0 && p.nerrors == 0) {
		inherit_rules(&p);
		check_segment_engine(&p);
		build_http(&p);
		rc = build_nats(&p);
		if (rc == 0)
			rc = build_share(&p);
		check_rules(&p);
	}
out:
	free(p.insts);
	if (rc == -ENOMEM && !err[0])
		snprintf(err, errlen, "out of memory\n");
	if (rc == 0 && p.nerrors)
		rc = -EINVAL;
	if (rc)
		tallyd_config_free(cfg);
	return rc;
}

static bool str_differs(const char *a, const char *b)
{
	return strcmp(a ? a : "", b ? b : "") != 0;
}

bool tallyd_config_http_differs(const struct tallyd_config *a, const struct tallyd_config *b)
{
	return a->http_enabled != b->http_enabled || str_differs(a->http_listen, b->http_listen) ||
	       a->http.histogram != b->http.histogram || str_differs(a->http_buckets, b->http_buckets) ||
	       str_differs(a->http_tls_cert, b->http_tls_cert) ||
	       str_differs(a->http_tls_key, b->http_tls_key) || str_differs(a->http_users, b->http_users) ||
	       str_differs(a->http_users_file, b->http_users_file);
}

void tallyd_config_free(struct tallyd_config *c)
{
	char **strs[] = { &c->path,  &c->segment_name, &c->group,   &c->http_listen,
			  &c->http_buckets, &c->http_tls_cert, &c->http_tls_key, &c->http_users,
			  &c->http_users_file,
			  &c->nats_url, &c->creds,     &c->user,    &c->password,
			  &c->token,   &c->tls_ca,     &c->js_domain, &c->js_prefix,
			  &c->share_host, &c->share_bucket, &c->share_url, &c->share_combine,
			  &c->share_local, &c->share_max, &c->share_patterns[0], &c->share_patterns[1] };

	for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++) {
		free(*strs[i]);
		*strs[i] = NULL;
	}
	for (size_t i = 0; i < c->nwatches; i++) {
		free(c->watches[i].stream);
		free(c->watches[i].consumer);
		free(c->watches[i].map_subject);
	}
	for (size_t i = 0; i < c->nrules; i++)
		free(c->rules[i].pattern);
	free(c->watches);
	free(c->pwatches);
	free(c->share_rules);
	free(c->rules);
	memset(c, 0, sizeof(*c));
}
