/* SPDX-License-Identifier: MIT */
/*
 * test_segment.c: creating and attaching segments: names, sizes, modes,
 * header and version checks, readiness, dead and live owners, /dev/shm
 * space, and permissions.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/helpers.h"
#include "tally/record.h"
#include "shm_layout.h"

static struct tally_segment *make(const char *name)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg = NULL;

	tt_config(&cfg);
	cr_assert_eq(tally_segment_create(name, &cfg, 0, &seg), 0, "%s", tally_errmsg());
	return seg;
}

static bool shm_exists(const char *name)
{
	char path[256];
	struct stat st;

	snprintf(path, sizeof(path), "/dev/shm/%s", name);
	return stat(path, &st) == 0;
}

Test(segment, names)
{
	cr_expect_eq(tally_segment_name_validate("tally"), 0);
	cr_expect_eq(tally_segment_name_validate("a-b_c.1"), 0);
	const char *bad[] = { "", "a/b", "..", ".", "a..b", "a b", "x\n", "ä" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_expect_eq(tally_segment_name_validate(bad[i]), TALLY_EBADNAME, "'%s'", bad[i]);
	char longname[TALLY_NAME_MAX + 2];
	memset(longname, 'a', sizeof(longname) - 1);
	longname[sizeof(longname) - 1] = '\0';
	cr_expect_eq(tally_segment_name_validate(longname), TALLY_EBADNAME);
	struct tally_segment *seg;
	cr_expect_eq(tally_segment_create("../etc", NULL, 0, &seg), TALLY_EBADNAME);
	cr_expect_eq(tally_segment_open("a/b", TALLY_OPEN_READER, 0, &seg), TALLY_EBADNAME);
}

Test(segment, create_open_info_close)
{
	const char *name = tt_segname("basic");
	struct tally_segment *seg = make(name), *rd;
	struct tally_segment_info a, b;
	struct stat st;
	char path[256];

	cr_assert_eq(tally_segment_info(seg, &a), 0);
	cr_expect_eq(a.owner_pid, getpid());
	cr_expect(a.owner_alive);
	cr_expect(a.is_owner);
	cr_expect_neq(a.generation, 0);
	cr_expect_eq(a.abi_major, TALLY__ABI_MAJOR);
	struct tally_segment_config cfg;
	tt_config(&cfg);
	cr_expect_eq(a.total_size, tally_segment_size(&cfg));
	snprintf(path, sizeof(path), "/dev/shm/%s", name);
	cr_assert_eq(stat(path, &st), 0);
	cr_expect_eq(st.st_mode & 0777, 0600, "mode %o", st.st_mode & 0777);
	cr_expect_eq((uint64_t)st.st_size, a.total_size);
	/* fully reserved: blocks allocated for the whole size */
	cr_expect_geq((uint64_t)st.st_blocks * 512, a.total_size);

	cr_assert_eq(tally_segment_open(name, TALLY_OPEN_READER, 100, &rd), 0, "%s", tally_errmsg());
	cr_assert_eq(tally_segment_info(rd, &b), 0);
	cr_expect_eq(b.generation, a.generation);
	cr_expect_eq(b.owner_pid, a.owner_pid);
	cr_expect(b.read_only);
	cr_expect(!b.is_owner);
	cr_expect_eq(tally_segment_owner_alive(rd), 1);
	tally_subject_t id;
	cr_expect_eq(tally_subject_intern(rd, "x", &id), -EROFS);
	struct tally_producer *p;
	cr_expect_eq(tally_producer_attach(rd, &p), -EROFS);

	tally_segment_close(&seg);
	cr_expect_null(seg);
	cr_expect(!shm_exists(name), "owner's close removes the name");
	cr_expect_eq(tally_segment_owner_alive(rd), TALLY_EREPLACED, "name gone: not ours any more");
	tally_segment_close(&rd);
	cr_expect_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), -ENOENT);
	cr_expect(strstr(tally_errmsg(), "is its owner"), "%s", tally_errmsg());
}

/* A producer running as another user, of the segment's group: it may
 * record into a group_writable segment (0660); into a group_readable one
 * (0640) it may not, and the error says which key to set. Forked, not
 * exec'd: the test binary need not be reachable by that user. */
