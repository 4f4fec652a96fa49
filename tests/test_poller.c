/* SPDX-License-Identifier: MIT */
/*
 * tests/test_poller.c: the pending table and the JetStream poller. The
 * "pending" suite checks the shm section on its own (layout validation,
 * seqlock under a concurrent writer, per-subject combination). The
 * "poller" suite runs the poller against real nats-server processes
 * started by tests/common/nats_server.c, with streams and consumers made
 * through cnats: counts after publishing, fetching and acking, filters,
 * 1,000 consumers by LIST paging, a server killed and restarted, deleted
 * consumers and streams, an INFO reply that names no consumer (as
 * nats-server sends while it deletes one), no JetStream, unreachable and
 * bad URLs, wrong credentials, reconfiguration, skipped ticks. Poll
 * interval 100 ms, every wait bounded.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <errno.h>
#include <nats/nats.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/nats_server.h"
#include "pending.h"
#include "poller.h"

/* ---- shared helpers ---- */

struct logbuf {
	pthread_mutex_t lock;
	char text[64 * 1024];
	size_t len;
	int per_level[4];
};

static struct logbuf g_log = { .lock = PTHREAD_MUTEX_INITIALIZER };

static void test_log(void *ctx, int level, const char *msg)
{
	struct logbuf *b = ctx;

	if (getenv("TALLY_TEST_LOG"))
		fprintf(stderr, "poller log [%d] %s\n", level, msg);
	pthread_mutex_lock(&b->lock);
	if (level >= 0 && level < 4)
		b->per_level[level]++;
	b->len += (size_t)snprintf(b->text + b->len, sizeof(b->text) - b->len, "[%d] %s\n", level, msg);
	if (b->len >= sizeof(b->text))
		b->len = sizeof(b->text) - 1;
	pthread_mutex_unlock(&b->lock);
}

