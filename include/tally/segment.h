/* SPDX-License-Identifier: MIT */
/*
 * tally/segment.h: the shared-memory segment and its subject table.
 *
 * One POSIX shm object (/dev/shm/<name>) per engine. Its owner (tallyd, or
 * an application embedding the engine) creates it with
 * tally_segment_create(); router threads in any process attach to it with
 * tally_segment_open(TALLY_OPEN_PRODUCER) and record into rings of their
 * own (tally/record.h); readers in other processes (a gateway, the tally
 * CLI) open it with TALLY_OPEN_READER, which maps it read-only.
 *
 * The whole size is computed from struct tally_segment_config and reserved
 * when the segment is created, so a full /dev/shm is an error at start,
 * never a SIGBUS later. Nothing read from the segment is trusted: every
 * offset, length and count is checked against the mapping.
 *
 * Subjects are NATS subject names (1-255 bytes, dot-separated non-empty
 * tokens, no whitespace or control bytes; '*' and '>' are wildcards and
 * are refused for recorded subjects). They are interned into small ids in a
 * table inside the segment, the same id in every process.
 */
#ifndef TALLY_SEGMENT_H
#define TALLY_SEGMENT_H

#include <tally/common.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

struct tally_segment;

/* Longest segment name and subject, in bytes, without the NUL. */
#define TALLY_NAME_MAX 200
#define TALLY_SUBJECT_MAX 255

typedef uint32_t tally_subject_t;

struct tally_segment_config {
	uint32_t producer_slots;   /* rings, one per recording thread (default 64) */
	uint32_t ring_capacity;    /* entries per ring, a power of two (default 16384) */
	uint32_t subject_capacity; /* distinct subjects (default 4096) */
	uint32_t pending_capacity; /* watched JetStream consumers (default 1024) */
	uint64_t max_value_ns;     /* larger values are clamped and counted (default 1 h) */
	uint32_t producer_cooloff_ms; /* a dead producer's slot is reused after this (default 5000) */
	int group_readable;        /* 1: mode 0640 and, if group is set, chgrp; 0: 0600 */
	const char *group;         /* group name for group_readable, or NULL for the caller's */
	uint32_t remote_capacity;  /* other hosts' mirrored verdicts (tally/share.h), 0..65536;
				    * default 0: no remote section */
	int group_writable;        /* 1: mode 0660, so that producers of the group may record
				    * (and chgrp as group_readable); implies group_readable */
};

/* Fill cfg with the defaults above. Never fails. Thread-safe. */
TALLY_API void tally_segment_config_init(struct tally_segment_config *cfg);

/* Bytes the segment needs for cfg, or 0 if cfg is invalid (see tally_errmsg()). */
TALLY_API uint64_t tally_segment_size(const struct tally_segment_config *cfg);

/* Flags of tally_segment_create(). */
#define TALLY_CREATE_REPLACE_DEAD 0x1u /* replace a segment whose owner is dead */

/*
 * Create the segment `name` and become its owner. Fails
 * with -EBUSY if a live owner holds the name, TALLY_EOWNERDEAD if a dead
 * owner left it (pass TALLY_CREATE_REPLACE_DEAD to replace it), -ENOSPC if
 * /dev/shm lacks room (tally_errmsg() gives needed and free sizes),
 * TALLY_EBADNAME, -EINVAL for a bad config, -EACCES. Does not block.
 * Thread-safe; the segment returned belongs to the caller.
 */
TALLY_API int tally_segment_create(const char *name, const struct tally_segment_config *cfg,
				   unsigned flags, struct tally_segment **out);

enum tally_open_mode {
	TALLY_OPEN_PRODUCER = 1, /* read-write: for threads that record */
	TALLY_OPEN_READER = 2,   /* read-only mapping: never writes to the segment */
};

/*
 * Attach to an existing segment. Waits up to wait_ms for a segment being
 * created to become ready (TALLY_ENOTREADY after that). Fails with -ENOENT
 * (no such segment), -EACCES, TALLY_EVERSION (another ABI major; the
 * message gives both), TALLY_ECORRUPT, TALLY_EBADNAME. A segment whose
 * owner is dead still opens (its data is readable); check
 * tally_segment_owner_alive(). Blocks at most wait_ms. Thread-safe.
 */
TALLY_API int tally_segment_open(const char *name, enum tally_open_mode mode, uint32_t wait_ms,
				 struct tally_segment **out);

/*
 * Detach and free; NULLs *seg. The owner's close marks the segment stopped
 * and removes the name unless tally_segment_keep(seg, true) was called.
 * Producers of this handle must be detached first. Not thread-safe
 * against other uses of the same handle.
 */
