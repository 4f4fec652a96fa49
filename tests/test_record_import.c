/* SPDX-License-Identifier: MIT */
/*
 * test_record_import.c: tally record as a batch import never drops
 * (issue 12). A real tallyd (TALLY_TEST_BUILDDIR/tools/tallyd, a child of
 * the test) with small rings is slowed down by SIGSTOP/SIGCONT, stopped
 * 50 ms of every 100 ms, while the built tally record reads a million
 * lines of several subjects from a pipe: it must exit 0, say it recorded
 * every one and dropped none, and tally stat --json right after must show
 * each subject's total_count exactly. A tallyd stopped for good makes
 * record stop within its --wait-timeout with an error that names the
 * segment, the owner and the line; a tallyd killed while record waits
 * makes it stop at once. On a terminal (script(1) gives it one) record
 * shows its progress on stderr while it waits, and clears it at the end.
 *
 * Every wait is bounded; every process started here is stopped by pid at
 * the end, and a tallyd left behind by a failed assertion dies with the
 * test process (PR_SET_PDEATHSIG).
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/helpers.h"

#define TALLYD TALLY_TEST_BUILDDIR "/tools/tallyd"
#define TALLY_BIN TALLY_TEST_BUILDDIR "/tools/tally"
#define LINES 1000000u
#define NSUBJECTS 4

static const char *const subjects[NSUBJECTS] = { "import.orders", "import.payments",
						 "import.billing.sent", "import.x" };

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- a tallyd child ---- */

static struct {
	pid_t pid;
	char dir[64], cfg[128], log[128], seg[128];
} td;

static void td_stop(void)
{
	if (td.pid > 0) {
		kill(td.pid, SIGCONT);
		kill(td.pid, SIGTERM);
		for (int i = 0; i < 500 && waitpid(td.pid, NULL, WNOHANG) == 0; i++)
			tt_sleep_ms(10);
		if (kill(td.pid, 0) == 0) {
			kill(td.pid, SIGKILL);
			waitpid(td.pid, NULL, 0);
		}
		td.pid = 0;
	}
	if (td.seg[0])
		tally_segment_unlink(td.seg);
	if (td.dir[0]) {
		char path[160];
		snprintf(path, sizeof(path), "%s/in.txt", td.dir);
		unlink(path);
		snprintf(path, sizeof(path), "%s/tty.out", td.dir);
		unlink(path);
		unlink(td.cfg);
		unlink(td.log);
		rmdir(td.dir);
	}
	memset(&td, 0, sizeof(td));
}

static void suite_fini(void)
{
	td_stop();
}

static void suite_init(void)
{
	signal(SIGPIPE, SIG_IGN); /* a record that stops early closes its stdin */
}

TestSuite(record_import, .init = suite_init, .fini = suite_fini, .timeout = 120);

static bool td_log_has(const char *needle)
{
	char buf[8192];
	FILE *f = fopen(td.log, "r");
	size_t n = f ? fread(buf, 1, sizeof(buf) - 1, f) : 0;

	if (f)
		fclose(f);
	buf[n] = '\0';
	return strstr(buf, needle) != NULL;
}

/* Start tallyd on a fresh segment with rings of ring_capacity entries. */
static void td_start(unsigned ring_capacity)
{
	FILE *f;

	snprintf(td.dir, sizeof(td.dir), "/tmp/tally-import-XXXXXX");
	cr_assert_not_null(mkdtemp(td.dir));
	snprintf(td.cfg, sizeof(td.cfg), "%s/tallyd.ini", td.dir);
	snprintf(td.log, sizeof(td.log), "%s/tallyd.log", td.dir);
	snprintf(td.seg, sizeof(td.seg), "%s", tt_segname("import"));
	cr_assert_not_null(f = fopen(td.cfg, "w"));
	fprintf(f, "[segment]\nname = %s\nproducer_slots = 8\nring_capacity = %u\n"
		   "subject_capacity = 64\npending_capacity = 8\n[http]\nenabled = false\n",
		td.seg, ring_capacity);
	cr_assert_eq(fclose(f), 0);
	td.pid = fork();
	cr_assert_neq(td.pid, -1);
	if (td.pid == 0) {
		int fd = open(td.log, O_WRONLY | O_CREAT | O_APPEND, 0600);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
			_exit(127);
		execl(TALLYD, TALLYD, "-c", td.cfg, (char *)NULL);
		_exit(127);
	}
	uint64_t end = now_ms() + 10000;
	while (!td_log_has("ready:") && now_ms() < end)
		tt_sleep_ms(10);
	cr_assert(td_log_has("ready:"), "tallyd not ready within 10 s");
}

