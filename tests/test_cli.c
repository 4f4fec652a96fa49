/* SPDX-License-Identifier: MIT */
/*
 * test_cli.c: the tally command line, run as a separate process against a
 * segment this test owns. The test creates the segment, starts the engine
 * (and a poller watching a consumer on a server that is not there), sets
 * thresholds so that one subject is ok, one warn, one overload and one
 * without enough samples, records through a producer, waits until the
 * engine has published it, then runs the built tools/tally and checks its
 * stdout, stderr and exit status: stat, stat --json against the schema of
 * docs/json-schema.md, status and its exit codes, a dead owner, no
 * segment, no permission, a version mismatch, bad arguments, record from
 * stdin, dump, live consumer pending from a real nats-server, and tally
 * top in a real terminal (tmux, 80x24): sorting,
 * filter, colours, quitting, and re-attaching across an owner restart;
 * and other hosts' rows in top, shared between two segments through a
 * real nats-server's KV bucket by the library's share threads.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <grp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>
#include <nats/nats.h>

#include "common/helpers.h"
#include "shm_layout.h"
#include "common/nats_server.h"

#define TALLY_BIN TALLY_TEST_BUILDDIR "/tools/tally"
#define MS 1000000ull

/* ---- running the CLI ------------------------------------------------------------- */

struct run {
	int status;      /* exit status, or 128 + signal */
	char out[65536];
	char err[16384];
};

struct run_opts {
	const char *input;    /* stdin, or NULL for /dev/null */
	const char *env_segment;
	uid_t uid;            /* 0: do not change */
};

static void slurp(int fd, char *buf, size_t len)
{
	ssize_t n = pread(fd, buf, len - 1, 0);

	buf[n > 0 ? n : 0] = '\0';
	close(fd);
}

static int memfd_with(const char *name, const char *content)
{
	int fd = memfd_create(name, 0);

	cr_assert(fd >= 0, "memfd_create: %s", strerror(errno));
	if (content) {
		size_t len = strlen(content);
		cr_assert_eq(write(fd, content, len), (ssize_t)len);
		lseek(fd, 0, SEEK_SET);
	}
	return fd;
}

/* Run tally with argv (NULL-terminated after argv[0] = "tally"). */
static void run_tally(struct run *r, const struct run_opts *o, const char *const *args)
{
	static const struct run_opts none = { 0 };
	const char *argv[32] = { TALLY_BIN };
	int in, out = memfd_with("out", NULL), err = memfd_with("err", NULL), n = 1;
	struct tt_foreign_prog fp = { 0 };

	o = o ? o : &none;
	/* Another user may not be able to enter the build tree (a clone
	 * under /root): run a copy of the real binary it can reach. */
	if (o->uid)
		cr_assert_eq(tt_foreign_prog_make(&fp, "tally"), 0, "a copy of tally for uid %d",
			     (int)o->uid);
	in = o->input ? memfd_with("in", o->input) : open("/dev/null", O_RDONLY);
	for (; args[n - 1] && n < 31; n++)
		argv[n] = args[n - 1];
	argv[n] = NULL;
	fflush(NULL);
	pid_t pid = fork();
	cr_assert(pid >= 0);
	if (pid == 0) {
		dup2(in, 0);
		dup2(out, 1);
		dup2(err, 2);
		if (o->env_segment)
			setenv("TALLY_SEGMENT", o->env_segment, 1);
		else
			unsetenv("TALLY_SEGMENT");
		setenv("LC_ALL", "C.UTF-8", 1);
		if (o->uid) {
			setenv("LD_LIBRARY_PATH", fp.libdir, 1);
			argv[0] = fp.path;
			if (setgroups(0, NULL) || setgid(o->uid) || setuid(o->uid))
				_exit(99);
		}
		execv(argv[0], (char *const *)argv);
		_exit(98);
	}
	int st;
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	tt_foreign_prog_remove(&fp);
	r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
	close(in);
	slurp(out, r->out, sizeof(r->out));
	slurp(err, r->err, sizeof(r->err));
}

#define TALLY(r, o, ...) run_tally((r), (o), (const char *const[]){ __VA_ARGS__, NULL })

/* ---- an owner with data ------------------------------------------------------------ */

struct owner {
	char name[128];
	struct tally_segment *seg;
	struct tally_engine *e;
	struct tally_poller *poller;
	struct tally_producer *p;
};

static void record_n(struct owner *w, const char *subject, uint64_t ns, int n)
{
	tally_subject_t id;

	cr_assert_eq(tally_subject_intern(w->seg, subject, &id), 0, "%s", tally_errmsg());
	for (int i = 0; i < n; i++)
		cr_assert(tally_record(w->p, id, ns + (uint64_t)(i % 5) * 1000));
}

static enum tally_verdict verdict_of(struct owner *w, const char *subject, uint64_t *count)
{
	struct tally_subject_stats st;
	tally_subject_t id;

	if (tally_subject_lookup(w->seg, subject, &id) || tally_engine_read(w->e, id, &st))
		return (enum tally_verdict)-1;
	*count = st.count;
	return st.verdict;
}

/* Wait until the engine has published what was recorded. */
static void wait_published(struct owner *w)
{
	for (int i = 0; i < 300; i++) {
		uint64_t c1 = 0, c2 = 0, c3 = 0;
		if (verdict_of(w, "orders.created", &c1) == TALLY_VERDICT_OVERLOAD && c1 == 50 &&
		    verdict_of(w, "orders.paid", &c2) == TALLY_VERDICT_OK && c2 == 50 &&
		    verdict_of(w, "billing.sent", &c3) == TALLY_VERDICT_WARN && c3 == 50)
			return;
		tt_sleep_ms(10);
	}
	cr_assert_fail("the engine did not publish the expected verdicts within 3 s");
}

static void set_thresholds(struct owner *w)
{
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r;

	tally_threshold_rule_init(&r);
	r.p95_warn_ns = 1 * MS;
	r.p95_overload_ns = 5 * MS;
	r.min_samples = 5;
	cr_assert_eq(tally_thresholds_add(t, NULL, &r), 0);
	cr_assert_eq(tally_engine_set_thresholds(w->e, &t), 0);
}

static void silent_log(void *ctx, int level, const char *msg)
{
	(void)ctx, (void)level, (void)msg;
}

static void start_poller(struct owner *w)
{
	static const struct tally_poller_watch watch = { .stream = "ORDERS", .consumer = "proc" };
	struct tally_poller_config pc = {
		.urls = "nats://127.0.0.1:1", .request_timeout_ms = 200, .poll_interval_ms = 100,
		.watches = &watch, .nwatches = 1,
		.log = silent_log,
	};

	cr_assert_eq(tally_poller_start(w->seg, &pc, &w->poller), 0, "%s", tally_errmsg());
}

/* Create a segment named name (or a fresh one), of tt_config's sizes or
 * with's, start the engine; with data: record the standard subjects and
 * wait for the verdicts. */
static void owner_start_cfg(struct owner *w, const char *name, bool data, bool poller,
			    const struct tally_segment_config *with)
{
	struct tally_segment_config cfg;
	struct tally_engine_config ec;

	memset(w, 0, sizeof(*w));
	snprintf(w->name, sizeof(w->name), "%s", name ? name : tt_segname("cli"));
	tt_config(&cfg);
	if (with)
		cfg = *with;
	cr_assert_eq(tally_segment_create(w->name, &cfg, TALLY_CREATE_REPLACE_DEAD, &w->seg), 0, "%s",
		     tally_errmsg());
	tally_engine_config_init(&ec);
	ec.publish_interval_ms = 20;
	ec.slice_ns = 500 * MS;
	ec.window_ns = 10000 * MS;
	cr_assert_eq(tally_engine_start(w->seg, &ec, &w->e), 0, "%s", tally_errmsg());
	set_thresholds(w);
	if (poller)
		start_poller(w);
	cr_assert_eq(tally_producer_attach(w->seg, &w->p), 0);
	if (!data)
		return;
	record_n(w, "orders.created", 20 * MS, 50);   /* p95 20 ms: overload */
	record_n(w, "orders.paid", 200000, 50);       /* 200 us: ok */
	record_n(w, "billing.sent", 2 * MS, 50);      /* 2 ms: warn */
	record_n(w, "few.samples", 100000, 2);        /* < min_samples: unknown */
	tally_subject_t idle;
	cr_assert_eq(tally_subject_intern(w->seg, "idle.subject", &idle), 0); /* never recorded */
	wait_published(w);
}

