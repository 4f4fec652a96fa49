/* SPDX-License-Identifier: MIT */
/*
 * test_gateway.c: tally-gateway in check mode (the program in tools/,
 * which replaced examples/gateway.c), through real HTTP, against a real
 * owner process: decisions and their headers for each level, the mapping
 * (method, path, header; unmapped admitted and counted), graded shedding
 * and priority classes measured over many requests with a bound, request
 * bodies of every kind and methods other than GET, fail-open and
 * fail-closed, a permission error that says so, and the configuration's
 * errors with FILE:LINE.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/gateway.h"
#include "common/helpers.h"
#include "common/http.h"

#define ROUTES                                   \
	"[route * /ok/**]\nsubject = gw.ok\n"     \
	"[route * /warn/**]\nsubject = gw.warn\n" \
	"[route * /over/**]\nsubject = gw.over\n" \
	"[route POST /orders/*]\nsubject = gw.over\npriority = critical\n" \
	"[route GET /search]\nheader = X-Tenant: free\nsubject = gw.over\n" \
	"[route GET /search]\nsubject = gw.ok\n"  \
	"[route * /missing]\nsubject = gw.nothing.here\n"

/* At overload a trickle (overload_trickle, default 0.01) is admitted at
 * random so that recovery can be seen: tests that expect every request of
 * an overloaded route shed turn it off, else about one run in twenty
 * fails on an admitted request. */
#define TRICKLE_0 "[shedding]\noverload_trickle = 0\n"

struct env {
	char dir[64], ini[128], log[128], seg[TALLY_NAME_MAX + 1];
	pid_t owner, gw;
	int port;
};

static void env_start(struct env *e, const char *ini_text, bool owner, const char *x1, const char *x2)
{
	memset(e, 0, sizeof(*e));
	cr_assert_eq(gwt_tempdir(e->dir), 0);
	snprintf(e->ini, sizeof(e->ini), "%s/gateway.ini", e->dir);
	snprintf(e->log, sizeof(e->log), "%s/gateway.log", e->dir);
	snprintf(e->seg, sizeof(e->seg), "%s", tt_segname("gw"));
	cr_assert_eq(gwt_write(e->ini, ini_text), 0);
	if (owner)
		cr_assert_gt(e->owner = gwt_owner_start(e->seg, false), 0);
	cr_assert_gt(e->gw = gwt_gateway_start(e->ini, e->seg, e->log, &e->port, x1, x2), 0,
		     "the gateway listens: %s", gwt_read_file(e->log));
}

static void env_stop(struct env *e)
{
	int st = gwt_stop(e->gw);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the gateway stops cleanly on SIGTERM");
	if (e->owner > 0) {
		kill(e->owner, SIGKILL);
		waitpid(e->owner, NULL, 0);
	}
	tally_segment_unlink(e->seg);
	gwt_rmtree(e->dir);
}

static char hv[512];

static const char *hdr(const struct gwt_resp *r, const char *name)
{
	return gwt_header(r, name, hv, sizeof(hv)) == 0 ? hv : "(absent)";
}

static long req(int port, const char *method, const char *path, const char *h1, const char *h2,
		int64_t body, struct gwt_resp *r)
{
	const char *hs[] = { h1, h2, NULL };
	struct gwt_req rq = { .method = method, .headers = h1 ? hs : NULL, .body = body };

	return gwt_http(port, path, &rq, r);
}

