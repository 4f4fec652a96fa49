/* SPDX-License-Identifier: MIT */
/*
 * harness.c: main() of the benchmark harness: options, the list of parts,
 * the result table and its JSON form. See harness.h.
 */
#include "config.h"

#include <getopt.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

struct bench_opts bench_opts = { .reps = 7, .scale = 1.0 };

struct row {
	char part[24], name[64], unit[16], baseline[160]; /* baselines separated by '|' */
	bool higher_is_better;
	double median, min, max, param;
	int n;
};

static struct row rows[512];
static int nrows;

static const struct {
	const char *name;
	void (*run)(void);
	const char *what;
} parts[] = {
	{ "record", bench_part_record, "record ns/op: tally rings vs mutex and atomic histograms, 1..N threads" },
	{ "ingest", bench_part_ingest, "aggregator ingest Msamples/s: the engine.c loop on one core, and end to end" },
	{ "publish", bench_part_publish, "one publish in ms for --sizes active subjects (default 100,1000,10000)" },
	{ "read", bench_part_read, "read one subject's stats ns/op: in-process, read-only handle, other process" },
	{ "visible", bench_part_visible, "record-to-visible ms (p50, p99) at publish intervals 100 and 10 ms" },
	{ "hist", bench_part_hist, "histogram index/add ns/op; 5-quantile query vs exact P95 (qsort, quickselect)" },
};

