/* SPDX-License-Identifier: MIT */
/*
 * hist.h - private header of the log-linear latency histogram (lib/hist.c).
 * It owns the bucket layout and its error bound, the dense histogram that
 * the aggregator fills on its hot path, the sparse form in which closed
 * time slices are kept, and the read side: quantiles and cumulative counts
 * at bucket edges for the Prometheus exporter. Not installed; not public.
 *
 * Bucket layout (fixed; part of what the snapshot and exporter rely on):
 *
 *   v < 128         bucket v, exact (width 1);
 *   v >= 128        e = floor(log2 v), sub = (v >> (e - 6)) & 63,
 *                   index = 128 + (e - 7) * 64 + sub.
 *
 * So every octave [2^e, 2^(e+1)) above 127 is cut into 64 equal sub-buckets
 * of width 2^(e-6): a bucket's width is at most 1/64 of its lower edge, and
 * its midpoint lower + width/2 is within width/2 <= lower/128 of any value
 * in it.  RELATIVE ERROR AT MOST 1/128 (0.79%) FOR EVERY VALUE; VALUES
 * < 128 NS ARE EXACT.  Reported quantiles are also clamped into the
 * histogram's [min, max], which makes constant data, zeros and clamped
 * values exact.  Bucket i holds [tally__hist_bucket_lower(i),
 * tally__hist_bucket_upper(i)).  The whole uint64_t range needs 3776
 * buckets; a histogram covers [0, max_value] with
 * tally__hist_index(max_value) + 1 buckets: 2345 for the default top of
 * range (3.6e12 ns, one hour), 4690 bytes of counts.  Values above
 * max_value are recorded as max_value and counted in `clamped`.
 *
 * Bucket edges: every 2^k and every (1 + j/64) * 2^k (k >= 6, j in 0..63)
 * is the lower edge of a bucket (below 128 every integer is).  Any set of
 * Prometheus classic bucket boundaries chosen among bucket edges is
 * therefore exported exactly: tally__hist_cumulative_le() returns, for each
 * edge E, the exact number of values < E, i.e. values <= E - 1 ns.  An
 * exporter that prints le="E/1e9" seconds is exact except that a value of
 * exactly E ns is counted in the next bucket (the 1 ns between < and <=).
 * tally__hist_default_edges() gives 92 such edges for latency from 1 us to
 * about 1 h (4 per octave up to ~1 s, then 1 per octave).
 *
 * Counters: a bucket is a uint16_t counter (a subject's two dense
 * histograms are 2 x 5 KB with the default range, half the cache lines of
 * 32-bit counters on the aggregator's hot path), plus, for the few buckets
 * that ever reach 65,536, a carry: a small sorted table of (bucket, high
 * part) entries, one bit per 64-bucket block saying which blocks have one.
 * The true count of bucket i is counts[i] + the high part (a multiple of
 * 65,536), exact up to 2^64; tally__hist_bucket() reads it.  When a counter
 * would wrap, add moves 65,536 into the carry (out of line, once per 65,536
 * values of that bucket).  Growing the carry table is the only allocation a
 * filled histogram can need; if it fails the bucket SATURATES (stays at its
 * value, never wraps) and TALLY__HIST_BUCKET_SATURATED is set: quantiles
 * inside that 64-bucket block become approximate (they stay inside the
 * block, since per-block subtotals are uint64_t and stay exact).  The total
 * `count` is uint64_t and exact.  `sum` is uint64_t and saturates at
 * UINT64_MAX, setting TALLY__HIST_SUM_SATURATED (mean is then a lower
 * bound).  Both flags are sticky until the histogram is empty again
 * (reset, or subtracted to zero).
 *
 * Subtotals: blocks[b] is the exact number of values in block b (64
 * buckets), kept by tally__hist_add() and every merge and subtraction;
 * readers add up blocks and scan only the few buckets where a rank or edge
 * falls.  tally__hist_add_lazy(), the window's hot path, leaves blocks[b]
 * alone and sets bit b of `stale` (the line it writes anyway): a stale
 * block's subtotal is then the sum of its counters and carries, which
 * tally__hist_block() computes when a reader asks.  A block that holds a
 * saturated bucket is never stale (its counter is short of its values):
 * while TALLY__HIST_BUCKET_SATURATED is set, and for the value that sets
 * it, the lazy add settles every stale block first and adds as
 * tally__hist_add().  Merging into or subtracting from h settles it
 * first; reset clears stale blocks with the others.
 *
 * Storage: one object (the subtotals, then the counters) from the
 * huge-page arena (arena.h), or from malloc when the arena has none.
 * tally__hist_release() frees the counters of an empty histogram
 * and keeps its shape (an idle subject costs no counters);
 * tally__hist_wake() gets them back.  A released histogram reads as empty
 * everywhere; adding to it, or merging a nonempty one into it, needs a
 * wake first (tally__window_add does that).
 *
 * Packed form: the nonzero buckets of a histogram, for closed time slices,
 * as ascending (gap, count) pairs, each an Elias gamma code, ended by a
 * gap past the last bucket, after a varint summary (count, sum, min, max,
 * clamped, flags): typically 4 to 5 bits per nonzero bucket, about 200
 * bytes for a slice of 1,000 values.
 *
 * min/max: exact after add and merge.  Subtraction cannot restore them, so
 * after tally__hist_sub*() they are conservative bounds (min <= true min,
 * max >= true max), flagged TALLY__HIST_BOUNDS_LOOSE, until the owner sets
 * the exact values with tally__hist_set_bounds() (lib/window.c does).  With
 * exact bounds, rank 1 reports min and rank count reports max exactly (so
 * q = 0 and q = 1, and p99.9 of fewer than 1000 values, are exact); with
 * loose ones quantiles stay within the error bound, only less sharp.
 *
 * Threads: a histogram has one owner thread (the aggregator); nothing here
 * locks, blocks or is atomic.  Readers in other threads read published
 * copies, never a live histogram.
 */
