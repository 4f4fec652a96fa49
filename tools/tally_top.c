/* SPDX-License-Identifier: MIT */
/*
 * tally_top.c: `tally top`, a live full-screen view of a segment in the
 * manner of top or varnishstat (ncurses). Every refresh (500 ms by
 * default) it reads the whole segment once (cli_view_read, the same read
 * as tally stat) and draws:
 *
 *   row 0     segment, owner pid and liveness, generation, publish age
 *   row 1     poller and circuit breaker; producers, samples and drops
 *   row 2     warnings: owner dead/stopped, data stale, waiting for a segment
 *   row 3..   subjects, sorted by P95 ('p'), pending ('n') or name ('a'),
 *             verdicts in colour (ok green, warn yellow, overload red)
 *   then      with [share], other hosts' rows (the segment's remote
 *             section) in a block of their own under a HOST header: host,
 *             subject, P95, pending, pressure, age, verdict, and "stale"
 *             (too old: never combined) or "local" (a subject this host
 *             does not combine); the share thread's state in the header,
 *             its last error under it when it is not running
 *   bottom    producer slots and watched consumers, as far as room allows
 *   last row  keys, or the filter prompt ('/': substring of the subject)
 *
 * It fits 80x24 and uses wider terminals for a MAX column, longer names and
 * the reasons; a name longer than its column is cut with a marker, and at
 * narrow widths columns go first (P50/P99 and COUNT of the subjects;
 * PRESS, then PENDING of the remote rows), never the verdict. It survives the owner's restart: when the name comes to hold
 * a newer segment (tally_segment_owner_alive() says TALLY_EREPLACED) or no
 * segment at all, it shows "waiting for segment ..." and tries to open it
 * again at every refresh. A dead owner's last data stays on screen under a
 * red banner, with every verdict shown as unknown.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curses.h>

#include "cli.h"

enum { PAIR_OK = 1, PAIR_WARN, PAIR_OVER, PAIR_BAD };

struct top {
	const char *segment;
	struct tally_segment *seg;
	struct cli_view v;
	bool have_view;
	char waiting[512];      /* non-empty: no segment to show, and why */
	uint64_t delay_ms;
	uint64_t iterations;    /* 0: until 'q' */
	char sort;              /* 'p' p95, 'n' pending, 'a' name */
	char filter[128];
	bool prompting;
	char saved_filter[128]; /* restored when the prompt is cancelled */
	bool color;
	const char *note_file;  /* --note: its first line is shown under the header */
	char note[256];
};

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

/* ---- reading, re-attaching ------------------------------------------------------- */

static void top_detach(struct top *t)
{
	if (t->have_view)
		cli_view_free(&t->v);
	t->have_view = false;
	tally_segment_close(&t->seg);
}

static void top_wait(struct top *t, const char *what, int rc)
{
	const char *msg = tally_errmsg();

	snprintf(t->waiting, sizeof(t->waiting), "waiting for segment \"%s\" (%s): %s", t->segment,
		 what, msg && *msg ? msg : tally_strerror(rc));
}

static void top_read(struct top *t)
{
	int rc;

	if (t->seg && tally_segment_owner_alive(t->seg) == TALLY_EREPLACED)
		top_detach(t); /* a new owner took the name, or it was removed */
	if (!t->seg && (rc = tally_segment_open(t->segment, TALLY_OPEN_READER, 0, &t->seg))) {
		t->seg = NULL;
		top_wait(t, "not open", rc);
		return;
	}
	if (t->note_file) { /* rewritten by its writer with rename: read whole */
		FILE *f = fopen(t->note_file, "r");
		t->note[0] = '\0';
		if (f) {
			if (fgets(t->note, sizeof(t->note), f))
				t->note[strcspn(t->note, "\n")] = '\0';
			fclose(f);
		}
	}
	if (t->have_view)
		cli_view_free(&t->v);
	t->have_view = false;
	if ((rc = cli_view_read(t->seg, &t->v))) {
		top_detach(t);
		top_wait(t, "unreadable", rc);
		return;
	}
	t->have_view = true;
	t->waiting[0] = '\0';
}

/* ---- drawing helpers -------------------------------------------------------------- */

/* Byte length of the first cols characters of s. */
static int clip_bytes(const char *s, int cols)
{
	int n = 0, w = 0;

	while (s[n]) {
		if (((unsigned char)s[n] & 0xc0) != 0x80 && w++ == cols)
			break;
		n++;
	}
	return n;
}

