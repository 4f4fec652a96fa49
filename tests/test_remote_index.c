/* SPDX-License-Identifier: MIT */
/*
 * test_remote_index.c: the reader's index of the remote section
 * (tally_remote_index, tally/share.h) against the full scan
 * (tally_read_remote_worst) on a real segment whose remote section this
 * test writes as the share thread would (lib/remote.c's writer): after a
 * refresh the two agree for every subject, over random entries, hosts
 * and verdicts, ties included; between refreshes the index never answers
 * with an entry that does not hold the subject now, sees changed verdicts
 * and removed entries at once, and sees an added entry after the next
 * refresh; a segment without a remote section; a corrupt entry and one
 * left mid-write are reported as the full scan reports them, and do not
 * stop or hold up a refresh.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <tally/tally.h>

#include "common.h"
#include "common/helpers.h"
#include "proc.h"
#include "remote.h"
#include "segment.h"

#define CAP 256u
#define NSUBJ 40

struct fixture {
	struct tally_segment *seg;
	char name[TALLY_NAME_MAX + 1];
	void *sec;
};

static void open_fixture(struct fixture *f, uint32_t cap)
{
	struct tally_segment_config cfg;

	tt_config(&cfg);
	cfg.remote_capacity = cap;
	snprintf(f->name, sizeof(f->name), "%s", tt_segname("rix"));
	cr_assert_eq(tally_segment_create(f->name, &cfg, 0, &f->seg), 0, "%s", tally_errmsg());
	f->sec = cap ? tally__seg_section(f->seg, &f->seg->remote) : NULL;
	if (cap) {
		struct tally__remote_status_view st = { .state = 2, .connected = 1, .stale_after_ms = 60000,
							.max_age_ms = 120000, .refresh_ms = 1000 };
		snprintf(st.host, sizeof(st.host), "here");
		tally__remote_write_status(tally__remote_status_at(f->sec), &st);
	}
}

static void close_fixture(struct fixture *f)
{
	tally_segment_close(&f->seg);
	tally_segment_unlink(f->name);
}

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13; /* xorshift64 */
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void put(struct fixture *f, uint32_t idx, const char *host, int subj, uint32_t verdict, double pressure)
{
	struct tally__remote_view v;

	memset(&v, 0, sizeof(v));
	v.verdict = verdict;
	v.combine = TALLY__COMBINE_MAX;
	v.pressure = pressure;
	v.origin_ns = v.received_ns = tally__mono_ns();
	v.revision = idx + 1;
	snprintf(v.host, sizeof(v.host), "%s", host);
	snprintf(v.subject, sizeof(v.subject), "orders.s%d", subj);
	tally__remote_write_entry(tally__remote_entry_at(f->sec, idx), &v);
}

static void clear(struct fixture *f, uint32_t idx)
{
	tally__remote_clear_entry(tally__remote_entry_at(f->sec, idx));
}

static const char *subj(int i)
{
	static char buf[32];
	snprintf(buf, sizeof(buf), "orders.s%d", i);
	return buf;
}

/* The indexed read and the full scan say the same for subject i. */
static void expect_same(struct tally_remote_index *ix, struct fixture *f, int i)
{
	struct tally_remote_stats a, b;
	int ra = tally_read_remote_worst(f->seg, subj(i), &a);
	int rb = tally_read_remote_worst_indexed(ix, subj(i), &b);

	cr_assert_eq(rb, ra, "%s: indexed %d, full scan %d", subj(i), rb, ra);
	if (ra == 0) {
		cr_assert_str_eq(b.host, a.host, "%s", subj(i));
		cr_assert_eq(b.verdict, a.verdict);
		cr_assert_eq(b.pressure, a.pressure);
		cr_assert_eq(b.revision, a.revision, "%s: the same entry (ties too)", subj(i));
		cr_assert_str_eq(b.subject, subj(i));
	}
}

