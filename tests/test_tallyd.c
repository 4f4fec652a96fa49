/* SPDX-License-Identifier: MIT */
/*
 * test_tallyd.c: the daemon, run as a child process of the test
 * (TALLY_TEST_BUILDDIR/tools/tallyd) with a temporary config file and its
 * stderr in a log file: it creates and removes its segment, refuses a
 * segment with a live owner and names that owner's pid, replaces a dead
 * owner's leftovers only with --replace, rejects bad usage and bad config
 * lines with FILE:LINE (exit 2), keeps running on SIGHUP with a bad file,
 * applies new thresholds on SIGHUP without losing statistics, stops
 * cleanly on SIGTERM (exit 0, segment removed; kept with --keep), honours
 * TALLY_SEGMENT, and polls a real nats-server's consumers.
 *
 * Every wait is bounded; a tallyd left behind by a failed assertion dies
 * with the test process (PR_SET_PDEATHSIG).
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <nats/nats.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/helpers.h"
#include "common/nats_server.h"

#define TALLYD TALLY_TEST_BUILDDIR "/tools/tallyd"

/* ---- a tallyd child ---- */

struct td {
	pid_t pid;
	int status;       /* after td_wait_exit */
	char dir[64];     /* temp dir: tallyd.ini, tallyd.log */
	char cfg[128], log[128];
	char seg[128];
};

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/*
 * The tallyds of a test live here, not on its stack, so that the suite's
 * fini can stop them after a failed assertion (which leaves the test's
 * frame). Each test runs in a process of its own.
 */
static struct td pool[4];
static bool pool_used[4];

static void td_cleanup(struct td *d);

static void suite_fini(void)
{
	for (size_t i = 0; i < 4; i++)
		if (pool_used[i])
			td_cleanup(&pool[i]);
}

TestSuite(tallyd, .fini = suite_fini, .timeout = 40);

static struct td *td_new(const char *tag)
{
	struct td *d = NULL;

	for (size_t i = 0; i < 4 && !d; i++) {
		if (!pool_used[i]) {
			pool_used[i] = true;
			d = &pool[i];
		}
	}
	cr_assert_not_null(d);
	memset(d, 0, sizeof(*d));
	snprintf(d->dir, sizeof(d->dir), "/tmp/tallyd-test-XXXXXX");
	cr_assert_not_null(mkdtemp(d->dir));
	snprintf(d->cfg, sizeof(d->cfg), "%s/tallyd.ini", d->dir);
	snprintf(d->log, sizeof(d->log), "%s/tallyd.log", d->dir);
	snprintf(d->seg, sizeof(d->seg), "%s", tt_segname(tag));
	return d;
}

__attribute__((format(printf, 2, 3))) static void td_write_cfg(struct td *d, const char *fmt, ...)
{
	char tmp[160];
	va_list ap;
	FILE *f;

	/* written beside and renamed: a SIGHUP never reads half a file */
	snprintf(tmp, sizeof(tmp), "%s.new", d->cfg);
	f = fopen(tmp, "w");
	cr_assert_not_null(f);
	va_start(ap, fmt);
	vfprintf(f, fmt, ap);
	va_end(ap);
	cr_assert_eq(fclose(f), 0);
	cr_assert_eq(rename(tmp, d->cfg), 0);
}

/* Start tallyd with argv (NULL-terminated, without the program name). */
static void td_startv(struct td *d, const char *const *args)
{
	const char *argv[32] = { TALLYD };
	size_t n = 1;

	for (; args && *args && n < 31; args++)
		argv[n++] = *args;
	argv[n] = NULL;
	d->pid = fork();
	cr_assert_neq(d->pid, -1);
	if (d->pid == 0) {
		int fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND, 0600);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
			_exit(127);
		execv(TALLYD, (char *const *)argv);
		_exit(127);
	}
}

/* The whole log so far (static buffer). */
static const char *td_logtext(const struct td *d)
{
	return tt_file_text(d->log);
}

/* Wait until the log holds needle (true) or timeout_ms passes, or tallyd exits. */
static bool td_wait_log(struct td *d, const char *needle, unsigned timeout_ms)
{
	uint64_t end = now_ms() + timeout_ms;

	do {
		if (strstr(td_logtext(d), needle))
			return true;
		tt_sleep_ms(10);
	} while (now_ms() < end);
	return strstr(td_logtext(d), needle) != NULL;
}

/* Count of needle in the log. */
static int td_log_count(struct td *d, const char *needle)
{
	const char *s = td_logtext(d);
	int n = 0;

	while ((s = strstr(s, needle))) {
		n++;
		s += strlen(needle);
	}
	return n;
}

static bool td_wait_exit(struct td *d, unsigned timeout_ms)
{
	uint64_t end = now_ms() + timeout_ms;

	while (d->pid > 0) {
		pid_t r = waitpid(d->pid, &d->status, WNOHANG);

		if (r == d->pid) {
			d->pid = 0;
			return true;
		}
		if (now_ms() >= end)
			return false;
		tt_sleep_ms(10);
	}
	return true;
}

static int td_exit_code(const struct td *d)
{
	return WIFEXITED(d->status) ? WEXITSTATUS(d->status) : 128 + WTERMSIG(d->status);
}

/* Run to completion (bounded): the exit code. */
static int td_run(struct td *d, const char *const *args)
{
	td_startv(d, args);
	cr_assert(td_wait_exit(d, 10000), "tallyd did not exit; log:\n%s", td_logtext(d));
	return td_exit_code(d);
}

static void td_start_ready(struct td *d, const char *const *args)
{
	td_startv(d, args);
	cr_assert(td_wait_log(d, "ready:", 10000), "tallyd not ready; log:\n%s", td_logtext(d));
}

/* SIGTERM and wait; kill -9 if it hangs; removes the temp dir. */
static void td_cleanup(struct td *d)
{
	char path[200];

	for (size_t i = 0; i < 4; i++)
		if (&pool[i] == d)
			pool_used[i] = false;
	if (d->pid > 0) {
		kill(d->pid, SIGTERM);
		if (!td_wait_exit(d, 5000)) {
			kill(d->pid, SIGKILL);
			td_wait_exit(d, 5000);
		}
	}
	tally_segment_unlink(d->seg);
	snprintf(path, sizeof(path), "%s.new", d->cfg);
	unlink(path);
	unlink(d->cfg);
	unlink(d->log);
	rmdir(d->dir);
}

