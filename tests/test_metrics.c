/* SPDX-License-Identifier: MIT */
/*
 * test_metrics.c: tallyd's Prometheus endpoint, from outside: tallyd runs
 * as a child (TALLY_TEST_BUILDDIR/tools/tallyd --http 127.0.0.1:0, the
 * port read from its "ready" log line), the test records through a
 * producer and talks HTTP over a plain socket. The exposition passes
 * `promtool check metrics`, label values are escaped, only GET and HEAD
 * /metrics are answered (404, 405 otherwise), oversized requests are
 * refused, and a real Prometheus server (the Debian package) scrapes
 * tallyd and returns a value through its query API, also over TLS with
 * basic auth and gzip.
 *
 * Operator items (issue 15): malformed requests are answered 400 (or, for
 * a request line libmicrohttpd cannot split, closed) and logged once a
 * minute, not once each; a port in use is named with the key to change;
 * fewer series per subject on request; gzip when asked; TLS from a
 * certificate the test makes with the openssl CLI, basic auth against a
 * bcrypt hash made with crypt(3), both checked with libcurl.
 */
#include "config.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <crypt.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "common/helpers.h"
#include "common/http.h"

#define TALLYD TALLY_TEST_BUILDDIR "/tools/tallyd"
#define PROMTOOL "promtool"
#define PROMETHEUS "prometheus"

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- a child process with its output in a log file ---- */

struct child {
	pid_t pid;
	char log[160];
};

static void child_start(struct child *c, const char *log, const char *const *argv)
{
	snprintf(c->log, sizeof(c->log), "%s", log);
	c->pid = fork();
	cr_assert_neq(c->pid, -1);
	if (c->pid == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
			_exit(127);
		execvp(argv[0], (char *const *)argv);
		_exit(127);
	}
}

static const char *child_log(const struct child *c)
{
	static char buf[65536];
	FILE *f = fopen(c->log, "r");
	size_t n = 0;

	if (f) {
		n = fread(buf, 1, sizeof(buf) - 1, f);
		fclose(f);
	}
	buf[n] = '\0';
	/* the tail is what matters in a long log */
	return n > 8000 ? buf + n - 8000 : buf;
}

/* Wait for the child until end (ms), then SIGKILL it. The exit code, or -1. */
static int child_wait(struct child *c, uint64_t end)
{
	int st = 0;

	while (waitpid(c->pid, &st, WNOHANG) == 0) {
		if (now_ms() >= end) {
			kill(c->pid, SIGKILL);
			waitpid(c->pid, &st, 0);
			c->pid = 0;
			return -1;
		}
		tt_sleep_ms(10);
	}
	c->pid = 0;
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* SIGTERM, wait up to timeout_ms, then SIGKILL. The exit code, or -1. */
static int child_stop(struct child *c, unsigned timeout_ms)
{
	if (c->pid <= 0)
		return -1;
	kill(c->pid, SIGTERM);
	return child_wait(c, now_ms() + timeout_ms);
}

/* ---- tallyd with its exporter ---- */

struct env {
	char dir[64];
	char seg[128];
	struct child td;
	int port;
	struct tally_segment *seg_h;
	struct tally_producer *p;
};

/*
 * What a test started lives here, not on its stack, so that the suite's
 * fini can stop it after a failed assertion (which leaves the test's
 * frame). Each test runs in a process of its own.
 */
static struct env the_env;
static struct child the_prom;
static struct env *g_env;
static struct child *g_prom;

static void suite_fini(void)
{
	char cmd[128];

	if (g_prom)
		child_stop(g_prom, 5000);
	if (!g_env)
		return;
	tally_producer_detach(&g_env->p);
	tally_segment_close(&g_env->seg_h);
	child_stop(&g_env->td, 5000);
	tally_segment_unlink(g_env->seg);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_env->dir);
	if (system(cmd) != 0)
		fprintf(stderr, "cannot remove %s\n", g_env->dir);
}

TestSuite(metrics, .fini = suite_fini, .timeout = 55);

static void env_dir(struct env *e, const char *tag)
{
	g_env = e;
	memset(e, 0, sizeof(*e));
	snprintf(e->dir, sizeof(e->dir), "/tmp/tally-metrics-XXXXXX");
	cr_assert_not_null(mkdtemp(e->dir));
	snprintf(e->seg, sizeof(e->seg), "%s", tt_segname(tag));
}

/* dir/name with text in it; the path into path. */
static void write_file(const struct env *e, const char *name, const char *text, char *path,
		       size_t len)
{
	FILE *f;

	snprintf(path, len, "%s/%s", e->dir, name);
	cr_assert_not_null(f = fopen(path, "w"), "%s: %s", path, strerror(errno));
	fputs(text, f);
	fclose(f);
}

