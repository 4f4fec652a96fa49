/* SPDX-License-Identifier: MIT */
/*
 * fuzz_segment.c: libFuzzer target for everything that reads a segment
 * found in /dev/shm: tally_segment_open() and its header checks, then every
 * reader of every section. A hostile or corrupt segment must give an
 * error, never a crash, a hang, an out-of-bounds access or a write through
 * the read-only mapping (ASan + UBSan; a write would fault).
 *
 * Each input becomes the whole content of one shm object, written into a
 * name of this process ("tally-fuzz-<pid>", reused, unlinked at exit;
 * run-fuzz removes the ones a crashed run leaves), which is then opened
 * with TALLY_OPEN_READER. If it opens, the target calls
 * tally_segment_info, tally_segment_owner_alive, tally_subject_name and
 * tally_subject_lookup for every id (and ids past the end),
 * tally_read_subject for every id, tally_read_producers,
 * tally_read_consumers, tally_read_poller, and the pending-table readers
 * under them (tally__pending_check / read_entry / read_breaker /
 * for_subject) on the pending section, and checks what the API
 * promises about the results (sections inside the mapping, names valid,
 * strings terminated, counts bounded).
 *
 * Input format. Byte 0 selects the mode:
 *   (b0 & 3) == 0   RAW: the rest of the input is the object, any size.
 *                   Arbitrary bytes almost never pass the magic, ABI and
 *                   layout checks, so this mode mostly covers open().
 *   otherwise       PATCH: start from a valid segment image (created once
 *                   per process with tally_segment_create and a small
 *                   config, with subjects interned, a producer slot in
 *                   use, two pending entries, the breaker and a published
 *                   snapshot), apply the rest of the input as a list of
 *                   operations, then present the result. This reaches the
 *                   readers with corrupt-but-plausible segments.
 *   (b0 & 4)        also open it TALLY_OPEN_PRODUCER afterwards: intern
 *                   subjects, attach a producer, record past the ring's
 *                   capacity (drops, clamps), detach. The producer must
 *                   write only inside the table entry it claims and its
 *                   own slot (ASan sees only the mapping; the invariant
 *                   checked is "no crash, errors are errors").
 * PATCH operations (opcode byte k, then operands, little-endian; an
 * operand cut short by the end of the input reads as zeros):
 *   k%6 == 0  WRITE  off:u32 n:u8 bytes[n%64+1]   raw bytes at off % size
 *   k%6 == 1  FIELD  f:u16 v:u8 [raw:u64]         set a known field (the
 *             table below: every header word, subject entries, slot
 *             control words and positions, pending header, breaker and
 *             entries, snapshot header, meta and entry flags) to
 *             interesting[v] or, if v & 0x80, to the raw u64 that follows
 *   k%6 == 2  ADD    f:u16 d:i8                   add d to a known field
 *   k%6 == 3  FILL   off:u32 n:u16 c:u8           memset
 *   k%6 == 4  COPY   src:u32 dst:u32 n:u16        memmove within the image
 *             (duplicate subject entries, pending entries, slots...)
 *   k%6 == 5  RESIZE s:u32                        object size = s % (2 x
 *             image + 1): truncated or zero-extended
 *
 * Lookups and interning wait up to 200 ms on a subject entry in state
 * CLAIMED (a writer in another process that is still copying the name:
 * bounded by design, see lib/subject.c). A fuzzer would make that its
 * most common case, so this target skips tally_subject_lookup and
 * tally_subject_intern when any entry of the mapped table is CLAIMED
 * (checked on the raw bytes); the other readers still run on it.
 *
 * Run: tests/fuzz/run-fuzz BUILD_DIR (builds it, replays the kept inputs,
 * fuzzes for FUZZ_SECONDS); then to fuzz longer or replay one input:
 *   BUILD_DIR/fuzz_segment -max_len=32768 NEW_DIR tests/fuzz/corpus/fuzz_segment
 *   BUILD_DIR/fuzz_segment tests/fuzz/regress/fuzz_segment/FILE
 * TALLY_FUZZ_VERBOSE=1 prints the image's size, its field count and the
 * ids of its subjects (tests/fuzz/make-seeds relies on that numbering).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <tally/tally.h>

#include "pending.h"
#include "rules.h"
#include "segment.h"
#include "shm_layout.h"
#include "snapshot.h"

/* A broken promise of the API: abort so that libFuzzer records the input. */
/* libFuzzer's entry points. */
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define EXPECT(cond)                                                              \
	do {                                                                      \
		if (!(cond)) {                                                    \
			fprintf(stderr, "fuzz_segment: %s:%d: expectation failed: %s\n", \
				__FILE__, __LINE__, #cond);                       \
			abort();                                                  \
		}                                                                 \
	} while (0)

struct field {
	uint32_t off;
	uint8_t width; /* 1, 2, 4 or 8 */
};

static char g_name[64];
static int g_fd = -1;
static unsigned char *g_image; /* the valid segment */
static size_t g_image_len;
static unsigned char *g_work; /* 2 x g_image_len */
static struct field g_fields[1024];
static uint32_t g_nfields;
static struct tally_producer_stats g_prod[4096];
static struct tally_consumer_stats g_cons[64];

static const uint64_t interesting[] = {
	0, 1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 17, 63, 64, 65, 127, 128, 255, 256, 272, 1023, 1024,
	4095, 4096, 4097, 8192, 0x7fff, 0x8000, 0xffff, 0x10000, 65537, 1u << 20, (1u << 20) + 1,
	1u << 24, (1u << 24) + 1, 0x7fffffff, 0x80000000u, 0xffffffffu, 1ull << 32, 0x7fffffffffffffffull,
	0x8000000000000000ull, 0xffffffffffffffffull, 0xfffffffffffff000ull, TALLY__MAGIC, TALLY__READY,
	TALLY__PENDING_MAGIC, TALLY__SNAP_MAGIC, 0x2e2e2e2e2e2e2e2eull /* "........" */,
	0x2a2e2a2e2a2e2a2eull /* ".*.*.*.*" */, 0x3e2e3e2e3e2e3e2eull /* ".>.>.>.>" */,
	0x6161616161616161ull /* "aaaaaaaa" */,
};
#define N_INTERESTING (sizeof(interesting) / sizeof(interesting[0]))

/* ---- reading the input ---------------------------------------------------- */

struct in {
	const uint8_t *p;
	size_t n;
};

static uint64_t take(struct in *in, unsigned bytes)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < bytes; i++) {
		uint64_t b = in->n ? (in->n--, *in->p++) : 0;
		v |= b << (8 * i);
	}
	return v;
}

