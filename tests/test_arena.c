/* SPDX-License-Identifier: MIT */
/*
 * test_arena.c - Criterion tests of the huge-page arena (lib/arena.c) on
 * its own: objects 64-byte aligned and zeroed, fresh or reused; sizes it
 * refuses; size classes in chunks of their own; the one spare chunk kept
 * while a class has others in use, and nothing mapped once every object is
 * gone (what lets an idle window give its memory back); fork() while
 * another thread takes and gives back objects, so that a child that finds
 * the lock taken by a thread it does not have would hang (pthread_atfork).
 * Each Criterion test runs in its own process, so tally__arena_bytes()
 * starts at 0 in each.  The threads' side under TSan: stress_arena.c.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "arena.h"

#define CHUNK TALLY__ARENA_CHUNK
#define HEAD 64u /* arena.c: a chunk's header */

static bool all_zero(const void *p, size_t n)
{
	const uint8_t *b = p;

	for (size_t i = 0; i < n; i++)
		if (b[i] != 0)
			return false;
	return true;
}

Test(arena, aligned_zeroed_and_zeroed_again_when_reused)
{
	static const size_t sizes[] = { 1, 63, 64, 65, 100, 4096, 5000, CHUNK / 16 };

	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		size_t n = sizes[i], rounded = (n + 63) & ~(size_t)63;
		uint8_t *p = tally__arena_alloc(n);

		cr_assert_not_null(p, "size %zu", n);
		cr_assert_eq((uintptr_t)p % 64, 0, "size %zu", n);
		cr_assert(all_zero(p, rounded), "fresh object of %zu bytes zeroed", n);
		memset(p, 0xa5, rounded);
		tally__arena_free(p, n);
		/* the class keeps no chunk once empty: take two so one stays */
		uint8_t *keep = tally__arena_alloc(n), *again = tally__arena_alloc(n);

		cr_assert(all_zero(keep, rounded) && all_zero(again, rounded));
		memset(again, 0x5a, rounded);
		tally__arena_free(again, n);
		again = tally__arena_alloc(n); /* the freed object comes back first */
		cr_assert(all_zero(again, rounded), "reused object of %zu bytes zeroed", n);
		tally__arena_free(again, n);
		tally__arena_free(keep, n);
	}
	cr_assert_eq(tally__arena_bytes(), 0);
}

Test(arena, refuses_zero_and_too_large)
{
	cr_assert_null(tally__arena_alloc(0));
	cr_assert_null(tally__arena_alloc(CHUNK / 16 + 1));
	cr_assert_null(tally__arena_alloc(SIZE_MAX - 10));
	cr_assert_eq(tally__arena_bytes(), 0);
	tally__arena_free(NULL, 64); /* harmless */
}

/* One chunk per size class: objects of different sizes never share one. */
Test(arena, a_chunk_per_size_class)
{
	void *a = tally__arena_alloc(64), *b = tally__arena_alloc(128), *c = tally__arena_alloc(100);

	cr_assert_eq(tally__arena_bytes(), 2 * CHUNK); /* 100 rounds to 128 */
	cr_assert_eq((uintptr_t)b & ~(uintptr_t)(CHUNK - 1), (uintptr_t)c & ~(uintptr_t)(CHUNK - 1));
	cr_assert_neq((uintptr_t)a & ~(uintptr_t)(CHUNK - 1), (uintptr_t)b & ~(uintptr_t)(CHUNK - 1));
	tally__arena_free(b, 128);
	cr_assert_eq(tally__arena_bytes(), 2 * CHUNK, "c still in the 128-byte chunk");
	tally__arena_free(c, 100);
	cr_assert_eq(tally__arena_bytes(), CHUNK);
	tally__arena_free(a, 64);
	cr_assert_eq(tally__arena_bytes(), 0);
}

/* The spare: a chunk emptied while its class has another in use stays
 * mapped (a subject sleeping and waking at a chunk's edge does not map
 * and unmap 2 MiB each time), only one, and goes with the last object. */
