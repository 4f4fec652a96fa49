/* SPDX-License-Identifier: MIT */
/*
 * tests/test_hosts_cluster.c: the poller against a real 3-node JetStream
 * cluster (tests/common/nats_cluster.c: three nats-server processes on
 * 127.0.0.1 with routes on loopback ports), an R3 stream and R3 consumers.
 * Across a leader change, made both by $JS.API.CONSUMER.LEADER.STEPDOWN
 * and by killing the leader's process, every poll result must hold the
 * right num_pending (live, or cached with its age growing, never a
 * placeholder 0 and never a large number), name the server whose numbers
 * they are, and follow the new leader. A consumer deleted in the cluster
 * reads gone with backlog 0; a configured one that never existed reads
 * not_found. Polls are manual (tally__poller_poll_once); every wait is
 * bounded and generous (elections take seconds on a loaded machine).
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <errno.h>
#include <nats/nats.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/nats_cluster.h"
#include "pending.h"
#include "poller.h"

#define STREAM "ORD"
#define WAIT_S 40.0

/* A consumer whose every poll result is checked, and what it must hold. */
struct tracked {
	const char *name;
	uint64_t want;
	uint64_t last_ok; /* last_ok_ns of its last good value, 0 not yet */
};

struct env {
	struct tally_test_cluster cl;
	struct tracked t[2];
	int nt;
	int leaderless; /* polls that found a reply naming no leader */
	natsConnection *nc;
	jsCtx *js;
	void *section;
	size_t len;
	struct tally__poller *p;
};

static void quiet_log(void *ctx, int level, const char *msg)
{
	(void)ctx;
	if (getenv("TALLY_TEST_LOG"))
		fprintf(stderr, "poller log [%d] %s\n", level, msg);
}

static double mono_s(void)
{
	return (double)tally__pending_now_ns() / 1e9;
}

static void sleep_ms(int ms)
{
	usleep((useconds_t)ms * 1000);
}

/* A request that retries while the cluster answers 503 or not at all (elections). */
static void js_req(struct env *e, const char *subj, const char *body, const char *want)
{
	double end = mono_s() + WAIT_S;
	char last[512] = "no reply";

	while (mono_s() < end) {
		natsMsg *m = NULL;
		natsStatus s = natsConnection_RequestString(&m, e->nc, subj, body, 3000);

		if (s == NATS_OK) {
			snprintf(last, sizeof(last), "%.*s", natsMsg_GetDataLength(m), natsMsg_GetData(m));
			natsMsg_Destroy(m);
			if (strstr(last, want))
				return;
		}
		sleep_ms(200);
	}
	cr_assert_fail("%s: wanted %s, last reply %s", subj, want, last);
}

static void env_start(struct env *e, uint32_t cap)
{
	natsOptions *o = NULL;
	int rc = tally_test_cluster_start(&e->cl);

	cr_assert_eq(rc, 0, "cluster did not start: %s", e->cl.errmsg);
	cr_assert_eq(natsOptions_Create(&o), NATS_OK);
	natsOptions_SetServers(o, (const char *[]){ e->cl.node[0].url, e->cl.node[1].url, e->cl.node[2].url },
			       3);
	natsOptions_SetMaxReconnect(o, -1);
	natsOptions_SetReconnectWait(o, 100);
	cr_assert_eq(natsConnection_Connect(&e->nc, o), NATS_OK);
	natsOptions_Destroy(o);
	cr_assert_eq(natsConnection_JetStream(&e->js, e->nc, NULL), NATS_OK);
	js_req(e, "$JS.API.STREAM.CREATE." STREAM,
	       "{\"name\":\"" STREAM "\",\"subjects\":[\"orders.>\"],\"num_replicas\":3}", "\"config\"");
	js_req(e, "$JS.API.CONSUMER.DURABLE.CREATE." STREAM ".W",
	       "{\"stream_name\":\"" STREAM "\",\"config\":{\"durable_name\":\"W\",\"ack_policy\":\"explicit\","
	       "\"filter_subject\":\"orders.>\",\"num_replicas\":3}}", "\"config\"");
	e->len = tally__pending_section_size(cap);
	e->section = aligned_alloc(64, (e->len + 63) & ~(size_t)63);
	cr_assert_not_null(e->section);
	cr_assert_eq(tally__pending_init(e->section, e->len, cap), 0);
}

