/* SPDX-License-Identifier: MIT */
/*
 * test_gateway_stats.c: what a gateway counts (tools/gateway/report.c)
 * when, as in the nginx module, several processes count into one block of
 * shared memory: notes from four processes at once add up exactly; a
 * process killed while it holds the lock, half way through writing an
 * entry, blocks nobody, and the entry it left is read as a terminated
 * string; the two reports (routes JSON, Prometheus text) say what was
 * counted.
 */
#include "config.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gateway.h"

static struct gw_route routes[2] = {
	{ .name = (char *)"GET /a/**", .subject = (char *)"svc.a" },
	{ .name = (char *)"* /b/\"q\"", .subject = (char *)"svc.b" },
};

/* A gateway whose counts are in a shared mapping, as the module's zone. */
static struct gw *shared_gw(struct gw_config *cfg)
{
	static struct gw g;

	memset(cfg, 0, sizeof(*cfg));
	cfg->routes = routes;
	cfg->nroutes = 2;
	cfg->segment = (char *)"seg";
	g.cfg = cfg;
	g.st = mmap(NULL, gw_stats_size(2), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	cr_assert_neq(g.st, MAP_FAILED);
	cr_assert_eq(gw_stats_init(g.st, 2, true), 0);
	return &g;
}

static json_t *routes_doc(const struct gw *g)
{
	char *text = gw_routes_json(g, "module");
	json_error_t je;

	cr_assert_not_null(text);
	json_t *doc = json_loads(text, 0, &je);
	cr_assert_not_null(doc, "%s: %s", je.text, text);
	free(text);
	return doc;
}

/* The count of "GET path" in recent_unmapped, 0 if absent. */
static json_int_t recent_count(const json_t *doc, const char *what)
{
	size_t i;
	json_t *e;

	json_array_foreach(json_object_get(doc, "recent_unmapped"), i, e)
		if (!strcmp(json_string_value(json_object_get(e, "request")), what))
			return json_integer_value(json_object_get(e, "count"));
	return 0;
}

Test(gateway_stats, notes_from_four_processes_add_up, .timeout = 60)
{
	struct gw_config cfg;
	struct gw *g = shared_gw(&cfg);
	pid_t kids[4];

	for (int k = 0; k < 4; k++)
		if ((kids[k] = fork()) == 0) {
			char path[32];
			for (int i = 0; i < 2000; i++) {
				snprintf(path, sizeof(path), "/p/%d?i=%d", i % 10, i);
				gw_unmapped_note(&g->st->unmapped, "GET", path);
			}
			_exit(0);
		}
	for (int k = 0; k < 4; k++) {
		int st;
		cr_assert_eq(waitpid(kids[k], &st, 0), kids[k]);
		cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	}
	json_t *doc = routes_doc(g);
	for (int p = 0; p < 10; p++) {
		char what[32];
		snprintf(what, sizeof(what), "GET /p/%d", p);
		cr_expect_eq(recent_count(doc, what), 4 * 200, "%s, the query left out", what);
	}
	cr_expect_str_eq(json_string_value(json_object_get(doc, "mode")), "module");
	json_decref(doc);
	munmap(g->st, gw_stats_size(2));
}

/* A process dies holding the lock, its entry half written (no NUL in
 * its 160 bytes, a count it had not finished): the next note takes the
 * lock over at once, and the reports read the entry cut to a string. */
Test(gateway_stats, a_holder_killed_mid_write_blocks_nobody, .timeout = 30)
{
	struct gw_config cfg;
	struct gw *g = shared_gw(&cfg);
	struct gw_unmapped *u = &g->st->unmapped;

	gw_unmapped_note(u, "GET", "/before");
	pid_t kid = fork();
	if (kid == 0) {
		pthread_mutex_lock(&u->lock);
		memset(u->e[1].what, 'A', sizeof(u->e[1].what));
		u->e[1].n = 7;
		u->next = 2;
		raise(SIGKILL);
	}
	int st;
	cr_assert_eq(waitpid(kid, &st, 0), kid);
	cr_assert(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
	gw_unmapped_note(u, "POST", "/after"); /* would hang on a lock that is not robust */
	gw_unmapped_note(u, "GET", "/before");
	json_t *doc = routes_doc(g);
	cr_expect_eq(recent_count(doc, "GET /before"), 2);
	cr_expect_eq(recent_count(doc, "POST /after"), 1);
	size_t i;
	json_t *e;
	bool cut = false;
	json_array_foreach(json_object_get(doc, "recent_unmapped"), i, e) {
		const char *w = json_string_value(json_object_get(e, "request"));
		cr_expect_lt(strlen(w), sizeof(u->e[0].what), "every entry a string of its slot");
		cut |= w[0] == 'A';
	}
	cr_expect(cut, "the dead process's entry is there, cut to its slot");
	json_decref(doc);
	munmap(g->st, gw_stats_size(2));
}

/* The module notes nginx's decoded path: any byte. The entry keeps
 * printable ASCII and writes the rest as %XX, so that it is valid UTF-8
 * for the JSON (jansson refuses a string that is not, and the entry
 * would be lost), cut at a whole escape. */
Test(gateway_stats, an_unmapped_path_of_any_bytes_is_kept)
{
	struct gw_config cfg;
	struct gw *g = shared_gw(&cfg);
	char longp[400] = "/";

	gw_unmapped_note(&g->st->unmapped, "GET", "/a\xff b/\xc3\xa9\x01?q=\xff");
	memset(longp + 1, '\xfe', sizeof(longp) - 2);
	gw_unmapped_note(&g->st->unmapped, "GET", longp);
	json_t *doc = routes_doc(g);
	cr_expect_eq(recent_count(doc, "GET /a%FF%20b/%C3%A9%01"), 1, "escaped, the query left out");
	json_t *e1 = json_array_get(json_object_get(doc, "recent_unmapped"), 1);
	const char *w = json_string_value(json_object_get(e1, "request"));
	cr_assert_not_null(w, "the long one is there too");
	cr_expect_lt(strlen(w), sizeof(g->st->unmapped.e[0].what));
	cr_expect_eq((strlen(w) - strlen("GET /")) % 3, 0, "cut at a whole escape: %s", w);
	json_decref(doc);
	munmap(g->st, gw_stats_size(2));
}

Test(gateway_stats, the_reports_say_what_was_counted)
{
	struct gw_config cfg;
	struct gw *g = shared_gw(&cfg);

	atomic_store(&g->st->n.unmapped, 3);
	atomic_store(&g->st->n.shed_503, 2);
	atomic_store(&g->st->route[0].admitted, 5);
	atomic_store(&g->st->route[1].shed, 2);
	char *text = gw_metrics_text(g);
	cr_assert_not_null(text);
	cr_expect(strstr(text, "tally_gateway_unmapped_total 3\n") && strstr(text, "tally_gateway_shed_503_total 2\n"),
		  "%s", text);
	cr_expect(strstr(text, "{route=\"GET /a/**\",subject=\"svc.a\",decision=\"admit\"} 5\n"), "%s", text);
	cr_expect(strstr(text, "{route=\"* /b/\\\"q\\\"\",subject=\"svc.b\",decision=\"shed\"} 2\n"),
		  "a quote in a route's name escaped: %s", text);
	free(text);
	json_t *doc = routes_doc(g);
	cr_expect_eq(json_integer_value(json_object_get(doc, "unmapped")), 3);
	json_t *r1 = json_array_get(json_object_get(doc, "routes"), 1);
	cr_expect_str_eq(json_string_value(json_object_get(r1, "route")), "* /b/\"q\"");
	cr_expect_eq(json_integer_value(json_object_get(r1, "shed")), 2);
	cr_expect_str_eq(json_string_value(json_object_get(doc, "segment")), "seg");
	json_decref(doc);
	munmap(g->st, gw_stats_size(2));
}
