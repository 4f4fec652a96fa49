/* SPDX-License-Identifier: MIT */
/*
 * ngx_http_tally_module.c: tally's shedding inside nginx, without a
 * subrequest. A dynamic module (load_module) that reads the same INI file
 * as tally-gateway (its [gateway] segment and fail_closed, [shedding],
 * the priority header and every [route ...]) and decides each request in
 * nginx's own worker with the gateway's code (tools/gateway/evaluate.c:
 * route, one seqlock read of the segment's snapshot, the graded
 * decision), so that a check costs a lookup instead of a round trip to
 * another process. A shed request is answered 429 (the subject is under
 * pressure) or 503 (overloaded, or fail-closed) with the gateway's
 * headers: a jittered Retry-After, X-Tally-No-Retry, X-Tally-Status and
 * the rest; the upstream never sees it. An admitted request goes on, with
 * X-Tally-Fail-Open on its response when no usable verdict was read.
 *
 *   load_module modules/ngx_http_tally_module.so;
 *   http {
 *       tally_config /etc/tally/gateway.ini;
 *       server { location / { tally_check on; proxy_pass http://app; } }
 *   }
 *
 * Directives: tally_config FILE (http; read when nginx reads its
 * configuration, so `nginx -t` reports FILE:LINE and the reason) and
 * tally_check on|off (http, server, location; off by default). Variables,
 * for log_format, proxy_set_header or an error_page location:
 * $tally_check_decision (admit, shed), $tally_check_status (200, 429,
 * 503), $tally_check_subject, $tally_check_verdict,
 * $tally_check_retry_after, $tally_check_route (named apart from the
 * $tally_* of etc/nginx/tally-check.conf: both can be in one nginx).
 * tally_status (location) answers there what tally-gateway answers under
 * its admin prefix: .../routes (JSON, what `tally stat --gateway URL`
 * reads), .../metrics (Prometheus) and .../health. Every worker counts
 * into one block in a shared zone (report.c), so that whichever worker
 * answers, the counts are the whole nginx's. The zone is named by the
 * routes: a reload that keeps them keeps the counts; one that changes them
 * starts at zero.
 *
 * Where: the preaccess phase, as limit_req, once per request: the
 * decision is kept in a pool cleanup of the request, so that an internal
 * redirect (error_page, try_files, a named location), which clears the
 * modules' contexts, finds it again instead of deciding twice. Each
 * worker attaches the segment read-only on its first request (judge.c:
 * re-attaches when the owner is replaced, fails open or closed as the
 * INI says while there is none); nothing here blocks.
 */
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "../gateway/gateway.h"

typedef struct {
	struct gw_config cfg;
	struct gw *g;        /* in a worker, from its start */
	ngx_flag_t loaded;   /* tally_config read */
	ngx_str_t file;
	ngx_shm_zone_t *zone; /* the counts (struct gw_stats), every worker's */
	struct gw_stats *own; /* nginx without workers: its counts, on the heap */
} ngx_http_tally_main_conf_t;

typedef struct {
	ngx_flag_t check;
	ngx_flag_t status;   /* tally_status here */
} ngx_http_tally_loc_conf_t;

/* What was decided for a request, in its pool (see the header). */
typedef struct {
	struct gw_outcome o;
	ngx_http_request_t *r;
} ngx_http_tally_ctx_t;

enum tally_var { TV_DECISION, TV_STATUS, TV_SUBJECT, TV_VERDICT, TV_RETRY_AFTER, TV_ROUTE };

static char *ngx_http_tally_config(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_tally_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_tally_init(ngx_conf_t *cf);
static void *ngx_http_tally_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_tally_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_tally_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child);
static ngx_int_t ngx_http_tally_init_process(ngx_cycle_t *cycle);
static void ngx_http_tally_exit_process(ngx_cycle_t *cycle);
static char *ngx_http_tally_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);

