/* SPDX-License-Identifier: MIT */
/*
 * stress_load.c: the load scenario of RELIABILITY.md as a plain TAP
 * program (so that it also runs under ThreadSanitizer and ASan, where
 * Criterion cannot start or is in the way).
 *
 * The real tallyd (TALLY_TEST_BUILDDIR/tools/tallyd) owns the segment,
 * drains and publishes, polls a real nats-server (a JetStream stream with
 * consumers whose backlog is not zero) and serves /metrics on a loopback
 * port, which a thread of this program scrapes in a loop. Two producer
 * processes with TALLY_LOAD_THREADS threads each (default 3) record flat
 * out for TALLY_LOAD_SECONDS (default 5; 60 for the figure in
 * RELIABILITY.md). Checked:
 *  - nothing crashes; tallyd stops cleanly on SIGTERM (exit 0, and no
 *    sanitizer report in its log);
 *  - every drop is counted and reported: per thread, attempts = recorded +
 *    dropped; per slot, tally_read_producers() gives each thread's samples
 *    and drops; the sum of the drops equals the sum of the
 *    tally_producer_dropped_samples_total lines of /metrics; and once the
 *    producers are gone, tally_engine_drained_samples_total equals what
 *    they recorded (nothing lost that was not counted as dropped);
 *  - every scrape answers 200 with the engine's metrics in it; the poller
 *    polled without a failure and its consumers are live;
 *  - memory is flat: tallyd's VmRSS, sampled every second, ends no higher
 *    than after the warm-up (a fifth of the run, at least 1 s; 2 s in
 *    sanitizer builds) plus 1 MiB
 *    (8 MiB in sanitizer builds, whose allocators cache more; under ASan
 *    tallyd runs with a 1 MiB quarantine, see daemon_start; 24 MiB under
 *    valgrind, TALLY_VALGRIND=1, whose free list holds 20 MB).
 * The figures (samples/s, drops, scrapes, RSS series) are printed as TAP
 * comments.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <nats/nats.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/helpers.h"
#include "common/http.h"
#include "common/nats_server.h"
#include "common/tap.h"

#define TALLYD TALLY_TEST_BUILDDIR "/tools/tallyd"
#define NPROC 2
#define MAX_THREADS 16
#define NSUBJ 4

#include "sanitize.h"
#define SANITIZED (TALLY__ASAN || TALLY__TSAN)

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static unsigned env_u(const char *name, unsigned def, unsigned max)
{
	const char *v = getenv(name);
	char *end;
	unsigned long x;

	if (!v || !*v)
		return def;
	x = strtoul(v, &end, 10);
	return *end || x == 0 ? def : x > max ? max : (unsigned)x;
}

__attribute__((format(printf, 1, 2))) static void diag(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	tap_diag(buf);
	fflush(stdout);
}

/* ---- shared with the producer processes ----------------------------------- */

/* WAIT: forked, before the segment exists; ABORT: the setup failed. */
enum { PH_WAIT = 0, PH_RUN = 1, PH_STOP = 2, PH_DETACH = 3, PH_ABORT = 4 };

struct thread_result {
	_Atomic uint64_t attempts, recorded, dropped;
	_Atomic uint32_t slot;
	_Atomic int attach_rc;
};

struct load_shared {
	_Atomic int phase;
	_Atomic int stopped; /* threads that stored their counters */
	_Atomic int failed;  /* threads that could not attach */
	struct thread_result r[NPROC][MAX_THREADS];
};

struct prod_thread {
	struct tally_segment *seg;
	struct load_shared *sh;
	struct thread_result *res;
	tally_subject_t ids[NSUBJ];
	uint64_t seed;
};

