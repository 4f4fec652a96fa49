/* SPDX-License-Identifier: MIT */
/*
 * test_e2e_stalled.c: a stuck router is shed, for real. A nats-server with
 * a stream and a durable consumer; a real tallyd (a child process, with an
 * ini in a temp dir) watching it, with a threshold rule for the subject;
 * messages published so that the backlog grows; and NO router: nothing
 * ever completes, not one sample is recorded. The subject must still have
 * a row (from the configuration), and within one publish interval + the
 * stall time + the poll interval of the first message `tally status`
 * must exit 2 with reason stalled and the gateway must answer 503. The
 * measured time from the first message to the shed is printed (it goes
 * into RELIABILITY.md).
 *
 * The dead router: one that recorded and acked, then stopped, is shed
 * the same way, a stall time after its last completion.
 *
 * Last case: a subject whose backlog is above pending_overload and has
 * no sample at all is overload on pending alone, well before its stall
 * time.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <nats/nats.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../tools/sim.h"
#include "common/helpers.h"
#include "common/http.h"
#include "common/nats_server.h"

#define TALLYD TALLY_TEST_BUILDDIR "/tools/tallyd"
#define TALLY_BIN TALLY_TEST_BUILDDIR "/tools/tally"
#define GATEWAY TALLY_TEST_BUILDDIR "/tools/tally-gateway"
/* tally-gateway in check mode answering natively (429/503) for the one
 * subject, every request at overload shed (no trickle) */
#define GATEWAY_INI "[check]\nshed_status = native\n[shedding]\noverload_trickle = 0\n" \
		    "[route * /orders.created]\nsubject = orders.created\n"
#define MS 1000000ull

/* Timing of the scenario (the ini below says the same). */
#define PUBLISH_INTERVAL_MS 50 /* engine publish */
#define POLL_INTERVAL_MS 100   /* JetStream poll */
#define STALL_AFTER_MS 2000
#define MSG_RATE 20            /* messages per second: one every 50 ms */
#define SLACK_MS 1500          /* a loaded 2-core machine; the measurement loop */

struct child {
	pid_t pid;
	char dir[64], cfg[128], log[128], seg[128];
};

/* Everything a test started, stopped by the suite's fini after a failed assertion. */
static struct child tallyd, gateway;
static struct tally_test_nats nats;

static void child_stop(struct child *c)
{
	if (c->pid > 0) {
		kill(c->pid, SIGTERM);
		for (int i = 0; i < 500 && waitpid(c->pid, NULL, WNOHANG) == 0; i++)
			tt_sleep_ms(10);
		if (waitpid(c->pid, NULL, WNOHANG) == 0) {
			kill(c->pid, SIGKILL);
			waitpid(c->pid, NULL, 0);
		}
		c->pid = 0;
	}
}

static void cleanup(void)
{
	child_stop(&gateway);
	child_stop(&tallyd);
	if (tallyd.seg[0])
		tally_segment_unlink(tallyd.seg);
	if (tallyd.dir[0]) {
		unlink(tallyd.cfg);
		unlink(tallyd.log);
		unlink(gateway.log);
		unlink(gateway.cfg);
		rmdir(tallyd.dir);
	}
	tally_test_nats_stop(&nats);
	memset(&tallyd, 0, sizeof(tallyd));
	memset(&gateway, 0, sizeof(gateway));
}

TestSuite(e2e_stalled, .fini = cleanup, .timeout = 60);