static void env_free(struct env *e)
{
	tally__poller_stop(&e->p);
	jsCtx_Destroy(e->js);
	natsConnection_Destroy(e->nc);
	tally_test_cluster_stop(&e->cl);
	free(e->section);
}

static void publish(struct env *e, int n)
{
	for (int i = 0; i < n; i++) {
		jsPubOptions po;
		jsErrCode ec = 0;
		natsStatus s;
		double end = mono_s() + WAIT_S;

		jsPubOptions_Init(&po);
		po.MaxWait = 3000;
		while ((s = js_Publish(NULL, e->js, "orders.x", "x", 1, &po, &ec)) != NATS_OK && mono_s() < end)
			sleep_ms(200);
		cr_assert_eq(s, NATS_OK, "publish: %s (%d)", natsStatus_GetText(s), (int)ec);
	}
}

static int find_entry(const struct env *e, const char *consumer, struct tally__pending_view *v)
{
	int cap = tally__pending_check(e->section, e->len);

	for (int i = 0; i < cap; i++)
		if (tally__pending_read_entry(e->section, e->len, (uint32_t)i, v) == 0 &&
		    strcmp(v->stream, STREAM) == 0 && strcmp(v->consumer, consumer) == 0)
			return i;
	return -1;
}

/* Whatever a poll leaves, the entry never holds a wrong number: it is the
 * expected backlog (live, or cached with its age), or never refreshed. */
static void check_right(const struct env *e, struct tracked *t)
{
	const char *consumer = t->name;
	uint64_t want = t->want, *last_ok = &t->last_ok;
	struct tally__pending_view v;

	if (find_entry(e, consumer, &v) < 0) {
		cr_assert_eq(*last_ok, 0, "%s: its entry left the table", consumer);
		return; /* a whole-stream watch before its first good poll */
	}
	if (v.source == TALLY__PENDING_NEVER)
		return;
	cr_assert(v.source == TALLY__PENDING_LIVE || v.source == TALLY__PENDING_CACHED,
		  "%s: source %s during the leader change (%s)", consumer, tally__pending_source_name(v.source),
		  v.last_error);
	cr_assert_eq(v.num_pending, want, "%s: num_pending %llu, the stream holds %llu (source %s, server %s)",
		     consumer, (unsigned long long)v.num_pending, (unsigned long long)want,
		     tally__pending_source_name(v.source), v.server);
	if (v.source == TALLY__PENDING_CACHED) {
		if (!*last_ok)
			*last_ok = v.last_ok_ns;
		cr_assert_eq(v.last_ok_ns, *last_ok, "%s: a cached entry keeps the time of its last good "
			     "value (its age grows)", consumer);
		cr_assert_neq(v.is_leader, -1, "the values came from a server: known");
	} else {
		cr_assert_eq(v.is_leader, 1);
		cr_assert_geq(v.last_ok_ns, *last_ok);
		*last_ok = v.last_ok_ns;
	}
}

/* Poll until consumer is live with a leader other than old ("" any), every
 * result checked on the way. Returns the new leader's index. */
static void check_all(struct env *e)
{
	for (int i = 0; i < e->nt; i++)
		check_right(e, &e->t[i]);
}

static int poll_until_leader(struct env *e, const char *consumer, const char *old, int *cached_seen)
{
	double end = mono_s() + WAIT_S;
	struct tally__pending_view v = { 0 };

	while (mono_s() < end) {
		(void)tally__poller_poll_once(e->p);
		check_all(e);
		if (find_entry(e, consumer, &v) < 0)
			v.source = TALLY__PENDING_NEVER;
		if (v.source == TALLY__PENDING_CACHED)
			++*cached_seen, e->leaderless += v.is_leader == 0;
		if (v.source == TALLY__PENDING_LIVE && v.server[0] && strcmp(v.server, old) != 0) {
			int i = tally_test_cluster_index(v.server);

			cr_assert_geq(i, 0, "server %s is one of n1..n3", v.server);
			return i;
		}
		sleep_ms(100);
	}
	cr_assert_fail("%s: no live reply from a new leader (was %s) within %.0f s; last source %s server %s (%s)",
		       consumer, old, WAIT_S, tally__pending_source_name(v.source), v.server, v.last_error);
	return -1;
}