static void *prod_main(void *arg)
{
	struct prod_thread *t = arg;
	struct tally_producer *p = NULL;
	struct tally_producer_counters c;
	uint64_t x = t->seed, n = 0;
	int rc = tally_producer_attach(t->seg, &p);

	if (rc) {
		atomic_store(&t->res->attach_rc, rc);
		atomic_fetch_add(&t->sh->failed, 1);
		return NULL;
	}
	while (atomic_load_explicit(&t->sh->phase, memory_order_relaxed) == PH_RUN) {
		for (int k = 0; k < 1024; k++) {
			x = x * 6364136223846793005ull + 1442695040888963407ull;
			/* 1 us .. 1 ms, a subject of NSUBJ */
			tally_record(p, t->ids[(x >> 60) % NSUBJ], 1000 + (x >> 44) % 1000000);
		}
		n += 1024;
	}
	tally_producer_counters(p, &c);
	atomic_store(&t->res->attempts, n);
	atomic_store(&t->res->recorded, c.recorded);
	atomic_store(&t->res->dropped, c.dropped);
	atomic_store(&t->res->slot, c.slot);
	atomic_fetch_add(&t->sh->stopped, 1);
	/* Stay attached until the parent has read the slots. */
	while (atomic_load(&t->sh->phase) == PH_STOP)
		tt_sleep_ms(5);
	tally_producer_detach(&p);
	return NULL;
}

/*
 * A producer process: nthreads threads recording flat out. Forked first
 * thing, while the test is still single-threaded (ThreadSanitizer does
 * not let a process forked from a multi-threaded one start threads, and
 * cnats keeps threads of its own): it waits for the go (PH_RUN) before it
 * opens the segment. Never returns.
 */
static void producer_process(const char *segname, struct load_shared *sh, int proc, unsigned nthreads)
{
	struct tally_segment *seg = NULL;
	struct prod_thread t[MAX_THREADS];
	pthread_t th[MAX_THREADS];
	char subj[32];

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	for (uint64_t end = mono_ms() + 120000; atomic_load(&sh->phase) == PH_WAIT; tt_sleep_ms(5))
		if (mono_ms() > end)
			_exit(5);
	if (atomic_load(&sh->phase) != PH_RUN)
		_exit(0);
	if (tally_segment_open(segname, TALLY_OPEN_PRODUCER, 5000, &seg)) {
		fprintf(stderr, "producer %d: %s\n", proc, tally_errmsg());
		_exit(2);
	}
	for (unsigned i = 0; i < nthreads; i++) {
		t[i] = (struct prod_thread){ .seg = seg, .sh = sh, .res = &sh->r[proc][i],
					     .seed = (uint64_t)proc * 1000 + i + 1 };
		for (int s = 0; s < NSUBJ; s++) {
			snprintf(subj, sizeof(subj), "load.s%d", s);
			if (tally_subject_intern(seg, subj, &t[i].ids[s]))
				_exit(3);
		}
		if (pthread_create(&th[i], NULL, prod_main, &t[i]))
			_exit(4);
	}
	for (unsigned i = 0; i < nthreads; i++)
		pthread_join(th[i], NULL);
	tally_segment_close(&seg);
	_exit(0);
}

/* ---- tallyd ------------------------------------------------------------------ */

struct daemon {
	pid_t pid;
	int port;
	char dir[64], cfg[128], log[128], seg[128];
};

static const char *logtext(const struct daemon *d)
{
	static char buf[1 << 17];
	size_t n = 0;
	FILE *f = fopen(d->log, "r");

	if (f) {
		n = fread(buf, 1, sizeof(buf) - 1, f);
		fclose(f);
	}
	buf[n] = '\0';
	return buf;
}