/* The same with remote_cap entries of other hosts (0: none). */
static void owner_start_remote(struct owner *w, const char *name, bool data, bool poller, uint32_t remote_cap)
{
	struct tally_segment_config cfg;

	tt_config(&cfg);
	cfg.remote_capacity = remote_cap;
	owner_start_cfg(w, name, data, poller, &cfg);
}

static void owner_start(struct owner *w, const char *name, bool data, bool poller)
{
	owner_start_cfg(w, name, data, poller, NULL);
}

static void owner_stop(struct owner *w)
{
	tally_producer_detach(&w->p);
	if (w->poller)
		tally_poller_stop(&w->poller);
	tally_engine_stop(&w->e);
	tally_segment_close(&w->seg);
}

/* ---- stat ------------------------------------------------------------------------ */

Test(cli, stat_shows_subjects_producers_consumers_and_poller, .timeout = 20)
{
	struct owner w;
	struct run r;

	owner_start(&w, NULL, true, true);
	TALLY(&r, NULL, "-s", w.name, "stat");
	cr_expect_eq(r.status, 0, "stderr: %s", r.err);
	char head[256];
	snprintf(head, sizeof(head), "segment \"%s\"  owner pid %d alive", w.name, (int)getpid());
	cr_expect(strstr(r.out, head), "header missing in:\n%s", r.out);
	cr_expect_null(strstr(r.out, "STALE"), "%s", r.out);
	const char *line = strstr(r.out, "orders.created");
	cr_assert(line, "%s", r.out);
	cr_expect(strstr(line, "overload (latency)") && strstr(line, "20.00ms") &&
		  strstr(line, "50"), "row: %.120s", line);
	line = strstr(r.out, "orders.paid");
	cr_expect(line && strstr(line, " ok") && strstr(line, "µs"), "%s", r.out);
	line = strstr(r.out, "billing.sent");
	cr_expect(line && strstr(line, "warn (latency)"), "%s", r.out);
	line = strstr(r.out, "idle.subject");
	unsigned long count = 99;
	cr_assert(line && sscanf(line, "%*s %lu", &count) == 1, "%s", r.out);
	cr_expect(count == 0 && strstr(line, "unknown (no_data"), "%s", r.out);
	cr_expect(strstr(r.out, "PRODUCERS (1 of 16 slots in use)"), "%s", r.out);
	char pid[32];
	snprintf(pid, sizeof(pid), " %d ", (int)getpid());
	cr_expect(strstr(strstr(r.out, "PRODUCERS"), pid), "%s", r.out);
	cr_expect(strstr(r.out, "ORDERS/proc") && strstr(r.out, "never"), "%s", r.out);
	cr_expect(strstr(r.out, "POLLER") && strstr(r.out, "breaker"), "%s", r.out);

	/* The same through $TALLY_SEGMENT, and the default name "tally" without it. */
	struct run_opts o = { .env_segment = w.name };
	TALLY(&r, &o, "stat");
	cr_expect_eq(r.status, 0, "%s", r.err);
	cr_expect(strstr(r.out, "orders.created"));
	owner_stop(&w);
}

static json_t *get(json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);

	cr_assert(v, "key \"%s\" missing", key);
	return v;
}

static json_t *subject_named(json_t *doc, const char *name)
{
	size_t i;
	json_t *s;

	json_array_foreach(get(doc, "subjects"), i, s)
		if (strcmp(json_string_value(get(s, "name")), name) == 0)
			return s;
	cr_assert_fail("no subject %s in the JSON", name);
	return NULL;
}

static json_t *parse(const struct run *r)
{
	json_error_t je;
	json_t *doc = json_loads(r->out, 0, &je);

	cr_assert(doc, "not JSON: %s at line %d:\n%s", je.text, je.line, r->out);
	return doc;
}

static void expect_int(json_t *o, const char *key, json_int_t want)
{
	json_t *v = get(o, key);

	cr_expect(json_is_integer(v) && json_integer_value(v) == want, "%s: %lld, want %lld", key,
		  (long long)json_integer_value(v), (long long)want);
}

static void check_json_segment(json_t *seg, const struct owner *w)
{
	struct tally_segment_info in;
	struct timespec now;

	tally_segment_info(w->seg, &in);
	clock_gettime(CLOCK_REALTIME, &now);
	int64_t now_ms = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
	cr_expect_str_eq(json_string_value(get(seg, "name")), w->name);
	expect_int(seg, "owner_pid", getpid());
	cr_expect(json_is_true(get(seg, "owner_alive")));
	expect_int(seg, "generation", (json_int_t)in.generation);
	json_int_t pub = json_integer_value(get(seg, "published_at"));
	cr_expect(pub <= now_ms && pub > now_ms - 2000, "published_at %lld, now %lld", (long long)pub,
		  (long long)now_ms);
	cr_expect(json_is_false(get(seg, "stale")));
	cr_expect(json_is_null(get(seg, "stale_reason")));
}

static void check_json_subjects(json_t *doc)
{
	json_t *s = subject_named(doc, "orders.created");

	expect_int(s, "count", 50);
	int64_t p95 = json_integer_value(get(s, "p95_ns"));
	cr_expect(p95 >= 20000000 * 0.99 && p95 <= 20004000 * 1.01, "p95 %lld", (long long)p95);
	cr_expect_str_eq(json_string_value(get(s, "verdict")), "overload");
	cr_expect_eq(json_array_size(get(s, "reasons")), 1);
	cr_expect_str_eq(json_string_value(json_array_get(get(s, "reasons"), 0)), "latency");
	cr_expect(json_integer_value(get(s, "retry_after_ms")) > 0);
	expect_int(s, "min_ns", 20000000);
	cr_expect(json_is_real(get(s, "rate")));
	cr_expect(json_is_null(get(s, "pending")));
	cr_expect_str_eq(json_string_value(get(s, "pending_source")), "none");
	cr_expect(json_is_false(get(s, "pending_shared")));
	cr_expect(json_is_null(get(s, "pending_consumer")));
	for (const char *const *k = (const char *const[]){ "p50_ns", "p90_ns", "p99_ns", "p999_ns",
							   "max_ns", NULL }; *k; k++)
		cr_expect(json_is_integer(get(s, *k)), "%s", *k);
	s = subject_named(doc, "orders.paid");
	cr_expect_str_eq(json_string_value(get(s, "verdict")), "ok");
	cr_expect_eq(json_array_size(get(s, "reasons")), 0);
	expect_int(s, "retry_after_ms", 0);
	s = subject_named(doc, "billing.sent");
	cr_expect_str_eq(json_string_value(get(s, "verdict")), "warn");
	s = subject_named(doc, "few.samples");
	cr_expect_str_eq(json_string_value(get(s, "verdict")), "unknown");
	cr_expect_str_eq(json_string_value(json_array_get(get(s, "reasons"), 0)), "no_data");
	s = subject_named(doc, "idle.subject");
	expect_int(s, "count", 0);
	for (const char *const *k = (const char *const[]){ "p50_ns", "p90_ns", "p95_ns", "p99_ns",
							   "p999_ns", "min_ns", "max_ns", NULL }; *k; k++)
		cr_expect(json_is_null(get(s, *k)), "%s of a subject without data must be null", *k);
	cr_expect_str_eq(json_string_value(get(s, "verdict")), "unknown");
}

Test(cli, stat_json_follows_the_schema, .timeout = 20)
{
	struct owner w;
	struct run r;

	owner_start(&w, NULL, true, true);
	tt_sleep_ms(300); /* a few failed polls */
	TALLY(&r, NULL, "-s", w.name, "stat", "--json");
	cr_assert_eq(r.status, 0, "stderr: %s", r.err);
	json_t *doc = parse(&r);
	expect_int(doc, "version", 1);
	check_json_segment(get(doc, "segment"), &w);
	cr_expect_eq(json_array_size(get(doc, "subjects")), 5);
	check_json_subjects(doc);

	json_t *p = json_array_get(get(doc, "producers"), 0);
	cr_assert(p);
	expect_int(p, "pid", getpid());
	expect_int(p, "samples", 152);
	expect_int(p, "dropped", 0);
	expect_int(p, "lost", 0);
	expect_int(p, "moves", 0);
	cr_expect(json_integer_value(get(p, "generation")) >= 1);
	cr_expect(json_is_true(get(p, "alive")));

	json_t *c = json_array_get(get(doc, "consumers"), 0);
	cr_assert(c, "%s", r.out);
	cr_expect_str_eq(json_string_value(get(c, "stream")), "ORDERS");
	cr_expect_str_eq(json_string_value(get(c, "consumer")), "proc");
	cr_expect_str_eq(json_string_value(get(c, "source")), "never");
	cr_expect(json_is_null(get(c, "age_ms")), "never fetched: age_ms null");
	expect_int(c, "num_pending", 0);
	expect_int(c, "num_ack_pending", 0);

	json_t *pl = get(doc, "poller");
	cr_expect(json_is_false(get(pl, "connected")));
	cr_expect(json_integer_value(get(pl, "polls_failed")) >= 1, "%s", r.out);
	expect_int(pl, "polls_ok", 0);
	const char *b = json_string_value(get(pl, "breaker"));
	cr_expect(b && (!strcmp(b, "closed") || !strcmp(b, "open") || !strcmp(b, "half-open")));
	cr_expect(json_is_integer(get(pl, "consecutive_failures")));
	cr_expect(json_is_string(get(pl, "last_error")), "%s", r.out);
	json_decref(doc);
	owner_stop(&w);
}

