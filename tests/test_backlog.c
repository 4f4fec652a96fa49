/* SPDX-License-Identifier: MIT */
/*
 * test_backlog.c: a subject's backlog comes from its live consumers only
 * (issue 13), end to end: a real nats-server on 127.0.0.1 (random port,
 * temp store), the engine and the poller on a segment, and the reads a
 * gateway makes (tally_read_subject, from the segment). One of two
 * consumers deleted: the backlog stays on the live one, not stale, and the
 * verdict follows the live backlog; the gone entry leaves after the grace
 * period; 20 durables deleted and recreated leave nothing behind; a
 * configured consumer that never existed reads not_found and adds no
 * backlog; a wildcard consumer over two subjects marks both rows shared
 * and names itself, except on a work-queue stream, where each row reads
 * its own stored count, not shared. Every wait is bounded; figures go to stderr.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <nats/nats.h>
#include <stdio.h>
#include <string.h>

#include "common/helpers.h"
#include "common/nats_server.h"

#define MS 1000000ull
#define TALLY_BIN TALLY_TEST_BUILDDIR "/tools/tally"

struct bl {
	struct tally_test_nats srv;
	natsConnection *nc;
	jsCtx *js;
	char name[TALLY_NAME_MAX + 1];
	struct tally_segment *seg, *rd;
	struct tally_engine *eng;
	struct tally_poller *poller;
	struct tally_producer *prod;
};

static void silent(void *ctx, int level, const char *msg)
{
	(void)ctx;
	if (getenv("TALLY_TEST_LOG"))
		fprintf(stderr, "poller [%d] %s\n", level, msg);
}

static void add_stream(struct bl *b, const char *name, const char *subject)
{
	jsStreamConfig sc;
	jsErrCode ec = 0;

	jsStreamConfig_Init(&sc);
	sc.Name = name;
	sc.Subjects = &subject;
	sc.SubjectsLen = 1;
	sc.Storage = js_FileStorage;
	cr_assert_eq(js_AddStream(NULL, b->js, &sc, NULL, &ec), NATS_OK, "stream %s (%d)", name, (int)ec);
}

static void add_consumer(struct bl *b, const char *stream, const char *durable, const char *filter,
			 bool deliver_new)
{
	jsConsumerConfig cc;
	jsErrCode ec = 0;

	jsConsumerConfig_Init(&cc);
	cc.Durable = durable;
	cc.AckPolicy = js_AckExplicit;
	cc.FilterSubject = filter;
	if (deliver_new)
		cc.DeliverPolicy = js_DeliverNew;
	cr_assert_eq(js_AddConsumer(NULL, b->js, stream, &cc, NULL, &ec), NATS_OK, "consumer %s/%s (%d)",
		     stream, durable, (int)ec);
}

static void del_consumer(struct bl *b, const char *stream, const char *durable)
{
	jsErrCode ec = 0;

	cr_assert_eq(js_DeleteConsumer(b->js, stream, durable, NULL, &ec), NATS_OK, "delete %s/%s (%d)",
		     stream, durable, (int)ec);
}

static void publish(struct bl *b, const char *subject, int n)
{
	for (int i = 0; i < n; i++) {
		jsErrCode ec = 0;
		cr_assert_eq(js_Publish(NULL, b->js, subject, "x", 1, NULL, &ec), NATS_OK);
	}
}

/* Server, segment, engine (publish every 50 ms), thresholds on orders.>
 * and billing.>: pending warn 500, overload 1000, stale after 1 s,
 * no dwell; latency never decides (min_samples above what is recorded). */