/* ---- the valid image -------------------------------------------------------- */

static void add_field(uint64_t off, unsigned width)
{
	if (g_nfields < sizeof(g_fields) / sizeof(g_fields[0]))
		g_fields[g_nfields++] = (struct field){ (uint32_t)off, (uint8_t)width };
}

#define F(base, type, member) \
	add_field((base) + offsetof(type, member), sizeof(((type *)0)->member))
#define FW(base, type, member, idx) \
	add_field((base) + offsetof(type, member) + 8u * (idx), 8)

static void fields_header(void)
{
	F(0, struct tally__shm_hdr, magic);
	F(0, struct tally__shm_hdr, abi_major);
	F(0, struct tally__shm_hdr, abi_minor);
	F(0, struct tally__shm_hdr, total_size);
	F(0, struct tally__shm_hdr, hdr_size);
	F(0, struct tally__shm_hdr, flags);
	F(0, struct tally__shm_hdr, owner_pid);
	F(0, struct tally__shm_hdr, mode);
	F(0, struct tally__shm_hdr, owner_start_time);
	F(0, struct tally__shm_hdr, generation);
	F(0, struct tally__shm_hdr, nslots);
	F(0, struct tally__shm_hdr, ring_cap);
	F(0, struct tally__shm_hdr, subject_cap);
	F(0, struct tally__shm_hdr, pending_cap);
	F(0, struct tally__shm_hdr, max_value_ns);
	F(0, struct tally__shm_hdr, cooloff_ms);
	F(0, struct tally__shm_hdr, slot_stride);
	F(0, struct tally__shm_hdr, subject_entry_size);
	F(0, struct tally__shm_hdr, subjects.off);
	F(0, struct tally__shm_hdr, subjects.size);
	F(0, struct tally__shm_hdr, slots.off);
	F(0, struct tally__shm_hdr, slots.size);
	F(0, struct tally__shm_hdr, pending.off);
	F(0, struct tally__shm_hdr, pending.size);
	F(0, struct tally__shm_hdr, snapshot.off);
	F(0, struct tally__shm_hdr, snapshot.size);
	F(0, struct tally__shm_hdr, owner_heartbeat_ns);
	F(0, struct tally__shm_hdr, owner_state);
	F(0, struct tally__shm_hdr, subjects_used);
	F(0, struct tally__shm_hdr, ready);
}

