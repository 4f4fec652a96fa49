/* SPDX-License-Identifier: MIT */
/*
 * tally.c: the tally command line: global options, dispatch, the helpers
 * every command shares (cli.h), and the low-level command dump (header,
 * sections, producer slots, for diagnosis). stat and status
 * live in tally_stat.c, top in tally_top.c, record (as a producer, from
 * arguments or stdin) in tally_record.c.
 *
 * Reads a segment read-only unless it records. Exit status: 0 success,
 * 1 partial failure (some record input rejected), 2 bad usage (on stderr),
 * 4 error (no segment, no permission, a version mismatch, ...);
 * tally status exits with its verdict (0 ok, 1 warn, 2 overload,
 * 3 unknown) or 4.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <langinfo.h>
#include <locale.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "text.h"

/* ---- shared helpers ----------------------------------------------------------- */

int cli_fail(const char *segment, int rc)
{
	const char *msg = tally_errmsg();

	if (msg && *msg)
		fprintf(stderr, "tally: %s\n", msg);
	else if (rc == -ENOENT)
		fprintf(stderr, "tally: no segment \"%s\": is its owner (tallyd -s %s) running?\n",
			segment, segment);
	else
		fprintf(stderr, "tally: segment \"%s\": %s\n", segment, tally_strerror(rc));
	return CLI_EXIT_ERROR;
}

int cli_open_reader(const char *segment, struct tally_segment **out)
{
	int rc = tally_segment_open(segment, TALLY_OPEN_READER, 1000, out);

	return rc ? cli_fail(segment, rc) : 0;
}

bool cli_utf8_locale(void)
{
	static int known = -1;

	if (known < 0) {
		const char *cs = nl_langinfo(CODESET);
		known = cs && (strcmp(cs, "UTF-8") == 0 || strcmp(cs, "utf8") == 0);
	}
	return known;
}

const char *cli_fmt_ns(char *buf, size_t len, uint64_t ns)
{
	double v = (double)ns;

	if (ns < 1000)
		snprintf(buf, len, "%" PRIu64 "ns", ns);
	else if (ns < 1000000)
		snprintf(buf, len, "%.*f%s", ns < 100000 ? 1 : 0, v / 1e3, cli_utf8_locale() ? "µs" : "us");
	else if (ns < 1000000000)
		snprintf(buf, len, "%.*fms", ns < 100000000 ? 2 : 1, v / 1e6);
	else if (ns < 60000000000ull)
		snprintf(buf, len, "%.2fs", v / 1e9);
	else
		snprintf(buf, len, "%.1fmin", v / 6e10);
	return buf;
}

const char *cli_fmt_age_ms(char *buf, size_t len, uint64_t ms)
{
	if (ms == UINT64_MAX)
		snprintf(buf, len, "never");
	else if (ms < 10000)
		snprintf(buf, len, "%.1fs", (double)ms / 1e3);
	else if (ms < 60000)
		snprintf(buf, len, "%" PRIu64 "s", ms / 1000);
	else if (ms < 3600000)
		snprintf(buf, len, "%" PRIu64 "m%02" PRIu64 "s", ms / 60000, ms / 1000 % 60);
	else
		snprintf(buf, len, "%" PRIu64 "h%02" PRIu64 "m", ms / 3600000, ms / 60000 % 60);
	return buf;
}

const char *cli_fmt_count(char *buf, size_t len, uint64_t n)
{
	if (n < 1000000)
		snprintf(buf, len, "%" PRIu64, n);
	else if (n < 1000000000)
		snprintf(buf, len, "%.1fM", (double)n / 1e6);
	else if (n < 1000000000000ull)
		snprintf(buf, len, "%.1fG", (double)n / 1e9);
	else
		snprintf(buf, len, "%.1fT", (double)n / 1e12);
	return buf;
}

int cli_width(const char *s)
{
	int w = 0;

	for (; *s; s++)
		if (((unsigned char)*s & 0xc0) != 0x80)
			w++;
	return w;
}

void cli_pad(FILE *to, const char *s, int width)
{
	int w = cli_width(s), fill = (width < 0 ? -width : width) - w;

	if (width > 0)
		for (int i = 0; i < fill; i++)
			fputc(' ', to);
	fputs(s, to);
	if (width < 0)
		for (int i = 0; i < fill; i++)
			fputc(' ', to);
}

int cli_parse_u64(const char *s, uint64_t *out)
{
	char *end;

	if (!s || !*s || *s == '-' || *s == '+' || *s == ' ')
		return -1;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end)
		return -1;
	*out = v;
	return 0;
}

/* ---- global usage ----------------------------------------------------------- */

static void usage(FILE *to)
{
	fprintf(to,
		"usage: tally [-s SEGMENT] COMMAND [ARGS]\n"
		"\n"
		"commands:\n"
		"  stat [--json]            subjects, producers, consumers and poller, once\n"
		"  status SUBJECT           verdict of SUBJECT; exit 0 ok, 1 warn, 2 overload,\n"
		"                           3 unknown (also: owner dead, data stale), 4 error\n"
		"  top                      live full-screen view (q quits)\n"
		"  dump                     header, sections and producer slots of the segment\n"
		"  record SUBJECT NS...     record latencies (ns) for SUBJECT as a producer\n"
		"  record                   read \"SUBJECT NS\" lines from stdin until EOF;\n"
		"                           waits for room in the ring, never drops\n"
		"  demo                     the live demo: nats-server, a router, rising load, verdicts\n"
		"\n"
		"options:\n"
		"  -s, --segment NAME       segment name (default $TALLY_SEGMENT, else \"tally\")\n"
		"  -h, --help               this help; COMMAND --help for a command's\n"
		"      --version            print the version\n"
		"\n"
		"exit status: 0 success, 1 some input rejected (record), 2 bad usage,\n"
		"4 error (no segment, no permission, version mismatch); status: see above.\n");
}

