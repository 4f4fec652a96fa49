/* SPDX-License-Identifier: MIT */
/*
 * gateway.c: tally-gateway, the intended integration of a gateway in
 * front of a router, in one small program. It attaches to the router's
 * segment read-only and answers every HTTP request for a subject from the
 * subject's verdict:
 *
 *   POST|GET /SUBJECT   200 "accepted"         verdict ok or warn (warn is
 *                                              said in X-Tally-Verdict)
 *                       503 + Retry-After      verdict overload (X-Tally-Reasons
 *                                              says why: latency, pending,
 *                                              stalled, ...)
 *                       503 + X-Tally-Fail-Closed  unknown because pending
 *                                              data is stale and the subject's
 *                                              rule says stale_policy =
 *                                              fail-closed; with --fail-closed
 *                                              also no data at all (no
 *                                              segment, owner dead, no row)
 *                       200 + X-Tally-Fail-Open  otherwise unknown, stale data,
 *                                              owner dead, no segment: the
 *                                              gateway fails open, says so
 *                       400                    not a valid NATS subject
 *
 * A dead owner never makes the gateway reject or stop answering: it logs
 * once that it is failing open and re-attaches when a new owner has
 * created the segment again. One verdict read costs a few tens of ns.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <microhttpd.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <tally/tally.h>

struct gateway {
	const char *segment;
	pthread_mutex_t lock; /* guards seg: requests run on MHD's threads */
	struct tally_segment *seg;
	bool failing_open;    /* logged once per episode */
	bool fail_closed;     /* --fail-closed: no data at all sheds too */
	_Atomic uint64_t accepted, rejected, fail_open, fail_closed_n;
};

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

__attribute__((format(printf, 1, 2)))
static void logf_(const char *fmt, ...)
{
	char ts[32];
	time_t t = time(NULL);
	struct tm tm;
	va_list ap;

	strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&t, &tm));
	fprintf(stderr, "%s tally-gateway: ", ts);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static const char verdict_unknown[] = "verdict unknown";

/* The verdict for subject, or a fail-open reason. Called with g->lock held. */
static enum tally_verdict judge(struct gateway *g, const char *subject, struct tally_subject_stats *s,
				const char **why)
{
	tally_subject_t id;
	int rc;

	*why = NULL;
	if (g->seg && tally_segment_owner_alive(g->seg) == TALLY_EREPLACED)
		tally_segment_close(&g->seg); /* a new owner: attach to the new segment */
	if (!g->seg && tally_segment_open(g->segment, TALLY_OPEN_READER, 0, &g->seg) != 0) {
		*why = "no segment (is the router's owner running?)";
		return TALLY_VERDICT_UNKNOWN;
	}
	if ((rc = tally_subject_lookup(g->seg, subject, &id)) != 0 ||
	    (rc = tally_read_subject(g->seg, id, s)) == -ENOENT) {
		*why = "no data for this subject yet";
		return TALLY_VERDICT_UNKNOWN;
	}
	if (rc == TALLY_ESTALE || tally_segment_owner_alive(g->seg) != 1) {
		*why = "the router's owner is not alive: data is stale";
		return TALLY_VERDICT_UNKNOWN;
	}
	if (rc != 0) {
		*why = tally_strerror(rc);
		return TALLY_VERDICT_UNKNOWN;
	}
	if (s->verdict == TALLY_VERDICT_UNKNOWN)
		*why = verdict_unknown;
	return s->verdict;
}

