/* SPDX-License-Identifier: MIT */
/*
 * test_gateway_shed.c: tally-gateway's pure parts on their own: the
 * shedding decision (each level and class, the engine's shed_probability
 * taking over from the fallback, 429 against 503, the jittered
 * Retry-After, measured over many draws with a bound), path patterns and
 * first-match routing, and the configuration's defaults.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gateway.h"

static double shed_rate(const struct gw_shed_config *c, enum gw_level l, double sp, enum gw_priority p,
			int n, unsigned *status)
{
	struct gw_decision d;
	int shed = 0;

	*status = 0;
	for (int i = 0; i < n; i++) {
		gw_decide(c, l, sp, p, gw_uniform(), &d);
		if (!d.admit) {
			shed++;
			cr_assert(*status == 0 || *status == d.status, "one status per level");
			*status = d.status;
		}
	}
	return (double)shed / n;
}

static void near(double f, double p, int n, const char *what)
{
	double bound = 5 * sqrt(p * (1 - p) / n) + 1e-9;
	cr_expect(fabs(f - p) <= bound, "%s: %.4f, expected %.4f +- %.4f", what, f, p, bound);
}

Test(gateway_shed, fallback_fractions_by_level_and_class)
{
	struct gw_shed_config c;
	unsigned st;
	int n = 200000;

	gw_shed_config_init(&c);
	cr_expect_eq(shed_rate(&c, GW_LEVEL_OK, -1, GW_PRIO_SHEDDABLE, n, &st), 0.0);
	cr_expect_eq(shed_rate(&c, GW_LEVEL_OPEN, -1, GW_PRIO_SHEDDABLE, n, &st), 0.0, "fail-open admits");
	near(shed_rate(&c, GW_LEVEL_WARN, -1, GW_PRIO_DEFAULT, n, &st), 0.25, n, "warn default");
	cr_expect_eq(st, 429);
	near(shed_rate(&c, GW_LEVEL_WARN, -1, GW_PRIO_SHEDDABLE, n, &st), 0.5, n, "warn sheddable");
	cr_expect_eq(shed_rate(&c, GW_LEVEL_WARN, -1, GW_PRIO_CRITICAL, n, &st), 0.0, "warn critical");
	near(shed_rate(&c, GW_LEVEL_OVERLOAD, -1, GW_PRIO_DEFAULT, n, &st), 0.99, n, "overload: a trickle");
	cr_expect_eq(st, 503);
	near(shed_rate(&c, GW_LEVEL_OVERLOAD, -1, GW_PRIO_CRITICAL, n, &st), 0.99, n, "overload critical");
	cr_expect_eq(shed_rate(&c, GW_LEVEL_OVERLOAD, -1, GW_PRIO_SHEDDABLE, n, &st), 1.0);
	cr_expect_eq(shed_rate(&c, GW_LEVEL_CLOSED, -1, GW_PRIO_CRITICAL, n, &st), 1.0, "fail-closed sheds all");
	cr_expect_eq(st, 503);
	c.overload_trickle = 0;
	cr_expect_eq(shed_rate(&c, GW_LEVEL_OVERLOAD, -1, GW_PRIO_DEFAULT, n, &st), 1.0, "no trickle");
}

Test(gateway_shed, engine_shed_probability_takes_over)
{
	struct gw_shed_config c;
	unsigned st;
	int n = 200000;

	gw_shed_config_init(&c);
	near(shed_rate(&c, GW_LEVEL_WARN, 0.1, GW_PRIO_DEFAULT, n, &st), 0.1, n, "warn at p = 0.1");
	near(shed_rate(&c, GW_LEVEL_WARN, 0.1, GW_PRIO_SHEDDABLE, n, &st), 0.2, n, "sheddable x 2");
	near(shed_rate(&c, GW_LEVEL_OVERLOAD, 0.7, GW_PRIO_DEFAULT, n, &st), 0.7, n, "overload at p = 0.7");
	near(shed_rate(&c, GW_LEVEL_OVERLOAD, 0.7, GW_PRIO_CRITICAL, n, &st), 0.7, n, "critical at overload");
	cr_expect_eq(shed_rate(&c, GW_LEVEL_WARN, 0.7, GW_PRIO_CRITICAL, n, &st), 0.0);
	cr_expect_eq(shed_rate(&c, GW_LEVEL_OK, 0.7, GW_PRIO_DEFAULT, n, &st), 0.0, "ok admits whatever p says");
}

Test(gateway_shed, retry_after_is_jittered_within_bounds)
{
	struct gw_shed_config c;
	unsigned seen[8] = { 0 };

	gw_shed_config_init(&c);
	for (int i = 0; i < 10000; i++) {
		unsigned s = gw_retry_after_s(&c, 2000, gw_uniform(), gw_uniform());
		cr_assert(s >= 2 && s <= 3, "2000 ms + up to 50%%: %u", s);
		seen[s]++;
	}
	cr_expect(seen[2] > 1000 && seen[3] > 1000, "spread: %u x 2 s, %u x 3 s", seen[2], seen[3]);
	cr_expect_eq(gw_retry_after_s(&c, 0, 0.0, 0.0), 1, "no hint: the config's 1000 ms");
	cr_expect_eq(gw_retry_after_s(&c, 1, 0.0, 0.0), 1, "never 0");
}

Test(gateway_shed, path_patterns)
{
	const char *why;

	cr_expect(gw_path_match("/orders/*", "/orders/7"));
	cr_expect(gw_path_match("/orders/*", "/orders/7?x=/y"));
	cr_expect_not(gw_path_match("/orders/*", "/orders/7/items"));
	cr_expect_not(gw_path_match("/orders/*", "/orders"));
	cr_expect(gw_path_match("/orders/**", "/orders"));
	cr_expect(gw_path_match("/orders/**", "/orders/7/items"));
	cr_expect_not(gw_path_match("/orders/**", "/ordersx"));
	cr_expect(gw_path_match("/u/*/orders", "/u/42/orders"));
	cr_expect_not(gw_path_match("/u/*/orders", "/u/42/orders/1"));
	cr_expect(gw_path_match("/", "/"));
	cr_expect(gw_path_match("/**", "/anything/at/all"));
	cr_expect_not(gw_path_match("/a", "/a/"));
	cr_expect_eq(gw_path_pattern_check("/a/**", &why), 0);
	cr_expect_eq(gw_path_pattern_check("/a/**/b", &why), -1);
	cr_expect_eq(gw_path_pattern_check("/a*", &why), -1);
	cr_expect_eq(gw_path_pattern_check("a", &why), -1);
}

