/* SPDX-License-Identifier: MIT */
/*
 * segment.c: creating, attaching to and validating the shm segment.
 *
 * Creation reserves every byte up front (posix_fallocate on the tmpfs
 * object), so running out of /dev/shm is a clear error at start and never
 * a SIGBUS in a router thread later. The header is filled in, the sections
 * are initialised, and only then is the ready word stored, with release:
 * a process that sees READY with acquire sees the whole layout.
 *
 * Attaching validates the header once (magic, ABI major, every section
 * inside the mapping and consistent with the configuration it was derived
 * from) and copies the layout into the handle; nothing is re-read from the
 * header for bounds afterwards. A name that is already taken is never
 * silently reused: a live owner means -EBUSY, a dead one is reported and
 * replaced only on request.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "common.h"
#include "follow.h"
#include "pending.h"
#include "remote.h"
#include "rules.h"
#include "proc.h"
#include "segment.h"
#include "snapshot.h"

#define SHM_DIR "/dev/shm"
#define DEFAULT_WAIT_READY_MS 2000u

TALLY_API void tally_segment_config_init(struct tally_segment_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->producer_slots = 64;
	cfg->ring_capacity = 16384;
	cfg->subject_capacity = 4096;
	cfg->pending_capacity = 1024;
	cfg->max_value_ns = 3600ull * 1000000000ull;
	cfg->producer_cooloff_ms = 5000;
}

TALLY_API int tally_segment_name_validate(const char *name)
{
	if (!name || !*name)
		return tally__fail(TALLY_EBADNAME, "segment name is empty");
	size_t n = strnlen(name, TALLY_NAME_MAX + 1);
	if (n > TALLY_NAME_MAX)
		return tally__fail(TALLY_EBADNAME, "segment name is longer than %d bytes", TALLY_NAME_MAX);
	if (strcmp(name, ".") == 0)
		return tally__fail(TALLY_EBADNAME, "segment name \".\" is not a name (a directory's)");
	if (strstr(name, ".."))
		return tally__fail(TALLY_EBADNAME, "segment name \"%s\" may not contain \"..\"", name);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)name[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '-' || c == '_' || c == '.'))
			return tally__fail(TALLY_EBADNAME,
					   "segment name \"%.64s\": byte %zu (0x%02x) is not allowed; "
					   "use letters, digits, '-', '_' and '.'", name, i, c);
	}
	return 0;
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) / a * a;
}

static bool is_pow2(uint64_t v)
{
	return v && !(v & (v - 1));
}

static int config_check(const struct tally_segment_config *c)
{
	if (c->producer_slots < 1 || c->producer_slots > 4096)
		return tally__fail(-EINVAL, "producer_slots %u is outside 1..4096", c->producer_slots);
	if (!is_pow2(c->ring_capacity) || c->ring_capacity < 64 || c->ring_capacity > (1u << 24))
		return tally__fail(-EINVAL, "ring_capacity %u must be a power of two in 64..16777216",
				   c->ring_capacity);
	if (c->subject_capacity < 1 || c->subject_capacity > (1u << 20))
		return tally__fail(-EINVAL, "subject_capacity %u is outside 1..1048576", c->subject_capacity);
	if (c->pending_capacity < 1 || c->pending_capacity > 65536)
		return tally__fail(-EINVAL, "pending_capacity %u is outside 1..65536", c->pending_capacity);
	if (c->max_value_ns < 1)
		return tally__fail(-EINVAL, "max_value_ns must be at least 1");
	if (c->remote_capacity > 65536)
		return tally__fail(-EINVAL, "remote_capacity %u is outside 0..65536", c->remote_capacity);
	return 0;
}

/* Layout of a segment for cfg: fills the section table of hdr. rules:
 * with the rules section (ABI 3.2 on); a segment of an older minor has none. */
