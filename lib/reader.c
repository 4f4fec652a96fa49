/* SPDX-License-Identifier: MIT */
/*
 * reader.c: reading what the owner publishes, from any process: one
 * subject's stats through the snapshot latch, and the producer slots.
 * Readers may map the segment read-only and never write to it. Every
 * index is checked against the layout validated at open; every state
 * read from a slot is checked against the known values.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <tally/engine.h>

#include "common.h"
#include "pending.h"
#include "proc.h"
#include "rules.h"
#include "segment.h"
#include "snapshot.h"

#define STALE_MIN_NS 1000000000ull /* never call data stale sooner than 1 s */
#define STALE_INTERVALS 10u

static void stats_from_words(struct tally_subject_stats *o, uint32_t id, const uint64_t *w,
			     const uint64_t *meta)
{
	memset(o, 0, sizeof(*o));
	o->id = id;
	o->has_data = (w[TALLY__SW_FLAGS] & TALLY__SF_QUANTILES) && w[TALLY__SW_COUNT] > 0;
	o->count = w[TALLY__SW_COUNT];
	o->sum = w[TALLY__SW_SUM];
	o->mean = o->count ? (double)o->sum / (double)o->count : 0.0;
	o->rate = (double)w[TALLY__SW_RATE_MILLI] / 1000.0;
	if (o->has_data) {
		o->min_ns = w[TALLY__SW_MIN];
		o->max_ns = w[TALLY__SW_MAX];
		o->p50_ns = w[TALLY__SW_P50];
		o->p90_ns = w[TALLY__SW_P90];
		o->p95_ns = w[TALLY__SW_P95];
		o->p99_ns = w[TALLY__SW_P99];
		o->p999_ns = w[TALLY__SW_P999];
	}
	o->total_count = w[TALLY__SW_TOTAL_COUNT];
	o->total_sum = w[TALLY__SW_TOTAL_SUM];
	o->window_ns = meta[4];
	o->published_ns = meta[0];
	uint64_t v = w[TALLY__SW_VERDICT];
	o->verdict = (v & 0xff) <= TALLY_VERDICT_OVERLOAD ? (enum tally_verdict)(v & 0xff)
							   : TALLY_VERDICT_UNKNOWN;
	o->reasons = (uint32_t)(v >> 8) & 0xff;
	o->pending_source = (uint32_t)(v >> 16) & 0xff;
	if (o->pending_source > TALLY_PENDING_NOT_FOUND)
		o->pending_source = TALLY_PENDING_NEVER;
	o->pending_consumers = (uint32_t)(v >> 32);
	o->pending = w[TALLY__SW_PENDING];
	o->pending_age_ns = w[TALLY__SW_PENDING_AGE];
	o->pending_shared = (w[TALLY__SW_FLAGS] & TALLY__SF_PENDING_SHARED) != 0;
	o->verdict_since_ns = w[TALLY__SW_VERDICT_SINCE];
	o->retry_after_ms = w[TALLY__SW_RETRY_AFTER] > UINT32_MAX ? UINT32_MAX
								  : (uint32_t)w[TALLY__SW_RETRY_AFTER];
	o->has_wait = (w[TALLY__SW_FLAGS] & TALLY__SF_WAIT) && w[TALLY__SW_WAIT_COUNT] > 0;
	o->wait_count = w[TALLY__SW_WAIT_COUNT];
	o->wait_skewed = w[TALLY__SW_WAIT_SKEWED];
	if (o->has_wait) {
		o->wait_p50_ns = w[TALLY__SW_WAIT_P50];
		o->wait_p95_ns = w[TALLY__SW_WAIT_P95];
		o->wait_p99_ns = w[TALLY__SW_WAIT_P99];
	}
	o->codel_valid = (w[TALLY__SW_CODEL] & TALLY__SC_VALID) != 0;
	o->codel_overloaded = o->codel_valid && (w[TALLY__SW_CODEL] & TALLY__SC_OVERLOADED);
	o->wait_min_ns = o->codel_valid ? w[TALLY__SW_WAIT_MIN] : 0;
	/* bounded whatever the segment holds: a gateway multiplies by them */
	o->pressure = w[TALLY__SW_PRESSURE_PPM] >= TALLY__PPM ? 1.0 : (double)w[TALLY__SW_PRESSURE_PPM] / TALLY__PPM;
	o->shed_probability = w[TALLY__SW_SHED_PPM] >= TALLY__PPM ? 1.0
				: (double)w[TALLY__SW_SHED_PPM] / TALLY__PPM;
	/* checked against the rules section only when asked (tally_read_rule) */
	o->rule = (uint32_t)w[TALLY__SW_RULE] <= TALLY__RULES_CAP ? (uint32_t)w[TALLY__SW_RULE] : 0;
	o->rules_gen = o->rule ? (uint32_t)(w[TALLY__SW_RULE] >> 32) : 0;
}

