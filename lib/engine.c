/* SPDX-License-Identifier: MIT */
/*
 * engine.c: the aggregator thread (and, with drain_threads > 1, the drain
 * threads that drain for it) and the two ways it publishes.
 *
 * Loop. The thread drains every ring that is not free (with
 * drain_threads > 1 the drain threads do, see "Drain threads" below), a
 * bounded batch per ring per pass so that one flooding producer cannot
 * starve the others,
 * and adds each sample to its subject's window (window.c). When a pass
 * finds nothing it sleeps for the drain interval (default 1 ms), so an
 * idle engine costs about a thousand wake-ups a second and no spinning.
 * Windows are advanced together whenever the clock enters a new slice
 * (slices are aligned to multiples of slice_ns, the same for every
 * subject). Every reap interval it runs the producer reaper.
 *
 * Publish. Every publish interval it computes every active subject's
 * stats once, into a freshly allocated immutable snapshot that it
 * publishes with rcu_assign_pointer (in-process readers use
 * rcu_read_lock, urcu-bp flavour: no registration needed) and frees the
 * previous one with call_rcu after a grace period. It then writes the same
 * stats into both copies of the segment's latch (snapshot.c) for readers
 * in other processes, and stores the owner heartbeat.
 *
 * Subject ids come from producers, so they are not trusted: an id outside
 * the table, or of an entry that is not READY, is counted as rejected and
 * the sample dropped; nothing is written anywhere but that subject's own
 * window.
 *
 * Waits and pending from ack replies (tally/jsack.h). A ring entry's tag
 * says what its value is (shm_layout.h): a latency goes into the
 * subject's window as ever; a wait into the subject's wait series (a
 * second window, made on the subject's first wait, and the CoDel
 * interval state, codel_add); a pending entry becomes the subject's
 * latest live sample of that consumer's backlog, stamped with the time
 * it was drained (its age grows from there). At publish, the sample
 * stands in for the poller's entry of the same consumer (matched by the
 * hash of "stream.consumer") when it is newer, or, for a consumer the
 * poller does not watch, counts as one more live consumer of the subject
 * (pending_of); the poller still confirms it and covers idle consumers.
 *
 * The pending map. Which entries' patterns match which subject is worked
 * out once, not at every publish: each entry keeps the rows its pattern
 * matches (erows), and this is redone only for an entry whose pattern
 * changed (or that appeared), and, for a row that is new, against every
 * entry. At publish the lists are inverted into row -> entries (ascending
 * entry index, the order of the old scan, so ties resolve as before), so
 * a publish costs the rows plus the matches, whatever the number of
 * watched consumers. Without memory for the map, the publish scans every
 * entry for every row, as it always did.
 *
 * Bounded steps. A publish (and the map's upkeep in it) can take longer
 * than a ring takes to fill (16,384 entries: 16 ms at 1 M samples/s), so
 * it drains every ring again whenever PUBLISH_STEP_NS has passed since
 * the last drain: the aggregator never goes longer than about that
 * without draining while it publishes. A row's stats are computed from
 * its window as it is when the row's turn comes; the rows of one
 * snapshot are each consistent, as they always were, and the snapshot's
 * time is that of the publish's start. Subjects made by such a drain get
 * their rows in the next publish.
 *
 * Subjects known before their first sample. A subject gets its state (and
 * so a published row, count 0, and a verdict) on its first sample, and
 * also without one when the engine knows it otherwise, because a router
 * that has stopped completing messages records nothing and is exactly the
 * subject that must be judged (stalled, or on its backlog alone):
 *   - the literal patterns of the threshold rules (no wildcard), when a
 *     threshold set is picked up;
 *   - the literal filter subject (or map_subject) of every pending entry,
 *     at every reap interval;
 *   - every READY entry of the subject table, at every reap interval (a
 *     router that interned a subject and is stuck on its first message).
 * The owner interns the first two into its own table itself
 * (tally_subject_intern on the owner's handle; it may wait, bounded, for
 * an entry another process is writing, see subject.c). The table scan
 * runs only when subjects_used has changed since the last complete scan,
 * or that scan met an entry still being claimed, so an idle table costs
 * one load per reap. A wildcard names no subject: subjects under it get
 * rows when they are interned or recorded.
 *
 * Drain threads (drain_threads = N, issue 18). With N = 1 the aggregator
 * thread (thread 0) drains every slot itself, as above, and nothing below
 * exists: no lane, no lock, every path the one-thread one. With N > 1,
 * N drain threads ("lanes", struct lane) drain and thread 0 drains
 * nothing: it publishes, reaps and keeps what only it may touch, so its
 * publish never holds a drain thread's own slots up. The producer slots
 * are split by number: lane k drains slot i when i mod N = k (claims start
 * at a slot that depends on the claimer's thread, so a process's
 * producers spread over the lanes). Ownership:
 *   - a lane owns, for every subject it has drained a sample of, a part:
 *     a latency window of its own and its own since-start export buckets
 *     (struct part); its slice walk and lazy advance, as thread 0's
 *     below, over its own parts; the per-slot rejected counter of its
 *     slots. It reads, and never writes, what thread 0 set up before it
 *     started (the config, the export edges, the segment's pointers).
 *   - thread 0 owns everything else, as with one thread: the subject
 *     states (rows, names, verdicts, rules, an empty window of their own
 *     that the merge includes), the wait series and CoDel state, the
 *     pending map, publishing, the totals and the reaper. A lane hands it
 *     what needs that state: a subject it saw first (fresh), to get its
 *     row, and every wait and pending entry (fwd: id, tag, value), which
 *     thread 0 puts into the series as if it had drained it itself, at its
 *     next pass. A full queue (LANE_FWD_CAP) ends the lane's batch there:
 *     the entry stays in the ring until thread 0 has emptied the queue.
 *   - thread 0, draining nothing, does not wake every drain interval: it
 *     sleeps until a lane has news for it (the first since its last
 *     collect signals it), its next slice, publish or reap, or the stop,
 *     and at least the drain interval between passes (agg_sleep).
 * The hand-off is one mutex per lane. The lane holds it for each batch
 * (and each step of its walk), and reads the clock under it; thread 0
 * takes it (lane_take: a flag asks the lane to end its batch within
 * LANE_WANT_EVERY entries, and a lane that finds the flag set parks,
 * lane_park, no spinning, until thread 0 gives the lane back; a lane that
 * waited gets its turn first) to collect fresh subjects and queued
 * entries; at publish, to merge the windows of up to LANE_GROUP rows at a
 * time, for at most LANE_HOLD_NS (half a publish step), as few hand-offs
 * as that allows, since each costs every lane the end of a batch and a
 * wake-up. The lanes parked meanwhile merge rows with thread 0 (struct
 * merge_job): at 10,000 subjects a publish's merge is 20 to 70 ms of
 * reading every lane's parts, cold, and with thread 0 alone one of the
 * two vCPUs idled through it. A row's window is the merge of thread 0's
 * and the lanes' parts of the subject, tally__window_stats_merged: exact
 * count, sum, min and max, the quantiles of the summed histograms, so the
 * same bound and window semantics as one window; the rest of the row,
 * pending, waits and verdict, is done after, without the locks. Thread 0
 * also takes the lanes to sum the export buckets the same way; and,
 * holding every lane, for the totals (drained
 * is added under the lane's lock, so drained and the rings agree) and the
 * reaper (no slot is freed under a batch). A part thread 0 reads is first
 * advanced to the publish time; since a lane reads its clock under the
 * lock, its next batch is never in an earlier slice than that. A lane's
 * fold of a closed slice into its export buckets shows at the next
 * publish, which collects it (l->folded).
 * Memory: thread 0 keeps a window of every subject (its row; empty with
 * N > 1), and each lane one of every subject it has drained a sample of.
 * A subject idle for a whole window keeps its row (512 bytes, in the
 * arena), its name (malloc'd to its length), its export buckets packed
 * (export.h: tens of bytes instead of 736; a lane's part packs its own)
 * and its snapshot row; the published bucket block points at its pack
 * instead of holding a copy (shared_refresh).
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
/* The inline read-side fast path of liburcu (LGPL-2.1 static inline
 * code, which the LGPL permits in code of any licence): without it every
 * rcu_read_lock is a call into liburcu-bp.so. Not in sanitizer builds:
 * the inline code reaches liburcu-bp's thread-local reader record, which
 * Debian's library does not place at the 128-byte alignment its type
 * declares, and UBSan stops on that (liburcu's own code, out of line,
 * is not instrumented). */
#include "sanitize.h"
#if !TALLY__ASAN && !TALLY__TSAN
#define _LGPL_SOURCE
#endif
#include <urcu-bp.h>

#include <tally/engine.h>

#include "arena.h"
#include "common.h"
#include "engine_priv.h"
#include "export.h"
#include "jsack.h"
#include "pending.h"
#include "proc.h"
#include "producer.h"
#include "rules.h"
#include "segment.h"
#include "snapshot.h"
#include "subject.h"
#include "verdict.h"
#include "window.h"

#define TALLY__ENGINE_MAGIC 0xe9e1e9e1u

/*
 * Publishing the snapshot pointer. liburcu 0.13 implements
 * rcu_assign_pointer and rcu_dereference with barriers in inline assembly
 * that ThreadSanitizer cannot see, so under TSan we use their C11
 * equivalents (a release store, an acquire load) and let it check
 * everything else. Grace periods (rcu_read_lock, call_rcu) are liburcu's
 * in both builds.
 */
#if TALLY__TSAN
#define snap_assign(p, v) __atomic_store_n(&(p), (v), __ATOMIC_RELEASE)
#define snap_deref(p) __atomic_load_n(&(p), __ATOMIC_ACQUIRE)
#else
#define snap_assign(p, v) rcu_assign_pointer(p, v)
#define snap_deref(p) rcu_dereference(p)
#endif
#define DRAIN_BATCH 4096u
/* The longest a publish goes without draining the rings (see the header). */
#define PUBLISH_STEP_NS UINT64_C(1000000)

/* Immutable data that changes more slowly than snapshots (the row of
 * each subject id; the export buckets, which change when a slice closes):
 * built when it changes, shared by the snapshots published meanwhile,
 * retired with call_rcu when replaced, like a snapshot.
 * The bucket block: data holds n pointers, row i's packed export buckets
 * (export.h), then the packs of the rows that were dense when it was
 * built; a sleeping subject's row points at the subject's own pack
 * instead (shown). free_with: packs the engine gave up while this block
 * (the newest then) or an older one may still point at them, freed with
 * it (export.h, Lifetime). */
struct shared {
	struct rcu_head rcu;
	uint32_t n;      /* entries */
	struct tally__export_pack *free_with;
	uint64_t data[]; /* row_of: n uint32 packed in pairs; buckets: see above */
};

/* An immutable snapshot: one stats row per active subject (dense), and the
 * shared row map and buckets current when it was published. */
struct snap {
	struct rcu_head rcu;
	uint64_t published_ns;
	uint32_t n;                     /* subject ids (table size) */
	uint32_t nrows;
	uint32_t nedges;
	const uint32_t *row_of;         /* [n]: row + 1, 0 none (in a shared block) */
	const struct tally__export_pack *const *buckets; /* [nbucket_rows] (a shared block), <= nrows */
	uint32_t nbucket_rows;
	struct tally_subject_stats rows[]; /* [nrows] */
};

/* A subject's waits (tally/jsack.h), made on its first tagged entry. */
struct wait_series {
	struct tally__window win;
	uint64_t skewed;          /* timestamps ahead of now, since start */
	/* CoDel (tally/verdict.h): the interval in progress and the last whole one */
	uint64_t iv_end;          /* end of the interval in progress; 0: none */
	uint64_t iv_min;
	uint64_t last_min;        /* minimum of the last whole interval */
	uint64_t last_end;        /* when it ended */
	bool last_valid, overloaded;
	/* the latest pending sample (one consumer: the last one seen) */
	uint64_t ack_pending, ack_ns; /* ack_ns 0: none */
	uint32_t ack_hash;
};

/* Since start, over closed slices: counts below each export edge, and
 * the count and sum they total (the histogram Prometheus scrapes). Dense
 * while the window is awake (a closing slice is folded in); packed while
 * it sleeps, le NULL (export.h): exported_sleep, exported_wake. */
struct exported {
	uint64_t *le; /* [nedges]; NULL: packed */
	union {
		struct {
			uint64_t count, sum;  /* dense */
		};
		struct tally__export_pack *pk; /* packed: count and sum inside */
	};
};

struct subject_state {
	struct tally__window win;
	struct wait_series *wait;
	struct tally__verdict_state vs;
	const struct tally_threshold_rule *rule; /* cached match, valid while rule_gen is current */
	uint64_t rule_gen;
	uint32_t rule_no; /* the rule's rules-section entry + 1 (tally_subject_stats.rule) */
	bool in_arena; /* this struct from lib/arena.c (calloc_line) */
	struct exported exp;
	/* malloc'd to its length: in the row, TALLY_SUBJECT_MAX + 1 bytes
	 * were a third of an idle subject's memory (issue 18) */
	char *name;
};

/* A subject as drain thread k >= 1 sees it (see "Drain threads"). */
struct part {
	struct tally__window win;
	struct exported exp;
	bool in_arena; /* this struct from lib/arena.c (calloc_line) */
};

/* A wait or pending entry a drain thread took, for thread 0. */
struct fwd {
	uint32_t id, tag;
	uint64_t v;
};

#define LANE_FWD_CAP 4096u
/* A drain thread's batch gives its lock up early when thread 0 asks, at
 * most this many entries later. */
#define LANE_WANT_EVERY 512u
/* Rows thread 0 reads under the drain threads' locks at a time: at most
 * LANE_GROUP, and no longer than LANE_HOLD_NS (checked before each claim
 * of MERGE_CLAIM rows, and before each row left to thread 0).
 * Each take costs the drain threads the end of a batch and a wake-up, so
 * a hand-off every few rows cost more than the merge itself; half a
 * publish step keeps a drain thread's stall under PUBLISH_STEP_NS. */
#define LANE_GROUP 512u
#define LANE_HOLD_NS (PUBLISH_STEP_NS / 2)

/* Drain thread k (a "lane"). Everything below lock is the lane's own,
 * and thread 0's while it holds lock (lane_take). Aligned to 128 bytes
 * (two lines, the pair the x86 prefetcher fetches): one lane's writes
 * never touch a line of its neighbour's. */
struct lane {
	_Alignas(128)
	struct tally_engine *e;
	uint32_t index;
	pthread_t thread;
	bool running;                  /* thread 0's: the thread was created */
	atomic_bool done;              /* the lane has drained to stop */
	atomic_uint want;              /* thread 0 waits for lock: give it up soon */
	atomic_bool waiting;           /* the lane is parked (thread 0 lets it in first) */
	atomic_bool news;              /* fresh or fwd has something (a hint) */
	pthread_mutex_t lock;
	uint64_t job_seen;             /* the last merge job it helped with (job.lock) */
	struct part **parts;           /* [table_size] */
	uintptr_t *pf_counts;          /* [table_size]: as the engine's, for the parts */
	uint32_t *active, nactive;     /* ids of the parts, in order of arrival */
	uint32_t *fresh, nfresh;       /* parts thread 0 has not yet seen */
	struct fwd *fwd;               /* [LANE_FWD_CAP] waits and pending for thread 0 */
	uint32_t nfwd;
	bool folded;                   /* a slice was folded into exp since thread 0 looked */
	uint64_t cur_slice, walked_slice;
	uint32_t walk_pos;
	uint64_t stall_from;
};

