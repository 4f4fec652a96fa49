/* SPDX-License-Identifier: MIT */
/*
 * common.c: error names, the per-thread error detail, version, and
 * tally__die(). Nothing here is on a hot path.
 */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "failpoint.h"

static __thread char errmsg_buf[512];

void tally__die(const char *file, int line, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "tally: fatal: %s:%d: ", file, line);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	abort();
}

int tally__fail(int err, const char *fmt, ...)
{
	char tmp[sizeof(errmsg_buf)];
	va_list ap;

	/* Format aside first: callers may pass tally_errmsg() itself as an
	 * argument, to wrap a detail in more context. */
	va_start(ap, fmt);
	vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	memcpy(errmsg_buf, tmp, sizeof(tmp));
	return err;
}

void tally__clear_errmsg(void)
{
	errmsg_buf[0] = '\0';
}

TALLY_API const char *tally_errmsg(void)
{
	return errmsg_buf;
}

TALLY_API const char *tally_version(void)
{
	return PACKAGE_VERSION;
}

static const struct {
	int code;
	const char *text;
} tally_errors[] = {
	{ TALLY_EVERSION, "segment has an incompatible ABI version" },
	{ TALLY_ENOTREADY, "segment did not become ready in time" },
	{ TALLY_EOWNERDEAD, "the segment's owner process is not alive" },
	{ TALLY_ECORRUPT, "segment is corrupt (a value is out of bounds)" },
	{ TALLY_EBADNAME, "invalid name" },
	{ TALLY_EFULL, "table in the segment is full" },
	{ TALLY_EREPLACED, "the segment was re-created; re-open it" },
	{ TALLY_ESTALE, "data is stale" },
	{ TALLY_EBUSY_RETRY, "no consistent read within the retry bound" },
	{ TALLY_EREVOKED, "the producer handle no longer holds its slot" },
};

TALLY_API const char *tally_strerror(int err)
{
	if (err >= 0)
		return "success";
	for (size_t i = 0; i < TALLY__ARRAY_SIZE(tally_errors); i++)
		if (tally_errors[i].code == err)
			return tally_errors[i].text;
	if (err > -4096)
		return strerror(-err);
	return "unknown tally error";
}

const char *tally__human_size(uint64_t bytes, char *buf, size_t len)
{
	static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB" };
	double v = (double)bytes;
	size_t u = 0;

	while (v >= 1024.0 && u + 1 < TALLY__ARRAY_SIZE(units)) {
		v /= 1024.0;
		u++;
	}
	snprintf(buf, len, u ? "%.1f %s" : "%.0f %s", v, units[u]);
	return buf;
}

/* failpoint.h: set only by tests. */
void (*tally__failpoint_hook)(const char *point) = NULL;
