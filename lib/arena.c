/* SPDX-License-Identifier: MIT */
/*
 * arena.c - the huge-page arena: size classes of fixed-size objects in
 * 2 MiB chunks, mapped aligned, marked MADV_HUGEPAGE, unmapped when empty.
 * What it is for, its memory rules and its lock are in arena.h.
 *
 * A chunk starts with its header (one 64-byte line); its objects follow,
 * handed out first from the never-used tail (fresh: already zero, from the
 * kernel), then from a list of freed ones linked through their first word
 * (zeroed again when taken).  The header is found from an object by
 * rounding its address down to the chunk size.  Each size class keeps a
 * list of its chunks that have room, most recently freed into first, so
 * the chunks in use stay few and full.
 */
#include "config.h"

#include "arena.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "common.h"
#include "sanitize.h"

/* What is handed out is addressable, the rest is not: ASan's poisoning
 * in the ASan build; otherwise valgrind's memcheck, told through its
 * client requests that each object is a heap block of its own (so that
 * use after free, reads of the free list and leaks of arena objects are
 * reported as for malloc's); nothing at all without either. */
#if TALLY__ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#define HANDED_OUT(p, n) ((void)(p), (void)(n))
#define GIVEN_BACK(p) ((void)(p))
#elif defined(HAVE_VALGRIND_MEMCHECK_H)
#include <valgrind/memcheck.h>
#define POISON(p, n) ((void)VALGRIND_MAKE_MEM_NOACCESS((p), (n)))
#define UNPOISON(p, n) ((void)VALGRIND_MAKE_MEM_DEFINED((p), (n)))
#define HANDED_OUT(p, n) VALGRIND_MALLOCLIKE_BLOCK((p), (n), 0, 1)
#define GIVEN_BACK(p) VALGRIND_FREELIKE_BLOCK((p), 0)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#define HANDED_OUT(p, n) ((void)(p), (void)(n))
#define GIVEN_BACK(p) ((void)(p))
#endif

#define CHUNK_MAGIC 0x4b4e4843u /* "CHNK" */
#define HEAD 64u                /* the header's room at the chunk's start */
#define MAX_CLASSES 8u

struct klass;

struct chunk {
	uint32_t magic;
	uint32_t used;  /* objects handed out */
	uint32_t fresh; /* objects fresh .. nobj-1 were never handed out */
	uint32_t nobj;
	struct klass *k;
	struct chunk *prev, *next; /* in k->room while it has room */
	void *free;                /* freed objects */
};
_Static_assert(sizeof(struct chunk) <= HEAD, "a chunk's header fits its line");

struct klass {
	size_t size;        /* object size, a multiple of 64 */
	uint32_t nobj;      /* objects per chunk */
	uint32_t nchunks;   /* mapped, the spare included */
	struct chunk *room; /* chunks with a free object */
	struct chunk *spare; /* an empty chunk kept (arena.h, Memory), or NULL */
};

static pthread_mutex_t arena_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t arena_once = PTHREAD_ONCE_INIT;
static struct klass classes[MAX_CLASSES];
static uint32_t nclasses;
static size_t mapped;
/* Set once madvise(MADV_HUGEPAGE) has said no (a kernel built without
 * transparent huge pages answers EINVAL every time): from then on every
 * object goes to malloc at once, without a map and unmap per object under
 * the lock.  Chunks already mapped stay in use until they empty. */
static bool refused;

/* fork: the lock is held across it, so that a child (which may start an
 * engine of its own) never inherits it taken by a thread it does not
 * have; the chunks are copied with the process, consistent. */
static void atfork_prepare(void)
{
	pthread_mutex_lock(&arena_lock);
}

static void atfork_release(void)
{
	pthread_mutex_unlock(&arena_lock);
}

static void arena_init(void)
{
	if (pthread_atfork(atfork_prepare, atfork_release, atfork_release) != 0)
		tally__die(__FILE__, __LINE__, "arena: pthread_atfork");
}

static void lock(void)
{
	pthread_once(&arena_once, arena_init);
	if (pthread_mutex_lock(&arena_lock) != 0)
		tally__die(__FILE__, __LINE__, "arena: mutex lock");
}

static void unlock(void)
{
	if (pthread_mutex_unlock(&arena_lock) != 0)
		tally__die(__FILE__, __LINE__, "arena: mutex unlock");
}

/* The class of objects of size bytes; a new one if there is room. */
static struct klass *class_of(size_t size)
{
	for (uint32_t i = 0; i < nclasses; i++)
		if (classes[i].size == size)
			return &classes[i];
	if (nclasses == MAX_CLASSES)
		return NULL;
	classes[nclasses] = (struct klass){
		size, (uint32_t)((TALLY__ARENA_CHUNK - HEAD) / size), 0, NULL, NULL
	};
	return &classes[nclasses++];
}