static void layout(const struct tally_segment_config *c, struct tally__shm_hdr *h, bool rules)
{
	uint32_t table = tally__subject_table_size(c->subject_capacity);
	uint64_t off = TALLY__HDR_SIZE;

	h->slot_stride = (uint32_t)(sizeof(struct tally__slot) +
				    (uint64_t)c->ring_capacity * sizeof(struct tally_ring_entry));
	h->subjects = (struct tally__section){ off, (uint64_t)table * sizeof(struct tally__shm_subject) };
	off = align_up(off + h->subjects.size, TALLY__SECTION_ALIGN);
	h->slots = (struct tally__section){ off, (uint64_t)c->producer_slots * h->slot_stride };
	off = align_up(off + h->slots.size, TALLY__SECTION_ALIGN);
	h->pending = (struct tally__section){ off, tally__pending_section_size(c->pending_capacity) };
	off = align_up(off + h->pending.size, TALLY__SECTION_ALIGN);
	h->snapshot = (struct tally__section){ off, tally__snapshot_section_size(table) };
	off = align_up(off + h->snapshot.size, TALLY__SECTION_ALIGN);
	h->remote = (struct tally__section){ 0, 0 };
	if (c->remote_capacity) {
		h->remote = (struct tally__section){ off, tally__remote_section_size(c->remote_capacity) };
		off = align_up(off + h->remote.size, TALLY__SECTION_ALIGN);
	}
	h->rules = (struct tally__section){ 0, 0 };
	if (rules) {
		h->rules = (struct tally__section){ off, tally__rules_section_size(TALLY__RULES_CAP) };
		off = align_up(off + h->rules.size, TALLY__SECTION_ALIGN);
	}
	h->total_size = off;
}

TALLY_API uint64_t tally_segment_size(const struct tally_segment_config *cfg)
{
	struct tally__shm_hdr h;

	if (config_check(cfg))
		return 0;
	layout(cfg, &h, true);
	return h.total_size;
}

/* Copy the validated layout of hdr into seg. 0 or TALLY_ECORRUPT. */
static int adopt_layout(struct tally_segment *seg, const struct tally__shm_hdr *h)
{
	struct tally_segment_config c;
	struct tally__shm_hdr want;

	tally_segment_config_init(&c);
	c.producer_slots = h->nslots;
	c.ring_capacity = h->ring_cap;
	c.subject_capacity = h->subject_cap;
	c.pending_capacity = h->pending_cap;
	c.max_value_ns = h->max_value_ns;
	c.remote_capacity = h->abi_minor >= 1 ? h->remote_cap : 0;
	if (config_check(&c))
		return tally__fail(TALLY_ECORRUPT, "segment \"%s\": header holds an invalid configuration (%s)",
				   seg->name, tally_errmsg());
	memset(&want, 0, sizeof(want));
	layout(&c, &want, h->abi_minor >= 2);
	/* A later minor may append sections: its total is larger, ours must fit. */
	if ((h->abi_minor > TALLY__ABI_MINOR ? h->total_size < want.total_size
					      : h->total_size != want.total_size) ||
	    h->total_size != seg->len ||
	    memcmp(&h->subjects, &want.subjects, sizeof(want.subjects)) ||
	    memcmp(&h->slots, &want.slots, sizeof(want.slots)) ||
	    memcmp(&h->pending, &want.pending, sizeof(want.pending)) ||
	    memcmp(&h->snapshot, &want.snapshot, sizeof(want.snapshot)) ||
	    (c.remote_capacity && (memcmp(&h->remote, &want.remote, sizeof(want.remote)) ||
				   h->remote_entry_size != sizeof(struct tally__remote_entry))) ||
	    (h->abi_minor >= 2 && (memcmp(&h->rules, &want.rules, sizeof(want.rules)) ||
				   h->rules_cap != TALLY__RULES_CAP ||
				   h->rules_entry_size != sizeof(struct tally__rules_entry))) ||
	    h->slot_stride != want.slot_stride)
		return tally__fail(TALLY_ECORRUPT, "segment \"%s\": sections do not match its configuration "
				   "or its size (%zu bytes mapped, header says %llu)", seg->name,
				   seg->len, (unsigned long long)h->total_size);
	seg->nslots = c.producer_slots;
	seg->ring_cap = c.ring_capacity;
	seg->subject_cap = c.subject_capacity;
	seg->table_size = tally__subject_table_size(c.subject_capacity);
	seg->pending_cap = c.pending_capacity;
	seg->slot_stride = want.slot_stride;
	seg->cooloff_ms = h->cooloff_ms;
	seg->max_value_ns = c.max_value_ns;
	seg->subjects = want.subjects;
	seg->slots = want.slots;
	seg->pending = want.pending;
	seg->snapshot = want.snapshot;
	seg->remote_cap = c.remote_capacity;
	seg->remote = want.remote;
	seg->rules = h->abi_minor >= 2 ? want.rules : (struct tally__section){ 0, 0 };
	seg->owner_pid = h->owner_pid;
	seg->owner_start_time = h->owner_start_time;
	seg->generation = h->generation;
	seg->created_ns = h->created_ns;
	return 0;
}

