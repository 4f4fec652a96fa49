/* SPDX-License-Identifier: MIT */
/*
 * tally_record.c: tally record, a batch import as a producer of the
 * segment, from arguments or from "SUBJECT NS" lines on stdin.
 *
 * A batch import is not a hot path, so unlike a router thread it never
 * drops a sample: when the ring is full it waits for the owner to drain
 * (a short spin, then sleeps growing to a few ms) and stores the same
 * sample again. It gives up only with an error, when no room appears for
 * --wait-timeout seconds or the owner is no longer alive, and says which
 * line it stopped at. At the end it waits (bounded the same way) until
 * the owner has drained everything it stored and published a snapshot
 * that holds it, so that its summary is what the owner counted and a
 * tally stat right after shows every sample. On a terminal it shows its
 * progress on stderr once a second.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"

#define WAIT_TIMEOUT_DEFAULT_S 10.0
#define WAIT_SPINS 200                /* busy checks before the first sleep */
#define WAIT_SLEEP_MIN_NS 10000u      /* 10 us */
#define WAIT_SLEEP_MAX_NS 4000000u    /* 4 ms */
#define OWNER_CHECK_NS 100000000u     /* is the owner alive? at most every 100 ms */
#define PROGRESS_NS 1000000000u       /* a progress line every second on a tty */

static const char record_help[] =
	"usage: tally record [-s SEGMENT] [--wait-timeout SECONDS] SUBJECT NS...\n"
	"       tally record [-s SEGMENT] [--wait-timeout SECONDS] < LINES\n"
	"\n"
	"Record latencies in nanoseconds as a producer of the segment: the values\n"
	"given for SUBJECT, or with no operand \"SUBJECT NS\" lines from stdin until\n"
	"EOF (blank lines and lines starting with # are skipped). A bad line is\n"
	"reported with its line number and skipped; the rest is recorded.\n"
	"\n"
	"Nothing is dropped: when the segment's ring is full, record waits for the\n"
	"owner (tallyd) to drain it. If no room appears for the wait timeout, or\n"
	"the owner dies and no new one starts in that time, it stops with an\n"
	"error that names the line it stopped at (exit 4); the lines before it\n"
	"were recorded. If a new owner takes the segment over (a restart), record\n"
	"goes on into it: values the old owner had not drained are lost, and\n"
	"counted as lost; those it drained are in its figures, not the new\n"
	"owner's. At the end it waits until\n"
	"the owner has drained and published everything, then prints how many\n"
	"values were recorded, rejected and dropped (always 0), and how many were\n"
	"clamped to the segment's max_value_ms, so that a tally stat right after\n"
	"shows them all. On a terminal it shows its progress on\n"
	"stderr.\n"
	"\n"
	"  -s, --segment NAME        segment (default $TALLY_SEGMENT, else \"tally\")\n"
	"  -w, --wait-timeout SECONDS  how long to wait for the owner to make room\n"
	"                            in the ring, or to drain it at the end, before\n"
	"                            giving up (default 10; decimals allowed)\n"
	"  -h, --help                this help\n"
	"\n"
	"exit status: 0 all recorded, 1 some lines rejected or values lost to a\n"
	"restart of the owner, 2 bad usage,\n"
	"4 error (no segment, no permission, no free producer slot, the owner\n"
	"stopped draining or died, ...)\n";

struct recorder {
	const char *name; /* segment */
	const char *unit; /* "lines" (stdin) or "values" (arguments) */
	struct tally_segment *seg;
	struct tally_producer *p;
	uint64_t timeout_ns;
	uint64_t lines, recorded, rejected;
	tally_subject_t last_id;
	char last_subject[TALLY_SUBJECT_MAX + 1]; /* its name: ids differ in a new owner's segment */
	uint64_t refused;     /* records refused while no owner ran (retried: not lost) */
	bool any;             /* last_id is set */
	bool tty;             /* progress on stderr */
	bool progress_shown;
	uint64_t next_progress_ns;
};

/* ---- waiting for the owner ------------------------------------------------ */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield" ::: "memory");
#else
	__asm__ __volatile__("" ::: "memory");
#endif
}

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = { (time_t)(ns / 1000000000u), (long)(ns % 1000000000u) };

	nanosleep(&ts, NULL);
}

