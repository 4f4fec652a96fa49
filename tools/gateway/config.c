/* SPDX-License-Identifier: MIT */
/*
 * config.c: tally-gateway's INI file (every key in etc/gateway.ini) and
 * the command line that overrides it. The file is read with inih, as
 * tallyd's is (tools/tallyd_config.c), through a line reader of our own
 * that counts lines and parses section headers, so that every error names
 * FILE:LINE and the reason, and every error of the file is reported, not
 * only the first:
 *
 *   [gateway]  [shedding]  [check]  [proxy]    once each
 *   [route METHOD PATH]                        in order; the first match wins
 *
 * METHOD is a method, a comma-separated list (GET,HEAD) or '*'; PATH a
 * pattern of route.c. A route needs subject; priority and a header
 * condition (header = NAME or NAME: VALUE) are optional.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "gateway.h"

#define MAX_ERRORS 20
#define MAX_KEYS 16

enum kind { K_STR, K_SEGNAME, K_LISTEN, K_BOOL, K_U32, K_FRAC, K_FACTOR, K_MODE, K_SHED_STATUS,
	    K_PRIO, K_SUBJECT, K_URL, K_HNAME, K_HCOND, K_PREFIX, K_HEADERS };

struct key {
	const char *name;
	enum kind kind;
	size_t off;
	uint32_t min, max;
};

enum sect { S_GATEWAY, S_SHEDDING, S_CHECK, S_PROXY, S_ROUTE, S__COUNT };

#define CF(f) offsetof(struct gw_config, f)
#define RT(f) offsetof(struct gw_route, f)

static const struct key gateway_keys[] = {
	{ "mode", K_MODE, CF(mode), 0, 0 },
	{ "listen", K_LISTEN, CF(listen), 0, 0 },
	{ "segment", K_SEGNAME, CF(segment), 0, 0 },
	{ "fail_closed", K_BOOL, CF(fail_closed), 0, 0 },
	{ "admin_prefix", K_PREFIX, CF(admin_prefix), 0, 0 },
	{ "threads", K_U32, CF(threads), 0, 1024 },
	{ "connection_limit", K_U32, CF(connection_limit), 1, 1000000 },
	{ "idle_timeout_s", K_U32, CF(idle_timeout_s), 1, 86400 },
	{ "priority_header", K_HNAME, CF(priority_header), 0, 0 },
	{ "decision_headers", K_HEADERS, CF(minimal_headers), 0, 0 },
	{ NULL, 0, 0, 0, 0 },
};

static const struct key shedding_keys[] = {
	{ "engine_probability", K_BOOL, CF(shed.engine_probability), 0, 0 },
	{ "warn_shed_fraction", K_FRAC, CF(shed.warn_shed_fraction), 0, 0 },
	{ "overload_trickle", K_FRAC, CF(shed.overload_trickle), 0, 0 },
	{ "sheddable_factor", K_FACTOR, CF(shed.sheddable_factor), 0, 0 },
	{ "retry_after_ms", K_U32, CF(shed.retry_after_ms), 1, 86400000 },
	{ "retry_jitter", K_FRAC, CF(shed.retry_jitter), 0, 0 },
	{ NULL, 0, 0, 0, 0 },
};

static const struct key check_keys[] = {
	{ "shed_status", K_SHED_STATUS, CF(shed_status), 0, 0 },
	{ "path_prefix", K_PREFIX, CF(path_prefix), 0, 0 },
	{ "uri_header", K_HNAME, CF(uri_header), 0, 0 },
	{ "method_header", K_HNAME, CF(method_header), 0, 0 },
	{ NULL, 0, 0, 0, 0 },
};

static const struct key proxy_keys[] = {
	{ "upstream", K_URL, CF(upstream), 0, 0 },
	{ "connect_timeout_ms", K_U32, CF(connect_timeout_ms), 1, 600000 },
	{ "upstream_timeout_ms", K_U32, CF(upstream_timeout_ms), 1, 3600000 },
	{ "drain_timeout_ms", K_U32, CF(drain_timeout_ms), 0, 3600000 },
	{ NULL, 0, 0, 0, 0 },
};

static const struct key route_keys[] = {
	{ "subject", K_SUBJECT, RT(subject), 0, 0 },
	{ "priority", K_PRIO, RT(priority), 0, 0 },
	{ "header", K_HCOND, 0, 0, 0 },
	{ NULL, 0, 0, 0, 0 },
};

static const struct {
	const char *name;
	const struct key *keys;
} sects[S__COUNT] = {
	[S_GATEWAY] = { "gateway", gateway_keys }, [S_SHEDDING] = { "shedding", shedding_keys },
	[S_CHECK] = { "check", check_keys },       [S_PROXY] = { "proxy", proxy_keys },
	[S_ROUTE] = { "route", route_keys },
};

#define VALID_SECTIONS "[gateway], [shedding], [check], [proxy], [route METHOD PATH]"

struct inst {
	enum sect kind;
	size_t idx; /* the route's index */
	int line;
	int keyline[MAX_KEYS];
};