static bool seg_exists(const char *name)
{
	char path[256];

	snprintf(path, sizeof(path), "/dev/shm/%s", name);
	return access(path, F_OK) == 0;
}

/* ---- start, stop, keep ---- */

Test(tallyd, creates_then_removes_segment_on_sigterm)
{
	struct td *d;
	struct tally_segment *seg = NULL;
	struct tally_segment_info info;

	d = td_new("td-start");
	td_write_cfg(d, "[segment]\nname = %s\nproducer_slots = 8\nring_capacity = 1024\n"
			 "subject_capacity = 64\npending_capacity = 8\n[http]\nenabled = false\n",
		     d->seg);
	td_start_ready(d, (const char *const[]){ "-c", d->cfg, NULL });
	cr_assert_eq(tally_segment_open(d->seg, TALLY_OPEN_READER, 1000, &seg), 0, "%s",
		     tally_errmsg());
	cr_assert_eq(tally_segment_info(seg, &info), 0);
	cr_expect_eq(info.owner_pid, d->pid);
	cr_expect_eq(info.config.producer_slots, 8);
	cr_expect_eq(info.config.subject_capacity, 64);
	cr_expect(info.owner_alive);
	tally_segment_close(&seg);
	cr_expect(strstr(td_logtext(d), "Z tallyd[") && strstr(td_logtext(d), "] info: ready:"),
		  "log lines carry an ISO time, the pid and a level:\n%s", td_logtext(d));

	kill(d->pid, SIGTERM);
	cr_assert(td_wait_exit(d, 5000), "no exit after SIGTERM");
	cr_expect_eq(td_exit_code(d), 0, "exit %d; log:\n%s", td_exit_code(d), td_logtext(d));
	cr_expect(!seg_exists(d->seg), "segment left in /dev/shm");
	cr_expect_eq(tally_segment_open(d->seg, TALLY_OPEN_READER, 0, &seg), -ENOENT);
	td_cleanup(d);
}

Test(tallyd, sigint_and_keep)
{
	struct td *d;
	struct tally_segment *seg = NULL;
	struct tally_segment_info info;

	d = td_new("td-keep");
	td_start_ready(d, (const char *const[]){ "-s", d->seg, "--no-http", "--keep", NULL });
	kill(d->pid, SIGINT);
	cr_assert(td_wait_exit(d, 5000));
	cr_expect_eq(td_exit_code(d), 0);
	cr_assert(seg_exists(d->seg), "--keep removed the segment; log:\n%s", td_logtext(d));
	cr_assert_eq(tally_segment_open(d->seg, TALLY_OPEN_READER, 1000, &seg), 0);
	cr_assert_eq(tally_segment_info(seg, &info), 0);
	cr_expect(info.owner_stopped, "a kept segment says its owner stopped");
	cr_expect_eq(tally_segment_owner_alive(seg), 0);
	tally_segment_close(&seg);
	td_cleanup(d);
}

Test(tallyd, segment_name_from_environment)
{
	struct td *d;
	struct tally_segment *seg = NULL;

	d = td_new("td-env");
	setenv("TALLY_SEGMENT", d->seg, 1);
	td_start_ready(d, (const char *const[]){ "--no-http", NULL });
	unsetenv("TALLY_SEGMENT");
	cr_expect_eq(tally_segment_open(d->seg, TALLY_OPEN_READER, 1000, &seg), 0, "%s",
		     tally_errmsg());
	tally_segment_close(&seg);
	td_cleanup(d);
}

/* ---- owners ---- */

Test(tallyd, second_tallyd_on_a_live_segment_is_refused)
{
	struct td *a, *b;
	char pid[32];

	a = td_new("td-two");
	b = td_new("td-two-b");
	strcpy(b->seg, a->seg);
	td_start_ready(a, (const char *const[]){ "-s", a->seg, "--no-http", NULL });
	int rc = td_run(b, (const char *const[]){ "-s", a->seg, "--no-http", NULL });

	cr_expect_eq(rc, 1, "second tallyd exit %d; log:\n%s", rc, td_logtext(b));
	snprintf(pid, sizeof(pid), "pid %d", (int)a->pid);
	cr_expect(strstr(td_logtext(b), pid), "the refusal names the live owner (%s):\n%s", pid,
		  td_logtext(b));
	cr_expect_eq(kill(a->pid, 0), 0, "the first tallyd is still running");
	cr_expect(seg_exists(a->seg), "the refused tallyd left the owner's segment alone");
	b->seg[0] = '\0';
	td_cleanup(b);
	td_cleanup(a);
}

Test(tallyd, dead_owner_replaced_only_with_replace)
{
	struct td *a, *b;

	a = td_new("td-dead");
	b = td_new("td-dead-b");
	strcpy(b->seg, a->seg);
	td_start_ready(a, (const char *const[]){ "-s", a->seg, "--no-http", NULL });
	pid_t apid = a->pid;
	kill(a->pid, SIGKILL);
	cr_assert(td_wait_exit(a, 5000));
	cr_assert(seg_exists(a->seg));

	int rc = td_run(b, (const char *const[]){ "-s", a->seg, "--no-http", NULL });
	cr_expect_eq(rc, 1, "exit %d; log:\n%s", rc, td_logtext(b));
	cr_expect(strstr(td_logtext(b), "--replace"), "the refusal says how to replace:\n%s",
		  td_logtext(b));

	cr_expect(strstr(td_logtext(b), "died without closing it"), "the refusal says the owner died:\n%s",
		  td_logtext(b));

	td_start_ready(b, (const char *const[]){ "-s", a->seg, "--no-http", "--replace", NULL });
	char what[64];
	snprintf(what, sizeof(what), "of owner pid %d (died without closing it)", (int)apid);
	cr_expect(strstr(td_logtext(b), "--replace: replacing segment") && strstr(td_logtext(b), what),
		  "--replace logs what it replaced (%s):\n%s", what, td_logtext(b));
	kill(b->pid, SIGTERM);
	cr_assert(td_wait_exit(b, 5000));
	cr_expect_eq(td_exit_code(b), 0);
	cr_expect(!seg_exists(a->seg));
	td_cleanup(b);
	a->seg[0] = '\0';
	td_cleanup(a);
}