static struct tally_segment *seg_alloc(const char *name)
{
	struct tally_segment *seg = calloc(1, sizeof(*seg));

	if (!seg)
		return NULL;
	seg->magic = TALLY__SEGMENT_MAGIC;
	seg->fd = -1;
	snprintf(seg->name, sizeof(seg->name), "%s", name);
	return seg;
}

static void seg_free(struct tally_segment *seg)
{
	free(seg->reap.slot_lease);
	free(seg->reap.slot_seen_ns);
	free(seg->reap.claim_seen);
	free(seg->reap.subj_seen_ns);
	/* Handles were still attached at close: a thread may still be in
	 * tally_record() with them (a bug of the caller, but not one that may
	 * crash the router). Put private zero pages where the segment was,
	 * so that such a late store lands there, and keep the range. */
	if (seg->base && seg->revoked_at_close &&
	    mmap(seg->base, seg->len, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS,
		 -1, 0) != MAP_FAILED)
		seg->base = NULL;
	if (seg->base)
		munmap(seg->base, seg->len);
	if (seg->fd >= 0)
		close(seg->fd);
	seg->magic = 0;
	free(seg);
}

/* Can this process open the segment at path to read it? */
static bool readable(const char *path)
{
	int fd = shm_open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC, 0);

	if (fd < 0)
		return false;
	close(fd);
	return true;
}

static void shm_path(const char *name, char *buf, size_t len)
{
	snprintf(buf, len, "/%s", name);
}

/* Why the name is taken: -EBUSY (live owner), TALLY_EOWNERDEAD (dead,
 * stopped, or unreadable leftovers). */
static int existing_owner(const char *name)
{
	struct tally_segment *old = NULL;
	int rc = tally_segment_open(name, TALLY_OPEN_READER, 200, &old);

	if (rc == -EACCES)
		return tally__fail(-EACCES, "segment \"%s\" exists in " SHM_DIR " and belongs to "
				   "another user: remove it as that user or choose another name", name);
	if (rc < 0)
		return tally__fail(TALLY_EOWNERDEAD, "segment \"%s\" exists in " SHM_DIR " but is not "
				   "usable (%s); replace it explicitly (tallyd --replace) or remove "
				   SHM_DIR "/%s", name, tally_strerror(rc), name);
	int alive = tally_segment_owner_alive(old);
	pid_t pid = old->owner_pid;
	bool stopped = atomic_load_explicit(&old->hdr->owner_state, memory_order_relaxed) == TALLY__OWNER_STOPPED;
	tally_segment_close(&old);
	if (alive == 1)
		return tally__fail(-EBUSY, "segment \"%s\" is owned by a live process (pid %d): "
				   "stop it first, or choose another name", name, (int)pid);
	if (stopped)
		return tally__fail(TALLY_EOWNERDEAD, "segment \"%s\" was kept by its owner pid %d, which "
				   "stopped cleanly and left it for readers (--keep); start with --replace "
				   "to take the name, or remove " SHM_DIR "/%s", name, (int)pid, name);
	return tally__fail(TALLY_EOWNERDEAD, "segment \"%s\" was left by owner pid %d, which died "
			   "without closing it; replace it explicitly (tallyd --replace) or remove "
			   SHM_DIR "/%s", name, (int)pid, name);
}

