/* SPDX-License-Identifier: MIT */
/*
 * test_gateway_proxy.c: tally-gateway in proxy mode between a client and
 * a real upstream (tests/gw_upstream.c), with a real owner: bodies from 0
 * bytes to 100 MB each way, compared by hash; chunked uploads and
 * 100-continue; keep-alive; methods; a slow client; 502 when the upstream
 * is down and 504 when it is too slow; shed requests never reaching
 * the upstream; 120 clients at once on one and on three loop threads,
 * each answered with its own bytes; clients that vanish mid-upload and
 * mid-download; SIGTERM while requests wait on the upstream.
 */
#include "config.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/gateway.h"
#include "common/helpers.h"
#include "common/http.h"
#include "gw_pattern.h"

struct env {
	char dir[64], ini[128], log[128], seg[TALLY_NAME_MAX + 1];
	pid_t owner, up, gw;
	int port, up_port;
};

static void env_start(struct env *e, const char *gateway_ini, const char *extra_ini, bool upstream_down)
{
	char ini[2048];

	memset(e, 0, sizeof(*e));
	cr_assert_eq(gwt_tempdir(e->dir), 0);
	snprintf(e->ini, sizeof(e->ini), "%s/gateway.ini", e->dir);
	snprintf(e->log, sizeof(e->log), "%s/gateway.log", e->dir);
	snprintf(e->seg, sizeof(e->seg), "%s", tt_segname("gwp"));
	cr_assert_gt(e->owner = gwt_owner_start(e->seg, false), 0);
	if (upstream_down)
		e->up_port = tt_free_port(); /* nothing listens there */
	else
		cr_assert_gt(e->up = gwt_upstream_start(&e->up_port), 0);
	snprintf(ini, sizeof(ini), "[gateway]\nmode = proxy\n%s[proxy]\nupstream = http://127.0.0.1:%d\n%s"
		 "[route * /over/**]\nsubject = gw.over\n[route * /warn/**]\nsubject = gw.warn\n"
		 "[route * /**]\nsubject = gw.ok\n", gateway_ini, e->up_port, extra_ini);
	cr_assert_eq(gwt_write(e->ini, ini), 0);
	cr_assert_gt(e->gw = gwt_gateway_start(e->ini, e->seg, e->log, &e->port, NULL, NULL), 0);
}

static void env_stop(struct env *e)
{
	int st = gwt_stop(e->gw);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the gateway stops cleanly");
	gwt_stop(e->up);
	gwt_owner_kill(&e->owner);
	tally_segment_unlink(e->seg);
	gwt_rmtree(e->dir);
}

/* The upstream's echo must say it got n bytes of the pattern. */
static void expect_echo(const struct gwt_resp *r, const char *method, int64_t n, const char *what)
{
	char want[128];

	snprintf(want, sizeof(want), "len=%" PRIu64 " fnv=%016" PRIx64, (uint64_t)n, gwt_pattern_fnv((uint64_t)n));
	cr_expect_eq(r->status, 200, "%s: %ld %s", what, r->status, r->body);
	cr_expect(strncmp(r->body, method, strlen(method)) == 0, "%s: method: %s", what, r->body);
	cr_expect(strstr(r->body, want), "%s: want %s, got %s", what, want, r->body);
}

Test(gateway_proxy, request_bodies_0_bytes_to_100_mb, .timeout = 300)
{
	static const int64_t sizes[] = { 0, 1, 65536 + 7, 1 << 20, 100 * 1000 * 1000 };
	struct env e;
	struct gwt_resp r;

	env_start(&e, "", "", false);
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		struct gwt_req rq = { .method = "POST", .body = sizes[i] };
		char what[64];
		snprintf(what, sizeof(what), "POST %" PRId64 " bytes", sizes[i]);
		gwt_http(e.port, "/up", &rq, &r);
		expect_echo(&r, "POST", sizes[i], what);
	}
	struct gwt_req ch = { .method = "PUT", .body = 3 << 20, .chunked = true };
	gwt_http(e.port, "/up", &ch, &r);
	expect_echo(&r, "PUT", 3 << 20, "PUT 3 MB chunked");
	cr_expect(strstr(r.body, "te=chunked"), "forwarded chunked: %s", r.body);
	struct gwt_req ex = { .method = "POST", .body = 5 << 20, .expect_100 = true };
	gwt_http(e.port, "/up", &ex, &r);
	expect_echo(&r, "POST", 5 << 20, "POST 5 MB with 100-continue");
	env_stop(&e);
}

