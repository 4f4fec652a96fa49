/* SPDX-License-Identifier: MIT */
/*
 * helpers.h: what the tests share: unique segment names, a segment with
 * test-sized defaults, and a drainer that plays the aggregator's part of
 * consumer of every ring (with exact per-subject accounting), for tests of
 * recording that must not depend on the aggregator.
 */
#ifndef TALLY_TEST_HELPERS_H
#define TALLY_TEST_HELPERS_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <tally/tally.h>

/* "tt-<tag>-<pid>-<n>": unique per call, cleaned by tt_cleanup_segments(). */
const char *tt_segname(const char *tag);

/* Test-sized config: 16 slots, 1024-entry rings, 256 subjects, 16 pending,
 * cool-off 50 ms. */
void tt_config(struct tally_segment_config *cfg);

#define TT_MAX_SUBJECTS 1024

struct tt_drainer {
	struct tally_segment *seg;
	pthread_t thread;
	atomic_bool stop;
	atomic_bool running;
	uint32_t reap_every_ms;
	/* results, read after tt_drainer_stop() or under your own sync */
	_Atomic uint64_t per_subject[TT_MAX_SUBJECTS];
	_Atomic uint64_t total, sum, rejected, max_seen;
	_Atomic uint64_t died, released, reused;
};

/* One pass over every ring, then (if reap) the reaper. Returns entries drained. */
uint64_t tt_drain_once(struct tt_drainer *d, bool reap);
void tt_drainer_init(struct tt_drainer *d, struct tally_segment *seg);
void tt_drainer_start(struct tt_drainer *d);
void tt_drainer_stop(struct tt_drainer *d);

/* Sleep ms milliseconds. */
void tt_sleep_ms(unsigned ms);
/* What cmd (run by sh) printed on stdout, NUL-terminated in buf (len > 0).
 * false when it could not be started. */
bool tt_command_output(const char *cmd, char *buf, size_t len);
/* The first 64 KiB of the file at path ("" when it cannot be read), in a
 * static buffer that the next call overwrites. */
const char *tt_file_text(const char *path);

/* A gate for children that run library code: fork them while the test
 * process has no thread of its own running (a child of a multi-threaded
 * process can inherit an allocator lock held by another thread, and gcc
 * 12's ASan allocator is not fork-safe: it deadlocks), let them wait at
 * the gate, start the threads, then open it. */
struct tt_gate {
	int fd[2];
};
void tt_gate_init(struct tt_gate *g);
void tt_gate_wait(struct tt_gate *g); /* in a child: returns once opened */
void tt_gate_open(struct tt_gate *g); /* in the parent: releases every child */

/* Recorded/dropped/clamped counters of slot i as the segment holds them. */
struct tt_slot_view {
	uint32_t state;
	int32_t pid, tid;
	uint64_t generation, tail, head, dropped, clamped, base, claims;
};
void tt_slot_view(struct tally_segment *seg, uint32_t i, struct tt_slot_view *out);

/*
 * A program of the build that another user can run. A test that runs a
 * built program as another user (setuid to 65534) cannot exec it where it
 * was built when that user cannot enter the tree (a clone under /root):
 * this copies the real binary (tools/.libs/PROG behind libtool's wrapper
 * script, or tools/PROG when there is none) into a new 0755 directory
 * under /tmp, with the build's libtally.so* in lib/ beside it. Run
 * tt_foreign_prog.path with LD_LIBRARY_PATH=tt_foreign_prog.libdir.
 * 0, or -errno after a line on stderr saying what failed.
 */
struct tt_foreign_prog {
	char dir[64];
	char path[128];
	char libdir[128];
};
int tt_foreign_prog_make(struct tt_foreign_prog *fp, const char *prog);
/* Remove the copy and its directory. */
void tt_foreign_prog_remove(struct tt_foreign_prog *fp);

#endif
