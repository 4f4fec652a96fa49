/* SPDX-License-Identifier: MIT */
/*
 * gw_upstream.c: the upstream the gateway's tests and benchmark put
 * behind tally-gateway and nginx: a small libmicrohttpd server on
 * 127.0.0.1:PORT (argv[1]), a thread per connection, that reads every
 * body to the end and answers
 *
 *   /_count[/PATH]   how many requests it has seen (for PATH only), the
 *                    /_count requests themselves not counted
 *   /_big/N          N bytes of gw_pattern() (streamed), for any method
 *   /_slow/MS        the usual answer after MS milliseconds
 *   /_hello          "hello\n": the smallest answer, for the benchmark
 *   /_headers        the request's headers, a "Name: value" line each
 *   /_many/N         an answer with N headers X-H1: 1 .. X-HN: N, and
 *                    "Connection: X-Secret" with "X-Secret: hop" (a
 *                    header its Connection names: a proxy drops it)
 *   anything else    "METHOD PATH len=N fnv=HEX te=chunked|- cl=N|-\n":
 *                    what it received, with the FNV-1a 64 of the body
 *
 * Stops on SIGTERM or SIGINT. Not installed.
 */
#include "config.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gw_pattern.h"

#define MAX_PATHS 256

static struct {
	char path[128];
	_Atomic uint64_t n;
} counts[MAX_PATHS];
static _Atomic uint64_t total;
static pthread_mutex_t counts_lock = PTHREAD_MUTEX_INITIALIZER;

struct req {
	uint64_t len, fnv;
};

static void count(const char *path)
{
	atomic_fetch_add(&total, 1);
	pthread_mutex_lock(&counts_lock);
	for (int i = 0; i < MAX_PATHS; i++) {
		if (!counts[i].path[0])
			snprintf(counts[i].path, sizeof(counts[i].path), "%s", path);
		if (strcmp(counts[i].path, path) == 0) {
			atomic_fetch_add(&counts[i].n, 1);
			break;
		}
	}
	pthread_mutex_unlock(&counts_lock);
}

static uint64_t count_of(const char *path)
{
	uint64_t n = 0;

	pthread_mutex_lock(&counts_lock);
	for (int i = 0; i < MAX_PATHS && counts[i].path[0]; i++)
		if (strcmp(counts[i].path, path) == 0)
			n = counts[i].n;
	pthread_mutex_unlock(&counts_lock);
	return n;
}

static enum MHD_Result text(struct MHD_Connection *c, unsigned status, const char *s)
{
	struct MHD_Response *r = MHD_create_response_from_buffer(strlen(s), (void *)s, MHD_RESPMEM_MUST_COPY);
	enum MHD_Result ret = MHD_queue_response(c, status, r);

	MHD_destroy_response(r);
	return ret;
}

static ssize_t big_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
	uint64_t n = *(uint64_t *)cls;

	if (pos >= n)
		return MHD_CONTENT_READER_END_OF_STREAM;
	if (max > n - pos)
		max = (size_t)(n - pos);
	gw_pattern_fill(buf, pos, max);
	return (ssize_t)max;
}

static enum MHD_Result header_line(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
	(void)kind;
	fprintf(cls, "%s: %s\n", key, value ? value : "");
	return MHD_YES;
}

static enum MHD_Result headers_echo(struct MHD_Connection *c)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (!f)
		return MHD_NO;
	MHD_get_connection_values(c, MHD_HEADER_KIND, header_line, f);
	fclose(f);
	struct MHD_Response *r = MHD_create_response_from_buffer(len, buf, MHD_RESPMEM_MUST_FREE);
	enum MHD_Result ret = MHD_queue_response(c, 200, r);
	MHD_destroy_response(r);
	return ret;
}

static enum MHD_Result many_headers(struct MHD_Connection *c, unsigned n)
{
	struct MHD_Response *r = MHD_create_response_from_buffer(3, (void *)"ok\n", MHD_RESPMEM_PERSISTENT);
	char name[32], value[32];