static void fields_subjects_slots(const struct tally_segment *seg)
{
	for (uint32_t i = 0; i < seg->table_size; i++) {
		uint64_t b = seg->subjects.off + (uint64_t)i * sizeof(struct tally__shm_subject);
		F(b, struct tally__shm_subject, state);
		F(b, struct tally__shm_subject, hash);
		F(b, struct tally__shm_subject, claimer_pid);
		F(b, struct tally__shm_subject, len);
		add_field(b + offsetof(struct tally__shm_subject, name), 8);
		add_field(b + offsetof(struct tally__shm_subject, name) + 248, 8);
	}
	for (uint32_t i = 0; i < seg->nslots; i++) {
		uint64_t b = seg->slots.off + (uint64_t)i * seg->slot_stride;
		F(b, struct tally__slot, ctl.lease);
		F(b, struct tally__slot, ctl.ident);
		F(b, struct tally__slot, ctl.tid);
		F(b, struct tally__slot, ctl.birth);
		F(b, struct tally__slot, ctl.base);
		F(b, struct tally__slot, tail);
		F(b, struct tally__slot, head);
		F(b, struct tally__slot, dropped);
		F(b, struct tally__slot, clamped);
	}
}

static void fields_pending(const struct tally_segment *seg)
{
	uint64_t b = seg->pending.off;
	uint64_t br = b + sizeof(struct tally__pending_header);
	uint64_t en = br + sizeof(struct tally__pending_breaker);

	F(b, struct tally__pending_header, magic);
	F(b, struct tally__pending_header, version);
	F(b, struct tally__pending_header, header_size);
	F(b, struct tally__pending_header, breaker_size);
	F(b, struct tally__pending_header, entry_size);
	F(b, struct tally__pending_header, capacity);
	F(b, struct tally__pending_header, section_size);
	F(br, struct tally__pending_breaker, seq);
	F(br, struct tally__pending_breaker, state);
	FW(br, struct tally__pending_breaker, last_error, TALLY__PENDING_ERR_MAX / 8 - 1);
	for (uint32_t i = 0; i < seg->pending_cap; i++) {
		uint64_t e = en + (uint64_t)i * sizeof(struct tally__pending_entry);
		F(e, struct tally__pending_entry, seq);
		F(e, struct tally__pending_entry, used);
		F(e, struct tally__pending_entry, source);
		F(e, struct tally__pending_entry, is_leader);
		F(e, struct tally__pending_entry, num_pending);
		F(e, struct tally__pending_entry, num_ack_pending);
		F(e, struct tally__pending_entry, last_ok_ns);
		FW(e, struct tally__pending_entry, stream, TALLY__PENDING_NAME_MAX / 8 - 1);
		FW(e, struct tally__pending_entry, consumer, TALLY__PENDING_NAME_MAX / 8 - 1);
		FW(e, struct tally__pending_entry, filter, 0);
		FW(e, struct tally__pending_entry, filter, TALLY__PENDING_SUBJ_MAX / 8 - 1);
		FW(e, struct tally__pending_entry, map, 0);
		FW(e, struct tally__pending_entry, map, TALLY__PENDING_SUBJ_MAX / 8 - 1);
		FW(e, struct tally__pending_entry, last_error, TALLY__PENDING_ERR_MAX / 8 - 1);
	}
}

static void fields_rules(const struct tally_segment *seg)
{
	uint64_t b = seg->rules.off;
	uint64_t e0 = b + sizeof(struct tally__rules_hdr);

	F(b, struct tally__rules_hdr, magic);
	F(b, struct tally__rules_hdr, capacity);
	F(b, struct tally__rules_hdr, entry_size);
	F(b, struct tally__rules_hdr, seq);
	F(b, struct tally__rules_hdr, count);
	F(b, struct tally__rules_hdr, gen);
	for (uint64_t i = 0; i < 3; i++) {
		uint64_t e = e0 + i * sizeof(struct tally__rules_entry);
		FW(e, struct tally__rules_entry, pattern, 0);
		FW(e, struct tally__rules_entry, pattern, TALLY__RULES_PATTERN_WORDS - 1);
		FW(e, struct tally__rules_entry, w, TALLY__RW_STALE_POLICY);
		FW(e, struct tally__rules_entry, w, TALLY__RW_CLEAR_RATIO_PPM);
	}
}