Test(gateway_check, decisions_and_their_headers, .timeout = 60)
{
	struct env e;
	struct gwt_resp r;

	env_start(&e, "[gateway]\nmode = check\n" TRICKLE_0 ROUTES, true, NULL, NULL);

	cr_expect_eq(gwt_get(e.port, "/ok/1", &r), 200, "%s", r.body);
	cr_expect_str_eq(r.body, "admit\n", "a plain body");
	cr_expect_str_eq(hdr(&r, "X-Tally-Decision"), "admit");
	cr_expect_str_eq(hdr(&r, "X-Tally-Verdict"), "ok");
	cr_expect_str_eq(hdr(&r, "X-Tally-Subject"), "gw.ok");
	cr_expect_str_eq(hdr(&r, "X-Tally-Route"), "* /ok/**");
	cr_expect_eq(gwt_header(&r, "X-Tally-Fail-Open", hv, sizeof(hv)), -1, "not failing open");
	cr_expect_eq(gwt_header(&r, "Retry-After", hv, sizeof(hv)), -1);

	/* overload: 403 for nginx's auth_request, the real status in X-Tally-Status */
	cr_expect_eq(gwt_get(e.port, "/over/a/b", &r), 403, "%s", r.body);
	cr_expect_str_eq(hdr(&r, "X-Tally-Decision"), "shed");
	cr_expect_str_eq(hdr(&r, "X-Tally-Status"), "503");
	cr_expect_str_eq(hdr(&r, "X-Tally-Verdict"), "overload");
	cr_expect_str_eq(hdr(&r, "X-Tally-Reasons"), "latency");
	cr_expect_str_eq(hdr(&r, "X-Tally-No-Retry"), "1");
	int ra = atoi(hdr(&r, "Retry-After"));
	cr_expect(ra >= 2 && ra <= 3, "2000 ms jittered by up to 50%%: %d s", ra);
	cr_expect(strstr(r.body, "shed: retry after"), "%s", r.body);

	/* the request that the proxy asks about, in its headers */
	cr_expect_eq(req(e.port, "GET", "/check", "X-Original-URI: /over/x?y=1", "X-Original-Method: GET", -1, &r), 403);
	cr_expect_eq(req(e.port, "GET", "/check", "X-Original-URI: /ok/x", NULL, -1, &r), 200);

	/* the mapping: method, header, first match wins */
	cr_expect_eq(req(e.port, "POST", "/orders/7", NULL, NULL, -1, &r), 403);
	cr_expect_str_eq(hdr(&r, "X-Tally-Priority"), "critical", "critical is shed at overload");
	cr_expect_eq(req(e.port, "POST", "/orders/7/items", NULL, NULL, -1, &r), 200, "'*' is one segment");
	cr_expect_str_eq(hdr(&r, "X-Tally-Route"), "unmapped");
	cr_expect_eq(req(e.port, "GET", "/orders/7", NULL, NULL, -1, &r), 200, "POST only");
	cr_expect_str_eq(hdr(&r, "X-Tally-Route"), "unmapped");
	cr_expect_eq(req(e.port, "GET", "/search", "X-Tenant: free", NULL, -1, &r), 403);
	cr_expect_eq(req(e.port, "GET", "/search", "X-Tenant: gold", NULL, -1, &r), 200);
	cr_expect_str_eq(hdr(&r, "X-Tally-Subject"), "gw.ok");
	cr_expect_eq(gwt_get(e.port, "/search?q=1", &r), 200);

	/* a mapped subject with no data yet: admitted, and said so */
	cr_expect_eq(gwt_get(e.port, "/missing", &r), 200);
	cr_expect(strstr(hdr(&r, "X-Tally-Fail-Open"), "no data"), "%s", hv);

	/* unmapped requests are counted */
	cr_expect_eq(gwt_get(e.port, "/_tally/metrics", &r), 200);
	cr_expect(strstr(r.body, "tally_gateway_unmapped_total 2\n"), "%s", r.body);
	cr_expect(strstr(r.body, "route=\"* /over/**\",subject=\"gw.over\",decision=\"shed\"} 2\n"), "%s", r.body);
	cr_expect_eq(gwt_get(e.port, "/_tally/health", &r), 200);
	env_stop(&e);
}

/* `tally stat --gateway URL` as the operator runs it: out and the exit
 * status. */
/* An unmapped request is admitted, and `tally stat --gateway` shows it:
 * which requests no route maps (the recent distinct ones, the query left
 * out, with their counts), and each route's admitted and shed. */
