/* SPDX-License-Identifier: MIT */
/*
 * hist.c - the log-linear latency histogram: allocation, merge and
 * subtraction (dense and sparse), quantiles and cumulative counts at bucket
 * edges.  The bucket layout, its error bound and the hot-path add are in
 * hist.h.
 *
 * Design.  A time-slice histogram must be cheap to fill (the aggregator
 * adds tens of millions of values per second), mergeable (a window is the
 * sum of its slices) and subtractable (a slice leaves the window by being
 * subtracted, not by recomputing the window).  Plain counters over a fixed
 * log-linear layout give all three: add is an index computation, two
 * increments and a running count/sum/min/max, merge and subtract are
 * bucket-wise, and the error bound
 * (1/128 relative) holds for every value whatever the distribution, unlike
 * rank-error sketches whose error depends on the data.  The cost is memory:
 * 2345 counters for a one-hour range.  So counters are 16 bits wide, with
 * an exact carry for the rare bucket that passes 65,535 (hist.h,
 * Counters), and closed slices are kept packed: gamma-coded gaps and
 * counts of the nonzero buckets only, a few bits each, decoded once, when
 * the slice leaves its window.
 *
 * Reading is what must not scale with the bucket count: a publish computes
 * five quantiles for every active subject.  Each histogram therefore keeps
 * one uint64_t subtotal per 64-bucket block (an octave above 127), updated
 * by add, or for the hot path's lazy add marked stale and summed from the
 * block's 64 counters when read (hist.h, Subtotals); a quantile or cumulative walk adds up block subtotals and only
 * scans the buckets of the few blocks where a requested rank or edge falls.
 * All the requested quantiles are answered in the same ascending pass.  The
 * walk works over the sum of several histograms (a window's closed slices
 * plus its current slice, or the windows of several drain threads) without
 * materialising that sum, and leaves out the histograms that are empty.
 *
 * Invariants, checked with always-on aborts where cheap: blocks[b] equals
 * the true number of values in block b (exact, even when a bucket
 * saturates) unless b is stale, and then its counters and carries do, a bucket's true count is its counter plus its carry, the blocks add up to count, and a subtraction never takes
 * more than was merged.  Breaking one is a bug in the caller, not an input
 * error, so it aborts rather than returning an errno.
 */
#include "hist.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

bool (*tally__hist_nomem_hook)(const char *point) = NULL;

#define BIT4(b) UINT64_C(1) << (b), UINT64_C(1) << ((b) + 1), UINT64_C(1) << ((b) + 2), UINT64_C(1) << ((b) + 3)
#define BIT16(b) BIT4(b), BIT4((b) + 4), BIT4((b) + 8), BIT4((b) + 12)
const uint64_t tally__hist_bit[64] = { BIT16(0), BIT16(16), BIT16(32), BIT16(48) };

/* What merge and subtract need of either a dense or a sparse histogram. */
struct summary {
	uint64_t count, sum, min, max, clamped;
	uint32_t flags;
};

static struct summary summary_of(const struct tally__hist *h)
{
	return (struct summary){ h->count, h->sum, h->min, h->max,
				 h->clamped, h->flags };
}

static struct summary summary_of_sparse(const struct tally__hist_sparse *s)
{
	return (struct summary){ s->count, s->sum, s->min, s->max,
				 s->clamped, s->flags };
}

static void summary_clear(struct tally__hist *h)
{
	h->count = 0;
	h->sum = 0;
	h->min = UINT64_MAX;
	h->max = 0;
	h->clamped = 0;
	h->flags = 0;
}

static uint32_t block_end(const struct tally__hist *h, uint32_t b)
{
	uint32_t end = (b + 1u) * TALLY__HIST_BLOCK;

	return end < h->nbuckets ? end : h->nbuckets;
}

/* ---- storage --------------------------------------------------------- */

/* Bytes of the one allocation: the subtotals, then the counters (rounded
 * to 8 bytes). */
static size_t storage_bytes(const struct tally__hist *h)
{
	return (h->nblocks + (h->nbuckets + 3u) / 4u) * sizeof(uint64_t);
}

/* From the huge-page arena (arena.h: with thousands of subjects the
 * counters are what every sample misses on), else from malloc. */
static int storage_alloc(struct tally__hist *h, const char *point)
{
	uint64_t *mem;

	if (TALLY__HIST_NOMEM(point))
		return -ENOMEM;
	mem = TALLY__HIST_NOMEM("hist.arena") ? NULL : tally__arena_alloc(storage_bytes(h));
	h->in_arena = mem != NULL;
	if (mem == NULL)
		mem = calloc(1, storage_bytes(h));
	if (mem == NULL)
		return -ENOMEM;
	h->blocks = mem;
	h->counts = (uint16_t *)(mem + h->nblocks);
	return 0;
}

int tally__hist_init(struct tally__hist *h, uint64_t max_value)
{
	if (max_value == 0)
		return -EINVAL;
	memset(h, 0, sizeof(*h));
	h->nbuckets = tally__hist_nbuckets_for(max_value);
	h->nblocks = (h->nbuckets + TALLY__HIST_BLOCK - 1u) / TALLY__HIST_BLOCK;
	TALLY__ASSERT(h->nblocks <= 64u); /* carry_blocks has a bit each */
	h->max_value = max_value;
	summary_clear(h);
	return storage_alloc(h, "hist.init");
}

