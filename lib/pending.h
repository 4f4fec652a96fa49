/* SPDX-License-Identifier: MIT */
/*
 * lib/pending.h: the pending table, a section of the shm segment (private
 * layout, not a public header). The poller thread is its only writer; any
 * process that maps the segment may read it. It holds a section header, one
 * circuit-breaker block for the poller's NATS connection and `capacity`
 * entries, one per watched JetStream consumer, each with its own seqlock.
 *
 * Seqlock. Writer (single thread): seq+1, then every field with a release
 * store, then seq+2 with release. Reader: seq with acquire (odd: writer
 * inside, retry), every field with an acquire load, seq again; equal means
 * the copy is consistent, else retry, at most TALLY__PENDING_READ_TRIES
 * times, then -EAGAIN. (Release/acquire per field rather than relaxed
 * accesses between fences: the same ordering, plain moves on x86, and
 * ThreadSanitizer, which does not model atomic_thread_fence, follows it.)
 * Every shared field, strings included (packed into 64-bit words), is a
 * C11 atomic: a reader racing the writer may assemble a torn *record*,
 * which the sequence check discards, but never performs a data race.
 *
 * Readers trust nothing: magic, version, entry and block sizes and the
 * capacity are checked against the mapped length (-EBADMSG), each header
 * word read once, strings must be NUL-terminated within their field, enums
 * within range. The owner (engine, poller) goes further: it takes the
 * capacity from its own configuration and never reads the section header
 * (tally__pending_read_entry_cap, tally__poller_start).
 *
 * Backlog for a subject (tally__pending_for_subject): every entry whose
 * match pattern matches the subject is a candidate; its backlog is
 * num_pending (+ num_ack_pending when the policy says so, the default).
 * The match pattern is the map_subject configured for the entry if any,
 * else the consumer's filter subject. An entry with neither (an unfiltered
 * consumer without map_subject) matches no subject: the table does not
 * know its stream's subjects, and guessing "every subject" would let one
 * consumer of an unrelated stream shed load everywhere. Configure
 * map_subject for it.
 *
 * Entries are judged one by one, in three tiers, and only the best tier
 * present decides the subject's backlog, source and age:
 *   fresh   live or cached, refreshed within the policy's stale_after_ns
 *           (0: no age limit); the backlog is their MAXIMUM (each consumer
 *           sees the same messages of a subject, so the slowest one is the
 *           backlog, and a sum would count each message once per consumer);
 *   stale   cached past stale_after_ns, or never refreshed: the same
 *           maximum, with the age of the oldest; the caller's stale policy
 *           decides what it is worth (tally/verdict.h);
 *   absent  gone (consumer or stream deleted: the server said so) or not
 *           found (configured, never seen): no backlog, and no staleness.
 * So one stale or deleted consumer never makes a subject stale while
 * another matching consumer is fresh, and a missing consumer is never a
 * large backlog: a subject whose candidates are all absent has no pending
 * signal (counted 0), its source says gone or not_found.
 *
 * Shared backlog. A consumer's num_pending counts every message of its
 * filter, not per subject: a consumer on "orders.>" gives its whole
 * backlog to orders.created and to orders.paid alike. JetStream reports
 * num_pending per consumer only. Per-subject counts exist only as the
 * stream's stored messages (STREAM.INFO with subjects_filter,
 * state.subjects): under limits retention they include messages every
 * consumer already acked; under interest retention they are what some
 * consumer still holds; only under work-queue retention (one consumer per
 * subject, messages removed on ack) are they that consumer's backlog per
 * subject (num_pending + num_ack_pending). That case is used (poller.c,
 * whole-stream watches): for each live consumer of a work-queue stream,
 * each poll sends STREAM.INFO with subjects_filter = its filter (or
 * map_subject) and writes one entry of kind TALLY__PENDING_SUBJECT per
 * subject in the reply (map = the literal subject, num_pending = its
 * stored count, num_ack_pending 0: the count holds both, whatever the
 * policy), and marks the consumer's own entry TALLY__PENDING_SPLIT, which
 * still matches its pattern (source, tier, age) but gives backlog 0: a
 * subject without messages stored has none. So a subject's exact entry,
 * not the consumer's whole backlog, decides, and it matches one row only
 * (not shared). Bounded: at most TALLY__PENDING_SUBJECTS_MAX subjects per
 * consumer, in one reply page (nats-server 2.9 pages at 100000 and says
 * "total"), a subject that fits TALLY__PENDING_SUBJ_MAX, and room in the
 * table; otherwise the consumer stays TALLY__PENDING_CONSUMER with no
 * per-subject entries (one log line, counted as subjects_unsplit). A
 * reader that predates the kind field sees kind as reserved zero: split
 * consumers give their whole backlog again and the maximum is the old
 * approximation. Elsewhere the engine keeps the approximation "backlog of
 * the subject = backlog of the consumer" and says so: result.top is the
 * entry that gave the maximum, and a row whose top entry matches more than
 * one subject row is marked pending_shared, with that consumer named (a
 * split consumer is never counted as matching, so never the shared one).
 *
 * In a cluster (a JetStream cluster of R1/R3 streams; tested against three
 * nats-server processes in tests/test_hosts_cluster.c). The JetStream API
 * lets only a consumer's leader answer CONSUMER.INFO, and CONSUMER.LIST is
 * put together by the stream leader from each consumer leader's own info;
 * a follower's view (the stale num_pending that /jsz on a follower shows)
 * never comes through the API. So each entry records, from the reply:
 *   server     the server named as the consumer's leader, whose numbers
 *              these are (cluster.leader; on a standalone server its
 *              server_name, by default its id), cut to 31 bytes;
 *   is_leader  1: the numbers are that leader's (a reply naming a leader,
 *              or a standalone server, which holds all its consumers);
 *              0: the reply named a cluster but no leader (a placeholder
 *              from the meta leader while no leader is elected: its
 *              num_pending is not the backlog), so the values are NOT
 *              taken: the entry keeps its last good values, turns cached
 *              and its age grows; -1: never refreshed, gone, not found.
 * A leader change shows as: a poll that fails (no reply, or 503 "JetStream
 * system temporarily unavailable", never taken for "no consumers": the
 * entries turn cached with their age), then a live entry naming the new
 * leader. The poller follows it without doing anything: it talks to the
 * JetStream API of the account, which routes to whichever server leads.
 * A consumer listed as "missing" (its leader did not answer in time) stays
 * with its last values, cached; a consumer the server says does not exist
 * is gone or not found, backlog 0, never a large backlog (KEDA #7657).
 *
 * Lifecycle (poller.c): a consumer deleted after it was seen turns gone;
 * after the poller's gone_grace_ms it is removed from the table (an entry
 * of a whole-stream watch) or turns not_found (a configured
 * STREAM/CONSUMER pair stays listed). A configured pair the server never
 * reported is not_found from the first answer, never gone.
 */
