/* SPDX-License-Identifier: MIT */
/*
 * tests/common/nats_server.c: starts, watches and stops a real nats-server
 * child for the tests and benchmarks (see nats_server.h). A port comes
 * from binding port 0 on loopback; if another process grabs it before the
 * server binds, the server exits and start tries another port. Readiness
 * means: the TCP port accepts and the server sends its INFO line (with
 * "jetstream":true when JetStream was asked for). Output goes to
 * server.log in the temp dir, whose tail lands in errmsg on failure.
 */
#define _GNU_SOURCE
#include "nats_server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define READY_TIMEOUT_MS 10000
#define STOP_GRACE_MS    5000
#define START_TRIES      5

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static bool executable(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0;
}

/* $TALLY_NATS_SERVER, else nats-server on PATH, else /usr/bin/nats-server. */
static int find_binary(struct tally_test_nats *n)
{
	const char *env = getenv("TALLY_NATS_SERVER");
	const char *path = getenv("PATH");

	if (env && *env) {
		snprintf(n->binary, sizeof(n->binary), "%s", env);
		if (executable(n->binary))
			return 0;
		snprintf(n->errmsg, sizeof(n->errmsg),
			 "TALLY_NATS_SERVER=%s is not an executable file", env);
		return -ENOENT;
	}
	while (path && *path) {
		size_t len = strcspn(path, ":");

		snprintf(n->binary, sizeof(n->binary), "%.*s/nats-server", (int)len, path);
		if (len && executable(n->binary))
			return 0;
		path += len + (path[len] == ':');
	}
	snprintf(n->binary, sizeof(n->binary), "/usr/bin/nats-server");
	if (executable(n->binary))
		return 0;
	snprintf(n->errmsg, sizeof(n->errmsg),
		 "nats-server not found (not on PATH, not /usr/bin/nats-server): "
		 "install it (Debian: apt-get install nats-server) or set TALLY_NATS_SERVER");
	return -ENOENT;
}

static int free_port(void)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t sl = sizeof(sa);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int port = -errno;

	if (fd < 0)
		return port;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
	    getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
		port = ntohs(sa.sin_port);
	else
		port = -errno;
	close(fd);
	return port;
}

/* Tail of server.log into errmsg after prefix. */
static void log_tail(struct tally_test_nats *n, const char *prefix)
{
	char path[300], buf[320];
	ssize_t got = 0;
	int fd;

	snprintf(path, sizeof(path), "%s/server.log", n->store_dir);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		off_t end = lseek(fd, 0, SEEK_END);

		lseek(fd, end > (off_t)sizeof(buf) - 1 ? end - (off_t)sizeof(buf) + 1 : 0, SEEK_SET);
		got = read(fd, buf, sizeof(buf) - 1);
		close(fd);
	}
	buf[got > 0 ? got : 0] = '\0';
	snprintf(n->errmsg, sizeof(n->errmsg), "%s (%s); server.log ends: %s",
		 prefix, n->binary, buf);
}

/* argv for execv, pointing into strings (a scratch copy of n->extra). */
static void build_argv(struct tally_test_nats *n, char *strings, size_t cap, char **argv)
{
	int i = 0;
	char *save = NULL, *tok;

	snprintf(strings, cap, "%d%c%s/js%c%s", n->port, '\0', n->store_dir, '\0', n->extra);
	argv[i++] = n->binary;
	argv[i++] = (char *)"-a";
	argv[i++] = (char *)"127.0.0.1";
	argv[i++] = (char *)"-p";
	argv[i++] = strings;
	if (n->jetstream) {
		argv[i++] = (char *)"-js";
		argv[i++] = (char *)"-sd";
		argv[i++] = strings + strlen(strings) + 1;
	}
	tok = strings + strlen(strings) + 1;
	tok += strlen(tok) + 1;
	for (tok = strtok_r(tok, " \t", &save); tok && i < TALLY_TEST_NATS_ARGS_MAX + 8;
	     tok = strtok_r(NULL, " \t", &save))
		argv[i++] = tok;
	argv[i] = NULL;
}