/* tallyd on 127.0.0.1:0 (dir made), with tallyd.ini holding ini when not NULL. */
static void env_launch(struct env *e, const char *ini)
{
	char log[160], cfg[160];
	const char *s;

	snprintf(log, sizeof(log), "%s/tallyd.log", e->dir);
	if (ini)
		write_file(e, "tallyd.ini", ini, cfg, sizeof(cfg));
	child_start(&e->td, log,
		    ini ? (const char *const[]){ TALLYD, "-c", cfg, "-s", e->seg, "--http",
						  "127.0.0.1:0", NULL }
			: (const char *const[]){ TALLYD, "-s", e->seg, "--http", "127.0.0.1:0", NULL });
	for (uint64_t end = now_ms() + 10000; now_ms() < end; tt_sleep_ms(10)) {
		if ((s = strstr(child_log(&e->td), "://127.0.0.1:"))) {
			e->port = atoi(s + strlen("://127.0.0.1:"));
			break;
		}
	}
	cr_assert_gt(e->port, 0, "tallyd did not report its port; log:\n%s", child_log(&e->td));
	cr_assert_eq(tally_segment_open(e->seg, TALLY_OPEN_PRODUCER, 2000, &e->seg_h), 0, "%s",
		     tally_errmsg());
	cr_assert_eq(tally_producer_attach(e->seg_h, &e->p), 0);
}

static void env_start_ini(struct env *e, const char *tag, const char *ini)
{
	env_dir(e, tag);
	env_launch(e, ini);
}

static void env_start(struct env *e, const char *tag)
{
	env_start_ini(e, tag, NULL);
}

static void env_stop(struct env *e)
{
	char cmd[128];

	g_env = NULL;
	tally_producer_detach(&e->p);
	tally_segment_close(&e->seg_h);
	if (e->td.pid) /* else the test stopped it */
		cr_expect_eq(child_stop(&e->td, 5000), 0, "tallyd exit; log:\n%s", child_log(&e->td));
	tally_segment_unlink(e->seg);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", e->dir);
	cr_expect_eq(system(cmd), 0);
}

/* Record n samples of ns each for subject; wait until published. */
static void record(struct env *e, const char *subject, uint64_t ns, unsigned n)
{
	struct tally_subject_stats st;
	tally_subject_t id;

	cr_assert_eq(tally_subject_intern(e->seg_h, subject, &id), 0, "%s", tally_errmsg());
	for (unsigned i = 0; i < n; i++)
		cr_assert(tally_record(e->p, id, ns));
	for (uint64_t end = now_ms() + 5000; now_ms() < end; tt_sleep_ms(10))
		if (tally_read_subject(e->seg_h, id, &st) == 0 && st.total_count >= n)
			return;
	cr_assert_fail("%u samples of %s not published in 5 s", n, subject);
}

/* ---- scraping (tests/common/http.c) ---- */

/* GET /metrics until it holds want (the histogram trails by a slice): the reply. */
static char *scrape_until(int port, const char *want)
{
	char *last = NULL;

	for (uint64_t end = now_ms() + 5000; now_ms() < end; tt_sleep_ms(50)) {
		char *reply;
		int st = tt_http(port, "GET", "/metrics", &reply);

		free(last);
		last = reply;
		if (st == 200 && strstr(reply, want))
			return reply;
	}
	cr_assert_fail("no \"%s\" in /metrics within 5 s:\n%s", want, last);
	return last;
}

/*
 * The histogram of subject, whose n samples all took `at` seconds: its
 * buckets climb, hold 0 below `at` and n from `at` on, and end at +Inf.
 */
static void check_buckets_min(const char *body, const char *subject, double at, uint64_t n,
			      int min_buckets)
{
	char prefix[320];
	const char *s = body;
	uint64_t last = 0, v;
	int buckets = 0;
	bool inf = false;

	snprintf(prefix, sizeof(prefix), "tally_subject_latency_seconds_bucket{subject=\"%s\",le=\"",
		 subject);
	while ((s = strstr(s, prefix))) {
		char le[32];

		s += strlen(prefix);
		cr_assert_eq(sscanf(s, "%31[^\"]\"} %lu", le, &v), 2, "bad bucket line: %.80s", s);
		cr_expect_geq(v, last, "buckets not cumulative at le=%s", le);
		last = v;
		buckets++;
		if (strcmp(le, "+Inf") == 0)
			inf = true;
		else
			cr_expect_eq(v, strtod(le, NULL) < at ? 0 : n, "bucket le=%s holds %lu", le, v);
	}
	cr_expect(buckets >= min_buckets, "only %d buckets", buckets);
	cr_expect(inf && last == n, "+Inf bucket %lu, want %lu", last, n);
}

static void check_buckets(const char *body, const char *subject, double at, uint64_t n)
{
	check_buckets_min(body, subject, at, n, 11);
}

/* ---- tests ---- */