/* A publish's merge of up to LANE_GROUP rows (rows_merge), done by
 * thread 0 and by the drain threads it holds: a lane that thread 0 has
 * taken parks (lane_park) and, while a job is open, merges rows with it
 * instead of sleeping, so that neither vCPU idles while thread 0 holds
 * them. Rows are claimed MERGE_CLAIM at a time from next; every claimed
 * row is merged, so the rows done are from .. min(next, to). A row with a
 * window still in an earlier slice (or asleep with its buckets dense) is
 * left to thread 0 after the job (slow): advancing a subject's own
 * window touches thread 0's bucket blocks (buckets_changed, a pack it
 * shows) and its wait series, and a part's advance the lane's folded
 * flag; a row is slow at most once a slice (or while it sleeps), so the
 * job keeps them on thread 0 rather than share those. What is under
 * lock is the job's state; from .. slow are written before it opens and
 * read-only during it; out[r] and slow[r] are written by the one thread
 * that claimed row r, and read by thread 0 after the last helper left
 * (lock). */
struct merge_job {
	pthread_mutex_t lock;
	pthread_cond_t start;          /* a job opened, or a lane was given back */
	pthread_cond_t done;           /* the last helper left a closed job */
	uint64_t gen;                  /* jobs opened */
	bool open;
	bool ready;                    /* lock and conds initialised */
	uint32_t helpers;              /* lanes merging now */
	uint32_t from, to;
	uint64_t now, deadline;
	struct tally__window_stats *out; /* [LANE_GROUP], row from + r at out[r] */
	uint8_t *slow;                 /* [LANE_GROUP]: row from + r is left to thread 0 */
	atomic_uint next;              /* the next row to claim */
};

struct tally_engine {
	uint32_t magic;
	struct tally_segment *seg;
	struct tally_engine_config cfg;
	struct tally__window_config wcfg;
	pthread_t thread;
	atomic_bool stop;
	atomic_bool hold;                /* tally__engine_hold: nothing drains */
	struct lane *lanes;              /* [nlanes]: the drain threads when drain_threads > 1 */
	uint32_t nlanes;                 /* 0 (drain_threads 1: this thread drains) or drain_threads */
	uint32_t own_slots;              /* slots this thread drains itself: all, or none */
	struct subject_state **subjects; /* [table_size], allocated on first sample */
	/* [table_size]: the address of each subject's current-slice
	 * counters, for the drain's prefetch alone (so that it needs no line
	 * of the state itself), set when they are made and when an add wakes
	 * the window. Never read through: after a sleep it is the address of
	 * counters given back, so it is kept as an integer (a pointer to freed
	 * memory may not even be computed with), and a prefetch of it never
	 * faults. */
	uintptr_t *pf_counts;
	uint32_t *active;                /* ids in order of arrival: row i is active[i] */
	uint32_t *row_of;                /* [table_size]: row + 1, 0 not active */
	uint32_t nactive;
	struct shared *row_block;        /* published copy of row_of, shared */
	struct shared *bucket_block;     /* published export buckets, shared */
	struct shared *retiring[2];      /* replaced blocks, retired after the next publish */
	struct shared *building;         /* the bucket block shared_refresh is filling, or NULL */
	size_t bucket_room;              /* bytes of packs the last bucket block held */
	bool rows_changed, buckets_changed;
	struct snap *current;            /* RCU-protected */
	struct tally_thresholds *thresholds;           /* aggregator's own */
	struct tally_thresholds *_Atomic next_thresholds; /* handed over by set_thresholds */
	uint64_t thresholds_gen;
	struct tally__pending_view *pviews; /* [pending_cap]: last good copy of each entry */
	uint8_t *pvalid;                    /* [pending_cap]: pviews[i] holds a good copy */
	uint32_t *pused;                    /* indexes of the valid views, this publish */
	uint32_t *pmatch;                   /* [pending_cap]: rows each entry matched, this publish */
	uint32_t *ptop;                     /* [table_size]: per row, the entry that gave its backlog */
	uint32_t *phash;                    /* [pending_cap]: tally__jsack_consumer_hash of each view */
	uint32_t npviews;
	/* the pending map (see "The pending map" below) */
	uint32_t **erows;                   /* [pending_cap]: rows entry i's pattern matches, ascending */
	uint32_t *elen, *ecap;              /* [pending_cap]: their length and room */
	char (*epat)[TALLY__PENDING_SUBJ_MAX]; /* [pending_cap]: the pattern erows[i] was matched with */
	uint8_t *emapped;                   /* [pending_cap]: erows[i] is current for epat[i] */
	uint32_t pm_rows;                   /* rows 0 .. pm_rows-1 are matched against every mapped entry */
	uint32_t *rstart;                   /* [table_size + 1]: row r's entries, ridx[rstart[r] ..] */
	uint32_t *ridx, ridx_cap;
	bool pm_ok;                         /* this publish's map is complete; else scan every entry */
	struct tally__snap_writer latch;
	uint64_t cur_slice, next_publish, next_reap;
	uint64_t walked_slice;           /* the last slice every subject was walked into (advance_all) */
	uint64_t publish_now;            /* the time of the publish under way */
	struct tally__window_stats *wsg; /* [LANE_GROUP] with drain threads: merged rows (rows_merge) */
	uint64_t held_from;              /* when rows_step took the drain threads */
	struct merge_job job;            /* with drain threads: rows_merge's */
	_Atomic uint64_t merge_helped;   /* rows the drain threads merged (tally__engine_merge_helped) */
	uint64_t edges[TALLY__HIST_DEFAULT_NEDGES]; /* export bucket edges, ns */
	uint32_t nedges;
	_Atomic uint64_t drained, rejected, publishes, last_publish_ns, died, released;
	uint64_t recorded_total; /* aggregator thread: the largest drained + waiting published */
	_Atomic uint64_t pending_kept, claims_expired, subjects_tombstoned;
	_Atomic uint64_t subjects_active;
	_Atomic uint64_t lost;           /* values a window had no memory for (window.h) */
	/* the longest the aggregator went without draining (not counting its
	 * sleeps when idle): from the end of one drain pass to the start of
	 * the next; stall_from 0: the thread slept since */
	uint64_t stall_from;
	_Atomic uint64_t max_stall_ns;
	uint32_t scan_used;              /* subjects_used at the last complete table scan */
	bool scan_again;                 /* that scan met a CLAIMED entry */
	pthread_mutex_t start_lock;
	pthread_cond_t start_cond;
	bool started;
	/* with drain threads: thread 0 sleeps on wake until a lane has news,
	 * its next tick or the stop (agg_sleep) */
	pthread_mutex_t wake_lock;
	pthread_cond_t wake;
};

TALLY_API void tally_engine_config_init(struct tally_engine_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->drain_interval_us = 1000;
	cfg->slice_ns = TALLY__WINDOW_DEFAULT_SLICE_NS;
	cfg->window_ns = TALLY__WINDOW_DEFAULT_WINDOW_NS;
	cfg->publish_interval_ms = 100;
	cfg->reap_interval_ms = 250;
	cfg->pending_include_ack = true;
	cfg->drain_threads = 1;
}

static int config_check(const struct tally_engine_config *c)
{
	if (c->drain_interval_us < 1 || c->drain_interval_us > 1000000)
		return tally__fail(-EINVAL, "drain_interval_us %u is outside 1..1000000", c->drain_interval_us);
	if (c->slice_ns < 1000000 || c->window_ns % c->slice_ns ||
	    c->window_ns / c->slice_ns < 1 || c->window_ns / c->slice_ns > TALLY__WINDOW_MAX_SLICES)
		return tally__fail(-EINVAL, "window_ns must be 1..%u times slice_ns, and slice_ns at least 1 ms",
				   TALLY__WINDOW_MAX_SLICES);
	if (c->publish_interval_ms < 1 || c->publish_interval_ms > 60000)
		return tally__fail(-EINVAL, "publish_interval_ms %u is outside 1..60000", c->publish_interval_ms);
	if (c->reap_interval_ms < 1 || c->reap_interval_ms > 60000)
		return tally__fail(-EINVAL, "reap_interval_ms %u is outside 1..60000", c->reap_interval_ms);
	if (c->drain_threads < 1 || c->drain_threads > TALLY_DRAIN_THREADS_MAX)
		return tally__fail(-EINVAL, "drain_threads %u is outside 1..%u", c->drain_threads,
				   TALLY_DRAIN_THREADS_MAX);
	return 0;
}

/* ---- ingest --------------------------------------------------------------- */

/* Zeroed memory for a struct that begins with a window, on a 64-byte
 * boundary (a sample then touches one line of it, window.h), from the
 * huge-page arena (lib/arena.h: with thousands of subjects this line is
 * a TLB miss per sample in 4 KiB pages), else from malloc. Freed with
 * free_line(p, size, in_arena), *in_arena saying which. */
static void *calloc_line(size_t size, bool *in_arena)
{
	size_t n = (size + 63u) & ~(size_t)63u;
	void *p = tally__arena_alloc(n);

	*in_arena = p != NULL;
	if (p == NULL && (p = aligned_alloc(64, n)) != NULL)
		memset(p, 0, n);
	return p;
}

static void free_line(void *p, size_t size, bool in_arena)
{
	if (in_arena)
		tally__arena_free(p, (size + 63u) & ~(size_t)63u);
	else
		free(p);
}

/*
 * Export buckets while a window sleeps (struct exported, export.h).
 * exported_sleep packs them once the window is asleep (no memory: they
 * stay dense, nothing lost); exported_wake makes them dense again before
 * a closing slice is folded in. A pack a bucket block may point at
 * (shown: only thread 0's subjects' packs, never a drain thread's part's)
 * is freed with the newest block, the one being built if any: that block
 * is retired last, after every older one that could show it. (No drain
 * inside a build closes a slice today, the loop's drains do not walk, so
 * the block being built is there for the day one does.)
 */
static void exported_sleep(const struct tally_engine *e, struct exported *x)
{
	if (!x->le)
		return;
	struct tally__export_pack *pk = tally__export_pack_new(x->le, e->nedges, x->count, x->sum);
	if (!pk)
		return;
	free(x->le);
	x->le = NULL;
	x->pk = pk;
}

/* A pack the engine no longer owns. A drain thread's parts' packs are
 * never shown: they are freed here without a look at thread 0's blocks. */
static void pack_release(struct tally_engine *e, struct tally__export_pack *pk)
{
	if (!pk->shown) {
		free(pk);
		return;
	}
	struct shared *b = e->building ? e->building : e->bucket_block;
	if (!b) {
		free(pk); /* shown only in a block whose build failed */
		return;
	}
	pk->retire_next = b->free_with;
	b->free_with = pk;
}

/* Dense again. 0, or -ENOMEM with nothing changed. */
static int exported_wake(struct tally_engine *e, struct exported *x)
{
	if (x->le)
		return 0;
	uint64_t *le = TALLY__HIST_NOMEM("export.unpack") ? NULL : calloc(e->nedges, sizeof(uint64_t));
	if (!le)
		return -ENOMEM;
	struct tally__export_pack *pk = x->pk;
	uint64_t count = 0, sum = 0;
	tally__export_add(pk->bytes, pk->len, le, e->nedges, &count, &sum);
	x->le = le;
	x->count = count;
	x->sum = sum;
	pack_release(e, pk);
	return 0;
}

/* x's counts added into row, *count and *sum, dense or packed. */
static void exported_add(const struct tally_engine *e, uint64_t *row, const struct exported *x, uint64_t *count,
			 uint64_t *sum)
{
	bool sat = false;

	if (!x->le) {
		tally__export_add(x->pk->bytes, x->pk->len, row, e->nedges, count, sum);
		return;
	}
	for (uint32_t k = 0; k < e->nedges; k++)
		row[k] += x->le[k];
	*count += x->count;
	*sum = tally__hist_sat_add(*sum, x->sum, &sat);
}

/* At teardown, once no block is left (release_published) or none was made. */
static void exported_free(struct exported *x)
{
	if (x->le)
		free(x->le);
	else
		free(x->pk);
	x->le = NULL;
	x->pk = NULL;
}

/* First sample of a subject: check the id against the table, make its window. */
static struct subject_state *subject_new(struct tally_engine *e, uint32_t id, uint64_t now)
{
	struct tally_segment *seg = e->seg;
	struct tally__shm_subject *ent = tally__seg_subject(seg, id);
	char name[TALLY_SUBJECT_MAX + 1];

	if (atomic_load_explicit(&ent->state, memory_order_acquire) != TALLY__SUBJ_READY ||
	    tally_subject_name(seg, id, name, sizeof(name)) != 0)
		return NULL;
	bool in_arena;
	struct subject_state *st = calloc_line(sizeof(*st), &in_arena);
	if (st)
		st->in_arena = in_arena;
	if (!st || !(st->exp.le = calloc(e->nedges, sizeof(uint64_t))) || !(st->name = strdup(name)) ||
	    tally__window_init(&st->win, &e->wcfg, now) != 0) {
		if (st) {
			free(st->exp.le);
			free(st->name);
			free_line(st, sizeof(*st), in_arena);
		}
		return NULL;
	}
	tally__verdict_init(&st->vs, now);
	e->subjects[id] = st;
	e->pf_counts[id] = (uintptr_t)st->win.cur.counts;
	e->active[e->nactive++] = id;
	e->row_of[id] = e->nactive;
	e->rows_changed = e->buckets_changed = true;
	atomic_store_explicit(&e->subjects_active, e->nactive, memory_order_relaxed);
	return st;
}

static const struct tally_threshold_rule *rule_of(struct tally_engine *e, struct subject_state *st);

static struct wait_series *wait_of(struct tally_engine *e, struct subject_state *st, uint64_t now)
{
	if (TALLY__LIKELY(st->wait != NULL))
		return st->wait;
	struct wait_series *w = calloc(1, sizeof(*w));
	if (!w || tally__window_init(&w->win, &e->wcfg, now) != 0) {
		free(w);
		return NULL;
	}
	return st->wait = w;
}

/* CoDel (folly's Codel, tally/verdict.h): an interval starts with the
 * first wait after the last one ended; when a wait arrives after its
 * end, the interval is judged on its minimum and the next one begins. */
static void codel_close(struct wait_series *w, const struct tally_threshold_rule *r)
{
	w->last_min = w->iv_min;
	w->last_end = w->iv_end;
	w->last_valid = true;
	w->overloaded = w->iv_min > r->codel_target_ns;
	w->iv_end = 0;
}

static void codel_add(struct wait_series *w, const struct tally_threshold_rule *r, uint64_t v, uint64_t now)
{
	if (w->iv_end && now >= w->iv_end)
		codel_close(w, r);
	if (!w->iv_end) {
		w->iv_end = now + (uint64_t)r->codel_interval_ms * 1000000u;
		w->iv_min = v;
	} else if (v < w->iv_min) {
		w->iv_min = v;
	}
}

/* At publish: an interval that ended is judged; one more interval with
 * no wait at all clears the signal (no message was seen to wait). */
