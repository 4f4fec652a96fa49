/* SPDX-License-Identifier: MIT */
/*
 * export.c - packing and unpacking a subject's since-start export buckets
 * (the form and who owns a pack are in export.h).  Slow paths only: a
 * window falling asleep or waking, a bucket block built at publish
 * (once per closed slice), a /metrics scrape's read of one subject.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "export.h"
#include "hist.h"

size_t tally__export_packed_len(const uint64_t *le, uint32_t n, uint64_t count, uint64_t sum)
{
	size_t len = tally__varint_len(count) + tally__varint_len(sum);
	uint64_t prev = 0;
	uint32_t last = 0; /* edges passed, written or skipped */

	for (uint32_t k = 0; k < n; k++) {
		uint64_t d = le[k] - prev;
		prev = le[k];
		if (d == 0)
			continue;
		len += tally__varint_len(k - last) + tally__varint_len(d);
		last = k + 1;
	}
	return len;
}

uint8_t *tally__export_put(uint8_t *out, const uint64_t *le, uint32_t n, uint64_t count, uint64_t sum)
{
	uint64_t prev = 0;
	uint32_t last = 0;

	out = tally__varint_put(out, count);
	out = tally__varint_put(out, sum);
	for (uint32_t k = 0; k < n; k++) {
		uint64_t d = le[k] - prev;
		prev = le[k];
		if (d == 0)
			continue;
		out = tally__varint_put(out, k - last);
		out = tally__varint_put(out, d);
		last = k + 1;
	}
	return out;
}

struct tally__export_pack *tally__export_pack_new(const uint64_t *le, uint32_t n, uint64_t count,
						  uint64_t sum)
{
	size_t len = tally__export_packed_len(le, n, count, sum);
	struct tally__export_pack *pk =
		TALLY__HIST_NOMEM("export.pack") ? NULL : malloc(sizeof(*pk) + len);

	if (!pk)
		return NULL;
	pk->retire_next = NULL;
	pk->len = (uint32_t)len;
	pk->shown = false;
	uint8_t *end = tally__export_put(pk->bytes, le, n, count, sum);
	TALLY__ASSERT((size_t)(end - pk->bytes) == len);
	return pk;
}

void tally__export_add(const uint8_t *bytes, uint32_t len, uint64_t *le, uint32_t n, uint64_t *count,
		       uint64_t *sum)
{
	static const char *const broken = "export buckets: packed form broken (varint too long)";
	const uint8_t *p = bytes, *end = bytes + len;
	uint64_t c, s, gap, d, run = 0;
	uint32_t k = 0;
	bool sat = false;

	p = tally__varint_get(p, end, &c, broken);
	p = tally__varint_get(p, end, &s, broken);
	*count += c;
	*sum = tally__hist_sat_add(*sum, s, &sat);
	while (p < end) {
		p = tally__varint_get(p, end, &gap, broken);
		p = tally__varint_get(p, end, &d, broken);
		if (gap >= n - k)
			tally__die(__FILE__, __LINE__, "export buckets: packed form names edge %llu of %u",
				   (unsigned long long)(k + gap), n);
		/* the skipped edges keep the running count, then it grows by d */
		for (uint64_t i = 0; i < gap; i++)
			le[k++] += run;
		run += d;
		le[k++] += run;
	}
	while (k < n)
		le[k++] += run;
}