Test(gateway_proxy, response_bodies_0_bytes_to_100_mb, .timeout = 300)
{
	static const uint64_t sizes[] = { 0, 1, 65536 + 7, 1 << 20, 100 * 1000 * 1000 };
	struct env e;
	struct gwt_resp r;
	char path[64], cl[32];

	env_start(&e, "", "", false);
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		snprintf(path, sizeof(path), "/_big/%" PRIu64, sizes[i]);
		cr_expect_eq(gwt_get(e.port, path, &r), 200, "%s: %s", path, r.body);
		cr_expect_eq(r.len, sizes[i], "%s: %" PRIu64 " bytes", path, r.len);
		cr_expect_eq(r.fnv, gwt_pattern_fnv(sizes[i]), "%s: the same bytes", path);
		cr_expect_eq(gwt_header(&r, "Content-Length", cl, sizeof(cl)), 0);
		cr_expect_eq(strtoull(cl, NULL, 10), sizes[i], "the upstream's length is kept");
	}
	env_stop(&e);
}

Test(gateway_proxy, keep_alive_and_methods, .timeout = 60)
{
	struct env e;
	struct gwt_resp r;
	static const char *const methods[] = { "GET", "DELETE", "OPTIONS", "PATCH", "PUT", NULL };

	env_start(&e, "", "", false);
	cr_expect_eq(gwt_get(e.port, "/a", &r), 200);
	cr_expect_eq(r.connects, 1);
	for (int i = 0; methods[i]; i++) {
		struct gwt_req rq = { .method = methods[i], .body = strcmp(methods[i], "PATCH") == 0 ? 10 : -1 };
		gwt_http(e.port, "/m?x=1", &rq, &r);
		cr_expect_eq(r.status, 200, "%s: %s", methods[i], r.body);
		cr_expect(strncmp(r.body, methods[i], strlen(methods[i])) == 0, "%s forwarded: %s", methods[i], r.body);
		cr_expect_eq(r.connects, 0, "%s: on the same connection (keep-alive)", methods[i]);
	}
	struct gwt_req head = { .method = "HEAD", .body = -1 };
	cr_expect_eq(gwt_http(e.port, "/_big/1000", &head, &r), 200);
	cr_expect_eq(r.len, 0);
	cr_expect_eq(gwt_upstream_count(e.up_port, "/m"), 5, "each request reached the upstream once");
	/* one client connection's transfers share a curl handle: nothing of
	 * a request (its method, body, HEAD) may carry over to the next */
	static const struct { const char *method; int64_t body; const char *path, *starts; } seq[] = {
		{ "POST", 10, "/m", "POST /m len=10 " }, { "GET", -1, "/m", "GET /m len=0 " },
		{ "HEAD", -1, "/_big/1000", NULL },       { "GET", -1, "/_big/1000", NULL },
		{ "DELETE", -1, "/m", "DELETE /m len=0 " }, { "GET", -1, "/m", "GET /m len=0 " },
	};
	for (size_t i = 0; i < sizeof(seq) / sizeof(seq[0]); i++) {
		struct gwt_req rq = { .method = seq[i].method, .body = seq[i].body };
		cr_expect_eq(gwt_http(e.port, seq[i].path, &rq, &r), 200, "%zu %s", i, seq[i].method);
		cr_expect_eq(r.connects, 0, "%zu %s: on the same connection", i, seq[i].method);
		if (seq[i].starts)
			cr_expect(strncmp(r.body, seq[i].starts, strlen(seq[i].starts)) == 0, "%zu: %s", i, r.body);
		else
			cr_expect_eq(r.len, strcmp(seq[i].method, "HEAD") == 0 ? 0 : 1000, "%zu %s: %llu bytes", i,
				     seq[i].method, (unsigned long long)r.len);
	}
	env_stop(&e);
}

/* A client that sends its body in small pieces and reads slowly. */
static int slow_client(int port, int pieces, char **reply)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	char head[256], piece[100];
	size_t len = 0, cap = 1 << 16;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0)
		return -1;
	int n = snprintf(head, sizeof(head), "POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
			 "Connection: close\r\n\r\n", pieces * (int)sizeof(piece));
	send(fd, head, (size_t)n, MSG_NOSIGNAL);
	for (int i = 0; i < pieces; i++) {
		gw_pattern_fill(piece, (uint64_t)i * sizeof(piece), sizeof(piece));
		send(fd, piece, sizeof(piece), MSG_NOSIGNAL);
		tt_sleep_ms(20);
	}
	*reply = malloc(cap);
	ssize_t k;
	while ((k = recv(fd, *reply + len, 16, 0)) > 0 && len + 17 < cap) { /* 16 bytes at a time */
		len += (size_t)k;
		tt_sleep_ms(1);
	}
	(*reply)[len] = '\0';
	close(fd);
	return 0;
}

