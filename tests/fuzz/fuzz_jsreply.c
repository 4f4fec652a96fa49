/* SPDX-License-Identifier: MIT */
/*
 * fuzz_jsreply.c: libFuzzer target for the poller's own JSON reader of
 * JetStream API replies (lib/poller.c): tally__js_parse_list
 * ($JS.API.CONSUMER.LIST.<stream>) and tally__js_parse_info
 * ($JS.API.CONSUMER.INFO.<stream>.<consumer>). The poller feeds them the
 * bytes a NATS server (or anything that answers on that subject) sent, so
 * they must survive any bytes.
 *
 * Input: the whole input is the reply, given to both parsers, copied into
 * a heap block of exactly its length with no terminator (ASan reports any
 * read past the end).
 *
 * Invariants checked (abort on violation, so libFuzzer keeps the input):
 *  - both return 0 or -EBADMSG; every string they fill is NUL-terminated
 *    inside its array; an API error code is at most 1000000;
 *  - LIST: page.count and page.missing are the number of consumer and
 *    "missing" callbacks; a callback that returns an error stops the
 *    parse at once, and the parse then fails;
 *  - a parse is deterministic (same input, same output, byte for byte);
 *  - a reply accepted whole is refused without its last non-blank byte
 *    (the top-level object is then unclosed);
 *  - round trip: what a successful parse returned, written back as a
 *    reply of the same shape (strings escaped, numbers in decimal), parses
 *    to the same values: strings, numbers, cluster leader, error, page
 *    totals and the consumer/missing sequences.
 *
 * Seeds (tests/fuzz/corpus/fuzz_jsreply/): replies captured from a real
 * nats-server 2.9.10 (-js, stream ORDERS with consumers dispatch, audit,
 * settle, a pull fetch left unacked; LIST at offsets 0 and 2, LIST of an
 * empty and of a missing stream, INFO of two consumers and of a missing
 * consumer and stream: the files named list-*.json and info-*.json), plus
 * hand-made variants of them (hand-*.json): a clustered consumer with a
 * leader, a page with "missing" names, escapes and \u sequences, null
 * filters, negative, fractional, exponent and oversized numbers, and long
 * names that must be cut.
 *
 * Run: tests/fuzz/run-fuzz BUILD_DIR (FUZZ_TARGETS=fuzz_jsreply for this
 * one alone); then to fuzz longer or replay one input:
 *   BUILD_DIR/fuzz_jsreply -max_len=8192 NEW_DIR tests/fuzz/corpus/fuzz_jsreply
 *   BUILD_DIR/fuzz_jsreply tests/fuzz/regress/fuzz_jsreply/FILE
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pending.h"
#include "poller.h"

/* libFuzzer's entry point. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define EXPECT(cond)                                                                  \
	do {                                                                          \
		if (!(cond)) {                                                        \
			fprintf(stderr, "fuzz_jsreply: %s:%d: expectation failed: %s\n", \
				__FILE__, __LINE__, #cond);                           \
			abort();                                                      \
		}                                                                     \
	} while (0)

#define MAX_SEEN 64

/* What a LIST parse passed to its callback, in order. */
struct seen {
	struct tally__js_consumer c[MAX_SEEN];
	bool missing[MAX_SEEN];
	uint32_t n, consumers, missings;
	uint32_t stop_at; /* return -ECANCELED at this call (0: never) */
	bool stopped;
};

#define TERMINATED(arr) EXPECT(memchr((arr), '\0', sizeof(arr)) != NULL)

static void check_consumer(const struct tally__js_consumer *c)
{
	TERMINATED(c->stream);
	TERMINATED(c->name);
	TERMINATED(c->filter);
	TERMINATED(c->leader);
	EXPECT(!c->filter_too_long || strlen(c->filter) + 4 >= sizeof(c->filter));
	EXPECT(!c->name_too_long || strlen(c->name) + 4 >= sizeof(c->name));
}

static void check_error(const struct tally__js_error *e)
{
	TERMINATED(e->description);
	EXPECT(e->code >= 0 && e->code <= 1000000);
	EXPECT(e->err_code >= 0 && e->err_code <= 1000000);
}