static int record_as_nobody(const char *name, char *err, size_t len)
{
	int fd[2];

	if (pipe(fd) != 0)
		return -1;
	pid_t pid = fork();
	if (pid == 0) {
		struct tally_segment *seg;
		struct tally_producer *p;
		tally_subject_t id;
		close(fd[0]);
		if (setgid(65534) || setuid(65534))
			_exit(126);
		int rc = tally_segment_open(name, TALLY_OPEN_PRODUCER, 0, &seg);
		if (rc == 0 && (rc = tally_producer_attach(seg, &p)) == 0 &&
		    (rc = tally_subject_intern(seg, "as.nobody", &id)) == 0)
			rc = tally_record(p, id, 1000) ? 0 : -EAGAIN;
		if (rc != 0) {
			ssize_t w = write(fd[1], tally_errmsg(), strlen(tally_errmsg()));
			(void)w;
		}
		_exit(rc == 0 ? 0 : 1);
	}
	close(fd[1]);
	ssize_t n = read(fd[0], err, len - 1);
	err[n > 0 ? n : 0] = '\0';
	close(fd[0]);
	int st;
	waitpid(pid, &st, 0);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

Test(segment, producers_of_the_group_record_into_a_group_writable_segment)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	const char *name = tt_segname("gw");
	char path[256], err[512];
	struct stat st;

	tt_config(&cfg);
	cfg.group_writable = 1;
	cfg.group = "nogroup";
	if (geteuid() == 0)
		cr_assert_eq(tally_segment_create(name, &cfg, 0, &seg), 0, "%s", tally_errmsg());
	else { /* not root: no chgrp to a group it is not in; the mode alone */
		cfg.group = NULL;
		cr_assert_eq(tally_segment_create(name, &cfg, 0, &seg), 0, "%s", tally_errmsg());
	}
	snprintf(path, sizeof(path), "/dev/shm/%s", name);
	cr_assert_eq(stat(path, &st), 0);
	cr_expect_eq(st.st_mode & 0777, 0660);
	struct tally_segment_info info;
	cr_assert_eq(tally_segment_info(seg, &info), 0);
	cr_expect(info.config.group_writable, "the info says so");
	if (geteuid() == 0) {
		cr_expect_eq(record_as_nobody(name, err, sizeof(err)), 0, "nobody of nogroup records: %s", err);
		tally_segment_close(&seg);
		tt_config(&cfg);
		cfg.group_readable = 1;
		cfg.group = "nogroup";
		cr_assert_eq(tally_segment_create(name, &cfg, 0, &seg), 0, "%s", tally_errmsg());
		cr_expect_eq(record_as_nobody(name, err, sizeof(err)), 1, "0640: the group may not record");
		cr_expect(strstr(err, "permission denied") && strstr(err, "group_writable = true"),
			  "and the error says which key: %s", err);
	}
	tally_segment_close(&seg);
}

Test(segment, keep_and_group_mode)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	const char *name = tt_segname("keep");
	char path[256];
	struct stat st;

	tt_config(&cfg);
	cfg.group_readable = 1;
	cr_assert_eq(tally_segment_create(name, &cfg, 0, &seg), 0);
	snprintf(path, sizeof(path), "/dev/shm/%s", name);
	cr_assert_eq(stat(path, &st), 0);
	cr_expect_eq(st.st_mode & 0777, 0640);
	tally_segment_keep(seg, true);
	tally_segment_close(&seg);
	cr_expect(shm_exists(name));
	struct tally_segment *rd;
	cr_assert_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), 0);
	cr_expect_eq(tally_segment_owner_alive(rd), 0, "stopped cleanly: not alive");
	tally_segment_close(&rd);
	cr_expect_eq(tally_segment_unlink(name), 0);
}

Test(segment, live_owner_refuses_second_create)
{
	const char *name = tt_segname("live");
	struct tally_segment *seg = make(name), *again;

	cr_expect_eq(tally_segment_create(name, NULL, TALLY_CREATE_REPLACE_DEAD, &again), -EBUSY);
	cr_expect(strstr(tally_errmsg(), "live process"), "%s", tally_errmsg());
	cr_expect(shm_exists(name), "the live segment is untouched");
	tally_segment_close(&seg);
}

Test(segment, dead_owner_reported_and_replaced_on_request)
{
	const char *name = tt_segname("dead");
	pid_t child = fork();

	if (child == 0) {
		struct tally_segment_config cfg;
		struct tally_segment *s;
		tt_config(&cfg);
		if (tally_segment_create(name, &cfg, 0, &s) != 0)
			_exit(1);
		raise(SIGKILL);
	}
	int status;
	waitpid(child, &status, 0);
	cr_assert(WIFSIGNALED(status), "child died by SIGKILL");
	cr_assert(shm_exists(name));

	struct tally_segment *rd, *seg;
	cr_assert_eq(tally_segment_open(name, TALLY_OPEN_READER, 100, &rd), 0, "%s", tally_errmsg());
	cr_expect_eq(tally_segment_owner_alive(rd), 0);
	struct tally_segment_info old;
	tally_segment_info(rd, &old);
	cr_expect_eq(old.owner_pid, child);
	cr_expect(!old.owner_alive);
	tally_segment_close(&rd);

	cr_expect_eq(tally_segment_create(name, NULL, 0, &seg), TALLY_EOWNERDEAD);
	char want[64];
	snprintf(want, sizeof(want), "pid %d", (int)child);
	cr_expect(strstr(tally_errmsg(), want), "%s", tally_errmsg());
	cr_assert_eq(tally_segment_create(name, NULL, TALLY_CREATE_REPLACE_DEAD, &seg), 0, "%s",
		     tally_errmsg());
	struct tally_segment_info now;
	tally_segment_info(seg, &now);
	cr_expect_neq(now.generation, old.generation);
	cr_expect_eq(now.owner_pid, getpid());
	tally_segment_close(&seg);
}

