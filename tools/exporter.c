/* SPDX-License-Identifier: MIT */
/*
 * exporter.c: tallyd's GET /metrics (contract in exporter.h). A scrape
 * reads everything once into arrays (subjects through the engine's RCU
 * snapshot, producers, consumers and the poller through the segment), then
 * writes the families of metrics.def in their table order, each with its
 * HELP and TYPE lines, into one growing buffer that libmicrohttpd frees
 * after sending. Nothing is cached between scrapes and nothing is written
 * to the segment.
 *
 * The HTTP side owns its listening socket (so that a port in use is named
 * with its address), hands it to libmicrohttpd with TLS from the PEM files
 * when asked, checks basic auth before anything else (bcrypt through
 * crypt_rn(3); the last good credential of each user is remembered, so a
 * scraper costs one bcrypt per password change, not one per scrape), and
 * gzips the body for a scraper that accepts it. libmicrohttpd logs one
 * line per malformed request: those go through a limiter (the first of a
 * minute, then one line with how many more).
 */
#include "config.h"

#include <arpa/inet.h>
#include <crypt.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "exporter.h"
#include "text.h"

/* ---- the metric table ---- */

enum tallyd_metric_id {
#define TALLY_METRIC(id, name, type, help) TM_##id,
#include "metrics.def"
#undef TALLY_METRIC
	TM__COUNT
};

static const struct metric_def {
	const char *name, *type, *help;
} metric_defs[TM__COUNT] = {
#define TALLY_METRIC(id, name, type, help) [TM_##id] = { name, type, help },
#include "metrics.def"
#undef TALLY_METRIC
};

/* ---- output buffer ---- */

struct buf {
	char *p;
	size_t len, cap;
	bool oom;
};

static void buf_reserve(struct buf *b, size_t more)
{
	size_t cap = b->cap ? b->cap : 16384;
	char *p;

	if (b->oom || b->len + more + 1 <= b->cap)
		return;
	while (cap < b->len + more + 1)
		cap *= 2;
	if (!(p = realloc(b->p, cap))) {
		b->oom = true;
		return;
	}
	b->p = p;
	b->cap = cap;
}

static void bputs(struct buf *b, const char *s, size_t n)
{
	buf_reserve(b, n);
	if (b->oom)
		return;
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

__attribute__((format(printf, 2, 3))) static void bprintf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	buf_reserve(b, 128);
	if (b->oom)
		return;
	va_start(ap, fmt);
	n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= b->cap - b->len) {
		buf_reserve(b, (size_t)n);
		if (b->oom)
			return;
		va_start(ap, fmt);
		vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
		va_end(ap);
	}
	b->len += (size_t)n;
}

/* A label value with \\, \" and \n escaped (text format 0.0.4), and
 * valid UTF-8 whatever the segment held (Prometheus rejects the whole
 * scrape otherwise): invalid bytes and controls become U+FFFD. */
static void bescape(struct buf *b, const char *in)
{
	char clean[4 * 256];

	text_utf8_clean(in, clean, sizeof(clean));
	for (const char *s = clean; *s; s++) {
		if (*s == '\\')
			bputs(b, "\\\\", 2);
		else if (*s == '"')
			bputs(b, "\\\"", 2);
		else if (*s == '\n')
			bputs(b, "\\n", 2);
		else
			bputs(b, s, 1);
	}
}

static void family(struct buf *b, enum tallyd_metric_id id)
{
	const struct metric_def *m = &metric_defs[id];

	/* HELP texts are ours (no backslash or newline to escape). */
	bprintf(b, "# HELP %s %s\n# TYPE %s %s\n", m->name, m->help, m->name, m->type);
}

/*
 * One sample: name (with suffix), then labels given as pairs of strings
 * ending with NULL, then the value already formatted.
 */
static void sample(struct buf *b, enum tallyd_metric_id id, const char *suffix, const char *value,
		   ...)
{
	va_list ap;
	const char *k;
	bool first = true;

	bprintf(b, "%s%s", metric_defs[id].name, suffix ? suffix : "");
	va_start(ap, value);
	while ((k = va_arg(ap, const char *))) {
		const char *v = va_arg(ap, const char *);

		bprintf(b, "%s%s=\"", first ? "{" : ",", k);
		bescape(b, v ? v : "");
		bputs(b, "\"", 1);
		first = false;
	}
	va_end(ap);
	bprintf(b, "%s %s\n", first ? "" : "}", value);
}

/* ns as exact decimal seconds: 50000000 -> "0.05". */
static const char *fmt_sec(char *s, size_t n, uint64_t ns)
{
	int len = snprintf(s, n, "%" PRIu64 ".%09" PRIu64, ns / 1000000000u, ns % 1000000000u);

	while (len > 0 && s[len - 1] == '0')
		s[--len] = '\0';
	if (len > 0 && s[len - 1] == '.')
		s[--len] = '\0';
	return s;
}

static const char *fmt_u64(char *s, size_t n, uint64_t v)
{
	snprintf(s, n, "%" PRIu64, v);
	return s;
}

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- what one scrape reads ---- */

struct subj {
	tally_subject_t id;
	char name[TALLY_SUBJECT_MAX + 1];
	struct tally_subject_stats st;
};

struct scrape {
	struct tally_segment_info info;
	struct subj *subj;
	uint32_t nsubj, subj_cap;
	struct tally_producer_stats *prod;
	int nprod;
	uint32_t prod_cap;
	struct tally_consumer_stats *cons;
	int ncons;
	uint32_t cons_cap;
	struct tally_engine_counters ec;
	struct tally_poller_stats ps;
	bool poller;
	struct tally_segment_totals totals;
	uint64_t now;
	struct tally_engine *engine;
	struct tally_remote_stats *rem;   /* other hosts' rows ([share]) */
	int nrem;
	uint32_t rem_cap;
	bool share;
	struct tally_share_status shs;
	const struct tallyd_http_opts *opts; /* which series to write */
};

/* Make room for n elements of size sz in *arr (kept between scrapes). */
static int grow(void *arr, uint32_t *cap, uint32_t n, size_t sz)
{
	void *p;

	if (n <= *cap)
		return 0;
	if (!(p = realloc(*(void **)arr, (size_t)n * sz)))
		return -ENOMEM;
	*(void **)arr = p;
	*cap = n;
	return 0;
}

