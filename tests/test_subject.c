/* SPDX-License-Identifier: MIT */
/*
 * test_subject.c: NATS subject syntax, wildcard matching, and interning
 * into the segment's table from threads and from processes.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/helpers.h"

Test(subject, valid_names)
{
	const char *good[] = { "a", "orders", "orders.eu.created", "a.b.c.d.e.f", "x-y_z.1", "ü.ñ",
			       "$JS.API.INFO" };
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
		cr_expect_eq(tally_subject_validate(good[i], false), 0, "%s: %s", good[i], tally_errmsg());
}

Test(subject, invalid_names_say_why)
{
	struct { const char *s; const char *why; } bad[] = {
		{ "", "length 0" }, { ".a", "empty token at byte 0" }, { "a.", "empty token at byte 2" },
		{ "a..b", "empty token at byte 2" }, { "a b", "space" }, { "a\tb", "control byte 0x09" },
		{ "a.*", "wildcard '*'" }, { "a.>", "wildcard '>'" }, { "a*.b", "not a whole token" },
		{ "a\x7f", "control byte 0x7f" },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		cr_expect_eq(tally_subject_validate(bad[i].s, false), TALLY_EBADNAME, "%s", bad[i].s);
		cr_expect(strstr(tally_errmsg(), bad[i].why), "'%s': message '%s' lacks '%s'", bad[i].s,
			  tally_errmsg(), bad[i].why);
	}
	char longname[300];
	memset(longname, 'a', sizeof(longname) - 1);
	longname[299] = '\0';
	cr_expect_eq(tally_subject_validate(longname, false), TALLY_EBADNAME);
	longname[255] = '\0';
	cr_expect_eq(tally_subject_validate(longname, false), 0, "255 bytes is the limit");
	longname[255] = 'a';
	longname[256] = '\0';
	cr_expect_eq(tally_subject_validate(longname, false), TALLY_EBADNAME, "256 bytes is too long");
}

/* A subject that is not valid UTF-8 broke every export (Prometheus
 * rejected the scrape, JSON lost the name): refused at intern, saying why. */
Test(subject, not_utf8_or_control_is_refused)
{
	static const char *const bad[] = {
		"q.\xff", "q.\xc3", "q.\xc0\xaf" /* overlong '/' */, "q.\xed\xa0\x80" /* surrogate */,
		"q.\xf4\x90\x80\x80" /* above U+10FFFF */, "q.\xc2\x85" /* C1 NEL */, "q.a\x7f",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		cr_expect_eq(tally_subject_validate(bad[i], false), TALLY_EBADNAME, "accepted case %zu", i);
		cr_expect(strstr(tally_errmsg(), "UTF-8") || strstr(tally_errmsg(), "control"),
			  "case %zu: %s", i, tally_errmsg());
	}
	cr_expect_eq(tally_subject_validate("q.caf\xc3\xa9", false), 0, "%s", tally_errmsg());
	cr_expect_eq(tally_subject_validate("q.\xe6\x97\xa5\xe6\x9c\xac", false), 0);
	cr_expect_eq(tally_subject_validate("q.\xf0\x9f\x98\x80", false), 0);
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	tally_subject_t id;
	tt_config(&cfg);
	cr_assert_eq(tally_segment_create(tt_segname("utf8"), &cfg, 0, &seg), 0);
	cr_expect_eq(tally_subject_intern(seg, "q.\xff", &id), TALLY_EBADNAME);
	cr_expect(strstr(tally_errmsg(), "not valid UTF-8"), "%s", tally_errmsg());
	tally_segment_close(&seg);
}

Test(subject, wildcard_patterns)
{
	cr_expect_eq(tally_subject_validate("a.*", true), 0);
	cr_expect_eq(tally_subject_validate("a.>", true), 0);
	cr_expect_eq(tally_subject_validate(">", true), 0);
	cr_expect_eq(tally_subject_validate("a.>.b", true), TALLY_EBADNAME);
	cr_expect(strstr(tally_errmsg(), "last token"));
}

Test(subject, match)
{
	cr_expect(tally_subject_match("a.b", "a.b"));
	cr_expect(!tally_subject_match("a.b", "a.c"));
	cr_expect(!tally_subject_match("a.b", "a.b.c"));
	cr_expect(tally_subject_match("a.*", "a.b"));
	cr_expect(!tally_subject_match("a.*", "a.b.c"));
	cr_expect(!tally_subject_match("a.*", "a"));
	cr_expect(tally_subject_match("a.>", "a.b"));
	cr_expect(tally_subject_match("a.>", "a.b.c"));
	cr_expect(!tally_subject_match("a.>", "a"));
	cr_expect(tally_subject_match(">", "x.y"));
	cr_expect(tally_subject_match("*.b.*", "a.b.c"));
	cr_expect(!tally_subject_match("*.b.*", "a.c.c"));
	cr_expect(!tally_subject_match("ab", "a"));
}

