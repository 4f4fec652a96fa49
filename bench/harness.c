/* SPDX-License-Identifier: MIT */
/*
 * harness.c: main() of the benchmark harness: options, the list of parts,
 * the machine it ran on (CPU model, kernel, load average before and after),
 * the result table and its JSON form (one row per line, read by
 * bench/plot.sh). See harness.h.
 */
#include "config.h"

#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <tally/engine.h>

#include "harness.h"

struct bench_opts bench_opts = { .reps = 7, .scale = 1.0 };
bool bench_failed;

struct row {
	char part[24], series[64], name[72], unit[16], baseline[200]; /* baselines separated by '|' */
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
	{ "record", bench_part_record, "record ns/op: tally rings vs mutex and atomic histograms, threads 1..--threads" },
	{ "ingest", bench_part_ingest, "aggregator ingest Msamples/s: the engine.c loop on one core over --subjects, and end to end" },
	{ "drain", bench_part_drain, "ingest Msamples/s with --drain-threads drain threads (default 1,2,4), rings filled beforehand, at 10, 1,000 and 10,000 subjects; beside it the ceiling: plain threads doing the memory floor's work split the same way" },
	{ "publish", bench_part_publish, "one publish in ms for --subjects active subjects (default 10,30,100,300,1000,3000,10000)" },
	{ "window", bench_part_window, "window length sweep (--slices of 1 s): publish ms, slice close, memory per subject" },
	{ "read", bench_part_read, "read one subject's stats ns/op: in-process, read-only handle, other process" },
	{ "visible", bench_part_visible, "record-to-visible ms (p50, p99) at publish intervals 100 and 10 ms" },
	{ "pending", bench_part_pending, "pending refresh ms, CONSUMER.LIST paging vs one INFO per consumer, --consumers, real nats-server" },
	{ "jsack", bench_part_jsack, "wait and pending from an ack reply, ns/msg: parse+record vs natsMsg_GetMetaData and one CONSUMER.INFO per message, real nats-server" },
	{ "hist", bench_part_hist, "histogram index/add ns/op; 5-quantile query vs exact P95 (qsort, quickselect)" },
	{ "error", bench_part_error, "quantile relative error against exact quantiles, six distributions" },
	{ "hosts", bench_part_hosts, "many hosts: KV propagation B -> A (p50, p99), KV writes/s at 1,000 subjects, aggregator cost; 3-node cluster" },
	{ "metrics", bench_part_metrics, "tallyd /metrics at 1,000 subjects: scrape size (full, 8 buckets, quantiles only; plain and gzip), HTTP thread CPU per scrape, zlib level 1 vs 6" },
	{ "gateway", bench_part_gateway, "tally-gateway with wrk: check mode behind nginx auth_request, the nginx module, proxy mode, against direct; each hop's CPU per request" },
};

#define NPARTS (sizeof(parts) / sizeof(parts[0]))
#define DEFAULT_SUBJECTS "10,30,100,300,1000,3000,10000"
#define DEFAULT_CONSUMERS "10,100,1000"
#define DEFAULT_SLICES "1,10,60"
#define DEFAULT_DRAIN_THREADS "1,2,4"

/* The machine, printed at the start and written into the JSON. */
static struct {
	char model[128], kernel[160];
	double load_before, load_after; /* 1-minute load average */
} machine;

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

unsigned long bench_next_size(const char **s, const char *what, unsigned long max)
{
	char *end;

	if (!*s || !**s)
		return 0;
	unsigned long n = strtoul(*s, &end, 10);
	if (end == *s || n < 1 || n > max || (*end && *end != ',')) {
		fprintf(stderr, "tally-bench: %s: bad list entry at \"%s\" (1..%lu)\n", what, *s, max);
		*s = NULL;
		return 0;
	}
	*s = *end == ',' ? end + 1 : end;
	return n;
}

void bench_row(const char *part, const char *name, const char *unit, bool higher_is_better,
	       const double *samples, int n, const char *baseline, double param)
{
	bench_row_series(part, name, name, unit, higher_is_better, samples, n, baseline, param);
}