/* Entries stored and not yet drained. Acquire: pairs with the owner's
 * release of head (the entries it has consumed are no longer read). */
static uint64_t ring_backlog(const struct tally_producer *p)
{
	return p->tail - __atomic_load_n(p->shm_head, __ATOMIC_ACQUIRE);
}

/* Room for one more? The producer's cached view first: while it says so
 * there is no need to touch the owner's cache line. A capacity of 0 means
 * the library wants the handle's slow path (its owner restarted): no room
 * until the heartbeat in wait_for() has moved the handle. */
static bool ring_has_room(const struct tally_producer *p)
{
	uint64_t cap = __atomic_load_n(&p->capacity, __ATOMIC_RELAXED);

	return cap && (p->tail - p->cached_head < cap || ring_backlog(p) < cap);
}

static void progress(struct recorder *r, uint64_t now)
{
	if (!r->tty || now < r->next_progress_ns)
		return;
	if (r->next_progress_ns) { /* not on the first call: short inputs stay quiet */
		fprintf(stderr, "\rtally record: %" PRIu64 " lines read, %" PRIu64 " recorded\033[K",
			r->lines, r->recorded);
		r->progress_shown = true;
	}
	r->next_progress_ns = now + PROGRESS_NS;
}

static void progress_clear(struct recorder *r)
{
	if (r->progress_shown)
		fputs("\r\033[K", stderr);
	r->progress_shown = false;
}

/* "its owner (pid N)", or "its owner" when the header does not say. */
static const char *owner_of(const struct recorder *r, char *buf, size_t len)
{
	struct tally_segment_info in;

	if (tally_segment_info(r->seg, &in) == 0 && in.owner_pid > 0)
		snprintf(buf, len, "its owner (pid %d)", (int)in.owner_pid);
	else
		snprintf(buf, len, "its owner");
	return buf;
}

enum stall { STALL_NONE, STALL_TIMEOUT, STALL_OWNER_GONE };

/*
 * Wait until done(p) holds: a bounded backoff that checks the owner while
 * it waits, through the handle's heartbeat: when the owner restarted
 * (a new segment of the same name), the heartbeat moves the handle there
 * and the wait goes on. STALL_NONE once it holds, STALL_TIMEOUT after
 * r->timeout_ns without it, STALL_OWNER_GONE when no owner has come back
 * within that time either.
 */
static enum stall wait_for(struct recorder *r, bool (*done)(const struct recorder *))
{
	uint64_t start = 0, next_check = 0, nap = WAIT_SLEEP_MIN_NS;
	bool orphaned = false;

	for (unsigned spins = 0; !done(r); spins++) {
		if (spins < WAIT_SPINS) {
			cpu_relax();
			continue;
		}
		uint64_t now = tally_now_ns();
		if (!start)
			start = now;
		if (now >= next_check) {
			orphaned = tally_producer_heartbeat(r->p) == TALLY_EOWNERDEAD;
			next_check = now + OWNER_CHECK_NS;
			if (done(r))
				break;
		}
		if (now - start >= r->timeout_ns)
			return done(r) ? STALL_NONE : orphaned ? STALL_OWNER_GONE : STALL_TIMEOUT;
		progress(r, now);
		sleep_ns(nap);
		nap = nap * 2 < WAIT_SLEEP_MAX_NS ? nap * 2 : WAIT_SLEEP_MAX_NS;
	}
	return STALL_NONE;
}

static bool has_room(const struct recorder *r)
{
	return ring_has_room(r->p);
}

static bool drained(const struct recorder *r)
{
	return ring_backlog(r->p) == 0;
}

