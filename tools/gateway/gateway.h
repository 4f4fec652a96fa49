/* SPDX-License-Identifier: MIT */
/*
 * gateway.h: what the files of tally-gateway share (not installed). The
 * gateway is one program with two modes (docs/gateway.md):
 *
 *   check  answers a proxy's subrequest (nginx auth_request, Envoy
 *          ext_authz HTTP): 2xx admits, shed_status (403 for nginx, or
 *          the native 429/503) sheds; X-Tally-* headers carry the
 *          decision, the reason and Retry-After;
 *   proxy  admits or sheds, then forwards what it admits to an upstream,
 *          streaming both bodies (libmicrohttpd serves, libcurl forwards).
 *
 * Each request goes through the same three steps: route (method, path and
 * headers to a subject and a priority class: route.c), read (the
 * subject's verdict from the segment, or why there is none: judge.c) and
 * decide (admit or shed, and with which status: shed.c). config.c reads
 * the INI file, server.c runs libmicrohttpd and the check and admin
 * endpoints, loop.c proxy mode's event loops, proxy.c the forwarding.
 */
#ifndef TALLY_GATEWAY_H
#define TALLY_GATEWAY_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <curl/curl.h>
#include <microhttpd.h>
#include <sys/socket.h>

#include <tally/tally.h>

/* ---- priorities and the shedding decision (shed.c) ----------------------- */

enum gw_priority { GW_PRIO_CRITICAL = 0, GW_PRIO_DEFAULT = 1, GW_PRIO_SHEDDABLE = 2, GW_PRIO__COUNT };

/* "critical", "default", "sheddable"; the parse is case-insensitive: 0 or -1. */
const char *gw_priority_name(enum gw_priority p);
int gw_priority_parse(const char *s, enum gw_priority *out);

/* What the gateway knows about the subject when it decides. */
enum gw_level {
	GW_LEVEL_OK,          /* verdict ok */
	GW_LEVEL_WARN,        /* verdict warn: under pressure */
	GW_LEVEL_OVERLOAD,    /* verdict overload */
	GW_LEVEL_OPEN,        /* no usable verdict, and fail-open applies: admit */
	GW_LEVEL_CLOSED,      /* no usable verdict, and fail-closed applies: shed */
};

struct gw_shed_config {
	double warn_shed_fraction; /* default class at warn without shed_probability (0.25) */
	double overload_trickle;   /* admitted at overload without shed_probability (0.01) */
	double sheddable_factor;   /* sheddable shed with min(1, p x this) (2.0) */
	uint32_t retry_after_ms;   /* when the verdict gives none (fail-closed) (1000) */
	double retry_jitter;       /* Retry-After drawn in [r, r x (1 + this)] (0.5) */
	bool engine_probability;   /* shed by the engine's shed_probability when it gives one (true) */
};

void gw_shed_config_init(struct gw_shed_config *c);

struct gw_decision {
	bool admit;
	unsigned status;   /* 200 admit, 429 shed under pressure, 503 shed at overload or fail-closed */
	double p;          /* the probability this request had of being shed */
};

/*
 * The shedding decision, pure. shed_probability is the engine's when it
 * gives one (in [0, 1]), else a negative number: then warn sheds
 * warn_shed_fraction and overload sheds all but overload_trickle. The
 * class scales it: critical is shed only at overload (with p), default
 * with p, sheddable with min(1, p x sheddable_factor). u is uniform in
 * [0, 1): the request is shed when u < its probability.
 */
void gw_decide(const struct gw_shed_config *c, enum gw_level level, double shed_probability,
	       enum gw_priority prio, double u, struct gw_decision *out);

/* Retry-After in whole seconds (at least 1) for a hint of base_ms (0: the
 * config's): drawn in [base, base x (1 + retry_jitter)] by u, then rounded
 * to a whole second up or down by v (u, v uniform in [0, 1)). */
unsigned gw_retry_after_s(const struct gw_shed_config *c, uint32_t base_ms, double u, double v);

/* A per-thread xorshift: uniform in [0, 1). */
double gw_uniform(void);

/* ---- routes (route.c) ----------------------------------------------------- */

#define GW_METHODS_MAX 8

struct gw_route {
	char *name;          /* "METHOD PATH" as written in the section header */
	int line;
	char **methods;      /* NULL-terminated; NULL: any method */
	char *path;          /* pattern: literal segments, '*' one segment, a final '**' the rest */
	char *header_name;   /* NULL: no header condition */
	char *header_value;  /* NULL: the header's presence is enough */
	char *subject;
	enum gw_priority priority;
};