static void codel_tick(struct wait_series *w, const struct tally_threshold_rule *r, uint64_t now)
{
	uint64_t iv = (uint64_t)r->codel_interval_ms * 1000000u;

	if (w->iv_end && now >= w->iv_end)
		codel_close(w, r);
	if (!w->iv_end && w->last_valid && now - w->last_end >= iv)
		w->last_valid = w->overloaded = false;
}

/* A tagged entry (shm_layout.h). false: a tag no producer writes. */
static bool ingest_tagged(struct tally_engine *e, struct subject_state *st, uint32_t tag, uint64_t v,
			  uint64_t now)
{
	struct wait_series *w = wait_of(e, st, now);

	if (!w) { /* no memory for the series: the sample is lost (counted), not rejected */
		atomic_fetch_add_explicit(&e->lost, 1, memory_order_relaxed);
		return true;
	}
	switch (TALLY__TAG_KIND(tag)) {
	case TALLY__ENTRY_WAIT_SKEW:
		w->skewed++;
		v = 0;
		__attribute__((fallthrough)); /* a wait of 0 */
	case TALLY__ENTRY_WAIT:
		if (!tally__window_add(&w->win, v)) /* a sleeping window without memory to wake */
			atomic_fetch_add_explicit(&e->lost, 1, memory_order_relaxed);
		codel_add(w, rule_of(e, st), v, now);
		return true;
	case TALLY__ENTRY_PENDING:
		w->ack_pending = v;
		w->ack_ns = now;
		w->ack_hash = TALLY__TAG_HASH(tag);
		return true;
	default:
		return false;
	}
}

static void advance_one(struct tally_engine *e, struct subject_state *st, uint64_t now);

/* Prefetch (issue 18): the drain's look-ahead, TALLY__PF_* in
 * engine_priv.h (there so that the benchmark's memory floor uses the same
 * distances). prefetch_sample and lane_prefetch repeat the same few lines
 * on purpose: with one inline helper for both, gcc 12 laid out
 * drain_slot's loop so that 10,000 subjects lost 30% per CPU-second (A/B,
 * 2 rounds: 55-58 against 81-84 M/s). */

/* The subject's line and its counter's, TALLY__PF_FAR entries ahead: the
 * counter's address comes from pf_counts, not from the state's line,
 * which is still on its way (a second look 8 entries ahead read it there
 * instead; one look: +10% at 1,000 subjects, none measured at 10,000,
 * BENCHMARKS.md, issue 18, eighth pass). */
static inline void prefetch_sample(const struct tally_engine *e, const struct tally_ring_entry *r)
{
	uint32_t id = __atomic_load_n(&r->subject, __ATOMIC_RELAXED);
	uint64_t v = __atomic_load_n(&r->value_ns, __ATOMIC_RELAXED), max = e->seg->max_value_ns;

	if (id >= e->seg->table_size)
		return;
	const struct subject_state *st = e->subjects[id];
	uintptr_t c = e->pf_counts[id];
	if (st)
		__builtin_prefetch(st, 1);
	if (c)
		__builtin_prefetch((const void *)(c + sizeof(uint16_t) * tally__hist_index(v < max ? v : max)), 1);
}

/* Drain up to DRAIN_BATCH entries of s, and at most `budget` of them
 * (UINT64_MAX: no bound). *consumed (if not NULL) gets how many entries
 * were taken, accepted or rejected. Returns the samples accepted. */
static uint64_t drain_slot(struct tally_engine *e, struct tally__slot *s, uint64_t now, uint64_t budget,
			   uint64_t *consumed)
{
	struct tally_segment *seg = e->seg;
	uint64_t head, n = tally__slot_ready(seg, s, &head), rejected = 0, lost = 0;
	uint64_t mask = seg->ring_cap - 1, max = seg->max_value_ns;

	if (n > budget)
		n = budget;
	if (consumed)
		*consumed = 0;
	if (n == 0)
		return 0;
	if (n > DRAIN_BATCH)
		n = DRAIN_BATCH;
	bool pf = e->nactive >= TALLY__PF_MIN_SUBJECTS;
	/* a walk to close slices is under way (advance_all): some subjects are behind */
	bool walking = e->walked_slice != e->cur_slice;
	for (uint64_t k = 0; k < n; k++) {
		const struct tally_ring_entry *r = &s->ring[(head + k) & mask];
		if ((k & 3) == 0 && k + TALLY__RING_PF < n)
			__builtin_prefetch(&s->ring[(head + k + TALLY__RING_PF) & mask], 0);
		if (pf && k + TALLY__PF_FAR < n)
			prefetch_sample(e, &s->ring[(head + k + TALLY__PF_FAR) & mask]);
		/* One load each (a plain mov on x86): id is checked and then used
		 * as an index, and the producer may rewrite the entry meanwhile. */
		uint32_t id = __atomic_load_n(&r->subject, __ATOMIC_RELAXED);
		uint64_t v = __atomic_load_n(&r->value_ns, __ATOMIC_RELAXED);
		uint32_t tag = __atomic_load_n(&r->reserved, __ATOMIC_RELAXED);
		struct subject_state *st = id < seg->table_size ? e->subjects[id] : NULL;

		if (TALLY__UNLIKELY(!st) && (id >= seg->table_size || !(st = subject_new(e, id, now)))) {
			rejected++;
			continue;
		}
		if (TALLY__UNLIKELY(walking) && st->win.cur_slice < e->cur_slice)
			advance_one(e, st, now); /* a slice closed and the walk has not reached it yet */
		if (TALLY__LIKELY(tag == 0)) {
			const uint16_t *had = st->win.cur.counts;
			lost += !tally__window_add(&st->win, v < max ? v : max); /* false: no memory to wake */
			if (TALLY__UNLIKELY(!had)) /* woken: new counters */
				e->pf_counts[id] = (uintptr_t)st->win.cur.counts;
		} else if (!ingest_tagged(e, st, tag, v < max || TALLY__TAG_KIND(tag) == TALLY__ENTRY_PENDING
						    ? v : max, now))
			rejected++;
	}
	tally__slot_consume(s, head, n);
	if (consumed)
		*consumed = n;
	if (rejected) /* single writer of this counter: the aggregator */
		atomic_store_explicit(&s->ctl.rejected,
				      atomic_load_explicit(&s->ctl.rejected, memory_order_relaxed) + rejected,
				      memory_order_relaxed);
	atomic_fetch_add_explicit(&e->rejected, rejected, memory_order_relaxed);
	if (TALLY__UNLIKELY(lost))
		atomic_fetch_add_explicit(&e->lost, lost, memory_order_relaxed);
	return n - rejected;
}

/* The longest stretch without draining, of any drain thread. */
static void stall_note(struct tally_engine *e, uint64_t from)
{
	uint64_t d = tally__mono_ns() - from, cur = atomic_load_explicit(&e->max_stall_ns, memory_order_relaxed);

	while (from && d > cur &&
	       !atomic_compare_exchange_weak_explicit(&e->max_stall_ns, &cur, d, memory_order_relaxed,
						      memory_order_relaxed))
		;
}

static void stall_end(struct tally_engine *e)
{
	stall_note(e, e->stall_from);
}

static void lanes_collect(struct tally_engine *e, uint64_t now, bool all);

static uint64_t drain_all(struct tally_engine *e, uint64_t now)
{
	struct tally_segment *seg = e->seg;
	uint64_t total = 0;

	if (TALLY__UNLIKELY(atomic_load_explicit(&e->hold, memory_order_relaxed)))
		return 0; /* tally__engine_hold: not even inside a publish */
	stall_end(e);
	if (e->nlanes)
		lanes_collect(e, now, false);
	for (uint32_t i = 0; i < e->own_slots; i++) {
		struct tally__slot *s = tally__seg_slot(seg, i);
		uint64_t lease = atomic_load_explicit(&s->ctl.lease, memory_order_relaxed);
		if (tally__lease_state(lease) == TALLY__SLOT_FREE)
			continue;
		total += drain_slot(e, s, now, UINT64_MAX, NULL);
	}
	atomic_fetch_add_explicit(&e->drained, total, memory_order_relaxed);
	e->stall_from = tally__mono_ns();
	return total;
}

/* Inside a publish: drain again when a step's time is up. */
static bool publish_due(const struct tally_engine *e)
{
	return tally__mono_ns() - e->stall_from >= PUBLISH_STEP_NS;
}

static void publish_yield(struct tally_engine *e, uint64_t now)
{
	if (publish_due(e))
		drain_all(e, now);
}

/* Stop: drain every ring up to the tail it had when the stop began, and
 * no further, so that producers still recording flat out cannot keep the
 * engine from stopping. Bounded: each slot gets a budget of what it held
 * then (at most a ring), counted down by the entries taken, so not even a
 * producer that rewinds its head can make the loop run on. */
static void drain_to_stop(struct tally_engine *e, uint64_t now)
{
	struct tally_segment *seg = e->seg;
	uint64_t *budget = calloc(seg->nslots, sizeof(*budget)), total = 0;
	bool more = true;

	if (!budget) { /* no memory for the bounds: one pass, what is there now */
		drain_all(e, now);
		return;
	}
	for (uint32_t i = 0; i < e->own_slots; i++) {
		struct tally__slot *s = tally__seg_slot(seg, i);
		uint64_t head;
		budget[i] = tally__slot_ready(seg, s, &head);
	}
	while (more) {
		more = false;
		for (uint32_t i = 0; i < e->own_slots; i++) {
			uint64_t took;
			if (!budget[i])
				continue;
			total += drain_slot(e, tally__seg_slot(seg, i), now, budget[i], &took);
			budget[i] = took ? budget[i] - took : 0;
			more |= budget[i] != 0;
		}
	}
	atomic_fetch_add_explicit(&e->drained, total, memory_order_relaxed);
	free(budget);
}

/* A window into now's slice: the slice that closes (its counts below
 * each export edge, one pass over its nonempty blocks) is folded into the
 * since-start export buckets x once the close succeeded. true: folded.
 * A window left asleep gets its export buckets packed. */
static bool advance_fold(struct tally_engine *e, struct tally__window *w, struct exported *x, uint64_t now)
{
	uint64_t below[TALLY__HIST_DEFAULT_NEDGES], prev = w->cur_slice;
	uint64_t count = w->cur.count, sum = w->cur.sum;
	bool fold = prev < now / e->cfg.slice_ns && count != 0 &&
		    tally__hist_cumulative_le(&w->cur, e->edges, e->nedges, below) == 0;
	bool sat = false;

	/* no memory to unpack the buckets: the slice stays open and the
	 * advance is tried again later, as a failed advance is */
	if (fold && exported_wake(e, x) != 0)
		return false;
	tally__window_advance(w, now);
	/* folded only when the slice did close: a failed advance (no memory)
	 * is tried again later, and the slice must not count twice */
	fold = fold && w->cur_slice != prev;
	if (fold) {
		for (uint32_t k = 0; k < e->nedges; k++)
			x->le[k] += below[k];
		x->count += count;
		x->sum = tally__hist_sat_add(x->sum, sum, &sat);
	}
	/* after the fold: a gap of a whole window closes a slice and leaves
	 * the window asleep at once */
	if (tally__window_asleep(w))
		exported_sleep(e, x);
	return fold;
}

/* One subject's windows into the engine's slice (now's): close the
 * previous slice (folded into the export buckets once it has closed). */
__attribute__((noinline)) static void advance_one(struct tally_engine *e, struct subject_state *st, uint64_t now)
{
	if (advance_fold(e, &st->win, &st->exp, now))
		e->buckets_changed = true;
	if (st->wait)
		tally__window_advance(&st->wait->win, now);
}

/* Entering a new slice: close the previous one in every window. With
 * many subjects this takes longer than a ring takes to fill, so (step)
 * it drains the rings again every PUBLISH_STEP_NS; a sample drained for
 * a subject the walk has not reached yet advances that subject first
 * (drain_slot), and so does a publish (its rows): no sample of the new
 * slice lands in the old one, and no slice is folded twice. */
static void advance_all(struct tally_engine *e, uint64_t now, bool step)
{
	uint64_t slice = now / e->cfg.slice_ns;

	if (slice == e->walked_slice)
		return;
	e->cur_slice = slice;
	for (uint32_t i = 0; i < e->nactive; i++) {
		if (step && (i & 63) == 63)
			publish_yield(e, now);
		struct subject_state *st = e->subjects[e->active[i]];
		if (st->win.cur_slice < slice)
			advance_one(e, st, now);
	}
	e->walked_slice = slice;
}

/* ---- drain threads 1 .. N-1 (see "Drain threads" in the header) ------------ */

static void sleep_us(uint32_t us)
{
	struct timespec ts = { us / 1000000u, (long)(us % 1000000u) * 1000L };

	nanosleep(&ts, NULL);
}

static uint32_t merge_claims(struct tally_engine *e, struct merge_job *j, bool first);

/* The lane wants its lock while thread 0 wants it or holds it: it parks
 * on the job's start (no spinning: with N drain threads on N cores,
 * thread 0 shares a core with one of them, and a spinning lane takes the
 * time thread 0 needs to finish) until thread 0 gives the lane back, and
 * helps with any merge job opened meanwhile (struct merge_job). want is
 * cleared before lane_give broadcasts start under the job's lock, so no
 * wake-up is lost. */
static void lane_park(struct lane *l)
{
	struct merge_job *j = &l->e->job;

	pthread_mutex_lock(&j->lock);
	atomic_store_explicit(&l->waiting, true, memory_order_relaxed);
	while (atomic_load_explicit(&l->want, memory_order_relaxed)) {
		if (j->open && j->gen != l->job_seen) {
			l->job_seen = j->gen;
			j->helpers++;
			pthread_mutex_unlock(&j->lock);
			uint32_t rows = merge_claims(l->e, j, false);
			atomic_fetch_add_explicit(&l->e->merge_helped, rows, memory_order_relaxed);
			pthread_mutex_lock(&j->lock);
			if (--j->helpers == 0 && !j->open)
				pthread_cond_signal(&j->done);
			continue;
		}
		if (pthread_cond_wait(&j->start, &j->lock))
			tally__die(__FILE__, __LINE__, "drain thread wait");
	}
	pthread_mutex_unlock(&j->lock);
}

/* The lane takes its own lock, after thread 0 if thread 0 wants it. */
static void lane_lock(struct lane *l)
{
	for (;;) {
		if (atomic_load_explicit(&l->want, memory_order_relaxed)) {
			lane_park(l);
			continue;
		}
		if (pthread_mutex_lock(&l->lock))
			tally__die(__FILE__, __LINE__, "drain thread lock");
		if (!atomic_load_explicit(&l->want, memory_order_relaxed))
			break;
		pthread_mutex_unlock(&l->lock); /* thread 0 asked meanwhile */
	}
	atomic_store_explicit(&l->waiting, false, memory_order_relaxed);
}

static void lane_unlock(struct lane *l)
{
	pthread_mutex_unlock(&l->lock);
}

/* Thread 0 takes a lane: the lane ends its batch within LANE_WANT_EVERY
 * entries and waits until lane_give. */
static void lane_take(struct lane *l)
{
	/* a lane that waited for the last hand-off gets its batch first */
	for (int n = 0; n < 100 && atomic_load_explicit(&l->waiting, memory_order_relaxed); n++)
		sched_yield();
	atomic_store_explicit(&l->want, 1, memory_order_relaxed);
	if (pthread_mutex_lock(&l->lock))
		tally__die(__FILE__, __LINE__, "drain thread lock");
}