Test(remote_index, agrees_with_the_full_scan_after_each_refresh)
{
	struct fixture f;
	struct tally_remote_index *ix;
	uint64_t seed = 12345;
	bool used[CAP] = { false };

	open_fixture(&f, CAP);
	cr_assert_eq(tally_remote_index_new(f.seg, &ix), 0);
	static const char *const hosts[] = { "a", "b", "c" };
	for (int round = 0; round < 200; round++) {
		/* a few random changes: put, move, remove */
		for (int k = 0; k < 8; k++) {
			uint32_t idx = (uint32_t)(rnd(&seed) % CAP);
			if (used[idx] && rnd(&seed) % 3 == 0) {
				clear(&f, idx);
				used[idx] = false;
			} else {
				put(&f, idx, hosts[rnd(&seed) % 3], (int)(rnd(&seed) % NSUBJ),
				    (uint32_t)(rnd(&seed) % 4), (double)(rnd(&seed) % 1000) / 1000.0);
				used[idx] = true;
			}
		}
		cr_assert_eq(tally_remote_index_refresh(ix), 0, "%s", tally_errmsg());
		for (int i = 0; i < NSUBJ; i++)
			expect_same(ix, &f, i);
	}
	tally_remote_index_free(&ix);
	cr_assert_null(ix);
	close_fixture(&f);
}

Test(remote_index, between_refreshes)
{
	struct fixture f;
	struct tally_remote_index *ix;
	struct tally_remote_stats st;

	open_fixture(&f, CAP);
	put(&f, 3, "a", 1, TALLY_VERDICT_WARN, 0.5);
	put(&f, 9, "b", 1, TALLY_VERDICT_OK, 0.1);
	put(&f, 200, "b", 2, TALLY_VERDICT_OK, 0.1);
	cr_assert_eq(tally_remote_index_new(f.seg, &ix), 0);
	cr_assert_eq(tally_read_remote_worst_indexed(ix, subj(1), &st), -ENOENT, "nothing before a refresh");
	cr_assert_eq(tally_remote_index_refresh(ix), 0);
	cr_assert_eq(tally_read_remote_worst_indexed(ix, subj(1), &st), 0);
	cr_expect_str_eq(st.host, "a");
	cr_expect_eq(st.verdict, TALLY_VERDICT_WARN);

	/* a changed verdict: at once */
	put(&f, 9, "b", 1, TALLY_VERDICT_OVERLOAD, 0.9);
	cr_assert_eq(tally_read_remote_worst_indexed(ix, subj(1), &st), 0);
	cr_expect_str_eq(st.host, "b", "host b's new overload, without a refresh");
	cr_expect_eq(st.verdict, TALLY_VERDICT_OVERLOAD);
	/* removed: at once */
	clear(&f, 9);
	cr_assert_eq(tally_read_remote_worst_indexed(ix, subj(1), &st), 0);
	cr_expect_str_eq(st.host, "a");
	/* an entry that now holds another subject is not this one's */
	put(&f, 3, "a", 7, TALLY_VERDICT_OVERLOAD, 1.0);
	cr_expect_eq(tally_read_remote_worst_indexed(ix, subj(1), &st), -ENOENT);
	cr_expect_eq(tally_read_remote_worst_indexed(ix, subj(7), &st), -ENOENT, "moved: seen after a refresh");
	/* added: after the next refresh */
	put(&f, 100, "c", 1, TALLY_VERDICT_WARN, 0.3);
	cr_expect_eq(tally_read_remote_worst_indexed(ix, subj(1), &st), -ENOENT);
	cr_assert_eq(tally_remote_index_refresh(ix), 0);
	cr_assert_eq(tally_read_remote_worst_indexed(ix, subj(1), &st), 0);
	cr_expect_str_eq(st.host, "c");
	cr_assert_eq(tally_read_remote_worst_indexed(ix, subj(7), &st), 0);
	cr_expect_str_eq(st.host, "a");
	cr_expect_eq(tally_read_remote_worst_indexed(ix, "orders.none", &st), -ENOENT);
	tally_remote_index_free(&ix);
	close_fixture(&f);
}

Test(remote_index, no_remote_section)
{
	struct fixture f;
	struct tally_remote_index *ix;
	struct tally_remote_stats st;

	open_fixture(&f, 0);
	cr_assert_eq(tally_remote_index_new(f.seg, &ix), 0);
	cr_expect_eq(tally_remote_index_refresh(ix), 0);
	cr_expect_eq(tally_read_remote_worst_indexed(ix, subj(1), &st), -ENOENT);
	tally_remote_index_free(&ix);
	tally_remote_index_free(&ix); /* twice: a no-op */
	close_fixture(&f);
}