static void bl_start(struct bl *b)
{
	struct tally_segment_config scfg;
	struct tally_engine_config ecfg;
	struct tally_threshold_rule r;
	struct tally_thresholds *t = tally_thresholds_new();

	cr_assert_eq(tally_test_nats_start(&b->srv, NULL, true), 0, "%s", b->srv.errmsg);
	cr_assert_eq(natsConnection_ConnectTo(&b->nc, b->srv.url), NATS_OK);
	cr_assert_eq(natsConnection_JetStream(&b->js, b->nc, NULL), NATS_OK);
	tt_config(&scfg);
	snprintf(b->name, sizeof(b->name), "%s", tt_segname("backlog"));
	cr_assert_eq(tally_segment_create(b->name, &scfg, 0, &b->seg), 0, "%s", tally_errmsg());
	tally_engine_config_init(&ecfg);
	ecfg.publish_interval_ms = 50;
	cr_assert_eq(tally_engine_start(b->seg, &ecfg, &b->eng), 0, "%s", tally_errmsg());
	tally_threshold_rule_init(&r);
	r.pending_warn = 500;
	r.pending_overload = 1000;
	r.stale_after_ms = 1000;
	r.min_dwell_ms = 0;
	r.min_samples = 1000000;
	cr_assert_eq(tally_thresholds_add(t, "orders.>", &r), 0);
	cr_assert_eq(tally_thresholds_add(t, "billing.>", &r), 0);
	tally_engine_set_thresholds(b->eng, &t);
	cr_assert_eq(tally_segment_open(b->name, TALLY_OPEN_READER, 0, &b->rd), 0, "%s", tally_errmsg());
	cr_assert_eq(tally_producer_attach(b->seg, &b->prod), 0);
}

static void bl_poll(struct bl *b, const struct tally_poller_watch *w, size_t n, uint32_t grace_ms)
{
	struct tally_poller_config pc = {
		.urls = b->srv.url, .poll_interval_ms = 50, .request_timeout_ms = 1000,
		.gone_grace_ms = grace_ms, .watches = w, .nwatches = n, .log = silent,
	};

	cr_assert_eq(tally_poller_start(b->seg, &pc, &b->poller), 0, "%s", tally_errmsg());
}

static void bl_stop(struct bl *b)
{
	tally_poller_stop(&b->poller);
	tally_producer_detach(&b->prod);
	tally_engine_stop(&b->eng);
	tally_segment_close(&b->rd);
	tally_segment_close(&b->seg);
	jsCtx_Destroy(b->js);
	natsConnection_Destroy(b->nc);
	tally_test_nats_stop(&b->srv);
}

/* A row for subject (rows exist from their first sample). */
static tally_subject_t row(struct bl *b, const char *subject)
{
	tally_subject_t id;

	cr_assert_eq(tally_subject_intern(b->seg, subject, &id), 0);
	cr_assert(tally_record(b->prod, id, 1000));
	return id;
}

/* What a gateway reads, from the segment. */
static struct tally_subject_stats rd(struct bl *b, tally_subject_t id)
{
	struct tally_subject_stats s;

	memset(&s, 0, sizeof(s));
	(void)tally_read_subject(b->rd, id, &s);
	return s;
}

/* The consumer named behind a row's backlog ("" none), as readers get it. */
static const char *consumer_of(const struct tally_segment *seg, const struct tally_subject_stats *s)
{
	static char name[TALLY_PENDING_CONSUMER_MAX];

	tally_pending_consumer_name(seg, s, name, sizeof(name));
	return name;
}

/* Source of stream/consumer in the table; NULL when it is not there. */
static const char *consumer_source(struct bl *b, const char *stream, const char *consumer, int *n)
{
	static struct tally_consumer_stats cs[64];
	int k = tally_read_consumers(b->rd, cs, 64);

	if (n)
		*n = k;
	for (int i = 0; i < k; i++)
		if (!strcmp(cs[i].stream, stream) && !strcmp(cs[i].consumer, consumer))
			return cs[i].source;
	return NULL;
}

#define WAIT(ms, cond)                                                             \
	({                                                                         \
		bool ok_ = false;                                                  \
		for (unsigned i_ = 0; i_ < (ms) / 10 && !(ok_ = (cond)); i_++)     \
			tt_sleep_ms(10);                                           \
		ok_;                                                               \
	})