TALLY_API int tally_pending_consumer_name(const struct tally_segment *seg,
					  const struct tally_subject_stats *st, char *buf, size_t len)
{
	if (len)
		buf[0] = '\0';
	if (!st->pending_entry || st->pending_entry > seg->pending_cap)
		return -ENOENT;
	return tally__pending_read_name(tally__seg_section(seg, &seg->pending), seg->pending.size,
					st->pending_entry - 1, buf, len);
}

TALLY_API int tally_read_subject(const struct tally_segment *seg, tally_subject_t id,
				 struct tally_subject_stats *out)
{
	uint64_t w[TALLY__SW_WORDS], meta[8];

	if (id >= seg->table_size)
		return -ENOENT;
	int rc = tally__snapshot_read(tally__seg_section(seg, &seg->snapshot), seg->table_size, id, w, meta);
	if (rc)
		return rc;
	if (!(w[TALLY__SW_FLAGS] & TALLY__SF_PRESENT) || meta[0] == 0)
		return -ENOENT;
	stats_from_words(out, id, w, meta);
	out->pending_entry = w[TALLY__SW_PENDING_ENTRY] <= seg->pending_cap
			     ? (uint32_t)w[TALLY__SW_PENDING_ENTRY] : 0;
	/* The coarse clock (a few ns, no syscall, ticks of a few ms) is plenty
	 * for a staleness limit of at least a second. */
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	uint64_t interval = meta[5], now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
	uint64_t limit = interval * STALE_INTERVALS > STALE_MIN_NS ? interval * STALE_INTERVALS : STALE_MIN_NS;
	if (now > meta[0] && now - meta[0] > limit)
		return TALLY_ESTALE;
	return 0;
}

TALLY_API int tally_read_rule(const struct tally_segment *seg, const struct tally_subject_stats *st,
			      struct tally_rule_info *out)
{
	memset(out, 0, sizeof(*out));
	if (!st->rule || !seg->rules.size)
		return -ENOENT;
	return tally__rules_read(tally__seg_section(seg, &seg->rules), seg->rules.size, st->rule - 1,
				 st->rules_gen, out);
}

static const char *state_name(uint32_t st)
{
	switch (st) {
	case TALLY__SLOT_CLAIMING: return "claiming";
	case TALLY__SLOT_ACTIVE: return "active";
	case TALLY__SLOT_RELEASING: return "releasing";
	case TALLY__SLOT_DEAD: return "dead";
	case TALLY__SLOT_COOLING: return "cooling";
	default: return NULL;
	}
}

TALLY_API int tally_read_producers(const struct tally_segment *seg, struct tally_producer_stats *out,
				   uint32_t cap)
{
	uint32_t n = 0;

	for (uint32_t i = 0; i < seg->nslots && n < cap; i++) {
		struct tally__slot *s = tally__seg_slot(seg, i);
		uint64_t lease = atomic_load_explicit(&s->ctl.lease, memory_order_acquire);
		uint32_t st = tally__lease_state(lease);
		const char *name = state_name(st);
		if (st == TALLY__SLOT_FREE)
			continue;
		struct tally_producer_stats *o = &out[n++];
		memset(o, 0, sizeof(*o));
		o->slot = i;
		o->state = name ? name : "corrupt";
		uint64_t gen = tally__lease_gen(lease), start_time;
		int32_t pid;
		bool ident_ok = tally__ident_of(atomic_load_explicit(&s->ctl.ident, memory_order_relaxed), gen, &pid) &&
				tally__birth_of(atomic_load_explicit(&s->ctl.birth, memory_order_relaxed), gen, &start_time);
		o->pid = pid;
		o->tid = atomic_load_explicit(&s->ctl.tid, memory_order_relaxed);
		uint64_t tail = atomic_load_explicit(&s->tail, memory_order_acquire);
		uint64_t head = atomic_load_explicit(&s->head, memory_order_relaxed);
		uint64_t base = atomic_load_explicit(&s->ctl.base, memory_order_relaxed);
		o->samples = tail >= base ? tail - base : 0;
		o->backlog = tail >= head && tail - head <= seg->ring_cap ? tail - head : 0;
		o->dropped = atomic_load_explicit(&s->dropped, memory_order_relaxed);
		o->clamped = atomic_load_explicit(&s->clamped, memory_order_relaxed);
		o->lost = atomic_load_explicit(&s->ctl.lost, memory_order_relaxed);
		o->moves = atomic_load_explicit(&s->ctl.moves, memory_order_relaxed);
		o->generation = tally__lease_gen(lease);
		o->alive = st == TALLY__SLOT_ACTIVE && ident_ok && tally__proc_alive(pid, start_time);
	}
	return (int)n;
}

