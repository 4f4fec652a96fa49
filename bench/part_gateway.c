/* SPDX-License-Identifier: MIT */
/*
 * part_gateway.c: what tally-gateway costs, with wrk on loopback against
 * the tests' upstream (tests/gw_upstream.c, GET /_hello), every case in
 * the same run as its baseline:
 *
 *   direct          wrk -> upstream                      the baseline
 *   nginx           wrk -> nginx -> upstream             nginx's own cost
 *   nginx+check     wrk -> nginx (auth_request -> gateway check) -> upstream
 *   nginx+module    wrk -> nginx (the tally module decides in the worker) -> upstream
 *   check           wrk -> gateway check mode (the subrequest alone)
 *   proxy           wrk -> gateway proxy mode -> upstream
 *
 * Latency (p50, p99) with one connection, so that it is the time of one
 * request and not a queue; throughput with 16 connections. The cost of
 * a check to nginx is measured twice: as the difference of two wrk runs
 * back to back, and paired (paired_latency): one client alternating
 * requests to nginx alone, nginx with the check and nginx with the
 * module, so that the three see the same moments of the machine (on a
 * shared 2-core VM two wrk runs 2 s apart differ in p99 by more than the
 * check costs). Beside them, the floor of any check made in another
 * process: a round trip of 40 bytes to a forked echo process, over
 * loopback TCP (as nginx reaches the gateway) and over a unix socket. The added
 * latency rows are per-repetition differences of back-to-back runs:
 * nginx+check - nginx is what the check costs nginx per request,
 * nginx+module - nginx what the module's decision costs it (the same
 * nginx, which has the module loaded for every case), proxy - direct what
 * proxy mode adds. During each throughput run the CPU time (user +
 * system, /proc) of the processes of the hop is read, and divided by the
 * requests: what the hop costs per request, which decides the share of
 * direct's throughput it keeps where wrk, the hop and the upstream share
 * the machine's cores. Each repetition runs the six latency
 * cases back to back, then the six throughput cases, in an order that
 * turns round every repetition, so that drift in the machine's load
 * falls on both sides of a difference alike. The subject is a live one
 * (verdict ok) of an owner this part forks: every request is routed, read
 * and decided. Needs nginx and wrk (Debian packages nginx, wrk); without
 * them it says so and marks the run failed.
 *
 * Sizes, for a 2-core machine: wrk one thread, nginx one worker, the
 * gateway's check pool one thread per core, proxy mode one event loop per
 * core, the upstream a thread per connection; nothing is pinned. Where it may (root), the part
 * runs itself and what it starts at nice -10, and says so: the figures
 * are then the gateway's, less those of other work on the machine.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <dirent.h>

#include <curl/curl.h>
#include <tally/tally.h>

#include "harness.h"

#define MAX_REPS 32

static int free_port(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port = 0;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
		port = ntohs(a.sin_port);
	close(fd);
	return port;
}

static int wait_port(int port)
{
	for (int i = 0; i < 500; i++) {
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		int rc = connect(fd, (struct sockaddr *)&a, sizeof(a));
		close(fd);
		if (rc == 0)
			return 0;
		usleep(20000);
	}
	return -1;
}

static pid_t spawn(const char *out, const char *const argv[])
{
	pid_t pid = fork();

	if (pid == 0) {
		int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
		}
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	return pid;
}

static void stop(pid_t pid)
{
	if (pid > 0) {
		kill(pid, SIGTERM);
		waitpid(pid, NULL, 0);
	}
}

/* The owner: one subject, ok, kept live until killed; its segment has a
 * remote section of tallyd's default size, empty (one host). */