static void lane_give(struct lane *l)
{
	struct merge_job *j = &l->e->job;

	atomic_store_explicit(&l->want, 0, memory_order_relaxed);
	pthread_mutex_unlock(&l->lock);
	pthread_mutex_lock(&j->lock);
	pthread_cond_broadcast(&j->start);
	pthread_mutex_unlock(&j->lock);
}

static void lanes_take_all(struct tally_engine *e)
{
	for (uint32_t k = 0; k < e->nlanes; k++)
		lane_take(&e->lanes[k]);
}

/* Every lane back, and one wake-up for the parked ones (a broadcast per
 * lane would wake each parked lane once per lane). */
static void lanes_give_all(struct tally_engine *e)
{
	struct merge_job *j = &e->job;

	for (uint32_t k = 0; k < e->nlanes; k++) {
		atomic_store_explicit(&e->lanes[k].want, 0, memory_order_relaxed);
		pthread_mutex_unlock(&e->lanes[k].lock);
	}
	pthread_mutex_lock(&j->lock);
	pthread_cond_broadcast(&j->start);
	pthread_mutex_unlock(&j->lock);
}

/* The lane has something for thread 0: wake it if this is news (once per
 * collect, so at most once per drain interval while news keeps coming). */
static void lane_news(struct lane *l)
{
	if (atomic_exchange_explicit(&l->news, true, memory_order_relaxed))
		return;
	pthread_mutex_lock(&l->e->wake_lock);
	pthread_cond_signal(&l->e->wake);
	pthread_mutex_unlock(&l->e->wake_lock);
}

/* A lane's first sample of a subject: checked as subject_new checks, and
 * listed for thread 0, which gives the subject its row. */
static struct part *part_new(struct lane *l, uint32_t id, uint64_t now)
{
	struct tally_engine *e = l->e;
	struct tally__shm_subject *ent = tally__seg_subject(e->seg, id);

	if (atomic_load_explicit(&ent->state, memory_order_acquire) != TALLY__SUBJ_READY)
		return NULL;
	bool in_arena;
	struct part *p = calloc_line(sizeof(*p), &in_arena);
	if (p)
		p->in_arena = in_arena;
	if (!p || !(p->exp.le = calloc(e->nedges, sizeof(uint64_t))) ||
	    tally__window_init(&p->win, &e->wcfg, now) != 0) {
		if (p) {
			free(p->exp.le); /* dense: never packed yet */
			free_line(p, sizeof(*p), in_arena);
		}
		return NULL;
	}
	l->parts[id] = p;
	l->pf_counts[id] = (uintptr_t)p->win.cur.counts;
	l->active[l->nactive++] = id;
	l->fresh[l->nfresh++] = id;
	lane_news(l);
	return p;
}

static void part_free(struct part *p)
{
	tally__window_destroy(&p->win);
	exported_free(&p->exp);
	free_line(p, sizeof(*p), p->in_arena);
}

static void part_advance(struct lane *l, struct part *p, uint64_t now)
{
	if (advance_fold(l->e, &p->win, &p->exp, now))
		l->folded = true;
}

/* The lane's clock entered a new slice: a walk closes the old one in
 * every part, a step at a time (lane_walk); meanwhile each sample checks
 * its part (lane_drain_slot), as on thread 0. */
static void lane_slice(struct lane *l, uint64_t now)
{
	uint64_t slice = now / l->e->cfg.slice_ns;

	if (slice != l->cur_slice) {
		l->cur_slice = slice;
		l->walk_pos = 0;
	}
}

static void lane_walk(struct lane *l, uint64_t now, uint32_t max)
{
	if (l->walked_slice == l->cur_slice)
		return;
	for (uint32_t n = 0; n < max && l->walk_pos < l->nactive; n++, l->walk_pos++) {
		struct part *p = l->parts[l->active[l->walk_pos]];
		if (p->win.cur_slice < l->cur_slice)
			part_advance(l, p, now);
	}
	if (l->walk_pos == l->nactive)
		l->walked_slice = l->cur_slice;
}

/* A wait or pending entry, for thread 0 (its series and CoDel state are
 * thread 0's). 1: queued; 0: a tag no producer writes; -1: the queue is
 * full (the entry stays in the ring). */
static int lane_forward(struct lane *l, uint32_t id, uint32_t tag, uint64_t v)
{
	switch (TALLY__TAG_KIND(tag)) {
	case TALLY__ENTRY_WAIT_SKEW:
	case TALLY__ENTRY_WAIT:
	case TALLY__ENTRY_PENDING:
		break;
	default:
		return 0;
	}
	if (l->nfwd == LANE_FWD_CAP)
		return -1;
	l->fwd[l->nfwd++] = (struct fwd){ id, tag, v };
	lane_news(l);
	return 1;
}

/* The part's line and its counter's, as prefetch_sample. */
static inline void lane_prefetch(const struct lane *l, const struct tally_ring_entry *r)
{
	uint32_t id = __atomic_load_n(&r->subject, __ATOMIC_RELAXED);
	uint64_t v = __atomic_load_n(&r->value_ns, __ATOMIC_RELAXED), max = l->e->seg->max_value_ns;

	if (id >= l->e->seg->table_size)
		return;
	const struct part *p = l->parts[id];
	uintptr_t c = l->pf_counts[id];
	if (p)
		__builtin_prefetch(p, 1);
	if (c)
		__builtin_prefetch((const void *)(c + sizeof(uint16_t) * tally__hist_index(v < max ? v : max)), 1);
}

/* drain_slot for a lane, into its parts, under its lock. Ends early when
 * thread 0 wants the lock, or at a wait that finds the queue full
 * (*blocked). */
static uint64_t lane_drain_slot(struct lane *l, struct tally__slot *s, uint64_t now, uint64_t budget,
				uint64_t *consumed, bool *blocked)
{
	struct tally_segment *seg = l->e->seg;
	uint64_t head, n = tally__slot_ready(seg, s, &head), rejected = 0, k;
	uint64_t mask = seg->ring_cap - 1, max = seg->max_value_ns;

	n = n < budget ? n : budget;
	n = n < DRAIN_BATCH ? n : DRAIN_BATCH;
	bool pf = l->nactive >= TALLY__PF_MIN_SUBJECTS;
	bool walking = l->walked_slice != l->cur_slice;
	for (k = 0; k < n; k++) {
		if ((k & (LANE_WANT_EVERY - 1)) == LANE_WANT_EVERY - 1 &&
		    atomic_load_explicit(&l->want, memory_order_relaxed))
			break;
		const struct tally_ring_entry *r = &s->ring[(head + k) & mask];
		if ((k & 3) == 0 && k + TALLY__RING_PF < n)
			__builtin_prefetch(&s->ring[(head + k + TALLY__RING_PF) & mask], 0);
		if (pf && k + TALLY__PF_FAR < n)
			lane_prefetch(l, &s->ring[(head + k + TALLY__PF_FAR) & mask]);
		uint32_t id = __atomic_load_n(&r->subject, __ATOMIC_RELAXED);
		uint64_t v = __atomic_load_n(&r->value_ns, __ATOMIC_RELAXED);
		uint32_t tag = __atomic_load_n(&r->reserved, __ATOMIC_RELAXED);
		struct part *p = id < seg->table_size ? l->parts[id] : NULL;

		if (TALLY__UNLIKELY(!p) && (id >= seg->table_size || !(p = part_new(l, id, now)))) {
			rejected++;
			continue;
		}
		if (TALLY__UNLIKELY(walking) && p->win.cur_slice < l->cur_slice)
			part_advance(l, p, now);
		if (TALLY__LIKELY(tag == 0)) {
			const uint16_t *had = p->win.cur.counts;
			if (TALLY__UNLIKELY(!tally__window_add(&p->win, v < max ? v : max)))
				atomic_fetch_add_explicit(&l->e->lost, 1, memory_order_relaxed); /* no memory to wake */
			if (TALLY__UNLIKELY(!had)) /* woken: new counters */
				l->pf_counts[id] = (uintptr_t)p->win.cur.counts;
			continue;
		}
		int f = lane_forward(l, id, tag, v < max || TALLY__TAG_KIND(tag) == TALLY__ENTRY_PENDING ? v : max);
		if (f < 0) {
			*blocked = true;
			break;
		}
		rejected += f == 0;
	}
	tally__slot_consume(s, head, k);
	if (consumed)
		*consumed = k;
	if (rejected) { /* single writer of this counter: the slot's drain thread */
		atomic_store_explicit(&s->ctl.rejected,
				      atomic_load_explicit(&s->ctl.rejected, memory_order_relaxed) + rejected,
				      memory_order_relaxed);
		atomic_fetch_add_explicit(&l->e->rejected, rejected, memory_order_relaxed);
	}
	return k - rejected;
}

/* One batch of slot i under the lane's lock. now 0: the clock, read under
 * the lock, so that it is never behind a publish that advanced the
 * lane's parts (lane_take happens before). */
static uint64_t lane_batch(struct lane *l, uint32_t i, uint64_t now, uint64_t budget, uint64_t *took,
			   bool *blocked)
{
	struct tally_engine *e = l->e;

	lane_lock(l);
	stall_note(e, l->stall_from);
	now = now ? now : tally__mono_ns();
	lane_slice(l, now);
	uint64_t got = lane_drain_slot(l, tally__seg_slot(e->seg, i), now, budget, took, blocked);
	/* inside the lock: thread 0 reads the totals under every lane's lock */
	atomic_fetch_add_explicit(&e->drained, got, memory_order_relaxed);
	lane_unlock(l);
	l->stall_from = tally__mono_ns();
	return got;
}

/* Every slot of the lane once, and a step of its walk. */
static uint64_t lane_pass(struct lane *l, uint64_t now)
{
	struct tally_engine *e = l->e;
	struct tally_segment *seg = e->seg;
	uint64_t total = 0;

	lane_lock(l);
	uint64_t t = now ? now : tally__mono_ns();
	lane_slice(l, t);
	lane_walk(l, t, 256);
	lane_unlock(l);
	for (uint32_t i = l->index; i < seg->nslots; i += e->nlanes) {
		struct tally__slot *s = tally__seg_slot(seg, i);
		uint64_t lease = atomic_load_explicit(&s->ctl.lease, memory_order_relaxed), head;
		bool blocked = false;
		if (tally__lease_state(lease) == TALLY__SLOT_FREE || !tally__slot_ready(seg, s, &head))
			continue;
		total += lane_batch(l, i, now, UINT64_MAX, NULL, &blocked);
	}
	return total;
}

/* drain_to_stop for the lane's slots. */
static void lane_drain_to_stop(struct lane *l)
{
	struct tally_segment *seg = l->e->seg;
	uint64_t *budget = calloc(seg->nslots, sizeof(*budget));
	bool more = true;

	if (!budget) {
		lane_pass(l, 0);
		return;
	}
	for (uint32_t i = l->index; i < seg->nslots; i += l->e->nlanes) {
		uint64_t head;
		budget[i] = tally__slot_ready(seg, tally__seg_slot(seg, i), &head);
	}
	while (more) {
		more = false;
		for (uint32_t i = l->index; i < seg->nslots; i += l->e->nlanes) {
			uint64_t took = 0;
			bool blocked = false;
			if (!budget[i])
				continue;
			lane_batch(l, i, 0, budget[i], &took, &blocked);
			budget[i] = took || blocked ? budget[i] - took : 0;
			if (blocked)
				sleep_us(20); /* thread 0 empties the queue */
			more |= budget[i] != 0;
		}
	}
	free(budget);
}

static void *lane_main(void *arg)
{
	struct lane *l = arg;
	struct tally_engine *e = l->e;
	char name[16];

	snprintf(name, sizeof(name), "tally-drain%u", l->index);
	pthread_setname_np(pthread_self(), name);
	while (!atomic_load_explicit(&e->stop, memory_order_acquire)) {
		uint64_t got = atomic_load_explicit(&e->hold, memory_order_relaxed) ? 0 : lane_pass(l, 0);
		if (got == 0) {
			l->stall_from = 0; /* the sleep does not count */
			sleep_us(e->cfg.drain_interval_us);
		}
	}
	lane_drain_to_stop(l);
	atomic_store_explicit(&l->done, true, memory_order_release);
	return NULL;
}

/* Thread 0 takes what the lanes left for it: subjects they saw first get
 * their state (and so a row), waits and pending go into the subjects'
 * series. all: every lane (a publish), else those with news. */
static void lanes_collect(struct tally_engine *e, uint64_t now, bool all)
{
	for (uint32_t k = 0; k < e->nlanes; k++) {
		struct lane *l = &e->lanes[k];
		uint32_t kept = 0;
		if (!all && !atomic_load_explicit(&l->news, memory_order_relaxed))
			continue;
		lane_take(l);
		atomic_store_explicit(&l->news, false, memory_order_relaxed);
		for (uint32_t i = 0; i < l->nfresh; i++) {
			uint32_t id = l->fresh[i];
			if (!e->subjects[id] && !subject_new(e, id, now))
				l->fresh[kept++] = id; /* no memory, or no name yet: again next time */
		}
		l->nfresh = kept;
		for (uint32_t i = 0; i < l->nfwd; i++) {
			struct subject_state *st = e->subjects[l->fwd[i].id];
			if (!st)
				continue; /* no state (no memory): lost, as a wait without a series */
			if (st->win.cur_slice < e->cur_slice)
				advance_one(e, st, now);
			ingest_tagged(e, st, l->fwd[i].tag, l->fwd[i].v, now);
		}
		l->nfwd = 0;
		if (l->folded)
			e->buckets_changed = true;
		l->folded = false;
		if (kept)
			atomic_store_explicit(&l->news, true, memory_order_relaxed);
		lane_give(l);
	}
}

/* The time a window's stats are read at: now, or, for a window whose
 * slice close failed (advance_fold: no memory to store the slice or to
 * unpack the export buckets; it stays behind and is tried again), the
 * last instant of the slice it is still in. The stats' own advance must
 * not close that slice: it would never be folded into the export
 * buckets. */
static uint64_t stats_time(const struct tally_engine *e, const struct tally__window *w, uint64_t now)
{
	uint64_t slice = e->cfg.slice_ns;

	return w->cur_slice < now / slice ? w->cur_slice * slice + slice - 1 : now;
}

/* Thread 0 merges a row's window with the lanes' parts of it (every lane
 * held). One drain thread: the window alone, as it always was. */
static void row_window(struct tally_engine *e, uint32_t id, struct subject_state *st, uint64_t now,
		       struct tally__window_stats *ws)
{
	struct tally__window *wins[TALLY_DRAIN_THREADS_MAX + 1];
	size_t n = 0;

	_Static_assert(TALLY_DRAIN_THREADS_MAX + 1 <= TALLY__WINDOW_MERGE_MAX, "a row merges up to this many");