static int spawn(struct tally_test_nats *n)
{
	char strings[600], logpath[300];
	char *argv[TALLY_TEST_NATS_ARGS_MAX + 10];
	int logfd;
	pid_t parent = getpid(), pid;

	build_argv(n, strings, sizeof(strings), argv);
	snprintf(logpath, sizeof(logpath), "%s/server.log", n->store_dir);
	logfd = open(logpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	if (logfd < 0)
		return -errno;
	pid = fork();
	if (pid == 0) {
		/* Child: only async-signal-safe calls until exec. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(127);
		dup2(logfd, 1);
		dup2(logfd, 2);
		execv(argv[0], argv);
		_exit(127);
	}
	close(logfd);
	if (pid < 0)
		return -errno;
	n->pid = pid;
	return 0;
}

/* Reads the INFO line: 1 when it is a NATS server (with JetStream if asked), else 0. */
static int probe(const struct tally_test_nats *n)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)n->port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	char buf[4096];
	struct pollfd pfd;
	ssize_t got = 0;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), ok = 0;

	if (fd < 0)
		return 0;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
		pfd = (struct pollfd){ .fd = fd, .events = POLLIN };
		if (poll(&pfd, 1, 1000) == 1)
			got = read(fd, buf, sizeof(buf) - 1);
	}
	close(fd);
	if (got > 5) {
		buf[got] = '\0';
		ok = strncmp(buf, "INFO ", 5) == 0 &&
		     (!n->jetstream || strstr(buf, "\"jetstream\":true") != NULL);
	}
	return ok;
}

/* 0 when ready; -ECHILD when the child exited; -ETIMEDOUT. */
static int wait_ready(struct tally_test_nats *n)
{
	long long deadline = now_ms() + READY_TIMEOUT_MS;
	int status;

	while (now_ms() < deadline) {
		if (waitpid(n->pid, &status, WNOHANG) == n->pid) {
			n->pid = 0;
			return -ECHILD;
		}
		if (probe(n))
			return 0;
		sleep_ms(20);
	}
	return -ETIMEDOUT;
}

static void reap(struct tally_test_nats *n, int grace_ms)
{
	long long deadline = now_ms() + grace_ms;
	int status;

	if (n->pid <= 0)
		return;
	while (grace_ms > 0 && now_ms() < deadline) {
		if (waitpid(n->pid, &status, WNOHANG) == n->pid) {
			n->pid = 0;
			return;
		}
		sleep_ms(10);
	}
	kill(n->pid, SIGKILL);
	while (waitpid(n->pid, &status, 0) < 0 && errno == EINTR)
		;
	n->pid = 0;
}

/* Spawn and wait; on a port collision (child exits) retry with a new port if allowed. */
static int launch(struct tally_test_nats *n, bool new_port_on_exit, int tries)
{
	int rc = -ECHILD;

	for (int i = 0; i < tries && rc == -ECHILD; i++) {
		if (new_port_on_exit || n->port <= 0) {
			n->port = free_port();
			if (n->port < 0)
				return n->port;
		}
		rc = spawn(n);
		if (rc < 0) {
			snprintf(n->errmsg, sizeof(n->errmsg), "fork: %s", strerror(-rc));
			return rc;
		}
		rc = wait_ready(n);
		if (rc == -ECHILD && !new_port_on_exit)
			sleep_ms(200);
	}
	if (rc == -ETIMEDOUT) {
		kill(n->pid, SIGKILL);
		reap(n, 0);
	}
	if (rc < 0)
		log_tail(n, rc == -ETIMEDOUT ? "nats-server did not answer within 10 s"
					     : "nats-server exited at start");
	else
		snprintf(n->url, sizeof(n->url), "nats://127.0.0.1:%d", n->port);
	return rc;
}

int tally_test_nats_start(struct tally_test_nats *n, const char *extra_args, bool jetstream)
{
	int rc;

	memset(n, 0, sizeof(*n));
	n->jetstream = jetstream;
	if (extra_args && strlen(extra_args) >= sizeof(n->extra)) {
		snprintf(n->errmsg, sizeof(n->errmsg), "extra_args too long");
		return -E2BIG;
	}
	snprintf(n->extra, sizeof(n->extra), "%s", extra_args ? extra_args : "");
	rc = find_binary(n);
	if (rc < 0)
		return rc;
	snprintf(n->store_dir, sizeof(n->store_dir), "%s/tally-nats-XXXXXX",
		 getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (!mkdtemp(n->store_dir)) {
		rc = -errno;
		snprintf(n->errmsg, sizeof(n->errmsg), "mkdtemp %s: %s", n->store_dir, strerror(errno));
		n->store_dir[0] = '\0';
		return rc;
	}
	return launch(n, true, START_TRIES);
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

void tally_test_nats_stop(struct tally_test_nats *n)
{
	if (n->pid > 0) {
		kill(n->pid, SIGTERM);
		reap(n, STOP_GRACE_MS);
	}
	if (n->store_dir[0])
		nftw(n->store_dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
	n->store_dir[0] = '\0';
}

void tally_test_nats_kill(struct tally_test_nats *n)
{
	if (n->pid > 0) {
		kill(n->pid, SIGKILL);
		reap(n, 0);
	}
}

int tally_test_nats_restart(struct tally_test_nats *n)
{
	tally_test_nats_kill(n);
	/* Same port: retry while the old socket or a stranger still holds it (~10 s). */
	return launch(n, false, 20);
}
