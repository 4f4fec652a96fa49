/* SPDX-License-Identifier: MIT */
/*
 * proc.h: identity of processes and threads, from /proc. A pid alone is
 * not an identity (pids are reused); pid + start time is.
 */
#ifndef TALLY_LIB_PROC_H
#define TALLY_LIB_PROC_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

/* Start time of pid (field 22 of /proc/<pid>/stat, clock ticks after
 * boot), or 0 if the process does not exist or cannot be read. */
uint64_t tally__proc_start_time(pid_t pid);

/* true unless pid is proved gone: it does not exist, is a zombie, or has
 * another start time than the given one (0: unknown, the pid alone
 * decides). A pid <= 0 is never alive. Liveness is per process only:
 * threads come and go while their process's handles live on. */
bool tally__proc_alive(pid_t pid, uint64_t start_time);

/* CLOCK_MONOTONIC and CLOCK_REALTIME in ns. */
uint64_t tally__mono_ns(void);
uint64_t tally__real_ns(void);

#endif /* TALLY_LIB_PROC_H */