/* Give back the counters and the carry table (the geometry stays). */
static void storage_free(struct tally__hist *h)
{
	if (h->in_arena)
		tally__arena_free(h->blocks, storage_bytes(h));
	else
		free(h->blocks);
	h->in_arena = 0;
	free(h->carry);
	h->blocks = NULL;
	h->counts = NULL;
	h->carry = NULL;
	h->ncarry = h->carry_cap = 0;
	h->carry_blocks = 0;
	h->stale = 0;
}

void tally__hist_destroy(struct tally__hist *h)
{
	storage_free(h);
	h->nbuckets = 0;
	h->nblocks = 0;
}

void tally__hist_release(struct tally__hist *h)
{
	TALLY__ASSERT(h->count == 0);
	storage_free(h);
	summary_clear(h);
}

int tally__hist_wake(struct tally__hist *h)
{
	if (h->counts != NULL)
		return 0;
	TALLY__ASSERT(h->nbuckets != 0 && h->count == 0);
	return storage_alloc(h, "hist.wake");
}

void tally__hist_reset(struct tally__hist *h)
{
	if (h->counts == NULL) {
		/* released: nothing to clear */
	} else if (h->flags & TALLY__HIST_BUCKET_SATURATED) {
		/* A stuck bucket may sit in a block whose subtotal is 0. */
		memset(h->counts, 0, h->nbuckets * sizeof(*h->counts));
		memset(h->blocks, 0, h->nblocks * sizeof(*h->blocks));
	} else {
		for (uint32_t b = 0; b < h->nblocks; b++) {
			uint32_t lo = b * TALLY__HIST_BLOCK;

			if (h->blocks[b] == 0 && !((h->stale >> b) & 1u))
				continue;
			memset(h->counts + lo, 0,
			       (block_end(h, b) - lo) * sizeof(*h->counts));
			h->blocks[b] = 0;
		}
	}
	h->ncarry = 0; /* the table's buffer is kept */
	h->carry_blocks = 0;
	h->stale = 0;
	summary_clear(h);
}

/* ---- carries: the high part of buckets that reached 65,536 ------------ */

/* Position of bucket i in the carry table, or where it would go. */
static uint32_t carry_pos(const struct tally__hist *h, uint32_t i)
{
	uint32_t lo = 0, hi = h->ncarry;

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2u;

		if (h->carry[mid].idx < i)
			lo = mid + 1u;
		else
			hi = mid;
	}
	return lo;
}

static uint64_t carry_high(const struct tally__hist *h, uint32_t i)
{
	uint32_t k;

	if (!((h->carry_blocks >> (i / TALLY__HIST_BLOCK)) & 1u))
		return 0;
	k = carry_pos(h, i);
	return k < h->ncarry && h->carry[k].idx == i ? h->carry[k].high : 0;
}

uint64_t tally__hist_bucket(const struct tally__hist *h, uint32_t i)
{
	if (h->counts == NULL)
		return 0;
	TALLY__ASSERT(i < h->nbuckets);
	return h->counts[i] + carry_high(h, i);
}

/* Is some carry left in bucket i's block?  (After a removal at k.) */
static bool carry_in_block(const struct tally__hist *h, uint32_t k, uint32_t b)
{
	return (k > 0 && h->carry[k - 1].idx / TALLY__HIST_BLOCK == b) ||
	       (k < h->ncarry && h->carry[k].idx / TALLY__HIST_BLOCK == b);
}

static int carry_grow(struct tally__hist *h)
{
	uint32_t cap = h->carry_cap ? h->carry_cap * 2u : 4u;
	struct tally__hist_carry *c;

	if (TALLY__HIST_NOMEM("hist.carry"))
		return -ENOMEM;
	c = realloc(h->carry, cap * sizeof(*c));
	if (c == NULL)
		return -ENOMEM;
	h->carry = c;
	h->carry_cap = cap;
	return 0;
}

/* Set bucket i's high part.  Fails (-ENOMEM) only when it must grow. */
static int carry_set(struct tally__hist *h, uint32_t i, uint64_t high)
{
	uint32_t k = carry_pos(h, i), b = i / TALLY__HIST_BLOCK;
	bool found = k < h->ncarry && h->carry[k].idx == i;

	if (found && high != 0) {
		h->carry[k].high = high;
	} else if (found) {
		memmove(h->carry + k, h->carry + k + 1,
			(h->ncarry - k - 1u) * sizeof(*h->carry));
		h->ncarry--;
		if (!carry_in_block(h, k, b))
			h->carry_blocks &= ~(UINT64_C(1) << b);
	} else if (high != 0) {
		if (h->ncarry == h->carry_cap && carry_grow(h) != 0)
			return -ENOMEM;
		memmove(h->carry + k + 1, h->carry + k,
			(h->ncarry - k) * sizeof(*h->carry));
		h->carry[k] = (struct tally__hist_carry){ i, high };
		h->ncarry++;
		h->carry_blocks |= UINT64_C(1) << b;
	}
	return 0;
}

/* Bucket i := t.  Without room for a carry it saturates at its value. */
static void bucket_set(struct tally__hist *h, uint32_t i, uint64_t t)
{
	uint64_t low = t & UINT16_MAX;

	if (carry_set(h, i, t - low) == 0) {
		h->counts[i] = (uint16_t)low;
	} else {
		h->counts[i] = UINT16_MAX;
		h->flags |= TALLY__HIST_BUCKET_SATURATED;
	}
}

void tally__hist_carry_one(struct tally__hist *h, uint32_t i)
{
	bucket_set(h, i, tally__hist_bucket(h, i) + 1u);
}