/* Map a kept segment read-write to damage it. */
static struct tally__shm_hdr *map_raw(const char *name, size_t *len)
{
	char path[256];
	struct stat st;

	snprintf(path, sizeof(path), "/%s", name);
	int fd = shm_open(path, O_RDWR, 0);
	cr_assert_geq(fd, 0);
	fstat(fd, &st);
	*len = (size_t)st.st_size;
	void *p = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	cr_assert_neq(p, MAP_FAILED);
	return p;
}

static const char *kept(void)
{
	const char *name = tt_segname("hdr");
	struct tally_segment *seg = make(name);

	tally_segment_keep(seg, true);
	tally_segment_close(&seg);
	return name;
}

Test(segment, wrong_magic)
{
	const char *name = kept();
	size_t len;
	struct tally__shm_hdr *h = map_raw(name, &len);
	struct tally_segment *rd;

	h->magic ^= 1;
	cr_expect_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), TALLY_ECORRUPT);
	cr_expect(strstr(tally_errmsg(), "not a tally segment"), "%s", tally_errmsg());
	munmap(h, len);
	tally_segment_unlink(name);
}

Test(segment, wrong_major_gives_both_versions)
{
	const char *name = kept();
	size_t len;
	struct tally__shm_hdr *h = map_raw(name, &len);
	struct tally_segment *rd;

	h->abi_major = 7;
	h->abi_minor = 3;
	cr_expect_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), TALLY_EVERSION);
	cr_expect(strstr(tally_errmsg(), "7.3"), "%s", tally_errmsg());
	char mine[16];
	snprintf(mine, sizeof(mine), "%u.%u", TALLY__ABI_MAJOR, TALLY__ABI_MINOR);
	cr_expect(strstr(tally_errmsg(), mine), "%s", tally_errmsg());
	munmap(h, len);
	tally_segment_unlink(name);
}

/* A segment of layout 3.1 (no rules section: the header page is zero past
 * the remote section, the file ends there) still opens, and says it keeps
 * no rules; a 3.2 header whose rules section does not match is corrupt. */
Test(segment, an_older_minor_without_rules_opens_and_a_bad_rules_section_is_corrupt)
{
	const char *name = kept();
	size_t len;
	struct tally__shm_hdr *h = map_raw(name, &len);
	struct tally_segment *rd;
	struct tally_segment_info in;
	char path[256];

	cr_assert(h->rules.off && h->rules.size && h->rules.off + h->rules.size <= len, "3.2: rules last");
	uint64_t rules_off = h->rules.off;
	h->rules.size += 4096;
	cr_expect_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), TALLY_ECORRUPT);
	h->rules.size -= 4096;
	h->rules_cap = 7;
	cr_expect_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), TALLY_ECORRUPT);

	h->abi_minor = 1;
	h->rules_cap = 0;
	h->rules_entry_size = 0;
	h->rules.off = h->rules.size = 0;
	h->total_size = rules_off;
	munmap(h, len);
	snprintf(path, sizeof(path), "/%s", name);
	int fd = shm_open(path, O_RDWR, 0);
	cr_assert_geq(fd, 0);
	cr_assert_eq(ftruncate(fd, (off_t)rules_off), 0);
	close(fd);
	cr_assert_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), 0, "%s", tally_errmsg());
	cr_expect_eq(tally_segment_info(rd, &in), 0);
	cr_expect_eq(in.abi_minor, 1u);
	cr_expect_eq(in.rules.size, 0u);
	struct tally_subject_stats st = { .rule = 1, .rules_gen = 1 };
	struct tally_rule_info ri;
	cr_expect_eq(tally_read_rule(rd, &st, &ri), -ENOENT, "no rules section: not known");
	tally_segment_close(&rd);
	tally_segment_unlink(name);
}