	if (!e->nlanes) {
		tally__window_stats(&st->win, stats_time(e, &st->win, now), ws);
		return;
	}
	uint64_t at = stats_time(e, &st->win, now);
	wins[n++] = &st->win;
	for (uint32_t k = 0; k < e->nlanes; k++) {
		struct part *p = e->lanes[k].parts[id];
		if (!p)
			continue;
		part_advance(&e->lanes[k], p, now);
		uint64_t t = stats_time(e, &p->win, now);
		at = t < at ? t : at;
		wins[n++] = &p->win;
	}
	tally__window_stats_merged(wins, n, at, ws);
}

/* The merge is bound by cache misses at thousands of subjects (every
 * part of a row is cold: the lanes' working set is all their parts), so
 * it fetches ahead as the drain does: MERGE_PF_FAR rows ahead the parts
 * (their window headers), MERGE_PF_NEAR rows ahead (those have arrived)
 * the block subtotals the quantile walk adds up. Not the subject state
 * too: more fetches in flight than the core has room for stall it (merge
 * CPU at 10,000 subjects: 9 ms a publish with 6 / 3 rows and no state,
 * 11.5 ms with 4 / 2 rows and the state, 12 ms with no look-ahead). */
#define MERGE_PF_FAR 6u
#define MERGE_PF_NEAR 3u

static void prefetch_lines(const void *p, size_t len)
{
	for (size_t o = 0; o < len; o += 64)
		__builtin_prefetch((const char *)p + o, 0);
}

static void merge_prefetch(const struct tally_engine *e, uint32_t i, uint32_t to)
{
	if (i + MERGE_PF_FAR < to) {
		uint32_t id = e->active[i + MERGE_PF_FAR];
		for (uint32_t k = 0; k < e->nlanes; k++)
			if (e->lanes[k].parts[id])
				prefetch_lines(e->lanes[k].parts[id], sizeof(struct tally__window));
	}
	if (i + MERGE_PF_NEAR < to) {
		uint32_t id = e->active[i + MERGE_PF_NEAR];
		for (uint32_t k = 0; k < e->nlanes; k++) {
			const struct part *p = e->lanes[k].parts[id];
			if (!p)
				continue;
			if (p->win.cur.blocks && p->win.cur.count)
				prefetch_lines(p->win.cur.blocks, p->win.cur.nblocks * sizeof(uint64_t));
			if (p->win.agg.blocks && p->win.agg.count)
				prefetch_lines(p->win.agg.blocks, p->win.agg.nblocks * sizeof(uint64_t));
		}
	}
}

/* A step of a walk over the rows with the lanes held: every 16 rows, once
 * held for LANE_HOLD_NS, they get their locks back for a moment, and for
 * the drain of a step whose time is up (publish_yield every mask + 1
 * rows). */
static void rows_step(struct tally_engine *e, uint32_t i, uint32_t mask, bool *held)
{
	bool yield = (i & mask) == mask && publish_due(e);

	if (*held && (yield || ((i & 15) == 0 && tally__mono_ns() - e->held_from >= LANE_HOLD_NS))) {
		lanes_give_all(e);
		*held = false;
	}
	if (yield)
		drain_all(e, e->publish_now);
	if (e->nlanes && !*held) {
		lanes_take_all(e);
		e->held_from = tally__mono_ns();
		*held = true;
	}
}

/* Row i's merged window into *ws, if every window of it is in now's
 * slice (and none asleep with its export buckets dense): then nothing
 * needs advancing, and the merge writes only the row's own windows, so a
 * drain thread may do it (struct merge_job). false: nothing done, the
 * row is thread 0's (row_window). */
static bool row_window_ready(struct tally_engine *e, uint32_t i, uint64_t now, struct tally__window_stats *ws)
{
	struct tally__window *wins[TALLY_DRAIN_THREADS_MAX + 1];
	uint64_t slice = now / e->cfg.slice_ns;
	uint32_t id = e->active[i];
	struct subject_state *st = e->subjects[id];
	size_t n = 0;

	if (st->win.cur_slice < slice || st->win.cur_slice < e->cur_slice)
		return false;
	wins[n++] = &st->win;
	for (uint32_t k = 0; k < e->nlanes; k++) {
		struct part *p = e->lanes[k].parts[id];
		if (!p)
			continue;
		if (p->win.cur_slice < slice || (tally__window_asleep(&p->win) && p->exp.le))
			return false;
		wins[n++] = &p->win;
	}
	tally__window_stats_merged(wins, n, now, ws);
	return true;
}

/* Claims of a merge job until its rows or its time are done: every
 * claimed row is merged. first (thread 0's): one claim before the clock
 * is looked at, so a job always moves. Returns the rows it merged (not
 * those left to thread 0). */
#define MERGE_CLAIM 32u

static uint32_t merge_claims(struct tally_engine *e, struct merge_job *j, bool first)
{
	uint32_t merged = 0;

	for (;; first = false) {
		if (!first && tally__mono_ns() >= j->deadline)
			return merged;
		uint32_t c = atomic_fetch_add_explicit(&j->next, MERGE_CLAIM, memory_order_relaxed);
		if (c >= j->to)
			return merged;
		uint32_t end = c + MERGE_CLAIM < j->to ? c + MERGE_CLAIM : j->to;
		for (uint32_t i = c; i < end; i++) {
			merge_prefetch(e, i, end);
			bool ready = row_window_ready(e, i, j->now, &j->out[i - j->from]);
			j->slow[i - j->from] = !ready;
			merged += ready;
		}
	}
}

/* With drain threads: the merged windows of rows from .. (at most
 * LANE_GROUP of them, for at most LANE_HOLD_NS) into out, every lane held
 * for them alone (the rest of a row's work is done after, without the
 * locks), the lanes that park meanwhile merging with thread 0 (struct
 * merge_job). Returns the row after the last one merged. */
static uint32_t rows_merge(struct tally_engine *e, uint32_t from, uint32_t nrows, uint64_t now,
			   struct tally__window_stats *out)
{
	struct merge_job *j = &e->job;
	uint32_t to = from + LANE_GROUP < nrows ? from + LANE_GROUP : nrows;

	publish_yield(e, now);
	lanes_take_all(e);
	pthread_mutex_lock(&j->lock);
	j->from = from;
	j->to = to;
	j->now = now;
	j->deadline = tally__mono_ns() + LANE_HOLD_NS;
	j->out = out;
	atomic_store_explicit(&j->next, from, memory_order_relaxed);
	j->gen++;
	j->open = true;
	pthread_cond_broadcast(&j->start);
	pthread_mutex_unlock(&j->lock);
	merge_claims(e, j, true);
	pthread_mutex_lock(&j->lock);
	j->open = false;
	while (j->helpers)
		pthread_cond_wait(&j->done, &j->lock);
	pthread_mutex_unlock(&j->lock);
	uint32_t end = atomic_load_explicit(&j->next, memory_order_relaxed);
	end = end < to ? end : to;
	for (uint32_t i = from; i < end; i++) {
		if (!j->slow[i - from])
			continue;
		/* after a slice boundary most rows are slow (the lanes have not
		 * walked their parts yet) and these take longer: the hold stays
		 * bounded, and the rows from here on go to the next job (a fast
		 * row merged by a claim wrote nothing but its out) */
		if (i > from && tally__mono_ns() >= j->deadline) {
			end = i;
			break;
		}
		uint32_t id = e->active[i];
		struct subject_state *st = e->subjects[id];
		if (st->win.cur_slice < e->cur_slice)
			advance_one(e, st, now);
		row_window(e, id, st, now, &out[i - from]);
	}
	lanes_give_all(e);
	return end;
}

static void rows_done(struct tally_engine *e, bool *held)
{
	if (*held)
		lanes_give_all(e);
	*held = false;
}

static int lanes_init(struct tally_engine *e)
{
	uint32_t n = e->seg->table_size;

	if (!e->nlanes)
		return 0;
	if (!(e->wsg = calloc(LANE_GROUP, sizeof(e->wsg[0]))) ||
	    !(e->job.slow = calloc(LANE_GROUP, sizeof(e->job.slow[0]))))
		return -ENOMEM;
	pthread_mutex_init(&e->job.lock, NULL);
	pthread_cond_init(&e->job.start, NULL);
	pthread_cond_init(&e->job.done, NULL);
	e->job.ready = true;
	if (!(e->lanes = aligned_alloc(_Alignof(struct lane), e->nlanes * sizeof(e->lanes[0]))))
		return -ENOMEM;
	memset(e->lanes, 0, e->nlanes * sizeof(e->lanes[0]));
	for (uint32_t k = 0; k < e->nlanes; k++) {
		struct lane *l = &e->lanes[k];
		l->e = e;
		l->index = k;
		pthread_mutex_init(&l->lock, NULL);
		l->cur_slice = l->walked_slice = tally__mono_ns() / e->cfg.slice_ns;
		l->parts = calloc(n, sizeof(l->parts[0]));
		l->pf_counts = calloc(n, sizeof(l->pf_counts[0]));
		l->active = calloc(n, sizeof(l->active[0]));
		l->fresh = calloc(n, sizeof(l->fresh[0]));
		l->fwd = calloc(LANE_FWD_CAP, sizeof(l->fwd[0]));
		if (!l->parts || !l->pf_counts || !l->active || !l->fresh || !l->fwd)
			return -ENOMEM;
	}
	return 0;
}

static void lanes_free(struct tally_engine *e)
{
	for (uint32_t k = 0; e->lanes && k < e->nlanes; k++) {
		struct lane *l = &e->lanes[k];
		for (uint32_t i = 0; i < l->nactive; i++)
			part_free(l->parts[l->active[i]]);
		free(l->parts);
		free(l->pf_counts);
		free(l->active);
		free(l->fresh);
		free(l->fwd);
		pthread_mutex_destroy(&l->lock);
	}
	if (e->job.ready) {
		pthread_mutex_destroy(&e->job.lock);
		pthread_cond_destroy(&e->job.start);
		pthread_cond_destroy(&e->job.done);
	}
	free(e->lanes);
	free(e->wsg);
	free(e->job.slow);
}

/* ---- publish -------------------------------------------------------------- */

static void fill_stats(struct tally_subject_stats *o, uint32_t id, const struct tally__window_stats *w,
		       uint64_t now, uint64_t window_ns)
{
	o->id = id;
	o->has_data = w->count > 0 && w->has_quantiles;
	o->count = w->count;
	o->sum = w->sum;
	o->mean = w->mean;
	o->rate = w->rate;
	o->min_ns = o->has_data ? w->min : 0;
	o->max_ns = o->has_data ? w->max : 0;
	o->p50_ns = o->has_data ? w->p50 : 0;
	o->p90_ns = o->has_data ? w->p90 : 0;
	o->p95_ns = o->has_data ? w->p95 : 0;
	o->p99_ns = o->has_data ? w->p99 : 0;
	o->p999_ns = o->has_data ? w->p999 : 0;
	o->total_count = w->total_count;
	o->total_sum = w->total_sum;
	o->window_ns = window_ns;
	o->published_ns = now;
}

/* ---- pending and verdicts ------------------------------------------------------ */

/* Read every used pending entry once per publish (the poller writes
 * them). An entry that cannot be read this time (its writer is mid-write,
 * or the copy read is torn or invalid) keeps its last good copy: its age
 * (now - last_ok_ns) goes on growing, so the stale policy and the dwell
 * judge it as they would any cached value. Only an entry read as unused
 * is dropped. */
static void pending_gather(struct tally_engine *e)
{
	struct tally_segment *seg = e->seg;
	const void *sec = tally__seg_section(seg, &seg->pending);
	struct tally__pending_view v;
	uint64_t kept = 0;
	int failed = 0;

	e->npviews = 0;
	memset(e->pmatch, 0, seg->pending_cap * sizeof(e->pmatch[0]));
	for (uint32_t i = 0; i < seg->pending_cap; i++) {
		if ((i & 63) == 63)
			publish_yield(e, e->publish_now);
		/* a few entries held by a writer cost full retries; past that
		 * (a scribbled table) each gets two, so a publish stays short */
		int rc = tally__pending_read_entry_cap(sec, seg->pending.size, seg->pending_cap, i, &v,
						       failed < 4 ? TALLY__PENDING_READ_TRIES : 2);
		failed += rc != 0 && rc != -ENOENT;
		if (rc == 0) {
			e->pviews[i] = v;
			e->pvalid[i] = 1;
			e->phash[i] = tally__jsack_consumer_hash(v.stream, strlen(v.stream), v.consumer,
								 strlen(v.consumer));
		} else if (rc == -ENOENT) {
			e->pvalid[i] = 0;
		} else if (e->pvalid[i]) {
			kept++;
			/* what readers see: not refreshed this time */
			if (e->pviews[i].source == TALLY__PENDING_LIVE)
				e->pviews[i].source = TALLY__PENDING_CACHED;
		}
		if (e->pvalid[i])
			e->pused[e->npviews++] = i;
	}
	if (kept)
		atomic_fetch_add_explicit(&e->pending_kept, kept, memory_order_relaxed);
}

static uint32_t public_source(uint32_t s, uint32_t matched)
{
	if (!matched)
		return TALLY_PENDING_NONE;
	switch (s) {
	case TALLY__PENDING_LIVE: return TALLY_PENDING_LIVE;
	case TALLY__PENDING_CACHED: return TALLY_PENDING_CACHED;
	case TALLY__PENDING_GONE: return TALLY_PENDING_GONE;
	case TALLY__PENDING_NOTFOUND: return TALLY_PENDING_NOT_FOUND;
	default: return TALLY_PENDING_NEVER;
	}
}

/* ---- the pending map (see the header) ----------------------------------------- */

static const char *view_pattern(const struct tally__pending_view *v)
{
	return v->map[0] ? v->map : v->filter;
}

static bool erow_append(struct tally_engine *e, uint32_t i, uint32_t row)
{
	if (e->elen[i] == e->ecap[i]) {
		uint32_t cap = e->ecap[i] ? 2 * e->ecap[i] : 4;
		uint32_t *p = realloc(e->erows[i], (size_t)cap * sizeof(*p));
		if (!p)
			return false;
		e->erows[i] = p;
		e->ecap[i] = cap;
	}
	e->erows[i][e->elen[i]++] = row;
	return true;
}

/* Append the rows from .. to-1 that entry i's pattern matches. */
static bool erow_match(struct tally_engine *e, uint32_t i, uint32_t from, uint32_t to, uint64_t now)
{
	const char *pat = e->epat[i];

	if (!pat[0])
		return true; /* no pattern: matches nothing */
	for (uint32_t r = from; r < to; r++) {
		if ((r & 63) == 63)
			publish_yield(e, now);
		if (tally__subject_match(pat, e->subjects[e->active[r]]->name) && !erow_append(e, i, r))
			return false;
	}
	return true;
}

/* Bring the map up to date with this publish's views and its first nrows
 * rows, then invert it. On ENOMEM pm_ok stays false (the full scan) and
 * the entries not done are done again next time. */