/* Of two entries alike (same verdict and pressure), both reads answer
 * with the lower-numbered one, so that X-Tally-Host, Retry-After and
 * shed_probability come from the same host either way. */
Test(remote_index, ties_go_to_the_lowest_entry)
{
	struct fixture f;
	struct tally_remote_index *ix;
	struct tally_remote_stats a, b;

	open_fixture(&f, CAP);
	put(&f, 10, "b", 1, TALLY_VERDICT_WARN, 0.5);
	put(&f, 3, "a", 1, TALLY_VERDICT_WARN, 0.5);
	put(&f, 200, "c", 1, TALLY_VERDICT_WARN, 0.5);
	cr_assert_eq(tally_remote_index_new(f.seg, &ix), 0);
	cr_assert_eq(tally_remote_index_refresh(ix), 0);
	cr_assert_eq(tally_read_remote_worst(f.seg, subj(1), &a), 0);
	cr_assert_eq(tally_read_remote_worst_indexed(ix, subj(1), &b), 0);
	cr_expect_str_eq(a.host, "a");
	cr_expect_str_eq(b.host, "a");
	tally_remote_index_free(&ix);
	close_fixture(&f);
}

/* An entry whose bytes are not a valid view, or one a writer left mid-write:
 * the refresh goes on (one try, no wait) and puts it where every read
 * looks, so that reads report it as the full scan does; once it is whole
 * again it is read as any other. */
Test(remote_index, corrupt_or_busy_entries)
{
	struct fixture f;
	struct tally_remote_index *ix;
	struct tally_remote_stats st;

	open_fixture(&f, CAP);
	put(&f, 5, "a", 1, TALLY_VERDICT_WARN, 0.5);
	put(&f, 6, "a", 2, TALLY_VERDICT_OK, 0.1);
	cr_assert_eq(tally_remote_index_new(f.seg, &ix), 0);
	cr_assert_eq(tally_remote_index_refresh(ix), 0);
	struct tally__remote_entry *e = tally__remote_entry_at(f.sec, 5);
	atomic_store(&e->verdict, 77u);
	cr_expect_eq(tally_read_remote_worst(f.seg, subj(1), &st), TALLY_ECORRUPT);
	cr_expect_eq(tally_read_remote_worst_indexed(ix, subj(1), &st), TALLY_ECORRUPT);
	cr_expect_eq(tally_remote_index_refresh(ix), 0, "a bad entry does not stop the refresh: %s", tally_errmsg());
	cr_expect_eq(tally_read_remote_worst(f.seg, subj(2), &st), TALLY_ECORRUPT, "the full scan meets it");
	cr_expect_eq(tally_read_remote_worst_indexed(ix, subj(2), &st), TALLY_ECORRUPT, "and so does every read");
	cr_expect(strstr(tally_errmsg(), "corrupt"), "%s", tally_errmsg());
	put(&f, 5, "a", 1, TALLY_VERDICT_OK, 0.5);
	cr_assert_eq(tally_read_remote_worst_indexed(ix, subj(1), &st), 0, "whole again: read");
	cr_expect_eq(st.verdict, TALLY_VERDICT_OK);
	cr_assert_eq(tally_read_remote_worst_indexed(ix, subj(2), &st), 0);

	/* a writer stopped mid-write (its sequence odd) */
	uint32_t seq = atomic_load(&e->seq);
	atomic_store(&e->seq, seq | 1u);
	cr_expect_eq(tally_remote_index_refresh(ix), 0, "the refresh does not wait on it");
	cr_expect_eq(tally_read_remote_worst(f.seg, subj(2), &st), TALLY_EBUSY_RETRY);
	cr_expect_eq(tally_read_remote_worst_indexed(ix, subj(2), &st), TALLY_EBUSY_RETRY);
	atomic_store(&e->seq, (seq | 1u) + 1u);
	cr_assert_eq(tally_read_remote_worst_indexed(ix, subj(1), &st), 0, "the write ended: read");
	cr_expect_str_eq(st.host, "a");
	tally_remote_index_free(&ix);
	close_fixture(&f);
}
