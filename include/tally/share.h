/* SPDX-License-Identifier: MIT */
/*
 * tally/share.h: verdicts shared between hosts through a JetStream KV
 * bucket, and the reads of other hosts' verdicts from the local segment.
 *
 * One tallyd runs per host. Its share thread (tally_share_start) does two
 * things, on its own thread and its own NATS connection, so the engine's
 * aggregator never waits for it:
 *   - it reads this host's published snapshot like any reader
 *     (tally_read_subject) every interval_ms and puts each subject's
 *     verdict, reasons, pressure, shed probability, P95 and pending into
 *     the bucket (default "tally_verdicts") under the key
 *     "<host>.<subject>" (subject bytes outside [A-Za-z0-9_-.] as "=XX"),
 *     when it changed (verdict or reasons; pressure or shed probability by
 *     0.05 or more; P95 or pending by 20% or more) and at least every
 *     refresh_ms unchanged, well inside the bucket's max_age, so that the
 *     entries of a host that died expire from the bucket. Puts are
 *     asynchronous (at most max_inflight awaiting their ack, each acked
 *     or failed within request_timeout_ms): puts counts the acknowledged
 *     ones, put_errors the failed ones, and a failure is handled as a
 *     failed put always was (error recorded, bucket bound again, every
 *     subject put again);
 *   - it watches the bucket and mirrors every other host's entries into the
 *     remote section of this host's segment, each with its host and its
 *     age, so that a gateway here reads another host's overload from
 *     local memory (tally_read_remote_worst: nanoseconds, no network).
 * No cluster protocol of tally's own: the bucket's stream, replicated by
 * JetStream (replicas), is the whole distributed state.
 *
 * Age and expiry. The age of a mirrored entry is the time since its host
 * put it, measured with this host's clock from the moment it arrived minus
 * its age then (now - the server's store time, clamped to [0, max_age]).
 * Older than stale_after_ms: stale (listed, never combined). Older than
 * max_age_ms, or deleted from the bucket: removed from the section.
 *
 * Combining. Per subject pattern (the longest matching pattern of rules;
 * the default applies to the rest): TALLY_SHARE_MAX, the worst host wins;
 * TALLY_SHARE_LOCAL, remote hosts are shown but never combined.
 * tally_read_remote_worst gives the worst remote entry of a subject that
 * may be combined; the caller takes the worse of it and its local verdict.
 *
 * Failures (bucket missing, deleted or not permitted, NATS down) never
 * touch local operation: the thread records a clear error in the section's
 * status block (tally_read_share, `tally stat`), retries every
 * retry_ms, and the mirrored entries age as they would.
 */
#ifndef TALLY_SHARE_H
#define TALLY_SHARE_H

#include <tally/common.h>
#include <tally/engine.h>
#include <tally/segment.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TALLY_SHARE_HOST_MAX 63
#define TALLY_SHARE_BUCKET_DEFAULT "tally_verdicts"

enum tally_share_combine {
	TALLY_SHARE_LOCAL = 0, /* ignore remote hosts for these subjects */
	TALLY_SHARE_MAX = 1,   /* the worst host wins (default) */
};

struct tally_share_rule {
	const char *pattern;   /* a subject or NATS wildcard pattern */
	enum tally_share_combine combine;
};

struct tally_share_config {
	const char *urls;                 /* required: "nats://h1:4222,nats://h2:4222" */
	const char *creds_file, *user, *password, *token, *tls_ca_file; /* optional, as the poller's */
	const char *js_domain;            /* optional */
	const char *bucket;               /* NULL: "tally_verdicts" */
	const char *host;                 /* required: 1..63 bytes of [A-Za-z0-9_-] */
	uint32_t interval_ms;             /* read the snapshot this often; 0: 100 */
	uint32_t refresh_ms;              /* re-put unchanged entries; 0: 5000 */
	uint32_t max_age_ms;              /* the bucket's max_age; 0: 30000 (>= 2 x refresh_ms) */
	uint32_t stale_after_ms;          /* 0: 3 x refresh_ms (<= max_age_ms) */
	uint32_t replicas;                /* of a bucket it creates; 0: 1 */
	uint32_t request_timeout_ms;      /* each put, bind, connect; 0: 2000 */
	uint32_t retry_ms;                /* after a failure; 0: 1000 */
	uint32_t max_inflight;            /* puts sent, not yet acknowledged; 0: 256 (1..65536) */
	bool no_create;                   /* bind to an existing bucket only */
	enum tally_share_combine default_combine; /* subjects no rule matches (default MAX) */
	const struct tally_share_rule *rules;
	size_t nrules;
	/* Log sink, from the share thread; levels 0 err .. 3 debug. NULL: stderr, 0..2. */
	void (*log)(void *ctx, int level, const char *msg);
	void *log_ctx;
};

struct tally_share;

/* Fill cfg with the defaults (default_combine MAX). Never fails. */
TALLY_API void tally_share_config_init(struct tally_share_config *cfg);

/* 0 if cfg is usable, else -EINVAL and the reason in why (may be NULL). */
TALLY_API int tally_share_config_check(const struct tally_share_config *cfg, char *why, size_t len);

/*
 * Start sharing for seg, a segment this process owns with a remote
 * section (tally_segment_config.remote_capacity > 0). Copies cfg. A NATS
 * server that is down, or a bucket that is missing, is not an error here
 * (the thread retries and says why in the status block). Returns 0,
 * -EINVAL (bad cfg), -EPERM (not the owner), -ENOTSUP (no remote section),
 * -ENOMEM. Does not block on the network.
 */