Test(arena, one_spare_then_nothing)
{
	enum { SIZE = 64 * 1024 };
	const size_t per = (CHUNK - HEAD) / SIZE; /* 31 */
	void *p[3 * 31];

	cr_assert_eq(per, 31);
	for (size_t i = 0; i < 3 * per; i++) {
		p[i] = tally__arena_alloc(SIZE);
		cr_assert_not_null(p[i]);
		memset(p[i], (int)(i & 0xff), 64); /* a mark to check later */
	}
	cr_assert_eq(tally__arena_bytes(), 3 * CHUNK);
	/* empty the third chunk: it becomes the spare */
	for (size_t i = 2 * per; i < 3 * per; i++)
		tally__arena_free(p[i], SIZE);
	cr_assert_eq(tally__arena_bytes(), 3 * CHUNK);
	/* empty the second: unmapped, the spare is taken */
	for (size_t i = per; i < 2 * per; i++)
		tally__arena_free(p[i], SIZE);
	cr_assert_eq(tally__arena_bytes(), 2 * CHUNK);
	/* the spare serves the next object, and is the spare again after */
	void *q = tally__arena_alloc(SIZE);

	cr_assert_eq(tally__arena_bytes(), 2 * CHUNK);
	cr_assert(all_zero(q, SIZE));
	tally__arena_free(q, SIZE);
	cr_assert_eq(tally__arena_bytes(), 2 * CHUNK);
	/* the first chunk's objects kept what was written in them */
	for (size_t i = 0; i < per; i++) {
		const uint8_t *b = p[i];

		for (int j = 0; j < 64; j++)
			cr_assert_eq(b[j], (uint8_t)(i & 0xff));
	}
	/* the last object of the class: nothing stays mapped */
	for (size_t i = 0; i < per; i++)
		tally__arena_free(p[i], SIZE);
	cr_assert_eq(tally__arena_bytes(), 0);
}

/* Objects given back in any order leave every chunk full again before a
 * new one is mapped: the chunks in use stay few. */
Test(arena, freed_objects_fill_before_a_new_chunk)
{
	enum { SIZE = 10240, N = 1000 };
	void **p = calloc(N, sizeof(*p));
	uint64_t s = 42;

	for (int i = 0; i < N; i++)
		p[i] = tally__arena_alloc(SIZE);
	const size_t full = tally__arena_bytes();

	for (int round = 0; round < 20; round++) {
		for (int i = 0; i < N; i++) { /* free a random half */
			s = s * 6364136223846793005u + 1442695040888963407u;
			if ((s >> 62) & 1) {
				tally__arena_free(p[i], SIZE);
				p[i] = NULL;
			}
		}
		for (int i = 0; i < N; i++)
			if (p[i] == NULL)
				p[i] = tally__arena_alloc(SIZE);
		cr_assert_leq(tally__arena_bytes(), full, "round %d", round);
	}
	for (int i = 0; i < N; i++)
		tally__arena_free(p[i], SIZE);
	cr_assert_eq(tally__arena_bytes(), 0);
	free(p);
}

static atomic_bool churn_stop;

static void *churn(void *arg)
{
	(void)arg;
	while (!atomic_load(&churn_stop)) {
		void *a = tally__arena_alloc(4096), *b = tally__arena_alloc(128);

		tally__arena_free(a, 4096);
		tally__arena_free(b, 128);
	}
	return NULL;
}

/* fork() while a thread hammers the arena's lock: without the lock held
 * across fork, some child would inherit it taken and hang in its first
 * allocation (alarm: killed by SIGALRM, a failure here). */
Test(arena, fork_while_another_thread_allocates)
{
	pthread_t t;
	void *held = tally__arena_alloc(4096);

	cr_assert_eq(pthread_create(&t, NULL, churn, NULL), 0);
	for (int i = 0; i < 200; i++) {
		int fd[2];

		cr_assert_eq(pipe(fd), 0);
		pid_t pid = fork();

		cr_assert_neq(pid, -1);
		if (pid == 0) {
			/* the verdict through the pipe, not the exit status: under
			 * valgrind the churn thread's objects, which this child
			 * has no thread for, count as leaked at its exit */
			alarm(10);
			void *a = tally__arena_alloc(4096), *b = tally__arena_alloc(192);
			char ok = a != NULL && b != NULL && all_zero(a, 4096) && all_zero(b, 192);

			tally__arena_free(a, 4096);
			tally__arena_free(b, 192);
			tally__arena_free(held, 4096); /* the parent's object, copied with the process */
			ok = ok && tally__arena_bytes() <= 3 * CHUNK;
			if (write(fd[1], &ok, 1) != 1)
				_exit(1);
			_exit(0);
		}
		close(fd[1]);
		char ok = 0;
		ssize_t got = read(fd[0], &ok, 1);
		int st;

		close(fd[0]);
		cr_assert_eq(waitpid(pid, &st, 0), pid);
		cr_assert(!WIFSIGNALED(st), "child %d: signal %d (SIGALRM: it hung)", i,
			  WIFSIGNALED(st) ? WTERMSIG(st) : 0);
		cr_assert(got == 1 && ok == 1, "child %d: took and gave back objects: %s", i,
			  got == 1 ? "wrong" : "no answer");
	}
	atomic_store(&churn_stop, true);
	pthread_join(t, NULL);
	tally__arena_free(held, 4096);
	cr_assert_eq(tally__arena_bytes(), 0);
}