/* ---- stale subtotals (hist.h, Subtotals) ------------------------------ */

/* Sum of the n counters c[]: with SSE2, the low and the high bytes of 8
 * counters at a time through two sums of absolute differences. */
static uint64_t counts_sum(const uint16_t *c, uint32_t n)
{
	uint64_t t = 0;
	uint32_t k = 0;

#if defined(__SSE2__) && defined(__x86_64__)
	const __m128i z = _mm_setzero_si128(), low = _mm_set1_epi16(0xff);
	__m128i lo = z, hi = z;

	for (; k + 8u <= n; k += 8u) {
		__m128i a = _mm_loadu_si128((const void *)(c + k));

		lo = _mm_add_epi64(lo, _mm_sad_epu8(_mm_and_si128(a, low), z));
		hi = _mm_add_epi64(hi, _mm_sad_epu8(_mm_srli_epi16(a, 8), z));
	}
	lo = _mm_add_epi64(lo, _mm_slli_epi64(hi, 8));
	t = (uint64_t)_mm_cvtsi128_si64(lo) + (uint64_t)_mm_cvtsi128_si64(_mm_unpackhi_epi64(lo, lo));
#endif
	for (; k < n; k++)
		t += c[k];
	return t;
}

uint64_t tally__hist_block(const struct tally__hist *h, uint32_t b)
{
	uint32_t lo = b * TALLY__HIST_BLOCK;
	uint64_t t;

	if (!((h->stale >> b) & 1u))
		return h->blocks[b];
	t = counts_sum(h->counts + lo, block_end(h, b) - lo);
	if ((h->carry_blocks >> b) & 1u)
		for (uint32_t k = carry_pos(h, lo); k < h->ncarry && h->carry[k].idx < lo + TALLY__HIST_BLOCK; k++)
			t += h->carry[k].high;
	return t;
}

/* Every stale subtotal written back: blocks[] exact again. */
static void blocks_settle(struct tally__hist *h)
{
	for (uint64_t m = h->stale; m != 0; m &= m - 1u) {
		uint32_t b = (uint32_t)__builtin_ctzll(m);

		h->blocks[b] = tally__hist_block(h, b);
	}
	h->stale = 0;
}

void tally__hist_add_settle(struct tally__hist *h, uint32_t i)
{
	blocks_settle(h);
	if (h->counts[i] == UINT16_MAX)
		tally__hist_carry_one(h, i);
	else
		h->counts[i]++;
	h->blocks[i / TALLY__HIST_BLOCK]++;
}

/* A bucket that a failed carry left stuck: it no longer adds or subtracts. */
static bool bucket_stuck(const struct tally__hist *h, uint32_t i)
{
	return (h->flags & TALLY__HIST_BUCKET_SATURATED) &&
	       h->counts[i] == UINT16_MAX;
}

/* The common case of add and sub: no carry in the block, no stuck
 * bucket anywhere, so the 16-bit counter alone is the bucket. */
static inline bool bucket_plain(const struct tally__hist *h, uint32_t i)
{
	return !((h->carry_blocks >> (i / TALLY__HIST_BLOCK)) & 1u) &&
	       !(h->flags & TALLY__HIST_BUCKET_SATURATED);
}

static __attribute__((noinline)) void bucket_add_slow(struct tally__hist *h, uint32_t i, uint64_t n)
{
	bool sat = false;
	uint64_t t;

	if (bucket_stuck(h, i))
		return;
	t = tally__hist_sat_add(tally__hist_bucket(h, i), n, &sat);
	bucket_set(h, i, t);
	if (sat)
		h->flags |= TALLY__HIST_BUCKET_SATURATED;
}

/* bucket i += n; the block subtotal is exact. */
static inline void bucket_add(struct tally__hist *h, uint32_t i, uint64_t n)
{
	if (TALLY__LIKELY(bucket_plain(h, i) && n <= (uint64_t)(UINT16_MAX - h->counts[i])))
		h->counts[i] = (uint16_t)(h->counts[i] + n);
	else
		bucket_add_slow(h, i, n);
	h->blocks[i / TALLY__HIST_BLOCK] += n;
}

/* bucket i -= n; a stuck bucket stays stuck until the next reset. */
static __attribute__((noinline)) void bucket_sub_slow(struct tally__hist *h, uint32_t i, uint64_t n)
{
	uint64_t t;

	if (bucket_stuck(h, i))
		return;
	t = tally__hist_bucket(h, i);
	TALLY__ASSERT(t >= n);
	bucket_set(h, i, t - n); /* never grows the table */
}

static inline void bucket_sub(struct tally__hist *h, uint32_t i, uint64_t n)
{
	if (TALLY__LIKELY(bucket_plain(h, i))) {
		TALLY__ASSERT(h->counts[i] >= n);
		h->counts[i] = (uint16_t)(h->counts[i] - n);
	} else {
		bucket_sub_slow(h, i, n);
	}
	TALLY__ASSERT(h->blocks[i / TALLY__HIST_BLOCK] >= n);
	h->blocks[i / TALLY__HIST_BLOCK] -= n;
}

static void summary_merge(struct tally__hist *h, const struct summary *s)
{
	bool sat = false;

	h->count += s->count;
	h->sum = tally__hist_sat_add(h->sum, s->sum, &sat);
	h->flags |= s->flags | (sat ? TALLY__HIST_SUM_SATURATED : 0u);
	h->clamped += s->clamped;
	h->min = s->min < h->min ? s->min : h->min;
	h->max = s->max > h->max ? s->max : h->max;
}

