/* SPDX-License-Identifier: MIT */
/*
 * tallyd.c: the tally daemon. It creates and owns one segment, runs the
 * aggregator engine over it, the JetStream poller (when a NATS server is
 * configured) and the Prometheus exporter (GET /metrics), all from one
 * INI file (tallyd_config.h; every key in etc/tallyd.ini).
 *
 * It runs in the foreground and logs to stderr, one line per event:
 * "2024-05-01T12:00:00.123Z tallyd[PID] LEVEL: message".
 *
 * Signals are blocked in every thread and read from a signalfd by the
 * main thread, which does all the work of a signal outside any handler:
 *   SIGTERM, SIGINT  stop the exporter, the poller and the engine, remove
 *                    the segment (kept with --keep) and exit 0;
 *   SIGHUP           read the file again and apply its thresholds and the
 *                    poller's server and targets, keeping every statistic;
 *                    a file with an error changes nothing (the errors are
 *                    logged with FILE:LINE). [segment], [engine] and [http]
 *                    need a restart: a change there is logged and ignored.
 *
 * Precedence: command-line options, then TALLY_SEGMENT (for the segment
 * name), then the file, then the defaults.
 *
 * Exit status: 0 after a clean shutdown; 1 when it cannot run (the
 * segment has a live owner, the port is taken, ...); 2 for bad usage or a
 * bad configuration file. `tallyd --check-config FILE` (or the older
 * `--check -c FILE`, `-t`) checks a file and exits 0 or 2.
 *
 * Under systemd (Type=notify, etc/tallyd.service) it tells the service
 * manager through sd_notify(3): READY=1 once the segment, the engine, the
 * poller and /metrics are up; RELOADING=1 then READY=1 around a SIGHUP;
 * STOPPING=1 on SIGTERM/SIGINT; a STATUS= line with each. Without
 * NOTIFY_SOCKET in the environment these calls do nothing.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include <tally/tally.h>

#include "exporter.h"
#include "tallyd_config.h"
#include "text.h"

#define EXIT_RUN 1
#define EXIT_USAGE 2

enum { L_ERR = 0, L_WARN = 1, L_INFO = 2, L_DEBUG = 3 };

static int verbosity = L_INFO;

/* ---- logging ---- */

/* One line per call, written with one write(2) so threads do not interleave. */
__attribute__((format(printf, 2, 3))) static void tlog(int level, const char *fmt, ...)
{
	static const char *const names[] = { "error", "warning", "info", "debug" };
	char line[2048], msg[1536];
	struct timespec ts;
	struct tm tm;
	va_list ap;
	size_t n;

	if (level > verbosity)
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
	n += (size_t)snprintf(line + n, sizeof(line) - n, ".%03ldZ tallyd[%ld] %s: ",
			      ts.tv_nsec / 1000000, (long)getpid(), names[level < 0 ? 0 : level > 3 ? 3 : level]);
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	/* what a message quotes (a config key, a server's error) never moves the terminal */
	text_escape_controls(msg, line + n, sizeof(line) - n);
	n = strlen(line);
	if (n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	if (write(STDERR_FILENO, line, n) < 0) {
		/* nowhere left to say it */
	}
}

/* Multi-line error text (config errors): one log line each. */
static void tlog_lines(int level, const char *text)
{
	const char *s = text;

	while (*s) {
		const char *nl = strchr(s, '\n');
		int len = nl ? (int)(nl - s) : (int)strlen(s);

		if (len > 0)
			tlog(level, "%.*s", len, s);
		s += len + (nl ? 1 : 0);
	}
}

static void poller_log(void *ctx, int level, const char *msg)
{
	(void)ctx;
	tlog(level, "poller: %s", msg);
}

/* ---- options ---- */

struct opts {
	struct tallyd_overrides ov;
	const char *config;
	bool keep, replace, check;
};

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: tallyd [OPTION]...\n"
		"Create and own a tally segment: aggregate what producers record, poll\n"
		"JetStream consumer pending, judge backpressure, serve Prometheus /metrics.\n"
		"\n"
		"  -c, --config FILE     INI configuration (every key: etc/tallyd.ini)\n"
		"  -s, --segment NAME    segment name (default: $TALLY_SEGMENT, the file, \"tally\")\n"
		"      --http ADDR:PORT  serve GET /metrics there (default " TALLYD_HTTP_DEFAULT_LISTEN
		")\n"
		"      --no-http         no HTTP endpoint\n"
		"      --nats URL        poll this NATS server (overrides [nats] url)\n"
		"      --keep            keep the segment in /dev/shm after exit\n"
		"      --replace         replace a segment left by a dead owner\n"
		"      --check-config FILE  check FILE (every key, URL and file it names)\n"
		"                        and exit: 0 valid, 2 not\n"
		"  -t, --check           the same for the file of -c (or the defaults)\n"
		"  -v, --verbose         log debug messages too\n"
		"  -h, --help            this help\n"
		"      --version         print the version\n"
		"\n"
		"Signals: SIGTERM/SIGINT stop cleanly; SIGHUP reloads thresholds and NATS targets.\n"
		"Exit status: 0 clean stop, 1 cannot run, 2 bad usage or configuration.\n");
}