static double secs_since(uint64_t t0)
{
	return (double)(tally_now_ns() - t0) / 1e9;
}

Test(backlog, deleted_consumer_leaves_the_backlog_on_the_live_one, .timeout = 60)
{
	static const struct tally_poller_watch w[] = { { .stream = "ORDERS" } };
	struct bl b = { 0 };
	struct tally_subject_stats s;

	bl_start(&b);
	add_stream(&b, "ORDERS", "orders.>");
	add_consumer(&b, "ORDERS", "router", "orders.created", false);
	publish(&b, "orders.created", 1200);
	add_consumer(&b, "ORDERS", "all", "orders.>", true); /* sees only what follows */
	publish(&b, "orders.created", 700);
	tally_subject_t id = row(&b, "orders.created");
	bl_poll(&b, w, 1, 800);

	/* router 1,900, all 700: overload from router */
	cr_assert(WAIT(5000, (s = rd(&b, id)).pending == 1900 && s.verdict == TALLY_VERDICT_OVERLOAD),
		  "pending %llu verdict %s", (unsigned long long)s.pending, tally_verdict_name(s.verdict));
	cr_expect_eq(s.pending_consumers, 2);
	cr_expect_str_eq(consumer_of(b.rd, &s), "ORDERS/router");

	del_consumer(&b, "ORDERS", "router");
	uint64_t t_del = tally_now_ns();
	cr_assert(WAIT(3000, (s = rd(&b, id)).pending == 700), "pending %llu", (unsigned long long)s.pending);
	double t_live = secs_since(t_del);
	const char *src = consumer_source(&b, "ORDERS", "router", NULL);
	cr_expect(src && !strcmp(src, "gone"), "router reads %s", src ? src : "(absent)");
	/* For 500 ms, every read: live 700 from "all", warn on pending, never stale. */
	int reads = 0;
	for (uint64_t t0 = tally_now_ns(); tally_now_ns() - t0 < 500 * MS; reads++, tt_sleep_ms(20)) {
		s = rd(&b, id);
		cr_expect_eq(s.pending, 700);
		cr_expect_eq(s.pending_source, TALLY_PENDING_LIVE);
		cr_expect_eq(s.pending_consumers, 1, "the gone entry is not counted");
		cr_expect_eq(s.verdict, TALLY_VERDICT_WARN);
		cr_expect(s.reasons & TALLY_REASON_PENDING);
		cr_expect(!(s.reasons & (TALLY_REASON_STALE | TALLY_REASON_FAIL_OPEN)), "reasons %#x", s.reasons);
		cr_expect_str_eq(consumer_of(b.rd, &s), "ORDERS/all");
	}
	/* the gone entry leaves the table after the 800 ms grace period */
	int n = 0;
	cr_expect(WAIT(5000, consumer_source(&b, "ORDERS", "router", &n) == NULL), "router still listed");
	double t_removed = secs_since(t_del);
	cr_expect_eq(n, 1, "only \"all\" is left");
	s = rd(&b, id);
	cr_expect_eq(s.verdict, TALLY_VERDICT_WARN);
	cr_expect_eq(s.pending, 700);
	fprintf(stderr, "[backlog] router (1900) deleted beside all (700): live 700 after %.2f s, "
		"%d reads warn/live/not stale, gone entry removed after %.2f s (grace 0.8 s)\n",
		t_live, reads, t_removed);
	bl_stop(&b);
}