Test(gateway_proxy, slow_client_does_not_hold_others, .timeout = 60)
{
	struct env e;
	struct gwt_resp r;
	char *reply = NULL, want[96];
	int fd[2];

	env_start(&e, "", "", false);
	cr_assert_eq(pipe(fd), 0);
	pid_t child = fork(); /* no library code runs in it: a socket client */
	if (child == 0) {
		close(fd[0]);
		int rc = slow_client(e.port, 30, &reply);
		if (rc == 0 && write(fd[1], reply, strlen(reply)) < 0)
			rc = -1;
		_exit(rc ? 1 : 0);
	}
	close(fd[1]);
	tt_sleep_ms(100);
	cr_expect_eq(gwt_get(e.port, "/meanwhile", &r), 200, "served while the slow client sends");
	char buf[4096] = "";
	size_t got = 0;
	ssize_t k;
	while ((k = read(fd[0], buf + got, sizeof(buf) - 1 - got)) > 0)
		got += (size_t)k;
	buf[got] = '\0';
	waitpid(child, NULL, 0);
	snprintf(want, sizeof(want), "len=3000 fnv=%016" PRIx64, gwt_pattern_fnv(3000));
	cr_expect(strstr(buf, "HTTP/1.1 200"), "%s", buf);
	cr_expect(strstr(buf, want), "the slow body arrived whole: %s", buf);
	env_stop(&e);
}

Test(gateway_proxy, upstream_down_is_502, .timeout = 60)
{
	struct env e;
	struct gwt_resp r;

	env_start(&e, "", "", true);
	cr_expect_eq(gwt_get(e.port, "/x", &r), 502, "%s", r.body);
	cr_expect(strstr(r.body, "upstream http://127.0.0.1:"), "names the upstream: %s", r.body);
	struct gwt_req rq = { .method = "POST", .body = 1 << 20 };
	cr_expect_eq(gwt_http(e.port, "/x", &rq, &r), 502, "with a body too: %s", r.body);
	cr_expect_eq(gwt_get(e.port, "/_tally/metrics", &r), 200);
	cr_expect(strstr(r.body, "tally_gateway_upstream_502_total 2\n"), "%s", r.body);
	env_stop(&e);
}

Test(gateway_proxy, upstream_too_slow_is_504, .timeout = 60)
{
	struct env e;
	struct gwt_resp r;

	env_start(&e, "", "upstream_timeout_ms = 300\n", false);
	cr_expect_eq(gwt_get(e.port, "/_slow/3000", &r), 504, "%s", r.body);
	cr_expect(strstr(r.body, "upstream_timeout_ms = 300"), "%s", r.body);
	cr_expect_eq(gwt_get(e.port, "/_slow/10", &r), 200, "a quick one passes");
	env_stop(&e);
}

Test(gateway_proxy, shed_requests_never_reach_the_upstream, .timeout = 60)
{
	struct env e;
	struct gwt_resp r;
	char v[64];

	env_start(&e, "", "[shedding]\nengine_probability = false\nwarn_shed_fraction = 1\noverload_trickle = 0\n", false);
	for (int i = 0; i < 20; i++) {
		struct gwt_req rq = { .method = "POST", .body = i * 1000 };
		cr_expect_eq(gwt_http(e.port, "/over/1", &rq, &r), 503, "%s", r.body);
	}
	cr_expect_eq(gwt_header(&r, "Retry-After", v, sizeof(v)), 0);
	cr_expect_eq(gwt_get(e.port, "/warn/1", &r), 429);
	cr_expect_eq(gwt_header(&r, "Retry-After", v, sizeof(v)), 0);
	cr_expect_eq(gwt_get(e.port, "/ok", &r), 200);
	cr_expect_eq(gwt_upstream_count(e.up_port, "/over/1"), 0, "the upstream saw no shed request");
	cr_expect_eq(gwt_upstream_count(e.up_port, "/warn/1"), 0);
	cr_expect_eq(gwt_upstream_count(e.up_port, "/ok"), 1);
	env_stop(&e);
}

/* A path spelled another way takes the route of the path it names, as
 * the upstream will route it: "/ok/../over/1" is shed as /over/1 is, and
 * reaches no one. */
