/* SPDX-License-Identifier: MIT */
/*
 * proxy.c: forwarding an admitted request to the upstream with libcurl,
 * streaming both bodies, in the thread that libmicrohttpd gives the
 * client's connection (server.c runs proxy mode thread-per-connection).
 *
 * Each client connection owns a curl multi handle (its pool of upstream
 * connections: keep-alive on both sides) and one easy handle, reset for
 * every request. Everything runs in that one thread, so nothing here
 * locks: the two libraries take turns.
 *
 *   request body   libmicrohttpd hands the access handler one piece at a
 *                  time; we make it curl's, run the multi handle until
 *                  curl has sent it all (its read callback pauses the
 *                  upload when the piece is used up), and return for the
 *                  next one. A body of unknown length goes out chunked.
 *   status         on the last call (the body is complete) we run curl
 *                  until the upstream's headers are in, at most
 *                  upstream_timeout_ms (504 after that); curl failing to
 *                  connect or breaking before them is 502.
 *   response body  a libmicrohttpd response whose reader callback runs
 *                  curl until the next bytes arrive (again at most
 *                  upstream_timeout_ms between two reads). curl's write
 *                  callback buffers up to WBUF_MAX and then pauses the
 *                  download: a slow client slows the upstream, memory
 *                  stays bounded whatever the size of the body.
 */
#include "config.h"

#include <curl/curl.h>
#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "gateway.h"

#define WBUF_MAX (256 * 1024)
#define MAX_RESP_HEADERS 128

struct pconn {
	CURLM *multi;
	CURL *easy;
};

struct gw_proxy_req {
	struct gw *g;
	struct pconn *pc;
	CURL *easy;
	struct curl_slist *hdrs;
	bool added, eof, send_paused, recv_paused, done, headers_done, failed, timed_out;
	CURLcode result;
	const char *chunk;
	size_t chunk_len;
	long status;
	char *rh[MAX_RESP_HEADERS];
	size_t nrh;
	char *buf;
	size_t len, off, cap;
	char errbuf[CURL_ERROR_SIZE];
};

int gw_proxy_global_init(void)
{
	return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK ? 0 : -1;
}

void *gw_proxy_conn_new(void)
{
	struct pconn *pc = calloc(1, sizeof(*pc));

	if (pc && (!(pc->multi = curl_multi_init()) || !(pc->easy = curl_easy_init()))) {
		gw_proxy_conn_free(pc);
		return NULL;
	}
	return pc;
}

void gw_proxy_conn_free(void *conn)
{
	struct pconn *pc = conn;

	if (!pc)
		return;
	if (pc->easy)
		curl_easy_cleanup(pc->easy);
	if (pc->multi)
		curl_multi_cleanup(pc->multi);
	free(pc);
}

static void resp_headers_clear(struct gw_proxy_req *pr)
{
	for (size_t i = 0; i < pr->nrh; i++)
		free(pr->rh[i]);
	pr->nrh = 0;
}

void gw_proxy_req_free(struct gw_proxy_req *pr)
{
	if (!pr)
		return;
	if (pr->added)
		curl_multi_remove_handle(pr->pc->multi, pr->easy); /* an unfinished one closes its connection */
	curl_slist_free_all(pr->hdrs);
	resp_headers_clear(pr);
	free(pr->buf);
	free(pr);
}

/* ---- curl's callbacks ---- */

static size_t on_read(char *out, size_t size, size_t n, void *ud)
{
	struct gw_proxy_req *pr = ud;
	size_t k = size * n < pr->chunk_len ? size * n : pr->chunk_len;

	if (k) {
		memcpy(out, pr->chunk, k);
		pr->chunk += k;
		pr->chunk_len -= k;
		return k;
	}
	if (pr->eof)
		return 0;
	pr->send_paused = true;
	return CURL_READFUNC_PAUSE;
}

static size_t on_write(char *in, size_t size, size_t n, void *ud)
{
	struct gw_proxy_req *pr = ud;
	size_t k = size * n;

	if (pr->off == pr->len)
		pr->off = pr->len = 0;
	if (pr->len - pr->off + k > WBUF_MAX && pr->len > pr->off) {
		pr->recv_paused = true;
		return CURL_WRITEFUNC_PAUSE;
	}
	if (pr->off) {
		memmove(pr->buf, pr->buf + pr->off, pr->len - pr->off);
		pr->len -= pr->off;
		pr->off = 0;
	}
	if (pr->len + k > pr->cap) {
		size_t cap = pr->len + k > WBUF_MAX ? pr->len + k : WBUF_MAX;
		char *b = realloc(pr->buf, cap);
		if (!b)
			return 0; /* curl fails the transfer: CURLE_WRITE_ERROR */
		pr->buf = b;
		pr->cap = cap;
	}
	memcpy(pr->buf + pr->len, in, k);
	pr->len += k;
	return k;
}

