/* SPDX-License-Identifier: MIT */
/*
 * tally_demo.c: `tally demo`, the live demo and the README's main job.
 *
 * With nothing configured it starts a nats-server with JetStream on a
 * loopback port and a temporary store, creates a stream ORDERS and a
 * durable pull consumer "router", owns a segment with the engine and the
 * JetStream poller, and runs a simulated router (tools/sim.c: worker
 * threads that pull, spend a log-normal processing time, record each
 * message's latency through libtally, ack) and a publisher whose rate
 * follows a cycle: steady below the router's capacity, rising into
 * overload, then falling back so the router recovers. It shows it all in
 * `tally top` (a child process reading the segment like any other
 * reader) or, without a terminal, as one line a second. Ctrl-C (or q in
 * the live view) stops everything and removes what it created.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../tests/common/nats_server.h"
#include "cli.h"
#include "sim.h"

#define MS 1000000ull

/* The load cycle: seconds from its start, publish rate (msg/s). */
static const struct phase {
	unsigned at_s;
	uint32_t rate;
	const char *what;
} cycle[] = {
	{ 0, 300, "steady: well below the router's capacity" },
	{ 20, 1200, "load rising" },
	{ 30, 2800, "overload: the publisher outpaces the router" },
	{ 50, 100, "load falls: the router works off its backlog" },
	{ 80, 300, "steady again" },
};
#define CYCLE_S 95u

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
	(void)sig;
	interrupted = 1;
}

struct demo {
	const char *segment;
	unsigned duration_s;           /* 0: until interrupted */
	bool ui;
	struct tally_test_nats nats;
	struct tally_segment *seg;
	struct tally_engine *engine;
	struct tally_poller *poller;
	struct sim_router_config rcfg;
	struct sim_router *router;
	struct sim_publisher_config pcfg;
	struct sim_publisher *pub;
	pthread_t driver;
	atomic_bool stop;
	_Atomic int phase;
	char note[64];                 /* the phase for tally top --note; "" none */
};

#define THRESHOLDS_TEXT "P95 warn 100 ms / overload 500 ms, pending warn 500 / overload 3000"

/* The phase line tally top shows: written beside and renamed, so that top
 * never reads half of it. */
static void write_note(const struct demo *d, int p)
{
	char tmp[80];
	FILE *f;

	if (!d->note[0])
		return;
	snprintf(tmp, sizeof(tmp), "%s.new", d->note);
	if (!(f = fopen(tmp, "w")))
		return;
	fprintf(f, "demo: %u msg/s, %s  |  thresholds: " THRESHOLDS_TEXT "\n", cycle[p].rate,
		cycle[p].what);
	if (fclose(f) == 0)
		rename(tmp, d->note);
}

static const char *const subjects[] = { "orders.created", "orders.paid", "orders.shipped" };

static struct tally_thresholds *demo_thresholds(void)
{
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r;

	tally_threshold_rule_init(&r);
	r.p95_warn_ns = 100 * MS;
	r.p95_overload_ns = 500 * MS;
	r.pending_warn = 500;
	r.pending_overload = 3000;
	r.min_dwell_ms = 3000;
	r.stale_after_ms = 3000;
	if (t)
		tally_thresholds_add(t, NULL, &r);
	return t;
}

/* Follow the load cycle until told to stop. */
static void *driver_main(void *arg)
{
	struct demo *d = arg;
	uint64_t start = tally_now_ns();

	while (!atomic_load(&d->stop)) {
		unsigned s = (unsigned)((tally_now_ns() - start) / 1000000000u) % CYCLE_S;
		int p = 0;
		for (int i = 0; i < (int)(sizeof(cycle) / sizeof(cycle[0])); i++)
			if (s >= cycle[i].at_s)
				p = i;
		if (p != atomic_load(&d->phase) || s == 0)
			write_note(d, p);
		atomic_store(&d->phase, p);
		atomic_store(&d->pcfg.rate, cycle[p].rate);
		usleep(100000);
	}
	return NULL;
}

static int fail(struct demo *d, const char *what, const char *why)
{
	(void)d;
	fprintf(stderr, "tally demo: %s: %s\n", what, why);
	return CLI_EXIT_ERROR;
}

