/* SPDX-License-Identifier: MIT */
/*
 * test_gateway_nginx.c: a real nginx (Debian's, started here with its own
 * prefix and configuration in a temp dir, on a random port, stopped by
 * pid) in front of a real upstream, asking tally-gateway in check mode
 * through auth_request with the snippets shipped in etc/nginx/ as they
 * are. When a subject overloads, nginx answers 503 (429 under pressure)
 * with Retry-After, and the upstream, which counts what it gets, sees
 * none of the shed requests; under a short wrk load as well.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/gateway.h"
#include "common/helpers.h"
#include "common/http.h"

struct env {
	char dir[64], seg[TALLY_NAME_MAX + 1], path[256];
	pid_t owner, up, gw, nginx;
	int port, up_port, gw_port;
};

TestSuite(gateway_nginx, .fini = gwt_nginx_fini);

static const char gateway_ini[] =
	"[gateway]\nmode = check\n[shedding]\nengine_probability = false\nwarn_shed_fraction = 1\noverload_trickle = 0\n"
	"[route * /over/**]\nsubject = gw.over\n[route * /warn/**]\nsubject = gw.warn\n"
	"[route * /ok/**]\nsubject = gw.ok\n";

static void nginx_conf(void *ctx, int port)
{
	struct env *e = ctx;

	char conf[4096];

	snprintf(conf, sizeof(conf),
		 "%s\nworker_processes 1;\npid %s/nginx.pid;\nerror_log %s/error.log warn;\n"
		 "events { worker_connections 256; }\n"
		 "http {\n  access_log off;\n"
		 "  client_body_temp_path %s/body;\n  proxy_temp_path %s/proxy;\n"
		 "  fastcgi_temp_path %s/fcgi;\n  uwsgi_temp_path %s/uwsgi;\n  scgi_temp_path %s/scgi;\n"
		 "  client_max_body_size 0;\n"
		 "  upstream tally_gateway { server 127.0.0.1:%d; keepalive 16; }\n"
		 "  upstream app { server 127.0.0.1:%d; keepalive 16; }\n"
		 "  server {\n    listen 127.0.0.1:%d;\n"
		 "    include %s/etc/nginx/tally-locations.conf;\n"
		 "    location / {\n      include %s/etc/nginx/tally-check.conf;\n"
		 "      proxy_pass http://app;\n      proxy_http_version 1.1;\n"
		 "      proxy_set_header Connection \"\";\n    }\n"
		 "    location = /nocheck { proxy_pass http://app; }\n"
		 "  }\n}\n",
		 geteuid() == 0 ? "user root;" : "", e->dir, e->dir, e->dir, e->dir, e->dir, e->dir, e->dir,
		 e->gw_port, e->up_port, port, TALLY_TEST_SRCDIR, TALLY_TEST_SRCDIR);
	snprintf(e->path, sizeof(e->path), "%s/nginx.conf", e->dir);
	cr_assert_eq(gwt_write(e->path, conf), 0);
}

static void env_start(struct env *e)
{
	char ini[160], log[160];

	memset(e, 0, sizeof(*e));
	cr_assert_eq(gwt_tempdir(e->dir), 0);
	snprintf(e->seg, sizeof(e->seg), "%s", tt_segname("gwn"));
	cr_assert_gt(e->owner = gwt_owner_start(e->seg, false), 0);
	cr_assert_gt(e->up = gwt_upstream_start(&e->up_port), 0);
	snprintf(ini, sizeof(ini), "%s/gateway.ini", e->dir);
	snprintf(log, sizeof(log), "%s/gateway.log", e->dir);
	gwt_write(ini, gateway_ini);
	cr_assert_gt(e->gw = gwt_gateway_start(ini, e->seg, log, &e->gw_port, NULL, NULL), 0);
	snprintf(e->path, sizeof(e->path), "%s/nginx.conf", e->dir);
	e->nginx = gwt_nginx_start(e->dir, e->path, &e->port, nginx_conf, e);
	cr_assert_gt(e->nginx, 0, "nginx runs (Debian package nginx, %s)", TALLY_NGINX);
}

static void env_stop(struct env *e)
{
	gwt_nginx_stop(e->nginx);
	gwt_stop(e->gw);
	gwt_stop(e->up);
	kill(e->owner, SIGKILL);
	waitpid(e->owner, NULL, 0);
	tally_segment_unlink(e->seg);
	gwt_rmtree(e->dir);
}

Test(gateway_nginx, auth_request_sheds_before_the_upstream, .timeout = 120)
{
	struct env e;
	struct gwt_resp r;
	char v[128];

	env_start(&e);
	cr_expect_eq(gwt_get(e.port, "/ok/1", &r), 200, "%s", r.body);
	cr_expect(strncmp(r.body, "GET /ok/1 ", 10) == 0, "from the upstream: %s", r.body);

	cr_expect_eq(gwt_get(e.port, "/over/1", &r), 503, "%s", r.body);
	cr_expect_eq(gwt_header(&r, "Retry-After", v, sizeof(v)), 0, "Retry-After: %s", r.headers);
	cr_expect(atoi(v) >= 2 && atoi(v) <= 3, "the gateway's jittered 2-3 s: %s", v);
	cr_expect_eq(gwt_header(&r, "X-Tally-No-Retry", v, sizeof(v)), 0);
	cr_expect(strstr(r.body, "gw.over is overloaded"), "%s", r.body);

	cr_expect_eq(gwt_get(e.port, "/warn/1", &r), 429, "under pressure: %s", r.body);
	cr_expect_eq(gwt_header(&r, "Retry-After", v, sizeof(v)), 0);

	struct gwt_req post = { .method = "POST", .body = 1 << 20 };
	cr_expect_eq(gwt_http(e.port, "/over/2", &post, &r), 503, "a shed POST with a body");
	cr_expect_eq(gwt_http(e.port, "/ok/2", &post, &r), 200, "an admitted one: %s", r.body);
	cr_expect(strstr(r.body, "len=1048576"), "%s", r.body);
	struct gwt_req del = { .method = "DELETE", .body = -1 };
	cr_expect_eq(gwt_http(e.port, "/over/3", &del, &r), 503);
	cr_expect_eq(gwt_get(e.port, "/unmapped", &r), 200, "unmapped: admitted");
	cr_expect_eq(gwt_get(e.port, "/nocheck", &r), 200);

	cr_expect_eq(gwt_upstream_count(e.up_port, "/over/1"), 0, "the upstream saw no shed request");
	cr_expect_eq(gwt_upstream_count(e.up_port, "/over/2"), 0);
	cr_expect_eq(gwt_upstream_count(e.up_port, "/over/3"), 0);
	cr_expect_eq(gwt_upstream_count(e.up_port, "/warn/1"), 0);
	cr_expect_eq(gwt_upstream_count(e.up_port, "/ok/1"), 1);
	cr_expect_eq(gwt_upstream_count(e.up_port, "/unmapped"), 1);
	env_stop(&e);
}

/* Through the shipped configuration, a path spelled another way is
 * judged as the path nginx routes: "/ok/../over/1" reaches nginx's
 * location as /over/1, and the gateway, which gets $request_uri as sent,
 * sheds it as /over/1 (it once admitted it, under the route of /ok). */