/* A clean stop with --keep leaves the segment for readers: a restart
 * without --replace says exactly that (not that the owner died), and
 * --replace logs that it takes a kept segment. */
Test(tallyd, kept_segment_is_named_as_kept_on_restart)
{
	struct td *a, *b;

	a = td_new("td-kept");
	b = td_new("td-kept-b");
	strcpy(b->seg, a->seg);
	td_start_ready(a, (const char *const[]){ "-s", a->seg, "--no-http", "--keep", NULL });
	kill(a->pid, SIGTERM);
	cr_assert(td_wait_exit(a, 5000));
	cr_expect_eq(td_exit_code(a), 0);
	cr_assert(seg_exists(a->seg), "--keep keeps the segment");

	int rc = td_run(b, (const char *const[]){ "-s", a->seg, "--no-http", NULL });
	cr_expect_eq(rc, 1, "exit %d; log:\n%s", rc, td_logtext(b));
	cr_expect(strstr(td_logtext(b), "stopped cleanly") && strstr(td_logtext(b), "--keep") &&
		  strstr(td_logtext(b), "--replace") && !strstr(td_logtext(b), "no longer running"),
		  "the refusal says the segment was kept:\n%s", td_logtext(b));
	td_start_ready(b, (const char *const[]){ "-s", a->seg, "--no-http", "--replace", NULL });
	cr_expect(strstr(td_logtext(b), "(stopped cleanly, kept with --keep)"), "%s", td_logtext(b));
	kill(b->pid, SIGTERM);
	cr_assert(td_wait_exit(b, 5000));
	td_cleanup(b);
	a->seg[0] = '\0';
	td_cleanup(a);
}

/* ---- usage and configuration errors ---- */

Test(tallyd, bad_usage_exits_2_with_usage)
{
	struct td *d;

	d = td_new("td-usage");
	cr_expect_eq(td_run(d, (const char *const[]){ "--no-such-option", NULL }), 2);
	cr_expect(strstr(td_logtext(d), "Usage: tallyd"), "%s", td_logtext(d));
	cr_expect_eq(td_run(d, (const char *const[]){ "extra-argument", NULL }), 2);
	cr_expect_eq(td_run(d, (const char *const[]){ "--http", "nonsense", "-s", d->seg, NULL }), 2);
	cr_expect(strstr(td_logtext(d), "--http: "), "%s", td_logtext(d));
	cr_expect_eq(td_run(d, (const char *const[]){ "-s", "bad/name", NULL }), 2);
	cr_expect_eq(td_run(d, (const char *const[]){ "-c", "/nonexistent/tallyd.ini", NULL }), 2);
	cr_expect(strstr(td_logtext(d), "/nonexistent/tallyd.ini: cannot read"), "%s",
		  td_logtext(d));
	cr_expect(!seg_exists(d->seg));
	td_cleanup(d);
}

Test(tallyd, bad_config_lines_name_file_and_line)
{
	struct td *d;
	char where[200];

	d = td_new("td-badcfg");
	td_write_cfg(d,
		     "; a comment\n"                  /* 1 */
		     "[segment]\n"                    /* 2 */
		     "ring_capacity = 1000\n"         /* 3: not a power of two */
		     "[engine]\n"                     /* 4 */
		     "slice_ms = 100ms\n"             /* 5: a unit */
		     "[thresholds orders.*]\n"        /* 6 */
		     "stale_policy = maybe\n"         /* 7 */
		     "[bogus]\n"                      /* 8 */
		     "a line without a value\n"       /* 9 */
		     "[thresholds orders..x]\n");     /* 10 */
	int rc = td_run(d, (const char *const[]){ "-c", d->cfg, "-s", d->seg, NULL });

	cr_expect_eq(rc, 2, "exit %d", rc);
	for (int line = 3; line <= 10; line++) {
		if (line == 4 || line == 6)
			continue;
		snprintf(where, sizeof(where), "%s:%d: ", d->cfg, line);
		cr_expect(strstr(td_logtext(d), where), "no error for %s in:\n%s", where,
			  td_logtext(d));
	}
	cr_expect(strstr(td_logtext(d), "power of two"));
	cr_expect(strstr(td_logtext(d), "without a unit"));
	cr_expect(strstr(td_logtext(d), "fail-open or fail-closed"));
	cr_expect(strstr(td_logtext(d), "unknown section [bogus]"));
	cr_expect(!seg_exists(d->seg), "a bad config created the segment");
	td_cleanup(d);
}

static void td_clear_log(struct td *d)
{
	int fd = open(d->log, O_WRONLY | O_CREAT | O_TRUNC, 0600);

	cr_assert_geq(fd, 0);
	close(fd);
}

/* Mistakes that the first stage accepted at start and that only failed at
 * run time, or never: each is an error at start, exit 2, with FILE:LINE
 * and the key, and --check says so without starting anything. */
