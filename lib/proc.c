/* SPDX-License-Identifier: MIT */
/*
 * proc.c: reads a process's start time from /proc/<pid>/stat and tells
 * whether a process or thread is still the one we recorded. Used by the
 * owner's reaper (every second at most), never on a hot path.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "proc.h"

#define PF_EXITING_FLAG 0x4u /* the kernel's PF_EXITING, field 9 of a task's stat */

/* Start time (field 22), state (field 3) and flags (field 9) from a stat
 * file of /proc; 0 if unreadable. */
static uint64_t stat_file(const char *path, char *state, unsigned long *flags)
{
	char buf[1024];
	ssize_t n;
	int fd;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	/* comm (field 2) may hold spaces and parentheses: skip to the last ')'. */
	char *p = strrchr(buf, ')');
	if (!p)
		return 0;
	if (state)
		*state = p[1] == ' ' ? p[2] : '?';
	/* After ')' each space opens the next field: the first opens field 3,
	 * so the 7th opens field 9 (flags) and the 20th field 22, starttime. */
	for (int spaces = 0; spaces < 20; spaces++) {
		p = strchr(p + 1, ' ');
		if (!p)
			return 0;
		if (spaces == 6 && flags)
			*flags = strtoul(p, NULL, 10);
	}
	return strtoull(p, NULL, 10);
}

/* Is a SIGKILL pending for the task (SigPnd of its status, bit 8)? A
 * group exit (SIGKILL, exit_group) queues one on every thread before any
 * of them runs its exit: a thread not yet scheduled to die shows it. */
static bool kill_pending(pid_t pid, int tid)
{
	char path[80], buf[2048];
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/task/%d/status", (int)pid, tid);
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return true; /* gone meanwhile */
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return true;
	buf[n] = '\0';
	const char *p = strstr(buf, "\nSigPnd:");
	return p && (strtoull(p + 9, NULL, 16) & (1ull << (SIGKILL - 1)));
}

/* Does any thread of pid still run (a task that is neither Z nor X nor
 * exiting, nor about to: a process being killed has threads on their
 * way out)? For a leader that shows Z: the whole process exited, or only
 * its main thread did (pthread_exit). The task directory is read with
 * getdents64 into a stack buffer, not opendir: the owner's reaper runs
 * this, and it must not allocate (a process that forks while this runs
 * in another thread would inherit a malloc lock held, under allocators
 * that are not fork-safe, such as gcc 12's AddressSanitizer). */
static bool any_task_runs(pid_t pid)
{
	char path[64], buf[2048] __attribute__((aligned(8)));
	bool runs = false;
	long n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
	if ((fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
		return false;
	while (!runs && (n = syscall(SYS_getdents64, fd, buf, sizeof(buf))) > 0) {
		for (long off = 0; !runs && off < n;) {
			struct linux_dirent64 {
				uint64_t d_ino;
				int64_t d_off;
				unsigned short d_reclen;
				unsigned char d_type;
				char d_name[];
			} *d = (struct linux_dirent64 *)(void *)(buf + off);
			char state = '?';
			unsigned long flags = PF_EXITING_FLAG;
			int tid;

			if (d->d_reclen == 0)
				break;
			off += d->d_reclen;
			if ((tid = atoi(d->d_name)) <= 0)
				continue;
			snprintf(path, sizeof(path), "/proc/%d/task/%d/stat", (int)pid, tid);
			if (stat_file(path, &state, &flags) && state != 'Z' && state != 'X' &&
			    !(flags & PF_EXITING_FLAG) && !kill_pending(pid, tid))
				runs = true;
		}
	}
	close(fd);
	return runs;
}

static uint64_t stat_of(pid_t pid, char *state)
{
	char path[64];

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	return stat_file(path, state, NULL);
}

uint64_t tally__proc_start_time(pid_t pid)
{
	return stat_of(pid, NULL);
}

bool tally__proc_alive(pid_t pid, uint64_t start_time)
{
	char state = '?';

	if (pid <= 0)
		return false;
	if (kill(pid, 0) != 0 && errno == ESRCH)
		return false;
	uint64_t st = stat_of(pid, &state);
	/* A process we cannot read now (hidepid, a race with its exit) but
	 * that exists counts as alive: death must be proved, never assumed. */
	if (st == 0)
		return kill(pid, 0) == 0 || errno == EPERM;
	/* A zombie (exited, not yet reaped by its parent) is dead to us,
	 * unless only its main thread exited (pthread_exit in main): the
	 * leader then shows Z while the other threads run on. */
	if ((state == 'Z' || state == 'X') && !any_task_runs(pid))
		return false;
	/* Start time unknown when the identity was taken (unreadable then):
	 * the pid alone is all we have, and it exists. */
	return start_time == 0 || st == start_time;
}

static uint64_t clock_ns(clockid_t id)
{
	struct timespec ts;

	clock_gettime(id, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t tally__mono_ns(void)
{
	return clock_ns(CLOCK_MONOTONIC);
}

uint64_t tally__real_ns(void)
{
	return clock_ns(CLOCK_REALTIME);
}
