/* SPDX-License-Identifier: MIT */
/*
 * bench/part_metrics.c: the part "metrics" (issue 15, BENCHMARKS.md
 * "/metrics size and gzip"). A real tallyd (BUILDDIR/tools/tallyd, a
 * child process) owns a segment; this process records into 1,000
 * subjects through it and scrapes GET /metrics over loopback.
 *   - size of one scrape: the full histogram (two bounds per octave), a
 *     histogram of 8 chosen bounds (histogram_buckets_ms), quantiles only
 *     (latency_histogram = false), each plain and gzipped (Accept-Encoding);
 *   - CPU of tallyd's HTTP thread per scrape (its /proc/PID/task/TID/stat,
 *     the thread libmicrohttpd names MHD-single), plain beside gzip;
 *   - zlib alone on the same body: level 1 (what tallyd uses) beside the
 *     default level 6, time and size, to show why level 1.
 */
#define _GNU_SOURCE
#include "config.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include <tally/tally.h>

#include "harness.h"

#define PART "metrics"
#define NSUBJ 1000
#define TALLYD TALLY_BENCH_BUILDDIR "/tools/tallyd"

struct td {
	pid_t pid;
	int port;
	char dir[64], seg[96], log[128];
	struct tally_segment *seg_h;
	struct tally_producer *p;
};

static const char *file_text(const char *path)
{
	static char buf[16384];
	FILE *f = fopen(path, "r");
	size_t n = 0;

	if (f) {
		n = fread(buf, 1, sizeof(buf) - 1, f);
		fclose(f);
	}
	buf[n] = '\0';
	return buf;
}

/* GET /metrics (gzip asked or not): the whole reply's body length, 0 on failure. */
static size_t scrape(int port, bool gzip, char **body)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	char req[160];
	size_t cap = 1 << 20, len = 0;
	char *buf = malloc(cap), *b;
	int fd = socket(AF_INET, SOCK_STREAM, 0), n;
	ssize_t r;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	n = snprintf(req, sizeof(req), "GET /metrics HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n",
		     gzip ? "Accept-Encoding: gzip\r\n" : "");
	if (!buf || fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
	    send(fd, req, (size_t)n, 0) != n) {
		if (fd >= 0)
			close(fd);
		free(buf);
		return 0;
	}
	while ((r = recv(fd, buf + len, cap - len, 0)) > 0) {
		len += (size_t)r;
		if (len == cap && (b = realloc(buf, cap *= 2)))
			buf = b;
		else if (len == cap)
			break;
	}
	close(fd);
	b = memmem(buf, len, "\r\n\r\n", 4);
	if (!b || strncmp(buf, "HTTP/1.1 200", 12) != 0) {
		free(buf);
		return 0;
	}
	len -= (size_t)(b + 4 - buf);
	memmove(buf, b + 4, len);
	if (body)
		*body = buf;
	else
		free(buf);
	return len;
}

