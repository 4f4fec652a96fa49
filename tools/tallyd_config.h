/* SPDX-License-Identifier: MIT */
/*
 * tallyd_config.h: tallyd's configuration file (INI, read with inih) and
 * the command-line values that override it. etc/tallyd.ini documents every
 * key; the rules of the format:
 *
 *   [segment]  [engine]  [http]  [nats]     once each (keys may not repeat)
 *   [share]                                 once: verdicts shared with other
 *                                           hosts through a JetStream KV bucket
 *   [watch STREAM]                          every consumer of a stream
 *   [watch STREAM/CONSUMER]                 one consumer
 *   [thresholds]                            the default rule
 *   [thresholds PATTERN]                    a rule for a subject or NATS
 *                                           wildcard pattern (orders.*, orders.>)
 *
 * The argument of a section is everything after the first space (quotes
 * around it are optional). Stream and consumer names cannot hold '/', '.'
 * or spaces and subjects cannot hold spaces, so neither form is
 * ambiguous. Durations are integers in the unit their key ends with (_ms,
 * _us); the keys that end up in nanoseconds (p95_*_ms, slice_ms,
 * window_ms, max_value_ms) also take a fraction, e.g. 0.25. Booleans:
 * true/false, yes/no, on/off, 1/0. A pattern's rule starts from the
 * default rule ([thresholds]) and overrides the keys it sets.
 *
 * Every error names FILE:LINE, the reason, and for an unknown key the
 * valid ones; all errors of a file are reported, not just the first.
 */
#ifndef TALLYD_CONFIG_H
#define TALLYD_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <tally/tally.h>

#include "exporter.h"

/* Command-line values; NULL or false: not given. */
struct tallyd_overrides {
	const char *segment;   /* -s/--segment, else TALLY_SEGMENT */
	const char *http;      /* --http ADDR:PORT */
	bool no_http;          /* --no-http */
	const char *nats_url;  /* --nats URL */
};

struct tallyd_rule {
	char *pattern;         /* NULL: the default rule */
	int line;              /* of its section header */
	uint32_t set;          /* bit per key of the thresholds table given here */
	struct tally_threshold_rule rule;
};

struct tallyd_watch {
	char *stream, *consumer, *map_subject; /* consumer NULL: the whole stream */
	int line;
};

struct tallyd_config {
	char *path;                        /* NULL: no file, defaults only */
	/* [segment] */
	char *segment_name;
	struct tally_segment_config seg;   /* seg.group points at group */
	char *group;
	/* [engine] */
	struct tally_engine_config engine;
	/* [http]; http.listen points at http_listen, the rest of http is
	 * parsed from the strings below */
	char *http_listen;
	bool http_enabled;
	struct tallyd_http_opts http;
	char *http_buckets, *http_tls_cert, *http_tls_key, *http_users, *http_users_file;
	/* [nats] (nats.urls NULL: no poller); strings point into this struct */
	struct tally_poller_config nats;
	char *nats_url, *creds, *user, *password, *token, *tls_ca, *js_domain, *js_prefix;
	bool include_ack_pending;
	/* [watch ...] */
	struct tallyd_watch *watches;
	size_t nwatches;
	struct tally_poller_watch *pwatches; /* the same, as the poller takes them */
	/* [share] (share_enabled false: no share thread, no remote section);
	 * share's strings point into this struct; read at start only */
	bool share_enabled, share_create;
	struct tally_share_config share;
	char *share_host, *share_bucket, *share_url, *share_combine, *share_local, *share_max;
	char *share_patterns[2];               /* the rules' patterns point into these */
	struct tally_share_rule *share_rules;
	size_t nshare_rules;
	/* [thresholds ...]; rules[0] is the default rule */
	struct tallyd_rule *rules;
	size_t nrules;
};

/*
 * Defaults, then path (NULL: none), then ov. 0, or 2 lines+ of
 * "FILE:LINE: reason" in err (NUL-terminated, truncated to errlen) and
 * -EINVAL (bad content) or -ENOENT/-EACCES (cannot read the file). On
 * failure *cfg holds nothing to free.
 */
int tallyd_config_load(const char *path, const struct tallyd_overrides *ov,
		       struct tallyd_config *cfg, char *err, size_t errlen);

/* A new threshold set from cfg's rules (already validated by load). NULL
 * on failure with the reason in err. */
struct tally_thresholds *tallyd_config_thresholds(const struct tallyd_config *cfg, char *err,
						  size_t errlen);

/* Whether [http] (or --http/--no-http) differs: a restart-only change. */
bool tallyd_config_http_differs(const struct tallyd_config *a, const struct tallyd_config *b);

/* Free what load allocated; idempotent. */
void tallyd_config_free(struct tallyd_config *cfg);

#endif /* TALLYD_CONFIG_H */