struct parser {
	const char *file;
	FILE *f;
	struct gw_config *cfg;
	char *line;
	size_t linecap;
	int lineno;
	struct inst *insts;
	size_t ninsts;
	struct inst *cur;
	bool bad_header;
	char *err;
	size_t errlen, errused;
	int nerrors;
};

__attribute__((format(printf, 3, 4))) static void perr(struct parser *p, int line, const char *fmt, ...)
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
	if (line > 0)
		n = snprintf(p->err + p->errused, p->errlen - p->errused, "%s:%d: %s\n", p->file, line, msg);
	else
		n = snprintf(p->err + p->errused, p->errlen - p->errused, "%s%s%s\n", line ? "" : p->file,
			     line ? "" : ": ", msg);
	if (n > 0)
		p->errused += (size_t)n < p->errlen - p->errused ? (size_t)n : p->errlen - p->errused - 1;
}

/* ---- values ---- */

static int set_str(char **dst, const char *v)
{
	char *d = strdup(v);

	if (!d)
		return -ENOMEM;
	free(*dst);
	*dst = d;
	return 0;
}

static bool hname_ok(const char *s)
{
	if (!*s)
		return false;
	for (; *s; s++) /* an RFC 9110 token */
		if (!isalnum((unsigned char)*s) && !strchr("!#$%&'*+-.^_`|~", *s))
			return false;
	return true;
}

static bool double_in(const char *v, double lo, double hi, double *out)
{
	char *end;
	double d = strtod(v, &end);

	if (!*v || *end || !(d >= lo && d <= hi))
		return false;
	*out = d;
	return true;
}

static void set_hcond(struct parser *p, struct gw_route *r, const char *v)
{
	const char *colon = strchr(v, ':');
	size_t nl = colon ? (size_t)(colon - v) : strlen(v);
	char name[128];

	while (nl > 0 && (v[nl - 1] == ' ' || v[nl - 1] == '\t'))
		nl--;
	if (nl == 0 || nl >= sizeof(name) || (memcpy(name, v, nl), name[nl] = '\0', !hname_ok(name))) {
		perr(p, p->lineno, "header = \"%s\": expected NAME (present) or NAME: VALUE (equal), "
			"NAME a header name such as X-Tenant", v);
		return;
	}
	const char *val = colon ? colon + 1 : NULL;
	while (val && (*val == ' ' || *val == '\t'))
		val++;
	if (set_str(&r->header_name, name) || (val && set_str(&r->header_value, val)))
		perr(p, p->lineno, "out of memory");
}

static void set_number(struct parser *p, const struct key *k, void *dst, const char *v)
{
	char *end;
	unsigned long long x = strtoull(v, &end, 10);

	if (!*v || *end || v[0] == '-' || x < k->min || x > k->max) {
		bool unit = isdigit((unsigned char)v[0]) && isalpha((unsigned char)v[strlen(v) - 1]);
		perr(p, p->lineno, "%s = \"%s\": expected a whole number from %u to %u%s", k->name, v,
		     k->min, k->max, unit ? " without a unit (the key's name says the unit)" : "");
		return;
	}
	*(uint32_t *)dst = (uint32_t)x;
}


/* An upstream: http://HOST[:PORT], HOST a name, an IPv4 address or an
 * IPv6 one in brackets, PORT 1 to 65535, nothing after (no path, no
 * user). NULL if so, else what is wrong. */