static int log_count(int level, const char *needle)
{
	int n = 0;
	char tag[8];

	snprintf(tag, sizeof(tag), "[%d] ", level);
	pthread_mutex_lock(&g_log.lock);
	for (const char *s = g_log.text; (s = strstr(s, tag)) != NULL; s++) {
		const char *eol = strchr(s, '\n');
		const char *hit = strstr(s, needle);

		n += hit && (!eol || hit < eol);
	}
	pthread_mutex_unlock(&g_log.lock);
	return n;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

static double mono_s(void)
{
	return (double)tally__pending_now_ns() / 1e9;
}

struct env {
	struct tally_test_nats srv;
	natsConnection *nc;
	jsCtx *js;
	void *section;
	size_t len;
	uint32_t cap; /* entries the section was formatted for */
	struct tally__poller *p;
};

static void env_server(struct env *e, const char *extra, bool js)
{
	int rc = tally_test_nats_start(&e->srv, extra, js);

	cr_assert_eq(rc, 0, "nats-server did not start: %s", e->srv.errmsg);
}

static void env_connect(struct env *e)
{
	natsStatus s = natsConnection_ConnectTo(&e->nc, e->srv.url);

	cr_assert_eq(s, NATS_OK, "test connection: %s", natsStatus_GetText(s));
	s = natsConnection_JetStream(&e->js, e->nc, NULL);
	cr_assert_eq(s, NATS_OK);
}

static void env_section(struct env *e, uint32_t cap)
{
	e->len = tally__pending_section_size(cap);
	e->cap = cap;
	e->section = aligned_alloc(64, (e->len + 63) & ~(size_t)63);
	cr_assert_not_null(e->section);
	cr_assert_eq(tally__pending_init(e->section, e->len, cap), 0);
}

static void env_free(struct env *e)
{
	tally__poller_stop(&e->p);
	cr_assert_null(e->p);
	jsCtx_Destroy(e->js);
	natsConnection_Destroy(e->nc);
	tally_test_nats_stop(&e->srv);
	free(e->section);
}

static struct tally_poller_config base_cfg(const char *url, const struct tally_poller_watch *w, size_t n)
{
	return (struct tally_poller_config){
		.urls = url, .watches = w, .nwatches = n,
		.poll_interval_ms = 100, .request_timeout_ms = 1000,
		.breaker_threshold = 3, .breaker_cooldown_ms = 500,
		.reconnect_wait_ms = 100, .reconnect_jitter_ms = 50,
		.log = test_log, .log_ctx = &g_log,
	};
}

static void add_stream(struct env *e, const char *name, const char *subject)
{
	jsStreamConfig sc;
	jsErrCode ec = 0;
	natsStatus s;

	jsStreamConfig_Init(&sc);
	sc.Name = name;
	sc.Subjects = &subject;
	sc.SubjectsLen = 1;
	sc.Storage = js_FileStorage;
	s = js_AddStream(NULL, e->js, &sc, NULL, &ec);
	cr_assert_eq(s, NATS_OK, "add stream %s: %s (%d)", name, natsStatus_GetText(s), (int)ec);
}

static void add_consumer(struct env *e, const char *stream, const char *durable, const char *filter)
{
	jsConsumerConfig cc;
	jsErrCode ec = 0;
	natsStatus s;

	jsConsumerConfig_Init(&cc);
	cc.Durable = durable;
	cc.AckPolicy = js_AckExplicit;
	cc.FilterSubject = filter;
	s = js_AddConsumer(NULL, e->js, stream, &cc, NULL, &ec);
	cr_assert_eq(s, NATS_OK, "add consumer %s/%s: %s (%d)", stream, durable, natsStatus_GetText(s), (int)ec);
}

static void publish(struct env *e, const char *subject, int n)
{
	for (int i = 0; i < n; i++) {
		jsErrCode ec = 0;
		natsStatus s = js_Publish(NULL, e->js, subject, "x", 1, NULL, &ec);

		cr_assert_eq(s, NATS_OK, "publish %s: %s", subject, natsStatus_GetText(s));
	}
}

/* Entry of stream/consumer; returns its index or -1. */
static int find_entry(const struct env *e, const char *stream, const char *consumer,
		      struct tally__pending_view *v)
{
	int cap = tally__pending_check(e->section, e->len);

	for (int i = 0; i < cap; i++) {
		if (tally__pending_read_entry(e->section, e->len, (uint32_t)i, v) == 0 &&
		    strcmp(v->stream, stream) == 0 && strcmp(v->consumer, consumer) == 0)
			return i;
	}
	return -1;
}

static struct tally__pending_view must_entry(const struct env *e, const char *stream, const char *consumer)
{
	struct tally__pending_view v;

	cr_assert_geq(find_entry(e, stream, consumer, &v), 0, "no entry for %s/%s", stream, consumer);
	return v;
}

/* Wait (bounded) until entry stream/consumer has the given source. */
static struct tally__pending_view wait_source(const struct env *e, const char *stream,
					      const char *consumer, uint32_t source, double secs)
{
	double end = mono_s() + secs;
	struct tally__pending_view v = { 0 };

	while (mono_s() < end) {
		if (find_entry(e, stream, consumer, &v) >= 0 && v.source == source)
			return v;
		sleep_ms(20);
	}
	cr_assert_fail("%s/%s: source %s, wanted %s within %.0f s (last error: %s)", stream, consumer,
		       tally__pending_source_name(v.source), tally__pending_source_name(source), secs,
		       v.last_error);
	return v;
}

static struct tally__pending_breaker_view breaker(const struct env *e)
{
	struct tally__pending_breaker_view b;

	cr_assert_eq(tally__pending_read_breaker(e->section, e->len, &b), 0);
	return b;
}

static void start_poller(struct env *e, const struct tally_poller_config *cfg)
{
	int rc = tally__poller_start(cfg, e->section, e->len, e->cap, &e->p);

	cr_assert_eq(rc, 0, "poller start: %d (%s)", rc, strerror(-rc));
	cr_assert_not_null(e->p);
}

static void init_log(void)
{
	pthread_mutex_lock(&g_log.lock);
	g_log.len = 0;
	g_log.text[0] = '\0';
	memset(g_log.per_level, 0, sizeof(g_log.per_level));
	pthread_mutex_unlock(&g_log.lock);
}

TestSuite(pending, .timeout = 30);
TestSuite(poller, .init = init_log, .timeout = 60);

/* ---- pending: the section on its own ---- */

static void *section_new(uint32_t cap, size_t *len)
{
	void *s;

	*len = tally__pending_section_size(cap);
	s = aligned_alloc(64, (*len + 63) & ~(size_t)63);
	cr_assert_not_null(s);
	cr_assert_eq(tally__pending_init(s, *len, cap), 0);
	return s;
}

static void put(void *sec, uint32_t idx, const char *consumer, const char *filter, const char *map,
		uint32_t source, uint64_t pending, uint64_t ack, uint64_t last_ok)
{
	struct tally__pending_values v = {
		.source = source, .is_leader = 1, .num_pending = pending, .num_ack_pending = ack,
		.last_ok_ns = last_ok, .stream = "S", .consumer = consumer, .filter = filter, .map = map,
	};

	tally__pending_write_entry(tally__pending_entry_at(sec, idx), &v);
}

Test(pending, layout_and_validation)
{
	size_t len;
	void *sec = section_new(4, &len);
	struct tally__pending_view v;
	struct tally__pending_breaker_view b;

	cr_assert_eq(tally__pending_section_size(0), 0);
	cr_assert_eq(tally__pending_section_size(TALLY__PENDING_MAX_CAPACITY + 1), 0);
	cr_assert_eq(tally__pending_check(sec, len), 4);
	cr_assert_eq(tally__pending_read_entry(sec, len, 0, &v), -ENOENT);
	cr_assert_eq(tally__pending_read_entry(sec, len, 4, &v), -ERANGE);
	cr_assert_eq(tally__pending_read_entry(sec, len - 1, 0, &v), -EBADMSG, "short mapping");
	cr_assert_eq(tally__pending_read_entry(sec, 10, 0, &v), -EBADMSG);
	cr_assert_eq(tally__pending_read_breaker(sec, len, &b), 0);
	cr_assert_eq(b.state, TALLY__BREAKER_CLOSED);
	put(sec, 2, "c", "a.b", "", TALLY__PENDING_LIVE, 7, 3, 1);
	cr_assert_eq(tally__pending_read_entry(sec, len, 2, &v), 0);
	cr_assert_eq(v.num_pending, 7);
	cr_assert_str_eq(v.consumer, "c");
	cr_assert_str_eq(v.filter, "a.b");
	tally__pending_clear_entry(tally__pending_entry_at(sec, 2));
	cr_assert_eq(tally__pending_read_entry(sec, len, 2, &v), -ENOENT);
	free(sec);
}

Test(pending, corrupt_section_is_rejected)
{
	size_t len;
	void *sec = section_new(2, &len);
	struct tally__pending_header *h = sec;
	struct tally__pending_entry *e = tally__pending_entry_at(sec, 0);
	struct tally__pending_view v;

	put(sec, 0, "c", "x", "", TALLY__PENDING_LIVE, 1, 0, 1);
	memset((void *)e->consumer, 'A', sizeof(e->consumer)); /* no NUL */
	cr_assert_eq(tally__pending_read_entry(sec, len, 0, &v), -EBADMSG);
	put(sec, 0, "c", "x", "", TALLY__PENDING_LIVE, 1, 0, 1);
	atomic_store(&e->source, 9u);
	cr_assert_eq(tally__pending_read_entry(sec, len, 0, &v), -EBADMSG);
	h->capacity = 1000; /* larger than the mapping */
	cr_assert_eq(tally__pending_check(sec, len), -EBADMSG);
	h->capacity = 2;
	h->entry_size = 512;
	cr_assert_eq(tally__pending_check(sec, len), -EBADMSG);
	h->entry_size = sizeof(struct tally__pending_entry);
	h->magic ^= 1;
	cr_assert_eq(tally__pending_check(sec, len), -EBADMSG);
	cr_assert_eq(tally__pending_check(NULL, len), -EBADMSG);
	free(sec);
}

Test(pending, combine_by_maximum_for_subject)
{
	size_t len;
	void *sec = section_new(8, &len);
	uint64_t now = tally__pending_now_ns();
	struct tally__pending_policy pend_only = { .include_ack_pending = false };
	struct tally__pending_result r;

	put(sec, 0, "eu", "orders.eu.*", "", TALLY__PENDING_LIVE, 10, 5, now);
	put(sec, 1, "all", "orders.>", "", TALLY__PENDING_LIVE, 12, 0, now);
	put(sec, 2, "nofilter", "", "", TALLY__PENDING_LIVE, 1000, 0, now);
	put(sec, 3, "mapped", "", "billing.*", TALLY__PENDING_CACHED, 4, 4, now - 2000000000ull);
	put(sec, 4, "dead", "billing.x", "", TALLY__PENDING_GONE, 0, 0, now);
	cr_assert_eq(tally__pending_for_subject(sec, len, "orders.eu.1", NULL, &r), 0);
	cr_assert_eq(r.matched, 2);
	cr_assert_eq(r.backlog, 15, "max(10+5, 12)");
	cr_assert_eq(r.source, TALLY__PENDING_LIVE);
	cr_assert_eq(tally__pending_for_subject(sec, len, "orders.eu.1", &pend_only, &r), 0);
	cr_assert_eq(r.backlog, 12);
	cr_assert_eq(tally__pending_for_subject(sec, len, "orders.us.1", NULL, &r), 0);
	cr_assert_eq(r.matched, 1);
	cr_assert_eq(r.backlog, 12);
	cr_assert_eq(tally__pending_for_subject(sec, len, "billing.x", NULL, &r), 0);
	cr_assert_eq(r.matched, 2);
	cr_assert_eq(r.backlog, 8, "the gone consumer adds 0, the mapped one 4+4");
	cr_assert_eq(r.source, TALLY__PENDING_CACHED);
	cr_assert_geq(r.oldest_age_ns, 2000000000ull);
	cr_assert_eq(tally__pending_for_subject(sec, len, "nothing.here", NULL, &r), 0);
	cr_assert_eq(r.matched, 0);
	cr_assert_eq(r.backlog, 0);
	put(sec, 5, "new", "billing.>", "", TALLY__PENDING_NEVER, 0, 0, 0);
	cr_assert_eq(tally__pending_for_subject(sec, len, "billing.x", NULL, &r), 0);
	cr_assert_eq(r.source, TALLY__PENDING_CACHED, "a never-fetched entry does not outweigh a fresh one");
	cr_assert_lt(r.oldest_age_ns, 3000000000ull);
	cr_assert_eq(r.counted, 2, "mapped and new; the gone one matches but is not counted");
	struct tally__pending_policy strict = { .include_ack_pending = true, .stale_after_ns = 1000000000ull };
	cr_assert_eq(tally__pending_for_subject(sec, len, "billing.x", &strict, &r), 0);
	cr_assert_eq(r.tier, TALLY__PENDING_TIER_STALE, "cached 2 s > 1 s: nothing fresh is left");
	cr_assert_eq(r.source, TALLY__PENDING_NEVER);
	cr_assert_eq(r.oldest_age_ns, UINT64_MAX);
	cr_assert_eq(r.backlog, 8, "the stale value stays, for the stale policy to judge");
	put(sec, 6, "huge", "big", "", TALLY__PENDING_LIVE, UINT64_MAX - 1, 5, now);
	cr_assert_eq(tally__pending_for_subject(sec, len, "big", NULL, &r), 0);
	cr_assert_eq(r.backlog, UINT64_MAX, "saturates");
	free(sec);
}

struct race {
	void *sec;
	size_t len;
	atomic_bool stop;
	uint64_t reads, busy;
};

static void *race_writer(void *arg)
{
	struct race *r = arg;
	char name[32];

	for (uint64_t k = 1; !atomic_load(&r->stop); k++) {
		struct tally__pending_values v = {
			.source = TALLY__PENDING_LIVE, .num_pending = k, .num_ack_pending = k,
			.num_redelivered = k, .num_waiting = k, .delivered_stream_seq = k,
			.ack_floor_stream_seq = k, .last_ok_ns = k, .stream = name, .consumer = name,
			.filter = name, .map = "", .last_error = name,
		};

		snprintf(name, sizeof(name), "n%llu", (unsigned long long)k);
		tally__pending_write_entry(tally__pending_entry_at(r->sec, 0), &v);
	}
	return NULL;
}

Test(pending, seqlock_reader_never_sees_a_torn_entry)
{
	struct race r = { 0 };
	pthread_t w;
	double end;

	r.sec = section_new(1, &r.len);
	put(r.sec, 0, "n0", "n0", "", TALLY__PENDING_LIVE, 0, 0, 0);
	cr_assert_eq(pthread_create(&w, NULL, race_writer, &r), 0);
	for (end = mono_s() + 0.5; mono_s() < end;) {
		struct tally__pending_view v;
		char want[32];
		int rc = tally__pending_read_entry(r.sec, r.len, 0, &v);

		if (rc == -EAGAIN) {
			r.busy++;
			continue;
		}
		cr_assert_eq(rc, 0);
		snprintf(want, sizeof(want), "n%llu", (unsigned long long)v.num_pending);
		cr_assert(v.num_ack_pending == v.num_pending && v.ack_floor_stream_seq == v.num_pending &&
			  v.last_ok_ns == v.num_pending, "torn numbers");
		cr_assert(v.num_pending == 0 || (strcmp(v.consumer, want) == 0 &&
						 strcmp(v.last_error, want) == 0), "torn strings");
		r.reads++;
	}
	atomic_store(&r.stop, true);
	pthread_join(w, NULL);
	cr_assert_gt(r.reads, 0);
	free(r.sec);
}

/* ---- poller against a real nats-server ---- */

Test(poller, counts_after_publish_filtered_and_unfiltered)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "ORDERS" } };
	struct tally_poller_config cfg;
	struct tally__pending_view v;
	struct tally__pending_result r;
	struct tally__poller_stats st;

	env_server(&e, NULL, true);
	env_connect(&e);
	env_section(&e, 16);
	add_stream(&e, "ORDERS", "orders.>");
	add_consumer(&e, "ORDERS", "all", NULL);
	add_consumer(&e, "ORDERS", "eu", "orders.eu.*");
	publish(&e, "orders.eu.1", 10);
	publish(&e, "orders.us.1", 5);
	cfg = base_cfg(e.srv.url, w, 1);
	cfg.manual = true;
	start_poller(&e, &cfg);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	v = must_entry(&e, "ORDERS", "all");
	cr_assert_eq(v.source, TALLY__PENDING_LIVE);
	cr_assert_eq(v.num_pending, 15);
	cr_assert_eq(v.num_ack_pending, 0);
	cr_assert_str_eq(v.filter, "");
	cr_assert_eq(v.is_leader, 1, "standalone server holds its consumers");
	cr_assert_gt(v.last_ok_ns, 0);
	v = must_entry(&e, "ORDERS", "eu");
	cr_assert_eq(v.num_pending, 10);
	cr_assert_str_eq(v.filter, "orders.eu.*");
	/* Unfiltered consumer without map_subject applies to no subject. */
	cr_assert_eq(tally__pending_for_subject(e.section, e.len, "orders.eu.1", NULL, &r), 0);
	cr_assert_eq(r.matched, 1);
	cr_assert_eq(r.backlog, 10);
	cr_assert_eq(tally__pending_for_subject(e.section, e.len, "orders.us.1", NULL, &r), 0);
	cr_assert_eq(r.matched, 0);
	tally__poller_stats(e.p, &st);
	cr_assert_eq(st.polls_ok, 1);
	cr_assert_eq(st.consumers, 2);
	cr_assert_eq(st.last_requests, 2, "one CONSUMER.LIST page and, on a stream's first poll, "
		     "one STREAM.INFO for its retention; got %llu", (unsigned long long)st.last_requests);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	tally__poller_stats(e.p, &st);
	cr_assert_eq(st.last_requests, 1, "later polls: one CONSUMER.LIST page, got %llu",
		     (unsigned long long)st.last_requests);
	cr_assert(tally__poller_policy(e.p).include_ack_pending);
	env_free(&e);
}

