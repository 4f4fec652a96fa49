/* SPDX-License-Identifier: MIT */
/*
 * verdict.h (private): threshold sets and the per-subject verdict state
 * machine the engine runs at every publish. Pure logic: no clock, no
 * threads; the engine passes the time in.
 */
#ifndef TALLY_LIB_VERDICT_H
#define TALLY_LIB_VERDICT_H

#include <tally/verdict.h>

/* One signal's hysteresis state: level 0 ok, 1 warn, 2 overload. */
struct tally__signal_state {
	uint8_t level;
	uint64_t since_ns;
};

struct tally__verdict_state {
	struct tally__signal_state latency, pending;
	enum tally_verdict verdict;
	uint32_t reasons;
	uint64_t since_ns;
};

struct tally__verdict_input {
	uint64_t count;          /* samples in the window */
	uint64_t p95_ns;
	double rate;             /* samples per second */
	uint32_t pending_consumers;
	uint32_t pending_source; /* enum tally_pending_source */
	uint64_t pending;
	uint64_t pending_age_ns;
};

struct tally__verdict_out {
	enum tally_verdict verdict;
	uint32_t reasons;
	uint64_t since_ns;
	uint32_t retry_after_ms;
};

/* Start state: unknown since now. */
void tally__verdict_init(struct tally__verdict_state *st, uint64_t now_ns);

/* One step of the state machine for one subject. */
void tally__verdict_update(struct tally__verdict_state *st, const struct tally_threshold_rule *r,
			   const struct tally__verdict_input *in, uint64_t now_ns,
			   struct tally__verdict_out *out);

#endif /* TALLY_LIB_VERDICT_H */
