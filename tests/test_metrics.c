/* SPDX-License-Identifier: MIT */
/*
 * test_metrics.c: tallyd's Prometheus endpoint, from outside: tallyd runs
 * as a child (TALLY_TEST_BUILDDIR/tools/tallyd --http 127.0.0.1:0, the
 * port read from its "ready" log line), the test records through a
 * producer and talks HTTP over a plain socket. The exposition passes
 * `promtool check metrics`, label values are escaped, only GET and HEAD
 * /metrics are answered (404, 405 otherwise), oversized requests are
 * refused, and a real Prometheus server (the Debian package) scrapes
 * tallyd and returns a value through its query API.
 */
#include "config.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
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

/* SIGTERM, wait up to timeout_ms, then SIGKILL. The exit code, or -1. */
static int child_stop(struct child *c, unsigned timeout_ms)
{
	uint64_t end = now_ms() + timeout_ms;
	int st = 0;

	if (c->pid <= 0)
		return -1;
	kill(c->pid, SIGTERM);
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

static void env_start(struct env *e, const char *tag)
{
	char log[160];
	const char *s;

	g_env = e;
	memset(e, 0, sizeof(*e));
	snprintf(e->dir, sizeof(e->dir), "/tmp/tally-metrics-XXXXXX");
	cr_assert_not_null(mkdtemp(e->dir));
	snprintf(e->seg, sizeof(e->seg), "%s", tt_segname(tag));
	snprintf(log, sizeof(log), "%s/tallyd.log", e->dir);
	child_start(&e->td, log,
		    (const char *const[]){ TALLYD, "-s", e->seg, "--http", "127.0.0.1:0", NULL });
	for (uint64_t end = now_ms() + 10000; now_ms() < end; tt_sleep_ms(10)) {
		if ((s = strstr(child_log(&e->td), "http://127.0.0.1:"))) {
			e->port = atoi(s + strlen("http://127.0.0.1:"));
			break;
		}
	}
	cr_assert_gt(e->port, 0, "tallyd did not report its port; log:\n%s", child_log(&e->td));
	cr_assert_eq(tally_segment_open(e->seg, TALLY_OPEN_PRODUCER, 2000, &e->seg_h), 0, "%s",
		     tally_errmsg());
	cr_assert_eq(tally_producer_attach(e->seg_h, &e->p), 0);
}

static void env_stop(struct env *e)
{
	char cmd[128];

	g_env = NULL;
	tally_producer_detach(&e->p);
	tally_segment_close(&e->seg_h);
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
static void check_buckets(const char *body, const char *subject, double at, uint64_t n)
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
	cr_expect(buckets > 10, "only %d buckets", buckets);
	cr_expect(inf && last == n, "+Inf bucket %lu, want %lu", last, n);
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


Test(metrics, prometheus_scrapes_tallyd)
{
	struct env *e = &the_env;
	struct child *prom = &the_prom;
	char cfg[160], tsdb[160], listen[64], log[160], *reply = NULL;
	int pport = tt_free_port(), st = 0;
	FILE *f;

	env_start(e, "mx-prom");
	record(e, "orders.created", 2000000, 25);
	snprintf(cfg, sizeof(cfg), "%.63s/prometheus.yml", e->dir);
	snprintf(tsdb, sizeof(tsdb), "%.63s/tsdb", e->dir);
	snprintf(log, sizeof(log), "%.63s/prometheus.log", e->dir);
	snprintf(listen, sizeof(listen), "--web.listen-address=127.0.0.1:%d", pport);
	cr_assert_not_null(f = fopen(cfg, "w"));
	fprintf(f, "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
		   "scrape_configs:\n  - job_name: tallyd\n    static_configs:\n"
		   "      - targets: ['127.0.0.1:%d']\n", e->port);
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
	env_stop(e);
}
