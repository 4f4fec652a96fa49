/* SPDX-License-Identifier: MIT */
/*
 * jsack.c: the parser of JetStream ack reply subjects and the record call
 * built on it (tally/jsack.h). It owns reading an untrusted reply subject
 * into its fields, and turning one message's fields into two ring
 * entries: the wait, and the consumer's pending count.
 *
 * The parser reads every byte once, 16 at a time (SSE2 on x86-64, a
 * plain loop elsewhere): compares give the bytes outside 0x21..0x7e, the
 * dots and the bytes that are neither digits nor dots as masks, with no
 * branch per byte. A subject shorter than 21 bytes is refused at once
 * (the shortest ack subject is "$JS.ACK.S.C.1.2.3.4.5"), so the last 16
 * bytes are always there to be read as one block, overlapping the block
 * before. A reply under 64 bytes (every 9-token reply of a real server)
 * is read as four such blocks into 64-bit masks with no branch, its dots
 * found by a straight chain of trailing-zero counts and its digits
 * checked by one mask test; a longer one a block of 64 bytes at a time.
 * The numbers are read eight digits at a time (a load, a mask and three
 * multiplies per eight digits); a number is bounded by its digit count
 * (19 digits fit a uint64; only a 19-digit one is compared with
 * INT64_MAX). Nothing is copied; the strings of the result point into
 * the input. The record call parses only what it stores (stream and
 * consumer, the timestamp, pending; the other three numbers are only
 * bounded), and accepts exactly the replies tally_jsack_parse does.
 *
 * The wait is the wall clock now minus the timestamp nats-server stored:
 * both are CLOCK_REALTIME, on two hosts when the router runs elsewhere,
 * so a skewed clock can put the timestamp ahead of now. Such a wait is
 * recorded as 0 (the message did not wait less than nothing) in an entry
 * of its own kind, so the owner counts it per subject (wait_skewed).
 * Both entries of a message go into the ring together, behind one tail
 * store, inline (lib/producer.h), with no call on the fast path. The consumer hash of the pending entry is cached per producer
 * handle for the last "stream.consumer" seen (a router acks many messages
 * of one consumer in a row); the cache is keyed by those bytes, compared
 * in full, so it never answers for another name.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include <tally/jsack.h>

#include "common.h"
#include "jsack.h"
#include "producer.h"
#include "shm_layout.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define PREFIX "$JS.ACK."
#define PREFIX_LEN 8u
#define MIN_LEN 21u /* "$JS.ACK.S.C.1.2.3.4.5" */

/* ---- the scan ----------------------------------------------------------------- */

/*
 * The bytes are read 16 at a time (SSE2 on x86-64; elsewhere a plain loop
 * stands in for each step). A byte no subject may hold is one whose
 * distance from 0x21, as an unsigned byte, is above 0x5d: the largest
 * distance of all blocks is kept, and compared once at the end.
 */