static void put(int row, int col, chtype attr, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static void put(int row, int col, chtype attr, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;

	if (row < 0 || row >= LINES || col >= COLS)
		return;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	attrset((int)attr);
	mvaddnstr(row, col, buf, clip_bytes(buf, COLS - col));
	attrset(A_NORMAL);
}

/* text over as many rows as it needs from row on, broken at spaces where
 * possible; returns the row after it. */
static int put_wrapped(int row, chtype attr, const char *text)
{
	while (*text && row < LINES - 1) {
		int n = clip_bytes(text, COLS), cut = n;
		if (text[n]) {
			for (int i = n; i > 0; i--)
				if (text[i] == ' ') {
					cut = i;
					break;
				}
		}
		put(row++, 0, attr, "%.*s", cut, text);
		text += cut;
		while (*text == ' ')
			text++;
	}
	return row;
}

/* A right-aligned cell of w columns (UTF-8 aware) into buf. */
static const char *cell(char *buf, size_t len, const char *s, int w)
{
	int fill = w - cli_width(s);

	if (fill < 0)
		fill = 0;
	snprintf(buf, len, "%*s%s", fill, "", s);
	return buf;
}

/* s in exactly w columns into buf: padded, or cut and marked ("\u2026", or
 * "~" outside a UTF-8 locale: "war" must not pass for a whole name). */
static const char *fit(char *buf, size_t len, const char *s, int w)
{
	int width = cli_width(s);

	if (width > w)
		snprintf(buf, len, "%.*s%s", clip_bytes(s, w - 1), s, cli_utf8_locale() ? "\u2026" : "~");
	else
		snprintf(buf, len, "%s%*s", s, w - width, "");
	return buf;
}

static chtype verdict_attr(const struct top *t, enum tally_verdict v)
{
	if (!t->color)
		return v == TALLY_VERDICT_OVERLOAD ? A_BOLD : A_NORMAL;
	switch (v) {
	case TALLY_VERDICT_OK: return COLOR_PAIR(PAIR_OK);
	case TALLY_VERDICT_WARN: return COLOR_PAIR(PAIR_WARN) | A_BOLD;
	case TALLY_VERDICT_OVERLOAD: return COLOR_PAIR(PAIR_OVER) | A_BOLD;
	default: return A_NORMAL;
	}
}

static chtype alarm_attr(const struct top *t)
{
	return t->color ? (COLOR_PAIR(PAIR_BAD) | A_BOLD) : (A_REVERSE | A_BOLD);
}

/* ---- the header rows ------------------------------------------------------------ */

static void draw_header(const struct top *t)
{
	const struct cli_view *v = &t->v;
	char age[32];

	if (!t->have_view) {
		put(0, 0, A_BOLD, "tally top  segment \"%s\"", t->segment);
		int row = put_wrapped(2, alarm_attr(t), t->waiting);
		put(row + 1, 0, A_NORMAL, "trying again every %" PRIu64 " ms; q quits", t->delay_ms);
		return;
	}
	/* Generation last: on a narrow terminal it is what gets cut. */
	put(0, 0, A_BOLD, "tally top  \"%s\"  owner pid %d %s  published %s ago  generation %" PRIu64,
	    v->info.name, (int)v->info.owner_pid,
	    v->alive == 1 ? "alive" : v->info.owner_stopped ? "STOPPED" : "DEAD",
	    cli_fmt_age_ms(age, sizeof(age), v->published_age_ms), v->info.generation);
	if (v->stale && strcmp(v->stale_reason, "snapshot_stale") == 0)
		put(2, 0, alarm_attr(t), " STALE: the owner has not published for %s: values are old, verdicts unknown ", age);
	else if (v->stale)
		put(2, 0, alarm_attr(t), " OWNER %s (pid %d): last data from %s ago, not live; waiting for a new owner ",
		    v->info.owner_stopped ? "STOPPED" : "DEAD", (int)v->info.owner_pid, age);
	else if (t->note[0])
		put(2, 0, A_BOLD, "%s", t->note);
}

static void draw_poller(const struct top *t)
{
	const struct cli_view *v = &t->v;
	const struct tally_poller_stats *p = &v->poller;
	/* the segment's totals: producers that came and went count too */
	uint64_t samples = v->totals.recorded, dropped = v->totals.dropped;
	int alive = 0;
	char b1[32], b2[32], line[256];

	for (int i = 0; i < v->nproducers; i++)
		alive += v->producers[i].alive;
	if (v->poller_ran && p->polls_ok + p->polls_failed == 0)
		snprintf(line, sizeof(line), "poller: first poll not finished (%s)",
			 p->connected ? "in flight" : "connecting");
	else if (v->poller_ran)
		snprintf(line, sizeof(line), "poller: breaker %s, %s, %" PRIu64 " ok %" PRIu64 " failed",
			 p->breaker, p->connected ? "connected" : "NOT CONNECTED", p->polls_ok,
			 p->polls_failed);
	else
		snprintf(line, sizeof(line), "poller: not running");
	chtype attr = v->poller_ran && (strcmp(p->breaker, "closed") != 0 || !p->connected) ?
			   verdict_attr(t, TALLY_VERDICT_WARN) : A_NORMAL;
	put(1, 0, attr, "%s", line);
	int col = cli_width(line);
	put(1, col, dropped ? verdict_attr(t, TALLY_VERDICT_WARN) : A_NORMAL,
	    " | producers %d/%d alive, %s recorded, %s dropped", alive, v->nproducers,
	    cli_fmt_count(b1, sizeof(b1), samples), cli_fmt_count(b2, sizeof(b2), dropped));
}

/* ---- subjects -------------------------------------------------------------------- */

static const struct top *sort_ctx;

static int cmp_subjects(const void *pa, const void *pb)
{
	const struct cli_subject *a = *(const struct cli_subject *const *)pa;
	const struct cli_subject *b = *(const struct cli_subject *const *)pb;
	bool ha = a->published && a->st.has_data, hb = b->published && b->st.has_data;

	if (sort_ctx->sort == 'p') {
		if (ha != hb)
			return ha ? -1 : 1;
		if (ha && a->st.p95_ns != b->st.p95_ns)
			return a->st.p95_ns > b->st.p95_ns ? -1 : 1;
	} else if (sort_ctx->sort == 'n') {
		/* a backlog of 0 is a reading; "-" (no consumer) is none: after */
		bool sa = a->published && a->st.pending_consumers, sb = b->published && b->st.pending_consumers;
		if (sa != sb)
			return sa ? -1 : 1;
		if (sa && a->st.pending != b->st.pending)
			return a->st.pending > b->st.pending ? -1 : 1;
	}
	return strcmp(a->name, b->name);
}

/* Subjects that pass the filter, sorted; count in *n. Caller frees. */
static const struct cli_subject **visible_subjects(const struct top *t, size_t *n)
{
	const struct cli_subject **out = calloc(t->v.nsubjects + 1, sizeof(*out));

	*n = 0;
	if (!out)
		return NULL;
	for (size_t i = 0; i < t->v.nsubjects; i++)
		if (!*t->filter || strstr(t->v.subjects[i].name, t->filter))
			out[(*n)++] = &t->v.subjects[i];
	sort_ctx = t;
	qsort(out, *n, sizeof(*out), cmp_subjects);
	return out;
}

struct columns {
	int name;      /* width of the name column */
	bool max;      /* a MAX column */
	bool reasons;  /* reasons after the verdict */
	bool wait;     /* WAIT95 and PRESS columns (wide terminals) */
	bool tails;    /* P50 and P99 (dropped first on a narrow terminal) */
	bool count;    /* COUNT (dropped next) */
};

/* Columns for COLS: the name, P95, PENDING and the whole VERDICT always
 * fit (a cut "war" is not a verdict); P50/P99, then COUNT, go first. */
static struct columns layout(void)
{
	struct columns c = { .name = COLS - 57, .max = COLS >= 90, .tails = true, .count = true };

	if (c.name < 16) {
		c.tails = false;
		c.name += 16;
	}
	if (c.name < 12) {
		c.count = false;
		c.name += 8;
	}
	if (c.max)
		c.name -= 8;
	if (c.name > 30) { /* room for the wait P95 and the pressure */
		c.wait = true;
		c.name -= 14;
	}
	if (c.name > 40) {
		c.reasons = true;
		c.name = 40;
	}
	if (c.name < 8)
		c.name = 8;
	return c;
}

static void draw_subject_header(const struct top *t, int row, const struct columns *c)
{
	char line[512];
	int n = snprintf(line, sizeof(line), "%-*s", c->name, "SUBJECT");
	if (c->count)
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s", "COUNT");
	n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s", "RATE/s");
	if (c->tails)
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s", "P50");
	n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s", t->sort == 'p' ? "P95 v" : "P95");
	if (c->tails)
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s", "P99");
	if (c->max)
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s", "MAX");
	n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s", t->sort == 'n' ? "PEND v" : "PENDING");
	if (c->wait)
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s %5s", "WAIT95", "PRESS");
	snprintf(line + n, sizeof(line) - (size_t)n, " %-8s%s", "VERDICT", c->reasons ? " REASONS" : "");
	put(row, 0, A_REVERSE, "%-*s", COLS, line);
}

static void draw_subject(const struct top *t, int row, const struct columns *c,
			 const struct cli_subject *s)
{
	const struct tally_subject_stats *st = &s->st;
	bool has = s->published && st->has_data;
	char line[768], b[32], cl[5][48], nm[4 * TALLY_SUBJECT_MAX + 8];
	int n = snprintf(line, sizeof(line), "%s", fit(nm, sizeof(nm), s->name, c->name));

	if (c->count)
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s",
			      cli_fmt_count(cl[0], sizeof(cl[0]), st->count));
	n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s",
		      st->rate < 99999.5 ? (snprintf(b, sizeof(b), "%.1f", st->rate), b) :
					   cli_fmt_count(b, sizeof(b), (uint64_t)st->rate));
	uint64_t q[4] = { st->p50_ns, st->p95_ns, st->p99_ns, st->max_ns };
	for (int i = 0; i < (c->max ? 4 : 3); i++) {
		char v[32];
		if (!c->tails && i != 1)
			continue;
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %s",
			      cell(cl[i + 1], sizeof(cl[i + 1]), has ? cli_fmt_ns(v, sizeof(v), q[i]) : "-", 7));
	}
	n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s", s->published && st->pending_consumers ?
			   cli_fmt_count(b, sizeof(b), st->pending) : "-");
	if (c->wait) {
		char v[32], p[16], wc[48];
		snprintf(p, sizeof(p), "%.2f", st->pressure);
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %s %5s",
			      cell(wc, sizeof(wc), s->published && st->has_wait ?
					  cli_fmt_ns(v, sizeof(v), st->wait_p95_ns) : "-", 7),
			      s->published ? p : "-");
	}
	snprintf(line + n, sizeof(line) - (size_t)n, " ");
	put(row, 0, A_NORMAL, "%s", line);
	enum tally_verdict ev = cli_effective_verdict(&t->v, s);
	int col = cli_width(line);
	put(row, col, verdict_attr(t, ev), "%-8s", tally_verdict_name(ev));
	if (c->reasons && s->published) {
		char r[96];
		tally_reasons_format(st->reasons, r, sizeof(r));
		put(row, col + 9, A_NORMAL, "%s", t->v.stale ? t->v.stale_reason : r);
	}
}

