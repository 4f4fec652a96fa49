/* SPDX-License-Identifier: MIT */
/*
 * tally/poller.h: the JetStream poller an owner runs beside its engine.
 * One thread keeps the segment's pending table up to date from a NATS
 * server with cnats: per watched stream, CONSUMER.LIST in pages of 256;
 * per explicitly listed consumer, one CONSUMER.INFO. Failures keep the
 * last good values, marked cached with their age; a circuit breaker stops
 * hammering a failing server; deleted consumers are marked gone, then
 * removed after gone_grace_ms; configured consumers the server never had
 * are marked not_found. Readers
 * see it all through tally_read_consumers() and tally_read_poller()
 * (tally/engine.h), and the engine folds the backlog of the consumers
 * whose filter subject matches into each subject's stats and verdict.
 */
#ifndef TALLY_POLLER_PUBLIC_H
#define TALLY_POLLER_PUBLIC_H

#include <tally/common.h>
#include <tally/segment.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Something to watch: a whole stream (consumer NULL or "") or one consumer. */
struct tally_poller_watch {
	const char *stream;      /* 1..127 bytes, no spaces, '.', '*', '>' */
	const char *consumer;    /* NULL or "": every consumer of the stream */
	/*
	 * Optional subject pattern the backlog applies to. For a pair it
	 * replaces the consumer's filter subject; for a whole stream it is
	 * given to the stream's consumers that have no filter subject (an
	 * unfiltered consumer without it matches no subject: see pending.h).
	 */
	const char *map_subject;
};

struct tally_poller_config {
	const char *urls;                 /* required: "nats://h1:4222,nats://h2:4222" */
	const char *creds_file;           /* optional: user JWT + nkey seed file */
	const char *user, *password;      /* optional */
	const char *token;                /* optional */
	const char *tls_ca_file;          /* optional: CA bundle; turns TLS on */
	const char *js_domain;            /* optional; not with js_prefix */
	const char *js_prefix;            /* optional API prefix, default "$JS.API" */
	uint32_t poll_interval_ms;        /* 0: 1000 */
	uint32_t request_timeout_ms;      /* 0: 2000; also the connect timeout */
	uint32_t breaker_threshold;       /* 0: 5 consecutive failed polls */
	uint32_t breaker_cooldown_ms;     /* 0: 5000 */
	uint32_t reconnect_wait_ms;       /* 0: 1000 */
	uint32_t reconnect_jitter_ms;     /* 0: 200 */
	/*
	 * How long a deleted consumer stays in the table as gone (it never
	 * counts as a backlog nor as stale data meanwhile). Then an entry of
	 * a whole-stream watch is removed and a configured STREAM/CONSUMER
	 * pair turns not_found. 0: 60000.
	 */
	uint32_t gone_grace_ms;
	const struct tally_poller_watch *watches;
	size_t nwatches;
	/*
	 * Backlog policy for readers of this table (tally__poller_policy):
	 * false (default) means backlog = num_pending + num_ack_pending,
	 * i.e. include_ack_pending = true; true means num_pending alone.
	 */
	bool exclude_ack_pending;
	bool manual;                      /* no thread: the caller runs tally__poller_poll_once */
	/* Log sink, called from the poller thread (or the caller of
	 * start/poll_once/reconfigure); levels 0 err, 1 warn, 2 info, 3 debug.
	 * NULL: stderr with a timestamp, levels 0..2. */
	void (*log)(void *ctx, int level, const char *msg);
	void *log_ctx;
};

struct tally_poller;

/* 0 if cfg is usable, else -EINVAL and the reason in why (may be NULL). */
TALLY_API int tally_poller_config_check(const struct tally_poller_config *cfg, char *why, size_t len);

/*
 * Start polling into the pending table of seg, which this process owns
 * (the poller becomes its only writer). A server that is down is not an
 * error: the poller keeps trying. 0, -EPERM (not the owner), -EINVAL (bad
 * config; tally_errmsg() says why), -ENOSPC (more consumers than
 * pending_capacity), -ENOMEM. Blocks for at most one connect attempt.
 */
TALLY_API int tally_poller_start(struct tally_segment *seg, const struct tally_poller_config *cfg,
				 struct tally_poller **out);

/* Stop and free; the table keeps its last contents. NULLs *p. Blocks for
 * at most one request timeout. */
TALLY_API void tally_poller_stop(struct tally_poller **p);

/* Swap the configuration (SIGHUP) between two polls, keeping the values of
 * consumers still watched. 0, or an error with the old one still running. */
TALLY_API int tally_poller_reconfigure(struct tally_poller *p, const struct tally_poller_config *cfg);

#ifdef __cplusplus
}
#endif
#endif /* TALLY_POLLER_PUBLIC_H */
