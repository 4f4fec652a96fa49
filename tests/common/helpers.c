/* SPDX-License-Identifier: MIT */
/*
 * helpers.c: see helpers.h. Uses the library's private layout (lib/) on
 * purpose: the drainer and slot views are how tests check accounting
 * against what is really in the segment.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/helpers.h"
#include "producer.h"
#include "proc.h"
#include "segment.h"

const char *tt_segname(const char *tag)
{
	static _Atomic unsigned counter;
	static __thread char buf[128];
	struct timespec ts;

	/* pid + counter alone collide with what an earlier run left behind
	 * (a failed test, a killed run) once pids wrap: the start time of the
	 * name's first use makes each run's names its own */
	clock_gettime(CLOCK_REALTIME, &ts);
	snprintf(buf, sizeof(buf), "tt-%s-%d-%u-%lx", tag, (int)getpid(), atomic_fetch_add(&counter, 1),
		 (unsigned long)(ts.tv_nsec ^ ts.tv_sec) & 0xfffffu);
	return buf;
}

void tt_config(struct tally_segment_config *cfg)
{
	tally_segment_config_init(cfg);
	cfg->producer_slots = 16;
	cfg->ring_capacity = 1024;
	cfg->subject_capacity = 256;
	cfg->pending_capacity = 16;
	cfg->producer_cooloff_ms = 50;
}

void tt_sleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) != 0)
		;
}

void tt_gate_init(struct tt_gate *g)
{
	if (pipe(g->fd) != 0)
		abort();
}

void tt_gate_wait(struct tt_gate *g)
{
	char b;

	close(g->fd[1]);
	while (read(g->fd[0], &b, 1) < 0 && errno == EINTR)
		;
	close(g->fd[0]);
}

void tt_gate_open(struct tt_gate *g)
{
	close(g->fd[1]); /* every child reads end-of-file */
	close(g->fd[0]);
}

uint64_t tt_drain_once(struct tt_drainer *d, bool reap)
{
	struct tally_segment *seg = d->seg;
	uint64_t n_all = 0;

	for (uint32_t i = 0; i < seg->nslots; i++) {
		struct tally__slot *s = tally__seg_slot(seg, i);
		uint64_t head, n = tally__slot_ready(seg, s, &head);

		for (uint64_t k = 0; k < n; k++) {
			const struct tally_ring_entry *e = &s->ring[(head + k) & (seg->ring_cap - 1)];
			if (e->subject >= TT_MAX_SUBJECTS) {
				atomic_fetch_add(&d->rejected, 1);
				continue;
			}
			atomic_fetch_add_explicit(&d->per_subject[e->subject], 1, memory_order_relaxed);
			atomic_fetch_add_explicit(&d->sum, e->value_ns, memory_order_relaxed);
			if (e->value_ns > atomic_load(&d->max_seen))
				atomic_store(&d->max_seen, e->value_ns);
		}
		if (n)
			tally__slot_consume(s, head, n);
		n_all += n;
	}
	atomic_fetch_add(&d->total, n_all);
	if (reap) {
		struct tally__reap_stats st;
		tally__slots_reap(seg, tally__mono_ns(), &st);
		atomic_fetch_add(&d->died, st.died);
		atomic_fetch_add(&d->released, st.released);
		atomic_fetch_add(&d->reused, st.reused);
		tally__subjects_reap(seg, tally__mono_ns());
	}
	return n_all;
}

void tt_drainer_init(struct tt_drainer *d, struct tally_segment *seg)
{
	memset(d, 0, sizeof(*d));
	d->seg = seg;
	d->reap_every_ms = 5;
}

static void *drain_loop(void *arg)
{
	struct tt_drainer *d = arg;
	uint64_t last_reap = 0;

	while (!atomic_load(&d->stop)) {
		uint64_t now = tally__mono_ns();
		bool reap = now - last_reap >= (uint64_t)d->reap_every_ms * 1000000u;
		if (reap)
			last_reap = now;
		if (tt_drain_once(d, reap) == 0)
			usleep(100);
	}
	tt_drain_once(d, true);
	return NULL;
}

void tt_drainer_start(struct tt_drainer *d)
{
	atomic_store(&d->stop, false);
	pthread_create(&d->thread, NULL, drain_loop, d);
	atomic_store(&d->running, true);
}

void tt_drainer_stop(struct tt_drainer *d)
{
	if (!atomic_load(&d->running))
		return;
	atomic_store(&d->stop, true);
	pthread_join(d->thread, NULL);
	atomic_store(&d->running, false);
}

void tt_slot_view(struct tally_segment *seg, uint32_t i, struct tt_slot_view *o)
{
	struct tally__slot *s = tally__seg_slot(seg, i);

	uint64_t lease = atomic_load(&s->ctl.lease);

	o->state = tally__lease_state(lease);
	o->generation = tally__lease_gen(lease);
	o->pid = (int32_t)(uint32_t)atomic_load(&s->ctl.ident);
	o->tid = atomic_load(&s->ctl.tid);
	o->tail = atomic_load(&s->tail);
	o->head = atomic_load(&s->head);
	o->dropped = atomic_load(&s->dropped);
	o->clamped = atomic_load(&s->clamped);
	o->base = atomic_load(&s->ctl.base);
	o->claims = atomic_load(&s->ctl.claims);
}