/* Draw subjects into rows [first, last); returns the next row. */
static int draw_subjects(const struct top *t, int first, int last)
{
	struct columns c = layout();
	size_t n;
	const struct cli_subject **vis = visible_subjects(t, &n);
	int row = first;

	draw_subject_header(t, row++, &c);
	if (!vis)
		return row;
	if (!n)
		put(row++, 0, A_DIM, *t->filter ? "no subject matches \"%s\"" :
			       "no subjects: nothing recorded in this segment yet", t->filter);
	for (size_t i = 0; i < n && row < last; i++) {
		if (row == last - 1 && i + 1 < n) {
			put(row++, 0, A_DIM, "... %zu more (filter with /)", n - i);
			break;
		}
		draw_subject(t, row++, &c, vis[i]);
	}
	free(vis);
	return row;
}

/* ---- other hosts (the remote section) --------------------------------------------- */

static int cmp_remote(const void *pa, const void *pb)
{
	const struct tally_remote_stats *a = *(const struct tally_remote_stats *const *)pa;
	const struct tally_remote_stats *b = *(const struct tally_remote_stats *const *)pb;
	int c;

	if (sort_ctx->sort == 'p' && a->p95_ns != b->p95_ns)
		return a->p95_ns > b->p95_ns ? -1 : 1;
	if (sort_ctx->sort == 'n' && a->pending != b->pending)
		return a->pending > b->pending ? -1 : 1;
	if ((c = strcmp(a->subject, b->subject)) != 0)
		return c;
	return strcmp(a->host, b->host);
}

