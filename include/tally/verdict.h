/* SPDX-License-Identifier: MIT */
/*
 * tally/verdict.h: backpressure verdicts. At every publish the engine
 * judges each subject ok, warn, overload or unknown from two signals, the
 * P95 latency of its window and the backlog (pending) of the JetStream
 * consumers that feed it, against thresholds given per exact subject or
 * NATS wildcard pattern (the most specific match wins; a default rule
 * covers the rest).
 *
 * Hysteresis. A signal raises the verdict as soon as it reaches a
 * threshold. It lowers it only when it has fallen below clear_ratio times
 * the threshold of the current state (default 80%) and the state has held
 * for at least min_dwell_ms, so a value sitting on a threshold does not
 * flap. Each signal keeps its own state; the verdict is the higher one.
 *
 * Stale pending data (older than stale_after_ms, never fetched, or the
 * consumer gone) follows the rule's policy: fail-open judges on latency
 * alone and says so (reason STALE with the verdict of the latency);
 * fail-closed makes the verdict unknown. Too few samples (min_samples) and
 * no pending signal: unknown with reason NO_DATA. A subject with no latency
 * data but a live pending signal is judged on its backlog alone.
 *
 * Stalled. A subject is stalled when messages wait for it (a live backlog
 * above 0), the backlog has not fallen and no completion has been recorded
 * for it (its since-start sample count has not grown) for stall_after_ms:
 * the state of a router that stopped completing messages, whatever the
 * size of the backlog. A stalled subject is overload with reason STALLED.
 * The stall clears when completions resume or the backlog falls, once it
 * has held for min_dwell_ms, like the other signals. Stale pending data
 * (see above) never makes a subject stalled: the backlog is not known to
 * be waiting.
 *
 * Wait and CoDel. A subject whose router records the ack replies of its
 * messages (tally/jsack.h) has a second series beside its latency: each
 * message's wait in the stream. Its P95 over the window is a signal like
 * the latency's (wait_p95_warn_ns, wait_p95_overload_ns; reason WAIT).
 * The CoDel signal looks at the standing queue instead: the MINIMUM wait
 * of each codel_interval_ms (default 100 ms) against codel_target_ns
 * (default 5 ms), as in folly's Codel. An interval begins with the first
 * wait after the previous one ended and lasts codel_interval_ms; when it
 * ends, the subject is codel-overloaded if its minimum was above the
 * target, i.e. no message dequeued during a whole interval waited less
 * than the target. A burst that the router works off within an interval
 * leaves a message with a short wait in it (before or after the burst)
 * and never trips it; a standing queue does. An interval that saw no
 * wait at all clears it. It raises the level to warn (reason CODEL), and
 * clears after min_dwell_ms like the others.
 *
 * Pressure. Besides its level, each subject gets a continuous pressure in
 * [0, 1] at every publish, with no hysteresis. Each signal s with levels
 * warn_s and overload_s maps its value v to
 *     p_s = 0.5 * v / warn_s                                  v < warn_s
 *         = 0.5 + 0.5 * (v - warn_s) / (overload_s - warn_s)  warn_s <= v < overload_s
 *         = 1                                                 v >= overload_s
 * (0.5 is the warn threshold, 1 the overload threshold; a signal with
 * only one level ramps linearly from 0 to 1 at it; an unconfigured
 * signal or one without data gives 0). The signals are: latency (P95
 * against p95_warn/p95_overload), wait (wait P95 against
 * wait_p95_warn/wait_p95_overload), codel (the last interval's minimum
 * wait against codel_target_ns and wait_p95_overload_ns: it reaches 0.5
 * exactly when the minimum crosses the target), pending (a live backlog
 * against pending_warn/pending_overload). A stalled subject has pressure
 * 1; an unknown one 0. pressure is their MAXIMUM: the signals are views
 * of one queue (a long wait, a long backlog and a late completion are
 * the same overload seen three ways), so a sum would count it more than
 * once, and the worst view is the one a gateway must act on.
 *
 * Shed probability, for gateways: 0 up to pressure 0.5 (every signal
 * below its warn level), then rising linearly to 1 at pressure 1:
 *     shed_probability = clamp((pressure - 0.5) / 0.5, 0, 1)
 * A gateway sheds each request with that probability (429, a
 * client that should slow down) while the level is warn, and answers 503
 * at overload. It rises ahead of the overload level, in proportion to
 * how far the worst signal is between its warn and overload thresholds
 * (Google SRE's client throttling rejects in proportion to load, Envoy's
 * overload manager scales between its thresholds the same way).
 */