/* Tell what happened, where, and what to do. Returns CLI_EXIT_ERROR. */
static int stall_fail(struct recorder *r, enum stall why, const char *where)
{
	uint64_t waiting = ring_backlog(r->p);
	char owner[48];

	progress_clear(r);
	owner_of(r, owner, sizeof(owner));
	if (why == STALL_TIMEOUT)
		fprintf(stderr, "tally: segment \"%s\": %s stopped draining: no room in the ring for %.3g s\n",
			r->name, owner, (double)r->timeout_ns / 1e9);
	else
		fprintf(stderr, "tally: segment \"%s\": %s is not running any more (dead or stopped), "
				"and no new owner came within %.3g s\n",
			r->name, owner, (double)r->timeout_ns / 1e9);
	if (where)
		fprintf(stderr, "tally: stopped at %s, not recorded; %" PRIu64 " %s recorded before it",
			where, r->recorded, r->unit);
	else
		fprintf(stderr, "tally: stopped at the end of the input; %" PRIu64 " %s recorded",
			r->recorded, r->unit);
	fprintf(stderr, ", %" PRIu64 " of them not yet drained\n", waiting);
	fprintf(stderr, "tally: check the owner (tally -s %s stat; is tallyd stopped, overloaded or gone?), "
			"then record the input again%s%s%s\n",
		r->name, where ? " from " : "", where ? where : "",
		why == STALL_TIMEOUT ? ", or give it longer with --wait-timeout" : "");
	return CLI_EXIT_ERROR;
}

/*
 * After the last value: wait until the owner has drained the ring, then
 * until it has published a snapshot stamped after that. The engine reads
 * the time, drains, then publishes stamped with that time, so a stamp
 * later than the moment the ring was seen empty belongs to a snapshot
 * built after the last drain: it holds every value. 0 or CLI_EXIT_ERROR.
 */
static int wait_drained(struct recorder *r)
{
	enum stall why = wait_for(r, drained);

	if (why != STALL_NONE)
		return stall_fail(r, why, NULL);
	if (!r->any)
		return 0;
	uint64_t t = tally_now_ns(), end = t + r->timeout_ns;
	struct tally_producer_counters pc;
	tally_producer_counters(r->p, &pc);
	/* after an owner restart the values are in the new segment, by name */
	struct tally_segment *now_seg = NULL;
	tally_subject_t id = r->last_id;
	if (pc.moves && (tally_segment_open(r->name, TALLY_OPEN_READER, 1000, &now_seg) != 0 ||
			 tally_subject_lookup(now_seg, r->last_subject, &id) != 0)) {
		tally_segment_close(&now_seg);
		return 0; /* drained into the new owner; nothing more to wait for */
	}
	const struct tally_segment *rs = now_seg ? now_seg : r->seg;
	for (unsigned nap = 1;; nap = nap < 16 ? nap * 2 : 16) {
		struct tally_subject_stats st;
		int rc = tally_read_subject(rs, id, &st);
		if ((rc == 0 || rc == TALLY_ESTALE) && st.published_ns > t) {
			tally_segment_close(&now_seg);
			return 0;
		}
		if (tally_now_ns() >= end || tally_segment_owner_alive(rs) != 1) {
			tally_segment_close(&now_seg);
			char owner[48];
			progress_clear(r);
			fprintf(stderr, "tally: segment \"%s\": all %" PRIu64 " values were drained but %s "
					"published no snapshot within %.3g s: a tally stat now may not show them "
					"yet; check the owner (tally -s %s stat)\n",
				r->name, r->recorded, owner_of(r, owner, sizeof(owner)),
				(double)r->timeout_ns / 1e9, r->name);
			return CLI_EXIT_ERROR;
		}
		sleep_ns(nap * 1000000u);
	}
}

/* ---- one value, one line ---------------------------------------------------- */

enum { ONE_OK = 0, ONE_REJECTED = 1 }; /* or CLI_EXIT_ERROR: stop */

static int record_one(struct recorder *r, const char *subject, const char *value, const char *where)
{
	tally_subject_t id;
	uint64_t ns;

	if (cli_parse_u64(value, &ns)) {
		progress_clear(r);
		fprintf(stderr, "tally: %s: \"%s\" is not a latency in nanoseconds (a whole number >= 0)\n",
			where, value);
		return ONE_REJECTED;
	}
	int rc = tally_subject_intern(r->seg, subject, &id);
	if (rc) {
		progress_clear(r);
		fprintf(stderr, "tally: %s: %s\n", where,
			*tally_errmsg() ? tally_errmsg() : tally_strerror(rc));
		return ONE_REJECTED;
	}
	/* Room first, so that tally_record() never counts a drop: it stores
	 * (refreshing its cached head if need be) once there is room. */
	for (;;) {
		if (ring_has_room(r->p)) {
			if (tally_record(r->p, id, ns))
				break;
			/* refused: the owner is gone for now (the library counts
			 * it lost); we wait and store the same value again */
			r->refused++;
		}
		enum stall why = wait_for(r, has_room);
		if (why != STALL_NONE)
			return stall_fail(r, why, where);
	}
	r->recorded++;
	r->last_id = id;
	if (!r->any || strcmp(r->last_subject, subject) != 0)
		snprintf(r->last_subject, sizeof(r->last_subject), "%s", subject);
	r->any = true;
	return ONE_OK;
}

