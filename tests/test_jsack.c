/* SPDX-License-Identifier: MIT */
/*
 * test_jsack.c: the ack reply parser and tally_record_jetstream (issue
 * 17). It owns the comparison with cnats: reply subjects captured from a
 * real nats-server 2.9 (the 9-token layout), each parsed by
 * tally_jsack_parse and by cnats' natsMsg_GetMetaData on the message it
 * came with; the same messages rewritten into the 12-token layout with a
 * domain and an account hash, and malformed subjects, parsed by both
 * (cnats through js_getMetaData, the function natsMsg_GetMetaData hands
 * the reply to: the server refuses a client's publish with a $JS.ACK
 * reply, and natsMsg_GetMetaData wants a message delivered by a
 * JetStream subscription, so only that call reads a reply we wrote);
 * subjects of every length up to 300 bytes in both layouts, each also
 * spoiled at every byte and cut at every length, so that every token edge
 * falls at every place of the parser's blocks; and
 * what recording them leaves in a real engine's
 * published stats: the wait, a clock skew clamped at 0 and counted, and
 * the consumer's pending as a live backlog sample; and that the record
 * call, which parses only what it stores, takes exactly those replies.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <nats/nats.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/helpers.h"
#include "common/nats_server.h"
#include "jsack.h" /* lib/jsack.h: tally__jsack_parse_record */

#define MS 1000000ull
#define NMSG 40

struct captured {
	char reply[256];
	jsMsgMetaData meta; /* natsMsg_GetMetaData's, strings copied */
	char stream[64], consumer[64];
};

/* libnats 3.4's own parser behind natsMsg_GetMetaData (exported by the
 * library, declared in its private src/js.h): reply without "$JS.ACK.". */
natsStatus js_getMetaData(const char *reply, char **domain, char **stream, char **consumer,
			  uint64_t *numDelivered, uint64_t *sseq, uint64_t *dseq, int64_t *tm,
			  uint64_t *numPending, int asked);

/* cnats' reading of a reply we wrote: 0 and *m (free with jsMsgMetaData_Destroy). */
static natsStatus cnats_meta(const char *reply, jsMsgMetaData **m)
{
	*m = NULL;
	if (strncmp(reply, "$JS.ACK.", 8) != 0)
		return NATS_INVALID_ARG; /* natsMsg_GetMetaData's own check */
	jsMsgMetaData *d = calloc(1, sizeof(*d));
	natsStatus s = js_getMetaData(reply + 8, &d->Domain, &d->Stream, &d->Consumer, &d->NumDelivered,
				      &d->Sequence.Stream, &d->Sequence.Consumer, &d->Timestamp,
				      &d->NumPending, 8);
	if (s != NATS_OK) {
		free(d->Domain);
		free(d->Stream);
		free(d->Consumer);
		free(d);
		return s;
	}
	*m = d;
	return NATS_OK;
}

static void expect_meta(const char *reply, const jsMsgMetaData *m)
{
	struct tally_jsack a;

	cr_assert_eq(tally_jsack_parse(reply, strlen(reply), &a), 0, "tally refuses %s", reply);
	cr_expect_eq(strlen(m->Stream), a.stream_len, "%s", reply);
	cr_expect(strncmp(m->Stream, a.stream, a.stream_len) == 0, "%s", reply);
	cr_expect_eq(strlen(m->Consumer), a.consumer_len, "%s", reply);
	cr_expect(strncmp(m->Consumer, a.consumer, a.consumer_len) == 0, "%s", reply);
	cr_expect_eq(m->NumDelivered, a.delivered, "%s", reply);
	cr_expect_eq(m->Sequence.Stream, a.stream_seq, "%s", reply);
	cr_expect_eq(m->Sequence.Consumer, a.consumer_seq, "%s", reply);
	cr_expect_eq((uint64_t)m->Timestamp, a.timestamp_ns, "%s", reply);
	cr_expect_eq(m->NumPending, a.pending, "%s", reply);
	if (m->Domain == NULL)
		cr_expect_null(a.domain, "%s", reply);
	else
		cr_expect(a.domain && strlen(m->Domain) == a.domain_len &&
			  strncmp(m->Domain, a.domain, a.domain_len) == 0, "%s", reply);
}

static void expect_same(const char *reply)
{
	jsMsgMetaData *m = NULL;

	cr_assert_eq(cnats_meta(reply, &m), NATS_OK, "cnats refuses %s", reply);
	expect_meta(reply, m);
	jsMsgMetaData_Destroy(m);
}

/* Publish NMSG messages, fetch them all, nak the first once so that it
 * comes again (delivered 2); the replies of every delivery into out. */