/* 0 if pattern is a valid path pattern, else -1 with *why set. */
int gw_path_pattern_check(const char *pattern, const char **why);

/* The path of a request target (uri: from its '/' to before any '?' or
 * '#') as nginx routes it: percent-decoded once (a decoded '/' divides
 * segments; '?' and '#' go back to %3F and %23, and %00 stays as it is),
 * slashes merged, "." and ".." resolved (never above the root), a
 * trailing '/' kept. out has room for 3 * strlen(uri) + 2 bytes. Pure. */
void gw_path_normalize(const char *uri, char *out);

/* Does the path (query excluded: stops at '?') match pattern? Pure. */
bool gw_path_match(const char *pattern, const char *path);

/* The first route that matches, or NULL. header(name) gives a request
 * header's value or NULL. */
struct gw_route *gw_route_find(struct gw_route *routes, size_t n, const char *method,
			       const char *path, const char *(*header)(void *ctx, const char *name),
			       void *ctx);

/* ---- configuration (config.c) -------------------------------------------- */

enum gw_mode { GW_MODE_CHECK, GW_MODE_PROXY };

struct gw_config {
	char *path;              /* the INI file, NULL: none */
	enum gw_mode mode;
	char *listen;            /* ADDR:PORT (127.0.0.1:8090) */
	char *segment;           /* (tally) */
	bool fail_closed;        /* no data at all sheds (503) instead of admitting */
	char *admin_prefix;      /* /_tally: metrics and health */
	uint32_t threads;        /* check mode's thread pool; 0: online CPUs */
	uint32_t connection_limit;
	uint32_t idle_timeout_s;
	char *priority_header;   /* X-Tally-Priority; "" : none */
	bool minimal_headers;    /* decision_headers = minimal: no route, subject or reason told */
	struct gw_shed_config shed;
	/* [check] */
	unsigned shed_status;    /* 403, or 0: native (429/503) */
	char *path_prefix;       /* stripped from the check request's path */
	char *uri_header;        /* X-Original-URI */
	char *method_header;     /* X-Original-Method */
	/* [proxy] */
	char *upstream;          /* http://HOST:PORT, no path */
	uint32_t connect_timeout_ms;
	uint32_t upstream_timeout_ms;
	uint32_t drain_timeout_ms;  /* on SIGTERM: how long requests in flight may finish */
	/* [route ...] in file order */
	struct gw_route *routes;
	size_t nroutes;
};

/* Command-line values; NULL: not given. */
struct gw_overrides {
	const char *mode, *listen, *segment, *upstream;
	bool fail_closed;
};

/*
 * Defaults, then the file (NULL: none), then ov. 0, or -1 with every error
 * of the file ("FILE:LINE: reason") in err.
 */
int gw_config_load(struct gw_config *cfg, const char *path, const struct gw_overrides *ov,
		   char *err, size_t errlen);
void gw_config_free(struct gw_config *cfg);

/* ---- reading the segment (judge.c) ----------------------------------------- */

struct gw_reader {
	const char *segment;
	bool fail_closed;
	char user[40];             /* this process's user, for "permission denied" */
	pthread_rwlock_t lock;     /* seg: read to use, write to (re)attach */
	struct tally_segment *seg;
	struct tally_remote_index *ix; /* seg's remote section by subject; NULL: read by the full scan */
	_Atomic uint64_t index_due_ns; /* its next refresh */
	_Atomic uint64_t next_open_ns;  /* no attach attempt before (CLOCK_MONOTONIC) */
	_Atomic uint64_t alive_checked_ns;
	atomic_int alive;          /* tally_segment_owner_alive(), cached for a while */
	atomic_int open_error;     /* last attach error, 0 none */
	atomic_bool failing;       /* in a no-data episode (logged once) */
};

struct gw_reading {
	enum gw_level level;
	enum tally_verdict verdict;
	uint32_t reasons;
	uint32_t retry_after_ms;
	double shed_probability;   /* < 0: the engine gives none */
	bool no_data;              /* no verdict read at all: fail_closed decides */
	const char *why;           /* no usable verdict: why */
	char whybuf[2 * TALLY_NAME_MAX + 200]; /* why, when it names the segment (twice) */
	char host[64];             /* "": the local verdict decided; else the other host whose did */
};

void gw_reader_init(struct gw_reader *r, const char *segment, bool fail_closed);
void gw_reader_close(struct gw_reader *r);

/* The level of subject now. Thread-safe; never blocks for long. */
void gw_read(struct gw_reader *r, const char *subject, struct gw_reading *out);

/* ---- the server (server.c, proxy.c) ---------------------------------------- */