#if defined(__SSE2__)
typedef __m128i vec;
static inline vec vload(const char *s)
{
	return _mm_loadu_si128((const __m128i *)(const void *)s);
}
/* bit i: byte i is c */
static inline uint32_t vmask_eq(vec v, char c)
{
	return (uint32_t)_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(c)));
}
/* the byte-wise maximum of m and each byte's distance from 0x21 */
static inline vec vmax_dist(vec m, vec v)
{
	return _mm_max_epu8(m, _mm_sub_epi8(v, _mm_set1_epi8(0x21)));
}
static inline bool vdist_ok(vec m)
{
	return _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_min_epu8(m, _mm_set1_epi8(0x5d)), m)) == 0xffff;
}
static inline vec vzero(void)
{
	return _mm_setzero_si128();
}
/* bit i: byte i is neither a digit nor a dot */
static inline uint32_t vmask_nonnum(vec v)
{
	__m128i d = _mm_sub_epi8(v, _mm_set1_epi8('0'));
	__m128i digit = _mm_cmpeq_epi8(_mm_min_epu8(d, _mm_set1_epi8(9)), d);
	__m128i ok = _mm_or_si128(digit, _mm_cmpeq_epi8(v, _mm_set1_epi8('.')));
	return (uint32_t)_mm_movemask_epi8(ok) ^ 0xffffu;
}
#else
typedef struct { unsigned char b[16]; } vec;
static inline vec vload(const char *s)
{
	vec v;
	memcpy(v.b, s, 16);
	return v;
}
static inline uint32_t vmask_eq(vec v, char c)
{
	uint32_t m = 0;
	for (unsigned i = 0; i < 16; i++)
		m |= (uint32_t)(v.b[i] == (unsigned char)c) << i;
	return m;
}
static inline vec vmax_dist(vec m, vec v)
{
	for (unsigned i = 0; i < 16; i++) {
		unsigned char d = (unsigned char)(v.b[i] - 0x21);
		m.b[i] = d > m.b[i] ? d : m.b[i];
	}
	return m;
}
static inline bool vdist_ok(vec m)
{
	for (unsigned i = 0; i < 16; i++)
		if (m.b[i] > 0x5d)
			return false;
	return true;
}
static inline vec vzero(void)
{
	vec v;
	memset(v.b, 0, 16);
	return v;
}
static inline uint32_t vmask_nonnum(vec v)
{
	uint32_t m = 0;
	for (unsigned i = 0; i < 16; i++)
		m |= (uint32_t)(v.b[i] != '.' && (v.b[i] < '0' || v.b[i] > '9')) << i;
	return m;
}
#endif

/*
 * Where the tokens after the prefix lie: pos[0] = 7 (the prefix's last
 * dot), pos[1..n] the first n dots after it (n at most NDOTS), pos[n + 1]
 * = len; token k after the prefix is [pos[k] + 1, pos[k + 1]). The count
 * stops at NDOTS: the grammar only tells 6 dots after the prefix from 7
 * and from 8 or more, and reads no token past the 9th.
 */
#define NDOTS 9u
struct dots {
	uint32_t pos[NDOTS + 2];
	uint32_t n;
};

/* The dots of the 64 bytes from w (bit i: byte w + i) into end[n..]. */
static inline uint32_t note_dots(uint32_t *end, uint32_t n, uint64_t m, uint32_t w)
{
	for (; m && n < NDOTS; m &= m - 1)
		end[n++] = w + (uint32_t)__builtin_ctzll(m);
	return n;
}

/* The dots of the first 64 bytes (or all if fewer), with no branch: four
 * blocks, at 0, 16, 32 and 48 or the last 16 bytes when those go past the
 * end; a byte seen twice sets its bit twice. */
static inline uint64_t dots_first64(const char *s, uint32_t len, vec *dist)
{
	uint32_t last = len - 16;
	uint64_t m = 0;

#pragma GCC unroll 4
	for (uint32_t b = 0; b < 64; b += 16) {
		uint32_t o = b < last ? b : last;
		vec v = vload(s + o);
		*dist = vmax_dist(*dist, v);
		m |= (uint64_t)vmask_eq(v, '.') << o;
	}
	return m;
}

/* The dots of the 64 bytes from w (w < len); a block that would go past
 * the end is read as the last 16 bytes, its bytes before b dropped. */
static inline uint64_t dots_at(const char *s, size_t len, size_t w, vec *dist)
{
	uint64_t m = 0;

	for (size_t b = w; b < len && b < w + 64; b += 16) { /* size_t: no wrap near UINT32_MAX */
		size_t o = b + 16 <= len ? b : len - 16;
		vec v = vload(s + o);
		*dist = vmax_dist(*dist, v);
		m |= (uint64_t)(vmask_eq(v, '.') >> (b - o)) << (b - w);
	}
	return m;
}

/* One pass over s[0..len), len >= 16, the prefix checked: the dots into
 * *d, 64 bytes at a time. false for a refused byte, two dots in a row or
 * a dot at the end (an empty token). */