#ifndef TALLY_LIB_HIST_H
#define TALLY_LIB_HIST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"

/* Default top of range: one hour in ns (the clamp value). */
#define TALLY__HIST_DEFAULT_MAX UINT64_C(3600000000000)
/* Buckets needed for the whole uint64_t range. */
#define TALLY__HIST_MAX_BUCKETS 3776u
/* Buckets per subtotal block (one octave above 127). */
#define TALLY__HIST_BLOCK 64u
/* Number of edges tally__hist_default_edges() produces. */
#define TALLY__HIST_DEFAULT_NEDGES 92u

enum {
	TALLY__HIST_SUM_SATURATED = 1u << 0,    /* sum stuck at UINT64_MAX */
	TALLY__HIST_BUCKET_SATURATED = 1u << 1, /* a bucket stuck (no memory for its carry) */
	TALLY__HIST_BOUNDS_LOOSE = 1u << 2,     /* min/max only bounds (sub) */
};

/* The high part of one bucket that reached 65,536 (see Counters). */
struct tally__hist_carry {
	uint32_t idx;
	uint64_t high; /* true count - counts[idx]; a multiple of 65,536 */
};

/* Dense histogram.  Fields are read by lib/window.c and the snapshot code;
 * write them only through the functions below. */
struct tally__hist {
	/* What add touches, in one 64-byte line: a window's current slice
	 * is the first member of the window (window.h), so with the window
	 * on a 64-byte boundary one sample touches this line, its counter's
	 * line and nothing else (tally__hist_add_lazy). */
	uint16_t *counts;  /* nbuckets counters (low part); NULL when released */
	uint64_t max_value; /* top of range; larger values are clamped to it */
	uint64_t count;    /* values recorded (exact) */
	uint64_t sum;      /* their sum, saturating */
	uint64_t min;      /* UINT64_MAX when empty */
	uint64_t max;      /* 0 when empty */
	uint64_t stale;    /* bit b: blocks[b] not kept up (see Subtotals) */
	uint32_t flags;    /* TALLY__HIST_* */
	uint32_t nbuckets; /* tally__hist_index(max_value) + 1 */
	/* the rest: slow paths and readers */
	uint64_t *blocks;  /* nblocks subtotals: sum of buckets 64b .. 64b+63 */
	uint64_t clamped;  /* values recorded above max_value */
	uint32_t nblocks;  /* ceil(nbuckets / 64), <= 59 */
	uint32_t ncarry, carry_cap;
	uint32_t in_arena; /* blocks/counts from the huge-page arena (arena.h), not malloc */
	uint64_t carry_blocks; /* bit b: block b has a carry entry */
	struct tally__hist_carry *carry; /* ascending idx, ncarry of them */
};
_Static_assert(offsetof(struct tally__hist, blocks) == 64, "add's fields fill one line");

/* One nonzero bucket of a sparse histogram. */
struct tally__hist_entry {
	uint32_t idx;
	uint64_t n;
};

