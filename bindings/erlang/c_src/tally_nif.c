/* SPDX-License-Identifier: MIT */
/*
 * tally_nif.c: the NIF behind the Erlang module `tally`. It owns the two
 * resource types (a segment handle, a subject of that segment), the
 * record path from Erlang into libtally, the reads of published stats and
 * verdicts, and what happens to producer slots when the library is
 * loaded, upgraded and unloaded.
 *
 * Record path. tally:record/2 decodes a subject resource and an integer,
 * asks libtally for the calling scheduler thread's own producer handle
 * (tally_producer_local: a thread-local lookup; the slot is claimed on
 * the first record of each thread, normal, dirty CPU or dirty IO
 * scheduler alike) and calls the inline tally_record(). No lock, no
 * read-modify-write atomic, no allocation, never blocks. When no slot can
 * be had (every slot of the segment taken), the record is dropped and
 * counted; the thread tries again at most once a second, so a VM with
 * too few slots pays one failed claim per thread per second, not per
 * record. tally:record_jetstream/2,3 takes the same handle and hands a
 * message's ack reply subject (a binary, or an iolist flattened first) to
 * tally_record_jetstream(): the message's wait and its consumer's
 * pending, parsed from the reply, and with /3 its processing latency too,
 * in one NIF call; all of them inline on the calling scheduler, as
 * record/2 (well under a microsecond; no dirty scheduler).
 *
 * Lifetimes. A subject resource keeps its segment resource; the segment
 * is detached (tally_segment_close: every scheduler's slot for it goes
 * back, its handles are revoked) only by the segment resource's
 * destructor, when no Erlang term refers to it any more, so no NIF can be
 * using it (or by the final unload, see below). tally:close/1 marks the
 * segment closed:
 * every later use through it or its subjects raises badarg (record) or
 * returns {error, closed}; the slots go back at garbage collection.
 *
 * Upgrades. Both resource types are opened with ERL_NIF_RT_TAKEOVER, so
 * a new version of the library (the same file, or a copy at another
 * path) takes over every segment and subject: recording goes on through
 * them without a pause, and through the same slots. The registry of open
 * segments moves to the new library's private data in upgrade(); the old
 * instance's unload() then closes nothing. Without a successor (the
 * module deleted and purged) erts keeps the library until the last of
 * its resources is freed and calls unload() after that: by then every
 * segment's destructor has closed it and given its slots back; unload()
 * closes any segment still registered all the same.
 * libtally itself is linked as a shared library and pinned in memory
 * (RTLD_NODELETE): its thread-local handles and their pthread key outlive
 * any one NIF instance, and must not be unmapped under the schedulers.
 * At VM exit the process is gone and the owner's reaper takes the slots
 * back (reap interval + cool-off, after draining what they hold).
 */
#define _GNU_SOURCE /* dladdr, RTLD_NODELETE */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <erl_nif.h>
#include <tally/tally.h>

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

_Static_assert(sizeof(ErlNifUInt64) == sizeof(uint64_t), "64-bit NIF integers");

#define SEG_MAGIC 0x74736567u  /* "tseg" */
#define SUBJ_MAGIC 0x74737562u /* "tsub" */
#define REGISTRY_MAGIC 0x74726567u /* "treg" */
#define PRIV_MAGIC 0x74707276u     /* "tprv" */
/* Layout version of the structs below: an upgrade from a library with
 * another one is refused (the resources it made could not be read). */
#define LAYOUT_VERSION 1u

#define NO_SLOT_RETRY_NS 1000000000ull

struct registry;

/* A segment handle: the resource behind Seg. */
struct nif_seg {
	uint32_t magic;
	_Atomic bool closed;          /* tally:close/1, or the final unload */
	struct tally_segment *seg;    /* freed only by the destructor or the final unload */
	struct registry *reg;
	struct nif_seg *prev, *next;  /* in reg, under reg->lock */
	_Atomic uint64_t no_slot;     /* records dropped because this thread had no slot */
	_Atomic int last_attach_error;/* the error of the last failed claim, 0 none */
	uint64_t uid;                 /* unique in this VM: the thread caches' key */
	char name[TALLY_NAME_MAX + 1];
};

/* A subject of a segment: the resource behind Subj. */
struct nif_subj {
	uint32_t magic;
	tally_subject_t id;
	struct nif_seg *seg; /* kept (enif_keep_resource) */
};

/* Open segments, shared by every version of the library that takes over. */
struct registry {
	uint32_t magic, layout;
	pthread_mutex_t lock;
	struct nif_seg *head;
	uint32_t live;   /* segment resources not yet destroyed */
	_Atomic uint64_t next_uid; /* struct nif_seg uid: unique across every library
				    * instance that took these segments over (each has
				    * its own thread caches, but they share resources) */
	bool unloaded;   /* the last library instance is gone: free at live == 0 */
};