static void summary_sub(struct tally__hist *h, const struct summary *s)
{
	TALLY__ASSERT(h->count >= s->count && h->clamped >= s->clamped);
	h->count -= s->count;
	h->clamped -= s->clamped;
	h->flags |= TALLY__HIST_BOUNDS_LOOSE;
	if (!(h->flags & TALLY__HIST_SUM_SATURATED)) {
		TALLY__ASSERT(h->sum >= s->sum);
		h->sum -= s->sum;
	}
	if (h->count == 0)
		tally__hist_reset(h);
}

/* Bit k set when counter k of the n <= 64 counters c[] is nonzero: with
 * SSE2, four compares of 16 counters each instead of 64 tests. */
static inline uint64_t block_nonzero(const uint16_t *c, uint32_t n)
{
	uint64_t m = 0;

#if defined(__SSE2__)
	if (n == TALLY__HIST_BLOCK) {
		const __m128i z = _mm_setzero_si128();

		for (unsigned k = 0; k < 4; k++) {
			__m128i a = _mm_loadu_si128((const void *)(c + 16u * k));
			__m128i b = _mm_loadu_si128((const void *)(c + 16u * k + 8u));
			__m128i p = _mm_packs_epi16(_mm_cmpeq_epi16(a, z), _mm_cmpeq_epi16(b, z));

			m |= (uint64_t)(uint16_t)~_mm_movemask_epi8(p) << (16u * k);
		}
		return m;
	}
#endif
	for (uint32_t k = 0; k < n; k++)
		m |= (uint64_t)(c[k] != 0) << k;
	return m;
}

/* Visit every nonzero bucket i of h in ascending order, its true count in
 * n: blocks with a carry bucket by bucket, the others through the mask of
 * their nonzero counters. */
#define FOR_EACH_BUCKET(h, i, n, stmt)                                         \
	for (uint32_t blk_ = 0; (h)->counts && blk_ < (h)->nblocks; blk_++) {  \
		uint32_t lo_ = blk_ * TALLY__HIST_BLOCK;                       \
		uint32_t hi_ = block_end((h), blk_);                           \
		if (((h)->carry_blocks >> blk_) & 1u) {                        \
			for (uint32_t i = lo_; i < hi_; i++) {                 \
				uint64_t n = tally__hist_bucket((h), i);       \
				if (n != 0) {                                  \
					stmt;                                  \
				}                                              \
			}                                                      \
			continue;                                              \
		}                                                              \
		if ((h)->blocks[blk_] == 0 && !(((h)->stale >> blk_) & 1u))    \
			continue;                                              \
		for (uint64_t m_ = block_nonzero((h)->counts + lo_, hi_ - lo_); \
		     m_ != 0; m_ &= m_ - 1u) {                                 \
			uint32_t i = lo_ + (uint32_t)__builtin_ctzll(m_);      \
			uint64_t n = (h)->counts[i];                           \
			stmt;                                                  \
		}                                                              \
	}

void tally__hist_merge(struct tally__hist *a, const struct tally__hist *b)
{
	struct summary s = summary_of(b);

	TALLY__ASSERT(a->nbuckets == b->nbuckets);
	if (b->count == 0 && b->clamped == 0)
		return;
	TALLY__ASSERT(a->counts != NULL);
	blocks_settle(a);
	FOR_EACH_BUCKET(b, i, n, bucket_add(a, i, n));
	summary_merge(a, &s);
}

void tally__hist_sub(struct tally__hist *a, const struct tally__hist *b)
{
	struct summary s = summary_of(b);

	TALLY__ASSERT(a->nbuckets == b->nbuckets);
	if (b->count == 0)
		return;
	TALLY__ASSERT(a->counts != NULL);
	blocks_settle(a);
	FOR_EACH_BUCKET(b, i, n, bucket_sub(a, i, n));
	summary_sub(a, &s);
}

void tally__hist_set_bounds(struct tally__hist *h, uint64_t min, uint64_t max)
{
	if (h->count == 0)
		return;
	TALLY__ASSERT(min <= max && max <= h->max_value);
	h->min = min;
	h->max = max;
	h->flags &= ~(uint32_t)TALLY__HIST_BOUNDS_LOOSE;
}

uint32_t tally__hist_nonzero(const struct tally__hist *h)
{
	uint32_t k = 0;

	FOR_EACH_BUCKET(h, i, n, { (void)i; (void)n; k++; });
	return k;
}

int tally__hist_sparse_reserve(struct tally__hist_sparse *s, uint32_t n)
{
	struct tally__hist_entry *e;

	if (n <= s->cap)
		return 0;
	e = realloc(s->e, n * sizeof(*e));
	if (e == NULL)
		return -ENOMEM;
	s->e = e;
	s->cap = n;
	return 0;
}

int tally__hist_sparse_from(struct tally__hist_sparse *s,
			    const struct tally__hist *h)
{
	int rc = tally__hist_sparse_reserve(s, tally__hist_nonzero(h));

	if (rc != 0)
		return rc;
	s->len = 0;
	FOR_EACH_BUCKET(h, i, n,
			s->e[s->len++] = ((struct tally__hist_entry){ i, n }));
	s->count = h->count;
	s->sum = h->sum;
	s->min = h->min;
	s->max = h->max;
	s->clamped = h->clamped;
	s->flags = h->flags;
	return 0;
}