static int read_subjects(struct tallyd_exporter_source *src, struct scrape *sc)
{
	uint32_t cap = tally_subject_capacity(src->seg), named = 0;

	/* ids are table slots, sparse: stop once every interned name was seen */
	for (uint32_t id = 0; id < cap && named < sc->info.subjects_used; id++) {
		struct subj *s;

		if (sc->nsubj == sc->subj_cap &&
		    grow(&sc->subj, &sc->subj_cap, sc->subj_cap ? sc->subj_cap * 2 : 64, sizeof(*s)))
			return -ENOMEM;
		s = &sc->subj[sc->nsubj];
		if (tally_subject_name(src->seg, id, s->name, sizeof(s->name)) != 0)
			continue;
		named++;
		s->id = id;
		if (tally_engine_read(src->engine, id, &s->st) != 0)
			continue;
		sc->nsubj++;
	}
	return 0;
}

/* Read everything a scrape shows into sc; its arrays are reused. */
static int scrape_read(struct tallyd_exporter_source *src, struct scrape *sc)
{
	uint32_t nprod, ncons;
	int rc;

	sc->nsubj = 0;
	sc->nprod = sc->ncons = 0;
	sc->now = mono_ns();
	sc->engine = src->engine;
	if ((rc = tally_segment_info(src->seg, &sc->info)) != 0)
		return rc;
	if ((rc = read_subjects(src, sc)) != 0)
		return rc;
	nprod = sc->info.config.producer_slots;
	ncons = sc->info.config.pending_capacity;
	if (grow(&sc->prod, &sc->prod_cap, nprod + 1, sizeof(*sc->prod)) ||
	    grow(&sc->cons, &sc->cons_cap, ncons + 1, sizeof(*sc->cons)))
		return -ENOMEM;
	sc->nprod = tally_read_producers(src->seg, sc->prod, nprod);
	sc->ncons = tally_read_consumers(src->seg, sc->cons, ncons);
	if (sc->ncons < 0) /* a poll raced the read twice: retry once */
		sc->ncons = tally_read_consumers(src->seg, sc->cons, ncons);
	tally_engine_counters(src->engine, &sc->ec);
	tally_read_totals(src->seg, &sc->totals);
	sc->poller = atomic_load(&src->poller_on) && tally_read_poller(src->seg, &sc->ps) == 0;
	sc->nrem = 0;
	sc->share = sc->info.config.remote_capacity && tally_read_share(src->seg, &sc->shs) == 0;
	if (sc->share) {
		if (grow(&sc->rem, &sc->rem_cap, sc->info.config.remote_capacity, sizeof(*sc->rem)))
			return -ENOMEM;
		sc->nrem = tally_read_remote(src->seg, sc->rem, sc->info.config.remote_capacity);
		if (sc->nrem < 0) /* the share thread raced the read: retry once */
			sc->nrem = tally_read_remote(src->seg, sc->rem, sc->info.config.remote_capacity);
		if (sc->nrem < 0)
			sc->nrem = 0;
	}
	return 0;
}

static void scrape_free(struct scrape *sc)
{
	free(sc->subj);
	free(sc->prod);
	free(sc->cons);
	free(sc->rem);
	memset(sc, 0, sizeof(*sc));
}

/* ---- families ---- */

static void put_identity(struct buf *b, const struct scrape *sc)
{
	char pid[24], gen[24], v[32];

	family(b, TM_build_info);
	sample(b, TM_build_info, NULL, "1", "version", PACKAGE_VERSION, "library", tally_version(),
	       NULL);
	family(b, TM_segment_info);
	snprintf(pid, sizeof(pid), "%ld", (long)sc->info.owner_pid);
	sample(b, TM_segment_info, NULL, "1", "segment", sc->info.name, "owner_pid", pid, "generation",
	       fmt_u64(gen, sizeof(gen), sc->info.generation), NULL);
	family(b, TM_segment_size);
	sample(b, TM_segment_size, NULL, fmt_u64(v, sizeof(v), sc->info.total_size), NULL);
	family(b, TM_segment_subjects);
	sample(b, TM_segment_subjects, NULL, fmt_u64(v, sizeof(v), sc->info.subjects_used), NULL);
	family(b, TM_segment_subject_capacity);
	sample(b, TM_segment_subject_capacity, NULL,
	       fmt_u64(v, sizeof(v), sc->info.config.subject_capacity), NULL);
}

/*
 * The since-start histogram: the engine's exact cumulative counts at its
 * export edges (closed slices only, so _count may trail the window stats
 * by one slice), with _count as the +Inf bucket and _sum of the same
 * samples. Read per subject while writing: 1.5 KB each, not kept.
 */
/* Buckets exported: the engine's edges at 2^k and 1.5 x 2^k ns (two per
 * octave, about 50 series per subject instead of 92); dropping bounds of
 * a cumulative histogram keeps every exported count exact. */
static bool exported_edge(uint64_t le_ns)
{
	uint64_t e = le_ns + 1, third = e / 3;

	return (e & (e - 1)) == 0 || (e % 3 == 0 && (third & (third - 1)) == 0);
}

/*
 * The buckets asked for ([http] histogram_buckets_ms): each bound becomes
 * the engine's largest edge at or below it (at most a fifth lower: 4 edges
 * per octave), so that its count stays exact; le says which edge. Bounds
 * below the first edge take the first; two bounds on one edge give one.
 * keep[k] set for each edge exported.
 */
static void chosen_edges(const struct tallyd_http_opts *o, const struct tally_subject_buckets *hb,
			 bool *keep)
{
	memset(keep, 0, hb->n * sizeof(*keep));
	for (uint32_t j = 0; j < o->nbuckets; j++) {
		uint32_t k = 0;

		while (k + 1 < hb->n && hb->le_ns[k + 1] <= o->bucket_ns[j])
			k++;
		if (hb->n)
			keep[k] = true;
	}
}

static void put_histogram(struct buf *b, const struct scrape *sc)
{
	struct tally_subject_buckets hb;
	bool keep[TALLY_BUCKETS_MAX];
	char v[32], le[32];

	if (sc->opts && !sc->opts->histogram)
		return;
	family(b, TM_subject_latency);
	for (uint32_t i = 0; i < sc->nsubj; i++) {
		const char *name = sc->subj[i].name;

		if (tally_engine_read_buckets(sc->engine, sc->subj[i].id, &hb) != 0)
			continue;
		if (hb.n > TALLY_BUCKETS_MAX)
			hb.n = TALLY_BUCKETS_MAX;
		if (sc->opts && sc->opts->nbuckets)
			chosen_edges(sc->opts, &hb, keep);
		else
			for (uint32_t k = 0; k < hb.n; k++)
				keep[k] = exported_edge(hb.le_ns[k]);
		for (uint32_t k = 0; k < hb.n; k++)
			if (keep[k])
				sample(b, TM_subject_latency, "_bucket",
				       fmt_u64(v, sizeof(v), hb.cumulative[k]), "subject", name, "le",
				       fmt_sec(le, sizeof(le), hb.le_ns[k]), NULL);
		sample(b, TM_subject_latency, "_bucket", fmt_u64(v, sizeof(v), hb.count), "subject",
		       name, "le", "+Inf", NULL);
		sample(b, TM_subject_latency, "_sum", fmt_sec(v, sizeof(v), hb.sum_ns), "subject", name,
		       NULL);
		sample(b, TM_subject_latency, "_count", fmt_u64(v, sizeof(v), hb.count), "subject", name,
		       NULL);
	}
}