/* Private data of one library instance. */
struct priv {
	uint32_t magic, layout;
	struct registry *reg; /* shared with the instances before and after this one */
	bool handed_over;     /* a newer instance took reg over: unload closes nothing */
};

static ErlNifResourceType *seg_type, *subj_type;

static ERL_NIF_TERM atom_ok, atom_error, atom_dropped, atom_closed, atom_warn, atom_overload,
	atom_unknown, atom_no_data, atom_stale, atom_true, atom_false, atom_undefined, atom_not_ack_reply;
static ERL_NIF_TERM k_count, k_p50, k_p90, k_p95, k_p99, k_p999, k_max, k_min, k_mean, k_rate,
	k_pending, k_verdict, k_reasons, k_stale, k_total_count, k_pending_age_ms, k_pending_source,
	k_pending_shared, k_retry_after_ms, k_window_ms, k_no_slot, k_last_error, k_slot, k_state,
	k_pid, k_tid, k_samples, k_dropped, k_lost, k_alive, k_backlog, k_wait_count, k_wait_p50,
	k_wait_p95, k_wait_p99, k_wait_min, k_wait_skewed, k_codel_overloaded, k_pressure,
	k_shed_probability;

/* ---- atoms and errors -------------------------------------------------------- */

static ERL_NIF_TERM atom(ErlNifEnv *env, const char *name)
{
	ERL_NIF_TERM a;

	if (!enif_make_existing_atom(env, name, &a, ERL_NIF_LATIN1))
		a = enif_make_atom(env, name);
	return a;
}

static void make_atoms(ErlNifEnv *env)
{
	atom_ok = atom(env, "ok");
	atom_error = atom(env, "error");
	atom_dropped = atom(env, "dropped");
	atom_closed = atom(env, "closed");
	atom_warn = atom(env, "warn");
	atom_overload = atom(env, "overload");
	atom_unknown = atom(env, "unknown");
	atom_no_data = atom(env, "no_data");
	atom_stale = atom(env, "stale");
	atom_true = atom(env, "true");
	atom_false = atom(env, "false");
	atom_undefined = atom(env, "undefined");
	atom_not_ack_reply = atom(env, "not_ack_reply");
	k_count = atom(env, "count");
	k_p50 = atom(env, "p50");
	k_p90 = atom(env, "p90");
	k_p95 = atom(env, "p95");
	k_p99 = atom(env, "p99");
	k_p999 = atom(env, "p999");
	k_max = atom(env, "max");
	k_min = atom(env, "min");
	k_mean = atom(env, "mean");
	k_rate = atom(env, "rate");
	k_pending = atom(env, "pending");
	k_verdict = atom(env, "verdict");
	k_reasons = atom(env, "reasons");
	k_stale = atom(env, "stale");
	k_total_count = atom(env, "total_count");
	k_pending_age_ms = atom(env, "pending_age_ms");
	k_pending_source = atom(env, "pending_source");
	k_pending_shared = atom(env, "pending_shared");
	k_retry_after_ms = atom(env, "retry_after_ms");
	k_window_ms = atom(env, "window_ms");
	k_no_slot = atom(env, "no_slot");
	k_last_error = atom(env, "last_error");
	k_slot = atom(env, "slot");
	k_state = atom(env, "state");
	k_pid = atom(env, "os_pid");
	k_tid = atom(env, "tid");
	k_samples = atom(env, "samples");
	k_dropped = atom(env, "dropped");
	k_lost = atom(env, "lost");
	k_alive = atom(env, "alive");
	k_backlog = atom(env, "backlog");
	k_wait_count = atom(env, "wait_count");
	k_wait_p50 = atom(env, "wait_p50");
	k_wait_p95 = atom(env, "wait_p95");
	k_wait_p99 = atom(env, "wait_p99");
	k_wait_min = atom(env, "wait_min");
	k_wait_skewed = atom(env, "wait_skewed");
	k_codel_overloaded = atom(env, "codel_overloaded");
	k_pressure = atom(env, "pressure");
	k_shed_probability = atom(env, "shed_probability");
}

/* The reason atom of a libtally error (tally:format_error/1 explains each). */
static const char *reason_name(int rc)
{
	switch (rc) {
	case -ENOENT: return "enoent";
	case -EACCES: return "eacces";
	case -EPERM: return "eperm";
	case -ENOMEM: return "enomem";
	case -EROFS: return "erofs";
	case -EINVAL: return "einval";
	case -ENOSPC: return "enospc";
	case -EBUSY: return "ebusy";
	case -EAGAIN: return "eagain";
	case TALLY_EVERSION: return "version_mismatch";
	case TALLY_ENOTREADY: return "not_ready";
	case TALLY_EOWNERDEAD: return "owner_dead";
	case TALLY_ECORRUPT: return "corrupt";
	case TALLY_EBADNAME: return "bad_name";
	case TALLY_EFULL: return "full";
	case TALLY_EREPLACED: return "replaced";
	case TALLY_ESTALE: return "stale";
	case TALLY_EBUSY_RETRY: return "busy_retry";
	case TALLY_EREVOKED: return "revoked";
	default: return "tally_error";
	}
}