/* ---- slowing it down: stopped stop_ms of every period_ms ---- */

struct stopper {
	pthread_t thread;
	atomic_bool done;
	unsigned stop_ms, period_ms;
	unsigned stops;
};

static void *stopper_main(void *arg)
{
	struct stopper *s = arg;

	while (!atomic_load(&s->done)) {
		kill(td.pid, SIGSTOP);
		s->stops++;
		tt_sleep_ms(s->stop_ms);
		kill(td.pid, SIGCONT);
		tt_sleep_ms(s->period_ms - s->stop_ms);
	}
	return NULL;
}

/* ---- tally record, fed from a pipe ---- */

struct run {
	int status; /* exit status, or 128 + signal */
	uint64_t ms;
	char out[4096], err[8192];
};

static int memfd(const char *name)
{
	int fd = memfd_create(name, MFD_CLOEXEC);

	cr_assert(fd >= 0, "memfd_create: %s", strerror(errno));
	return fd;
}

static void slurp(int fd, char *buf, size_t len)
{
	ssize_t n = pread(fd, buf, len - 1, 0);

	buf[n > 0 ? n : 0] = '\0';
	close(fd);
}

static pid_t spawn(const char *const *argv, int in, int out, int err)
{
	fflush(NULL);
	pid_t pid = fork();

	cr_assert_neq(pid, -1);
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		dup2(in, 0);
		dup2(out, 1);
		dup2(err, 2);
		setenv("LC_ALL", "C.UTF-8", 1);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	return pid;
}