static void put_latency(struct buf *b, const struct scrape *sc)
{
	static const char *const qn[] = { "0.5", "0.9", "0.95", "0.99", "0.999" };
	char v[32];

	put_histogram(b, sc);
	family(b, TM_subject_latency_window);
	for (uint32_t i = 0; i < sc->nsubj; i++) {
		const struct subj *s = &sc->subj[i];
		const uint64_t q[] = { s->st.p50_ns, s->st.p90_ns, s->st.p95_ns, s->st.p99_ns,
				       s->st.p999_ns };

		for (size_t k = 0; s->st.has_data && k < sizeof(q) / sizeof(q[0]); k++)
			sample(b, TM_subject_latency_window, NULL, fmt_sec(v, sizeof(v), q[k]),
			       "subject", s->name, "quantile", qn[k], NULL);
	}
	family(b, TM_subject_latency_window_max);
	for (uint32_t i = 0; i < sc->nsubj; i++)
		if (sc->subj[i].st.has_data)
			sample(b, TM_subject_latency_window_max, NULL,
			       fmt_sec(v, sizeof(v), sc->subj[i].st.max_ns), "subject", sc->subj[i].name,
			       NULL);
}

/* A per-subject family whose value is f(stats), formatted by the caller. */
#define PER_SUBJECT(b, sc, id, expr)                                                       \
	do {                                                                               \
		family(b, id);                                                             \
		for (uint32_t i_ = 0; i_ < (sc)->nsubj; i_++) {                            \
			const struct tally_subject_stats *st = &(sc)->subj[i_].st;         \
			char v_[32];                                                       \
			(void)st;                                                          \
			sample(b, id, NULL, (expr), "subject", (sc)->subj[i_].name, NULL); \
		}                                                                          \
	} while (0)

static void put_subject_reasons(struct buf *b, const struct scrape *sc)
{
	static const struct { uint32_t bit; const char *name; } rs[] = {
		{ TALLY_REASON_LATENCY, "latency" }, { TALLY_REASON_PENDING, "pending" },
		{ TALLY_REASON_STALE, "stale" },     { TALLY_REASON_NO_DATA, "no_data" },
		{ TALLY_REASON_FAIL_OPEN, "fail_open" }, { TALLY_REASON_STALLED, "stalled" },
		{ TALLY_REASON_WAIT, "wait" },       { TALLY_REASON_CODEL, "codel" },
	};

	family(b, TM_subject_verdict_reason);
	for (uint32_t i = 0; i < sc->nsubj; i++)
		for (size_t k = 0; k < sizeof(rs) / sizeof(rs[0]); k++)
			if (sc->subj[i].st.reasons & rs[k].bit)
				sample(b, TM_subject_verdict_reason, NULL, "1", "subject",
				       sc->subj[i].name, "reason", rs[k].name, NULL);
}

static const char *fmt_ratio(char *s, size_t n, double v)
{
	snprintf(s, n, "%.6f", v);
	return s;
}

/* The wait series and the CoDel signal (tally/verdict.h). */
static void put_waits(struct buf *b, const struct scrape *sc)
{
	static const char *const qn[] = { "0.5", "0.95", "0.99" };
	char v[32];

	family(b, TM_subject_wait_window);
	for (uint32_t i = 0; i < sc->nsubj; i++) {
		const struct subj *s = &sc->subj[i];
		const uint64_t q[] = { s->st.wait_p50_ns, s->st.wait_p95_ns, s->st.wait_p99_ns };
		for (size_t k = 0; s->st.has_wait && k < sizeof(q) / sizeof(q[0]); k++)
			sample(b, TM_subject_wait_window, NULL, fmt_sec(v, sizeof(v), q[k]), "subject", s->name,
			       "quantile", qn[k], NULL);
	}
	PER_SUBJECT(b, sc, TM_subject_wait_window_samples, fmt_u64(v_, sizeof(v_), st->wait_count));
	PER_SUBJECT(b, sc, TM_subject_wait_clock_skew, fmt_u64(v_, sizeof(v_), st->wait_skewed));
	family(b, TM_subject_codel_min_wait);
	for (uint32_t i = 0; i < sc->nsubj; i++)
		if (sc->subj[i].st.codel_valid)
			sample(b, TM_subject_codel_min_wait, NULL, fmt_sec(v, sizeof(v), sc->subj[i].st.wait_min_ns),
			       "subject", sc->subj[i].name, NULL);
	PER_SUBJECT(b, sc, TM_subject_codel_overloaded, fmt_u64(v_, sizeof(v_), st->codel_overloaded ? 1 : 0));
}

static uint64_t age_ns(uint64_t now, uint64_t since)
{
	return since && now > since ? now - since : 0;
}

static void put_subjects(struct buf *b, const struct scrape *sc)
{
	put_latency(b, sc);
	PER_SUBJECT(b, sc, TM_subject_window_samples, fmt_u64(v_, sizeof(v_), st->count));
	PER_SUBJECT(b, sc, TM_subject_window_length, fmt_sec(v_, sizeof(v_), st->window_ns));
	PER_SUBJECT(b, sc, TM_subject_pending, fmt_u64(v_, sizeof(v_), st->pending));
	PER_SUBJECT(b, sc, TM_subject_pending_consumers,
		    fmt_u64(v_, sizeof(v_), st->pending_consumers));
	PER_SUBJECT(b, sc, TM_subject_verdict, fmt_u64(v_, sizeof(v_), (uint64_t)st->verdict));
	put_subject_reasons(b, sc);
	PER_SUBJECT(b, sc, TM_subject_verdict_age,
		    fmt_sec(v_, sizeof(v_), age_ns(sc->now, st->verdict_since_ns)));
	PER_SUBJECT(b, sc, TM_subject_retry_after,
		    fmt_sec(v_, sizeof(v_), (uint64_t)st->retry_after_ms * 1000000u));
	put_waits(b, sc);
	PER_SUBJECT(b, sc, TM_subject_pressure, fmt_ratio(v_, sizeof(v_), st->pressure));
	PER_SUBJECT(b, sc, TM_subject_shed_probability, fmt_ratio(v_, sizeof(v_), st->shed_probability));
}