static int daemon_start(struct daemon *d, const char *nats_url)
{
	FILE *f;
	const char *ready;

	snprintf(d->dir, sizeof(d->dir), "/tmp/tally-load-XXXXXX");
	if (!mkdtemp(d->dir))
		return -errno;
	snprintf(d->cfg, sizeof(d->cfg), "%s/tallyd.ini", d->dir);
	snprintf(d->log, sizeof(d->log), "%s/tallyd.log", d->dir);
	if (!(f = fopen(d->cfg, "w")))
		return -errno;
	fprintf(f, "[segment]\nproducer_slots = 16\nsubject_capacity = 64\npending_capacity = 16\n"
		   "producer_cooloff_ms = 200\n[engine]\npublish_interval_ms = 100\n"
		   "[http]\nlisten = 127.0.0.1:0\n[nats]\npoll_interval_ms = 100\n"
		   "request_timeout_ms = 10000\n" /* valgrind slows tallyd 20-50x */
		   "[watch LOAD]\n");
	fclose(f);
	d->pid = fork();
	if (d->pid < 0)
		return -errno;
	if (d->pid == 0) {
		int fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND, 0600);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
			_exit(127);
		if (SANITIZED) {
			/* ASan's quarantine (256 MiB) keeps every freed block for a
			 * while: tallyd's RSS would grow by each scrape's buffers
			 * until it is full. 1 MiB lets RSS say what it says in a
			 * plain build. */
			static char env[1024];
			const char *old = getenv("ASAN_OPTIONS");
			snprintf(env, sizeof(env), "%s%squarantine_size_mb=1", old ? old : "",
				 old && *old ? ":" : "");
			setenv("ASAN_OPTIONS", env, 1);
		}
		execl(TALLYD, TALLYD, "-c", d->cfg, "-s", d->seg, "--nats", nats_url, (char *)NULL);
		_exit(127);
	}
	for (uint64_t end = mono_ms() + 20000; mono_ms() < end; tt_sleep_ms(20)) {
		if (waitpid(d->pid, NULL, WNOHANG) == d->pid) {
			d->pid = 0;
			return -ECHILD;
		}
		if ((ready = strstr(logtext(d), "http://127.0.0.1:"))) {
			d->port = atoi(ready + strlen("http://127.0.0.1:"));
			return d->port > 0 ? 0 : -EPROTO;
		}
	}
	return -ETIMEDOUT;
}

/* SIGTERM; the exit status (128 + signal when killed), -1 if it hung. */
static int daemon_stop(struct daemon *d)
{
	int status = 0;

	if (d->pid <= 0)
		return -1;
	kill(d->pid, SIGTERM);
	for (uint64_t end = mono_ms() + 20000; mono_ms() < end; tt_sleep_ms(10))
		if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
			d->pid = 0;
			return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		}
	kill(d->pid, SIGKILL);
	waitpid(d->pid, &status, 0);
	d->pid = 0;
	return -1;
}

static void daemon_cleanup(struct daemon *d)
{
	tally_segment_unlink(d->seg);
	unlink(d->cfg);
	unlink(d->log);
	rmdir(d->dir);
}

/* VmRSS of pid in KiB, 0 if unreadable. */
static uint64_t rss_kib(pid_t pid)
{
	char path[64], line[256];
	uint64_t kib = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	if (!(f = fopen(path, "r")))
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %" SCNu64, &kib) == 1)
			break;
	fclose(f);
	return kib;
}

/* ---- /metrics ------------------------------------------------------------------ */

/* Sum of the values of every sample of metric `name` (with or without labels). */
static bool metric_sum(const char *body, const char *name, uint64_t *sum)
{
	size_t n = strlen(name);
	bool found = false;

	*sum = 0;
	for (const char *l = body; l && *l; l = strchr(l, '\n'), l = l ? l + 1 : NULL) {
		if (strncmp(l, name, n) != 0 || (l[n] != ' ' && l[n] != '{'))
			continue;
		const char *eol = strchr(l, '\n');
		const char *sp = eol ? eol : l + strlen(l);
		while (sp > l && sp[-1] != ' ')
			sp--;
		*sum += strtoull(sp, NULL, 10);
		found = true;
	}
	return found;
}

struct scraper {
	int port;
	atomic_bool stop;
	uint64_t ok, failed, bytes;
	int last_status;
};

static void *scrape_main(void *arg)
{
	struct scraper *s = arg;

	while (!atomic_load(&s->stop)) {
		char *reply = NULL;
		int st = tt_http(s->port, "GET", "/metrics", &reply);

		if (st == 200 && reply && strstr(tt_http_body(reply), "tally_engine_drained_samples_total")) {
			s->ok++;
			s->bytes += strlen(reply);
		} else {
			s->failed++;
			s->last_status = st;
		}
		free(reply);
	}
	return NULL;
}

static char *scrape_once(int port)
{
	char *reply = NULL;

	if (tt_http(port, "GET", "/metrics", &reply) != 200) {
		free(reply);
		return NULL;
	}
	return reply;
}

/* ---- JetStream: a stream with consumers that have a backlog --------------------- */

