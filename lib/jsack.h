/* SPDX-License-Identifier: MIT */
/*
 * jsack.h (private): the consumer hash that ties a pending sample taken
 * from an ack reply (lib/jsack.c) to the poller's entry for the same
 * consumer (lib/engine.c). Not installed.
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

#endif /* TALLY_LIB_JSACK_H */