/* Sparse histogram: the nonzero buckets of a dense one, ascending index,
 * plus its summary.  Its buffer grows on demand and is kept across clear()
 * for reuse.  (Closed slices use the packed form, which is smaller.) */
struct tally__hist_sparse {
	struct tally__hist_entry *e;
	uint32_t len, cap;
	uint32_t flags;
	uint64_t count, sum, min, max, clamped;
};

/*
 * Test hook: when set, each allocation point of hist.c and window.c asks
 * it first, by name ("hist.init", "hist.wake", "hist.carry", "window.fifo";
 * "hist.arena" fails only the huge-page arena: malloc is used instead),
 * and fails as if malloc had returned NULL when it returns true.  NULL
 * except in a test; one load of a global on slow paths only.
 */
extern bool (*tally__hist_nomem_hook)(const char *point);
#define TALLY__HIST_NOMEM(point)                                          \
	(__builtin_expect(tally__hist_nomem_hook != NULL, 0) &&           \
	 tally__hist_nomem_hook(point))

/*
 * Bucket index of v in the unbounded layout (0 .. 3775); the caller clamps
 * to its histogram's range.  Branch-free: or, bsr, sub, shift, shift, add.
 */
static inline uint32_t tally__hist_index(uint64_t v)
{
	/* v | 127 puts v < 128 in "octave 6" with shift 0: index = v. */
	unsigned h = 63u - (unsigned)__builtin_clzll(v | 127u);
	unsigned shift = h - 6u;

	return (uint32_t)((shift << 6) + (v >> shift));
}

/* Number of buckets a histogram with top of range max_value has. */
static inline uint32_t tally__hist_nbuckets_for(uint64_t max_value)
{
	return tally__hist_index(max_value) + 1u;
}

/* Inclusive lower edge of bucket idx (idx < TALLY__HIST_MAX_BUCKETS). */
static inline uint64_t tally__hist_bucket_lower(uint32_t idx)
{
	if (idx < 128u)
		return idx;
	return (uint64_t)(64u + (idx & 63u)) << ((idx >> 6) - 1u);
}

/* Width of bucket idx: 1 below 128, else 2^(e-6). */
static inline uint64_t tally__hist_bucket_width(uint32_t idx)
{
	return idx < 128u ? 1u : UINT64_C(1) << ((idx >> 6) - 1u);
}

/* Exclusive upper edge of bucket idx; UINT64_MAX for the very last bucket
 * of the uint64_t range, whose true edge 2^64 does not fit. */
static inline uint64_t tally__hist_bucket_upper(uint32_t idx)
{
	uint64_t lo = tally__hist_bucket_lower(idx);
	uint64_t w = tally__hist_bucket_width(idx);

	return lo > UINT64_MAX - w ? UINT64_MAX : lo + w;
}

/* Midpoint reported for bucket idx: lower + width/2 (exact below 128). */
static inline uint64_t tally__hist_bucket_mid(uint32_t idx)
{
	return tally__hist_bucket_lower(idx) + (tally__hist_bucket_width(idx) >> 1);
}

/* True when e is the lower edge of some bucket. */
static inline bool tally__hist_is_edge(uint64_t e)
{
	return tally__hist_bucket_lower(tally__hist_index(e)) == e;
}

/* Saturating uint64_t add; sets *sat on overflow. */
static inline uint64_t tally__hist_sat_add(uint64_t a, uint64_t b, bool *sat)
{
	uint64_t r;

	if (__builtin_add_overflow(a, b, &r)) {
		*sat = true;
		return UINT64_MAX;
	}
	return r;
}

/* The out-of-line half of add: bucket i's counter is at 65,535 and takes
 * one more value (carry 65,536 to the table, or saturate). */
void tally__hist_carry_one(struct tally__hist *h, uint32_t i);

/* The out-of-line half of tally__hist_add_lazy(): the counter is at
 * 65,535 or some bucket is saturated; bring every stale subtotal up to date
 * and add bucket i's value as tally__hist_add() does. */
void tally__hist_add_settle(struct tally__hist *h, uint32_t i);

/* Value v as add records it (clamped), counted in the summary; the
 * caller increments the bucket tally__hist_index() of the result. */
static inline uint64_t tally__hist_add_summary(struct tally__hist *h, uint64_t v)
{
	if (TALLY__UNLIKELY(v > h->max_value)) {
		v = h->max_value;
		h->clamped++;
	}
	h->count++;
	if (TALLY__UNLIKELY(__builtin_add_overflow(h->sum, v, &h->sum))) {
		h->sum = UINT64_MAX;
		h->flags |= TALLY__HIST_SUM_SATURATED;
	}
	h->min = v < h->min ? v : h->min;
	h->max = v > h->max ? v : h->max;
	return v;
}