static int reserve(struct tally_segment *seg, uint64_t size)
{
	struct statvfs vfs;
	char need[32], have[32];

	if (statvfs(SHM_DIR, &vfs) == 0) {
		uint64_t avail = (uint64_t)vfs.f_bavail * vfs.f_frsize;
		if (avail < size)
			return tally__fail(-ENOSPC, SHM_DIR " has %s free but segment \"%s\" needs %s: "
					   "free space there, enlarge it, or lower ring_capacity/producer_slots",
					   tally__human_size(avail, have, sizeof(have)), seg->name,
					   tally__human_size(size, need, sizeof(need)));
	}
	if (size > (uint64_t)SIZE_MAX || size > (uint64_t)LLONG_MAX)
		return tally__fail(-ENOSPC, "segment \"%s\" would need %s", seg->name,
				   tally__human_size(size, need, sizeof(need)));
	int rc = posix_fallocate(seg->fd, 0, (off_t)size);
	if (rc)
		return tally__fail(-rc, "cannot reserve %s in " SHM_DIR " for segment \"%s\": %s",
				   tally__human_size(size, need, sizeof(need)), seg->name, strerror(rc));
	return 0;
}

/* 0600, 0640 (group_readable: readers of the group) or 0660
 * (group_writable: producers of the group too). */
static mode_t seg_mode(const struct tally_segment_config *cfg)
{
	return cfg->group_writable ? 0660 : cfg->group_readable ? 0640 : 0600;
}

static int set_mode(struct tally_segment *seg, const struct tally_segment_config *cfg)
{
	mode_t mode = seg_mode(cfg);

	if (fchmod(seg->fd, mode) != 0)
		return tally__fail(-errno, "chmod of segment \"%s\": %s", seg->name, strerror(errno));
	if ((cfg->group_readable || cfg->group_writable) && cfg->group && *cfg->group) {
		struct group *g = getgrnam(cfg->group);
		if (!g)
			return tally__fail(-ENOENT, "group \"%s\" for segment \"%s\" does not exist",
					   cfg->group, seg->name);
		if (fchown(seg->fd, (uid_t)-1, g->gr_gid) != 0)
			return tally__fail(-errno, "chgrp %s of segment \"%s\": %s", cfg->group,
					   seg->name, strerror(errno));
	}
	return 0;
}

static void fill_header(struct tally_segment *seg, const struct tally_segment_config *cfg)
{
	struct tally__shm_hdr *h = tally__seg_hdr(seg);

	/* atomic: a reader waiting for ready looks at the magic (wait_ready) */
	__atomic_store_n(&h->magic, TALLY__MAGIC, __ATOMIC_RELAXED);
	h->abi_major = TALLY__ABI_MAJOR;
	h->abi_minor = TALLY__ABI_MINOR;
	h->hdr_size = TALLY__HDR_SIZE;
	h->owner_pid = (int32_t)getpid();
	h->mode = (uint32_t)seg_mode(cfg);
	h->owner_start_time = tally__proc_start_time(getpid());
	h->created_ns = tally__real_ns();
	h->generation = h->created_ns;
	h->nslots = cfg->producer_slots;
	h->ring_cap = cfg->ring_capacity;
	h->subject_cap = cfg->subject_capacity;
	h->pending_cap = cfg->pending_capacity;
	h->max_value_ns = cfg->max_value_ns;
	h->cooloff_ms = cfg->producer_cooloff_ms;
	h->subject_entry_size = sizeof(struct tally__shm_subject);
	h->remote_cap = cfg->remote_capacity;
	h->remote_entry_size = cfg->remote_capacity ? sizeof(struct tally__remote_entry) : 0;
	h->rules_cap = TALLY__RULES_CAP;
	h->rules_entry_size = sizeof(struct tally__rules_entry);
	layout(cfg, h, true);
	atomic_store_explicit(&h->owner_heartbeat_ns, tally__mono_ns(), memory_order_relaxed);
	atomic_store_explicit(&h->owner_state, TALLY__OWNER_RUNNING, memory_order_relaxed);
}

