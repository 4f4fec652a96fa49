/* SPDX-License-Identifier: MIT */
/*
 * server.c: libmicrohttpd for both modes, the check endpoint, the admin
 * endpoints (ADMIN_PREFIX/metrics, /routes, /health); a request is
 * routed, read and decided by gw_evaluate (evaluate.c).
 *
 * libmicrohttpd calls the access handler once with the headers, then
 * once per piece of the body, then once more with none. The reply is
 * queued exactly once, on that last call, after the body is complete:
 * queueing it while the body is still arriving fails, and libmicrohttpd
 * then drops the connection ("Application reported internal error"),
 * which is how the first gateway lost every POST with a body. (One
 * exception, on the first call: a shed request that waits for 100
 * Continue is answered before its body is sent; first_call.) The
 * decision is taken on the first call (headers are all it needs); a body
 * the check does not need is read and dropped.
 *
 * Check mode runs libmicrohttpd's thread pool over epoll (nothing in a
 * check blocks). Proxy mode runs event loops (loop.c), one per thread,
 * each with its own daemon on the same port: its forwarding (proxy.c)
 * suspends a connection while libcurl talks to the upstream and never
 * blocks a thread. `threads` sizes both (0: one per online CPU).
 */
#include "config.h"

#include <errno.h>
#include <microhttpd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "gateway.h"

#define REQ_MAGIC 0x67777271u /* "gwrq" */

/* libmicrohttpd's memory per connection: the request's headers and the
 * pieces of its body. It zeroes all of it between two requests of a
 * connection, so it is a cost per request: with 128 KiB a check took
 * 13-14 us of CPU, with 32 KiB 7 (BENCHMARKS.md "Gateway"). 32 KiB is
 * libmicrohttpd's own default and holds headers far beyond what nginx
 * sends (8 KiB lines). */
#define GW_CONN_MEMORY (32 * 1024)

struct gw_req {
	uint32_t magic;
	bool started, admin, proxying, answered;
	bool not_a_path;        /* proxy mode: a target that is not /PATH (400) */
	bool http11;            /* HTTP/1.1: a client that may wait for 100 Continue */
	char *uri;              /* raw, with the query */
	struct gw_outcome o;
	struct gw_proxy_req *proxy;
};

/* ---- decide ---- */

struct hctx {
	struct MHD_Connection *c;
};

static const char *get_header(void *ctx, const char *name)
{
	return MHD_lookup_connection_value(((struct hctx *)ctx)->c, MHD_HEADER_KIND, name);
}

static void mhd_add(void *ctx, const char *name, const char *value)
{
	MHD_add_response_header(ctx, name, value);
}

void gw_add_decision_headers(struct MHD_Response *r, const struct gw_outcome *o)
{
	gw_decision_headers(o, mhd_add, r);
}

void gw_response_common(struct gw *g, struct MHD_Response *r)
{
	if (atomic_load_explicit(&g->draining, memory_order_relaxed))
		MHD_add_response_header(r, MHD_HTTP_HEADER_CONNECTION, "close");
}

static enum MHD_Result queue_text(struct gw *g, struct MHD_Connection *c, unsigned status, const char *text,
				  const struct gw_outcome *o)
{
	struct MHD_Response *r = MHD_create_response_from_buffer(strlen(text), (void *)text,
								 MHD_RESPMEM_MUST_COPY);
	if (!r)
		return MHD_NO;
	MHD_add_response_header(r, "Content-Type", "text/plain; charset=utf-8");
	gw_response_common(g, r);
	if (o)
		gw_add_decision_headers(r, o);
	enum MHD_Result ret = MHD_queue_response(c, status, r);
	MHD_destroy_response(r);
	return ret;
}

/* The answer of a check, or of a shed in proxy mode. */
static enum MHD_Result answer(struct gw *g, struct MHD_Connection *c, const struct gw_outcome *o)
{
	char body[TALLY_NAME_MAX * 2 + 400]; /* a why names the segment, twice */
	unsigned status = o->d.status;

	bool closed = o->rd.level == GW_LEVEL_CLOSED;
	const char *why = o->minimal ? "see the gateway's log" : o->rd.why; /* minimal: no internals */

	if (o->d.admit)
		snprintf(body, sizeof(body), "admit%s%s%s\n", o->rd.why ? " (fail-open: " : "",
			 o->rd.why ? why : "", o->rd.why ? ")" : "");
	else
		snprintf(body, sizeof(body), "shed%s%s%s: retry after %u s\n", closed ? " (fail-closed: " : "",
			 closed ? why : "", closed ? ")" : "", o->retry_after_s);
	if (!o->d.admit && g->cfg->mode == GW_MODE_CHECK && g->cfg->shed_status)
		status = g->cfg->shed_status;
	return queue_text(g, c, status, body, o);
}

