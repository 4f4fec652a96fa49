/* SPDX-License-Identifier: MIT */
/*
 * jsack.c: the parser of JetStream ack reply subjects and the record call
 * built on it (tally/jsack.h). It owns reading an untrusted reply subject
 * into its fields, and turning one message's fields into two ring
 * entries: the wait, and the consumer's pending count.
 *
 * Parsing is one pass over the bytes: it notes where each of the first 11
 * dots falls and checks every byte on the way, then reads the tokens the
 * layout (9 tokens, or 11 and more) puts where. Nothing is copied; the
 * strings of the result point into the input.
 *
 * The wait is the wall clock now minus the timestamp nats-server stored:
 * both are CLOCK_REALTIME, on two hosts when the router runs elsewhere,
 * so a skewed clock can put the timestamp ahead of now. Such a wait is
 * recorded as 0 (the message did not wait less than nothing) in an entry
 * of its own kind, so the owner counts it per subject (wait_skewed).
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include <tally/jsack.h>

#include "common.h"
#include "jsack.h"
#include "producer.h"
#include "shm_layout.h"

#define PREFIX "$JS.ACK."
#define PREFIX_LEN 8u
#define MAX_DOTS 11u /* dots that bound the tokens read: 12 tokens, the 12th is not read */

/* A decimal number of at most 19 digits that fits an int64 (cnats'
 * nats_ParseInt64 takes the same ones). */
static int parse_u63(const char *s, size_t len, uint64_t *out)
{
	uint64_t v = 0;

	if (len == 0 || len > 19)
		return -EINVAL;
	for (size_t i = 0; i < len; i++) {
		unsigned d = (unsigned char)s[i] - '0';
		if (d > 9)
			return -EINVAL;
		v = v * 10 + d; /* 19 digits fit a uint64 */
	}
	if (v > (uint64_t)INT64_MAX)
		return -EINVAL;
	*out = v;
	return 0;
}

/* Positions of the dots after the prefix (at most MAX_DOTS) and the
 * number of tokens after it; -EINVAL for a byte no subject may hold or an
 * empty token. */
static int tokenize(const char *s, size_t len, uint32_t *dots, uint32_t *ntok)
{
	uint32_t n = 0;
	size_t last = PREFIX_LEN - 1; /* the prefix's own last dot */

	for (size_t i = PREFIX_LEN; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c < 0x21 || c > 0x7e)
			return -EINVAL;
		if (c != '.')
			continue;
		if (i == last + 1)
			return -EINVAL; /* empty token */
		if (n < MAX_DOTS)
			dots[n] = (uint32_t)i;
		n++;
		last = i;
	}
	if (len == last + 1)
		return -EINVAL; /* empty last token (or nothing after the prefix) */
	*ntok = n + 1;
	return 0;
}

/* Token k after the prefix: start and length. */
static const char *tok(const char *s, size_t len, const uint32_t *dots, uint32_t ntok, uint32_t k,
		       uint32_t *tlen)
{
	size_t start = k == 0 ? PREFIX_LEN : (size_t)dots[k - 1] + 1;
	size_t end = k + 1 < ntok ? (size_t)dots[k] : len;

	*tlen = (uint32_t)(end - start);
	return s + start;
}

TALLY_API int tally_jsack_parse(const char *reply, size_t len, struct tally_jsack *out)
{
	uint32_t dots[MAX_DOTS], ntok, l, base;

	if (!reply || len < PREFIX_LEN || len > UINT32_MAX || memcmp(reply, PREFIX, PREFIX_LEN) != 0)
		return -EINVAL;
	if (tokenize(reply, len, dots, &ntok) != 0)
		return -EINVAL;
	/* after the prefix: 7 tokens (old layout), or 9 and more (new) */
	if (ntok == 7) {
		base = 0;
		out->domain = out->account_hash = NULL;
		out->domain_len = out->account_hash_len = 0;
	} else if (ntok >= 9) {
		base = 2;
		out->domain = tok(reply, len, dots, ntok, 0, &out->domain_len);
		if (out->domain_len == 1 && out->domain[0] == '_') {
			out->domain = NULL;
			out->domain_len = 0;
		}
		out->account_hash = tok(reply, len, dots, ntok, 1, &out->account_hash_len);
	} else {
		return -EINVAL;
	}
	out->stream = tok(reply, len, dots, ntok, base, &out->stream_len);
	out->consumer = tok(reply, len, dots, ntok, base + 1, &out->consumer_len);
	uint64_t *nums[5] = { &out->delivered, &out->stream_seq, &out->consumer_seq, &out->timestamp_ns,
			      &out->pending };
	for (uint32_t k = 0; k < 5; k++) {
		const char *t = tok(reply, len, dots, ntok, base + 2 + k, &l);
		if (parse_u63(t, l, nums[k]) != 0)
			return -EINVAL;
	}
	return 0;
}

uint32_t tally__jsack_consumer_hash(const char *stream, size_t stream_len, const char *consumer,
				    size_t consumer_len)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < stream_len; i++)
		h = (h ^ (unsigned char)stream[i]) * 16777619u;
	h = (h ^ '.') * 16777619u;
	for (size_t i = 0; i < consumer_len; i++)
		h = (h ^ (unsigned char)consumer[i]) * 16777619u;
	return (h >> 28 ^ h) & 0x0fffffffu; /* fold the top bits in */
}

TALLY_API int tally_record_jetstream_at(struct tally_producer *p, tally_subject_t subject,
					const char *reply, size_t reply_len, uint64_t now_real_ns)
{
	struct tally_jsack a;
	bool ok;

	if (tally_jsack_parse(reply, reply_len, &a) != 0)
		return -EINVAL;
	if (TALLY__UNLIKELY(a.timestamp_ns > now_real_ns)) {
		/* skew: wait 0, the entry says by how much (for nothing but a count) */
		ok = tally__record_tagged(p, subject, a.timestamp_ns - now_real_ns,
					  TALLY__TAG(TALLY__ENTRY_WAIT_SKEW, 0));
	} else {
		uint64_t wait = now_real_ns - a.timestamp_ns;
		ok = TALLY__LIKELY(wait <= p->max_value_ns)
		     ? tally__record_tagged(p, subject, wait, TALLY__TAG(TALLY__ENTRY_WAIT, 0))
		     : tally__record_tagged_clamped(p, subject, TALLY__TAG(TALLY__ENTRY_WAIT, 0));
	}
	uint32_t h = tally__jsack_consumer_hash(a.stream, a.stream_len, a.consumer, a.consumer_len);
	ok &= tally__record_tagged(p, subject, a.pending, TALLY__TAG(TALLY__ENTRY_PENDING, h));
	return ok ? 0 : -ENOBUFS;
}
