/*
 * group_by_subject.c: a standalone experiment, not built by make (issue 18,
 * "grouping a drained batch by subject"). It asks whether staging drained
 * samples and applying them partition by partition (subjects id & (P-1),
 * a stable counting scatter of B samples at a time) touches fewer random
 * lines than applying them in ring order with the drain's look-ahead
 * (16 entries ahead the subject's line and its counter's, as engine.c).
 *
 * The model is the second floor's (bench/part_engine.c, floor2): per
 * subject one hot line (count, sum, min, max) and 16-bit counters of the
 * default layout, in huge pages; 16 M samples, subjects uniform, values
 * log-normal around 200 us (sigma as given; the bench's is 1.2).
 *
 *   gcc -O2 -march=native -o group bench/experiments/group_by_subject.c -lm
 *   ./group SUBJECTS PARTITIONS BATCH [SIGMA]     e.g. ./group 10000 64 65536
 *
 * It builds alone, so it carries its own copies of the bench's splitmix
 * and log-normal latency (bench/part_hist.c) and of tally__hist_index.
 *
 * Each line gives Msamples/s of: ring order with look-ahead ("direct"),
 * grouped, and grouped with a look-ahead inside each partition. Figures
 * in BENCHMARKS.md ("Ideas measured").
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define NBUCKETS 2368u /* the default layout's 2,345 buckets, in whole lines */
#define MAX_VALUE UINT64_C(3600000000000)
#define LOOK_AHEAD 16u
#define HUGE_PAGE (UINT64_C(2) << 20)

struct subject {
	uint64_t count, sum, min, max, pad[4];
	uint16_t counts[NBUCKETS];
};

struct entry {
	uint32_t subject, reserved;
	uint64_t value_ns;
};

struct staged {
	struct subject *q;
	uint64_t v;
};

static struct subject **subject_of;
static double sigma = 1.2;

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += UINT64_C(0x9e3779b97f4a7c15));

	z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
	return z ^ (z >> 31);
}

static uint64_t latency(uint64_t *s)
{
	double u1 = ((double)(splitmix(s) >> 11) + 0.5) / 9007199254740992.0;
	double u2 = ((double)(splitmix(s) >> 11) + 0.5) / 9007199254740992.0;

	return (uint64_t)exp(log(200000.0) + sigma * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* as tally__hist_index (lib/hist.h) */
static inline uint32_t bucket(uint64_t v)
{
	unsigned h = 63u - (unsigned)__builtin_clzll(v | 127u), shift = h - 6u;

	return (uint32_t)((shift << 6) + (v >> shift));
}

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static inline uint64_t clamp(uint64_t v)
{
	return v < MAX_VALUE ? v : MAX_VALUE;
}

static inline void add(struct subject *q, uint64_t v)
{
	v = clamp(v);
	q->count++;
	q->sum += v;
	q->min = v < q->min ? v : q->min;
	q->max = v > q->max ? v : q->max;
	q->counts[bucket(v)]++;
}

static inline void prefetch(const struct subject *q, uint64_t v)
{
	__builtin_prefetch(q, 1);
	__builtin_prefetch(&q->counts[bucket(clamp(v))], 1);
}

static void ring_order(const struct entry *r, size_t n)
{
	for (size_t k = 0; k < n; k++) {
		if (k + LOOK_AHEAD < n)
			prefetch(subject_of[r[k + LOOK_AHEAD].subject], r[k + LOOK_AHEAD].value_ns);
		add(subject_of[r[k].subject], r[k].value_ns);
	}
}

static void grouped(const struct entry *r, size_t n, size_t batch, uint32_t parts, struct staged *stage,
		    uint32_t per_part, uint32_t *fill, int look_ahead)
{
	for (size_t b = 0; b < n; b += batch) {
		size_t m = n - b < batch ? n - b : batch;
		memset(fill, 0, parts * sizeof(*fill));
		for (size_t k = 0; k < m; k++) {
			const struct entry *e = &r[b + k];
			uint32_t p = e->subject & (parts - 1);
			stage[(size_t)p * per_part + fill[p]++] = (struct staged){ subject_of[e->subject], e->value_ns };
		}
		for (uint32_t p = 0; p < parts; p++) {
			const struct staged *s = &stage[(size_t)p * per_part];
			for (uint32_t k = 0; k < fill[p]; k++) {
				if (look_ahead && k + 8 < fill[p])
					prefetch(s[k + 8].q, s[k + 8].v);
				add(s[k].q, s[k].v);
			}
		}
	}
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s SUBJECTS PARTITIONS(power of 2) BATCH [SIGMA]\n", argv[0]);
		return 2;
	}
	uint32_t nsubjects = (uint32_t)atoi(argv[1]), parts = (uint32_t)atoi(argv[2]);
	size_t batch = (size_t)atol(argv[3]), n = (size_t)1 << 24;
	uint64_t seed = 42;

	if (argc > 4)
		sigma = atof(argv[4]);
	if (!nsubjects || !parts || (parts & (parts - 1)) || !batch) {
		fprintf(stderr, "bad arguments\n");
		return 2;
	}
	size_t bytes = ((size_t)nsubjects * sizeof(struct subject) + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
	struct subject *all = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	subject_of = malloc(nsubjects * sizeof(*subject_of));
	struct entry *ring = malloc(n * sizeof(*ring));
	uint32_t per_part = (uint32_t)(batch / parts * 2 + 64); /* uniform ids: twice the mean is room */
	struct staged *stage = calloc((size_t)parts * per_part, sizeof(*stage));
	uint32_t *fill = malloc(parts * sizeof(*fill));
	if (all == MAP_FAILED || !subject_of || !ring || !stage || !fill) {
		fprintf(stderr, "out of memory\n");
		return 1;
	}
	(void)madvise(all, bytes, MADV_HUGEPAGE);
	memset(all, 0, bytes);
	for (uint32_t i = 0; i < nsubjects; i++) {
		subject_of[i] = &all[i];
		all[i].min = UINT64_MAX;
	}
	for (size_t i = 0; i < n; i++)
		ring[i] = (struct entry){ (uint32_t)(splitmix(&seed) % nsubjects), 0, latency(&seed) };
	for (int rep = 0; rep < 3; rep++) {
		uint64_t t0 = now_ns();
		ring_order(ring, n);
		uint64_t t1 = now_ns();
		grouped(ring, n, batch, parts, stage, per_part, fill, 0);
		uint64_t t2 = now_ns();
		grouped(ring, n, batch, parts, stage, per_part, fill, 1);
		uint64_t t3 = now_ns();
		printf("subjects %u, partitions %u, batch %zu, sigma %.2f: direct %.1f, grouped %.1f, "
		       "grouped with look-ahead %.1f Msamples/s\n",
		       nsubjects, parts, batch, sigma, (double)n / ((double)(t1 - t0) / 1e3),
		       (double)n / ((double)(t2 - t1) / 1e3), (double)n / ((double)(t3 - t2) / 1e3));
	}
	uint64_t total = 0;
	for (uint32_t i = 0; i < nsubjects; i++)
		total += all[i].count;
	return total == (uint64_t)n * 9 ? 0 : 1;
}
