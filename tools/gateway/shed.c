/* SPDX-License-Identifier: MIT */
/*
 * shed.c: the shedding decision, kept pure so that it is tested on its
 * own (tests/test_gateway_shed.c) and so that using the engine's
 * shed_probability is a change in the caller only.
 *
 * The probability p that a request of the default class is shed comes
 * from the engine when it gives one (its shed_probability, graded with
 * the subject's pressure), kept under 1 - overload_trickle at overload;
 * otherwise from the level: 0 at ok, warn_shed_fraction at warn,
 * 1 - overload_trickle at overload (the trickle keeps a few requests
 * flowing so that recovery shows up in the latencies). Classes are shed in order: sheddable with
 * min(1, p x sheddable_factor), so it goes first and goes entirely while
 * the default class still flows; critical only at overload, with p.
 * Under pressure (warn) a shed answers 429, at overload 503; no usable
 * verdict under fail-closed sheds everything with 503.
 */
#include "config.h"

#include <math.h>
#include <stdint.h>
#include <strings.h>
#include <time.h>

#include "gateway.h"

static const char *const prio_names[GW_PRIO__COUNT] = { "critical", "default", "sheddable" };

const char *gw_priority_name(enum gw_priority p)
{
	return (unsigned)p < GW_PRIO__COUNT ? prio_names[p] : "default";
}

int gw_priority_parse(const char *s, enum gw_priority *out)
{
	for (int i = 0; i < GW_PRIO__COUNT; i++)
		if (s && strcasecmp(s, prio_names[i]) == 0) {
			*out = (enum gw_priority)i;
			return 0;
		}
	return -1;
}

void gw_shed_config_init(struct gw_shed_config *c)
{
	c->warn_shed_fraction = 0.25;
	c->overload_trickle = 0.01;
	c->sheddable_factor = 2.0;
	c->retry_after_ms = 1000;
	c->retry_jitter = 0.5;
	c->engine_probability = true;
}

static double clamp01(double x)
{
	return x < 0 ? 0 : x > 1 ? 1 : x;
}

/* p for the default class at this level. */
static double base_probability(const struct gw_shed_config *c, enum gw_level level, double sp)
{
	if (!c->engine_probability)
		sp = -1;
	if (sp >= 0 && level == GW_LEVEL_WARN)
		return clamp01(sp);
	if (sp >= 0 && level == GW_LEVEL_OVERLOAD)
		return fmin(clamp01(sp), clamp01(1.0 - c->overload_trickle));
	switch (level) {
	case GW_LEVEL_WARN: return clamp01(c->warn_shed_fraction);
	case GW_LEVEL_OVERLOAD: return clamp01(1.0 - c->overload_trickle);
	case GW_LEVEL_CLOSED: return 1.0;
	default: return 0.0;
	}
}

void gw_decide(const struct gw_shed_config *c, enum gw_level level, double shed_probability,
	       enum gw_priority prio, double u, struct gw_decision *out)
{
	double p = base_probability(c, level, shed_probability);

	if (level != GW_LEVEL_CLOSED) {
		if (prio == GW_PRIO_SHEDDABLE)
			p = clamp01(p * c->sheddable_factor);
		else if (prio == GW_PRIO_CRITICAL && level != GW_LEVEL_OVERLOAD)
			p = 0.0;
	}
	out->p = p;
	out->admit = !(u < p);
	out->status = out->admit ? 200u : level == GW_LEVEL_WARN ? 429u : 503u;
}

unsigned gw_retry_after_s(const struct gw_shed_config *c, uint32_t base_ms, double u, double v)
{
	double x = (base_ms ? base_ms : c->retry_after_ms) * (1.0 + c->retry_jitter * u) / 1000.0;
	double s = floor(x + v); /* rounded up or down at random, x on average: whole seconds still spread */

	return s < 1 ? 1u : s > 86400 ? 86400u : (unsigned)s;
}

double gw_uniform(void)
{
	static _Thread_local uint64_t s;

	if (s == 0) { /* seed per thread from the clock and the thread's own address */
		struct timespec ts;
		clock_gettime(CLOCK_MONOTONIC, &ts);
		s = ((uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull) ^ (uint64_t)(uintptr_t)&s;
		s |= 1;
	}
	s ^= s >> 12;
	s ^= s << 25;
	s ^= s >> 27;
	return (double)((s * 2685821657736338717ull) >> 11) * 0x1.0p-53;
}
