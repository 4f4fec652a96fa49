/* SPDX-License-Identifier: MIT */
/*
 * failpoint.h (private): named points in the claim, intern and detach
 * protocols where a test may stop the process (SIGKILL) to prove that
 * nothing stays stuck. tally__failpoint_hook is NULL except in a test
 * that sets it (tests link the internal library); the check costs one
 * load of a global on slow paths only, never on the record path.
 *
 * Points: "claim.claimed" (slot CLAIMING, nothing written), "claim.filled"
 * (claim written, not yet ACTIVE), "detach.before" (about to store
 * RELEASING), "intern.claimed" (subject entry CLAIMED, no name),
 * "intern.named" (name written, not yet READY).
 */
#ifndef TALLY_LIB_FAILPOINT_H
#define TALLY_LIB_FAILPOINT_H

extern void (*tally__failpoint_hook)(const char *point);

#define TALLY__FAILPOINT(point)                                          \
	do {                                                             \
		if (__builtin_expect(tally__failpoint_hook != NULL, 0)) \
			tally__failpoint_hook(point);                    \
	} while (0)

#endif /* TALLY_LIB_FAILPOINT_H */