Test(tallyd, config_mistakes_fail_at_start_naming_file_and_line)
{
	static const struct {
		const char *text, *line, *says;
	} cases[] = {
		{ "[engine]\nslice_ms = 100\n[engine]\nwindow_ms = 1000\n", ":3: ",
		  "[engine] again: it was opened at line 1" },
		{ "[nats]\nurl = nats://127.0.0.1:1\n[watch ORDERS]\n[watch ORDERS]\n", ":4: ",
		  "[watch ORDERS] again: it was opened at line 3" },
		{ "[thresholds]\nmin_samples = 1\n[thresholds]\n", ":3: ", "[thresholds] again" },
		{ "[thresholds \"orders.>]\np95_warn_ms = 5\n", ":1: ", "unbalanced quote" },
		{ "[engine]\npublish_interval_ms = 100000\n", ":2: ", "from 1 to 60000" },
		{ "[engine]\nslice_ms = 100\ndrain_threads = 0\n", ":3: ", "drain_threads = \"0\": expected a whole number from 1 to 16" },
		{ "[engine]\ndrain_threads = 17\n", ":2: ", "from 1 to 16" },
		{ "[share]\nhost = a\nmax_inflight = 0\n", ":3: ", "max_inflight = \"0\": expected a whole number from 1 to 65536" },
		{ "[engine]\nslice_ms = 1\nwindow_ms = 60000\n", ":3: ",
		  "window_ms / slice_ms = 60000 slices, at most 3600" },
		{ "[engine]\nslice_ms = 0.5\nwindow_ms = 1\n", ":2: ", "slice_ms = 0.5: at least 1 ms" },
		{ "; ok\n[segment]\nring_capacity = 16\n", ":3: ",
		  "ring_capacity = \"16\": expected a power of two from 64" },
		{ "[nats]\nurl = http://[garbage\n", ":2: ", "scheme \"http\" is not nats:// or tls://" },
		{ "[nats]\nurl = nats://[garbage\n", ":2: ", "'[' without ']'" },
		{ "[nats]\nurl = nats://h1:4222,h2:99999\n", ":2: ", "port \"99999\"" },
		{ "[nats]\nurl = nats://h1 h2\n", ":2: ", "after the host" },
		{ "[nats]\nurl = nats://127.0.0.1:1\ntls_ca = /nonexistent/ca.pem\n[watch S]\n", ":3: ",
		  "tls_ca file \"/nonexistent/ca.pem\": No such file or directory" },
		{ "[nats]\ncreds = /nonexistent/x.creds\nurl = nats://127.0.0.1:1\n[watch S]\n", ":2: ",
		  "creds file \"/nonexistent/x.creds\": No such file" },
		/* found by --check, not only when the segment is made */
		{ "[segment]\ngroup_readable = true\ngroup = tally-no-such-group\n", ":3: ",
		  "group = \"tally-no-such-group\": no such group" },
		{ "[segment]\ngroup = nogroup\n", ":2: ", "has no effect without group_readable = true" },
		{ "[http]\ntls_cert_file = /etc/hostname\n", ":2: ", "TLS needs both tls_cert_file and tls_key_file" },
	};
	struct td *d = td_new("td-mistakes");
	char want[512];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		for (int check = 0; check < 2; check++) {
			td_clear_log(d);
			td_write_cfg(d, "%s", cases[i].text);
			int rc = td_run(d, check ? (const char *const[]){ "-t", "-c", d->cfg, NULL } :
					     (const char *const[]){ "-c", d->cfg, "-s", d->seg, NULL });
			snprintf(want, sizeof(want), "%s%s", d->cfg, cases[i].line);
			cr_expect_eq(rc, 2, "case %zu%s: exit %d for:\n%s", i, check ? " (--check)" : "",
				     rc, cases[i].text);
			cr_expect(strstr(td_logtext(d), want) && strstr(td_logtext(d), cases[i].says),
				  "case %zu: expected \"%s...%s\" in:\n%s", i, want, cases[i].says,
				  td_logtext(d));
			cr_expect(!seg_exists(d->seg), "case %zu: a bad config created the segment", i);
			cr_expect_null(strstr(td_logtext(d), "(null)"), "case %zu: a NULL in a message:\n%s", i,
				       td_logtext(d));
		}
	}

	/* a directory is not a configuration (it used to start with defaults) */
	td_clear_log(d);
	cr_expect_eq(td_run(d, (const char *const[]){ "-c", "/tmp", "-s", d->seg, NULL }), 2);
	cr_expect(strstr(td_logtext(d), "/tmp: is a directory"), "%s", td_logtext(d));
	cr_expect(!seg_exists(d->seg));

	/* a UTF-8 byte order mark is not an error; --check exits 0 and creates nothing */
	td_clear_log(d);
	td_write_cfg(d, "\xef\xbb\xbf[engine]\nslice_ms = 100\nwindow_ms = 1000\n");
	cr_expect_eq(td_run(d, (const char *const[]){ "--check", "-c", d->cfg, "-s", d->seg, NULL }), 0,
		     "%s", td_logtext(d));
	cr_expect(strstr(td_logtext(d), "is valid"), "%s", td_logtext(d));
	cr_expect(!seg_exists(d->seg), "--check created the segment");
	td_cleanup(d);
}

/* A reload checks files and URLs as the start does, and keeps the running
 * configuration when one is wrong. */
Test(tallyd, reload_with_a_missing_tls_ca_keeps_the_old_config)
{
	struct td *d = td_new("td-hupfile");
	char where[256];

	td_write_cfg(d, "[segment]\nname = %s\n[http]\nenabled = no\n[nats]\n"
			 "url = nats://127.0.0.1:1\n[watch S]\n", d->seg);
	td_start_ready(d, (const char *const[]){ "-c", d->cfg, NULL });
	td_write_cfg(d, "[segment]\nname = %s\n[http]\nenabled = no\n[nats]\n"
			 "url = nats://127.0.0.1:1\ntls_ca = %s/missing-ca.pem\n[watch S]\n",
		     d->seg, "/nonexistent");
	kill(d->pid, SIGHUP);
	cr_assert(td_wait_log(d, "reload failed", 5000), "%s", td_logtext(d));
	snprintf(where, sizeof(where), "%s:7: [nats]: tls_ca file \"/nonexistent/missing-ca.pem\"",
		 d->cfg);
	cr_expect(strstr(td_logtext(d), where), "%s", td_logtext(d));
	cr_expect_eq(kill(d->pid, 0), 0, "tallyd died on a bad reload");
	td_cleanup(d);
}

/* A control byte in the file is quoted escaped in the log, never raw. */
Test(tallyd, control_bytes_in_config_errors_are_escaped)
{
	struct td *d;

	d = td_new("td-esc");
	td_write_cfg(d, "[engine]\nslice\x1b]0;x\x07_ms = 1\n");
	cr_expect_eq(td_run(d, (const char *const[]){ "-c", d->cfg, "-s", d->seg, NULL }), 2);
	cr_expect(strstr(td_logtext(d), "unknown key \"slice\\x1b]0;x\\x07_ms\""), "%s", td_logtext(d));
	cr_expect(!strchr(td_logtext(d), 0x1b) && !strchr(td_logtext(d), 0x07), "a raw control byte in the log");
	td_cleanup(d);
}

Test(tallyd, unknown_key_lists_the_valid_ones)
{
	struct td *d;
	char where[200];

	d = td_new("td-unk");
	td_write_cfg(d, "[http]\nlisten = 127.0.0.1:0\nport = 9464\n");
	cr_expect_eq(td_run(d, (const char *const[]){ "-c", d->cfg, "-s", d->seg, NULL }), 2);
	snprintf(where, sizeof(where), "%s:3: unknown key \"port\" in [http]; valid keys: listen, "
				       "enabled", d->cfg);
	cr_expect(strstr(td_logtext(d), where), "expected \"%s\" in:\n%s", where, td_logtext(d));
	td_cleanup(d);
}

