/* SPDX-License-Identifier: MIT */
/*
 * tally.c: the tally command line. Reads a segment read-only unless it
 * records. Commands so far: dump (header, sections, producer slots, for
 * diagnosis) and record (as a producer, from arguments or stdin).
 * Exit status: 0 success, 1 partial failure (some input rejected), 2 bad
 * usage, 4 error (no segment, no permission, ...).
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tally/tally.h>

#define EXIT_USAGE 2
#define EXIT_ERROR 4

static const char *segment_name(const char *opt)
{
	const char *env = getenv("TALLY_SEGMENT");

	return opt ? opt : env && *env ? env : "tally";
}

static void usage(FILE *to)
{
	fprintf(to,
		"usage: tally [-s SEGMENT] COMMAND [ARGS]\n"
		"\n"
		"commands:\n"
		"  dump                     header, sections and producer slots of the segment\n"
		"  record SUBJECT NS...     record latencies (ns) for SUBJECT as a producer\n"
		"  record                   read \"SUBJECT NS\" lines from stdin until EOF\n"
		"\n"
		"options:\n"
		"  -s, --segment NAME       segment name (default $TALLY_SEGMENT, else \"tally\")\n"
		"  -h, --help               this help\n"
		"      --version            print the version\n");
}

static int fail_open(const char *name, int rc)
{
	fprintf(stderr, "tally: %s\n", *tally_errmsg() ? tally_errmsg() : tally_strerror(rc));
	(void)name;
	return EXIT_ERROR;
}

static int cmd_dump(const char *name)
{
	struct tally_segment *seg;
	struct tally_segment_info in;
	int rc = tally_segment_open(name, TALLY_OPEN_READER, 1000, &seg);

	if (rc)
		return fail_open(name, rc);
	tally_segment_info(seg, &in);
	printf("segment          %s\n", in.name);
	printf("layout version   %u.%u\n", in.abi_major, in.abi_minor);
	printf("size             %" PRIu64 " bytes\n", in.total_size);
	printf("owner            pid %d, start time %" PRIu64 ", %s\n", (int)in.owner_pid,
	       in.owner_start_time,
	       in.owner_alive ? "alive" : in.owner_stopped ? "stopped cleanly" : "NOT ALIVE");
	printf("generation       %" PRIu64 "\n", in.generation);
	printf("config           %u slots x %u entries, %u subjects (%u used), %u pending, max %" PRIu64 " ns, cool-off %u ms\n",
	       in.config.producer_slots, in.config.ring_capacity, in.config.subject_capacity,
	       in.subjects_used, in.config.pending_capacity, in.config.max_value_ns,
	       in.config.producer_cooloff_ms);
	printf("sections         offset       size\n");
	printf("  subjects       %-12" PRIu64 " %" PRIu64 "\n", in.subjects.off, in.subjects.size);
	printf("  slots          %-12" PRIu64 " %" PRIu64 " (stride %u)\n", in.slots.off, in.slots.size,
	       in.slot_stride);
	printf("  pending        %-12" PRIu64 " %" PRIu64 "\n", in.pending.off, in.pending.size);
	printf("  snapshot       %-12" PRIu64 " %" PRIu64 "\n", in.snapshot.off, in.snapshot.size);
	tally_segment_close(&seg);
	return 0;
}

struct recorder {
	struct tally_segment *seg;
	struct tally_producer *p;
	uint64_t recorded, rejected, dropped;
};

static int record_one(struct recorder *r, const char *subject, const char *value, const char *where)
{
	tally_subject_t id;
	char *end;

	errno = 0;
	unsigned long long ns = strtoull(value, &end, 10);
	if (errno || end == value || *end || value[0] == '-') {
		fprintf(stderr, "tally: %s: \"%s\" is not a latency in nanoseconds (a whole number >= 0)\n",
			where, value);
		return -1;
	}
	int rc = tally_subject_intern(r->seg, subject, &id);
	if (rc) {
		fprintf(stderr, "tally: %s: %s\n", where, tally_errmsg());
		return -1;
	}
	if (!tally_record(r->p, id, ns)) {
		r->dropped++;
		return 0;
	}
	r->recorded++;
	return 0;
}

static void record_stdin(struct recorder *r)
{
	char line[1024], where[64];
	unsigned long lineno = 0;

	while (fgets(line, sizeof(line), stdin)) {
		char *subject, *value, *extra, *save;
		lineno++;
		snprintf(where, sizeof(where), "stdin:%lu", lineno);
		if (!strchr(line, '\n') && !feof(stdin)) {
			fprintf(stderr, "tally: %s: line longer than %zu bytes\n", where, sizeof(line) - 2);
			int c;
			while ((c = getchar()) != EOF && c != '\n')
				;
			r->rejected++;
			continue;
		}
		subject = strtok_r(line, " \t\r\n", &save);
		if (!subject || subject[0] == '#')
			continue;
		value = strtok_r(NULL, " \t\r\n", &save);
		extra = strtok_r(NULL, " \t\r\n", &save);
		if (!value || extra) {
			fprintf(stderr, "tally: %s: expected \"SUBJECT NS\"\n", where);
			r->rejected++;
			continue;
		}
		if (record_one(r, subject, value, where))
			r->rejected++;
	}
}

static int cmd_record(const char *name, int argc, char **argv)
{
	struct recorder r = { 0 };
	int rc = tally_segment_open(name, TALLY_OPEN_PRODUCER, 1000, &r.seg);

	if (rc)
		return fail_open(name, rc);
	if ((rc = tally_producer_attach(r.seg, &r.p))) {
		tally_segment_close(&r.seg);
		return fail_open(name, rc);
	}
	if (argc >= 1 && argc < 2) {
		fprintf(stderr, "tally: record %s: give at least one value in ns, or none to read stdin\n",
			argv[0]);
		tally_producer_detach(&r.p);
		tally_segment_close(&r.seg);
		return EXIT_USAGE;
	}
	if (argc == 0) {
		record_stdin(&r);
	} else {
		for (int i = 1; i < argc; i++) {
			char where[32];
			snprintf(where, sizeof(where), "argument %d", i + 1);
			if (record_one(&r, argv[0], argv[i], where))
				r.rejected++;
		}
	}
	tally_producer_detach(&r.p);
	tally_segment_close(&r.seg);
	printf("recorded %" PRIu64 ", rejected %" PRIu64 ", dropped %" PRIu64 "\n", r.recorded,
	       r.rejected, r.dropped);
	return r.rejected || r.dropped ? 1 : 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "segment", required_argument, NULL, 's' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	const char *seg_opt = NULL;
	int c;

	while ((c = getopt_long(argc, argv, "+s:h", opts, NULL)) != -1) {
		switch (c) {
		case 's':
			seg_opt = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("tally %s (libtally %s)\n", PACKAGE_VERSION, tally_version());
			return 0;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		return EXIT_USAGE;
	}
	const char *cmd = argv[optind++], *name = segment_name(seg_opt);
	if (strcmp(cmd, "dump") == 0 && optind == argc)
		return cmd_dump(name);
	if (strcmp(cmd, "record") == 0)
		return cmd_record(name, argc - optind, argv + optind);
	fprintf(stderr, "tally: unknown command or arguments: %s\n", cmd);
	usage(stderr);
	return EXIT_USAGE;
}