/* Remote rows that pass the filter (subject or host), sorted as the subjects; count in *n. Caller frees. */
static const struct tally_remote_stats **visible_remote(const struct top *t, size_t *n)
{
	const struct tally_remote_stats **out = calloc((size_t)t->v.nremote + 1, sizeof(*out));

	*n = 0;
	if (!out)
		return NULL;
	for (int i = 0; i < t->v.nremote; i++) {
		const struct tally_remote_stats *r = &t->v.remote[i];

		if (!*t->filter || strstr(r->subject, t->filter) || strstr(r->host, t->filter))
			out[(*n)++] = r;
	}
	sort_ctx = t;
	qsort(out, *n, sizeof(*out), cmp_remote);
	return out;
}

struct rcolumns {
	int host, name;  /* widths */
	bool pending;    /* PENDING (dropped last) */
	bool press;      /* PRESS (dropped first) */
};

/* P95, AGE, VERDICT and the stale/local mark always fit: 30 columns. */
#define RFIXED 30

static struct rcolumns rlayout(const struct tally_remote_stats *const *vis, size_t n)
{
	struct rcolumns c = { .host = 4 }; /* "HOST" */
	int avail = COLS - RFIXED;

	for (size_t i = 0; i < n; i++)
		if (cli_width(vis[i]->host) > c.host)
			c.host = cli_width(vis[i]->host);
	if ((c.pending = avail - 8 >= 26))
		avail -= 8;
	if ((c.press = avail - 6 >= 30))
		avail -= 6;
	if (c.host > 16)
		c.host = 16;
	if (c.host > avail / 3)
		c.host = avail / 3 > 4 ? avail / 3 : 4;
	c.name = avail - c.host - 1;
	if (c.name > 40)
		c.name = 40;
	if (c.name < 8)
		c.name = 8;
	return c;
}

