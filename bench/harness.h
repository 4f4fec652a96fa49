/* SPDX-License-Identifier: MIT */
/*
 * harness.h: the benchmark harness shared by every part of `make bench`.
 *
 * A part measures a case several times (repetitions) and hands the
 * samples to bench_row(); the harness keeps the median, min and max, and
 * the ratio to a named baseline row of the same run (baseline median /
 * this median, so 10 means ten times faster than the baseline for time
 * units, or ten times more for rate units). At the end it prints one
 * table and, with --json FILE, writes the rows as JSON.
 */
#ifndef TALLY_BENCH_HARNESS_H
#define TALLY_BENCH_HARNESS_H

#include <stdbool.h>
#include <stdint.h>

struct bench_opts {
	int reps;         /* repetitions per case (default 7) */
	double scale;     /* multiplies operation counts (default 1.0) */
	int max_threads;  /* thread sweeps go up to this (default: online cores) */
	const char *sizes;/* part-specific size list, e.g. "100,1000,10000" */
};

extern struct bench_opts bench_opts;

/* Rows: unit "ns/op", "ms", "Msamples/s", ...; higher_is_better for rates. */
void bench_row(const char *part, const char *name, const char *unit, bool higher_is_better,
	       const double *samples, int n, const char *baseline, double param);

/* Median of n doubles (sorts a copy). */
double bench_median(const double *v, int n);

uint64_t bench_now_ns(void);

/* Pin the calling thread to CPU cpu % online CPUs (best effort). */
void bench_pin(int cpu);

/* xorshift64*: cheap pseudo-random latencies for record loops. */
static inline uint64_t bench_rand(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 2685821657736338717ull;
}

/* Parts */
void bench_part_record(void);
void bench_part_hist(void);
void bench_part_ingest(void);
void bench_part_publish(void);
void bench_part_read(void);
void bench_part_visible(void);

#endif
