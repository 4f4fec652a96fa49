/* SPDX-License-Identifier: MIT */
/*
 * verdict.c: threshold sets (validated when built, matched by the most
 * specific NATS pattern) and the verdict state machine with hysteresis.
 *
 * Each signal (P95 latency, backlog) has its own level 0/1/2 (ok, warn,
 * overload). It rises at once when the value reaches a threshold. It falls
 * only when the value is below clear_ratio x the threshold of the level it
 * holds and that level has been held for min_dwell_ms; it then falls to
 * the highest level whose clear level the value still reaches. So a value
 * oscillating around a threshold trips once and holds, and a recovering
 * subject goes overload -> warn -> ok, each step after the dwell time.
 * The verdict is the higher of the levels, or unknown when there is
 * nothing to judge (see tally/verdict.h for staleness).
 *
 * The third signal, stalled, has only the levels 0 and 2. Progress is a
 * publish at which the subject's since-start sample count grew, or its
 * live backlog was lower than at the last live reading, or 0: each resets
 * progress_ns. The stall trips when a live backlog above 0 has seen no
 * progress for stall_after_ms, and clears (after min_dwell_ms) at the
 * first publish that finds progress within stall_after_ms again. Pending
 * data that is stale or missing is no reading: the stall level drops with
 * it (as the backlog's does) and the backlog moves no progress; the count
 * still does.
 *
 * Wait (the P95 of the waits recorded from ack replies) is a signal like
 * latency, with its own levels. CoDel is a signal with the levels 0 and
 * 1: the engine computes the minimum wait of each interval (engine.c);
 * here it raises warn while the last whole interval's minimum was above
 * target, and clears after min_dwell_ms. Pressure and shed probability
 * follow the raw values at every publish (the formulas are in
 * tally/verdict.h, and in pressure_of and shed_of below).
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "subject.h"
#include "verdict.h"

struct rule_entry {
	char pattern[TALLY_SUBJECT_MAX + 1];
	int specificity;
	struct tally_threshold_rule rule;
};

struct tally_thresholds {
	struct tally_threshold_rule def;
	struct rule_entry *rules;
	size_t n, cap;
};

TALLY_API void tally_threshold_rule_init(struct tally_threshold_rule *r)
{
	memset(r, 0, sizeof(*r));
	r->p95_warn_ns = 100000000ull;     /* 100 ms */
	r->p95_overload_ns = 500000000ull; /* 500 ms */
	r->pending_warn = 1000;
	r->pending_overload = 10000;
	r->min_samples = 20;
	r->stale_after_ms = 5000;
	r->stale_policy = TALLY_STALE_FAIL_OPEN;
	r->clear_ratio = 0.8;
	r->min_dwell_ms = 2000;
	r->retry_after_ms = 1000;
	r->stall_after_ms = 10000;
	r->wait_p95_warn_ns = 100000000ull;     /* 100 ms */
	r->wait_p95_overload_ns = 500000000ull; /* 500 ms */
	r->codel_target_ns = 5000000ull;        /* 5 ms, folly Codel's default */
	r->codel_interval_ms = 100;             /* folly Codel's default */
	r->retry_after_max_ms = 30000;
}

TALLY_API struct tally_thresholds *tally_thresholds_new(void)
{
	struct tally_thresholds *t = calloc(1, sizeof(*t));

	if (t)
		tally_threshold_rule_init(&t->def);
	return t;
}

TALLY_API void tally_thresholds_free(struct tally_thresholds **t)
{
	if (!t || !*t)
		return;
	free((*t)->rules);
	free(*t);
	*t = NULL;
}