static void draw_remote_header(const struct top *t, int row, const struct rcolumns *c)
{
	const struct tally_share_status *sh = &t->v.share;
	char line[512], h[64];
	int n = snprintf(line, sizeof(line), "%s %-*s %7s", fit(h, sizeof(h), "HOST", c->host), c->name,
			 "SUBJECT", t->sort == 'p' ? "P95 v" : "P95");

	if (c->pending)
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s", t->sort == 'n' ? "PEND v" : "PENDING");
	if (c->press)
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %5s", "PRESS");
	/* what sharing does, where a wide terminal has room for it */
	snprintf(line + n, sizeof(line) - (size_t)n, " %6s %-8s %-5s  other hosts, KV bucket %s: %s", "AGE",
		 "VERDICT", "", *sh->bucket ? sh->bucket : "-", sh->state);
	put(row, 0, A_REVERSE, "%-*s", COLS, line);
}

static void draw_remote_row(const struct top *t, int row, const struct rcolumns *c,
			    const struct tally_remote_stats *r)
{
	char line[1024], h[4 * TALLY_SHARE_HOST_MAX + 8], nm[4 * TALLY_SUBJECT_MAX + 8], v[32], cl[48], age[32];
	enum tally_verdict ev = t->v.stale ? TALLY_VERDICT_UNKNOWN : r->verdict;
	int n = snprintf(line, sizeof(line), "%s %s %s", fit(h, sizeof(h), r->host, c->host),
			 fit(nm, sizeof(nm), r->subject, c->name),
			 cell(cl, sizeof(cl), cli_fmt_ns(v, sizeof(v), r->p95_ns), 7));

	if (c->pending)
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %7s", cli_fmt_count(v, sizeof(v), r->pending));
	if (c->press)
		n += snprintf(line + n, sizeof(line) - (size_t)n, " %5.2f", r->pressure);
	snprintf(line + n, sizeof(line) - (size_t)n, " %6s ", cli_fmt_age_ms(age, sizeof(age), r->age_ms));
	put(row, 0, r->stale ? A_DIM : A_NORMAL, "%s", line);
	int col = cli_width(line);
	put(row, col, r->stale ? A_DIM : verdict_attr(t, ev), "%-8s", tally_verdict_name(ev));
	if (r->stale)
		put(row, col + 9, verdict_attr(t, TALLY_VERDICT_WARN), "stale");
	else if (!r->combined)
		put(row, col + 9, A_DIM, "local");
}

/* Rows the remote block would like: its header, the share error when
 * sharing is not running, and up to 6 rows (one when there is none). */
static int remote_wanted(const struct top *t)
{
	int rows = t->v.nremote < 6 ? t->v.nremote : 6;

	if (!t->v.share_on)
		return 0;
	return 1 + (strcmp(t->v.share.state, "running") != 0) + (rows ? rows : 1);
}

