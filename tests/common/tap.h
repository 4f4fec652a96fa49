/* SPDX-License-Identifier: MIT */
/*
 * tap.h: a minimal TAP producer for test programs that cannot use
 * Criterion: Criterion's runner does not start under ThreadSanitizer
 * (Snaipe/Criterion#274), so the concurrency stress tests are plain
 * programs that print TAP, counted by the same automake driver.
 */
#ifndef TALLY_TEST_TAP_H
#define TALLY_TEST_TAP_H

#include <stdarg.h>
#include <stdio.h>

static int tap_n, tap_failed;

static inline void tap_plan(int n)
{
	printf("1..%d\n", n);
	fflush(stdout);
}

__attribute__((format(printf, 2, 3)))
static inline int tap_ok(int cond, const char *fmt, ...)
{
	va_list ap;

	printf("%s %d - ", cond ? "ok" : "not ok", ++tap_n);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	tap_failed += !cond;
	return cond;
}

static inline void tap_diag(const char *msg)
{
	printf("# %s\n", msg);
}

static inline int tap_done(void)
{
	return tap_failed ? 1 : 0;
}

#endif