/* A real nats-server: a stream, a filtered consumer with a backlog, polled live. */
struct js {
	struct tally_test_nats srv;
	natsConnection *nc;
	jsCtx *js;
};

static void js_setup(struct js *j, int backlog)
{
	const char *subjects = "orders.>";
	jsStreamConfig sc;
	jsConsumerConfig cc;
	jsErrCode ec = 0;

	memset(j, 0, sizeof(*j));
	cr_assert_eq(tally_test_nats_start(&j->srv, NULL, true), 0, "%s", j->srv.errmsg);
	cr_assert_eq(natsConnection_ConnectTo(&j->nc, j->srv.url), NATS_OK);
	cr_assert_eq(natsConnection_JetStream(&j->js, j->nc, NULL), NATS_OK);
	jsStreamConfig_Init(&sc);
	sc.Name = "ORDERS";
	sc.Subjects = &subjects;
	sc.SubjectsLen = 1;
	cr_assert_eq(js_AddStream(NULL, j->js, &sc, NULL, &ec), NATS_OK, "stream: %d", (int)ec);
	jsConsumerConfig_Init(&cc);
	cc.Durable = "router";
	cc.AckPolicy = js_AckExplicit;
	cc.FilterSubject = "orders.created";
	cr_assert_eq(js_AddConsumer(NULL, j->js, "ORDERS", &cc, NULL, &ec), NATS_OK, "consumer: %d", (int)ec);
	for (int i = 0; i < backlog; i++)
		cr_assert_eq(js_Publish(NULL, j->js, "orders.created", "x", 1, NULL, &ec), NATS_OK);
}

static void js_teardown(struct js *j)
{
	jsCtx_Destroy(j->js);
	natsConnection_Destroy(j->nc);
	tally_test_nats_stop(&j->srv);
}

Test(cli, live_pending_from_jetstream_in_stat_json_and_status, .timeout = 30)
{
	static const struct tally_poller_watch watch = { .stream = "ORDERS" };
	struct owner w;
	struct js j;
	struct run r;
	json_t *doc = NULL;

	js_setup(&j, 30);
	owner_start(&w, NULL, true, false);
	struct tally_poller_config pc = {
		.urls = j.srv.url, .poll_interval_ms = 50, .request_timeout_ms = 1000,
		.watches = &watch, .nwatches = 1, .log = silent_log,
	};
	cr_assert_eq(tally_poller_start(w.seg, &pc, &w.poller), 0, "%s", tally_errmsg());
	for (int i = 0; i < 100; i++) {
		TALLY(&r, NULL, "-s", w.name, "stat", "--json");
		cr_assert_eq(r.status, 0, "%s", r.err);
		doc = parse(&r);
		json_t *p = get(subject_named(doc, "orders.created"), "pending");
		if (json_is_integer(p) && json_integer_value(p) == 30)
			break;
		json_decref(doc);
		doc = NULL;
		tt_sleep_ms(30);
	}
	cr_assert(doc, "pending 30 never appeared: %s", r.out);
	json_t *s = subject_named(doc, "orders.created");
	cr_expect_str_eq(json_string_value(get(s, "pending_source")), "live");
	expect_int(s, "pending_consumers", 1);
	cr_expect(json_is_integer(get(s, "pending_age_ms")));
	cr_expect(json_is_false(get(s, "pending_shared")), "router's filter covers one subject");
	cr_expect_str_eq(json_string_value(get(s, "pending_consumer")), "ORDERS/router");
	cr_expect(json_is_null(get(subject_named(doc, "orders.paid"), "pending")), "no consumer feeds it");
	json_t *c = json_array_get(get(doc, "consumers"), 0);
	cr_assert(c, "%s", r.out);
	cr_expect_str_eq(json_string_value(get(c, "stream")), "ORDERS");
	cr_expect_str_eq(json_string_value(get(c, "consumer")), "router");
	cr_expect_str_eq(json_string_value(get(c, "filter")), "orders.created");
	expect_int(c, "num_pending", 30);
	expect_int(c, "num_ack_pending", 0);
	cr_expect_str_eq(json_string_value(get(c, "source")), "live");
	cr_expect(json_is_integer(get(c, "age_ms")));
	json_t *pl = get(doc, "poller");
	cr_expect(json_is_true(get(pl, "running")) && json_is_true(get(pl, "connected")));
	cr_expect_str_eq(json_string_value(get(pl, "breaker")), "closed");
	cr_expect(json_integer_value(get(pl, "polls_ok")) >= 1);
	json_decref(doc);

	TALLY(&r, NULL, "-s", w.name, "status", "orders.created");
	cr_expect_eq(r.status, 2, "%s", r.out);
	cr_expect(strstr(r.out, "pending 30 from 1 consumer (live,"), "%s", r.out);
	TALLY(&r, NULL, "-s", w.name, "stat");
	cr_expect(strstr(r.out, "ORDERS/router") && strstr(r.out, "live"), "%s", r.out);
	owner_stop(&w);
	js_teardown(&j);
}

/* ---- status ------------------------------------------------------------------------ */

Test(cli, status_exit_codes, .timeout = 20)
{
	struct owner w;
	struct run r;

	owner_start(&w, NULL, true, false);
	TALLY(&r, NULL, "-s", w.name, "status", "orders.created");
	cr_expect_eq(r.status, 2, "%s%s", r.out, r.err);
	cr_expect(strstr(r.out, "orders.created: overload (latency)"), "%s", r.out);
	cr_expect(strstr(r.out, "p95 20.00ms") && strstr(r.out, "retry-after 1000 ms") &&
		  strstr(r.out, "since"), "%s", r.out);
	TALLY(&r, NULL, "status", "-s", w.name, "orders.paid");
	cr_expect_eq(r.status, 0, "%s%s", r.out, r.err);
	cr_expect(strstr(r.out, "orders.paid: ok"), "%s", r.out);
	TALLY(&r, NULL, "-s", w.name, "status", "billing.sent");
	cr_expect_eq(r.status, 1, "%s%s", r.out, r.err);
	TALLY(&r, NULL, "-s", w.name, "status", "few.samples");
	cr_expect_eq(r.status, 3, "%s%s", r.out, r.err);
	cr_expect(strstr(r.out, "unknown (no_data)"), "%s", r.out);
	TALLY(&r, NULL, "-s", w.name, "status", "idle.subject");
	cr_expect_eq(r.status, 3, "%s%s", r.out, r.err);
	TALLY(&r, NULL, "-s", w.name, "status", "-q", "orders.created");
	cr_expect_eq(r.status, 2);
	cr_expect_str_empty(r.out);

	TALLY(&r, NULL, "-s", w.name, "status", "no.such.subject");
	cr_expect_eq(r.status, 4);
	cr_expect(strstr(r.err, "no subject \"no.such.subject\"") && strstr(r.err, w.name), "%s", r.err);
	TALLY(&r, NULL, "-s", w.name, "status", "orders..created");
	cr_expect_eq(r.status, 4);
	cr_expect(strstr(r.err, "orders..created"), "%s", r.err);
	TALLY(&r, NULL, "-s", w.name, "status", "orders.*");
	cr_expect_eq(r.status, 4, "a wildcard is not a subject");
	TALLY(&r, NULL, "-s", "tt-cli-no-such-segment", "status", "orders.created");
	cr_expect_eq(r.status, 4);
	cr_expect(strstr(r.err, "no segment \"tt-cli-no-such-segment\"") && strstr(r.err, "tallyd"),
		  "%s", r.err);
	TALLY(&r, NULL, "-s", w.name, "status");
	cr_expect_eq(r.status, 4, "status: usage errors are 4, as 2 means overload");
	cr_expect(strstr(r.err, "usage: tally status"), "%s", r.err);
	owner_stop(&w);
}

/* Which threshold rule judged a subject: named by `status SUBJECT` and
 * `stat --json`, from the owner's rules section, and followed across a
 * reload of the rules. */