/* Skip the rest of a line too long for the buffer. */
static void skip_line(void)
{
	int c;

	while ((c = getchar()) != EOF && c != '\n')
		;
}

/* One line of stdin: ONE_OK (also blank and comment lines), ONE_REJECTED, or stop. */
static int record_line(struct recorder *r, char *line, const char *where)
{
	char *subject, *value, *extra, *save;

	subject = strtok_r(line, " \t\r\n", &save);
	if (!subject || subject[0] == '#')
		return ONE_OK;
	value = strtok_r(NULL, " \t\r\n", &save);
	extra = strtok_r(NULL, " \t\r\n", &save);
	if (!value || extra) {
		progress_clear(r);
		fprintf(stderr, "tally: %s: expected \"SUBJECT NS\"\n", where);
		return ONE_REJECTED;
	}
	return record_one(r, subject, value, where);
}

/* Every line of stdin: 0, or CLI_EXIT_ERROR when it had to stop. */
static int record_stdin(struct recorder *r)
{
	char line[1024], where[64];

	while (fgets(line, sizeof(line), stdin)) {
		int rc;
		r->lines++;
		snprintf(where, sizeof(where), "stdin:%" PRIu64, r->lines);
		if (!strchr(line, '\n') && !feof(stdin)) {
			progress_clear(r);
			fprintf(stderr, "tally: %s: line longer than %zu bytes\n", where, sizeof(line) - 2);
			skip_line();
			rc = ONE_REJECTED;
		} else {
			rc = record_line(r, line, where);
		}
		if (rc == ONE_REJECTED)
			r->rejected++;
		else if (rc != ONE_OK)
			return rc;
		if (r->tty && (r->lines & 1023) == 0)
			progress(r, tally_now_ns());
	}
	return 0;
}

static int record_args(struct recorder *r, int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		char where[32];
		snprintf(where, sizeof(where), "value %d", i);
		int rc = record_one(r, argv[0], argv[i], where);
		if (rc == ONE_REJECTED)
			r->rejected++;
		else if (rc != ONE_OK)
			return rc;
	}
	return 0;
}

/* ---- the command -------------------------------------------------------------- */

/* A timeout in seconds, > 0 and at most a day: 0 or -1. */
static int parse_seconds(const char *s, uint64_t *ns)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || !isfinite(v) || v <= 0 || v > 86400)
		return -1;
	*ns = (uint64_t)(v * 1e9);
	return 0;
}

/* Options: -1 to go on (optind at the operands), else the exit status. */
static int record_opts(struct recorder *r, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "segment", required_argument, NULL, 's' },
		{ "wait-timeout", required_argument, NULL, 'w' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	optind = 0;
	while ((c = getopt_long(argc, argv, "+s:w:h", opts, NULL)) != -1) {
		switch (c) {
		case 's':
			r->name = optarg;
			break;
		case 'w':
			if (parse_seconds(optarg, &r->timeout_ns) == 0)
				break;
			fprintf(stderr, "tally record: --wait-timeout \"%s\": give seconds, more than 0 "
					"and at most 86400\n", optarg);
			fputs(record_help, stderr);
			return CLI_EXIT_USAGE;
		case 'h':
			fputs(record_help, stdout);
			return CLI_EXIT_OK;
		default:
			fputs(record_help, stderr);
			return CLI_EXIT_USAGE;
		}
	}
	return -1;
}

/* Slots that a producer released and that are coming back (the owner
 * frees them after its cool-off): waiting for one of them helps. */
