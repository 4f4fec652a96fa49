/* SPDX-License-Identifier: MIT */
/*
 * part_jsack.c: the benchmark part "jsack" (issue 17). It owns the cost
 * per message of learning a message's wait and its consumer's pending
 * from the ack reply: tally_jsack_parse alone, parse plus record
 * (tally_record_jetstream_at with the caller's clock, and
 * tally_record_jetstream reading CLOCK_REALTIME itself), against, in the
 * same run, the two other ways to learn the same: cnats'
 * natsMsg_GetMetaData on the delivered message (it allocates its
 * strings), and one CONSUMER.INFO request per message to a real
 * nats-server on loopback. The replies are real: captured from that
 * server. Every row is the median of --reps repetitions; the ratios are
 * against the parse-plus-record row. Target: parse plus record <= 30 ns.
 * A last row records the same replies rewritten into the 12-token layout
 * of nats-server 2.10 (domain "_", an 8-character account hash, a
 * 16-character random token: 84-86 bytes), which the server here does
 * not send.
 */
#include "config.h"

#include <nats/nats.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <tally/tally.h>

#include "harness.h"
#include "nats_server.h"

#define NREPLY 256
#define RING (1u << 20)

struct jb {
	struct tally_test_nats srv;
	natsConnection *nc;
	jsCtx *js;
	natsSubscription *sub;
	natsMsgList list;
	char reply[NREPLY][128];
	size_t len[NREPLY];
	char reply12[NREPLY][160]; /* the same, in the 12-token layout */
	size_t len12[NREPLY];
	int n;
	struct tally_segment *seg;
	struct tally_engine *eng;
	struct tally_producer *p;
	tally_subject_t id;
};

static int jb_setup(struct jb *b)
{
	const char *subjects[] = { "bench.>" };
	jsStreamConfig sc;
	jsConsumerConfig cc;
	jsErrCode ec = 0;

	if (tally_test_nats_start(&b->srv, NULL, true) != 0) {
		fprintf(stderr, "bench jsack: %s\n", b->srv.errmsg);
		return -1;
	}
	if (natsConnection_ConnectTo(&b->nc, b->srv.url) != NATS_OK ||
	    natsConnection_JetStream(&b->js, b->nc, NULL) != NATS_OK)
		return -1;
	jsStreamConfig_Init(&sc);
	sc.Name = "BENCH";
	sc.Subjects = subjects;
	sc.SubjectsLen = 1;
	jsConsumerConfig_Init(&cc);
	cc.Durable = "router";
	cc.AckPolicy = js_AckExplicit;
	if (js_AddStream(NULL, b->js, &sc, NULL, &ec) != NATS_OK ||
	    js_AddConsumer(NULL, b->js, "BENCH", &cc, NULL, &ec) != NATS_OK)
		return -1;
	for (int i = 0; i < NREPLY; i++)
		if (js_Publish(NULL, b->js, "bench.orders.created", "x", 1, NULL, &ec) != NATS_OK)
			return -1;
	if (js_PullSubscribe(&b->sub, b->js, "bench.>", "router", NULL, NULL, &ec) != NATS_OK ||
	    natsSubscription_Fetch(&b->list, b->sub, NREPLY, 5000, &ec) != NATS_OK)
		return -1;
	for (b->n = 0; b->n < b->list.Count; b->n++) {
		snprintf(b->reply[b->n], sizeof(b->reply[0]), "%s", natsMsg_GetReply(b->list.Msgs[b->n]));
		b->len[b->n] = strlen(b->reply[b->n]);
		snprintf(b->reply12[b->n], sizeof(b->reply12[0]), "$JS.ACK._.Zb3k9QmA.%s.Xy12Ab34CdEf56Gh",
			 natsMsg_GetReply(b->list.Msgs[b->n]) + 8);
		b->len12[b->n] = strlen(b->reply12[b->n]);
	}
	struct tally_segment_config cfg;
	char name[64];
	tally_segment_config_init(&cfg);
	cfg.ring_capacity = RING;
	cfg.producer_slots = 4;
	snprintf(name, sizeof(name), "tally-bench-jsack-%d", (int)getpid());
	if (tally_segment_create(name, &cfg, 0, &b->seg) != 0 || tally_engine_start(b->seg, NULL, &b->eng) != 0 ||
	    tally_producer_attach(b->seg, &b->p) != 0 ||
	    tally_subject_intern(b->seg, "bench.orders.created", &b->id) != 0)
		return -1;
	return b->n == NREPLY ? 0 : -1;
}