static void pmap_update(struct tally_engine *e, uint32_t nrows, uint64_t now)
{
	uint32_t cap = e->seg->pending_cap;
	bool ok = true;

	e->pm_ok = false;
	/* entries that went, appeared or changed their pattern: against the old rows */
	for (uint32_t i = 0; i < cap; i++) {
		if (!e->pvalid[i]) {
			e->emapped[i] = 0;
			continue;
		}
		const char *pat = view_pattern(&e->pviews[i]);
		if (e->emapped[i] && !strcmp(e->epat[i], pat))
			continue;
		snprintf(e->epat[i], sizeof(e->epat[i]), "%s", pat);
		e->elen[i] = 0;
		e->emapped[i] = erow_match(e, i, 0, e->pm_rows, now);
		ok &= e->emapped[i];
	}
	/* new rows: against every entry */
	if (ok && nrows > e->pm_rows) {
		for (uint32_t k = 0; k < e->npviews && ok; k++) {
			uint32_t i = e->pused[k];
			ok = erow_match(e, i, e->pm_rows, nrows, now);
		}
		if (!ok) { /* some lists have the new rows, some not: remake all next time */
			memset(e->emapped, 0, cap * sizeof(e->emapped[0]));
			return;
		}
		e->pm_rows = nrows;
	}
	if (!ok)
		return;
	/* invert: rstart by counting, then fill in ascending entry order */
	size_t total = 0;
	memset(e->rstart, 0, ((size_t)nrows + 1) * sizeof(e->rstart[0]));
	for (uint32_t k = 0; k < e->npviews; k++) {
		uint32_t i = e->pused[k];
		for (uint32_t j = 0; j < e->elen[i]; j++)
			e->rstart[e->erows[i][j] + 1]++;
		total += e->elen[i];
	}
	if (total > e->ridx_cap) {
		uint32_t *p = realloc(e->ridx, total * sizeof(*p));
		if (!p)
			return;
		e->ridx = p;
		e->ridx_cap = (uint32_t)total;
	}
	for (uint32_t r = 0; r < nrows; r++)
		e->rstart[r + 1] += e->rstart[r];
	/* rstart[r] is used as the fill cursor, then restored from rstart[r+1] */
	for (uint32_t k = 0; k < e->npviews; k++) {
		uint32_t i = e->pused[k];
		for (uint32_t j = 0; j < e->elen[i]; j++)
			e->ridx[e->rstart[e->erows[i][j]]++] = i;
	}
	for (uint32_t r = nrows; r > 0; r--)
		e->rstart[r] = e->rstart[r - 1];
	e->rstart[0] = 0;
	e->pm_ok = true;
}

/* The subject's threshold rule, refreshed when the thresholds changed. */
static const struct tally_threshold_rule *rule_of(struct tally_engine *e, struct subject_state *st)
{
	if (st->rule_gen != e->thresholds_gen) {
		st->rule = tally_thresholds_match(e->thresholds, st->name, NULL);
		st->rule_no = tally__thresholds_index(e->thresholds, st->rule) + 1;
		st->rule_gen = e->thresholds_gen;
	}
	return st->rule;
}

/* Backlog of the consumers whose filter (or mapped pattern) matches,
 * judged entry by entry against the rule's stale_after_ms (pending.h):
 * only the best tier present decides, so a stale or deleted consumer does
 * not make the subject stale beside a live one. row is the row's index,
 * for pending_mark_shared. */
static void pending_of(struct tally_engine *e, struct subject_state *st, uint32_t row, uint64_t now,
		       struct tally_subject_stats *o)
{
	const struct tally__pending_policy pol = {
		.include_ack_pending = e->cfg.pending_include_ack,
		.stale_after_ns = (uint64_t)rule_of(e, st)->stale_after_ms * 1000000u,
	};
	struct tally__pending_result r = TALLY__PENDING_RESULT_INIT;
	const struct wait_series *w = st->wait;
	bool ack = w && w->ack_ns && (!pol.stale_after_ns || now - w->ack_ns <= pol.stale_after_ns);
	struct tally__pending_view acked;

	/* the map's entries for this row, already matched; or, without a
	 * map this time, every entry, matched here */
	const uint32_t *cand = e->pm_ok ? e->ridx + e->rstart[row] : e->pused;
	uint32_t ncand = e->pm_ok ? e->rstart[row + 1] - e->rstart[row] : e->npviews;

	for (uint32_t i = 0; i < ncand; i++) {
		uint32_t idx = cand[i];
		const struct tally__pending_view *v = &e->pviews[idx];
		const char *pattern = view_pattern(v);
		if (e->pm_ok || (pattern[0] && tally__subject_match(pattern, st->name))) {
			if (ack && v->kind == TALLY__PENDING_CONSUMER && e->phash[idx] == w->ack_hash) {
				ack = false; /* this consumer's poll; the sample stands in when newer */
				if (w->ack_ns > v->last_ok_ns) {
					acked = *v;
					acked.num_pending = w->ack_pending;
					acked.last_ok_ns = w->ack_ns;
					acked.source = TALLY__PENDING_LIVE;
					v = &acked;
				}
			}
			tally__pending_combine(&r, v, idx, &pol, now);
			/* a split consumer gives nothing itself: never the shared one */
			if (v->kind != TALLY__PENDING_SPLIT)
				e->pmatch[idx]++;
		}
	}
	if (ack) { /* a consumer the poller does not watch: its sample alone, while fresh */
		memset(&acked, 0, sizeof(acked));
		acked.source = TALLY__PENDING_LIVE;
		acked.kind = TALLY__PENDING_CONSUMER;
		acked.num_pending = w->ack_pending;
		acked.last_ok_ns = w->ack_ns;
		tally__pending_combine(&r, &acked, UINT32_MAX, &pol, now);
	}
	o->pending = r.backlog;
	o->pending_consumers = r.counted;
	o->pending_source = public_source(r.source, r.matched);
	o->pending_age_ns = r.counted ? r.oldest_age_ns : 0;
	o->pending_shared = false;
	e->ptop[row] = r.top;
	o->pending_entry = r.top != UINT32_MAX ? r.top + 1 : 0;
}

/* After every row's pending_of: a row whose backlog comes from a consumer
 * that matched more than one row shares that backlog (pending.h). */
static void pending_mark_shared(struct tally_engine *e, struct snap *sn)
{
	for (uint32_t i = 0; i < sn->nrows; i++)
		if (e->ptop[i] != UINT32_MAX && e->pmatch[e->ptop[i]] > 1)
			sn->rows[i].pending_shared = true;
}

/* The wait series' stats and CoDel state into the row. */
static void wait_fill(struct tally_engine *e, struct subject_state *st, uint64_t now,
		      struct tally_subject_stats *o)
{
	struct wait_series *w = st->wait;
	struct tally__window_stats ws;

	/* the row is not zeroed (snap_alloc): every field is written here */
	o->has_wait = o->codel_valid = o->codel_overloaded = false;
	o->wait_count = o->wait_p50_ns = o->wait_p95_ns = o->wait_p99_ns = o->wait_skewed = o->wait_min_ns = 0;
	if (!w)
		return;
	tally__window_stats(&w->win, now, &ws);
	codel_tick(w, rule_of(e, st), now);
	o->has_wait = ws.count > 0 && ws.has_quantiles;
	o->wait_count = ws.count;
	o->wait_p50_ns = o->has_wait ? ws.p50 : 0;
	o->wait_p95_ns = o->has_wait ? ws.p95 : 0;
	o->wait_p99_ns = o->has_wait ? ws.p99 : 0;
	o->wait_skewed = w->skewed;
	o->codel_valid = w->last_valid;
	o->codel_overloaded = w->last_valid && w->overloaded;
	o->wait_min_ns = w->last_valid ? w->last_min : 0;
}

static void judge(struct tally_engine *e, struct subject_state *st, uint64_t now,
		  struct tally_subject_stats *o)
{
	const struct tally_threshold_rule *rule = rule_of(e, st);
	struct tally__verdict_input in = {
		.count = o->count, .total_count = o->total_count, .p95_ns = o->p95_ns, .rate = o->rate,
		.pending_consumers = o->pending_consumers, .pending_source = o->pending_source,
		.pending = o->pending, .pending_age_ns = o->pending_age_ns,
		.wait_count = o->wait_count, .wait_p95_ns = o->wait_p95_ns, .wait_min_ns = o->wait_min_ns,
		.codel_valid = o->codel_valid, .codel_overloaded = o->codel_overloaded,
	};
	struct tally__verdict_out out;
	tally__verdict_update(&st->vs, rule, &in, now, &out);
	o->rule = st->rule_no;
	o->rules_gen = (uint32_t)e->thresholds_gen;
	o->verdict = out.verdict;
	o->reasons = out.reasons;
	o->verdict_since_ns = out.since_ns;
	o->retry_after_ms = out.retry_after_ms;
	o->pressure = out.pressure;
	o->shed_probability = out.shed_probability;
}

/* ---- subjects known before their first sample (see the header) ---------- */

/* name, when it is a literal subject: interned (owner) and given its state. */
static void subject_known(struct tally_engine *e, const char *name, uint64_t now)
{
	tally_subject_t id;

	if (!name[0] || tally__subject_check(name, strlen(name), false, NULL, 0) != 0)
		return; /* a wildcard pattern (or nothing): names no one subject */
	if (tally_subject_intern(e->seg, name, &id) != 0 || id >= e->seg->table_size)
		return; /* table full, or an entry held up: the next reap tries again */
	if (!e->subjects[id])
		subject_new(e, id, now);
}

static void known_from_thresholds(struct tally_engine *e, uint64_t now)
{
	size_t n = tally__thresholds_count(e->thresholds);

	for (size_t i = 0; i < n; i++)
		subject_known(e, tally__thresholds_pattern(e->thresholds, i), now);
}

/* From the pending views of the last publish. */
static void known_from_pending(struct tally_engine *e, uint64_t now)
{
	for (uint32_t i = 0; i < e->npviews; i++) {
		const struct tally__pending_view *v = &e->pviews[e->pused[i]];
		subject_known(e, v->map[0] ? v->map : v->filter, now);
	}
}

/* Every READY entry without state gets one; skipped while the table has
 * not changed since the last complete scan. */
static void known_from_table(struct tally_engine *e, uint64_t now)
{
	struct tally_segment *seg = e->seg;
	uint32_t used = atomic_load_explicit(&seg->hdr->subjects_used, memory_order_relaxed);
	bool claimed = false;

	if (used == e->scan_used && !e->scan_again)
		return;
	for (uint32_t id = 0; id < seg->table_size; id++) {
		if (e->subjects[id])
			continue;
		uint32_t st = atomic_load_explicit(&tally__seg_subject(seg, id)->state, memory_order_acquire);
		if (st == TALLY__SUBJ_READY)
			subject_new(e, id, now);
		else if (st == TALLY__SUBJ_CLAIMED)
			claimed = true;
	}
	e->scan_used = used;
	e->scan_again = claimed;
}

static void subjects_discover(struct tally_engine *e, uint64_t now)
{
	known_from_pending(e, now);
	known_from_table(e, now);
}

/* The set in force, into the segment's rules section (an owner whose
 * segment has none, never: tally__segment sizes it for every new one). */
static void rules_publish(struct tally_engine *e)
{
	if (e->seg->rules.size)
		tally__rules_write(tally__seg_section(e->seg, &e->seg->rules), e->thresholds, e->thresholds_gen);
}

static void thresholds_pickup(struct tally_engine *e, uint64_t now)
{
	struct tally_thresholds *t = atomic_exchange(&e->next_thresholds, NULL);

	if (!t)
		return;
	tally_thresholds_free(&e->thresholds);
	e->thresholds = t;
	e->thresholds_gen++;
	rules_publish(e);
	known_from_thresholds(e, now);
}

static void latch_fill(struct tally__snap_entry *dst, const struct tally_subject_stats *s, uint32_t top)
{
	uint64_t w[TALLY__SW_WORDS] = { 0 };

	w[TALLY__SW_FLAGS] = TALLY__SF_PRESENT | (s->has_data ? TALLY__SF_QUANTILES : 0) |
			     (s->pending_shared ? TALLY__SF_PENDING_SHARED : 0) |
			     (s->has_wait ? TALLY__SF_WAIT : 0);
	w[TALLY__SW_COUNT] = s->count;
	w[TALLY__SW_SUM] = s->sum;
	w[TALLY__SW_MIN] = s->min_ns;
	w[TALLY__SW_MAX] = s->max_ns;
	w[TALLY__SW_P50] = s->p50_ns;
	w[TALLY__SW_P90] = s->p90_ns;
	w[TALLY__SW_P95] = s->p95_ns;
	w[TALLY__SW_P99] = s->p99_ns;
	w[TALLY__SW_P999] = s->p999_ns;
	w[TALLY__SW_RATE_MILLI] = (uint64_t)(s->rate * 1000.0 + 0.5);
	w[TALLY__SW_TOTAL_COUNT] = s->total_count;
	w[TALLY__SW_TOTAL_SUM] = s->total_sum;
	w[TALLY__SW_PENDING] = s->pending;
	w[TALLY__SW_PENDING_AGE] = s->pending_age_ns;
	w[TALLY__SW_VERDICT] = (uint64_t)s->verdict | (uint64_t)(s->reasons & 0xff) << 8 |
			       (uint64_t)(s->pending_source & 0xff) << 16 | (uint64_t)s->pending_consumers << 32;
	w[TALLY__SW_VERDICT_SINCE] = s->verdict_since_ns;
	w[TALLY__SW_RETRY_AFTER] = s->retry_after_ms;
	w[TALLY__SW_DECIDED_P95] = s->p95_ns;
	w[TALLY__SW_DECIDED_PENDING] = s->pending;
	w[TALLY__SW_PENDING_ENTRY] = top == UINT32_MAX ? 0 : (uint64_t)top + 1;
	w[TALLY__SW_WAIT_COUNT] = s->wait_count;
	w[TALLY__SW_WAIT_SKEWED] = s->wait_skewed;
	w[TALLY__SW_WAIT_P50] = s->wait_p50_ns;
	w[TALLY__SW_WAIT_P95] = s->wait_p95_ns;
	w[TALLY__SW_WAIT_P99] = s->wait_p99_ns;
	w[TALLY__SW_WAIT_MIN] = s->wait_min_ns;
	w[TALLY__SW_CODEL] = (s->codel_valid ? TALLY__SC_VALID : 0) |
			     (s->codel_overloaded ? TALLY__SC_OVERLOADED : 0);
	w[TALLY__SW_PRESSURE_PPM] = (uint64_t)(s->pressure * TALLY__PPM + 0.5);
	w[TALLY__SW_SHED_PPM] = (uint64_t)(s->shed_probability * TALLY__PPM + 0.5);
	w[TALLY__SW_RULE] = s->rule ? (uint64_t)s->rules_gen << 32 | s->rule : 0;
	for (int i = 0; i < TALLY__SW_WORDS; i++)
		tally__snapshot_store(&dst->w[i], w[i]);
}

static void latch_publish(struct tally_engine *e, const struct snap *sn, uint64_t now)
{
	for (int half = 0; half < 2; half++) {
		uint32_t c = tally__snapshot_write_begin(&e->latch);
		struct tally__snap_meta *m = &e->latch.hdr->meta[c];
		for (uint32_t i = 0; i < sn->nrows; i++) {
			if ((i & 255) == 255)
				publish_yield(e, now);
			latch_fill(&e->latch.copies[c][e->active[i]], &sn->rows[i], e->ptop[i]);
		}
		tally__snapshot_store(&m->published_mono_ns, now);
		tally__snapshot_store(&m->published_real_ns, tally__real_ns());
		tally__snapshot_store(&m->publish_count, atomic_load(&e->publishes) + 1);
		tally__snapshot_store(&m->subjects_present, sn->nrows);
		tally__snapshot_store(&m->window_ns, e->cfg.window_ns);
		tally__snapshot_store(&m->reserved[0], (uint64_t)e->cfg.publish_interval_ms * 1000000u);
	}
}