static void fields_snapshot(const struct tally_segment *seg)
{
	uint64_t b = seg->snapshot.off;
	uint64_t entries = b + sizeof(struct tally__snap_hdr);

	F(b, struct tally__snap_hdr, magic);
	F(b, struct tally__snap_hdr, nentries);
	F(b, struct tally__snap_hdr, entry_size);
	F(b, struct tally__snap_hdr, seq);
	for (int c = 0; c < 2; c++) {
		F(b, struct tally__snap_hdr, meta[c].published_mono_ns);
		F(b, struct tally__snap_hdr, meta[c].window_ns);
		F(b, struct tally__snap_hdr, meta[c].reserved[0]);
	}
	for (uint32_t c = 0; c < 2; c++)
		for (uint32_t i = 0; i < seg->table_size; i++) {
			uint64_t e = entries + ((uint64_t)c * seg->table_size + i) * sizeof(struct tally__snap_entry);
			add_field(e + 8u * TALLY__SW_FLAGS, 8);
			add_field(e + 8u * TALLY__SW_COUNT, 8);
		}
}

/* Give the image something in every section for the readers to walk. */
static void populate(struct tally_segment *seg)
{
	static const char *const subjects[] = { "orders.eu", "orders.us", "a.b.c", "fuzz" };
	tally_subject_t ids[4];
	struct tally__snap_writer w;
	void *pend = tally__seg_section(seg, &seg->pending);
	uint64_t now = tally__pending_now_ns();

	for (int i = 0; i < 4; i++)
		if (tally_subject_intern(seg, subjects[i], &ids[i]) != 0) {
			fprintf(stderr, "fuzz_segment: intern: %s\n", tally_errmsg());
			abort();
		}
	tally__pending_write_entry(tally__pending_entry_at(pend, 0), &(struct tally__pending_values){
		.source = TALLY__PENDING_LIVE, .is_leader = 1, .num_pending = 10, .num_ack_pending = 5,
		.last_ok_ns = now, .stream = "ORDERS", .consumer = "c1", .filter = "orders.*",
		.map = "", .last_error = "" });
	tally__pending_write_entry(tally__pending_entry_at(pend, 1), &(struct tally__pending_values){
		.source = TALLY__PENDING_CACHED, .is_leader = -1, .num_pending = 7, .last_ok_ns = 0,
		.stream = "A", .consumer = "c2", .filter = "", .map = "a.>", .last_error = "timeout" });
	tally__pending_write_breaker(tally__pending_breaker_at(pend), &(struct tally__pending_breaker_view){
		.state = TALLY__BREAKER_HALF_OPEN, .consecutive_failures = 3, .connected = true,
		.last_error = "no responders" });
	struct tally_thresholds *t = tally_thresholds_new();
	struct tally_threshold_rule r;
	tally_threshold_rule_init(&r);
	if (!t || tally_thresholds_add(t, "orders.*", &r) || tally_thresholds_add(t, "a.>", &r))
		abort();
	tally__rules_write(tally__seg_section(seg, &seg->rules), t, 1);
	tally_thresholds_free(&t);
	tally__snapshot_writer_init(&w, tally__seg_section(seg, &seg->snapshot), seg->table_size);
	for (int half = 0; half < 2; half++) {
		uint32_t c = tally__snapshot_write_begin(&w);
		for (int i = 0; i < 4; i++) {
			_Atomic uint64_t *e = w.copies[c][ids[i]].w;
			tally__snapshot_store(&e[TALLY__SW_FLAGS], TALLY__SF_PRESENT | (i ? TALLY__SF_QUANTILES : 0));
			tally__snapshot_store(&e[TALLY__SW_COUNT], i ? 100u * (unsigned)i : 0);
			tally__snapshot_store(&e[TALLY__SW_SUM], 12345);
			tally__snapshot_store(&e[TALLY__SW_P95], 1000);
			tally__snapshot_store(&e[TALLY__SW_RULE], 1ull << 32 | (uint64_t)(i % 3 + 1));
		}
		tally__snapshot_store(&w.hdr->meta[c].published_mono_ns, now);
		tally__snapshot_store(&w.hdr->meta[c].window_ns, 10000000000ull);
		tally__snapshot_store(&w.hdr->meta[c].reserved[0], 1000000000ull);
	}
	struct tally__slot *s = tally__seg_slot(seg, 0);
	atomic_store(&s->ctl.lease, tally__lease(1, TALLY__SLOT_ACTIVE));
	atomic_store(&s->ctl.ident, tally__ident(1, (int32_t)getpid()));
	atomic_store(&s->ctl.tid, (int32_t)getpid());
	atomic_store(&s->tail, 70);
	atomic_store(&s->head, 10);
	atomic_store(&s->ctl.base, 3);
	atomic_store(&tally__seg_slot(seg, 1)->ctl.lease, tally__lease(1, TALLY__SLOT_COOLING));
}