TALLY_API void tally_segment_close(struct tally_segment **seg);

/* Owner only: keep the name in /dev/shm after close (for post-mortems). */
TALLY_API void tally_segment_keep(struct tally_segment *seg, bool keep);

/* Remove the name `name` from /dev/shm (mappings stay valid). 0 or -errno. */
TALLY_API int tally_segment_unlink(const char *name);

/* 0 if name is a valid segment name (letters, digits, '-', '_', '.';
 * not "." or ".."; 1..TALLY_NAME_MAX bytes), else TALLY_EBADNAME. */
TALLY_API int tally_segment_name_validate(const char *name);

struct tally_segment_info {
	char name[TALLY_NAME_MAX + 1];
	uint32_t abi_major, abi_minor;
	uint64_t total_size;
	pid_t owner_pid;
	uint64_t owner_start_time;  /* /proc/<pid>/stat starttime, clock ticks after boot */
	uint64_t generation;        /* CLOCK_REALTIME ns of creation: new for every owner */
	uint64_t created_ns;        /* CLOCK_REALTIME ns */
	uint64_t owner_heartbeat_ns; /* CLOCK_MONOTONIC ns of the owner's last sign of life */
	bool owner_alive;           /* pid exists with the recorded start time */
	bool owner_stopped;         /* the owner closed it cleanly */
	bool read_only;             /* this handle maps it read-only */
	bool is_owner;              /* this handle created it */
	struct tally_segment_config config; /* group is NULL here */
	uint32_t subjects_used;
	struct { uint64_t off, size; } subjects, slots, pending, snapshot;
	struct { uint64_t off, size; } remote, rules; /* {0, 0}: the segment has none */
	uint32_t slot_stride;
};

/* Identity and layout of the segment as read now (validated). 0 or error. */
TALLY_API int tally_segment_info(const struct tally_segment *seg, struct tally_segment_info *out);

/*
 * Is the owner alive? 1 alive, 0 dead or stopped, TALLY_EREPLACED if the
 * name now holds a newer segment (re-open it), or another error.
 * Cheap (one kill(pid, 0) and one /proc read). Thread-safe.
 */
TALLY_API int tally_segment_owner_alive(const struct tally_segment *seg);

/* ---- Subjects ---------------------------------------------------------- */

/*
 * 0 if subject is a valid NATS subject; with allow_wildcards, '*' and '>'
 * tokens are accepted as in a subscription pattern ('>' only last).
 * Otherwise TALLY_EBADNAME and tally_errmsg() says which byte or token is
 * wrong. Subjects are valid UTF-8 with no control character (C0, DEL or
 * C1): exports (Prometheus labels, JSON) need that, and a subject that
 * is not is refused here and at intern. Pure function, thread-safe.
 */
TALLY_API int tally_subject_validate(const char *subject, bool allow_wildcards);

/* Length (1..4) of the valid UTF-8 sequence at s, looking at no more than
 * n bytes, or 0 if there is none (a stray or cut byte, an overlong form,
 * a surrogate, above U+10FFFF: RFC 3629). The rule subjects are held to;
 * for tools that must clean text the same way. Pure. */
TALLY_API size_t tally_utf8_seq(const unsigned char *s, size_t n);

/* 1 if the NATS pattern (with '*'/'>') matches subject, else 0. Pure. */
TALLY_API int tally_subject_match(const char *pattern, const char *subject);

/*
 * Id of subject, adding it to the segment's table if needed (the same name
 * gets the same id in every process). TALLY_EBADNAME for a bad name,
 * TALLY_EFULL when the table is full, -EROFS for a reader. Lock-free:
 * may spin briefly (bounded) while another process writes the same entry.
 * Thread-safe. Not for the per-message path: intern once, record by id.
 */
TALLY_API int tally_subject_intern(struct tally_segment *seg, const char *subject,
				   tally_subject_t *id);

/* Id of an existing subject: 0, -ENOENT, TALLY_EBADNAME. Thread-safe, no writes. */
TALLY_API int tally_subject_lookup(const struct tally_segment *seg, const char *subject,
				   tally_subject_t *id);

/* Name of id into buf (NUL-terminated): 0, -ENOENT, -ENOSPC (buf too small),
 * TALLY_ECORRUPT. Thread-safe. */
TALLY_API int tally_subject_name(const struct tally_segment *seg, tally_subject_t id,
				 char *buf, size_t len);

/* Number of entries in the subject table (the largest id + 1 is below
 * subject_capacity). Ids are indexes 0..subject_capacity-1, not dense. */
TALLY_API uint32_t tally_subject_capacity(const struct tally_segment *seg);

#ifdef __cplusplus
}
#endif
#endif /* TALLY_SEGMENT_H */