/*
 * Options every command takes: -s/--segment and -h/--help. Returns -1 to
 * go on (optind at the operands), else the exit status.
 */
static int simple_opts(const char *help, const char **segment, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "segment", required_argument, NULL, 's' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	optind = 0;
	while ((c = getopt_long(argc, argv, "+s:h", opts, NULL)) != -1) {
		switch (c) {
		case 's':
			*segment = optarg;
			break;
		case 'h':
			fputs(help, stdout);
			return CLI_EXIT_OK;
		default:
			fputs(help, stderr);
			return CLI_EXIT_USAGE;
		}
	}
	return -1;
}

/* ---- dump --------------------------------------------------------------------- */

static const char dump_help[] =
	"usage: tally dump [-s SEGMENT]\n"
	"\n"
	"Print the segment's header (layout version, owner, generation, config),\n"
	"its sections with offsets and sizes, and every producer slot in use,\n"
	"for diagnosis. Reads the segment read-only.\n"
	"\n"
	"  -s, --segment NAME   segment (default $TALLY_SEGMENT, else \"tally\")\n"
	"  -h, --help           this help\n"
	"\n"
	"exit status: 0, 2 bad usage, 4 error (no segment, no permission, ...)\n";

static void dump_slots(struct tally_segment *seg, uint32_t nslots)
{
	struct tally_producer_stats *ps = calloc(nslots ? nslots : 1, sizeof(*ps));
	int n = ps ? tally_read_producers(seg, ps, nslots) : -ENOMEM;

	if (n < 0) {
		printf("producer slots   unreadable: %s\n", tally_strerror(n));
		free(ps);
		return;
	}
	printf("producer slots   %d of %u in use\n", n, nslots);
	if (n)
		printf("  %4s %-9s %8s %8s %12s %10s %10s %8s %s\n", "slot", "state", "pid", "tid",
		       "samples", "dropped", "clamped", "backlog", "alive");
	for (int i = 0; i < n; i++)
		printf("  %4u %-9s %8d %8d %12" PRIu64 " %10" PRIu64 " %10" PRIu64 " %8" PRIu64 " %s\n",
		       ps[i].slot, ps[i].state, (int)ps[i].pid, (int)ps[i].tid, ps[i].samples,
		       ps[i].dropped, ps[i].clamped, ps[i].backlog, ps[i].alive ? "yes" : "no");
	free(ps);
}

static int cmd_dump(const char *name, int argc, char **argv)
{
	struct tally_segment *seg;
	struct tally_segment_info in;
	int rc = simple_opts(dump_help, &name, argc, argv);

	if (rc >= 0)
		return rc;
	if (optind != argc) {
		fprintf(stderr, "tally dump: unexpected argument \"%s\"\n", argv[optind]);
		fputs(dump_help, stderr);
		return CLI_EXIT_USAGE;
	}
	if ((rc = cli_open_reader(name, &seg)))
		return rc;
	if ((rc = tally_segment_info(seg, &in))) {
		tally_segment_close(&seg);
		return cli_fail(name, rc);
	}
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
	if (in.remote.size)
		printf("  remote         %-12" PRIu64 " %" PRIu64 "\n", in.remote.off, in.remote.size);
	if (in.rules.size)
		printf("  rules          %-12" PRIu64 " %" PRIu64 "\n", in.rules.off, in.rules.size);
	dump_slots(seg, in.config.producer_slots);
	tally_segment_close(&seg);
	return 0;
}

/* ---- main --------------------------------------------------------------------- */

static const char *segment_name(const char *opt)
{
	const char *env = getenv("TALLY_SEGMENT");

	return opt ? opt : env && *env ? env : "tally";
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

	text_guard_stderr(); /* no message echoes a control byte raw */

	/* Characters only: numbers (and so JSON) stay in the C locale. */
	setlocale(LC_CTYPE, "");
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
			return CLI_EXIT_USAGE;
		}
	}
	if (optind >= argc) {
		fprintf(stderr, "tally: no command given\n");
		usage(stderr);
		return CLI_EXIT_USAGE;
	}
	const char *cmd = argv[optind], *name = segment_name(seg_opt);
	int cargc = argc - optind;
	char **cargv = argv + optind;

	if (strcmp(cmd, "stat") == 0)
		return tally_cmd_stat(name, cargc, cargv);
	if (strcmp(cmd, "status") == 0)
		return tally_cmd_status(name, cargc, cargv);
	if (strcmp(cmd, "top") == 0)
		return tally_cmd_top(name, cargc, cargv);
	if (strcmp(cmd, "dump") == 0)
		return cmd_dump(name, cargc, cargv);
	if (strcmp(cmd, "record") == 0)
		return tally_cmd_record(name, cargc, cargv);
	if (strcmp(cmd, "demo") == 0) /* its own segment unless one is named */
		return tally_cmd_demo(seg_opt || getenv("TALLY_SEGMENT") ? name : "tally-demo", cargc, cargv);
	fprintf(stderr, "tally: unknown command \"%s\"\n", cmd);
	usage(stderr);
	return CLI_EXIT_USAGE;
}