static int on_consumer(void *ctx, const struct tally__js_consumer *c, bool missing)
{
	struct seen *s = ctx;

	EXPECT(!s->stopped); /* no call after a stop */
	check_consumer(c);
	if (missing) {
		EXPECT(!c->stream[0] && !c->filter[0] && !c->num_pending);
		s->missings++;
	} else {
		s->consumers++;
	}
	if (s->n < MAX_SEEN) {
		s->c[s->n] = *c;
		s->missing[s->n] = missing;
	}
	s->n++;
	if (s->stop_at && s->n == s->stop_at) {
		s->stopped = true;
		return -ECANCELED;
	}
	return 0;
}

/* ---- writing a parse result back as JSON ---- */

struct out {
	char *p;
	size_t n, cap;
};

static void put(struct out *o, const char *s, size_t n)
{
	if (o->n + n + 1 > o->cap) {
		o->cap = (o->n + n + 1) * 2;
		o->p = realloc(o->p, o->cap);
		if (!o->p)
			abort();
	}
	memcpy(o->p + o->n, s, n);
	o->n += n;
	o->p[o->n] = '\0';
}

static void puts_(struct out *o, const char *s)
{
	put(o, s, strlen(s));
}

static void put_u64(struct out *o, const char *key, uint64_t v)
{
	char buf[64];

	snprintf(buf, sizeof(buf), "\"%s\":%" PRIu64 ",", key, v);
	puts_(o, buf);
}

/* A JSON string: '"' and '\\' escaped, bytes below 0x20 as \u00XX, the
 * rest (UTF-8 or not) as they are: the reader copies them back. */
static void put_str(struct out *o, const char *s)
{
	char buf[8];

	puts_(o, "\"");
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\') {
			buf[0] = '\\';
			buf[1] = (char)c;
			put(o, buf, 2);
		} else if (c < 0x20) {
			snprintf(buf, sizeof(buf), "\\u%04x", c);
			put(o, buf, 6);
		} else {
			put(o, (const char *)&c, 1);
		}
	}
	puts_(o, "\"");
}

static void put_consumer(struct out *o, const struct tally__js_consumer *c)
{
	puts_(o, "{\"stream_name\":");
	put_str(o, c->stream);
	puts_(o, ",\"name\":");
	put_str(o, c->name);
	puts_(o, ",\"config\":{\"filter_subject\":");
	put_str(o, c->filter);
	puts_(o, "},");
	if (c->has_cluster) {
		puts_(o, "\"cluster\":{\"leader\":");
		put_str(o, c->leader);
		puts_(o, "},");
	}
	put_u64(o, "num_pending", c->num_pending);
	put_u64(o, "num_ack_pending", c->num_ack_pending);
	put_u64(o, "num_redelivered", c->num_redelivered);
	put_u64(o, "num_waiting", c->num_waiting);
	char buf[96];
	snprintf(buf, sizeof(buf), "\"delivered\":{\"stream_seq\":%" PRIu64 "},"
		 "\"ack_floor\":{\"stream_seq\":%" PRIu64 "}}",
		 c->delivered_stream_seq, c->ack_floor_stream_seq);
	puts_(o, buf);
}

static void put_error(struct out *o, const struct tally__js_error *e)
{
	char buf[96];

	snprintf(buf, sizeof(buf), "\"error\":{\"code\":%d,\"err_code\":%d,\"description\":",
		 e->code, e->err_code);
	puts_(o, buf);
	put_str(o, e->description);
	puts_(o, "},");
}

/* The fields a second parse must give back (the too_long flags may differ:
 * a cut string fits when written back). */
static void same_consumer(const struct tally__js_consumer *a, const struct tally__js_consumer *b)
{
	EXPECT(strcmp(a->stream, b->stream) == 0);
	EXPECT(strcmp(a->name, b->name) == 0);
	EXPECT(strcmp(a->filter, b->filter) == 0);
	EXPECT(a->has_cluster == b->has_cluster);
	EXPECT(!a->has_cluster || strcmp(a->leader, b->leader) == 0);
	EXPECT(a->num_pending == b->num_pending && a->num_ack_pending == b->num_ack_pending);
	EXPECT(a->num_redelivered == b->num_redelivered && a->num_waiting == b->num_waiting);
	EXPECT(a->delivered_stream_seq == b->delivered_stream_seq);
	EXPECT(a->ack_floor_stream_seq == b->ack_floor_stream_seq);
}