void tally__hist_sparse_clear(struct tally__hist_sparse *s)
{
	s->len = 0;
	s->flags = 0;
	s->count = 0;
	s->sum = 0;
	s->min = UINT64_MAX;
	s->max = 0;
	s->clamped = 0;
}

void tally__hist_sparse_free(struct tally__hist_sparse *s)
{
	free(s->e);
	s->e = NULL;
	s->cap = 0;
	tally__hist_sparse_clear(s);
}

void tally__hist_merge_sparse(struct tally__hist *h,
			      const struct tally__hist_sparse *s)
{
	struct summary sm = summary_of_sparse(s);

	if (s->count == 0 && s->clamped == 0)
		return;
	TALLY__ASSERT(h->counts != NULL);
	blocks_settle(h);
	for (uint32_t k = 0; k < s->len; k++) {
		TALLY__ASSERT(s->e[k].idx < h->nbuckets);
		bucket_add(h, s->e[k].idx, s->e[k].n);
	}
	summary_merge(h, &sm);
}

void tally__hist_sub_sparse(struct tally__hist *h,
			    const struct tally__hist_sparse *s)
{
	struct summary sm = summary_of_sparse(s);

	if (s->count == 0)
		return;
	TALLY__ASSERT(h->counts != NULL);
	blocks_settle(h);
	for (uint32_t k = 0; k < s->len; k++) {
		TALLY__ASSERT(s->e[k].idx < h->nbuckets);
		bucket_sub(h, s->e[k].idx, s->e[k].n);
	}
	summary_sub(h, &sm);
}

/* ---- packed form ------------------------------------------------------ */

size_t tally__varint_len(uint64_t v)
{
	size_t n = 1;

	for (; v >= 0x80; v >>= 7)
		n++;
	return n;
}