/* A per-consumer family whose value is a field of struct tally_consumer_stats. */
static void put_consumer_u64(struct buf *b, const struct scrape *sc, enum tallyd_metric_id id,
			     size_t off)
{
	char v[32];

	family(b, id);
	for (int i = 0; i < sc->ncons; i++) {
		uint64_t x;

		memcpy(&x, (const char *)&sc->cons[i] + off, sizeof(x));
		sample(b, id, NULL, fmt_u64(v, sizeof(v), x), "stream", sc->cons[i].stream, "consumer",
		       sc->cons[i].consumer, NULL);
	}
}

static void put_consumers(struct buf *b, const struct scrape *sc)
{
	static const char *const sources[] = { "live", "cached", "never", "gone", "not_found" };
	char v[32];

	put_consumer_u64(b, sc, TM_consumer_pending, offsetof(struct tally_consumer_stats, num_pending));
	put_consumer_u64(b, sc, TM_consumer_ack_pending,
			 offsetof(struct tally_consumer_stats, num_ack_pending));
	put_consumer_u64(b, sc, TM_consumer_redelivered,
			 offsetof(struct tally_consumer_stats, num_redelivered));
	put_consumer_u64(b, sc, TM_consumer_waiting, offsetof(struct tally_consumer_stats, num_waiting));
	put_consumer_u64(b, sc, TM_consumer_delivered_seq,
			 offsetof(struct tally_consumer_stats, delivered_stream_seq));
	put_consumer_u64(b, sc, TM_consumer_ack_floor_seq,
			 offsetof(struct tally_consumer_stats, ack_floor_stream_seq));
	family(b, TM_consumer_source);
	for (int i = 0; i < sc->ncons; i++)
		for (size_t k = 0; k < sizeof(sources) / sizeof(sources[0]); k++)
			sample(b, TM_consumer_source, NULL,
			       sc->cons[i].source && strcmp(sc->cons[i].source, sources[k]) == 0 ? "1"
												  : "0",
			       "stream", sc->cons[i].stream, "consumer", sc->cons[i].consumer, "source",
			       sources[k], NULL);
	family(b, TM_consumer_data_age);
	for (int i = 0; i < sc->ncons; i++)
		if (sc->cons[i].age_ms != UINT64_MAX)
			sample(b, TM_consumer_data_age, NULL,
			       fmt_sec(v, sizeof(v), sc->cons[i].age_ms * 1000000u), "stream",
			       sc->cons[i].stream, "consumer", sc->cons[i].consumer, NULL);
}

/* Other hosts' rows, labelled host and subject; the share thread's counters. */
static void put_remote(struct buf *b, const struct scrape *sc)
{
	char v[32];

	if (!sc->share)
		return;
	family(b, TM_remote_verdict);
	for (int i = 0; i < sc->nrem; i++)
		sample(b, TM_remote_verdict, NULL, fmt_u64(v, sizeof(v), (uint64_t)sc->rem[i].verdict), "host",
		       sc->rem[i].host, "subject", sc->rem[i].subject, NULL);
	family(b, TM_remote_pressure);
	for (int i = 0; i < sc->nrem; i++)
		sample(b, TM_remote_pressure, NULL, fmt_ratio(v, sizeof(v), sc->rem[i].pressure), "host",
		       sc->rem[i].host, "subject", sc->rem[i].subject, NULL);
	family(b, TM_remote_age);
	for (int i = 0; i < sc->nrem; i++)
		sample(b, TM_remote_age, NULL, fmt_sec(v, sizeof(v), sc->rem[i].age_ms * 1000000u), "host",
		       sc->rem[i].host, "subject", sc->rem[i].subject, NULL);
	family(b, TM_remote_combined);
	for (int i = 0; i < sc->nrem; i++)
		sample(b, TM_remote_combined, NULL, sc->rem[i].combined ? "1" : "0", "host", sc->rem[i].host,
		       "subject", sc->rem[i].subject, NULL);
	family(b, TM_share_puts);
	sample(b, TM_share_puts, NULL, fmt_u64(v, sizeof(v), sc->shs.puts), NULL);
	family(b, TM_share_put_errors);
	sample(b, TM_share_put_errors, NULL, fmt_u64(v, sizeof(v), sc->shs.put_errors), NULL);
	family(b, TM_share_received);
	sample(b, TM_share_received, NULL, fmt_u64(v, sizeof(v), sc->shs.updates), NULL);
}

static void put_producer_u64(struct buf *b, const struct scrape *sc, enum tallyd_metric_id id,
			     size_t off)
{
	char v[32], slot[16];

	family(b, id);
	for (int i = 0; i < sc->nprod; i++) {
		const struct tally_producer_stats *p = &sc->prod[i];
		uint64_t x;

		if (off == SIZE_MAX)
			x = p->alive;
		else
			memcpy(&x, (const char *)p + off, sizeof(x));
		/* labelled by slot only: at most producer_slots series, whatever
		 * processes come and go (pid and tid are in tally stat) */
		snprintf(slot, sizeof(slot), "%" PRIu32, p->slot);
		sample(b, id, NULL, fmt_u64(v, sizeof(v), x), "slot", slot, NULL);
	}
}

static void put_producers(struct buf *b, const struct scrape *sc)
{
	put_producer_u64(b, sc, TM_producer_samples, offsetof(struct tally_producer_stats, samples));
	put_producer_u64(b, sc, TM_producer_dropped, offsetof(struct tally_producer_stats, dropped));
	put_producer_u64(b, sc, TM_producer_clamped, offsetof(struct tally_producer_stats, clamped));
	put_producer_u64(b, sc, TM_producer_backlog, offsetof(struct tally_producer_stats, backlog));
	put_producer_u64(b, sc, TM_producer_alive, SIZE_MAX);
}

static void put_one(struct buf *b, enum tallyd_metric_id id, const char *value)
{
	family(b, id);
	sample(b, id, NULL, value, NULL);
}