#ifndef TALLY_PENDING_H
#define TALLY_PENDING_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TALLY__PENDING_MAGIC      0x544c5044u /* "TLPD" */
#define TALLY__PENDING_VERSION    1u
#define TALLY__PENDING_NAME_MAX   128  /* stream / consumer name, NUL included */
#define TALLY__PENDING_SUBJ_MAX   256  /* filter / map subject, NUL included */
#define TALLY__PENDING_ERR_MAX    128  /* last error text, NUL included (truncated) */
#define TALLY__PENDING_SERVER_MAX 32   /* server_name that gave the numbers, NUL included (truncated) */
#define TALLY__PENDING_MAX_CAPACITY (1u << 20)
#define TALLY__PENDING_READ_TRIES 64

enum tally__pending_source {
	TALLY__PENDING_NEVER = 0,  /* configured, never refreshed successfully */
	TALLY__PENDING_LIVE = 1,   /* last poll refreshed it */
	TALLY__PENDING_CACHED = 2, /* last poll failed; values are the last good ones */
	TALLY__PENDING_GONE = 3,   /* consumer (or its stream) was deleted; values zeroed */
	TALLY__PENDING_NOTFOUND = 4, /* configured, but the server never had it; values zeroed */
};
#define TALLY__PENDING_SOURCE_MAX TALLY__PENDING_NOTFOUND

/* What an entry describes (see "Shared backlog" in the header comment). */
enum tally__pending_kind {
	TALLY__PENDING_CONSUMER = 0, /* a consumer: its backlog applies to its whole pattern */
	TALLY__PENDING_SPLIT = 1,    /* a consumer of a work-queue stream whose backlog is split
				      * into per-subject entries: it gives backlog 0 itself */
	TALLY__PENDING_SUBJECT = 2,  /* the stored messages of one literal subject (map) of a
				      * work-queue stream: that consumer's backlog for it */
};
#define TALLY__PENDING_KIND_MAX TALLY__PENDING_SUBJECT

