/* SPDX-License-Identifier: MIT */
/*
 * fuzz_subject.c: libFuzzer target for NATS subject and pattern handling:
 * tally_subject_validate (literal and wildcard modes), the length-bounded
 * tally__subject_check it is built on, tally_subject_match,
 * tally__pattern_specificity, and the threshold patterns of the verdicts
 * (tally_thresholds_add / tally_thresholds_match), on arbitrary bytes.
 * (tally has no configuration-file parser and does not parse JetStream
 * replies itself: cnats does. The threshold set, built from patterns, is
 * the nearest thing to a config parser and is covered here.)
 *
 * Input: pattern bytes, a NUL, subject bytes (no NUL: the whole input is
 * both). Each string is copied into a heap block of exactly its length
 * plus the NUL, so ASan reports any read past the terminator;
 * tally__subject_check also gets a copy with no terminator at all, of
 * exactly the length passed.
 *
 * Invariants checked (abort on violation, so libFuzzer keeps the input):
 *  - every function returns, whatever the bytes (invalid ones included:
 *    the pending table matches patterns read from shm unvalidated);
 *  - validate(s) is 0 or TALLY_EBADNAME, and a failure explains itself
 *    in tally_errmsg(); valid literal implies valid with wildcards;
 *  - tally__subject_check(s, strlen(s)) agrees with validate(s);
 *  - a literal subject matches itself, and two valid literals match
 *    exactly when they are equal;
 *  - for a valid pattern and a valid literal subject, tally_subject_match
 *    agrees with an independent token-by-token reference matcher below;
 *  - a valid literal is matched by ">", by itself with every token made
 *    '*', by each of its prefixes followed by ".>", and not by itself
 *    followed by ".*"; the literal is more specific than each of those
 *    patterns (tally__pattern_specificity);
 *  - tally_thresholds_add accepts a pattern exactly when validate(.., true)
 *    does, refuses it the second time (-EEXIST), and tally_thresholds_match
 *    picks the literal subject's own rule over every derived pattern, and
 *    the pattern's rule for a subject it matches when it is the only rule.
 *
 * Run: tests/fuzz/run-fuzz BUILD_DIR (builds it, replays the kept inputs,
 * fuzzes for FUZZ_SECONDS); then to fuzz longer or replay one input:
 *   BUILD_DIR/fuzz_subject -max_len=600 NEW_DIR tests/fuzz/corpus/fuzz_subject
 *   BUILD_DIR/fuzz_subject tests/fuzz/regress/fuzz_subject/FILE
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tally/tally.h>

#include "subject.h"
#include <tally/verdict.h>

/* libFuzzer's entry point. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define EXPECT(cond)                                                              \
	do {                                                                      \
		if (!(cond)) {                                                    \
			fprintf(stderr, "fuzz_subject: %s:%d: expectation failed: %s\n", \
				__FILE__, __LINE__, #cond);                       \
			abort();                                                  \
		}                                                                 \
	} while (0)

static char *dup_exact(const uint8_t *p, size_t n)
{
	char *s = malloc(n + 1);

	if (!s)
		abort();
	memcpy(s, p, n);
	s[n] = '\0';
	return s;
}

/* Next token of s at *pos (NUL-terminated s, no validation): its length. */
static size_t token(const char *s, size_t pos)
{
	const char *e = strchr(s + pos, '.');

	return e ? (size_t)(e - (s + pos)) : strlen(s + pos);
}

/* Reference NATS matcher for a VALID pattern and a VALID literal subject. */
static bool ref_match(const char *p, const char *s)
{
	size_t pi = 0, si = 0;

	for (;;) {
		size_t pn = token(p, pi), sn = token(s, si);

		if (pn == 1 && p[pi] == '>')
			return true; /* s has at least this one token left */
		if (!(pn == 1 && p[pi] == '*') && (pn != sn || memcmp(p + pi, s + si, pn) != 0))
			return false;
		bool plast = p[pi + pn] == '\0', slast = s[si + sn] == '\0';
		if (plast || slast)
			return plast && slast;
		pi += pn + 1;
		si += sn + 1;
	}
}

static int validate(const char *s, bool wild)
{
	int rc = tally_subject_validate(s, wild);

	EXPECT(rc == 0 || rc == TALLY_EBADNAME);
	if (rc)
		EXPECT(tally_errmsg()[0] != '\0');
	return rc;
}

static void check_one(const char *s)
{
	size_t n = strlen(s);
	int lit = validate(s, false), wild = validate(s, true);

	if (lit == 0)
		EXPECT(wild == 0);
	/* The length-bounded check, on a block with no terminator. */
	if (n > 0 && n <= TALLY_SUBJECT_MAX) {
		char *raw = malloc(n);
		if (!raw)
			abort();
		memcpy(raw, s, n);
		EXPECT(tally__subject_check(raw, n, false, NULL, 0) == lit);
		char why[32]; /* a short buffer for the reason: truncated, never overrun */
		EXPECT(tally__subject_check(raw, n, true, why, sizeof(why)) == wild);
		free(raw);
	} else {
		EXPECT(lit != 0 && wild != 0);
	}
	(void)tally_subject_match(s, s);
	if (wild == 0)
		(void)tally__pattern_specificity(s);
}