static void jb_teardown(struct jb *b)
{
	tally_producer_detach(&b->p);
	tally_engine_stop(&b->eng);
	tally_segment_close(&b->seg);
	natsMsgList_Destroy(&b->list);
	natsSubscription_Destroy(b->sub);
	jsCtx_Destroy(b->js);
	natsConnection_Destroy(b->nc);
	tally_test_nats_stop(&b->srv);
}

/* Let the engine drain the ring, so that no record below meets a full one. */
static void drained(struct jb *b)
{
	struct tally_engine_counters c;
	struct tally_producer_counters pc;

	tally_producer_counters(b->p, &pc);
	do {
		usleep(2000);
		tally_engine_counters(b->eng, &c);
	} while (c.drained < pc.recorded);
}

enum what { PARSE, RECORD_AT, RECORD, GETMETA, INFO, RECORD_AT12 };

static double once(struct jb *b, enum what w, uint64_t ops)
{
	struct tally_jsack a;
	uint64_t sink = 0, now = tally_real_ns();

	if (w == RECORD_AT || w == RECORD || w == RECORD_AT12)
		drained(b);
	uint64_t t0 = bench_now_ns();
	for (uint64_t i = 0; i < ops; i++) {
		int k = (int)(i % NREPLY);
		switch (w) {
		case PARSE:
			tally_jsack_parse(b->reply[k], b->len[k], &a);
			sink += a.pending;
			break;
		case RECORD_AT:
			sink += (uint64_t)tally_record_jetstream_at(b->p, b->id, b->reply[k], b->len[k], now + i);
			break;
		case RECORD:
			sink += (uint64_t)tally_record_jetstream(b->p, b->id, b->reply[k], b->len[k]);
			break;
		case RECORD_AT12:
			sink += (uint64_t)tally_record_jetstream_at(b->p, b->id, b->reply12[k], b->len12[k], now + i);
			break;
		case GETMETA: {
			jsMsgMetaData *m = NULL;
			if (natsMsg_GetMetaData(&m, b->list.Msgs[k]) == NATS_OK)
				sink += m->NumPending;
			jsMsgMetaData_Destroy(m);
			break;
		}
		case INFO: {
			jsConsumerInfo *ci = NULL;
			jsErrCode ec = 0;
			if (js_GetConsumerInfo(&ci, b->js, "BENCH", "router", NULL, &ec) == NATS_OK)
				sink += ci->NumPending;
			jsConsumerInfo_Destroy(ci);
			break;
		}
		}
	}
	uint64_t t1 = bench_now_ns();
	__asm__ volatile("" : : "r"(sink) : "memory");
	return (double)(t1 - t0) / (double)ops;
}

void bench_part_jsack(void)
{
	static const struct { enum what w; const char *name; double ops; } cases[] = {
		{ RECORD_AT, "parse+record (caller's clock)", 300000 },
		{ RECORD, "parse+record (reads CLOCK_REALTIME)", 300000 },
		{ PARSE, "parse only", 1000000 },
		{ GETMETA, "natsMsg_GetMetaData", 300000 },
		{ INFO, "CONSUMER.INFO per message", 300 },
		{ RECORD_AT12, "parse+record (caller's clock), 12 tokens", 300000 },
	};
	struct jb b;
	double samples[256];

	memset(&b, 0, sizeof(b));
	if (jb_setup(&b) != 0) {
		fprintf(stderr, "bench jsack: setup failed (nats-server, stream, segment): %s\n", tally_errmsg());
		bench_failed = true;
		jb_teardown(&b);
		return;
	}
	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		uint64_t ops = (uint64_t)(cases[c].ops * bench_opts.scale);
		if (ops < 10)
			ops = 10;
		for (int i = 0; i < bench_opts.reps; i++)
			samples[i] = once(&b, cases[c].w, ops);
		bench_row("jsack", cases[c].name, "ns/msg", false, samples, bench_opts.reps,
			  c == 0 ? "natsMsg_GetMetaData|CONSUMER.INFO per message" : NULL, 0);
	}
	jb_teardown(&b);
}