/* Per-subject entries one consumer may hold (a larger state.subjects falls back to sharing). */
#define TALLY__PENDING_SUBJECTS_MAX 4096u

/* Tiers of an entry when combining (see the header comment). */
enum tally__pending_tier {
	TALLY__PENDING_TIER_ABSENT = 0, /* gone, not found */
	TALLY__PENDING_TIER_STALE = 1,  /* never refreshed, or cached past stale_after_ns */
	TALLY__PENDING_TIER_FRESH = 2,  /* live or cached within stale_after_ns */
};

enum tally__breaker_state {
	TALLY__BREAKER_CLOSED = 0,
	TALLY__BREAKER_OPEN = 1,
	TALLY__BREAKER_HALF_OPEN = 2,
};

/* ---- shared-memory layout (fixed size, no pointers) ---- */

struct tally__pending_header {
	uint32_t magic;
	uint32_t version;
	uint32_t header_size;   /* sizeof(struct tally__pending_header) */
	uint32_t breaker_size;  /* sizeof(struct tally__pending_breaker) */
	uint32_t entry_size;    /* sizeof(struct tally__pending_entry) */
	uint32_t capacity;      /* number of entries */
	uint64_t section_size;  /* tally__pending_section_size(capacity) */
	uint8_t reserved[32];
};

struct tally__pending_breaker {
	_Atomic uint32_t seq;
	_Atomic uint32_t state;                 /* enum tally__breaker_state */
	_Atomic uint32_t consecutive_failures;  /* failed polls in a row */
	_Atomic uint32_t connected;             /* 1 when the NATS connection is up */
	_Atomic uint64_t opens_total;
	_Atomic uint64_t polls_ok;
	_Atomic uint64_t polls_failed;
	_Atomic uint64_t skipped_overrun;       /* ticks skipped: a poll outlasted its interval */
	_Atomic uint64_t skipped_open;          /* ticks skipped: breaker open */
	_Atomic uint64_t since_ns;              /* CLOCK_MONOTONIC of the last state change */
	_Atomic uint64_t last_ok_ns;            /* CLOCK_MONOTONIC of the last good poll, 0 never */
	_Atomic uint64_t last_error[TALLY__PENDING_ERR_MAX / 8];
	_Atomic uint64_t untracked;             /* consumers the last poll found and could not
						 * track: the table is full (0 in older writers) */
	_Atomic uint64_t last_error_ns;         /* CLOCK_MONOTONIC when last_error was set, 0 never */
	uint8_t reserved[40];
};

struct tally__pending_entry {
	_Atomic uint32_t seq;
	_Atomic uint32_t used;                  /* 1: entry describes a consumer */
	_Atomic uint32_t source;                /* enum tally__pending_source */
	_Atomic int32_t is_leader;              /* see "In a cluster": 1 the consumer leader's numbers,
						 * 0 a reply without a leader, -1 unknown */
	_Atomic uint32_t consecutive_failures;
	_Atomic uint32_t pad0;
	_Atomic uint64_t num_pending;
	_Atomic uint64_t num_ack_pending;
	_Atomic uint64_t num_redelivered;
	_Atomic uint64_t num_waiting;
	_Atomic uint64_t delivered_stream_seq;
	_Atomic uint64_t ack_floor_stream_seq;
	_Atomic uint64_t last_ok_ns;            /* CLOCK_MONOTONIC of the last good refresh, 0 never */
	_Atomic uint64_t stream[TALLY__PENDING_NAME_MAX / 8];
	_Atomic uint64_t consumer[TALLY__PENDING_NAME_MAX / 8];
	_Atomic uint64_t filter[TALLY__PENDING_SUBJ_MAX / 8];
	_Atomic uint64_t map[TALLY__PENDING_SUBJ_MAX / 8];
	_Atomic uint64_t last_error[TALLY__PENDING_ERR_MAX / 8];
	_Atomic uint32_t kind;                  /* enum tally__pending_kind (0 in older writers) */
	_Atomic uint32_t pad1;
	_Atomic uint64_t server[TALLY__PENDING_SERVER_MAX / 8]; /* who gave the numbers ("" in
						 * older writers, or not known) */
	uint8_t reserved[8];
};