static void put_engine(struct buf *b, const struct scrape *sc)
{
	char v[32];
	uint64_t active = 0;

	for (uint32_t i = 0; i < sc->nsubj; i++)
		active += sc->subj[i].st.has_data;
	put_one(b, TM_engine_drained, fmt_u64(v, sizeof(v), sc->ec.drained));
	put_one(b, TM_samples_recorded, fmt_u64(v, sizeof(v), sc->totals.recorded));
	put_one(b, TM_samples_dropped, fmt_u64(v, sizeof(v), sc->totals.dropped));
	put_one(b, TM_samples_clamped, fmt_u64(v, sizeof(v), sc->totals.clamped));
	put_one(b, TM_ring_skipped, fmt_u64(v, sizeof(v), sc->totals.skipped));
	put_one(b, TM_engine_rejected, fmt_u64(v, sizeof(v), sc->ec.rejected));
	put_one(b, TM_engine_publishes, fmt_u64(v, sizeof(v), sc->ec.publishes));
	put_one(b, TM_engine_publish_duration, fmt_sec(v, sizeof(v), sc->ec.last_publish_ns));
	put_one(b, TM_engine_subjects_active, fmt_u64(v, sizeof(v), active));
	put_one(b, TM_engine_producers_died, fmt_u64(v, sizeof(v), sc->ec.producers_died));
	put_one(b, TM_engine_producers_released, fmt_u64(v, sizeof(v), sc->ec.producers_released));
	put_one(b, TM_engine_claims_expired, fmt_u64(v, sizeof(v), sc->ec.claims_expired));
	put_one(b, TM_engine_subjects_tombstoned, fmt_u64(v, sizeof(v), sc->ec.subjects_tombstoned));
	put_one(b, TM_engine_pending_kept, fmt_u64(v, sizeof(v), sc->ec.pending_kept));
	put_one(b, TM_engine_values_lost, fmt_u64(v, sizeof(v), sc->ec.values_lost));
}

static void put_poller(struct buf *b, const struct scrape *sc)
{
	static const char *const states[] = { "closed", "open", "half-open" };
	const struct tally_poller_stats *p = &sc->ps;
	char v[32];

	if (!sc->poller)
		return;
	put_one(b, TM_poller_connected, p->connected ? "1" : "0");
	put_one(b, TM_poller_polls_ok, fmt_u64(v, sizeof(v), p->polls_ok));
	put_one(b, TM_poller_polls_failed, fmt_u64(v, sizeof(v), p->polls_failed));
	family(b, TM_poller_polls_skipped);
	sample(b, TM_poller_polls_skipped, NULL, fmt_u64(v, sizeof(v), p->skipped_overrun), "reason",
	       "overrun", NULL);
	sample(b, TM_poller_polls_skipped, NULL, fmt_u64(v, sizeof(v), p->skipped_open), "reason",
	       "breaker_open", NULL);
	family(b, TM_poller_breaker_state);
	for (size_t k = 0; k < sizeof(states) / sizeof(states[0]); k++)
		sample(b, TM_poller_breaker_state, NULL,
		       p->breaker && strcmp(p->breaker, states[k]) == 0 ? "1" : "0", "state", states[k],
		       NULL);
	put_one(b, TM_poller_breaker_opens, fmt_u64(v, sizeof(v), p->opens_total));
	put_one(b, TM_poller_consecutive_failures, fmt_u64(v, sizeof(v), p->consecutive_failures));
	put_one(b, TM_poller_untracked, fmt_u64(v, sizeof(v), p->untracked_consumers));
	family(b, TM_poller_last_ok_age);
	if (p->last_ok_age_ms != UINT64_MAX)
		sample(b, TM_poller_last_ok_age, NULL, fmt_sec(v, sizeof(v), p->last_ok_age_ms * 1000000u),
		       NULL);
}

static int render(struct tallyd_exporter_source *src, const struct tallyd_http_opts *o,
		  struct scrape *sc, char **out, size_t *len)
{
	struct buf b = { 0 };
	int rc = scrape_read(src, sc);

	sc->opts = o;
	*out = NULL;
	*len = 0;
	if (rc != 0)
		return rc;
	put_identity(&b, sc);
	put_subjects(&b, sc);
	put_consumers(&b, sc);
	put_remote(&b, sc);
	put_producers(&b, sc);
	put_engine(&b, sc);
	put_poller(&b, sc);
	if (b.oom) {
		free(b.p);
		return -ENOMEM;
	}
	*out = b.p;
	*len = b.len;
	return 0;
}

int tallyd_metrics_render(struct tallyd_exporter_source *src, const struct tallyd_http_opts *o,
			  char **out, size_t *len)
{
	struct scrape sc = { 0 };
	int rc = render(src, o, &sc, out, len);

	scrape_free(&sc);
	return rc;
}

/* ---- listen address ---- */

static bool listen_ok(int fd)
{
	return listen(fd, 64) == 0;
}

static int parse_port(const char *s, uint16_t *port, char *why, size_t whylen)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (!*s || *end || errno || v > 65535 || *s == '-' || *s == '+') {
		snprintf(why, whylen, "\"%s\" is not a port (0..65535)", s);
		return -EINVAL;
	}
	*port = (uint16_t)v;
	return 0;
}

int tallyd_parse_listen(const char *s, struct sockaddr_storage *ss, socklen_t *sslen, char *why,
			size_t whylen)
{
	char host[128];
	const char *colon;
	uint16_t port;
	size_t hl;

	memset(ss, 0, sizeof(*ss));
	if (s[0] == '[') {
		const char *rb = strchr(s, ']');

		if (!rb || rb[1] != ':' || (size_t)(rb - s - 1) >= sizeof(host)) {
			snprintf(why, whylen, "\"%s\": expected [IPV6]:PORT", s);
			return -EINVAL;
		}
		hl = (size_t)(rb - s - 1);
		memcpy(host, s + 1, hl);
		host[hl] = '\0';
		colon = rb + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon || (size_t)(colon - s) >= sizeof(host)) {
			snprintf(why, whylen, "\"%s\": expected ADDR:PORT, e.g. 127.0.0.1:9464", s);
			return -EINVAL;
		}
		hl = (size_t)(colon - s);
		memcpy(host, s, hl);
		host[hl] = '\0';
	}
	if (parse_port(colon + 1, &port, why, whylen))
		return -EINVAL;
	if (s[0] == '[') {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;

		a->sin6_family = AF_INET6;
		a->sin6_port = htons(port);
		if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) {
			snprintf(why, whylen, "\"%s\" is not an IPv6 address", host);
			return -EINVAL;
		}
		*sslen = sizeof(*a);
		return 0;
	}
	struct sockaddr_in *a = (struct sockaddr_in *)ss;

	a->sin_family = AF_INET;
	a->sin_port = htons(port);
	if (strcmp(host, "*") == 0 || strcmp(host, "0.0.0.0") == 0) {
		a->sin_addr.s_addr = htonl(INADDR_ANY);
	} else if (inet_pton(AF_INET, host, &a->sin_addr) != 1) {
		snprintf(why, whylen, "\"%s\" is not an IPv4 address (use [ADDR]:PORT for IPv6)", host);
		return -EINVAL;
	}
	*sslen = sizeof(*a);
	return 0;
}

