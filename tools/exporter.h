/* SPDX-License-Identifier: MIT */
/*
 * exporter.h: tallyd's Prometheus endpoint. An HTTP server (libmicrohttpd,
 * one internal polling thread) that answers GET and HEAD /metrics with the
 * text exposition format (version 0.0.4) of the families in metrics.def,
 * read in-process: subjects through tally_engine_read() and
 * tally_engine_read_buckets() (RCU, no locks), producers, consumers and
 * the poller through the segment.
 *
 * Hardening: binds 127.0.0.1:9464 unless told otherwise; any other path is
 * 404, any other method on /metrics 405 (with Allow: GET, HEAD); at most
 * TALLYD_HTTP_MAX_CONN connections, each with TALLYD_HTTP_MEM_LIMIT bytes
 * for its request (larger headers get 431) and an idle timeout of
 * TALLYD_HTTP_TIMEOUT_S; request bodies are never read. libmicrohttpd's
 * own messages (one per malformed request) are rate-limited: the first of
 * a minute is logged, the rest summed up in one line.
 *
 * Options, as Prometheus exporters have them (struct tallyd_http_opts):
 * TLS from a PEM certificate and key (GnuTLS inside libmicrohttpd), HTTP
 * basic authentication against bcrypt hashes (crypt(3), libxcrypt), gzip
 * when the scraper accepts it, and fewer series per subject: no since-start
 * histogram, or a histogram with only the bounds asked for.
 */
#ifndef TALLYD_EXPORTER_H
#define TALLYD_EXPORTER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <tally/tally.h>

#define TALLYD_HTTP_DEFAULT_LISTEN "127.0.0.1:9464"
#define TALLYD_HTTP_MAX_CONN 64
#define TALLYD_HTTP_MEM_LIMIT (32u * 1024u)
#define TALLYD_HTTP_TIMEOUT_S 10u
#define TALLYD_HTTP_MAX_BUCKETS 32
#define TALLYD_HTTP_MAX_USERS 8
#define TALLYD_HTTP_LOG_EVERY_S 60
/* zlib level of gzipped scrapes (BENCHMARKS.md, "/metrics size and gzip") */
#define TALLYD_HTTP_GZIP_LEVEL 1

/* One basic-auth user: name and a bcrypt hash ($2a$, $2b$ or $2y$). */
struct tallyd_http_user {
	char name[64];
	char hash[128];
};

/* How /metrics is served; strings owned by the caller (tallyd_config). */
struct tallyd_http_opts {
	const char *listen;            /* ADDR:PORT */
	bool histogram;                /* false: window quantiles only, no _bucket/_sum/_count */
	uint64_t bucket_ns[TALLYD_HTTP_MAX_BUCKETS]; /* nbuckets 0: two bounds per octave */
	uint32_t nbuckets;
	const char *tls_cert_file, *tls_key_file;   /* both or neither */
	struct tallyd_http_user users[TALLYD_HTTP_MAX_USERS];
	uint32_t nusers;               /* 0: no authentication */
};

/* Defaults: TALLYD_HTTP_DEFAULT_LISTEN, the full histogram, no TLS, no users. */
void tallyd_http_opts_init(struct tallyd_http_opts *o);

/*
 * Check one "NAME:BCRYPT_HASH" entry into *u: 0, or -EINVAL with the
 * reason in why (not a bcrypt hash, one that crypt(3) rejects). Pure.
 */
int tallyd_http_user_parse(const char *entry, struct tallyd_http_user *u, char *why,
			   size_t whylen);

/* Whether this libmicrohttpd was built with TLS (Debian's is, with GnuTLS). */
bool tallyd_http_tls_supported(void);

/* What the exporter reads. Owned by the caller; must outlive the exporter. */
struct tallyd_exporter_source {
	struct tally_segment *seg;
	struct tally_engine *engine;
	atomic_bool poller_on;     /* export the poller families (set on reload) */
};

/*
 * Parse "ADDR:PORT" ("127.0.0.1:9464", "[::1]:9464", "*:9464" for every
 * IPv4 address, port 0 for any free port) into *ss. 0, or -EINVAL with the
 * reason in why. Pure function.
 */
int tallyd_parse_listen(const char *s, struct sockaddr_storage *ss, socklen_t *sslen,
			char *why, size_t whylen);

/*
 * Render every metric family into a malloc'd, NUL-terminated buffer
 * (*out, *len without the NUL; the caller frees). 0 or -ENOMEM. Called
 * from the HTTP thread; reads only: thread-safe against the engine.
 */
int tallyd_metrics_render(struct tallyd_exporter_source *src, const struct tallyd_http_opts *o,
			  char **out, size_t *len);

struct tallyd_exporter;

/* Log sink of the exporter: level 0 error, 1 warning, 2 info, 3 debug. */
typedef void (*tallyd_log_fn)(int level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/*
 * Start serving as o says (copied). 0, or a negative errno with the reason
 * in why: a bad address; -EADDRINUSE naming the address and port another
 * process listens on; a certificate or key that cannot be read or that
 * TLS rejects. Does not block. The caller must have blocked the signals it
 * handles before: the HTTP thread inherits the mask.
 */
int tallyd_exporter_start(const struct tallyd_http_opts *o, struct tallyd_exporter_source *src,
			  tallyd_log_fn log, struct tallyd_exporter **out, char *why, size_t whylen);

/* The port actually bound (useful with port 0). */
uint16_t tallyd_exporter_port(const struct tallyd_exporter *x);

/* Stop the server (waits for its thread), free, NULL *x. Idempotent. */
void tallyd_exporter_stop(struct tallyd_exporter **x);

#endif /* TALLYD_EXPORTER_H */