Test(tallyd, inconsistent_thresholds_rejected)
{
	struct td *d;
	char where[200];

	d = td_new("td-thr");
	td_write_cfg(d, "[thresholds]\np95_warn_ms = 0.5\n[thresholds orders.>]\n"
			 "p95_warn_ms = 900\np95_overload_ms = 100\n");
	cr_expect_eq(td_run(d, (const char *const[]){ "-c", d->cfg, "-s", d->seg, NULL }), 2);
	snprintf(where, sizeof(where), "%s:3: [thresholds orders.>]", d->cfg);
	cr_expect(strstr(td_logtext(d), where), "%s", td_logtext(d));
	td_cleanup(d);
}

Test(tallyd, stall_after_ms_out_of_range_is_rejected_naming_the_key)
{
	struct td *d;
	char where[200];

	d = td_new("td-stall");
	td_write_cfg(d, "[thresholds]\nstall_after_ms = 0\n[thresholds orders.created]\n"
			 "stall_after_ms = 50\n");
	cr_expect_eq(td_run(d, (const char *const[]){ "-c", d->cfg, "-s", d->seg, NULL }), 2);
	snprintf(where, sizeof(where), "%s:3: [thresholds orders.created]", d->cfg);
	cr_expect(strstr(td_logtext(d), where) && strstr(td_logtext(d), "stall_after_ms 50"), "%s",
		  td_logtext(d));
	cr_expect(!seg_exists(d->seg));
	td_cleanup(d);
}

/* ---- SIGHUP ---- */

struct rec {
	struct tally_segment *seg;
	struct tally_producer *p;
	tally_subject_t id;
};

static void rec_open(struct rec *r, const char *seg, const char *subject)
{
	cr_assert_eq(tally_segment_open(seg, TALLY_OPEN_PRODUCER, 2000, &r->seg), 0, "%s",
		     tally_errmsg());
	cr_assert_eq(tally_subject_intern(r->seg, subject, &r->id), 0);
	cr_assert_eq(tally_producer_attach(r->seg, &r->p), 0, "%s", tally_errmsg());
}

static void rec_close(struct rec *r)
{
	tally_producer_detach(&r->p);
	tally_segment_close(&r->seg);
}

/* Record ns every 5 ms until the verdict is v (true) or timeout_ms passes. */
static bool record_until(struct rec *r, uint64_t ns, enum tally_verdict v, unsigned timeout_ms,
			 struct tally_subject_stats *st)
{
	uint64_t end = now_ms() + timeout_ms;

	do {
		for (int i = 0; i < 5; i++)
			tally_record(r->p, r->id, ns);
		tt_sleep_ms(5);
		if (tally_read_subject(r->seg, r->id, st) == 0 && st->verdict == v)
			return true;
	} while (now_ms() < end);
	return false;
}

#define FAST_ENGINE "[engine]\nslice_ms = 100\nwindow_ms = 1000\npublish_interval_ms = 20\n"

Test(tallyd, sighup_with_a_bad_config_keeps_the_old_one)
{
	struct td *d;
	struct rec r;
	struct tally_subject_stats st;
	char where[200];

	d = td_new("td-hupbad");
	td_write_cfg(d, "[segment]\nname = %s\n[http]\nenabled = no\n" FAST_ENGINE
			 "[thresholds]\nmin_samples = 1\np95_warn_ms = 10\np95_overload_ms = 20\n",
		     d->seg);
	td_start_ready(d, (const char *const[]){ "-c", d->cfg, NULL });
	rec_open(&r, d->seg, "orders.created");
	cr_assert(record_until(&r, 50000000, TALLY_VERDICT_OVERLOAD, 5000, &st));

	td_write_cfg(d, "[segment]\nname = %s\n[http]\nenabled = no\n" FAST_ENGINE
			 "[thresholds]\nmin_samples = 1\np95_warn_ms = 1000\np95_overload_ms = 2000\n"
			 "clear_ratio = 2\n",
		     d->seg);
	kill(d->pid, SIGHUP);
	snprintf(where, sizeof(where), "%s:13: clear_ratio", d->cfg);
	cr_assert(td_wait_log(d, "reload failed", 5000), "%s", td_logtext(d));
	cr_expect(strstr(td_logtext(d), where), "the reload error names FILE:LINE:\n%s",
		  td_logtext(d));
	cr_expect_eq(kill(d->pid, 0), 0, "tallyd died on a bad reload");

	/* still serving, with the old thresholds: new samples keep it in overload */
	uint64_t before = st.total_count;
	tt_sleep_ms(300);
	cr_assert(record_until(&r, 50000000, TALLY_VERDICT_OVERLOAD, 5000, &st));
	tt_sleep_ms(100);
	cr_assert_eq(tally_read_subject(r.seg, r.id, &st), 0, "published data went stale");
	cr_expect_gt(st.total_count, before, "no new samples aggregated after the bad reload");
	cr_expect_eq(st.verdict, TALLY_VERDICT_OVERLOAD, "thresholds changed by a bad file");
	rec_close(&r);
	td_cleanup(d);
}

/* A reload that changes only [nats] include_ack_pending warns about
 * [nats], not about an [engine] the file did not touch (the engine keeps
 * a copy of that key). Nothing listens at the NATS URL (port 1): tallyd
 * retries. */
Test(tallyd, reload_names_only_the_sections_that_changed)
{
	struct td *d = td_new("td-hupsect");
#define HUP_CFG "[segment]\nname = %s\n[http]\nenabled = no\n" FAST_ENGINE \
		"[nats]\nurl = nats://127.0.0.1:1\ninclude_ack_pending = %s\n[watch S]\n"

	td_write_cfg(d, HUP_CFG, d->seg, "false");
	td_start_ready(d, (const char *const[]){ "-c", d->cfg, NULL });
	td_write_cfg(d, HUP_CFG, d->seg, "true");
	kill(d->pid, SIGHUP);
	cr_assert(td_wait_log(d, "reload", 5000), "%s", td_logtext(d));
	tt_sleep_ms(300);
	cr_expect_null(strstr(td_logtext(d), "[engine]"), "[engine] was not changed:\n%s", td_logtext(d));
	td_cleanup(d);
}