static int wait_status(pid_t pid)
{
	int st;

	cr_assert_eq(waitpid(pid, &st, 0), pid);
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* "SUBJECT NS" lines, the subjects in turn; stops early if the reader went away. */
static void feed(int fd, unsigned lines)
{
	FILE *f = fdopen(fd, "w");

	cr_assert_not_null(f);
	for (unsigned i = 0; i < lines; i++)
		if (fprintf(f, "%s %u\n", subjects[i % NSUBJECTS], 1000 + i % 90000) < 0)
			break;
	fclose(f); /* EPIPE when record stopped early: expected in the stall tests */
}

/* Run tally record (args after "record") with `lines` lines on a pipe. */
static void record(struct run *r, unsigned lines, const char *const *args)
{
	const char *argv[16] = { TALLY_BIN, "-s", td.seg, "record" };
	int pfd[2], out = memfd("out"), err = memfd("err");
	size_t n = 4;

	while (*args && n < 15)
		argv[n++] = *args++;
	argv[n] = NULL;
	cr_assert_eq(pipe2(pfd, O_CLOEXEC), 0); /* the child must not hold the write end */
	uint64_t t0 = now_ms();
	pid_t pid = spawn(argv, pfd[0], out, err);
	close(pfd[0]);
	feed(pfd[1], lines);
	r->status = wait_status(pid);
	r->ms = now_ms() - t0;
	slurp(out, r->out, sizeof(r->out));
	slurp(err, r->err, sizeof(r->err));
}

/* tally stat --json, parsed. */
static json_t *stat_json(void)
{
	const char *argv[] = { TALLY_BIN, "-s", td.seg, "stat", "--json", NULL };
	int in = open("/dev/null", O_RDONLY), out = memfd("out"), err = memfd("err");
	static char buf[1 << 16], ebuf[4096];
	json_error_t je;

	int st = wait_status(spawn(argv, in, out, err));
	close(in);
	slurp(out, buf, sizeof(buf));
	slurp(err, ebuf, sizeof(ebuf));
	cr_assert_eq(st, 0, "tally stat --json: exit %d: %s", st, ebuf);
	json_t *doc = json_loads(buf, 0, &je);
	cr_assert_not_null(doc, "not JSON: %s:\n%s", je.text, buf);
	return doc;
}

static json_int_t total_count_of(json_t *doc, const char *name)
{
	size_t i;
	json_t *s;

	json_array_foreach(json_object_get(doc, "subjects"), i, s)
		if (strcmp(json_string_value(json_object_get(s, "name")), name) == 0)
			return json_integer_value(json_object_get(s, "total_count"));
	cr_assert_fail("no subject %s in tally stat --json", name);
	return -1;
}

/* ---- the tests ---- */

Test(record_import, a_million_lines_into_a_slowed_down_owner_lose_nothing)
{
	struct stopper s = { .stop_ms = 50, .period_ms = 100 };
	struct run r;

	td_start(1024);
	cr_assert_eq(pthread_create(&s.thread, NULL, stopper_main, &s), 0);
	record(&r, LINES, (const char *const[]){ NULL });
	atomic_store(&s.done, true);
	pthread_join(s.thread, NULL);
	kill(td.pid, SIGCONT);
	cr_log_info("%u lines: %" PRIu64 " ms, tallyd stopped %u times", LINES, r.ms, s.stops);
	cr_assert_eq(r.status, 0, "exit %d; stderr:\n%s", r.status, r.err);
	cr_expect_str_eq(r.out, "recorded 1000000, rejected 0, dropped 0\n");
	cr_expect_str_empty(r.err, "nothing on stderr (not a terminal: no progress)");
	cr_expect_gt(s.stops, 1, "the owner was stopped while record ran");

	/* Right after: every sample is in the published snapshot. */
	json_t *doc = stat_json();
	json_int_t sum = 0;
	for (size_t i = 0; i < NSUBJECTS; i++) {
		json_int_t c = total_count_of(doc, subjects[i]);
		cr_expect_eq(c, LINES / NSUBJECTS, "%s: total_count %lld", subjects[i], (long long)c);
		sum += c;
	}
	cr_expect_eq(sum, LINES);
	size_t i;
	json_t *p;
	json_array_foreach(json_object_get(doc, "producers"), i, p)
		cr_expect_eq(json_integer_value(json_object_get(p, "dropped")), 0, "slot dropped samples");
	json_decref(doc);
	td_stop();
}

/* A value above the segment's max_value_ms is stored clamped: record says
 * how many, as it says how many were rejected or dropped. */
Test(record_import, clamped_values_are_counted_in_the_summary)
{
	struct run r;

	td_start(1024);
	record(&r, 0, (const char *const[]){ "q.clamp", "7200000000000", "5", "3600000000001", NULL });
	cr_assert_eq(r.status, 0, "exit %d; stderr:\n%s", r.status, r.err);
	cr_expect_str_eq(r.out, "recorded 3, rejected 0, dropped 0, clamped 2 (above the segment's "
				"max_value_ms = 3600000: stored as that)\n");
	json_t *doc = stat_json();
	cr_expect_eq(total_count_of(doc, "q.clamp"), 3);
	json_decref(doc);
	td_stop();
}

Test(record_import, an_owner_that_stops_draining_is_an_error_naming_segment_owner_and_line)
{
	struct run r;
	char pid[32];

	td_start(1024);
	kill(td.pid, SIGSTOP);
	record(&r, 100000, (const char *const[]){ "--wait-timeout", "1", NULL });
	cr_expect_eq(r.status, 4, "exit %d; stdout %s; stderr:\n%s", r.status, r.out, r.err);
	cr_expect(r.ms >= 900 && r.ms < 10000, "gave up after %" PRIu64 " ms, want about 1 s", r.ms);
	cr_expect(strstr(r.err, td.seg) && strstr(r.err, "stopped draining"), "%s", r.err);
	snprintf(pid, sizeof(pid), "pid %d", (int)td.pid);
	cr_expect(strstr(r.err, pid), "names the owner (%s): %s", pid, r.err);
	cr_expect(strstr(r.err, "stopped at stdin:1025") && strstr(r.err, "1024 lines recorded"),
		  "the line it stopped at and how many before it: %s", r.err);
	cr_expect(strstr(r.err, "--wait-timeout"), "says what to do: %s", r.err);
	cr_expect_str_empty(r.out, "no summary that the owner did not count");
	td_stop();
}

static void *kill_later(void *arg)
{
	(void)arg;
	tt_sleep_ms(300);
	kill(td.pid, SIGKILL);
	return NULL;
}

/* No owner comes back: record waits its --wait-timeout for one (a restart
 * would be followed, see below), then says so. */
Test(record_import, an_owner_that_dies_and_does_not_come_back_is_an_error)
{
	pthread_t killer;
	struct run r;

	td_start(1024);
	kill(td.pid, SIGSTOP);
	cr_assert_eq(pthread_create(&killer, NULL, kill_later, NULL), 0);
	record(&r, 100000, (const char *const[]){ "--wait-timeout", "2", NULL });
	pthread_join(killer, NULL);
	cr_expect_eq(r.status, 4, "exit %d; stderr:\n%s", r.status, r.err);
	cr_expect(r.ms >= 1800 && r.ms < 10000, "stopped after %" PRIu64 " ms, want about 2 s", r.ms);
	cr_expect(strstr(r.err, td.seg) && strstr(r.err, "not running") && strstr(r.err, "no new owner"),
		  "%s", r.err);
	cr_expect(strstr(r.err, "stopped at stdin:1025"), "%s", r.err);
	td_stop();
}

/* tallyd restarted while tally record imports: record follows the new
 * owner (the library moves its handle), nothing is refused for good, and
 * what the old owner had not drained is reported lost. */
/* The new tallyd's PR_SET_PDEATHSIG fires when the thread that forked it
 * exits, not the process: this thread stays until the test is done. */
static atomic_bool restart_done;

static void *restart_later(void *arg)
{
	(void)arg;
	tt_sleep_ms(300);
	kill(td.pid, SIGCONT);
	kill(td.pid, SIGTERM);
	waitpid(td.pid, NULL, 0);
	tt_sleep_ms(200); /* no owner for a while */
	td.pid = fork();
	if (td.pid == 0) {
		int fd = open(td.log, O_WRONLY | O_CREAT | O_APPEND, 0600);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
			_exit(127);
		execl(TALLYD, TALLYD, "-c", td.cfg, (char *)NULL);
		_exit(127);
	}
	while (!atomic_load(&restart_done))
		tt_sleep_ms(10);
	return NULL;
}

Test(record_import, an_owner_restarted_while_record_imports_is_followed)
{
	pthread_t restarter;
	struct run r;
	unsigned long long rec = 0, rej = 0, drop = 0, lost = 0, restarts = 0;

	td_start(1024);
	cr_assert_eq(pthread_create(&restarter, NULL, restart_later, NULL), 0);
	record(&r, LINES, (const char *const[]){ "--wait-timeout", "10", NULL });
	cr_assert(sscanf(r.out, "recorded %llu, rejected %llu, dropped %llu, lost %llu (the owner "
			 "restarted %llu time", &rec, &rej, &drop, &lost, &restarts) == 5,
		  "exit %d; stdout: %s; stderr:\n%s", r.status, r.out, r.err);
	cr_expect_eq(rec, LINES);
	cr_expect_eq(restarts, 1);
	cr_expect_eq(r.status, lost ? 1 : 0, "exit %d with %llu lost", r.status, lost);
	/* the new owner has everything recorded after the move */
	json_t *doc = stat_json();
	json_int_t in_new = 0;
	for (int i = 0; i < NSUBJECTS; i++)
		in_new += total_count_of(doc, subjects[i]);
	json_decref(doc);
	cr_expect_gt(in_new, 0, "the new owner got nothing");
	cr_expect_leq((unsigned long long)in_new + lost, LINES);
	fprintf(stderr, "record across a tallyd restart: %llu lines in %" PRIu64 " ms, %lld in the new "
		"owner, %llu lost in the old owner's ring\n", rec, r.ms, (long long)in_new, lost);
	td_stop();
	atomic_store(&restart_done, true);
	pthread_join(restarter, NULL);
}

static void *cont_later(void *arg)
{
	(void)arg;
	tt_sleep_ms(2500);
	kill(td.pid, SIGCONT);
	return NULL;
}

Test(record_import, on_a_terminal_progress_is_shown_while_it_waits_then_cleared)
{
	char in[160], tty[160], cmd[600];
	static char text[8192];
	pthread_t cont;
	FILE *f;

	td_start(1024);
	snprintf(in, sizeof(in), "%s/in.txt", td.dir);
	snprintf(tty, sizeof(tty), "%s/tty.out", td.dir);
	int fd = open(in, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	cr_assert(fd >= 0);
	feed(fd, 100000);
	/* script(1) runs it on a pseudo-terminal and copies what it wrote to tty */
	snprintf(cmd, sizeof(cmd), "%s -s %s record --wait-timeout 30 < %s", TALLY_BIN, td.seg, in);
	const char *argv[] = { "/usr/bin/script", "-qec", cmd, tty, NULL };
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);
	kill(td.pid, SIGSTOP);
	cr_assert_eq(pthread_create(&cont, NULL, cont_later, NULL), 0);
	int st = wait_status(spawn(argv, null, null, null));
	pthread_join(cont, NULL);
	close(null);
	cr_assert_eq(st, 0, "script/tally record exit %d", st);
	cr_assert_not_null(f = fopen(tty, "r"));
	text[fread(text, 1, sizeof(text) - 1, f)] = '\0';
	fclose(f);
	cr_expect(strstr(text, "\rtally record: 1025 lines read, 1024 recorded\033[K"),
		  "progress while the owner is stopped: %s", text);
	const char *clear = strstr(text, "\r\033[Krecorded 100000, rejected 0, dropped 0");
	cr_expect(clear, "the progress line is cleared before the summary: %s", text);
	td_stop();
}