static int js_setup(const char *url)
{
	natsConnection *nc = NULL;
	jsCtx *js = NULL;
	jsStreamConfig sc;
	jsConsumerConfig cc;
	jsErrCode ec = 0;
	const char *subj = "load.>";
	char durable[16], filter[16];
	int rc = -1;

	if (natsConnection_ConnectTo(&nc, url) != NATS_OK || natsConnection_JetStream(&js, nc, NULL) != NATS_OK)
		goto out;
	jsStreamConfig_Init(&sc);
	sc.Name = "LOAD";
	sc.Subjects = &subj;
	sc.SubjectsLen = 1;
	if (js_AddStream(NULL, js, &sc, NULL, &ec) != NATS_OK)
		goto out;
	for (int i = 0; i < NSUBJ; i++) {
		jsConsumerConfig_Init(&cc);
		snprintf(durable, sizeof(durable), "c%d", i);
		snprintf(filter, sizeof(filter), "load.s%d", i);
		cc.Durable = durable;
		cc.AckPolicy = js_AckExplicit;
		cc.FilterSubject = filter;
		if (js_AddConsumer(NULL, js, "LOAD", &cc, NULL, &ec) != NATS_OK)
			goto out;
		for (int m = 0; m < 10 * (i + 1); m++)
			if (js_Publish(NULL, js, filter, "x", 1, NULL, &ec) != NATS_OK)
				goto out;
	}
	rc = 0;
out:
	jsCtx_Destroy(js);
	natsConnection_Destroy(nc);
	return rc;
}

/* ---- the scenario ----------------------------------------------------------------- */

/* Sum of total_count over the load subjects as last published. */
static uint64_t subjects_total(struct tally_segment *seg)
{
	uint64_t total = 0;

	for (int s = 0; s < NSUBJ; s++) {
		struct tally_subject_stats st;
		tally_subject_t id;
		char name[32];

		snprintf(name, sizeof(name), "load.s%d", s);
		if (tally_subject_lookup(seg, name, &id) == 0 && tally_read_subject(seg, id, &st) == 0)
			total += st.total_count;
	}
	return total;
}

struct totals {
	uint64_t attempts, recorded, dropped;
};

static bool check_slots(struct tally_segment *seg, struct load_shared *sh, unsigned nthreads,
			const pid_t *pids, struct totals *t)
{
	struct tally_producer_stats ps[16];
	int n = tally_read_producers(seg, ps, 16);
	uint64_t slot_dropped = 0;
	bool per_thread = true;

	if (n < 0)
		return false;
	memset(t, 0, sizeof(*t));
	for (int p = 0; p < NPROC; p++)
		for (unsigned i = 0; i < nthreads; i++) {
			struct thread_result *r = &sh->r[p][i];
			bool seen = false;

			t->attempts += r->attempts;
			t->recorded += r->recorded;
			t->dropped += r->dropped;
			per_thread &= r->attempts == r->recorded + r->dropped;
			for (int k = 0; k < n; k++)
				if (ps[k].slot == r->slot && ps[k].pid == pids[p]) {
					seen = true;
					per_thread &= ps[k].samples == r->recorded && ps[k].dropped == r->dropped;
				}
			per_thread &= seen;
		}
	for (int k = 0; k < n; k++)
		slot_dropped += ps[k].dropped;
	tap_ok(per_thread, "per thread: attempts = recorded + dropped, and its slot reports the same "
	       "samples and drops (%d slots)", n);
	return tap_ok(slot_dropped == t->dropped, "drops in the slots %" PRIu64 " = drops the "
		      "producers counted %" PRIu64, slot_dropped, t->dropped);
}

