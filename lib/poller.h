/* SPDX-License-Identifier: MIT */
/*
 * lib/poller.h: the JetStream poller (private to the library). One thread
 * in the segment's owner keeps the pending table (pending.h) up to date
 * from a NATS server with cnats: per watched stream, $JS.API.CONSUMER.LIST
 * in pages of 256 (the server's page size; {"offset":N} requests); per
 * explicitly listed stream/consumer pair that no whole-stream watch covers,
 * one $JS.API.CONSUMER.INFO; per watched stream, once, $JS.API.STREAM.INFO
 * for its retention, and for a work-queue stream each poll one STREAM.INFO
 * with subjects_filter per live consumer (per-subject backlog, pending.h
 * "Shared backlog"). Replies are read by a small bounded JSON
 * reader of our own (below), not by cnats' js_Consumers, whose decoding of
 * every field cost 20 times the request (see poller.c).
 *
 * Schedule. One poll at start, then one per interval. Never two polls in
 * flight (a mutex serialises the thread, tally__poller_poll_once and
 * tally__poller_reconfigure). A poll that outlasts its interval makes the
 * ticks it overlapped be skipped and counted (skipped_overrun).
 *
 * Failures. A poll fails when the connection is down, a request times out,
 * JetStream does not answer (not enabled, or wrong domain/prefix),
 * credentials are refused or the URL is bad. Then every entry keeps its
 * last good values, marked cached (its age grows from last_ok_ns), and the
 * first failed request ends the poll (no cascade of timeouts). One log line
 * when failing starts, one when it ends; what happens in between is at
 * debug level. A stream or consumer that does not exist is not a failure:
 * its entries turn gone (values zeroed, never the stream's total), one line
 * per stream and poll when that happens; a configured pair the server has
 * never reported turns not_found instead. After a good poll, entries gone
 * for gone_grace_ms are removed (whole-stream watches) or turn not_found
 * (configured pairs, which stay listed): deleting and recreating consumers
 * leaves nothing behind.
 *
 * Circuit breaker (one per connection, mirrored in the segment): after
 * breaker_threshold consecutive failed polls it opens for
 * breaker_cooldown_ms (ticks are skipped and counted as skipped_open); then
 * half-open lets one poll through: success closes it, failure reopens it.
 *
 * Connection. cnats reconnects an established connection forever
 * (MaxReconnect -1) with reconnect_wait_ms and jitter. The first connect
 * is retried by the poller itself on each allowed tick, not with cnats'
 * retry-on-failed-connect: with cnats 3.4.1 that made
 * natsConnection_Connect block indefinitely on an authorization violation
 * or an unreachable server. So start never fails for a server that is
 * down, and entries of explicit pairs show source never until it answers.
 * Each connect attempt blocks the poller for at most request_timeout_ms.
 *
 * server and is_leader (pending.h, "In a cluster"): each live entry names
 * the server whose numbers it holds (the consumer leader the reply names,
 * or the connected server when the reply names no cluster) with is_leader
 * 1; a reply that names a cluster but no leader is not taken (is_leader 0,
 * last values kept, cached). Which server the poller is connected to does
 * not matter: the JetStream API routes each request to the leader.
 */
#ifndef TALLY_POLLER_H
#define TALLY_POLLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pending.h"

/* struct tally_poller_watch and struct tally_poller_config are public:
 * see include/tally/poller.h. */
#include <tally/poller.h>

/* A connect's handshake (TCP, the server's INFO, CONNECT and its PONG)
 * waits at most this per server, or request_timeout_ms when that is less:
 * a stop cannot interrupt a connect in progress, so this bounds how long a
 * server that accepts connections but never answers can hold up a stop.
 * Requests are interrupted at once (the stopper closes the connection). */
#define TALLY__POLLER_CONNECT_MAX_MS 2000u

struct tally__poller_stats {
	uint64_t polls_ok, polls_failed;
	uint64_t skipped_overrun, skipped_open;
	uint64_t breaker_opens;
	uint64_t requests;            /* JetStream API requests sent (all polls) */
	uint64_t last_requests;       /* requests of the last poll */
	uint64_t last_poll_ns;        /* duration of the last poll */
	uint64_t table_full;          /* consumers not tracked: pending table full */
	uint64_t subjects_unsplit;    /* work-queue consumers left shared: per-subject entries did not fit */
	uint32_t breaker_state;       /* enum tally__breaker_state */
	uint32_t consumers;           /* entries in use */
	bool connected;
};

struct tally__poller;

/*
 * Check a configuration without starting anything. Returns 0 or -EINVAL
 * with the reason in why (may be NULL). Thread-safe.
 */
int tally__poller_config_check(const struct tally_poller_config *cfg, char *why, size_t why_len);