/*
 * Record one value.  Values above max_value are recorded as max_value and
 * counted in `clamped`.  h must have storage (not released).  Never fails;
 * allocates only for a carry, once per 65,536 values of one bucket.  Owner
 * thread only.  Keeps every block subtotal exact (blocks[] may be read
 * directly after it, for blocks not in `stale`).
 */
static inline void tally__hist_add(struct tally__hist *h, uint64_t v)
{
	uint32_t i = tally__hist_index(tally__hist_add_summary(h, v));

	if (TALLY__UNLIKELY(h->counts[i] == UINT16_MAX))
		tally__hist_carry_one(h, i);
	else
		h->counts[i]++;
	h->blocks[i >> 6]++;
}

/*
 * tally__hist_add() without the block subtotal: the aggregator's hot path
 * (a window's current slice).  It marks the block stale instead, in the
 * line it writes anyway, and readers sum a stale block from its counters
 * when they need it (Subtotals), so a sample touches one line less.  The
 * same values, bounds and exactness as tally__hist_add().
 */
/* 1 << b for b < 64: a load, cheaper on x86 than a shift by a variable
 * (two or three micro-ops without BMI2), on the lazy add's path. */
extern const uint64_t tally__hist_bit[64];

static inline void tally__hist_add_lazy(struct tally__hist *h, uint64_t v)
{
	uint32_t i = tally__hist_index(tally__hist_add_summary(h, v));

	if (TALLY__UNLIKELY(h->counts[i] == UINT16_MAX ||
			    (h->flags & TALLY__HIST_BUCKET_SATURATED))) {
		tally__hist_add_settle(h, i);
		return;
	}
	h->counts[i]++;
	h->stale |= tally__hist_bit[i >> 6];
}

/* Block b's true subtotal: blocks[b], or for a stale block its counters
 * and carries summed (SSE2, 64 counters). */
uint64_t tally__hist_block(const struct tally__hist *h, uint32_t b);

/* True count of bucket i (i < nbuckets); 0 when h is released. */
uint64_t tally__hist_bucket(const struct tally__hist *h, uint32_t i);

/* Allocate an empty histogram covering [0, max_value] (max_value >= 1).
 * Returns 0, -EINVAL, or -ENOMEM.  May call malloc. */
int tally__hist_init(struct tally__hist *h, uint64_t max_value);

/* Free the counters; h may then be init'ed again.  NULL counts is fine. */
void tally__hist_destroy(struct tally__hist *h);

/* Free the storage of h, which must be empty (count 0), keeping its shape
 * (nbuckets, max_value): it reads as empty until tally__hist_wake(). */
void tally__hist_release(struct tally__hist *h);

/* Give a released h its storage back (empty); 0 at once if it has it.
 * Returns 0 or -ENOMEM (h still released).  May call malloc. */
int tally__hist_wake(struct tally__hist *h);

/* Empty h (counts, summary, flags).  Cost proportional to the nonempty
 * blocks, not to nbuckets. */
void tally__hist_reset(struct tally__hist *h);

/* a += b.  Both must have the same max_value (aborts otherwise: a bug);
 * a must have storage unless b is empty. */
void tally__hist_merge(struct tally__hist *a, const struct tally__hist *b);

/* a -= b, where b's values were earlier merged into a (aborts if b holds
 * more than a: a bug).  a's min/max become conservative bounds; a becomes
 * fully empty (as after reset) when its count reaches 0. */
void tally__hist_sub(struct tally__hist *a, const struct tally__hist *b);

/* Set exact min/max, known by the owner after a subtraction, and clear
 * TALLY__HIST_BOUNDS_LOOSE.  Ignored when h is empty. */
void tally__hist_set_bounds(struct tally__hist *h, uint64_t min, uint64_t max);

/* Number of nonzero buckets (what a sparse copy needs). */
uint32_t tally__hist_nonzero(const struct tally__hist *h);

/* Make room for n entries in s.  Returns 0 or -ENOMEM (s unchanged). */
int tally__hist_sparse_reserve(struct tally__hist_sparse *s, uint32_t n);

/* Copy h into s.  Returns 0, or -ENOMEM with s unchanged; cannot fail
 * after tally__hist_sparse_reserve(s, tally__hist_nonzero(h)). */
int tally__hist_sparse_from(struct tally__hist_sparse *s,
			    const struct tally__hist *h);

