/* SPDX-License-Identifier: MIT */
/*
 * gateway.h: what the gateway's tests share: an owner process with one
 * subject at each level, the programs they start (tally-gateway, the
 * upstream gw_upstream, nginx) on 127.0.0.1 and random ports, stopped by
 * pid, and an HTTP client over libcurl that sends and checks bodies of
 * any size without holding them (tests/gw_pattern.h).
 */
#ifndef TALLY_TEST_GATEWAY_H
#define TALLY_TEST_GATEWAY_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

/* Subjects the owner keeps at each level (p95 thresholds 1 ms / 5 ms). */
#define GWT_OK "gw.ok"
#define GWT_WARN "gw.warn"
#define GWT_OVER "gw.over"

/*
 * Fork the owner of segment name (call before the test starts threads):
 * it creates the segment (mode 0600 unless group_readable), runs the
 * engine and keeps recording, and returns once GWT_WARN reads warn and
 * GWT_OVER overload. The pid, or -1 after a line on stderr.
 */
pid_t gwt_owner_start(const char *name, bool group_readable);
/* SIGKILL the owner *pid and reap it; *pid is then 0 (a pid <= 0 is left
 * alone: never kill(0) or kill(-1)). */
void gwt_owner_kill(pid_t *pid);

/* fork + exec argv with stdout and stderr to log (NULL: inherited). */
pid_t gwt_spawn(const char *log, const char *const argv[]);
/* SIGKILL to the process group of a gwt_spawn child (it leads its own):
 * what it forked goes too. */
void gwt_kill_group(pid_t pid);

/* nginx -p dir -c conf_path (the Debian package's, daemon off), its
 * configuration written by conf(ctx, port) for each free port tried, up
 * to 5; stdout and stderr to dir/nginx.out. The master's pid once the
 * port accepts, or -1 after nginx's output on stderr. The environment is
 * the caller's (setenv before, for LD_LIBRARY_PATH or LD_PRELOAD). */
pid_t gwt_nginx_start(const char *dir, const char *conf_path, int *port, void (*conf)(void *ctx, int port),
		      void *ctx);
/* gwt_stop for that nginx. */
int gwt_nginx_stop(pid_t pid);
/* For a suite's .fini (Criterion runs it after a failed assertion too):
 * kills the nginx still running and its workers, which outlive a master
 * killed by PR_SET_PDEATHSIG and would hold the test's output open. */
void gwt_nginx_fini(void);
/* Until 127.0.0.1:port accepts, at most ms: 0 or -1. */
int gwt_wait_port(int port, int ms);
/* SIGTERM, then SIGKILL after 10 s; the exit status as waitpid gives it. */
int gwt_stop(pid_t pid);

/* The upstream on a free port (*port), ready. */
pid_t gwt_upstream_start(int *port);
/* tally-gateway -c ini --listen 127.0.0.1:*port -s segment [extra...],
 * stderr to log, ready. */
pid_t gwt_gateway_start(const char *ini, const char *segment, const char *log, int *port,
			const char *extra1, const char *extra2);

/* wrk -t1 -c4 for 2 s on url (log in dir/wrk.out): the requests done and
 * the non-2xx answers; 0, or -1 (said on stderr). */
int gwt_wrk(const char *dir, const char *url, uint64_t *total, uint64_t *non2xx);

/* A temp directory /tmp/tt-gw-XXXXXX and a file in it with text. */
int gwt_tempdir(char dir[64]);
int gwt_write(const char *path, const char *text);
char *gwt_read_file(const char *path); /* malloc'd, "" when absent */
void gwt_rmtree(const char *dir);

struct gwt_req {
	const char *method;        /* default GET */
	const char *const *headers; /* NULL-terminated "Name: value" */
	int64_t body;              /* bytes of the pattern to send; -1: no body */
	bool chunked;              /* send it chunked (no Content-Length) */
	bool expect_100;           /* ask for 100-continue */
	unsigned timeout_s;        /* default 60 */
};

struct gwt_resp {
	long status;               /* 0: no answer */
	char headers[16384];
	char body[16384];          /* its start (the metrics text fits) */
	uint64_t len, fnv;         /* all of it */
	long connects;             /* new connections curl opened for this request */
	uint64_t uploaded;         /* bytes of the request body curl sent */
};

/* One request to 127.0.0.1:port through a curl handle kept per test
 * process (so that keep-alive is used). Returns the status. */
long gwt_http(int port, const char *path, const struct gwt_req *rq, struct gwt_resp *out);
/* GET with no headers: the status; the body's start in out when not NULL. */
long gwt_get(int port, const char *path, struct gwt_resp *out);
/* GET path every 50 ms until it answers want, 5 s at most: the last status. */
long gwt_get_until(int port, const char *path, long want, struct gwt_resp *out);
/* A response header's value into buf: 0, or -1 when absent. */
int gwt_header(const struct gwt_resp *r, const char *name, char *buf, size_t len);
/* The upstream's count for path ("" for all). */
uint64_t gwt_upstream_count(int up_port, const char *path);
/* FNV-1a of n bytes of the pattern from 0. */
uint64_t gwt_pattern_fnv(uint64_t n);

/* `tally stat -s seg --gateway url [extra]` of the build tree, its
 * output (stdout and stderr) into out: its exit status, -1 if it did not
 * run. */
int gwt_tally_stat(const char *seg, const char *url, const char *extra, char *out, size_t len);

#endif