static int create_once(struct tally_segment *seg, const struct tally_segment_config *cfg,
		       uint64_t size)
{
	char path[TALLY_NAME_MAX + 2];
	int rc;

	shm_path(seg->name, path, sizeof(path));
	seg->fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (seg->fd < 0)
		return -errno;
	seg->is_owner = true;
	if ((rc = set_mode(seg, cfg)) || (rc = reserve(seg, size)))
		return rc;
	seg->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, seg->fd, 0);
	if (seg->base == MAP_FAILED) {
		seg->base = NULL;
		return tally__fail(-errno, "mmap of segment \"%s\": %s", seg->name, strerror(errno));
	}
	seg->len = size;
	fill_header(seg, cfg);
	seg->hdr = tally__seg_hdr(seg);
	if ((rc = adopt_layout(seg, seg->hdr)))
		return rc;
	seg->reap.slot_lease = calloc(seg->nslots, sizeof(uint64_t));
	seg->reap.slot_seen_ns = calloc(seg->nslots, sizeof(uint64_t));
	seg->reap.subj_seen_ns = calloc(seg->table_size, sizeof(uint64_t));
	seg->reap.claim_seen = calloc(seg->nslots, sizeof(*seg->reap.claim_seen));
	if (!seg->reap.slot_lease || !seg->reap.slot_seen_ns || !seg->reap.subj_seen_ns ||
	    !seg->reap.claim_seen)
		return -ENOMEM;
	if ((rc = tally__pending_init(tally__seg_section(seg, &seg->pending), seg->pending.size,
				      seg->pending_cap)))
		return tally__fail(rc, "segment \"%s\": cannot format its pending table", seg->name);
	tally__snapshot_section_init(tally__seg_section(seg, &seg->snapshot), seg->snapshot.size,
				     seg->table_size);
	if (seg->remote_cap &&
	    (rc = tally__remote_init(tally__seg_section(seg, &seg->remote), seg->remote.size, seg->remote_cap)))
		return tally__fail(rc, "segment \"%s\": cannot format its remote section", seg->name);
	tally__rules_init(tally__seg_section(seg, &seg->rules), seg->rules.size, TALLY__RULES_CAP);
	for (uint32_t i = 0; i < seg->nslots; i++) { /* what the first claim (generation 1) expects */
		struct tally__slot *sl = tally__seg_slot(seg, i);
		atomic_store_explicit(&sl->ctl.ident, tally__ident(1, 0), memory_order_relaxed);
		atomic_store_explicit(&sl->ctl.birth, tally__birth(1, 0), memory_order_relaxed);
	}
	struct stat st;
	if (fstat(seg->fd, &st) == 0) {
		seg->dev = st.st_dev;
		seg->ino = st.st_ino;
	}
	/* Release: every byte above is visible to whoever sees READY. */
	atomic_store_explicit(&seg->hdr->ready, TALLY__READY, memory_order_release);
	return 0;
}