static ngx_command_t ngx_http_tally_commands[] = {
	{ ngx_string("tally_config"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, ngx_http_tally_config,
	  NGX_HTTP_MAIN_CONF_OFFSET, 0, NULL },
	{ ngx_string("tally_check"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_FLAG,
	  ngx_conf_set_flag_slot, NGX_HTTP_LOC_CONF_OFFSET, offsetof(ngx_http_tally_loc_conf_t, check), NULL },
	{ ngx_string("tally_status"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, ngx_http_tally_status,
	  NGX_HTTP_LOC_CONF_OFFSET, 0, NULL },
	ngx_null_command
};

static ngx_http_module_t ngx_http_tally_module_ctx = {
	ngx_http_tally_preconfiguration, /* preconfiguration: the variables */
	ngx_http_tally_init,             /* postconfiguration: the phase handler */
	ngx_http_tally_create_main_conf, NULL, NULL, NULL,
	ngx_http_tally_create_loc_conf, ngx_http_tally_merge_loc_conf
};

ngx_module_t ngx_http_tally_module = {
	NGX_MODULE_V1,
	&ngx_http_tally_module_ctx, ngx_http_tally_commands, NGX_HTTP_MODULE,
	NULL, NULL,                        /* init master, init module */
	ngx_http_tally_init_process, NULL, /* init process, init thread */
	NULL, ngx_http_tally_exit_process, /* exit thread, exit process */
	NULL,                              /* exit master */
	NGX_MODULE_V1_PADDING
};

/* ---- configuration ---- */

static void ngx_http_tally_close(ngx_http_tally_main_conf_t *m);

/* The cycle's pool goes: in the master after a reload, and in nginx
 * without workers (master_process off), whose reload ends the old cycle
 * without exit_process: there the reader is closed here. */
static void ngx_http_tally_free_config(void *data)
{
	ngx_http_tally_main_conf_t *m = data;

	ngx_http_tally_close(m);
	gw_config_free(&m->cfg);
}

/* The zone's counts: made (data NULL) in nginx's slab pool at its start,
 * or, on a reload with the same routes, kept (data: the old cycle's, in
 * the same memory). zone->data is then the counts. */
static ngx_int_t ngx_http_tally_init_zone(ngx_shm_zone_t *zone, void *data)
{
	ngx_http_tally_main_conf_t *m = zone->data;
	ngx_slab_pool_t *sp = (ngx_slab_pool_t *)zone->shm.addr;
	struct gw_stats *st;
	int rc;

	if (data) {
		zone->data = data;
		return NGX_OK;
	}
	if (!(st = ngx_slab_alloc(sp, gw_stats_size(m->cfg.nroutes)))) {
		ngx_log_error(NGX_LOG_EMERG, zone->shm.log, 0, "tally: no room for the counts in zone \"%V\"",
			      &zone->shm.name);
		return NGX_ERROR;
	}
	if ((rc = gw_stats_init(st, m->cfg.nroutes, true)) != 0) {
		ngx_log_error(NGX_LOG_EMERG, zone->shm.log, rc, "tally: the counts' lock in zone \"%V\"",
			      &zone->shm.name);
		return NGX_ERROR;
	}
	zone->data = st;
	return NGX_OK;
}

/* FNV-1a over s and its NUL, on from h. */
static uint32_t fnv1a(uint32_t h, const char *s)
{
	for (;; s++) {
		h = (h ^ (uint8_t)*s) * 16777619u;
		if (!*s)
			return h;
	}
}

/* The shared zone of the counts, named by the routes (see the header). */
static ngx_int_t ngx_http_tally_zone(ngx_conf_t *cf, ngx_http_tally_main_conf_t *m)
{
	uint32_t h = 2166136261u;
	ngx_str_t name;

	for (size_t i = 0; i < m->cfg.nroutes; i++)
		h = fnv1a(fnv1a(h, m->cfg.routes[i].name), m->cfg.routes[i].subject);
	name.data = ngx_pnalloc(cf->pool, 48);
	if (!name.data)
		return NGX_ERROR;
	name.len = (size_t)(ngx_snprintf(name.data, 48, "tally_counts_%uz_%08xD", m->cfg.nroutes, h) - name.data);
	/* nginx makes every zone a slab pool, of at least 8 pages */
	size_t size = (8 * ngx_pagesize + 2 * gw_stats_size(m->cfg.nroutes) + ngx_pagesize - 1) &
		      ~(size_t)(ngx_pagesize - 1);
	m->zone = ngx_shared_memory_add(cf, &name, size, &ngx_http_tally_module);
	if (!m->zone)
		return NGX_ERROR;
	m->zone->init = ngx_http_tally_init_zone;
	m->zone->data = m;
	return NGX_OK;
}

static char *ngx_http_tally_config(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
	ngx_http_tally_main_conf_t *m = conf;
	ngx_str_t *value = cf->args->elts;
	struct gw_overrides ov = { .mode = "check" };
	char err[NGX_MAX_CONF_ERRSTR];

	if (m->loaded)
		return (char *)"is duplicate";
	m->file = value[1];
	if (ngx_conf_full_name(cf->cycle, &m->file, 1) != NGX_OK)
		return NGX_CONF_ERROR;
	char *path = ngx_pnalloc(cf->pool, m->file.len + 1);
	if (!path)
		return NGX_CONF_ERROR;
	ngx_memcpy(path, m->file.data, m->file.len);
	path[m->file.len] = '\0';
	/* the mode is the module's own: a proxy-mode file's routes and
	 * shedding apply as they are, its upstream is not used */
	if (gw_config_load(&m->cfg, path, &ov, err, sizeof(err)) != 0) {
		gw_config_free(&m->cfg); /* what it had read: a failed reload must not leak in the master */
		/* one line per error from gw_config_load; nginx's log takes one
		 * line, and adds " in nginx.conf:N" after it */
		char line[NGX_MAX_CONF_ERRSTR];
		size_t j = 0;
		for (const char *c = err; *c && j + 3 < sizeof(line); c++)
			if (*c != '\n')
				line[j++] = *c;
			else if (c[1]) {
				line[j++] = ';';
				line[j++] = ' ';
			}
		line[j] = '\0';
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "tally_config: %s", line);
		return NGX_CONF_ERROR;
	}
	ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(cf->pool, 0);
	if (!cln) {
		gw_config_free(&m->cfg);
		return NGX_CONF_ERROR;
	}
	cln->handler = ngx_http_tally_free_config;
	cln->data = m;
	m->loaded = 1;
	return ngx_http_tally_zone(cf, m) == NGX_OK ? NGX_CONF_OK : NGX_CONF_ERROR;
}

static void *ngx_http_tally_create_main_conf(ngx_conf_t *cf)
{
	return ngx_pcalloc(cf->pool, sizeof(ngx_http_tally_main_conf_t));
}

static void *ngx_http_tally_create_loc_conf(ngx_conf_t *cf)
{
	ngx_http_tally_loc_conf_t *c = ngx_pcalloc(cf->pool, sizeof(*c));

	if (c)
		c->check = c->status = NGX_CONF_UNSET;
	return c;
}

static char *ngx_http_tally_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
	ngx_http_tally_loc_conf_t *prev = parent, *c = child;
	ngx_http_tally_main_conf_t *m = ngx_http_conf_get_module_main_conf(cf, ngx_http_tally_module);

	ngx_conf_merge_value(c->check, prev->check, 0);
	if (c->status == NGX_CONF_UNSET)
		c->status = 0; /* not inherited: a location's handler is its own */
	if ((c->check || c->status) && !m->loaded) {
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
				   "%s needs \"tally_config FILE;\" in http {} (the gateway's INI: "
				   "segment, routes, shedding)", c->check ? "tally_check on" : "tally_status");
		return NGX_CONF_ERROR;
	}
	return NGX_CONF_OK;
}