Test(gateway_check, tally_stat_shows_the_unmapped_requests, .timeout = 60)
{
	struct env e;
	struct gwt_resp r;
	char url[64], out[16384];

	env_start(&e, "[gateway]\nmode = check\n" TRICKLE_0 ROUTES, true, NULL, NULL);
	cr_expect_eq(req(e.port, "POST", "/orders/7/items", NULL, NULL, -1, &r), 200);
	cr_expect_eq(gwt_get(e.port, "/nowhere/1?x=2", &r), 200);
	cr_expect_eq(gwt_get(e.port, "/nowhere/1?x=3", &r), 200);
	cr_expect_eq(gwt_get(e.port, "/over/1", &r), 403);
	snprintf(url, sizeof(url), "http://127.0.0.1:%d", e.port);
	cr_expect_eq(gwt_tally_stat(e.seg, url, NULL, out, sizeof(out)), 0, "%s", out);
	cr_expect(strstr(out, "GATEWAY http://127.0.0.1:"), "%s", out);
	cr_expect(strstr(out, "3 unmapped requests, admitted"), "%s", out);
	cr_expect(strstr(out, "POST /orders/7/items ") && strstr(out, "GET /nowhere/1 "), "%s", out);
	cr_expect(!strstr(out, "x=2"), "the query is left out: %s", out);
	char *line = strstr(out, "GET /nowhere/1 ");
	cr_expect(line && strtoul(line + 60, NULL, 10) == 2, "counted twice: %s", line ? line : out);
	cr_expect(strstr(out, "* /over/**") && strstr(out, "gw.over"), "the routes: %s", out);

	cr_expect_eq(gwt_tally_stat(e.seg, url, "--json", out, sizeof(out)), 0, "%s", out);
	cr_expect(strstr(out, "\"gateway\": {") && strstr(out, "\"recent_unmapped\"") &&
			  strstr(out, "\"unmapped\": 3"), "%s", out);

	/* a gateway that is not there: said, exit 4, the segment still shown */
	char gone[64];
	snprintf(gone, sizeof(gone), "http://127.0.0.1:%d", tt_free_port());
	cr_expect_eq(gwt_tally_stat(e.seg, gone, NULL, out, sizeof(out)), 4, "%s", out);
	cr_expect(strstr(out, "is tally-gateway listening there?") && strstr(out, "gw.over"), "%s", out);
	cr_expect_eq(gwt_tally_stat(e.seg, "127.0.0.1:1", NULL, out, sizeof(out)), 2, "not a URL: %s", out);
	env_stop(&e);
}

Test(gateway_check, bodies_and_methods, .timeout = 120)
{
	struct env e;
	struct gwt_resp r;

	env_start(&e, "[gateway]\nmode = check\n" TRICKLE_0 ROUTES, true, NULL, NULL);
	/* the first gateway lost every POST with a body */
	cr_expect_eq(req(e.port, "POST", "/ok/1", NULL, NULL, 5, &r), 200, "%s", r.body);
	cr_expect_str_eq(r.body, "admit\n");
	struct gwt_req big = { .method = "POST", .body = 8 << 20, .expect_100 = true };
	cr_expect_eq(gwt_http(e.port, "/ok/1", &big, &r), 200, "8 MB with 100-continue: %s", r.body);
	big.chunked = true;
	cr_expect_eq(gwt_http(e.port, "/ok/2", &big, &r), 200, "8 MB chunked: %s", r.body);
	big.method = "PUT";
	cr_expect_eq(gwt_http(e.port, "/over/2", &big, &r), 403, "a shed request with a body: %s", r.body);
	cr_expect_str_eq(hdr(&r, "X-Tally-Status"), "503");
	cr_expect_lt(r.uploaded, 1 << 20, "answered instead of 100 Continue: %" PRIu64 " bytes sent", r.uploaded);
	cr_expect_eq(req(e.port, "POST", "/orders/1", NULL, NULL, 0, &r), 403, "an empty body");

	/* PUT and DELETE are decided like the rest, and their bodies are plain */
	cr_expect_eq(req(e.port, "PUT", "/over/1", NULL, NULL, 100, &r), 403);
	cr_expect_eq(req(e.port, "DELETE", "/over/1", NULL, NULL, -1, &r), 403);
	cr_expect_eq(req(e.port, "DELETE", "/ok/1", NULL, NULL, -1, &r), 200);
	cr_expect_str_eq(r.body, "admit\n");
	cr_expect_eq(req(e.port, "PATCH", "/check", "X-Original-Method: DELETE", "X-Original-URI: /over/3", 10, &r), 403);
	cr_expect_eq(req(e.port, "HEAD", "/ok/1", NULL, NULL, -1, &r), 200);
	cr_expect_eq(req(e.port, "GET", "/ok/1", NULL, NULL, -1, &r), 200, "the connection is still good");
	char *log = gwt_read_file(e.log);
	cr_expect_null(strstr(log, "internal error"), "%s", log);
	free(log);
	env_stop(&e);
}