TALLY_API int tally_segment_create(const char *name, const struct tally_segment_config *cfg,
				   unsigned flags, struct tally_segment **out)
{
	struct tally_segment_config defaults;
	struct tally_segment *seg;
	uint64_t size;
	int rc;

	tally__clear_errmsg();
	*out = NULL;
	if ((rc = tally_segment_name_validate(name)))
		return rc;
	if (!cfg) {
		tally_segment_config_init(&defaults);
		cfg = &defaults;
	}
	if ((rc = config_check(cfg)))
		return rc;
	size = tally_segment_size(cfg);
	for (int attempt = 0;; attempt++) {
		if (!(seg = seg_alloc(name)))
			return -ENOMEM;
		rc = create_once(seg, cfg, size);
		if (rc == 0)
			break;
		bool created = seg->is_owner;
		seg_free(seg);
		if (created) /* we made the object: do not leave a half-built one */
			tally_segment_unlink(name);
		if (rc != -EEXIST)
			return rc == -EACCES || rc == -EPERM
				? tally__fail(rc, "cannot create segment \"%s\" in " SHM_DIR ": %s",
					      name, strerror(-rc))
				: rc;
		rc = existing_owner(name);
		if (rc != TALLY_EOWNERDEAD || !(flags & TALLY_CREATE_REPLACE_DEAD) || attempt > 0)
			return rc;
		tally_segment_unlink(name);
	}
	*out = seg;
	return 0;
}

static int wait_ready(struct tally_segment *seg, uint32_t wait_ms)
{
	uint64_t deadline = tally__mono_ns() + (uint64_t)wait_ms * 1000000u;
	struct tally__shm_hdr *h = tally__seg_hdr(seg);

	while (atomic_load_explicit(&h->ready, memory_order_acquire) != TALLY__READY) {
		/* A creator writes the magic before anything else is ready: any
		 * other value than 0 (not written yet) or ours is not a segment
		 * that will ever become ready, so say so now, not after wait_ms. */
		uint64_t magic = __atomic_load_n(&h->magic, __ATOMIC_RELAXED);
		if (magic != 0 && magic != TALLY__MAGIC)
			return tally__fail(TALLY_ECORRUPT, "\"%s\" in " SHM_DIR " is not a tally segment "
					   "(bad magic 0x%016llx): remove it if nothing uses it (rm " SHM_DIR "/%s)",
					   seg->name, (unsigned long long)magic, seg->name);
		if (tally__mono_ns() >= deadline)
			return tally__fail(TALLY_ENOTREADY, "segment \"%s\" did not become ready within "
					   "%u ms: its creator may have died; check its owner", seg->name,
					   wait_ms);
		usleep(1000);
	}
	return 0;
}

static int check_header(struct tally_segment *seg)
{
	const struct tally__shm_hdr *h = tally__seg_hdr(seg);

	if (h->magic != TALLY__MAGIC)
		return tally__fail(TALLY_ECORRUPT, "\"%s\" in " SHM_DIR " is not a tally segment "
				   "(bad magic 0x%016llx)", seg->name, (unsigned long long)h->magic);
	if (h->abi_major != TALLY__ABI_MAJOR)
		return tally__fail(TALLY_EVERSION, "segment \"%s\" has layout version %u.%u, this "
				   "library reads %u.x (%u.%u): use tools of the owner's version",
				   seg->name, h->abi_major, h->abi_minor, TALLY__ABI_MAJOR,
				   TALLY__ABI_MAJOR, TALLY__ABI_MINOR);
	if (h->hdr_size != TALLY__HDR_SIZE)
		return tally__fail(TALLY_ECORRUPT, "segment \"%s\": header size %u", seg->name, h->hdr_size);
	return adopt_layout(seg, h);
}