/* drain_threads = 2 (issue 18): two producers, on two slots and so on
 * both drain threads, record into one subject; the published row holds
 * every sample of both, counted once. */
Test(tallyd, two_drain_threads_publish_every_sample_once)
{
	struct td *d;
	struct rec a, b;
	struct tally_subject_stats st = { 0 };
	enum { N = 3000 };

	d = td_new("td-drain2");
	td_write_cfg(d, "[segment]\nname = %s\n[http]\nenabled = no\n" FAST_ENGINE "drain_threads = 2\n",
		     d->seg);
	td_start_ready(d, (const char *const[]){ "-c", d->cfg, NULL });
	cr_expect(strstr(td_logtext(d), "2 drain threads"), "the ready line says how many: %s", td_logtext(d));
	rec_open(&a, d->seg, "orders.created");
	rec_open(&b, d->seg, "orders.created");
	for (int i = 0; i < N; i++) {
		while (!tally_record(a.p, a.id, 1000 + (uint64_t)i))
			tt_sleep_ms(1);
		while (!tally_record(b.p, b.id, 100000 + (uint64_t)i))
			tt_sleep_ms(1);
	}
	uint64_t end = now_ms() + 5000;
	while ((tally_read_subject(a.seg, a.id, &st) != 0 || st.total_count < 2 * N) && now_ms() < end)
		tt_sleep_ms(5);
	cr_expect_eq(st.total_count, 2 * N, "total %llu", (unsigned long long)st.total_count);
	if (st.count == 2 * N) { /* all still in the window (1 s): both threads' extremes */
		cr_expect_eq(st.min_ns, 1000);
		cr_expect_eq(st.max_ns, 100000 + N - 1);
	}
	rec_close(&a);
	rec_close(&b);
	td_cleanup(d);
}

Test(tallyd, sighup_applies_new_thresholds_and_keeps_statistics)
{
	struct td *d;
	struct rec r;
	struct tally_subject_stats st;
	uint64_t before;

	d = td_new("td-hup");
	td_write_cfg(d, "[segment]\nname = %s\n[http]\nenabled = no\n" FAST_ENGINE
			 "[thresholds]\nmin_samples = 1\np95_warn_ms = 1000\np95_overload_ms = 2000\n",
		     d->seg);
	td_start_ready(d, (const char *const[]){ "-c", d->cfg, NULL });
	rec_open(&r, d->seg, "orders.created");
	cr_assert(record_until(&r, 50000000, TALLY_VERDICT_OK, 5000, &st),
		  "verdict %d with a 1 s warn level", st.verdict);
	before = st.total_count;

	/* a pattern rule for orders.* that makes 50 ms an overload */
	td_write_cfg(d, "[segment]\nname = %s\n[http]\nenabled = no\n" FAST_ENGINE
			 "[thresholds]\nmin_samples = 1\np95_warn_ms = 1000\np95_overload_ms = 2000\n"
			 "[thresholds orders.*]\np95_warn_ms = 10\np95_overload_ms = 20\n",
		     d->seg);
	kill(d->pid, SIGHUP);
	cr_assert(td_wait_log(d, "reloaded", 5000), "%s", td_logtext(d));
	cr_assert(record_until(&r, 50000000, TALLY_VERDICT_OVERLOAD, 5000, &st),
		  "verdict %d after the reload; log:\n%s", st.verdict, td_logtext(d));
	cr_expect(st.reasons & TALLY_REASON_LATENCY);
	cr_expect_geq(st.total_count, before, "statistics were reset by the reload");
	cr_expect_eq(kill(d->pid, 0), 0);

	/* a change that needs a restart is logged, not applied */
	td_write_cfg(d, "[segment]\nname = %s\nproducer_slots = 9\n[http]\nenabled = no\n"
			 FAST_ENGINE "[thresholds]\nmin_samples = 1\n", d->seg);
	kill(d->pid, SIGHUP);
	cr_assert(td_wait_log(d, "only after a restart", 5000), "%s", td_logtext(d));
	cr_expect_eq(td_log_count(d, "reloaded"), 2);
	rec_close(&r);

	kill(d->pid, SIGTERM);
	cr_assert(td_wait_exit(d, 5000));
	cr_expect_eq(td_exit_code(d), 0);
	td_cleanup(d);
}

/* ---- the poller against a real nats-server ---- */

static void js_setup(const char *url)
{
	natsConnection *nc = NULL;
	jsCtx *js = NULL;
	jsStreamConfig sc;
	jsConsumerConfig cc;
	jsErrCode ec = 0;
	const char *subj = "orders.>";

	cr_assert_eq(natsConnection_ConnectTo(&nc, url), NATS_OK);
	cr_assert_eq(natsConnection_JetStream(&js, nc, NULL), NATS_OK);
	jsStreamConfig_Init(&sc);
	sc.Name = "ORDERS";
	sc.Subjects = &subj;
	sc.SubjectsLen = 1;
	cr_assert_eq(js_AddStream(NULL, js, &sc, NULL, &ec), NATS_OK, "add stream: %d", (int)ec);
	jsConsumerConfig_Init(&cc);
	cc.Durable = "dispatch";
	cc.AckPolicy = js_AckExplicit;
	cc.FilterSubject = "orders.created";
	cr_assert_eq(js_AddConsumer(NULL, js, "ORDERS", &cc, NULL, &ec), NATS_OK, "%d", (int)ec);
	for (int i = 0; i < 7; i++)
		cr_assert_eq(js_Publish(NULL, js, "orders.created", "x", 1, NULL, &ec), NATS_OK);
	jsCtx_Destroy(js);
	natsConnection_Destroy(nc);
}