/* ---- a worker's reader ---- */

/* The reader's lines (failing open or closed, live again): nginx's log. */
static void ngx_http_tally_log(const char *line)
{
	ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0, "tally: %s", line);
}

/* m's reader and counts in this process: at a worker's start, or on the
 * first request of a cycle that had no init_process (nginx without
 * workers, after a reload). Without workers the counts are the process's
 * own, on the heap: there a reload that changes the routes unmaps the old
 * zone while the old cycle's connections still run. */
static ngx_int_t ngx_http_tally_start(ngx_http_tally_main_conf_t *m, ngx_log_t *log)
{
	if (m->g)
		return NGX_OK;
	m->g = calloc(1, sizeof(*m->g));
	if (m->g && ngx_process == NGX_PROCESS_SINGLE &&
	    (!(m->own = malloc(gw_stats_size(m->cfg.nroutes))) || gw_stats_init(m->own, m->cfg.nroutes, false))) {
		free(m->own);
		m->own = NULL;
		free(m->g);
		m->g = NULL;
	}
	if (!m->g) {
		ngx_log_error(NGX_LOG_EMERG, log, 0, "tally: out of memory for the segment reader");
		return NGX_ERROR;
	}
	m->g->cfg = &m->cfg;
	m->g->st = m->own ? m->own : m->zone->data; /* ngx_http_tally_init_zone */
	gw_log_sink = ngx_http_tally_log;
	gw_reader_init(&m->g->reader, m->cfg.segment, m->cfg.fail_closed);
	return NGX_OK;
}