static void set_rules(struct owner *w, uint64_t orders_warn_ms, uint64_t orders_overload_ms)
{
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule def, orders, created;

	tally_threshold_rule_init(&def);
	def.p95_warn_ns = 1 * MS;
	def.p95_overload_ns = 5 * MS;
	def.min_samples = 5;
	orders = def;
	orders.p95_warn_ns = orders_warn_ms * MS;
	orders.p95_overload_ns = orders_overload_ms * MS;
	orders.pending_warn = 0;
	orders.pending_overload = 0;
	orders.stale_policy = TALLY_STALE_FAIL_CLOSED;
	created = def;
	created.p95_warn_ns = 7 * MS;
	created.p95_overload_ns = 70 * MS;
	cr_assert_eq(tally_thresholds_add(t, NULL, &def), 0);
	cr_assert_eq(tally_thresholds_add(t, "orders.*", &orders), 0);
	cr_assert_eq(tally_thresholds_add(t, "*.created", &created), 0); /* as specific: orders.* came first */
	cr_assert_eq(tally_engine_set_thresholds(w->e, &t), 0);
}

static json_t *rule_of_subject(struct owner *w, const char *subject)
{
	struct run r;

	TALLY(&r, NULL, "-s", w->name, "stat", "--json");
	cr_assert_eq(r.status, 0, "%s", r.err);
	json_t *doc = parse(&r);
	json_t *rule = json_incref(get(subject_named(doc, subject), "rule"));
	json_decref(doc);
	return rule;
}

Test(cli, status_and_stat_json_name_the_rule_that_judges_a_subject, .timeout = 30)
{
	struct owner w;
	struct run r;

	owner_start(&w, NULL, true, false);
	/* before any pattern: the default rule */
	json_t *rule = rule_of_subject(&w, "orders.created");
	cr_assert(json_is_object(rule), "rule is an object");
	cr_expect(json_is_null(get(rule, "pattern")) && json_is_true(get(rule, "default")));
	expect_int(rule, "p95_warn_ns", (json_int_t)(1 * MS));
	expect_int(rule, "p95_overload_ns", (json_int_t)(5 * MS));
	json_decref(rule);
	TALLY(&r, NULL, "-s", w.name, "status", "billing.sent");
	cr_expect(strstr(r.out, "rule: the default ([thresholds]), no pattern matches"), "%s", r.out);

	set_rules(&w, 30, 100);
	/* orders.created is judged by orders.* (equally specific as *.created, added first) */
	for (int i = 0; i < 300; i++) {
		uint64_t c;
		if (verdict_of(&w, "orders.created", &c) == TALLY_VERDICT_OK)
			break;
		tt_sleep_ms(10);
	}
	TALLY(&r, NULL, "-s", w.name, "status", "orders.created");
	cr_expect_eq(r.status, 0, "20 ms is below orders.* warn level of 30 ms: %s%s", r.out, r.err);
	cr_expect(strstr(r.out, "rule: [thresholds \"orders.*\"]"), "%s", r.out);
	cr_expect(strstr(r.out, "p95 30.00ms / 100.0ms, pending off"), "%s", r.out);
	cr_expect(strstr(r.out, "fail-closed"), "%s", r.out);
	rule = rule_of_subject(&w, "orders.created");
	cr_expect_str_eq(json_string_value(get(rule, "pattern")), "orders.*");
	cr_expect(json_is_false(get(rule, "default")));
	expect_int(rule, "p95_warn_ns", (json_int_t)(30 * MS));
	expect_int(rule, "p95_overload_ns", (json_int_t)(100 * MS));
	expect_int(rule, "pending_overload", 0);
	cr_expect_str_eq(json_string_value(get(rule, "stale_policy")), "fail-closed");
	json_decref(rule);
	/* a subject no pattern matches keeps the default */
	rule = rule_of_subject(&w, "billing.sent");
	cr_expect(json_is_true(get(rule, "default")));
	json_decref(rule);

	/* a reload: the new levels are what is shown, never the old set's */
	set_rules(&w, 10, 15);
	for (int i = 0; i < 300; i++) {
		uint64_t c;
		if (verdict_of(&w, "orders.created", &c) == TALLY_VERDICT_OVERLOAD)
			break;
		tt_sleep_ms(10);
	}
	rule = rule_of_subject(&w, "orders.created");
	expect_int(rule, "p95_overload_ns", (json_int_t)(15 * MS));
	json_decref(rule);
	TALLY(&r, NULL, "-s", w.name, "status", "orders.created");
	cr_expect_eq(r.status, 2, "%s%s", r.out, r.err);
	cr_expect(strstr(r.out, "p95 10.00ms / 15.00ms"), "%s", r.out);
	owner_stop(&w);
}

/* A dead owner: its last data is shown but never as live. */
Test(cli, dead_owner_is_stale_not_live, .timeout = 20)
{
	char name[128];
	struct run r;

	snprintf(name, sizeof(name), "%s", tt_segname("cli-dead"));
	pid_t pid = fork();
	cr_assert(pid >= 0);
	if (pid == 0) {
		struct owner w;
		owner_start(&w, name, true, false);
		_exit(0); /* dies without closing: the segment stays, its owner is gone */
	}
	int st;
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "owner child failed");

	TALLY(&r, NULL, "-s", name, "status", "orders.created");
	cr_expect_eq(r.status, 3, "%s%s", r.out, r.err);
	cr_expect(strstr(r.out, "unknown (owner_dead)") && strstr(r.out, "it said overload"), "%s", r.out);
	TALLY(&r, NULL, "-s", name, "status", "orders.paid");
	cr_expect_eq(r.status, 3, "ok from a dead owner is not ok");
	TALLY(&r, NULL, "-s", name, "stat");
	cr_expect_eq(r.status, 0, "%s", r.err);
	cr_expect(strstr(r.out, "DEAD") && strstr(r.out, "*** OWNER DEAD"), "%s", r.out);
	const char *line = strstr(r.out, "orders.created");
	cr_expect(line && strstr(line, "unknown (owner_dead; last published: overload"), "%s", r.out);
	TALLY(&r, NULL, "-s", name, "stat", "--json");
	json_t *doc = parse(&r), *seg = get(doc, "segment");
	cr_expect(json_is_true(get(seg, "stale")));
	cr_expect(json_is_false(get(seg, "owner_alive")));
	cr_expect_str_eq(json_string_value(get(seg, "stale_reason")), "owner_dead");
	json_t *s = subject_named(doc, "orders.created");
	cr_expect_str_eq(json_string_value(get(s, "verdict")), "unknown");
	cr_expect_str_eq(json_string_value(get(s, "published_verdict")), "overload");
	cr_expect_str_eq(json_string_value(json_array_get(get(s, "reasons"), 0)), "owner_dead");
	expect_int(s, "count", 50);
	json_decref(doc);
	tally_segment_unlink(name);
}

/* ---- errors -------------------------------------------------------------------------- */

Test(cli, no_permission, .timeout = 20)
{
	struct owner w;
	struct run r;
	struct run_opts o = { .uid = 65534 };
	char path[256];

	owner_start(&w, NULL, false, false);
	snprintf(path, sizeof(path), "/dev/shm/%s", w.name);
	if (geteuid() != 0) {
		/* Not root: take the permission away from ourselves instead. */
		cr_assert_eq(chmod(path, 0), 0);
		o.uid = 0;
	}
	TALLY(&r, &o, "-s", w.name, "stat");
	cr_expect_eq(r.status, 4, "%s%s", r.out, r.err);
	cr_expect(strstr(r.err, "permission") && strstr(r.err, w.name), "%s", r.err);
	TALLY(&r, &o, "-s", w.name, "status", "orders.created");
	cr_expect_eq(r.status, 4, "%s", r.err);
	chmod(path, 0600);
	owner_stop(&w);
}

Test(cli, version_mismatch_names_both_versions, .timeout = 20)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	const char *name = tt_segname("cli-abi");
	char path[256];
	struct run r;

	tt_config(&cfg);
	cr_assert_eq(tally_segment_create(name, &cfg, 0, &seg), 0);
	tally_segment_keep(seg, true);
	tally_segment_close(&seg);
	snprintf(path, sizeof(path), "/dev/shm/%s", name);
	int fd = open(path, O_RDWR);
	cr_assert(fd >= 0);
	uint32_t major = 99;
	cr_assert_eq(pwrite(fd, &major, sizeof(major), 8), (ssize_t)sizeof(major));
	close(fd);
	TALLY(&r, NULL, "-s", name, "stat");
	cr_expect_eq(r.status, 4);
	char reads[32];
	snprintf(reads, sizeof(reads), "reads %u.", TALLY__ABI_MAJOR);
	cr_expect(strstr(r.err, "99.") && strstr(r.err, reads), "both versions: %s", r.err);
	TALLY(&r, NULL, "-s", name, "dump");
	cr_expect_eq(r.status, 4);
	TALLY(&r, NULL, "-s", name, "status", "x");
	cr_expect_eq(r.status, 4);
	tally_segment_unlink(name);
}