enum { O_HTTP = 256, O_NO_HTTP, O_NATS, O_KEEP, O_REPLACE, O_VERSION, O_CHECK_CONFIG };

/* 0 to run, or an exit status + 1 (so that 0 can mean "go on"). */
static int parse_args(int argc, char **argv, struct opts *o)
{
	static const struct option longs[] = {
		{ "config", required_argument, NULL, 'c' }, { "segment", required_argument, NULL, 's' },
		{ "http", required_argument, NULL, O_HTTP }, { "no-http", no_argument, NULL, O_NO_HTTP },
		{ "nats", required_argument, NULL, O_NATS }, { "keep", no_argument, NULL, O_KEEP },
		{ "replace", no_argument, NULL, O_REPLACE }, { "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' },          { "version", no_argument, NULL, O_VERSION },
		{ "check", no_argument, NULL, 't' },
		{ "check-config", required_argument, NULL, O_CHECK_CONFIG },
		{ NULL, 0, NULL, 0 },
	};
	const char *check_file = NULL;
	int c;

	memset(o, 0, sizeof(*o));
	while ((c = getopt_long(argc, argv, "c:s:vht", longs, NULL)) != -1) {
		switch (c) {
		case 'c': o->config = optarg; break;
		case 's': o->ov.segment = optarg; break;
		case O_HTTP: o->ov.http = optarg; break;
		case O_NO_HTTP: o->ov.no_http = true; break;
		case O_NATS: o->ov.nats_url = optarg; break;
		case O_KEEP: o->keep = true; break;
		case O_REPLACE: o->replace = true; break;
		case 'v': verbosity = L_DEBUG; break;
		case 't': o->check = true; break;
		case O_CHECK_CONFIG: o->check = true; check_file = optarg; break;
		case 'h': usage(stdout); return 0 + 1;
		case O_VERSION:
			printf("tallyd %s (libtally %s)\n", PACKAGE_VERSION, tally_version());
			return 0 + 1;
		default: usage(stderr); return EXIT_USAGE + 1;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "tallyd: unexpected argument \"%s\"\n", argv[optind]);
		usage(stderr);
		return EXIT_USAGE + 1;
	}
	if (check_file && o->config && strcmp(check_file, o->config) != 0) {
		fprintf(stderr, "tallyd: --check-config %s and -c %s name two files: give one\n",
			check_file, o->config);
		return EXIT_USAGE + 1;
	}
	if (check_file)
		o->config = check_file;
	if (o->ov.http && o->ov.no_http) {
		fprintf(stderr, "tallyd: --http and --no-http contradict each other\n");
		return EXIT_USAGE + 1;
	}
	if (!o->ov.segment && getenv("TALLY_SEGMENT") && *getenv("TALLY_SEGMENT"))
		o->ov.segment = getenv("TALLY_SEGMENT");
	return 0;
}

/* ---- the daemon ---- */

struct daemon {
	struct opts o;
	struct tallyd_config boot;  /* as started: [segment], [engine], [http] */
	struct tallyd_config live;  /* last good file: thresholds and [nats] */
	struct tally_segment *seg;
	struct tally_engine *engine;
	struct tally_poller *poller;
	struct tally_share *share;
	struct tallyd_exporter *http;
	struct tallyd_exporter_source src;
	int sigfd;
};

/* With --replace: say what is about to be replaced, if anything. */
static void log_replaced(const char *name)
{
	struct tally_segment *old = NULL;
	struct tally_segment_info in;
	int rc = tally_segment_open(name, TALLY_OPEN_READER, 0, &old);

	if (rc == -ENOENT)
		return;
	if (rc) {
		tlog(L_WARN, "--replace: segment \"%s\" exists but cannot be read (%s): replacing it", name,
		     *tally_errmsg() ? tally_errmsg() : tally_strerror(rc));
		return;
	}
	if (tally_segment_info(old, &in) == 0 && !in.owner_alive) {
		time_t created = (time_t)(in.created_ns / 1000000000u);
		struct tm tm;
		char when[32] = "?";
		if (gmtime_r(&created, &tm))
			strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
		tlog(L_WARN, "--replace: replacing segment \"%s\" of owner pid %d (%s), created %s, "
		     "layout %u.%u, %u subjects: its data is discarded", name, (int)in.owner_pid,
		     in.owner_stopped ? "stopped cleanly, kept with --keep" : "died without closing it",
		     when, in.abi_major, in.abi_minor, in.subjects_used);
	}
	tally_segment_close(&old);
}

static int start_segment(struct daemon *d)
{
	unsigned flags = d->o.replace ? TALLY_CREATE_REPLACE_DEAD : 0;

	if (d->o.replace)
		log_replaced(d->boot.segment_name);
	int rc = tally_segment_create(d->boot.segment_name, &d->boot.seg, flags, &d->seg);

	if (rc == 0)
		return 0;
	if (*tally_errmsg())
		tlog(L_ERR, "%s", tally_errmsg());
	else
		tlog(L_ERR, "cannot create segment \"%s\": %s", d->boot.segment_name,
		     tally_strerror(rc));
	return -1;
}

static int start_engine(struct daemon *d)
{
	char why[1024];
	struct tally_thresholds *t = tallyd_config_thresholds(&d->live, why, sizeof(why));
	int rc;

	if (!t) {
		tlog_lines(L_ERR, why);
		return -1;
	}
	if ((rc = tally_engine_start(d->seg, &d->boot.engine, &d->engine)) != 0) {
		tlog(L_ERR, "cannot start the engine: %s", *tally_errmsg() ? tally_errmsg()
									 : tally_strerror(rc));
		tally_thresholds_free(&t);
		return -1;
	}
	tally_engine_set_thresholds(d->engine, &t);
	return 0;
}

static int start_poller(struct daemon *d, const struct tallyd_config *c)
{
	struct tally_poller_config pc = c->nats;
	int rc;

	pc.log = poller_log;
	if ((rc = tally_poller_start(d->seg, &pc, &d->poller)) != 0) {
		tlog(L_ERR, "cannot start the poller: %s", *tally_errmsg() ? tally_errmsg()
									   : tally_strerror(rc));
		return -1;
	}
	tlog(L_INFO, "polling %s: %zu watch%s", c->nats.urls, c->nwatches,
	     c->nwatches == 1 ? "" : "es");
	atomic_store(&d->src.poller_on, true);
	return 0;
}

static void share_log(void *ctx, int level, const char *msg)
{
	(void)ctx;
	tlog(level, "share: %s", msg);
}

/* [share]: the KV thread. A NATS server or bucket that fails is not an error here (it retries). */
static int start_share(struct daemon *d)
{
	struct tally_share_config sc = d->boot.share;
	int rc;

	if (!d->boot.share_enabled)
		return 0;
	sc.log = share_log;
	if ((rc = tally_share_start(d->seg, &sc, &d->share)) != 0) {
		tlog(L_ERR, "cannot start sharing: %s", *tally_errmsg() ? tally_errmsg() : tally_strerror(rc));
		return -1;
	}
	tlog(L_INFO, "sharing verdicts as host %s through %s, bucket %s", sc.host, sc.urls,
	     sc.bucket ? sc.bucket : TALLY_SHARE_BUCKET_DEFAULT);
	return 0;
}

static int start_http(struct daemon *d)
{
	char why[512];
	int rc;

	if (!d->boot.http_enabled)
		return 0;
	d->src.seg = d->seg;
	d->src.engine = d->engine;
	rc = tallyd_exporter_start(&d->boot.http, &d->src, tlog, &d->http, why, sizeof(why));
	if (rc != 0) {
		tlog(L_ERR, "http: %s", why);
		return -1;
	}
	return 0;
}

static void stop_all(struct daemon *d)
{
	tallyd_exporter_stop(&d->http);
	atomic_store(&d->src.poller_on, false);
	tally_poller_stop(&d->poller);
	tally_share_stop(&d->share);
	tally_engine_stop(&d->engine);
	if (d->seg) {
		tally_segment_keep(d->seg, d->o.keep);
		tally_segment_close(&d->seg);
	}
}

static void log_ready(struct daemon *d)
{
	char http[160] = "no http";
	struct tally_segment_info info;

	if (d->http) {
		const char *colon = strrchr(d->boot.http_listen, ':');

		snprintf(http, sizeof(http), "%s://%.*s:%u/metrics",
			 d->boot.http.tls_cert_file ? "https" : "http",
			 (int)(colon - d->boot.http_listen), d->boot.http_listen,
			 (unsigned)tallyd_exporter_port(d->http));
	}
	memset(&info, 0, sizeof(info));
	tally_segment_info(d->seg, &info);
	tlog(L_INFO, "ready: segment \"%s\" (%" PRIu64 " bytes, generation %" PRIu64 ", %u producer slots), "
	     "%u drain thread%s, %s, %s%s",
	     d->boot.segment_name, info.total_size, info.generation, info.config.producer_slots,
	     d->boot.engine.drain_threads ? d->boot.engine.drain_threads : 1,
	     d->boot.engine.drain_threads > 1 ? "s" : "", http,
	     d->poller ? "polling " : "no poller",
	     d->poller ? d->live.nats.urls : "");
	sd_notifyf(0, "READY=1\nSTATUS=running: segment %s, %s, %s%s", d->boot.segment_name, http,
		   d->poller ? "polling " : "no poller", d->poller ? d->live.nats.urls : "");
}

/* Which restart-only settings a reloaded file changes (logged, not applied). */
static void warn_restart_only(const struct tallyd_config *a, const struct tallyd_config *b)
{
	const struct tally_segment_config *x = &a->seg, *y = &b->seg;
	bool seg = strcmp(a->segment_name, b->segment_name) || x->producer_slots != y->producer_slots ||
		   x->ring_capacity != y->ring_capacity || x->subject_capacity != y->subject_capacity ||
		   x->pending_capacity != y->pending_capacity || x->max_value_ns != y->max_value_ns ||
		   x->producer_cooloff_ms != y->producer_cooloff_ms ||
		   x->group_readable != y->group_readable || x->group_writable != y->group_writable ||
		   strcmp(a->group ? a->group : "", b->group ? b->group : "");
	/* the engine's copy of [nats] include_ack_pending is that key's (warned
	 * about as [nats]), not a change to [engine] */
	struct tally_engine_config ea, eb;
	memcpy(&ea, &a->engine, sizeof(ea)); /* padding and all, for the memcmp */
	memcpy(&eb, &b->engine, sizeof(eb));
	eb.pending_include_ack = ea.pending_include_ack;
	bool eng = memcmp(&ea, &eb, sizeof(ea)) != 0;
	bool http = tallyd_config_http_differs(a, b);

	if (seg || eng || http)
		tlog(L_WARN, "reload: changes to%s%s%s take effect only after a restart; ignored",
		     seg ? " [segment]" : "", eng ? " [engine]" : "", http ? " [http]" : "");
}

/* Swap in the new poller settings; 0 or -1 with the old ones still running. */
static int reload_poller(struct daemon *d, struct tallyd_config *nc)
{
	struct tally_poller_config pc = nc->nats;
	int rc;

	pc.log = poller_log;
	pc.exclude_ack_pending = !d->boot.include_ack_pending; /* fixed in the engine */
	if (!nc->nats.urls) {
		if (d->poller) {
			atomic_store(&d->src.poller_on, false);
			tally_poller_stop(&d->poller);
			tlog(L_INFO, "reload: no NATS server configured any more; poller stopped");
		}
		return 0;
	}
	if (!d->poller)
		return start_poller(d, nc);
	if ((rc = tally_poller_reconfigure(d->poller, &pc)) != 0) {
		tlog(L_ERR, "reload: poller: %s", *tally_errmsg() ? tally_errmsg() : tally_strerror(rc));
		return -1;
	}
	return 0;
}

static void reload(struct daemon *d)
{
	struct tallyd_config nc;
	struct tally_thresholds *t;
	char err[4096];

	if (!d->live.path) {
		tlog(L_WARN, "SIGHUP: no configuration file (-c) to reload");
		return;
	}
	tlog(L_INFO, "SIGHUP: reloading %s", d->live.path);
	if (tallyd_config_load(d->live.path, &d->o.ov, &nc, err, sizeof(err)) != 0) {
		tlog_lines(L_ERR, err);
		tlog(L_ERR, "reload failed: the running configuration is unchanged");
		return;
	}
	if (!(t = tallyd_config_thresholds(&nc, err, sizeof(err)))) {
		tlog_lines(L_ERR, err);
		tlog(L_ERR, "reload failed: the running configuration is unchanged");
		tallyd_config_free(&nc);
		return;
	}
	if (nc.include_ack_pending != d->boot.include_ack_pending)
		tlog(L_WARN, "reload: [nats] include_ack_pending takes effect only after a restart");
	warn_restart_only(&d->boot, &nc);
	if (reload_poller(d, &nc) != 0) {
		tlog(L_ERR, "reload failed: the running configuration is unchanged");
		tally_thresholds_free(&t);
		tallyd_config_free(&nc);
		return;
	}
	tally_engine_set_thresholds(d->engine, &t);
	tlog(L_INFO, "reloaded %s: %zu threshold rule%s, %zu watch%s", nc.path, nc.nrules,
	     nc.nrules == 1 ? "" : "s", nc.nwatches, nc.nwatches == 1 ? "" : "es");
	tallyd_config_free(&d->live);
	d->live = nc;
}

/* Block the signals we handle in every thread (the threads started later
 * inherit the mask) and read them from a signalfd. */
static int signals_setup(void)
{
	sigset_t set;

	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0)
		return -1;
	return signalfd(-1, &set, SFD_CLOEXEC);
}