Test(tallyd, polls_jetstream_consumers)
{
	struct tally_test_nats srv;
	struct tally_consumer_stats cs[8];
	struct tally_segment *seg = NULL;
	struct td *d;
	int n = 0;

	memset(&srv, 0, sizeof(srv));
	cr_assert_eq(tally_test_nats_start(&srv, NULL, true), 0, "%s", srv.errmsg);
	js_setup(srv.url);
	d = td_new("td-nats");
	td_write_cfg(d, "[http]\nenabled = false\n[nats]\npoll_interval_ms = 100\n"
			 "[watch ORDERS]\n");
	td_start_ready(d, (const char *const[]){ "-c", d->cfg, "-s", d->seg, "--nats", srv.url, NULL });
	cr_assert_eq(tally_segment_open(d->seg, TALLY_OPEN_READER, 1000, &seg), 0);
	for (uint64_t end = now_ms() + 10000; now_ms() < end; tt_sleep_ms(50)) {
		n = tally_read_consumers(seg, cs, 8);
		if (n == 1 && strcmp(cs[0].source, "live") == 0 && cs[0].num_pending == 7)
			break;
	}
	cr_assert_eq(n, 1, "consumers: %d; log:\n%s", n, td_logtext(d));
	cr_expect_str_eq(cs[0].stream, "ORDERS");
	cr_expect_str_eq(cs[0].consumer, "dispatch");
	cr_expect_str_eq(cs[0].source, "live");
	cr_expect_eq(cs[0].num_pending, 7);
	cr_expect_str_eq(cs[0].filter, "orders.created");
	tally_segment_close(&seg);
	td_cleanup(d);
	tally_test_nats_stop(&srv);
}

/* A nats-server that accepts connections but never answers (stopped with
 * SIGSTOP: the kernel still accepts on its listening socket). With a
 * request timeout of 30 s, tallyd must stop at once on SIGTERM, both while
 * a request waits and while its first connect waits; meanwhile `tally stat`
 * says the poller is running and waiting, not "not running". */
static void stat_output(const char *seg, char *buf, size_t len)
{
	char cmd[512];

	snprintf(cmd, sizeof(cmd), "%s -s %s stat 2>&1", TALLY_TEST_BUILDDIR "/tools/tally", seg);
	cr_assert(tt_command_output(cmd, buf, len), "%s", cmd);
}

static uint64_t sigterm_to_exit_ms(struct td *d)
{
	uint64_t t0 = now_ms();

	kill(d->pid, SIGTERM);
	cr_assert(td_wait_exit(d, 25000), "tallyd did not stop on SIGTERM; log:\n%s", td_logtext(d));
	return now_ms() - t0;
}

Test(tallyd, sigterm_does_not_wait_for_a_server_that_never_answers, .timeout = 90)
{
	struct tally_test_nats srv;
	struct tally_consumer_stats cs[8];
	struct tally_poller_stats ps;
	struct tally_segment *seg = NULL;
	char out[8192];
	struct td *d;
	int n = 0;

	memset(&srv, 0, sizeof(srv));
	cr_assert_eq(tally_test_nats_start(&srv, NULL, true), 0, "%s", srv.errmsg);
	js_setup(srv.url);
	d = td_new("td-hang");
	td_write_cfg(d, "[http]\nenabled = false\n[nats]\npoll_interval_ms = 100\n"
			 "request_timeout_ms = 30000\n[watch ORDERS]\n");
	/* 1: connected, then the server stops answering: a request waits */
	td_start_ready(d, (const char *const[]){ "-c", d->cfg, "-s", d->seg, "--nats", srv.url, NULL });
	cr_assert_eq(tally_segment_open(d->seg, TALLY_OPEN_READER, 1000, &seg), 0);
	for (uint64_t end = now_ms() + 10000; now_ms() < end && n != 1; tt_sleep_ms(50))
		n = tally_read_consumers(seg, cs, 8);
	cr_assert_eq(n, 1, "the poller never polled; log:\n%s", td_logtext(d));
	tally_segment_close(&seg);
	cr_assert_eq(kill(srv.pid, SIGSTOP), 0);
	tt_sleep_ms(500); /* a poll is now waiting for its reply */
	uint64_t ms = sigterm_to_exit_ms(d);
	cr_expect_eq(td_exit_code(d), 0, "%s", td_logtext(d));
	cr_expect_lt(ms, 10000, "SIGTERM waited %llu ms for a request to a server that never answers "
		     "(request_timeout_ms 30000)", (unsigned long long)ms);

	/* 2: started against the stopped server: the first connect waits */
	td_start_ready(d, (const char *const[]){ "-c", d->cfg, "-s", d->seg, "--nats", srv.url, "--keep", NULL });
	tt_sleep_ms(300);
	cr_assert_eq(tally_segment_open(d->seg, TALLY_OPEN_READER, 1000, &seg), 0);
	cr_assert_eq(tally_read_poller(seg, &ps), 0);
	cr_expect(ps.state_age_ms != UINT64_MAX && ps.polls_ok + ps.polls_failed == 0 && !ps.connected,
		  "a poller that started but never finished a poll: age %llu, polls %llu/%llu",
		  (unsigned long long)ps.state_age_ms, (unsigned long long)ps.polls_ok,
		  (unsigned long long)ps.polls_failed);
	tally_segment_close(&seg);
	stat_output(d->seg, out, sizeof(out));
	cr_expect(strstr(out, "first poll not finished yet") && strstr(out, "connecting") &&
		  !strstr(out, "not running"), "%s", out);
	ms = sigterm_to_exit_ms(d);
	cr_expect_lt(ms, 10000, "SIGTERM waited %llu ms for a connect to a server that never answers",
		     (unsigned long long)ms);
	kill(srv.pid, SIGCONT);
	td_cleanup(d);
	tally_test_nats_stop(&srv);
}

/* ---- producers follow a restarted owner (issue: owner restarts) ---- */

/* A router thread: records one sample every 100 us through a handle of
 * the segment it opened before any restart, until told to stop. */
struct follower {
	struct rec r;
	pthread_t th;
	atomic_bool stop;
	_Atomic uint64_t ok, refused;
};

static void *follower_main(void *arg)
{
	struct follower *f = arg;

	while (!atomic_load(&f->stop)) {
		if (tally_record(f->r.p, f->r.id, 2000))
			atomic_fetch_add(&f->ok, 1);
		else
			atomic_fetch_add(&f->refused, 1);
		struct timespec ts = { 0, 100000 };
		nanosleep(&ts, NULL);
	}
	return NULL;
}

/* The subject's total count as the segment now named `seg` publishes it
 * (0 while it has none). */