/* Patterns derived from a valid literal s: all must match it, and be less
 * specific than it. */
static void add_rule(struct tally_thresholds *t, const char *pattern, uint64_t tag)
{
	struct tally_threshold_rule r;

	tally_threshold_rule_init(&r);
	r.min_samples = tag;
	int rc = tally_thresholds_add(t, pattern, &r);
	EXPECT(rc == 0 || rc == -EEXIST);
}

static void check_derived(const char *s)
{
	size_t n = strlen(s);
	char *p = malloc(2 * n + 3);
	int spec = tally__pattern_specificity(s);
	struct tally_thresholds *t = tally_thresholds_new();
	const char *best = NULL;

	if (!p || !t)
		abort();
	add_rule(t, ">", 1);
	EXPECT(tally_subject_match(s, s) == 1);
	EXPECT(tally_subject_match(">", s) == 1);
	/* every token '*' */
	size_t o = 0;
	for (size_t i = 0; i <= n; i += token(s, i) + 1) {
		p[o++] = '*';
		p[o++] = '.';
	}
	p[o - 1] = '\0';
	EXPECT(validate(p, true) == 0 && tally_subject_match(p, s) == 1);
	EXPECT(tally__pattern_specificity(p) < spec);
	add_rule(t, p, 2);
	/* each prefix of whole tokens, then ".>" (and ">" alone above); only
	 * the first and last few of a long subject, which keeps an input of
	 * 128 tokens from costing milliseconds of quadratic work */
	size_t ntok = 0, j = 0;
	for (size_t i = 0; i <= n; i += token(s, i) + 1)
		ntok++;
	for (size_t i = 0; i + token(s, i) < n; i += token(s, i) + 1, j++) {
		size_t cut = i + token(s, i);
		if (j >= 4 && j + 5 < ntok)
			continue;
		memcpy(p, s, cut);
		memcpy(p + cut, ".>", 3);
		EXPECT(validate(p, true) == 0 && tally_subject_match(p, s) == 1);
		EXPECT(tally__pattern_specificity(p) < spec);
		add_rule(t, p, 3);
	}
	/* the literal's own rule beats every derived pattern */
	add_rule(t, s, 4);
	EXPECT(tally_thresholds_match(t, s, &best)->min_samples == 4 && strcmp(best, s) == 0);
	tally_thresholds_free(&t);
	EXPECT(t == NULL);
	/* one token too many */
	memcpy(p, s, n);
	memcpy(p + n, ".*", 3);
	EXPECT(tally_subject_match(p, s) == 0);
	free(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *nul = memchr(data, 0, size);
	size_t pn = nul ? (size_t)(nul - data) : size;
	char *pat = dup_exact(data, pn);
	char *subj = nul ? dup_exact(nul + 1, size - pn - 1) : dup_exact(data, size);

	check_one(pat);
	check_one(subj);
	int m = tally_subject_match(pat, subj);
	EXPECT(m == 0 || m == 1);
	(void)tally_subject_match(subj, pat);
	EXPECT(tally_subject_match(NULL, subj) == 0 && tally_subject_match(pat, NULL) == 0);
	EXPECT(validate(NULL, false) == TALLY_EBADNAME);

	/* the pattern as a threshold rule */
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r;
	const char *best = NULL;
	if (!t)
		abort();
	tally_threshold_rule_init(&r);
	r.min_samples = 7;
	int pat_ok = tally_subject_validate(pat, true) == 0;
	int rc = tally_thresholds_add(t, pat, &r);
	if (pat[0] == '\0')
		EXPECT(rc == 0); /* "" sets the default rule */
	else
		EXPECT(pat_ok ? rc == 0 && tally_thresholds_add(t, pat, &r) == -EEXIST
			      : rc == TALLY_EBADNAME && tally_errmsg()[0] != '\0');
	const struct tally_threshold_rule *got = tally_thresholds_match(t, subj, &best);
	EXPECT(got && best);

	bool subj_lit = tally_subject_validate(subj, false) == 0;
	if (subj_lit) {
		check_derived(subj);
		if (pat_ok && pat[0])
			EXPECT((got->min_samples == 7) == (ref_match(pat, subj) == 1));
		if (tally_subject_validate(pat, true) == 0)
			EXPECT(m == ref_match(pat, subj));
		if (tally_subject_validate(pat, false) == 0)
			EXPECT(m == (strcmp(pat, subj) == 0));
	}
	tally_thresholds_free(&t);
	free(pat);
	free(subj);
	return 0;
}