Test(backlog, recreated_durables_leave_nothing_behind, .timeout = 90)
{
	static const struct tally_poller_watch w[] = { { .stream = "ORDERS" } };
	struct bl b = { 0 };
	struct tally_subject_stats s;
	char dn[16];
	int max_listed = 0, n = 0;

	bl_start(&b);
	add_stream(&b, "ORDERS", "orders.>");
	add_consumer(&b, "ORDERS", "all", "orders.>", false);
	publish(&b, "orders.created", 600);
	tally_subject_t id = row(&b, "orders.created");
	bl_poll(&b, w, 1, 300);
	uint64_t t0 = tally_now_ns();
	for (int i = 0; i < 20; i++) {
		snprintf(dn, sizeof(dn), "d%d", i);
		add_consumer(&b, "ORDERS", dn, "orders.created", false);
		cr_assert(WAIT(3000, consumer_source(&b, "ORDERS", dn, &n) &&
				     !strcmp(consumer_source(&b, "ORDERS", dn, &n), "live")), "%s never live", dn);
		max_listed = n > max_listed ? n : max_listed;
		del_consumer(&b, "ORDERS", dn);
		s = rd(&b, id);
		cr_expect(!(s.reasons & TALLY_REASON_STALE), "round %d: stale beside a live consumer", i);
	}
	double t_loop = secs_since(t0);
	cr_expect(WAIT(5000, (consumer_source(&b, "ORDERS", "all", &n), n == 1)), "%d entries left", n);
	fprintf(stderr, "[backlog] 20 durables created and deleted in %.2f s: at most %d entries listed, "
		"%d left at %.2f s (grace 0.3 s)\n", t_loop, max_listed, n, secs_since(t0));
	s = rd(&b, id);
	cr_expect_eq(s.pending_source, TALLY_PENDING_LIVE);
	cr_expect_eq(s.pending, 600);
	cr_expect_eq(s.verdict, TALLY_VERDICT_WARN);
	cr_expect(!(s.reasons & TALLY_REASON_STALE));

	/* the last consumer deleted too: nothing feeds the subject, nothing is stale */
	del_consumer(&b, "ORDERS", "all");
	cr_expect(WAIT(5000, rd(&b, id).pending_source == TALLY_PENDING_NONE), "source %u",
		  rd(&b, id).pending_source);
	s = rd(&b, id);
	cr_expect_eq(s.pending_consumers, 0);
	cr_expect(!(s.reasons & TALLY_REASON_STALE), "no consumer left is not stale data");
	bl_stop(&b);
}

Test(backlog, configured_consumer_never_found_reads_not_found, .timeout = 60)
{
	static const struct tally_poller_watch w[] = {
		{ .stream = "ORDERS", .consumer = "ghost", .map_subject = "orders.created" },
		{ .stream = "ORDERS", .consumer = "all" },
	};
	struct bl b = { 0 };
	struct tally_subject_stats s;
	const char *src;

	bl_start(&b);
	add_stream(&b, "ORDERS", "orders.>");
	add_consumer(&b, "ORDERS", "all", "orders.>", false);
	publish(&b, "orders.created", 40);
	tally_subject_t id = row(&b, "orders.created");
	bl_poll(&b, w, 2, 300);
	cr_assert(WAIT(5000, (s = rd(&b, id)).pending == 40 && s.pending_source == TALLY_PENDING_LIVE));
	cr_expect(WAIT(5000, (src = consumer_source(&b, "ORDERS", "ghost", NULL)) && !strcmp(src, "not_found")),
		  "ghost reads %s", src ? src : "(absent)");
	/* until its first poll says not found, the ghost is a configured
	 * consumer not yet read (counted, stale, no backlog): "all" can be
	 * live before that (CI saw it once under ASan); once it is known
	 * absent, the next publish counts "all" alone */
	cr_expect(WAIT(5000, (s = rd(&b, id)).pending_consumers == 1), "the missing consumer adds nothing: %u",
		  s.pending_consumers);
	cr_expect_eq(s.pending, 40);
	cr_expect_eq(s.verdict, TALLY_VERDICT_OK);
	cr_expect_str_eq(consumer_of(b.rd, &s), "ORDERS/all");

	/* "all" deleted: gone, then (a configured pair) not_found; never stale */
	del_consumer(&b, "ORDERS", "all");
	cr_assert(WAIT(3000, rd(&b, id).pending_source == TALLY_PENDING_GONE), "source %u",
		  rd(&b, id).pending_source);
	s = rd(&b, id);
	cr_expect_eq(s.pending_consumers, 0);
	cr_expect_eq(s.pending, 0);
	cr_expect(!(s.reasons & TALLY_REASON_STALE), "reasons %#x", s.reasons);
	cr_expect(WAIT(3000, rd(&b, id).pending_source == TALLY_PENDING_NOT_FOUND),
		  "after the grace period the configured pair reads not_found");
	src = consumer_source(&b, "ORDERS", "all", NULL);
	cr_expect(src && !strcmp(src, "not_found"), "all reads %s", src ? src : "(absent)");
	/* and it comes back */
	add_consumer(&b, "ORDERS", "all", "orders.>", false);
	cr_expect(WAIT(3000, (s = rd(&b, id)).pending == 40 && s.pending_source == TALLY_PENDING_LIVE));
	bl_stop(&b);
}