/* {error, Reason, Detail}: the wrapper keeps Detail for format_error/1. */
static ERL_NIF_TERM error3(ErlNifEnv *env, int rc)
{
	const char *msg = tally_errmsg();
	char buf[640];

	if (!msg[0])
		msg = tally_strerror(rc);
	snprintf(buf, sizeof(buf), "%s", msg);
	return enif_make_tuple3(env, atom_error, atom(env, reason_name(rc)),
				enif_make_string(env, buf, ERL_NIF_LATIN1));
}

static ERL_NIF_TERM error2(ErlNifEnv *env, ERL_NIF_TERM reason)
{
	return enif_make_tuple2(env, atom_error, reason);
}

/* ---- the registry of open segments ------------------------------------------ */

static struct registry *registry_new(void)
{
	struct registry *r = calloc(1, sizeof(*r));

	if (!r)
		return NULL;
	r->magic = REGISTRY_MAGIC;
	r->layout = LAYOUT_VERSION;
	pthread_mutex_init(&r->lock, NULL);
	return r;
}

static void registry_add(struct registry *r, struct nif_seg *s)
{
	pthread_mutex_lock(&r->lock);
	s->reg = r;
	s->prev = NULL;
	s->next = r->head;
	if (r->head)
		r->head->prev = s;
	r->head = s;
	r->live++;
	pthread_mutex_unlock(&r->lock);
}

/* Unlink s; frees r if it was the last segment of an unloaded library. */
static void registry_remove(struct registry *r, struct nif_seg *s)
{
	pthread_mutex_lock(&r->lock);
	if (s->prev)
		s->prev->next = s->next;
	else if (r->head == s)
		r->head = s->next;
	if (s->next)
		s->next->prev = s->prev;
	bool last = --r->live == 0 && r->unloaded;
	pthread_mutex_unlock(&r->lock);
	if (last) {
		pthread_mutex_destroy(&r->lock);
		free(r);
	}
}

/* The final unload: no code of the module is left to call a NIF, so every
 * segment still registered can be detached now; its slots go back. */
static void registry_close_all(struct registry *r)
{
	pthread_mutex_lock(&r->lock);
	for (struct nif_seg *s = r->head; s; s = s->next) {
		atomic_store_explicit(&s->closed, true, memory_order_relaxed);
		tally_segment_close(&s->seg);
	}
	r->unloaded = true;
	bool empty = r->live == 0;
	pthread_mutex_unlock(&r->lock);
	if (empty) {
		pthread_mutex_destroy(&r->lock);
		free(r);
	}
}

/* ---- resource types ----------------------------------------------------------- */

static void seg_dtor(ErlNifEnv *env, void *obj)
{
	struct nif_seg *s = obj;

	if (s->magic != SEG_MAGIC)
		return;
	/* No term refers to s: no NIF can be using it, in any thread. */
	tally_segment_close(&s->seg);
	if (s->reg)
		registry_remove(s->reg, s);
	s->magic = 0;
}

static void subj_dtor(ErlNifEnv *env, void *obj)
{
	struct nif_subj *s = obj;

	if (s->magic != SUBJ_MAGIC)
		return;
	enif_release_resource(s->seg);
	s->magic = 0;
}

static int open_types(ErlNifEnv *env, ErlNifResourceFlags flags)
{
	ErlNifResourceFlags tried;

	seg_type = enif_open_resource_type(env, NULL, "tally_segment", seg_dtor, flags, &tried);
	subj_type = enif_open_resource_type(env, NULL, "tally_subject", subj_dtor, flags, &tried);
	return seg_type && subj_type ? 0 : -1;
}

/* ---- argument decoding -------------------------------------------------------- */

static struct nif_seg *get_seg(ErlNifEnv *env, ERL_NIF_TERM t)
{
	struct nif_seg *s;

	if (!enif_get_resource(env, t, seg_type, (void **)&s) || s->magic != SEG_MAGIC)
		return NULL;
	return s;
}

static inline struct nif_subj *get_subj(ErlNifEnv *env, ERL_NIF_TERM t)
{
	struct nif_subj *s;

	if (UNLIKELY(!enif_get_resource(env, t, subj_type, (void **)&s)))
		return NULL;
	return s;
}

/* A non-negative integer in ns; one beyond 64 bits is clamped like any
 * value above the segment's max_value_ns. */
static inline bool get_ns(ErlNifEnv *env, ERL_NIF_TERM t, uint64_t *ns)
{
	ErlNifUInt64 v;

	if (LIKELY(enif_get_uint64(env, t, &v))) {
		*ns = v;
		return true;
	}
	if (enif_term_type(env, t) == ERL_NIF_TERM_TYPE_INTEGER &&
	    enif_compare(t, enif_make_int(env, 0)) > 0) {
		*ns = UINT64_MAX;
		return true;
	}
	return false;
}

