/* SPDX-License-Identifier: MIT */
/*
 * test_gateway.c: examples/gateway.c against a real owner process: 503 +
 * Retry-After for an overloaded subject, 200 for a healthy one, 400 for a
 * bad subject, and when the owner is killed, 200 with the fail-open
 * header (and the log says so) instead of rejecting or going silent.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/helpers.h"
#include "common/http.h"

#define MS 1000000ull

/* The owner: segment, engine, thresholds, data; then waits to be killed. */
static void owner_main(const char *name, int ready_fd)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	struct tally_engine_config ec;
	struct tally_engine *e;
	struct tally_producer *p;
	struct tally_threshold_rule r;
	tally_subject_t slow, fast;
	struct tally_subject_stats s;

	tt_config(&cfg);
	tally_engine_config_init(&ec);
	ec.publish_interval_ms = 10;
	if (tally_segment_create(name, &cfg, 0, &seg) || tally_engine_start(seg, &ec, &e))
		_exit(1);
	struct tally_thresholds *t = tally_thresholds_new();
	tally_threshold_rule_init(&r);
	r.p95_warn_ns = 1 * MS;
	r.p95_overload_ns = 5 * MS;
	r.min_samples = 10;
	r.retry_after_ms = 2500;
	tally_thresholds_add(t, NULL, &r);
	tally_engine_set_thresholds(e, &t);
	tally_subject_intern(seg, "gw.slow", &slow);
	tally_subject_intern(seg, "gw.fast", &fast);
	tally_producer_attach(seg, &p);
	for (int i = 0; i < 50; i++) {
		tally_record(p, slow, 20 * MS);
		tally_record(p, fast, 100000);
	}
	for (int i = 0; i < 500; i++) {
		if (tally_engine_read(e, slow, &s) == 0 && s.verdict == TALLY_VERDICT_OVERLOAD)
			break;
		tt_sleep_ms(10);
	}
	char c = 1;
	if (write(ready_fd, &c, 1) != 1)
		_exit(2);
	for (;;)
		pause();
}

static pid_t start_gateway(const char *seg, int port, const char *log)
{
	char listen[64];
	pid_t pid;

	snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
	if ((pid = fork()) == 0) {
		FILE *f = freopen(log, "w", stderr);
		(void)f;
		execl(TALLY_TEST_BUILDDIR "/examples/tally-gateway", "tally-gateway", "-s", seg, "--listen",
		      listen, (char *)NULL);
		_exit(127);
	}
	return pid;
}

static int get(int port, const char *path, char **reply)
{
	int status = 0;

	for (int i = 0; i < 100 && status == 0; i++) { /* until it listens */
		if (i)
			free(*reply), tt_sleep_ms(50);
		status = tt_http(port, "POST", path, reply);
	}
	return status;
}

Test(gateway, sheds_load_from_verdicts_and_fails_open, .timeout = 60)
{
	char name[TALLY_NAME_MAX + 1], log[256], hdr[128] = "", *reply;
	int ready[2], port = tt_free_port();

	strcpy(name, tt_segname("gw"));
	snprintf(log, sizeof(log), "/tmp/%s.log", name);
	cr_assert_eq(pipe(ready), 0);
	pid_t owner = fork();
	if (owner == 0)
		owner_main(name, ready[1]);
	char c;
	cr_assert_eq(read(ready[0], &c, 1), 1, "the owner published an overload verdict");
	pid_t gw = start_gateway(name, port, log);

	cr_expect_eq(get(port, "/gw.slow", &reply), 503, "%s", reply);
	cr_expect_eq(tt_http_header(reply, "Retry-After", hdr, sizeof(hdr)), 0);
	cr_expect_str_eq(hdr, "3", "2500 ms rounds up to 3 s");
	cr_expect_eq(tt_http_header(reply, "X-Tally-Verdict", hdr, sizeof(hdr)), 0);
	cr_expect_str_eq(hdr, "overload");
	free(reply);

	cr_expect_eq(get(port, "/gw.fast", &reply), 200, "%s", reply);
	cr_expect_eq(tt_http_header(reply, "X-Tally-Verdict", hdr, sizeof(hdr)), 0);
	cr_expect_str_eq(hdr, "ok");
	cr_expect_neq(tt_http_header(reply, "X-Tally-Fail-Open", hdr, sizeof(hdr)), 0, "not failing open");
	free(reply);

	cr_expect_eq(get(port, "/gw..bad", &reply), 400, "%s", reply);
	free(reply);

	kill(owner, SIGKILL);
	waitpid(owner, NULL, 0);
	cr_expect_eq(get(port, "/gw.slow", &reply), 200, "owner dead: accept (fail-open): %s", reply);
	cr_expect_eq(tt_http_header(reply, "X-Tally-Fail-Open", hdr, sizeof(hdr)), 0, "and says so");
	cr_expect(strstr(hdr, "not alive"), "%s", hdr);
	free(reply);
	cr_expect_eq(get(port, "/gw.fast", &reply), 200, "keeps answering");
	free(reply);

	kill(gw, SIGTERM);
	int status;
	waitpid(gw, &status, 0);
	cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	char text[4096] = "";
	FILE *f = fopen(log, "r");
	if (f) {
		size_t n = fread(text, 1, sizeof(text) - 1, f);
		text[n] = '\0';
		fclose(f);
	}
	cr_expect(strstr(text, "failing open"), "the gateway logged that it fails open: %s", text);
	cr_expect(strstr(text, "1 rejected (503)"), "%s", text);
	unlink(log);
	tally_segment_unlink(name);
}
