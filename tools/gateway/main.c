/* SPDX-License-Identifier: MIT */
/*
 * main.c: tally-gateway's command line: options, the configuration file,
 * and the server (server.c). Exit status: 0 after SIGINT/SIGTERM, 2 bad
 * usage or a bad configuration (every error with FILE:LINE), 4 the
 * server could not start.
 */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gateway.h"

static void usage(FILE *to)
{
	fprintf(to,
		"usage: tally-gateway [-c FILE] [--mode check|proxy] [--listen ADDR:PORT] [-s SEGMENT]\n"
		"                     [--upstream http://HOST:PORT] [--fail-closed] [--check-config]\n"
		"Admits or sheds HTTP requests from the router's verdicts in a tally segment\n"
		"(docs/gateway.md). Routes in the configuration map METHOD PATH (and headers)\n"
		"to a subject; a request that matches none is admitted.\n"
		"  check mode  answers a proxy's subrequest (nginx auth_request, Envoy ext_authz):\n"
		"              200 admits; a shed is 403 (or 429/503 with [check] shed_status =\n"
		"              native), X-Tally-Status says 429 or 503, Retry-After when to retry\n"
		"  proxy mode  forwards what it admits to --upstream and answers a shed itself:\n"
		"              429 under pressure (warn), 503 at overload\n"
		"  -c, --config FILE    INI file (etc/gateway.ini documents every key)\n"
		"  -m, --mode MODE      check (default) or proxy\n"
		"  -l, --listen A:P     address (default 127.0.0.1:8090)\n"
		"  -s, --segment NAME   segment (default $TALLY_SEGMENT, else \"tally\")\n"
		"  -u, --upstream URL   proxy mode: where to forward, http://HOST:PORT\n"
		"      --fail-closed    shed (503) when there is no data at all: no segment,\n"
		"                       permission denied, its owner dead, no row for the subject\n"
		"      --check-config   read the configuration, print errors, exit (0 if valid)\n"
		"  -h, --help           this text\n"
		"Admin endpoints: ADMIN_PREFIX/metrics (Prometheus) and ADMIN_PREFIX/health,\n"
		"with admin_prefix = /_tally by default.\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "config", required_argument, NULL, 'c' }, { "mode", required_argument, NULL, 'm' },
		{ "listen", required_argument, NULL, 'l' }, { "segment", required_argument, NULL, 's' },
		{ "upstream", required_argument, NULL, 'u' }, { "fail-closed", no_argument, NULL, 'C' },
		{ "check-config", no_argument, NULL, 'K' }, { "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct gw_overrides ov = { .segment = getenv("TALLY_SEGMENT") };
	const char *file = NULL;
	bool check_only = false;
	int c;

	if (ov.segment && !*ov.segment)
		ov.segment = NULL;
	while ((c = getopt_long(argc, argv, "c:m:l:s:u:h", opts, NULL)) != -1) {
		switch (c) {
		case 'c': file = optarg; break;
		case 'm': ov.mode = optarg; break;
		case 'l': ov.listen = optarg; break;
		case 's': ov.segment = optarg; break;
		case 'u': ov.upstream = optarg; break;
		case 'C': ov.fail_closed = true; break;
		case 'K': check_only = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "tally-gateway: unexpected argument \"%s\" (the file goes after -c)\n", argv[optind]);
		return 2;
	}
	static struct gw g; /* the server's threads use it until the very end */
	static struct gw_config cfg;
	char err[8192];
	if (gw_config_load(&cfg, file, &ov, err, sizeof(err)) != 0) {
		fputs(err, stderr);
		gw_config_free(&cfg);
		return 2;
	}
	if (check_only) {
		printf("%s: valid, %s mode, %zu route(s)\n", file ? file : "defaults",
		       cfg.mode == GW_MODE_CHECK ? "check" : "proxy", cfg.nroutes);
		gw_config_free(&cfg);
		return 0;
	}
	g.cfg = &cfg;
	if (!(g.st = malloc(gw_stats_size(cfg.nroutes))) || gw_stats_init(g.st, cfg.nroutes, false) != 0) {
		fprintf(stderr, "tally-gateway: out of memory for the counters of %zu route(s)\n", cfg.nroutes);
		free(g.st);
		gw_config_free(&cfg);
		return 1;
	}
	gw_reader_init(&g.reader, cfg.segment, cfg.fail_closed);
	int rc = gw_serve(&g);
	gw_reader_close(&g.reader);
	pthread_mutex_destroy(&g.st->unmapped.lock);
	free(g.st);
	gw_config_free(&cfg);
	return rc;
}