static bool scan(const char *s, uint32_t len, struct dots *d)
{
	vec dist = vzero();
	uint64_t m = dots_first64(s, len, &dist);
	uint64_t touch = m & m << 1, carry = m >> 63;
	uint32_t n = note_dots(d->pos + 1, 0, m & ~(uint64_t)0x88u, 0); /* not the prefix's dots (3, 7) */

	for (size_t w = 64; w < len; w += 64) {
		m = dots_at(s, len, w, &dist);
		touch |= m & (m << 1 | carry);
		carry = m >> 63;
		n = note_dots(d->pos + 1, n, m, (uint32_t)w);
	}
	d->pos[0] = PREFIX_LEN - 1;
	d->pos[n + 1] = len;
	d->n = n;
	return vdist_ok(dist) && touch == 0 && s[len - 1] != '.';
}

/* Whether s[from..to) holds only digits and dots (16 <= to). */
static bool only_digits_and_dots(const char *s, size_t from, size_t to)
{
	uint32_t nonnum = 0;
	size_t off;

	for (off = from; off + 16 <= to; off += 16)
		nonnum |= vmask_nonnum(vload(s + off));
	if (off < to)
		nonnum |= vmask_nonnum(vload(s + to - 16)) >> (off + 16 - to);
	return nonnum == 0;
}

/* ---- numbers ------------------------------------------------------------------ */

/* The 8 bytes at s, the first in the low byte whatever the host's order. */
static inline uint64_t load_le64(const char *s)
{
	uint64_t x;

	memcpy(&x, s, sizeof(x));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	x = __builtin_bswap64(x);
#endif
	return x;
}

/* low[k]: the low nibbles of the last k bytes of an 8-byte word (the high
 * bytes, little-endian): a digit's value. */
static const uint64_t low[9] = {
	0, 0x0f00000000000000u, 0x0f0f000000000000u, 0x0f0f0f0000000000u, 0x0f0f0f0f00000000u,
	0x0f0f0f0f0f000000u, 0x0f0f0f0f0f0f0000u, 0x0f0f0f0f0f0f0f00u, 0x0f0f0f0f0f0f0f0fu,
};

/*
 * The k (0..8) digits that end at e, as a number; e[-8..-1] are read. The
 * bytes before the k become 0: leading zeros. Then pairs, quads and
 * halves of the word are summed with one multiply each.
 */
static inline __attribute__((always_inline)) uint64_t digits8(const char *e, uint32_t k)
{
	uint64_t x = load_le64(e - 8) & low[k];

	x = x * (10 * 256 + 1) >> 8;
	x = (x & 0x00ff00ff00ff00ffu) * (100 * 65536 + 1) >> 16;
	return (x & 0x0000ffff0000ffffu) * (10000 * 4294967296u + 1) >> 32;
}

/*
 * The token [s, s + len) of 1..19 digits (checked by the caller) as a
 * number; *bad set when it is above INT64_MAX (cnats' nats_ParseInt64
 * takes the same numbers, and longer runs of leading zeros). Reads back
 * to s + len - 24: a number token starts at 12 or later, past
 * "$JS.ACK.", the stream, the consumer and their dots.
 */
static inline __attribute__((always_inline)) uint64_t number(const char *s, uint32_t len, bool *bad)
{
	const char *e = s + len;

	if (TALLY__LIKELY(len <= 8))
		return digits8(e, len);
	if (len <= 16)
		return digits8(e - 8, len - 8) * 100000000u + digits8(e, 8);
	/* at most 999 * 10^16 + 10^16 - 1: no overflow */
	uint64_t v = digits8(e - 16, len - 16) * 10000000000000000u + digits8(e - 8, 8) * 100000000u +
		     digits8(e, 8);
	*bad |= v > (uint64_t)INT64_MAX;
	return v;
}

/* ---- the parser --------------------------------------------------------------- */

/* Token k after the prefix. */
static inline const char *tok(const char *s, const uint32_t *pos, uint32_t k, uint32_t *len)
{
	*len = pos[k + 1] - pos[k] - 1;
	return s + pos[k] + 1;
}