Test(poller, map_subject_for_unfiltered_consumers_via_reconfigure)
{
	struct env e = { 0 };
	struct tally_poller_watch w1[] = { { .stream = "ORDERS" } };
	struct tally_poller_watch w2[] = { { .stream = "ORDERS", .map_subject = "orders.>" } };
	struct tally_poller_config cfg;
	struct tally__pending_view v;
	struct tally__pending_result r;
	int idx1, idx2;

	env_server(&e, NULL, true);
	env_connect(&e);
	env_section(&e, 16);
	add_stream(&e, "ORDERS", "orders.>");
	add_consumer(&e, "ORDERS", "all", NULL);
	add_consumer(&e, "ORDERS", "eu", "orders.eu.*");
	publish(&e, "orders.eu.1", 3);
	publish(&e, "orders.us.1", 4);
	cfg = base_cfg(e.srv.url, w1, 1);
	cfg.manual = true;
	start_poller(&e, &cfg);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	idx1 = find_entry(&e, "ORDERS", "all", &v);
	cfg.watches = w2;
	cr_assert_eq(tally__poller_reconfigure(e.p, &cfg), 0);
	idx2 = find_entry(&e, "ORDERS", "all", &v);
	cr_assert_eq(idx1, idx2, "kept its slot");
	cr_assert_eq(v.source, TALLY__PENDING_LIVE, "kept its values before any new poll");
	cr_assert_eq(v.num_pending, 7);
	cr_assert_str_eq(v.map, "orders.>");
	v = must_entry(&e, "ORDERS", "eu");
	cr_assert_str_eq(v.map, "", "filtered consumers keep their filter");
	cr_assert_eq(tally__pending_for_subject(e.section, e.len, "orders.eu.1", NULL, &r), 0);
	cr_assert_eq(r.matched, 2);
	cr_assert_eq(r.backlog, 7, "max(3, 7)");
	env_free(&e);
}

static void fetch(natsSubscription *sub, int n, natsMsgList *list)
{
	jsErrCode ec = 0;
	natsStatus s = natsSubscription_Fetch(list, sub, n, 5000, &ec);

	cr_assert_eq(s, NATS_OK, "fetch: %s", natsStatus_GetText(s));
	cr_assert_eq(list->Count, n);
}