static int capture(struct captured *out, int cap)
{
	struct tally_test_nats srv = { 0 };
	natsConnection *nc = NULL;
	jsCtx *js = NULL;
	jsStreamConfig sc;
	jsConsumerConfig cc;
	jsErrCode ec = 0;
	natsSubscription *sub = NULL;
	const char *subjects[] = { "jsack.>" };
	int n = 0;

	cr_assert_eq(tally_test_nats_start(&srv, NULL, true), 0, "%s", srv.errmsg);
	cr_assert_eq(natsConnection_ConnectTo(&nc, srv.url), NATS_OK);
	cr_assert_eq(natsConnection_JetStream(&js, nc, NULL), NATS_OK);
	jsStreamConfig_Init(&sc);
	sc.Name = "JSACK";
	sc.Subjects = subjects;
	sc.SubjectsLen = 1;
	cr_assert_eq(js_AddStream(NULL, js, &sc, NULL, &ec), NATS_OK, "stream (%d)", (int)ec);
	jsConsumerConfig_Init(&cc);
	cc.Durable = "worker-1";
	cc.AckPolicy = js_AckExplicit;
	cr_assert_eq(js_AddConsumer(NULL, js, "JSACK", &cc, NULL, &ec), NATS_OK, "consumer (%d)", (int)ec);
	for (int i = 0; i < NMSG; i++)
		cr_assert_eq(js_Publish(NULL, js, i % 2 ? "jsack.a" : "jsack.b.c", "x", 1, NULL, &ec), NATS_OK);
	cr_assert_eq(js_PullSubscribe(&sub, js, "jsack.>", "worker-1", NULL, NULL, &ec), NATS_OK);
	bool nakked = false;
	while (n < cap) {
		natsMsgList list = { 0 };
		if (natsSubscription_Fetch(&list, sub, 16, 2000, &ec) != NATS_OK)
			break;
		for (int i = 0; i < list.Count && n < cap; i++) {
			struct captured *c = &out[n++];
			jsMsgMetaData *m = NULL;
			snprintf(c->reply, sizeof(c->reply), "%s", natsMsg_GetReply(list.Msgs[i]));
			cr_assert_eq(natsMsg_GetMetaData(&m, list.Msgs[i]), NATS_OK, "%s", c->reply);
			c->meta = *m;
			snprintf(c->stream, sizeof(c->stream), "%s", m->Stream);
			snprintf(c->consumer, sizeof(c->consumer), "%s", m->Consumer);
			c->meta.Stream = c->stream;
			c->meta.Consumer = c->consumer;
			c->meta.Domain = NULL;
			cr_assert_null(m->Domain, "a 2.9 server sends no domain");
			jsMsgMetaData_Destroy(m);
			if (!nakked) {
				natsMsg_Nak(list.Msgs[i], NULL);
				nakked = true;
			} else {
				natsMsg_Ack(list.Msgs[i], NULL);
			}
		}
		natsMsgList_Destroy(&list);
	}
	natsSubscription_Destroy(sub);
	jsCtx_Destroy(js);
	natsConnection_Destroy(nc);
	tally_test_nats_stop(&srv);
	return n;
}

Test(jsack, same_as_cnats_on_a_real_servers_replies, .timeout = 60)
{
	static struct captured c[NMSG + 8];
	int n = capture(c, NMSG + 8);
	bool redelivered = false, pending_seen = false;

	cr_assert_eq(n, NMSG + 1, "%d deliveries for %d messages and one nak", n, NMSG);
	for (int i = 0; i < n; i++) {
		char v2[400];
		struct tally_jsack a;
		expect_meta(c[i].reply, &c[i].meta);
		expect_same(c[i].reply);
		cr_assert_eq(tally_jsack_parse(c[i].reply, strlen(c[i].reply), &a), 0);
		cr_expect(a.stream_len == 5 && strncmp(a.stream, "JSACK", 5) == 0, "%s", c[i].reply);
		cr_expect_eq(a.consumer_len, 8);
		redelivered |= a.delivered == 2;
		pending_seen |= a.pending > 0;
		/* the same message in the 12-token layout: no domain ("_"), then one */
		snprintf(v2, sizeof(v2), "$JS.ACK._.ACCHASH7.%s.r4nd0m", c[i].reply + 8);
		expect_same(v2);
		cr_expect_null(a.domain);
		snprintf(v2, sizeof(v2), "$JS.ACK.hub.ACCHASH7.%s.r4nd0m", c[i].reply + 8);
		expect_same(v2);
		cr_assert_eq(tally_jsack_parse(v2, strlen(v2), &a), 0);
		cr_expect(a.domain_len == 3 && strncmp(a.domain, "hub", 3) == 0);
		cr_expect(a.account_hash_len == 8 && strncmp(a.account_hash, "ACCHASH7", 8) == 0);
	}
	cr_expect(redelivered, "the nakked message came back with delivered 2");
	cr_expect(pending_seen, "messages behind the first were counted pending");
}