/* ---- admin ---- */

/* ADMIN_PREFIX/metrics, /routes and /health; 0: not an admin path. */
static int admin(struct gw *g, struct MHD_Connection *c, const char *uri, enum MHD_Result *ret)
{
	const char *pre = g->cfg->admin_prefix;
	size_t pl = g->admin_len, ul = strcspn(uri, "?");

	if (!pl || strncmp(uri, pre, pl) != 0 || uri[pl] != '/')
		return 0;
	if (ul == pl + 7 && strncmp(uri + pl, "/health", 7) == 0) {
		*ret = queue_text(g, c, 200, "ok\n", NULL);
		return 1;
	}
	bool routes = ul == pl + 7 && strncmp(uri + pl, "/routes", 7) == 0;
	if (!routes && (ul != pl + 8 || strncmp(uri + pl, "/metrics", 8) != 0))
		return 0;
	char *text = routes ? gw_routes_json(g, g->cfg->mode == GW_MODE_CHECK ? "check" : "proxy")
			    : gw_metrics_text(g);
	struct MHD_Response *r = text ? MHD_create_response_from_buffer(strlen(text), text,
									 MHD_RESPMEM_MUST_FREE) : NULL;
	if (!r) {
		free(text);
		*ret = MHD_NO;
		return 1;
	}
	MHD_add_response_header(r, "Content-Type", routes ? "application/json"
							  : "text/plain; version=0.0.4; charset=utf-8");
	*ret = MHD_queue_response(c, 200, r);
	MHD_destroy_response(r);
	return 1;
}

/* ---- the access handler ---- */

/* The request the check is about: the proxy's headers, else our own path
 * less path_prefix. */
static void check_target(struct gw *g, struct MHD_Connection *c, const char **method, const char **uri)
{
	const struct gw_config *cfg = g->cfg;
	const char *m = *cfg->method_header ? MHD_lookup_connection_value(c, MHD_HEADER_KIND, cfg->method_header) : NULL;
	const char *u = *cfg->uri_header ? MHD_lookup_connection_value(c, MHD_HEADER_KIND, cfg->uri_header) : NULL;
	size_t pl = strlen(cfg->path_prefix);

	if (m && *m)
		*method = m;
	if (u && *u == '/')
		*uri = u;
	else if (pl && strncmp(*uri, cfg->path_prefix, pl) == 0 && strchr("/?", (*uri)[pl]))
		*uri += pl;
}

static enum MHD_Result first_call(struct gw *g, struct MHD_Connection *c, struct gw_req *q,
				  const char *method, void *sock_ctx, const char *upload, size_t *upload_size)
{
	const char *target = q->uri, *m = method;
	struct hctx h = { c };
	enum MHD_Result ret;

	q->started = true;
	if (admin(g, c, q->uri, &ret)) { /* GET: no body; a body would be dropped by MHD */
		q->admin = true;
		return ret;
	}
	if (g->cfg->mode == GW_MODE_PROXY && q->uri[0] != '/') {
		q->not_a_path = true; /* "http://host/x" or "*": answered 400 after its body */
		return MHD_YES;
	}
	if (g->cfg->mode == GW_MODE_CHECK)
		check_target(g, c, &m, &target);
	/* routes see the path as nginx and the upstream route it: a spelling
	 * of it ("/ok/../over", "//over") takes the route of what it names */
	char small[1024], *path = NULL;
	if (target[0] == '/') {
		size_t room = 3 * strlen(target) + 2;
		path = room <= sizeof(small) ? small : malloc(room);
		if (!path)
			return MHD_NO; /* out of memory: the connection is closed */
		gw_path_normalize(target, path);
		target = path;
	}
	gw_evaluate(g, m, target, get_header, &h, &q->o);
	if (path != small)
		free(path);
	/* A shed request whose client waits for 100 Continue before it sends
	 * its body: answered now, in place of the 100, so that an overloaded
	 * service does not take in a body it throws away. libmicrohttpd then
	 * reads no body and closes the connection after the answer. Not for
	 * a client that sends its body at once: closing with its bytes unread
	 * would reset the connection, and it could lose the answer. */
	const char *expect = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_EXPECT);
	if (!q->o.d.admit && q->http11 && expect && strcasecmp(expect, "100-continue") == 0) {
		q->answered = true;
		return answer(g, c, &q->o);
	}
	if (g->cfg->mode == GW_MODE_PROXY && q->o.d.admit) {
		q->proxying = true;
		return (enum MHD_Result)gw_proxy_handle(g, sock_ctx, c, &q->proxy, method, q->uri, upload,
							upload_size, &q->o);
	}
	return MHD_YES;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
				  const char *method, const char *version, const char *upload,
				  size_t *upload_size, void **req_cls)
{
	struct gw *g = cls;
	struct gw_req *q = *req_cls;
	const union MHD_ConnectionInfo *ci;

	(void)url;
	(void)version;
	if (!q || q->magic != REQ_MAGIC)
		return MHD_NO; /* the URI logger made it; out of memory there */
	if (q->admin)
		return MHD_YES;
	if (!q->started) {
		q->http11 = version && strcmp(version, MHD_HTTP_VERSION_1_1) == 0;
		ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
		return first_call(g, c, q, method, ci ? ci->socket_context : NULL, upload, upload_size);
	}
	if (q->proxying) {
		ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
		return (enum MHD_Result)gw_proxy_handle(g, ci ? ci->socket_context : NULL, c, &q->proxy,
							method, q->uri, upload, upload_size, &q->o);
	}
	if (*upload_size) { /* a body the check does not need */
		*upload_size = 0;
		return MHD_YES;
	}
	if (q->answered)
		return MHD_YES;
	if (q->not_a_path)
		return queue_text(g, c, MHD_HTTP_BAD_REQUEST, "tally-gateway forwards requests for a path "
				  "(GET /orders/7): an absolute URI or * is not one\n", NULL);
	return answer(g, c, &q->o); /* the last call: the body is complete */
}

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *c)
{
	struct gw_req *q = calloc(1, sizeof(*q));
	struct gw *g = cls;

	(void)c;
	if (q && !(q->uri = strdup(uri))) {
		free(q);
		return NULL;
	}
	if (q) {
		q->magic = REQ_MAGIC;
		/* in flight from its request line until on_completed (which
		 * every request made here gets): what a drain waits for, a
		 * request whose headers are still coming too */
		atomic_fetch_add_explicit(&g->inflight, 1, memory_order_relaxed);
	}
	return q;
}