int main(void)
{
	unsigned seconds = env_u("TALLY_LOAD_SECONDS", 5, 3600);
	unsigned nthreads = env_u("TALLY_LOAD_THREADS", 3, MAX_THREADS);
	/* TSan's shadow memory takes about 2 s to settle */
	unsigned warm = seconds / 5 > (SANITIZED ? 2u : 1u) ? seconds / 5 : SANITIZED ? 2u : 1u;
	/* valgrind (tests/run-valgrind) holds up to 20 MB of freed blocks
	 * before it reuses them (--freelist-vol) */
	uint64_t margin_kib = getenv("TALLY_VALGRIND") ? 24576 : SANITIZED ? 8192 : 1024;
	struct tally_test_nats srv;
	struct daemon d;
	struct scraper sc;
	struct tally_segment *seg = NULL;
	struct load_shared *sh;
	struct totals t;
	pid_t pids[NPROC];
	uint64_t *rss = calloc(seconds + 2, sizeof(*rss));
	int rc;

	setvbuf(stdout, NULL, _IOLBF, 0);
	memset(&srv, 0, sizeof(srv));
	memset(&d, 0, sizeof(d));
	memset(&sc, 0, sizeof(sc));
	snprintf(d.seg, sizeof(d.seg), "%s", tt_segname("load"));
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		return 99;
	memset(sh, 0, sizeof(*sh));
	for (int p = 0; p < NPROC; p++) {
		pids[p] = fork();
		if (pids[p] == 0)
			producer_process(d.seg, sh, p, nthreads);
	}
	diag("load: %u s, %d producer processes x %u threads, tallyd %s", seconds, NPROC, nthreads, TALLYD);
	rc = tally_test_nats_start(&srv, NULL, true);
	if (!tap_ok(rc == 0, "nats-server started (%s)", rc ? srv.errmsg : srv.url))
		goto plan;
	if (!tap_ok(js_setup(srv.url) == 0, "JetStream stream LOAD with %d consumers", NSUBJ))
		goto nats;
	rc = daemon_start(&d, srv.url);
	if (!tap_ok(rc == 0, "tallyd ready, /metrics on port %d (%s)", d.port, rc ? strerror(-rc) : "ok")) {
		printf("%s", logtext(&d));
		goto tallyd;
	}
	if (!tap_ok(tally_segment_open(d.seg, TALLY_OPEN_READER, 5000, &seg) == 0, "segment %s opened "
		    "read-only", d.seg))
		goto tallyd;

	sc.port = d.port;
	pthread_t scth;
	pthread_create(&scth, NULL, scrape_main, &sc);
	atomic_store(&sh->phase, PH_RUN);
	/* the run: one RSS sample a second */
	uint64_t t0 = mono_ms();
	for (unsigned s = 0; s <= seconds; s++) {
		while (mono_ms() < t0 + (uint64_t)s * 1000u)
			tt_sleep_ms(5);
		rss[s] = rss_kib(d.pid);
	}
	atomic_store(&sh->phase, PH_STOP);
	uint64_t run_ms = mono_ms() - t0;
	for (uint64_t end = mono_ms() + 30000; mono_ms() < end; tt_sleep_ms(5))
		if (atomic_load(&sh->stopped) + atomic_load(&sh->failed) == NPROC * (int)nthreads)
			break;
	tap_ok(atomic_load(&sh->failed) == 0 && atomic_load(&sh->stopped) == NPROC * (int)nthreads,
	       "all %u producer threads attached and stopped (%d failed)", NPROC * nthreads,
	       atomic_load(&sh->failed));

	/* Drops: counted by the producers, by the slots, by /metrics. */
	check_slots(seg, sh, nthreads, pids, &t);
	char *m = scrape_once(d.port);
	uint64_t mdropped = 0;
	bool mfound = m && metric_sum(tt_http_body(m), "tally_producer_dropped_samples_total", &mdropped);
	tap_ok(mfound && mdropped == t.dropped, "/metrics: tally_producer_dropped_samples_total sums to %" PRIu64
	       " = %" PRIu64, mdropped, t.dropped);
	free(m);

	atomic_store(&sh->phase, PH_DETACH);
	bool exits = true;
	for (int p = 0; p < NPROC; p++) {
		int st = 0;
		exits &= waitpid(pids[p], &st, 0) == pids[p] && WIFEXITED(st) && WEXITSTATUS(st) == 0;
	}
	tap_ok(exits, "producer processes detached and exited 0");

	/* Nothing lost but what was counted as dropped. */
	uint64_t drained = 0;
	for (uint64_t end = mono_ms() + 20000; mono_ms() < end; tt_sleep_ms(50)) {
		if ((m = scrape_once(d.port)))
			metric_sum(tt_http_body(m), "tally_engine_drained_samples_total", &drained);
		free(m);
		if (drained >= t.recorded)
			break;
	}
	tap_ok(drained == t.recorded, "tallyd drained %" PRIu64 " = recorded %" PRIu64, drained, t.recorded);
	uint64_t total = 0;
	for (uint64_t end = mono_ms() + 5000; mono_ms() < end && total != t.recorded; tt_sleep_ms(50))
		total = subjects_total(seg);
	tap_ok(total == t.recorded, "subjects' total_count sums to %" PRIu64 " = recorded", total);

	atomic_store(&sc.stop, true);
	pthread_join(scth, NULL);
	tap_ok(sc.ok > 0 && sc.failed == 0, "%" PRIu64 " scrapes of /metrics answered 200, %" PRIu64
	       " failed (last status %d)", sc.ok, sc.failed, sc.last_status);

	struct tally_poller_stats ps;
	struct tally_consumer_stats cs[8];
	int nc = tally_read_consumers(seg, cs, 8), live = 0;
	for (int i = 0; i < nc; i++)
		live += strcmp(cs[i].source, "live") == 0 && cs[i].num_pending > 0;
	memset(&ps, 0, sizeof(ps));
	int prc = tally_read_poller(seg, &ps);
	tap_ok(prc == 0 && ps.polls_ok > 0 && ps.polls_failed == 0 &&
	       live == NSUBJ, "poller: %" PRIu64 " polls ok, %" PRIu64 " failed; %d of %d consumers live "
	       "with a backlog", ps.polls_ok, ps.polls_failed, live, NSUBJ);
	if (ps.polls_failed) /* why, from tallyd's own log */
		for (const char *l = logtext(&d), *e; *l; l = e + (*e != '\0')) {
			e = l + strcspn(l, "\n");
			if (memmem(l, (size_t)(e - l), "poll", 4))
				printf("# tallyd: %.*s\n", (int)(e - l), l);
		}

	/* Memory flat after the warm-up. */
	char series[1024];
	size_t o = 0;
	for (unsigned s = 0; s <= seconds && o < sizeof(series) - 16; s++)
		o += (size_t)snprintf(series + o, sizeof(series) - o, "%s%" PRIu64, s ? " " : "", rss[s]);
	diag("tallyd VmRSS KiB, one a second: %s", series);
	tap_ok(rss[warm] > 0 && rss[seconds] <= rss[warm] + margin_kib, "tallyd RSS flat: %" PRIu64
	       " KiB after %u s of warm-up, %" PRIu64 " KiB at the end (margin %" PRIu64 " KiB)",
	       rss[warm], warm, rss[seconds], margin_kib);

	double secs = (double)run_ms / 1000.0;
	diag("figures: %.1f s, %" PRIu64 " attempts (%.1f M/s), %" PRIu64 " recorded and drained "
	     "(%.1f M/s), %" PRIu64 " dropped (%.1f%%), %" PRIu64 " scrapes (%.1f/s, %.1f KiB each)",
	     secs, t.attempts, (double)t.attempts / secs / 1e6, t.recorded,
	     (double)t.recorded / secs / 1e6, t.dropped,
	     t.attempts ? 100.0 * (double)t.dropped / (double)t.attempts : 0.0, sc.ok,
	     (double)sc.ok / secs, sc.ok ? (double)sc.bytes / (double)sc.ok / 1024.0 : 0.0);
	tally_segment_close(&seg);
tallyd:;
	int st = daemon_stop(&d);
	const char *log = logtext(&d);
	bool clean = !strstr(log, "Sanitizer") && !strstr(log, "runtime error");
	if (!tap_ok(st == 0 && clean, "tallyd stopped on SIGTERM with status %d, no sanitizer report", st))
		printf("%s", log);
	daemon_cleanup(&d);
nats:
	tally_test_nats_stop(&srv);
plan:
	if (atomic_load(&sh->phase) != PH_DETACH) { /* the setup failed */
		atomic_store(&sh->phase, PH_ABORT);
		for (int p = 0; p < NPROC; p++)
			waitpid(pids[p], NULL, 0);
	}
	munmap(sh, sizeof(*sh));
	free(rss);
	tap_plan(tap_n);
	return tap_done();
}