/* ---- options ---- */

void tallyd_http_opts_init(struct tallyd_http_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->listen = TALLYD_HTTP_DEFAULT_LISTEN;
	o->histogram = true;
}

bool tallyd_http_tls_supported(void)
{
	return MHD_is_feature_supported(MHD_FEATURE_TLS) == MHD_YES;
}

int tallyd_http_user_parse(const char *entry, struct tallyd_http_user *u, char *why, size_t whylen)
{
	const char *colon = strchr(entry, ':'), *h;
	struct crypt_data *cd;
	const char *out;
	size_t nl;

	memset(u, 0, sizeof(*u));
	if (!colon || colon == entry) {
		snprintf(why, whylen, "\"%.80s\": expected NAME:BCRYPT_HASH", entry);
		return -EINVAL;
	}
	nl = (size_t)(colon - entry);
	h = colon + 1;
	if (nl >= sizeof(u->name)) {
		snprintf(why, whylen, "user name longer than %zu bytes", sizeof(u->name) - 1);
		return -EINVAL;
	}
	if (strlen(h) != 60 || h[0] != '$' || h[1] != '2' || !strchr("aby", h[2]) || h[3] != '$') {
		snprintf(why, whylen, "user %.*s: \"%.80s\" is not a bcrypt hash ($2b$, $2y$ or $2a$, "
			 "60 characters; e.g. htpasswd -nbBC 10 NAME PASSWORD)", (int)nl, entry, h);
		return -EINVAL;
	}
	/* crypt(3) must take it: a hash with a bad cost or salt fails every login */
	if (!(cd = calloc(1, sizeof(*cd))))
		return -ENOMEM;
	out = crypt_rn("", h, cd, sizeof(*cd));
	if (!out || out[0] == '*') {
		snprintf(why, whylen, "user %.*s: crypt(3) rejects the hash \"%.80s\" (cost 4..31, a "
			 "22-character salt)", (int)nl, entry, h);
		free(cd);
		return -EINVAL;
	}
	free(cd);
	memcpy(u->name, entry, nl);
	snprintf(u->hash, sizeof(u->hash), "%s", h);
	return 0;
}

/* ---- HTTP ---- */

/* libmicrohttpd's messages: the first of a window, then a count. */
struct log_limit {
	pthread_mutex_t mu;
	bool open;              /* a window is under way */
	uint64_t start_ns;
	uint64_t more;          /* messages not logged in it */
};

struct tallyd_exporter {
	struct MHD_Daemon *d;
	struct tallyd_exporter_source *src;
	struct tallyd_http_opts o;
	struct scrape sc;   /* arrays reused by every scrape: one HTTP thread */
	tallyd_log_fn log;
	uint16_t port;
	struct log_limit ll;
	char *tls_cert, *tls_key;  /* PEM, kept while the daemon runs */
	/* basic auth: the HTTP thread only */
	struct crypt_data cd;
	int good_user;             /* -1, or the user whose good password is in good_pass */
	char good_pass[128];
};

static void limit_flush(struct tallyd_exporter *x, uint64_t now, bool force)
{
	uint64_t more, secs;

	pthread_mutex_lock(&x->ll.mu);
	more = x->ll.more;
	secs = (now - x->ll.start_ns) / 1000000000u;
	if (!x->ll.open || (!force && now - x->ll.start_ns < TALLYD_HTTP_LOG_EVERY_S * 1000000000ull)) {
		pthread_mutex_unlock(&x->ll.mu);
		return;
	}
	x->ll.open = false;
	x->ll.more = 0;
	pthread_mutex_unlock(&x->ll.mu);
	if (more)
		x->log(1, "http: %" PRIu64 " more libmicrohttpd message%s in the last %" PRIu64 " s "
		       "(malformed requests, failed TLS handshakes and the like), not logged one by one",
		       more, more == 1 ? "" : "s", secs ? secs : 1);
}

/* libmicrohttpd's "... (HTTP response code is 400 ('<html>...</html>'))":
 * the HTML page it sent says nothing more; cut it. */
static void strip_html(char *msg)
{
	char *h = strstr(msg, " ('<html>"), *end;

	if (!h || !(end = strstr(h, "</html>')")))
		return;
	memmove(h, end + strlen("</html>')"), strlen(end + strlen("</html>')")) + 1);
}

/* fmt is libmicrohttpd's own printf format: the attribute says so, to
 * the compiler's -Wformat-nonliteral and to its checks of callers. */
__attribute__((format(printf, 2, 0))) static void mhd_log(void *cls, const char *fmt, va_list ap)
{
	struct tallyd_exporter *x = cls;
	uint64_t now = mono_ns();
	char msg[512];
	bool first;
	size_t n;

	limit_flush(x, now, false);
	pthread_mutex_lock(&x->ll.mu);
	first = !x->ll.open;
	if (first) {
		x->ll.open = true;
		x->ll.start_ns = now;
	} else {
		x->ll.more++;
	}
	pthread_mutex_unlock(&x->ll.mu);
	if (!first)
		return;
	vsnprintf(msg, sizeof(msg), fmt, ap);
	strip_html(msg);
	n = strlen(msg);
	while (n > 0 && msg[n - 1] == '\n')
		msg[--n] = '\0';
	x->log(1, "http: %s (further messages within %d s are counted, not logged)", msg,
	       TALLYD_HTTP_LOG_EVERY_S);
}

static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, const char *text,
			     const char *allow)
{
	struct MHD_Response *r;
	enum MHD_Result ret;

	r = MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
	if (!r)
		return MHD_NO;
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
	if (allow)
		MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
	ret = MHD_queue_response(c, status, r);
	MHD_destroy_response(r);
	return ret;
}

/* Accept-Encoding names gzip (any case) without q=0. */
static bool accepts_gzip(struct MHD_Connection *c)
{
	const char *ae = MHD_lookup_connection_value(c, MHD_HEADER_KIND,
						     MHD_HTTP_HEADER_ACCEPT_ENCODING);

	while (ae && *ae) {
		size_t tl;
		const char *q;

		ae += strspn(ae, " \t,");
		tl = strcspn(ae, " \t;,");
		if (tl == 4 && strncasecmp(ae, "gzip", 4) == 0) {
			const char *end = ae + strcspn(ae, ",");

			q = strstr(ae, "q=");
			return !(q && q < end && strtod(q + 2, NULL) <= 0.0);
		}
		ae += strcspn(ae, ",");
	}
	return false;
}