TALLY_API int tally_share_start(struct tally_segment *seg, const struct tally_share_config *cfg,
				struct tally_share **out);

/* Stop the thread: it ends its step (at most about interval_ms plus one
 * request), then waits up to request_timeout_ms for its puts still in
 * flight to be acknowledged (the rest is dropped, and logged); close its
 * connection, mark the status stopped, NULL *s. Mirrored entries stay. */
TALLY_API void tally_share_stop(struct tally_share **s);

/* ---- reads from any process ---- */

/* One mirrored entry of another host. */
struct tally_remote_stats {
	char host[TALLY_SHARE_HOST_MAX + 1];
	char subject[TALLY_SUBJECT_MAX + 1];
	enum tally_verdict verdict;
	uint32_t reasons;            /* TALLY_REASON_* */
	double pressure, shed_probability;
	uint64_t p95_ns, pending;
	uint32_t retry_after_ms;
	uint64_t age_ms;             /* since its host put it (see "Age and expiry") */
	bool stale;                  /* age_ms > stale_after_ms: never combined */
	bool combined;               /* its subject combines (max) and it is not stale */
	uint64_t revision;           /* KV revision */
};

/*
 * Every mirrored entry into out[0..cap), in section order. Returns how
 * many (>= 0; 0 also when seg has no remote section), TALLY_ECORRUPT or
 * TALLY_EBUSY_RETRY. Never blocks, never writes. Thread-safe.
 */
TALLY_API int tally_read_remote(const struct tally_segment *seg, struct tally_remote_stats *out, uint32_t cap);

/*
 * The worst combined remote entry for subject (exact subject): highest
 * verdict, then highest pressure. 0 with *out filled; -ENOENT when no
 * entry may be combined (none, stale, or a `local` subject, or no remote
 * section); TALLY_ECORRUPT. One pass over the section: microseconds at
 * thousands of entries, no locks, no writes. Thread-safe. For one subject
 * at a time, often, see tally_remote_index below.
 */
TALLY_API int tally_read_remote_worst(const struct tally_segment *seg, const char *subject,
				      struct tally_remote_stats *out);

/*
 * A reader's index of the remote section by subject, for a caller that
 * asks about one subject at a time, often: a gateway, on every request.
 * tally_read_remote_worst reads every entry of the section on each call
 * (4,096 with tallyd's default remote_capacity: tens of microseconds);
 * through an index a call reads only the entries that held the subject
 * when the index was last refreshed. What that costs in freshness: an
 * entry added since the refresh is seen after the next one (the caller
 * refreshes as often as a new host's verdict must show: the gateway every
 * 100 ms, against the seconds a verdict takes to cross hosts); an entry
 * that went away, changed subject or changed verdict is read as it is
 * now, on every call. Refreshing is one pass over the section, as one
 * tally_read_remote_worst.
 *
 * new: 0, or -ENOMEM; an index of a segment without a remote section is
 * valid and finds nothing. refresh: 0; TALLY_ECORRUPT or TALLY_EBUSY_RETRY
 * only for the section's header or status block (the index is then as
 * before); it never waits on a writer: an entry mid-write or one that does
 * not validate is put on a chain that every read follows. read: as
 * tally_read_remote_worst over the entries it follows (the same entry on
 * ties: the lowest-numbered), so TALLY_ECORRUPT or TALLY_EBUSY_RETRY for
 * such an entry as well, -ENOENT. The index belongs to seg and must be
 * freed before it is closed. Reads of one index may run together; a
 * refresh must not run with them (the caller's lock).
 */
struct tally_remote_index;
TALLY_API int tally_remote_index_new(const struct tally_segment *seg, struct tally_remote_index **out);
TALLY_API int tally_remote_index_refresh(struct tally_remote_index *ix);
TALLY_API int tally_read_remote_worst_indexed(const struct tally_remote_index *ix, const char *subject,
					      struct tally_remote_stats *out);
TALLY_API void tally_remote_index_free(struct tally_remote_index **ix);

/* The share thread's state as it last wrote it. */
struct tally_share_status {
	const char *state;            /* "off", "connecting", "running", "failing", "stopped" */
	bool connected;
	char host[TALLY_SHARE_HOST_MAX + 1];
	char bucket[64];
	uint64_t puts, put_errors;    /* this host's puts: acknowledged; failed, or dropped unacknowledged
				       * when the bucket was bound again or sharing stopped */
	uint64_t updates, rejected;   /* other hosts' entries received; refused by validation */
	uint64_t expired, full;       /* removed (max_age, deleted); dropped (section full) */
	uint64_t last_put_age_ms;     /* UINT64_MAX never */
	uint64_t last_error_age_ms;   /* UINT64_MAX none */
	uint32_t refresh_ms, stale_after_ms, max_age_ms;
	uint32_t remote_capacity;
	char last_error[128];         /* kept after recovery: see its age */
};

/* 0; -ENOENT (no remote section: sharing is not configured); TALLY_ECORRUPT;
 * TALLY_EBUSY_RETRY. Never blocks. Thread-safe. */
TALLY_API int tally_read_share(const struct tally_segment *seg, struct tally_share_status *out);

#ifdef __cplusplus
}
#endif
#endif /* TALLY_SHARE_H */