Test(metrics, exposition_passes_promtool)
{
	struct env *e = &the_env;
	char *reply, path[128], cmd[512], want[512];
	FILE *f;
	int rc;

	env_start(e, "mx-content");
	record(e, "orders.created", 50000000, 40);      /* 50 ms */
	record(e, "odd.sub\"ject\\x", 1500, 3);         /* needs escaping */
	reply = scrape_until(e->port, "tally_subject_latency_seconds_count{subject=\"orders.created\"} "
				      "40\n");
	cr_expect(strstr(reply, "Content-Type: text/plain; version=0.0.4"), "%s", reply);
	const char *body = tt_http_body(reply);

	cr_expect(strstr(body, "# TYPE tally_subject_latency_seconds histogram\n"));
	cr_expect(strstr(body, "tally_subject_latency_seconds_count{subject=\"orders.created\"} 40\n"),
		  "%s", body);
	check_buckets(body, "orders.created", 0.05, 40);
	cr_expect(strstr(body, "tally_subject_latency_seconds_sum{subject=\"orders.created\"} 2\n"),
		  "40 x 50 ms = 2 s:\n%s", body);
	cr_expect(strstr(body, "tally_subject_latency_window_seconds{subject=\"orders.created\","
			       "quantile=\"0.95\"} 0.0"), "%s", body);
	cr_expect(strstr(body, "tally_subject_latency_window_seconds{subject=\"odd.sub\\\"ject\\\\x\","
			       "quantile=\"0.5\"} 0.0000015\n"), "label values escaped:\n%s", body);
	snprintf(want, sizeof(want), "tally_segment_info{segment=\"%s\",owner_pid=\"%d\",generation=\"",
		 e->seg, (int)e->td.pid);
	cr_expect(strstr(body, want), "%s", body);
	cr_expect(strstr(body, "tally_subject_verdict{subject=\"orders.created\"} "), "%s", body);
	cr_expect(strstr(body, "# TYPE tally_producer_dropped_samples_total counter\n"));
	cr_expect(strstr(body, "tally_engine_drained_samples_total 43\n"), "%s", body);
	cr_expect(!strstr(body, "tally_poller_"), "poller families without a poller");

	snprintf(path, sizeof(path), "%.63s/metrics.txt", e->dir);
	cr_assert_not_null(f = fopen(path, "w"));
	fputs(body, f);
	fclose(f);
	snprintf(cmd, sizeof(cmd), PROMTOOL " check metrics < '%s' > '%s.out' 2>&1", path, path);
	rc = system(cmd);
	snprintf(path, sizeof(path), "%.63s/metrics.txt.out", e->dir);
	struct child out = { 0 };
	snprintf(out.log, sizeof(out.log), "%s", path);
	cr_expect(WIFEXITED(rc) && WEXITSTATUS(rc) == 0, "promtool check metrics failed (%d):\n%s",
		  rc, child_log(&out));
	free(reply);
	env_stop(e);
}

Test(metrics, only_get_and_head_on_metrics)
{
	struct env *e = &the_env;
	char *reply;

	env_start(e, "mx-http");
	cr_expect_eq(tt_http(e->port, "GET", "/", &reply), 404);
	free(reply);
	cr_expect_eq(tt_http(e->port, "GET", "/metrics/x", &reply), 404);
	free(reply);
	cr_expect_eq(tt_http(e->port, "GET", "/metricsx", &reply), 404);
	free(reply);
	cr_expect_eq(tt_http(e->port, "GET", "/metrics?x=1", &reply), 200);
	free(reply);
	for (int i = 0; i < 3; i++) {
		const char *m[] = { "POST", "PUT", "DELETE" };

		cr_expect_eq(tt_http(e->port, m[i], "/metrics", &reply), 405, "%s", m[i]);
		cr_expect(strstr(reply, "Allow: GET, HEAD"), "%s", reply);
		free(reply);
	}
	cr_expect_eq(tt_http(e->port, "HEAD", "/metrics", &reply), 200);
	cr_expect_str_eq(tt_http_body(reply), "", "HEAD has no body");
	free(reply);

	/* a 100 KiB header: refused (431) or the connection closed, never served */
	size_t big = 100 * 1024;
	char *req = malloc(big + 256);
	int n = snprintf(req, 256, "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ");

	memset(req + n, 'a', big);
	memcpy(req + n + big, "\r\n\r\n", 5);
	int st = tt_http_raw(e->port, req, (size_t)n + big + 4, &reply);
	cr_expect(st == 0 || st == 431 || st == 413, "oversized request got %d", st);
	free(reply);
	free(req);
	cr_expect_eq(tt_http(e->port, "GET", "/metrics", &reply), 200, "still serving");
	free(reply);
	env_stop(e);
}


/*
 * A real Prometheus scrapes tallyd (e->port) with job holding the job's
 * extra settings (YAML, 4 spaces in), and its query API returns the 25
 * samples of orders.created the caller recorded; the target is up.
 */
