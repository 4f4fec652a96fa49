/* SPDX-License-Identifier: MIT */
/*
 * fuzz_jsack.c: libFuzzer target for the JetStream ack reply parser
 * (lib/jsack.c, tally_jsack_parse), which reads reply subjects as they
 * come off the network. It owns the parser's invariants on any bytes,
 * and a differential check against cnats' own parser (js_getMetaData,
 * what natsMsg_GetMetaData hands a reply to).
 *
 * Input: the whole input is the reply, copied into a heap block of
 * exactly its length with no terminator (ASan reports any read past it).
 *
 * Invariants checked (abort on violation, so libFuzzer keeps the input):
 *  - the parse returns 0 or -EINVAL and reads no byte past len;
 *  - on 0, every string points inside the input, is non-empty (domain
 *    aside, which is NULL or non-empty, and never "_"), holds no dot, and
 *    the numbers are at most INT64_MAX;
 *  - a parse is deterministic;
 *  - the record path's parse (tally__jsack_parse_record, which fills only
 *    stream, consumer, timestamp and pending) accepts and refuses exactly
 *    the same inputs and reads those four fields the same;
 *  - it gives exactly what ref_parse below gives, accepting and refusing
 *    the same inputs: ref_parse is the grammar of tally/jsack.h written
 *    as plainly as possible, a byte at a time, which the library's
 *    parser (16 bytes at a time, eight digits at a time) must match;
 *  - whenever it accepts, cnats accepts the same bytes too and reads the
 *    same stream, consumer, domain and numbers (tally is allowed to be
 *    stricter, never looser or different).
 *
 * Run: tests/fuzz/run-fuzz BUILD_DIR (FUZZ_TARGETS=fuzz_jsack to run it alone).
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <nats/nats.h>
#include <tally/jsack.h>

#include "jsack.h" /* lib/jsack.h: tally__jsack_parse_record */

natsStatus js_getMetaData(const char *reply, char **domain, char **stream, char **consumer,
			  uint64_t *numDelivered, uint64_t *sseq, uint64_t *dseq, int64_t *tm,
			  uint64_t *numPending, int asked);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(c) do { if (!(c)) abort(); } while (0)

static void check_str(const char *p, uint32_t len, const char *base, size_t size)
{
	CHECK(p >= base && p + len <= base + size && len > 0);
	CHECK(memchr(p, '.', len) == NULL);
}

static bool same(const char *p, uint32_t len, const char *s)
{
	return s && strlen(s) == len && memcmp(p, s, len) == 0;
}

/* ---- the reference: the grammar, a byte at a time ---------------------------- */

#define REF_PREFIX_LEN 8u
#define REF_MAX_DOTS 11u

/* 1..19 decimal digits that fit an int64. */
static int ref_u63(const char *s, size_t len, uint64_t *out)
{
	uint64_t v = 0;

	if (len == 0 || len > 19)
		return -EINVAL;
	for (size_t i = 0; i < len; i++) {
		unsigned d = (unsigned char)s[i] - '0';
		if (d > 9)
			return -EINVAL;
		v = v * 10 + d;
	}
	if (v > (uint64_t)INT64_MAX)
		return -EINVAL;
	*out = v;
	return 0;
}

/* The dots after the prefix (the first REF_MAX_DOTS kept), the token count. */
static int ref_tokenize(const char *s, size_t len, uint32_t *dots, uint32_t *ntok)
{
	uint32_t n = 0;
	size_t last = REF_PREFIX_LEN - 1;

	for (size_t i = REF_PREFIX_LEN; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c < 0x21 || c > 0x7e)
			return -EINVAL;
		if (c != '.')
			continue;
		if (i == last + 1)
			return -EINVAL;
		if (n < REF_MAX_DOTS)
			dots[n] = (uint32_t)i;
		n++;
		last = i;
	}
	if (len == last + 1)
		return -EINVAL;
	*ntok = n + 1;
	return 0;
}

static const char *ref_tok(const char *s, size_t len, const uint32_t *dots, uint32_t ntok, uint32_t k,
			   uint32_t *tlen)
{
	size_t start = k == 0 ? REF_PREFIX_LEN : (size_t)dots[k - 1] + 1;
	size_t end = k + 1 < ntok ? (size_t)dots[k] : len;

	*tlen = (uint32_t)(end - start);
	return s + start;
}

