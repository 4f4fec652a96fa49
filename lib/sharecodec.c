/* SPDX-License-Identifier: MIT */
/*
 * lib/sharecodec.c: encoding and strict decoding of the KV keys and values
 * of shared verdicts (format in sharecodec.h). Nothing read from the
 * network is trusted: the decoder copies into bounded buffers, checks
 * every field and demands that the key be the value's own.
 */
#include "sharecodec.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool keep_byte(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
	       c == '-' || c == '.';
}

int tally__share_key(char *buf, size_t cap, const char *host, const char *subject)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t n = 0, hl = strnlen(host, TALLY__REMOTE_HOST_MAX), sl;

	if (!tally__remote_host_ok(host))
		return -EINVAL;
	sl = strnlen(subject, TALLY__REMOTE_SUBJ_MAX);
	if (sl == 0 || sl >= TALLY__REMOTE_SUBJ_MAX)
		return -EINVAL;
	if (cap < hl + 2)
		return -ENOSPC;
	memcpy(buf, host, hl);
	n = hl;
	buf[n++] = '.';
	for (size_t i = 0; i < sl; i++) {
		unsigned char c = (unsigned char)subject[i];

		if (n + 4 > cap)
			return -ENOSPC;
		if (keep_byte(c)) {
			buf[n++] = (char)c;
		} else {
			buf[n++] = '=';
			buf[n++] = hex[c >> 4];
			buf[n++] = hex[c & 15];
		}
	}
	buf[n] = '\0';
	return (int)n;
}

int tally__share_encode(char *buf, size_t cap, const struct tally__remote_view *v)
{
	int n;

	if (!tally__remote_view_ok(v))
		return -EINVAL;
	n = snprintf(buf, cap, "tally1 %s %u %u %.4f %.4f %llu %llu %u %s", v->host, v->verdict, v->reasons,
		     v->pressure, v->shed, (unsigned long long)v->p95_ns, (unsigned long long)v->pending,
		     v->retry_after_ms, v->subject);
	if (n < 0 || (size_t)n >= cap)
		return -ENOSPC;
	return n;
}

/* ---- decoding ---- */

struct cursor {
	const char *p, *end;
};

/* The next token (up to a space or the end) into tok[cap]; false if empty or too long. */
static bool token(struct cursor *c, char *tok, size_t cap, bool last)
{
	size_t n = 0;

	while (c->p < c->end && *c->p != ' ') {
		if (n + 1 >= cap)
			return false;
		tok[n++] = *c->p++;
	}
	tok[n] = '\0';
	if (n == 0)
		return false;
	if (last)
		return c->p == c->end;
	if (c->p == c->end)
		return false;
	c->p++; /* the single space */
	return true;
}

static bool parse_u64(const char *t, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;

	if (!*t || strlen(t) > 20)
		return false;
	for (; *t; t++) {
		unsigned d;

		if (*t < '0' || *t > '9')
			return false;
		d = (unsigned)(*t - '0');
		if (v > (UINT64_MAX - d) / 10)
			return false;
		v = v * 10 + d;
	}
	if (v > max)
		return false;
	*out = v;
	return true;
}

/* "0", "1", "0.8125", "1.0000": digits, at most one '.', within [0, 1]. */
static bool parse_unit(const char *t, double *out)
{
	size_t dots = 0, n = strlen(t);
	char *end = NULL;
	double d;

	if (n == 0 || n > 24 || t[0] == '.' || t[n - 1] == '.')
		return false;
	for (const char *q = t; *q; q++) {
		if (*q == '.')
			dots++;
		else if (*q < '0' || *q > '9')
			return false;
	}
	if (dots > 1)
		return false;
	d = strtod(t, &end);
	if (end != t + n || !isfinite(d) || d < 0.0 || d > 1.0)
		return false;
	*out = d;
	return true;
}

static bool parse_fields(struct cursor *c, struct tally__remote_view *o)
{
	char t[TALLY__REMOTE_SUBJ_MAX];
	uint64_t u;

	if (!token(c, t, sizeof(t), false) || strcmp(t, "tally1") != 0)
		return false;
	if (!token(c, o->host, sizeof(o->host), false))
		return false;
	if (!token(c, t, sizeof(t), false) || !parse_u64(t, 3, &u))
		return false;
	o->verdict = (uint32_t)u;
	if (!token(c, t, sizeof(t), false) || !parse_u64(t, 255, &u))
		return false;
	o->reasons = (uint32_t)u;
	if (!token(c, t, sizeof(t), false) || !parse_unit(t, &o->pressure))
		return false;
	if (!token(c, t, sizeof(t), false) || !parse_unit(t, &o->shed))
		return false;
	if (!token(c, t, sizeof(t), false) || !parse_u64(t, UINT64_MAX, &o->p95_ns))
		return false;
	if (!token(c, t, sizeof(t), false) || !parse_u64(t, UINT64_MAX, &o->pending))
		return false;
	if (!token(c, t, sizeof(t), false) || !parse_u64(t, 86400000, &u))
		return false;
	o->retry_after_ms = (uint32_t)u;
	return token(c, o->subject, sizeof(o->subject), true);
}

int tally__share_decode(const char *key, size_t key_len, const char *val, size_t len,
			struct tally__remote_view *out)
{
	struct cursor c = { val, val + len };
	char want[TALLY__SHARE_KEY_MAX];
	int n;

	memset(out, 0, sizeof(*out));
	if (!key || !val || len == 0 || len >= TALLY__SHARE_VALUE_MAX || !parse_fields(&c, out) ||
	    !tally__remote_view_ok(out))
		goto bad;
	n = tally__share_key(want, sizeof(want), out->host, out->subject);
	if (n < 0 || (size_t)n != key_len || memcmp(want, key, key_len) != 0)
		goto bad;
	return 0;
bad:
	memset(out, 0, sizeof(*out));
	return -EBADMSG;
}
