/* SPDX-License-Identifier: MIT */
/*
 * follow.h (private): following a segment's owner across restarts (see
 * follow.c). Producer-mode handles only; the owner never follows.
 */
#ifndef TALLY_LIB_FOLLOW_H
#define TALLY_LIB_FOLLOW_H

#include <stdint.h>

struct tally_segment;
struct tally__remap;

#define TALLY__FOLLOW_CHECK_MS 200u /* the watcher's period */
#define TALLY__FOLLOW_RETRY_MS 50u  /* at most one open attempt per this, per origin */

/* Set up following for a producer-mode origin (at open). 0 or -ENOMEM. */
int tally__follow_init(struct tally_segment *origin);

/* Start the watcher thread if it is not running in this process. */
void tally__follow_watch(struct tally_segment *origin);

/* Stop the watcher and close every successor (at the origin's close,
 * after its handles were revoked). */
void tally__follow_free(struct tally_segment *origin);

/*
 * The segment handles of origin should now record into: the origin or a
 * successor, with a live owner (opened here if needed), and the remap of
 * its ids (NULL for the origin itself). 0, or the open's error /
 * TALLY_EOWNERDEAD while no live owner has the name. Takes a mutex; opens
 * and maps at most once per TALLY__FOLLOW_RETRY_MS. Thread-safe.
 */
int tally__follow_current(struct tally_segment *origin, struct tally_segment **to,
			  struct tally__remap **remap);

/* Origin id -> id in the remap's target, interning the name there on
 * first use; UINT32_MAX if it cannot be had now. Thread-safe. */
uint32_t tally__remap_id(struct tally__remap *m, uint32_t id);

/* How many successors origin has opened. */
uint64_t tally__follow_moves(struct tally_segment *origin);

/* producer.c: send every handle of origin to its slow path, to move. */
void tally__producers_poke(struct tally_segment *origin);

#endif /* TALLY_LIB_FOLLOW_H */