static void prometheus_check(struct env *e, const char *job)
{
	struct child *prom = &the_prom;
	char cfg[160], tsdb[160], listen[64], log[160], *reply = NULL;
	int pport = tt_free_port(), st = 0;
	FILE *f;

	snprintf(cfg, sizeof(cfg), "%.63s/prometheus.yml", e->dir);
	snprintf(tsdb, sizeof(tsdb), "%.63s/tsdb", e->dir);
	snprintf(log, sizeof(log), "%.63s/prometheus.log", e->dir);
	snprintf(listen, sizeof(listen), "--web.listen-address=127.0.0.1:%d", pport);
	cr_assert_not_null(f = fopen(cfg, "w"));
	fprintf(f, "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
		   "scrape_configs:\n  - job_name: tallyd\n%s    static_configs:\n"
		   "      - targets: ['127.0.0.1:%d']\n", job, e->port);
	fclose(f);
	char cfgarg[200], tsdbarg[200];

	snprintf(cfgarg, sizeof(cfgarg), "--config.file=%s", cfg);
	snprintf(tsdbarg, sizeof(tsdbarg), "--storage.tsdb.path=%s", tsdb);
	g_prom = prom;
	child_start(prom, log, (const char *const[]){ PROMETHEUS, cfgarg, tsdbarg, listen,
						       "--log.level=warn", NULL });
	/* ready, then the value of a query, each bounded */
	for (uint64_t end = now_ms() + 20000; now_ms() < end; tt_sleep_ms(200)) {
		st = 0;
		if (kill(prom->pid, 0) != 0)
			break;
		st = tt_http(pport, "GET", "/-/ready", &reply);
		free(reply);
		reply = NULL;
		if (st == 200)
			break;
	}
	cr_assert_eq(st, 200, "prometheus not ready; log:\n%s", child_log(prom));
	bool found = false;

	for (uint64_t end = now_ms() + 20000; !found && now_ms() < end; tt_sleep_ms(300)) {
		free(reply);
		st = tt_http(pport, "GET", "/api/v1/query?query=tally_subject_latency_seconds_count",
			  &reply);
		found = st == 200 && strstr(reply, "\"subject\":\"orders.created\"") &&
			strstr(reply, ",\"25\"]");
	}
	cr_expect(found, "the query did not return the value; last reply:\n%s\nprometheus log:\n%s",
		  reply, child_log(prom));
	free(reply);
	cr_expect_eq(tt_http(pport, "GET", "/api/v1/query?query=up%7Bjob%3D%22tallyd%22%7D", &reply),
		     200);
	cr_expect(strstr(reply, ",\"1\"]"), "target not up: %s", reply);
	free(reply);
	child_stop(prom, 10000);
	g_prom = NULL;
}

Test(metrics, prometheus_scrapes_tallyd)
{
	struct env *e = &the_env;

	env_start(e, "mx-prom");
	record(e, "orders.created", 2000000, 25);
	prometheus_check(e, "");
	env_stop(e);
}

/* ---- operator items (issue 15) ---- */

static int count_of(const char *hay, const char *needle)
{
	int n = 0;

	for (const char *s = hay; (s = strstr(s, needle)); s += strlen(needle))
		n++;
	return n;
}

/* Run argv to its end (at most timeout_ms), output into log: its exit code, or -1. */
static int run_wait(struct child *c, const char *log, const char *const *argv, unsigned timeout_ms)
{
	uint64_t end = now_ms() + timeout_ms;

	unlink(log);
	child_start(c, log, argv);
	return child_wait(c, end);
}

Test(metrics, malformed_requests_get_400_and_one_log_line_a_minute)
{
	struct env *e = &the_env;
	const char bad_header[] = "GET /metrics HTTP/1.1\r\nHost x\r\n\r\n";
	const char bad_version[] = "GET /metrics HTTP/7.1\r\nHost: x\r\n\r\n";
	const char garbage[] = "GARBAGE\r\n\r\n";
	char *reply;
	int st;

	env_start(e, "mx-bad");
	/* what libmicrohttpd can parse it answers: 400 (a header without ':'), 505 */
	st = tt_http_raw(e->port, bad_header, sizeof(bad_header) - 1, &reply);
	cr_expect_eq(st, 400, "a header line without ':': %d\n%s", st, reply);
	free(reply);
	st = tt_http_raw(e->port, bad_version, sizeof(bad_version) - 1, &reply);
	cr_expect_eq(st, 505, "HTTP/7.1: %d\n%s", st, reply);
	free(reply);
	/* a request line without a space: libmicrohttpd 0.9.75 closes the
	 * connection without a reply and without a message (no option changes
	 * that: connection.c, parse_initial_message_line); closed, not hung */
	uint64_t t0 = now_ms();
	st = tt_http_raw(e->port, garbage, sizeof(garbage) - 1, &reply);
	cr_expect(st == 0 && reply[0] == '\0' && now_ms() - t0 < 4000,
		  "GARBAGE: status %d, reply \"%s\" after %lu ms", st, reply,
		  (unsigned long)(now_ms() - t0));
	free(reply);
	/* a local client's flood: one line, then a count */
	for (int i = 0; i < 198; i++) {
		st = tt_http_raw(e->port, i % 3 ? bad_header : garbage,
				 i % 3 ? sizeof(bad_header) - 1 : sizeof(garbage) - 1, &reply);
		cr_assert(st == (i % 3 ? 400 : 0), "request %d: %d", i, st);
		free(reply);
	}
	cr_expect_eq(tt_http(e->port, "GET", "/metrics", &reply), 200, "still serving");
	free(reply);
	const char *log = child_log(&e->td);
	cr_expect_eq(count_of(log, "http: "), 1, "libmicrohttpd's messages not limited:\n%s", log);
	cr_expect(!strstr(log, "<html>"), "the HTML page in the log:\n%s", log);
	cr_expect(strstr(log, "HTTP response code is 400"), "%s", log);
	/* the count of what was not logged comes at the latest at stop:
	 * 1 + 132 bad headers + 1 505; the first logged */
	cr_expect_eq(child_stop(&e->td, 5000), 0);
	log = child_log(&e->td);
	cr_expect(strstr(log, "http: 133 more libmicrohttpd messages in the last "),
		  "no count at stop:\n%s", log);
	env_stop(e);
}