Test(gateway_proxy, spellings_of_a_path_take_its_route, .timeout = 60)
{
	static const char *const spellings[] = { "/ok/../over/1", "//over/1", "/%6Fver/1", "/ok/%2e%2e/over/1",
						 "/ok/..%2Fover/1", "/./over/1", "/../over/1" };
	struct env e;
	struct gwt_resp r;
	char v[64];

	env_start(&e, "", "[shedding]\noverload_trickle = 0\n", false);
	for (size_t i = 0; i < sizeof(spellings) / sizeof(spellings[0]); i++) {
		cr_expect_eq(gwt_get(e.port, spellings[i], &r), 503, "%s: %ld %s", spellings[i], r.status, r.body);
		gwt_header(&r, "X-Tally-Route", v, sizeof(v));
		cr_expect_str_eq(v, "* /over/**", "%s takes the route of /over/1", spellings[i]);
	}
	cr_expect_eq(gwt_get(e.port, "/ok/1", &r), 200, "the control: %s", r.body);
	cr_expect_eq(gwt_upstream_count(e.up_port, ""), 1, "only the control reached the upstream");
	env_stop(&e);
}

/* What a proxy must not pass on, and what it must pass on whole: a
 * request header of 9 KB and one of 64 KB, 300 response headers, and the
 * headers each side's Connection names (RFC 9110, 7.6.1). */
Test(gateway_proxy, headers_whole_and_hop_headers_dropped, .timeout = 60)
{
	struct env e;
	struct gwt_resp r;
	char v[64];
	static char big[70000];

	env_start(&e, "", "", false);
	for (size_t len = 9000; len <= 15000; len += 6000) { /* the echo fits r.body */
		strcpy(big, "X-Big: ");
		memset(big + 7, 'b', len);
		big[7 + len] = '\0';
		const char *hs[] = { big, NULL };
		struct gwt_req rq = { .headers = hs, .body = -1 };
		cr_expect_eq(gwt_http(e.port, "/_headers", &rq, &r), 200, "%zu bytes: %s", len, r.body);
		const char *got = strstr(r.body, "X-Big: ");
		size_t n = got ? strspn(got + 7, "b") : 0;
		cr_expect_eq(n, len, "a %zu-byte header reaches the upstream whole: %zu", len, n);
	}
	/* past what a connection may hold (GW_CONN_MEMORY): refused, never cut */
	strcpy(big, "X-Big: ");
	memset(big + 7, 'b', 64000);
	big[7 + 64000] = '\0';
	const char *hb[] = { big, NULL };
	struct gwt_req rb = { .headers = hb, .body = -1 };
	cr_expect_eq(gwt_http(e.port, "/_headers", &rb, &r), 431, "a 64 KB header: %ld %s", r.status, r.body);
	cr_expect_eq(gwt_upstream_count(e.up_port, "/_headers"), 2, "it did not reach the upstream");
	const char *hop[] = { "Connection: X-Drop, keep-alive", "Connection: X-Also", "X-Drop: not for the upstream",
			      "X-Also: nor this", "X-Keep: 1", NULL };
	struct gwt_req rq = { .headers = hop, .body = -1 };
	cr_expect_eq(gwt_http(e.port, "/_headers", &rq, &r), 200);
	cr_expect_null(strstr(r.body, "X-Drop"), "a header the client's Connection names stays: %s", r.body);
	cr_expect_null(strstr(r.body, "X-Also"), "so does one a second Connection header names: %s", r.body);
	cr_expect(strstr(r.body, "X-Keep: 1"), "the others go on: %s", r.body);
	cr_expect_eq(gwt_get(e.port, "/_many/300", &r), 200, "%s", r.body);
	int seen = 0;
	for (int i = 1; i <= 300; i++) {
		char name[16];
		snprintf(name, sizeof(name), "X-H%d", i);
		seen += gwt_header(&r, name, v, sizeof(v)) == 0 && atoi(v) == i;
	}
	cr_expect_eq(seen, 300, "all 300 of the upstream's headers reach the client: %d", seen);
	cr_expect_neq(gwt_header(&r, "X-Secret", v, sizeof(v)), 0, "a header the upstream's Connection names stays");
	/* more than a connection can pass on: a 502 that says so (libmicrohttpd
	 * would close the connection with no answer) */
	cr_expect_eq(gwt_get(e.port, "/_many/1800", &r), 502, "%ld %s", r.status, r.body);
	cr_expect(strstr(r.body, "headers are larger than the 16 KiB"), "%s", r.body);
	env_stop(&e);
}

/* A shed request that waits for 100 Continue is answered instead of the
 * 100: its client sends no body. One that sends its body at once still
 * gets its answer after the body. */