/* Every length from the shortest subject to 300 bytes, so that each
 * token edge, dot and number falls at every place of the parser's 16- and
 * 64-byte blocks: names padded to length, both layouts, numbers of 1 to
 * 19 digits; each one parsed by both, and the same subject with one byte
 * spoiled (a space, a dot doubled, a letter in a number) refused by tally
 * wherever it falls. */
Test(jsack, same_as_cnats_at_every_length_and_offset)
{
	static const char *const nums[] = { "1", "42", "123456789", "1234567890123456", "12345678901234567",
					    "9223372036854775807", "0000000000000000001" };
	char stream[300], reply[700];
	struct tally_jsack a;
	int checked = 0;

	for (size_t sl = 1; sl < 240; sl++) {
		memset(stream, 'S', sl);
		stream[sl] = '\0';
		stream[sl / 2] = sl % 3 ? '-' : '_';
		for (int layout = 0; layout < 3; layout++) {
			const char *n = nums[sl % 7], *m = nums[(sl / 7) % 7];
			const char *head = layout == 0 ? "" : layout == 1 ? "_.H4sh." : "dom.AcC.";
			const char *tail = layout == 0 ? "" : layout == 1 ? ".r" : ".rNd.x.y";
			snprintf(reply, sizeof(reply), "$JS.ACK.%s%s.c%zu.%s.%s.%s.%s.%s%s", head, stream, sl % 10, n,
				 m, n, nums[5], m, tail);
			expect_same(reply);
			checked++;
			/* spoil one byte at every place after the prefix */
			size_t len = strlen(reply), hl = strlen(head), tl = strlen(tail);
			const char *num0 = strchr(reply + 8 + hl + sl + 1, '.') + 1; /* past the consumer */
			for (size_t i = 8; i < len; i++) {
				char keep = reply[i];
				bool in_numbers = reply + i >= num0 && i < len - tl;
				reply[i] = in_numbers && keep != '.' ? 'x' : i % 2 ? ' ' : '\x7f';
				cr_expect_eq(tally_jsack_parse(reply, len, &a), -EINVAL, "%s (byte %zu)", reply, i);
				if (keep != '.') {
					reply[i] = '.'; /* an empty token where a dot touches one, or a token more */
					if (reply[i - 1] == '.' || reply[i + 1] == '.' || i + 1 == len)
						cr_expect_eq(tally_jsack_parse(reply, len, &a), -EINVAL, "%s", reply);
				}
				reply[i] = keep;
			}
			/* and cut short at every length: only a whole old-layout subject is one */
			for (size_t l = 0; l < len; l++) {
				int rc = tally_jsack_parse(reply, l, &a);
				if (rc == 0) { /* a prefix that is a subject itself: cnats agrees */
					char cut[700];
					memcpy(cut, reply, l);
					cut[l] = '\0';
					expect_same(cut);
				}
			}
		}
	}
	cr_expect_eq(checked, 239 * 3);
}

/* Refused by both parsers. */
static const char *const bad_both[] = {
	"", "$JS.ACK", "$JS.ACK.", "$JS.ACK.S.C.1.2.3.4", "$JS.ACK.S.C.1.2.3.4.5.6",
	"$JS.ACK.S.C.1.2.x.4.5", "$JS.ACK.S.C.1.2.3.4.-5", "$JS.ACK.S.C.1.2.3.99999999999999999999.5",
	"$JS.ACK.S.C.1.2.3.9223372036854775808.5", "$JS.ACK.S.C.1.2.3.4.",
	"$JS.ACK.D.H.S.C.1.2.3.4.x.r", "$JS.ACK.S.C..2.3.4.5", "$JS.NAK.S.C.1.2.3.4.5",
	"_INBOX.abc.def", "$JS.ACK.D.H.S.C.1.2.3.4",
};

/* Refused by tally, stricter than cnats: bytes no subject holds, empty names. */
static const char *const bad_tally[] = {
	"$JS.ACK..C.1.2.3.4.5", "$JS.ACK.S..1.2.3.4.5", "$JS.ACK.S C.X.1.2.3.4.5",
	"$JS.ACK.S.C.1.2.3.4.5\n", "$JS.ACK.S.C.1.2.3.4.5.6.7..9",
};