/*
 * Start polling into the pending section (formatted by tally__pending_init
 * for capacity entries; the poller becomes its only writer). capacity is
 * the owner's own (its configuration), never the section header's: every
 * producer maps that header writable, and the poller writes entries by
 * index. Copies cfg. A server that is down is not an error. Returns 0 and
 * *out, or -EINVAL (bad config, logged), -EBADMSG (len cannot hold
 * capacity entries), -ENOSPC (more explicit pairs than entries), -ENOMEM,
 * or a pthread error. Does not block on the network: the thread (or the
 * first tally__poller_poll_once in manual mode) connects.
 */
int tally__poller_start(const struct tally_poller_config *cfg, void *pending_section, size_t len,
			uint32_t capacity, struct tally__poller **out);

/*
 * Stop the thread (waits for a poll in progress: at most about
 * request_timeout_ms), close the connection, free everything and set *pp to
 * NULL. The table keeps its last contents. NULL or *pp NULL: no-op.
 */
void tally__poller_stop(struct tally__poller **pp);

/*
 * Swap in a new configuration (SIGHUP) between two polls. Entries of
 * consumers still watched keep their values and slots; entries no longer
 * watched are cleared; new pairs appear as never. A change of server,
 * credentials, TLS or JetStream domain/prefix reconnects. Returns 0, or
 * -EINVAL / -ENOSPC / -ENOMEM with the old configuration still running.
 * Blocks while a poll is in progress.
 */
int tally__poller_reconfigure(struct tally__poller *p, const struct tally_poller_config *cfg);

/*
 * One poll now, in the caller's thread (tests, bench, manual mode); waits
 * for a poll in progress first. Honours the breaker. Returns 0 (poll ok),
 * -EBUSY (breaker open: skipped), -ENOTCONN (no connection), -ETIMEDOUT,
 * -ENOTSUP (JetStream not available), -EACCES (authorization), -EINVAL
 * (bad URL or connection settings), -EIO (server error, malformed reply).
 */
int tally__poller_poll_once(struct tally__poller *p);

/* Counters (consistent copy). Thread-safe, never blocks on a poll. */
void tally__poller_stats(struct tally__poller *p, struct tally__poller_stats *out);

/* The backlog policy the configuration asked for. */
struct tally__pending_policy tally__poller_policy(const struct tally__poller *p);

/* ---- JetStream API replies (poller.c's bounded JSON reader; fuzz targets) ---- */

/* The fields of one consumer the table needs; strings cut to fit (flags say so). */
struct tally__js_consumer {
	char stream[TALLY__PENDING_NAME_MAX];
	char name[TALLY__PENDING_NAME_MAX];
	char filter[TALLY__PENDING_SUBJ_MAX];
	char leader[128];
	uint64_t num_pending, num_ack_pending, num_redelivered, num_waiting;
	uint64_t delivered_stream_seq, ack_floor_stream_seq;
	bool has_cluster, name_too_long, filter_too_long;
};

/* {"error":{"code":404,"err_code":10059,"description":"..."}}; all 0 when absent. */
struct tally__js_error {
	int code, err_code;
	char description[128];
};

struct tally__js_page {
	uint64_t total, offset;   /* as the server says (not trusted for loops) */
	uint32_t count;           /* consumer objects in this page */
	uint32_t missing;         /* names in "missing" (offline in a cluster) */
	struct tally__js_error error;
};

/* Called per consumer of a page; missing: only c->name is set. A negative
 * return stops the parse and is what the parse returns. */
typedef int (*tally__js_consumer_fn)(void *ctx, const struct tally__js_consumer *c, bool missing);

/*
 * Parse a $JS.API.CONSUMER.LIST reply of len bytes (not NUL-terminated),
 * calling fn for each consumer as it is read. Returns 0, -EBADMSG when
 * malformed (consumers already passed to fn were complete), or fn's
 * negative return. Never reads outside [json, json + len). Thread-safe.
 */
int tally__js_parse_list(const char *json, size_t len, struct tally__js_page *page,
			 tally__js_consumer_fn fn, void *ctx);

/* Parse a $JS.API.CONSUMER.INFO reply. Returns 0 or -EBADMSG; err->code != 0 for an API error. */
int tally__js_parse_info(const char *json, size_t len, struct tally__js_consumer *out,
			 struct tally__js_error *err);

/* A $JS.API.STREAM.INFO reply: retention, paging, and state.subjects
 * (with a subjects_filter request) passed to fn one subject at a time
 * (cut: the subject did not fit its buffer). Callers zero it and set fn
 * and ctx before the parse. */
struct tally__js_stream_info {
	struct tally__js_error error;
	uint64_t total, offset, subjects;
	char retention[32];
	int (*fn)(void *ctx, const char *subject, bool cut, uint64_t count);
	void *ctx;
};

/* Returns 0, -EBADMSG, or fn's negative return. Never reads outside
 * [json, json + len). Thread-safe. A fuzz target (fuzz_jsreply). */
int tally__js_parse_stream_info(const char *json, size_t len, struct tally__js_stream_info *si);

#endif /* TALLY_POLLER_H */