Test(poller, fetch_and_ack_moves_pending_to_ack_pending)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "JOBS", .consumer = "worker" } };
	struct tally_poller_config cfg;
	struct tally__pending_view v;
	struct tally__pending_result r;
	struct tally__pending_policy only = { .include_ack_pending = false };
	natsSubscription *sub = NULL;
	jsSubOptions so;
	natsMsgList list;
	jsErrCode ec = 0;

	env_server(&e, NULL, true);
	env_connect(&e);
	env_section(&e, 4);
	add_stream(&e, "JOBS", "jobs.*");
	add_consumer(&e, "JOBS", "worker", "jobs.>");
	publish(&e, "jobs.a", 10);
	cfg = base_cfg(e.srv.url, w, 1);
	cfg.manual = true;
	start_poller(&e, &cfg);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	v = must_entry(&e, "JOBS", "worker");
	cr_assert_eq(v.num_pending, 10);
	jsSubOptions_Init(&so);
	so.Stream = "JOBS";
	so.Consumer = "worker";
	cr_assert_eq(js_PullSubscribe(&sub, e.js, "jobs.>", "worker", NULL, &so, &ec), NATS_OK);
	fetch(sub, 4, &list);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	v = must_entry(&e, "JOBS", "worker");
	cr_assert_eq(v.num_pending, 6);
	cr_assert_eq(v.num_ack_pending, 4);
	cr_assert_eq(v.delivered_stream_seq, 4);
	cr_assert_eq(v.ack_floor_stream_seq, 0);
	for (int i = 0; i < 2; i++)
		cr_assert_eq(natsMsg_AckSync(list.Msgs[i], NULL, &ec), NATS_OK);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	v = must_entry(&e, "JOBS", "worker");
	cr_assert_eq(v.num_pending, 6);
	cr_assert_eq(v.num_ack_pending, 2);
	cr_assert_eq(v.ack_floor_stream_seq, 2);
	cr_assert_eq(tally__pending_for_subject(e.section, e.len, "jobs.a", NULL, &r), 0);
	cr_assert_eq(r.backlog, 8, "pending + ack pending");
	cr_assert_eq(tally__pending_for_subject(e.section, e.len, "jobs.a", &only, &r), 0);
	cr_assert_eq(r.backlog, 6);
	natsMsgList_Destroy(&list);
	natsSubscription_Destroy(sub);
	env_free(&e);
}

static void add_many(struct env *e, const char *stream, int n)
{
	char name[32];

	for (int i = 0; i < n; i++) {
		snprintf(name, sizeof(name), "c%04d", i);
		add_consumer(e, stream, name, i % 2 ? "big.odd" : NULL);
	}
}

Test(poller, thousand_consumers_by_list_paging, .timeout = 120)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "BIG" } };
	struct tally_poller_config cfg;
	struct tally__poller_stats st;
	struct tally__pending_view v;
	int found = 0;

	env_server(&e, NULL, true);
	env_connect(&e);
	env_section(&e, 1100);
	add_stream(&e, "BIG", "big.*");
	add_many(&e, "BIG", 1000);
	publish(&e, "big.odd", 3);
	publish(&e, "big.even", 4);
	cfg = base_cfg(e.srv.url, w, 1);
	cfg.manual = true;
	start_poller(&e, &cfg);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	for (uint32_t i = 0; i < 1100; i++) {
		if (tally__pending_read_entry(e.section, e.len, i, &v) != 0)
			continue;
		found++;
		cr_assert_eq(v.source, TALLY__PENDING_LIVE);
		cr_assert_eq(v.num_pending, strcmp(v.filter, "big.odd") == 0 ? 3u : 7u, "%s", v.consumer);
	}
	cr_assert_eq(found, 1000);
	tally__poller_stats(e.p, &st);
	cr_assert_eq(st.consumers, 1000);
	cr_assert_eq(st.last_requests, 5, "1,000 consumers in pages of 256: 4 requests, and the "
		     "first poll's STREAM.INFO (retention); got %llu",
		     (unsigned long long)st.last_requests);
	env_free(&e);
}

Test(poller, table_full_is_counted_not_fatal)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "BIG" } };
	struct tally_poller_config cfg;
	struct tally__poller_stats st;

	env_server(&e, NULL, true);
	env_connect(&e);
	env_section(&e, 8);
	add_stream(&e, "BIG", "big.*");
	add_many(&e, "BIG", 12);
	cfg = base_cfg(e.srv.url, w, 1);
	cfg.manual = true;
	start_poller(&e, &cfg);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	tally__poller_stats(e.p, &st);
	cr_assert_eq(st.consumers, 8);
	cr_assert_eq(st.table_full, 8, "4 per poll");
	cr_assert_eq(log_count(1, "pending table full"), 1, "logged once");
	cr_assert(strstr(g_log.text, "raise pending_capacity"), "%s", g_log.text);
	cr_assert_eq(breaker(&e).untracked, 4, "the segment says how many are not tracked");
	cr_assert_eq(breaker(&e).polls_ok, 2, "the polls themselves succeeded");
	/* room again: the next complete poll tracks everyone and says so */
	jsErrCode ec = 0;
	char name[32];
	for (int i = 0; i < 6; i++) {
		snprintf(name, sizeof(name), "c%04d", i);
		cr_assert_eq(js_DeleteConsumer(e.js, "BIG", name, NULL, &ec), NATS_OK);
	}
	/* the first poll after the deletions marks the tracked ones gone; the
	 * next frees their entries for the untracked ones */
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	cr_assert_eq(breaker(&e).untracked, 0);
	cr_assert_eq(log_count(2, "has room again"), 1, "%s", g_log.text);
	env_free(&e);
}

Test(poller, server_killed_then_restarted)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "ORDERS" }, { .stream = "JOBS", .consumer = "w" } };
	struct tally_poller_config cfg;
	struct tally__pending_view v;
	struct tally__pending_breaker_view b;
	struct tally__pending_result r1, r2;
	double end;

	env_server(&e, NULL, true);
	env_connect(&e);
	env_section(&e, 8);
	add_stream(&e, "ORDERS", "orders.>");
	add_stream(&e, "JOBS", "jobs.>");
	add_consumer(&e, "ORDERS", "eu", "orders.eu.*");
	add_consumer(&e, "JOBS", "w", NULL);
	publish(&e, "orders.eu.1", 5);
	cfg = base_cfg(e.srv.url, w, 2);
	start_poller(&e, &cfg);
	wait_source(&e, "ORDERS", "eu", TALLY__PENDING_LIVE, 10);
	wait_source(&e, "JOBS", "w", TALLY__PENDING_LIVE, 10);

	tally_test_nats_kill(&e.srv);
	v = wait_source(&e, "ORDERS", "eu", TALLY__PENDING_CACHED, 10);
	cr_assert_eq(v.num_pending, 5, "last good value kept");
	cr_assert_str_neq(v.last_error, "");
	for (end = mono_s() + 10; mono_s() < end && breaker(&e).state != TALLY__BREAKER_OPEN;)
		sleep_ms(20);
	b = breaker(&e);
	cr_assert_eq(b.state, TALLY__BREAKER_OPEN, "breaker: %s", tally__breaker_state_name(b.state));
	cr_assert_geq(b.consecutive_failures, 3);
	cr_assert_eq(tally__pending_for_subject(e.section, e.len, "orders.eu.1", NULL, &r1), 0);
	sleep_ms(300);
	cr_assert_eq(tally__pending_for_subject(e.section, e.len, "orders.eu.1", NULL, &r2), 0);
	cr_assert_eq(r2.source, TALLY__PENDING_CACHED);
	cr_assert_eq(r2.backlog, 5);
	cr_assert_geq(r2.oldest_age_ns, r1.oldest_age_ns + 250000000ull, "age grows");
	sleep_ms(700); /* at least one half-open probe that fails */

	cr_assert_eq(tally_test_nats_restart(&e.srv), 0, "restart: %s", e.srv.errmsg);
	v = wait_source(&e, "ORDERS", "eu", TALLY__PENDING_LIVE, 20);
	cr_assert_eq(v.num_pending, 5, "file store survived the restart");
	wait_source(&e, "JOBS", "w", TALLY__PENDING_LIVE, 10);
	for (end = mono_s() + 5; mono_s() < end && breaker(&e).state != TALLY__BREAKER_CLOSED;)
		sleep_ms(20);
	b = breaker(&e);
	cr_assert_eq(b.state, TALLY__BREAKER_CLOSED);
	cr_assert_geq(b.opens_total, 1);
	cr_assert_eq(log_count(0, "JetStream polling failed"), 1, "one line when it starts:\n%s", g_log.text);
	cr_assert_eq(log_count(2, "recovered"), 1, "one line when it ends:\n%s", g_log.text);
	cr_assert_eq(log_count(1, "circuit breaker open"), 1, "%s", g_log.text);
	env_free(&e);
}

