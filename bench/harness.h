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
	int reps;              /* repetitions per case (default 7; --quick 3) */
	double scale;          /* multiplies operation counts (default 1.0; --quick 0.25) */
	int max_threads;       /* the thread sweep runs 1..this (default: online cores) */
	const char *subjects;  /* subject sweep of publish and ingest (--subjects, alias --sizes) */
	bool subjects_given;   /* --subjects was given: drain sweeps it too */
	const char *consumers; /* consumer sweep of pending (--consumers) */
	const char *slices;    /* window sweep, slices of 1 s per window (--slices) */
	const char *drain_threads; /* drain: drain_threads sweep (--drain-threads, default 1,2,4) */
	unsigned drain_publish_ms; /* drain: the engine's publish interval (--drain-publish-ms, default the engine's) */
};

extern struct bench_opts bench_opts;

/* Set by a part that could not measure (e.g. no nats-server) or found a
 * result outside a documented bound: tally-bench then exits 1, after the
 * table. */
extern bool bench_failed;

/*
 * Rows: unit "ns/op", "ms", "Msamples/s", ...; higher_is_better for rates.
 * baseline: names of rows of the same part, separated by '|', or NULL.
 * param: the swept quantity (threads, subjects, slices, consumers), 0 none.
 * bench_row_series() also names the curve the row belongs to in a sweep
 * (the JSON "series", which bench/plot.sh draws as one line); bench_row()
 * uses the row's name as its series.
 */
void bench_row(const char *part, const char *name, const char *unit, bool higher_is_better,
	       const double *samples, int n, const char *baseline, double param);
void bench_row_series(const char *part, const char *series, const char *name, const char *unit,
		      bool higher_is_better, const double *samples, int n, const char *baseline,
		      double param);

/*
 * Walk a comma-separated list of positive integers (a sweep option):
 * returns the next value and advances *s, 0 at the end; a malformed entry
 * is reported (naming what) and ends the walk.
 */
unsigned long bench_next_size(const char **s, const char *what, unsigned long max);

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
void bench_part_drain(void);
void bench_part_publish(void);
void bench_part_read(void);
void bench_part_visible(void);
void bench_part_window(void);
void bench_part_pending(void);
void bench_part_jsack(void);
void bench_part_error(void);
void bench_part_gateway(void);
void bench_part_hosts(void);
void bench_part_metrics(void);

#endif
