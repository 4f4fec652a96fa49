/* SPDX-License-Identifier: MIT */
/*
 * bench/bench_poller.c: what a refresh of the pending table costs, by
 * CONSUMER.LIST paging (one request per 256 consumers, what the poller does
 * for a watched stream) against one CONSUMER.INFO per consumer (what it does
 * for explicit pairs), for 100 and 1,000 consumers. Both go through the real
 * poller (tally__poller_poll_once, manual mode: request, JSON decoding by
 * cnats, seqlocked writes into the table) against one nats-server started
 * here on loopback, in the same run, repetitions interleaved so that drift
 * hits both sides alike. Prints median and min-max per side and the ratio
 * of medians; the target is LIST <= 1/10 of INFO at 1,000 consumers. A
 * reference line times cnats' js_Consumers on the same pages: it decodes
 * every field into allocated objects, which is why the poller reads the
 * replies itself.
 *
 * Usage: bench_poller [--reps N] [--json FILE]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <nats/nats.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nats_server.h"
#include "pending.h"
#include "poller.h"

#define MAX_REPS 1000

struct side {
	struct tally__poller *p;
	void *section;
	double ms[MAX_REPS];
	double median, min, max;
	uint64_t requests;
};

struct row {
	int consumers;
	struct side list, info;
	struct side cnats; /* reference: cnats js_Consumers, which decodes every field */
};

static void die(const char *what, const char *detail)
{
	fprintf(stderr, "bench_poller: %s: %s\n", what, detail);
	exit(1);
}

static void quiet_log(void *ctx, int level, const char *msg)
{
	(void)ctx;
	if (level <= 1)
		fprintf(stderr, "bench_poller: poller: %s\n", msg);
}

static void check(natsStatus s, const char *what)
{
	if (s != NATS_OK)
		die(what, natsStatus_GetText(s));
}

static void make_stream(jsCtx *js, const char *name, const char *subject, int consumers)
{
	jsStreamConfig sc;
	jsErrCode ec = 0;
	char durable[32];

	jsStreamConfig_Init(&sc);
	sc.Name = name;
	sc.Subjects = &subject;
	sc.SubjectsLen = 1;
	check(js_AddStream(NULL, js, &sc, NULL, &ec), "add stream");
	for (int i = 0; i < consumers; i++) {
		jsConsumerConfig cc;

		jsConsumerConfig_Init(&cc);
		snprintf(durable, sizeof(durable), "c%04d", i);
		cc.Durable = durable;
		cc.AckPolicy = js_AckExplicit;
		check(js_AddConsumer(NULL, js, name, &cc, NULL, &ec), "add consumer");
	}
	for (int i = 0; i < 10; i++)
		check(js_Publish(NULL, js, subject, "x", 1, NULL, &ec), "publish");
}

/* A manual poller on its own table: whole stream, or one pair per consumer. */
static void side_start(struct side *sd, const char *url, const char *stream, int consumers, bool pairs)
{
	size_t n = pairs ? (size_t)consumers : 1, len = tally__pending_section_size((uint32_t)consumers + 8);
	struct tally_poller_watch *w = calloc(n, sizeof(*w));
	char (*names)[32] = calloc(n, 32);
	struct tally_poller_config cfg = { .urls = url, .manual = true, .request_timeout_ms = 5000,
					   .log = quiet_log, .breaker_threshold = 1000000 };
	int rc;

	sd->section = aligned_alloc(64, (len + 63) & ~(size_t)63);
	if (!w || !names || !sd->section || tally__pending_init(sd->section, len, (uint32_t)consumers + 8))
		die("setup", "out of memory");
	for (size_t i = 0; i < n; i++) {
		snprintf(names[i], 32, "c%04zu", i);
		w[i] = (struct tally_poller_watch){ .stream = stream, .consumer = pairs ? names[i] : NULL };
	}
	cfg.watches = w;
	cfg.nwatches = n;
	rc = tally__poller_start(&cfg, sd->section, len, &sd->p);
	if (rc < 0)
		die("poller start", strerror(-rc));
	free(w);
	free(names);
}

