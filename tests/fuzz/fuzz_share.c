/* SPDX-License-Identifier: MIT */
/*
 * fuzz_share.c: libFuzzer target for the decoder of shared verdicts
 * (lib/sharecodec.c, tally__share_decode), which reads KV entries other
 * hosts put into the bucket: bytes off the network, trusted in nothing.
 *
 * Input: the key, a '\n', then the value (no '\n': the whole input is the
 * key). Each is copied into a heap block of exactly its length with no
 * terminator (ASan reports any read past it).
 *
 * Invariants checked (abort on violation):
 *  - decode returns 0 or -EBADMSG, the same twice;
 *  - on -EBADMSG the view is all zero;
 *  - on 0 the view passes the section's own check (tally__remote_view_ok:
 *    what every shm reader demands), the key is exactly the encoding of
 *    its host and subject, and encoding the view and decoding that again
 *    gives the same fields (the decimals within the 4 digits written).
 *
 * Run: tests/fuzz/run-fuzz BUILD_DIR (FUZZ_TARGETS=fuzz_share to run it alone).
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "remote.h"
#include "sharecodec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(c) do { if (!(c)) abort(); } while (0)

static bool zero(const void *p, size_t n)
{
	const unsigned char *b = p;

	for (size_t i = 0; i < n; i++)
		if (b[i])
			return false;
	return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *nl = memchr(data, '\n', size);
	size_t klen = nl ? (size_t)(nl - data) : size, vlen = nl ? size - klen - 1 : 0;
	char *key = malloc(klen ? klen : 1), *val = malloc(vlen ? vlen : 1);
	char kbuf[TALLY__SHARE_KEY_MAX], vbuf[TALLY__SHARE_VALUE_MAX];
	struct tally__remote_view a, b, c;
	int rc, n;

	if (!key || !val)
		abort();
	memcpy(key, data, klen);
	if (vlen)
		memcpy(val, nl + 1, vlen);
	rc = tally__share_decode(key, klen, val, vlen, &a);
	CHECK(rc == 0 || rc == -EBADMSG);
	CHECK(tally__share_decode(key, klen, val, vlen, &b) == rc);
	if (rc != 0) {
		CHECK(zero(&a, sizeof(a)));
		goto out;
	}
	CHECK(memcmp(&a, &b, sizeof(a)) == 0);
	CHECK(tally__remote_view_ok(&a));
	n = tally__share_key(kbuf, sizeof(kbuf), a.host, a.subject);
	CHECK(n > 0 && (size_t)n == klen && memcmp(kbuf, key, klen) == 0);
	n = tally__share_encode(vbuf, sizeof(vbuf), &a);
	CHECK(n > 0);
	CHECK(tally__share_decode(kbuf, strlen(kbuf), vbuf, (size_t)n, &c) == 0);
	CHECK(strcmp(a.host, c.host) == 0 && strcmp(a.subject, c.subject) == 0);
	CHECK(a.verdict == c.verdict && a.reasons == c.reasons && a.p95_ns == c.p95_ns &&
	      a.pending == c.pending && a.retry_after_ms == c.retry_after_ms);
	CHECK(fabs(a.pressure - c.pressure) <= 0.00005 + 1e-12 && fabs(a.shed - c.shed) <= 0.00005 + 1e-12);
out:
	free(key);
	free(val);
	return 0;
}
