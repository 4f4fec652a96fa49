/* SPDX-License-Identifier: MIT */
/*
 * gateway.c: see gateway.h.
 */
#include "config.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/gateway.h"
#include "common/helpers.h"
#include "common/http.h"
#include "gw_pattern.h"

#define MS 1000000ull

/* ---- the owner ---- */

static void owner_main(const char *name, bool group_readable, int ready_fd)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	struct tally_engine_config ec;
	struct tally_engine *e;
	struct tally_producer *p;
	struct tally_threshold_rule r;
	tally_subject_t ok, warn, over;
	struct tally_subject_stats s1, s2;
	bool told = false;

	tt_config(&cfg);
	cfg.group_readable = group_readable;
	tally_engine_config_init(&ec);
	ec.publish_interval_ms = 10;
	if (tally_segment_create(name, &cfg, 0, &seg) || tally_engine_start(seg, &ec, &e))
		_exit(1);
	struct tally_thresholds *t = tally_thresholds_new();
	tally_threshold_rule_init(&r);
	r.p95_warn_ns = 1 * MS;
	r.p95_overload_ns = 5 * MS;
	r.min_samples = 10;
	r.retry_after_ms = 2000;
	tally_thresholds_add(t, NULL, &r);
	tally_engine_set_thresholds(e, &t);
	tally_subject_intern(seg, GWT_OK, &ok);
	tally_subject_intern(seg, GWT_WARN, &warn);
	tally_subject_intern(seg, GWT_OVER, &over);
	tally_producer_attach(seg, &p);
	for (;;) { /* keep the window full until killed */
		for (int i = 0; i < 20; i++) {
			tally_record(p, ok, 100000);
			tally_record(p, warn, 2 * MS);
			tally_record(p, over, 20 * MS);
		}
		if (!told && tally_engine_read(e, warn, &s1) == 0 && s1.verdict == TALLY_VERDICT_WARN &&
		    tally_engine_read(e, over, &s2) == 0 && s2.verdict == TALLY_VERDICT_OVERLOAD) {
			char c = 1;
			told = write(ready_fd, &c, 1) == 1;
		}
		tt_sleep_ms(50);
	}
}

pid_t gwt_owner_start(const char *name, bool group_readable)
{
	int fd[2];
	char c;

	if (pipe(fd) != 0)
		return -1;
	pid_t pid = fork();
	if (pid == 0) {
		/* a test that fails an assertion exits without stopping it: it
		 * must not outlive the test (it would hold the test's output
		 * open, and the harness would wait for ever) */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(fd[0]);
		owner_main(name, group_readable, fd[1]);
	}
	close(fd[1]);
	if (pid < 0 || read(fd[0], &c, 1) != 1) {
		fprintf(stderr, "gwt: the owner of %s did not publish warn and overload verdicts\n", name);
		close(fd[0]);
		return -1;
	}
	close(fd[0]);
	return pid;
}

/* ---- processes ---- */

pid_t gwt_spawn(const char *log, const char *const argv[])
{
	pid_t pid = fork();

	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL); /* dies with a test that failed an assertion */
		setpgid(0, 0); /* and what it forks (nginx's workers) with gwt_kill_group */
		if (log) {
			int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
			if (fd >= 0) {
				dup2(fd, 1);
				dup2(fd, 2);
				close(fd);
			}
		}
		execv(argv[0], (char *const *)argv);
		fprintf(stderr, "gwt: cannot run %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	return pid;
}

void gwt_kill_group(pid_t pid)
{
	if (pid > 0)
		kill(-pid, SIGKILL);
}

static pid_t nginx_running;

pid_t gwt_nginx_start(const char *dir, const char *conf_path, int *port, void (*conf)(void *ctx, int port),
		      void *ctx)
{
	char log[160];

	snprintf(log, sizeof(log), "%s/nginx.out", dir);
	for (int attempt = 0; attempt < 5; attempt++) {
		*port = tt_free_port();
		conf(ctx, *port);
		const char *argv[] = { TALLY_NGINX, "-p", dir, "-c", conf_path, "-e", "stderr", "-g", "daemon off;",
				       NULL };
		pid_t pid = gwt_spawn(log, argv);
		if (gwt_wait_port(*port, 10000) == 0)
			return nginx_running = pid;
		char *text = gwt_read_file(log);
		fprintf(stderr, "nginx did not start: %s\n", text);
		free(text);
		gwt_stop(pid);
		gwt_kill_group(pid);
	}
	return -1;
}

int gwt_nginx_stop(pid_t pid)
{
	int st = gwt_stop(pid);

	if (pid == nginx_running)
		nginx_running = 0;
	return st;
}

void gwt_nginx_fini(void)
{
	gwt_kill_group(nginx_running);
	nginx_running = 0;
}

int gwt_wait_port(int port, int ms)
{
	for (int waited = 0; waited <= ms; waited += 20) {
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		int rc = connect(fd, (struct sockaddr *)&a, sizeof(a));
		close(fd);
		if (rc == 0)
			return 0;
		tt_sleep_ms(20);
	}
	return -1;
}