/* ---- tally:open/1, close/1, subject/2 ------------------------------------------ */

/* {error, owner_dead, Detail}: the segment opened, but nobody drains it. */
static ERL_NIF_TERM owner_dead(ErlNifEnv *env, const char *name)
{
	char msg[2 * TALLY_NAME_MAX + 160];

	snprintf(msg, sizeof(msg), "segment \"%s\" exists but its owner is not running: "
		 "start tallyd (tallyd -s %s, or --replace over a dead owner's segment)", name, name);
	return enif_make_tuple3(env, atom_error, atom(env, "owner_dead"),
				enif_make_string(env, msg, ERL_NIF_LATIN1));
}

static ERL_NIF_TERM nif_open(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	struct priv *pv = enif_priv_data(env);
	char name[TALLY_NAME_MAX + 1];
	ErlNifBinary bin;
	struct tally_segment *seg = NULL;
	int rc;

	if (!enif_inspect_iolist_as_binary(env, argv[0], &bin))
		return enif_make_badarg(env);
	if (bin.size == 0 || bin.size > TALLY_NAME_MAX || memchr(bin.data, 0, bin.size))
		return error3(env, tally_segment_name_validate(""));
	memcpy(name, bin.data, bin.size);
	name[bin.size] = '\0';
	if ((rc = tally_segment_open(name, TALLY_OPEN_PRODUCER, 1000, &seg)) != 0)
		return error3(env, rc);
	if (tally_segment_owner_alive(seg) != 1) {
		tally_segment_close(&seg);
		return owner_dead(env, name);
	}
	struct nif_seg *s = enif_alloc_resource(seg_type, sizeof(*s));
	if (!s) {
		tally_segment_close(&seg);
		return error2(env, atom(env, "enomem"));
	}
	memset(s, 0, sizeof(*s));
	s->magic = SEG_MAGIC;
	s->seg = seg;
	s->uid = atomic_fetch_add_explicit(&pv->reg->next_uid, 1, memory_order_relaxed) + 1;
	snprintf(s->name, sizeof(s->name), "%s", name);
	registry_add(pv->reg, s);
	ERL_NIF_TERM t = enif_make_resource(env, s);
	enif_release_resource(s);
	return enif_make_tuple2(env, atom_ok, t);
}

static ERL_NIF_TERM nif_close(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	struct nif_seg *s = get_seg(env, argv[0]);

	if (!s)
		return enif_make_badarg(env);
	atomic_store_explicit(&s->closed, true, memory_order_relaxed);
	return atom_ok;
}

static ERL_NIF_TERM nif_subject(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	struct nif_seg *seg = get_seg(env, argv[0]);
	char name[TALLY_SUBJECT_MAX + 1];
	ErlNifBinary bin;
	tally_subject_t id;
	int rc;

	if (!seg || !enif_inspect_binary(env, argv[1], &bin))
		return enif_make_badarg(env);
	if (atomic_load_explicit(&seg->closed, memory_order_relaxed))
		return error2(env, atom_closed);
	if (bin.size == 0 || bin.size > TALLY_SUBJECT_MAX || memchr(bin.data, 0, bin.size))
		return error3(env, tally_subject_validate("", false));
	memcpy(name, bin.data, bin.size);
	name[bin.size] = '\0';
	if ((rc = tally_subject_intern(seg->seg, name, &id)) != 0)
		return error3(env, rc);
	struct nif_subj *s = enif_alloc_resource(subj_type, sizeof(*s));
	if (!s)
		return error2(env, atom(env, "enomem"));
	s->magic = SUBJ_MAGIC;
	s->id = id;
	s->seg = seg;
	enif_keep_resource(seg);
	ERL_NIF_TERM t = enif_make_resource(env, s);
	enif_release_resource(s);
	return enif_make_tuple2(env, atom_ok, t);
}

/* ---- the record path ----------------------------------------------------------- */

/*
 * The calling thread's last segment and its handle: one thread-local
 * access and a compare on the record path. Keyed by the segment's uid
 * (never reused, never 0; counted in the registry, so that instances of
 * the library that took each other's segments over do not give the same
 * one twice), not its address: a resource freed and another allocated
 * at the same place is not mistaken for it. The handle stays valid while
 * the segment lives (libtally frees a thread's handle only after its
 * segment was closed, by that thread, or at thread exit), and no NIF can
 * see a segment after its destructor. A thread that could not claim a
 * slot remembers when to try again instead (p NULL).
 */
struct thread_cache {
	uint64_t uid;
	struct tally_producer *p;  /* NULL: no slot, retry after retry_ns */
	uint64_t retry_ns;
};
static __thread struct thread_cache tcache;

/* Not stored: a full ring, or the handle's lease ended (revoked: the
 * thread claims a new slot on its next record, as tally_producer_local
 * would). */