/* Shed fraction of n requests; counts 429 and 503 apart. */
static double shed_fraction(int port, const char *path, const char *prio, int n, int *n429, int *n503)
{
	struct gwt_resp r;
	int shed = 0;

	*n429 = *n503 = 0;
	for (int i = 0; i < n; i++) {
		long st = req(port, "GET", path, prio, NULL, -1, &r);
		cr_assert(st == 200 || st == 429 || st == 503, "status %ld: %s", st, r.body);
		shed += st != 200;
		*n429 += st == 429;
		*n503 += st == 503;
	}
	return (double)shed / n;
}

/* |f - p| within 5 standard deviations of a binomial of n draws (and a bit). */
static void expect_near(double f, double p, int n, const char *what)
{
	double bound = 5 * sqrt(p * (1 - p) / n) + 0.01;
	cr_expect(fabs(f - p) <= bound, "%s: shed %.3f, expected %.3f +- %.3f", what, f, p, bound);
}

Test(gateway_check, graded_shedding_and_priorities, .timeout = 120)
{
	struct env e;
	int a, b, n = 400;

	env_start(&e, "[gateway]\nmode = check\n[check]\nshed_status = native\n"
		      "[shedding]\nengine_probability = false\nwarn_shed_fraction = 0.3\n"
		      "overload_trickle = 0.2\nsheddable_factor = 2\n" ROUTES, true, NULL, NULL);
	double f = shed_fraction(e.port, "/warn/x", NULL, n, &a, &b);
	expect_near(f, 0.3, n, "warn, default");
	cr_expect_eq(b, 0, "under pressure a shed is 429, never 503");
	f = shed_fraction(e.port, "/warn/x", "X-Tally-Priority: sheddable", n, &a, &b);
	expect_near(f, 0.6, n, "warn, sheddable: shed first (0.3 x 2)");
	f = shed_fraction(e.port, "/warn/x", "X-Tally-Priority: critical", n, &a, &b);
	cr_expect_eq(f, 0.0, "warn, critical: never shed below overload");
	f = shed_fraction(e.port, "/over/x", NULL, n, &a, &b);
	expect_near(f, 0.8, n, "overload, default: all but the trickle");
	cr_expect_eq(a, 0, "at overload a shed is 503, never 429");
	f = shed_fraction(e.port, "/over/x", "X-Tally-Priority: critical", n, &a, &b);
	expect_near(f, 0.8, n, "overload, critical");
	f = shed_fraction(e.port, "/over/x", "X-Tally-Priority: sheddable", n, &a, &b);
	cr_expect_eq(f, 1.0, "overload, sheddable: all");
	f = shed_fraction(e.port, "/ok/x", "X-Tally-Priority: sheddable", 100, &a, &b);
	cr_expect_eq(f, 0.0, "ok: nothing is shed");
	env_stop(&e);
}

/* By default the gateway sheds by the engine's shed_probability, graded
 * with pressure: the owner's warn subject has P95 2 ms against a warn of
 * 1 ms and an overload of 5 ms, so its pressure is 0.5 + 0.5 x 1/4 =
 * 0.625 and its shed probability (0.625 - 0.5) / 0.5 = 0.25 (issue 17),
 * whatever warn_shed_fraction says; at overload it is 1, under the
 * trickle. */