	for (unsigned i = 1; i <= n; i++) {
		snprintf(name, sizeof(name), "X-H%u", i);
		snprintf(value, sizeof(value), "%u", i);
		MHD_add_response_header(r, name, value);
	}
	MHD_add_response_header(r, "Connection", "X-Secret");
	MHD_add_response_header(r, "X-Secret", "hop");
	enum MHD_Result ret = MHD_queue_response(c, 200, r);
	MHD_destroy_response(r);
	return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
				  const char *method, const char *version, const char *upload,
				  size_t *upload_size, void **req_cls)
{
	struct req *q = *req_cls;
	char line[512];

	(void)cls;
	(void)version;
	if (!q) {
		if (!(q = calloc(1, sizeof(*q))))
			return MHD_NO;
		q->fnv = GW_FNV_INIT;
		*req_cls = q;
		return MHD_YES;
	}
	if (*upload_size) {
		q->fnv = gw_fnv(q->fnv, upload, *upload_size);
		q->len += *upload_size;
		*upload_size = 0;
		return MHD_YES;
	}
	if (strncmp(url, "/_count", 7) == 0) {
		snprintf(line, sizeof(line), "%" PRIu64 "\n", url[7] ? count_of(url + 7) : atomic_load(&total));
		return text(c, 200, line);
	}
	count(url);
	if (strncmp(url, "/_big/", 6) == 0) {
		uint64_t *n = malloc(sizeof(*n));
		if (!n)
			return MHD_NO;
		*n = strtoull(url + 6, NULL, 10);
		struct MHD_Response *r = MHD_create_response_from_callback(*n, 64 * 1024, big_reader, n, free);
		enum MHD_Result ret = MHD_queue_response(c, 200, r);
		MHD_destroy_response(r);
		return ret;
	}
	if (strcmp(url, "/_hello") == 0)
		return text(c, 200, "hello\n");
	if (strcmp(url, "/_headers") == 0)
		return headers_echo(c);
	if (strncmp(url, "/_many/", 7) == 0)
		return many_headers(c, (unsigned)strtoul(url + 7, NULL, 10));
	if (strncmp(url, "/_slow/", 7) == 0)
		usleep((useconds_t)strtoul(url + 7, NULL, 10) * 1000);
	const char *te = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Transfer-Encoding");
	const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
	snprintf(line, sizeof(line), "%s %s len=%" PRIu64 " fnv=%016" PRIx64 " te=%s cl=%s\n", method, url,
		 q->len, q->fnv, te ? te : "-", cl ? cl : "-");
	return text(c, 200, line);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **req_cls,
			 enum MHD_RequestTerminationCode toe)
{
	(void)cls;
	(void)c;
	(void)toe;
	free(*req_cls);
	*req_cls = NULL;
}

int main(int argc, char **argv)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	sigset_t set;
	int sig;

	if (argc != 2 || atoi(argv[1]) <= 0 || atoi(argv[1]) > 65535) {
		fprintf(stderr, "usage: gw_upstream PORT (listens on 127.0.0.1:PORT)\n");
		return 2;
	}
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sa.sin_port = htons((uint16_t)atoi(argv[1]));
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	struct MHD_Daemon *d = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
						MHD_USE_POLL | MHD_USE_ERROR_LOG, 0, NULL, NULL, on_request,
						NULL, MHD_OPTION_SOCK_ADDR, &sa,
						MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL,
						MHD_OPTION_CONNECTION_LIMIT, 2048u,
						MHD_OPTION_CONNECTION_TIMEOUT, 60u, MHD_OPTION_END);
	if (!d) {
		fprintf(stderr, "gw_upstream: cannot listen on 127.0.0.1:%s\n", argv[1]);
		return 4;
	}
	while (sigwait(&set, &sig) != 0)
		;
	MHD_stop_daemon(d);
	return 0;
}