/* Issue 13: consumer "router" (orders.created) deleted while "all"
 * (orders.>) is live with 6,620 pending: the subject must read live 6,620,
 * not stale. Every case of the per-entry rule (pending.h), on one table. */
Test(pending, combine_judges_each_entry_not_the_subject)
{
	size_t len;
	void *sec = section_new(8, &len);
	uint64_t now = tally__pending_now_ns();
	struct tally__pending_policy pol = { .include_ack_pending = true, .stale_after_ns = 5000000000ull };
	struct tally__pending_result r;

	put(sec, 0, "router", "orders.created", "", TALLY__PENDING_GONE, 0, 0, now);
	put(sec, 1, "all", "orders.>", "", TALLY__PENDING_LIVE, 6600, 20, now);
	cr_assert_eq(tally__pending_for_subject(sec, len, "orders.created", &pol, &r), 0);
	cr_expect_eq(r.backlog, 6620);
	cr_expect_eq(r.source, TALLY__PENDING_LIVE, "the gone entry does not make it stale");
	cr_expect_eq(r.tier, TALLY__PENDING_TIER_FRESH);
	cr_expect_eq(r.matched, 2);
	cr_expect_eq(r.counted, 1);
	cr_expect_eq(r.top, 1, "the backlog is the live consumer's");

	/* a cached entry past stale_after, with a larger backlog, beside the live one */
	put(sec, 2, "old", "orders.created", "", TALLY__PENDING_CACHED, 99999, 0, now - 10000000000ull);
	cr_assert_eq(tally__pending_for_subject(sec, len, "orders.created", &pol, &r), 0);
	cr_expect_eq(r.backlog, 6620, "a stale entry never counts beside a fresh one");
	cr_expect_eq(r.source, TALLY__PENDING_LIVE);
	cr_expect_lt(r.oldest_age_ns, 5000000000ull);
	cr_expect_eq(r.counted, 2);
	/* a cached entry within stale_after counts, and is the maximum */
	put(sec, 3, "slow", "orders.created", "", TALLY__PENDING_CACHED, 7000, 0, now - 2000000000ull);
	cr_assert_eq(tally__pending_for_subject(sec, len, "orders.created", &pol, &r), 0);
	cr_expect_eq(r.backlog, 7000);
	cr_expect_eq(r.source, TALLY__PENDING_CACHED);
	cr_expect_geq(r.oldest_age_ns, 2000000000ull);
	cr_expect_eq(r.top, 3);

	/* only stale and never: the stale tier decides, with the oldest age */
	tally__pending_clear_entry(tally__pending_entry_at(sec, 1));
	tally__pending_clear_entry(tally__pending_entry_at(sec, 3));
	put(sec, 4, "new", "orders.*", "", TALLY__PENDING_NEVER, 0, 0, 0);
	cr_assert_eq(tally__pending_for_subject(sec, len, "orders.created", &pol, &r), 0);
	cr_expect_eq(r.tier, TALLY__PENDING_TIER_STALE);
	cr_expect_eq(r.backlog, 99999);
	cr_expect_eq(r.source, TALLY__PENDING_NEVER);
	cr_expect_eq(r.oldest_age_ns, UINT64_MAX);
	cr_expect_eq(r.top, 2);

	/* only absent entries: no backlog, no staleness, nothing counted */
	tally__pending_clear_entry(tally__pending_entry_at(sec, 2));
	tally__pending_clear_entry(tally__pending_entry_at(sec, 4));
	put(sec, 5, "ghost", "orders.created", "", TALLY__PENDING_NOTFOUND, 0, 0, now);
	cr_assert_eq(tally__pending_for_subject(sec, len, "orders.created", &pol, &r), 0);
	cr_expect_eq(r.tier, TALLY__PENDING_TIER_ABSENT);
	cr_expect_eq(r.backlog, 0);
	cr_expect_eq(r.counted, 0);
	cr_expect_eq(r.matched, 2);
	cr_expect_eq(r.source, TALLY__PENDING_GONE, "gone says more than not found");
	cr_expect_eq(r.top, UINT32_MAX);
	tally__pending_clear_entry(tally__pending_entry_at(sec, 0));
	cr_assert_eq(tally__pending_for_subject(sec, len, "orders.created", &pol, &r), 0);
	cr_expect_eq(r.source, TALLY__PENDING_NOTFOUND);
	cr_expect_str_eq(tally__pending_source_name(r.source), "not_found");
	free(sec);
}

Test(pending, read_name_of_an_entry)
{
	size_t len;
	void *sec = section_new(2, &len);
	char buf[TALLY__PENDING_NAME_MAX * 2];

	put(sec, 1, "all", "orders.>", "", TALLY__PENDING_LIVE, 1, 0, 1);
	cr_assert_eq(tally__pending_read_name(sec, len, 1, buf, sizeof(buf)), 0);
	cr_expect_str_eq(buf, "S/all");
	cr_expect_eq(tally__pending_read_name(sec, len, 0, buf, sizeof(buf)), -ENOENT);
	cr_expect_str_eq(buf, "");
	cr_expect_eq(tally__pending_read_name(sec, len, 2, buf, sizeof(buf)), -ERANGE);
	free(sec);
}

Test(poller, deleted_consumer_and_stream_turn_gone)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "ORDERS" }, { .stream = "JOBS", .consumer = "w" } };
	struct tally_poller_config cfg;
	struct tally__pending_view v;
	struct tally__pending_result r;
	jsErrCode ec = 0;

	env_server(&e, NULL, true);
	env_connect(&e);
	env_section(&e, 8);
	add_stream(&e, "ORDERS", "orders.>");
	add_stream(&e, "JOBS", "jobs.>");
	add_consumer(&e, "ORDERS", "eu", "orders.eu.*");
	add_consumer(&e, "ORDERS", "keep", "orders.us.*");
	add_consumer(&e, "JOBS", "w", "jobs.>");
	publish(&e, "orders.eu.1", 5);
	publish(&e, "jobs.x", 2);
	cfg = base_cfg(e.srv.url, w, 2);
	cfg.manual = true;
	start_poller(&e, &cfg);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	cr_assert_eq(must_entry(&e, "ORDERS", "eu").num_pending, 5);
	cr_assert_eq(js_DeleteConsumer(e.js, "ORDERS", "eu", NULL, &ec), NATS_OK);
	cr_assert_eq(js_DeleteConsumer(e.js, "JOBS", "w", NULL, &ec), NATS_OK);
	cr_assert_eq(tally__poller_poll_once(e.p), 0, "a deleted consumer is not a failed poll");
	v = must_entry(&e, "ORDERS", "eu");
	cr_assert_eq(v.source, TALLY__PENDING_GONE);
	cr_assert_eq(v.num_pending, 0, "never the old value nor the stream total");
	cr_assert_str_eq(v.filter, "orders.eu.*");
	cr_assert_eq(must_entry(&e, "ORDERS", "keep").source, TALLY__PENDING_LIVE);
	v = must_entry(&e, "JOBS", "w");
	cr_assert_eq(v.source, TALLY__PENDING_GONE);
	cr_assert_str_eq(v.last_error, "consumer not found");
	cr_assert_eq(tally__pending_for_subject(e.section, e.len, "orders.eu.1", NULL, &r), 0);
	cr_assert_eq(r.matched, 1);
	cr_assert_eq(r.backlog, 0);
	cr_assert_eq(r.source, TALLY__PENDING_GONE);
	cr_assert_eq(js_DeleteStream(e.js, "ORDERS", NULL, &ec), NATS_OK);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	v = must_entry(&e, "ORDERS", "keep");
	cr_assert_eq(v.source, TALLY__PENDING_GONE);
	cr_assert_str_eq(v.last_error, "stream not found");
	cr_assert_eq(log_count(1, "stream ORDERS not found"), 1, "%s", g_log.text);
	cr_assert_eq(log_count(1, "consumer JOBS/w"), 1, "%s", g_log.text);
	add_consumer(&e, "JOBS", "w", "jobs.>");
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	v = must_entry(&e, "JOBS", "w");
	cr_assert_eq(v.source, TALLY__PENDING_LIVE, "re-created: live again");
	cr_assert_eq(v.num_pending, 2);
	env_free(&e);
}