Test(gateway_check, sheds_by_the_engines_shed_probability, .timeout = 120)
{
	struct env e;
	struct gwt_resp r;
	int a, b, n = 400;

	env_start(&e, "[gateway]\nmode = check\n[check]\nshed_status = native\n"
		      "[shedding]\nwarn_shed_fraction = 0.9\noverload_trickle = 0.2\n" ROUTES, true,
		      NULL, NULL);
	cr_expect_eq(req(e.port, "GET", "/warn/x", NULL, NULL, -1, &r) / 1000, 0);
	double sp = atof(hdr(&r, "X-Tally-Shed-Probability"));
	cr_expect(fabs(sp - 0.25) < 0.02, "the engine's shed probability: %s", hdr(&r, "X-Tally-Shed-Probability"));
	double f = shed_fraction(e.port, "/warn/x", NULL, n, &a, &b);
	expect_near(f, 0.25, n, "warn, default: by the engine's probability, not the 0.9 fallback");
	cr_expect_eq(b, 0, "under pressure a shed is 429");
	f = shed_fraction(e.port, "/warn/x", "X-Tally-Priority: sheddable", n, &a, &b);
	expect_near(f, 0.5, n, "warn, sheddable: twice the engine's");
	f = shed_fraction(e.port, "/over/x", NULL, n, &a, &b);
	expect_near(f, 0.8, n, "overload: the engine's 1, under the trickle");
	env_stop(&e);
}

Test(gateway_check, fail_open_and_fail_closed, .timeout = 60)
{
	struct env e, c;
	struct gwt_resp r;

	env_start(&e, "[gateway]\nmode = check\n" TRICKLE_0 ROUTES, true, NULL, NULL);
	cr_expect_eq(gwt_get(e.port, "/over/1", &r), 403);
	kill(e.owner, SIGKILL);
	waitpid(e.owner, NULL, 0);
	e.owner = 0;
	tt_sleep_ms(250); /* the gateway checks its owner's liveness every 100 ms */
	cr_expect_eq(gwt_get(e.port, "/over/1", &r), 200, "owner dead: admitted (fail-open)");
	cr_expect(strstr(hdr(&r, "X-Tally-Fail-Open"), "not alive"), "and said so: %s", hv);
	cr_expect_eq(gwt_get(e.port, "/ok/1", &r), 200, "keeps answering");

	/* fail-closed: no data at all sheds, 503 */
	env_start(&c, "[gateway]\nmode = check\n[check]\nshed_status = native\n" ROUTES, false,
		  "--fail-closed", NULL);
	cr_expect_eq(gwt_get(c.port, "/ok/1", &r), 503, "no segment, fail-closed: shed");
	cr_expect(strstr(hdr(&r, "X-Tally-Fail-Closed"), "no segment"), "%s", hv);
	cr_expect_eq(atoi(hdr(&r, "Retry-After")) >= 1, 1);
	cr_expect_eq(gwt_get(c.port, "/unmapped", &r), 200, "an unmapped route is admitted even so");
	env_stop(&c);
	char *log = gwt_read_file(e.log);
	cr_expect(strstr(log, "failing open: the owner of segment ") && strstr(log, " is not alive"),
		  "logged: %s", log);
	cr_expect(strstr(log, "--replace"), "with the fix: %s", log);
	free(log);
	env_stop(&e);
}

Test(gateway_check, fail_open_is_logged_once, .timeout = 60)
{
	struct env e;
	struct gwt_resp r;

	env_start(&e, "[gateway]\nmode = check\n" TRICKLE_0 ROUTES, false, NULL, NULL);
	for (int i = 0; i < 20; i++)
		cr_expect_eq(gwt_get(e.port, "/over/1", &r), 200);
	cr_expect(strstr(hdr(&r, "X-Tally-Fail-Open"), "no segment"), "%s", hv);
	gwt_stop(e.gw);
	e.gw = 0;
	char *log = gwt_read_file(e.log);
	char *first = strstr(log, "failing open");
	cr_expect(first && !strstr(first + 1, "failing open"), "logged once: %s", log);
	cr_expect(strstr(log, "20 failed open"), "%s", log);
	free(log);
	tally_segment_unlink(e.seg);
	gwt_rmtree(e.dir);
}

