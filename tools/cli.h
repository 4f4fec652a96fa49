/* SPDX-License-Identifier: MIT */
/*
 * cli.h: what the files of the tally command line share (not installed).
 * tally.c parses the global options and dispatches; each command family
 * lives in its own file and is entered through a tally_cmd_<name>()
 * function that gets the segment name already resolved (-s, else
 * $TALLY_SEGMENT, else "tally") and its own argv (argv[0] is the command).
 *
 * Exit status, the same for every command: 0 success, 1 partial failure
 * (tally record: some input rejected), 2 bad usage (message and usage on
 * stderr), 4 error (no segment, no permission, a version mismatch, ...).
 * tally status maps verdicts onto 0..3 (see tally_stat.c).
 *
 * struct cli_view is one read of everything a segment publishes, shared by
 * stat, stat --json, status and top, so that they all judge staleness
 * the same way: the data is stale when the owner is dead or stopped, or
 * when it has stopped publishing (tally_read_subject() said TALLY_ESTALE;
 * with no subject to ask, when its heartbeat is older than
 * CLI_STALE_NO_SUBJECT_MS).
 */
#ifndef TALLY_TOOLS_CLI_H
#define TALLY_TOOLS_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <tally/tally.h>

#define CLI_EXIT_OK 0
#define CLI_EXIT_PARTIAL 1
#define CLI_EXIT_USAGE 2
#define CLI_EXIT_ERROR 4

/* Heartbeat age after which a segment with no subject counts as stale. */
#define CLI_STALE_NO_SUBJECT_MS 10000u

/* ---- shared helpers (tally.c) ----------------------------------------------- */

/* Print why opening or reading segment failed (tally_errmsg() when it has
 * a sentence, else the error's name with the segment and a hint) to
 * stderr. Returns CLI_EXIT_ERROR. */
int cli_fail(const char *segment, int rc);

/* Open segment read-only without waiting long; on failure print why and
 * return CLI_EXIT_ERROR, else 0. */
int cli_open_reader(const char *segment, struct tally_segment **out);

/* "850ns", "12.3µs" (or "us" outside a UTF-8 locale), "4.56ms", "1.23s",
 * "2.0min". Returns buf. */
const char *cli_fmt_ns(char *buf, size_t len, uint64_t ns);

/* An age in ms as "0.3s", "12s", "5m12s", "2h03m", or "never" for UINT64_MAX. */
const char *cli_fmt_age_ms(char *buf, size_t len, uint64_t ms);

/* "12345", "123.4k", "12.3M", "1.2G": a count in at most 6 columns. */
const char *cli_fmt_count(char *buf, size_t len, uint64_t n);

/* Print s right-aligned (or left-aligned when width < 0) in |width|
 * columns, counting UTF-8 characters, not bytes. */
void cli_pad(FILE *to, const char *s, int width);

/* Display width of a UTF-8 string (characters). */
int cli_width(const char *s);
/* The locale's character set is UTF-8 (after setlocale(LC_CTYPE, "")). */
bool cli_utf8_locale(void);

/* Parse a non-negative decimal: 0 or -1. */
int cli_parse_u64(const char *s, uint64_t *out);

/* ---- one read of a segment (tally_stat.c) --------------------------------- */

struct cli_subject {
	char name[TALLY_SUBJECT_MAX + 1];
	bool published;                /* tally_read_subject() returned data */
	struct tally_subject_stats st; /* valid when published */
	char pending_consumer[TALLY_PENDING_CONSUMER_MAX]; /* of st.pending_entry, "" none */
	bool has_rule;                 /* rule holds the threshold rule that judged st */
	struct tally_rule_info rule;
};

struct cli_view {
	struct tally_segment_info info;
	int alive;                      /* tally_segment_owner_alive(): 1, 0, TALLY_EREPLACED */
	bool stale;                     /* owner dead/stopped, or not publishing */
	const char *stale_reason;       /* "owner_dead", "owner_stopped", "snapshot_stale", NULL */
	uint64_t now_mono_ns;
	int64_t read_at_ms;             /* Unix ms when this view was read */
	uint64_t published_age_ms;      /* of the owner's last publish (heartbeat) */
	int64_t published_at_ms;        /* the same as unix time in ms */
	struct cli_subject *subjects;
	size_t nsubjects;
	struct tally_producer_stats *producers;
	int nproducers;
	struct tally_consumer_stats *consumers;
	int nconsumers;
	struct tally_poller_stats poller;
	bool poller_ran;                /* a poll was ever attempted */
	struct tally_segment_totals totals; /* since the segment was created */
	/* other hosts' verdicts (tally/share.h); share_on false: no remote section */
	bool share_on;
	struct tally_share_status share;
	struct tally_remote_stats *remote;
	int nremote;
};

/* Read everything; 0, or an error (printed by the caller with cli_fail()). */
int cli_view_read(struct tally_segment *seg, struct cli_view *v);
void cli_view_free(struct cli_view *v);

/* The verdict a reader should act on: unknown when the view is stale. */
enum tally_verdict cli_effective_verdict(const struct cli_view *v, const struct cli_subject *s);

/* ---- commands -------------------------------------------------------------- */

int tally_cmd_stat(const char *segment, int argc, char **argv);
int tally_cmd_status(const char *segment, int argc, char **argv);
int tally_cmd_top(const char *segment, int argc, char **argv);
/* tools/tally_record.c */
int tally_cmd_record(const char *segment, int argc, char **argv);
/* tools/tally_demo.c (the live demo); dispatched once that file exists. */
int tally_cmd_demo(const char *segment, int argc, char **argv);

#endif /* TALLY_TOOLS_CLI_H */
