/* SPDX-License-Identifier: MIT */
/*
 * report.c: what a gateway counts (struct gw_stats: the totals, each
 * route's, the recent unmapped requests) and the two reports made of it,
 * ADMIN_PREFIX/metrics (Prometheus text) and ADMIN_PREFIX/routes (JSON,
 * what `tally stat --gateway URL` reads). Shared by tally-gateway
 * (server.c serves them) and the nginx module (tally_status), whose
 * workers count into one block in a shared zone: its lock is therefore
 * process-shared and robust, so that a worker killed while it held the
 * lock (a few string compares) costs nothing but the entry it was writing.
 */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gateway.h"

/* Counted by processes that share the block: atomics must not be locks. */
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics without a lock");

size_t gw_stats_size(size_t nroutes)
{
	return sizeof(struct gw_stats) + nroutes * sizeof(struct gw_route_count);
}

int gw_stats_init(struct gw_stats *st, size_t nroutes, bool pshared)
{
	pthread_mutexattr_t a;
	int rc;

	memset(st, 0, gw_stats_size(nroutes));
	st->nroutes = (uint32_t)nroutes;
	if ((rc = pthread_mutexattr_init(&a)) != 0)
		return rc;
	if (pshared && ((rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED)) != 0 ||
			(rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST)) != 0)) {
		pthread_mutexattr_destroy(&a);
		return rc;
	}
	rc = pthread_mutex_init(&st->unmapped.lock, &a);
	pthread_mutexattr_destroy(&a);
	return rc;
}

/* The lock, taken over from a holder that died (a worker killed while it
 * noted an unmapped request: its entry may be half written, which only
 * names a request wrongly, and every string stays terminated). */
static void unmapped_lock(struct gw_unmapped *u)
{
	if (pthread_mutex_lock(&u->lock) == EOWNERDEAD) {
		for (unsigned i = 0; i < GW_UNMAPPED_RECENT; i++)
			u->e[i].what[sizeof(u->e[i].what) - 1] = '\0';
		u->next %= GW_UNMAPPED_RECENT;
		pthread_mutex_consistent(&u->lock);
	}
}

/* "METHOD path" into what: the query left out, and a byte outside
 * printable ASCII as %XX (the module's path is nginx's decoded $uri, and
 * the entry goes out as a JSON string, which must be UTF-8), cut at a
 * whole character. */
static void unmapped_what(char *what, size_t len, const char *method, const char *uri)
{
	size_t j = (size_t)snprintf(what, len, "%s ", method);

	if (j >= len)
		j = len - 1;
	for (const unsigned char *c = (const unsigned char *)uri; *c && *c != '?'; c++) {
		bool plain = *c > 0x20 && *c < 0x7f;
		if (j + (plain ? 1 : 3) >= len)
			break;
		if (plain)
			what[j++] = (char)*c;
		else
			j += (size_t)snprintf(what + j, len - j, "%%%02X", *c);
	}
	what[j] = '\0';
}

void gw_unmapped_note(struct gw_unmapped *u, const char *method, const char *uri)
{
	char what[sizeof(u->e[0].what)];

	unmapped_what(what, sizeof(what), method, uri);
	unmapped_lock(u);
	unsigned i = 0;
	while (i < GW_UNMAPPED_RECENT && strcmp(u->e[i].what, what) != 0)
		i++;
	if (i == GW_UNMAPPED_RECENT) { /* new: replaces the oldest new one */
		i = u->next;
		u->next = (u->next + 1) % GW_UNMAPPED_RECENT;
		memcpy(u->e[i].what, what, sizeof(what));
		u->e[i].n = 0;
	}
	u->e[i].n++;
	pthread_mutex_unlock(&u->lock);
}

static void label_escape(const char *in, char *out, size_t len)
{
	size_t j = 0;

	for (; *in && j + 3 < len; in++) {
		if (*in == '\\' || *in == '"' || *in == '\n')
			out[j++] = '\\';
		out[j++] = *in == '\n' ? 'n' : *in;
	}
	out[j] = '\0';
}

char *gw_metrics_text(const struct gw *g)
{
	const struct gw_stats *st = g->st;
	char *buf = NULL, label[512];
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (!f)
		return NULL;
#define GW_PRINT(name, help)                                                                       \
	fprintf(f, "# HELP tally_gateway_" #name "_total " help "\n# TYPE tally_gateway_" #name     \
		   "_total counter\ntally_gateway_" #name "_total %llu\n",                            \
		(unsigned long long)atomic_load_explicit(&st->n.name, memory_order_relaxed));
	GW_METRICS(GW_PRINT)
#undef GW_PRINT
	fprintf(f, "# HELP tally_gateway_route_requests_total requests per route and decision\n"
		   "# TYPE tally_gateway_route_requests_total counter\n");
	for (size_t i = 0; i < g->cfg->nroutes && i < st->nroutes; i++) {
		const struct gw_route *r = &g->cfg->routes[i];
		label_escape(r->name, label, sizeof(label));
		fprintf(f, "tally_gateway_route_requests_total{route=\"%s\",subject=\"%s\",decision=\"admit\"} %llu\n"
			   "tally_gateway_route_requests_total{route=\"%s\",subject=\"%s\",decision=\"shed\"} %llu\n",
			label, r->subject, (unsigned long long)atomic_load(&st->route[i].admitted), label,
			r->subject, (unsigned long long)atomic_load(&st->route[i].shed));
	}
	if (fclose(f) != 0) {
		free(buf);
		return NULL;
	}
	return buf;
}

char *gw_routes_json(const struct gw *g, const char *mode)
{
	struct gw_stats *st = g->st;
	json_t *doc = json_object(), *routes = json_array(), *recent = json_array();

	json_object_set_new(doc, "mode", json_string(mode));
	json_object_set_new(doc, "segment", json_string(g->cfg->segment));
	json_object_set_new(doc, "unmapped", json_integer((json_int_t)atomic_load(&st->n.unmapped)));
	for (size_t i = 0; i < g->cfg->nroutes && i < st->nroutes; i++) {
		const struct gw_route *r = &g->cfg->routes[i];
		json_array_append_new(routes, json_pack("{s:s, s:s, s:I, s:I}", "route", r->name, "subject",
							r->subject, "admitted",
							(json_int_t)atomic_load(&st->route[i].admitted), "shed",
							(json_int_t)atomic_load(&st->route[i].shed)));
	}
	unmapped_lock(&st->unmapped);
	for (unsigned k = 0; k < GW_UNMAPPED_RECENT; k++) {
		/* oldest first: the slot the next new one replaces, then on */
		unsigned i = (st->unmapped.next + k) % GW_UNMAPPED_RECENT;
		if (st->unmapped.e[i].what[0])
			json_array_append_new(recent, json_pack("{s:s, s:I}", "request", st->unmapped.e[i].what,
								"count", (json_int_t)st->unmapped.e[i].n));
	}
	pthread_mutex_unlock(&st->unmapped.lock);
	json_object_set_new(doc, "routes", routes);
	json_object_set_new(doc, "recent_unmapped", recent);
	char *text = json_dumps(doc, JSON_INDENT(2) | JSON_ENSURE_ASCII);
	json_decref(doc);
	return text;
}
