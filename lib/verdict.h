/* SPDX-License-Identifier: MIT */
/*
 * verdict.h (private): threshold sets and the per-subject verdict state
 * machine the engine runs at every publish. Pure logic: no clock, no
 * threads; the engine passes the time in.
 */
#ifndef TALLY_LIB_VERDICT_H
#define TALLY_LIB_VERDICT_H

#include <tally/verdict.h>

/* One signal's hysteresis state: level 0 ok, 1 warn, 2 overload. */
struct tally__signal_state {
	uint8_t level;
	uint64_t since_ns;
};

/* Bounds of a rule's stall_after_ms when it is not 0. */
#define TALLY__STALL_MIN_MS 100u
#define TALLY__STALL_MAX_MS 86400000u

struct tally__verdict_state {
	struct tally__signal_state latency, pending, stall; /* stall: level 0 or 2 */
	struct tally__signal_state wait, codel;             /* codel: level 0 or 1 */
	uint64_t progress_ns;   /* last publish that saw a completion or a falling backlog */
	uint64_t stall_total;   /* total_count at the last update */
	uint64_t stall_pending; /* backlog at the last live reading */
	bool stall_seen;        /* stall_pending holds a live reading */
	enum tally_verdict verdict;
	uint32_t reasons;
	uint64_t since_ns;
};

struct tally__verdict_input {
	uint64_t count;          /* samples in the window */
	uint64_t total_count;    /* samples since the engine started: completions */
	uint64_t p95_ns;
	double rate;             /* samples per second */
	uint32_t pending_consumers;
	uint32_t pending_source; /* enum tally_pending_source */
	uint64_t pending;
	uint64_t pending_age_ns;
	uint64_t wait_count;     /* waits in the window */
	uint64_t wait_p95_ns;
	uint64_t wait_min_ns;    /* minimum of the last whole CoDel interval */
	bool codel_valid;        /* that interval saw a wait */
	bool codel_overloaded;   /* its minimum was above the rule's target */
};

struct tally__verdict_out {
	enum tally_verdict verdict;
	uint32_t reasons;
	uint64_t since_ns;
	uint32_t retry_after_ms;
	double pressure;         /* [0, 1], tally/verdict.h */
	double shed_probability; /* [0, 1] */
};

/* The patterns of t's rules (not the default rule), i < count: for the
 * engine, which gives the literal ones rows before their first sample. */
size_t tally__thresholds_count(const struct tally_thresholds *t);
const char *tally__thresholds_pattern(const struct tally_thresholds *t, size_t i);
/* The i-th pattern's rule (NULL past the end), the default rule, and the
 * index of a rule that tally_thresholds_match returned: 0 the default,
 * 1 + i the i-th pattern. */
const struct tally_threshold_rule *tally__thresholds_rule(const struct tally_thresholds *t, size_t i);
const struct tally_threshold_rule *tally__thresholds_default(const struct tally_thresholds *t);
uint32_t tally__thresholds_index(const struct tally_thresholds *t, const struct tally_threshold_rule *r);

/* Start state: unknown since now, progress (for the stall) now. */
void tally__verdict_init(struct tally__verdict_state *st, uint64_t now_ns);

/* The pressure of one signal's value against its levels (tally/verdict.h). */
double tally__pressure_of(uint64_t v, uint64_t warn, uint64_t over);
/* clamp((pressure - 0.5) / 0.5, 0, 1) */
double tally__shed_probability(double pressure);

/* One step of the state machine for one subject. */
void tally__verdict_update(struct tally__verdict_state *st, const struct tally_threshold_rule *r,
			   const struct tally__verdict_input *in, uint64_t now_ns,
			   struct tally__verdict_out *out);

#endif /* TALLY_LIB_VERDICT_H */