static int td_start(struct td *t, const char *ini)
{
	char cfg[128];
	FILE *f;
	const char *s;

	memset(t, 0, sizeof(*t));
	snprintf(t->dir, sizeof(t->dir), "/tmp/tally-bench-metrics-XXXXXX");
	if (!mkdtemp(t->dir))
		return -1;
	snprintf(t->seg, sizeof(t->seg), "tally-bench-metrics-%ld", (long)getpid());
	snprintf(t->log, sizeof(t->log), "%s/tallyd.log", t->dir);
	snprintf(cfg, sizeof(cfg), "%s/tallyd.ini", t->dir);
	if (!(f = fopen(cfg, "w")))
		return -1;
	/* a window longer than the run: every scrape has the same series */
	fprintf(f, "[segment]\nsubject_capacity = 2048\n[engine]\nwindow_ms = 300000\n%s", ini);
	fclose(f);
	if ((t->pid = fork()) == 0) {
		int fd = open(t->log, O_WRONLY | O_CREAT | O_APPEND, 0600);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
			_exit(127);
		execl(TALLYD, TALLYD, "-c", cfg, "-s", t->seg, "--http", "127.0.0.1:0", (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 1000 && !t->port; i++, usleep(10000))
		if ((s = strstr(file_text(t->log), "http://127.0.0.1:")))
			t->port = atoi(s + strlen("http://127.0.0.1:"));
	if (!t->port || tally_segment_open(t->seg, TALLY_OPEN_PRODUCER, 2000, &t->seg_h) != 0 ||
	    tally_producer_attach(t->seg_h, &t->p) != 0) {
		fprintf(stderr, "metrics: tallyd did not start:\n%s\n", file_text(t->log));
		return -1;
	}
	return 0;
}

static void td_stop(struct td *t)
{
	char cmd[128];
	int st;

	tally_producer_detach(&t->p);
	tally_segment_close(&t->seg_h);
	if (t->pid > 0) {
		kill(t->pid, SIGTERM);
		waitpid(t->pid, &st, 0);
	}
	tally_segment_unlink(t->seg);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", t->dir);
	if (system(cmd) != 0)
		fprintf(stderr, "metrics: cannot remove %s\n", t->dir);
}

/* 1,000 subjects, 200 samples each from 50 us to 500 ms; wait for the histogram. */
static int fill(struct td *t, bool histogram)
{
	uint64_t rnd = 88172645463325252ull;
	char name[64], *body = NULL;

	for (int i = 0; i < NSUBJ; i++) {
		tally_subject_t id;

		snprintf(name, sizeof(name), "orders.region%02d.shard%03d", i / 100, i);
		if (tally_subject_intern(t->seg_h, name, &id) != 0)
			return -1;
		for (int k = 0; k < 200; k++)
			while (!tally_record(t->p, id, 50000 + bench_rand(&rnd) % 500000000))
				usleep(100);
	}
	/* published, and a slice closed: the histogram holds the samples */
	for (int i = 0; i < 600; i++, usleep(10000)) {
		if (scrape(t->port, false, &body) &&
		    strstr(body, "tally_subject_window_samples{subject=\"orders.region09.shard999\"} 200\n") &&
		    (!histogram || strstr(body, "_count{subject=\"orders.region09.shard999\"} 200\n"))) {
			free(body);
			return 0;
		}
		free(body);
		body = NULL;
	}
	return -1;
}

/* utime + stime of tallyd's thread named MHD-single, in ms. */
static double http_cpu_ms(pid_t pid)
{
	char path[320], comm[64];
	struct dirent *de;
	DIR *d;
	double ms = -1;

	snprintf(path, sizeof(path), "/proc/%ld/task", (long)pid);
	if (!(d = opendir(path)))
		return -1;
	while ((de = readdir(d))) {
		FILE *f;
		unsigned long ut, st;

		snprintf(path, sizeof(path), "/proc/%ld/task/%.32s/comm", (long)pid, de->d_name);
		snprintf(comm, sizeof(comm), "%.63s", file_text(path));
		if (strncmp(comm, "MHD-single", 10) != 0)
			continue;
		snprintf(path, sizeof(path), "/proc/%ld/task/%.32s/stat", (long)pid, de->d_name);
		if (!(f = fopen(path, "r")))
			continue;
		/* after "(comm)": state and 10 fields, then utime, stime */
		if (fscanf(f, "%*d (%*[^)]) %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut,
			   &st) == 2)
			ms = (double)(ut + st) * 1000.0 / (double)sysconf(_SC_CLK_TCK);
		fclose(f);
	}
	closedir(d);
	return ms;
}

static double gzip_ms(const char *in, size_t len, int level, size_t *out_len)
{
	uLongf cap = compressBound((uLong)len);
	Bytef *out = malloc(cap);
	z_stream z;
	uint64_t t0 = bench_now_ns();

	memset(&z, 0, sizeof(z));
	if (!out || deflateInit2(&z, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
		free(out);
		return -1;
	}
	z.next_in = (Bytef *)(uintptr_t)in;
	z.avail_in = (uInt)len;
	z.next_out = out;
	z.avail_out = (uInt)cap;
	deflate(&z, Z_FINISH);
	*out_len = z.total_out;
	deflateEnd(&z);
	free(out);
	return (double)(bench_now_ns() - t0) / 1e6;
}

static void sizes(const char *label, const char *ini, bool histogram)
{
	struct td t;
	double plain[16], gz[16];
	int reps = bench_opts.reps > 16 ? 16 : bench_opts.reps;
	char row[128];

	if (td_start(&t, ini) != 0 || fill(&t, histogram) != 0) {
		fprintf(stderr, "metrics: %s: no histogram within 6 s\n", label);
		bench_failed = true;
		td_stop(&t);
		return;
	}
	for (int r = 0; r < reps; r++) {
		plain[r] = (double)scrape(t.port, false, NULL) / 1024.0;
		gz[r] = (double)scrape(t.port, true, NULL) / 1024.0;
	}
	snprintf(row, sizeof(row), "scrape size, %s, plain", label);
	bench_row(PART, row, "KiB", false, plain, reps, NULL, NSUBJ);
	snprintf(row, sizeof(row), "scrape size, %s, gzip", label);
	bench_row(PART, row, "KiB", false, gz, reps, NULL, NSUBJ);
	td_stop(&t);
}

static void cpu(void)
{
	struct td t;
	int reps = bench_opts.reps > 16 ? 16 : bench_opts.reps;
	int n = (int)(20 * bench_opts.scale) > 4 ? (int)(20 * bench_opts.scale) : 4;
	double plain[16], gz[16], wall_p[16], wall_g[16], z1[16], z6[16], s1 = 0, s6 = 0;
	char *body = NULL;
	size_t len = 0, l1 = 0, l6 = 0, before;

	if (td_start(&t, "") != 0 || fill(&t, true) != 0) {
		fprintf(stderr, "metrics: cpu: no histogram within 6 s\n");
		bench_failed = true;
		td_stop(&t);
		return;
	}
	before = scrape(t.port, false, NULL);
	for (int r = 0; r < reps; r++) {
		for (int mode = 0; mode < 2; mode++) {
			double c0 = http_cpu_ms(t.pid);
			uint64_t w0 = bench_now_ns();

			for (int i = 0; i < n; i++)
				scrape(t.port, mode == 1, NULL);
			(mode ? gz : plain)[r] = (http_cpu_ms(t.pid) - c0) / n;
			(mode ? wall_g : wall_p)[r] = (double)(bench_now_ns() - w0) / 1e6 / n;
		}
	}
	bench_row(PART, "HTTP thread CPU per scrape, plain", "ms", false, plain, reps, NULL, NSUBJ);
	bench_row(PART, "HTTP thread CPU per scrape, gzip (level 1)", "ms", false, gz, reps,
		  "HTTP thread CPU per scrape, plain", NSUBJ);
	bench_row(PART, "scrape wall time (loopback client), plain", "ms", false, wall_p, reps, NULL,
		  NSUBJ);
	bench_row(PART, "scrape wall time (loopback client), gzip", "ms", false, wall_g, reps,
		  "scrape wall time (loopback client), plain", NSUBJ);
	if ((len = scrape(t.port, false, &body)) != 0) {
		if (len < before - before / 100)
			fprintf(stderr, "metrics: the body shrank during the run (%zu -> %zu bytes)\n",
				before, len);
		for (int r = 0; r < reps; r++) {
			z1[r] = gzip_ms(body, len, 1, &l1);
			z6[r] = gzip_ms(body, len, 6, &l6);
		}
		s1 = (double)l1 / 1024.0;
		s6 = (double)l6 / 1024.0;
		bench_row(PART, "zlib alone on one body, level 6 (default)", "ms", false, z6, reps, NULL,
			  NSUBJ);
		bench_row(PART, "zlib alone on one body, level 1", "ms", false, z1, reps,
			  "zlib alone on one body, level 6 (default)", NSUBJ);
		bench_row(PART, "zlib level 6 size", "KiB", false, &s6, 1, NULL, NSUBJ);
		bench_row(PART, "zlib level 1 size", "KiB", false, &s1, 1, NULL, NSUBJ);
	}
	free(body);
	td_stop(&t);
}

void bench_part_metrics(void)
{
	sizes("full histogram", "", true);
	sizes("8 buckets", "[http]\nhistogram_buckets_ms = 1, 5, 10, 25, 50, 100, 250, 1000\n", true);
	sizes("quantiles only", "[http]\nlatency_histogram = false\n", false);
	cpu();
}