static uint32_t slots_returning(struct tally_segment *seg)
{
	struct tally_segment_info in;
	uint32_t k = 0;

	if (tally_segment_info(seg, &in))
		return 0;
	struct tally_producer_stats *ps = calloc(in.config.producer_slots, sizeof(*ps));
	int n = ps ? tally_read_producers(seg, ps, in.config.producer_slots) : 0;
	for (int i = 0; i < n; i++)
		k += strcmp(ps[i].state, "active") != 0 && strcmp(ps[i].state, "claiming") != 0;
	free(ps);
	return k;
}

/* Attach; when every slot is taken but some are only returning (a
 * record that just ended, say), wait for one, up to the wait timeout. */
static int record_attach(struct recorder *r)
{
	int rc = tally_segment_open(r->name, TALLY_OPEN_PRODUCER, 1000, &r->seg);
	uint64_t deadline = tally_now_ns() + r->timeout_ns;
	bool told = false;

	if (rc)
		return cli_fail(r->name, rc);
	while ((rc = tally_producer_attach(r->seg, &r->p)) == TALLY_EFULL && slots_returning(r->seg) &&
	       tally_now_ns() < deadline) {
		if (!told && isatty(STDERR_FILENO))
			fprintf(stderr, "tally record: every producer slot of \"%s\" is taken; waiting for a "
				"released one to come back\n", r->name);
		told = true;
		struct timespec ts = { 0, 20 * 1000000 };
		nanosleep(&ts, NULL);
	}
	if (rc) {
		cli_fail(r->name, rc);
		tally_segment_close(&r->seg);
		return CLI_EXIT_ERROR;
	}
	return 0;
}

int tally_cmd_record(const char *segment, int argc, char **argv)
{
	struct recorder r = { .name = segment, .timeout_ns = (uint64_t)(WAIT_TIMEOUT_DEFAULT_S * 1e9) };
	struct tally_producer_counters pc;
	int rc = record_opts(&r, argc, argv);

	if (rc >= 0)
		return rc;
	argc -= optind;
	argv += optind;
	if (argc == 1) {
		fprintf(stderr, "tally record %s: give at least one value in ns, or none to read stdin\n",
			argv[0]);
		fputs(record_help, stderr);
		return CLI_EXIT_USAGE;
	}
	/* The subject first: a bad one is named as the subject, not as the
	 * position of the first value, and nothing is recorded. */
	if (argc >= 2 && tally_subject_validate(argv[0], false) != 0) {
		fprintf(stderr, "tally record: SUBJECT: %s\n", tally_errmsg());
		return CLI_EXIT_USAGE;
	}
	if ((rc = record_attach(&r)))
		return rc;
	r.tty = isatty(STDERR_FILENO);
	progress(&r, tally_now_ns());
	r.unit = argc == 0 ? "lines" : "values";
	rc = argc == 0 ? record_stdin(&r) : record_args(&r, argc, argv);
	if (rc == 0)
		rc = wait_drained(&r);
	progress_clear(&r);
	tally_producer_counters(r.p, &pc);
	tally_producer_detach(&r.p);
	struct tally_segment_info si;
	tally_segment_info(r.seg, &si);
	tally_segment_close(&r.seg);
	if (rc)
		return rc;
	/* A restart of the owner while we recorded: what we had stored in the
	 * old owner's ring and it never drained is lost (the library counts
	 * it in lost, beside the records it refused, which we retried). */
	uint64_t lost = pc.lost > r.refused ? pc.lost - r.refused : 0;
	printf("recorded %" PRIu64 ", rejected %" PRIu64 ", dropped %" PRIu64, r.recorded, r.rejected,
	       pc.dropped);
	if (pc.clamped)
		printf(", clamped %" PRIu64 " (above the segment's max_value_ms = %.15g: stored as that)",
		       pc.clamped, (double)si.config.max_value_ns / 1e6);
	if (pc.moves)
		printf(", lost %" PRIu64 " (the owner restarted %" PRIu64 " time%s: values it had not "
		       "drained were lost; the rest went to the new owner)", lost, pc.moves,
		       pc.moves == 1 ? "" : "s");
	putchar('\n');
	return r.rejected || pc.dropped || lost ? CLI_EXIT_PARTIAL : CLI_EXIT_OK;
}