Test(backlog, wildcard_consumer_marks_its_rows_shared, .timeout = 60)
{
	static const struct tally_poller_watch w[] = { { .stream = "ORDERS" }, { .stream = "BILLING" } };
	struct bl b = { 0 };
	struct tally_subject_stats s, in;

	bl_start(&b);
	add_stream(&b, "ORDERS", "orders.>");
	add_stream(&b, "BILLING", "billing.>");
	add_consumer(&b, "ORDERS", "all", "orders.>", false);
	add_consumer(&b, "BILLING", "sent", "billing.sent", false);
	publish(&b, "orders.created", 30);
	publish(&b, "orders.paid", 20);
	publish(&b, "billing.sent", 5);
	tally_subject_t created = row(&b, "orders.created"), paid = row(&b, "orders.paid");
	tally_subject_t sent = row(&b, "billing.sent");
	bl_poll(&b, w, 2, 300);
	cr_assert(WAIT(5000, rd(&b, paid).pending == 50 && rd(&b, sent).pending == 5));
	tally_subject_t both[] = { created, paid };
	for (int i = 0; i < 2; i++) {
		s = rd(&b, both[i]);
		cr_expect_eq(s.pending, 50, "the consumer's whole backlog, not the subject's share");
		cr_expect(s.pending_shared, "row %d not marked shared", i);
		cr_expect_str_eq(consumer_of(b.rd, &s), "ORDERS/all");
		cr_assert_eq(tally_engine_read(b.eng, both[i], &in), 0);
		cr_expect(in.pending_shared, "in process too");
		cr_expect_str_eq(consumer_of(b.seg, &in), "ORDERS/all");
	}
	s = rd(&b, sent);
	cr_expect(!s.pending_shared, "one consumer, one subject: not shared");
	cr_expect_str_eq(consumer_of(b.rd, &s), "BILLING/sent");

	/* what an operator sees: tally stat --json, and the text table's mark */
	char cmd[512], out[16384];
	snprintf(cmd, sizeof(cmd), "%s -s %s stat --json", TALLY_BIN, b.name);
	FILE *f = popen(cmd, "r");
	cr_assert(f);
	size_t len = fread(out, 1, sizeof(out) - 1, f);
	out[len] = '\0';
	cr_expect_eq(pclose(f), 0);
	json_error_t jerr;
	json_t *doc = json_loads(out, 0, &jerr);
	cr_assert(doc, "%s: %s", jerr.text, out);
	size_t i;
	json_t *subj;
	int seen = 0;
	json_array_foreach(json_object_get(doc, "subjects"), i, subj) {
		const char *nm = json_string_value(json_object_get(subj, "name"));
		bool orders = nm && !strncmp(nm, "orders.", 7);
		cr_expect(json_is_boolean(json_object_get(subj, "pending_shared")), "%s", nm);
		cr_expect_eq(json_is_true(json_object_get(subj, "pending_shared")), orders, "%s", nm);
		cr_expect_str_eq(json_string_value(json_object_get(subj, "pending_consumer")),
				 orders ? "ORDERS/all" : "BILLING/sent");
		seen++;
	}
	cr_expect_eq(seen, 3, "%s", out);
	json_decref(doc);
	snprintf(cmd, sizeof(cmd), "%s -s %s stat", TALLY_BIN, b.name);
	f = popen(cmd, "r");
	cr_assert(f);
	len = fread(out, 1, sizeof(out) - 1, f);
	out[len] = '\0';
	pclose(f);
	cr_expect(strstr(out, " 50*") && strstr(out, "* shared backlog"), "%s", out);
	bl_stop(&b);
}

