/* SPDX-License-Identifier: MIT */
/*
 * lib/sharecodec.h: the KV keys and values of shared verdicts (private).
 * Pure functions, no I/O: what goes into and comes out of the JetStream KV
 * bucket, so that the decoder can be fuzzed on its own
 * (tests/fuzz/fuzz_share.c).
 *
 * Key: "<host>.<subject encoded>". The host is 1..63 bytes of
 * [A-Za-z0-9_-] (one key token, no dot). In the subject, bytes of
 * [A-Za-z0-9_-] and '.' stay as they are and every other byte, '=' too,
 * becomes "=XX" (two upper-case hex digits): a NATS subject's tokens are
 * never empty, so the key has no empty token and only bytes a KV key
 * allows ([-/_=.A-Za-z0-9]). "orders.eu.created" on host "b" is
 * "b.orders.eu.created"; "$SYS.x" is "b.=24SYS.x". The encoding is one to
 * one, so the decoder can demand that the key be exactly the encoding of
 * the host and subject its value names.
 *
 * Value, one line of ASCII, single spaces:
 *   tally1 HOST VERDICT REASONS PRESSURE SHED P95_NS PENDING RETRY_MS SUBJECT
 * VERDICT 0..3 (enum tally_verdict), REASONS 0..255 (TALLY_REASON_*),
 * PRESSURE and SHED decimals in [0, 1] ("0.8125"), the rest unsigned
 * decimal integers (no sign, no leading '+', at most 20 digits, no
 * overflow), SUBJECT a NATS subject without wildcards (it cannot hold a
 * space). Anything else is refused whole.
 */
#ifndef TALLY_SHARECODEC_H
#define TALLY_SHARECODEC_H

#include "remote.h"

#include <stddef.h>

/* Longest key: host, dot, every subject byte as "=XX"; NUL included. */
#define TALLY__SHARE_KEY_MAX (TALLY__REMOTE_HOST_MAX + 1 + 3 * TALLY__REMOTE_SUBJ_MAX)
/* Longest value, NUL included. */
#define TALLY__SHARE_VALUE_MAX 512

/* Key of (host, subject) into buf: its length, or -EINVAL (a bad host or subject) / -ENOSPC. */
int tally__share_key(char *buf, size_t cap, const char *host, const char *subject);

/* Value of v (its host, subject, verdict, reasons, pressure, shed, p95,
 * pending, retry) into buf: its length, or -EINVAL / -ENOSPC. */
int tally__share_encode(char *buf, size_t cap, const struct tally__remote_view *v);

/*
 * Decode a value read from the bucket under key (key_len bytes; value
 * len bytes, neither NUL-terminated). Fills host, subject, verdict,
 * reasons, pressure, shed, p95_ns, pending, retry_after_ms of *out (the
 * rest zero) and returns 0; -EBADMSG if the value is malformed, out of
 * range, or names another key than key. Reads no byte outside the two
 * buffers. Pure, thread-safe.
 */
int tally__share_decode(const char *key, size_t key_len, const char *val, size_t len,
			struct tally__remote_view *out);

#endif /* TALLY_SHARECODEC_H */