Test(jsack, malformed_replies_are_refused)
{
	struct tally_jsack a;
	jsMsgMetaData *m;

	for (size_t i = 0; i < sizeof(bad_both) / sizeof(bad_both[0]); i++) {
		cr_expect_eq(tally_jsack_parse(bad_both[i], strlen(bad_both[i]), &a), -EINVAL, "%s", bad_both[i]);
		if (bad_both[i][0]) {
			cr_expect_neq(cnats_meta(bad_both[i], &m), NATS_OK, "cnats takes %s", bad_both[i]);
			jsMsgMetaData_Destroy(m);
		}
	}
	for (size_t i = 0; i < sizeof(bad_tally) / sizeof(bad_tally[0]); i++)
		cr_expect_eq(tally_jsack_parse(bad_tally[i], strlen(bad_tally[i]), &a), -EINVAL, "%s", bad_tally[i]);
	/* exactly len bytes: a NUL inside, and a valid prefix of a longer buffer */
	const char nul[] = "$JS.ACK.S.C.1.2.3.4.5\0junk";
	cr_expect_eq(tally_jsack_parse(nul, sizeof(nul) - 1, &a), -EINVAL);
	cr_expect_eq(tally_jsack_parse(nul, 21, &a), 0);
	cr_expect_eq(a.pending, 5);
	cr_expect_eq(tally_jsack_parse(NULL, 0, &a), -EINVAL);
	cr_expect_eq(tally_jsack_parse("$JS.ACK.S.C.1.2.3.9223372036854775807.5", 39, &a), 0);
	cr_expect_eq(a.timestamp_ns, 9223372036854775807ull);
}

struct rig {
	char name[64];
	struct tally_segment *seg, *rd;
	struct tally_engine *eng;
	struct tally_producer *p;
	tally_subject_t id;
};

static void rig_start(struct rig *r)
{
	struct tally_segment_config cfg;
	struct tally_engine_config ec;

	tt_config(&cfg);
	snprintf(r->name, sizeof(r->name), "%s", tt_segname("jsack"));
	cr_assert_eq(tally_segment_create(r->name, &cfg, 0, &r->seg), 0, "%s", tally_errmsg());
	tally_engine_config_init(&ec);
	ec.publish_interval_ms = 10;
	cr_assert_eq(tally_engine_start(r->seg, &ec, &r->eng), 0, "%s", tally_errmsg());
	cr_assert_eq(tally_segment_open(r->name, TALLY_OPEN_READER, 0, &r->rd), 0, "%s", tally_errmsg());
	cr_assert_eq(tally_producer_attach(r->seg, &r->p), 0);
	cr_assert_eq(tally_subject_intern(r->seg, "jsack.orders", &r->id), 0);
}

static void rig_stop(struct rig *r)
{
	tally_producer_detach(&r->p);
	tally_engine_stop(&r->eng);
	tally_segment_close(&r->rd);
	tally_segment_close(&r->seg);
}

/* Read until pred holds on a published row (bounded; a failure says what it saw). */
static void read_until(struct rig *r, struct tally_subject_stats *s, bool (*pred)(const struct tally_subject_stats *))
{
	for (int i = 0; i < 1000; i++) {
		if (tally_read_subject(r->rd, r->id, s) == 0 && pred(s))
			return;
		tt_sleep_ms(5);
	}
	cr_assert_fail("never published: wait_count %llu skewed %llu pending %llu",
		       (unsigned long long)s->wait_count, (unsigned long long)s->wait_skewed,
		       (unsigned long long)s->pending);
}

static bool has_100_waits(const struct tally_subject_stats *s)
{
	return s->wait_count == 100 && s->pending_consumers == 1;
}

static bool has_skew(const struct tally_subject_stats *s)
{
	return s->wait_skewed == 3 && s->wait_count == 103;
}