Test(gateway_nginx, spellings_of_a_path_are_judged_as_nginx_routes_them, .timeout = 120)
{
	static const char *const spellings[] = { "/ok/../over/1", "//over/1", "/%6Fver/1", "/ok/%2e%2e/over/1" };
	struct env e;
	struct gwt_resp r;

	env_start(&e);
	for (size_t i = 0; i < sizeof(spellings) / sizeof(spellings[0]); i++)
		cr_expect_eq(gwt_get(e.port, spellings[i], &r), 503, "%s: %ld %s", spellings[i], r.status, r.body);
	cr_expect_eq(gwt_get(e.port, "/ok/1", &r), 200, "the control: %s", r.body);
	cr_expect_eq(gwt_upstream_count(e.up_port, ""), 1, "only the control reached the upstream");
	env_stop(&e);
}

/* nginx keeps its connection to the gateway: HEAD subrequests (nginx
 * closes a connection whose auth answer has a body it did not read) on an
 * upstream with keepalive, as the shipped tally-locations.conf has them.
 * With a body, every check was a new connection, 5x slower. */
Test(gateway_nginx, checks_reuse_the_connection, .timeout = 120)
{
	struct env e;
	struct gwt_resp r;

	env_start(&e);
	for (int i = 0; i < 100; i++) {
		cr_assert_eq(gwt_get(e.port, i % 2 ? "/ok/ka" : "/over/ka", &r), i % 2 ? 200 : 503, "%d: %s", i,
			     r.body);
	}
	cr_assert_eq(gwt_get(e.gw_port, "/_tally/metrics", &r), 200);
	const char *m = strstr(r.body, "\ntally_gateway_connections_total ");
	cr_assert(m, "%s", r.body);
	unsigned long n = strtoul(m + 33, NULL, 10);
	cr_expect(n >= 1 && n <= 3, "100 checks (admitted and shed) over %lu connection(s), and this one", n);
	env_stop(&e);
}

Test(gateway_nginx, under_wrk_load, .timeout = 120)
{
	struct env e;
	char url[128];
	uint64_t total, non2xx;

	env_start(&e);
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/over/load", e.port);
	cr_assert_eq(gwt_wrk(e.dir, url, &total, &non2xx), 0);
	cr_expect_gt(total, 100, "wrk got answers: %" PRIu64, total);
	cr_expect_eq(non2xx, total, "every request to the overloaded subject was shed");
	cr_expect_eq(gwt_upstream_count(e.up_port, "/over/load"), 0, "and none reached the upstream");

	snprintf(url, sizeof(url), "http://127.0.0.1:%d/ok/load", e.port);
	cr_assert_eq(gwt_wrk(e.dir, url, &total, &non2xx), 0);
	cr_expect_eq(non2xx, 0, "a healthy subject: all admitted");
	uint64_t seen = gwt_upstream_count(e.up_port, "/ok/load");
	cr_expect(seen >= total && seen <= total + 4, "the upstream saw each one (%" PRIu64 " of %" PRIu64 ")",
		  seen, total);
	env_stop(&e);
}