int gwt_stop(pid_t pid)
{
	int status = -1;

	if (pid <= 0)
		return -1;
	kill(pid, SIGTERM);
	for (int i = 0; i < 1000; i++) {
		if (waitpid(pid, &status, WNOHANG) == pid)
			return status;
		tt_sleep_ms(10);
	}
	kill(pid, SIGKILL);
	waitpid(pid, &status, 0);
	return status;
}

pid_t gwt_upstream_start(int *port)
{
	char ps[16];

	for (int attempt = 0; attempt < 5; attempt++) {
		*port = tt_free_port();
		snprintf(ps, sizeof(ps), "%d", *port);
		const char *argv[] = { (char *)TALLY_TEST_BUILDDIR "/tests/gw_upstream", ps, NULL };
		pid_t pid = gwt_spawn(NULL, argv);
		if (gwt_wait_port(*port, 5000) == 0)
			return pid;
		gwt_stop(pid);
	}
	return -1;
}

pid_t gwt_gateway_start(const char *ini, const char *segment, const char *log, int *port,
			const char *extra1, const char *extra2)
{
	char listen[32];

	for (int attempt = 0; attempt < 5; attempt++) {
		*port = tt_free_port();
		snprintf(listen, sizeof(listen), "127.0.0.1:%d", *port);
		const char *argv[12] = { (char *)TALLY_TEST_BUILDDIR "/tools/tally-gateway", (char *)"--listen",
				   listen, (char *)"-s", (char *)segment };
		int n = 5;
		if (ini) {
			argv[n++] = (char *)"-c";
			argv[n++] = (char *)ini;
		}
		if (extra1)
			argv[n++] = (char *)extra1;
		if (extra2)
			argv[n++] = (char *)extra2;
		pid_t pid = gwt_spawn(log, argv);
		if (gwt_wait_port(*port, 10000) == 0)
			return pid;
		gwt_stop(pid);
	}
	return -1;
}

int gwt_wrk(const char *dir, const char *url, uint64_t *total, uint64_t *non2xx)
{
	char log[128];

	snprintf(log, sizeof(log), "%s/wrk.out", dir);
	unlink(log);
	const char *argv[] = { TALLY_WRK, "-t1", "-c4", "-d2s", (char *)url, NULL };
	int st;
	waitpid(gwt_spawn(log, argv), &st, 0);
	char *out = gwt_read_file(log);
	const char *p = strstr(out, " requests in ");
	*non2xx = 0;
	*total = 0;
	if (p) {
		while (p > out && p[-1] >= '0' && p[-1] <= '9')
			p--;
		*total = strtoull(p, NULL, 10);
	}
	const char *q = strstr(out, "Non-2xx or 3xx responses:");
	if (q)
		*non2xx = strtoull(q + 25, NULL, 10);
	int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0 && p;
	if (!ok)
		fprintf(stderr, "wrk failed: %s\n", out);
	free(out);
	return ok ? 0 : -1;
}

/* ---- files ---- */

int gwt_tempdir(char dir[64])
{
	snprintf(dir, 64, "/tmp/tt-gw-XXXXXX");
	return mkdtemp(dir) ? 0 : -1;
}

int gwt_write(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	if (!f)
		return -1;
	fputs(text, f);
	return fclose(f);
}