/* Map the object, waiting for a creator that has not sized it yet. */
static int map_existing(struct tally_segment *seg, uint32_t wait_ms)
{
	uint64_t deadline = tally__mono_ns() + (uint64_t)wait_ms * 1000000u;
	struct stat st;

	for (;;) {
		if (fstat(seg->fd, &st) != 0)
			return tally__fail(-errno, "fstat of segment \"%s\": %s", seg->name, strerror(errno));
		if (st.st_size >= (off_t)TALLY__HDR_SIZE)
			break;
		if (tally__mono_ns() >= deadline)
			return tally__fail(TALLY_ENOTREADY, "segment \"%s\" is %lld bytes, too small to "
					   "be a tally segment, after %u ms", seg->name,
					   (long long)st.st_size, wait_ms);
		usleep(1000);
	}
	seg->dev = st.st_dev;
	seg->ino = st.st_ino;
	seg->len = (size_t)st.st_size;
	seg->base = mmap(NULL, seg->len, seg->read_only ? PROT_READ : PROT_READ | PROT_WRITE,
			 MAP_SHARED, seg->fd, 0);
	if (seg->base == MAP_FAILED) {
		seg->base = NULL;
		return tally__fail(-errno, "mmap of segment \"%s\": %s", seg->name, strerror(errno));
	}
	return 0;
}

TALLY_API int tally_segment_open(const char *name, enum tally_open_mode mode, uint32_t wait_ms,
				 struct tally_segment **out)
{
	char path[TALLY_NAME_MAX + 2];
	struct tally_segment *seg;
	int rc;

	tally__clear_errmsg();
	*out = NULL;
	if ((rc = tally_segment_name_validate(name)))
		return rc;
	if (mode != TALLY_OPEN_PRODUCER && mode != TALLY_OPEN_READER)
		return tally__fail(-EINVAL, "open mode %d is neither producer nor reader", (int)mode);
	if (!(seg = seg_alloc(name)))
		return -ENOMEM;
	seg->read_only = mode == TALLY_OPEN_READER;
	shm_path(name, path, sizeof(path));
	seg->fd = shm_open(path, (seg->read_only ? O_RDONLY : O_RDWR) | O_NOFOLLOW | O_CLOEXEC, 0);
	if (seg->fd < 0) {
		rc = -errno;
		bool producer = !seg->read_only;
		seg_free(seg);
		if (rc == -ENOENT)
			return tally__fail(rc, "no segment \"%s\" in " SHM_DIR ": is its owner (tallyd -s %s) "
					   "running?", name, name);
		if (rc == -EACCES && producer && readable(path))
			return tally__fail(rc, "permission denied on " SHM_DIR "/%s for recording: its group "
					   "may read it, not write it; set group_writable = true in [segment] "
					   "of the owner's tallyd.ini (and group = a group of this user)", name);
		if (rc == -EACCES)
			return tally__fail(rc, "permission denied on " SHM_DIR "/%s: it belongs to another "
					   "user; run as that user or ask its owner for group access", name);
		return tally__fail(rc, "cannot open segment \"%s\": %s", name, strerror(-rc));
	}
	if ((rc = map_existing(seg, wait_ms)) || (rc = wait_ready(seg, wait_ms)) ||
	    (rc = check_header(seg))) {
		seg_free(seg);
		return rc;
	}
	seg->hdr = tally__seg_hdr(seg);
	if (!seg->read_only && (rc = tally__follow_init(seg)) != 0) {
		seg_free(seg);
		return rc;
	}
	*out = seg;
	return 0;
}

TALLY_API void tally_segment_keep(struct tally_segment *seg, bool keep)
{
	seg->keep = keep;
}

TALLY_API int tally_segment_unlink(const char *name)
{
	char path[TALLY_NAME_MAX + 2];

	if (tally_segment_name_validate(name))
		return TALLY_EBADNAME;
	shm_path(name, path, sizeof(path));
	return shm_unlink(path) == 0 ? 0 : -errno;
}

/* Does the name still refer to the object this handle maps? */
static bool still_ours(const struct tally_segment *seg)
{
	char path[sizeof(SHM_DIR) + TALLY_NAME_MAX + 2];
	struct stat st;

	snprintf(path, sizeof(path), SHM_DIR "/%s", seg->name);
	return lstat(path, &st) == 0 && st.st_dev == seg->dev && st.st_ino == seg->ino;
}