/* Headers that describe one hop, not the message: never forwarded. */
static bool hop_by_hop(const char *name, size_t len)
{
	static const char *const h[] = { "Connection", "Keep-Alive", "Proxy-Connection",
					 "Transfer-Encoding", "TE", "Trailer", "Upgrade",
					 "Content-Length", "Expect", "Date", NULL };

	for (int i = 0; h[i]; i++)
		if (strlen(h[i]) == len && strncasecmp(name, h[i], len) == 0)
			return true;
	return false;
}

static size_t on_header(char *b, size_t size, size_t n, void *ud)
{
	struct gw_proxy_req *pr = ud;
	size_t len = size * n, l = len;

	while (l && (b[l - 1] == '\n' || b[l - 1] == '\r'))
		l--;
	if (len >= 5 && strncmp(b, "HTTP/", 5) == 0) { /* a status line: a new (maybe 1xx) response */
		resp_headers_clear(pr);
		pr->headers_done = false;
		pr->status = 0;
		sscanf(b, "HTTP/%*s %ld", &pr->status);
		return len;
	}
	if (l == 0) {
		if (pr->status >= 200)
			pr->headers_done = true;
		return len;
	}
	const char *colon = memchr(b, ':', l);
	if (!colon || hop_by_hop(b, (size_t)(colon - b)) || pr->nrh == MAX_RESP_HEADERS)
		return len;
	if ((pr->rh[pr->nrh] = strndup(b, l)))
		pr->nrh++;
	return len;
}

/* ---- running curl ---- */

static void unpause(struct gw_proxy_req *pr)
{
	pr->send_paused = pr->send_paused && pr->chunk_len == 0 && !pr->eof;
	if (pr->recv_paused && pr->len - pr->off < WBUF_MAX / 2)
		pr->recv_paused = false;
	curl_easy_pause(pr->easy, (pr->send_paused ? CURLPAUSE_SEND : 0) |
				  (pr->recv_paused ? CURLPAUSE_RECV : 0));
}

/* Run the transfer until cond(pr), its end, or deadline (0: none): 0, or
 * -ETIMEDOUT. */
static int pump(struct gw_proxy_req *pr, bool (*cond)(const struct gw_proxy_req *), uint64_t deadline)
{
	CURLM *m = pr->pc->multi;

	for (;;) {
		int running, q;
		CURLMsg *msg;

		curl_multi_perform(m, &running);
		while ((msg = curl_multi_info_read(m, &q)))
			if (msg->msg == CURLMSG_DONE) {
				pr->done = true;
				pr->result = msg->data.result;
			}
		if (pr->done || cond(pr))
			return 0;
		uint64_t now = gw_now_ns();
		if (deadline && now >= deadline)
			return -ETIMEDOUT;
		int wait = deadline ? (int)((deadline - now) / 1000000 + 1) : 1000;
		curl_multi_poll(m, NULL, 0, wait < 1000 ? wait : 1000, NULL);
	}
}

static bool piece_sent(const struct gw_proxy_req *pr)
{
	return pr->chunk_len == 0;
}

static bool got_headers(const struct gw_proxy_req *pr)
{
	return pr->headers_done;
}

static bool got_bytes(const struct gw_proxy_req *pr)
{
	return pr->len > pr->off || pr->recv_paused;
}

static uint64_t deadline_of(const struct gw_proxy_req *pr)
{
	return gw_now_ns() + (uint64_t)pr->g->cfg->upstream_timeout_ms * 1000000ull;
}

/* ---- the request ---- */

struct hdr_ctx {
	struct gw_proxy_req *pr;
	bool body, chunked;
	long long length;
	const char *xff;
};

