/* SPDX-License-Identifier: MIT */
/*
 * route.c: which route a request takes. A route matches a method (or a
 * list, or any), a path pattern and optionally a header; the first route
 * of the file that matches wins, and a request that matches none is
 * unmapped (admitted, and counted).
 *
 * Path patterns are compared segment by segment on the raw path (before
 * percent-decoding, the query cut off at '?'): a literal segment matches
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