/* Replies of a JetStream API, one per request in order, the last repeated:
 * the test answers the poller's requests itself through the real
 * nats-server, on an API prefix that no JetStream serves. */
struct scripted_api {
	const char *const *replies;
	int n, next;
	pthread_mutex_t lock;
};

static void scripted_reply(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure)
{
	struct scripted_api *api = closure;
	const char *body;

	(void)sub;
	pthread_mutex_lock(&api->lock);
	body = api->replies[api->next < api->n ? api->next : api->n - 1];
	api->next++;
	pthread_mutex_unlock(&api->lock);
	if (natsMsg_GetReply(msg))
		natsConnection_PublishString(nc, natsMsg_GetReply(msg), body);
	natsMsg_Destroy(msg);
}

static int scripted_served(struct scripted_api *api)
{
	int n;

	pthread_mutex_lock(&api->lock);
	n = api->next;
	pthread_mutex_unlock(&api->lock);
	return n;
}

/* While it deletes a consumer, nats-server answers CONSUMER.INFO with the
 * response type alone: no error, no consumer (test_backlog met it on 2
 * busy cores; the reply below is the one it printed). That is not a live
 * consumer with no backlog and no filter: the entry keeps its values and
 * its filter, turns cached, and the next "not found" makes it gone with
 * the filter it had, so the rows it fed read gone. */
Test(poller, info_reply_naming_no_consumer_keeps_the_last_values)
{
	static const char *const replies[] = {
		"{\"type\":\"io.nats.jetstream.api.v1.consumer_info_response\",\"stream_name\":\"ORDERS\","
		"\"name\":\"all\",\"config\":{\"durable_name\":\"all\",\"filter_subject\":\"orders.>\"},"
		"\"num_pending\":40,\"num_ack_pending\":0}",
		"{\"type\":\"io.nats.jetstream.api.v1.consumer_info_response\"}",
		"{\"type\":\"io.nats.jetstream.api.v1.consumer_info_response\",\"stream_name\":\"ORDERS\","
		"\"name\":\"other\",\"config\":{\"filter_subject\":\"\"},\"num_pending\":0}",
		"{\"type\":\"io.nats.jetstream.api.v1.consumer_info_response\",\"error\":{\"code\":404,"
		"\"err_code\":10014,\"description\":\"consumer not found\"}}",
	};
	struct scripted_api api = { .replies = replies, .n = 4, .lock = PTHREAD_MUTEX_INITIALIZER };
	struct tally_poller_watch w[] = { { .stream = "ORDERS", .consumer = "all" } };
	struct tally_poller_config cfg;
	struct tally__pending_view v;
	struct tally__pending_result r;
	natsSubscription *sub = NULL;
	struct env e = { 0 };

	init_log();
	env_server(&e, NULL, false);
	env_connect(&e);
	env_section(&e, 4);
	cr_assert_eq(natsConnection_Subscribe(&sub, e.nc, "TEST.API.CONSUMER.INFO.ORDERS.all",
					      scripted_reply, &api), NATS_OK);
	cr_assert_eq(natsConnection_Flush(e.nc), NATS_OK);
	cfg = base_cfg(e.srv.url, w, 1);
	cfg.manual = true;
	cfg.js_prefix = "TEST.API";
	start_poller(&e, &cfg);

	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	v = must_entry(&e, "ORDERS", "all");
	cr_assert_eq(v.source, TALLY__PENDING_LIVE);
	cr_assert_eq(v.num_pending, 40);
	cr_assert_str_eq(v.filter, "orders.>");

	for (int reply = 1; reply <= 2; reply++) {
		cr_assert_eq(tally__poller_poll_once(e.p), 0, "an answer, not a failed poll");
		cr_assert_eq(scripted_served(&api), reply + 1);
		v = must_entry(&e, "ORDERS", "all");
		cr_assert_eq(v.source, TALLY__PENDING_CACHED, "reply %d: source %u", reply, v.source);
		cr_assert_eq(v.num_pending, 40, "reply %d: the last backlog stays", reply);
		cr_assert_str_eq(v.filter, "orders.>", "reply %d: the filter stays", reply);
		cr_assert(strstr(v.last_error, "names no consumer"), "reply %d: %s", reply, v.last_error);
	}

	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	v = must_entry(&e, "ORDERS", "all");
	cr_assert_eq(v.source, TALLY__PENDING_GONE);
	cr_assert_eq(v.num_pending, 0);
	cr_assert_str_eq(v.filter, "orders.>", "gone, still matching the rows it fed");
	cr_assert_eq(tally__pending_for_subject(e.section, e.len, "orders.created", NULL, &r), 0);
	cr_assert_eq(r.matched, 1);
	cr_assert_eq(r.source, TALLY__PENDING_GONE);
	natsSubscription_Destroy(sub);
	env_free(&e);
}

Test(poller, server_without_jetstream)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "JOBS", .consumer = "w" } };
	struct tally_poller_config cfg;
	struct tally__pending_view v;

	env_server(&e, NULL, false);
	env_section(&e, 4);
	cfg = base_cfg(e.srv.url, w, 1);
	cfg.manual = true;
	start_poller(&e, &cfg);
	cr_assert_eq(tally__poller_poll_once(e.p), -ENOTSUP);
	v = must_entry(&e, "JOBS", "w");
	cr_assert_eq(v.source, TALLY__PENDING_NEVER);
	cr_assert_eq(v.consecutive_failures, 1);
	cr_assert(strstr(v.last_error, "JetStream not available"), "%s", v.last_error);
	cr_assert(strstr(breaker(&e).last_error, "JetStream not available"));
	cr_assert(breaker(&e).connected);
	cr_assert_eq(tally__poller_poll_once(e.p), -ENOTSUP);
	cr_assert_eq(log_count(0, "JetStream not available"), 1, "%s", g_log.text);
	env_free(&e);
}

Test(poller, unreachable_url_start_succeeds_breaker_opens)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "JOBS", .consumer = "w" } };
	struct tally_poller_config cfg;
	struct tally__poller_stats st;

	env_section(&e, 4);
	cfg = base_cfg("nats://127.0.0.1:1", w, 1);
	cfg.manual = true;
	start_poller(&e, &cfg);
	for (int i = 0; i < 3; i++)
		cr_assert_eq(tally__poller_poll_once(e.p), -ENOTCONN);
	cr_assert_eq(must_entry(&e, "JOBS", "w").source, TALLY__PENDING_NEVER);
	cr_assert_eq(breaker(&e).state, TALLY__BREAKER_OPEN);
	cr_assert_eq(tally__poller_poll_once(e.p), -EBUSY, "breaker open: skipped");
	sleep_ms(600);
	cr_assert_eq(tally__poller_poll_once(e.p), -ENOTCONN, "the half-open probe fails");
	cr_assert_eq(breaker(&e).state, TALLY__BREAKER_OPEN);
	tally__poller_stats(e.p, &st);
	cr_assert_eq(st.breaker_opens, 2);
	cr_assert_eq(st.skipped_open, 1);
	cr_assert_eq(st.polls_failed, 4);
	cr_assert(strstr(breaker(&e).last_error, "cannot connect"), "%s", breaker(&e).last_error);
	cr_assert_eq(log_count(0, "JetStream polling failed"), 1, "%s", g_log.text);
	env_free(&e);
}