Test(cli, no_such_segment, .timeout = 10)
{
	struct run r;

	for (const char *const *cmd = (const char *const[]){ "stat", "dump", NULL }; *cmd; cmd++) {
		TALLY(&r, NULL, "-s", "tt-cli-absent", *cmd);
		cr_expect_eq(r.status, 4, "%s", *cmd);
		cr_expect(strstr(r.err, "no segment \"tt-cli-absent\""), "%s", r.err);
		cr_expect_str_empty(r.out);
	}
	TALLY(&r, NULL, "-s", "bad/name", "stat");
	cr_expect_eq(r.status, 4);
	cr_expect(strstr(r.err, "bad/name"), "%s", r.err);
}

Test(cli, bad_arguments_are_usage_errors, .timeout = 10)
{
	static const char *const cases[][5] = {
		{ NULL }, /* no command */
		{ "frobnicate" },
		{ "--bogus", "stat" },
		{ "stat", "--bogus" },
		{ "stat", "extra" },
		{ "dump", "extra" },
		{ "record", "only.a.subject" },
		{ "record", "--wait-timeout", "0" },
		{ "record", "--wait-timeout", "10s" },
		{ "record", "-w", "-1", "a.b", "5" },
		{ "top", "-d", "0" },
		{ "top", "-d", "abc" },
		{ "top", "-n", "0" },
		{ "top", "--sort", "size" },
		{ "-s" },
	};
	struct run r;

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const char *const *c = cases[i];
		run_tally(&r, NULL, c);
		cr_expect_eq(r.status, 2, "case %zu (%s %s): exit %d", i, c[0] ? c[0] : "", c[0] && c[1] ? c[1] : "",
			     r.status);
		cr_expect(strstr(r.err, "usage: tally"), "case %zu: usage on stderr: %s", i, r.err);
		cr_expect_str_empty(r.out, "case %zu: nothing on stdout", i);
	}
}

Test(cli, help_and_version, .timeout = 10)
{
	struct run r;

	TALLY(&r, NULL, "--version");
	cr_expect_eq(r.status, 0);
	cr_expect(strstr(r.out, "tally " PACKAGE_VERSION), "%s", r.out);
	TALLY(&r, NULL, "--help");
	cr_expect_eq(r.status, 0);
	cr_expect(strstr(r.out, "stat") && strstr(r.out, "status") && strstr(r.out, "top"));
	for (const char *const *cmd = (const char *const[]){ "stat", "status", "top", "dump", "record",
							     NULL }; *cmd; cmd++) {
		char want[64];
		TALLY(&r, NULL, *cmd, "--help");
		snprintf(want, sizeof(want), "usage: tally %s", *cmd);
		cr_expect_eq(r.status, 0, "%s --help", *cmd);
		cr_expect(strstr(r.out, want), "%s --help: %s", *cmd, r.out);
		cr_expect_str_empty(r.err);
	}
	TALLY(&r, NULL, "status", "--help");
	cr_expect(strstr(r.out, "3  unknown") && strstr(r.out, "dead"), "%s", r.out);
}

/* ---- record, dump -------------------------------------------------------------------- */

static uint64_t total_of(struct owner *w, const char *subject)
{
	struct tally_subject_stats st;
	tally_subject_t id;

	for (int i = 0; i < 200; i++) {
		if (tally_subject_lookup(w->seg, subject, &id) == 0 && tally_engine_read(w->e, id, &st) == 0 &&
		    st.total_count)
			return st.total_count;
		tt_sleep_ms(10);
	}
	return 0;
}

Test(cli, record_from_stdin_reports_bad_lines_and_records_the_rest, .timeout = 20)
{
	struct owner w;
	struct run r;
	struct run_opts o = {
		.input = "rec.a 100\n"
			 "this line has three words\n"
			 "# a comment\n"
			 "\n"
			 "rec.a notanumber\n"
			 "bad..subject 5\n"
			 "rec.a 300\n"
			 "rec.b -4\n",
	};

	owner_start(&w, NULL, false, false);
	TALLY(&r, &o, "-s", w.name, "record");
	cr_expect_eq(r.status, 1, "%s%s", r.out, r.err);
	cr_expect(strstr(r.err, "stdin:2: expected \"SUBJECT NS\""), "%s", r.err);
	cr_expect(strstr(r.err, "stdin:5:") && strstr(r.err, "notanumber"), "%s", r.err);
	cr_expect(strstr(r.err, "stdin:6:") && strstr(r.err, "bad..subject"), "%s", r.err);
	cr_expect(strstr(r.err, "stdin:8:"), "%s", r.err);
	cr_expect(strstr(r.out, "recorded 2, rejected 4, dropped 0"), "%s", r.out);
	cr_expect_eq(total_of(&w, "rec.a"), 2);

	TALLY(&r, NULL, "-s", w.name, "record", "rec.c", "1000", "2000", "3000");
	cr_expect_eq(r.status, 0, "%s", r.err);
	cr_expect(strstr(r.out, "recorded 3, rejected 0"), "%s", r.out);
	cr_expect_eq(total_of(&w, "rec.c"), 3);
	owner_stop(&w);
}

/* stat --watch: the table again and again, each with a time line; with
 * --json one document per line; bad intervals are usage errors. */
static int count_of(const char *hay, const char *needle)
{
	int n = 0;

	for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
		n++;
	return n;
}

Test(cli, stat_watch_prints_every_interval_for_logs, .timeout = 30)
{
	struct owner w;
	struct run r;

	owner_start(&w, NULL, true, false);
	TALLY(&r, NULL, "-s", w.name, "stat", "--watch", "0.1", "--count", "3");
	cr_expect_eq(r.status, 0, "%s", r.err);
	cr_expect_eq(count_of(r.out, "(tally stat --watch; Ctrl-C stops) ---"), 3, "%s", r.out);
	cr_expect_eq(count_of(r.out, "orders.created"), 3, "%s", r.out);
	TALLY(&r, NULL, "-s", w.name, "stat", "--json", "--watch=0.1", "--count", "2");
	cr_expect_eq(r.status, 0, "%s", r.err);
	char *nl = strchr(r.out, '\n');
	cr_assert(nl && strchr(nl + 1, '\n') && !strchr(strchr(nl + 1, '\n') + 1, '\n'),
		  "two lines: %s", r.out);
	*nl = '\0';
	json_error_t err;
	json_t *doc = json_loads(r.out, 0, &err);
	cr_expect(doc && json_is_array(get(doc, "subjects")), "line 1 is a document: %s", err.text);
	json_decref(doc);
	doc = json_loads(nl + 1, 0, &err);
	cr_expect(doc && json_integer_value(get(doc, "version")) == 1, "line 2 is a document: %s", err.text);
	json_decref(doc);
	TALLY(&r, NULL, "-s", w.name, "stat", "--watch", "0");
	cr_expect_eq(r.status, 2, "%s", r.err);
	cr_expect(strstr(r.err, "0.1 to 3600"), "%s", r.err);
	TALLY(&r, NULL, "-s", w.name, "stat", "--count", "2");
	cr_expect_eq(r.status, 2, "--count without --watch: %s", r.err);
	/* a missing segment is reported and watched on */
	TALLY(&r, NULL, "-s", "tt-cli-watch-nosuch", "stat", "--watch", "0.1", "--count", "2");
	cr_expect_eq(r.status, 0, "%s", r.err);
	cr_expect_eq(count_of(r.err, "no segment \"tt-cli-watch-nosuch\""), 2, "%s", r.err);
	owner_stop(&w);
}

/* What a message quotes from the user (a value, a command, an option,
 * a stdin line) never reaches the terminal as a control byte. */