Test(subject, intern_lookup_name)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	tally_subject_t a, b, a2, l;
	char buf[300];

	tt_config(&cfg);
	cr_assert_eq(tally_segment_create(tt_segname("subj"), &cfg, 0, &seg), 0, "%s", tally_errmsg());
	cr_assert_eq(tally_subject_intern(seg, "orders.created", &a), 0);
	cr_assert_eq(tally_subject_intern(seg, "orders.deleted", &b), 0);
	cr_assert_eq(tally_subject_intern(seg, "orders.created", &a2), 0);
	cr_expect_eq(a, a2);
	cr_expect_neq(a, b);
	cr_expect_eq(tally_subject_lookup(seg, "orders.created", &l), 0);
	cr_expect_eq(l, a);
	cr_expect_eq(tally_subject_lookup(seg, "orders.missing", &l), -ENOENT);
	cr_expect_eq(tally_subject_name(seg, b, buf, sizeof(buf)), 0);
	cr_expect_str_eq(buf, "orders.deleted");
	cr_expect_eq(tally_subject_name(seg, b, buf, 5), -ENOSPC);
	cr_expect_eq(tally_subject_intern(seg, "orders.*", &l), TALLY_EBADNAME);
	tally_segment_close(&seg);
}

Test(subject, full_table_is_an_error_not_a_wrong_id)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	tally_subject_t ids[8], id;
	char name[32];

	tt_config(&cfg);
	cfg.subject_capacity = 8;
	cr_assert_eq(tally_segment_create(tt_segname("full"), &cfg, 0, &seg), 0);
	for (int i = 0; i < 8; i++) {
		snprintf(name, sizeof(name), "s.%d", i);
		cr_assert_eq(tally_subject_intern(seg, name, &ids[i]), 0, "%s", tally_errmsg());
	}
	cr_expect_eq(tally_subject_intern(seg, "s.extra", &id), TALLY_EFULL);
	cr_expect(strstr(tally_errmsg(), "subject_capacity"), "%s", tally_errmsg());
	/* existing names still resolve to their own ids */
	for (int i = 0; i < 8; i++) {
		snprintf(name, sizeof(name), "s.%d", i);
		cr_expect_eq(tally_subject_intern(seg, name, &id), 0);
		cr_expect_eq(id, ids[i]);
	}
	tally_segment_close(&seg);
}

struct intern_arg {
	struct tally_segment *seg;
	tally_subject_t ids[64];
};

static void *intern_many(void *p)
{
	struct intern_arg *a = p;
	char name[32];

	for (int i = 0; i < 64; i++) {
		snprintf(name, sizeof(name), "race.%d", i);
		if (tally_subject_intern(a->seg, name, &a->ids[i]) != 0)
			a->ids[i] = UINT32_MAX;
	}
	return NULL;
}

Test(subject, concurrent_interning_gives_one_id_per_name)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	struct intern_arg args[6];
	pthread_t th[6];

	tt_config(&cfg);
	cr_assert_eq(tally_segment_create(tt_segname("race"), &cfg, 0, &seg), 0);
	for (int t = 0; t < 6; t++) {
		args[t].seg = seg;
		pthread_create(&th[t], NULL, intern_many, &args[t]);
	}
	for (int t = 0; t < 6; t++)
		pthread_join(th[t], NULL);
	for (int i = 0; i < 64; i++)
		for (int t = 1; t < 6; t++)
			cr_expect_eq(args[t].ids[i], args[0].ids[i], "name %d thread %d", i, t);
	struct tally_segment_info info;
	tally_segment_info(seg, &info);
	cr_expect_eq(info.subjects_used, 64);
	tally_segment_close(&seg);
}

Test(subject, same_ids_across_processes)
{
	struct tally_segment_config cfg;
	struct tally_segment *seg;
	const char *name;
	int pipes[4][2];
	pid_t pids[4];

	tt_config(&cfg);
	name = tt_segname("xproc");
	cr_assert_eq(tally_segment_create(name, &cfg, 0, &seg), 0);
	for (int c = 0; c < 4; c++) {
		cr_assert_eq(pipe(pipes[c]), 0);
		pids[c] = fork();
		if (pids[c] == 0) {
			struct tally_segment *ps;
			struct intern_arg a;
			if (tally_segment_open(name, TALLY_OPEN_PRODUCER, 1000, &ps) != 0)
				_exit(1);
			a.seg = ps;
			intern_many(&a);
			ssize_t w = write(pipes[c][1], a.ids, sizeof(a.ids));
			_exit(w == (ssize_t)sizeof(a.ids) ? 0 : 2);
		}
		close(pipes[c][1]);
	}
	tally_subject_t mine[64];
	for (int i = 0; i < 64; i++) {
		char s[32];
		snprintf(s, sizeof(s), "race.%d", i);
		cr_assert_eq(tally_subject_intern(seg, s, &mine[i]), 0);
	}
	for (int c = 0; c < 4; c++) {
		tally_subject_t theirs[64];
		int status;
		cr_assert_eq(read(pipes[c][0], theirs, sizeof(theirs)), (ssize_t)sizeof(theirs));
		waitpid(pids[c], &status, 0);
		cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0);
		cr_expect_arr_eq(theirs, mine, sizeof(mine));
	}
	tally_segment_close(&seg);
}