TALLY_API void tally_segment_close(struct tally_segment **segp)
{
	struct tally_segment *seg = segp ? *segp : NULL;

	if (!seg)
		return;
	TALLY__ASSERT(seg->magic == TALLY__SEGMENT_MAGIC);
	/* Handles still attached would write into memory about to be
	 * unmapped: revoke them (their records become lost, counted). */
	seg->revoked_at_close |= tally__producers_revoke_segment(seg) > 0;
	tally__follow_free(seg);
	/* Only the owner process itself: a fork child closing its copy of
	 * the owner's handle must not stop or unlink the owner's segment. */
	if (seg->is_owner && seg->hdr && getpid() == seg->owner_pid) {
		atomic_store_explicit(&seg->hdr->owner_state, TALLY__OWNER_STOPPED, memory_order_release);
		if (!seg->keep && still_ours(seg))
			tally_segment_unlink(seg->name);
	}
	seg_free(seg);
	*segp = NULL;
}

TALLY_API int tally_segment_owner_alive(const struct tally_segment *seg)
{
	/* The owner's own handle: this process is the owner and it is running.
	 * Not owner_state, which every producer can overwrite. */
	if (seg->is_owner && getpid() == seg->owner_pid)
		return 1;
	if (!still_ours(seg))
		return TALLY_EREPLACED;
	if (atomic_load_explicit(&seg->hdr->owner_state, memory_order_acquire) != TALLY__OWNER_RUNNING)
		return 0;
	return tally__proc_alive(seg->owner_pid, seg->owner_start_time) ? 1 : 0;
}

TALLY_API int tally_segment_info(const struct tally_segment *seg, struct tally_segment_info *o)
{
	memset(o, 0, sizeof(*o));
	snprintf(o->name, sizeof(o->name), "%s", seg->name);
	o->abi_major = TALLY__ABI_MAJOR;
	o->abi_minor = seg->hdr->abi_minor;
	o->total_size = seg->len;
	o->owner_pid = seg->owner_pid;
	o->owner_start_time = seg->owner_start_time;
	o->generation = seg->generation;
	o->created_ns = seg->created_ns;
	o->owner_heartbeat_ns = atomic_load_explicit(&seg->hdr->owner_heartbeat_ns, memory_order_relaxed);
	int alive = tally_segment_owner_alive(seg);
	o->owner_alive = alive == 1;
	o->owner_stopped = atomic_load_explicit(&seg->hdr->owner_state, memory_order_relaxed) ==
			   TALLY__OWNER_STOPPED;
	o->read_only = seg->read_only;
	o->is_owner = seg->is_owner;
	tally_segment_config_init(&o->config);
	o->config.producer_slots = seg->nslots;
	o->config.remote_capacity = seg->remote_cap;
	o->config.ring_capacity = seg->ring_cap;
	o->config.subject_capacity = seg->subject_cap;
	o->config.pending_capacity = seg->pending_cap;
	o->config.max_value_ns = seg->max_value_ns;
	o->config.producer_cooloff_ms = seg->cooloff_ms;
	o->config.group_readable = (seg->hdr->mode & 0040) != 0;
	o->config.group_writable = (seg->hdr->mode & 0020) != 0;
	o->subjects_used = atomic_load_explicit(&seg->hdr->subjects_used, memory_order_relaxed);
	o->subjects.off = seg->subjects.off;
	o->subjects.size = seg->subjects.size;
	o->slots.off = seg->slots.off;
	o->slots.size = seg->slots.size;
	o->pending.off = seg->pending.off;
	o->pending.size = seg->pending.size;
	o->snapshot.off = seg->snapshot.off;
	o->snapshot.size = seg->snapshot.size;
	o->remote.off = seg->remote.off;
	o->remote.size = seg->remote.size;
	o->rules.off = seg->rules.off;
	o->rules.size = seg->rules.size;
	o->slot_stride = seg->slot_stride;
	return alive < 0 && alive != TALLY_EREPLACED ? alive : 0;
}