/* body gzipped into *out (malloc'd): 0, or -ENOMEM/-EIO. */
static int gzip_body(const char *in, size_t len, char **out, size_t *outlen)
{
	z_stream z;
	size_t cap;
	int rc;

	memset(&z, 0, sizeof(z));
	*out = NULL;
	if (len > UINT32_MAX / 2 ||
	    deflateInit2(&z, TALLYD_HTTP_GZIP_LEVEL, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
		return -ENOMEM;
	cap = deflateBound(&z, (uLong)len);
	if (!(*out = malloc(cap))) {
		deflateEnd(&z);
		return -ENOMEM;
	}
	z.next_in = (Bytef *)(uintptr_t)in;
	z.avail_in = (uInt)len;
	z.next_out = (Bytef *)*out;
	z.avail_out = (uInt)cap;
	rc = deflate(&z, Z_FINISH);
	*outlen = z.total_out;
	deflateEnd(&z);
	if (rc != Z_STREAM_END) {
		free(*out);
		*out = NULL;
		return -EIO;
	}
	return 0;
}

static enum MHD_Result serve_metrics(struct tallyd_exporter *x, struct MHD_Connection *c)
{
	struct MHD_Response *r;
	enum MHD_Result ret;
	char *body, *gz;
	size_t len, gzlen;
	bool gzip = false;
	int rc = render(x->src, &x->o, &x->sc, &body, &len);

	if (rc != 0) {
		x->log(0, "GET /metrics: %s", tally_strerror(rc));
		return reply(c, MHD_HTTP_INTERNAL_SERVER_ERROR, "cannot read the segment\n", NULL);
	}
	if (accepts_gzip(c) && gzip_body(body, len, &gz, &gzlen) == 0) {
		free(body);
		body = gz;
		len = gzlen;
		gzip = true;
	}
	r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
	if (!r) {
		free(body);
		return MHD_NO;
	}
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE,
				"text/plain; version=0.0.4; charset=utf-8");
	MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	MHD_add_response_header(r, MHD_HTTP_HEADER_VARY, MHD_HTTP_HEADER_ACCEPT_ENCODING);
	if (gzip)
		MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_ENCODING, "gzip");
	ret = MHD_queue_response(c, MHD_HTTP_OK, r);
	MHD_destroy_response(r);
	return ret;
}

/* Constant-time equality of two NUL-terminated strings of at most n bytes. */
static bool same(const char *a, const char *b, size_t n)
{
	unsigned char d = 0;
	size_t la = strnlen(a, n), lb = strnlen(b, n);

	for (size_t i = 0; i < n; i++)
		d |= (unsigned char)((i < la ? a[i] : 0) ^ (i < lb ? b[i] : 0));
	return d == 0 && la == lb;
}

/*
 * Basic auth against the bcrypt hashes. An unknown user costs the same
 * bcrypt as a known one (the first user's hash), so that timing does not
 * tell which names exist.
 */
static bool authorized(struct tallyd_exporter *x, struct MHD_Connection *c)
{
	char *pass = NULL, *user;
	const struct tallyd_http_user *u = NULL;
	const char *out;
	bool ok = false;
	int idx = -1;

	if (!x->o.nusers)
		return true;
	if (!(user = MHD_basic_auth_get_username_password(c, &pass)))
		return false;
	for (uint32_t i = 0; i < x->o.nusers; i++)
		if (strcmp(x->o.users[i].name, user) == 0)
			idx = (int)i;
	if (pass && idx >= 0 && idx == x->good_user && same(pass, x->good_pass, sizeof(x->good_pass))) {
		ok = true;
	} else if (pass) {
		u = &x->o.users[idx >= 0 ? idx : 0];
		out = crypt_rn(pass, u->hash, &x->cd, sizeof(x->cd));
		ok = idx >= 0 && out && same(out, u->hash, sizeof(u->hash));
		if (ok && strlen(pass) < sizeof(x->good_pass)) {
			x->good_user = idx;
			snprintf(x->good_pass, sizeof(x->good_pass), "%s", pass);
		}
	}
	MHD_free(user);
	if (pass)
		MHD_free(pass);
	return ok;
}

static enum MHD_Result unauthorized(struct MHD_Connection *c)
{
	static const char text[] = "unauthorized\n";
	struct MHD_Response *r;
	enum MHD_Result ret;

	r = MHD_create_response_from_buffer(sizeof(text) - 1, (void *)text, MHD_RESPMEM_PERSISTENT);
	if (!r)
		return MHD_NO;
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
	ret = MHD_queue_basic_auth_fail_response(c, "tallyd", r);
	MHD_destroy_response(r);
	return ret;
}

/*
 * Credentials are checked first, on every path (as exporter-toolkit
 * does). A wrong path or method is answered on the first call, when only
 * the headers have been read: its body is never read (libmicrohttpd
 * closes the connection after the reply). GET and HEAD /metrics are
 * answered on the second call, once the request is complete, so that the
 * connection can be kept alive; a body sent with them is discarded as it
 * arrives (the connection's memory limit bounds what is buffered).
 */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
				  const char *method, const char *version, const char *upload,
				  size_t *upload_size, void **req_cls)
{
	static int started;
	struct tallyd_exporter *x = cls;

	(void)version;
	(void)upload;
	if (*req_cls == NULL) {
		limit_flush(x, mono_ns(), false);
		if (!authorized(x, c))
			return unauthorized(c);
		if (strcmp(url, "/metrics") != 0)
			return reply(c, MHD_HTTP_NOT_FOUND, "not found: try GET /metrics\n", NULL);
		if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 &&
		    strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
			return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed: use GET\n",
				     "GET, HEAD");
		*req_cls = &started;
		return MHD_YES;
	}
	if (*upload_size) {
		*upload_size = 0;
		return MHD_YES;
	}
	return serve_metrics(x, c);
}

/* A PEM file into a NUL-terminated buffer (at most 1 MiB). */
static int read_pem(const char *path, const char *key, char **out, char *why, size_t whylen)
{
	struct stat st;
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC), err;

	*out = NULL;
	if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > (1 << 20)) {
		err = fd < 0 ? errno : EINVAL;
		snprintf(why, whylen, "%s %s: %s", key, path,
			 fd < 0 ? strerror(err) : "not a regular file of at most 1 MiB");
		if (fd >= 0)
			close(fd);
		return -err;
	}
	if (!(*out = calloc(1, (size_t)st.st_size + 1))) {
		close(fd);
		return -ENOMEM;
	}
	n = read(fd, *out, (size_t)st.st_size);
	err = errno;
	close(fd);
	if (n != st.st_size || !strstr(*out, "-----BEGIN ")) {
		snprintf(why, whylen, "%s %s: %s", key, path, n < 0 ? strerror(err) : "not PEM "
			 "(no -----BEGIN line)");
		free(*out);
		*out = NULL;
		return -EINVAL;
	}
	return 0;
}

