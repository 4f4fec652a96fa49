/* SPDX-License-Identifier: MIT */
/*
 * tally/common.h: what every part of the public API shares: the export
 * macro, the error convention and the library version.
 *
 * Errors. Every function that can fail returns 0 (or a non-negative value
 * documented with it) on success and a negative number on failure: either a
 * negated errno value (-ENOENT, -EACCES, -ENOSPC, ...) or one of the
 * TALLY_E* codes below, which sit outside errno's range. tally_strerror()
 * names any of them. Where a failure has details worth printing (which
 * version, how many bytes, which byte of a subject is wrong),
 * tally_errmsg() returns a sentence for the last failure of the calling
 * thread, written for the operator who has to fix it.
 */
#ifndef TALLY_COMMON_H
#define TALLY_COMMON_H

#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(TALLY_BUILDING_LIB)
#define TALLY_API __attribute__((visibility("default")))
#else
#define TALLY_API
#endif

#define TALLY_VERSION_STRING "0.1.0"

/* Errors of tally's own, outside errno's range (errno values stay below 4096). */
enum tally_error {
	TALLY_EBASE       = -10000,
	TALLY_EVERSION    = -10001, /* segment of another ABI major version */
	TALLY_ENOTREADY   = -10002, /* segment exists but never became ready */
	TALLY_EOWNERDEAD  = -10003, /* the segment's owner process is gone */
	TALLY_ECORRUPT    = -10004, /* a value read from the segment is out of bounds */
	TALLY_EBADNAME    = -10005, /* invalid segment or subject name */
	TALLY_EFULL       = -10006, /* a fixed-size table in the segment is full */
	TALLY_EREPLACED   = -10007, /* the name now refers to a newer segment */
	TALLY_ESTALE      = -10008, /* the data has not been refreshed in time */
	TALLY_EBUSY_RETRY = -10009, /* a consistent read failed within its bounded retries */
	TALLY_EREVOKED    = -10010, /* a producer handle's claim ended: its slot is not its own */
};

/* Name of an error code returned by any tally function (static string). */
TALLY_API const char *tally_strerror(int err);

/*
 * Detail of the last failure in the calling thread: a sentence naming the
 * object, what is wrong and what to do, or "" if none was recorded.
 * Valid until the next tally call in this thread. Thread-safe.
 */
TALLY_API const char *tally_errmsg(void);

/* Version of the library actually linked (e.g. "0.1.0"). */
TALLY_API const char *tally_version(void);

#ifdef __cplusplus
}
#endif
#endif /* TALLY_COMMON_H */