static void room_add(struct klass *k, struct chunk *c)
{
	c->prev = NULL;
	c->next = k->room;
	if (k->room)
		k->room->prev = c;
	k->room = c;
}

static void room_remove(struct klass *k, struct chunk *c)
{
	if (c->prev)
		c->prev->next = c->next;
	else
		k->room = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = c->next = NULL;
}

/* Map a chunk: twice the size, trimmed to an aligned one; huge pages
 * asked for.  NULL when mmap or madvise says no (the caller falls back
 * to malloc, which is then no worse than before). */
static struct chunk *chunk_map(struct klass *k)
{
	const size_t n = TALLY__ARENA_CHUNK;
	uint8_t *raw = mmap(NULL, 2 * n, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (raw == MAP_FAILED)
		return NULL; /* out of memory: tried again next time */
	uintptr_t base = ((uintptr_t)raw + n - 1) & ~(uintptr_t)(n - 1);
	uint8_t *b = (uint8_t *)base;

	if (b > raw)
		munmap(raw, (size_t)(b - raw));
	if (raw + 2 * n > b + n)
		munmap(b + n, (size_t)(raw + 2 * n - (b + n)));
	if (madvise(b, n, MADV_HUGEPAGE) != 0) {
		munmap(b, n);
		refused = true;
		return NULL;
	}
	struct chunk *c = (struct chunk *)(void *)b;
	*c = (struct chunk){ CHUNK_MAGIC, 0, 0, k->nobj, k, NULL, NULL, NULL };
	POISON(b + HEAD, n - HEAD);
	k->nchunks++;
	mapped += n;
	room_add(k, c);
	return c;
}

static void chunk_unmap(struct klass *k, struct chunk *c)
{
	room_remove(k, c);
	if (k->spare == c)
		k->spare = NULL;
	k->nchunks--;
	mapped -= TALLY__ARENA_CHUNK;
	UNPOISON(c, TALLY__ARENA_CHUNK);
	c->magic = 0;
	munmap(c, TALLY__ARENA_CHUNK);
}

/* Take an object of c (which has room); *fresh: never used, so zero. */
static void *chunk_take(struct klass *k, struct chunk *c, bool *fresh)
{
	uint8_t *p;

	if (c->free != NULL) {
		p = c->free;
		UNPOISON(p, sizeof(void *));
		memcpy(&c->free, p, sizeof(void *));
		*fresh = false;
	} else {
		TALLY__ASSERT(c->fresh < c->nobj);
		p = (uint8_t *)c + HEAD + (size_t)c->fresh++ * k->size;
		*fresh = true;
	}
	if (++c->used == c->nobj)
		room_remove(k, c);
	if (k->spare == c)
		k->spare = NULL;
	return p;
}

void *tally__arena_alloc(size_t size)
{
	struct klass *k;
	struct chunk *c = NULL;
	void *p = NULL;
	bool fresh = false;

	size = (size + 63u) & ~(size_t)63u;
	if (size == 0 || size > TALLY__ARENA_CHUNK / 16)
		return NULL;
	lock();
	k = class_of(size);
	if (k != NULL)
		c = k->room != NULL ? k->room : refused ? NULL : chunk_map(k);
	if (c != NULL)
		p = chunk_take(k, c, &fresh);
	unlock();
	if (p == NULL)
		return NULL;
	UNPOISON(p, size);
	if (!fresh)
		memset(p, 0, size);
	HANDED_OUT(p, size);
	return p;
}

void tally__arena_free(void *p, size_t size)
{
	struct chunk *c;
	struct klass *k;

	if (p == NULL)
		return;
	size = (size + 63u) & ~(size_t)63u;
	c = (struct chunk *)((uintptr_t)p & ~(uintptr_t)(TALLY__ARENA_CHUNK - 1));
	TALLY__ASSERT(c->magic == CHUNK_MAGIC && c->k->size == size);
	k = c->k;
	GIVEN_BACK(p);
	lock();
	TALLY__ASSERT(c->used > 0);
	UNPOISON(p, sizeof(void *));
	memcpy(p, &c->free, sizeof(void *));
	POISON(p, size);
	c->free = p;
	if (c->used-- == c->nobj)
		room_add(k, c);
	if (c->used == 0) {
		if (k->spare == NULL && k->nchunks > 1) {
			k->spare = c;
		} else {
			chunk_unmap(k, c);
			if (k->spare != NULL && k->nchunks == 1)
				chunk_unmap(k, k->spare); /* nothing else in use */
		}
	}
	unlock();
}

size_t tally__arena_bytes(void)
{
	size_t n;

	lock();
	n = mapped;
	unlock();
	return n;
}