#define GW_METRICS(X)                                                                        \
	X(admitted, "requests admitted with a verdict ok or warn")                           \
	X(shed_429, "requests shed with 429: the subject is under pressure (warn)")          \
	X(shed_503, "requests shed with 503: the subject is overloaded")                     \
	X(fail_open, "requests admitted without a usable verdict (fail-open)")               \
	X(fail_closed, "requests shed with 503 without a usable verdict (fail-closed)")      \
	X(unmapped, "requests that matched no route: admitted")                              \
	X(upstream_502, "proxy: the upstream could not be reached or failed (502)")          \
	X(upstream_504, "proxy: the upstream did not answer in time (504)")                  \
	X(connections, "client connections accepted (a proxy in front should keep them alive)")

struct gw_counters {
#define GW_FIELD(name, help) _Atomic uint64_t name;
	GW_METRICS(GW_FIELD)
#undef GW_FIELD
};

/* The unmapped requests seen last, distinct by "METHOD path" (the query
 * left out), with how many times each came: what `tally stat --gateway`
 * shows so that an operator sees which requests no route covers. */
#define GW_UNMAPPED_RECENT 16
struct gw_unmapped {
	pthread_mutex_t lock;        /* taken by unmapped requests only (gw_stats_init) */
	struct {
		char what[160];      /* "" : empty slot */
		uint64_t n;
	} e[GW_UNMAPPED_RECENT];
	unsigned next;               /* the slot the next new one replaces */
};

/* What a gateway counts: the totals, each route's, the recent unmapped
 * requests. tally-gateway keeps it in its own memory; the nginx module in
 * a shared zone that every worker writes, so that its ADMIN_PREFIX/routes
 * and /metrics (tally_status) count the whole nginx, not the worker that
 * answers. Hence one block, sized by the routes (gw_stats_size), with a
 * lock that works between processes and outlives one that died holding it
 * (report.c). */
struct gw_route_count {
	_Atomic uint64_t admitted, shed;
};

struct gw_stats {
	struct gw_counters n;
	struct gw_unmapped unmapped;
	uint32_t nroutes;
	struct gw_route_count route[]; /* [nroutes]: cfg->routes[i]'s */
};

struct gw {
	struct gw_config *cfg;
	struct gw_reader reader;
	struct gw_stats *st;
	size_t admin_len;
	_Atomic long inflight;   /* requests begun (request line read) and not completed */
	_Atomic bool draining;   /* stopping: answers close their connections */
};

/* ---- the counts and their reports (report.c) ------------------------------- */

size_t gw_stats_size(size_t nroutes);

/* Zero st for nroutes routes and make its lock: between processes when
 * pshared (the module's zone), with one that died holding it recovered.
 * 0 or an errno. */
int gw_stats_init(struct gw_stats *st, size_t nroutes, bool pshared);

/* Count an unmapped request. */
void gw_unmapped_note(struct gw_unmapped *u, const char *method, const char *uri);

/* ADMIN_PREFIX/metrics as Prometheus text, and ADMIN_PREFIX/routes as
 * JSON (docs/json-schema.md "gateway"; mode: "check", "proxy" or
 * "module"); malloc'd, NULL when out of memory. */
char *gw_metrics_text(const struct gw *g);
char *gw_routes_json(const struct gw *g, const char *mode);

/* Per request: what route, read and decide said. */
struct gw_outcome {
	struct gw_route *route;      /* NULL: unmapped */
	const char *subject;
	enum gw_priority priority;
	struct gw_reading rd;
	struct gw_decision d;
	unsigned retry_after_s;
	bool minimal;                /* the headers: decision_headers = minimal */
};

/* Route, read and decide for method and uri (a path as gw_path_normalize
 * gives it, or a target that does not start with '/', unmapped); counts it
 * (evaluate.c). */
void gw_evaluate(struct gw *g, const char *method, const char *uri,
		 const char *(*header)(void *ctx, const char *name), void *ctx,
		 struct gw_outcome *o);

/* The X-Tally-* headers (and Retry-After on a shed) of an outcome, each
 * through add(ctx, name, value), in a fixed order; with decision_headers
 * = minimal, only a shed's status, Retry-After and X-Tally-No-Retry, and
 * fail-open or -closed as "1" (evaluate.c). */
void gw_decision_headers(const struct gw_outcome *o, void (*add)(void *ctx, const char *name, const char *value),
			 void *ctx);

/* The same on a libmicrohttpd response (server.c). */
void gw_add_decision_headers(struct MHD_Response *resp, const struct gw_outcome *o);

/* What every answer of the gateway gets: while it drains, Connection:
 * close, so that a kept-alive client goes elsewhere for its next request. */