static ngx_int_t ngx_http_tally_init_process(ngx_cycle_t *cycle)
{
	ngx_http_tally_main_conf_t *m = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_tally_module);

	return m && m->loaded ? ngx_http_tally_start(m, cycle->log) : NGX_OK;
}

static void ngx_http_tally_close(ngx_http_tally_main_conf_t *m)
{
	if (!m->g)
		return;
	gw_reader_close(&m->g->reader);
	free(m->g);
	m->g = NULL;
	if (m->own) {
		pthread_mutex_destroy(&m->own->unmapped.lock);
		free(m->own);
		m->own = NULL;
	}
}

static void ngx_http_tally_exit_process(ngx_cycle_t *cycle)
{
	ngx_http_tally_main_conf_t *m = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_tally_module);

	if (m)
		ngx_http_tally_close(m);
}

/* ---- a request ---- */

static void ngx_http_tally_ctx_done(void *data)
{
	(void)data; /* the pool frees the context; the handler marks it ours */
}

/* This request's decision: the module's context, or after an internal
 * redirect the one its pool still holds. NULL: not decided yet. */
static ngx_http_tally_ctx_t *ngx_http_tally_ctx(ngx_http_request_t *r)
{
	ngx_http_tally_ctx_t *ctx = ngx_http_get_module_ctx(r, ngx_http_tally_module);

	if (ctx)
		return ctx;
	for (ngx_pool_cleanup_t *c = r->pool->cleanup; c; c = c->next)
		if (c->handler == ngx_http_tally_ctx_done && ((ngx_http_tally_ctx_t *)c->data)->r == r) {
			ctx = c->data;
			ngx_http_set_ctx(r, ctx, ngx_http_tally_module);
			return ctx;
		}
	return NULL;
}

/* A request header's value (NUL-terminated, as nginx keeps it), the
 * first of that name; NULL if none. For the routes' header conditions
 * and the priority header. */
static const char *ngx_http_tally_header(void *ctx, const char *name)
{
	ngx_http_request_t *r = ctx;
	size_t len = ngx_strlen(name);

	for (ngx_list_part_t *part = &r->headers_in.headers.part; part; part = part->next) {
		ngx_table_elt_t *h = part->elts;
		for (ngx_uint_t i = 0; i < part->nelts; i++)
			if (h[i].key.len == len && ngx_strncasecmp(h[i].key.data, (u_char *)name, len) == 0)
				return (const char *)h[i].value.data;
	}
	return NULL;
}

static ngx_int_t ngx_http_tally_push(ngx_http_request_t *r, const char *name, const char *value)
{
	ngx_table_elt_t *h = ngx_list_push(&r->headers_out.headers);
	size_t vl = ngx_strlen(value);

	if (!h)
		return NGX_ERROR;
	h->hash = 1;
	h->key.len = ngx_strlen(name);
	h->key.data = (u_char *)name; /* a literal of evaluate.c */
	h->value.data = ngx_pnalloc(r->pool, vl);
	if (!h->value.data) {
		h->hash = 0;
		return NGX_ERROR;
	}
	ngx_memcpy(h->value.data, value, vl);
	h->value.len = vl;
	h->lowcase_key = NULL;
#if nginx_version >= 1023000
	h->next = NULL;
#endif
	return NGX_OK;
}

static void ngx_http_tally_add(void *ctx, const char *name, const char *value)
{
	(void)ngx_http_tally_push(ctx, name, value); /* a header nginx has no memory for is left out */
}