/* The remote block in rows [row, row + rows). */
static void draw_remote(const struct top *t, int row, int rows)
{
	const struct tally_share_status *sh = &t->v.share;
	size_t n;
	const struct tally_remote_stats **vis = visible_remote(t, &n);
	struct rcolumns c = rlayout(vis, vis ? n : 0);
	int last = row + rows;

	draw_remote_header(t, row++, &c);
	if (strcmp(sh->state, "running") != 0 && row < last)
		put(row++, 0, verdict_attr(t, TALLY_VERDICT_WARN), "share %s%s%s", sh->state,
		    *sh->last_error ? ": " : "", sh->last_error);
	if (!vis)
		return;
	if (!n && row < last)
		put(row++, 0, A_DIM, *t->filter ? "no other host's row matches \"%s\"" :
			       "no rows from other hosts (yet)", t->filter);
	for (size_t i = 0; i < n && row < last; i++) {
		if (row == last - 1 && i + 1 < n) {
			put(row++, 0, A_DIM, "... %zu more from other hosts (filter with /)", n - i);
			break;
		}
		draw_remote_row(t, row++, &c, vis[i]);
	}
	free(vis);
}

/* ---- producers and consumers ----------------------------------------------------- */

static void draw_producers(const struct top *t, int row, int rows)
{
	const struct cli_view *v = &t->v;

	put(row++, 0, A_REVERSE, "%-*s", COLS, "SLOT     PID     TID STATE         SAMPLES    DROPPED ALIVE");
	for (int i = 0; i < v->nproducers && rows > 1; i++, rows--) {
		const struct tally_producer_stats *p = &v->producers[i];
		if (rows == 2 && i + 1 < v->nproducers) {
			put(row, 0, A_DIM, "... %d more producers", v->nproducers - i);
			return;
		}
		put(row, 0, p->dropped ? verdict_attr(t, TALLY_VERDICT_WARN) : A_NORMAL,
		    "%4u %7d %7d %-9s %11" PRIu64 " %10" PRIu64 " %s", p->slot, (int)p->pid, (int)p->tid,
		    p->state, p->samples, p->dropped, p->alive ? "yes" : "NO");
		row++;
	}
}

static void draw_consumers(const struct top *t, int row, int rows)
{
	const struct cli_view *v = &t->v;
	char age[32], sc[260];

	put(row++, 0, A_REVERSE, "%-*s", COLS, "STREAM/CONSUMER                   PENDING ACK_PENDING SOURCE     AGE");
	for (int i = 0; i < v->nconsumers && rows > 1; i++, rows--) {
		const struct tally_consumer_stats *c = &v->consumers[i];
		if (rows == 2 && i + 1 < v->nconsumers) {
			put(row, 0, A_DIM, "... %d more consumers", v->nconsumers - i);
			return;
		}
		snprintf(sc, sizeof(sc), "%s/%s", c->stream, c->consumer);
		put(row, 0, strcmp(c->source, "live") ? verdict_attr(t, TALLY_VERDICT_WARN) : A_NORMAL,
		    "%-32.32s %8" PRIu64 " %11" PRIu64 " %-7s %6s", sc, c->num_pending, c->num_ack_pending,
		    c->source, cli_fmt_age_ms(age, sizeof(age), c->age_ms));
		row++;
	}
}

/* Rows for the sections under the subjects out of avail, leaving the
 * subjects at least 4: other hosts first, then producers, then consumers. */
static void bottom_rows(const struct top *t, int avail, int *rem, int *prod, int *cons)
{
	int want_r = remote_wanted(t);
	int want_p = t->v.nproducers ? 1 + (t->v.nproducers < 4 ? t->v.nproducers : 4) : 0;
	int want_c = t->v.nconsumers ? 1 + (t->v.nconsumers < 4 ? t->v.nconsumers : 4) : 0;
	int room = avail - 4;

	if (room < 0)
		room = 0;
	*rem = want_r < room ? want_r : room;
	room -= *rem;
	*prod = want_p < room ? want_p : room;
	room -= *prod;
	*cons = want_c < room ? want_c : room;
	if (*rem == 1)
		*rem = 0;
	if (*prod == 1)
		*prod = 0;
	if (*cons == 1)
		*cons = 0;
}

static void draw_keys(const struct top *t)
{
	static const char *names[] = { ['p'] = "p95", ['n'] = "pending", ['a'] = "name" };

	if (t->prompting) {
		put(LINES - 1, 0, A_BOLD, "filter (Enter applies, Esc cancels): %s_", t->filter);
		return;
	}
	put(LINES - 1, 0, A_DIM, "q quit  p/n/a sort  / filter   sort %s%s%s%s  every %" PRIu64 " ms",
	    names[(unsigned char)t->sort], *t->filter ? "  filter \"" : "", t->filter,
	    *t->filter ? "\"" : "", t->delay_ms);
}