static void same_error(const struct tally__js_error *a, const struct tally__js_error *b)
{
	EXPECT(a->code == b->code && a->err_code == b->err_code);
	EXPECT(strcmp(a->description, b->description) == 0);
}

static bool has_error(const struct tally__js_error *e)
{
	return e->code || e->err_code || e->description[0];
}

/* ---- the two parsers ---- */

static void fuzz_info(const char *buf, size_t n)
{
	struct tally__js_consumer c, c2;
	struct tally__js_error e, e2;
	int rc = tally__js_parse_info(buf, n, &c, &e);

	EXPECT(rc == 0 || rc == -EBADMSG);
	check_consumer(&c);
	check_error(&e);
	EXPECT(tally__js_parse_info(buf, n, &c2, &e2) == rc);
	EXPECT(memcmp(&c, &c2, sizeof(c)) == 0 && memcmp(&e, &e2, sizeof(e)) == 0);
	if (rc != 0)
		return;
	/* round trip: the consumer object with "error" added when there was one */
	struct out o = { 0 };
	put_consumer(&o, &c);
	if (has_error(&e)) {
		o.n--; /* reopen the object: drop its '}' */
		puts_(&o, ",");
		put_error(&o, &e);
		o.n--; /* the error's trailing ',' */
		puts_(&o, "}");
	}
	EXPECT(tally__js_parse_info(o.p, o.n, &c2, &e2) == 0);
	same_consumer(&c, &c2);
	same_error(&e, &e2);
	free(o.p);
}

static void fuzz_list(const char *buf, size_t n)
{
	struct tally__js_page page, page2;
	struct seen *s = calloc(2, sizeof(*s)), *s2 = s + 1;
	int rc;

	if (!s)
		abort();
	rc = tally__js_parse_list(buf, n, &page, on_consumer, s);
	EXPECT(rc == 0 || rc == -EBADMSG);
	check_error(&page.error);
	if (rc == 0) {
		EXPECT(page.count == s->consumers && page.missing == s->missings);
		EXPECT(s->n == page.count + page.missing);
	}
	/* determinism, and a callback that stops the parse half-way */
	s2->stop_at = s->n ? (uint32_t)(n % s->n) + 1 : 0;
	int rc2 = tally__js_parse_list(buf, n, &page2, on_consumer, s2);
	if (s2->stop_at) {
		EXPECT(s2->stopped && s2->n == s2->stop_at);
		EXPECT(rc2 < 0); /* -ECANCELED is reported as -EBADMSG (see RELIABILITY.md) */
	} else {
		EXPECT(rc2 == rc && memcmp(&page, &page2, sizeof(page)) == 0);
	}
	for (uint32_t i = 0; i < s2->n && i < MAX_SEEN; i++) {
		EXPECT(s2->missing[i] == s->missing[i]);
		EXPECT(memcmp(&s2->c[i], &s->c[i], sizeof(s->c[i])) == 0);
	}
	if (rc == 0 && s->n <= MAX_SEEN) {
		/* round trip: consumers first, then the missing names */
		struct out o = { 0 };
		char head[96];
		bool first = true;

		snprintf(head, sizeof(head), "{\"total\":%" PRIu64 ",\"offset\":%" PRIu64 ",",
			 page.total, page.offset);
		puts_(&o, head);
		if (has_error(&page.error))
			put_error(&o, &page.error);
		puts_(&o, "\"consumers\":[");
		for (uint32_t i = 0; i < s->n; i++)
			if (!s->missing[i]) {
				puts_(&o, first ? "" : ",");
				put_consumer(&o, &s->c[i]);
				first = false;
			}
		puts_(&o, "],\"missing\":[");
		first = true;
		for (uint32_t i = 0; i < s->n; i++)
			if (s->missing[i]) {
				puts_(&o, first ? "" : ",");
				put_str(&o, s->c[i].name);
				first = false;
			}
		puts_(&o, "]}");
		memset(s2, 0, sizeof(*s2));
		EXPECT(tally__js_parse_list(o.p, o.n, &page2, on_consumer, s2) == 0);
		EXPECT(page2.total == page.total && page2.offset == page.offset);
		EXPECT(page2.count == page.count && page2.missing == page.missing);
		same_error(&page.error, &page2.error);
		uint32_t a = 0, b = 0;
		for (uint32_t i = 0; i < s->n; i++) {
			if (s->missing[i])
				continue;
			while (s2->missing[b])
				b++;
			same_consumer(&s->c[i], &s2->c[b++]);
			a++;
		}
		b = 0;
		for (uint32_t i = 0; i < s->n; i++) {
			if (!s->missing[i])
				continue;
			while (!s2->missing[b])
				b++;
			EXPECT(strcmp(s->c[i].name, s2->c[b++].name) == 0);
		}
		EXPECT(a == page.count);
		free(o.p);
	}
	free(s);
}