static pid_t owner_start(const char *name)
{
	int fd[2];
	char c;

	if (pipe(fd) != 0)
		return -1;
	pid_t pid = fork();
	if (pid == 0) {
		struct tally_segment_config cfg;
		struct tally_engine_config ec;
		struct tally_segment *seg;
		struct tally_engine *e;
		struct tally_producer *p;
		tally_subject_t id;
		tally_segment_config_init(&cfg);
		cfg.remote_capacity = 4096; /* as tallyd makes it: every check reads other hosts too */
		tally_engine_config_init(&ec);
		if (tally_segment_create(name, &cfg, TALLY_CREATE_REPLACE_DEAD, &seg) || tally_engine_start(seg, &ec, &e) ||
		    tally_subject_intern(seg, "bench.ok", &id) || tally_producer_attach(seg, &p))
			_exit(1);
		for (bool told = false;; usleep(50000)) {
			struct tally_subject_stats s;
			for (int i = 0; i < 100; i++)
				tally_record(p, id, 100000);
			if (!told && tally_engine_read(e, id, &s) == 0 && s.verdict == TALLY_VERDICT_OK)
				told = write(fd[1], &c, 1) == 1;
		}
	}
	close(fd[1]);
	int ok = read(fd[0], &c, 1) == 1;
	close(fd[0]);
	return ok ? pid : -1;
}

struct wrk_out {
	double rps, p50_us, p99_us;
};

/*
 * CPU time (user + system, clock ticks) of a process and, with children,
 * of its direct children too (nginx's master and its worker). The kernel
 * sums a process's threads in /proc/PID/stat; fields 14 and 15 follow
 * the command name, which may hold spaces, so the parse starts after its ')'.
 */