void bench_row_series(const char *part, const char *series, const char *name, const char *unit,
		      bool higher_is_better, const double *samples, int n, const char *baseline,
		      double param)
{
	if (nrows >= (int)(sizeof(rows) / sizeof(rows[0])) || n < 1)
		return;
	struct row *r = &rows[nrows++];
	snprintf(r->part, sizeof(r->part), "%s", part);
	snprintf(r->series, sizeof(r->series), "%s", series);
	snprintf(r->name, sizeof(r->name), "%s", name);
	snprintf(r->unit, sizeof(r->unit), "%s", unit);
	snprintf(r->baseline, sizeof(r->baseline), "%s", baseline ? baseline : "");
	r->higher_is_better = higher_is_better;
	r->median = bench_median(samples, n);
	r->min = r->max = samples[0];
	for (int i = 1; i < n; i++) {
		if (samples[i] < r->min)
			r->min = samples[i];
		if (samples[i] > r->max)
			r->max = samples[i];
	}
	r->n = n;
	r->param = param;
	printf("  %-8s %-48s %12.3f %-10s [%.3f .. %.3f]\n", part, name, r->median, unit, r->min, r->max);
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
	char b[200];

	return ratio_k(r, 0, b, sizeof(b));
}

/* "12.3x faster than B", "2.70x slower than B", "0.95x of B" (rates). */
static int ratio_text(char *buf, size_t len, const struct row *r, double q, const char *bname)
{
	if (r->higher_is_better)
		return snprintf(buf, len, "%.2fx of %s", q, bname);
	if (q >= 1)
		return snprintf(buf, len, "%.2fx faster than %s", q, bname);
	return snprintf(buf, len, "%.2fx slower than %s", 1 / q, bname);
}

/* Plain numbers: 3 decimals below 1000, none above (the sort baselines). */
static const char *num(char *buf, size_t len, double v)
{
	snprintf(buf, len, v < 1000 ? "%.3f" : "%.0f", v);
	return buf;
}

static void print_table(void)
{
	printf("\n%-8s %-48s %12s %-11s %-24s %s\n", "part", "case", "median", "unit", "min .. max",
	       "vs baseline (ratio of medians, same run)");
	for (int i = 0; i < nrows; i++) {
		const struct row *r = &rows[i];
		char mm[80], vs[600] = "", bname[200], a[32], b[32], m[32];
		size_t used = 0;
		double q;
		snprintf(mm, sizeof(mm), "%s .. %s", num(a, sizeof(a), r->min), num(b, sizeof(b), r->max));
		for (int k = 0; (q = ratio_k(r, k, bname, sizeof(bname))) > 0 && used < sizeof(vs); k++) {
			if (k)
				used += (size_t)snprintf(vs + used, sizeof(vs) - used, "; ");
			if (used < sizeof(vs))
				used += (size_t)ratio_text(vs + used, sizeof(vs) - used, r, q, bname);
		}
		printf("%-8s %-48s %12s %-11s %-24s %s\n", r->part, r->name, num(m, sizeof(m), r->median),
		       r->unit, mm, vs);
	}
}

static void read_machine(void)
{
	FILE *f = fopen("/proc/cpuinfo", "r");
	char line[256];
	struct utsname u;
	double l[3];

	snprintf(machine.model, sizeof(machine.model), "unknown");
	while (f && fgets(line, sizeof(line), f)) {
		char *c = strchr(line, ':');
		if (!strncmp(line, "model name", 10) && c) {
			snprintf(machine.model, sizeof(machine.model), "%s", c + 2);
			machine.model[strcspn(machine.model, "\n")] = '\0';
			break;
		}
	}
	if (f)
		fclose(f);
	if (uname(&u) == 0)
		snprintf(machine.kernel, sizeof(machine.kernel), "%s %s", u.sysname, u.release);
	machine.load_before = getloadavg(l, 3) > 0 ? l[0] : -1;
}