static int start_all(struct demo *d)
{
	char err[512];
	struct tally_segment_config scfg;
	struct tally_engine_config ecfg;
	int rc;

	if ((rc = tally_test_nats_start(&d->nats, NULL, true)) != 0)
		return fail(d, "cannot start nats-server (Debian package nats-server)", d->nats.errmsg);
	printf("nats-server with JetStream at %s (store %s)\n", d->nats.url, d->nats.store_dir);
	if (sim_setup(d->nats.url, "ORDERS", "orders.>", false, "router", "orders.>", err, sizeof(err)))
		return fail(d, "cannot create the stream", err);
	tally_segment_config_init(&scfg);
	scfg.producer_slots = 32;
	scfg.subject_capacity = 256;
	scfg.pending_capacity = 16;
	if ((rc = tally_segment_create(d->segment, &scfg, TALLY_CREATE_REPLACE_DEAD, &d->seg)))
		return fail(d, "cannot create the segment", tally_errmsg());
	tally_engine_config_init(&ecfg);
	ecfg.window_ns = 10000 * MS;
	ecfg.slice_ns = 1000 * MS;
	if ((rc = tally_engine_start(d->seg, &ecfg, &d->engine)))
		return fail(d, "cannot start the engine", tally_errmsg());
	struct tally_thresholds *t = demo_thresholds();
	tally_engine_set_thresholds(d->engine, &t);
	static const struct tally_poller_watch watch = { .stream = "ORDERS", .consumer = "router" };
	struct tally_poller_config pcfg = { .urls = d->nats.url, .poll_interval_ms = 500,
					    .watches = &watch, .nwatches = 1 };
	if ((rc = tally_poller_start(d->seg, &pcfg, &d->poller)))
		return fail(d, "cannot start the poller", tally_errmsg());
	d->rcfg = (struct sim_router_config){ .url = d->nats.url, .stream = "ORDERS", .consumer = "router",
					      .filter = "orders.>", .seg = d->seg, .workers = 4, .sigma = 0.5 };
	atomic_store(&d->rcfg.processing_ns, 2 * MS);
	if (sim_router_start(&d->rcfg, &d->router, err, sizeof(err)))
		return fail(d, "cannot start the router", err);
	d->pcfg = (struct sim_publisher_config){ .url = d->nats.url, .subjects = subjects, .nsubjects = 3 };
	atomic_store(&d->pcfg.rate, cycle[0].rate);
	if (sim_publisher_start(&d->pcfg, &d->pub, err, sizeof(err)))
		return fail(d, "cannot start the publisher", err);
	pthread_create(&d->driver, NULL, driver_main, d);
	return 0;
}

static void stop_all(struct demo *d)
{
	atomic_store(&d->stop, true);
	if (d->pub) {
		pthread_join(d->driver, NULL);
		sim_publisher_stop(&d->pub);
	}
	sim_router_stop(&d->router);
	tally_poller_stop(&d->poller);
	tally_engine_stop(&d->engine);
	tally_segment_close(&d->seg); /* removes it from /dev/shm */
	tally_test_nats_stop(&d->nats); /* and the temporary store */
}

/* Without a terminal: one line a second, read through the segment. */
static void run_plain(struct demo *d)
{
	struct tally_segment *rd;
	uint64_t start = tally_now_ns();

	if (tally_segment_open(d->segment, TALLY_OPEN_READER, 1000, &rd))
		return;
	while (!interrupted && (!d->duration_s || tally_now_ns() - start < (uint64_t)d->duration_s * 1000000000u)) {
		sleep(1);
		struct tally_subject_stats s;
		tally_subject_t id;
		char p95[32], reasons[64];
		int ph = atomic_load(&d->phase);
		printf("[%4us] %-4u msg/s  ", (unsigned)((tally_now_ns() - start) / 1000000000u), cycle[ph].rate);
		for (int i = 0; i < 3; i++) {
			if (tally_subject_lookup(rd, subjects[i], &id) || tally_read_subject(rd, id, &s))
				continue;
			printf(" %s p95=%s pending=%llu %s%s%s%s", subjects[i] + 7,
			       cli_fmt_ns(p95, sizeof(p95), s.p95_ns), (unsigned long long)s.pending,
			       tally_verdict_name(s.verdict), s.reasons ? "(" : "",
			       tally_reasons_format(s.reasons, reasons, sizeof(reasons)), s.reasons ? ")" : "");
		}
		printf("   -- %s\n", cycle[ph].what);
		fflush(stdout);
	}
	tally_segment_close(&rd);
}