TestSuite(hosts_cluster, .timeout = 240);

Test(hosts_cluster, pending_stays_right_across_stepdown_and_leader_kill)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = STREAM }, { .stream = STREAM, .consumer = "P" } };
	struct tally_poller_config cfg = {
		.watches = w, .nwatches = 2, .request_timeout_ms = 2000, .breaker_threshold = 1000,
		.reconnect_wait_ms = 100, .reconnect_jitter_ms = 50, .manual = true, .log = quiet_log,
	};
	int lw, lw2, lp, cached = 0;
	char old[32];
	struct tally__pending_view v;

	env_start(&e, 16);
	js_req(&e, "$JS.API.CONSUMER.DURABLE.CREATE." STREAM ".P",
	       "{\"stream_name\":\"" STREAM "\",\"config\":{\"durable_name\":\"P\",\"ack_policy\":\"explicit\","
	       "\"filter_subject\":\"orders.>\",\"num_replicas\":3}}", "\"config\"");
	publish(&e, 7);
	e.t[0] = (struct tracked){ .name = "W", .want = 7 };
	e.t[1] = (struct tracked){ .name = "P", .want = 7 };
	e.nt = 2;
	cfg.urls = e.cl.urls;
	cr_assert_eq(tally__poller_start(&cfg, e.section, e.len, 16, &e.p), 0);
	/* The whole-stream watch (LIST) and the configured pair (INFO) both name their leader. */
	lw = poll_until_leader(&e, "W", "", &cached);
	poll_until_leader(&e, "P", "", &cached);

	/* Step the leader of W down: the poller follows the new one, the count stays. */
	snprintf(old, sizeof(old), "n%d", lw + 1);
	js_req(&e, "$JS.API.CONSUMER.LEADER.STEPDOWN." STREAM ".W", "", "\"success\":true");
	lw2 = poll_until_leader(&e, "W", old, &cached);
	cr_assert_neq(lw2, lw);

	/* More messages (wait until both show them), then kill the process that leads P. */
	publish(&e, 3);
	for (double end = mono_s() + WAIT_S; mono_s() < end; usleep(100 * 1000)) {
		struct tally__pending_view vw, vp;

		(void)tally__poller_poll_once(e.p);
		if (find_entry(&e, "W", &vw) >= 0 && find_entry(&e, "P", &vp) >= 0 && vw.num_pending == 10 &&
		    vp.num_pending == 10 && vw.source == TALLY__PENDING_LIVE && vp.source == TALLY__PENDING_LIVE)
			break;
	}
	e.t[0].want = e.t[1].want = 10;
	check_all(&e);
	cr_assert_geq(find_entry(&e, "P", &v), 0);
	cr_assert_eq(v.source, TALLY__PENDING_LIVE);
	lp = tally_test_cluster_index(v.server);
	cr_assert_geq(lp, 0, "P's server %s", v.server);
	snprintf(old, sizeof(old), "n%d", lp + 1);
	tally_test_nats_kill(&e.cl.node[lp]);
	poll_until_leader(&e, "P", old, &cached);
	poll_until_leader(&e, "W", old, &cached);

	/* The node comes back: nothing changes for the numbers. */
	cr_assert_eq(tally_test_nats_restart(&e.cl.node[lp]), 0, "%s", e.cl.node[lp].errmsg);
	cr_assert_eq(tally_test_cluster_wait_js(&e.cl, lp, 30000), 0, "%s", e.cl.errmsg);
	for (int i = 0; i < 5; i++) {
		(void)tally__poller_poll_once(e.p);
		check_all(&e);
		usleep(100 * 1000);
	}
	cr_log_info("polls that left an entry cached during the leader changes: %d (%d for a reply "
		    "naming no leader)", cached, e.leaderless);
	env_free(&e);
}

