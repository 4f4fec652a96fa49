/* SPDX-License-Identifier: MIT */
/*
 * tests/common/tallyd_child.h: a tallyd child process for the tests and
 * benchmarks of many hosts: its own temp dir (tallyd.ini, tallyd.log), its
 * own segment name, started with fork + exec (never library code in the
 * child: ASan's fork rule, helpers.h tt_gate), stopped with SIGTERM, or
 * killed with SIGKILL, always by its pid. It gets PR_SET_PDEATHSIG, so it
 * dies with the thread that started it if a test crashes.
 */
#ifndef TALLY_TEST_TALLYD_CHILD_H
#define TALLY_TEST_TALLYD_CHILD_H

#include <stdbool.h>
#include <sys/types.h>

struct tt_tallyd {
	pid_t pid;
	int status;        /* after it exited */
	char dir[64];      /* temp dir */
	char cfg[128], log[128];
	char seg[128];     /* segment name */
};

/* Temp dir and segment name (tag in it). 0 or -errno. */
int tt_tallyd_init(struct tt_tallyd *d, const char *tag);

/* Write tallyd.ini (the whole text). 0 or -errno. */
int tt_tallyd_write_cfg(struct tt_tallyd *d, const char *text);

/* fork + exec BUILDDIR/tools/tallyd -c CFG -s SEG; wait for "ready:" in its
 * log (up to timeout_ms). 0, -ETIMEDOUT (its log tells why), -errno. */
int tt_tallyd_start(struct tt_tallyd *d, unsigned timeout_ms);

/* Its log so far (a static buffer, 64 KiB at most). */
const char *tt_tallyd_log(const struct tt_tallyd *d);

/* Wait until the log holds needle; true if it does within timeout_ms. */
bool tt_tallyd_wait_log(struct tt_tallyd *d, const char *needle, unsigned timeout_ms);

/* SIGKILL and reap (its segment stays, owner dead). */
void tt_tallyd_kill(struct tt_tallyd *d);

/* SIGTERM (SIGKILL after 5 s), reap, unlink the segment, remove the dir. Idempotent. */
void tt_tallyd_stop(struct tt_tallyd *d);

#endif /* TALLY_TEST_TALLYD_CHILD_H */