static ngx_int_t ngx_http_tally_handler(ngx_http_request_t *r)
{
	ngx_http_tally_loc_conf_t *lc = ngx_http_get_module_loc_conf(r, ngx_http_tally_module);
	ngx_http_tally_main_conf_t *m = ngx_http_get_module_main_conf(r, ngx_http_tally_module);

	/* a tally_status location is not judged, or counted: as tally-gateway's
	 * admin endpoints */
	if (!lc->check || lc->status || r != r->main || ngx_http_tally_ctx(r))
		return NGX_DECLINED;
	if (ngx_http_tally_start(m, r->connection->log) != NGX_OK)
		return NGX_HTTP_INTERNAL_SERVER_ERROR;
	ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(r->pool, sizeof(ngx_http_tally_ctx_t));
	char *method = ngx_pnalloc(r->pool, r->method_name.len + 1 + 3 * r->uri.len + 1);
	if (!cln || !method)
		return NGX_HTTP_INTERNAL_SERVER_ERROR;
	ngx_http_tally_ctx_t *ctx = cln->data;
	ngx_memzero(ctx, sizeof(*ctx));
	ngx_memcpy(method, r->method_name.data, r->method_name.len);
	method[r->method_name.len] = '\0';
	/* the path as nginx routes it (decoded, dot segments and double
	 * slashes merged): "/%6Fver/1" and "//over/1" are /over/1, as for the
	 * locations, and cannot slip past a route. A decoded '?' or '#' (from
	 * %3F, %23) goes back to its escape: the routes' matcher ends a path
	 * there, and "/orders/5%3F/items" would otherwise be unmapped. */
	char *uri = method + r->method_name.len + 1, *w = uri;
	for (size_t i = 0; i < r->uri.len; i++) {
		u_char c = r->uri.data[i];
		if (c == '?' || c == '#') {
			*w++ = '%';
			*w++ = '2' + (c == '?');
			*w++ = c == '?' ? 'F' : '3';
		} else
			*w++ = (char)c;
	}
	*w = '\0';

	gw_evaluate(m->g, method, uri, ngx_http_tally_header, r, &ctx->o);
	/* seen only once filled: a failed allocation above leaves none */
	ctx->r = r;
	cln->handler = ngx_http_tally_ctx_done;
	ngx_http_set_ctx(r, ctx, ngx_http_tally_module);
	if (ctx->o.d.admit) {
		if (ctx->o.rd.why)
			(void)ngx_http_tally_push(r, "X-Tally-Fail-Open", ctx->o.minimal ? "1" : ctx->o.rd.why);
		return NGX_DECLINED;
	}
	gw_decision_headers(&ctx->o, ngx_http_tally_add, r);
	return (ngx_int_t)ctx->o.d.status; /* 429 or 503: the body is nginx's, or error_page's */
}

/* ---- tally_status ---- */

/* What the location answers, by the last part of its path, as
 * tally-gateway's ADMIN_PREFIX/routes, /metrics and /health. */
static ngx_int_t ngx_http_tally_status_handler(ngx_http_request_t *r)
{
	ngx_http_tally_main_conf_t *m = ngx_http_get_module_main_conf(r, ngx_http_tally_module);
	static const struct {
		const char *tail, *type;
	} kinds[] = { { "/routes", "application/json" },
		      { "/metrics", "text/plain; version=0.0.4; charset=utf-8" },
		      { "/health", "text/plain" } };
	size_t k = 0, tl;
	ngx_int_t rc;

	if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD)))
		return NGX_HTTP_NOT_ALLOWED;
	if ((rc = ngx_http_discard_request_body(r)) != NGX_OK)
		return rc;
	for (; k < sizeof(kinds) / sizeof(kinds[0]); k++)
		if (r->uri.len >= (tl = ngx_strlen(kinds[k].tail)) &&
		    ngx_strncmp(r->uri.data + r->uri.len - tl, kinds[k].tail, tl) == 0)
			break;
	if (k == sizeof(kinds) / sizeof(kinds[0]))
		return NGX_HTTP_NOT_FOUND;
	if (!m->loaded) /* tally_status needs tally_config (checked at merge): not reached */
		return NGX_HTTP_NOT_FOUND;
	if (ngx_http_tally_start(m, r->connection->log) != NGX_OK)
		return NGX_HTTP_INTERNAL_SERVER_ERROR;
	char *text = k == 0 ? gw_routes_json(m->g, "module") : k == 1 ? gw_metrics_text(m->g) : strdup("ok\n");
	if (!text)
		return NGX_HTTP_INTERNAL_SERVER_ERROR;
	size_t len = ngx_strlen(text);
	ngx_buf_t *b = ngx_create_temp_buf(r->pool, len ? len : 1);
	if (!b) {
		free(text);
		return NGX_HTTP_INTERNAL_SERVER_ERROR;
	}
	b->last = ngx_cpymem(b->pos, text, len);
	free(text);
	b->last_buf = r == r->main;
	b->last_in_chain = 1;
	r->headers_out.status = NGX_HTTP_OK;
	r->headers_out.content_length_n = (off_t)len;
	r->headers_out.content_type.len = ngx_strlen(kinds[k].type);
	r->headers_out.content_type.data = (u_char *)kinds[k].type;
	r->headers_out.content_type_len = r->headers_out.content_type.len;
	rc = ngx_http_send_header(r);
	if (rc == NGX_ERROR || rc > NGX_OK || r->header_only)
		return rc;
	ngx_chain_t out = { b, NULL };
	return ngx_http_output_filter(r, &out);
}