static void draw(const struct top *t)
{
	erase();
	draw_header(t);
	if (t->have_view) {
		int rem, prod, cons, first = 3, last = LINES - 1;
		draw_poller(t);
		bottom_rows(t, last - first, &rem, &prod, &cons);
		int end = last - rem - prod - cons, next = draw_subjects(t, first, end);
		/* other hosts one blank row under the subjects; what the subjects
		 * leave unused is theirs too */
		int at = next + 1 < end ? next + 1 : end;
		if (rem)
			draw_remote(t, at, last - prod - cons - at);
		if (prod)
			draw_producers(t, last - prod - cons, prod);
		if (cons)
			draw_consumers(t, last - cons, cons);
	}
	draw_keys(t);
	refresh();
}

/* ---- keys ----------------------------------------------------------------------- */

/* Handle one key; false to quit. */
static bool on_key(struct top *t, int ch)
{
	size_t len = strlen(t->filter);

	if (t->prompting) {
		if (ch == '\n' || ch == '\r' || ch == KEY_ENTER) {
			t->prompting = false;
		} else if (ch == 27) {
			t->prompting = false;
			snprintf(t->filter, sizeof(t->filter), "%s", t->saved_filter);
		} else if (ch == KEY_BACKSPACE || ch == 127 || ch == 8) {
			if (len)
				t->filter[len - 1] = '\0';
		} else if (ch >= 32 && ch < 127 && len + 1 < sizeof(t->filter)) {
			t->filter[len] = (char)ch;
			t->filter[len + 1] = '\0';
		}
		return true;
	}
	switch (ch) {
	case 'q': case 'Q': return false;
	case 'p': case 'n': case 'a': t->sort = (char)ch; break;
	case 'P': case 'N': case 'A': t->sort = (char)(ch - 'A' + 'a'); break;
	case '/':
		t->prompting = true;
		snprintf(t->saved_filter, sizeof(t->saved_filter), "%s", t->filter);
		break;
	case 12: clearok(curscr, TRUE); break; /* Ctrl-L */
	default: break;
	}
	return true;
}

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void run(struct top *t)
{
	uint64_t refreshes = 0;

	for (;;) {
		top_read(t);
		draw(t);
		if (t->iterations && ++refreshes >= t->iterations)
			return;
		/* Keys redraw at once; the data is read again when the delay is over. */
		uint64_t due = mono_ms() + t->delay_ms;
		for (uint64_t now = mono_ms(); now < due; now = mono_ms()) {
			if (stop_requested)
				return;
			timeout((int)(due - now));
			int ch = getch();
			if (stop_requested)
				return;
			if (ch == ERR)
				continue;
			if (!on_key(t, ch))
				return;
			draw(t);
		}
	}
}

/* ---- options, terminal ------------------------------------------------------------ */

static const char top_help[] =
	"usage: tally top [-s SEGMENT] [-d SECONDS] [-n COUNT] [--sort KEY] [--filter TEXT]\n"
	"\n"
	"Live full-screen view of a segment: subjects with count, rate, P50, P95,\n"
	"P99, pending and verdict (ok green, warn yellow, overload red), producers\n"
	"and drops, watched consumers, the poller and its breaker. Fits 80x24.\n"
	"With [share], other hosts' rows follow under a HOST header, each with its\n"
	"age; \"stale\" marks a row too old to count, \"local\" one not combined.\n"
	"If the segment does not exist yet, or its owner restarts, it shows\n"
	"\"waiting for segment\" and attaches again by itself. A dead owner's\n"
	"last data stays on screen under a banner, every verdict shown unknown.\n"
	"\n"
	"keys: p sort by P95 (default), n by pending, a by name; / filter by a\n"
	"substring of the subject or host (Enter applies, Esc cancels, empty clears);\n"
	"Ctrl-L redraws; q quits (so do Ctrl-C and SIGTERM).\n"
	"\n"
	"  -s, --segment NAME   segment (default $TALLY_SEGMENT, else \"tally\")\n"
	"  -d, --delay SECONDS  refresh interval, e.g. 0.5 or 250ms (default 0.5,\n"
	"                       from 0.05 to 3600)\n"
	"  -n, --iterations N   exit after N refreshes (default: run until q)\n"
	"      --sort KEY       p95, pending or name\n"
	"  -f, --filter TEXT    start with this filter\n"
	"      --note FILE      show the first line of FILE under the header, read\n"
	"                       at every refresh (tally demo shows its load phase)\n"
	"  -h, --help           this help\n"
	"\n"
	"exit status: 0, 2 bad usage, 4 error (not a terminal, bad segment name)\n";