static int ref_parse(const char *reply, size_t len, struct tally_jsack *out)
{
	uint32_t dots[REF_MAX_DOTS], ntok, l, base;

	memset(out, 0, sizeof(*out));
	if (len < REF_PREFIX_LEN || memcmp(reply, "$JS.ACK.", REF_PREFIX_LEN) != 0)
		return -EINVAL;
	if (ref_tokenize(reply, len, dots, &ntok) != 0)
		return -EINVAL;
	if (ntok == 7) {
		base = 0;
	} else if (ntok >= 9) {
		base = 2;
		out->domain = ref_tok(reply, len, dots, ntok, 0, &out->domain_len);
		if (out->domain_len == 1 && out->domain[0] == '_') {
			out->domain = NULL;
			out->domain_len = 0;
		}
		out->account_hash = ref_tok(reply, len, dots, ntok, 1, &out->account_hash_len);
	} else {
		return -EINVAL;
	}
	out->stream = ref_tok(reply, len, dots, ntok, base, &out->stream_len);
	out->consumer = ref_tok(reply, len, dots, ntok, base + 1, &out->consumer_len);
	uint64_t *nums[5] = { &out->delivered, &out->stream_seq, &out->consumer_seq, &out->timestamp_ns,
			      &out->pending };
	for (uint32_t k = 0; k < 5; k++) {
		const char *t = ref_tok(reply, len, dots, ntok, base + 2 + k, &l);
		if (ref_u63(t, l, nums[k]) != 0)
			return -EINVAL;
	}
	return 0;
}

static bool same_jsack(const struct tally_jsack *a, const struct tally_jsack *b)
{
	return a->domain == b->domain && a->account_hash == b->account_hash && a->stream == b->stream &&
	       a->consumer == b->consumer && a->domain_len == b->domain_len &&
	       a->account_hash_len == b->account_hash_len && a->stream_len == b->stream_len &&
	       a->consumer_len == b->consumer_len && a->delivered == b->delivered &&
	       a->stream_seq == b->stream_seq && a->consumer_seq == b->consumer_seq &&
	       a->timestamp_ns == b->timestamp_ns && a->pending == b->pending;
}

/* ---- the target --------------------------------------------------------------- */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *buf = malloc(size ? size : 1);
	struct tally_jsack a, b;

	if (!buf)
		return 0;
	memcpy(buf, data, size);
	int rc = tally_jsack_parse(buf, size, &a);
	CHECK(rc == 0 || rc == -EINVAL);
	CHECK(tally_jsack_parse(buf, size, &b) == rc);
	struct tally_jsack r, m;
	CHECK(ref_parse(buf, size, &r) == rc);
	CHECK(tally__jsack_parse_record(buf, size, &m) == rc);
	if (rc != 0) {
		free(buf);
		return 0;
	}
	CHECK(same_jsack(&a, &b) && same_jsack(&a, &r));
	CHECK(m.stream == a.stream && m.stream_len == a.stream_len && m.consumer == a.consumer &&
	      m.consumer_len == a.consumer_len && m.timestamp_ns == a.timestamp_ns && m.pending == a.pending);
	check_str(a.stream, a.stream_len, buf, size);
	check_str(a.consumer, a.consumer_len, buf, size);
	if (a.domain) {
		check_str(a.domain, a.domain_len, buf, size);
		CHECK(!(a.domain_len == 1 && a.domain[0] == '_'));
	}
	if (a.account_hash)
		check_str(a.account_hash, a.account_hash_len, buf, size);
	uint64_t nums[] = { a.delivered, a.stream_seq, a.consumer_seq, a.timestamp_ns, a.pending };
	for (size_t i = 0; i < sizeof(nums) / sizeof(nums[0]); i++)
		CHECK(nums[i] <= (uint64_t)INT64_MAX);
	/* cnats on the same bytes (accepted ones hold no NUL: a C string) */
	char *z = malloc(size + 1);
	CHECK(z != NULL);
	memcpy(z, data, size);
	z[size] = '\0';
	char *d = NULL, *s = NULL, *c = NULL;
	uint64_t nd = 0, ss = 0, ds = 0, np = 0;
	int64_t tm = 0;
	CHECK(js_getMetaData(z + 8, &d, &s, &c, &nd, &ss, &ds, &tm, &np, 8) == NATS_OK);
	CHECK(same(a.stream, a.stream_len, s) && same(a.consumer, a.consumer_len, c));
	CHECK(a.domain ? same(a.domain, a.domain_len, d) : d == NULL);
	CHECK(nd == a.delivered && ss == a.stream_seq && ds == a.consumer_seq &&
	      (uint64_t)tm == a.timestamp_ns && np == a.pending);
	free(d);
	free(s);
	free(c);
	free(z);
	free(buf);
	return 0;
}