Test(cli, control_bytes_in_messages_are_escaped, .timeout = 20)
{
	struct owner w;
	struct run r;

	owner_start(&w, NULL, false, false);
	TALLY(&r, NULL, "-s", w.name, "record", "orders.created", "1\x1b]0;pwned\x07");
	cr_expect_eq(r.status, 1, "%s%s", r.out, r.err);
	cr_expect(strstr(r.err, "\"1\\x1b]0;pwned\\x07\""), "%s", r.err);
	cr_expect(!strchr(r.err, 0x1b) && !strchr(r.err, 0x07), "a raw control byte on stderr");
	TALLY(&r, NULL, "\x1b[2Jstat");
	cr_expect(strstr(r.err, "\\x1b[2Jstat") && !strchr(r.err, 0x1b), "%s", r.err);
	TALLY(&r, NULL, "stat", "--no\x1b[31m");
	cr_expect(strstr(r.err, "\\x1b[31m") && !strchr(r.err, 0x1b), "getopt's message too: %s", r.err);
	struct run_opts in = { .input = "orders.created 5\xc2\x9b" "2J\n" };
	TALLY(&r, &in, "-s", w.name, "record");
	cr_expect(strstr(r.err, "\\x9b") && !strstr(r.err, "\xc2\x9b"), "a C1 control: %s", r.err);
	owner_stop(&w);
}

/* A bad SUBJECT operand is named as the subject, before anything is recorded. */
Test(cli, record_names_a_bad_subject_as_the_subject, .timeout = 20)
{
	struct owner w;
	struct run r;

	owner_start(&w, NULL, false, false);
	TALLY(&r, NULL, "-s", w.name, "record", "orders..created", "5", "6");
	cr_expect_eq(r.status, 2, "%s%s", r.out, r.err);
	cr_expect(strstr(r.err, "SUBJECT") && strstr(r.err, "orders..created"), "%s", r.err);
	cr_expect(!strstr(r.err, "argument"), "%s", r.err);
	TALLY(&r, NULL, "-s", w.name, "record", "orders.created", "5", "x");
	cr_expect_eq(r.status, 1, "%s%s", r.out, r.err);
	cr_expect(strstr(r.err, "value 2: \"x\""), "the value is named by its place among the values: %s", r.err);
	cr_expect(strstr(r.out, "recorded 1, rejected 1"), "%s", r.out);
	owner_stop(&w);
}

/* With every slot but one held, back-to-back records share the last one:
 * the second waits for the slot the first released (the owner's
 * cool-off) instead of failing. */
Test(cli, back_to_back_records_wait_for_a_released_slot, .timeout = 30)
{
	struct tally_segment_config cfg;
	struct owner w;
	struct run r;

	tt_config(&cfg);
	cfg.producer_slots = 2; /* one for the test's own producer, one for tally record */
	cfg.producer_cooloff_ms = 300;
	owner_start_cfg(&w, NULL, false, false, &cfg);
	for (int i = 0; i < 3; i++) {
		TALLY(&r, NULL, "-s", w.name, "record", "orders.created", "1000");
		cr_expect_eq(r.status, 0, "record %d: %s%s", i, r.out, r.err);
		cr_expect(strstr(r.out, "recorded 1, rejected 0, dropped 0"), "%s", r.out);
	}
	/* every slot held by a live producer: no wait, an error that says so */
	struct tally_producer *extra = NULL;
	for (int i = 0; i < 500 && tally_producer_attach(w.seg, &extra) == TALLY_EFULL; i++)
		tt_sleep_ms(10); /* the last record's slot comes back after the cool-off */
	cr_assert(extra, "%s", tally_errmsg());
	TALLY(&r, NULL, "-s", w.name, "record", "orders.created", "1000");
	cr_expect_eq(r.status, 4, "%s%s", r.out, r.err);
	cr_expect(strstr(r.err, "taken by attached producers"), "%s", r.err);
	tally_producer_detach(&extra);
	owner_stop(&w);
}

/* Random bytes under a segment's name are not a segment being created:
 * the error says so at once, not after the wait for a creator. */
Test(cli, random_bytes_under_a_segment_name_fail_at_once, .timeout = 20)
{
	const char *name = tt_segname("cli-garbage");
	char path[160];
	unsigned char junk[8192];
	struct run r;

	for (size_t i = 0; i < sizeof(junk); i++)
		junk[i] = (unsigned char)(i * 131u + 7u) | 1u;
	snprintf(path, sizeof(path), "/dev/shm/%s", name);
	FILE *f = fopen(path, "w");
	cr_assert(f);
	cr_assert_eq(fwrite(junk, 1, sizeof(junk), f), sizeof(junk));
	fclose(f);
	TALLY(&r, NULL, "-s", name, "stat");
	cr_expect_eq(r.status, 4, "%s%s", r.out, r.err);
	cr_expect(strstr(r.err, "is not a tally segment") && strstr(r.err, "bad magic"), "%s", r.err);
	cr_expect(!strstr(r.err, "did not become ready"), "%s", r.err);
	unlink(path);
}

Test(cli, dump_shows_header_sections_and_slots, .timeout = 20)
{
	struct owner w;
	struct run r;
	char want[256];

	owner_start(&w, NULL, false, false);
	TALLY(&r, NULL, "-s", w.name, "dump");
	cr_expect_eq(r.status, 0, "%s", r.err);
	snprintf(want, sizeof(want), "segment          %s\n", w.name);
	cr_expect(strstr(r.out, want), "%s", r.out);
	snprintf(want, sizeof(want), "layout version   %u.", TALLY__ABI_MAJOR);
	cr_expect(strstr(r.out, want), "%s", r.out);
	snprintf(want, sizeof(want), "owner            pid %d", (int)getpid());
	cr_expect(strstr(r.out, want) && strstr(r.out, "alive"), "%s", r.out);
	cr_expect(strstr(r.out, "16 slots x 1024 entries, 256 subjects"), "%s", r.out);
	cr_expect(strstr(r.out, "  snapshot ") && strstr(r.out, "  pending "), "%s", r.out);
	cr_expect(strstr(r.out, "  rules ") && !strstr(r.out, "  remote "), "rules always, remote only when configured: %s", r.out);
	cr_expect(strstr(r.out, "producer slots   1 of 16 in use"), "%s", r.out);
	owner_stop(&w);
}

/* ---- top, in a real terminal (tmux) ------------------------------------------------------ */

struct tmux {
	char sock[128];   /* the tmux server's socket, removed by tmux_stop() */
};

static int shell(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int shell(const char *fmt, ...)
{
	char cmd[2048];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	int st = system(cmd);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void tmux_start_cols(struct tmux *t, const char *segment, const char *extra, int cols)
{
	static int n;

	cr_assert_eq(shell("command -v tmux >/dev/null"), 0,
		     "tmux is needed to test tally top in a terminal: apt-get install tmux");
	snprintf(t->sock, sizeof(t->sock), "/tmp/tally-test-tmux-%d-%d", (int)getpid(), n++);
	cr_assert_eq(shell("tmux -S %s -f /dev/null new-session -d -s top -x %d -y 24 "
			   "'env LC_ALL=C.UTF-8 TERM=screen %s -s %s top -d 0.1 %s; sleep 30'",
			   t->sock, cols, TALLY_BIN, segment, extra ? extra : ""), 0);
}

static void tmux_start(struct tmux *t, const char *segment, const char *extra)
{
	tmux_start_cols(t, segment, extra, 80);
}

/* The screen as text (with escapes when esc), into buf. */
static void tmux_capture(const struct tmux *t, bool esc, char *buf, size_t len)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd), "tmux -S %s capture-pane -p %s -t top", t->sock, esc ? "-e" : "");
	cr_assert(tt_command_output(cmd, buf, len), "%s", cmd);
}

/* A whole frame: its last row is drawn last ("q quit ..." with data,
 * "trying again ..." while waiting for a segment). */
static bool frame_complete(const char *screen)
{
	return strstr(screen, "q quit") || strstr(screen, "trying again");
}

/* Wait until a whole frame contains want (or does not, with absent); 3 s. */
static bool tmux_wait(const struct tmux *t, const char *want, bool absent, char *buf, size_t len)
{
	for (int i = 0; i < 150; i++) {
		tmux_capture(t, false, buf, len);
		if (!strstr(buf, want) == absent && frame_complete(buf))
			return true;
		tt_sleep_ms(20);
	}
	return false;
}

static void tmux_keys(const struct tmux *t, const char *keys)
{
	cr_assert_eq(shell("tmux -S %s send-keys -t top %s", t->sock, keys), 0);
}

static void tmux_stop(const struct tmux *t)
{
	shell("tmux -S %s kill-server 2>/dev/null", t->sock);
	unlink(t->sock);
}

/* In a terminal the demo runs tally top; --duration must end it there too
 * (the first stage ran until q was pressed), and leave the terminal sane. */