static uint64_t total_in(const char *seg, const char *subject)
{
	struct tally_segment *s = NULL;
	struct tally_subject_stats st;
	tally_subject_t id;
	uint64_t n = 0;

	if (tally_segment_open(seg, TALLY_OPEN_READER, 0, &s) != 0)
		return 0;
	if (tally_subject_lookup(s, subject, &id) == 0 && tally_read_subject(s, id, &st) == 0)
		n = st.total_count;
	tally_segment_close(&s);
	return n;
}

enum restart_kind { CLEAN_RESTART, KILL_AND_REPLACE, KEEP_AND_REPLACE };

static void producers_follow(enum restart_kind kind)
{
	static const char *const names[] = { "SIGTERM + restart", "SIGKILL + restart --replace",
					     "SIGINT --keep + restart --replace" };
	struct td *a = td_new("td-follow"), *b = td_new("td-follow-b");
	struct follower f = { 0 };
	struct tally_producer_counters c;

	strcpy(b->seg, a->seg);
	td_write_cfg(a, "[http]\nenabled = false\n" FAST_ENGINE);
	strcpy(b->cfg, a->cfg);
	td_start_ready(a, (const char *const[]){ "-c", a->cfg, "-s", a->seg,
						 kind == KEEP_AND_REPLACE ? "--keep" : "-v", NULL });
	rec_open(&f.r, a->seg, "follow.subject");
	pthread_create(&f.th, NULL, follower_main, &f);
	tt_sleep_ms(300);
	uint64_t in_a = total_in(a->seg, "follow.subject");
	cr_expect_gt(in_a, 0, "the first owner got nothing");

	kill(a->pid, kind == CLEAN_RESTART ? SIGTERM : kind == KILL_AND_REPLACE ? SIGKILL : SIGINT);
	cr_assert(td_wait_exit(a, 5000));
	/* the first owner's last word, through the handle the router holds */
	struct tally_subject_stats st;
	if (kind != KILL_AND_REPLACE && tally_read_subject(f.r.seg, f.r.id, &st) != -ENOENT)
		in_a = st.total_count;
	tt_sleep_ms(200); /* no owner for a while: records are refused, counted */
	uint64_t t0 = now_ms();
	td_start_ready(b, (const char *const[]){ "-c", b->cfg, "-s", b->seg,
						 kind == CLEAN_RESTART ? "-v" : "--replace", NULL });
	uint64_t ready = now_ms() - t0, seen = 0, in_b = 0;
	while ((in_b = total_in(b->seg, "follow.subject")) == 0 && now_ms() - t0 < 5000)
		tt_sleep_ms(5);
	seen = now_ms() - t0;
	cr_assert_gt(in_b, 0, "%s: the new owner never got a sample from the router; its log:\n%s",
		     names[kind], td_logtext(b));
	tt_sleep_ms(200);
	atomic_store(&f.stop, true);
	pthread_join(f.th, NULL);
	tally_producer_counters(f.r.p, &c);
	cr_expect_eq(c.moves, 1, "%s: moves %llu", names[kind], (unsigned long long)c.moves);
	cr_expect_eq(c.dropped, 0);
	cr_expect_gt(c.lost, 0, "records while no owner ran are counted lost");
	cr_expect_geq(c.lost, atomic_load(&f.refused), "every refused record is counted");
	/* tally stat shows the loss for the new slot */
	struct tally_segment *rs = NULL;
	struct tally_producer_stats ps[4];
	cr_assert_eq(tally_segment_open(b->seg, TALLY_OPEN_READER, 1000, &rs), 0);
	int n = tally_read_producers(rs, ps, 4);
	cr_assert_eq(n, 1, "producers in the new segment: %d", n);
	cr_expect_eq(ps[0].moves, 1);
	cr_expect_eq(ps[0].pid, getpid());
	tally_segment_close(&rs);
	if (kind == CLEAN_RESTART) {
		/* the segment closed under the moved handle: its remap and the
		 * successor's mapping are gone; a late record is refused, no crash */
		tally_segment_close(&f.r.seg);
		cr_expect_not(tally_record(f.r.p, f.r.id, 2000), "a record after the close was stored");
		tally_producer_detach(&f.r.p);
	} else {
		rec_close(&f.r);
	}
	tt_sleep_ms(100); /* the new owner drains what the handle left */
	in_b = total_in(b->seg, "follow.subject");
	uint64_t ok = atomic_load(&f.ok), left = c.lost - atomic_load(&f.refused);
	/* refused = lost while no owner ran; the rest of lost is what the
	 * old ring held when the handle moved */
	if (kind != KILL_AND_REPLACE) /* a stopped owner published its last drain: exact */
		cr_expect_eq(in_a + in_b + left, ok, "%s: %llu + %llu drained + %llu left in the "
			     "old ring != %llu recorded", names[kind], (unsigned long long)in_a,
			     (unsigned long long)in_b, (unsigned long long)left, (unsigned long long)ok);
	else
		cr_expect_leq(in_a + in_b + left, ok);
	fprintf(stderr, "counters: recorded %llu dropped %llu lost %llu moves %llu; ok %llu refused %llu\n",
		(unsigned long long)c.recorded, (unsigned long long)c.dropped, (unsigned long long)c.lost,
		(unsigned long long)c.moves, (unsigned long long)ok, (unsigned long long)atomic_load(&f.refused));
	fprintf(stderr, "follow (%s): new owner ready %llu ms after start, first sample visible "
		"%llu ms after start; %llu recorded, %llu + %llu drained by the two owners, %llu "
		"lost (%llu refused while no owner ran, %llu left in the old ring)\n", names[kind],
		(unsigned long long)ready, (unsigned long long)seen, (unsigned long long)ok,
		(unsigned long long)in_a, (unsigned long long)in_b, (unsigned long long)c.lost,
		(unsigned long long)atomic_load(&f.refused), (unsigned long long)left);
	a->seg[0] = '\0';
	td_cleanup(a);
	td_cleanup(b);
}

Test(tallyd, producers_follow_a_clean_restart)
{
	producers_follow(CLEAN_RESTART);
}

Test(tallyd, producers_follow_a_killed_owner_replaced)
{
	producers_follow(KILL_AND_REPLACE);
}

Test(tallyd, producers_follow_a_kept_segment_replaced)
{
	producers_follow(KEEP_AND_REPLACE);
}