static ERL_NIF_TERM record_dropped(struct thread_cache *c)
{
	if (tally_producer_status(c->p) == TALLY_EREVOKED)
		c->uid = 0;
	return atom_dropped;
}

/* Not the hot path: this thread's first record into s, or no slot. A
 * thread without a slot drops and counts; it claims again at most once
 * a second, so a VM short of slots pays one failed claim per thread per
 * second, not one per record. NULL: no slot (counted). */
static struct tally_producer *handle_slow(struct nif_seg *s)
{
	struct thread_cache *c = &tcache;
	struct tally_producer *p;
	int rc;

	if (c->uid == s->uid && !c->p && tally_now_ns() < c->retry_ns) {
		atomic_fetch_add_explicit(&s->no_slot, 1, memory_order_relaxed);
		return NULL;
	}
	if ((rc = tally_producer_local(s->seg, &p)) != 0) {
		atomic_store_explicit(&s->last_attach_error, rc, memory_order_relaxed);
		atomic_fetch_add_explicit(&s->no_slot, 1, memory_order_relaxed);
		*c = (struct thread_cache){ s->uid, NULL, tally_now_ns() + NO_SLOT_RETRY_NS };
		return NULL;
	}
	*c = (struct thread_cache){ s->uid, p, 0 };
	return p;
}

static ERL_NIF_TERM record_slow(ErlNifEnv *env, struct nif_subj *subj, uint64_t ns)
{
	struct tally_producer *p = handle_slow(subj->seg);

	if (!p)
		return atom_dropped;
	return tally_record(p, subj->id, ns) ? atom_ok : record_dropped(&tcache);
}

static inline ERL_NIF_TERM record(ErlNifEnv *env, struct nif_subj *subj, uint64_t ns)
{
	struct nif_seg *s = subj->seg;
	struct thread_cache *c = &tcache;

	if (UNLIKELY(atomic_load_explicit(&s->closed, memory_order_relaxed)))
		return enif_make_badarg(env);
	if (UNLIKELY(c->uid != s->uid || !c->p))
		return record_slow(env, subj, ns);
	return LIKELY(tally_record(c->p, subj->id, ns)) ? atom_ok : record_dropped(c);
}

static ERL_NIF_TERM nif_record(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	struct nif_subj *subj = get_subj(env, argv[0]);
	uint64_t ns;

	if (UNLIKELY(!subj || !get_ns(env, argv[1], &ns)))
		return enif_make_badarg(env);
	return record(env, subj, ns);
}

/* The calling thread's handle for s (claimed on its first use); NULL: no
 * slot, the record dropped and counted. */
static inline struct tally_producer *handle(struct nif_seg *s)
{
	struct thread_cache *c = &tcache;

	if (LIKELY(c->uid == s->uid && c->p))
		return c->p;
	return handle_slow(s);
}

/*
 * tally:record_jetstream(Subj, Reply) and (Subj, Reply, LatencyNs). Reply:
 * the message's reply subject, a binary or an iolist. ok; dropped (the
 * ring was full, or no slot: counted as for record/2); {error,
 * not_ack_reply} (not a JetStream ack reply: nothing recorded, the
 * latency neither); badarg for a closed segment or terms of other types.
 * The latency, when given, is recorded after the reply was taken.
 */
static ERL_NIF_TERM nif_record_jetstream(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	struct nif_subj *subj = get_subj(env, argv[0]);
	ErlNifBinary reply;
	uint64_t ns = 0;

	if (UNLIKELY(!subj || (argc == 3 && !get_ns(env, argv[2], &ns))))
		return enif_make_badarg(env);
	if (!enif_inspect_binary(env, argv[1], &reply) && !enif_inspect_iolist_as_binary(env, argv[1], &reply))
		return enif_make_badarg(env);
	if (UNLIKELY(atomic_load_explicit(&subj->seg->closed, memory_order_relaxed)))
		return enif_make_badarg(env);
	struct tally_producer *p = handle(subj->seg);
	if (UNLIKELY(!p)) /* no slot: a reply that is not one is still told */
		return tally_jsack_parse((const char *)reply.data, reply.size, &(struct tally_jsack){ 0 }) == 0
			       ? atom_dropped
			       : enif_make_tuple2(env, atom_error, atom_not_ack_reply);
	int rc = tally_record_jetstream(p, subj->id, (const char *)reply.data, reply.size);
	if (UNLIKELY(rc == -EINVAL)) /* nothing recorded, the latency neither */
		return enif_make_tuple2(env, atom_error, atom_not_ack_reply);
	bool ok = rc == 0;
	if (argc == 3)
		ok = tally_record(p, subj->id, ns) && ok;
	return LIKELY(ok) ? atom_ok : record_dropped(&tcache);
}