/* JSON string body: the names here are ours, but escape what JSON needs. */
static void json_str(FILE *f, const char *s)
{
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			fprintf(f, "\\%c", *s);
		else if ((unsigned char)*s >= 0x20)
			fputc(*s, f);
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
	fprintf(f, "{\"version\":2,\"cpus\":%ld,\"model\":\"", sysconf(_SC_NPROCESSORS_ONLN));
	json_str(f, machine.model);
	fprintf(f, "\",\"kernel\":\"");
	json_str(f, machine.kernel);
	fprintf(f, "\",\"load_before\":%.2f,\"load_after\":%.2f,\"reps\":%d,\"scale\":%g,\"rows\":[\n",
		machine.load_before, machine.load_after, bench_opts.reps, bench_opts.scale);
	/* One row per line, keys in this order: bench/plot.sh reads them with awk. */
	for (int i = 0; i < nrows; i++) {
		const struct row *r = &rows[i];
		fprintf(f, " {\"part\":\"%s\",\"series\":\"", r->part);
		json_str(f, r->series);
		fprintf(f, "\",\"case\":\"");
		json_str(f, r->name);
		fprintf(f, "\",\"unit\":\"%s\",\"param\":%.6g,\"median\":%.6g,\"min\":%.6g,\"max\":%.6g,"
			"\"n\":%d,\"baseline\":\"", r->unit, r->param, r->median, r->min, r->max, r->n);
		json_str(f, r->baseline);
		fprintf(f, "\",\"ratio\":%.6g}%s\n", ratio(r), i + 1 < nrows ? "," : "");
	}
	fprintf(f, "]}\n");
	return fclose(f);
}