static void on_completed(void *cls, struct MHD_Connection *c, void **req_cls,
			 enum MHD_RequestTerminationCode toe)
{
	struct gw_req *q = *req_cls;
	struct gw *g = cls;

	(void)c;
	(void)toe;
	if (!q)
		return;
	atomic_fetch_sub_explicit(&g->inflight, 1, memory_order_relaxed); /* counted in on_uri */
	gw_proxy_req_free(q->proxy);
	free(q->uri);
	q->magic = 0;
	free(q);
	*req_cls = NULL;
}

static void on_connection(void *cls, struct MHD_Connection *c, void **sock_ctx,
			  enum MHD_ConnectionNotificationCode toe)
{
	struct gw *g = cls;

	(void)c;
	(void)sock_ctx;
	if (toe == MHD_CONNECTION_NOTIFY_STARTED)
		atomic_fetch_add_explicit(&g->st->n.connections, 1, memory_order_relaxed);
}

/* Proxy mode: cls is the connection's loop; its curl handle comes and goes
 * with it. */
static void on_proxy_connection(void *cls, struct MHD_Connection *c, void **sock_ctx,
				enum MHD_ConnectionNotificationCode toe)
{
	struct gw_loop *l = cls;

	on_connection(l->g, c, sock_ctx, toe);
	if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
		*sock_ctx = gw_proxy_conn_new(l);
	} else {
		gw_proxy_conn_free(*sock_ctx);
		*sock_ctx = NULL;
	}
}

void gw_mhd_log(void *cls, const char *fmt, va_list ap)
{
	char line[512];

	(void)cls;
	vsnprintf(line, sizeof(line), fmt, ap);
	line[strcspn(line, "\n")] = '\0';
	gw_log("libmicrohttpd: %s", line);
}

/* Proxy mode's stop, for a rolling restart: no new connection, and the
 * requests in flight get drain_timeout_ms to finish before the loops stop
 * (and fail what is left with a 502). A second signal cuts it short. */
static void drain(struct gw *g, struct gw_loop *loops, unsigned n, int sig)
{
	uint64_t until = gw_now_ns() + (uint64_t)g->cfg->drain_timeout_ms * 1000000u;
	long left = atomic_load_explicit(&g->inflight, memory_order_relaxed);
	struct timespec tick = { 0, 10 * 1000000 };
	sigset_t set;
	int again;

	atomic_store_explicit(&g->draining, true, memory_order_relaxed);
	gw_loops_quiesce(loops, n);
	if (left <= 0 || !g->cfg->drain_timeout_ms)
		goto out;
	gw_log("signal %d: taking no new connection; %ld request(s) in flight get up to "
	       "drain_timeout_ms = %u to finish (a second signal stops at once)",
	       sig, left, g->cfg->drain_timeout_ms);
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	while ((left = atomic_load_explicit(&g->inflight, memory_order_relaxed)) > 0 && gw_now_ns() < until) {
		if ((again = sigtimedwait(&set, NULL, &tick)) > 0) {
			gw_log("signal %d again: stopping now", again);
			break;
		}
	}
out:
	if (left > 0)
		gw_log("stopping with %ld request(s) still in flight: they are answered 502 or cut off", left);
}