Test(segment, not_ready_waits_a_bounded_time)
{
	const char *name = kept();
	size_t len;
	struct tally__shm_hdr *h = map_raw(name, &len);
	struct tally_segment *rd;

	atomic_store(&h->ready, 0);
	uint64_t t0 = tally_now_ns();
	cr_expect_eq(tally_segment_open(name, TALLY_OPEN_READER, 150, &rd), TALLY_ENOTREADY);
	uint64_t waited = tally_now_ns() - t0;
	cr_expect_geq(waited, 140u * 1000000u, "waited %llu ns", (unsigned long long)waited);
	cr_expect_lt(waited, 5000u * 1000000ull, "bounded");
	/* becoming ready while a reader waits */
	pid_t child = fork();
	if (child == 0) {
		tt_sleep_ms(50);
		atomic_store(&h->ready, TALLY__READY);
		_exit(0);
	}
	cr_expect_eq(tally_segment_open(name, TALLY_OPEN_READER, 3000, &rd), 0, "%s", tally_errmsg());
	waitpid(child, NULL, 0);
	tally_segment_close(&rd);
	munmap(h, len);
	tally_segment_unlink(name);
}

Test(segment, inconsistent_sections_are_corrupt)
{
	const char *name = kept();
	size_t len;
	struct tally__shm_hdr *h = map_raw(name, &len);
	struct tally_segment *rd;

	h->slots.off += 4096; /* points elsewhere than the config implies */
	cr_expect_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), TALLY_ECORRUPT);
	h->slots.off -= 4096;
	h->ring_cap = 1000; /* not a power of two */
	cr_expect_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), TALLY_ECORRUPT);
	h->ring_cap = 1u << 20; /* valid, but the mapping is too small for it */
	cr_expect_eq(tally_segment_open(name, TALLY_OPEN_READER, 0, &rd), TALLY_ECORRUPT);
	munmap(h, len);
	tally_segment_unlink(name);
}

Test(segment, too_small_object_is_not_ready)
{
	const char *name = tt_segname("tiny");
	char path[256];
	struct tally_segment *rd;

	snprintf(path, sizeof(path), "/%s", name);
	int fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
	cr_assert_geq(fd, 0);
	cr_assert_eq(ftruncate(fd, 100), 0);
	close(fd);
	cr_expect_eq(tally_segment_open(name, TALLY_OPEN_READER, 50, &rd), TALLY_ENOTREADY);
	tally_segment_unlink(name);
}

Test(segment, full_dev_shm_fails_at_start_with_sizes)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	const char *name = tt_segname("big");

	tt_config(&cfg);
	cfg.producer_slots = 4096;
	cfg.ring_capacity = 1u << 24; /* 4096 x 256 MiB: more than any /dev/shm */
	cr_expect_eq(tally_segment_create(name, &cfg, 0, &seg), -ENOSPC);
	cr_expect(strstr(tally_errmsg(), "/dev/shm"), "%s", tally_errmsg());
	cr_expect(strstr(tally_errmsg(), "needs"), "%s", tally_errmsg());
	cr_expect(strstr(tally_errmsg(), "free"), "%s", tally_errmsg());
	cr_expect(!shm_exists(name), "nothing left behind");
}

Test(segment, bad_config)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;

	tt_config(&cfg);
	cfg.ring_capacity = 1000;
	cr_expect_eq(tally_segment_create(tt_segname("cfg"), &cfg, 0, &seg), -EINVAL);
	cr_expect(strstr(tally_errmsg(), "ring_capacity"), "%s", tally_errmsg());
	cr_expect_eq(tally_segment_size(&cfg), 0);
}

Test(segment, another_user_gets_permission_error)
{
	const char *name = tt_segname("perm");
	struct tally_segment *seg = make(name);

	if (geteuid() == 0) {
		/* Root can become another user: the 0600 segment must refuse it. */
		pid_t child = fork();
		if (child == 0) {
			struct tally_segment *rd;
			if (setgid(65534) != 0 || setuid(65534) != 0)
				_exit(10);
			int rc = tally_segment_open(name, TALLY_OPEN_READER, 0, &rd);
			_exit(rc == -EACCES && strstr(tally_errmsg(), "permission denied") ? 0 : 1);
		}
		int status;
		waitpid(child, &status, 0);
		cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d", status);
	} else {
		/* Not root: we cannot switch users; the mode is the guarantee. */
		char path[256];
		struct stat st;
		snprintf(path, sizeof(path), "/dev/shm/%s", name);
		cr_assert_eq(stat(path, &st), 0);
		cr_expect_eq(st.st_mode & 0077, 0, "no access for group or others");
	}
	tally_segment_close(&seg);
}

Test(segment, symlink_is_not_followed)
{
	const char *name = tt_segname("link");
	char path[256];

	snprintf(path, sizeof(path), "/dev/shm/%s", name);
	cr_assert_eq(symlink("/etc/passwd", path), 0);
	struct tally_segment *seg;
	cr_expect_lt(tally_segment_open(name, TALLY_OPEN_READER, 0, &seg), 0);
	cr_expect_lt(tally_segment_create(name, NULL, 0, &seg), 0);
	unlink(path);
}