static void make_image(void)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg = NULL;
	char name[64];

	tally_segment_config_init(&cfg);
	cfg.producer_slots = 3; /* 0 active, 1 cooling, 2 free (for as_producer) */
	cfg.ring_capacity = 64;
	cfg.subject_capacity = 4;
	cfg.pending_capacity = 2;
	snprintf(name, sizeof(name), "tally-fuzz-img-%d", (int)getpid());
	if (tally_segment_create(name, &cfg, TALLY_CREATE_REPLACE_DEAD, &seg) != 0) {
		fprintf(stderr, "fuzz_segment: cannot create %s: %s\n", name, tally_errmsg());
		abort();
	}
	populate(seg);
	g_image_len = seg->len;
	g_image = malloc(g_image_len);
	g_work = calloc(2, g_image_len);
	if (!g_image || !g_work)
		abort();
	memcpy(g_image, seg->base, g_image_len);
	fields_header();
	fields_subjects_slots(seg);
	fields_pending(seg);
	fields_snapshot(seg);
	fields_rules(seg);
	if (getenv("TALLY_FUZZ_VERBOSE")) {
		fprintf(stderr, "fuzz_segment: image %zu bytes, %u fields, table %u, slots %u, "
			"pending %u; subject ids:", g_image_len, g_nfields, seg->table_size, seg->nslots,
			seg->pending_cap);
		for (uint32_t i = 0; i < seg->table_size; i++)
			if (tally__seg_subject(seg, i)->state == TALLY__SUBJ_READY)
				fprintf(stderr, " %u=%s", i, tally__seg_subject(seg, i)->name);
		fputc('\n', stderr);
	}
	tally_segment_close(&seg); /* owner close: unlinks the name */
}

static void cleanup(void)
{
	char path[80];

	if (g_fd >= 0) {
		snprintf(path, sizeof(path), "/%s", g_name);
		shm_unlink(path);
	}
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	char path[80];

	(void)argc;
	(void)argv;
	make_image();
	snprintf(g_name, sizeof(g_name), "tally-fuzz-%d", (int)getpid());
	snprintf(path, sizeof(path), "/%s", g_name);
	shm_unlink(path);
	g_fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (g_fd < 0) {
		perror("fuzz_segment: shm_open");
		abort();
	}
	atexit(cleanup);
	return 0;
}

/* ---- patches ---------------------------------------------------------------- */

static void put(unsigned char *buf, size_t size, uint64_t off, unsigned width, uint64_t v)
{
	if (off + width > size)
		return;
	memcpy(buf + off, &v, width); /* little-endian host: the low bytes */
}

static uint64_t get(const unsigned char *buf, size_t size, uint64_t off, unsigned width)
{
	uint64_t v = 0;

	if (off + width <= size)
		memcpy(&v, buf + off, width);
	return v;
}