static enum MHD_Result add_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
	struct hdr_ctx *h = cls;
	char line[8192];

	(void)kind;
	if (strcasecmp(key, "Content-Length") == 0) {
		h->body = true;
		h->length = strtoll(value, NULL, 10);
	} else if (strcasecmp(key, "Transfer-Encoding") == 0) {
		h->body = h->chunked = true;
	} else if (strcasecmp(key, "X-Forwarded-For") == 0) {
		h->xff = value;
	}
	if (hop_by_hop(key, strlen(key)) || strcasecmp(key, "X-Forwarded-For") == 0)
		return MHD_YES;
	snprintf(line, sizeof(line), "%s: %s", key, value ? value : "");
	struct curl_slist *s = curl_slist_append(h->pr->hdrs, line);
	if (s)
		h->pr->hdrs = s;
	return MHD_YES;
}

static void forwarded_for(struct MHD_Connection *c, struct hdr_ctx *h)
{
	const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
	char addr[64] = "unknown", line[512];
	const struct sockaddr *sa = ci ? ci->client_addr : NULL;

	/* copied out: MHD's sockaddr need not be aligned for the family's struct */
	if (sa && sa->sa_family == AF_INET) {
		struct sockaddr_in in;
		memcpy(&in, sa, sizeof(in));
		inet_ntop(AF_INET, &in.sin_addr, addr, sizeof(addr));
	} else if (sa && sa->sa_family == AF_INET6) {
		struct sockaddr_in6 in6;
		memcpy(&in6, sa, sizeof(in6));
		inet_ntop(AF_INET6, &in6.sin6_addr, addr, sizeof(addr));
	}
	snprintf(line, sizeof(line), "X-Forwarded-For: %s%s%s", h->xff ? h->xff : "", h->xff ? ", " : "", addr);
	struct curl_slist *s = curl_slist_append(h->pr->hdrs, line);
	if (s && (s = curl_slist_append(s, "Expect:"))) /* no 100-continue towards the upstream */
		h->pr->hdrs = s;
}

static int start(struct gw *g, struct pconn *pc, struct MHD_Connection *c, struct gw_proxy_req **out,
		 const char *method, const char *uri)
{
	struct gw_proxy_req *pr = calloc(1, sizeof(*pr));
	struct hdr_ctx h = { .pr = pr, .length = -1 };
	char url[8192];

	if (!pr || !pc)
		return free(pr), -ENOMEM;
	*out = pr;
	pr->g = g;
	pr->pc = pc;
	pr->easy = pc->easy;
	MHD_get_connection_values(c, MHD_HEADER_KIND, add_header, &h);
	forwarded_for(c, &h);
	snprintf(url, sizeof(url), "%s%s", g->cfg->upstream, uri);
	CURL *e = pr->easy;
	curl_easy_reset(e);
	curl_easy_setopt(e, CURLOPT_URL, url);
	curl_easy_setopt(e, CURLOPT_PATH_AS_IS, 1L);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, pr->hdrs);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)g->cfg->connect_timeout_ms);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, pr->errbuf);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, pr);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, pr);
	curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 64L * 1024);
	if (strcmp(method, "HEAD") == 0)
		curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
	else if (strcmp(method, "GET") != 0 || h.body)
		curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
	if (h.body) {
		curl_easy_setopt(e, CURLOPT_UPLOAD, 1L);
		curl_easy_setopt(e, CURLOPT_UPLOAD_BUFFERSIZE, 64L * 1024);
		curl_easy_setopt(e, CURLOPT_READFUNCTION, on_read);
		curl_easy_setopt(e, CURLOPT_READDATA, pr);
		if (!h.chunked && h.length >= 0)
			curl_easy_setopt(e, CURLOPT_INFILESIZE_LARGE, (curl_off_t)h.length);
	} else {
		pr->eof = true;
	}
	if (curl_multi_add_handle(pc->multi, e) != CURLM_OK)
		return -ENOMEM;
	pr->added = true;
	return 0;
}

static enum MHD_Result fail(struct gw_proxy_req *pr, struct MHD_Connection *c, const struct gw_outcome *o,
			    bool timeout)
{
	struct gw *g = pr->g;
	char body[512];
	unsigned status = timeout ? 504 : 502;

	atomic_fetch_add_explicit(timeout ? &g->n.upstream_504 : &g->n.upstream_502, 1, memory_order_relaxed);
	if (timeout)
		snprintf(body, sizeof(body), "upstream %s did not answer within upstream_timeout_ms = %u\n",
			 g->cfg->upstream, g->cfg->upstream_timeout_ms);
	else
		snprintf(body, sizeof(body), "upstream %s: %s\n", g->cfg->upstream,
			 pr->errbuf[0] ? pr->errbuf : pr->failed ? "out of memory" : curl_easy_strerror(pr->result));
	if (pr->added) { /* drop the transfer: curl closes its connection */
		curl_multi_remove_handle(pr->pc->multi, pr->easy);
		pr->added = false;
	}
	struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_COPY);
	if (!r)
		return MHD_NO;
	MHD_add_response_header(r, "Content-Type", "text/plain; charset=utf-8");
	gw_add_decision_headers(r, o);
	enum MHD_Result ret = MHD_queue_response(c, status, r);
	MHD_destroy_response(r);
	return ret;
}

