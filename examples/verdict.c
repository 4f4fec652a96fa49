/* SPDX-License-Identifier: MIT */
/*
 * verdict.c: the smallest use of a router's verdicts from another
 * process, for a program that embeds the decision itself rather than run
 * tally-gateway (tools/gateway/, docs/gateway.md): attach read-only, look
 * the subject up, read it, act. Prints "SUBJECT admit|shed VERDICT" for
 * each subject on the command line; exits 1 if any would be shed.
 *
 *   verdict [-s SEGMENT] SUBJECT...
 */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include <tally/tally.h>

int main(int argc, char **argv)
{
	const char *name = "tally";
	struct tally_segment *seg;
	int first = 1, shed = 0;

	if (argc > 2 && strcmp(argv[1], "-s") == 0)
		name = argv[2], first = 3;
	if (first >= argc) {
		fprintf(stderr, "usage: verdict [-s SEGMENT] SUBJECT...\n");
		return 2;
	}
	if (tally_segment_open(name, TALLY_OPEN_READER, 0, &seg) != 0) {
		fprintf(stderr, "verdict: %s: admitting everything (fail-open)\n", tally_errmsg());
		return 0;
	}
	for (int i = first; i < argc; i++) {
		struct tally_subject_stats s = { .verdict = TALLY_VERDICT_UNKNOWN };
		tally_subject_t id;
		/* stale data (its owner stopped publishing) is no verdict: fail open */
		if (tally_subject_lookup(seg, argv[i], &id) != 0 || tally_read_subject(seg, id, &s) != 0)
			s.verdict = TALLY_VERDICT_UNKNOWN;
		bool overload = s.verdict == TALLY_VERDICT_OVERLOAD;
		printf("%s %s %s\n", argv[i], overload ? "shed" : "admit", tally_verdict_name(s.verdict));
		shed |= overload;
	}
	tally_segment_close(&seg);
	return shed;
}