Test(metrics, port_in_use_names_address_and_key)
{
	struct env *e = &the_env;
	struct child second = { 0 };
	char listen[64], log[160], want[160];

	env_start(e, "mx-clash");
	snprintf(listen, sizeof(listen), "127.0.0.1:%d", e->port);
	snprintf(log, sizeof(log), "%.63s/second.log", e->dir);
	int rc = run_wait(&second, log, (const char *const[]){ TALLYD, "-s", "tally-mx-clash-2",
							       "--http", listen, NULL }, 10000);
	cr_expect_eq(rc, 1, "second tallyd: exit %d\n%s", rc, child_log(&second));
	snprintf(want, sizeof(want), "cannot listen on %s: address already in use", listen);
	cr_expect(strstr(child_log(&second), want), "%s", child_log(&second));
	cr_expect(strstr(child_log(&second), "[http] listen or --http ADDR:PORT"), "%s",
		  child_log(&second));
	cr_expect(!strstr(child_log(&second), "port 0"), "%s", child_log(&second));
	tally_segment_unlink("tally-mx-clash-2");
	env_stop(e);
}

/* Lines of body that start with prefix. */
static int lines_with(const char *body, const char *prefix)
{
	int n = 0;
	size_t pl = strlen(prefix);

	for (const char *l = body; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL)
		n += strncmp(l, prefix, pl) == 0;
	return n;
}

Test(metrics, quantiles_only_drops_the_histogram)
{
	struct env *e = &the_env;
	char *reply;

	env_start_ini(e, "mx-qonly", "[http]\nlatency_histogram = false\n");
	record(e, "orders.created", 5000000, 40);
	reply = scrape_until(e->port, "tally_subject_latency_window_seconds{subject=\"orders.created\","
				      "quantile=\"0.99\"}");
	const char *body = tt_http_body(reply);

	cr_expect_eq(lines_with(body, "tally_subject_latency_seconds"), 0, "%s", body);
	cr_expect_eq(lines_with(body, "# TYPE tally_subject_latency_seconds "), 0);
	cr_expect_eq(lines_with(body, "tally_subject_latency_window_seconds{subject=\"orders.created\""), 5);
	cr_expect_geq(lines_with(body, "tally_subject_verdict{"), 1);
	free(reply);
	env_stop(e);
}

Test(metrics, chosen_buckets_are_exact_engine_edges)
{
	struct env *e = &the_env;
	char *reply, le[3][32];
	const char *s;
	int n = 0;

	env_start_ini(e, "mx-buckets", "[http]\nhistogram_buckets_ms = 1, 10, 100\n");
	record(e, "orders.created", 5000000, 40); /* 5 ms */
	reply = scrape_until(e->port, "tally_subject_latency_seconds_count{subject=\"orders.created\"} "
				      "40\n");
	const char *body = tt_http_body(reply);

	/* 3 bounds and +Inf, not the ~50 of two per octave */
	cr_expect_eq(lines_with(body, "tally_subject_latency_seconds_bucket{subject=\"orders.created\""),
		     4, "%s", body);
	check_buckets_min(body, "orders.created", 0.005, 40, 4);
	for (s = body; n < 3 && (s = strstr(s, "_bucket{subject=\"orders.created\",le=\"")); n++) {
		s += strlen("_bucket{subject=\"orders.created\",le=\"");
		cr_assert_eq(sscanf(s, "%31[^\"]", le[n]), 1);
	}
	cr_assert_eq(n, 3);
	/* each the engine's edge at or below the bound, at most a fifth lower */
	const double want[] = { 0.001, 0.010, 0.100 };
	for (int i = 0; i < 3; i++) {
		double v = strtod(le[i], NULL);

		cr_expect(v <= want[i] && v >= want[i] * 0.8, "le=%s for %g", le[i], want[i]);
	}
	free(reply);
	env_stop(e);
}