/* With a terminal: `tally top` on the segment, as a child process. */
static void run_top(struct demo *d)
{
	char self[4096];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	pid_t child;

	if (n <= 0)
		return run_plain(d);
	self[n] = '\0';
	if ((child = fork()) == 0) {
		signal(SIGINT, SIG_DFL);
		if (d->note[0])
			execl(self, self, "-s", d->segment, "top", "--note", d->note, (char *)NULL);
		else
			execl(self, self, "-s", d->segment, "top", (char *)NULL);
		_exit(127);
	}
	/* top runs until q, Ctrl-C, or the end of --duration: then SIGTERM,
	 * which top takes as q (it restores the terminal) */
	uint64_t end = d->duration_s ? tally_now_ns() + (uint64_t)d->duration_s * 1000000000u : 0;
	int status;
	bool termed = false;
	for (;;) {
		pid_t w = waitpid(child, &status, end ? WNOHANG : 0);
		if (w == child || (w < 0 && errno != EINTR))
			break;
		if (end && !termed && tally_now_ns() >= end) {
			kill(child, SIGTERM);
			termed = true;
			end = 0; /* now wait for it to exit */
			continue;
		}
		if (end)
			usleep(50000);
	}
}

static void usage(FILE *to)
{
	fprintf(to, "usage: tally [-s SEGMENT] demo [--duration SECONDS] [--no-ui]\n"
		    "  Runs nats-server, a simulated router and a publisher whose load rises into\n"
		    "  overload and recovers, and shows the verdicts live (tally top).\n"
		    "  --duration S   stop after S seconds (default: until Ctrl-C; 120 without a terminal)\n"
		    "  --no-ui        print one line a second instead of the live view\n"
		    "The segment defaults to \"tally-demo\" unless -s or TALLY_SEGMENT names one.\n");
}

int tally_cmd_demo(const char *segment, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "duration", required_argument, NULL, 'd' }, { "no-ui", no_argument, NULL, 'n' },
		{ "help", no_argument, NULL, 'h' }, { NULL, 0, NULL, 0 },
	};
	struct demo d = { .segment = segment, .ui = isatty(STDOUT_FILENO) && isatty(STDIN_FILENO) };
	uint64_t v;
	int c;

	if (!d.ui)
		d.duration_s = 120;
	optind = 1;
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case 'd':
			if (cli_parse_u64(optarg, &v) || v > 86400) {
				fprintf(stderr, "tally demo: --duration wants seconds (0..86400), not \"%s\"\n", optarg);
				return CLI_EXIT_USAGE;
			}
			d.duration_s = (unsigned)v;
			break;
		case 'n': d.ui = false; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return CLI_EXIT_USAGE;
		}
	}
	struct sigaction sa = { .sa_handler = on_signal };
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	printf("tally demo: segment \"%s\"; Ctrl-C stops it and removes everything it created\n", segment);
	char notedir[] = "/tmp/tally-demo-XXXXXX";
	if (d.ui && mkdtemp(notedir))
		snprintf(d.note, sizeof(d.note), "%s/phase", notedir);
	int rc = start_all(&d);
	if (rc == 0) {
		printf("router: 4 workers, ~2 ms per message; publisher on orders.{created,paid,shipped}\n"
		       "thresholds: " THRESHOLDS_TEXT "\n");
		fflush(stdout);
		if (d.ui)
			run_top(&d);
		else
			run_plain(&d);
	}
	stop_all(&d);
	if (d.note[0]) {
		unlink(d.note);
		rmdir(notedir);
	}
	printf("tally demo: stopped; segment, nats-server and its store removed\n");
	return rc;
}