void gw_response_common(struct gw *g, struct MHD_Response *resp);

/* libmicrohttpd's messages into the gateway's log, one line each. */
__attribute__((format(printf, 2, 0))) void gw_mhd_log(void *cls, const char *fmt, va_list ap);

/* Run until SIGINT/SIGTERM: 0, or an exit status after a line on stderr. */
int gw_serve(struct gw *g);

/* ---- proxy mode: the event loops (loop.c) and the requests (proxy.c) ---- */

/* One loop: a thread, its libmicrohttpd daemon, its curl multi handle and
 * the epoll set of both (loop.c's header). Touched by its thread only,
 * but for start and stop. */
struct gw_loop {
	struct gw *g;
	pthread_t thread;
	struct MHD_Daemon *d;
	CURLM *multi;
	int ep, mhd_fd, stop_fd, drain_fd;
	bool quiesced;                /* draining: its listening socket is closed */
	uint64_t curl_due;            /* when curl's timer fires (gw_now_ns), 0: not set */
	uint64_t next_scan;           /* the next deadline scan */
	bool kick;                    /* a request was resumed: run libmicrohttpd */
	bool tearing_down;            /* stopping: nothing suspends any more */
	struct gw_proxy_req *waiting; /* the suspended requests (each waits for the upstream) */
	struct gw_fd *fds;            /* [nfds]: curl's sockets by number (loop.c, on_socket) */
	size_t nfds;
};

struct gw_fd {
	bool ours;       /* opened by gw_loop_open_socket, not closed since */
	bool registered; /* in the epoll set, for events */
	uint32_t events;
	uint32_t want;   /* what curl asked for last; 0: let go (maybe still registered) */
};

/* CURLOPT_OPENSOCKETFUNCTION and CURLOPT_CLOSESOCKETFUNCTION of every
 * transfer (clientp: its loop), so the loop knows a socket's number is
 * new or gone. */
curl_socket_t gw_loop_open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *a);
int gw_loop_close_socket(void *clientp, curl_socket_t fd);

/* What every loop's daemon is started with (server.c fills it in). */
struct gw_daemon_options {
	unsigned flags;                       /* besides MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME */
	const struct sockaddr_storage *addr;
	MHD_AccessHandlerCallback on_request; /* cls: the struct gw */
	void *(*on_uri)(void *cls, const char *uri, struct MHD_Connection *c);
	MHD_RequestCompletedCallback on_completed;
	MHD_NotifyConnectionCallback on_connection; /* cls: the struct gw_loop */
	unsigned connection_limit, idle_timeout_s;
	size_t memory;
};

/* n loops, running: 0, or -1 with errno (none left running). */
int gw_loops_start(struct gw *g, struct gw_loop *loops, unsigned n, const struct gw_daemon_options *o);
/* They take no new connection (each closes its listening socket); the
 * connections they have go on. */
void gw_loops_quiesce(struct gw_loop *loops, unsigned n);
/* Stops them: what is suspended fails, every connection is closed. */
void gw_loops_stop(struct gw_loop *loops, unsigned n);

struct gw_proxy_req;
int gw_proxy_global_init(void);
/* A client connection's forwarding state (its curl handle), on loop l. */
void *gw_proxy_conn_new(struct gw_loop *l);
void gw_proxy_conn_free(void *conn);
/* The access handler's work for an admitted request (MHD_YES or MHD_NO). */
int gw_proxy_handle(struct gw *g, void *conn, struct MHD_Connection *c, struct gw_proxy_req **pr,
		    const char *method, const char *uri, const char *upload, size_t *upload_size,
		    const struct gw_outcome *o);
void gw_proxy_req_free(struct gw_proxy_req *pr);
/* For loop.c: curl finished easy's transfer; the deadlines at now; stop. */
void gw_proxy_transfer_done(struct gw_loop *l, CURL *easy, CURLcode result);
void gw_proxy_expire(struct gw_loop *l, uint64_t now);
void gw_proxy_teardown(struct gw_loop *l);

/* ---- shared CLI helpers (cli.c) --------------------------------------------- */

/* A line to stderr, "TIME tally-gateway: ...", or to gw_log_sink when set
 * (the nginx module: nginx's error_log). */
__attribute__((format(printf, 1, 2))) void gw_log(const char *fmt, ...);
extern void (*gw_log_sink)(const char *line);
struct sockaddr_storage;
/* IPV4:PORT or [IPV6]:PORT into ss: 0, or -1 with why. */
int gw_parse_listen(const char *s, struct sockaddr_storage *ss, char *why, size_t whylen);
uint64_t gw_now_ns(void);

#endif /* TALLY_GATEWAY_H */