static ERL_NIF_TERM nif_record_since(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	struct nif_subj *subj = get_subj(env, argv[0]);
	ErlNifSInt64 t0;

	if (UNLIKELY(!subj || !enif_get_int64(env, argv[1], &t0)))
		return enif_make_badarg(env);
	uint64_t now = tally_now_ns();
	/* a T0 in the future records 0; a negative one (not a tally:now()
	 * value) a large value, clamped */
	uint64_t ns = t0 < 0 ? now + (uint64_t)(-(t0 + 1)) + 1 : now > (uint64_t)t0 ? now - (uint64_t)t0 : 0;
	return record(env, subj, ns);
}

static ERL_NIF_TERM nif_now(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	return enif_make_uint64(env, tally_now_ns());
}

/* The no-op NIF of the benchmark: the floor every ratio is taken to. */
static ERL_NIF_TERM nif_bench_noop(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	return atom_ok;
}

/* The benchmark's second floor: decode two integers and store them in a
 * thread-local ring, the least a record call from Erlang can do. */
static __thread uint64_t bench_ring[2 * 1024];
static __thread uint64_t bench_pos;

static ERL_NIF_TERM nif_bench_ring(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	ErlNifUInt64 a, b;

	if (!enif_get_uint64(env, argv[0], &a) || !enif_get_uint64(env, argv[1], &b))
		return enif_make_badarg(env);
	uint64_t i = bench_pos++ & 1023;
	bench_ring[2 * i] = a;
	bench_ring[2 * i + 1] = b;
	return atom_ok;
}

/* ---- reads ------------------------------------------------------------------- */

/* Read subj's published stats. 0, or TALLY_ESTALE with st filled, or an
 * error (-ENOENT: never published; closed: 1). */
static int read_stats(struct nif_subj *subj, struct tally_subject_stats *st)
{
	if (atomic_load_explicit(&subj->seg->closed, memory_order_relaxed))
		return 1;
	return tally_read_subject(subj->seg->seg, subj->id, st);
}

static ERL_NIF_TERM verdict_atom(enum tally_verdict v)
{
	switch (v) {
	case TALLY_VERDICT_OK: return atom_ok;
	case TALLY_VERDICT_WARN: return atom_warn;
	case TALLY_VERDICT_OVERLOAD: return atom_overload;
	default: return atom_unknown;
	}
}

static ERL_NIF_TERM nif_verdict(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	struct nif_subj *subj = get_subj(env, argv[0]);
	struct tally_subject_stats st;

	if (UNLIKELY(!subj))
		return enif_make_badarg(env);
	/* stale data is never served as live: unknown */
	return read_stats(subj, &st) == 0 ? verdict_atom(st.verdict) : atom_unknown;
}

static ERL_NIF_TERM reasons_list(ErlNifEnv *env, uint32_t r)
{
	static const struct { uint32_t bit; const char *name; } names[] = {
		{ TALLY_REASON_STALLED, "stalled" },   { TALLY_REASON_FAIL_OPEN, "fail_open" },
		{ TALLY_REASON_NO_DATA, "no_data" },   { TALLY_REASON_STALE, "stale" },
		{ TALLY_REASON_PENDING, "pending" },   { TALLY_REASON_LATENCY, "latency" },
		{ TALLY_REASON_WAIT, "wait" },         { TALLY_REASON_CODEL, "codel" },
	};
	ERL_NIF_TERM l = enif_make_list(env, 0);

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (r & names[i].bit)
			l = enif_make_list_cell(env, atom(env, names[i].name), l);
	return l;
}

static const char *pending_source_name(uint32_t src)
{
	static const char *const names[] = { "none", "live", "cached", "never", "gone", "not_found" };

	return src < sizeof(names) / sizeof(names[0]) ? names[src] : "never";
}

static ERL_NIF_TERM quantile(ErlNifEnv *env, const struct tally_subject_stats *st, uint64_t v)
{
	return st->has_data ? enif_make_uint64(env, v) : atom_undefined;
}

static ERL_NIF_TERM age_ms_term(ErlNifEnv *env, uint64_t age_ns)
{
	return age_ns == UINT64_MAX ? atom_undefined : enif_make_uint64(env, age_ns / 1000000u);
}