char *gwt_read_file(const char *path)
{
	FILE *f = fopen(path, "r");
	char *buf = NULL;
	size_t cap = 0, len = 0, n;

	if (!f)
		return strdup("");
	do {
		char *b = realloc(buf, cap += 65536);
		if (!b)
			break;
		buf = b;
		n = fread(buf + len, 1, cap - len - 1, f);
		len += n;
	} while (n > 0);
	fclose(f);
	if (buf)
		buf[len] = '\0';
	return buf ? buf : strdup("");
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

void gwt_rmtree(const char *dir)
{
	nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* ---- HTTP ---- */

struct xfer {
	const struct gwt_req *rq;
	struct gwt_resp *out;
	uint64_t sent;
	size_t hlen;
};

static size_t on_read(char *buf, size_t size, size_t n, void *ud)
{
	struct xfer *x = ud;
	uint64_t left = (uint64_t)x->rq->body - x->sent;
	size_t k = size * n < left ? size * n : (size_t)left;

	gw_pattern_fill(buf, x->sent, k);
	x->sent += k;
	return k;
}

static size_t on_write(char *in, size_t size, size_t n, void *ud)
{
	struct xfer *x = ud;
	size_t k = size * n;

	if (x->out->len < sizeof(x->out->body) - 1) {
		size_t c = sizeof(x->out->body) - 1 - x->out->len < k ? sizeof(x->out->body) - 1 - x->out->len : k;
		memcpy(x->out->body + x->out->len, in, c);
		x->out->body[x->out->len + c] = '\0';
	}
	x->out->fnv = gw_fnv(x->out->fnv, in, k);
	x->out->len += k;
	return k;
}

static size_t on_header(char *in, size_t size, size_t n, void *ud)
{
	struct xfer *x = ud;
	size_t k = size * n;

	if (k > 5 && strncmp(in, "HTTP/", 5) == 0)
		x->hlen = 0; /* a new response (after 100 Continue) */
	if (x->hlen + k < sizeof(x->out->headers)) {
		memcpy(x->out->headers + x->hlen, in, k);
		x->hlen += k;
		x->out->headers[x->hlen] = '\0';
	}
	return k;
}

static CURL *handle(void)
{
	static CURL *h;

	if (!h) {
		curl_global_init(CURL_GLOBAL_DEFAULT);
		h = curl_easy_init();
	}
	curl_easy_reset(h);
	return h;
}

long gwt_http(int port, const char *path, const struct gwt_req *rq, struct gwt_resp *out)
{
	static const struct gwt_req plain = { .body = -1 };
	struct xfer x = { .rq = rq ? rq : &plain, .out = out };
	struct curl_slist *hl = NULL;
	char url[1024];
	CURL *h = handle();

	rq = x.rq;
	memset(out, 0, sizeof(*out));
	out->fnv = GW_FNV_INIT;
	snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", port, path);
	curl_easy_setopt(h, CURLOPT_URL, url);
	curl_easy_setopt(h, CURLOPT_PATH_AS_IS, 1L); /* "/a/../b" goes out as written */
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_TIMEOUT, (long)(rq->timeout_s ? rq->timeout_s : 60));
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_write);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, &x);
	curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(h, CURLOPT_HEADERDATA, &x);
	const char *method = rq->method ? rq->method : "GET";
	if (strcmp(method, "HEAD") == 0)
		curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
	else if (strcmp(method, "GET") != 0 || rq->body >= 0)
		curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
	for (const char *const *hd = rq->headers; hd && *hd; hd++)
		hl = curl_slist_append(hl, *hd);
	if (rq->body >= 0) {
		curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
		curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
		curl_easy_setopt(h, CURLOPT_READDATA, &x);
		if (!rq->chunked)
			curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)rq->body);
		hl = curl_slist_append(hl, rq->expect_100 ? "Expect: 100-continue" : "Expect:");
		if (rq->expect_100)
			curl_easy_setopt(h, CURLOPT_EXPECT_100_TIMEOUT_MS, 10000L);
	}
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, hl);
	CURLcode rc = curl_easy_perform(h);
	if (rc == CURLE_OK) {
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &out->status);
		curl_easy_getinfo(h, CURLINFO_NUM_CONNECTS, &out->connects);
		curl_off_t up = 0;
		curl_easy_getinfo(h, CURLINFO_SIZE_UPLOAD_T, &up);
		out->uploaded = (uint64_t)up;
	} else {
		snprintf(out->body, sizeof(out->body), "curl: %s", curl_easy_strerror(rc));
	}
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
	curl_slist_free_all(hl);
	return out->status;
}

long gwt_get(int port, const char *path, struct gwt_resp *out)
{
	static struct gwt_resp scratch;

	return gwt_http(port, path, NULL, out ? out : &scratch);
}

int gwt_header(const struct gwt_resp *r, const char *name, char *buf, size_t len)
{
	size_t nl = strlen(name);

	for (const char *l = r->headers; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
		if (strncasecmp(l, name, nl) == 0 && l[nl] == ':') {
			const char *v = l + nl + 1;
			while (*v == ' ')
				v++;
			size_t vl = strcspn(v, "\r\n");
			snprintf(buf, len, "%.*s", (int)vl, v);
			return 0;
		}
	}
	if (len)
		buf[0] = '\0';
	return -1;
}

uint64_t gwt_upstream_count(int up_port, const char *path)
{
	struct gwt_resp r;
	char p[512];

	snprintf(p, sizeof(p), "/_count%s", path);
	if (gwt_get(up_port, p, &r) != 200)
		return UINT64_MAX;
	return strtoull(r.body, NULL, 10);
}

uint64_t gwt_pattern_fnv(uint64_t n)
{
	char buf[65536];
	uint64_t h = GW_FNV_INIT;

	for (uint64_t pos = 0; pos < n;) {
		size_t k = n - pos < sizeof(buf) ? (size_t)(n - pos) : sizeof(buf);
		gw_pattern_fill(buf, pos, k);
		h = gw_fnv(h, buf, k);
		pos += k;
	}
	return h;
}

int gwt_tally_stat(const char *seg, const char *url, const char *extra, char *out, size_t len)
{
	char cmd[512];

	snprintf(cmd, sizeof(cmd), "%s/tools/tally stat -s %s --gateway %s %s 2>&1", TALLY_TEST_BUILDDIR, seg, url,
		 extra ? extra : "");
	FILE *p = popen(cmd, "r");
	size_t n = p ? fread(out, 1, len - 1, p) : 0;
	out[n] = '\0';
	int st = p ? pclose(p) : -1;
	return st != -1 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

void gwt_owner_kill(pid_t *pid)
{
	if (*pid <= 0)
		return;
	kill(*pid, SIGKILL);
	waitpid(*pid, NULL, 0);
	*pid = 0;
}

long gwt_get_until(int port, const char *path, long want, struct gwt_resp *out)
{
	long st = 0;

	for (int i = 0; i < 100 && (st = gwt_get(port, path, out)) != want; i++)
		tt_sleep_ms(50);
	return st;
}