static long pid_ticks(pid_t pid, pid_t *ppid)
{
	char path[64], buf[1024];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return 0;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	const char *p = strrchr(buf, ')');
	int pp = 0;
	unsigned long ut = 0, st = 0;
	if (!p || sscanf(p + 2, "%*c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &pp, &ut, &st) != 3)
		return 0;
	if (ppid)
		*ppid = pp;
	return (long)(ut + st);
}

static long tree_ticks(pid_t pid, bool children)
{
	long t = pid_ticks(pid, NULL);
	DIR *d = children ? opendir("/proc") : NULL;
	struct dirent *e;
	while (d && (e = readdir(d))) {
		pid_t c = (pid_t)atoi(e->d_name), pp = 0;
		if (c <= 0)
			continue;
		long ct = pid_ticks(c, &pp);
		if (pp == pid)
			t += ct;
	}
	if (d)
		closedir(d);
	return t;
}

static double to_us(const char *s)
{
	char unit[8] = "";
	double v = 0;

	sscanf(s, "%lf%7s", &v, unit);
	return strcmp(unit, "ms") == 0 ? v * 1e3 : strcmp(unit, "s") == 0 ? v * 1e6 : v;
}

static int run_wrk(const char *dir, const char *url, int conns, int secs, const char *header, struct wrk_out *o)
{
	char out[128], c[16], d[16], buf[8192];

	snprintf(out, sizeof(out), "%s/wrk.out", dir);
	snprintf(c, sizeof(c), "-c%d", conns);
	snprintf(d, sizeof(d), "-d%ds", secs);
	const char *argv[] = { TALLY_WRK, "-t1", c, d, "--latency", header ? "-H" : url, header ? header : NULL,
			       url, NULL };
	if (!header)
		argv[6] = NULL;
	int st;
	waitpid(spawn(out, argv), &st, 0);
	FILE *f = fopen(out, "r");
	size_t n = f ? fread(buf, 1, sizeof(buf) - 1, f) : 0;
	if (f)
		fclose(f);
	buf[n] = '\0';
	const char *rps = strstr(buf, "Requests/sec:"), *p50 = strstr(buf, " 50% "), *p99 = strstr(buf, " 99% ");
	if (!rps || !p50 || !p99 || strstr(buf, "Non-2xx")) {
		fprintf(stderr, "bench gateway: wrk %s: %s\n", url, buf);
		return -1;
	}
	o->rps = strtod(rps + 13, NULL);
	o->p50_us = to_us(p50 + 5);
	o->p99_us = to_us(p99 + 5);
	return 0;
}

/* ---- paired latency ---- */

static size_t discard(char *p, size_t size, size_t n, void *u)
{
	(void)p;
	(void)u;
	return size * n;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double quantile(double *v, int n, double q)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_double);
	return v[(int)(q * (n - 1) + 0.5)];
}

#define PAIRED_MAX 3

/* One client, one kept-alive connection per URL (a curl handle each),
 * requests to the n URLs in turn, the order rotated every round: every
 * case meets the same moments of the machine, so that the difference of
 * two p99s is the cost of what differs and not of when each ran. Fills
 * p50 and p99 (us) per URL; -1 on a failed or non-2xx request. */
static int paired_latency(const char *const urls[], int n, int rounds, double p50[], double p99[])
{
	CURL *h[PAIRED_MAX];
	double *lat[PAIRED_MAX];
	int rc = 0;

	for (int i = 0; i < n; i++) {
		h[i] = curl_easy_init();
		lat[i] = malloc(sizeof(double) * (size_t)rounds);
		curl_easy_setopt(h[i], CURLOPT_URL, urls[i]);
		curl_easy_setopt(h[i], CURLOPT_WRITEFUNCTION, discard);
		curl_easy_setopt(h[i], CURLOPT_TCP_NODELAY, 1L);
	}
	for (int r = 0; r < rounds && rc == 0; r++)
		for (int k = 0; k < n; k++) {
			int i = (r + k) % n;
			long status = 0;
			uint64_t t0 = bench_now_ns();
			CURLcode c = curl_easy_perform(h[i]);
			lat[i][r] = (double)(bench_now_ns() - t0) / 1e3;
			curl_easy_getinfo(h[i], CURLINFO_RESPONSE_CODE, &status);
			if (c != CURLE_OK || status / 100 != 2) {
				fprintf(stderr, "bench gateway: %s: %s, status %ld\n", urls[i], curl_easy_strerror(c), status);
				rc = -1;
				break;
			}
		}
	for (int i = 0; i < n; i++) {
		if (rc == 0) {
			p50[i] = quantile(lat[i], rounds, 0.50);
			p99[i] = quantile(lat[i], rounds, 0.99);
		}
		free(lat[i]);
		curl_easy_cleanup(h[i]);
	}
	return rc;
}

/* ---- the floor: one round trip between two processes ---- */

/* A forked echo process on a connected socket pair of family fam
 * (AF_INET: loopback TCP with TCP_NODELAY, as nginx talks to the
 * gateway; AF_UNIX), and n round trips of 40 bytes from here: p50 and p99
 * in us. What any check in another process costs at least, on this
 * machine: a wake-up there and one back here. -1 on failure. */
static int round_trips(int fam, int n, double *p50, double *p99)
{
	int lfd = socket(fam, SOCK_STREAM, 0), cfd = -1, one = 1, rc = -1;
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	char path[64] = "";
	double *lat = malloc(sizeof(double) * (size_t)n);
	pid_t pid = -1;

	memset(&ss, 0, sizeof(ss));
	if (fam == AF_UNIX) {
		struct sockaddr_un *u = (struct sockaddr_un *)&ss;
		snprintf(path, sizeof(path), "/tmp/tally-bench-rt-%d.sock", (int)getpid());
		unlink(path);
		u->sun_family = AF_UNIX;
		snprintf(u->sun_path, sizeof(u->sun_path), "%s", path);
		len = sizeof(*u);
	} else {
		struct sockaddr_in *in = (struct sockaddr_in *)&ss;
		in->sin_family = AF_INET;
		in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		len = sizeof(*in);
	}
	if (lfd < 0 || !lat || bind(lfd, (struct sockaddr *)&ss, len) != 0 || listen(lfd, 1) != 0 ||
	    getsockname(lfd, (struct sockaddr *)&ss, &len) != 0)
		goto out;
	if ((pid = fork()) == 0) {
		char buf[64];
		int a = accept(lfd, NULL, NULL);
		setsockopt(a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		for (ssize_t k; (k = read(a, buf, sizeof(buf))) > 0;)
			if (write(a, buf, (size_t)k) != k)
				break;
		_exit(0);
	}
	if (pid < 0 || (cfd = socket(fam, SOCK_STREAM, 0)) < 0 || connect(cfd, (struct sockaddr *)&ss, len) != 0)
		goto out;
	if (fam == AF_INET)
		setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	char msg[40] = "GET /check HTTP/1.1 round trip payload.", back[64];
	for (int i = 0; i < n; i++) {
		uint64_t t0 = bench_now_ns();
		if (write(cfd, msg, sizeof(msg)) != (ssize_t)sizeof(msg))
			goto out;
		for (size_t got = 0; got < sizeof(msg);) {
			ssize_t k = read(cfd, back, sizeof(back));
			if (k <= 0)
				goto out;
			got += (size_t)k;
		}
		lat[i] = (double)(bench_now_ns() - t0) / 1e3;
	}
	*p50 = quantile(lat, n, 0.50);
	*p99 = quantile(lat, n, 0.99);
	rc = 0;
out:
	if (cfd >= 0)
		close(cfd);
	if (pid > 0)
		waitpid(pid, NULL, 0);
	if (lfd >= 0)
		close(lfd);
	if (*path)
		unlink(path);
	free(lat);
	return rc;
}

enum { C_DIRECT, C_NGINX, C_NGINX_CHECK, C_NGINX_MODULE, C_CHECK, C_PROXY, C__N };
static const char *const case_names[C__N] = { "direct", "nginx", "nginx+check", "nginx+module", "check", "proxy" };

/*
 * The CPU a case's hop spends per request during its throughput run (16
 * connections, 1 s): the processes between wrk and the upstream, or the
 * upstream itself for direct. It tells why a hop keeps the share of
 * direct's throughput that it does when all of them share two cores.
 */
static const char *const cpu_names[C__N] = {
	"direct: the upstream's CPU per request", "nginx: nginx's CPU per request",
	"nginx+check: nginx's and the gateway's CPU per request", "nginx+module: nginx's CPU per request",
	"check: the gateway's CPU per request", "proxy: the gateway's CPU per request",
};

static long hop_ticks(int c, pid_t up, pid_t ngx, pid_t chk, pid_t prx)
{
	switch (c) {
	case C_DIRECT:
		return tree_ticks(up, false);
	case C_NGINX:
	case C_NGINX_MODULE:
		return tree_ticks(ngx, true);
	case C_NGINX_CHECK:
		return tree_ticks(ngx, true) + tree_ticks(chk, false);
	case C_CHECK:
		return tree_ticks(chk, false);
	default:
		return tree_ticks(prx, false);
	}
}

void bench_part_gateway(void)
{
	char dir[] = "/tmp/tally-bench-gw-XXXXXX", seg[64], path[160], conf[4096], url[C__N][128];
	int up = free_port(), chk = free_port(), prx = free_port(), ngx = free_port();
	int reps = bench_opts.reps < MAX_REPS ? bench_opts.reps : MAX_REPS;
	int lat_s = bench_opts.scale >= 1 ? 2 : 1; /* 1 conn: some 20,000 requests a run, 200 above the p99 */
	const int tput_s = 1; /* 16 conns: the throughput runs, and the CPU each hop spends in them */
	int nice0 = getpriority(PRIO_PROCESS, 0);

	if (access(TALLY_NGINX, X_OK) != 0 || access(TALLY_WRK, X_OK) != 0) {
		fprintf(stderr, "bench gateway: needs nginx (%s) and wrk (%s): Debian packages nginx, wrk\n",
			TALLY_NGINX, TALLY_WRK);
		bench_failed = true;
		return;
	}
	if (*TALLY_NGINX_MODULE_MISSING) {
		fprintf(stderr, "bench gateway: the nginx module was not built: %s\n", TALLY_NGINX_MODULE_MISSING);
		bench_failed = true;
		return;
	}
	if (!mkdtemp(dir))
		return;
	snprintf(seg, sizeof(seg), "bench-gw-%d", (int)getpid());
	if (setpriority(PRIO_PROCESS, 0, -10) == 0)
		fprintf(stderr, "bench gateway: wrk, nginx, the gateway and the upstream run at nice -10\n");
	bool started = true; /* else the logs are kept */
	pid_t owner = owner_start(seg);
	char ups[16], chl[32], prl[32], upurl[64], ini[160];
	snprintf(ups, sizeof(ups), "%d", up);
	snprintf(chl, sizeof(chl), "127.0.0.1:%d", chk);
	snprintf(prl, sizeof(prl), "127.0.0.1:%d", prx);
	snprintf(upurl, sizeof(upurl), "http://127.0.0.1:%d", up);
	snprintf(ini, sizeof(ini), "%s/gateway.ini", dir);
	FILE *f = fopen(ini, "w");
	fprintf(f, "[gateway]\nsegment = %s\n[route * /_hello]\nsubject = bench.ok\n"
		"[route * /module]\nsubject = bench.ok\n", seg);
	fclose(f);
	const char *up_argv[] = { TALLY_BENCH_BUILDDIR "/bench/gw-upstream", ups, NULL };
	const char *chk_argv[] = { TALLY_BENCH_BUILDDIR "/tools/tally-gateway", "-c", ini, "-s", seg, "--listen", chl, NULL };
	const char *prx_argv[] = { TALLY_BENCH_BUILDDIR "/tools/tally-gateway", "-c", ini, "-s", seg, "--listen", prl,
				   "--mode", "proxy", "--upstream", upurl, NULL };
	snprintf(conf, sizeof(conf),
		 "%s\nload_module %s;\nworker_processes 1;\npid %s/nginx.pid;\nerror_log %s/error.log warn;\nevents {}\nhttp {\n"
		 "  access_log off;\n  client_body_temp_path %s/b;\n  proxy_temp_path %s/p;\n  fastcgi_temp_path %s/f;\n"
		 "  uwsgi_temp_path %s/u;\n  scgi_temp_path %s/s;\n  tally_config %s;\n"
		 "  upstream tally_gateway { server 127.0.0.1:%d; keepalive 32; }\n"
		 "  upstream app { server 127.0.0.1:%d; keepalive 32; }\n"
		 "  server {\n    listen 127.0.0.1:%d;\n    include %s/etc/nginx/tally-locations.conf;\n"
		 "    location = /_hello { include %s/etc/nginx/tally-check.conf; proxy_pass http://app;\n"
		 "      proxy_http_version 1.1; proxy_set_header Connection \"\"; }\n"
		 "    location = /module { tally_check on; proxy_pass http://app/_hello; proxy_http_version 1.1;\n"
		 "      proxy_set_header Connection \"\"; }\n"
		 "    location = /nocheck { proxy_pass http://app/_hello; proxy_http_version 1.1;\n"
		 "      proxy_set_header Connection \"\"; }\n  }\n}\n",
		 geteuid() == 0 ? "user root;" : "", TALLY_BENCH_BUILDDIR "/tools/.libs/ngx_http_tally_module.so", dir,
		 dir, dir, dir, dir, dir, dir, ini, chk, up, ngx,
		 TALLY_BENCH_SRCDIR, TALLY_BENCH_SRCDIR);
	snprintf(path, sizeof(path), "%s/nginx.conf", dir);
	f = fopen(path, "w");
	fputs(conf, f);
	fclose(f);
	const char *ngx_argv[] = { TALLY_NGINX, "-p", dir, "-c", path, "-e", "stderr", "-g", "daemon off;", NULL };
	char o1[160], o2[160], o3[160], o4[160];
	snprintf(o1, sizeof(o1), "%s/up.out", dir);
	snprintf(o2, sizeof(o2), "%s/check.out", dir);
	snprintf(o3, sizeof(o3), "%s/proxy.out", dir);
	snprintf(o4, sizeof(o4), "%s/nginx.out", dir);
	pid_t pu = spawn(o1, up_argv), pc = spawn(o2, chk_argv), pp = spawn(o3, prx_argv);
	setenv("LD_LIBRARY_PATH", TALLY_BENCH_BUILDDIR "/lib/.libs", 1); /* the module's libtally */
	pid_t pn = spawn(o4, ngx_argv);
	if (owner < 0 || wait_port(up) || wait_port(chk) || wait_port(prx) || wait_port(ngx)) {
		fprintf(stderr, "bench gateway: a server did not start (logs in %s, kept)\n", dir);
		bench_failed = true;
		started = false;
		goto out;
	}
	snprintf(url[C_DIRECT], sizeof(url[0]), "http://127.0.0.1:%d/_hello", up);
	snprintf(url[C_NGINX], sizeof(url[0]), "http://127.0.0.1:%d/nocheck", ngx);
	snprintf(url[C_NGINX_CHECK], sizeof(url[0]), "http://127.0.0.1:%d/_hello", ngx);
	snprintf(url[C_NGINX_MODULE], sizeof(url[0]), "http://127.0.0.1:%d/module", ngx);
	snprintf(url[C_CHECK], sizeof(url[0]), "http://127.0.0.1:%d/check", chk);
	snprintf(url[C_PROXY], sizeof(url[0]), "http://127.0.0.1:%d/_hello", prx);
	double rps[C__N][MAX_REPS], p50[C__N][MAX_REPS], p99[C__N][MAX_REPS], cpu[C__N][MAX_REPS];
	double add50[3][MAX_REPS], add99[3][MAX_REPS];
	double pp50[3][MAX_REPS], pp99[3][MAX_REPS], padd50[2][MAX_REPS], padd99[2][MAX_REPS];
	double rt50[2][MAX_REPS], rt99[2][MAX_REPS];
	const char *const paired_urls[3] = { url[C_NGINX], url[C_NGINX_CHECK], url[C_NGINX_MODULE] };
	int rounds = (int)(10000 * bench_opts.scale) < 1000 ? 1000 : (int)(10000 * bench_opts.scale);
	for (int r = 0; r < reps; r++) {
		for (int phase = 0; phase < 2; phase++)
			for (int i = 0; i < C__N; i++) {
				int c = r % 2 ? C__N - 1 - i : i;
				struct wrk_out w;
				const char *h = c == C_CHECK ? "X-Original-URI: /_hello" : NULL;
				long t0 = hop_ticks(c, pu, pn, pc, pp);
				if (run_wrk(dir, url[c], phase ? 16 : 1, phase ? tput_s : lat_s, h, &w)) {
					bench_failed = true;
					goto out;
				}
				if (phase) {
					rps[c][r] = w.rps;
					cpu[c][r] = (double)(hop_ticks(c, pu, pn, pc, pp) - t0) * 1e6 /
						    (double)sysconf(_SC_CLK_TCK) / (w.rps * tput_s);
				} else {
					p50[c][r] = w.p50_us;
					p99[c][r] = w.p99_us;
				}
			}
		add50[0][r] = p50[C_NGINX_CHECK][r] - p50[C_NGINX][r];
		add99[0][r] = p99[C_NGINX_CHECK][r] - p99[C_NGINX][r];
		add50[1][r] = p50[C_PROXY][r] - p50[C_DIRECT][r];
		add99[1][r] = p99[C_PROXY][r] - p99[C_DIRECT][r];
		add50[2][r] = p50[C_NGINX_MODULE][r] - p50[C_NGINX][r];
		add99[2][r] = p99[C_NGINX_MODULE][r] - p99[C_NGINX][r];
		double q50[3], q99[3];
		if (paired_latency(paired_urls, 3, rounds, q50, q99)) {
			bench_failed = true;
			goto out;
		}
		for (int i = 0; i < 3; i++) {
			pp50[i][r] = q50[i];
			pp99[i][r] = q99[i];
		}
		for (int i = 0; i < 2; i++) {
			padd50[i][r] = q50[i + 1] - q50[0];
			padd99[i][r] = q99[i + 1] - q99[0];
		}
		if (round_trips(AF_INET, rounds, &rt50[0][r], &rt99[0][r]) ||
		    round_trips(AF_UNIX, rounds, &rt50[1][r], &rt99[1][r])) {
			fprintf(stderr, "bench gateway: the round-trip floor failed: %s\n", strerror(errno));
			bench_failed = true;
			goto out;
		}
	}
	for (int c = 0; c < C__N; c++) {
		char name[64];
		snprintf(name, sizeof(name), "%s req/s (16 conns)", case_names[c]);
		bench_row("gateway", name, "req/s", true, rps[c], reps,
			  c == C_DIRECT                               ? NULL
			  : c == C_NGINX_CHECK || c == C_NGINX_MODULE ? "direct req/s (16 conns)|nginx req/s (16 conns)"
								      : "direct req/s (16 conns)",
			  0);
	}
	for (int c = 0; c < C__N; c++)
		bench_row("gateway", cpu_names[c], "us", false, cpu[c], reps,
			  c == C_NGINX_CHECK || c == C_NGINX_MODULE || c == C_PROXY ? cpu_names[C_NGINX] : NULL, 0);
	for (int c = 0; c < C__N; c++) {
		char n50[64], n99[64];
		snprintf(n50, sizeof(n50), "%s p50 (1 conn)", case_names[c]);
		snprintf(n99, sizeof(n99), "%s p99 (1 conn)", case_names[c]);
		bench_row("gateway", n50, "us", false, p50[c], reps, c == C_DIRECT ? NULL : "direct p50 (1 conn)", 0);
		bench_row("gateway", n99, "us", false, p99[c], reps, c == C_DIRECT ? NULL : "direct p99 (1 conn)", 0);
	}
	bench_row("gateway", "check added to nginx, p50", "us", false, add50[0], reps, NULL, 0);
	bench_row("gateway", "check added to nginx, p99", "us", false, add99[0], reps, NULL, 0);
	bench_row("gateway", "module added to nginx, p50", "us", false, add50[2], reps, NULL, 0);
	bench_row("gateway", "module added to nginx, p99", "us", false, add99[2], reps, NULL, 0);
	static const char *const pnames[3] = { "nginx", "nginx+check", "nginx+module" };
	for (int i = 0; i < 3; i++) {
		char n50[80], n99[80];
		snprintf(n50, sizeof(n50), "paired: %s p50 (1 client)", pnames[i]);
		snprintf(n99, sizeof(n99), "paired: %s p99 (1 client)", pnames[i]);
		bench_row("gateway", n50, "us", false, pp50[i], reps, i ? "paired: nginx p50 (1 client)" : NULL, 0);
		bench_row("gateway", n99, "us", false, pp99[i], reps, i ? "paired: nginx p99 (1 client)" : NULL, 0);
	}
	bench_row("gateway", "check added to nginx, p50, paired", "us", false, padd50[0], reps, NULL, 0);
	bench_row("gateway", "check added to nginx, p99, paired", "us", false, padd99[0], reps, NULL, 0);
	bench_row("gateway", "floor: round trip to another process, TCP loopback, p50", "us", false, rt50[0], reps,
		  NULL, 0);
	bench_row("gateway", "floor: round trip to another process, TCP loopback, p99", "us", false, rt99[0], reps,
		  NULL, 0);
	bench_row("gateway", "floor: round trip to another process, unix socket, p50", "us", false, rt50[1], reps,
		  NULL, 0);
	bench_row("gateway", "floor: round trip to another process, unix socket, p99", "us", false, rt99[1], reps,
		  NULL, 0);
	bench_row("gateway", "check added to nginx, p50, paired, of the floor", "us", false, padd50[0], reps,
		  "floor: round trip to another process, TCP loopback, p50", 0);
	bench_row("gateway", "module added to nginx, p50, paired", "us", false, padd50[1], reps, NULL, 0);
	bench_row("gateway", "module added to nginx, p99, paired", "us", false, padd99[1], reps, NULL, 0);
	bench_row("gateway", "proxy added to direct, p50", "us", false, add50[1], reps, NULL, 0);
	bench_row("gateway", "proxy added to direct, p99", "us", false, add99[1], reps, NULL, 0);
	double share = bench_median(rps[C_PROXY], reps) / bench_median(rps[C_DIRECT], reps);
	fprintf(stderr, "bench gateway: proxy keeps %.0f%% of direct throughput (target >= 50%%; nginx as a "
			"proxy keeps %.0f%%, nginx with the module %.0f%%); CPU a request: proxy %.1f us, nginx %.1f, "
			"nginx with the module %.1f, the upstream %.1f; paired, the check adds %.0f us p50, %.0f us p99 "
			"to nginx (target <= 50 us p99), the module %.0f us p50, %.0f us p99\n",
		share * 100, 100 * bench_median(rps[C_NGINX], reps) / bench_median(rps[C_DIRECT], reps),
		100 * bench_median(rps[C_NGINX_MODULE], reps) / bench_median(rps[C_DIRECT], reps),
		bench_median(cpu[C_PROXY], reps), bench_median(cpu[C_NGINX], reps),
		bench_median(cpu[C_NGINX_MODULE], reps), bench_median(cpu[C_DIRECT], reps),
		bench_median(padd50[0], reps), bench_median(padd99[0], reps), bench_median(padd50[1], reps),
		bench_median(padd99[1], reps));
out:
	stop(pn);
	stop(pp);
	stop(pc);
	stop(pu);
	if (owner > 0) {
		kill(owner, SIGKILL);
		waitpid(owner, NULL, 0);
	}
	tally_segment_unlink(seg);
	if (setpriority(PRIO_PROCESS, 0, nice0) != 0)
		fprintf(stderr, "bench gateway: could not return to nice %d\n", nice0);
	char rm[128];
	snprintf(rm, sizeof(rm), "rm -rf %s", dir);
	if (started && system(rm) != 0)
		fprintf(stderr, "bench gateway: could not remove %s\n", dir);
}
