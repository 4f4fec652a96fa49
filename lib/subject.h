/* SPDX-License-Identifier: MIT */
/*
 * subject.h (private): NATS subject syntax and wildcard matching, shared
 * by the subject table, the poller (a consumer's filter subject) and the
 * threshold patterns of the verdicts.
 */
#ifndef TALLY_LIB_SUBJECT_H
#define TALLY_LIB_SUBJECT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* NATS wildcard match: '*' is exactly one token, '>' one or more trailing
 * tokens. Both arguments NUL-terminated; no validation here. */
bool tally__subject_match(const char *pattern, const char *subject);

/* Same as tally_subject_validate() without touching tally_errmsg: the
 * problem goes into why (may be NULL). 0 or TALLY_EBADNAME. */
int tally__subject_check(const char *subject, size_t len, bool allow_wildcards,
			 char *why, size_t why_len);

/* Specificity of a pattern for "most specific match wins": more literal
 * tokens first, then fewer wildcards, '*' before '>'. Higher is more
 * specific. */
int tally__pattern_specificity(const char *pattern);

/* FNV-1a of the bytes. */
uint32_t tally__subject_hash(const char *s, size_t len);

#endif /* TALLY_LIB_SUBJECT_H */