Test(gateway_check, permission_denied_says_so, .timeout = 60)
{
	struct tt_foreign_prog fp;
	struct env e;
	struct gwt_resp r;
	char listen[32], log[160];

	if (geteuid() != 0)
		cr_skip_test("runs the gateway as another user: needs root (CI runs as root)");
	memset(&e, 0, sizeof(e));
	snprintf(e.seg, sizeof(e.seg), "%s", tt_segname("gwperm"));
	cr_assert_gt(e.owner = gwt_owner_start(e.seg, false), 0, "a 0600 segment owned by root");
	cr_assert_eq(tt_foreign_prog_make(&fp, "tally-gateway"), 0);
	snprintf(log, sizeof(log), "%s/gateway.log", fp.dir);
	e.port = tt_free_port();
	snprintf(listen, sizeof(listen), "127.0.0.1:%d", e.port);
	char ini[200];
	snprintf(ini, sizeof(ini), "%s/gateway.ini", fp.dir);
	gwt_write(ini, "[route * /over/**]\nsubject = gw.over\n");
	chmod(ini, 0644);
	pid_t pid = fork();
	if (pid == 0) {
		FILE *f = freopen(log, "w", stderr);
		(void)f;
		setenv("LD_LIBRARY_PATH", fp.libdir, 1);
		if (setgid(65534) || setuid(65534))
			_exit(126);
		execl(fp.path, "tally-gateway", "--listen", listen, "-s", e.seg, "-c", ini, (char *)NULL);
		_exit(127);
	}
	cr_assert_eq(gwt_wait_port(e.port, 10000), 0);
	cr_expect_eq(gwt_get(e.port, "/over/1", &r), 200, "fail-open");
	cr_expect(strstr(hdr(&r, "X-Tally-Fail-Open"), "permission denied"), "the header says why: %s", hv);
	cr_expect(strstr(hv, "user nobody needs read access"), "and whose access is missing: %s", hv);
	gwt_stop(pid);
	char *text = gwt_read_file(log);
	cr_expect(strstr(text, "permission denied"), "and the log: %s", text);
	cr_expect_null(strstr(text, "no segment"), "not \"no segment\": %s", text);
	free(text);
	kill(e.owner, SIGKILL);
	waitpid(e.owner, NULL, 0);
	tally_segment_unlink(e.seg);
	tt_foreign_prog_remove(&fp);
}

