/* SPDX-License-Identifier: MIT */
/*
 * lib/remote.h: the remote section of the shm segment (private layout, not
 * a public header): other hosts' verdicts, mirrored from the JetStream KV
 * bucket by this host's share thread (lib/share.c), so that a gateway on
 * this host reads another host's overload from local memory. The share
 * thread is the only writer; any process that maps the segment may read.
 * It holds a section header, one status block (the share thread's state:
 * bucket, host, connection, last error, counters) and `capacity` entries,
 * one per (host, subject), each with its own seqlock.
 *
 * Seqlock: exactly as pending.h's (writer: seq+1, release stores of every
 * field, seq+2 with release; reader: acquire loads, the sequence read
 * twice, bounded retries, then -EAGAIN). Every shared field is a C11
 * atomic, strings packed into 64-bit words.
 *
 * Readers trust nothing: the header's magic, version, sizes and capacity
 * against the mapped length (-EBADMSG); in each entry, the strings must
 * end inside their fields, the host must be a valid host name
 * ([A-Za-z0-9_-], 1..63 bytes), the subject a valid NATS subject without
 * wildcards, the verdict and combine mode in range, pressure and shed
 * probability finite within [0, 1]. The same rules as the KV decoder
 * (lib/sharecodec.c): a value that passed one passes the other.
 *
 * Entry lifecycle (the share thread, lib/share.c): a KV put from another
 * host writes (or rewrites) its entry, used = 1; a KV delete or purge of
 * the key, or an age past the bucket's max_age (nats-server 2.9 drops
 * expired messages without telling watchers), clears it, used = 0. The
 * age of an entry is now - origin_ns (CLOCK_MONOTONIC of this host): the
 * share thread sets origin_ns = (its clock at receipt) - (how old the KV
 * message was then, from the server's store time, clamped to
 * [0, max_age]), so a row a dead host left in the bucket does not look
 * fresh to a host that starts later. An entry older than the status
 * block's stale_after_ms is stale: listed, but never part of a combined
 * verdict.
 */
#ifndef TALLY_REMOTE_H
#define TALLY_REMOTE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TALLY__REMOTE_MAGIC      0x544c524du /* "TLRM" */
#define TALLY__REMOTE_VERSION    1u
#define TALLY__REMOTE_HOST_MAX   64   /* host name, NUL included */
#define TALLY__REMOTE_SUBJ_MAX   256  /* subject, NUL included */
#define TALLY__REMOTE_ERR_MAX    128  /* last error, NUL included (truncated) */
#define TALLY__REMOTE_BUCKET_MAX 64   /* bucket name, NUL included */
#define TALLY__REMOTE_MAX_CAPACITY (1u << 20)
#define TALLY__REMOTE_READ_TRIES 64

enum tally__share_state {
	TALLY__SHARE_OFF = 0,        /* no share thread has run on this segment */
	TALLY__SHARE_CONNECTING = 1, /* not connected yet, or the bucket is not bound yet */
	TALLY__SHARE_RUNNING = 2,    /* puts and the watch work */
	TALLY__SHARE_FAILING = 3,    /* the last put, bind or watch failed: see last_error */
	TALLY__SHARE_STOPPED = 4,    /* the thread stopped (the owner is closing) */
};
#define TALLY__SHARE_STATE_MAX TALLY__SHARE_STOPPED

enum tally__combine {
	TALLY__COMBINE_LOCAL = 0, /* remote hosts are shown, never combined */
	TALLY__COMBINE_MAX = 1,   /* the worst host wins */
};

struct tally__remote_header {
	uint32_t magic;
	uint32_t version;
	uint32_t header_size;  /* sizeof(struct tally__remote_header) */
	uint32_t status_size;  /* sizeof(struct tally__remote_status) */
	uint32_t entry_size;   /* sizeof(struct tally__remote_entry) */
	uint32_t capacity;
	uint64_t section_size; /* tally__remote_section_size(capacity) */
	uint8_t reserved[32];
};

struct tally__remote_status {
	_Atomic uint32_t seq;
	_Atomic uint32_t state;          /* enum tally__share_state */
	_Atomic uint32_t connected;      /* 1 when the NATS connection is up */
	_Atomic uint32_t stale_after_ms; /* an entry older than this is stale */
	_Atomic uint32_t max_age_ms;     /* the bucket's max_age: older entries are removed */
	_Atomic uint32_t refresh_ms;     /* this host re-puts unchanged entries this often */
	_Atomic uint64_t puts;           /* KV puts of this host's entries */
	_Atomic uint64_t put_errors;
	_Atomic uint64_t updates;        /* entries of other hosts received */
	_Atomic uint64_t rejected;       /* received entries that failed validation */
	_Atomic uint64_t expired;        /* mirrored entries removed: past max_age, deleted */
	_Atomic uint64_t full;           /* received entries dropped: the section is full */
	_Atomic uint64_t since_ns;       /* CLOCK_MONOTONIC of the last state change */
	_Atomic uint64_t last_put_ns;    /* CLOCK_MONOTONIC, 0 never */
	_Atomic uint64_t last_error_ns;  /* CLOCK_MONOTONIC, 0 never */
	_Atomic uint64_t host[TALLY__REMOTE_HOST_MAX / 8];
	_Atomic uint64_t bucket[TALLY__REMOTE_BUCKET_MAX / 8];
	_Atomic uint64_t last_error[TALLY__REMOTE_ERR_MAX / 8];
	uint8_t reserved[160];
};

