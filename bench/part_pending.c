/* SPDX-License-Identifier: MIT */
/*
 * part_pending.c: what a refresh of the pending table costs, by
 * CONSUMER.LIST paging (one request per 256 consumers, what the poller does
 * for a watched stream) against one CONSUMER.INFO per consumer (what it
 * does for explicit pairs), for each --consumers count (the consumer
 * sweep, default 10, 100, 1,000). Both sides go through the real poller
 * (tally__poller_poll_once in manual mode: the request, the reply decoding,
 * the seqlocked writes into a pending table) against one nats-server this
 * part starts on loopback (tests/common/nats_server.c), in the same run,
 * repetitions interleaved so that drift hits both sides alike. The LIST row
 * names the INFO row as its baseline, so the table shows INFO/LIST; the
 * target is LIST <= 1/10 of INFO at 1,000 consumers. A reference row times
 * cnats' js_Consumers on the same pages: it decodes every field into
 * allocated objects, which is why the poller reads the replies itself.
 * (Folded in from the former standalone bench_poller.c.)
 */
#include "config.h"

#include <errno.h>
#include <nats/nats.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "nats_server.h"
#include "pending.h"
#include "poller.h"

#define PART "pending"
#define S_LIST "CONSUMER.LIST paging (poller)"
#define S_INFO "one INFO per consumer (poller)"
#define S_CNATS "cnats js_Consumers, full decoding"

struct side {
	struct tally__poller *p;
	void *section;
	double ms[256];
	uint64_t requests;
};

static bool failed;

static void fail(const char *what, const char *detail)
{
	fprintf(stderr, "tally-bench: pending: %s: %s\n", what, detail);
	failed = true;
}

static void quiet_log(void *ctx, int level, const char *msg)
{
	(void)ctx;
	if (level <= 1)
		fprintf(stderr, "tally-bench: poller: %s\n", msg);
}

static bool ok(natsStatus s, const char *what)
{
	if (s != NATS_OK)
		fail(what, natsStatus_GetText(s));
	return s == NATS_OK;
}

/* A stream with `consumers` durable consumers and a few messages. */
static bool make_stream(jsCtx *js, const char *name, const char *subject, int consumers)
{
	jsStreamConfig sc;
	jsErrCode ec = 0;
	char durable[32];

	jsStreamConfig_Init(&sc);
	sc.Name = name;
	sc.Subjects = &subject;
	sc.SubjectsLen = 1;
	if (!ok(js_AddStream(NULL, js, &sc, NULL, &ec), "add stream"))
		return false;
	for (int i = 0; i < consumers; i++) {
		jsConsumerConfig cc;

		jsConsumerConfig_Init(&cc);
		snprintf(durable, sizeof(durable), "c%05d", i);
		cc.Durable = durable;
		cc.AckPolicy = js_AckExplicit;
		if (!ok(js_AddConsumer(NULL, js, name, &cc, NULL, &ec), "add consumer"))
			return false;
	}
	for (int i = 0; i < 10; i++)
		if (!ok(js_Publish(NULL, js, subject, "x", 1, NULL, &ec), "publish"))
			return false;
	return true;
}

/* A manual poller on its own table: the whole stream, or one pair per consumer. */
static bool side_start(struct side *sd, const char *url, const char *stream, int consumers, bool pairs)
{
	size_t n = pairs ? (size_t)consumers : 1, len = tally__pending_section_size((uint32_t)consumers + 8);
	struct tally_poller_watch *w = calloc(n, sizeof(*w));
	char (*names)[32] = calloc(n, 32);
	struct tally_poller_config cfg = { .urls = url, .manual = true, .request_timeout_ms = 5000,
					   .log = quiet_log, .breaker_threshold = 1000000 };
	int rc;

	sd->section = aligned_alloc(64, (len + 63) & ~(size_t)63);
	if (!w || !names || !sd->section || tally__pending_init(sd->section, len, (uint32_t)consumers + 8))
		abort();
	for (size_t i = 0; i < n; i++) {
		snprintf(names[i], 32, "c%05zu", i);
		w[i] = (struct tally_poller_watch){ .stream = stream, .consumer = pairs ? names[i] : NULL };
	}
	cfg.watches = w;
	cfg.nwatches = n;
	rc = tally__poller_start(&cfg, sd->section, len, (uint32_t)consumers + 8, &sd->p);
	free(w);
	free(names);
	if (rc < 0)
		fail("poller start", strerror(-rc));
	return rc >= 0;
}