static void add_stream_retention(struct bl *b, const char *name, const char *subject, jsRetentionPolicy ret)
{
	jsStreamConfig sc;
	jsErrCode ec = 0;

	jsStreamConfig_Init(&sc);
	sc.Name = name;
	sc.Subjects = &subject;
	sc.SubjectsLen = 1;
	sc.Storage = js_FileStorage;
	sc.Retention = ret;
	cr_assert_eq(js_AddStream(NULL, b->js, &sc, NULL, &ec), NATS_OK, "stream %s (%d)", name, (int)ec);
}

/* A work-queue stream's stored messages per subject are its one consumer's
 * backlog per subject (pending.h, "Shared backlog"): the rows read their
 * own counts, not shared; the same setup under limits retention keeps the
 * shared approximation. */
Test(backlog, work_queue_stream_gives_the_backlog_per_subject, .timeout = 60)
{
	static const struct tally_poller_watch w[] = { { .stream = "WQ" }, { .stream = "LIM" } };
	struct bl b = { 0 };
	struct tally_subject_stats s;

	bl_start(&b);
	add_stream_retention(&b, "WQ", "orders.>", js_WorkQueuePolicy);
	add_stream_retention(&b, "LIM", "limits.>", js_LimitsPolicy);
	add_consumer(&b, "WQ", "all", "orders.>", false);
	add_consumer(&b, "LIM", "all", "limits.>", false);
	publish(&b, "orders.a", 30);
	publish(&b, "orders.b", 10);
	publish(&b, "limits.a", 30);
	publish(&b, "limits.b", 10);
	tally_subject_t oa = row(&b, "orders.a"), ob = row(&b, "orders.b");
	tally_subject_t la = row(&b, "limits.a"), lb = row(&b, "limits.b");
	tally_subject_t oc = row(&b, "orders.c"); /* nothing stored: no backlog, not 40 */
	bl_poll(&b, w, 2, 300);
	cr_assert(WAIT(5000, rd(&b, oa).pending == 30 && rd(&b, ob).pending == 10 &&
			     rd(&b, la).pending == 40 && rd(&b, lb).pending == 40),
		  "orders.a %llu, orders.b %llu, limits.a %llu, limits.b %llu",
		  (unsigned long long)rd(&b, oa).pending, (unsigned long long)rd(&b, ob).pending,
		  (unsigned long long)rd(&b, la).pending, (unsigned long long)rd(&b, lb).pending);
	s = rd(&b, oa);
	cr_expect(!s.pending_shared, "work queue: orders.a has its own count");
	cr_expect_eq(s.pending_source, TALLY_PENDING_LIVE);
	cr_expect_str_eq(consumer_of(b.rd, &s), "WQ/all");
	s = rd(&b, ob);
	cr_expect(!s.pending_shared, "work queue: orders.b has its own count");
	cr_expect_str_eq(consumer_of(b.rd, &s), "WQ/all");
	s = rd(&b, oc);
	cr_expect_eq(s.pending, 0, "work queue: orders.c has nothing stored");
	cr_expect(!s.pending_shared);
	cr_expect_eq(s.pending_source, TALLY_PENDING_LIVE);
	s = rd(&b, la);
	cr_expect(s.pending_shared, "limits: the consumer's whole backlog, shared");
	s = rd(&b, lb);
	cr_expect(s.pending_shared, "limits: the consumer's whole backlog, shared");
	cr_expect_str_eq(consumer_of(b.rd, &s), "LIM/all");
	bl_stop(&b);
}