static double time_poll(struct side *sd)
{
	struct tally__poller_stats st;
	uint64_t t0 = tally__pending_now_ns();
	int rc = tally__poller_poll_once(sd->p);
	double ms = (double)(tally__pending_now_ns() - t0) / 1e6;

	if (rc < 0)
		die("poll", strerror(-rc));
	tally__poller_stats(sd->p, &st);
	sd->requests = st.last_requests;
	return ms;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static void summarize(struct side *sd, int reps)
{
	double sorted[MAX_REPS];

	memcpy(sorted, sd->ms, sizeof(double) * (size_t)reps);
	qsort(sorted, (size_t)reps, sizeof(double), cmp_double);
	sd->min = sorted[0];
	sd->max = sorted[reps - 1];
	sd->median = reps % 2 ? sorted[reps / 2] : (sorted[reps / 2 - 1] + sorted[reps / 2]) / 2;
}

/* The reference the poller does not use: js_Consumers pages the same way but decodes all. */
static double time_cnats(jsCtx *js, const char *stream, struct side *sd)
{
	jsConsumerInfoList *list = NULL;
	jsErrCode ec = 0;
	uint64_t t0 = tally__pending_now_ns();

	check(js_Consumers(&list, js, stream, NULL, &ec), "js_Consumers");
	(void)sd;
	jsConsumerInfoList_Destroy(list);
	return (double)(tally__pending_now_ns() - t0) / 1e6;
}

static void run_row(struct row *r, const char *url, jsCtx *js, const char *stream, int reps)
{
	side_start(&r->list, url, stream, r->consumers, false);
	side_start(&r->info, url, stream, r->consumers, true);
	time_poll(&r->list); /* warm-up: connect, first fill of the table */
	time_poll(&r->info);
	for (int i = 0; i < reps; i++) {
		r->list.ms[i] = time_poll(&r->list);
		r->info.ms[i] = time_poll(&r->info);
		r->cnats.ms[i] = time_cnats(js, stream, &r->cnats);
	}
	summarize(&r->list, reps);
	summarize(&r->info, reps);
	summarize(&r->cnats, reps);
	tally__poller_stop(&r->list.p);
	tally__poller_stop(&r->info.p);
	free(r->list.section);
	free(r->info.section);
}

static void print_row(const struct row *r)
{
	printf("%6d consumers  LIST paging: median %8.3f ms (min %.3f, max %.3f, %llu requests)\n",
	       r->consumers, r->list.median, r->list.min, r->list.max, (unsigned long long)r->list.requests);
	printf("%6d consumers  INFO each:   median %8.3f ms (min %.3f, max %.3f, %llu requests)\n",
	       r->consumers, r->info.median, r->info.min, r->info.max, (unsigned long long)r->info.requests);
	printf("%6d consumers  (reference: cnats js_Consumers, same pages, full decoding: median %.3f ms)\n",
	       r->consumers, r->cnats.median);
	printf("%6d consumers  LIST is %.1fx faster (INFO/LIST medians); target >= 10x: %s\n",
	       r->consumers, r->info.median / r->list.median,
	       r->info.median >= 10 * r->list.median ? "met" : "NOT met");
}

/* requests: counted for the poller sides; null for the cnats reference (not counted). */
static void json_side(FILE *f, const char *name, const struct side *sd, bool counted)
{
	fprintf(f, "\"%s\": {\"median_ms\": %.4f, \"min_ms\": %.4f, \"max_ms\": %.4f, \"requests\": ",
		name, sd->median, sd->min, sd->max);
	if (counted)
		fprintf(f, "%llu}", (unsigned long long)sd->requests);
	else
		fprintf(f, "null}");
}

static void write_json(const char *path, const struct row *rows, int n, int reps)
{
	FILE *f = fopen(path, "w");

	if (!f)
		die(path, strerror(errno));
	fprintf(f, "{\"bench\": \"poller_refresh\", \"reps\": %d, \"results\": [\n", reps);
	for (int i = 0; i < n; i++) {
		fprintf(f, "  {\"consumers\": %d, ", rows[i].consumers);
		json_side(f, "list", &rows[i].list, true);
		fprintf(f, ", ");
		json_side(f, "info", &rows[i].info, true);
		fprintf(f, ", ");
		json_side(f, "cnats_js_consumers", &rows[i].cnats, false);
		fprintf(f, ", \"ratio_info_over_list\": %.2f}%s\n",
			rows[i].info.median / rows[i].list.median, i + 1 < n ? "," : "");
	}
	fprintf(f, "]}\n");
	fclose(f);
}

static void parse_args(int argc, char **argv, int *reps, const char **json)
{
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
			*reps = atoi(argv[++i]);
		else if (strcmp(argv[i], "--json") == 0 && i + 1 < argc)
			*json = argv[++i];
		else
			die("usage", "bench_poller [--reps N] [--json FILE]");
	}
	if (*reps < 1 || *reps > MAX_REPS)
		die("--reps", "must be 1..1000");
}

int main(int argc, char **argv)
{
	static struct row rows[2] = { { .consumers = 100 }, { .consumers = 1000 } };
	struct tally_test_nats srv;
	natsConnection *nc = NULL;
	jsCtx *js = NULL;
	const char *json = NULL;
	int reps = 15;

	parse_args(argc, argv, &reps, &json);
	if (tally_test_nats_start(&srv, NULL, true) < 0)
		die("nats-server", srv.errmsg);
	check(natsConnection_ConnectTo(&nc, srv.url), "connect");
	check(natsConnection_JetStream(&js, nc, NULL), "jetstream");
	make_stream(js, "B100", "b100", 100);
	make_stream(js, "B1000", "b1000", 1000);
	printf("pending refresh, nats-server on loopback, %d repetitions each, interleaved\n", reps);
	run_row(&rows[0], srv.url, js, "B100", reps);
	print_row(&rows[0]);
	run_row(&rows[1], srv.url, js, "B1000", reps);
	print_row(&rows[1]);
	if (json)
		write_json(json, rows, 2, reps);
	jsCtx_Destroy(js);
	natsConnection_Destroy(nc);
	tally_test_nats_stop(&srv);
	return 0;
}