static void run(struct daemon *d)
{
	struct signalfd_siginfo si;

	for (;;) {
		ssize_t n = read(d->sigfd, &si, sizeof(si));

		if (n < 0 && errno == EINTR)
			continue;
		if (n != (ssize_t)sizeof(si)) {
			tlog(L_ERR, "reading signals: %s; stopping", strerror(errno));
			return;
		}
		if (si.ssi_signo == SIGHUP) {
			const char *before = d->live.path; /* a new path once a reload applies */
			struct timespec ts;

			clock_gettime(CLOCK_MONOTONIC, &ts);
			sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%" PRIu64 "\nSTATUS=reloading %s",
				   (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u,
				   before ? before : "(no file)");
			reload(d);
			sd_notifyf(0, "READY=1\nSTATUS=running: %s", d->live.path != before ?
				   "reloaded" : "the last reload failed, the configuration before it runs");
			continue;
		}
		tlog(L_INFO, "%s from pid %u: stopping", si.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM",
		     si.ssi_pid);
		sd_notifyf(0, "STOPPING=1\nSTATUS=stopping (%s)",
			   si.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM");
		return;
	}
}

static int load(struct daemon *d)
{
	char err[8192];

	if (tallyd_config_load(d->o.config, &d->o.ov, &d->boot, err, sizeof(err)) != 0) {
		tlog_lines(L_ERR, err);
		return -1;
	}
	/* a second copy: live changes on reload, boot keeps what needs a restart */
	if (tallyd_config_load(d->o.config, &d->o.ov, &d->live, err, sizeof(err)) != 0) {
		tlog_lines(L_ERR, err);
		tallyd_config_free(&d->boot);
		return -1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	static struct daemon d;

	text_guard_stderr(); /* log lines never carry a control byte raw */
	int rc = parse_args(argc, argv, &d.o);

	if (rc)
		return rc - 1;
	if (load(&d) != 0)
		return EXIT_USAGE;
	if (d.o.check) {
		printf("tallyd: configuration %s is valid\n", d.o.config ? d.o.config : "(defaults)");
		tallyd_config_free(&d.boot);
		tallyd_config_free(&d.live);
		return 0;
	}
	if ((d.sigfd = signals_setup()) < 0) {
		tlog(L_ERR, "cannot set up signal handling: %s", strerror(errno));
		return EXIT_RUN;
	}
	rc = EXIT_RUN;
	if (start_segment(&d) == 0 && start_engine(&d) == 0 &&
	    (!d.live.nats.urls || start_poller(&d, &d.live) == 0) && start_share(&d) == 0 &&
	    start_http(&d) == 0) {
		log_ready(&d);
		run(&d);
		rc = 0;
	}
	stop_all(&d);
	if (rc == 0)
		tlog(L_INFO, "stopped; segment \"%s\" %s", d.boot.segment_name,
		     d.o.keep ? "kept in /dev/shm" : "removed");
	tallyd_config_free(&d.boot);
	tallyd_config_free(&d.live);
	close(d.sigfd);
	return rc;
}
