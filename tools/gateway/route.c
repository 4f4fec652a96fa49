/* SPDX-License-Identifier: MIT */
/*
 * route.c: which route a request takes. A route matches a method (or a
 * list, or any), a path pattern and optionally a header; the first route
 * of the file that matches wins, and a request that matches none is
 * unmapped (admitted, and counted).
 *
 * A request's path is first brought to the form nginx routes ($uri,
 * gw_path_normalize): decoded once, slashes merged, dot segments
 * resolved, so that "/ok/../over/1", "//over/1" and "/%6Fver/1" are all
 * /over/1 here as they are for nginx's locations and for most upstreams,
 * and none slips past the route of /over. Patterns are compared with it
 * segment by segment (the query cut off at '?'): a literal segment matches
 * itself, '*' matches exactly one segment, and a final '**' matches
 * whatever follows, including nothing: /orders followed by the segment
 * '**' is the prefix /orders. A trailing '/' in the path is an empty last
 * segment. (docs/gateway.md has examples.)
 */
#include "config.h"

#include <string.h>
#include <strings.h>

#include "gateway.h"

int gw_path_pattern_check(const char *pattern, const char **why)
{
	if (pattern[0] != '/') {
		*why = "a path pattern starts with '/'";
		return -1;
	}
	for (const char *s = pattern; *s; s++) {
		if ((unsigned char)*s <= ' ' || *s == '?' || *s == '#') {
			*why = "a path pattern holds no blank, control byte, '?' or '#'";
			return -1;
		}
		if (*s == '*') {
			bool alone = s[-1] == '/' && (s[1] == '/' || s[1] == '\0');
			bool rest = s[-1] == '/' && s[1] == '*' && s[2] == '\0';
			if (rest)
				return 0;
			if (!alone) {
				*why = "'*' stands alone in its segment (/a/*/b), and '**' only ends a pattern (/a/**)";
				return -1;
			}
		}
	}
	return 0;
}

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = (char)(c | 0x20);
	return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Appends byte c of a decoded segment: a '?' or '#' that came from an
 * escape goes back to it, so that the matcher, which ends a path there,
 * sees it as a byte of its segment (as the nginx module does). */
static char *put_byte(char *w, unsigned char c)
{
	if (c == '?' || c == '#') {
		*w++ = '%';
		*w++ = c == '?' ? '3' : '2';
		*w++ = c == '?' ? 'F' : '3';
	} else {
		*w++ = (char)c;
	}
	return w;
}

void gw_path_normalize(const char *uri, char *out)
{
	size_t end = strcspn(uri, "?#");
	char *w = out;
	bool dir = true;   /* the output ends in a directory: keep its '/' */
	bool slash = true; /* the last byte taken was a '/' (or a decoded one) */

	*w++ = '/'; /* out always ends in '/' while segments are added */
	for (size_t i = 0; i < end;) {
		while (i < end && uri[i] == '/') {
			i++; /* slashes merged (and the leading one) */
			slash = true;
		}
		if (i == end)
			break;
		/* decode the segment after w, then look at what it is */
		char *seg = w;
		for (; i < end; i++) {
			unsigned char c = (unsigned char)uri[i];
			int hi, lo;
			if (c == '%' && i + 2 < end && (hi = hex_digit(uri[i + 1])) >= 0 &&
			    (lo = hex_digit(uri[i + 2])) >= 0 && (hi | lo) != 0) {
				c = (unsigned char)(hi << 4 | lo);
				i += 2;
			}
			if (c == '/') { /* a decoded %2F divides as a '/' does, for nginx */
				i++;
				slash = true;
				break;
			}
			w = put_byte(w, c);
			slash = false;
		}
		size_t len = (size_t)(w - seg);
		if (len == 0) {
			continue;
		} else if (len == 1 && seg[0] == '.') {
			w = seg;
			dir = true;
		} else if (len == 2 && seg[0] == '.' && seg[1] == '.') {
			w = seg - 1; /* the '/' before it, then back to the one before that */
			while (w > out && w[-1] != '/')
				w--;
			if (w == out) /* above the root: stays at the root */
				w = out + 1;
			dir = true;
		} else {
			*w++ = '/';
			dir = false;
		}
	}
	if (!dir && !slash && w > out + 1)
		w--; /* the last segment was a name: no '/' after it */
	*w = '\0';
}

/* Length of the segment at s (up to '/', '?' or the end). */
static size_t seglen(const char *s, const char *stops)
{
	return strcspn(s, stops);
}

bool gw_path_match(const char *pattern, const char *path)
{
	const char *p = pattern, *s = path;

	if (*p++ != '/' || *s++ != '/')
		return false;
	for (;;) {
		if (p[0] == '*' && p[1] == '*' && p[2] == '\0')
			return true;
		size_t pl = seglen(p, "/"), sl = seglen(s, "/?#");
		if (!(pl == 1 && p[0] == '*') && (pl != sl || memcmp(p, s, pl) != 0))
			return false;
		p += pl;
		s += sl;
		bool pend = *p == '\0', send = *s != '/';
		if (send) /* the path ends: so must the pattern, or end in '**' */
			return pend || strcmp(p, "/**") == 0;
		if (pend)
			return false;
		p++;
		s++;
	}
}

static bool method_ok(char *const *methods, const char *method)
{
	if (!methods)
		return true;
	for (; *methods; methods++)
		if (strcmp(*methods, method) == 0)
			return true;
	return false;
}

struct gw_route *gw_route_find(struct gw_route *routes, size_t n, const char *method,
			       const char *path, const char *(*header)(void *ctx, const char *name),
			       void *ctx)
{
	for (size_t i = 0; i < n; i++) {
		struct gw_route *r = &routes[i];
		if (!method_ok(r->methods, method) || !gw_path_match(r->path, path))
			continue;
		if (r->header_name) {
			const char *v = header(ctx, r->header_name);
			if (!v || (r->header_value && strcmp(v, r->header_value) != 0))
				continue;
		}
		return r;
	}
	return NULL;
}