int gw_serve(struct gw *g)
{
	struct gw_config *cfg = g->cfg;
	struct sockaddr_storage ss;
	char why[256];
	sigset_t set;
	int sig;
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	unsigned threads = cfg->threads ? cfg->threads : ncpu > 0 ? (unsigned)ncpu : 1;

	if (gw_parse_listen(cfg->listen, &ss, why, sizeof(why)) != 0) {
		fprintf(stderr, "tally-gateway: listen %s\n", why);
		return 2;
	}
	g->admin_len = strlen(cfg->admin_prefix);
	if (cfg->mode == GW_MODE_PROXY && gw_proxy_global_init() != 0) {
		fprintf(stderr, "tally-gateway: libcurl did not initialise\n");
		return 4;
	}
	/* signals go to this thread only: the server's threads inherit the mask */
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	unsigned flags = MHD_USE_ERROR_LOG | (ss.ss_family == AF_INET6 ? MHD_USE_IPv6 : 0);
	struct MHD_Daemon *d = NULL;
	struct gw_loop *loops = NULL;
	if (cfg->mode == GW_MODE_PROXY) {
		struct gw_daemon_options o = {
			.flags = flags, .addr = &ss, .on_request = on_request, .on_uri = on_uri,
			.on_completed = on_completed, .on_connection = on_proxy_connection,
			/* each loop takes its share of the limit (the kernel spreads connections) */
			.connection_limit = (cfg->connection_limit + threads - 1) / threads,
			.idle_timeout_s = cfg->idle_timeout_s, .memory = GW_CONN_MEMORY,
		};
		if (!(loops = calloc(threads, sizeof(*loops))) || gw_loops_start(g, loops, threads, &o) != 0) {
			int err = loops ? errno : ENOMEM;
			free(loops);
			fprintf(stderr, "tally-gateway: cannot listen on %s: %s (is another process on that "
					"port? pick another with --listen)\n", cfg->listen, strerror(err));
			return 4;
		}
	} else {
		d = MHD_start_daemon(
			flags | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL, 0, NULL, NULL, on_request, g,
			MHD_OPTION_EXTERNAL_LOGGER, gw_mhd_log, NULL,
			MHD_OPTION_SOCK_ADDR, &ss,
			MHD_OPTION_URI_LOG_CALLBACK, on_uri, g,
			MHD_OPTION_NOTIFY_COMPLETED, on_completed, g,
			MHD_OPTION_NOTIFY_CONNECTION, on_connection, g,
			MHD_OPTION_CONNECTION_LIMIT, (unsigned)cfg->connection_limit,
			MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)cfg->idle_timeout_s,
			MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)GW_CONN_MEMORY,
			MHD_OPTION_THREAD_POOL_SIZE, threads,
			MHD_OPTION_END);
		if (!d) {
			fprintf(stderr, "tally-gateway: cannot listen on %s: %s (is another process on that "
					"port? pick another with --listen)\n", cfg->listen, strerror(errno));
			return 4;
		}
	}
	gw_log("%s mode, listening on %s, segment %s, %zu route(s)%s%s%s",
	       cfg->mode == GW_MODE_CHECK ? "check" : "proxy", cfg->listen, cfg->segment, cfg->nroutes,
	       cfg->mode == GW_MODE_PROXY ? ", upstream " : "",
	       cfg->mode == GW_MODE_PROXY ? cfg->upstream : "", cfg->fail_closed ? ", fail-closed" : "");
	while (sigwait(&set, &sig) != 0)
		;
	if (loops)
		drain(g, loops, threads, sig);
	if (d)
		MHD_stop_daemon(d);
	if (loops)
		gw_loops_stop(loops, threads);
	free(loops);
	gw_log("stopping on signal %d: %llu admitted, %llu shed 429, %llu shed 503, %llu failed open, "
	       "%llu shed fail-closed, %llu unmapped", sig, (unsigned long long)g->st->n.admitted,
	       (unsigned long long)g->st->n.shed_429, (unsigned long long)g->st->n.shed_503,
	       (unsigned long long)g->st->n.fail_open, (unsigned long long)g->st->n.fail_closed,
	       (unsigned long long)g->st->n.unmapped);
	return 0;
}
