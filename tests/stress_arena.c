/* SPDX-License-Identifier: MIT */
/*
 * stress_arena.c: the huge-page arena (lib/arena.c) under threads, as a
 * plain TAP program so that it also runs under ThreadSanitizer (CI's
 * check-concurrency).  Four threads take and give back objects of five
 * sizes in random order, and hand some to another thread to give back
 * (as an engine's teardown frees windows that drain threads made).  Each
 * object carries its owner's mark in its first and last words from the
 * moment it is taken: an object handed out twice, or written by the
 * arena while in use (its free-list link), shows as a broken mark.  At the
 * end every object is back and nothing is mapped.  Runs in every `make
 * check` too.
 */
#include "config.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "arena.h"
#include "common/tap.h"

enum { THREADS = 4, LIVE = 96, OPS = 40000, HANDOFF = 64 };

static const size_t sizes[] = { 64, 192, 5120, 10240, 65536 };
#define NSIZES (sizeof(sizes) / sizeof(sizes[0]))

struct obj {
	uint64_t *p;
	size_t size;
	uint64_t mark;
};

/* objects handed from one thread to the next to be given back there */
static struct {
	pthread_mutex_t lock;
	struct obj q[HANDOFF];
	unsigned n;
} handoff[THREADS];

static atomic_ulong taken, given, broken, unzeroed, refused;

static uint64_t next(uint64_t *s)
{
	*s = *s * 6364136223846793005u + 1442695040888963407u;
	return *s >> 11;
}

static void put_back(const struct obj *o)
{
	const size_t words = o->size / 8;

	if (o->p[0] != o->mark || o->p[words - 1] != ~o->mark)
		atomic_fetch_add(&broken, 1);
	tally__arena_free(o->p, o->size);
	atomic_fetch_add(&given, 1);
}

static void *worker(void *arg)
{
	const unsigned me = (unsigned)(uintptr_t)arg;
	struct obj live[LIVE];
	uint64_t s = 0x9e3779b97f4a7c15u * (me + 1);

	memset(live, 0, sizeof(live));
	for (unsigned op = 0; op < OPS; op++) {
		struct obj *o = &live[next(&s) % LIVE];

		if (o->p != NULL) {
			if (next(&s) % 8 == 0) { /* to the next thread */
				unsigned to = (me + 1) % THREADS;

				pthread_mutex_lock(&handoff[to].lock);
				if (handoff[to].n < HANDOFF) {
					handoff[to].q[handoff[to].n++] = *o;
					o->p = NULL;
				}
				pthread_mutex_unlock(&handoff[to].lock);
			}
			if (o->p != NULL)
				put_back(o);
			o->p = NULL;
			continue;
		}
		o->size = sizes[next(&s) % NSIZES];
		o->p = tally__arena_alloc(o->size);
		if (o->p == NULL) {
			atomic_fetch_add(&refused, 1);
			continue;
		}
		atomic_fetch_add(&taken, 1);
		const size_t words = o->size / 8;

		if (o->p[0] != 0 || o->p[words / 2] != 0 || o->p[words - 1] != 0)
			atomic_fetch_add(&unzeroed, 1);
		o->mark = ((uint64_t)me << 48) | op;
		o->p[0] = o->mark;
		o->p[words - 1] = ~o->mark;
		if (op % 64 == 0) { /* give back what others handed over */
			pthread_mutex_lock(&handoff[me].lock);
			for (unsigned i = 0; i < handoff[me].n; i++)
				put_back(&handoff[me].q[i]);
			handoff[me].n = 0;
			pthread_mutex_unlock(&handoff[me].lock);
		}
	}
	for (unsigned i = 0; i < LIVE; i++)
		if (live[i].p != NULL)
			put_back(&live[i]);
	return NULL;
}

int main(void)
{
	pthread_t t[THREADS];
	char line[160];

	tap_plan(4);
	for (unsigned i = 0; i < THREADS; i++)
		pthread_mutex_init(&handoff[i].lock, NULL);
	for (unsigned i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)i);
	for (unsigned i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	for (unsigned i = 0; i < THREADS; i++) /* what was handed over last */
		for (unsigned k = 0; k < handoff[i].n; k++)
			put_back(&handoff[i].q[k]);
	snprintf(line, sizeof(line), "taken %lu, given back %lu, refused %lu",
		 atomic_load(&taken), atomic_load(&given), atomic_load(&refused));
	tap_diag(line);
	tap_ok(atomic_load(&refused) == 0 && atomic_load(&taken) > THREADS * OPS / 4,
	       "every object asked for was given (%lu)", atomic_load(&taken));
	tap_ok(atomic_load(&given) == atomic_load(&taken), "every object given back once");
	tap_ok(atomic_load(&broken) == 0 && atomic_load(&unzeroed) == 0,
	       "no object shared or written while in use (%lu broken marks), all zeroed (%lu not)",
	       atomic_load(&broken), atomic_load(&unzeroed));
	tap_ok(tally__arena_bytes() == 0, "nothing mapped at the end (%zu bytes)", tally__arena_bytes());
	return tap_done();
}