static void side_stop(struct side *sd)
{
	if (sd->p)
		tally__poller_stop(&sd->p);
	free(sd->section);
	sd->section = NULL;
}

/* One refresh in ms, or -1 when it failed. */
static double time_poll(struct side *sd)
{
	struct tally__poller_stats st;
	uint64_t t0 = tally__pending_now_ns();
	int rc = tally__poller_poll_once(sd->p);
	double ms = (double)(tally__pending_now_ns() - t0) / 1e6;

	if (rc < 0) {
		fail("poll", strerror(-rc));
		return -1;
	}
	tally__poller_stats(sd->p, &st);
	sd->requests = st.last_requests;
	return ms;
}

/* The reference the poller does not use: js_Consumers pages the same way but decodes all. */
static double time_cnats(jsCtx *js, const char *stream)
{
	jsConsumerInfoList *list = NULL;
	jsErrCode ec = 0;
	uint64_t t0 = tally__pending_now_ns();

	if (!ok(js_Consumers(&list, js, stream, NULL, &ec), "js_Consumers"))
		return -1;
	jsConsumerInfoList_Destroy(list);
	return (double)(tally__pending_now_ns() - t0) / 1e6;
}

static void emit(int n, const struct side *list, const struct side *info, const double *cnats)
{
	char r_list[72], r_info[72], r_cnats[72];
	int reps = bench_opts.reps;

	snprintf(r_info, sizeof(r_info), "one INFO per consumer, %d consumers", n);
	snprintf(r_list, sizeof(r_list), "LIST paging, %d consumers", n);
	snprintf(r_cnats, sizeof(r_cnats), "cnats js_Consumers (ref.), %d consumers", n);
	bench_row_series(PART, S_INFO, r_info, "ms", false, info->ms, reps, NULL, n);
	bench_row_series(PART, S_LIST, r_list, "ms", false, list->ms, reps, r_info, n);
	bench_row_series(PART, S_CNATS, r_cnats, "ms", false, cnats, reps, r_info, n);
	printf("  %-8s %d consumers: LIST %llu request(s) per refresh, INFO %llu\n", PART, n,
	       (unsigned long long)list->requests, (unsigned long long)info->requests);
}

static void run_count(const char *url, jsCtx *js, int n)
{
	struct side list = { 0 }, info = { 0 };
	double cnats[256];
	char stream[32], subject[32];
	bool good = true;

	snprintf(stream, sizeof(stream), "B%d", n);
	snprintf(subject, sizeof(subject), "b%d", n);
	if (!make_stream(js, stream, subject, n) || !side_start(&list, url, stream, n, false) ||
	    !side_start(&info, url, stream, n, true)) {
		side_stop(&list);
		side_stop(&info);
		return;
	}
	/* warm-up: connect, first fill of the table */
	good = time_poll(&list) >= 0 && time_poll(&info) >= 0 && time_cnats(js, stream) >= 0;
	for (int i = 0; good && i < bench_opts.reps; i++) {
		list.ms[i] = time_poll(&list);
		info.ms[i] = time_poll(&info);
		cnats[i] = time_cnats(js, stream);
		good = list.ms[i] >= 0 && info.ms[i] >= 0 && cnats[i] >= 0;
	}
	if (good)
		emit(n, &list, &info, cnats);
	side_stop(&list);
	side_stop(&info);
}

void bench_part_pending(void)
{
	struct tally_test_nats srv;
	natsConnection *nc = NULL;
	jsCtx *js = NULL;
	const char *list = bench_opts.consumers;
	unsigned long n;

	if (tally_test_nats_start(&srv, NULL, true) < 0) {
		fail("nats-server", srv.errmsg);
		bench_failed = true;
		return;
	}
	printf("  %-8s nats-server %s on %s\n", PART, srv.binary, srv.url);
	if (ok(natsConnection_ConnectTo(&nc, srv.url), "connect") &&
	    ok(natsConnection_JetStream(&js, nc, NULL), "jetstream"))
		while ((n = bench_next_size(&list, "--consumers", 100000)) != 0)
			run_count(srv.url, js, (int)n);
	if (js)
		jsCtx_Destroy(js);
	if (nc)
		natsConnection_Destroy(nc);
	tally_test_nats_stop(&srv);
	if (failed)
		bench_failed = true;
}