uint8_t *tally__varint_put(uint8_t *p, uint64_t v)
{
	while (v >= 0x80) {
		*p++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*p++ = (uint8_t)v;
	return p;
}

const uint8_t *tally__varint_get(const uint8_t *p, const uint8_t *end, uint64_t *v, const char *what)
{
	uint64_t r = 0;

	for (unsigned sh = 0; sh < 64; sh += 7) {
		TALLY__ASSERT(p < end);
		r |= (uint64_t)(*p & 0x7f) << sh;
		if (!(*p++ & 0x80)) {
			*v = r;
			return p;
		}
	}
	tally__die(__FILE__, __LINE__, "%s", what);
	return end;
}

/* Bits of the Elias gamma code of x >= 1. */
static unsigned gamma_bits(uint64_t x)
{
	return 2u * (63u - (unsigned)__builtin_clzll(x)) + 1u;
}

struct bitw {
	uint8_t *p;
	uint64_t acc; /* the low n bits (n < 32) are pending, most significant first */
	unsigned n;
};

static inline void bitw_put(struct bitw *w, uint64_t v, unsigned n) /* 1 <= n <= 32 */
{
	w->acc = (w->acc << n) | (v & ((UINT64_C(1) << n) - 1u));
	w->n += n;
	if (w->n >= 32) {
		uint32_t out = (uint32_t)(w->acc >> (w->n - 32u));

		w->n -= 32;
		w->p[0] = (uint8_t)(out >> 24);
		w->p[1] = (uint8_t)(out >> 16);
		w->p[2] = (uint8_t)(out >> 8);
		w->p[3] = (uint8_t)out;
		w->p += 4;
	}
}

static inline void bitw_gamma(struct bitw *w, uint64_t x)
{
	unsigned l = 63u - (unsigned)__builtin_clzll(x);

	if (l < 16u) { /* l zeros then the l + 1 bits of x: x in 2l + 1 bits */
		bitw_put(w, x, 2u * l + 1u);
		return;
	}
	for (unsigned z = l; z > 0;) {
		unsigned k = z > 32 ? 32 : z;

		bitw_put(w, 0, k);
		z -= k;
	}
	if (l + 1u > 32u) {
		bitw_put(w, x >> 32, l + 1u - 32u);
		bitw_put(w, x, 32);
	} else {
		bitw_put(w, x, l + 1u);
	}
}

/* gamma(gap) then gamma(n): one put when both codes fit in 32 bits. */
static inline void bitw_pair(struct bitw *w, uint32_t gap, uint64_t n)
{
	unsigned lg = 31u - (unsigned)__builtin_clz(gap);
	unsigned ln = n >> 16 ? 16u : 63u - (unsigned)__builtin_clzll(n);
	unsigned bg = 2u * lg + 1u, bn = 2u * ln + 1u;

	if (bg + bn <= 32u) {
		bitw_put(w, ((uint64_t)gap << bn) | n, bg + bn);
		return;
	}
	bitw_gamma(w, gap);
	bitw_gamma(w, n);
}

static void bitw_flush(struct bitw *w)
{
	for (; w->n >= 8; w->n -= 8)
		*w->p++ = (uint8_t)(w->acc >> (w->n - 8u));
	if (w->n > 0)
		*w->p++ = (uint8_t)(w->acc << (8u - w->n));
	w->n = 0;
}

struct bitr {
	const uint8_t *p, *end;
	uint64_t acc; /* n bits, most significant first, the rest zero */
	unsigned n;
};

static void bitr_fill(struct bitr *r)
{
	while (r->n <= 56 && r->p < r->end) {
		r->acc |= (uint64_t)*r->p++ << (56u - r->n);
		r->n += 8;
	}
}

static uint64_t bitr_get(struct bitr *r, unsigned k) /* 1 <= k <= 32 */
{
	uint64_t v;

	bitr_fill(r);
	TALLY__ASSERT(r->n >= k);
	v = r->acc >> (64u - k);
	r->acc <<= k;
	r->n -= k;
	return v;
}

static uint64_t bitr_gamma(struct bitr *r)
{
	unsigned l = 0, z;
	uint64_t x;

	for (;;) {
		bitr_fill(r);
		TALLY__ASSERT(r->n > 0);
		if (r->acc != 0)
			break;
		l += r->n; /* all pending bits are zeros */
		r->n = 0;
	}
	z = (unsigned)__builtin_clzll(r->acc);
	r->acc <<= z;
	r->n -= z;
	l += z;
	TALLY__ASSERT(l < 64);
	if (l + 1u > 32u) {
		x = bitr_get(r, l + 1u - 32u) << 32;
		return x | bitr_get(r, 32);
	}
	return bitr_get(r, l + 1u);
}

static size_t packed_header_len(const struct tally__hist *h)
{
	return tally__varint_len(h->count) + tally__varint_len(h->sum) + tally__varint_len(h->min) +
	       tally__varint_len(h->max) + tally__varint_len(h->clamped) + tally__varint_len(h->flags);
}

/* After the last pair, a gap past the last bucket ends the list. */
size_t tally__hist_packed_size(const struct tally__hist *h)
{
	uint64_t bits = 0;
	uint32_t prev = 0;

	FOR_EACH_BUCKET(h, i, n, {
		bits += gamma_bits(i + 1u - prev) + gamma_bits(n);
		prev = i + 1u;
	});
	bits += gamma_bits(h->nbuckets + 1u - prev);
	return packed_header_len(h) + (size_t)((bits + 7u) / 8u);
}

size_t tally__hist_pack_merge(const struct tally__hist *h, uint8_t *buf,
			      struct tally__hist *into)
{
	struct summary s = summary_of(h);
	struct bitw w;
	uint32_t prev = 0;
	uint8_t *p = buf;

	TALLY__ASSERT(into == NULL || into->nbuckets == h->nbuckets);
	TALLY__ASSERT(into == NULL || into->counts != NULL || h->count == 0);
	if (into != NULL && into->counts != NULL)
		blocks_settle(into);
	p = tally__varint_put(p, h->count);
	p = tally__varint_put(p, h->sum);
	p = tally__varint_put(p, h->min);
	p = tally__varint_put(p, h->max);
	p = tally__varint_put(p, h->clamped);
	p = tally__varint_put(p, h->flags);
	w = (struct bitw){ p, 0, 0 };
	FOR_EACH_BUCKET(h, i, n, {
		bitw_pair(&w, i + 1u - prev, n);
		prev = i + 1u;
		if (into != NULL)
			bucket_add(into, i, n);
	});
	bitw_gamma(&w, h->nbuckets + 1u - prev);
	bitw_flush(&w);
	if (into != NULL && (h->count != 0 || h->clamped != 0))
		summary_merge(into, &s);
	return (size_t)(w.p - buf);
}

size_t tally__hist_pack(const struct tally__hist *h, uint8_t *buf)
{
	return tally__hist_pack_merge(h, buf, NULL);
}

static const uint8_t *packed_head(const uint8_t *buf, size_t len,
				  struct tally__hist_packed_info *o)
{
	const uint8_t *p = buf, *end = buf + len;
	uint64_t flags;

	p = tally__varint_get(p, end, &o->count, "packed histogram: varint too long");
	p = tally__varint_get(p, end, &o->sum, "packed histogram: varint too long");
	p = tally__varint_get(p, end, &o->min, "packed histogram: varint too long");
	p = tally__varint_get(p, end, &o->max, "packed histogram: varint too long");
	p = tally__varint_get(p, end, &o->clamped, "packed histogram: varint too long");
	p = tally__varint_get(p, end, &flags, "packed histogram: varint too long");
	o->flags = (uint32_t)flags;
	return p;
}

void tally__hist_packed_info(const uint8_t *buf, size_t len,
			     struct tally__hist_packed_info *out)
{
	packed_head(buf, len, out);
}

static void packed_apply(struct tally__hist *h, const uint8_t *buf,
			 size_t len, bool add)
{
	struct tally__hist_packed_info o;
	uint64_t idx = 0;
	struct bitr r = { packed_head(buf, len, &o), buf + len, 0, 0 };
	struct summary s = { o.count, o.sum, o.min, o.max, o.clamped, o.flags };

	if (o.count == 0 && o.clamped == 0)
		return;
	TALLY__ASSERT(h->counts != NULL);
	blocks_settle(h);
	for (;;) {
		uint64_t n;

		idx += bitr_gamma(&r); /* idx + 1 of this bucket */
		if (idx > h->nbuckets)
			break; /* the end mark */
		n = bitr_gamma(&r);
		if (add)
			bucket_add(h, (uint32_t)(idx - 1u), n);
		else
			bucket_sub(h, (uint32_t)(idx - 1u), n);
	}
	if (add)
		summary_merge(h, &s);
	else
		summary_sub(h, &s);
}

void tally__hist_merge_packed(struct tally__hist *h, const uint8_t *buf,
			      size_t len)
{
	packed_apply(h, buf, len, true);
}

void tally__hist_sub_packed(struct tally__hist *h, const uint8_t *buf,
			    size_t len)
{
	packed_apply(h, buf, len, false);
}

/* ---- read side: walks over the sum of nh histograms ---------------- */

/* The walk sums only the histograms that can hold a value (walk_init):
 * a merged window (drain_threads) brings several empty ones, and every
 * histogram summed costs the scan a load per bucket. */
#define WALK_MAX 64u

struct walk {
	const struct tally__hist *const *hs; /* the ones summed */
	size_t nh;
	uint64_t count, min, max; /* of the sum */
	uint64_t carry_blocks;    /* blocks where some histogram summed has a carry */
	uint64_t stale;           /* blocks stale in some histogram summed (hist.h, Subtotals) */
	bool exact;               /* min/max exact: no BOUNDS_LOOSE (of every histogram given) */
	bool dense;               /* every histogram summed has storage */
	const struct tally__hist *use[WALK_MAX];
};

/* Holds no value in any bucket: empty, so every block subtotal is 0
 * (the invariant above), no carry, and no counter a failed carry left
 * stuck (which reads UINT16_MAX whatever the count). */
static bool hist_void(const struct tally__hist *h)
{
	return h->count == 0 && h->ncarry == 0 && !(h->flags & TALLY__HIST_BUCKET_SATURATED);
}

static int walk_init(struct walk *w, const struct tally__hist *const *hs,
		     size_t nh)
{
	size_t nu = 0;

	if (nh == 0)
		return -EINVAL;
	w->hs = hs;
	w->nh = nh;
	w->count = 0;
	w->min = UINT64_MAX;
	w->max = 0;
	w->carry_blocks = 0;
	w->stale = 0;
	w->exact = w->dense = true;
	for (size_t k = 0; k < nh; k++) {
		TALLY__ASSERT(hs[k]->nbuckets == hs[0]->nbuckets);
		w->count += hs[k]->count;
		w->exact &= !(hs[k]->flags & TALLY__HIST_BOUNDS_LOOSE);
		if (nh <= WALK_MAX && hist_void(hs[k]))
			continue; /* adds 0 to every bucket and block: not summed */
		if (nh <= WALK_MAX)
			w->use[nu++] = hs[k];
		w->dense &= hs[k]->counts != NULL;
		w->carry_blocks |= hs[k]->carry_blocks;
		w->stale |= hs[k]->stale;
		if (hs[k]->count == 0)
			continue;
		w->min = hs[k]->min < w->min ? hs[k]->min : w->min;
		w->max = hs[k]->max > w->max ? hs[k]->max : w->max;
	}
	if (nh <= WALK_MAX) {
		if (nu == 0) { /* all empty: one of them for the layout, it sums to 0 */
			w->use[nu++] = hs[0];
			w->dense = hs[0]->counts != NULL;
		}
		w->hs = w->use;
		w->nh = nu;
	}
	return 0;
}

/* walk_block() where some histogram's subtotal of b is not kept. */
static __attribute__((noinline)) uint64_t walk_block_stale(const struct walk *w, uint32_t b)
{
	uint64_t t = 0;

	for (size_t k = 0; k < w->nh; k++)
		if (w->hs[k]->blocks != NULL)
			t += tally__hist_block(w->hs[k], b);
	return t;
}

static inline uint64_t walk_block(const struct walk *w, uint32_t b)
{
	uint64_t t = 0;

	if (TALLY__UNLIKELY((w->stale >> b) & 1u))
		return walk_block_stale(w, b);

	for (size_t k = 0; k < w->nh; k++)
		if (w->hs[k]->blocks != NULL)
			t += w->hs[k]->blocks[b];
	return t;
}

static uint64_t walk_bucket(const struct walk *w, uint32_t i)
{
	uint64_t t = 0;

	for (size_t k = 0; k < w->nh; k++)
		t += tally__hist_bucket(w->hs[k], i);
	return t;
}

/* Values in buckets [lo, hi) of one block. */
static uint64_t walk_partial(const struct walk *w, uint32_t lo, uint32_t hi)
{
	uint64_t t = 0;

	for (uint32_t i = lo; i < hi; i++)
		t += walk_bucket(w, i);
	return t;
}

/* Nearest rank of q among count values: ceil(q * count), in [1, count]. */
static uint64_t rank_of(double q, uint64_t count)
{
	double r = __builtin_ceil(q * (double)count);

	if (r < 1.0)
		return 1;
	return r >= (double)count ? count : (uint64_t)r;
}

static bool qs_valid(const double *qs, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (!(qs[i] >= 0.0 && qs[i] <= 1.0))
			return false; /* also rejects NaN */
		if (i > 0 && qs[i] < qs[i - 1])
			return false;
	}
	return true;
}