static ERL_NIF_TERM stats_map(ErlNifEnv *env, const struct tally_subject_stats *st, bool stale)
{
	ERL_NIF_TERM keys[] = { k_count, k_p50, k_p90, k_p95, k_p99, k_p999, k_max, k_min, k_mean,
				k_rate, k_pending, k_verdict, k_reasons, k_stale, k_total_count,
				k_pending_age_ms, k_pending_source, k_pending_shared,
				k_retry_after_ms, k_window_ms, k_wait_count, k_wait_p50, k_wait_p95,
				k_wait_p99, k_wait_min, k_wait_skewed, k_codel_overloaded, k_pressure,
				k_shed_probability };
	ERL_NIF_TERM vals[] = {
		enif_make_uint64(env, st->count),
		quantile(env, st, st->p50_ns),
		quantile(env, st, st->p90_ns),
		quantile(env, st, st->p95_ns),
		quantile(env, st, st->p99_ns),
		quantile(env, st, st->p999_ns),
		quantile(env, st, st->max_ns),
		quantile(env, st, st->min_ns),
		enif_make_double(env, st->mean),
		enif_make_double(env, st->rate),
		st->pending_consumers ? enif_make_uint64(env, st->pending) : atom_undefined,
		stale ? atom_unknown : verdict_atom(st->verdict),
		reasons_list(env, st->reasons),
		stale ? atom_true : atom_false,
		enif_make_uint64(env, st->total_count),
		st->pending_consumers ? age_ms_term(env, st->pending_age_ns) : atom_undefined,
		atom(env, pending_source_name(st->pending_source)),
		st->pending_shared ? atom_true : atom_false,
		enif_make_uint(env, st->retry_after_ms),
		enif_make_uint64(env, st->window_ns / 1000000u),
		enif_make_uint64(env, st->wait_count),
		st->has_wait ? enif_make_uint64(env, st->wait_p50_ns) : atom_undefined,
		st->has_wait ? enif_make_uint64(env, st->wait_p95_ns) : atom_undefined,
		st->has_wait ? enif_make_uint64(env, st->wait_p99_ns) : atom_undefined,
		st->codel_valid ? enif_make_uint64(env, st->wait_min_ns) : atom_undefined,
		enif_make_uint64(env, st->wait_skewed),
		st->codel_overloaded ? atom_true : atom_false,
		enif_make_double(env, st->pressure),
		enif_make_double(env, st->shed_probability),
	};
	ERL_NIF_TERM map;

	_Static_assert(sizeof(keys) == sizeof(vals), "one value per key");
	if (!enif_make_map_from_arrays(env, keys, vals, sizeof(keys) / sizeof(keys[0]), &map))
		return enif_make_badarg(env); /* duplicate keys: a bug here */
	return map;
}

static ERL_NIF_TERM nif_stats(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	struct nif_subj *subj = get_subj(env, argv[0]);
	struct tally_subject_stats st;
	int rc;

	if (!subj)
		return enif_make_badarg(env);
	rc = read_stats(subj, &st);
	if (rc == 1)
		return error2(env, atom_closed);
	if (rc == -ENOENT)
		return error2(env, atom_no_data);
	if (rc != 0 && rc != TALLY_ESTALE)
		return error2(env, atom(env, reason_name(rc)));
	return enif_make_tuple2(env, atom_ok, stats_map(env, &st, rc == TALLY_ESTALE));
}

static ERL_NIF_TERM nif_pending(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	struct nif_subj *subj = get_subj(env, argv[0]);
	struct tally_subject_stats st;
	int rc;

	if (!subj)
		return enif_make_badarg(env);
	rc = read_stats(subj, &st);
	if (rc == 1)
		return error2(env, atom_closed);
	if (rc == TALLY_ESTALE)
		return error2(env, atom_stale);
	if (rc != 0 || !st.pending_consumers || st.pending_source == TALLY_PENDING_NONE ||
	    st.pending_source == TALLY_PENDING_NEVER || st.pending_source == TALLY_PENDING_GONE ||
	    st.pending_source == TALLY_PENDING_NOT_FOUND || st.pending_age_ns == UINT64_MAX)
		return error2(env, atom_no_data);
	return enif_make_tuple3(env, atom_ok, enif_make_uint64(env, st.pending),
				enif_make_uint64(env, st.pending_age_ns / 1000000u));
}

/* ---- introspection ----------------------------------------------------------- */

static ERL_NIF_TERM nif_counters(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	struct nif_seg *s = get_seg(env, argv[0]);

	if (!s)
		return enif_make_badarg(env);
	int last = atomic_load_explicit(&s->last_attach_error, memory_order_relaxed);
	ERL_NIF_TERM keys[] = { k_no_slot, k_last_error };
	ERL_NIF_TERM vals[] = {
		enif_make_uint64(env, atomic_load_explicit(&s->no_slot, memory_order_relaxed)),
		last ? atom(env, reason_name(last)) : atom_undefined,
	};
	ERL_NIF_TERM map;

	enif_make_map_from_arrays(env, keys, vals, 2, &map);
	return map;
}

