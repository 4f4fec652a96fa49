/* SPDX-License-Identifier: MIT */
/*
 * tests/common/tallyd_child.c: starts, kills and stops tallyd children for
 * the tests and benchmarks (see tallyd_child.h). The child only opens its
 * log, redirects stdout and stderr to it and execs: nothing of the library
 * runs between fork and exec.
 */
#define _GNU_SOURCE
#include "config.h"
#include "tallyd_child.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <tally/tally.h>

#include "helpers.h"

#ifndef TALLY_TEST_BUILDDIR
#error "TALLY_TEST_BUILDDIR must be defined (tests/Makefile.am)"
#endif
#define TALLYD TALLY_TEST_BUILDDIR "/tools/tallyd"

static unsigned long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (unsigned long long)ts.tv_sec * 1000u + (unsigned long long)ts.tv_nsec / 1000000u;
}

int tt_tallyd_init(struct tt_tallyd *d, const char *tag)
{
	memset(d, 0, sizeof(*d));
	snprintf(d->dir, sizeof(d->dir), "/tmp/tally-host-XXXXXX");
	if (!mkdtemp(d->dir))
		return -errno;
	snprintf(d->cfg, sizeof(d->cfg), "%s/tallyd.ini", d->dir);
	snprintf(d->log, sizeof(d->log), "%s/tallyd.log", d->dir);
	snprintf(d->seg, sizeof(d->seg), "%s", tt_segname(tag));
	return 0;
}

int tt_tallyd_write_cfg(struct tt_tallyd *d, const char *text)
{
	FILE *f = fopen(d->cfg, "w");

	if (!f)
		return -errno;
	fputs(text, f);
	return fclose(f) == 0 ? 0 : -errno;
}

const char *tt_tallyd_log(const struct tt_tallyd *d)
{
	return tt_file_text(d->log);
}

bool tt_tallyd_wait_log(struct tt_tallyd *d, const char *needle, unsigned timeout_ms)
{
	unsigned long long end = now_ms() + timeout_ms;

	do {
		if (strstr(tt_tallyd_log(d), needle))
			return true;
		if (d->pid > 0 && waitpid(d->pid, &d->status, WNOHANG) == d->pid) {
			d->pid = 0;
			return strstr(tt_tallyd_log(d), needle) != NULL;
		}
		tt_sleep_ms(10);
	} while (now_ms() < end);
	return false;
}

int tt_tallyd_start(struct tt_tallyd *d, unsigned timeout_ms)
{
	const char *argv[] = { TALLYD, "-c", d->cfg, "-s", d->seg, NULL };
	pid_t parent = getpid();

	d->pid = fork();
	if (d->pid < 0)
		return -errno;
	if (d->pid == 0) {
		int fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND, 0600);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent || fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
			_exit(127);
		execv(TALLYD, (char *const *)argv);
		_exit(127);
	}
	return tt_tallyd_wait_log(d, "ready:", timeout_ms) ? 0 : -ETIMEDOUT;
}

static void reap(struct tt_tallyd *d, unsigned timeout_ms)
{
	unsigned long long end = now_ms() + timeout_ms;

	while (d->pid > 0) {
		if (waitpid(d->pid, &d->status, WNOHANG) == d->pid) {
			d->pid = 0;
			return;
		}
		if (now_ms() >= end) {
			kill(d->pid, SIGKILL);
			waitpid(d->pid, &d->status, 0);
			d->pid = 0;
			return;
		}
		tt_sleep_ms(10);
	}
}

void tt_tallyd_kill(struct tt_tallyd *d)
{
	if (d->pid > 0) {
		kill(d->pid, SIGKILL);
		reap(d, 5000);
	}
}

void tt_tallyd_stop(struct tt_tallyd *d)
{
	if (d->pid > 0) {
		kill(d->pid, SIGTERM);
		reap(d, 5000);
	}
	if (d->seg[0])
		tally_segment_unlink(d->seg);
	if (d->dir[0]) {
		unlink(d->cfg);
		unlink(d->log);
		rmdir(d->dir);
	}
	d->seg[0] = d->dir[0] = '\0';
}