/* The block that holds head. Not liburcu's caa_container_of(): its cast
 * from char * trips clang's -Wcast-align; through void * it does not (a
 * struct's member minus its offset is the struct, aligned as it was). */
static void *block_of(struct rcu_head *head, size_t offset)
{
	return (char *)head - offset;
}

static void free_rcu_snap(struct rcu_head *head)
{
	free(block_of(head, offsetof(struct snap, rcu)));
}

/* A block and the packs freed with it. */
static void shared_free(struct shared *b)
{
	if (!b)
		return;
	for (struct tally__export_pack *pk = b->free_with, *next; pk; pk = next) {
		next = pk->retire_next;
		free(pk);
	}
	free(b);
}

static void free_rcu_shared(struct rcu_head *head)
{
	shared_free(block_of(head, offsetof(struct shared, rcu)));
}

/* A block of n uint64 entries and extra bytes after them. */
static struct shared *shared_new(uint32_t n, size_t extra)
{
	struct shared *b = malloc(sizeof(*b) + (size_t)n * sizeof(uint64_t) + extra);

	if (b) {
		b->n = n;
		b->free_with = NULL;
	}
	return b;
}

/* The packs a block gave up handed to a newer one (from's are freed with to). */
static void shared_pass_packs(struct shared *from, struct shared *to)
{
	while (from->free_with) {
		struct tally__export_pack *pk = from->free_with;
		from->free_with = pk->retire_next;
		pk->retire_next = to->free_with;
		to->free_with = pk;
	}
}

/* Install b as *slot. The block it replaces is still reachable through
 * the current snapshot, so it is retired (call_rcu) only once the next
 * snapshot is published (retire_shared). */
static void shared_swap(struct tally_engine *e, int which, struct shared **slot, struct shared *b)
{
	if (e->retiring[which]) {
		/* a publish failed after the last swap: never published, but an
		 * older block may show the packs it was to free */
		shared_pass_packs(*slot, b);
		free(*slot);
	} else
		e->retiring[which] = *slot;
	*slot = b;
}

static void retire_shared(struct tally_engine *e)
{
	for (int i = 0; i < 2; i++)
		if (e->retiring[i]) {
			call_rcu(&e->retiring[i]->rcu, free_rcu_shared);
			e->retiring[i] = NULL;
		}
}

/* Subject id's export buckets in row, *count, *sum: thread 0's and its
 * drain threads' parts' merged, or NULL when there is nothing to merge
 * and they are packed (the row is then st's pack itself). */
static const uint64_t *bucket_merged(const struct tally_engine *e, uint32_t id, const struct subject_state *st,
				     uint64_t *row, uint64_t *count, uint64_t *sum)
{
	bool parts = false;

	for (uint32_t k = 0; k < e->nlanes; k++)
		parts |= e->lanes[k].parts[id] != NULL;
	if (!parts) {
		if (!st->exp.le)
			return NULL;
		*count = st->exp.count;
		*sum = st->exp.sum;
		return st->exp.le;
	}
	memset(row, 0, e->nedges * sizeof(uint64_t));
	*count = *sum = 0;
	exported_add(e, row, &st->exp, count, sum);
	for (uint32_t k = 0; k < e->nlanes; k++) {
		const struct part *p = e->lanes[k].parts[id];
		if (p)
			exported_add(e, row, &p->exp, count, sum);
	}
	return row;
}

/* A bucket block's room for one pack of len bytes (8-aligned, for the next). */
static size_t pack_room(size_t len)
{
	return (offsetof(struct tally__export_pack, bytes) + len + 7u) & ~(size_t)7u;
}

/* Grow the bucket block under construction to hold need more bytes of
 * packs after used; 0 or -ENOMEM (*bp unchanged). */
static int bucket_grow(struct tally_engine *e, struct shared **bp, size_t used, size_t need)
{
	size_t room = e->bucket_room * 2 > used + need ? e->bucket_room * 2 : used + need;
	struct shared *b = realloc(*bp, sizeof(**bp) + (size_t)(*bp)->n * sizeof(uint64_t) + room);

	if (!b)
		return -ENOMEM;
	e->bucket_room = room;
	*bp = e->building = b;
	return 0;
}

/* The export buckets of row i + MERGE_PF_FAR's parts (where they are)
 * and of row i + MERGE_PF_NEAR's (their counts), as merge_prefetch. */
static void bucket_prefetch(const struct tally_engine *e, uint32_t i, uint32_t nrows)
{
	for (uint32_t k = 0; k < e->nlanes; k++) {
		const struct part *p;
		if (i + MERGE_PF_FAR < nrows && (p = e->lanes[k].parts[e->active[i + MERGE_PF_FAR]]))
			__builtin_prefetch(&p->exp, 0);
		if (i + MERGE_PF_NEAR < nrows && (p = e->lanes[k].parts[e->active[i + MERGE_PF_NEAR]]) &&
		    p->exp.le)
			prefetch_lines(p->exp.le, e->nedges * sizeof(uint64_t));
	}
}

/* Rebuild the shared row map and buckets when they changed. 0 or -ENOMEM. */
static int shared_refresh(struct tally_engine *e)
{
	if (e->rows_changed || !e->row_block) {
		struct shared *b = shared_new((e->seg->table_size + 1) / 2, 0);
		if (!b)
			return -ENOMEM;
		memcpy(b->data, e->row_of, (size_t)e->seg->table_size * sizeof(uint32_t));
		shared_swap(e, 0, &e->row_block, b);
		e->rows_changed = false;
	}
	if (e->buckets_changed || !e->bucket_block) {
		/* Row i: a pointer to its pack (slot), packed in place after the
		 * slots (tagged 2 * offset + 1 until the block stops moving), or
		 * a sleeping subject's own pack (shown). The drains inside the
		 * loop may wake a subject whose pack an earlier slot shows: it is
		 * then freed with this block (pack_release, e->building). */
		uint32_t nrows = e->nactive; /* a drain below may add subjects: not in this block */
		size_t used = 0;
		if (!e->bucket_room)
			e->bucket_room = 4096;
		struct shared *b = shared_new(nrows, e->bucket_room);
		if (!b)
			return -ENOMEM;
		e->buckets_changed = false; /* before the drains below: a subject they add sets it again */
		e->building = b;
		bool held = false;
		int rc = 0;
		uint64_t row[TALLY__HIST_DEFAULT_NEDGES];
		for (uint32_t i = 0; i < nrows; i++) {
			rows_step(e, i, 63, &held);
			bucket_prefetch(e, i, nrows);
			uint32_t id = e->active[i];
			struct subject_state *st = e->subjects[id];
			uint64_t count, sum;
			const uint64_t *le = bucket_merged(e, id, st, row, &count, &sum);
			if (!le) {
				st->exp.pk->shown = true;
				b->data[i] = (uint64_t)(uintptr_t)st->exp.pk;
				continue;
			}
			size_t len = tally__export_packed_len(le, e->nedges, count, sum);
			if (used + pack_room(len) > e->bucket_room &&
			    (rc = bucket_grow(e, &b, used, pack_room(len))) != 0)
				break;
			struct tally__export_pack *pk = (void *)((uint8_t *)&b->data[nrows] + used);
			pk->retire_next = NULL;
			pk->shown = false;
			pk->len = (uint32_t)len;
			tally__export_put(pk->bytes, le, e->nedges, count, sum);
			b->data[i] = 2 * (uint64_t)used + 1;
			used += pack_room(len);
		}
		rows_done(e, &held);
		e->building = NULL;
		if (rc != 0) {
			/* what it was to free goes with the block before it */
			if (e->bucket_block)
				shared_pass_packs(b, e->bucket_block);
			shared_free(b);
			e->buckets_changed = true;
			return rc;
		}
		struct shared *fit = realloc(b, sizeof(*b) + (size_t)nrows * sizeof(uint64_t) + used);
		if (fit)
			b = fit; /* else the larger block serves */
		uint8_t *packs = (uint8_t *)&b->data[nrows];
		for (uint32_t i = 0; i < nrows; i++)
			if (b->data[i] & 1)
				b->data[i] = (uint64_t)(uintptr_t)(packs + (b->data[i] >> 1));
		/* room for the next block: what this one used, and some */
		e->bucket_room = used + used / 8 + 4096;
		shared_swap(e, 1, &e->bucket_block, b);
	}
	return 0;
}

/* A snapshot sized for the active subjects, rows not yet filled. */
static struct snap *snap_alloc(struct tally_engine *e, uint64_t now)
{
	uint32_t nrows = e->nactive; /* the drains inside a publish may add subjects: next time */

	if (shared_refresh(e) != 0)
		return NULL;
	struct snap *sn = malloc(sizeof(*sn) + (size_t)nrows * sizeof(sn->rows[0]));
	if (!sn)
		return NULL;
	memset(sn, 0, sizeof(*sn));
	sn->published_ns = now;
	sn->n = e->seg->table_size;
	sn->nrows = nrows;
	sn->nedges = e->nedges;
	sn->row_of = (const uint32_t *)e->row_block->data;
	sn->buckets = (const struct tally__export_pack *const *)e->bucket_block->data;
	sn->nbucket_rows = e->bucket_block->n;
	return sn;
}

/* The segment's totals since creation (shm_layout.h), from the owner's
 * own counts: stored, never read back. recorded is what was drained plus
 * what waits in the rings now (a ring whose tail ran past it counts 0). */
static void publish_totals(struct tally_engine *e, uint64_t now)
{
	struct tally_segment *seg = e->seg;
	struct tally__shm_totals *t = &seg->hdr->totals;
	/* every drain thread between batches: drained and the rings agree */
	lanes_take_all(e);
	uint64_t waiting = 0, drained = atomic_load_explicit(&e->drained, memory_order_relaxed);

	for (uint32_t i = 0; i < seg->nslots; i++) {
		struct tally__slot *s = tally__seg_slot(seg, i);
		uint64_t h = atomic_load_explicit(&s->head, memory_order_relaxed);
		uint64_t tl = atomic_load_explicit(&s->tail, memory_order_relaxed);
		if (tl - h <= seg->ring_cap)
			waiting += tl - h;
	}
	lanes_give_all(e);
	/* monotonic even if a ring's tail moves back (scribbled) */
	if (drained + waiting > e->recorded_total)
		e->recorded_total = drained + waiting;
	atomic_store_explicit(&t->recorded, e->recorded_total, memory_order_relaxed);
	atomic_store_explicit(&t->drained, drained, memory_order_relaxed);
	atomic_store_explicit(&t->dropped, seg->reap.dropped, memory_order_relaxed);
	atomic_store_explicit(&t->clamped, seg->reap.clamped, memory_order_relaxed);
	atomic_store_explicit(&t->rejected, atomic_load_explicit(&e->rejected, memory_order_relaxed),
			      memory_order_relaxed);
	atomic_store_explicit(&t->skipped, seg->reap.skipped, memory_order_relaxed);
	atomic_store_explicit(&t->updated_ns, now, memory_order_release);
}

static void publish(struct tally_engine *e, uint64_t now)
{
	struct tally__window_stats ws;

	/* before the snapshot is sized: a new threshold set may add subjects,
	 * and so may the subjects the other drain threads saw first */
	thresholds_pickup(e, now);
	if (e->nlanes)
		lanes_collect(e, now, true);
	e->publish_now = now;
	struct snap *sn = snap_alloc(e, now);

	if (!sn)
		return; /* keep the previous snapshot; try again next interval */
	pending_gather(e);
	pmap_update(e, sn->nrows, now);
	uint32_t merged_from = 0, merged_to = 0;
	for (uint32_t i = 0; i < sn->nrows; i++) {
		uint32_t id = e->active[i];
		struct subject_state *st = e->subjects[id];
		struct tally_subject_stats *row = &sn->rows[i];
		if (e->nlanes) {
			if (i == merged_to)
				merged_to = rows_merge(e, merged_from = i, sn->nrows, now, e->wsg);
			ws = e->wsg[i - merged_from];
		} else {
			if ((i & 15) == 15)
				publish_yield(e, now);
			if (st->win.cur_slice < e->cur_slice)
				advance_one(e, st, now);
			tally__window_stats(&st->win, stats_time(e, &st->win, now), &ws);
		}
		fill_stats(row, id, &ws, now, e->cfg.window_ns);
		wait_fill(e, st, now, row);
		pending_of(e, st, i, now, row);
		judge(e, st, now, row);
	}
	pending_mark_shared(e, sn);
	latch_publish(e, sn, now);
	struct snap *old = e->current;
	snap_assign(e->current, sn);
	/* Only now is nothing new reachable from what we retire. */
	if (old)
		call_rcu(&old->rcu, free_rcu_snap);
	retire_shared(e);
	publish_totals(e, now);
	atomic_store_explicit(&e->seg->hdr->owner_heartbeat_ns, now, memory_order_relaxed);
	atomic_fetch_add_explicit(&e->publishes, 1, memory_order_relaxed);
	atomic_store_explicit(&e->last_publish_ns, tally__mono_ns() - now, memory_order_relaxed);
}

/* ---- the thread ------------------------------------------------------------ */

static void reap(struct tally_engine *e, uint64_t now)
{
	struct tally__reap_stats st;

	/* a slot is freed only once drained: no drain thread mid-batch */
	lanes_take_all(e);
	tally__slots_reap(e->seg, now, &st);
	lanes_give_all(e);
	atomic_fetch_add_explicit(&e->died, st.died, memory_order_relaxed);
	atomic_fetch_add_explicit(&e->released, st.released, memory_order_relaxed);
	atomic_fetch_add_explicit(&e->claims_expired, st.claims_expired, memory_order_relaxed);
	atomic_fetch_add_explicit(&e->subjects_tombstoned, tally__subjects_reap(e->seg, now),
				  memory_order_relaxed);
}

static void tick(struct tally_engine *e, uint64_t now)
{
	advance_all(e, now, true);
	if (now >= e->next_publish) {
		publish(e, now);
		e->next_publish = now + (uint64_t)e->cfg.publish_interval_ms * 1000000u;
	}
	if (now >= e->next_reap) {
		reap(e, now);
		subjects_discover(e, now);
		e->next_reap = now + (uint64_t)e->cfg.reap_interval_ms * 1000000u;
	}
}

/* Thread 0 at stop: the lanes drain to stop too; meanwhile thread 0
 * empties their queues (a lane whose queue is full waits for it). */
static void lanes_stop(struct tally_engine *e)
{
	for (uint32_t k = 0; k < e->nlanes; k++) {
		struct lane *l = &e->lanes[k];
		if (!l->running)
			continue;
		while (!atomic_load_explicit(&l->done, memory_order_acquire)) {
			lanes_collect(e, tally__mono_ns(), false);
			sleep_us(50);
		}
		pthread_join(l->thread, NULL);
		l->running = false;
	}
	if (e->nlanes)
		lanes_collect(e, tally__mono_ns(), true);
}

static bool lanes_news(struct tally_engine *e)
{
	for (uint32_t k = 0; k < e->nlanes; k++)
		if (atomic_load_explicit(&e->lanes[k].news, memory_order_relaxed))
			return true;
	return false;
}