static int rule_check(const char *pattern, const struct tally_threshold_rule *r)
{
	const char *what = pattern && *pattern ? pattern : "default";

	if (r->p95_warn_ns && r->p95_overload_ns && r->p95_warn_ns > r->p95_overload_ns)
		return tally__fail(-EINVAL, "thresholds for \"%s\": p95_warn (%llu ns) is above "
				   "p95_overload (%llu ns)", what, (unsigned long long)r->p95_warn_ns,
				   (unsigned long long)r->p95_overload_ns);
	if (r->pending_warn && r->pending_overload && r->pending_warn > r->pending_overload)
		return tally__fail(-EINVAL, "thresholds for \"%s\": pending_warn (%llu) is above "
				   "pending_overload (%llu)", what, (unsigned long long)r->pending_warn,
				   (unsigned long long)r->pending_overload);
	if (r->wait_p95_warn_ns && r->wait_p95_overload_ns && r->wait_p95_warn_ns > r->wait_p95_overload_ns)
		return tally__fail(-EINVAL, "thresholds for \"%s\": wait_p95_warn (%llu ns) is above "
				   "wait_p95_overload (%llu ns)", what, (unsigned long long)r->wait_p95_warn_ns,
				   (unsigned long long)r->wait_p95_overload_ns);
	if (r->retry_after_max_ms < r->retry_after_ms)
		return tally__fail(-EINVAL, "thresholds for \"%s\": retry_after_max_ms %u is below "
				   "retry_after_ms %u", what, r->retry_after_max_ms, r->retry_after_ms);
	if (r->codel_interval_ms < 1 || r->codel_interval_ms > 60000)
		return tally__fail(-EINVAL, "thresholds for \"%s\": codel_interval_ms %u is outside 1..60000",
				   what, r->codel_interval_ms);
	if (!(r->clear_ratio > 0.0 && r->clear_ratio <= 1.0))
		return tally__fail(-EINVAL, "thresholds for \"%s\": clear_ratio %g is outside (0, 1]",
				   what, r->clear_ratio);
	if (r->stall_after_ms && (r->stall_after_ms < TALLY__STALL_MIN_MS ||
				  r->stall_after_ms > TALLY__STALL_MAX_MS))
		return tally__fail(-EINVAL, "thresholds for \"%s\": stall_after_ms %u is outside %u..%u "
				   "(0 turns the stall check off)", what, r->stall_after_ms,
				   TALLY__STALL_MIN_MS, TALLY__STALL_MAX_MS);
	if (r->stale_policy != TALLY_STALE_FAIL_OPEN && r->stale_policy != TALLY_STALE_FAIL_CLOSED)
		return tally__fail(-EINVAL, "thresholds for \"%s\": unknown stale policy %d", what,
				   (int)r->stale_policy);
	return 0;
}

