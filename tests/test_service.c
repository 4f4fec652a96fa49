/* SPDX-License-Identifier: MIT */
/*
 * test_service.c: tallyd as a systemd service, from outside. tallyd runs
 * as a child with NOTIFY_SOCKET naming a unix datagram socket the test
 * binds, as systemd would: READY=1 comes only once /metrics answers (and
 * never when /metrics cannot start), RELOADING=1 then READY=1 around a
 * SIGHUP, STOPPING=1 on SIGTERM, each with a STATUS= line. Also the
 * documented `tallyd --check-config FILE` and the older `--check -c FILE`
 * (exit 0 or 2), and etc/tallyd.service: systemd-analyze verify accepts
 * it (and rejects a broken copy), and make install puts it in the unit
 * directory configure chose.
 */
#include "config.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/helpers.h"
#include "common/http.h"

#define TALLYD TALLY_TEST_BUILDDIR "/tools/tallyd"

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* What a test started, for the suite's fini after a failed assertion. */
static struct svc {
	char dir[64];
	char seg[128];
	char log[160], sock[160], cfg[160];
	int fd;               /* the notify socket */
	pid_t pid;
	char msgs[8192];      /* every datagram so far, one after another */
} the_svc;

static void svc_cleanup(void)
{
	char cmd[128];
	int st;

	if (the_svc.pid > 0) {
		kill(the_svc.pid, SIGKILL);
		waitpid(the_svc.pid, &st, 0);
		the_svc.pid = 0;
	}
	if (the_svc.fd > 0)
		close(the_svc.fd);
	the_svc.fd = 0;
	if (the_svc.seg[0])
		tally_segment_unlink(the_svc.seg);
	if (the_svc.dir[0]) {
		snprintf(cmd, sizeof(cmd), "rm -rf '%.63s'", the_svc.dir);
		if (system(cmd) != 0)
			fprintf(stderr, "cannot remove %s\n", the_svc.dir);
	}
	memset(&the_svc, 0, sizeof(the_svc));
}

TestSuite(service, .fini = svc_cleanup, .timeout = 60);

static const char *file_text(const char *path)
{
	return tt_file_text(path);
}

static void write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	cr_assert_not_null(f, "%s: %s", path, strerror(errno));
	fputs(text, f);
	fclose(f);
}

/* Temp dir, segment name, the notify socket bound in the dir. */
static struct svc *svc_init(const char *tag)
{
	struct svc *s = &the_svc;
	struct sockaddr_un a = { .sun_family = AF_UNIX };

	memset(s, 0, sizeof(*s));
	snprintf(s->dir, sizeof(s->dir), "/tmp/tally-svc-XXXXXX");
	cr_assert_not_null(mkdtemp(s->dir));
	snprintf(s->seg, sizeof(s->seg), "%s", tt_segname(tag));
	snprintf(s->log, sizeof(s->log), "%.63s/tallyd.log", s->dir);
	snprintf(s->sock, sizeof(s->sock), "%.63s/notify", s->dir);
	snprintf(s->cfg, sizeof(s->cfg), "%.63s/tallyd.ini", s->dir);
	snprintf(a.sun_path, sizeof(a.sun_path), "%.100s", s->sock);
	s->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(s->fd, 0);
	cr_assert_eq(bind(s->fd, (struct sockaddr *)&a, sizeof(a)), 0, "%s", strerror(errno));
	return s;
}

