/* SPDX-License-Identifier: MIT */
/*
 * sim.h: a simulated router and a publisher on a real NATS JetStream
 * server, for `tally demo` and the end-to-end overload test.
 *
 * The router pulls messages from a durable pull consumer with a few worker
 * threads, spends a processing time on each (a log-normal around a base
 * that can be changed while it runs), records each message's latency
 * through libtally (from the publish time carried in the payload to the
 * end of processing, so time spent waiting in the stream counts; or,
 * with jetstream_wait, the processing alone, and the wait from the ack
 * reply's metadata in its own series), and acks. The publisher publishes to a set of subjects at a rate that can
 * also be changed while it runs.
 */
#ifndef TALLY_TOOLS_SIM_H
#define TALLY_TOOLS_SIM_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <tally/tally.h>

/* Create stream (subjects pattern; file storage, or memory) and a durable
 * pull consumer on it with explicit acks and the given filter. Existing
 * ones are reused. 0 or -1 with the reason in err. */
int sim_setup(const char *url, const char *stream, const char *subjects, bool file_storage,
	      const char *consumer, const char *filter, char *err, size_t errlen);

struct sim_router_config {
	const char *url, *stream, *consumer, *filter;
	struct tally_segment *seg;  /* opened as producer (or the owner's) */
	int workers;                /* threads, each with its own producer slot */
	_Atomic uint64_t processing_ns; /* median processing time; change it while running */
	double sigma;               /* log-normal spread (0.3 is a realistic mix) */
	bool jetstream_wait;        /* record each message's wait from its ack reply
				     * (tally_record_jetstream) and processing alone as latency */
};

struct sim_router;
int sim_router_start(struct sim_router_config *cfg, struct sim_router **out, char *err, size_t errlen);
void sim_router_stop(struct sim_router **r);
uint64_t sim_router_processed(const struct sim_router *r);

struct sim_publisher_config {
	const char *url;
	const char *const *subjects; /* published round robin */
	int nsubjects;
	_Atomic uint32_t rate;       /* messages per second; change it while running */
};

struct sim_publisher;
int sim_publisher_start(struct sim_publisher_config *cfg, struct sim_publisher **out, char *err,
			size_t errlen);
void sim_publisher_stop(struct sim_publisher **p);
uint64_t sim_publisher_published(const struct sim_publisher *p);

#endif