TALLY_API int tally_thresholds_add(struct tally_thresholds *t, const char *pattern,
				   const struct tally_threshold_rule *r)
{
	int rc;

	tally__clear_errmsg();
	if ((rc = rule_check(pattern, r)))
		return rc;
	if (!pattern || !*pattern) {
		t->def = *r;
		return 0;
	}
	if ((rc = tally_subject_validate(pattern, true)))
		return tally__fail(rc, "thresholds: pattern %s", tally_errmsg());
	for (size_t i = 0; i < t->n; i++)
		if (strcmp(t->rules[i].pattern, pattern) == 0)
			return tally__fail(-EEXIST, "thresholds: pattern \"%s\" is given twice", pattern);
	if (t->n == t->cap) {
		size_t cap = t->cap ? 2 * t->cap : 16;
		struct rule_entry *n = realloc(t->rules, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		t->rules = n;
		t->cap = cap;
	}
	struct rule_entry *e = &t->rules[t->n++];
	snprintf(e->pattern, sizeof(e->pattern), "%s", pattern);
	e->specificity = tally__pattern_specificity(pattern);
	e->rule = *r;
	return 0;
}

TALLY_API const struct tally_threshold_rule *tally_thresholds_match(const struct tally_thresholds *t,
								    const char *subject,
								    const char **pattern_out)
{
	const struct rule_entry *best = NULL;

	for (size_t i = 0; i < t->n; i++) {
		const struct rule_entry *e = &t->rules[i];
		if ((!best || e->specificity > best->specificity) && tally__subject_match(e->pattern, subject))
			best = e;
	}
	if (pattern_out)
		*pattern_out = best ? best->pattern : "";
	return best ? &best->rule : &t->def;
}

size_t tally__thresholds_count(const struct tally_thresholds *t)
{
	return t->n;
}

const char *tally__thresholds_pattern(const struct tally_thresholds *t, size_t i)
{
	return i < t->n ? t->rules[i].pattern : NULL;
}

const struct tally_threshold_rule *tally__thresholds_rule(const struct tally_thresholds *t, size_t i)
{
	return i < t->n ? &t->rules[i].rule : NULL;
}

const struct tally_threshold_rule *tally__thresholds_default(const struct tally_thresholds *t)
{
	return &t->def;
}

uint32_t tally__thresholds_index(const struct tally_thresholds *t, const struct tally_threshold_rule *r)
{
	for (size_t i = 0; i < t->n; i++)
		if (r == &t->rules[i].rule)
			return (uint32_t)(i + 1);
	return 0;
}

TALLY_API const char *tally_verdict_name(enum tally_verdict v)
{
	switch (v) {
	case TALLY_VERDICT_OK: return "ok";
	case TALLY_VERDICT_WARN: return "warn";
	case TALLY_VERDICT_OVERLOAD: return "overload";
	default: return "unknown";
	}
}

TALLY_API const char *tally_reasons_format(uint32_t reasons, char *buf, size_t len)
{
	static const struct { uint32_t bit; const char *name; } names[] = {
		{ TALLY_REASON_LATENCY, "latency" }, { TALLY_REASON_PENDING, "pending" },
		{ TALLY_REASON_STALE, "stale" }, { TALLY_REASON_NO_DATA, "no_data" },
		{ TALLY_REASON_FAIL_OPEN, "fail_open" }, { TALLY_REASON_STALLED, "stalled" },
		{ TALLY_REASON_WAIT, "wait" }, { TALLY_REASON_CODEL, "codel" },
	};
	size_t used = 0;

	if (len)
		buf[0] = '\0';
	for (size_t i = 0; i < TALLY__ARRAY_SIZE(names) && used < len; i++)
		if (reasons & names[i].bit)
			used += (size_t)snprintf(buf + used, len - used, "%s%s", used ? "," : "",
						 names[i].name);
	return buf;
}

/* ---- the state machine ------------------------------------------------------ */

static uint64_t threshold_of(uint8_t level, uint64_t warn, uint64_t over)
{
	return level >= 2 ? over : warn;
}

/* Level the raw value reaches (0 when the signal is not configured). */
static uint8_t raw_level(uint64_t v, uint64_t warn, uint64_t over)
{
	if (over && v >= over)
		return 2;
	if (warn && v >= warn)
		return 1;
	return 0;
}

/* Highest level whose clear level v still reaches, below `below`. */
static uint8_t held_level(uint64_t v, uint64_t warn, uint64_t over, double clear, uint8_t below)
{
	for (uint8_t l = below; l-- > 1;) {
		uint64_t thr = threshold_of(l, warn, over);
		if (thr && (double)v >= clear * (double)thr)
			return l;
	}
	return 0;
}

static void signal_step(struct tally__signal_state *s, uint64_t v, uint64_t warn, uint64_t over,
			const struct tally_threshold_rule *r, uint64_t now)
{
	uint8_t raw = raw_level(v, warn, over);

	if (raw > s->level) {
		s->level = raw;
		s->since_ns = now;
		return;
	}
	if (s->level == 0)
		return;
	uint64_t thr = threshold_of(s->level, warn, over);
	bool below_clear = !thr || (double)v < r->clear_ratio * (double)thr;
	bool dwelt = now - s->since_ns >= (uint64_t)r->min_dwell_ms * 1000000u;
	if (below_clear && dwelt) {
		s->level = held_level(v, warn, over, r->clear_ratio, s->level);
		s->since_ns = now;
	}
}

void tally__verdict_init(struct tally__verdict_state *st, uint64_t now)
{
	memset(st, 0, sizeof(*st));
	st->verdict = TALLY_VERDICT_UNKNOWN;
	st->reasons = TALLY_REASON_NO_DATA;
	st->since_ns = now;
	st->progress_ns = now;
}

static bool pending_stale(const struct tally_threshold_rule *r, const struct tally__verdict_input *in)
{
	if (in->pending_source == TALLY_PENDING_NEVER || in->pending_source == TALLY_PENDING_GONE)
		return true;
	return in->pending_age_ns > (uint64_t)r->stale_after_ms * 1000000u;
}

static uint32_t retry_after(const struct tally_threshold_rule *r, const struct tally__verdict_out *o,
			    const struct tally__verdict_input *in)
{
	if (o->verdict == TALLY_VERDICT_WARN)
		return r->retry_after_ms / 2;
	if (o->verdict != TALLY_VERDICT_OVERLOAD)
		return 0;
	uint64_t ms = r->retry_after_ms;
	if ((o->reasons & TALLY_REASON_PENDING) && in->rate > 0) {
		/* the time the subject needs to work off its backlog at its
		 * rate, at most retry_after_max_ms */
		double drain = (double)in->pending * 1000.0 / in->rate;
		if (drain > (double)ms)
			ms = drain > (double)r->retry_after_max_ms ? r->retry_after_max_ms : (uint64_t)drain;
	}
	return (uint32_t)ms;
}

/* The stalled signal (see the header): progress, then level 0 or 2. */
static void stall_step(struct tally__verdict_state *st, const struct tally_threshold_rule *r,
		       const struct tally__verdict_input *in, bool live, uint64_t now)
{
	bool progress = in->total_count != st->stall_total;

	st->stall_total = in->total_count;
	if (live) {
		if (in->pending == 0 || (st->stall_seen && in->pending < st->stall_pending))
			progress = true;
		st->stall_pending = in->pending;
		st->stall_seen = true;
	}
	if (progress)
		st->progress_ns = now;
	if (!r->stall_after_ms || !live) {
		st->stall = (struct tally__signal_state){ 0, now };
		return;
	}
	bool stuck = now - st->progress_ns >= (uint64_t)r->stall_after_ms * 1000000u;
	bool dwelt = now - st->stall.since_ns >= (uint64_t)r->min_dwell_ms * 1000000u;
	if (stuck && st->stall.level == 0)
		st->stall = (struct tally__signal_state){ 2, now };
	else if (!stuck && st->stall.level && dwelt)
		st->stall = (struct tally__signal_state){ 0, now };
}

static uint8_t max_level(const struct tally__verdict_state *st)
{
	uint8_t l[] = { st->latency.level, st->pending.level, st->stall.level, st->wait.level, st->codel.level };
	uint8_t m = 0;

	for (size_t i = 0; i < TALLY__ARRAY_SIZE(l); i++)
		m = l[i] > m ? l[i] : m;
	return m;
}

/* 0.5 at warn, 1 at overload, linear on each side (tally/verdict.h). */
double tally__pressure_of(uint64_t v, uint64_t warn, uint64_t over)
{
	if (!warn && !over)
		return 0.0;
	if (!warn || !over) { /* one level: a ramp from 0 to 1 at it */
		uint64_t t = warn ? warn : over;
		return v >= t ? 1.0 : (double)v / (double)t;
	}
	if (v >= over)
		return 1.0;
	if (v < warn)
		return 0.5 * (double)v / (double)warn;
	if (over == warn)
		return 1.0;
	return 0.5 + 0.5 * (double)(v - warn) / (double)(over - warn);
}

double tally__shed_probability(double pressure)
{
	double p = (pressure - 0.5) / 0.5;

	return p <= 0.0 ? 0.0 : p >= 1.0 ? 1.0 : p;
}

/* The CoDel signal: warn while the last interval was overloaded. */
static void codel_step(struct tally__signal_state *s, const struct tally_threshold_rule *r,
		       const struct tally__verdict_input *in, uint64_t now)
{
	bool on = r->codel_target_ns && in->codel_valid && in->codel_overloaded;
	bool dwelt = now - s->since_ns >= (uint64_t)r->min_dwell_ms * 1000000u;

	if (on && s->level == 0)
		*s = (struct tally__signal_state){ 1, now };
	else if (!on && s->level && dwelt)
		*s = (struct tally__signal_state){ 0, now };
}

/* The maximum of the signals' pressures (tally/verdict.h). */
static double pressure(const struct tally__verdict_state *st, const struct tally_threshold_rule *r,
		       const struct tally__verdict_input *in, bool latency_data, bool wait_data,
		       bool pending_live, enum tally_verdict v)
{
	double p = 0.0, q;

	if (v == TALLY_VERDICT_UNKNOWN)
		return 0.0;
	if (st->stall.level)
		return 1.0;
	if (latency_data)
		p = tally__pressure_of(in->p95_ns, r->p95_warn_ns, r->p95_overload_ns);
	if (wait_data && (q = tally__pressure_of(in->wait_p95_ns, r->wait_p95_warn_ns,
						 r->wait_p95_overload_ns)) > p)
		p = q;
	if (r->codel_target_ns && in->codel_valid &&
	    (q = tally__pressure_of(in->wait_min_ns, r->codel_target_ns,
				    r->wait_p95_overload_ns > r->codel_target_ns ? r->wait_p95_overload_ns
										 : r->codel_target_ns)) > p)
		p = q;
	if (pending_live && (q = tally__pressure_of(in->pending, r->pending_warn, r->pending_overload)) > p)
		p = q;
	return p;
}

void tally__verdict_update(struct tally__verdict_state *st, const struct tally_threshold_rule *r,
			   const struct tally__verdict_input *in, uint64_t now,
			   struct tally__verdict_out *out)
{
	bool latency_on = r->p95_warn_ns || r->p95_overload_ns;
	bool latency_data = latency_on && in->count >= r->min_samples;
	bool pending_on = (r->pending_warn || r->pending_overload) && in->pending_consumers > 0;
	bool stale = pending_on && pending_stale(r, in);
	bool backlog_live = in->pending_consumers > 0 && !pending_stale(r, in);
	uint32_t reasons = 0;
	enum tally_verdict v;

	/* no samples: the latency signal is 0, so a held level clears after its dwell */
	signal_step(&st->latency, latency_data ? in->p95_ns : 0, r->p95_warn_ns, r->p95_overload_ns, r, now);
	if (pending_on && !stale)
		signal_step(&st->pending, in->pending, r->pending_warn, r->pending_overload, r, now);
	else
		st->pending = (struct tally__signal_state){ 0, now };
	stall_step(st, r, in, backlog_live, now);
	bool wait_data = (r->wait_p95_warn_ns || r->wait_p95_overload_ns) && in->wait_count >= r->min_samples;
	signal_step(&st->wait, wait_data ? in->wait_p95_ns : 0, r->wait_p95_warn_ns, r->wait_p95_overload_ns,
		    r, now);
	codel_step(&st->codel, r, in, now);
	bool codel_data = r->codel_target_ns && in->codel_valid;

	if (stale) {
		reasons |= TALLY_REASON_STALE;
		if (r->stale_policy == TALLY_STALE_FAIL_OPEN)
			reasons |= TALLY_REASON_FAIL_OPEN;
	}
	uint8_t level = max_level(st);
	if (stale && r->stale_policy == TALLY_STALE_FAIL_CLOSED) {
		v = TALLY_VERDICT_UNKNOWN;
	} else if (!latency_data && !wait_data && !codel_data && !(pending_on && !stale) && level == 0) {
		v = TALLY_VERDICT_UNKNOWN;
		reasons |= TALLY_REASON_NO_DATA;
	} else {
		v = level == 2 ? TALLY_VERDICT_OVERLOAD : level == 1 ? TALLY_VERDICT_WARN : TALLY_VERDICT_OK;
		if (level && st->latency.level == level)
			reasons |= TALLY_REASON_LATENCY;
		if (level && st->pending.level == level)
			reasons |= TALLY_REASON_PENDING;
		if (level && st->stall.level == level)
			reasons |= TALLY_REASON_STALLED;
		if (level && st->wait.level == level)
			reasons |= TALLY_REASON_WAIT;
		if (level && st->codel.level == level)
			reasons |= TALLY_REASON_CODEL;
	}
	if (v != st->verdict)
		st->since_ns = now;
	st->verdict = v;
	st->reasons = reasons;
	out->verdict = v;
	out->reasons = reasons;
	out->since_ns = st->since_ns;
	out->retry_after_ms = retry_after(r, out, in);
	out->pressure = pressure(st, r, in, latency_data, wait_data, pending_on && !stale, v);
	out->shed_probability = tally__shed_probability(out->pressure);
}