Test(metrics, http_keys_checked_with_file_and_line)
{
	struct env e0 = { 0 }, *e = &e0;
	struct child c = { 0 };
	char cfg[160], log[160];
	static const struct {
		const char *ini, *want;
	} cases[] = {
		{ "[http]\nlisten = 127.0.0.1:0\nhistogram_buckets_ms = 10, 5\n",
		  "tallyd.ini:3: [http]: histogram_buckets_ms: \"5\" is not above" },
		{ "[http]\nhistogram_buckets_ms = 1, 2ms\n", "tallyd.ini:2: [http]: histogram_buckets_ms: "
		  "\"2ms\"" },
		{ "[http]\nlatency_histogram = false\nhistogram_buckets_ms = 1\n",
		  "tallyd.ini:3: [http]: histogram_buckets_ms with latency_histogram = false" },
		{ "[http]\n\ntls_cert_file = /nonexistent/cert.pem\ntls_key_file = /nonexistent/key.pem\n",
		  "tallyd.ini:3: [http]: tls_cert_file /nonexistent/cert.pem: No such file or directory" },
		{ "[http]\ntls_key_file = /etc/hostname\n", "tallyd.ini:2: [http]: TLS needs both" },
		{ "[http]\nbasic_auth_users = prom:secret\n",
		  "tallyd.ini:2: [http]: basic_auth_users: user prom: \"secret\" is not a bcrypt hash" },
		{ "[http]\nbasic_auth_users = prom\n", "tallyd.ini:2: [http]: basic_auth_users: \"prom\": "
		  "expected NAME:BCRYPT_HASH" },
		{ "[http]\n\nbasic_auth_file = /nonexistent/htpasswd\n",
		  "tallyd.ini:3: [http]: basic_auth_file /nonexistent/htpasswd: No such file" },
		{ "[http]\nbasic_auth_file = /etc/hostname\n",
		  "tallyd.ini:2: [http]: basic_auth_file /etc/hostname:1: " },
	};

	env_dir(e, "mx-keys");
	snprintf(log, sizeof(log), "%.63s/out.log", e->dir);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		write_file(e, "tallyd.ini", cases[i].ini, cfg, sizeof(cfg));
		int rc = run_wait(&c, log, (const char *const[]){ TALLYD, "-c", cfg, "-s", e->seg, NULL },
				  10000);

		cr_expect_eq(rc, 2, "case %zu: exit %d\n%s", i, rc, child_log(&c));
		cr_expect(strstr(child_log(&c), cases[i].want), "case %zu: want \"%s\" in:\n%s", i,
			  cases[i].want, child_log(&c));
	}
	g_env = NULL;
	tally_segment_unlink(e->seg);
	snprintf(cfg, sizeof(cfg), "rm -rf '%.63s'", e->dir);
	cr_expect_eq(system(cfg), 0);
}

/* gunzip in into a malloc'd NUL-terminated string; NULL if it is not gzip. */
static char *gunzip(const char *in, size_t len)
{
	z_stream z;
	size_t cap = 1 << 16;
	char *out = malloc(cap), *bigger;
	int rc = Z_OK;

	memset(&z, 0, sizeof(z));
	if (!out || inflateInit2(&z, 15 + 16) != Z_OK) {
		free(out);
		return NULL;
	}
	z.next_in = (Bytef *)(uintptr_t)in;
	z.avail_in = (uInt)len;
	while (rc == Z_OK) {
		if (cap - 1 - z.total_out == 0) {
			if (!(bigger = realloc(out, cap * 2)))
				break;
			out = bigger;
			cap *= 2;
		}
		z.next_out = (Bytef *)out + z.total_out;
		z.avail_out = (uInt)(cap - 1 - z.total_out);
		rc = inflate(&z, Z_NO_FLUSH);
	}
	inflateEnd(&z);
	if (rc != Z_STREAM_END) {
		free(out);
		return NULL;
	}
	out[z.total_out] = '\0';
	return out;
}

/* GET /metrics with Accept-Encoding ae (NULL: none): the status, reply in *reply. */
static int get_encoded(int port, const char *ae, char **reply, size_t *len)
{
	char req[256];
	int n = snprintf(req, sizeof(req), "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n%s%s%s"
			 "Connection: close\r\n\r\n", ae ? "Accept-Encoding: " : "", ae ? ae : "",
			 ae ? "\r\n" : "");
	int st = tt_http_raw(port, req, (size_t)n, reply);
	char cl[32];

	*len = tt_http_header(*reply, "Content-Length", cl, sizeof(cl)) == 0 ? strtoul(cl, NULL, 10)
									      : 0;
	return st;
}

Test(metrics, gzip_when_the_scraper_asks)
{
	struct env *e = &the_env;
	char *reply, enc[64], *plain;
	size_t len;

	env_start(e, "mx-gzip");
	record(e, "orders.created", 5000000, 40);
	free(scrape_until(e->port, "tally_subject_latency_seconds_count{subject=\"orders.created\"} 40\n"));
	cr_assert_eq(get_encoded(e->port, "gzip", &reply, &len), 200);
	cr_expect_eq(tt_http_header(reply, "Content-Encoding", enc, sizeof(enc)), 0, "%.300s", reply);
	cr_expect_str_eq(enc, "gzip");
	const char *body = strstr(reply, "\r\n\r\n") + 4;
	cr_assert_not_null(plain = gunzip(body, len), "not gzip");
	cr_expect(strstr(plain, "tally_subject_latency_seconds_count{subject=\"orders.created\"} 40\n"),
		  "%s", plain);
	cr_expect(len < strlen(plain) / 4, "gzip %zu bytes of %zu", len, strlen(plain));
	free(plain);
	free(reply);
	/* as Prometheus sends it, with q-values; q=0 refuses; none asked: plain */
	const char *yes[] = { "GZIP", "deflate, gzip;q=1.0, *;q=0.5", "br, gzip" };
	const char *no[] = { NULL, "gzip;q=0", "identity", "deflate" };

	for (size_t i = 0; i < 3; i++) {
		cr_expect_eq(get_encoded(e->port, yes[i], &reply, &len), 200);
		cr_expect_eq(tt_http_header(reply, "Content-Encoding", enc, sizeof(enc)), 0, "%s", yes[i]);
		free(reply);
	}
	for (size_t i = 0; i < 4; i++) {
		cr_expect_eq(get_encoded(e->port, no[i], &reply, &len), 200);
		cr_expect_neq(tt_http_header(reply, "Content-Encoding", enc, sizeof(enc)), 0, "%s",
			      no[i] ? no[i] : "(none)");
		cr_expect(strstr(reply, "tally_build_info"), "%s: not plain text", no[i] ? no[i] : "(none)");
		free(reply);
	}
	env_stop(e);
}