/* Value reported for the rank-th value, which lies in bucket idx. */
static uint64_t report(const struct walk *w, uint32_t idx, uint64_t rank)
{
	uint64_t v = tally__hist_bucket_mid(idx);

	if (w->exact && rank == 1)
		return w->min;
	if (w->exact && rank == w->count)
		return w->max;
	v = v < w->min ? w->min : v;
	return v > w->max ? w->max : v;
}

/*
 * Add buckets next, next+1, ... (below hi) to *cum until it reaches rank r.
 * Returns the bucket where it did, or hi.  The usual one or two histograms
 * get a tight loop of their own.
 */
static uint32_t walk_scan(const struct walk *w, uint32_t next, uint32_t hi,
			  uint64_t *cum, uint64_t r)
{
	uint64_t c = *cum;
	uint32_t i = next;
	bool plain = w->dense &&
		     !((w->carry_blocks >> (next / TALLY__HIST_BLOCK)) & 1u);

	if (plain && w->nh == 1) {
		const uint16_t *a = w->hs[0]->counts;

		while (i < hi && (c += a[i]) < r)
			i++;
	} else if (plain && w->nh == 2) {
		const uint16_t *a = w->hs[0]->counts, *b = w->hs[1]->counts;

		while (i < hi && (c += (uint64_t)a[i] + b[i]) < r)
			i++;
	} else if (plain) { /* merged windows: the counters alone, no call per bucket */
		for (; i < hi; i++) {
			uint64_t t = 0;
			for (size_t k = 0; k < w->nh; k++)
				t += w->hs[k]->counts[i];
			if ((c += t) >= r)
				break;
		}
	} else {
		while (i < hi && (c += walk_bucket(w, i)) < r)
			i++;
	}
	*cum = c;
	return i;
}