struct tally__remote_entry {
	_Atomic uint32_t seq;
	_Atomic uint32_t used;
	_Atomic uint32_t verdict;        /* enum tally_verdict */
	_Atomic uint32_t reasons;        /* TALLY_REASON_* */
	_Atomic uint32_t combine;        /* enum tally__combine, from this host's rules */
	_Atomic uint32_t retry_after_ms;
	_Atomic uint64_t pressure;       /* a double's bits */
	_Atomic uint64_t shed;           /* a double's bits */
	_Atomic uint64_t p95_ns;
	_Atomic uint64_t pending;
	_Atomic uint64_t origin_ns;      /* CLOCK_MONOTONIC here when the host put it (estimated) */
	_Atomic uint64_t received_ns;    /* CLOCK_MONOTONIC here of the last receipt */
	_Atomic uint64_t revision;       /* the KV revision */
	_Atomic uint64_t host[TALLY__REMOTE_HOST_MAX / 8];
	_Atomic uint64_t subject[TALLY__REMOTE_SUBJ_MAX / 8];
	uint8_t reserved[112];
};

_Static_assert(sizeof(struct tally__remote_header) == 64, "remote header is 64 bytes");
_Static_assert(sizeof(struct tally__remote_status) == 512, "share status block is 512 bytes");
_Static_assert(sizeof(struct tally__remote_entry) == 512, "remote entry is 512 bytes");
_Static_assert(offsetof(struct tally__remote_entry, pressure) == 24, "entry layout");
_Static_assert(offsetof(struct tally__remote_entry, host) == 80, "entry layout");
_Static_assert(offsetof(struct tally__remote_entry, subject) == 144, "entry layout");
_Static_assert(offsetof(struct tally__remote_status, host) == 96, "status layout");

/* ---- plain copies ---- */

struct tally__remote_view {
	uint32_t verdict, reasons, combine, retry_after_ms;
	double pressure, shed;
	uint64_t p95_ns, pending;
	uint64_t origin_ns, received_ns, revision;
	char host[TALLY__REMOTE_HOST_MAX];
	char subject[TALLY__REMOTE_SUBJ_MAX];
};

struct tally__remote_status_view {
	uint32_t state, connected, stale_after_ms, max_age_ms, refresh_ms;
	uint64_t puts, put_errors, updates, rejected, expired, full;
	uint64_t since_ns, last_put_ns, last_error_ns;
	char host[TALLY__REMOTE_HOST_MAX];
	char bucket[TALLY__REMOTE_BUCKET_MAX];
	char last_error[TALLY__REMOTE_ERR_MAX];
};

/* Bytes for `capacity` entries; 0 if capacity is 0 or too large. */
size_t tally__remote_section_size(uint32_t capacity);

/* Format a section (owner, before the segment is published). 0 or -EINVAL. */
int tally__remote_init(void *section, size_t len, uint32_t capacity);

/* Validate a section read from shm: its capacity (> 0) or -EBADMSG. Never blocks. */
int tally__remote_check(const void *section, size_t len);

/*
 * Consistent, validated copy of entry idx: 0, -ENOENT (unused), -ERANGE,
 * -EBADMSG (corrupt section or entry), -EAGAIN (writer kept it busy).
 * Any thread, any process; never blocks.
 */
int tally__remote_read_entry(const void *section, size_t len, uint32_t idx, struct tally__remote_view *out);
/* The same with at most tries tries (1: no backoff, -EAGAIN at once for an
 * entry mid-write: the index's refresh, which must not wait on a writer). */
int tally__remote_read_entry_tries(const void *section, size_t len, uint32_t idx, struct tally__remote_view *out,
				   int tries);

/* Consistent copy of the status block: 0, -EBADMSG, -EAGAIN. */
int tally__remote_read_status(const void *section, size_t len, struct tally__remote_status_view *out);

/* The checks readers make on an entry (also the KV decoder's): true if v may be used. */
bool tally__remote_view_ok(const struct tally__remote_view *v);

/* 1..63 bytes of [A-Za-z0-9_-]: a host name that stays one KV key token. */
bool tally__remote_host_ok(const char *host);

/* Short names: "off", "connecting", "running", "failing", "stopped"; "?" out of range. */
const char *tally__share_state_name(uint32_t state);

/* ---- writer (the share thread only) ---- */
struct tally__remote_entry *tally__remote_entry_at(void *section, uint32_t idx);
struct tally__remote_status *tally__remote_status_at(void *section);
void tally__remote_write_entry(struct tally__remote_entry *e, const struct tally__remote_view *v);
void tally__remote_clear_entry(struct tally__remote_entry *e);
void tally__remote_write_status(struct tally__remote_status *s, const struct tally__remote_status_view *v);

#endif /* TALLY_REMOTE_H */