/* What a parse fills: what a record reads (stream, consumer, timestamp,
 * pending), or all of struct tally_jsack. */
enum fill { FILL_RECORD, FILL_ALL };

/*
 * The five numbers, in the tokens after the dots q0 .. q4, each ending
 * at the next (q5: the end of pending): 1 to 19 digits each, nothing but
 * digits. nonnum (bit i: byte i is neither a digit nor a dot) is given
 * for a reply of up to 63 bytes; NULL: the bytes are read again. FILL_RECORD reads only the
 * timestamp and pending; the other three are only bounded (one of 16 or
 * more digits is read, to compare it with INT64_MAX).
 */
static inline __attribute__((always_inline)) bool numbers(const char *s, uint32_t q0, uint32_t q1, uint32_t q2,
							  uint32_t q3, uint32_t q4, uint32_t q5,
							  const uint64_t *nonnum, struct tally_jsack *out,
							  enum fill fill)
{
	uint32_t l0 = q1 - q0 - 1, l1 = q2 - q1 - 1, l2 = q3 - q2 - 1, l3 = q4 - q3 - 1, l4 = q5 - q4 - 1;
	bool bad = (l3 > 19) | (l4 > 19);

	if (nonnum) /* bits q0 + 1 .. q5 - 1 */
		bad |= (*nonnum & (((uint64_t)1 << q5) - ((uint64_t)2 << q0))) != 0;
	else
		bad |= !only_digits_and_dots(s, q0 + 1, q5);
	/* q3 - q0 - 3 = l0 + l1 + l2: under 16, none of the three is long */
	if (fill == FILL_ALL || TALLY__UNLIKELY(q3 - q0 >= 16 + 3 && (l0 | l1 | l2) >= 16)) {
		bad |= (l0 > 19) | (l1 > 19) | (l2 > 19);
		if (bad)
			return false;
		out->delivered = number(s + q0 + 1, l0, &bad);
		out->stream_seq = number(s + q1 + 1, l1, &bad);
		out->consumer_seq = number(s + q2 + 1, l2, &bad);
	}
	if (bad)
		return false;
	out->timestamp_ns = number(s + q3 + 1, l3, &bad);
	out->pending = number(s + q4 + 1, l4, &bad);
	return !bad;
}

/* The domain and account hash tokens [a, a + alen) and [h, h + hlen). */
static inline void set_domain(struct tally_jsack *out, const char *a, uint32_t alen, const char *h, uint32_t hlen)
{
	out->domain = !a || (alen == 1 && a[0] == '_') ? NULL : a;
	out->domain_len = out->domain ? alen : 0;
	out->account_hash = h;
	out->account_hash_len = hlen;
}

/* The fields of a short reply once its layout is known: the stream's
 * token after the dot sd, the consumer's after cd, the numbers after q0
 * .. q4, pending ending at q5. */
static inline __attribute__((always_inline)) int short_fields(const char *s, uint32_t sd, uint32_t cd, uint32_t q0,
							      uint32_t q1, uint32_t q2, uint32_t q3, uint32_t q4,
							      uint32_t q5, uint64_t nonnum, struct tally_jsack *out,
							      enum fill fill)
{
	if (!numbers(s, q0, q1, q2, q3, q4, q5, &nonnum, out, fill))
		return -EINVAL;
	out->stream = s + sd + 1;
	out->stream_len = cd - sd - 1;
	out->consumer = s + cd + 1;
	out->consumer_len = q0 - cd - 1;
	return 0;
}

/*
 * A reply of 21 to 63 bytes, its prefix checked: one pass, with no branch
 * per byte or per dot (only the refusals and the layout's). The four
 * blocks give the dots, the bytes that are neither digits nor dots and
 * the refused bytes of the whole reply as 64-bit masks. A dot put at len (and bit 63 kept set, so that no count
 * of trailing zeros is of 0) makes the k-th dot after the prefix, d_k,
 * len for k = n + 1 and at least len past it, n the dots after the
 * prefix: n is 6 (the 9-token layout) when d6 < len == d7, at least 8
 * (12 tokens and more) when d8 < len, and d9 then ends pending.
 */