static size_t apply_ops(struct in *in)
{
	size_t size = g_image_len, max = 2 * g_image_len;

	memcpy(g_work, g_image, g_image_len);
	memset(g_work + g_image_len, 0, g_image_len);
	while (in->n) {
		unsigned k = (unsigned)take(in, 1) % 6;
		if (k == 0) { /* WRITE */
			uint64_t off = take(in, 4) % size;
			size_t n = (size_t)take(in, 1) % 64 + 1;
			for (size_t i = 0; i < n && off + i < size; i++)
				g_work[off + i] = (unsigned char)take(in, 1);
		} else if (k == 1 || k == 2) { /* FIELD, ADD */
			const struct field *f = &g_fields[take(in, 2) % g_nfields];
			uint64_t v;
			if (k == 1) {
				unsigned sel = (unsigned)take(in, 1);
				v = sel & 0x80 ? take(in, 8) : interesting[sel % N_INTERESTING];
			} else {
				v = get(g_work, size, f->off, f->width) + (uint64_t)(int64_t)(int8_t)take(in, 1);
			}
			put(g_work, size, f->off, f->width, v);
		} else if (k == 3) { /* FILL */
			uint64_t off = take(in, 4) % size;
			size_t n = (size_t)take(in, 2);
			int c = (int)take(in, 1);
			memset(g_work + off, c, n < size - off ? n : size - off);
		} else if (k == 4) { /* COPY */
			uint64_t src = take(in, 4) % size, dst = take(in, 4) % size;
			size_t n = (size_t)take(in, 2);
			if (n > size - src)
				n = size - src;
			if (n > size - dst)
				n = size - dst;
			memmove(g_work + dst, g_work + src, n);
		} else { /* RESIZE */
			size_t s = (size_t)(take(in, 4) % (max + 1));
			if (s > size)
				memset(g_work + size, 0, s - size);
			size = s ? s : 1;
		}
	}
	return size;
}

/* ---- presenting and reading ---------------------------------------------------- */

static bool present(const unsigned char *buf, size_t size)
{
	if (ftruncate(g_fd, (off_t)size) != 0)
		return false;
	for (size_t done = 0; done < size;) {
		ssize_t n = pwrite(g_fd, buf + done, size - done, (off_t)done);
		if (n <= 0)
			return false;
		done += (size_t)n;
	}
	return true;
}

static bool any_claimed(const struct tally_segment *seg)
{
	for (uint32_t i = 0; i < seg->table_size; i++)
		if (atomic_load_explicit(&tally__seg_subject(seg, i)->state, memory_order_relaxed) ==
		    TALLY__SUBJ_CLAIMED)
			return true;
	return false;
}

static void check_info(const struct tally_segment *seg)
{
	struct tally_segment_info info;

	(void)tally_segment_info(seg, &info);
	int alive = tally_segment_owner_alive(seg);
	EXPECT(alive == 0 || alive == 1 || alive < 0);
	EXPECT(info.total_size == seg->len);
	EXPECT(info.subjects.off + info.subjects.size <= info.total_size);
	EXPECT(info.slots.off + info.slots.size <= info.total_size);
	EXPECT(info.pending.off + info.pending.size <= info.total_size);
	EXPECT(info.snapshot.off + info.snapshot.size <= info.total_size);
	EXPECT(info.slots.size == (uint64_t)info.config.producer_slots * info.slot_stride);
	EXPECT(tally_subject_capacity(seg) * sizeof(struct tally__shm_subject) <= info.subjects.size);
}

static const char *const probe_names[] = {
	"orders.eu", "orders.us", "a.b.c", "fuzz", "nope", "a.b", "orders", "", "a..b", "*", "a.>",
};