/* fork + exec tallyd with NOTIFY_SOCKET; output into the log. */
static void svc_start(struct svc *s, const char *const *argv)
{
	s->pid = fork();
	cr_assert_neq(s->pid, -1);
	if (s->pid == 0) {
		int fd = open(s->log, O_WRONLY | O_CREAT | O_APPEND, 0600);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
			_exit(127);
		setenv("NOTIFY_SOCKET", s->sock, 1);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
}

/* The next datagram (appended to s->msgs) within timeout_ms, or NULL. */
static const char *svc_next(struct svc *s, unsigned timeout_ms)
{
	static char buf[4096];
	struct timeval tv = { .tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000 };
	ssize_t n;

	setsockopt(s->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	n = recv(s->fd, buf, sizeof(buf) - 1, 0);
	if (n < 0)
		return NULL;
	buf[n] = '\0';
	strncat(s->msgs, buf, sizeof(s->msgs) - strlen(s->msgs) - 2);
	strcat(s->msgs, "|");
	return buf;
}

/* Datagrams until one holds want (within timeout_ms): that one, or NULL. */
static const char *svc_until(struct svc *s, const char *want, unsigned timeout_ms)
{
	uint64_t end = now_ms() + timeout_ms;
	const char *m;

	while (now_ms() < end)
		if ((m = svc_next(s, (unsigned)(end - now_ms()) + 1)) && strstr(m, want))
			return m;
	return NULL;
}

static int svc_wait(struct svc *s, unsigned timeout_ms)
{
	uint64_t end = now_ms() + timeout_ms;
	int st = 0;

	while (waitpid(s->pid, &st, WNOHANG) == 0) {
		if (now_ms() >= end) {
			kill(s->pid, SIGKILL);
			waitpid(s->pid, &st, 0);
			s->pid = 0;
			return -1;
		}
		tt_sleep_ms(10);
	}
	s->pid = 0;
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

Test(service, ready_only_once_metrics_answer_then_reloading_and_stopping)
{
	struct svc *s = svc_init("svc-notify");
	int port = tt_free_port();
	char listen[64], *reply;
	const char *m;

	snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
	write_text(s->cfg, "[thresholds]\np95_warn_ms = 100\n");
	svc_start(s, (const char *const[]){ TALLYD, "-c", s->cfg, "-s", s->seg, "--http", listen, NULL });
	m = svc_until(s, "READY=1", 10000);
	cr_assert_not_null(m, "no READY=1; datagrams: %s\nlog:\n%s", s->msgs, file_text(s->log));
	/* at READY=1, /metrics answers already: no retry, no wait */
	cr_expect_eq(tt_http(port, "GET", "/metrics", &reply), 200, "READY=1 before /metrics");
	free(reply);
	cr_expect(strstr(m, "STATUS=running: segment "), "%s", m);
	cr_expect(strstr(m, "/metrics"), "%s", m);
	cr_expect(strstr(file_text(s->log), "ready: segment"), "%s", file_text(s->log));

	/* SIGHUP: RELOADING=1 (with the monotonic time systemd asks for), then READY=1 */
	write_text(s->cfg, "[http]\nlatency_histogram = false\n[thresholds]\np95_warn_ms = 200\n");
	kill(s->pid, SIGHUP);
	m = svc_until(s, "RELOADING=1", 5000);
	cr_assert_not_null(m, "no RELOADING=1: %s", s->msgs);
	cr_expect(strstr(m, "MONOTONIC_USEC="), "%s", m);
	m = svc_until(s, "READY=1", 5000);
	cr_assert_not_null(m, "no READY=1 after the reload: %s", s->msgs);
	cr_expect(strstr(m, "STATUS=running: reloaded"), "%s", m);
	/* [http] is read at start only: a change is said, not applied */
	cr_expect(strstr(file_text(s->log), "reload: changes to [http] take effect only after a restart"),
		  "%s", file_text(s->log));

	/* a reload that fails says so, and tallyd stays ready */
	write_text(s->cfg, "[thresholds]\np95_warn_ms = soon\n");
	kill(s->pid, SIGHUP);
	cr_assert_not_null(svc_until(s, "RELOADING=1", 5000), "%s", s->msgs);
	m = svc_until(s, "READY=1", 5000);
	cr_assert_not_null(m, "%s", s->msgs);
	cr_expect(strstr(m, "the last reload failed"), "%s", m);

	kill(s->pid, SIGTERM);
	m = svc_until(s, "STOPPING=1", 5000);
	cr_expect_not_null(m, "no STOPPING=1: %s", s->msgs);
	cr_expect_eq(svc_wait(s, 10000), 0, "%s", file_text(s->log));
}

Test(service, no_ready_when_metrics_cannot_start)
{
	struct svc *s = svc_init("svc-noready");
	struct sockaddr_in a = { .sin_family = AF_INET };
	socklen_t len = sizeof(a);
	char addr[64];
	int busy = socket(AF_INET, SOCK_STREAM, 0);

	/* the port taken by the test itself */
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	cr_assert_eq(bind(busy, (struct sockaddr *)&a, sizeof(a)), 0);
	cr_assert_eq(listen(busy, 1), 0);
	cr_assert_eq(getsockname(busy, (struct sockaddr *)&a, &len), 0);
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", ntohs(a.sin_port));
	svc_start(s, (const char *const[]){ TALLYD, "-s", s->seg, "--http", addr, NULL });
	cr_expect_eq(svc_wait(s, 10000), 1, "%s", file_text(s->log));
	while (svc_next(s, 200))
		;
	cr_expect(!strstr(s->msgs, "READY=1"), "READY=1 without /metrics: %s", s->msgs);
	cr_expect(strstr(file_text(s->log), "address already in use"), "%s", file_text(s->log));
	close(busy);
}

/* tallyd with argv (no notify socket): its exit code, output in s->log. */
static int run_tallyd(struct svc *s, const char *const *argv)
{
	unlink(s->log);
	svc_start(s, argv);
	return svc_wait(s, 10000);
}

Test(service, check_config_documented_form_and_the_old_one)
{
	struct svc *s = svc_init("svc-check");
	char bad[160];

	write_text(s->cfg, "[http]\nlisten = 127.0.0.1:0\n[thresholds]\np95_warn_ms = 100\n");
	snprintf(bad, sizeof(bad), "%s/bad.ini", s->dir);
	write_text(bad, "[http]\nlisten = 127.0.0.1:0\n\n[thresholds]\np95_warn_ms = 100ms\n");

	cr_expect_eq(run_tallyd(s, (const char *const[]){ TALLYD, "--check-config", s->cfg, NULL }), 0,
		     "%s", file_text(s->log));
	cr_expect(strstr(file_text(s->log), "is valid"), "%s", file_text(s->log));
	cr_expect_eq(run_tallyd(s, (const char *const[]){ TALLYD, "--check", "-c", s->cfg, NULL }), 0,
		     "%s", file_text(s->log));
	cr_expect_eq(run_tallyd(s, (const char *const[]){ TALLYD, "-t", "-c", s->cfg, NULL }), 0,
		     "%s", file_text(s->log));
	cr_expect_eq(run_tallyd(s, (const char *const[]){ TALLYD, "--check-config", s->cfg, "-c",
							   s->cfg, NULL }), 0, "%s", file_text(s->log));

	char want[200];
	snprintf(want, sizeof(want), "%s:5: p95_warn_ms = \"100ms\"", bad);
	cr_expect_eq(run_tallyd(s, (const char *const[]){ TALLYD, "--check-config", bad, NULL }), 2,
		     "%s", file_text(s->log));
	cr_expect(strstr(file_text(s->log), want), "want %s in:\n%s", want, file_text(s->log));
	cr_expect_eq(run_tallyd(s, (const char *const[]){ TALLYD, "--check", "-c", bad, NULL }), 2,
		     "%s", file_text(s->log));
	cr_expect(strstr(file_text(s->log), want), "want %s in:\n%s", want, file_text(s->log));

	/* two different files, a missing file, no argument: usage or config errors, 2 */
	cr_expect_eq(run_tallyd(s, (const char *const[]){ TALLYD, "--check-config", s->cfg, "-c", bad,
							   NULL }), 2);
	cr_expect(strstr(file_text(s->log), "name two files"), "%s", file_text(s->log));
	cr_expect_eq(run_tallyd(s, (const char *const[]){ TALLYD, "--check-config", "/nonexistent.ini",
							   NULL }), 2);
	cr_expect(strstr(file_text(s->log), "/nonexistent.ini: cannot read"), "%s", file_text(s->log));
	cr_expect_eq(run_tallyd(s, (const char *const[]){ TALLYD, "--check-config", NULL }), 2);
	/* documented in --help */
	cr_expect_eq(run_tallyd(s, (const char *const[]){ TALLYD, "--help", NULL }), 0);
	cr_expect(strstr(file_text(s->log), "--check-config FILE"), "%s", file_text(s->log));
}

/* sh -c cmd, output into s->log: the exit code. */
static int shell(struct svc *s, const char *cmd)
{
	return run_tallyd(s, (const char *const[]){ "/bin/sh", "-c", cmd, NULL });
}

Test(service, unit_verifies_and_installs)
{
	struct svc *s = svc_init("svc-unit");
	char cmd[1024], unit[200];

	/* make install, into a DESTDIR: the unit lands in the configured unit dir */
	snprintf(cmd, sizeof(cmd), "make -s -C '%s/tools' install-systemdsystemunitDATA DESTDIR='%s/root' "
		 "&& find '%s/root' -name tallyd.service", TALLY_TEST_BUILDDIR, s->dir, s->dir);
	cr_assert_eq(shell(s, cmd), 0, "%s", file_text(s->log));
	cr_assert(strstr(file_text(s->log), "/systemd/system/tallyd.service"), "%s", file_text(s->log));
	/* the last line: find's */
	const char *found = strstr(file_text(s->log), "/systemd/system/tallyd.service");

	while (found > file_text(s->log) && found[-1] != '\n')
		found--;
	snprintf(unit, sizeof(unit), "%.180s", found);
	unit[strcspn(unit, "\n")] = '\0';
	const char *text = file_text(unit);

	cr_expect(strstr(text, "Type=notify\n"), "%s", text);
	cr_expect(strstr(text, "ExecReload=/bin/kill -HUP $MAINPID\n"), "%s", text);
	cr_expect(strstr(text, "/tallyd --check-config ${TALLYD_CONFIG}\n"), "%s", text);
	cr_expect(!strstr(text, "@bindir@") && !strstr(text, "@sysconfdir@"), "%s", text);
	cr_expect(strstr(text, "PrivateDevices=no\n"), "/dev/shm must be the host's: %s", text);

	/* systemd-analyze verify, with ExecStart pointing at this build's tallyd */
	snprintf(cmd, sizeof(cmd), "sed -e 's|@bindir@|%s/tools|g' -e 's|@sysconfdir@|/etc|g' "
		 "'%s/etc/tallyd.service' > '%s/tallyd.service' && "
		 "systemd-analyze verify --man=no '%s/tallyd.service'", TALLY_TEST_BUILDDIR,
		 TALLY_TEST_SRCDIR, s->dir, s->dir);
	/* silent: a key it does not know or a value it cannot parse is only a
	 * message ("..., ignoring") with exit status 0 */
	cr_expect_eq(shell(s, cmd), 0, "systemd-analyze verify:\n%s", file_text(s->log));
	cr_expect_str_eq(file_text(s->log), "", "systemd-analyze verify says something");
	/* the same check catches a unit with a mistake in it */
	snprintf(cmd, sizeof(cmd), "sed -i 's|^Type=notify|Type=notifyy|' '%s/tallyd.service' && "
		 "systemd-analyze verify --man=no '%s/tallyd.service'", s->dir, s->dir);
	shell(s, cmd);
	cr_expect(strstr(file_text(s->log), "Failed to parse service type"), "a broken unit verified:"
		  "\n%s", file_text(s->log));
}