static inline __attribute__((always_inline)) int parse_short(const char *s, uint32_t len, struct tally_jsack *out,
							     enum fill fill)
{
	const uint64_t top = (uint64_t)1 << 63;
	uint32_t last = len - 16;
	uint64_t dots = 0, nonnum = 0;
	vec dist = vzero();

#pragma GCC unroll 4
	for (uint32_t b = 0; b < 64; b += 16) {
		uint32_t o = b < last ? b : last;
		vec v = vload(s + o);
		dist = vmax_dist(dist, v);
		dots |= (uint64_t)vmask_eq(v, '.') << o;
		nonnum |= (uint64_t)vmask_nonnum(v) << o;
	}
	/* two dots in a row, or a dot last: an empty token */
	if (!vdist_ok(dist) || (dots & (dots << 1 | (uint64_t)1 << (len - 1))) != 0)
		return -EINVAL;
	uint64_t r = (dots & ~(uint64_t)0x88u) | (uint64_t)1 << len; /* not the prefix's dots (3, 7) */
	uint32_t d1 = (uint32_t)__builtin_ctzll(r | top);
	r &= r - 1;
	uint32_t d2 = (uint32_t)__builtin_ctzll(r | top);
	r &= r - 1;
	uint32_t d3 = (uint32_t)__builtin_ctzll(r | top);
	r &= r - 1;
	uint32_t d4 = (uint32_t)__builtin_ctzll(r | top);
	r &= r - 1;
	uint32_t d5 = (uint32_t)__builtin_ctzll(r | top);
	r &= r - 1;
	uint32_t d6 = (uint32_t)__builtin_ctzll(r | top);
	r &= r - 1;
	uint32_t d7 = (uint32_t)__builtin_ctzll(r | top);
	if (TALLY__LIKELY((d6 < len) & (d7 == len))) {
		if (fill == FILL_ALL)
			set_domain(out, NULL, 0, NULL, 0);
		return short_fields(s, PREFIX_LEN - 1, d1, d2, d3, d4, d5, d6, len, nonnum, out, fill);
	}
	r &= r - 1;
	uint32_t d8 = (uint32_t)__builtin_ctzll(r | top);
	r &= r - 1;
	uint32_t d9 = (uint32_t)__builtin_ctzll(r | top);
	if (d8 >= len)
		return -EINVAL;
	if (fill == FILL_ALL)
		set_domain(out, s + PREFIX_LEN, d1 - PREFIX_LEN, s + d1 + 1, d2 - d1 - 1);
	return short_fields(s, d2, d3, d4, d5, d6, d7, d8, d9, nonnum, out, fill);
}

/* A reply of 64 bytes or more, its prefix checked: the dots a block of 64
 * at a time, the digits read again. */
static int parse_long(const char *reply, uint32_t len, struct tally_jsack *out, enum fill fill)
{
	struct dots d;

	if (!scan(reply, len, &d))
		return -EINVAL;
	/* after the prefix: 7 tokens (old layout), or 9 and more (new) */
	const uint32_t *p = d.pos; /* the stream's token: p[0]..p[1] */
	if (d.n == 6) {
		set_domain(out, NULL, 0, NULL, 0);
	} else if (TALLY__LIKELY(d.n >= 8)) {
		const char *a = reply + p[0] + 1, *h = reply + p[1] + 1;
		set_domain(out, a, p[1] - p[0] - 1, h, p[2] - p[1] - 1);
		p += 2;
	} else {
		return -EINVAL;
	}
	out->stream = tok(reply, p, 0, &out->stream_len);
	out->consumer = tok(reply, p, 1, &out->consumer_len);
	return numbers(reply, p[2], p[3], p[4], p[5], p[6], p[7], NULL, out, fill) ? 0 : -EINVAL;
}

/* Whether reply can be an ack subject at all: a length the parsers take,
 * and the prefix. */
static inline bool plausible(const char *reply, size_t len)
{
	return reply && len >= MIN_LEN && len <= UINT32_MAX && load_le64(reply) == load_le64(PREFIX);
}