Test(hosts_cluster, missing_consumer_is_gone_or_not_found_never_a_backlog)
{
	struct env e = { 0 };
	struct tally_poller_watch w[] = { { .stream = STREAM }, { .stream = STREAM, .consumer = "NOPE" } };
	struct tally_poller_config cfg = {
		.watches = w, .nwatches = 2, .request_timeout_ms = 2000, .breaker_threshold = 1000,
		.reconnect_wait_ms = 100, .reconnect_jitter_ms = 50, .manual = true, .log = quiet_log,
	};
	struct tally__pending_view v;
	struct tally__pending_result r;
	int cached = 0;
	double end;

	env_start(&e, 16);
	publish(&e, 50);
	cfg.urls = e.cl.urls;
	cr_assert_eq(tally__poller_start(&cfg, e.section, e.len, 16, &e.p), 0);
	e.t[0] = (struct tracked){ .name = "W", .want = 50 };
	e.nt = 1;
	poll_until_leader(&e, "W", "", &cached);
	cr_assert_geq(find_entry(&e, "NOPE", &v), 0);
	cr_assert_eq(v.source, TALLY__PENDING_NOTFOUND, "configured, never existed: %s",
		     tally__pending_source_name(v.source));
	cr_assert_eq(v.num_pending, 0);
	js_req(&e, "$JS.API.CONSUMER.DELETE." STREAM ".W", "", "\"success\":true");
	end = mono_s() + WAIT_S;
	do {
		(void)tally__poller_poll_once(e.p);
		cr_assert_geq(find_entry(&e, "W", &v), 0);
		cr_assert(v.num_pending == 0 || v.num_pending == 50, "never a large backlog: %llu",
			  (unsigned long long)v.num_pending);
		if (v.source == TALLY__PENDING_GONE)
			break;
		sleep_ms(100);
	} while (mono_s() < end);
	cr_assert_eq(v.source, TALLY__PENDING_GONE, "deleted: %s", tally__pending_source_name(v.source));
	cr_assert_eq(v.num_pending, 0);
	cr_assert_eq(v.is_leader, -1);
	cr_assert_eq(tally__pending_for_subject(e.section, e.len, "orders.x", NULL, &r), 0);
	cr_assert_eq(r.backlog, 0, "a missing consumer is no backlog");
	cr_assert_eq(r.tier, TALLY__PENDING_TIER_ABSENT);
	env_free(&e);
}

/* The placeholder a meta leader sends while a consumer has no leader:
 * a cluster without "leader" (Go omits it), num_pending 0. It must read
 * as a cluster answer without a leader, so the poller does not take it. */
Test(hosts_cluster, reply_without_leader_is_told_apart)
{
	static const char leaderless[] = "{\"stream_name\":\"ORD\",\"name\":\"W\",\"num_pending\":0,"
					 "\"cluster\":{\"name\":\"C\"}}";
	static const char led[] = "{\"stream_name\":\"ORD\",\"name\":\"W\",\"num_pending\":7,"
				  "\"cluster\":{\"name\":\"C\",\"leader\":\"n2\"}}";
	static const char standalone[] = "{\"stream_name\":\"ORD\",\"name\":\"W\",\"num_pending\":7}";
	struct tally__js_consumer c;
	struct tally__js_error err;

	cr_assert_eq(tally__js_parse_info(leaderless, sizeof(leaderless) - 1, &c, &err), 0);
	cr_assert(c.has_cluster);
	cr_assert_str_eq(c.leader, "");
	cr_assert_eq(tally__js_parse_info(led, sizeof(led) - 1, &c, &err), 0);
	cr_assert(c.has_cluster);
	cr_assert_str_eq(c.leader, "n2");
	cr_assert_eq(tally__js_parse_info(standalone, sizeof(standalone) - 1, &c, &err), 0);
	cr_assert_not(c.has_cluster);
}