/* Thread 0 with drain threads drains nothing, so it need not wake every
 * drain interval to find nothing: after the drain interval (which bounds
 * how often news can wake it) it sleeps on wake until a lane has news
 * (lane_news), its next tick (slice, publish, reap) or the stop. Each
 * wake-up of a third thread on the drain threads' cores takes one of them
 * off its core. */
static void agg_sleep(struct tally_engine *e, uint64_t now)
{
	uint64_t until = (e->cur_slice + 1) * e->cfg.slice_ns;

	sleep_us(e->cfg.drain_interval_us);
	until = e->next_publish < until ? e->next_publish : until;
	until = e->next_reap < until ? e->next_reap : until;
	if (until <= now)
		return;
	struct timespec ts = { (time_t)(until / 1000000000u), (long)(until % 1000000000u) };
	pthread_mutex_lock(&e->wake_lock);
	while (!atomic_load_explicit(&e->stop, memory_order_acquire) && !lanes_news(e) &&
	       pthread_cond_timedwait(&e->wake, &e->wake_lock, &ts) != ETIMEDOUT)
		;
	pthread_mutex_unlock(&e->wake_lock);
}

static void *aggregator_main(void *arg)
{
	struct tally_engine *e = arg;
	uint64_t now = tally__mono_ns();

	pthread_setname_np(pthread_self(), "tally-agg");
	e->cur_slice = e->walked_slice = now / e->cfg.slice_ns;
	drain_all(e, now);
	tick(e, now);
	pthread_mutex_lock(&e->start_lock);
	e->started = true;
	pthread_cond_signal(&e->start_cond);
	pthread_mutex_unlock(&e->start_lock);

	while (!atomic_load_explicit(&e->stop, memory_order_acquire)) {
		now = tally__mono_ns();
		advance_all(e, now, true);
		uint64_t got = drain_all(e, now);
		tick(e, now);
		if (got == 0) {
			stall_end(e); /* what tick took counts; the sleep does not */
			e->stall_from = 0;
			if (e->nlanes)
				agg_sleep(e, now);
			else
				sleep_us(e->cfg.drain_interval_us);
		}
	}
	now = tally__mono_ns();
	drain_to_stop(e, now);
	lanes_stop(e);
	now = tally__mono_ns();
	advance_all(e, now, false);
	publish(e, now);
	return NULL;
}

static void engine_free(struct tally_engine *e)
{
	struct tally_thresholds *next = atomic_exchange(&e->next_thresholds, NULL);

	for (uint32_t i = 0; i < e->nactive; i++) {
		tally__window_destroy(&e->subjects[e->active[i]]->win);
		if (e->subjects[e->active[i]]->wait)
			tally__window_destroy(&e->subjects[e->active[i]]->wait->win);
		free(e->subjects[e->active[i]]->wait);
		exported_free(&e->subjects[e->active[i]]->exp);
		free(e->subjects[e->active[i]]->name);
		free_line(e->subjects[e->active[i]], sizeof(struct subject_state),
			  e->subjects[e->active[i]]->in_arena);
	}
	lanes_free(e);
	tally_thresholds_free(&next);
	tally_thresholds_free(&e->thresholds);
	free(e->subjects);
	free(e->pf_counts);
	free(e->active);
	free(e->row_of);
	free(e->pviews);
	free(e->pvalid);
	free(e->pused);
	free(e->pmatch);
	free(e->ptop);
	free(e->phash);
	for (uint32_t i = 0; e->erows && i < e->seg->pending_cap; i++)
		free(e->erows[i]);
	free(e->erows);
	free(e->elen);
	free(e->ecap);
	free(e->epat);
	free(e->emapped);
	free(e->rstart);
	free(e->ridx);
	pthread_mutex_destroy(&e->wake_lock);
	pthread_cond_destroy(&e->wake);
	e->magic = 0;
	free(e);
}

int tally__engine_new(struct tally_segment *seg, const struct tally_engine_config *cfg,
		      struct tally_engine **out)
{
	struct tally_engine_config defaults;
	struct tally_engine *e;
	int rc;

	tally__clear_errmsg();
	*out = NULL;
	if (!cfg) {
		tally_engine_config_init(&defaults);
		cfg = &defaults;
	}
	if ((rc = config_check(cfg)))
		return rc;
	if (!seg->is_owner)
		return tally__fail(-EPERM, "segment \"%s\": only its owner (the process that created it) "
				   "can run the engine", seg->name);
	if (seg->engine_attached)
		return tally__fail(-EBUSY, "segment \"%s\" already has an engine", seg->name);
	if (!(e = calloc(1, sizeof(*e))))
		return -ENOMEM;
	e->magic = TALLY__ENGINE_MAGIC;
	e->seg = seg;
	pthread_mutex_init(&e->wake_lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&e->wake, &ca);
	pthread_condattr_destroy(&ca);
	e->cfg = *cfg;
	e->nlanes = cfg->drain_threads > 1 ? cfg->drain_threads : 0;
	e->own_slots = e->nlanes ? 0 : seg->nslots;
	e->wcfg = (struct tally__window_config){ cfg->slice_ns, cfg->window_ns, seg->max_value_ns };
	e->subjects = calloc(seg->table_size, sizeof(e->subjects[0]));
	e->pf_counts = calloc(seg->table_size, sizeof(e->pf_counts[0]));
	e->active = calloc(seg->table_size, sizeof(e->active[0]));
	e->row_of = calloc(seg->table_size, sizeof(e->row_of[0]));
	e->pviews = calloc(seg->pending_cap, sizeof(e->pviews[0]));
	e->pvalid = calloc(seg->pending_cap, sizeof(e->pvalid[0]));
	e->pused = calloc(seg->pending_cap, sizeof(e->pused[0]));
	e->pmatch = calloc(seg->pending_cap, sizeof(e->pmatch[0]));
	e->ptop = calloc(seg->table_size, sizeof(e->ptop[0]));
	e->phash = calloc(seg->pending_cap, sizeof(e->phash[0]));
	e->erows = calloc(seg->pending_cap, sizeof(e->erows[0]));
	e->elen = calloc(seg->pending_cap, sizeof(e->elen[0]));
	e->ecap = calloc(seg->pending_cap, sizeof(e->ecap[0]));
	e->epat = calloc(seg->pending_cap, sizeof(e->epat[0]));
	e->emapped = calloc(seg->pending_cap, sizeof(e->emapped[0]));
	e->rstart = calloc((size_t)seg->table_size + 1, sizeof(e->rstart[0]));
	e->thresholds = tally_thresholds_new();
	e->thresholds_gen = 1;
	e->nedges = (uint32_t)tally__hist_default_edges(e->edges, TALLY__HIST_DEFAULT_NEDGES);
	if (!e->subjects || !e->pf_counts || !e->active || !e->row_of || !e->pviews || !e->pvalid || !e->pused ||
	    !e->pmatch || !e->ptop || !e->phash || !e->erows || !e->elen || !e->ecap || !e->epat ||
	    !e->emapped || !e->rstart ||
	    !e->thresholds || lanes_init(e) != 0) {
		engine_free(e);
		return -ENOMEM;
	}
	rules_publish(e);
	tally__snapshot_writer_init(&e->latch, tally__seg_section(seg, &seg->snapshot), seg->table_size);
	/* Restart hygiene: rows an earlier engine on this segment published
	 * describe windows this one does not have. Readers must not get them
	 * with this engine's fresh publish times: clear both copies first. */
	tally__snapshot_reset(&e->latch);
	e->cur_slice = e->walked_slice = tally__mono_ns() / cfg->slice_ns;
	seg->engine_attached = true;
	*out = e;
	return 0;
}

/* Without threads, the lanes' passes run here, before thread 0's. */
static uint64_t lanes_pass(struct tally_engine *e, uint64_t now)
{
	uint64_t got = 0;

	for (uint32_t k = 0; k < e->nlanes; k++)
		got += lane_pass(&e->lanes[k], now);
	return got;
}

uint64_t tally__engine_ingest(struct tally_engine *e, uint64_t now)
{
	advance_all(e, now, false);
	uint64_t got = lanes_pass(e, now);
	return got + drain_all(e, now);
}

uint64_t tally__engine_ingest_lazy(struct tally_engine *e, uint64_t now)
{
	e->cur_slice = now / e->cfg.slice_ns; /* entered, but no subject walked */
	uint64_t got = lanes_pass(e, now);
	return got + drain_all(e, now);
}

void tally__engine_hold(struct tally_engine *e, bool hold)
{
	atomic_store_explicit(&e->hold, hold, memory_order_relaxed);
}

void tally__engine_publish(struct tally_engine *e, uint64_t now)
{
	advance_all(e, now, false);
	publish(e, now);
}

uint64_t tally__engine_max_stall_ns(struct tally_engine *e, bool reset)
{
	if (reset)
		return atomic_exchange_explicit(&e->max_stall_ns, 0, memory_order_relaxed);
	return atomic_load_explicit(&e->max_stall_ns, memory_order_relaxed);
}

uint64_t tally__engine_rejected(struct tally_engine *e)
{
	return atomic_load_explicit(&e->rejected, memory_order_relaxed);
}

uint64_t tally__engine_merge_helped(struct tally_engine *e)
{
	return atomic_load_explicit(&e->merge_helped, memory_order_relaxed);
}

/* Retire what the engine published: the last snapshot once no reader
 * holds it, the row and bucket blocks and the retiring lists; then wait
 * until every call_rcu callback has run, so that nothing leaks. */
static void release_published(struct tally_engine *e)
{
	struct snap *last = e->current;

	snap_assign(e->current, NULL);
	synchronize_rcu();
	free(last);
	shared_free(e->row_block);
	shared_free(e->bucket_block);
	shared_free(e->retiring[0]);
	shared_free(e->retiring[1]);
	e->row_block = e->bucket_block = e->retiring[0] = e->retiring[1] = NULL;
	rcu_barrier();
}

void tally__engine_free(struct tally_engine **ep)
{
	if (!ep || !*ep)
		return;
	struct tally_engine *e = *ep;
	if (e->current || e->row_block) /* it published (tally__engine_publish) */
		release_published(e);
	e->seg->engine_attached = false;
	engine_free(e);
	*ep = NULL;
}

TALLY_API int tally_engine_start(struct tally_segment *seg, const struct tally_engine_config *cfg,
				 struct tally_engine **out)
{
	struct tally_engine *e;
	int rc;

	if ((rc = tally__engine_new(seg, cfg, &e)))
		return rc;
	pthread_mutex_init(&e->start_lock, NULL);
	pthread_cond_init(&e->start_cond, NULL);
	if ((rc = pthread_create(&e->thread, NULL, aggregator_main, e)) != 0) {
		tally__engine_free(&e);
		return tally__fail(-rc, "cannot start the aggregator thread: %s", strerror(rc));
	}
	pthread_mutex_lock(&e->start_lock);
	while (!e->started)
		pthread_cond_wait(&e->start_cond, &e->start_lock);
	pthread_mutex_unlock(&e->start_lock);
	for (uint32_t k = 0; k < e->nlanes; k++) {
		struct lane *l = &e->lanes[k];
		if ((rc = pthread_create(&l->thread, NULL, lane_main, l)) != 0) {
			tally_engine_stop(&e); /* thread 0 stops the lanes started */
			return tally__fail(-rc, "cannot start drain thread %u: %s", k, strerror(rc));
		}
		l->running = true;
	}
	*out = e;
	return 0;
}

TALLY_API void tally_engine_stop(struct tally_engine **ep)
{
	struct tally_engine *e = ep ? *ep : NULL;

	if (!e)
		return;
	TALLY__ASSERT(e->magic == TALLY__ENGINE_MAGIC);
	atomic_store_explicit(&e->stop, true, memory_order_release);
	pthread_mutex_lock(&e->wake_lock); /* thread 0 may sleep until its next tick (agg_sleep) */
	pthread_cond_signal(&e->wake);
	pthread_mutex_unlock(&e->wake_lock);
	pthread_join(e->thread, NULL);
	release_published(e);
	e->seg->engine_attached = false;
	pthread_mutex_destroy(&e->start_lock);
	pthread_cond_destroy(&e->start_cond);
	engine_free(e);
	*ep = NULL;
}

TALLY_API int tally_engine_read(struct tally_engine *e, tally_subject_t id,
				struct tally_subject_stats *out)
{
	int rc = -ENOENT;

	rcu_read_lock();
	struct snap *sn = snap_deref(e->current);
	uint32_t row = sn && id < sn->n ? sn->row_of[id] : 0;
	if (row && row <= sn->nrows) {
		*out = sn->rows[row - 1];
		rc = 0;
	}
	rcu_read_unlock();
	return rc;
}

TALLY_API void tally_engine_counters(struct tally_engine *e, struct tally_engine_counters *o)
{
	o->drained = atomic_load_explicit(&e->drained, memory_order_relaxed);
	o->rejected = atomic_load_explicit(&e->rejected, memory_order_relaxed);
	o->publishes = atomic_load_explicit(&e->publishes, memory_order_relaxed);
	o->last_publish_ns = atomic_load_explicit(&e->last_publish_ns, memory_order_relaxed);
	o->subjects_active = atomic_load_explicit(&e->subjects_active, memory_order_relaxed);
	o->producers_died = atomic_load_explicit(&e->died, memory_order_relaxed);
	o->producers_released = atomic_load_explicit(&e->released, memory_order_relaxed);
	o->pending_kept = atomic_load_explicit(&e->pending_kept, memory_order_relaxed);
	o->claims_expired = atomic_load_explicit(&e->claims_expired, memory_order_relaxed);
	o->subjects_tombstoned = atomic_load_explicit(&e->subjects_tombstoned, memory_order_relaxed);
	o->values_lost = atomic_load_explicit(&e->lost, memory_order_relaxed);
}

TALLY_API int tally_engine_set_thresholds(struct tally_engine *e, struct tally_thresholds **t)
{
	if (!t || !*t)
		return -EINVAL;
	struct tally_thresholds *old = atomic_exchange(&e->next_thresholds, *t);
	/* a set handed over before and not yet picked up is replaced */
	tally_thresholds_free(&old);
	*t = NULL;
	return 0;
}

TALLY_API int tally_engine_read_buckets(struct tally_engine *e, tally_subject_t id,
					struct tally_subject_buckets *out)
{
	int rc = -ENOENT;

	rcu_read_lock();
	struct snap *sn = snap_deref(e->current);
	uint32_t row = sn && id < sn->n ? sn->row_of[id] : 0;
	if (row && row <= sn->nbucket_rows) {
		const struct tally__export_pack *pk = sn->buckets[row - 1];
		uint64_t le[TALLY__HIST_DEFAULT_NEDGES] = {0}, count = 0, sum = 0;
		tally__export_add(pk->bytes, pk->len, le, sn->nedges, &count, &sum);
		out->n = sn->nedges < TALLY_BUCKETS_MAX ? sn->nedges : TALLY_BUCKETS_MAX;
		for (uint32_t k = 0; k < out->n; k++) {
			out->le_ns[k] = e->edges[k] - 1; /* counts are of values < edge */
			out->cumulative[k] = le[k];
		}
		out->count = count;
		out->sum_ns = sum;
		rc = 0;
	}
	rcu_read_unlock();
	return rc;
}
