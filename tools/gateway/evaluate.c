/* SPDX-License-Identifier: MIT */
/*
 * evaluate.c: the one place a request is routed, read, decided and
 * counted (gw_evaluate), and the X-Tally-* headers that say what was
 * decided (gw_decision_headers), written for any HTTP server: tally-gateway's
 * check and proxy modes (server.c, proxy.c, through libmicrohttpd) and
 * the nginx module (tools/nginx/), which decides inside nginx's worker
 * without a subrequest. Nothing here knows a server library: headers
 * come in and go out through callbacks.
 */
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "gateway.h"

void gw_evaluate(struct gw *g, const char *method, const char *uri,
		 const char *(*header)(void *ctx, const char *name), void *ctx, struct gw_outcome *o)
{
	const struct gw_config *cfg = g->cfg;
	const char *ph = *cfg->priority_header ? header(ctx, cfg->priority_header) : NULL;

	memset(o, 0, sizeof(*o));
	o->minimal = cfg->minimal_headers;
	o->route = gw_route_find(cfg->routes, cfg->nroutes, method, uri, header, ctx);
	o->priority = o->route ? o->route->priority : GW_PRIO_DEFAULT;
	if (ph)
		gw_priority_parse(ph, &o->priority); /* an unknown value keeps the route's */
	if (!o->route) {
		o->d.admit = true;
		o->d.status = 200;
		atomic_fetch_add_explicit(&g->st->n.unmapped, 1, memory_order_relaxed);
		gw_unmapped_note(&g->st->unmapped, method, uri);
		return;
	}
	o->subject = o->route->subject;
	gw_read(&g->reader, o->subject, &o->rd);
	gw_decide(&cfg->shed, o->rd.level, o->rd.shed_probability, o->priority, gw_uniform(), &o->d);
	if (!o->d.admit)
		o->retry_after_s = gw_retry_after_s(&cfg->shed, o->rd.retry_after_ms, gw_uniform(), gw_uniform());
	struct gw_counters *c = &g->st->n;
	_Atomic uint64_t *n = o->d.admit ? (o->rd.why ? &c->fail_open : &c->admitted)
			      : o->rd.level == GW_LEVEL_CLOSED ? &c->fail_closed
			      : o->d.status == 429 ? &c->shed_429 : &c->shed_503;
	struct gw_route_count *rc = &g->st->route[o->route - cfg->routes];
	atomic_fetch_add_explicit(n, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(o->d.admit ? &rc->admitted : &rc->shed, 1, memory_order_relaxed);
}

void gw_decision_headers(const struct gw_outcome *o, void (*add)(void *ctx, const char *name, const char *value),
			 void *ctx)
{
	char buf[32];
	bool full = !o->minimal; /* minimal: what a client acts on; no route, subject or reason */

	if (full)
		add(ctx, "X-Tally-Decision", o->d.admit ? "admit" : "shed");
	if (full || !o->d.admit) {
		snprintf(buf, sizeof(buf), "%u", o->d.status);
		add(ctx, "X-Tally-Status", buf);
	}
	if (full) {
		add(ctx, "X-Tally-Route", o->route ? o->route->name : "unmapped");
		add(ctx, "X-Tally-Priority", gw_priority_name(o->priority));
	}
	if (!o->route)
		return;
	if (full) {
		add(ctx, "X-Tally-Subject", o->subject);
		add(ctx, "X-Tally-Verdict", tally_verdict_name(o->rd.verdict));
		if (o->rd.host[0])
			add(ctx, "X-Tally-Host", o->rd.host);
		if (o->rd.reasons) {
			char reasons[96];
			add(ctx, "X-Tally-Reasons", tally_reasons_format(o->rd.reasons, reasons, sizeof(reasons)));
		}
	}
	if (o->rd.why)
		add(ctx, o->rd.level == GW_LEVEL_CLOSED ? "X-Tally-Fail-Closed" : "X-Tally-Fail-Open",
		    full ? o->rd.why : "1");
	if (full && o->d.p > 0) {
		snprintf(buf, sizeof(buf), "%.3f", o->d.p);
		add(ctx, "X-Tally-Shed-Probability", buf);
	}
	if (!o->d.admit) {
		snprintf(buf, sizeof(buf), "%u", o->retry_after_s);
		add(ctx, "Retry-After", buf);
		/* the load is shared: another instance is no better off */
		add(ctx, "X-Tally-No-Retry", "1");
	}
}