static void check_subjects(const struct tally_segment *seg)
{
	uint32_t cap = tally_subject_capacity(seg);
	bool lookups = !any_claimed(seg);
	char buf[TALLY_SUBJECT_MAX + 1], small[4];
	struct tally_subject_stats st;
	tally_subject_t id2;

	for (uint64_t id = 0; id <= (uint64_t)cap + 2; id++) {
		int rc = tally_subject_name(seg, (tally_subject_t)id, buf, sizeof(buf));
		EXPECT(rc == 0 || rc == -ENOENT || rc == TALLY_ECORRUPT);
		if (id >= cap)
			EXPECT(rc == -ENOENT);
		if (rc == 0) {
			size_t n = strlen(buf);
			EXPECT(n >= 1 && n <= TALLY_SUBJECT_MAX);
			EXPECT(tally_subject_validate(buf, false) == 0);
			rc = tally_subject_name(seg, (tally_subject_t)id, small, sizeof(small));
			EXPECT(rc == (n < sizeof(small) ? 0 : -ENOSPC));
			if (lookups) {
				rc = tally_subject_lookup(seg, buf, &id2);
				EXPECT(rc == 0 || rc == -ENOENT);
				if (rc == 0)
					EXPECT(id2 < cap);
			}
		}
		rc = tally_read_subject(seg, (tally_subject_t)id, &st);
		EXPECT(rc == 0 || rc == -ENOENT || rc == TALLY_ESTALE || rc == TALLY_EBUSY_RETRY);
		if (rc == 0 || rc == TALLY_ESTALE)
		{
			char who[TALLY_PENDING_CONSUMER_MAX];
			EXPECT(st.id == id && st.verdict <= TALLY_VERDICT_OVERLOAD &&
			       st.pending_source <= TALLY_PENDING_NOT_FOUND);
			int nrc = tally_pending_consumer_name(seg, &st, who, sizeof(who));
			EXPECT(nrc <= 0 && memchr(who, 0, sizeof(who)));
			struct tally_rule_info ri;
			int rrc = tally_read_rule(seg, &st, &ri);
			EXPECT(rrc == 0 || rrc == -ENOENT || rrc == -ESTALE || rrc == -EAGAIN || rrc == TALLY_ECORRUPT);
			if (rrc == 0)
				EXPECT(memchr(ri.pattern, 0, sizeof(ri.pattern)) && ri.is_default == !ri.pattern[0] &&
				       (ri.is_default || tally_subject_validate(ri.pattern, true) == 0) &&
				       ri.levels.clear_ratio > 0 && ri.levels.clear_ratio <= 1);
		}
		if (id >= cap)
			EXPECT(rc == -ENOENT);
	}
	EXPECT(tally_subject_name(seg, UINT32_MAX, buf, sizeof(buf)) == -ENOENT);
	EXPECT(tally_read_subject(seg, UINT32_MAX, &st) == -ENOENT);
	for (size_t i = 0; lookups && i < sizeof(probe_names) / sizeof(probe_names[0]); i++) {
		int rc = tally_subject_lookup(seg, probe_names[i], &id2);
		EXPECT(rc == 0 || rc == -ENOENT || rc == TALLY_EBADNAME);
		if (rc == 0)
			EXPECT(id2 < cap);
	}
}

static void check_producers(const struct tally_segment *seg)
{
	uint32_t n = seg->nslots < 4096 ? seg->nslots : 4096;
	int rc = tally_read_producers(seg, g_prod, n);

	EXPECT(rc >= 0 && (uint32_t)rc <= n);
	for (int i = 0; i < rc; i++) {
		EXPECT(g_prod[i].slot < seg->nslots);
		EXPECT(g_prod[i].state != NULL);
		EXPECT(g_prod[i].backlog <= seg->ring_cap);
	}
	rc = tally_read_producers(seg, g_prod, 1);
	EXPECT(rc == 0 || rc == 1);
	EXPECT(tally_read_producers(seg, g_prod, 0) == 0);
}

static void check_view_strings(const struct tally__pending_view *v)
{
	EXPECT(memchr(v->stream, 0, sizeof(v->stream)) && memchr(v->consumer, 0, sizeof(v->consumer)));
	EXPECT(memchr(v->filter, 0, sizeof(v->filter)) && memchr(v->map, 0, sizeof(v->map)));
	EXPECT(memchr(v->last_error, 0, sizeof(v->last_error)));
	EXPECT(v->source <= TALLY__PENDING_SOURCE_MAX);
}