/* ---- TLS and basic auth ---- */

struct mem {
	char *p;
	size_t len;
};

static size_t mem_write(char *data, size_t sz, size_t n, void *ud)
{
	struct mem *m = ud;
	char *q = realloc(m->p, m->len + sz * n + 1);

	if (!q)
		return 0;
	memcpy(q + m->len, data, sz * n);
	m->p = q;
	m->len += sz * n;
	m->p[m->len] = '\0';
	return sz * n;
}

/* GET url with libcurl: the status (0: no HTTP answer), headers and body. */
static long curl_get(const char *url, const char *cafile, const char *userpwd, struct mem *hdr,
		     struct mem *body)
{
	CURL *c = curl_easy_init();
	long status = 0;

	memset(hdr, 0, sizeof(*hdr));
	memset(body, 0, sizeof(*body));
	cr_assert_not_null(c);
	curl_easy_setopt(c, CURLOPT_URL, url);
	if (cafile)
		curl_easy_setopt(c, CURLOPT_CAINFO, cafile);
	if (userpwd) {
		curl_easy_setopt(c, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
		curl_easy_setopt(c, CURLOPT_USERPWD, userpwd);
	}
	curl_easy_setopt(c, CURLOPT_TIMEOUT, 5L);
	curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, mem_write);
	curl_easy_setopt(c, CURLOPT_HEADERDATA, hdr);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, mem_write);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, body);
	if (curl_easy_perform(c) == CURLE_OK)
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
	curl_easy_cleanup(c);
	if (!hdr->p)
		hdr->p = calloc(1, 1);
	if (!body->p)
		body->p = calloc(1, 1);
	return status;
}

/* A bcrypt hash of pw (cost 5: quick in tests) made with crypt(3). */
static void bcrypt_hash(const char *pw, char *out, size_t len)
{
	char salt[CRYPT_GENSALT_OUTPUT_SIZE];
	struct crypt_data cd;
	const char *h;

	memset(&cd, 0, sizeof(cd));
	cr_assert_not_null(crypt_gensalt_rn("$2b$", 5, NULL, 0, salt, sizeof(salt)));
	cr_assert_not_null(h = crypt_rn(pw, salt, &cd, sizeof(cd)));
	snprintf(out, len, "%s", h);
}

/* A self-signed certificate for 127.0.0.1 and its key, in dir (openssl CLI). */
static void make_cert(const struct env *e, char *cert, char *key, size_t len)
{
	char cmd[768], log[160];
	struct child out = { 0 };

	snprintf(cert, len, "%.63s/cert.pem", e->dir);
	snprintf(key, len, "%.63s/key.pem", e->dir);
	snprintf(log, sizeof(log), "%.63s/openssl.log", e->dir);
	snprintf(cmd, sizeof(cmd), "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 "
		 "-nodes -days 1 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 "
		 "-keyout '%s' -out '%s' > '%s' 2>&1", key, cert, log);
	snprintf(out.log, sizeof(out.log), "%s", log);
	cr_assert_eq(system(cmd), 0, "openssl:\n%s", child_log(&out));
}