/* An accepted reply without its last non-blank byte (its closing '}'). */
static void fuzz_truncated(const char *buf, size_t n)
{
	struct tally__js_consumer c;
	struct tally__js_error e;
	struct tally__js_page page;

	while (n && (buf[n - 1] == ' ' || buf[n - 1] == '\t' || buf[n - 1] == '\n' || buf[n - 1] == '\r'))
		n--;
	if (!n)
		return;
	EXPECT(tally__js_parse_info(buf, n - 1, &c, &e) == -EBADMSG);
	EXPECT(tally__js_parse_list(buf, n - 1, &page, NULL, NULL) == -EBADMSG);
}

/* STREAM.INFO with its per-subject counts: 0 or -EBADMSG, strings
 * terminated, the subjects counted match the callbacks, deterministic. */
struct subj_seen {
	uint64_t calls, sum;
};

static int on_subject(void *ctx, const char *subject, bool cut, uint64_t count)
{
	struct subj_seen *s = ctx;

	EXPECT(memchr(subject, '\0', TALLY__PENDING_SUBJ_MAX) != NULL);
	(void)cut;
	s->calls++;
	s->sum += count;
	return 0;
}

static void fuzz_stream_info(const char *buf, size_t n)
{
	struct subj_seen a = { 0 }, b = { 0 };
	struct tally__js_stream_info si = { .fn = on_subject, .ctx = &a }, si2 = { .fn = on_subject, .ctx = &b };
	int rc = tally__js_parse_stream_info(buf, n, &si);

	EXPECT(rc == 0 || rc == -EBADMSG);
	TERMINATED(si.retention);
	check_error(&si.error);
	EXPECT(si.subjects == a.calls);
	EXPECT(tally__js_parse_stream_info(buf, n, &si2) == rc);
	EXPECT(a.calls == b.calls && a.sum == b.sum && strcmp(si.retention, si2.retention) == 0);
	if (rc == 0 && n > 0) /* an accepted reply without its last byte is not one */
		EXPECT(tally__js_parse_stream_info(buf, n - 1, &si2) == -EBADMSG || buf[n - 1] == ' ' ||
		       buf[n - 1] == '\n' || buf[n - 1] == '\t' || buf[n - 1] == '\r');
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *buf = malloc(size ? size : 1);
	struct tally__js_consumer c;
	struct tally__js_error e;
	struct tally__js_page page;

	if (!buf)
		abort();
	memcpy(buf, data, size);
	fuzz_info(buf, size);
	fuzz_list(buf, size);
	fuzz_stream_info(buf, size);
	bool info_ok = tally__js_parse_info(buf, size, &c, &e) == 0;
	bool list_ok = tally__js_parse_list(buf, size, &page, NULL, NULL) == 0;
	if (info_ok || list_ok)
		fuzz_truncated(buf, size);
	EXPECT(tally__js_parse_info(NULL, 0, &c, &e) == -EBADMSG);
	EXPECT(tally__js_parse_list(NULL, 0, &page, NULL, NULL) == -EBADMSG);
	struct tally__js_stream_info none = { 0 };
	EXPECT(tally__js_parse_stream_info(NULL, 0, &none) == -EBADMSG);
	free(buf);
	return 0;
}