static void check_pending(const struct tally_segment *seg)
{
	const void *sec = tally__seg_section(seg, &seg->pending);
	size_t len = seg->pending.size;
	struct tally__pending_view v;
	struct tally__pending_breaker_view b;
	struct tally__pending_result r;
	int cap = tally__pending_check(sec, len);

	EXPECT(cap == -EBADMSG || (cap > 0 && tally__pending_section_size((uint32_t)cap) <= len));
	for (uint32_t i = 0; cap > 0 && i < (uint32_t)cap; i++) {
		int rc = tally__pending_read_entry(sec, len, i, &v);
		EXPECT(rc == 0 || rc == -ENOENT || rc == -EBADMSG || rc == -EAGAIN);
		if (rc == 0) {
			check_view_strings(&v);
			EXPECT(v.is_leader >= -1 && v.is_leader <= 1);
		}
	}
	int rc = tally__pending_read_entry(sec, len, cap > 0 ? (uint32_t)cap : 0, &v);
	EXPECT(rc == (cap > 0 ? -ERANGE : -EBADMSG));
	rc = tally__pending_read_entry(sec, len, UINT32_MAX, &v);
	EXPECT(rc == (cap > 0 ? -ERANGE : -EBADMSG));
	rc = tally__pending_read_breaker(sec, len, &b);
	EXPECT(rc == 0 || rc == -EBADMSG || rc == -EAGAIN);
	if (rc == 0)
		EXPECT(b.state <= TALLY__BREAKER_HALF_OPEN && memchr(b.last_error, 0, sizeof(b.last_error)));
	for (size_t i = 0; i < sizeof(probe_names) / sizeof(probe_names[0]); i++) {
		rc = tally__pending_for_subject(sec, len, probe_names[i], NULL, &r);
		EXPECT(rc == 0 || rc == -EBADMSG || rc == -EAGAIN);
		if (rc != -EBADMSG || cap > 0)
			EXPECT(r.source <= TALLY__PENDING_SOURCE_MAX && r.matched <= (uint32_t)cap &&
			       r.counted <= r.matched && (r.top == UINT32_MAX || r.top < (uint32_t)cap));
	}
	/* The public readers of the same section. */
	uint32_t n = seg->pending_cap < 64 ? seg->pending_cap : 64;
	struct tally_poller_stats ps;
	rc = tally_read_consumers(seg, g_cons, n);
	EXPECT((rc >= 0 && (uint32_t)rc <= n) || rc == TALLY_ECORRUPT || rc == TALLY_EBUSY_RETRY);
	for (int i = 0; i < rc; i++)
		EXPECT(g_cons[i].source && memchr(g_cons[i].filter, 0, sizeof(g_cons[i].filter)) &&
		       g_cons[i].is_leader >= -1 && g_cons[i].is_leader <= 1);
	rc = tally_read_poller(seg, &ps);
	EXPECT(rc == 0 || rc == TALLY_ECORRUPT || rc == TALLY_EBUSY_RETRY);
	if (rc == 0)
		EXPECT(ps.breaker && memchr(ps.last_error, 0, sizeof(ps.last_error)));
	/* The snapshot section's own check must not read outside it either. */
	(void)tally__snapshot_check(tally__seg_section(seg, &seg->snapshot), seg->snapshot.size,
				    seg->table_size);
}

static void as_reader(void)
{
	struct tally_segment *seg = NULL;
	int rc = tally_segment_open(g_name, TALLY_OPEN_READER, 0, &seg);

	if (rc != 0) {
		EXPECT(rc < 0 && seg == NULL && tally_errmsg()[0] != '\0');
		return;
	}
	check_info(seg);
	check_subjects(seg);
	check_producers(seg);
	check_pending(seg);
	tally_segment_close(&seg);
	EXPECT(seg == NULL);
}

static void as_producer(void)
{
	static const char *const names[] = { "fuzz.new", "orders.eu", "x.y.z" };
	struct tally_segment *seg = NULL;
	struct tally_producer *p = NULL;
	struct tally_producer_counters c;
	tally_subject_t id = 0;

	if (tally_segment_open(g_name, TALLY_OPEN_PRODUCER, 0, &seg) != 0)
		return;
	for (size_t i = 0; !any_claimed(seg) && i < sizeof(names) / sizeof(names[0]); i++) {
		int rc = tally_subject_intern(seg, names[i], &id);
		EXPECT(rc == 0 || rc == TALLY_EFULL || rc == -EAGAIN);
		if (rc == 0)
			EXPECT(id < tally_subject_capacity(seg));
	}
	if (tally_producer_attach(seg, &p) == 0) {
		for (uint64_t i = 0; i < 2u * seg->ring_cap + 3; i++)
			tally_record(p, id, i * 0x0123456789abcdefull);
		tally_producer_counters(p, &c);
		EXPECT(c.slot < seg->nslots);
		EXPECT(c.recorded + c.dropped == 2u * seg->ring_cap + 3);
		tally_producer_detach(&p);
	}
	tally_segment_close(&seg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct in in = { data, size };
	unsigned mode;
	bool ok;

	if (size == 0)
		return 0;
	mode = (unsigned)take(&in, 1);
	if ((mode & 3) == 0)
		ok = present(in.p, in.n);
	else
		ok = present(g_work, apply_ops(&in));
	if (!ok)
		return 0;
	as_reader();
	if (mode & 4)
		as_producer();
	return 0;
}