Test(jsack, waits_skew_and_pending_reach_the_segment, .timeout = 60)
{
	struct rig r;
	struct tally_subject_stats s;
	char reply[128];
	uint64_t now = 1700000000000000000ull;
	struct tally_producer_counters pc;

	rig_start(&r);
	/* 100 messages that waited 1..100 ms, the last with 7 pending behind it */
	for (uint64_t i = 1; i <= 100; i++) {
		snprintf(reply, sizeof(reply), "$JS.ACK.ORDERS.router.1.%llu.%llu.%llu.%llu",
			 (unsigned long long)i, (unsigned long long)i, (unsigned long long)(now - i * MS),
			 (unsigned long long)(i == 100 ? 7 : 100 - i));
		cr_assert_eq(tally_record_jetstream_at(r.p, r.id, reply, strlen(reply), now), 0);
	}
	cr_expect_eq(tally_record_jetstream_at(r.p, r.id, "_INBOX.x.y", 10, now), -EINVAL);
	tally_producer_counters(r.p, &pc);
	cr_expect_eq(pc.recorded, 200, "a wait and a pending entry per message, nothing for the inbox");
	read_until(&r, &s, has_100_waits);
	cr_expect(s.has_wait);
	cr_expect_eq(s.count, 0, "waits are not latencies");
	/* nearest rank within the histograms' 1/128 */
	cr_expect(s.wait_p50_ns >= 50 * MS * 127 / 128 && s.wait_p50_ns <= 50 * MS * 129 / 128, "%llu",
		  (unsigned long long)s.wait_p50_ns);
	cr_expect(s.wait_p99_ns >= 99 * MS * 127 / 128 && s.wait_p99_ns <= 99 * MS * 129 / 128, "%llu",
		  (unsigned long long)s.wait_p99_ns);
	cr_expect_eq(s.pending, 7, "the last sample's pending");
	cr_expect_eq(s.pending_source, TALLY_PENDING_LIVE);
	cr_expect_eq(s.wait_skewed, 0);
	/* three from a host whose clock is 2 s ahead: wait 0, counted */
	for (int i = 0; i < 3; i++) {
		snprintf(reply, sizeof(reply), "$JS.ACK.ORDERS.router.1.%d.%d.%llu.0", 200 + i, 200 + i,
			 (unsigned long long)(now + 2000 * MS));
		cr_assert_eq(tally_record_jetstream_at(r.p, r.id, reply, strlen(reply), now), 0);
	}
	read_until(&r, &s, has_skew);
	cr_expect_eq(s.pending, 0);
	rig_stop(&r);
}

/* The record call parses only what it stores (lib/jsack.c): every reply
 * that tally_jsack_parse refuses it refuses too, and every one it takes
 * it reads the same. Each number position is given numbers of 1 to 20
 * digits, at and past INT64_MAX, and with a letter, in both layouts,
 * short (the one-pass path, under 64 bytes) and long. */
Test(jsack, record_path_takes_exactly_what_the_parser_takes, .timeout = 60)
{
	static const char *const nums[] = { "1", "42", "1234567890123456", "12345678901234567",
					    "9223372036854775807", "9223372036854775808", "99999999999999999999",
					    "00000000000000000001", "1x", "x", "0000000000000000001" };
	static const char *const heads[] = { "", "_.H.", "dom.H4sh0123456789012345678901234567890123456789." };
	static const char *const tails[] = { "", ".r", ".rNd.x" };
	static const char *const streams[] = { "S", "ORDERS", "a-stream-of-twenty-c" };
	struct rig r;
	struct tally_jsack a, m;
	char reply[256];
	int accepted = 0, refused = 0;

	rig_start(&r);
	for (size_t h = 0; h < 3; h++)
		for (size_t st = 0; st < 3; st++)
			for (int pos = 0; pos < 5; pos++)
				for (size_t v = 0; v < sizeof(nums) / sizeof(nums[0]); v++) {
					const char *n[5] = { "3", "17", "17", "1700000000000000000", "5" };
					n[pos] = nums[v];
					snprintf(reply, sizeof(reply), "$JS.ACK.%s%s.c.%s.%s.%s.%s.%s%s", heads[h],
						 streams[st], n[0], n[1], n[2], n[3], n[4], tails[h]);
					size_t len = strlen(reply);
					int rc = tally_jsack_parse(reply, len, &a);
					cr_assert_eq(tally__jsack_parse_record(reply, len, &m), rc, "%s", reply);
					int rrc = tally_record_jetstream_at(r.p, r.id, reply, len, 1800000000000000000ull);
					if (rc != 0) {
						cr_expect_eq(rrc, -EINVAL, "%s", reply);
						refused++;
						continue;
					}
					accepted++;
					cr_expect_neq(rrc, -EINVAL, "%s", reply);
					cr_expect(m.stream == a.stream && m.stream_len == a.stream_len &&
						  m.consumer == a.consumer && m.consumer_len == a.consumer_len &&
						  m.timestamp_ns == a.timestamp_ns && m.pending == a.pending,
						  "%s", reply);
				}
	/* per layout, stream and position, 6 of the 11 are numbers */
	cr_expect_eq(accepted, 3 * 3 * 5 * 6, "%d accepted", accepted);
	cr_expect_eq(refused, 3 * 3 * 5 * 5, "%d refused", refused);
	rig_stop(&r);
}