Test(cli, demo_duration_ends_the_live_view_in_a_terminal, .timeout = 120)
{
	struct tmux t;
	char screen[8192];
	static int n;
	bool ended = false;

	snprintf(t.sock, sizeof(t.sock), "/tmp/tally-test-tmux-demo-%d-%d", (int)getpid(), n++);
	cr_assert_eq(shell("tmux -S %s -f /dev/null new-session -d -s top -x 100 -y 30 "
			   "'env LC_ALL=C.UTF-8 TERM=screen %s -s %s demo --duration 3; "
			   "echo DEMO-EXIT=$?; sleep 60'",
			   t.sock, TALLY_BIN, tt_segname("cli-demo")), 0);
	bool saw_top = false, saw_phase = false;
	for (int i = 0; i < 900 && !ended; i++) { /* 90 s: nats-server starts, 3 s of demo */
		tmux_capture(&t, false, screen, sizeof(screen));
		saw_top |= strstr(screen, "q quit") != NULL;
		saw_phase |= strstr(screen, "demo: 300 msg/s, steady") && strstr(screen, "thresholds: P95 warn");
		ended = strstr(screen, "DEMO-EXIT=") != NULL;
		tt_sleep_ms(100);
	}
	tmux_stop(&t);
	cr_expect(saw_top, "the demo never showed tally top:\n%s", screen);
	cr_expect(saw_phase, "top never showed the demo's phase and thresholds:\n%s", screen);
	cr_assert(ended, "tally demo --duration 3 did not end in a terminal:\n%s", screen);
	cr_expect(strstr(screen, "DEMO-EXIT=0"), "%s", screen);
}

/* Index of the line holding s on the screen, or -1. */
static int line_of(const char *screen, const char *s)
{
	const char *at = strstr(screen, s);
	int n = 0;

	if (!at)
		return -1;
	for (const char *p = screen; p < at; p++)
		n += *p == '\n';
	return n;
}

static void expect_fits_80x24(const char *screen)
{
	int lines = 0, width = 0;

	for (const char *p = screen; *p; p++) {
		if (*p == '\n') {
			lines++;
			width = 0;
		} else if (((unsigned char)*p & 0xc0) != 0x80) {
			cr_expect(++width <= 80, "line %d wider than 80 columns", lines);
		}
	}
	cr_expect(lines <= 24, "%d lines", lines);
}

Test(cli, top_sorts_filters_colours_and_quits_in_80x24, .timeout = 30)
{
	struct owner w;
	struct tmux t;
	static char screen[65536];

	owner_start(&w, NULL, true, false);
	tmux_start(&t, w.name, NULL);
	cr_assert(tmux_wait(&t, "orders.created", false, screen, sizeof(screen)), "%s", screen);
	expect_fits_80x24(screen);
	cr_expect(strstr(screen, "tally top") && strstr(screen, w.name) && strstr(screen, "alive"),
		  "%s", screen);
	cr_expect(strstr(screen, "SUBJECT") && strstr(screen, "P95 v") && strstr(screen, "VERDICT"),
		  "%s", screen);
	cr_expect(strstr(screen, "poller: not running") && strstr(screen, "producers 1/1 alive"),
		  "%s", screen);
	/* Sorted by P95, highest first. */
	int created = line_of(screen, "orders.created"), billing = line_of(screen, "billing.sent"),
	    paid = line_of(screen, "orders.paid");
	cr_expect(created < billing && billing < paid, "p95 order: %d %d %d\n%s", created, billing, paid,
		  screen);
	/* Colours: overload red, warn yellow, ok green. */
	tmux_capture(&t, true, screen, sizeof(screen));
	cr_expect(strstr(screen, "\033[31m") || strstr(screen, ";31m"), "red:\n%s", screen);
	cr_expect(strstr(screen, "\033[32m") || strstr(screen, ";32m"), "green");
	cr_expect(strstr(screen, "\033[33m") || strstr(screen, ";33m"), "yellow");

	tmux_keys(&t, "a"); /* by name */
	cr_assert(tmux_wait(&t, "sort name", false, screen, sizeof(screen)), "%s", screen);
	cr_expect(line_of(screen, "billing.sent") < line_of(screen, "orders.created"), "%s", screen);
	tmux_keys(&t, "/ p a i d Enter");
	cr_assert(tmux_wait(&t, "orders.created", true, screen, sizeof(screen)), "filter: %s", screen);
	cr_expect(strstr(screen, "orders.paid") && strstr(screen, "filter \"paid\""), "%s", screen);
	tmux_keys(&t, "/ BSpace BSpace BSpace BSpace Enter");
	cr_assert(tmux_wait(&t, "orders.created", false, screen, sizeof(screen)), "cleared: %s", screen);
	tmux_keys(&t, "q");
	bool quit = false;
	for (int i = 0; i < 150 && !quit; i++, tt_sleep_ms(20)) {
		tmux_capture(&t, false, screen, sizeof(screen));
		quit = !strstr(screen, "SUBJECT") && !frame_complete(screen);
	}
	cr_expect(quit, "q did not quit:\n%s", screen);
	tmux_stop(&t);
	owner_stop(&w);
}

/* At 60 columns a long name is cut with a marker, and the verdict column
 * stays whole (it showed "war"): P50 and P99 make room. */
Test(cli, top_at_60_columns_cuts_names_with_a_marker_and_keeps_the_verdict, .timeout = 30)
{
	struct owner w;
	struct tmux t;
	static char screen[65536];
	static const char longname[] = "warehouse.inventory.reconciliation.nightly";

	owner_start(&w, NULL, true, false);
	record_n(&w, longname, 100000, 50);
	wait_published(&w);
	tmux_start_cols(&t, w.name, "--sort name", 60);
	cr_assert(tmux_wait(&t, "orders.created", false, screen, sizeof(screen)), "%s", screen);
	cr_expect(!strstr(screen, longname), "the whole name fits 60 columns?\n%s", screen);
	cr_expect(strstr(screen, "warehouse.inv") && strstr(screen, "\u2026"),
		  "a cut name ends with a marker:\n%s", screen);
	cr_expect(strstr(screen, "warn ") || strstr(screen, "warn\n"), "the whole verdict fits:\n%s", screen);
	for (const char *l = screen; *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : l + strlen(l)) {
		int cols = 0;
		for (const char *p = l; *p && *p != '\n'; p++)
			cols += ((unsigned char)*p & 0xc0) != 0x80;
		cr_expect(cols <= 60, "a line wider than 60 columns: %.*s", (int)strcspn(l, "\n"), l);
	}
	tmux_stop(&t);
	owner_stop(&w);
}

Test(cli, top_waits_for_the_segment_and_reattaches_after_a_restart, .timeout = 30)
{
	struct owner w;
	struct tmux t;
	static char screen[65536];
	char name[128];

	snprintf(name, sizeof(name), "%s", tt_segname("cli-top"));
	tmux_start(&t, name, NULL);
	cr_assert(tmux_wait(&t, "waiting for segment", false, screen, sizeof(screen)), "%s", screen);
	cr_expect(strstr(screen, name), "%s", screen);

	owner_start(&w, name, true, false);
	cr_assert(tmux_wait(&t, "orders.created", false, screen, sizeof(screen)), "attach:\n%s", screen);
	expect_fits_80x24(screen);

	/* The owner stops (segment removed): waiting again. */
	owner_stop(&w);
	cr_assert(tmux_wait(&t, "waiting for segment", false, screen, sizeof(screen)), "%s", screen);

	/* A new owner with other data: attached again, new data shown. */
	owner_start(&w, name, false, false);
	record_n(&w, "after.restart", 1000, 10);
	cr_assert(tmux_wait(&t, "after.restart", false, screen, sizeof(screen)), "re-attach:\n%s", screen);
	cr_expect_null(strstr(screen, "orders.created"), "%s", screen);
	tmux_keys(&t, "q");
	tmux_stop(&t);
	owner_stop(&w);
}

Test(cli, top_shows_a_dead_owner_as_not_live, .timeout = 30)
{
	struct tmux t;
	static char screen[65536];
	char name[128];

	snprintf(name, sizeof(name), "%s", tt_segname("cli-topdead"));
	pid_t pid = fork();
	cr_assert(pid >= 0);
	if (pid == 0) {
		struct owner w;
		owner_start(&w, name, true, false);
		_exit(0);
	}
	int st;
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	tmux_start(&t, name, NULL);
	cr_assert(tmux_wait(&t, "OWNER DEAD", false, screen, sizeof(screen)), "%s", screen);
	int row = line_of(screen, "orders.created");
	cr_assert(row >= 0, "%s", screen);
	const char *line = strstr(screen, "orders.created");
	cr_expect(strstr(line, "unknown") && (!strstr(line, "overload") ||
					      strstr(line, "unknown") < strstr(line, "overload")),
		  "%s", screen);
	tmux_stop(&t);
	tally_segment_unlink(name);
}

/* ---- top: other hosts' rows, shared through a real nats-server ---------------------------- */