static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, const char *body,
			     const char *verdict, const char *retry_after, const char *no_data,
			     const char *reasons)
{
	struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), (void *)body,
								 MHD_RESPMEM_MUST_COPY);
	if (!r)
		return MHD_NO;
	MHD_add_response_header(r, "Content-Type", "text/plain; charset=utf-8");
	MHD_add_response_header(r, "X-Tally-Verdict", verdict);
	if (retry_after)
		MHD_add_response_header(r, "Retry-After", retry_after);
	if (no_data) /* 200: the gateway admits without data; 503: it sheds without */
		MHD_add_response_header(r, status == MHD_HTTP_OK ? "X-Tally-Fail-Open" : "X-Tally-Fail-Closed",
					no_data);
	if (reasons && *reasons)
		MHD_add_response_header(r, "X-Tally-Reasons", reasons);
	enum MHD_Result ret = MHD_queue_response(c, status, r);
	MHD_destroy_response(r);
	return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
				  const char *method, const char *version, const char *upload_data,
				  size_t *upload_data_size, void **con_cls)
{
	struct gateway *g = cls;
	struct tally_subject_stats s;
	const char *why;
	char body[256], retry[16], reasons[96] = "";

	(void)method;
	(void)version;
	(void)upload_data;
	if (*con_cls == NULL) { /* first call: headers only */
		*con_cls = g;
		return MHD_YES;
	}
	*upload_data_size = 0; /* the body is not ours to read: intake is simulated */
	const char *subject = url[0] == '/' ? url + 1 : url;
	if (tally_subject_validate(subject, false) != 0) {
		snprintf(body, sizeof(body), "bad subject: %s\n", tally_errmsg());
		return reply(c, MHD_HTTP_BAD_REQUEST, body, "unknown", NULL, NULL, NULL);
	}
	pthread_mutex_lock(&g->lock);
	enum tally_verdict v = judge(g, subject, &s, &why);
	bool was_failing = g->failing_open;
	g->failing_open = why && (strstr(why, "owner") || strstr(why, "segment"));
	pthread_mutex_unlock(&g->lock);
	if (g->failing_open && !was_failing)
		logf_("failing open: %s (%s)", why, g->segment);
	else if (!g->failing_open && was_failing)
		logf_("segment %s is live again", g->segment);
	if (v != TALLY_VERDICT_UNKNOWN || why == verdict_unknown) /* s was read: say why */
		tally_reasons_format(s.reasons, reasons, sizeof(reasons));
	/* fail-closed: the rule said so (stale pending data, judged unknown
	 * without the fail-open reason), or the operator did for no data */
	bool closed_by_rule = why == verdict_unknown && (s.reasons & TALLY_REASON_STALE) &&
			      !(s.reasons & TALLY_REASON_FAIL_OPEN);
	if (closed_by_rule || (why && why != verdict_unknown && g->fail_closed)) {
		const char *cause = closed_by_rule ? "pending data is stale and stale_policy = fail-closed"
						   : why;
		snprintf(retry, sizeof(retry), "%u", s.retry_after_ms > 1000 && closed_by_rule
			 ? (s.retry_after_ms + 999) / 1000 : 1u);
		snprintf(body, sizeof(body), "shed (fail-closed: %s): retry after %s s\n", cause, retry);
		atomic_fetch_add(&g->fail_closed_n, 1);
		return reply(c, MHD_HTTP_SERVICE_UNAVAILABLE, body, "unknown", retry, cause, reasons);
	}
	if (v == TALLY_VERDICT_OVERLOAD) {
		unsigned secs = (s.retry_after_ms + 999) / 1000;
		snprintf(retry, sizeof(retry), "%u", secs ? secs : 1);
		snprintf(body, sizeof(body), "overloaded: retry after %s s\n", retry);
		atomic_fetch_add(&g->rejected, 1);
		return reply(c, MHD_HTTP_SERVICE_UNAVAILABLE, body, "overload", retry, NULL, reasons);
	}
	atomic_fetch_add(why ? &g->fail_open : &g->accepted, 1);
	snprintf(body, sizeof(body), "accepted%s%s\n", why ? " (fail-open: " : "", why ? why : "");
	if (why)
		strcat(body + strlen(body) - 1, ")\n");
	return reply(c, MHD_HTTP_OK, body, tally_verdict_name(v), NULL, why, reasons);
}

static void usage(FILE *to)
{
	fprintf(to, "usage: tally-gateway [-s SEGMENT] [--listen ADDR:PORT] [--fail-closed]\n"
		    "Answers POST|GET /SUBJECT with 200, or 503 + Retry-After when the router's\n"
		    "verdict for SUBJECT is overload, or unknown on stale pending data under\n"
		    "stale_policy = fail-closed (X-Tally-Fail-Closed says so); otherwise fails\n"
		    "open (200 + X-Tally-Fail-Open) when the verdict is unknown or its owner is\n"
		    "not alive.\n"
		    "  -s, --segment NAME   segment (default $TALLY_SEGMENT, else \"tally\")\n"
		    "  -l, --listen A:P     address (default 127.0.0.1:8080)\n"
		    "      --fail-closed    shed (503) when there is no data at all too: no\n"
		    "                       segment, its owner dead, no row for the subject\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "segment", required_argument, NULL, 's' }, { "listen", required_argument, NULL, 'l' },
		{ "fail-closed", no_argument, NULL, 'C' }, { "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct gateway g = { .segment = getenv("TALLY_SEGMENT") };
	const char *listen = "127.0.0.1:8080";
	struct sockaddr_in sa = { .sin_family = AF_INET };
	int c;

	while ((c = getopt_long(argc, argv, "s:l:h", opts, NULL)) != -1) {
		switch (c) {
		case 's': g.segment = optarg; break;
		case 'l': listen = optarg; break;
		case 'C': g.fail_closed = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (!g.segment || !*g.segment)
		g.segment = "tally";
	char host[64];
	unsigned port;
	if (sscanf(listen, "%63[^:]:%u", host, &port) != 2 || port > 65535 ||
	    inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
		fprintf(stderr, "tally-gateway: --listen wants IPv4:PORT, e.g. 127.0.0.1:8080, not \"%s\"\n", listen);
		return 2;
	}
	sa.sin_port = htons((uint16_t)port);
	pthread_mutex_init(&g.lock, NULL);
	struct MHD_Daemon *d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, 0,
						NULL, NULL, on_request, &g, MHD_OPTION_SOCK_ADDR, &sa,
						MHD_OPTION_CONNECTION_LIMIT, 256u,
						MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
	if (!d) {
		fprintf(stderr, "tally-gateway: cannot listen on %s: %s\n", listen, strerror(errno));
		return 4;
	}
	struct sigaction act = { .sa_handler = on_signal };
	sigaction(SIGINT, &act, NULL);
	sigaction(SIGTERM, &act, NULL);
	logf_("listening on %s, segment %s", listen, g.segment);
	while (!stop)
		pause();
	MHD_stop_daemon(d);
	pthread_mutex_lock(&g.lock);
	tally_segment_close(&g.seg);
	pthread_mutex_unlock(&g.lock);
	fprintf(stderr, "tally-gateway: %llu accepted, %llu rejected (503), %llu failed open, "
			"%llu shed fail-closed (503)\n",
		(unsigned long long)g.accepted, (unsigned long long)g.rejected,
		(unsigned long long)g.fail_open, (unsigned long long)g.fail_closed_n);
	return 0;
}