TALLY_API int tally_jsack_parse(const char *reply, size_t len, struct tally_jsack *out)
{
	if (!plausible(reply, len))
		return -EINVAL;
	if (len < 64)
		return parse_short(reply, (uint32_t)len, out, FILL_ALL);
	return parse_long(reply, (uint32_t)len, out, FILL_ALL);
}

/* What tally_record_jetstream_at reads of a reply: stream, consumer,
 * timestamp_ns and pending; the rest of *out is left unspecified. The
 * same subjects are accepted and refused as by tally_jsack_parse. */
static inline __attribute__((always_inline)) int parse_record(const char *reply, size_t len,
							      struct tally_jsack *out)
{
	if (!plausible(reply, len))
		return -EINVAL;
	if (TALLY__LIKELY(len < 64))
		return parse_short(reply, (uint32_t)len, out, FILL_RECORD);
	return parse_long(reply, (uint32_t)len, out, FILL_RECORD);
}

int tally__jsack_parse_record(const char *reply, size_t len, struct tally_jsack *out)
{
	return parse_record(reply, len, out);
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

/* a[0..len) == b[0..len), 8 bytes at a time (the last 8 overlapping);
 * a key of 8 to 16 bytes, the common one, with no loop. */
static inline bool key_eq(const char *a, const char *b, uint32_t len)
{
	uint64_t diff;

	if (len < 8)
		return memcmp(a, b, len) == 0;
	diff = (load_le64(a) ^ load_le64(b)) | (load_le64(a + len - 8) ^ load_le64(b + len - 8));
	for (uint32_t i = 8; i + 8 < len; i += 8)
		diff |= load_le64(a + i) ^ load_le64(b + i);
	return diff == 0;
}

/* The pending entry's tag for a's consumer: from the handle's cache when
 * its key (stream '.' consumer, one run of the reply) is the last one
 * seen, else hashed and kept (a key too long for the cache is hashed
 * every time). */
static inline uint32_t consumer_tag(struct tally_producer *p, const struct tally_jsack *a)
{
	struct tally__jsack_cache *c = tally__producer_jsack_cache(p);
	uint32_t len = a->stream_len + 1 + a->consumer_len;

	if (TALLY__LIKELY(c->len == len && key_eq(c->key, a->stream, len)))
		return c->tag;
	uint32_t tag = TALLY__TAG(TALLY__ENTRY_PENDING,
				 tally__jsack_consumer_hash(a->stream, a->stream_len, a->consumer, a->consumer_len));
	if (len <= sizeof(c->key)) {
		memcpy(c->key, a->stream, len);
		c->len = len;
		c->tag = tag;
	}
	return tag;
}

TALLY_API int tally_record_jetstream_at(struct tally_producer *p, tally_subject_t subject,
					const char *reply, size_t reply_len, uint64_t now_real_ns)
{
	struct tally_jsack a;
	bool ok;

	if (parse_record(reply, reply_len, &a) != 0)
		return -EINVAL;
	uint32_t ptag = consumer_tag(p, &a);
	uint64_t wait = now_real_ns - a.timestamp_ns;
	if (TALLY__LIKELY(a.timestamp_ns <= now_real_ns && wait <= p->max_value_ns)) {
		ok = tally__record_tagged2(p, subject, wait, TALLY__TAG(TALLY__ENTRY_WAIT, 0), a.pending, ptag);
	} else {
		if (a.timestamp_ns > now_real_ns) /* skew: wait 0, the entry says by how much (for a count) */
			ok = tally__record_tagged(p, subject, a.timestamp_ns - now_real_ns,
						  TALLY__TAG(TALLY__ENTRY_WAIT_SKEW, 0));
		else
			ok = tally__record_tagged_clamped(p, subject, TALLY__TAG(TALLY__ENTRY_WAIT, 0));
		ok &= tally__record_tagged(p, subject, a.pending, ptag);
	}
	return ok ? 0 : -ENOBUFS;
}