/* Runs tally-gateway --check-config on text: its exit status; stderr in *err. */
static int check_config(const char *text, char **err)
{
	char dir[64], ini[128], log[128];

	cr_assert_eq(gwt_tempdir(dir), 0);
	snprintf(ini, sizeof(ini), "%s/gateway.ini", dir);
	snprintf(log, sizeof(log), "%s/out.log", dir);
	gwt_write(ini, text);
	const char *argv[] = { (char *)TALLY_TEST_BUILDDIR "/tools/tally-gateway", (char *)"-c", ini,
			 (char *)"--check-config", NULL };
	int st;
	waitpid(gwt_spawn(log, argv), &st, 0);
	*err = gwt_read_file(log);
	gwt_rmtree(dir);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

Test(gateway_check, config_errors_name_file_line_and_reason, .timeout = 30)
{
	char *err;

	cr_expect_eq(check_config("[gateway]\nmode = proxy\n[proxy]\nupstream = http://127.0.0.1:9\n" ROUTES, &err), 0, "%s", err);
	free(err);
	cr_expect_eq(check_config("[gateway]\n"
				  "mode = sideways\n"                 /* 2 */
				  "listen = localhost\n"              /* 3 */
				  "decision_headers = some\n"         /* 4 */
				  "[shedding]\n"
				  "warn_shed_fraction = 1.5\n"        /* 6 */
				  "[route GET orders]\n"              /* 7 */
				  "subject = x\n"
				  "[route POST /a/*b]\n"              /* 9 */
				  "[route POST /orders/*]\n"          /* 10 */
				  "subject = orders.*\n"              /* 11 */
				  "priority = urgent\n"               /* 12 */
				  "colour = blue\n"                   /* 13 */
				  "[route GET /x]\n",                 /* 14 */
				  &err), 2);
	const char *want[] = { "gateway.ini:2: mode = \"sideways\": expected check or proxy",
			       "gateway.ini:3: listen = \"localhost\": expected ADDR:PORT",
			       "gateway.ini:4: decision_headers = \"some\": expected full",
			       "gateway.ini:6: warn_shed_fraction = \"1.5\": expected a fraction from 0 to 1",
			       "gateway.ini:7: [route GET orders]: a path pattern starts with '/'",
			       "gateway.ini:9: [route POST /a/*b]: '*' stands alone in its segment",
			       "gateway.ini:11: subject = \"orders.*\"",
			       "gateway.ini:12: priority = \"urgent\": expected critical, default or sheddable",
			       "gateway.ini:13: unknown key \"colour\" in [route]; valid keys: subject, priority, header",
			       "gateway.ini:14: [route GET /x] has no subject", NULL };
	for (int i = 0; want[i]; i++)
		cr_expect(strstr(err, want[i]), "missing \"%s\" in:\n%s", want[i], err);
	free(err);
	cr_expect_eq(check_config("[gateway]\nmode = proxy\n", &err), 2);
	cr_expect(strstr(err, "proxy mode needs an upstream"), "%s", err);
	free(err);
	/* an upstream that every request would fail on is caught here */
	static const char *const bad_upstreams[][2] = {
		{ "http://127.0.0.1:abc", "the port is a number, 1 to 65535" },
		{ "http://127.0.0.1:99999", "the port is a number, 1 to 65535" },
		{ "http://127.0.0.1:0", "the port is a number, 1 to 65535" },
		{ "http://127.0.0.1:80/app", "without a path" },
		{ "http://", "no host" },
		{ "https://127.0.0.1:443", "plain HTTP" },
		{ "http://user@127.0.0.1:80", "a host holds letters" },
		{ "http://[::1", "brackets" },
	};
	for (size_t i = 0; i < sizeof(bad_upstreams) / sizeof(bad_upstreams[0]); i++) {
		char text[256];
		snprintf(text, sizeof(text), "[gateway]\nmode = proxy\n[proxy]\nupstream = %s\n", bad_upstreams[i][0]);
		cr_expect_eq(check_config(text, &err), 2, "upstream = %s: %s", bad_upstreams[i][0], err);
		cr_expect(strstr(err, "gateway.ini:4: upstream = ") && strstr(err, bad_upstreams[i][1]),
			  "upstream = %s: %s", bad_upstreams[i][0], err);
		free(err);
	}
	cr_expect_eq(check_config("[gateway]\nmode = proxy\n[proxy]\nupstream = http://[::1]:8080\n", &err), 0,
		     "%s", err);
	free(err);
	cr_expect_eq(check_config("[gateway]\nmode = proxy\n[proxy]\nupstream = http://app.internal\n", &err), 0,
		     "%s", err);
	free(err);
}

/* A directory given as the configuration is not an empty one. */
Test(gateway_check, a_directory_is_not_a_configuration, .timeout = 30)
{
	char dir[64], log[128];

	cr_assert_eq(gwt_tempdir(dir), 0);
	snprintf(log, sizeof(log), "%s/out.log", dir);
	const char *argv[] = { TALLY_TEST_BUILDDIR "/tools/tally-gateway", "-c", dir, "--check-config", NULL };
	int st;
	waitpid(gwt_spawn(log, argv), &st, 0);
	char *out = gwt_read_file(log);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 2, "exit 2: %s", out);
	cr_expect(strstr(out, "cannot read") && strstr(out, "Is a directory"), "%s", out);
	free(out);
	gwt_rmtree(dir);
}

/* Check mode judges the path as nginx routes it, from X-Original-URI as
 * nginx sends it ($request_uri, as written by the client). */
Test(gateway_check, spellings_of_a_path_take_its_route, .timeout = 60)
{
	static const char *const spellings[] = { "/ok/../over/1", "//over/1", "/%6Fver/1", "/ok/..%2Fover/1?a=b" };
	struct env e;
	struct gwt_resp r;

	env_start(&e, TRICKLE_0 ROUTES, true, NULL, NULL);
	for (size_t i = 0; i < sizeof(spellings) / sizeof(spellings[0]); i++) {
		char h[256];
		snprintf(h, sizeof(h), "X-Original-URI: %s", spellings[i]);
		cr_expect_eq(req(e.port, "GET", "/check", h, NULL, -1, &r), 403, "%s: %ld", spellings[i], r.status);
		cr_expect_str_eq(hdr(&r, "X-Tally-Route"), "* /over/**", "%s", spellings[i]);
		cr_expect_eq(req(e.port, "GET", spellings[i], NULL, NULL, -1, &r), 403, "as the path: %s", spellings[i]);
	}
	env_stop(&e);
}
