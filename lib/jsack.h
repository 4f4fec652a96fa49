/* SPDX-License-Identifier: MIT */
/*
 * jsack.h (private): the record path's parse of an ack reply (reached by
 * tests/fuzz/fuzz_jsack.c too), the consumer hash that ties a pending sample taken
 * from an ack reply (lib/jsack.c) to the poller's entry for the same
 * consumer (lib/engine.c), and the cache of it that each producer handle
 * keeps (at the start of the handle, struct tally__producer_head in
 * lib/producer.h; lib/jsack.c fills it). Not installed.
 */
#ifndef TALLY_LIB_JSACK_H
#define TALLY_LIB_JSACK_H

#include <stddef.h>
#include <stdint.h>

/* 28-bit FNV-1a of stream, '.', consumer: the tag of a pending entry
 * (shm_layout.h). Equal names give equal hashes; a collision (1 in 2^28
 * per pair of consumers matching the same subject) would only let one
 * consumer's sample stand in for the other's poll. */
uint32_t tally__jsack_consumer_hash(const char *stream, size_t stream_len, const char *consumer,
				    size_t consumer_len);

struct tally_jsack;

/* What tally_record_jetstream_at() reads of a reply, as it reads it:
 * tally_jsack_parse() but only stream, consumer, timestamp_ns and pending
 * filled (the rest unspecified); it accepts and refuses exactly the same
 * subjects (the fuzzer compares both). Pure, thread-safe. */
int tally__jsack_parse_record(const char *reply, size_t len, struct tally_jsack *out);

/* A producer handle's last consumer key ("stream.consumer", the run of
 * the reply that holds both names: it has exactly one dot, so it names
 * one pair) and the tag of its pending entries. len 0: empty (a zeroed
 * handle). Owned by the handle's thread, like the handle. */
struct tally__jsack_cache {
	uint32_t len;
	uint32_t tag;
	char key[56];
};

#endif /* TALLY_LIB_JSACK_H */