Test(gateway_proxy, shed_with_100_continue_takes_no_body, .timeout = 60)
{
	struct env e;
	struct gwt_resp r;

	env_start(&e, "", "[shedding]\noverload_trickle = 0\n", false);
	struct gwt_req ex = { .method = "POST", .body = 50 << 20, .expect_100 = true };
	cr_expect_eq(gwt_http(e.port, "/over/1", &ex, &r), 503, "%s", r.body);
	cr_expect_lt(r.uploaded, 1 << 20, "no body taken: %" PRIu64 " bytes sent", r.uploaded);
	struct gwt_req plain = { .method = "POST", .body = 1 << 20 };
	cr_expect_eq(gwt_http(e.port, "/over/1", &plain, &r), 503, "without Expect: %s", r.body);
	cr_expect_eq(gwt_http(e.port, "/up", &ex, &r), 200, "admitted, with 100-continue: %s", r.body);
	cr_expect_eq(r.uploaded, 50u << 20);
	cr_expect_eq(gwt_upstream_count(e.up_port, "/over/1"), 0);
	env_stop(&e);
}

/* A second gateway on a port one already holds does not start (it would
 * share the port through SO_REUSEPORT and take part of the traffic). */
Test(gateway_proxy, a_port_in_use_is_refused, .timeout = 60)
{
	struct env e;
	char listen[32], log[160];
	int st = -1;

	env_start(&e, "", "", false);
	snprintf(listen, sizeof(listen), "127.0.0.1:%d", e.port);
	snprintf(log, sizeof(log), "%s/second.log", e.dir);
	const char *argv[] = { TALLY_TEST_BUILDDIR "/tools/tally-gateway", "-c", e.ini, "-s", e.seg,
			       "--listen", listen, NULL };
	pid_t pid = gwt_spawn(log, argv);
	for (int i = 0; i < 100 && waitpid(pid, &st, WNOHANG) == 0; i++)
		usleep(50000);
	if (!WIFEXITED(st))
		gwt_stop(pid);
	char *out = gwt_read_file(log);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 4, "the second gateway exits 4: %s", out);
	cr_expect(strstr(out, "Address already in use"), "and says why: %s", out);
	free(out);
	env_stop(&e);
}

/* The owner dies: proxy mode admits (fail-open) and says so on the
 * upstream's answer; with decision_headers = minimal it says only that,
 * and a fail-closed shed's body names no segment. */
Test(gateway_proxy, fail_open_is_said_on_the_answer, .timeout = 60)
{
	struct env e;
	struct gwt_resp r;
	char v[256];

	for (int minimal = 0; minimal < 2; minimal++) {
		env_start(&e, minimal ? "decision_headers = minimal\n" : "", "[shedding]\noverload_trickle = 0\n", false);
		cr_expect_eq(gwt_get(e.port, "/over/1", &r), 503);
		gwt_owner_kill(&e.owner);
		cr_expect_eq(gwt_get_until(e.port, "/over/2", 200, &r), 200, "the owner is dead: admitted");
		cr_expect(strncmp(r.body, "GET /over/2 ", 12) == 0, "the upstream's answer: %s", r.body);
		cr_expect_eq(gwt_header(&r, "X-Tally-Fail-Open", v, sizeof(v)), 0, "and said: %s", r.headers);
		if (minimal)
			cr_expect_str_eq(v, "1", "without the reason");
		else
			cr_expect(strstr(v, "owner") || strstr(v, "segment"), "why: %s", v);
		env_stop(&e);
	}
	env_start(&e, "decision_headers = minimal\nfail_closed = true\n", "", false);
	gwt_owner_kill(&e.owner);
	tally_segment_unlink(e.seg);
	cr_expect_eq(gwt_get_until(e.port, "/ok/1", 503, &r), 503, "no segment, fail-closed: shed");
	cr_expect_null(strstr(r.body, e.seg), "the body names no segment: %s", r.body);
	cr_expect_eq(gwt_header(&r, "X-Tally-Fail-Closed", v, sizeof(v)), 0);
	cr_expect_str_eq(v, "1");
	env_stop(&e);
}

/* Many clients at once on raw sockets, driven by one poll loop: each
 * sends its request whole (a body of its own size), then reads to EOF. */
struct raw_conn {
	int fd;
	char *out, *in;
	size_t out_len, out_off, in_len, in_cap;
	bool done;
};

