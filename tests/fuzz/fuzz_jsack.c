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
	if (rc != 0) {
		free(buf);
		return 0;
	}
	CHECK(memcmp(&a, &b, sizeof(a)) == 0);
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