static pid_t spawn(const char *log, const char *const *argv)
{
	fflush(NULL);
	pid_t pid = fork();
	cr_assert_neq(pid, -1);
	if (pid == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
			_exit(127);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	return pid;
}

/* tallyd with the ini text, polling nats; waits for "ready:". */
__attribute__((format(printf, 1, 2))) static void tallyd_start(const char *fmt, ...)
{
	va_list ap;

	snprintf(tallyd.dir, sizeof(tallyd.dir), "/tmp/tally-stalled-XXXXXX");
	cr_assert_not_null(mkdtemp(tallyd.dir));
	snprintf(tallyd.cfg, sizeof(tallyd.cfg), "%s/tallyd.ini", tallyd.dir);
	snprintf(tallyd.log, sizeof(tallyd.log), "%s/tallyd.log", tallyd.dir);
	snprintf(gateway.log, sizeof(gateway.log), "%s/gateway.log", tallyd.dir);
	snprintf(gateway.cfg, sizeof(gateway.cfg), "%s/gateway.ini", tallyd.dir);
	FILE *g = fopen(gateway.cfg, "w");
	cr_assert_not_null(g);
	fputs(GATEWAY_INI, g);
	fclose(g);
	snprintf(tallyd.seg, sizeof(tallyd.seg), "%s", tt_segname("stalled"));
	FILE *f = fopen(tallyd.cfg, "w");
	cr_assert_not_null(f);
	va_start(ap, fmt);
	vfprintf(f, fmt, ap);
	va_end(ap);
	cr_assert_eq(fclose(f), 0);
	tallyd.pid = spawn(tallyd.log, (const char *const[]){ TALLYD, "-c", tallyd.cfg, "-s", tallyd.seg,
							      "--nats", nats.url, NULL });
	for (int i = 0; i < 1000 && !strstr(tt_file_text(tallyd.log), "ready:"); i++)
		tt_sleep_ms(10);
	cr_assert(strstr(tt_file_text(tallyd.log), "ready:"), "tallyd not ready:\n%s", tt_file_text(tallyd.log));
}

struct status {
	int code;
	char out[4096];
};

/* tally -s SEG status SUBJECT: exit code and stdout + stderr. */
static void status_of(const char *subject, struct status *s)
{
	int fd = memfd_create("out", 0);

	cr_assert(fd >= 0);
	fflush(NULL);
	pid_t pid = fork();
	cr_assert_neq(pid, -1);
	if (pid == 0) {
		dup2(fd, 1);
		dup2(fd, 2);
		execl(TALLY_BIN, TALLY_BIN, "-s", tallyd.seg, "status", subject, (char *)NULL);
		_exit(98);
	}
	int st;
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	s->code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
	ssize_t n = pread(fd, s->out, sizeof(s->out) - 1, 0);
	s->out[n > 0 ? n : 0] = '\0';
	close(fd);
}

static const char ini_common[] =
	"[engine]\npublish_interval_ms = 50\nreap_interval_ms = 50\n"
	"[http]\nenabled = false\n"
	"[nats]\npoll_interval_ms = 100\n"
	"[watch ORDERS]\n"
	"[thresholds]\npending_warn = 0\npending_overload = 0\n";

static void publish_n(const char *subject, int n)
{
	natsConnection *nc = NULL;
	jsCtx *js = NULL;
	jsErrCode ec = 0;

	cr_assert_eq(natsConnection_ConnectTo(&nc, nats.url), NATS_OK);
	cr_assert_eq(natsConnection_JetStream(&js, nc, NULL), NATS_OK);
	for (int i = 0; i < n; i++)
		cr_assert_eq(js_Publish(NULL, js, subject, "x", 1, NULL, &ec), NATS_OK, "%d", (int)ec);
	jsCtx_Destroy(js);
	natsConnection_Destroy(nc);
}

static double ms_since(uint64_t t0)
{
	return (double)(tally_now_ns() - t0) / 1e6;
}

Test(e2e_stalled, a_router_that_completes_nothing_is_shed)
{
	char err[256], listen[64], hdr[128] = "", *reply = NULL;
	struct status s;
	int port = tt_free_port();

	cr_assert_eq(tally_test_nats_start(&nats, NULL, true), 0, "%s", nats.errmsg);
	cr_assert_eq(sim_setup(nats.url, "ORDERS", "orders.>", false, "router", "orders.created", err,
			       sizeof(err)), 0, "%s", err);
	tallyd_start("%s[thresholds orders.created]\npending_warn = 100000\npending_overload = 1000000\n"
		     "stall_after_ms = %d\nmin_dwell_ms = 500\n", ini_common, STALL_AFTER_MS);

	/* before any message and any sample: a row, judged ok on its (live, empty) backlog */
	bool ok = false;
	for (int i = 0; i < 100 && !ok; i++) {
		status_of("orders.created", &s);
		ok = s.code == 0 && strstr(s.out, "pending 0 from 1 consumer (live");
		if (!ok)
			tt_sleep_ms(50);
	}
	cr_assert(ok, "configured subject has a verdict before its first sample: exit %d\n%s\ntallyd log:\n%s",
		  s.code, s.out, tt_file_text(tallyd.log));
	snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
	gateway.pid = spawn(gateway.log, (const char *const[]){ GATEWAY, "-c", gateway.cfg, "-s", tallyd.seg, "--listen", listen,
								NULL });
	int code = 0;
	for (int i = 0; i < 100 && code == 0; i++, code == 0 ? tt_sleep_ms(50) : (void)0) {
		free(reply);
		code = tt_http(port, "POST", "/orders.created", &reply);
	}
	cr_expect_eq(code, 200, "%s", reply);
	cr_expect_neq(tt_http_header(reply, "X-Tally-Fail-Open", hdr, sizeof(hdr)), 0,
		      "not 'fail-open: no data for this subject yet': %s", reply);
	free(reply);
	reply = NULL;

	/* messages arrive; no router completes any of them */
	struct sim_publisher_config pc = { .url = nats.url, .subjects = (const char *const[]){ "orders.created" },
					   .nsubjects = 1, .rate = MSG_RATE };
	struct sim_publisher *pub;
	cr_assert_eq(sim_publisher_start(&pc, &pub, err, sizeof(err)), 0, "%s", err);
	while (sim_publisher_published(pub) == 0)
		tt_sleep_ms(1);
	uint64_t t_first = tally_now_ns();
	double shed_ms = -1, before_ms = -1;
	while (ms_since(t_first) < STALL_AFTER_MS + 10000) {
		status_of("orders.created", &s);
		if (s.code == 2) {
			shed_ms = ms_since(t_first);
			break;
		}
		before_ms = ms_since(t_first);
		cr_expect(s.code == 0, "ok until it stalls (%.0f ms): %s", before_ms, s.out);
		tt_sleep_ms(20);
	}
	fprintf(stderr, "[e2e stalled] time from first message to shed: %.0f ms (stall_after_ms %d, "
		"poll %d ms, publish %d ms, one message every %d ms; last ok read at %.0f ms)\n",
		shed_ms, STALL_AFTER_MS, POLL_INTERVAL_MS, PUBLISH_INTERVAL_MS, 1000 / MSG_RATE, before_ms);
	cr_assert_geq(shed_ms, 0, "never shed: %s\ntallyd log:\n%s", s.out, tt_file_text(tallyd.log));
	cr_expect_geq(shed_ms, STALL_AFTER_MS - PUBLISH_INTERVAL_MS, "not before the stall time: %.0f ms",
		      shed_ms);
	cr_expect_leq(shed_ms, 1000 / MSG_RATE + STALL_AFTER_MS + POLL_INTERVAL_MS + PUBLISH_INTERVAL_MS +
				       SLACK_MS, "shed within a message interval + stall + poll: %.0f ms", shed_ms);
	cr_expect(strstr(s.out, "orders.created: overload (stalled)"), "%s", s.out);
	cr_expect(strstr(s.out, "p95 -: no sample"), "never a sample: %s", s.out);
	cr_expect(strstr(s.out, "pending ") && strstr(s.out, "(live"), "%s", s.out);
	fprintf(stderr, "%s", s.out);

	cr_expect_eq(tt_http(port, "POST", "/orders.created", &reply), 503, "%s", reply);
	cr_expect_eq(tt_http_header(reply, "X-Tally-Reasons", hdr, sizeof(hdr)), 0, "%s", reply);
	cr_expect(strstr(hdr, "stalled"), "%s", hdr);
	cr_expect_eq(tt_http_header(reply, "Retry-After", hdr, sizeof(hdr)), 0, "%s", reply);
	free(reply);
	sim_publisher_stop(&pub);
	cleanup();
}

Test(e2e_stalled, a_backlog_above_overload_with_no_sample_is_overload_on_pending_alone)
{
	char err[256];
	struct status s;

	cr_assert_eq(tally_test_nats_start(&nats, NULL, true), 0, "%s", nats.errmsg);
	cr_assert_eq(sim_setup(nats.url, "ORDERS", "orders.>", false, "flood", "orders.flood", err,
			       sizeof(err)), 0, "%s", err);
	tallyd_start("%s[thresholds orders.flood]\npending_warn = 20\npending_overload = 100\n"
		     "stall_after_ms = 10000\n", ini_common);
	uint64_t t0 = tally_now_ns();
	publish_n("orders.flood", 300);
	double at = -1;
	while (ms_since(t0) < 5000) {
		status_of("orders.flood", &s);
		if (s.code == 2) {
			at = ms_since(t0);
			break;
		}
		tt_sleep_ms(20);
	}
	fprintf(stderr, "[e2e stalled] backlog of 300, no sample: overload after %.0f ms\n%s", at, s.out);
	cr_assert_geq(at, 0, "not overload: exit %d\n%s\ntallyd log:\n%s", s.code, s.out,
		      tt_file_text(tallyd.log));
	cr_expect_lt(at, 10000, "before the stall time");
	cr_expect(strstr(s.out, "orders.flood: overload (pending)"), "pending alone, not stalled: %s", s.out);
	/* the poll may land while the 300 are still being published: at or
	 * above the overload level is what decided it */
	unsigned long long pend = 0;
	const char *pp = strstr(s.out, "pending ");
	cr_expect(pp && sscanf(pp, "pending %llu from 1 consumer", &pend) == 1 && pend >= 100 &&
		  pend <= 300, "%s", s.out);
	cleanup();
}

/* The dead router: it recorded and acked every message, then stopped. */
Test(e2e_stalled, a_router_that_stops_completing_is_shed)
{
	char err[256];
	struct status s;
	struct tally_segment *seg;

	cr_assert_eq(tally_test_nats_start(&nats, NULL, true), 0, "%s", nats.errmsg);
	cr_assert_eq(sim_setup(nats.url, "ORDERS", "orders.>", false, "router", "orders.created", err,
			       sizeof(err)), 0, "%s", err);
	tallyd_start("%s[thresholds orders.created]\npending_warn = 100000\npending_overload = 1000000\n"
		     "min_samples = 5\nstall_after_ms = %d\nmin_dwell_ms = 500\n", ini_common, STALL_AFTER_MS);
	cr_assert_eq(tally_segment_open(tallyd.seg, TALLY_OPEN_PRODUCER, 2000, &seg), 0, "%s", tally_errmsg());
	struct sim_router_config rc = { .url = nats.url, .stream = "ORDERS", .consumer = "router",
					.filter = "orders.created", .seg = seg, .workers = 1,
					.processing_ns = 1 * MS, .sigma = 0.3 };
	struct sim_router *router;
	cr_assert_eq(sim_router_start(&rc, &router, err, sizeof(err)), 0, "%s", err);
	struct sim_publisher_config pc = { .url = nats.url, .subjects = (const char *const[]){ "orders.created" },
					   .nsubjects = 1, .rate = MSG_RATE };
	struct sim_publisher *pub;
	cr_assert_eq(sim_publisher_start(&pc, &pub, err, sizeof(err)), 0, "%s", err);
	bool ok = false;
	for (int i = 0; i < 200 && !ok; i++) {
		status_of("orders.created", &s);
		ok = (s.code == 0 || s.code == 1) && strstr(s.out, "samples"); /* warn: a loaded machine */
		if (!ok)
			tt_sleep_ms(50);
	}
	cr_assert(ok, "a working router is ok: exit %d\n%s", s.code, s.out);
	tt_sleep_ms(STALL_AFTER_MS + 500);
	status_of("orders.created", &s);
	/* on a loaded machine its latency may warn; what matters: not stalled */
	cr_expect(s.code != 2 && !strstr(s.out, "stalled"), "a router that keeps up is never stalled: %s",
		  s.out);

	sim_router_stop(&router);
	uint64_t t_stop = tally_now_ns();
	double shed_ms = -1;
	while (ms_since(t_stop) < STALL_AFTER_MS + 10000) {
		status_of("orders.created", &s);
		if (s.code == 2) {
			shed_ms = ms_since(t_stop);
			break;
		}
		tt_sleep_ms(20);
	}
	fprintf(stderr, "[e2e stalled] router stopped: shed after %.0f ms (stall_after_ms %d)\n%s", shed_ms,
		STALL_AFTER_MS, s.out);
	cr_assert_geq(shed_ms, 0, "never shed: %s", s.out);
	cr_expect_leq(shed_ms, 1000 / MSG_RATE + STALL_AFTER_MS + POLL_INTERVAL_MS + PUBLISH_INTERVAL_MS +
				       SLACK_MS, "%.0f ms", shed_ms);
	cr_expect(strstr(s.out, "orders.created: overload (stalled)"), "%s", s.out);
	sim_publisher_stop(&pub);
	tally_segment_close(&seg);
	cleanup();
}

/* ---- stale pending data through the gateway: fail-closed closes ------------- */

/* The JetStream server goes away: the pending data turns stale after
 * stale_after_ms. Under fail-closed the gateway sheds (503 and
 * X-Tally-Fail-Closed); under fail-open it admits and says so. */
static void stale_through_the_gateway(bool closed)
{
	char err[256], listen[64], hdr[160] = "", *reply = NULL;
	int port = tt_free_port();

	cr_assert_eq(tally_test_nats_start(&nats, NULL, true), 0, "%s", nats.errmsg);
	cr_assert_eq(sim_setup(nats.url, "ORDERS", "orders.>", false, "router", "orders.created", err,
			       sizeof(err)), 0, "%s", err);
	tallyd_start("%s[thresholds orders.created]\npending_warn = 1000\npending_overload = 10000\n"
		     "stale_after_ms = 500\nstale_policy = %s\n", ini_common,
		     closed ? "fail-closed" : "fail-open");
	snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
	gateway.pid = spawn(gateway.log, (const char *const[]){ GATEWAY, "-c", gateway.cfg, "-s", tallyd.seg, "--listen", listen,
								NULL });
	/* live backlog 0: admitted, no fail-open */
	int code = 0;
	for (int i = 0; i < 200; i++, tt_sleep_ms(50)) {
		free(reply);
		reply = NULL;
		code = tt_http(port, "POST", "/orders.created", &reply);
		if (code == 200 && tt_http_header(reply, "X-Tally-Fail-Open", hdr, sizeof(hdr)) != 0)
			break;
	}
	cr_assert_eq(code, 200, "%s", reply);
	free(reply);
	reply = NULL;
	uint64_t t0 = tally_now_ns();
	tally_test_nats_stop(&nats); /* the poller's answers stop: cached, then stale */
	double at = -1;
	while (ms_since(t0) < 10000) {
		free(reply);
		reply = NULL;
		code = tt_http(port, "POST", "/orders.created", &reply);
		if ((closed && code == 503) ||
		    (!closed && code == 200 && tt_http_header(reply, "X-Tally-Fail-Open", hdr, sizeof(hdr)) == 0)) {
			at = ms_since(t0);
			break;
		}
		cr_expect_eq(code, 200, "before it is stale: %s", reply);
		tt_sleep_ms(20);
	}
	fprintf(stderr, "[e2e %s] nats-server stopped: gateway %s after %.0f ms (stale_after_ms 500)\n",
		closed ? "fail-closed" : "fail-open", closed ? "sheds" : "fails open", at);
	cr_assert_geq(at, 0, "never %s: %d %s\ntallyd log:\n%s", closed ? "shed" : "failed open", code,
		      reply, tt_file_text(tallyd.log));
	if (closed) {
		cr_expect_eq(tt_http_header(reply, "X-Tally-Fail-Closed", hdr, sizeof(hdr)), 0, "%s", reply);
		cr_expect(strstr(hdr, "stale"), "%s", hdr);
		cr_expect_eq(tt_http_header(reply, "X-Tally-Verdict", hdr, sizeof(hdr)), 0);
		cr_expect_str_eq(hdr, "unknown");
		cr_expect_eq(tt_http_header(reply, "Retry-After", hdr, sizeof(hdr)), 0, "%s", reply);
	} else {
		cr_expect(strstr(hdr, "unknown") || strstr(hdr, "stale"), "%s", hdr);
	}
	cr_expect_geq(at, 400, "stale before stale_after_ms: %.0f ms", at);
	free(reply);
	cleanup();
}

Test(e2e_stalled, fail_closed_sheds_on_stale_pending)
{
	stale_through_the_gateway(true);
}

Test(e2e_stalled, fail_open_admits_on_stale_pending_and_says_so)
{
	stale_through_the_gateway(false);
}