Test(metrics, tls_and_basic_auth)
{
	struct env *e = &the_env;
	char cert[160], key[160], hash[128], hash2y[128], ini[1024], url[96], users[256], pwf[160];
	struct mem hdr, body;
	char *reply;

	env_dir(e, "mx-tls");
	make_cert(e, cert, key, sizeof(cert));
	bcrypt_hash("s3cret", hash, sizeof(hash));
	/* htpasswd -B writes $2y$: the same bcrypt under another prefix */
	bcrypt_hash("other-pw", hash2y, sizeof(hash2y));
	hash2y[2] = 'y';
	/* one user in the file (htpasswd lines), one inline */
	snprintf(users, sizeof(users), "# made by htpasswd -B\n\nhtp:%s\n", hash2y);
	write_file(e, "htpasswd", users, pwf, sizeof(pwf));
	snprintf(ini, sizeof(ini), "[http]\ntls_cert_file = %s\ntls_key_file = %s\n"
		 "basic_auth_users = prom:%s\nbasic_auth_file = %s\n", cert, key, hash, pwf);
	env_launch(e, ini);
	cr_expect(strstr(child_log(&e->td), "https://127.0.0.1:"), "%s", child_log(&e->td));
	snprintf(url, sizeof(url), "https://127.0.0.1:%d/metrics", e->port);
	/* no credentials, a wrong password, an unknown user: 401 and the challenge */
	const char *bad[] = { NULL, "prom:wrong", "other:s3cret", "prom:" };
	for (size_t i = 0; i < 4; i++) {
		long st = curl_get(url, cert, bad[i], &hdr, &body);

		cr_expect_eq(st, 401, "%s: %ld", bad[i] ? bad[i] : "(none)", st);
		cr_expect(strstr(hdr.p, "WWW-Authenticate: Basic realm=\"tallyd\""), "%s", hdr.p);
		cr_expect(!strstr(body.p, "tally_build_info"), "%s", body.p);
		free(hdr.p);
		free(body.p);
	}
	/* the right one: 200, twice (the second from the remembered credential) */
	for (int i = 0; i < 2; i++) {
		cr_expect_eq(curl_get(url, cert, "prom:s3cret", &hdr, &body), 200, "%s", hdr.p);
		cr_expect(strstr(body.p, "tally_build_info"), "%s", body.p);
		free(hdr.p);
		free(body.p);
	}
	cr_expect_eq(curl_get(url, cert, "htp:other-pw", &hdr, &body), 200, "$2y$: %s", hdr.p);
	free(hdr.p);
	free(body.p);
	cr_expect_eq(curl_get(url, cert, "htp:s3cret", &hdr, &body), 401, "another user's password");
	free(hdr.p);
	free(body.p);
	/* every path asks for credentials first */
	snprintf(url, sizeof(url), "https://127.0.0.1:%d/", e->port);
	cr_expect_eq(curl_get(url, cert, NULL, &hdr, &body), 401);
	free(hdr.p);
	free(body.p);
	cr_expect_eq(curl_get(url, cert, "prom:s3cret", &hdr, &body), 404);
	free(hdr.p);
	free(body.p);
	/* without the CA, curl refuses the certificate; plain HTTP gets no page */
	snprintf(url, sizeof(url), "https://127.0.0.1:%d/metrics", e->port);
	cr_expect_eq(curl_get(url, NULL, "prom:s3cret", &hdr, &body), 0);
	free(hdr.p);
	free(body.p);
	cr_expect_neq(tt_http(e->port, "GET", "/metrics", &reply), 200);
	cr_expect(!strstr(reply, "tally_build_info"));
	free(reply);
	env_stop(e);
}

Test(metrics, tls_key_not_matching_is_an_error_at_start)
{
	struct env *e = &the_env;
	char cert[160], key[160], cert2[160], key2[160], ini[768], cfg[160], log[160];
	struct child c = { 0 };

	env_dir(e, "mx-tlsbad");
	make_cert(e, cert, key, sizeof(cert));
	snprintf(cert2, sizeof(cert2), "%.63s/cert2.pem", e->dir);
	snprintf(key2, sizeof(key2), "%.63s/key2.pem", e->dir);
	cr_assert_eq(rename(cert, cert2), 0);
	cr_assert_eq(rename(key, key2), 0);
	make_cert(e, cert, key, sizeof(cert)); /* another pair: key2 does not go with cert */
	snprintf(ini, sizeof(ini), "[http]\nlisten = 127.0.0.1:0\ntls_cert_file = %s\ntls_key_file = %s\n",
		 cert, key2);
	write_file(e, "tallyd.ini", ini, cfg, sizeof(cfg));
	snprintf(log, sizeof(log), "%.63s/out.log", e->dir);
	int rc = run_wait(&c, log, (const char *const[]){ TALLYD, "-c", cfg, "-s", e->seg, NULL }, 10000);

	cr_expect_eq(rc, 1, "exit %d\n%s", rc, child_log(&c));
	cr_expect(strstr(child_log(&c), "cannot serve TLS with tls_cert_file"), "%s", child_log(&c));
	g_env = NULL;
	tally_segment_unlink(e->seg);
	snprintf(cfg, sizeof(cfg), "rm -rf '%.63s'", e->dir);
	cr_expect_eq(system(cfg), 0);
}

/* Prometheus as an operator would set it: https, the CA, basic auth from
 * a password file; it asks for gzip on its own (Accept-Encoding: gzip). */
Test(metrics, prometheus_scrapes_over_tls_with_basic_auth)
{
	struct env *e = &the_env;
	char cert[160], key[160], hash[128], ini[1024], job[512], pwfile[160];

	env_dir(e, "mx-promtls");
	make_cert(e, cert, key, sizeof(cert));
	bcrypt_hash("scrape-pw", hash, sizeof(hash));
	write_file(e, "password", "scrape-pw", pwfile, sizeof(pwfile));
	snprintf(ini, sizeof(ini), "[http]\ntls_cert_file = %s\ntls_key_file = %s\n"
		 "basic_auth_users = prometheus:%s\n", cert, key, hash);
	env_launch(e, ini);
	record(e, "orders.created", 2000000, 25);
	snprintf(job, sizeof(job), "    scheme: https\n    tls_config:\n      ca_file: %s\n"
		 "    basic_auth:\n      username: prometheus\n      password_file: %s\n", cert,
		 pwfile);
	prometheus_check(e, job);
	env_stop(e);
}