static ssize_t read_body(void *cls, uint64_t pos, char *out, size_t max)
{
	struct gw_proxy_req *pr = cls;

	(void)pos;
	if (pr->off == pr->len && !pr->done) {
		unpause(pr);
		if (pump(pr, got_bytes, deadline_of(pr)) != 0)
			return MHD_CONTENT_READER_END_WITH_ERROR;
	}
	if (pr->off < pr->len) {
		size_t k = pr->len - pr->off < max ? pr->len - pr->off : max;
		memcpy(out, pr->buf + pr->off, k);
		pr->off += k;
		if (pr->recv_paused)
			unpause(pr);
		return (ssize_t)k;
	}
	if (pr->done && pr->result == CURLE_OK)
		return MHD_CONTENT_READER_END_OF_STREAM;
	return pr->done ? MHD_CONTENT_READER_END_WITH_ERROR : 0;
}

static enum MHD_Result respond(struct gw_proxy_req *pr, struct MHD_Connection *c, const struct gw_outcome *o)
{
	curl_off_t clen = -1;

	curl_easy_getinfo(pr->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &clen);
	/* All of a small answer is often in with its headers: then it goes out
	 * as one buffer, headers and body in one send. Otherwise (and for HEAD,
	 * whose length is the upstream's, not ours) it streams. */
	bool whole = pr->done && pr->result == CURLE_OK && (clen < 0 || (uint64_t)clen == pr->len - pr->off);
	struct MHD_Response *r =
		whole ? MHD_create_response_from_buffer(pr->len - pr->off, pr->buf + pr->off, MHD_RESPMEM_MUST_COPY)
		      : MHD_create_response_from_callback(clen >= 0 ? (uint64_t)clen : MHD_SIZE_UNKNOWN, 64 * 1024,
							  read_body, pr, NULL);
	if (!r)
		return MHD_NO;
	for (size_t i = 0; i < pr->nrh; i++) {
		char *colon = strchr(pr->rh[i], ':'), *v = colon + 1;
		*colon = '\0';
		while (*v == ' ' || *v == '\t')
			v++;
		MHD_add_response_header(r, pr->rh[i], v);
		*colon = ':';
	}
	enum MHD_Result ret = MHD_queue_response(c, (unsigned)pr->status, r);
	MHD_destroy_response(r);
	return ret;
}

int gw_proxy_handle(struct gw *g, void *conn, struct MHD_Connection *c, struct gw_proxy_req **prp,
		    const char *method, const char *uri, const char *upload, size_t *upload_size,
		    const struct gw_outcome *o)
{
	struct gw_proxy_req *pr = *prp;

	if (!pr) { /* the first call: headers only */
		if (start(g, conn, c, prp, method, uri) != 0 && !*prp)
			return MHD_NO;
		(*prp)->failed = !(*prp)->added;
		return MHD_YES;
	}
	if (*upload_size) { /* a piece of the body: curl sends it before we take the next */
		if (!pr->failed && !pr->done) {
			pr->chunk = upload;
			pr->chunk_len = *upload_size;
			unpause(pr);
			if (pump(pr, piece_sent, deadline_of(pr)) != 0) /* the upstream stopped reading */
				pr->failed = pr->timed_out = true;
		}
		pr->chunk_len = 0;
		*upload_size = 0;
		return MHD_YES;
	}
	if (pr->failed) /* the last call: the body is complete; reply once */
		return fail(pr, c, o, pr->timed_out);
	pr->eof = true;
	unpause(pr);
	if (pump(pr, got_headers, deadline_of(pr)) != 0)
		return fail(pr, c, o, true);
	if (!pr->headers_done)
		return fail(pr, c, o, pr->result == CURLE_OPERATION_TIMEDOUT);
	return respond(pr, c, o);
}
