/* SPDX-License-Identifier: MIT */
/*
 * common.h: library-internal helpers every lib/ file shares: the one way
 * to die on a broken invariant (tally__die, TALLY__ASSERT: always on,
 * for bugs only, never for bad input or a corrupt segment), and the
 * thread-local error detail behind tally_errmsg().
 */
#ifndef TALLY_LIB_COMMON_H
#define TALLY_LIB_COMMON_H

#include <tally/common.h>

#define TALLY__LIKELY(x) __builtin_expect(!!(x), 1)
#define TALLY__UNLIKELY(x) __builtin_expect(!!(x), 0)
#define TALLY__ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Abort with file:line and the message: an invariant of ours is broken. */
__attribute__((noreturn, format(printf, 3, 4)))
void tally__die(const char *file, int line, const char *fmt, ...);

#define TALLY__ASSERT(cond)                                                        \
	do {                                                                       \
		if (TALLY__UNLIKELY(!(cond)))                                      \
			tally__die(__FILE__, __LINE__, "assertion failed: %s", #cond); \
	} while (0)

/* Record the detail of a failure for tally_errmsg() and return err. */
__attribute__((format(printf, 2, 3)))
int tally__fail(int err, const char *fmt, ...);

/* Clear the detail (at the start of a public call that may fail). */
void tally__clear_errmsg(void);

/* Human size: "12.0 MiB" into buf. */
const char *tally__human_size(uint64_t bytes, char *buf, size_t len);

#endif /* TALLY_LIB_COMMON_H */