_Static_assert(sizeof(struct tally__pending_header) == 64, "pending header is 64 bytes");
_Static_assert(sizeof(struct tally__pending_breaker) == 256, "breaker block is 256 bytes");
_Static_assert(sizeof(struct tally__pending_entry) == 1024, "pending entry is 1024 bytes");
_Static_assert(offsetof(struct tally__pending_entry, num_pending) == 24, "entry layout");
_Static_assert(offsetof(struct tally__pending_entry, stream) == 80, "entry layout");
_Static_assert(offsetof(struct tally__pending_entry, last_error) == 848, "entry layout");
_Static_assert(offsetof(struct tally__pending_entry, kind) == 976, "entry layout");
_Static_assert(offsetof(struct tally__pending_entry, server) == 984, "entry layout");
_Static_assert(offsetof(struct tally__pending_breaker, last_error) == 72, "breaker layout");
_Static_assert(sizeof(_Atomic uint64_t) == 8 && sizeof(_Atomic uint32_t) == 4,
	       "atomics have their plain size");

/* ---- reader views: plain copies ---- */

struct tally__pending_view {
	uint32_t source;        /* enum tally__pending_source */
	uint32_t kind;          /* enum tally__pending_kind */
	int32_t is_leader;
	uint32_t consecutive_failures;
	uint64_t num_pending;
	uint64_t num_ack_pending;
	uint64_t num_redelivered;
	uint64_t num_waiting;
	uint64_t delivered_stream_seq;
	uint64_t ack_floor_stream_seq;
	uint64_t last_ok_ns;    /* 0: never; age = now(CLOCK_MONOTONIC) - last_ok_ns */
	char stream[TALLY__PENDING_NAME_MAX];
	char consumer[TALLY__PENDING_NAME_MAX];
	char filter[TALLY__PENDING_SUBJ_MAX];
	char map[TALLY__PENDING_SUBJ_MAX];
	char last_error[TALLY__PENDING_ERR_MAX];
	char server[TALLY__PENDING_SERVER_MAX];
};

struct tally__pending_breaker_view {
	uint32_t state;         /* enum tally__breaker_state */
	uint32_t consecutive_failures;
	bool connected;
	uint64_t opens_total;
	uint64_t polls_ok;
	uint64_t polls_failed;
	uint64_t skipped_overrun;
	uint64_t skipped_open;
	uint64_t since_ns;
	uint64_t last_ok_ns;
	uint64_t untracked;
	uint64_t last_error_ns;
	char last_error[TALLY__PENDING_ERR_MAX];
};

struct tally__pending_policy {
	bool include_ack_pending;   /* backlog = num_pending + num_ack_pending (default true) */
	uint64_t stale_after_ns;    /* an entry older than this is stale; 0 (default): no age limit */
};

#define TALLY__PENDING_POLICY_DEFAULT ((struct tally__pending_policy){ .include_ack_pending = true })

struct tally__pending_result {
	uint64_t backlog;       /* maximum over the entries of the best tier; 0 if none holds one */
	uint32_t source;        /* least trustworthy within the best tier: never > cached > live,
				 * and gone > not found in the absent tier */
	uint32_t tier;          /* enum tally__pending_tier of the entries that decided */
	uint32_t matched;       /* matching entries, absent ones included */
	uint32_t counted;       /* matching entries that may hold a backlog (tiers fresh, stale) */
	uint64_t oldest_age_ns; /* largest now - last_ok_ns in the best tier; UINT64_MAX if one
				 * never refreshed; 0 in the absent tier */
	uint32_t top;           /* index of the entry that gave the maximum; UINT32_MAX none */
};

#define TALLY__PENDING_RESULT_INIT \
	((struct tally__pending_result){ .source = TALLY__PENDING_NEVER, .top = UINT32_MAX })

/* ---- section management (owner side) ---- */

/* Bytes needed for `capacity` entries; 0 if capacity is 0 or too large. */
size_t tally__pending_section_size(uint32_t capacity);

/*
 * Format a section of `len` bytes (>= tally__pending_section_size(capacity),
 * zeroed or not) before anyone reads it. Returns 0, -EINVAL. Not
 * thread-safe: call before publishing the segment.
 */
int tally__pending_init(void *section, size_t len, uint32_t capacity);

/*
 * Validate a section read from shm. Returns its capacity (> 0) or -EBADMSG.
 * Thread-safe, never blocks.
 */
int tally__pending_check(const void *section, size_t len);