static const char *upstream_check(const char *v)
{
	static const char name_bytes[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_";
	const char *h, *end;

	if (strncmp(v, "http://", 7) != 0)
		return "expected http://HOST:PORT (the gateway speaks plain HTTP to its upstream)";
	h = v + 7;
	if (*h == '[') {
		end = strchr(h, ']');
		if (!end || end == h + 1 || strspn(h + 1, "0123456789abcdefABCDEF:.") != (size_t)(end - h - 1))
			return "an IPv6 address is written in brackets: http://[::1]:8080";
		end++;
	} else {
		end = h + strspn(h, name_bytes);
		if (end == h)
			return "expected http://HOST:PORT: no host";
	}
	if (*end == ':') {
		char *stop = NULL;
		unsigned long port = 0;
		errno = 0;
		if (end[1] >= '0' && end[1] <= '9')
			port = strtoul(end + 1, &stop, 10);
		if (!port || port > 65535 || errno)
			return "the port is a number, 1 to 65535";
		end = stop;
	}
	if (*end == '/')
		return "expected http://HOST:PORT, without a path (the request's path is appended)";
	if (*end)
		return "expected http://HOST:PORT: a host holds letters, digits, '.', '-' and '_', "
		       "and a port only digits";
	return NULL;
}

static void set_value(struct parser *p, const struct key *k, void *base, const char *v)
{
	void *dst = (char *)base + k->off;
	struct sockaddr_storage ss;
	char why[256];
	const char *bad;

	switch (k->kind) {
	case K_STR:
		break;
	case K_SEGNAME:
		if (tally_segment_name_validate(v) != 0)
			return perr(p, p->lineno, "%s = \"%s\": %s", k->name, v, tally_errmsg());
		break;
	case K_LISTEN:
		if (gw_parse_listen(v, &ss, why, sizeof(why)) != 0)
			return perr(p, p->lineno, "listen = %s", why);
		break;
	case K_SUBJECT:
		if (tally_subject_validate(v, false) != 0)
			return perr(p, p->lineno, "subject = \"%s\": %s (a route maps to one subject, "
				    "no wildcard)", v, tally_errmsg());
		break;
	case K_URL:
		if (!*v) { /* unset */
			free(*(char **)dst);
			*(char **)dst = NULL;
			return;
		}
		if ((bad = upstream_check(v)))
			return perr(p, p->lineno, "upstream = \"%s\": %s", v, bad);
		break;
	case K_HNAME:
		if (*v && !hname_ok(v))
			return perr(p, p->lineno, "%s = \"%s\": not a header name (letters, digits, '-')",
				    k->name, v);
		break;
	case K_PREFIX:
		if (*v && (v[0] != '/' || v[strlen(v) - 1] == '/' || strpbrk(v, " ?#")))
			return perr(p, p->lineno, "%s = \"%s\": expected a path such as /_tally: it starts "
				    "with '/', does not end with one, holds no blank, '?' or '#'", k->name, v);
		break;
	case K_HCOND:
		return set_hcond(p, base, v);
	case K_BOOL: {
		static const char *const t[] = { "true", "yes", "on", "1" }, *const f[] = { "false", "no", "off", "0" };
		for (int i = 0; i < 4; i++)
			if (strcmp(v, t[i]) == 0 || strcmp(v, f[i]) == 0)
				return (void)(*(bool *)dst = strcmp(v, t[i]) == 0);
		return perr(p, p->lineno, "%s = \"%s\": expected true or false (yes/no, on/off, 1/0)",
			    k->name, v);
	}
	case K_FRAC:
		if (!double_in(v, 0, 1, dst))
			perr(p, p->lineno, "%s = \"%s\": expected a fraction from 0 to 1, e.g. 0.25", k->name, v);
		return;
	case K_FACTOR:
		if (!double_in(v, 1, 1e6, dst))
			perr(p, p->lineno, "%s = \"%s\": expected a number >= 1, e.g. 2", k->name, v);
		return;
	case K_MODE:
		if (strcmp(v, "check") && strcmp(v, "proxy"))
			return perr(p, p->lineno, "mode = \"%s\": expected check or proxy", v);
		*(enum gw_mode *)dst = strcmp(v, "check") == 0 ? GW_MODE_CHECK : GW_MODE_PROXY;
		return;
	case K_HEADERS:
		if (strcmp(v, "full") && strcmp(v, "minimal"))
			return perr(p, p->lineno, "decision_headers = \"%s\": expected full (every X-Tally-* "
				    "header) or minimal (the status, Retry-After, X-Tally-No-Retry, fail-open or "
				    "-closed as 1)", v);
		*(bool *)dst = strcmp(v, "minimal") == 0;
		return;
	case K_SHED_STATUS: {
		char *end;
		unsigned long s = strtoul(v, &end, 10);
		if (strcmp(v, "native") == 0)
			return (void)(*(unsigned *)dst = 0);
		if (!*v || *end || s < 400 || s > 599)
			return perr(p, p->lineno, "shed_status = \"%s\": expected native (429 or 503, for "
				    "Envoy) or a status from 400 to 599 (403 for nginx auth_request)", v);
		*(unsigned *)dst = (unsigned)s;
		return;
	}
	case K_PRIO:
		if (gw_priority_parse(v, dst) != 0)
			perr(p, p->lineno, "priority = \"%s\": expected critical, default or sheddable", v);
		return;
	case K_U32:
		return set_number(p, k, dst, v);
	}
	if (set_str(dst, v))
		perr(p, p->lineno, "out of memory");
}

static void *inst_base(struct parser *p, const struct inst *in)
{
	return in->kind == S_ROUTE ? (void *)&p->cfg->routes[in->idx] : (void *)p->cfg;
}

static int on_key(void *user, const char *section, const char *name, const char *value)
{
	struct parser *p = user;
	const struct key *k;

	(void)section;
	if (!p->cur) {
		if (!p->bad_header)
			perr(p, p->lineno, "key \"%s\" outside a section; sections: " VALID_SECTIONS, name);
		return 1;
	}
	for (k = sects[p->cur->kind].keys; k->name && strcmp(k->name, name) != 0; k++)
		;
	if (!k->name) {
		char valid[256] = "";
		for (const struct key *q = sects[p->cur->kind].keys; q->name; q++)
			snprintf(valid + strlen(valid), sizeof(valid) - strlen(valid), "%s%s",
				 q == sects[p->cur->kind].keys ? "" : ", ", q->name);
		perr(p, p->lineno, "unknown key \"%s\" in [%s]; valid keys: %s", name,
		     sects[p->cur->kind].name, valid);
		return 1;
	}
	int *kl = &p->cur->keyline[k - sects[p->cur->kind].keys];
	if (*kl) {
		perr(p, p->lineno, "key \"%s\" given twice in this section (first at line %d)", name, *kl);
		return 1;
	}
	*kl = p->lineno;
	set_value(p, k, inst_base(p, p->cur), value);
	return 1;
}

/* ---- section headers ---- */

static char **split_methods(const char *s, const char **why)
{
	size_t n = 1;
	char **m;

	if (strcmp(s, "*") == 0)
		return NULL;
	for (const char *c = s; *c; c++)
		n += *c == ',';
	if (n > GW_METHODS_MAX || !(m = calloc(n + 1, sizeof(*m)))) {
		*why = "at most 8 methods";
		return NULL;
	}
	for (size_t i = 0; i < n; i++) {
		size_t l = strcspn(s, ",");
		bool ok = l > 0;
		for (size_t j = 0; j < l; j++)
			ok = ok && isupper((unsigned char)s[j]);
		if (!ok || !(m[i] = strndup(s, l))) {
			*why = "a method is upper case letters (GET, POST), a list (GET,HEAD) or *";
			for (size_t j = 0; j < i; j++)
				free(m[j]);
			free(m);
			return NULL;
		}
		s += l + (s[l] == ',');
	}
	return m;
}

static void free_methods(char **m)
{
	for (size_t i = 0; m && m[i]; i++)
		free(m[i]);
	free(m);
}

static int open_route(struct parser *p, const char *arg)
{
	struct gw_config *c = p->cfg;
	char method[128];
	const char *sp = strpbrk(arg, " \t"), *path, *why = NULL;

	if (!sp || (size_t)(sp - arg) >= sizeof(method)) {
		perr(p, p->lineno, "[route %s]: expected [route METHOD PATH], e.g. [route POST /orders/*]", arg);
		return -1;
	}
	memcpy(method, arg, (size_t)(sp - arg));
	method[sp - arg] = '\0';
	for (path = sp; *path == ' ' || *path == '\t'; path++)
		;
	char **methods = split_methods(method, &why);
	if (why || gw_path_pattern_check(path, &why) != 0) {
		perr(p, p->lineno, "[route %s]: %s", arg, why);
		free_methods(methods);
		return -1;
	}
	struct gw_route *r = realloc(c->routes, (c->nroutes + 1) * sizeof(*r));
	if (!r) {
		free_methods(methods);
		return -ENOMEM;
	}
	c->routes = r;
	r = &r[c->nroutes];
	memset(r, 0, sizeof(*r));
	r->line = p->lineno;
	r->priority = GW_PRIO_DEFAULT;
	r->methods = methods;
	r->name = strdup(arg);
	r->path = strdup(path);
	struct inst *in = realloc(p->insts, (p->ninsts + 1) * sizeof(*in));
	if (!r->name || !r->path || !in)
		return -ENOMEM;
	p->insts = in;
	p->cur = memset(&in[p->ninsts++], 0, sizeof(*in));
	p->cur->kind = S_ROUTE;
	p->cur->idx = c->nroutes++;
	p->cur->line = p->lineno;
	return 0;
}

static int open_single(struct parser *p, enum sect k)
{
	for (size_t i = 0; i < p->ninsts; i++)
		if (p->insts[i].kind == k) {
			perr(p, p->lineno, "[%s] given twice (first at line %d): merge them", sects[k].name,
			     p->insts[i].line);
			return -1;
		}
	struct inst *in = realloc(p->insts, (p->ninsts + 1) * sizeof(*in));
	if (!in)
		return -ENOMEM;
	p->insts = in;
	p->cur = memset(&in[p->ninsts++], 0, sizeof(*in));
	p->cur->kind = k;
	p->cur->line = p->lineno;
	return 0;
}

static void open_section(struct parser *p, char *line)
{
	char *end = strrchr(line, ']'), *arg, *tail;
	int k;

	p->cur = NULL;
	p->bad_header = true;
	if (!end)
		return perr(p, p->lineno, "section header without ']'");
	for (tail = end + 1; *tail && isspace((unsigned char)*tail); tail++)
		;
	if (*tail && *tail != ';' && *tail != '#')
		return perr(p, p->lineno, "unexpected text after ']': \"%s\"", tail);
	*end = '\0';
	for (arg = line + 1; *arg && *arg != ' ' && *arg != '\t'; arg++)
		;
	if (*arg)
		*arg++ = '\0';
	while (*arg == ' ' || *arg == '\t')
		arg++;
	for (size_t n = strlen(arg); n > 0 && (arg[n - 1] == ' ' || arg[n - 1] == '\t');)
		arg[--n] = '\0';
	for (k = 0; k < S__COUNT && strcmp(sects[k].name, line + 1) != 0; k++)
		;
	if (k == S__COUNT)
		return perr(p, p->lineno, "unknown section [%s%s%s]; valid sections: " VALID_SECTIONS,
			    line + 1, *arg ? " " : "", arg);
	if (k == S_ROUTE && !*arg)
		return perr(p, p->lineno, "[route] needs a method and a path: [route POST /orders/*]");
	if (k != S_ROUTE && *arg)
		return perr(p, p->lineno, "[%s] takes no argument (got \"%s\")", sects[k].name, arg);
	int rc = k == S_ROUTE ? open_route(p, arg) : open_single(p, (enum sect)k);
	if (rc == 0)
		p->bad_header = false;
	else if (rc == -ENOMEM)
		perr(p, p->lineno, "out of memory");
}

/* inih's reader: one line per call, counted; section headers are ours. */
static char *reader(char *buf, int num, void *stream)
{
	struct parser *p = stream;
	ssize_t n = getline(&p->line, &p->linecap, p->f);
	const char *out;
	char *s;

	if (n < 0)
		return NULL;
	p->lineno++;
	for (s = p->line; *s == ' ' || *s == '\t'; s++)
		;
	n -= s - p->line;
	out = s;
	if (n > num - 1) {
		perr(p, p->lineno, "line longer than %d bytes", num - 2);
		out = "\n";
	} else if (*s == '[') {
		for (size_t l = strlen(s); l > 0 && (s[l - 1] == '\n' || s[l - 1] == '\r');)
			s[--l] = '\0';
		open_section(p, s);
		out = "\n";
	} else if (*s && *s != '\n' && *s != '\r' && *s != ';' && *s != '#' && !strchr(s, '=')) {
		perr(p, p->lineno, "expected KEY = VALUE, a [section] or a comment");
		out = "\n";
	}
	snprintf(buf, (size_t)num, "%s", out);
	return buf;
}

/* ---- defaults, overrides, checks across keys ---- */

static int defaults(struct gw_config *c)
{
	memset(c, 0, sizeof(*c));
	c->mode = GW_MODE_CHECK;
	c->connection_limit = 4096;
	c->idle_timeout_s = 60;
	c->shed_status = 403;
	c->connect_timeout_ms = 2000;
	c->upstream_timeout_ms = 30000;
	c->drain_timeout_ms = 10000;
	gw_shed_config_init(&c->shed);
	return set_str(&c->listen, "127.0.0.1:8090") || set_str(&c->admin_prefix, "/_tally") ||
	       set_str(&c->priority_header, "X-Tally-Priority") || set_str(&c->path_prefix, "") ||
	       set_str(&c->uri_header, "X-Original-URI") || set_str(&c->method_header, "X-Original-Method");
}

static void apply_overrides(struct parser *p, const struct gw_overrides *ov)
{
	struct gw_config *c = p->cfg;
	struct sockaddr_storage ss;
	char why[256];

	if (ov->mode && strcmp(ov->mode, "check") && strcmp(ov->mode, "proxy"))
		perr(p, -1, "--mode %s: expected check or proxy", ov->mode);
	else if (ov->mode)
		c->mode = strcmp(ov->mode, "check") == 0 ? GW_MODE_CHECK : GW_MODE_PROXY;
	if (ov->listen && gw_parse_listen(ov->listen, &ss, why, sizeof(why)) != 0)
		perr(p, -1, "--listen %s", why);
	else if (ov->listen && set_str(&c->listen, ov->listen))
		perr(p, -1, "out of memory");
	if (ov->segment && tally_segment_name_validate(ov->segment) != 0)
		perr(p, -1, "segment \"%s\" (-s or TALLY_SEGMENT): %s", ov->segment, tally_errmsg());
	else if (ov->segment && set_str(&c->segment, ov->segment))
		perr(p, -1, "out of memory");
	const char *bad = ov->upstream ? upstream_check(ov->upstream) : NULL;
	if (bad)
		perr(p, -1, "--upstream %s: %s", ov->upstream, bad);
	else if (ov->upstream && set_str(&c->upstream, ov->upstream))
		perr(p, -1, "out of memory");
	if (ov->fail_closed)
		c->fail_closed = true;
	if (!c->segment && set_str(&c->segment, "tally"))
		perr(p, -1, "out of memory");
}

static void check_whole(struct parser *p)
{
	struct gw_config *c = p->cfg;

	for (size_t i = 0; i < c->nroutes; i++)
		if (!c->routes[i].subject)
			perr(p, c->routes[i].line, "[route %s] has no subject: add subject = NAME",
			     c->routes[i].name);
	if (c->mode == GW_MODE_PROXY && !c->upstream)
		perr(p, c->path ? 0 : -1, "proxy mode needs an upstream: [proxy] upstream = "
			"http://HOST:PORT, or --upstream");
}

int gw_config_load(struct gw_config *cfg, const char *path, const struct gw_overrides *ov,
		   char *err, size_t errlen)
{
	struct parser p = { .file = path ? path : "tally-gateway", .cfg = cfg, .err = err, .errlen = errlen };
	static const struct gw_overrides none;

	err[0] = '\0';
	if (defaults(cfg))
		return perr(&p, -1, "out of memory"), -1;
	if (path) {
		struct stat sb;
		if (!(p.f = fopen(path, "r")) ||
		    (fstat(fileno(p.f), &sb) == 0 && S_ISDIR(sb.st_mode) && (errno = EISDIR))) {
			perr(&p, -1, "cannot read %s: %s%s", path, strerror(errno),
			     errno == EACCES ? " (permission denied: the gateway's user must be able to read it)" : "");
			if (p.f)
				fclose(p.f);
			return -1;
		}
		cfg->path = strdup(path);
		ini_parse_stream(reader, &p, on_key, &p);
		fclose(p.f);
		free(p.line);
	}
	apply_overrides(&p, ov ? ov : &none);
	check_whole(&p);
	free(p.insts);
	return p.nerrors ? -1 : 0;
}

void gw_config_free(struct gw_config *c)
{
	for (size_t i = 0; i < c->nroutes; i++) {
		struct gw_route *r = &c->routes[i];
		for (char **m = r->methods; m && *m; m++)
			free(*m);
		free(r->methods);
		free(r->name);
		free(r->path);
		free(r->header_name);
		free(r->header_value);
		free(r->subject);
	}
	free(c->routes);
	free(c->path);
	free(c->listen);
	free(c->segment);
	free(c->admin_prefix);
	free(c->priority_header);
	free(c->path_prefix);
	free(c->uri_header);
	free(c->method_header);
	free(c->upstream);
	memset(c, 0, sizeof(*c));
}