/* ---- a program another user can run ---------------------------------------- */

static int copy_file(const char *from, const char *to, mode_t mode)
{
	char buf[65536];
	int in = open(from, O_RDONLY | O_CLOEXEC), out = -1, rc = 0;
	ssize_t n;

	if (in < 0 || (out = open(to, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)) < 0)
		rc = -errno;
	while (rc == 0 && (n = read(in, buf, sizeof(buf))) != 0) {
		if (n < 0 || write(out, buf, (size_t)n) != n)
			rc = n < 0 ? -errno : -EIO;
	}
	if (rc == 0 && fchmod(out, mode)) /* exactly mode, whatever the umask */
		rc = -errno;
	if (in >= 0)
		close(in);
	if (out >= 0 && close(out) && rc == 0)
		rc = -errno;
	if (rc)
		fprintf(stderr, "tt_foreign_prog: copy %s to %s: %s\n", from, to, strerror(-rc));
	return rc;
}

/* Copy every libtally.so* of the build (the links as files) into fp->libdir. */
static int copy_libs(struct tt_foreign_prog *fp)
{
	const char *src = TALLY_TEST_BUILDDIR "/lib/.libs";
	DIR *d = opendir(src);
	struct dirent *e;
	int rc = 0;

	if (!d) /* a static build: nothing to copy */
		return errno == ENOENT ? 0 : -errno;
	while (rc == 0 && (e = readdir(d))) {
		char from[512], to[512];
		if (strncmp(e->d_name, "libtally.so", 11) != 0)
			continue;
		snprintf(from, sizeof(from), "%s/%s", src, e->d_name);
		snprintf(to, sizeof(to), "%s/%s", fp->libdir, e->d_name);
		rc = copy_file(from, to, 0644);
	}
	closedir(d);
	return rc;
}

int tt_foreign_prog_make(struct tt_foreign_prog *fp, const char *prog)
{
	char src[512];
	int rc;

	memset(fp, 0, sizeof(*fp));
	snprintf(fp->dir, sizeof(fp->dir), "/tmp/tt-foreign-XXXXXX");
	if (!mkdtemp(fp->dir)) {
		rc = -errno;
		fprintf(stderr, "tt_foreign_prog: %s: %s\n", fp->dir, strerror(-rc));
		fp->dir[0] = '\0';
		return rc;
	}
	snprintf(fp->path, sizeof(fp->path), "%s/%s", fp->dir, prog);
	snprintf(fp->libdir, sizeof(fp->libdir), "%s/lib", fp->dir);
	/* 0755 whatever the umask: the other user must enter both */
	if (chmod(fp->dir, 0755) || mkdir(fp->libdir, 0700) || chmod(fp->libdir, 0755)) {
		rc = -errno;
		fprintf(stderr, "tt_foreign_prog: %s: %s\n", fp->libdir, strerror(-rc));
		tt_foreign_prog_remove(fp);
		return rc;
	}
	/* libtool's wrapper script execs .libs/PROG with the build's library
	 * path; with --disable-shared tools/PROG is the program itself. */
	snprintf(src, sizeof(src), "%s/tools/.libs/%s", TALLY_TEST_BUILDDIR, prog);
	if (access(src, X_OK))
		snprintf(src, sizeof(src), "%s/tools/%s", TALLY_TEST_BUILDDIR, prog);
	if ((rc = copy_file(src, fp->path, 0755)) || (rc = copy_libs(fp)))
		tt_foreign_prog_remove(fp);
	return rc;
}

void tt_foreign_prog_remove(struct tt_foreign_prog *fp)
{
	DIR *d;
	struct dirent *e;

	if (!fp->dir[0])
		return;
	if ((d = opendir(fp->libdir))) {
		while ((e = readdir(d)))
			if (e->d_name[0] != '.')
				unlinkat(dirfd(d), e->d_name, 0);
		closedir(d);
	}
	rmdir(fp->libdir);
	unlink(fp->path);
	rmdir(fp->dir);
	fp->dir[0] = '\0';
}

bool tt_command_output(const char *cmd, char *buf, size_t len)
{
	FILE *f = popen(cmd, "r");

	buf[0] = '\0';
	if (!f)
		return false;
	size_t n = fread(buf, 1, len - 1, f);
	buf[n] = '\0';
	pclose(f);
	return true;
}

const char *tt_file_text(const char *path)
{
	static char buf[65536];
	FILE *f = fopen(path, "r");
	size_t n = 0;

	if (f) {
		n = fread(buf, 1, sizeof(buf) - 1, f);
		fclose(f);
	}
	buf[n] = '\0';
	return buf;
}