/* A malformed URL is refused at start with the part that is wrong (it
 * used to be accepted and fail in a reconnect loop). */
Test(poller, bad_url_is_refused_naming_the_part)
{
	static const struct {
		const char *url, *says;
	} cases[] = {
		{ "nats://127.0.0.1:notaport", "port \"notaport\"" },
		{ "http://[garbage", "scheme \"http\"" },
		{ "nats://[::1", "'[' without ']'" },
		{ "nats://:4222", "has no host" },
		{ "nats://a:1,,nats://b:2", "an empty server URL" },
		{ "nats://a:1/path", "port \"1/path\"" },
		{ "nats://a/path", "unexpected \"/path\" after the host" },
	};
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "JOBS", .consumer = "w" } };
	struct tally_poller_config cfg;
	char why[256];

	env_section(&e, 4);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		cfg = base_cfg(cases[i].url, w, 1);
		cr_expect_eq(tally__poller_config_check(&cfg, why, sizeof(why)), -EINVAL, "%s", cases[i].url);
		cr_expect(strstr(why, cases[i].says), "%s: %s", cases[i].url, why);
		cr_expect_eq(tally__poller_start(&cfg, e.section, e.len, e.cap, &e.p), -EINVAL);
		cr_assert_null(e.p);
	}
	for (const char *const *ok = (const char *const[]){ "127.0.0.1", "nats://u:p@h:4222",
			"tls://[::1]:4222", "nats://a:1, nats://b:2", NULL }; *ok; ok++) {
		cfg = base_cfg(*ok, w, 1);
		cr_expect_eq(tally__poller_config_check(&cfg, why, sizeof(why)), 0, "%s: %s", *ok, why);
	}
	env_free(&e);
}

/* A whole-stream watch of a stream that does not exist is listed (as
 * STREAM/"*", not_found) so that stat, JSON and /metrics show it; the
 * entry goes when the stream is made. */
Test(poller, missing_stream_is_listed_until_it_exists)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "NOSTREAM" }, { .stream = "LATER" } };
	struct tally_poller_config cfg;
	struct tally__pending_view v;

	env_server(&e, NULL, true);
	env_connect(&e);
	env_section(&e, 8);
	cfg = base_cfg(e.srv.url, w, 2);
	cfg.manual = true;
	start_poller(&e, &cfg);
	cr_assert_eq(tally__poller_poll_once(e.p), 0, "a missing stream is not a failed poll");
	v = must_entry(&e, "NOSTREAM", "*");
	cr_expect_eq(v.source, TALLY__PENDING_NOTFOUND);
	cr_expect_str_eq(v.last_error, "stream not found");
	cr_expect_eq(must_entry(&e, "LATER", "*").source, TALLY__PENDING_NOTFOUND);
	add_stream(&e, "LATER", "later.>");
	add_consumer(&e, "LATER", "c", "later.>");
	publish(&e, "later.x", 3);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	cr_expect_lt(find_entry(&e, "LATER", "*", &v), 0, "the marker stays after the stream exists");
	cr_expect_eq(must_entry(&e, "LATER", "c").num_pending, 3);
	cr_expect_eq(must_entry(&e, "NOSTREAM", "*").source, TALLY__PENDING_NOTFOUND);
	env_free(&e);
}

Test(poller, wrong_credentials_then_fixed_by_reconfigure)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "JOBS", .consumer = "w" } };
	struct tally_poller_config cfg;
	struct tally__pending_breaker_view b;
	natsOptions *o = NULL;

	env_server(&e, "--user tally --pass s3cret", true);
	cr_assert_eq(natsOptions_Create(&o), NATS_OK);
	natsOptions_SetURL(o, e.srv.url);
	natsOptions_SetUserInfo(o, "tally", "s3cret");
	cr_assert_eq(natsConnection_Connect(&e.nc, o), NATS_OK);
	natsOptions_Destroy(o);
	cr_assert_eq(natsConnection_JetStream(&e.js, e.nc, NULL), NATS_OK);
	add_stream(&e, "JOBS", "jobs.>");
	add_consumer(&e, "JOBS", "w", NULL);
	publish(&e, "jobs.x", 3);
	env_section(&e, 4);
	cfg = base_cfg(e.srv.url, w, 1);
	cfg.manual = true;
	cfg.user = "tally";
	cfg.password = "wrong";
	start_poller(&e, &cfg);
	cr_assert_eq(tally__poller_poll_once(e.p), -EACCES);
	b = breaker(&e);
	cr_assert(strstr(b.last_error, "Authorization") || strstr(b.last_error, "Authentication"),
		  "%s", b.last_error);
	cr_assert_eq(must_entry(&e, "JOBS", "w").source, TALLY__PENDING_NEVER);
	cfg.password = "s3cret";
	cr_assert_eq(tally__poller_reconfigure(e.p, &cfg), 0);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	cr_assert_eq(must_entry(&e, "JOBS", "w").num_pending, 3);
	cr_assert_eq(log_count(2, "recovered"), 1, "%s", g_log.text);
	env_free(&e);
}

Test(poller, reconfigure_keeps_watched_values_and_drops_the_rest)
{
	struct env e = { 0 };
	struct tally_poller_watch w1[] = { { .stream = "A" }, { .stream = "B", .consumer = "x" } };
	struct tally_poller_watch w2[] = { { .stream = "A" }, { .stream = "B", .consumer = "y" } };
	struct tally_poller_config cfg;
	struct tally__pending_view v;
	int idx;

	env_server(&e, NULL, true);
	env_connect(&e);
	env_section(&e, 8);
	add_stream(&e, "A", "a.>");
	add_stream(&e, "B", "b.>");
	add_consumer(&e, "A", "a1", NULL);
	add_consumer(&e, "B", "x", NULL);
	add_consumer(&e, "B", "y", NULL);
	publish(&e, "a.1", 2);
	cfg = base_cfg(e.srv.url, w1, 2);
	cfg.manual = true;
	start_poller(&e, &cfg);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	idx = find_entry(&e, "A", "a1", &v);
	cr_assert_geq(idx, 0);
	cfg.watches = w2;
	cr_assert_eq(tally__poller_reconfigure(e.p, &cfg), 0);
	cr_assert_eq(find_entry(&e, "A", "a1", &v), idx);
	cr_assert_eq(v.source, TALLY__PENDING_LIVE);
	cr_assert_eq(v.num_pending, 2);
	cr_assert_lt(find_entry(&e, "B", "x", &v), 0, "no longer watched: cleared");
	cr_assert_eq(must_entry(&e, "B", "y").source, TALLY__PENDING_NEVER);
	cr_assert_eq(tally__poller_poll_once(e.p), 0);
	cr_assert_eq(must_entry(&e, "B", "y").source, TALLY__PENDING_LIVE);
	env_free(&e);
}