/* Is name one of the comma-separated entries of list? */
static bool in_list(const char *list, const char *name)
{
	size_t n = strlen(name);

	for (const char *p = list; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
		if (!strncmp(p, name, n) && (p[n] == ',' || p[n] == '\0'))
			return true;
	return false;
}

static int check_parts(const char *list)
{
	for (const char *p = list; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) {
		size_t n = strcspn(p, ","), i;
		for (i = 0; i < NPARTS; i++)
			if (strlen(parts[i].name) == n && !strncmp(p, parts[i].name, n))
				break;
		if (i == NPARTS) {
			fprintf(stderr, "tally-bench: no part \"%.*s\" (--list shows them)\n", (int)n, p);
			return -1;
		}
	}
	return 0;
}

/* Walk a sweep list once: every entry must be a number in 1..max. */
static bool list_ok(const char *list, const char *what, unsigned long max)
{
	while (bench_next_size(&list, what, max) != 0)
		;
	return list != NULL;
}

static void usage(FILE *to)
{
	fprintf(to, "usage: tally-bench [--part NAME[,NAME...]] [--quick] [--reps N] [--scale X]\n"
		    "                   [--threads N] [--subjects LIST] [--consumers LIST] [--slices LIST]\n"
		    "                   [--drain-threads LIST] [--drain-publish-ms N]\n"
		    "                   [--json FILE] [--list]\n"
		    "Measures every hot path beside its baselines, same process, same run.\n"
		    "  --quick          3 repetitions, a quarter of the operations (same sweeps)\n"
		    "  --reps N         repetitions per case (default 7)\n"
		    "  --scale X        multiply operation counts by X (default 1)\n"
		    "  --threads N      record: thread sweep 1..N (default: online CPUs)\n"
		    "  --subjects LIST  publish, ingest: subjects (default " DEFAULT_SUBJECTS "; alias --sizes);\n"
		    "                   drain too when given (its default 10,1000,10000)\n"
		    "  --consumers LIST pending: consumers (default " DEFAULT_CONSUMERS ")\n"
		    "  --slices LIST    window: window length in 1 s slices (default " DEFAULT_SLICES ")\n"
		    "  --drain-threads LIST  drain: drain_threads values (default " DEFAULT_DRAIN_THREADS "; the first is the baseline)\n"
		    "  --drain-publish-ms N  drain: publish every N ms during the drain (default 100, the engine's;\n"
		    "                   60000: no publish inside a fill, what publishing costs the drain)\n"
		    "  --json FILE      also write the rows as JSON (bench/plot.sh draws it)\n"
		    "  --list           list the parts\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "part", required_argument, NULL, 'p' }, { "reps", required_argument, NULL, 'r' },
		{ "scale", required_argument, NULL, 'x' }, { "threads", required_argument, NULL, 't' },
		{ "sizes", required_argument, NULL, 'S' }, { "subjects", required_argument, NULL, 'S' },
		{ "consumers", required_argument, NULL, 'C' }, { "slices", required_argument, NULL, 'W' },
		{ "drain-threads", required_argument, NULL, 'D' },
		{ "drain-publish-ms", required_argument, NULL, 'P' },
		{ "quick", no_argument, NULL, 'q' }, { "json", required_argument, NULL, 'j' },
		{ "list", no_argument, NULL, 'l' }, { "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *only = NULL, *json = NULL;
	int c, reps = 0;
	double scale = 0;
	bool quick = false;

	bench_opts.max_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
	bench_opts.subjects = DEFAULT_SUBJECTS;
	bench_opts.consumers = DEFAULT_CONSUMERS;
	bench_opts.slices = DEFAULT_SLICES;
	bench_opts.drain_threads = DEFAULT_DRAIN_THREADS;
	while ((c = getopt_long(argc, argv, "p:r:x:t:S:C:W:D:P:qj:lh", opts, NULL)) != -1) {
		switch (c) {
		case 'p': only = optarg; break;
		case 'r': reps = atoi(optarg); break;
		case 'x': scale = atof(optarg); break;
		case 't': bench_opts.max_threads = atoi(optarg); break;
		case 'S': bench_opts.subjects = optarg; bench_opts.subjects_given = true; break;
		case 'C': bench_opts.consumers = optarg; break;
		case 'W': bench_opts.slices = optarg; break;
		case 'D': bench_opts.drain_threads = optarg; break;
		case 'P': {
			char *end;
			unsigned long ms = strtoul(optarg, &end, 10);
			/* out of range or not a number: refused below */
			bench_opts.drain_publish_ms = *optarg && !*end && ms >= 1 && ms <= 3600000 ? (unsigned)ms : UINT_MAX;
			break;
		}
		case 'q': quick = true; break;
		case 'j': json = optarg; break;
		case 'l':
			for (size_t i = 0; i < NPARTS; i++)
				printf("%-10s %s\n", parts[i].name, parts[i].what);
			return 0;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc) {
		usage(stderr);
		return 2;
	}
	bench_opts.reps = reps ? reps : quick ? 3 : 7;
	bench_opts.scale = scale ? scale : quick ? 0.25 : 1.0;
	if (bench_opts.reps < 1 || bench_opts.reps > 256 || bench_opts.scale <= 0 || bench_opts.max_threads < 1 ||
	    bench_opts.max_threads > 64 || bench_opts.drain_publish_ms > 3600000) {
		fprintf(stderr, "tally-bench: --reps must be 1..256, --scale > 0, --threads 1..64, "
			"--drain-publish-ms 1..3600000\n");
		return 2;
	}
	if ((only && check_parts(only) != 0) || !list_ok(bench_opts.subjects, "--subjects", 1000000) ||
	    !list_ok(bench_opts.consumers, "--consumers", 100000) || !list_ok(bench_opts.slices, "--slices", 3600) ||
	    !list_ok(bench_opts.drain_threads, "--drain-threads", TALLY_DRAIN_THREADS_MAX))
		return 2;
	read_machine();
	printf("tally-bench: %s, %ld CPUs online, %s, load average %.2f\n"
	       "             %d repetitions, scale %.2f, threads 1..%d\n",
	       machine.model, sysconf(_SC_NPROCESSORS_ONLN), machine.kernel, machine.load_before,
	       bench_opts.reps, bench_opts.scale, bench_opts.max_threads);
	for (size_t i = 0; i < NPARTS; i++) {
		if (only && !in_list(only, parts[i].name))
			continue;
		printf("== %s: %s\n", parts[i].name, parts[i].what);
		fflush(stdout);
		parts[i].run();
	}
	double l[3];
	machine.load_after = getloadavg(l, 3) > 0 ? l[0] : -1;
	print_table();
	printf("\nload average (1 min): %.2f before, %.2f after; %ld CPUs\n", machine.load_before,
	       machine.load_after, sysconf(_SC_NPROCESSORS_ONLN));
	if (json && write_json(json) != 0)
		return 1;
	if (bench_failed)
		fprintf(stderr, "tally-bench: a part failed or a result is outside its bound (see above)\n");
	return bench_failed ? 1 : 0;
}
