/* SPDX-License-Identifier: MIT */
/*
 * tally/engine.h: the engine an owner runs over its segment (tallyd, or a
 * router that embeds it), and the reads of what it publishes.
 *
 * The engine's aggregator thread (or, with drain_threads > 1, that many
 * drain threads, each taking its share of the producer slots) drains the
 * producer rings in batches,
 * keeps a sliding window per subject (time slices of log-linear
 * histograms, relative error at most 1/128 = 0.79%), and every publish
 * interval publishes an immutable snapshot of all subjects twice: through
 * liburcu (urcu-bp flavour, so any thread may read without registering)
 * for readers in the owner process, and through a latch in the segment
 * for readers in other processes (tally_read_subject()).
 *
 * Semantics: a subject with no sample in its window reports count 0 and
 * has_data false; its quantiles, min and max are then 0 and mean nothing.
 * Quantiles use the nearest-rank definition (the smallest value v such
 * that at least q of the window's samples are <= v), estimated within the
 * bound above, exact for values below 128 ns and at the window's min/max.
 */
#ifndef TALLY_ENGINE_H
#define TALLY_ENGINE_H

#include <tally/common.h>
#include <tally/segment.h>

#ifdef __cplusplus
extern "C" {
#endif

struct tally_engine;

enum tally_verdict {
	TALLY_VERDICT_UNKNOWN = 0,
	TALLY_VERDICT_OK = 1,
	TALLY_VERDICT_WARN = 2,
	TALLY_VERDICT_OVERLOAD = 3,
};

struct tally_engine_config {
	uint32_t drain_interval_us;   /* longest sleep when the rings are empty (default 1000) */
	uint64_t slice_ns;            /* time slice (default 1 s) */
	uint64_t window_ns;           /* sliding window, a multiple of slice_ns (default 10 s) */
	uint32_t publish_interval_ms; /* snapshot period (default 100) */
	uint32_t reap_interval_ms;    /* dead-producer check period (default 250) */
	bool pending_include_ack;     /* backlog = num_pending + num_ack_pending (default true) */
	/* Threads that drain the rings (default 1, at most TALLY_DRAIN_THREADS_MAX).
	 * 1: the aggregator thread drains every ring. N > 1: N drain threads,
	 * thread k taking the producer slots k, k + N, k + 2N, ...; the
	 * aggregator thread drains nothing and merges their windows into
	 * each subject's row at publish. */
	uint32_t drain_threads;
};

#define TALLY_DRAIN_THREADS_MAX 16

/* Fill cfg with the defaults. Never fails. */
TALLY_API void tally_engine_config_init(struct tally_engine_config *cfg);

/*
 * Start the engine on a segment this process owns (tally_segment_create).
 * Starts the aggregator thread, which publishes a first snapshot before
 * this returns, and with drain_threads > 1 that many drain threads. 0, -EINVAL (bad config, tally_errmsg() says which key),
 * -EPERM (not the owner), -EBUSY (an engine already runs on it), -ENOMEM.
 * The segment must outlive the engine.
 */
TALLY_API int tally_engine_start(struct tally_segment *seg, const struct tally_engine_config *cfg,
				 struct tally_engine **out);

/* Stop the aggregator, free everything, NULL *e. The last drain takes
 * every ring up to the tail it had when the stop began, and no further
 * (producers may go on recording; what they add after that stays in the
 * ring for the next engine), then publishes once. Blocks until the thread
 * has exited and RCU callbacks ran: bounded by one ring per slot, never by
 * how fast producers record. */
TALLY_API void tally_engine_stop(struct tally_engine **e);


/* "STREAM/CONSUMER" with both names at their longest (127 bytes each), NUL included. */
#define TALLY_PENDING_CONSUMER_MAX 256

/* Statistics of one subject as published. */
struct tally_subject_stats {
	tally_subject_t id;
	bool has_data;          /* count > 0: quantiles, min, max are measurements */
	uint64_t count;         /* samples in the window */
	uint64_t sum;           /* their sum in ns (saturating) */
	double mean;            /* ns */
	double rate;            /* samples per second over the window */
	uint64_t min_ns, max_ns;
	uint64_t p50_ns, p90_ns, p95_ns, p99_ns, p999_ns;
	uint64_t total_count;   /* since the engine started (a counter) */
	uint64_t total_sum;     /* ns, since start (a counter, saturating) */
	uint64_t window_ns;     /* the window these describe */
	uint64_t published_ns;  /* CLOCK_MONOTONIC of the snapshot */
	/* backlog of the JetStream consumers whose filter matches (max of them) */
	uint64_t pending;
	uint32_t pending_consumers; /* how many matched; 0: no pending signal */
	uint32_t pending_source;    /* enum tally_pending_source */
	uint64_t pending_age_ns;    /* since its last good refresh; UINT64_MAX never */
	/* The backlog is one consumer's, and that consumer's filter (or
	 * map_subject) also matches other subjects' rows: its num_pending
	 * counts all of them, so this subject's share of it is unknown. */
	bool pending_shared;
	/* The consumer that gave the backlog: 0 none, else its pending-table
	 * entry + 1. tally_pending_consumer_name() turns it into
	 * "STREAM/CONSUMER" (kept out of the stats so that a read copies no
	 * string: the in-process read stays a copy of a few cache lines). */
	uint32_t pending_entry;
	/* verdict (tally/verdict.h) */
	enum tally_verdict verdict;
	uint32_t reasons;           /* TALLY_REASON_* */
	uint64_t verdict_since_ns;  /* CLOCK_MONOTONIC when this verdict began */
	uint32_t retry_after_ms;    /* hint for gateways; 0 when ok */
	/* Wait in the stream, from the ack replies recorded with
	 * tally_record_jetstream() (tally/jsack.h); 0 without any. */
	bool has_wait;              /* wait_count > 0: the wait quantiles are measurements */
	uint64_t wait_count;        /* waits in the window */
	uint64_t wait_p50_ns, wait_p95_ns, wait_p99_ns;
	uint64_t wait_skewed;       /* since start: timestamps ahead of now (clock skew), recorded as 0 */
	/* CoDel: the minimum wait of the last whole interval, and whether it
	 * was above the rule's target (tally/verdict.h) */
	uint64_t wait_min_ns;
	bool codel_valid;           /* that interval saw a wait; else wait_min_ns is 0 */
	bool codel_overloaded;
	/* graded (tally/verdict.h): no hysteresis, follow the signals */
	double pressure;            /* [0, 1]: 0.5 at the warn thresholds, 1 at overload */
	double shed_probability;    /* [0, 1]: what a gateway sheds while under pressure */
	/* The threshold rule that judged this subject: 0 unknown (an owner
	 * that does not say), 1 the default rule, 2 + i the set's i-th
	 * pattern; rules_gen the generation of the set (it grows with every
	 * reload). tally_read_rule() turns them into the pattern and levels. */
	uint32_t rule;
	uint32_t rules_gen;
};

enum tally_pending_source {
	TALLY_PENDING_NONE = 0,   /* no consumer matches the subject */
	TALLY_PENDING_LIVE = 1,   /* refreshed by the last poll */
	TALLY_PENDING_CACHED = 2, /* last good value; the poller is failing */
	TALLY_PENDING_NEVER = 3,  /* configured, never fetched */
	TALLY_PENDING_GONE = 4,   /* the consumer was deleted (removed after the poller's grace period) */
	TALLY_PENDING_NOT_FOUND = 5, /* configured, but the server never had it */
};

/*
 * In-process read of subject id from the latest snapshot, without locks
 * (an RCU read-side section). 0, -ENOENT (no such subject or not yet
 * published). Wait-free, any thread, about 10 ns.
 */
TALLY_API int tally_engine_read(struct tally_engine *e, tally_subject_t id,
				struct tally_subject_stats *out);

#define TALLY_BUCKETS_MAX 96

/*
 * A subject's latency since the engine started, as a cumulative histogram
 * for Prometheus: cumulative[i] samples were <= le_ns[i] ns; count (the
 * +Inf bucket) and sum_ns cover the same samples. The bounds are bucket
 * edges of the engine's histograms, so the counts are exact: 4 per octave
 * from about 1 us to 1 s, then 1 per octave to about 37 min. They cover
 * closed time slices only, so they lag by at most one slice (default 1 s)
 * and, being counters, never go down.
 */
struct tally_subject_buckets {
	uint32_t n;
	uint64_t le_ns[TALLY_BUCKETS_MAX];
	uint64_t cumulative[TALLY_BUCKETS_MAX];
	uint64_t count;
	uint64_t sum_ns;
};

/* In-process read of subject id's buckets from the latest snapshot. 0 or
 * -ENOENT. Lock-free, any thread; copies about 1.5 KB. */
TALLY_API int tally_engine_read_buckets(struct tally_engine *e, tally_subject_t id,
					struct tally_subject_buckets *out);

struct tally_engine_counters {
	uint64_t drained;        /* samples taken from rings */
	uint64_t rejected;       /* entries with a subject id not in the table */
	uint64_t publishes;
	uint64_t last_publish_ns;/* duration of the last publish */
	uint64_t subjects_active;
	uint64_t producers_died, producers_released;
	uint64_t pending_kept;       /* pending entries unreadable at a publish: their last good copy was used */
	uint64_t claims_expired;     /* producer claims taken back after TALLY's claim timeout (killed mid-claim) */
	uint64_t subjects_tombstoned;/* subject entries left half-claimed, cleared by the reaper */
	uint64_t values_lost;        /* drained samples not recorded for want of memory: an idle
				      * subject's window, freed, could not get it back (part of drained) */
};
TALLY_API void tally_engine_counters(struct tally_engine *e, struct tally_engine_counters *out);

/* ---- reads from any process (the segment) ------------------------------- */

/*
 * Read subject id's published stats from the segment (any process; a
 * read-only mapping is enough). Returns 0; -ENOENT (no such subject or
 * never published); TALLY_ESTALE when the owner has not published for
 * more than 10 publish intervals (and at least 1 s): *out is filled but
 * must not be taken as live, check tally_segment_owner_alive();
 * TALLY_EBUSY_RETRY if no consistent copy was read within the bounded
 * retries (the writer would have to publish twice during one read).
 * Never blocks, never writes. Thread-safe. About 20-40 ns.
 */
/*
 * "STREAM/CONSUMER" of the consumer behind st's backlog (st->pending_entry),
 * read from seg's pending table into buf (at least TALLY_PENDING_CONSUMER_MAX
 * bytes to never cut a name). 0; -ENOENT (no consumer, or the entry is
 * unused now); -EAGAIN (its writer kept it busy); TALLY_ECORRUPT. If the
 * entry was reused since st was published (a consumer removed, another
 * added), the name is the entry's current one: at most one publish
 * interval old. Never blocks, never writes. Thread-safe.
 */
TALLY_API int tally_pending_consumer_name(const struct tally_segment *seg,
					  const struct tally_subject_stats *st, char *buf, size_t len);

TALLY_API int tally_read_subject(const struct tally_segment *seg, tally_subject_t id,
				 struct tally_subject_stats *out);

struct tally_rule_info; /* tally/verdict.h */

/*
 * The threshold rule that judged st (st->rule, st->rules_gen), from seg's
 * rules section: its pattern ("" for the default rule) and its levels.
 * 0; -ENOENT (st names no rule, or the owner keeps no rules section: an
 * older tallyd); -ESTALE (the rules were reloaded after st was published:
 * read the subject again); -EAGAIN (the owner kept rewriting them);
 * TALLY_ECORRUPT. Never blocks, never writes. Thread-safe.
 */
TALLY_API int tally_read_rule(const struct tally_segment *seg, const struct tally_subject_stats *st,
			      struct tally_rule_info *out);

struct tally_producer_stats {
	uint32_t slot;
	const char *state;  /* "active", "releasing", "dead", "cooling", "claiming" */
	pid_t pid, tid;     /* tid: the thread that attached (it may have exited since) */
	uint64_t generation; /* of the claim: grows by one with every claim of the slot */
	uint64_t samples;   /* stored in the ring by the current (or last) claim */
	uint64_t dropped;   /* ring full, by the current (or last) claim; the segment's total: tally_read_totals */
	uint64_t clamped;
	uint64_t backlog;   /* published and not yet drained */
	uint64_t lost;      /* the claimer's records lost to owner restarts before it came here */
	uint64_t moves;     /* owner restarts the claimer's handle followed */
	bool alive;         /* active and its process exists (pid + start time) */
};

/*
 * Stats of every slot that is not free, in slot order, into out[0..cap).
 * Returns how many were written (>= 0) or an error. Reads /proc for
 * liveness: not for a hot path. Thread-safe.
 */
TALLY_API int tally_read_producers(const struct tally_segment *seg, struct tally_producer_stats *out,
				   uint32_t cap);

/* One watched JetStream consumer, as the owner's poller last saw it. */
struct tally_consumer_stats {
	char stream[128], consumer[128];
	char filter[256];        /* the consumer's filter subject ("" none) */
	char map[256];           /* subjects mapped by configuration ("" none) */
	uint64_t num_pending, num_ack_pending, num_redelivered, num_waiting;
	uint64_t delivered_stream_seq, ack_floor_stream_seq;
	const char *source;      /* "live", "cached", "never", "gone", "not_found" */
	uint64_t age_ms;         /* since the last good refresh; UINT64_MAX never */
	int is_leader;           /* 1: the numbers are the consumer leader's (or a standalone
				  * server's); 0: the last reply named no leader, the values
				  * are older ones (see age_ms); -1 unknown */
	uint32_t consecutive_failures;
	char last_error[128];
	char server[32];         /* the server whose numbers these are (the leader), "" unknown */
};

/*
 * Every consumer in the segment's pending table into out[0..cap), in
 * table order. Returns how many (>= 0), TALLY_ECORRUPT, or
 * TALLY_EBUSY_RETRY. Never blocks, never writes. Thread-safe.
 */
TALLY_API int tally_read_consumers(const struct tally_segment *seg, struct tally_consumer_stats *out,
				   uint32_t cap);

/* The poller's connection and circuit breaker. */
struct tally_poller_stats {
	const char *breaker;     /* "closed", "open", "half-open" */
	bool connected;
	uint32_t consecutive_failures;
	uint64_t opens_total, polls_ok, polls_failed, skipped_overrun, skipped_open;
	uint64_t last_ok_age_ms; /* UINT64_MAX never */
	uint64_t state_age_ms;   /* since the breaker's last change */
	uint64_t untracked_consumers; /* found by the last poll but not tracked: the pending
				       * table (pending_capacity) is full; its polls still count ok */
	uint64_t last_error_age_ms;   /* age of last_error; UINT64_MAX when there is none */
	char last_error[128];    /* the last failure, kept after recovery (see its age) */
};

/* 0, TALLY_ECORRUPT, TALLY_EBUSY_RETRY. Never blocks. Thread-safe. */
TALLY_API int tally_read_poller(const struct tally_segment *seg, struct tally_poller_stats *out);

/* The segment's accounting since it was created, whatever producers came
 * and went: every sample a producer tried to record is in exactly one of
 * recorded, dropped or refused by its handle (tally_producer_counters'
 * lost); recorded = drained + still in the rings. Each total only grows.
 * A dead producer's slot is drained before it is reused, so nothing is
 * lost to reclaim. */
struct tally_segment_totals {
	uint64_t recorded; /* stored in the rings */
	uint64_t drained;  /* taken from the rings by the owner */
	uint64_t dropped;  /* a producer's ring was full (counted by the producers, per claim) */
	uint64_t clamped;  /* values above max_value_ns, stored as it (part of recorded) */
	uint64_t rejected; /* drained entries with a subject id not in the table (part of drained) */
	uint64_t skipped;  /* ring positions past a producer's ring: a corrupt tail, not samples */
	uint64_t age_ms;   /* since the owner stored them; UINT64_MAX never */
};
/* 0; TALLY_ESTALE when the owner has stopped publishing (*out is its last
 * word). Never blocks. Thread-safe. */
TALLY_API int tally_read_totals(const struct tally_segment *seg, struct tally_segment_totals *out);

#ifdef __cplusplus
}
#endif
#endif /* TALLY_ENGINE_H */