/* Every producer slot of the segment that is not free (tally_read_producers). */
static ERL_NIF_TERM nif_slots(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
	struct nif_seg *s = get_seg(env, argv[0]);
	struct tally_segment_info info;

	if (!s)
		return enif_make_badarg(env);
	if (atomic_load_explicit(&s->closed, memory_order_relaxed))
		return error2(env, atom_closed);
	int rc = tally_segment_info(s->seg, &info);
	if (rc)
		return error2(env, atom(env, reason_name(rc)));
	uint32_t cap = info.config.producer_slots;
	struct tally_producer_stats *ps = enif_alloc(sizeof(*ps) * (cap ? cap : 1));
	if (!ps)
		return error2(env, atom(env, "enomem"));
	int n = tally_read_producers(s->seg, ps, cap);
	if (n < 0) {
		enif_free(ps);
		return error2(env, atom(env, reason_name(n)));
	}
	ERL_NIF_TERM l = enif_make_list(env, 0);
	for (int i = n - 1; i >= 0; i--) {
		ERL_NIF_TERM keys[] = { k_slot, k_state, k_pid, k_tid, k_samples, k_dropped, k_lost,
					k_alive, k_backlog };
		ERL_NIF_TERM vals[] = {
			enif_make_uint(env, ps[i].slot),     atom(env, ps[i].state),
			enif_make_int(env, (int)ps[i].pid),  enif_make_int(env, (int)ps[i].tid),
			enif_make_uint64(env, ps[i].samples), enif_make_uint64(env, ps[i].dropped),
			enif_make_uint64(env, ps[i].lost),   ps[i].alive ? atom_true : atom_false,
			enif_make_uint64(env, ps[i].backlog),
		};
		ERL_NIF_TERM m;
		enif_make_map_from_arrays(env, keys, vals, sizeof(keys) / sizeof(keys[0]), &m);
		l = enif_make_list_cell(env, m, l);
	}
	enif_free(ps);
	return enif_make_tuple2(env, atom_ok, l);
}

/* ---- load, upgrade, unload ----------------------------------------------------- */

/* Keep libtally mapped for the life of the VM: its pthread key destructor
 * and thread-local handles belong to scheduler threads that outlive any
 * NIF instance. */
static int pin_libtally(void)
{
	Dl_info info;

	if (!dladdr((void *)tally_version, &info) || !info.dli_fname)
		return -1;
	return dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE) ? 0 : -1;
}

static struct priv *priv_new(struct registry *reg)
{
	struct priv *p = enif_alloc(sizeof(*p));

	if (!p)
		return NULL;
	p->magic = PRIV_MAGIC;
	p->layout = LAYOUT_VERSION;
	p->reg = reg;
	p->handed_over = false;
	return p;
}

static int load(ErlNifEnv *env, void **priv_data, ERL_NIF_TERM load_info)
{
	struct registry *reg;

	if (pin_libtally() != 0)
		return 1;
	make_atoms(env);
	if (open_types(env, ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER) != 0 || !(reg = registry_new()))
		return 1;
	if (!(*priv_data = priv_new(reg))) {
		free(reg);
		return 1;
	}
	return 0;
}

static int upgrade(ErlNifEnv *env, void **priv_data, void **old_priv_data, ERL_NIF_TERM load_info)
{
	struct priv *old = *old_priv_data;

	/* resources made by a library of another layout could not be read */
	if (!old || old->magic != PRIV_MAGIC || old->layout != LAYOUT_VERSION || old->handed_over ||
	    pin_libtally() != 0)
		return 1;
	make_atoms(env);
	if (open_types(env, ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER) != 0)
		return 1;
	if (!(*priv_data = priv_new(old->reg)))
		return 1;
	/* taken over: the old instance's unload closes nothing, and old code
	 * still running (a tally:open/1 until the purge) shares the registry */
	old->handed_over = true;
	return 0;
}

static void unload(ErlNifEnv *env, void *priv_data)
{
	struct priv *p = priv_data;

	if (p && !p->handed_over)
		registry_close_all(p->reg);
	enif_free(p);
}

static ErlNifFunc funcs[] = {
	/* open waits up to 1 s for a segment being created, slots reads /proc
	 * for every slot: both on a dirty IO scheduler, off the normal ones */
	{ "open_nif", 1, nif_open, ERL_NIF_DIRTY_JOB_IO_BOUND },
	{ "close", 1, nif_close, 0 },
	{ "subject_nif", 2, nif_subject, 0 },
	{ "record", 2, nif_record, 0 },
	{ "record_since", 2, nif_record_since, 0 },
	{ "record_jetstream", 2, nif_record_jetstream, 0 },
	{ "record_jetstream", 3, nif_record_jetstream, 0 },
	{ "now", 0, nif_now, 0 },
	{ "stats", 1, nif_stats, 0 },
	{ "verdict", 1, nif_verdict, 0 },
	{ "pending", 1, nif_pending, 0 },
	{ "counters", 1, nif_counters, 0 },
	{ "slots", 1, nif_slots, ERL_NIF_DIRTY_JOB_IO_BOUND },
	{ "bench_noop", 2, nif_bench_noop, 0 },
	{ "bench_ring", 2, nif_bench_ring, 0 },
	/* the same record path, called on a dirty scheduler (tests) */
	{ "record_dirty_cpu", 2, nif_record, ERL_NIF_DIRTY_JOB_CPU_BOUND },
	{ "record_dirty_io", 2, nif_record, ERL_NIF_DIRTY_JOB_IO_BOUND },
};

ERL_NIF_INIT(tally, funcs, load, NULL, upgrade, unload)