static int parse_delay(const char *s, uint64_t *ms)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || v != v)
		return -1;
	if (strcmp(end, "ms") == 0)
		v /= 1000.0;
	else if (strcmp(end, "s") != 0 && *end)
		return -1;
	if (v < 0.05 || v > 3600)
		return -1;
	*ms = (uint64_t)(v * 1000.0 + 0.5);
	return 0;
}

static int top_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int top_usage_error(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "tally top: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fputs(top_help, stderr);
	return CLI_EXIT_USAGE;
}

static int top_options(struct top *t, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "segment", required_argument, NULL, 's' },
		{ "delay", required_argument, NULL, 'd' },
		{ "iterations", required_argument, NULL, 'n' },
		{ "sort", required_argument, NULL, 'S' },
		{ "filter", required_argument, NULL, 'f' },
		{ "note", required_argument, NULL, 'N' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	optind = 0;
	while ((c = getopt_long(argc, argv, "s:d:n:f:h", opts, NULL)) != -1) {
		switch (c) {
		case 's': t->segment = optarg; break;
		case 'N': t->note_file = optarg; break;
		case 'd':
			if (parse_delay(optarg, &t->delay_ms))
				return top_usage_error("-d %s: give seconds from 0.05 to 3600 (e.g. 0.5 or 250ms)", optarg);
			break;
		case 'n':
			if (cli_parse_u64(optarg, &t->iterations) || !t->iterations)
				return top_usage_error("-n %s: give a count of refreshes >= 1", optarg);
			break;
		case 'S':
			if (!strcmp(optarg, "p95") || !strcmp(optarg, "pending") || !strcmp(optarg, "name"))
				t->sort = optarg[0] == 'p' && optarg[1] == 'e' ? 'n' : optarg[0] == 'n' ? 'a' : 'p';
			else
				return top_usage_error("--sort %s: give p95, pending or name", optarg);
			break;
		case 'f': snprintf(t->filter, sizeof(t->filter), "%s", optarg); break;
		case 'h': fputs(top_help, stdout); return CLI_EXIT_OK;
		default: fputs(top_help, stderr); return CLI_EXIT_USAGE;
		}
	}
	if (optind != argc)
		return top_usage_error("unexpected argument \"%s\"", argv[optind]);
	return -1;
}

static int start_terminal(struct top *t, SCREEN **scr)
{
	if (!isatty(STDIN_FILENO) || !isatty(STDOUT_FILENO)) {
		fprintf(stderr, "tally top: needs a terminal; for one reading use \"tally stat\" (or --json)\n");
		return CLI_EXIT_ERROR;
	}
	if (!(*scr = newterm(NULL, stdout, stdin))) {
		fprintf(stderr, "tally top: cannot drive terminal type \"%s\": set TERM (e.g. TERM=xterm)\n",
			getenv("TERM") ? getenv("TERM") : "");
		return CLI_EXIT_ERROR;
	}
	cbreak();
	noecho();
	keypad(stdscr, TRUE);
	curs_set(0);
	set_escdelay(25);
	if (has_colors() && start_color() == OK) {
		use_default_colors();
		init_pair(PAIR_OK, COLOR_GREEN, -1);
		init_pair(PAIR_WARN, COLOR_YELLOW, -1);
		init_pair(PAIR_OVER, COLOR_RED, -1);
		init_pair(PAIR_BAD, COLOR_WHITE, COLOR_RED);
		t->color = true;
	}
	return 0;
}

int tally_cmd_top(const char *segment, int argc, char **argv)
{
	struct top t = { .segment = segment, .delay_ms = 500, .sort = 'p' };
	struct sigaction sa = { .sa_handler = on_signal };
	SCREEN *scr = NULL;
	int rc = top_options(&t, argc, argv);

	if (rc >= 0)
		return rc;
	if ((rc = tally_segment_name_validate(t.segment)))
		return cli_fail(t.segment, rc);
	if ((rc = start_terminal(&t, &scr)))
		return rc;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	run(&t);
	endwin();
	delscreen(scr);
	top_detach(&t);
	return CLI_EXIT_OK;
}