/* Last nonzero bucket of [lo, hi). */
static uint32_t walk_last(const struct walk *w, uint32_t lo, uint32_t hi)
{
	while (hi > lo && walk_bucket(w, hi - 1) == 0)
		hi--;
	return hi > lo ? hi - 1 : lo;
}

/*
 * Answer qs[q], qs[q+1], ... whose ranks r fall in block b, which holds
 * ranks (cum, total]; r is the rank of qs[q] (r > cum).  Returns the next
 * unanswered q.
 */
static size_t walk_quantile_block(const struct walk *w, uint32_t b,
				  uint64_t cum, uint64_t total, uint64_t r,
				  const double *qs, size_t q, size_t n,
				  uint64_t *out)
{
	uint32_t lo = b * TALLY__HIST_BLOCK, hi = block_end(w->hs[0], b);
	uint32_t next = lo, at = lo;

	for (;;) {
		if (r > cum) {
			at = walk_scan(w, next, hi, &cum, r);
			if (at == hi) {
				/* Only a saturated (short) bucket gets here. */
				at = walk_last(w, lo, hi);
				cum = total;
			}
			next = at + 1;
		}
		out[q++] = report(w, at, r);
		if (q == n)
			return q;
		r = rank_of(qs[q], w->count);
		if (r > total)
			return q;
	}
}

int tally__hist_quantiles_n(const struct tally__hist *const *hs, size_t nh,
			    const double *qs, size_t n, uint64_t *out)
{
	struct walk w;
	uint64_t cum = 0, r;
	size_t q = 0;
	int rc = walk_init(&w, hs, nh);

	if (rc != 0)
		return rc;
	if (!qs_valid(qs, n))
		return -EINVAL;
	if (w.count == 0)
		return -ENODATA;
	r = n > 0 ? rank_of(qs[0], w.count) : 0;
	for (uint32_t b = 0; b < hs[0]->nblocks && q < n; b++) {
		uint64_t t = walk_block(&w, b);

		if (r <= cum + t) {
			q = walk_quantile_block(&w, b, cum, cum + t, r, qs, q,
						n, out);
			r = q < n ? rank_of(qs[q], w.count) : 0;
		}
		cum += t;
	}
	TALLY__ASSERT(cum <= w.count);
	/* Ranks past every bucket: only when a counter stuck at 65,535 for
	 * want of memory for its carry (TALLY__HIST_BUCKET_SATURATED) and its
	 * slice was merged into a sum, whose buckets then hold fewer values
	 * than its exact count.  The values missing are in the stuck bucket,
	 * at most the exact max: report that, a bound, rather than fail. */
	for (; q < n; q++)
		out[q] = w.max;
	return 0;
}

int tally__hist_quantiles(const struct tally__hist *h, const double *qs,
			  size_t n, uint64_t *out)
{
	return tally__hist_quantiles_n(&h, 1, qs, n, out);
}

static bool edges_valid(const struct tally__hist *h, const uint64_t *edges,
			size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (edges[i] <= h->max_value && !tally__hist_is_edge(edges[i]))
			return false;
		if (i > 0 && edges[i] <= edges[i - 1])
			return false;
	}
	return true;
}

int tally__hist_cumulative_le_n(const struct tally__hist *const *hs,
				size_t nh, const uint64_t *edges, size_t n,
				uint64_t *out)
{
	struct walk w;
	uint64_t cum = 0;
	uint32_t b = 0;
	int rc = walk_init(&w, hs, nh);

	if (rc != 0)
		return rc;
	if (!edges_valid(hs[0], edges, n))
		return -EINVAL;
	for (size_t k = 0; k < n; k++) {
		uint32_t i, eb;

		if (edges[k] > hs[0]->max_value) {
			out[k] = w.count;
			continue;
		}
		i = tally__hist_index(edges[k]);
		eb = i / TALLY__HIST_BLOCK;
		while (b < eb)
			cum += walk_block(&w, b++);
		out[k] = cum + walk_partial(&w, eb * TALLY__HIST_BLOCK, i);
	}
	return 0;
}

int tally__hist_cumulative_le(const struct tally__hist *h,
			      const uint64_t *edges, size_t n, uint64_t *out)
{
	return tally__hist_cumulative_le_n(&h, 1, edges, n, out);
}

size_t tally__hist_default_edges(uint64_t *out, size_t cap)
{
	size_t n = 0;

	for (unsigned k = 10; k < 30; k++)
		for (unsigned j = 4; j < 8; j++, n++)
			if (n < cap)
				out[n] = (uint64_t)j << (k - 2);
	for (unsigned k = 30; k < 42; k++, n++)
		if (n < cap)
			out[n] = UINT64_C(1) << k;
	TALLY__ASSERT(n == TALLY__HIST_DEFAULT_NEDGES);
	return n;
}