uint64_t bench_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void bench_pin(int cpu)
{
	cpu_set_t set;
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	CPU_ZERO(&set);
	CPU_SET(cpu % (n > 0 ? n : 1), &set);
	pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

double bench_median(const double *v, int n)
{
	double tmp[256];

	if (n <= 0)
		return 0;
	if (n > 256)
		n = 256;
	memcpy(tmp, v, (size_t)n * sizeof(double));
	qsort(tmp, (size_t)n, sizeof(double), cmp_double);
	return n % 2 ? tmp[n / 2] : (tmp[n / 2 - 1] + tmp[n / 2]) / 2;
}

void bench_row(const char *part, const char *name, const char *unit, bool higher_is_better,
	       const double *samples, int n, const char *baseline, double param)
{
	if (nrows >= (int)(sizeof(rows) / sizeof(rows[0])))
		return;
	struct row *r = &rows[nrows++];
	snprintf(r->part, sizeof(r->part), "%s", part);
	snprintf(r->name, sizeof(r->name), "%s", name);
	snprintf(r->unit, sizeof(r->unit), "%s", unit);
	snprintf(r->baseline, sizeof(r->baseline), "%s", baseline ? baseline : "");
	r->higher_is_better = higher_is_better;
	r->median = bench_median(samples, n);
	r->min = r->max = n ? samples[0] : 0;
	for (int i = 1; i < n; i++) {
		if (samples[i] < r->min)
			r->min = samples[i];
		if (samples[i] > r->max)
			r->max = samples[i];
	}
	r->n = n;
	r->param = param;
	printf("  %-10s %-44s %10.3f %-10s [%.3f .. %.3f]\n", part, name, r->median, unit, r->min, r->max);
	fflush(stdout);
}

static const struct row *find(const char *part, const char *name)
{
	for (int i = 0; i < nrows; i++)
		if (!strcmp(rows[i].part, part) && !strcmp(rows[i].name, name))
			return &rows[i];
	return NULL;
}

/* Ratio of r to its k-th baseline; 0 if there is none. */
static double ratio_k(const struct row *r, int k, char *bname, size_t blen)
{
	const char *p = r->baseline;

	for (int i = 0; i < k && p; i++)
		p = strchr(p, '|') ? strchr(p, '|') + 1 : NULL;
	if (!p || !*p)
		return 0;
	size_t n = strcspn(p, "|");
	snprintf(bname, blen, "%.*s", (int)n, p);
	const struct row *b = find(r->part, bname);
	if (!b || b->median == 0 || r->median == 0)
		return 0;
	return r->higher_is_better ? r->median / b->median : b->median / r->median;
}

static double ratio(const struct row *r)
{
	char b[160];

	return ratio_k(r, 0, b, sizeof(b));
}

static void print_table(void)
{
	printf("\n%-10s %-44s %12s %-11s %-25s %s\n", "part", "case", "median", "unit", "min .. max",
	       "vs baseline");
	for (int i = 0; i < nrows; i++) {
		const struct row *r = &rows[i];
		char mm[64], vs[400] = "", bname[160];
		size_t used = 0;
		double q;
		snprintf(mm, sizeof(mm), "%.3f .. %.3f", r->min, r->max);
		for (int k = 0; (q = ratio_k(r, k, bname, sizeof(bname))) > 0 && used < sizeof(vs); k++)
			used += (size_t)snprintf(vs + used, sizeof(vs) - used, "%s%.2fx %s %s",
						 k ? "; " : "", q,
						 r->higher_is_better ? "of" : "faster than", bname);
		printf("%-10s %-44s %12.3f %-11s %-25s %s\n", r->part, r->name, r->median, r->unit, mm, vs);
	}
}

static int write_json(const char *path)
{
	FILE *f = fopen(path, "w");
	char host[128] = "";

	if (!f) {
		perror(path);
		return -1;
	}
	gethostname(host, sizeof(host) - 1);
	fprintf(f, "{\"version\":1,\"cpus\":%ld,\"reps\":%d,\"rows\":[\n", sysconf(_SC_NPROCESSORS_ONLN),
		bench_opts.reps);
	for (int i = 0; i < nrows; i++) {
		const struct row *r = &rows[i];
		fprintf(f, " {\"part\":\"%s\",\"case\":\"%s\",\"unit\":\"%s\",\"median\":%.6g,"
			"\"min\":%.6g,\"max\":%.6g,\"n\":%d,\"param\":%.6g,\"baseline\":\"%s\",\"ratio\":%.6g}%s\n",
			r->part, r->name, r->unit, r->median, r->min, r->max, r->n, r->param, r->baseline,
			ratio(r), i + 1 < nrows ? "," : "");
	}
	fprintf(f, "]}\n");
	return fclose(f);
}

static void usage(FILE *to)
{
	fprintf(to, "usage: tally-bench [--part NAME[,NAME...]] [--reps N] [--scale X] [--threads N]\n"
		    "                   [--sizes LIST] [--json FILE] [--list]\n"
		    "Measures every hot path beside its baselines, same process, same run.\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "part", required_argument, NULL, 'p' }, { "reps", required_argument, NULL, 'r' },
		{ "scale", required_argument, NULL, 'x' }, { "threads", required_argument, NULL, 't' },
		{ "sizes", required_argument, NULL, 'S' }, { "json", required_argument, NULL, 'j' },
		{ "list", no_argument, NULL, 'l' }, { "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *only = NULL, *json = NULL;
	int c;

	bench_opts.max_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
	while ((c = getopt_long(argc, argv, "p:r:x:t:S:j:lh", opts, NULL)) != -1) {
		switch (c) {
		case 'p': only = optarg; break;
		case 'r': bench_opts.reps = atoi(optarg); break;
		case 'x': bench_opts.scale = atof(optarg); break;
		case 't': bench_opts.max_threads = atoi(optarg); break;
		case 'S': bench_opts.sizes = optarg; break;
		case 'j': json = optarg; break;
		case 'l':
			for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++)
				printf("%-10s %s\n", parts[i].name, parts[i].what);
			return 0;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (bench_opts.reps < 1 || bench_opts.reps > 256 || bench_opts.scale <= 0 || bench_opts.max_threads < 1) {
		fprintf(stderr, "tally-bench: --reps must be 1..256, --scale > 0, --threads >= 1\n");
		return 2;
	}
	printf("tally-bench: %ld CPUs online, %d repetitions, scale %.2f\n",
	       sysconf(_SC_NPROCESSORS_ONLN), bench_opts.reps, bench_opts.scale);
	for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
		if (only && !strstr(only, parts[i].name))
			continue;
		printf("== %s: %s\n", parts[i].name, parts[i].what);
		parts[i].run();
	}
	print_table();
	return json && write_json(json) ? 1 : 0;
}