#ifndef TALLY_VERDICT_H
#define TALLY_VERDICT_H

#include <tally/common.h>
#include <tally/engine.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Reasons, a bit set. */
#define TALLY_REASON_LATENCY 0x01u /* P95 at or above a level (or held by hysteresis) */
#define TALLY_REASON_PENDING 0x02u /* backlog at or above a level (or held) */
#define TALLY_REASON_STALE   0x04u /* pending data too old, never fetched or gone */
#define TALLY_REASON_NO_DATA 0x08u /* fewer than min_samples and no pending signal */
#define TALLY_REASON_FAIL_OPEN 0x10u /* stale pending ignored: judged on latency alone */
#define TALLY_REASON_STALLED 0x20u /* messages wait, the backlog is not falling and no
				      * completion was recorded for stall_after_ms */
#define TALLY_REASON_WAIT    0x40u /* wait P95 at or above a level (or held) */
#define TALLY_REASON_CODEL   0x80u /* the minimum wait of a whole CoDel interval was above target */

enum tally_stale_policy {
	TALLY_STALE_FAIL_OPEN = 0,
	TALLY_STALE_FAIL_CLOSED = 1,
};

struct tally_threshold_rule {
	uint64_t p95_warn_ns, p95_overload_ns;   /* default 100 ms, 500 ms; 0: not judged */
	uint64_t pending_warn, pending_overload; /* default 1000, 10000; 0: not judged */
	uint64_t min_samples;                    /* default 20 */
	uint32_t stale_after_ms;                 /* default 5000 */
	enum tally_stale_policy stale_policy;    /* default fail-open */
	double clear_ratio;                      /* default 0.8, in (0, 1] */
	uint32_t min_dwell_ms;                   /* default 2000 */
	uint32_t retry_after_ms;                 /* hint in overload (default 1000); warn: half */
	uint32_t stall_after_ms;                 /* stalled after this long (default 10000); 0: off */
	uint64_t wait_p95_warn_ns, wait_p95_overload_ns; /* default 100 ms, 500 ms; 0: not judged */
	uint64_t codel_target_ns;                /* default 5 ms; 0: CoDel off */
	uint32_t codel_interval_ms;              /* default 100, 1..60000 */
	uint32_t retry_after_max_ms;             /* overload on the backlog: the hint stretches to
						  * pending / rate, at most this (default 30000;
						  * at least retry_after_ms) */
};

/* A rule as a reader sees it (tally_read_rule, tally/engine.h). */
struct tally_rule_info {
	char pattern[TALLY_SUBJECT_MAX + 1]; /* "" for the default rule */
	bool is_default;
	uint32_t index;       /* 0 the default rule, 1 + i the set's i-th pattern */
	uint64_t rules_total; /* rules in the owner's set, the default's included */
	struct tally_threshold_rule levels;
};

/* The defaults above. Never fails. */
TALLY_API void tally_threshold_rule_init(struct tally_threshold_rule *r);

struct tally_thresholds;

/* An empty set; its default rule is tally_threshold_rule_init's. */
TALLY_API struct tally_thresholds *tally_thresholds_new(void);
TALLY_API void tally_thresholds_free(struct tally_thresholds **t);

/*
 * Add the rule for pattern (an exact subject or a NATS wildcard pattern;
 * NULL or "" sets the default rule). Validates: TALLY_EBADNAME for a bad
 * pattern, -EINVAL for a warn level above its overload level, a
 * clear_ratio outside (0, 1], and -EEXIST for a pattern given twice;
 * tally_errmsg() names the pattern and the key. Not thread-safe on the
 * same set.
 */
TALLY_API int tally_thresholds_add(struct tally_thresholds *t, const char *pattern,
				   const struct tally_threshold_rule *r);

/* The rule that applies to subject (most specific pattern, else default). */
TALLY_API const struct tally_threshold_rule *tally_thresholds_match(const struct tally_thresholds *t,
								    const char *subject,
								    const char **pattern_out);

/*
 * Give the engine a new threshold set (it takes ownership; NULLs *t).
 * Subjects keep their current verdict state; the new levels apply from
 * the next publish. Thread-safe; does not block on the aggregator.
 */
TALLY_API int tally_engine_set_thresholds(struct tally_engine *e, struct tally_thresholds **t);

/* Names: "ok", "warn", "overload", "unknown". */
TALLY_API const char *tally_verdict_name(enum tally_verdict v);

/* Reason bits as "latency,pending" into buf; returns buf. */
TALLY_API const char *tally_reasons_format(uint32_t reasons, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif /* TALLY_VERDICT_H */