static void share_start(struct owner *w, const char *host, const char *url, struct tally_share **out)
{
	struct tally_share_config sc;

	tally_share_config_init(&sc);
	sc.urls = url;
	sc.host = host;
	sc.refresh_ms = 300;
	sc.stale_after_ms = 900;
	sc.max_age_ms = 30000; /* stale long before it expires */
	sc.retry_ms = 200;
	sc.log = silent_log;
	cr_assert_eq(tally_share_start(w->seg, &sc, out), 0, "%s", tally_errmsg());
}

/* A's mirrored row (host, subject), through the library's own read. */
static bool remote_row(struct owner *w, const char *host, const char *subject, struct tally_remote_stats *out)
{
	struct tally_remote_stats rows[64];
	int n = tally_read_remote(w->seg, rows, 64);

	for (int i = 0; i < n; i++)
		if (!strcmp(rows[i].host, host) && !strcmp(rows[i].subject, subject)) {
			*out = rows[i];
			return true;
		}
	return false;
}

/* The first screen line holding both a and b (a copy, into line), or NULL. */
static const char *line_with(const char *screen, const char *a, const char *b, char *line, size_t len)
{
	for (const char *l = screen; *l; l += strcspn(l, "\n") + (l[strcspn(l, "\n")] ? 1 : 0)) {
		snprintf(line, len, "%.*s", (int)strcspn(l, "\n"), l);
		if (strstr(line, a) && strstr(line, b))
			return line;
	}
	return NULL;
}

/* Wait (3 s) for a whole frame with a line holding both a and b. */
static const char *tmux_wait_line(const struct tmux *t, const char *a, const char *b, char *screen, size_t len,
				  char *line, size_t llen)
{
	for (int i = 0; i < 150; i++, tt_sleep_ms(20)) {
		tmux_capture(t, false, screen, len);
		if (frame_complete(screen) && line_with(screen, a, b, line, llen))
			return line;
	}
	return NULL;
}

/* line has an age cell as top writes it ("0.3s", "12s"): digits and a dot, then 's' */
static bool has_age(const char *line)
{
	for (const char *p = line; *p; p++) {
		size_t n = strspn(p, "0123456789.");

		if (n && (p == line || p[-1] == ' ') && p[n] == 's' && (p[n + 1] == ' ' || !p[n + 1]))
			return true;
		p += n ? n - 1 : 0;
	}
	return false;
}

static void expect_fits_cols(const char *screen, int width)
{
	for (const char *l = screen; *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : l + strlen(l)) {
		int cols = 0;
		for (const char *p = l; *p && *p != '\n'; p++)
			cols += ((unsigned char)*p & 0xc0) != 0x80;
		cr_expect(cols <= width, "a line wider than %d columns: %.*s", width, (int)strcspn(l, "\n"), l);
	}
}

/*
 * Two hosts, A and B, each a segment with its engine and share thread,
 * sharing through a real JetStream KV bucket: top on A shows B's rows
 * under their own HOST header after A's subjects, with their age; at 60
 * columns a long subject is cut with a marker and the verdict stays whole;
 * once B stops sharing, its rows are marked stale.
 */
Test(cli, top_shows_other_hosts_rows_with_age_and_marks_stale_ones, .timeout = 90)
{
	static const char longname[] = "warehouse.inventory.reconciliation.nightly";
	struct tally_test_nats n;
	struct tally_share *sa = NULL, *sb = NULL;
	struct tally_remote_stats row;
	struct owner a, b;
	struct tmux t, narrow;
	static char screen[65536];
	char line[1024];
	const char *l;
	uint64_t count = 0;

	cr_assert_eq(tally_test_nats_start(&n, NULL, true), 0, "%s", n.errmsg);
	owner_start_remote(&a, NULL, true, false, 64);
	owner_start_remote(&b, NULL, false, false, 64);
	share_start(&a, "hA", n.url, &sa);
	share_start(&b, "hB", n.url, &sb);
	record_n(&b, "orders.created", 20 * MS, 50); /* overload on B */
	record_n(&b, longname, 100000, 50);          /* ok on B */
	for (int i = 0; i < 300 && verdict_of(&b, longname, &count) != TALLY_VERDICT_OK; i++)
		tt_sleep_ms(10);
	cr_assert_eq(verdict_of(&b, "orders.created", &count), TALLY_VERDICT_OVERLOAD);
	bool both = false;
	for (int i = 0; i < 500 && !both; i++, tt_sleep_ms(20))
		both = remote_row(&a, "hB", longname, &row) && remote_row(&a, "hB", "orders.created", &row) &&
		       row.verdict == TALLY_VERDICT_OVERLOAD;
	cr_assert(both, "B's rows never reached A's remote section");

	/* 80x24: A's own subjects, then B's rows under HOST, with their age. */
	tmux_start(&t, a.name, "--sort name");
	l = tmux_wait_line(&t, "hB", "orders.created", screen, sizeof(screen), line, sizeof(line));
	cr_assert(l, "no row of host hB in top:\n%s", screen);
	expect_fits_80x24(screen);
	cr_expect(strstr(l, "overload") && strstr(l, "20.00ms") && has_age(l), "B's row, with its age: %s", l);
	cr_expect(!strstr(l, "stale"), "fresh: %s", l);
	int host_hdr = line_of(screen, "HOST"), local = line_of(screen, "orders.paid"),
	    remote = line_of(screen, "hB ");
	cr_expect(host_hdr > local && remote > host_hdr, "B's rows in their own block after A's subjects "
		  "(header %d, local %d, remote %d):\n%s", host_hdr, local, remote, screen);
	cr_expect(line_with(screen, "HOST", "AGE", line, sizeof(line)) &&
		  line_with(screen, "HOST", "VERDICT", line, sizeof(line)), "%s", screen);
	cr_expect(!line_with(screen, "hA ", "orders", line, sizeof(line)), "A's own rows are not remote:\n%s",
		  screen);
	/* the filter reaches the remote rows too */
	tmux_keys(&t, "/ w a r e Enter");
	cr_assert(tmux_wait(&t, "orders.created", true, screen, sizeof(screen)), "filter: %s", screen);
	cr_expect(line_with(screen, "hB", "warehouse", line, sizeof(line)), "%s", screen);
	tmux_keys(&t, "/ BSpace BSpace BSpace BSpace Enter");

	/* 60 columns: the long subject cut with a marker, the verdict whole. */
	tmux_start_cols(&narrow, a.name, "--sort name", 60);
	l = tmux_wait_line(&narrow, "hB", "warehouse.inv", screen, sizeof(screen), line, sizeof(line));
	cr_assert(l, "no cut row of hB at 60 columns:\n%s", screen);
	cr_expect(strstr(l, "\u2026") && !strstr(l, longname), "cut with a marker: %s", l);
	size_t ll = strlen(l);
	cr_expect(strstr(l, " ok ") || (ll > 3 && !strcmp(l + ll - 3, " ok")), "the whole verdict: %s", l);
	cr_expect(line_with(screen, "hB", "overload", line, sizeof(line)), "%s", screen);
	expect_fits_cols(screen, 60);
	tmux_stop(&narrow);

	/* B stops sharing (its puts in flight acknowledged first, none failed):
	 * its rows age past stale_after_ms and say so. */
	struct tally_share_status bst;
	tally_share_stop(&sb);
	cr_assert_eq(tally_read_share(b.seg, &bst), 0);
	cr_expect(!strcmp(bst.state, "stopped") && bst.puts >= 3 && bst.put_errors == 0,
		  "B's share stopped cleanly: %s, %llu puts, %llu failed (%s)", bst.state,
		  (unsigned long long)bst.puts, (unsigned long long)bst.put_errors, bst.last_error);
	for (int i = 0; i < 300 && !(remote_row(&a, "hB", "orders.created", &row) && row.stale); i++)
		tt_sleep_ms(20);
	cr_assert(row.stale, "B's row went stale in A's section (age %llu ms)", (unsigned long long)row.age_ms);
	l = tmux_wait_line(&t, "orders.created", "stale", screen, sizeof(screen), line, sizeof(line));
	cr_assert(l, "top marks B's stale row:\n%s", screen);
	cr_expect(strstr(l, "hB") && has_age(l), "%s", l);
	expect_fits_80x24(screen);
	tmux_keys(&t, "q");
	tmux_stop(&t);
	tally_share_stop(&sa);
	owner_stop(&b);
	owner_stop(&a);
	tally_test_nats_stop(&n);
}

Test(cli, top_needs_a_terminal, .timeout = 10)
{
	struct run r;

	TALLY(&r, NULL, "-s", "x", "top");
	cr_expect_eq(r.status, 4);
	cr_expect(strstr(r.err, "needs a terminal"), "%s", r.err);
}