/* Empty s, keeping its buffer. */
void tally__hist_sparse_clear(struct tally__hist_sparse *s);

/* Free s's buffer and empty it. */
void tally__hist_sparse_free(struct tally__hist_sparse *s);

/* h += s / h -= s: as tally__hist_merge() / tally__hist_sub().  s must come
 * from a histogram with h's max_value (indexes are checked: abort). */
void tally__hist_merge_sparse(struct tally__hist *h,
			      const struct tally__hist_sparse *s);
void tally__hist_sub_sparse(struct tally__hist *h,
			    const struct tally__hist_sparse *s);

/* Bytes tally__hist_pack() writes for h. */
size_t tally__hist_packed_size(const struct tally__hist *h);

/* Write h in packed form to buf (tally__hist_packed_size(h) bytes);
 * returns the bytes written. */
size_t tally__hist_pack(const struct tally__hist *h, uint8_t *buf);

/* tally__hist_pack(), and into += h in the same pass (into NULL: pack
 * only), as tally__hist_merge(into, h). */
size_t tally__hist_pack_merge(const struct tally__hist *h, uint8_t *buf,
			      struct tally__hist *into);

/* The summary of a packed histogram, read without its buckets. */
struct tally__hist_packed_info {
	uint64_t count, sum, min, max, clamped;
	uint32_t flags;
};
void tally__hist_packed_info(const uint8_t *buf, size_t len,
			     struct tally__hist_packed_info *out);

/* h += / -= the packed histogram buf[0..len), as tally__hist_merge() /
 * tally__hist_sub(); it must come from a histogram with h's max_value
 * (indexes are checked: abort). */
void tally__hist_merge_packed(struct tally__hist *h, const uint8_t *buf,
			      size_t len);
void tally__hist_sub_packed(struct tally__hist *h, const uint8_t *buf,
			    size_t len);

/*
 * Quantiles of the sum of nh histograms (same max_value), in one pass over
 * the buckets, skipping empty 64-bucket blocks.  qs[0..n) must be ascending
 * in [0, 1].  Nearest rank: rank = ceil(q * count), at least 1; out[i] is
 * the midpoint of the bucket holding that rank, clamped into the combined
 * [min, max]; rank 1 and rank count give min and max themselves unless a
 * histogram has TALLY__HIST_BOUNDS_LOOSE.  Returns 0, -EINVAL (bad qs or nh == 0), or -ENODATA when
 * the histograms hold no value (out untouched: never fake zeros).
 */
int tally__hist_quantiles_n(const struct tally__hist *const *hs, size_t nh,
			    const double *qs, size_t n, uint64_t *out);

/* tally__hist_quantiles_n() over one histogram. */
int tally__hist_quantiles(const struct tally__hist *h, const double *qs,
			  size_t n, uint64_t *out);

/*
 * For each edge edges[i] (ascending), out[i] = number of values < edges[i]
 * in the sum of nh histograms.  Each edge must be a bucket edge
 * (tally__hist_is_edge()) or greater than max_value (then out[i] = count).
 * One pass.  Returns 0 or -EINVAL (not an edge, not ascending, nh == 0).
 */
int tally__hist_cumulative_le_n(const struct tally__hist *const *hs,
				size_t nh, const uint64_t *edges, size_t n,
				uint64_t *out);

/* tally__hist_cumulative_le_n() over one histogram. */
int tally__hist_cumulative_le(const struct tally__hist *h,
			      const uint64_t *edges, size_t n, uint64_t *out);

/*
 * Default classic bucket edges in ns: 1, 1.25, 1.5, 1.75 x 2^k for
 * k = 10..29 (1.024 us .. 0.94 s), then 2^k for k = 30..41 (1.07 s ..
 * 36.7 min): TALLY__HIST_DEFAULT_NEDGES edges, all bucket edges.  Writes at
 * most cap of them to out and returns how many there are in all.
 */
size_t tally__hist_default_edges(uint64_t *out, size_t cap);

/* LEB128 varints of the packed forms (this file's and window.c's): the
 * length of v's, write v at p (returns past it), read one at p before end
 * (returns past it; a varint longer than 10 bytes is a broken invariant of
 * our own heap data: dies naming what). */
size_t tally__varint_len(uint64_t v);
uint8_t *tally__varint_put(uint8_t *p, uint64_t v);
const uint8_t *tally__varint_get(const uint8_t *p, const uint8_t *end, uint64_t *v, const char *what);

#endif /* TALLY_LIB_HIST_H */