/* ---- readers (any thread, any process; never block; bounded retries) ---- */

/*
 * Consistent copy of entry idx. Returns 0, -ENOENT (unused entry), -ERANGE
 * (idx >= capacity), -EBADMSG (corrupt section or entry), -EAGAIN (writer
 * kept it busy for TALLY__PENDING_READ_TRIES tries).
 */
int tally__pending_read_entry(const void *section, size_t len, uint32_t idx,
			      struct tally__pending_view *out);

/*
 * The same for a caller that knows the capacity (the owner: its own
 * configuration, validated when it created the segment). The section
 * header is not read at all: every producer maps it writable, and a
 * scribbled header must neither move the owner's reads nor hide the
 * entries from it. Returns 0, -ENOENT, -ERANGE (idx >= capacity), -EINVAL
 * (len too short for capacity: a bug of the caller), -EBADMSG (corrupt
 * entry), -EAGAIN (after `tries` tries, at least 1).
 */
int tally__pending_read_entry_cap(const void *section, size_t len, uint32_t capacity, uint32_t idx,
				  struct tally__pending_view *out, int tries);

/* Consistent copy of the breaker block. Returns 0, -EBADMSG, -EAGAIN. */
int tally__pending_read_breaker(const void *section, size_t len,
				struct tally__pending_breaker_view *out);

/*
 * Combined backlog for `subject` (see the header comment). pol NULL means
 * the default policy. Returns 0 (out->matched may be 0), -EBADMSG, or
 * -EAGAIN if some matching entry could not be read consistently (the
 * others are still combined into out). Cost: one pass over the capacity.
 */
int tally__pending_for_subject(const void *section, size_t len, const char *subject,
			       const struct tally__pending_policy *pol,
			       struct tally__pending_result *out);

/*
 * Fold entry idx (its view v, already known to match) into a result, as
 * tally__pending_for_subject does; start from TALLY__PENDING_RESULT_INIT.
 * For callers that read the entries once and match many subjects against
 * them (the engine at every publish). Never fails, never blocks.
 */
void tally__pending_combine(struct tally__pending_result *out, const struct tally__pending_view *v,
			    uint32_t idx, const struct tally__pending_policy *pol, uint64_t now);

/* Tier of one entry under pol at now. */
uint32_t tally__pending_tier(const struct tally__pending_view *v, const struct tally__pending_policy *pol,
			     uint64_t now);

/*
 * Stream and consumer names of entry idx, as "STREAM/CONSUMER" into buf
 * (cap bytes, truncated). For readers that hold an entry index (the
 * snapshot's TALLY__SW_PENDING_ENTRY): reads only the two names. Returns
 * 0, -ENOENT (unused), -ERANGE, -EBADMSG, -EAGAIN; buf is "" on error.
 */
int tally__pending_read_name(const void *section, size_t len, uint32_t idx, char *buf, size_t cap);

/* Short name of a source / breaker state ("live", "not_found", "open", ...; "?" if out of range). */
const char *tally__pending_source_name(uint32_t source);
const char *tally__breaker_state_name(uint32_t state);

/* ---- writer (the poller thread only) ---- */

/* Fields the writer publishes; strings NUL-terminated (longer are truncated). */
struct tally__pending_values {
	uint32_t source;
	uint32_t kind;          /* enum tally__pending_kind */
	int32_t is_leader;
	uint32_t consecutive_failures;
	uint64_t num_pending, num_ack_pending, num_redelivered, num_waiting;
	uint64_t delivered_stream_seq, ack_floor_stream_seq;
	uint64_t last_ok_ns;
	const char *stream, *consumer, *filter, *map, *last_error, *server;
};

struct tally__pending_entry *tally__pending_entry_at(void *section, uint32_t idx);
struct tally__pending_breaker *tally__pending_breaker_at(void *section);

/* Publish all fields of an entry (used = 1) / clear it (used = 0). */
void tally__pending_write_entry(struct tally__pending_entry *e, const struct tally__pending_values *v);
void tally__pending_clear_entry(struct tally__pending_entry *e);

/* Publish the breaker block (from a plain view). */
void tally__pending_write_breaker(struct tally__pending_breaker *b,
				  const struct tally__pending_breaker_view *v);

/* CLOCK_MONOTONIC in ns (system-wide on Linux: comparable across processes). */
uint64_t tally__pending_now_ns(void);

#endif /* TALLY_PENDING_H */
