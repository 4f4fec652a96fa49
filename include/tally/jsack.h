/* SPDX-License-Identifier: MIT */
/*
 * tally/jsack.h: what JetStream tells about a message in its ack reply
 * subject, and recording it. This header owns the parser of that subject
 * and the record call that turns it into two samples: the message's wait
 * (its sojourn time in the stream) and its consumer's pending count.
 *
 * JetStream delivers every message with a reply subject that the
 * consumer acks to. nats-server writes into it, per message:
 *
 *   $JS.ACK.<stream>.<consumer>.<delivered>.<stream_seq>.<consumer_seq>.<timestamp_ns>.<pending>
 *
 * (9 tokens; nats-server up to 2.9), or, with the JetStream domain and
 * the account's hash (nats-server 2.10 and later; "_" as domain: none):
 *
 *   $JS.ACK.<domain>.<acchash>.<stream>.<consumer>.<delivered>.<stream_seq>.<consumer_seq>.<timestamp_ns>.<pending>.<random>
 *
 * (12 tokens; tokens after <pending> are not read, as cnats reads them).
 * timestamp_ns is the wall clock (Unix ns) at which the server stored the
 * message; pending is the number of messages of the consumer not yet
 * delivered (its num_pending) when this one was.
 *
 * The reply comes off the network: the parser trusts none of it. It reads
 * exactly len bytes (no NUL needed, a NUL is refused), never allocates,
 * and accepts only: the prefix, 9 or at least 11 tokens, none empty, no
 * byte below 0x21 or above 0x7e, numbers of decimal digits only that fit
 * an int64 (as cnats' natsMsg_GetMetaData). It is fuzzed
 * (tests/fuzz/fuzz_jsack.c) and compared with cnats on subjects of a
 * real nats-server (tests/test_jsack.c).
 */
#ifndef TALLY_JSACK_H
#define TALLY_JSACK_H

#include <tally/common.h>
#include <tally/record.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A parsed ack reply. The strings point into the reply (not terminated). */
struct tally_jsack {
	const char *domain;       /* NULL: none (the old layout, or "_") */
	const char *account_hash; /* NULL: the old layout */
	const char *stream, *consumer;
	uint32_t domain_len, account_hash_len, stream_len, consumer_len;
	uint64_t delivered;       /* delivery count of this message, 1 the first time */
	uint64_t stream_seq, consumer_seq;
	uint64_t timestamp_ns;    /* Unix ns (CLOCK_REALTIME) when the server stored it */
	uint64_t pending;         /* the consumer's messages not yet delivered */
};

/*
 * Parse reply[0..len) as an ack reply subject. 0 and *out filled, or
 * -EINVAL (not one: *out unspecified). Pure, thread-safe; one pass, 16
 * bytes at a time, about 25 ns for a 50-byte subject on a shared 2-vCPU
 * VM (BENCHMARKS.md).
 */
TALLY_API int tally_jsack_parse(const char *reply, size_t len, struct tally_jsack *out);

/* Counters of one handle's JetStream records are the handle's own
 * (tally_producer_counters); what the record below adds to the ring is
 * two entries, and each is dropped, clamped or lost like a latency. */

/*
 * Record what the ack reply of a message of subject tells: its wait
 * (now_real_ns - timestamp_ns, into subject's wait series; a timestamp
 * ahead of now, a clock skew between hosts, is recorded as a wait of 0
 * and counted as skewed) and its consumer's pending (a live sample of
 * that consumer's backlog, at no API cost). now_real_ns is
 * CLOCK_REALTIME in ns; tally_record_jetstream() reads it itself.
 * 0; -EINVAL (reply is not an ack subject: nothing recorded); -ENOBUFS
 * (the ring was full or there was no owner: dropped or lost, counted as
 * for tally_record()). Both entries go into the ring behind one tail
 * store; the consumer's hash is kept in the handle for the last
 * stream.consumer seen. About 25 ns for a 50-byte reply, parse included
 * (BENCHMARKS.md). Wait-free; owning thread only, like tally_record.
 */
TALLY_API int tally_record_jetstream_at(struct tally_producer *p, tally_subject_t subject,
					const char *reply, size_t reply_len, uint64_t now_real_ns);

/* CLOCK_REALTIME in ns (through the vDSO). */
static inline uint64_t tally_real_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* tally_record_jetstream_at() at the wall clock's now. */
static inline int tally_record_jetstream(struct tally_producer *p, tally_subject_t subject,
					 const char *reply, size_t reply_len)
{
	return tally_record_jetstream_at(p, subject, reply, reply_len, tally_real_ns());
}

#ifdef __cplusplus
}
#endif
#endif /* TALLY_JSACK_H */