/*
 * The listening socket, bound here so that a failure names the address:
 * EADDRINUSE is another process (another tallyd?) on that port.
 */
static int open_listener(const char *listen, const struct sockaddr_storage *ss, socklen_t sslen,
			 char *why, size_t whylen)
{
	int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1, err;

	if (fd < 0) {
		err = errno;
		snprintf(why, whylen, "cannot listen on %s: socket: %s", listen, strerror(err));
		return -err;
	}
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (ss->ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (bind(fd, (const struct sockaddr *)ss, sslen) == 0 && listen_ok(fd))
		return fd;
	err = errno;
	close(fd);
	if (err == EADDRINUSE)
		snprintf(why, whylen, "cannot listen on %s: address already in use: another process "
			 "listens on that port (another tallyd? see ss -ltnp); choose another port with "
			 "[http] listen or --http ADDR:PORT, or turn the endpoint off with --no-http", listen);
	else if (err == EACCES)
		snprintf(why, whylen, "cannot listen on %s: permission denied (ports below 1024 need "
			 "CAP_NET_BIND_SERVICE): choose another port with [http] listen or --http", listen);
	else if (err == EADDRNOTAVAIL)
		snprintf(why, whylen, "cannot listen on %s: not an address of this host: fix [http] "
			 "listen or --http", listen);
	else
		snprintf(why, whylen, "cannot listen on %s: %s", listen, strerror(err));
	return -err;
}

static int start_daemon(struct tallyd_exporter *x, int fd, char *why, size_t whylen)
{
	unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
	struct MHD_OptionItem opts[] = {
		{ MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)mhd_log, x },
		{ MHD_OPTION_LISTEN_SOCKET, fd, NULL },
		{ MHD_OPTION_CONNECTION_LIMIT, TALLYD_HTTP_MAX_CONN, NULL },
		{ MHD_OPTION_CONNECTION_MEMORY_LIMIT, TALLYD_HTTP_MEM_LIMIT, NULL },
		{ MHD_OPTION_CONNECTION_TIMEOUT, TALLYD_HTTP_TIMEOUT_S, NULL },
		{ MHD_OPTION_END, 0, NULL },
		{ MHD_OPTION_END, 0, NULL },
		{ MHD_OPTION_END, 0, NULL },
	};

	if (x->o.tls_cert_file) {
		flags |= MHD_USE_TLS;
		opts[5] = (struct MHD_OptionItem){ MHD_OPTION_HTTPS_MEM_CERT, 0, x->tls_cert };
		opts[6] = (struct MHD_OptionItem){ MHD_OPTION_HTTPS_MEM_KEY, 0, x->tls_key };
	}
	x->d = MHD_start_daemon(flags, 0, NULL, NULL, on_request, x, MHD_OPTION_ARRAY, opts,
				MHD_OPTION_END);
	if (x->d)
		return 0;
	if (x->o.tls_cert_file)
		snprintf(why, whylen, "cannot serve TLS with tls_cert_file %s and tls_key_file %s (a "
			 "certificate and its unencrypted key in PEM; libmicrohttpd's reason is logged "
			 "above)", x->o.tls_cert_file, x->o.tls_key_file);
	else
		snprintf(why, whylen, "cannot start the HTTP server on %s: %s", x->o.listen,
			 strerror(errno ? errno : EINVAL));
	return -EINVAL;
}

static void exporter_free(struct tallyd_exporter *x)
{
	scrape_free(&x->sc);
	free(x->tls_cert);
	if (x->tls_key)
		explicit_bzero(x->tls_key, strlen(x->tls_key));
	free(x->tls_key);
	explicit_bzero(x->good_pass, sizeof(x->good_pass));
	pthread_mutex_destroy(&x->ll.mu);
	free(x);
}

int tallyd_exporter_start(const struct tallyd_http_opts *o, struct tallyd_exporter_source *src,
			  tallyd_log_fn log, struct tallyd_exporter **out, char *why, size_t whylen)
{
	struct sockaddr_storage ss;
	socklen_t sslen;
	struct tallyd_exporter *x;
	int fd, mfd = -1, rc = 0;

	*out = NULL;
	if (tallyd_parse_listen(o->listen, &ss, &sslen, why, whylen))
		return -EINVAL;
	if (o->tls_cert_file && !tallyd_http_tls_supported()) {
		snprintf(why, whylen, "this libmicrohttpd has no TLS: build it with GnuTLS");
		return -ENOTSUP;
	}
	if (!(x = calloc(1, sizeof(*x))))
		return -ENOMEM;
	pthread_mutex_init(&x->ll.mu, NULL);
	x->src = src;
	x->log = log;
	x->o = *o;
	x->good_user = -1;
	if (o->tls_cert_file &&
	    ((rc = read_pem(o->tls_cert_file, "tls_cert_file", &x->tls_cert, why, whylen)) != 0 ||
	     (rc = read_pem(o->tls_key_file, "tls_key_file", &x->tls_key, why, whylen)) != 0)) {
		exporter_free(x);
		return rc;
	}
	if ((fd = open_listener(o->listen, &ss, sslen, why, whylen)) < 0) {
		exporter_free(x);
		return fd;
	}
	/* libmicrohttpd gets a copy: it closes the socket it was given on some
	 * of its failure paths and not on others, so ours is closed here, once */
	if ((mfd = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0 || (rc = start_daemon(x, mfd, why, whylen)) != 0) {
		if (mfd < 0) {
			rc = -errno;
			snprintf(why, whylen, "cannot listen on %s: %s", o->listen, strerror(errno));
		}
		close(fd);
		exporter_free(x);
		return rc;
	}
	sslen = sizeof(ss);
	x->port = getsockname(fd, (struct sockaddr *)&ss, &sslen) == 0 ?
		  ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port :
						   ((struct sockaddr_in *)&ss)->sin_port) : 0;
	close(fd);
	*out = x;
	return 0;
}

uint16_t tallyd_exporter_port(const struct tallyd_exporter *x)
{
	return x ? x->port : 0;
}

void tallyd_exporter_stop(struct tallyd_exporter **px)
{
	if (!px || !*px)
		return;
	MHD_stop_daemon((*px)->d);
	limit_flush(*px, mono_ns(), true);
	exporter_free(*px);
	*px = NULL;
}