static char *ngx_http_tally_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
	ngx_http_tally_loc_conf_t *c = conf;
	ngx_http_core_loc_conf_t *clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

	(void)cmd;
	if (c->status != NGX_CONF_UNSET)
		return (char *)"is duplicate";
	c->status = 1;
	clcf->handler = ngx_http_tally_status_handler;
	return NGX_CONF_OK;
}

/* ---- variables ---- */

static ngx_int_t ngx_http_tally_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data)
{
	ngx_http_tally_ctx_t *ctx = ngx_http_tally_ctx(r->main);
	const char *s = NULL;
	char num[16];

	if (!ctx) {
		v->not_found = 1;
		return NGX_OK;
	}
	const struct gw_outcome *o = &ctx->o;
	switch ((enum tally_var)data) {
	case TV_DECISION:
		s = o->d.admit ? "admit" : "shed";
		break;
	case TV_STATUS:
		ngx_snprintf((u_char *)num, sizeof(num), "%ui%Z", (ngx_uint_t)o->d.status);
		s = num;
		break;
	case TV_SUBJECT:
		s = o->subject;
		break;
	case TV_VERDICT:
		s = o->route ? tally_verdict_name(o->rd.verdict) : NULL;
		break;
	case TV_RETRY_AFTER:
		if (!o->d.admit) {
			ngx_snprintf((u_char *)num, sizeof(num), "%ui%Z", (ngx_uint_t)o->retry_after_s);
			s = num;
		}
		break;
	case TV_ROUTE:
		s = o->route ? o->route->name : "unmapped";
		break;
	}
	if (!s) {
		v->not_found = 1;
		return NGX_OK;
	}
	size_t len = ngx_strlen(s);
	v->data = ngx_pnalloc(r->pool, len);
	if (!v->data)
		return NGX_ERROR;
	ngx_memcpy(v->data, s, len);
	v->len = len;
	v->valid = 1;
	v->no_cacheable = 1; /* as added: NGX_HTTP_VAR_NOCACHEABLE */
	v->not_found = 0;
	return NGX_OK;
}

static ngx_int_t ngx_http_tally_preconfiguration(ngx_conf_t *cf)
{
	static const struct {
		const char *name;
		enum tally_var which;
	} vars[] = { { "tally_check_decision", TV_DECISION }, { "tally_check_status", TV_STATUS },
		     { "tally_check_subject", TV_SUBJECT },   { "tally_check_verdict", TV_VERDICT },
		     { "tally_check_retry_after", TV_RETRY_AFTER }, { "tally_check_route", TV_ROUTE } };

	for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
		ngx_str_t name = { ngx_strlen(vars[i].name), (u_char *)vars[i].name };
		ngx_http_variable_t *var = ngx_http_add_variable(cf, &name, NGX_HTTP_VAR_NOCACHEABLE);
		if (!var)
			return NGX_ERROR;
		var->get_handler = ngx_http_tally_variable;
		var->data = (uintptr_t)vars[i].which;
	}
	return NGX_OK;
}

static ngx_int_t ngx_http_tally_init(ngx_conf_t *cf)
{
	ngx_http_core_main_conf_t *cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);
	ngx_http_handler_pt *h = ngx_array_push(&cmcf->phases[NGX_HTTP_PREACCESS_PHASE].handlers);

	if (!h)
		return NGX_ERROR;
	*h = ngx_http_tally_handler;
	return NGX_OK;
}