static uint64_t age_ms(uint64_t now, uint64_t then)
{
	if (then == 0)
		return UINT64_MAX;
	return now > then ? (now - then) / 1000000u : 0;
}

/* Map a pending-table reader error onto the documented ones: anything but
 * a busy writer means the table is not what the header promised. */
static int pending_error(int rc, const struct tally_segment *seg)
{
	if (rc == -EAGAIN)
		return TALLY_EBUSY_RETRY;
	return tally__fail(TALLY_ECORRUPT, "segment \"%s\": its pending table is corrupt (%s)",
			   seg->name, tally_strerror(rc));
}

TALLY_API int tally_read_consumers(const struct tally_segment *seg, struct tally_consumer_stats *out,
				   uint32_t cap)
{
	const void *sec = tally__seg_section(seg, &seg->pending);
	struct tally__pending_view v;
	uint64_t now = tally__mono_ns();
	uint32_t n = 0;

	for (uint32_t i = 0; i < seg->pending_cap && n < cap; i++) {
		int rc = tally__pending_read_entry(sec, seg->pending.size, i, &v);
		if (rc == -ENOENT)
			continue;
		if (rc < 0)
			return pending_error(rc, seg);
		struct tally_consumer_stats *o = &out[n++];
		memset(o, 0, sizeof(*o));
		snprintf(o->stream, sizeof(o->stream), "%s", v.stream);
		snprintf(o->consumer, sizeof(o->consumer), "%s", v.consumer);
		snprintf(o->filter, sizeof(o->filter), "%s", v.filter);
		snprintf(o->map, sizeof(o->map), "%s", v.map);
		snprintf(o->last_error, sizeof(o->last_error), "%s", v.last_error);
		snprintf(o->server, sizeof(o->server), "%s", v.server);
		o->num_pending = v.num_pending;
		o->num_ack_pending = v.num_ack_pending;
		o->num_redelivered = v.num_redelivered;
		o->num_waiting = v.num_waiting;
		o->delivered_stream_seq = v.delivered_stream_seq;
		o->ack_floor_stream_seq = v.ack_floor_stream_seq;
		o->source = tally__pending_source_name(v.source);
		o->age_ms = age_ms(now, v.last_ok_ns);
		o->is_leader = v.is_leader;
		o->consecutive_failures = v.consecutive_failures;
	}
	return (int)n;
}

TALLY_API int tally_read_totals(const struct tally_segment *seg, struct tally_segment_totals *out)
{
	const struct tally__shm_totals *t = &seg->hdr->totals;
	uint64_t at = atomic_load_explicit(&t->updated_ns, memory_order_acquire);

	out->recorded = atomic_load_explicit(&t->recorded, memory_order_relaxed);
	out->drained = atomic_load_explicit(&t->drained, memory_order_relaxed);
	out->dropped = atomic_load_explicit(&t->dropped, memory_order_relaxed);
	out->clamped = atomic_load_explicit(&t->clamped, memory_order_relaxed);
	out->rejected = atomic_load_explicit(&t->rejected, memory_order_relaxed);
	out->skipped = atomic_load_explicit(&t->skipped, memory_order_relaxed);
	out->age_ms = at ? age_ms(tally__mono_ns(), at) : UINT64_MAX;
	return tally_segment_owner_alive(seg) == 1 ? 0 : TALLY_ESTALE;
}

TALLY_API int tally_read_poller(const struct tally_segment *seg, struct tally_poller_stats *out)
{
	const void *sec = tally__seg_section(seg, &seg->pending);
	struct tally__pending_breaker_view b;
	uint64_t now = tally__mono_ns();
	int rc = tally__pending_read_breaker(sec, seg->pending.size, &b);

	if (rc < 0)
		return pending_error(rc, seg);
	memset(out, 0, sizeof(*out));
	out->breaker = tally__breaker_state_name(b.state);
	out->connected = b.connected;
	out->consecutive_failures = b.consecutive_failures;
	out->opens_total = b.opens_total;
	out->polls_ok = b.polls_ok;
	out->polls_failed = b.polls_failed;
	out->skipped_overrun = b.skipped_overrun;
	out->skipped_open = b.skipped_open;
	out->last_ok_age_ms = age_ms(now, b.last_ok_ns);
	out->state_age_ms = age_ms(now, b.since_ns);
	out->untracked_consumers = b.untracked;
	out->last_error_age_ms = b.last_error[0] ? age_ms(now, b.last_error_ns) : UINT64_MAX;
	snprintf(out->last_error, sizeof(out->last_error), "%s", b.last_error);
	return 0;
}