static int raw_connect(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

/* A request on a new connection, its body bytes of the pattern; conn:
 * its Connection header's value. */
static void raw_request_conn(struct raw_conn *c, int port, const char *method, const char *path, size_t body,
			     const char *conn)
{
	char head[256];
	int n = snprintf(head, sizeof(head), "%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n"
			 "Connection: %s\r\n\r\n", method, path, body, conn);

	memset(c, 0, sizeof(*c));
	cr_assert_geq(c->fd = raw_connect(port), 0, "connect to the gateway");
	cr_assert(c->out = malloc((size_t)n + body));
	memcpy(c->out, head, (size_t)n);
	gw_pattern_fill(c->out + n, 0, body);
	c->out_len = (size_t)n + body;
	c->in_cap = 4096;
	cr_assert(c->in = malloc(c->in_cap));
}

static void raw_request(struct raw_conn *c, int port, const char *method, const char *path, size_t body)
{
	raw_request_conn(c, port, method, path, body, "close");
}

static void raw_run(struct raw_conn *c, int n)
{
	struct pollfd *p = calloc((size_t)n, sizeof(*p));
	int left = n;

	cr_assert(p);
	while (left > 0) {
		for (int i = 0; i < n; i++) {
			p[i].fd = c[i].done ? -1 : c[i].fd;
			p[i].events = POLLIN | (c[i].out_off < c[i].out_len ? POLLOUT : 0);
		}
		cr_assert_gt(poll(p, (nfds_t)n, 30000), 0, "the gateway answers within 30 s");
		for (int i = 0; i < n; i++) {
			struct raw_conn *r = &c[i];
			if (r->done || !p[i].revents)
				continue;
			if ((p[i].revents & POLLOUT) && r->out_off < r->out_len) {
				ssize_t k = send(r->fd, r->out + r->out_off, r->out_len - r->out_off, MSG_NOSIGNAL);
				if (k > 0)
					r->out_off += (size_t)k;
			}
			if (p[i].revents & (POLLIN | POLLHUP | POLLERR)) {
				if (r->in_len + 1 >= r->in_cap)
					cr_assert(r->in = realloc(r->in, r->in_cap *= 2));
				ssize_t k = recv(r->fd, r->in + r->in_len, r->in_cap - r->in_len - 1, 0);
				if (k > 0) {
					r->in_len += (size_t)k;
				} else if (k == 0 || (p[i].revents & (POLLHUP | POLLERR))) {
					r->in[r->in_len] = '\0';
					r->done = true;
					close(r->fd);
					left--;
				}
			}
		}
	}
	free(p);
}

static void raw_free(struct raw_conn *c, int n)
{
	for (int i = 0; i < n; i++) {
		free(c[i].out);
		free(c[i].in);
	}
}

/* The body after the head, and its length from Content-Length. */
static const char *raw_body(const struct raw_conn *c, size_t *len)
{
	const char *b = strstr(c->in, "\r\n\r\n");
	char cl[32];

	*len = 0;
	if (!b)
		return NULL;
	b += 4;
	if (tt_http_header(c->in, "Content-Length", cl, sizeof(cl)) == 0)
		*len = (size_t)strtoull(cl, NULL, 10);
	return (size_t)(b - c->in) + *len <= c->in_len ? b : NULL;
}

/* 120 clients at once, each answered with what it sent: a body of its own
 * length to a slow path of its own, or a response of its own length. With
 * N loop threads many connections share a thread; a reply that went to
 * the wrong client, or got mixed with another, shows. */
static void many_clients(const char *threads)
{
	enum { N = 120 };
	struct raw_conn *c = calloc(N, sizeof(*c));
	struct env e;
	char ini[128], path[64], want[160];

	cr_assert(c);
	snprintf(ini, sizeof(ini), "threads = %s\n", threads);
	env_start(&e, ini, "", false);
	for (int i = 0; i < N; i++) {
		if (i % 3 == 2) {
			snprintf(path, sizeof(path), "/_big/%d", 1000 * i + i);
			raw_request(&c[i], e.port, "GET", path, 0);
		} else {
			snprintf(path, sizeof(path), "/_slow/200/%d", i);
			raw_request(&c[i], e.port, "POST", path, (size_t)(997 * i));
		}
	}
	raw_run(c, N);
	for (int i = 0; i < N; i++) {
		size_t len;
		const char *body = raw_body(&c[i], &len);
		cr_expect(strncmp(c[i].in, "HTTP/1.1 200", 12) == 0, "client %d (threads = %s): %.200s", i, threads,
			  c[i].in);
		cr_expect(body, "client %d: a whole body: %.200s", i, c[i].in);
		if (!body)
			continue;
		if (i % 3 == 2) {
			cr_expect_eq(len, (size_t)(1000 * i + i), "client %d: its own length", i);
			cr_expect_eq(gw_fnv(GW_FNV_INIT, body, len), gwt_pattern_fnv(len), "client %d: its own bytes", i);
		} else {
			snprintf(want, sizeof(want), "POST /_slow/200/%d len=%d fnv=%016" PRIx64 " ", i, 997 * i,
				 gwt_pattern_fnv((uint64_t)(997 * i)));
			cr_expect(strncmp(body, want, strlen(want)) == 0, "client %d: want %s, got %.200s", i, want, body);
		}
	}
	raw_free(c, N);
	free(c);
	env_stop(&e);
}

Test(gateway_proxy, many_clients_one_loop_thread, .timeout = 120)
{
	many_clients("1");
}

Test(gateway_proxy, many_clients_three_loop_threads, .timeout = 120)
{
	many_clients("3");
}

/* Clients that go away mid-upload and mid-download: the gateway lets go
 * of both sides and goes on serving. */
Test(gateway_proxy, clients_that_vanish_mid_request, .timeout = 120)
{
	struct env e;
	struct gwt_resp r;
	char head[160], buf[65536];

	env_start(&e, "threads = 1\n", "", false);
	for (int round = 0; round < 5; round++) {
		int fd = raw_connect(e.port);
		cr_assert_geq(fd, 0);
		const char *get = "GET /_big/100000000 HTTP/1.1\r\nHost: x\r\n\r\n";
		cr_assert_eq(send(fd, get, strlen(get), MSG_NOSIGNAL), (ssize_t)strlen(get));
		size_t got = 0;
		ssize_t k;
		while (got < (1u << 20) && (k = recv(fd, buf, sizeof(buf), 0)) > 0)
			got += (size_t)k;
		cr_expect_geq(got, 1u << 20, "round %d: the download started", round);
		close(fd); /* 99 MB unread */

		cr_assert_geq(fd = raw_connect(e.port), 0);
		int n = snprintf(head, sizeof(head), "POST /vanish/%d HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
				 round);
		send(fd, head, (size_t)n, MSG_NOSIGNAL);
		gw_pattern_fill(buf, 0, sizeof(buf));
		for (int i = 0; i < 16; i++)
			send(fd, buf, sizeof(buf), MSG_NOSIGNAL);
		close(fd); /* 1 MB of 10 MB sent */

		cr_expect_eq(gwt_get(e.port, "/after", &r), 200, "round %d: served after the vanished clients: %s", round,
			     r.body);
	}
	tt_sleep_ms(200);
	cr_expect_eq(gwt_upstream_count(e.up_port, "/after"), 5);
	env_stop(&e);
}

/* SIGTERM while requests wait on an upstream that would answer in 60 s:
 * the gateway gives them up and exits 0 (gwt_stop kills it after 10 s). */
Test(gateway_proxy, sigterm_with_requests_waiting_on_the_upstream, .timeout = 120)
{
	enum { N = 20 };
	struct raw_conn c[N];
	struct env e;
	char path[64];

	env_start(&e, "threads = 2\n", "drain_timeout_ms = 300\n", false);
	for (int i = 0; i < N; i++) {
		snprintf(path, sizeof(path), "/_slow/60000/%d", i);
		raw_request(&c[i], e.port, i % 2 ? "POST" : "GET", path, (size_t)(i % 2 ? 5000 : 0));
		cr_assert_eq(send(c[i].fd, c[i].out, c[i].out_len, MSG_NOSIGNAL), (ssize_t)c[i].out_len);
		c[i].out_off = c[i].out_len;
	}
	for (int i = 0; i < 100 && gwt_upstream_count(e.up_port, "") < N; i++)
		tt_sleep_ms(20);
	cr_expect_eq(gwt_upstream_count(e.up_port, ""), N, "every request reached the upstream");
	int st = gwt_stop(e.gw);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the gateway exits 0 on SIGTERM (status %#x)", st);
	raw_run(c, N); /* each client sees its connection end */
	raw_free(c, N);
	char *log = gwt_read_file(e.log);
	cr_expect(strstr(log, "20 request(s) in flight get up to drain_timeout_ms = 300"), "%s", log);
	cr_expect(strstr(log, "stopping with 20 request(s) still in flight"), "%s", log);
	free(log);
	kill(e.up, SIGKILL); /* its threads sleep for a minute */
	waitpid(e.up, NULL, 0);
	kill(e.owner, SIGKILL);
	waitpid(e.owner, NULL, 0);
	tally_segment_unlink(e.seg);
	gwt_rmtree(e.dir);
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* SIGTERM in a rolling restart: the gateway takes no new connection, and
 * the requests in flight finish (drain_timeout_ms), with their answers,
 * before it exits 0. */
Test(gateway_proxy, sigterm_lets_requests_in_flight_finish, .timeout = 60)
{
	enum { N = 3 };
	struct raw_conn c[N];
	struct env e;
	char path[64];
	int st = -1;

	env_start(&e, "threads = 2\n", "drain_timeout_ms = 10000\n", false);
	for (int i = 0; i < N; i++) {
		snprintf(path, sizeof(path), "/_slow/1500/%d", i);
		/* kept alive, all three: the drain's answers close them */
		raw_request_conn(&c[i], e.port, i == 1 ? "POST" : "GET", path, i == 1 ? 100000 : 0, "keep-alive");
		cr_assert_eq(send(c[i].fd, c[i].out, c[i].out_len, MSG_NOSIGNAL), (ssize_t)c[i].out_len);
		c[i].out_off = c[i].out_len;
	}
	for (int i = 0; i < 100 && gwt_upstream_count(e.up_port, "") < N; i++)
		tt_sleep_ms(10);
	cr_assert_eq(gwt_upstream_count(e.up_port, ""), N, "every request reached the upstream");
	uint64_t t0 = now_ms();
	kill(e.gw, SIGTERM);
	tt_sleep_ms(200);
	int fd = raw_connect(e.port);
	cr_expect_lt(fd, 0, "no new connection while it drains");
	if (fd >= 0)
		close(fd);
	raw_run(c, N);
	for (int i = 0; i < N; i++) {
		size_t len;
		const char *body = raw_body(&c[i], &len);
		char cv[32];
		cr_expect(tt_http_header(c[i].in, "Connection", cv, sizeof(cv)) == 0 && strcasecmp(cv, "close") == 0,
			  "request %d: an answer while it drains closes its connection", i);
		snprintf(path, sizeof(path), "/_slow/1500/%d len=%d", i, i == 1 ? 100000 : 0);
		cr_expect(strncmp(c[i].in, "HTTP/1.1 200", 12) == 0, "request %d answered 200: %.*s", i,
			  (int)(c[i].in_len < 200 ? c[i].in_len : 200), c[i].in);
		cr_expect(body && strstr(body, path), "request %d: its upstream's answer: %s", i, body ? body : "");
	}
	raw_free(c, N);
	for (int i = 0; i < 500 && waitpid(e.gw, &st, WNOHANG) != e.gw; i++)
		tt_sleep_ms(10);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "then it exits 0 (status %#x)", st);
	cr_expect_lt(now_ms() - t0, 8000, "when they are done, not at the drain's end");
	char *log = gwt_read_file(e.log);
	cr_expect(strstr(log, "3 request(s) in flight"), "%s", log);
	cr_expect_null(strstr(log, "still in flight"), "%s", log);
	free(log);
	e.gw = 0;
	gwt_stop(e.up);
	gwt_owner_kill(&e.owner);
	tally_segment_unlink(e.seg);
	gwt_rmtree(e.dir);
}

/* A target that is not a path (absolute form, or OPTIONS *) is the
 * client's mistake, 400, not an upstream's failure (it was a 502 counted
 * against the upstream). */
Test(gateway_proxy, a_target_that_is_not_a_path_is_400, .timeout = 60)
{
	struct raw_conn c[2];
	struct env e;

	env_start(&e, "", "", false);
	raw_request(&c[0], e.port, "GET", "http://127.0.0.1/over/1", 0);
	raw_request(&c[1], e.port, "OPTIONS", "*", 0);
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(send(c[i].fd, c[i].out, c[i].out_len, MSG_NOSIGNAL), (ssize_t)c[i].out_len);
		c[i].out_off = c[i].out_len;
	}
	raw_run(c, 2);
	for (int i = 0; i < 2; i++)
		cr_expect(strncmp(c[i].in, "HTTP/1.1 400", 12) == 0, "target %d: %.*s", i,
			  (int)(c[i].in_len < 300 ? c[i].in_len : 300), c[i].in);
	raw_free(c, 2);
	struct gwt_resp r;
	cr_expect_eq(gwt_get(e.port, "/_tally/metrics", &r), 200);
	cr_expect(strstr(r.body, "tally_gateway_upstream_502_total 0\n"), "no 502 counted: %s", r.body);
	cr_expect_eq(gwt_upstream_count(e.up_port, ""), 0);
	env_stop(&e);
}