/* The path as nginx routes it ($uri), whatever the spelling. */
Test(gateway_shed, paths_are_normalised_as_nginx_does)
{
	static const char *const cases[][2] = {
		{ "/", "/" },
		{ "/over/1", "/over/1" },
		{ "/over/1?x=/../y", "/over/1" },
		{ "/over/1#frag", "/over/1" },
		{ "/ok/../over/1", "/over/1" },
		{ "//over//1", "/over/1" },
		{ "/%6Fver/1", "/over/1" },
		{ "/%6fver/1", "/over/1" },
		{ "/ok/%2e%2e/over/1", "/over/1" },
		{ "/ok/..%2Fover/1", "/over/1" },
		{ "/ok%2F..%2Fover/1", "/over/1" },
		{ "/./over/./1", "/over/1" },
		{ "/../../over/1", "/over/1" },
		{ "/a/b/..", "/a/" },
		{ "/a/b/.", "/a/b/" },
		{ "/a/", "/a/" },
		{ "/a//", "/a/" },
		{ "/..", "/" },
		{ "/a/...", "/a/..." },
		{ "/a/.b/..c", "/a/.b/..c" },
		{ "/items/5%3F/x", "/items/5%3F/x" },
		{ "/items/5%23/x", "/items/5%23/x" },
		{ "/a%00b", "/a%00b" },
		{ "/a%zzb%4", "/a%zzb%4" },
		{ "/a%", "/a%" },
		{ "/%25%36%46ver", "/%6Fver" },
	};
	char out[256];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		memset(out, 'x', sizeof(out));
		gw_path_normalize(cases[i][0], out);
		cr_expect_str_eq(out, cases[i][1], "%s: got %s, want %s", cases[i][0], out, cases[i][1]);
	}
	/* the room the header names is enough: every byte a decoded '?' */
	char big[3 * 100 + 1], *o = malloc(3 * strlen("/") + 3 * 300 + 2);
	cr_assert(o);
	big[0] = '/';
	for (int i = 0; i < 99; i++)
		memcpy(big + 1 + 3 * i, "%3F", 3);
	big[1 + 3 * 99] = '\0';
	gw_path_normalize(big, o);
	cr_expect_eq(strlen(o), strlen(big), "each %%3F stays three bytes");
	free(o);
}

static const char *no_header(void *ctx, const char *name)
{
	(void)name;
	return ctx;
}

Test(gateway_shed, config_and_first_match)
{
	char dir[] = "/tmp/tt-gwshed-XXXXXX", path[64], err[4096];
	struct gw_config cfg;

	cr_assert_not_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/g.ini", dir);
	FILE *f = fopen(path, "w");
	fputs("; comment\n[route GET,HEAD /a/**]\nsubject = a\n[route * /a/b]\nsubject = b\n"
	      "[route POST /**]\nheader = X-Tenant\nsubject = c\npriority = sheddable\n", f);
	fclose(f);
	cr_assert_eq(gw_config_load(&cfg, path, NULL, err, sizeof(err)), 0, "%s", err);
	cr_expect_eq(cfg.mode, GW_MODE_CHECK);
	cr_expect_str_eq(cfg.listen, "127.0.0.1:8090");
	cr_expect_str_eq(cfg.segment, "tally");
	cr_expect_eq(cfg.shed_status, 403);
	cr_expect_eq(cfg.nroutes, 3);
	struct gw_route *r = gw_route_find(cfg.routes, cfg.nroutes, "HEAD", "/a/b", no_header, NULL);
	cr_expect(r && strcmp(r->subject, "a") == 0, "the first match wins");
	r = gw_route_find(cfg.routes, cfg.nroutes, "PUT", "/a/b", no_header, NULL);
	cr_expect(r && strcmp(r->subject, "b") == 0);
	cr_expect_null(gw_route_find(cfg.routes, cfg.nroutes, "POST", "/x", no_header, NULL), "no header");
	r = gw_route_find(cfg.routes, cfg.nroutes, "POST", "/x", no_header, (void *)(uintptr_t)"gold");
	cr_expect(r && r->priority == GW_PRIO_SHEDDABLE);
	gw_config_free(&cfg);
	remove(path);
	remove(dir);
}