Test(poller, bad_configuration_is_rejected_with_a_reason)
{
	struct env e = { 0 };
	struct tally_poller_watch bad_name[] = { { .stream = "has.dot" } };
	struct tally_poller_watch dup[] = { { .stream = "A" }, { .stream = "A" } };
	struct tally_poller_watch bad_map[] = { { .stream = "A", .map_subject = "a..b" } };
	struct tally_poller_watch ok[] = { { .stream = "A" } };
	char why[256], longname[200];
	struct tally_poller_config cfg = base_cfg("nats://127.0.0.1:1", bad_name, 1);

	env_section(&e, 4);
	cr_assert_eq(tally__poller_config_check(&cfg, why, sizeof(why)), -EINVAL);
	cr_assert(strstr(why, "stream name"), "%s", why);
	cfg.watches = dup;
	cfg.nwatches = 2;
	cr_assert_eq(tally__poller_config_check(&cfg, why, sizeof(why)), -EINVAL);
	cr_assert(strstr(why, "repeats"), "%s", why);
	cfg.watches = bad_map;
	cfg.nwatches = 1;
	cr_assert_eq(tally__poller_config_check(&cfg, why, sizeof(why)), -EINVAL);
	cr_assert(strstr(why, "map_subject"), "%s", why);
	memset(longname, 'n', sizeof(longname) - 1);
	longname[sizeof(longname) - 1] = '\0';
	ok[0].stream = longname;
	cfg.watches = ok;
	cr_assert_eq(tally__poller_config_check(&cfg, why, sizeof(why)), -EINVAL);
	cr_assert(strstr(why, "1..127 bytes"), "%s", why);
	cr_assert_eq(tally__poller_start(&cfg, e.section, e.len, e.cap, &e.p), -EINVAL);
	cr_assert_null(e.p);
	ok[0].stream = "A";
	cfg.js_domain = "hub";
	cfg.js_prefix = "$JS.hub.API";
	cr_assert_eq(tally__poller_config_check(&cfg, why, sizeof(why)), -EINVAL);
	cfg.js_prefix = NULL;
	cr_assert_eq(tally__poller_config_check(&cfg, why, sizeof(why)), 0);
	cr_assert_eq(tally__poller_start(&cfg, e.section, 100, e.cap, &e.p), -EBADMSG);
	env_free(&e);
}

Test(poller, slow_polls_skip_ticks_and_count_them)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = "BIG" } };
	struct tally_poller_config cfg;
	struct tally__poller_stats st;
	double end;

	env_server(&e, NULL, true);
	env_connect(&e);
	env_section(&e, 600);
	add_stream(&e, "BIG", "big.*");
	add_many(&e, "BIG", 520); /* 3 LIST pages: a poll takes a few ms */
	cfg = base_cfg(e.srv.url, w, 1);
	cfg.poll_interval_ms = 1;
	start_poller(&e, &cfg);
	for (end = mono_s() + 10; mono_s() < end;) {
		tally__poller_stats(e.p, &st);
		if (st.skipped_overrun > 0 && st.polls_ok >= 3)
			break;
		sleep_ms(20);
	}
	cr_assert_gt(st.skipped_overrun, 0, "last poll took %.2f ms",
		     (double)st.last_poll_ns / 1e6);
	cr_assert_eq(st.polls_failed, 0);
	env_free(&e);
}

/* ---- the JetStream reply reader (poller.c), fed by hand ---- */

TestSuite(jsreply, .timeout = 30);

struct seen {
	int n, missing;
	struct tally__js_consumer last;
};

static int on_consumer(void *ctx, const struct tally__js_consumer *c, bool missing)
{
	struct seen *s = ctx;

	s->n++;
	s->missing += missing;
	s->last = *c;
	return 0;
}

static int parse_list_str(const char *json, struct tally__js_page *page, struct seen *s)
{
	memset(s, 0, sizeof(*s));
	return tally__js_parse_list(json, strlen(json), page, on_consumer, s);
}

Test(jsreply, list_page_fields)
{
	const char *json =
		"{\"type\":\"io.nats.jetstream.api.v1.consumer_list_response\",\"total\":300,"
		"\"offset\":256,\"limit\":256,\"consumers\":[{\"stream_name\":\"S\",\"name\":\"c\\u00e9\","
		"\"created\":\"2024-01-01T00:00:00Z\",\"config\":{\"durable_name\":\"c\",\"filter_subject\":"
		"\"a.*\",\"backoff\":[1,2.5e3,-3],\"x\":{\"y\":[null,true,false]}},\"delivered\":"
		"{\"consumer_seq\":4,\"stream_seq\":9},\"ack_floor\":{\"consumer_seq\":2,\"stream_seq\":7},"
		"\"num_ack_pending\":2,\"num_redelivered\":1,\"num_waiting\":-1,\"num_pending\":"
		"99999999999999999999999,\"cluster\":{\"leader\":\"N1\"}}],\"missing\":[\"gone1\"]}";
	struct tally__js_page page;
	struct seen s;

	cr_assert_eq(parse_list_str(json, &page, &s), 0);
	cr_assert_eq(page.total, 300);
	cr_assert_eq(page.offset, 256);
	cr_assert_eq(page.count, 1);
	cr_assert_eq(page.missing, 1);
	cr_assert_eq(s.n, 2);
	cr_assert_eq(s.missing, 1);
	cr_assert_str_eq(s.last.name, "gone1");
	memset(&s, 0, sizeof(s));
	cr_assert_eq(tally__js_parse_list(json, strlen(json) - 21, &page, on_consumer, &s), -EBADMSG);
	cr_assert_eq(s.n, 1, "the complete consumer was delivered");
	cr_assert_str_eq(s.last.name, "c\xc3\xa9");
	cr_assert_str_eq(s.last.filter, "a.*");
	cr_assert_eq(s.last.delivered_stream_seq, 9);
	cr_assert_eq(s.last.ack_floor_stream_seq, 7);
	cr_assert_eq(s.last.num_ack_pending, 2);
	cr_assert_eq(s.last.num_waiting, 0, "negative clamps to 0");
	cr_assert_eq(s.last.num_pending, UINT64_MAX, "saturates");
	cr_assert(s.last.has_cluster);
	cr_assert_str_eq(s.last.leader, "N1");
}

Test(jsreply, errors_and_info)
{
	const char *err = "{\"type\":\"x\",\"error\":{\"code\":404,\"err_code\":10014,"
			  "\"description\":\"consumer not found\"}}";
	const char *info = " {\"stream_name\":\"S\",\"name\":\"w\",\"config\":{\"filter_subject\":null},"
			   "\"num_pending\":5,\"cluster\":null} \n";
	struct tally__js_consumer c;
	struct tally__js_error e;

	cr_assert_eq(tally__js_parse_info(err, strlen(err), &c, &e), 0);
	cr_assert_eq(e.code, 404);
	cr_assert_eq(e.err_code, 10014);
	cr_assert_str_eq(e.description, "consumer not found");
	cr_assert_eq(tally__js_parse_info(info, strlen(info), &c, &e), 0);
	cr_assert_eq(e.code, 0);
	cr_assert_eq(c.num_pending, 5);
	cr_assert_str_eq(c.filter, "");
	cr_assert_not(c.has_cluster);
}

Test(jsreply, malformed_is_rejected_within_bounds)
{
	static const char *const bad[] = {
		"", "{", "}", "[]", "{\"total\":}", "{\"total\":1,}", "{\"a\":\"\\x\"}", "{\"a\":\"\\u12\"}",
		"{\"a\":tru}", "{\"a\":1} x", "{\"a\":\"unterminated}", "{\"consumers\":[{]}",
		"{\"a\":\"ctl\x01\"}", "{\"a\" 1}", "{\"consumers\":{}}", "nul",
	};
	struct tally__js_page page;
	struct seen s;
	char deep[200];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert_eq(parse_list_str(bad[i], &page, &s), -EBADMSG, "accepted: %s", bad[i]);
	memset(deep, '[', sizeof(deep));
	memcpy(deep, "{\"x\":", 5);
	deep[sizeof(deep) - 1] = '\0';
	cr_assert_eq(parse_list_str(deep, &page, &s), -EBADMSG, "nesting is bounded");
	cr_assert_eq(tally__js_parse_list(NULL, 0, &page, NULL, NULL), -EBADMSG);
	/* Over-long names are flagged, not trusted. */
	{
		char big[400] = "{\"consumers\":[{\"name\":\"";
		size_t n = strlen(big);

		memset(big + n, 'n', 200);
		strcpy(big + n + 200, "\"}]}");
		cr_assert_eq(parse_list_str(big, &page, &s), 0);
		cr_assert(s.last.name_too_long);
	}
}
