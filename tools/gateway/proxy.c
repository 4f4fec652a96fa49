/* SPDX-License-Identifier: MIT */
/*
 * proxy.c: forwarding an admitted request to the upstream with libcurl,
 * streaming both bodies, without blocking: every request of a client
 * connection runs on that connection's event loop (loop.c), its transfer
 * on the loop's curl multi handle. Nothing here locks: libmicrohttpd's
 * callbacks and curl's run on the loop's one thread, in turn.
 *
 * A client connection owns one curl easy handle, reset for each request;
 * the loop's multi handle keeps the upstream connections alive between
 * requests and between client connections.
 *
 * The state of a request. A handler that cannot go on without the
 * upstream suspends its client connection (MHD_suspend_connection) and
 * says what it waits for; curl's callbacks, the end of the transfer or
 * the deadline resume it (MHD_resume_connection), and libmicrohttpd then
 * calls the same handler again, which looks once more:
 *
 *   wait       suspended until                   then
 *   --------   -------------------------------   ---------------------------
 *   UPLOAD     curl has taken the buffered       the handler is given the
 *              request body (on_read emptied     piece it could not take,
 *              sbuf), or the transfer ended      and takes it now
 *   HEADERS    the upstream's headers are in,    the last call answers:
 *              or the transfer ended             respond(), or 502/504
 *   BODY       bytes of the response body are    read_body hands them out,
 *              in (on_write), or the transfer    or ends the stream (an
 *              ended                             error if it broke)
 *
 * Each wait has a deadline, upstream_timeout_ms from when it began (a
 * wait on the client, which is libmicrohttpd's, has none): past it the
 * transfer is dropped (curl closes that upstream connection) and the
 * request fails, 504 before the headers, a broken stream after them.
 * Suspended requests are on the loop's waiting list, which the loop scans
 * for deadlines every 10 ms. At stop (gw_proxy_teardown) every waiting
 * request fails and is resumed, and the handlers never suspend again.
 *
 *   request body   libmicrohttpd hands the access handler one piece at a
 *                  time; it is copied into sbuf (at most SBUF_MAX), from
 *                  which curl's read callback takes it; a piece that does
 *                  not fit waits (UPLOAD). A body of unknown length goes
 *                  out chunked. A piece for a transfer that already ended
 *                  is dropped.
 *   status         on the last call (the body is complete): the upstream's
 *                  status and headers, or 502 when curl could not connect
 *                  or the transfer broke before them.
 *   response body  curl's write callback buffers up to WBUF_MAX and then
 *                  pauses the download until the client has taken half of
 *                  it: a slow client slows the upstream, memory stays
 *                  bounded whatever the size of the body. An answer that
 *                  came in whole with its headers goes out as one buffer.
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
#define SBUF_MAX (256 * 1024)
/* The upstream's response headers that go on to the client, in bytes: they
 * must fit, with the request's, in the 32 KiB libmicrohttpd gives a
 * connection (GW_CONN_MEMORY), or it closes the connection without an
 * answer. More: a 502 that says so. */
#define RESP_HEADERS_MAX (16 * 1024)

struct pconn {
	struct gw_loop *loop;
	CURL *easy;
};

enum wait_for { WAIT_NONE, WAIT_UPLOAD, WAIT_HEADERS, WAIT_BODY };

struct gw_proxy_req {
	struct gw *g;
	struct gw_loop *loop;
	struct MHD_Connection *c;
	CURL *easy;
	struct curl_slist *hdrs;
	enum wait_for wait;                /* WAIT_NONE: not suspended */
	uint64_t deadline;                 /* of the wait */
	struct gw_proxy_req *prev, *next;  /* the loop's waiting list, while suspended */
	bool added, eof, send_paused, recv_paused, done, headers_done, failed, timed_out;
	CURLcode result;
	char *sbuf;                        /* the request body on its way: [soff, slen) */
	size_t slen, soff, scap;
	long status;
	char **rh;                         /* the response's headers, "Name: value" */
	size_t nrh, rh_cap, rh_bytes;
	bool headers_too_big;              /* past RESP_HEADERS_MAX: failed, a 502 */
	char *resp_connection;             /* its Connection headers' tokens, joined by ',' */
	char *buf;                         /* the response body on its way: [off, len) */
	size_t len, off, cap;
	char errbuf[CURL_ERROR_SIZE];
};

int gw_proxy_global_init(void)
{
	return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK ? 0 : -1;
}

/* What every transfer of a client connection's easy handle shares, set
 * once: a request sets only what is its own (start), so that no request
 * pays curl_easy_reset (a memset of several KiB) and twenty setopts.
 * CURLOPT_PROXY "": never a proxy from http_proxy / all_proxy in the
 * environment between a reverse proxy and its upstream (nginx ignores
 * them too), and no environment lookup per transfer. */
static size_t on_read(char *out, size_t size, size_t n, void *ud);
static size_t on_write(char *in, size_t size, size_t n, void *ud);
static size_t on_header(char *b, size_t size, size_t n, void *ud);

static void easy_defaults(CURL *e, struct gw_loop *l)
{
	curl_easy_setopt(e, CURLOPT_PROXY, "");
	curl_easy_setopt(e, CURLOPT_PATH_AS_IS, 1L);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, gw_loop_open_socket);
	curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, l);
	curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, gw_loop_close_socket);
	curl_easy_setopt(e, CURLOPT_CLOSESOCKETDATA, l);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)l->g->cfg->connect_timeout_ms);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
	curl_easy_setopt(e, CURLOPT_READFUNCTION, on_read);
	curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 64L * 1024);
	curl_easy_setopt(e, CURLOPT_UPLOAD_BUFFERSIZE, 64L * 1024);
}

void *gw_proxy_conn_new(struct gw_loop *l)
{
	struct pconn *pc = calloc(1, sizeof(*pc));

	if (pc && !(pc->easy = curl_easy_init())) {
		free(pc);
		return NULL;
	}
	if (pc) {
		pc->loop = l;
		easy_defaults(pc->easy, l);
	}
	return pc;
}

void gw_proxy_conn_free(void *conn)
{
	struct pconn *pc = conn;

	if (!pc)
		return;
	curl_easy_cleanup(pc->easy);
	free(pc);
}

static void resp_headers_clear(struct gw_proxy_req *pr)
{
	for (size_t i = 0; i < pr->nrh; i++)
		free(pr->rh[i]);
	pr->nrh = 0;
	pr->rh_bytes = 0;
	free(pr->resp_connection);
	pr->resp_connection = NULL;
}

/* Appends the n bytes of a Connection header's value to the list *joined
 * (their tokens, ',' between): false when out of memory. */
static bool connection_join(char **joined, const char *v, size_t n)
{
	size_t have = *joined ? strlen(*joined) : 0;
	char *j = realloc(*joined, have + 1 + n + 1);

	if (!j)
		return false;
	if (have)
		j[have++] = ',';
	memcpy(j + have, v, n);
	j[have + n] = '\0';
	*joined = j;
	return true;
}

/* Is the header name (len bytes) one of the comma-separated tokens of a
 * Connection header's value? Those describe the hop too (RFC 9110,
 * 7.6.1): not forwarded, either way. */
static bool connection_lists(const char *list, const char *name, size_t len)
{
	for (const char *t = list; t && *t;) {
		t += strspn(t, " \t,");
		size_t tl = strcspn(t, ",");
		size_t end = tl;
		while (end && (t[end - 1] == ' ' || t[end - 1] == '\t'))
			end--;
		if (end == len && strncasecmp(t, name, len) == 0)
			return true;
		t += tl;
	}
	return false;
}

/* ---- suspending and resuming ---- */

static void waiting_unlink(struct gw_proxy_req *pr)
{
	if (pr->prev)
		pr->prev->next = pr->next;
	else
		pr->loop->waiting = pr->next;
	if (pr->next)
		pr->next->prev = pr->prev;
	pr->prev = pr->next = NULL;
}

/* The connection waits for the upstream (w); false at stop: fail instead. */
static bool suspend(struct gw_proxy_req *pr, enum wait_for w)
{
	struct gw_loop *l = pr->loop;

	if (l->tearing_down)
		return false;
	pr->deadline = gw_now_ns() + (uint64_t)pr->g->cfg->upstream_timeout_ms * 1000000ull;
	if (pr->wait == WAIT_NONE) {
		MHD_suspend_connection(pr->c);
		pr->next = l->waiting;
		if (l->waiting)
			l->waiting->prev = pr;
		l->waiting = pr;
	}
	pr->wait = w;
	return true;
}

/* What the request waited for happened (or never will): libmicrohttpd
 * calls its handler again at the loop's next run. */
static void resume(struct gw_proxy_req *pr)
{
	if (pr->wait == WAIT_NONE)
		return;
	waiting_unlink(pr);
	pr->wait = WAIT_NONE;
	MHD_resume_connection(pr->c);
	pr->loop->kick = true;
}

/* The transfer ends here (timeout, stop, an error of ours): curl closes
 * its upstream connection, since the exchange on it is unfinished. */
static void drop_transfer(struct gw_proxy_req *pr)
{
	if (pr->added)
		curl_multi_remove_handle(pr->loop->multi, pr->easy);
	pr->added = false;
}

void gw_proxy_req_free(struct gw_proxy_req *pr)
{
	if (!pr)
		return;
	if (pr->wait != WAIT_NONE)
		waiting_unlink(pr); /* the connection closed while suspended (stop) */
	drop_transfer(pr);
	curl_slist_free_all(pr->hdrs);
	resp_headers_clear(pr);
	free(pr->rh);
	free(pr->sbuf);
	free(pr->buf);
	free(pr);
}

void gw_proxy_transfer_done(struct gw_loop *l, CURL *easy, CURLcode result)
{
	struct gw_proxy_req *pr = NULL;

	(void)l;
	curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&pr);
	if (!pr)
		return;
	pr->done = true;
	pr->result = result;
	resume(pr);
}

void gw_proxy_expire(struct gw_loop *l, uint64_t now)
{
	struct gw_proxy_req *pr = l->waiting, *next;

	for (; pr; pr = next) {
		next = pr->next;
		if (now < pr->deadline)
			continue;
		pr->timed_out = pr->failed = true;
		drop_transfer(pr);
		resume(pr);
	}
}

void gw_proxy_teardown(struct gw_loop *l)
{
	l->tearing_down = true;
	while (l->waiting) {
		struct gw_proxy_req *pr = l->waiting;
		pr->failed = true;
		drop_transfer(pr);
		resume(pr);
	}
}

/* ---- curl's callbacks ---- */

/* A buffer's new size for need bytes: doubled from 4 KiB up to max (or
 * need, past it). Most answers are small: a buffer of max for each was a
 * fresh mapping per request. */
static size_t grown(size_t cap, size_t need, size_t max)
{
	size_t n = cap ? cap : 4096;

	while (n < need && n < max)
		n *= 2;
	return n < need ? need : n;
}

static size_t on_read(char *out, size_t size, size_t n, void *ud)
{
	struct gw_proxy_req *pr = ud;
	size_t avail = pr->slen - pr->soff, k = size * n < avail ? size * n : avail;

	if (k) {
		memcpy(out, pr->sbuf + pr->soff, k);
		pr->soff += k;
		if (pr->soff == pr->slen) {
			pr->soff = pr->slen = 0;
			if (pr->wait == WAIT_UPLOAD) /* room for the piece that waits */
				resume(pr);
		}
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
		size_t cap = grown(pr->cap, pr->len + k, WBUF_MAX);
		char *b = realloc(pr->buf, cap);
		if (!b)
			return 0; /* curl fails the transfer: CURLE_WRITE_ERROR */
		pr->buf = b;
		pr->cap = cap;
	}
	memcpy(pr->buf + pr->len, in, k);
	pr->len += k;
	if (pr->wait == WAIT_BODY)
		resume(pr);
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
		const char *sp = memchr(b, ' ', l);
		pr->status = sp ? strtol(sp + 1, NULL, 10) : 0;
		return len;
	}
	if (l == 0) {
		if (pr->status >= 200) {
			pr->headers_done = true;
			if (pr->wait == WAIT_HEADERS)
				resume(pr);
		}
		return len;
	}
	const char *colon = memchr(b, ':', l);
	if (!colon)
		return len;
	size_t nl = (size_t)(colon - b);
	if (nl == 10 && strncasecmp(b, "Connection", 10) == 0) /* its tokens: dropped in respond */
		return connection_join(&pr->resp_connection, colon + 1, l - nl - 1) ? len : 0; /* 0: a 502 */
	if (hop_by_hop(b, nl))
		return len;
	if ((pr->rh_bytes += l) > RESP_HEADERS_MAX) {
		pr->headers_too_big = true;
		return 0; /* curl fails the transfer: CURLE_WRITE_ERROR */
	}
	if (pr->nrh == pr->rh_cap) { /* as many as fit in RESP_HEADERS_MAX */
		size_t cap = pr->rh_cap ? 2 * pr->rh_cap : 32;
		char **rh = realloc(pr->rh, cap * sizeof(*rh));
		if (!rh)
			return 0;
		pr->rh = rh;
		pr->rh_cap = cap;
	}
	if (!(pr->rh[pr->nrh] = strndup(b, l)))
		return 0;
	pr->nrh++;
	return len;
}

struct hdr_ctx {
	struct gw_proxy_req *pr;
	bool body, chunked, failed;
	long long length;
	const char *xff;
	char *connection; /* the tokens of every Connection header, joined by ',' */
};

/* Every Connection header's value into h->connection (a request may send
 * several: their tokens all name hop headers). */
static enum MHD_Result connection_tokens(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
	struct hdr_ctx *h = cls;

	(void)kind;
	if (strcasecmp(key, "Connection") != 0 || !value || connection_join(&h->connection, value, strlen(value)))
		return MHD_YES;
	h->failed = true;
	return MHD_NO;
}

/* "name: value" onto the request's header list, of any length. */
static bool header_append(struct gw_proxy_req *pr, const char *name, const char *value)
{
	size_t nl = strlen(name), vl = strlen(value);
	char *line = malloc(nl + 2 + vl + 1);
	struct curl_slist *s = NULL;

	if (line) {
		memcpy(line, name, nl);
		memcpy(line + nl, ": ", 2);
		memcpy(line + nl + 2, value, vl + 1);
		s = curl_slist_append(pr->hdrs, line);
		free(line);
	}
	if (s)
		pr->hdrs = s;
	return s != NULL;
}

static enum MHD_Result add_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
	struct hdr_ctx *h = cls;

	(void)kind;
	if (strcasecmp(key, "Content-Length") == 0) {
		h->body = true;
		h->length = strtoll(value, NULL, 10);
	} else if (strcasecmp(key, "Transfer-Encoding") == 0) {
		h->body = h->chunked = true;
	} else if (strcasecmp(key, "X-Forwarded-For") == 0) {
		h->xff = value;
	}
	if (hop_by_hop(key, strlen(key)) || strcasecmp(key, "X-Forwarded-For") == 0 ||
	    connection_lists(h->connection, key, strlen(key)))
		return MHD_YES;
	if (!header_append(h->pr, key, value ? value : ""))
		h->failed = true;
	return MHD_YES;
}

static void forwarded_for(struct MHD_Connection *c, struct hdr_ctx *h)
{
	const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
	char addr[64] = "unknown";
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
	size_t xl = h->xff ? strlen(h->xff) : 0;
	char *v = malloc(xl + 2 + sizeof(addr));
	if (!v) {
		h->failed = true;
		return;
	}
	snprintf(v, xl + 2 + sizeof(addr), "%s%s%s", h->xff ? h->xff : "", h->xff ? ", " : "", addr);
	struct curl_slist *s;
	if (!header_append(h->pr, "X-Forwarded-For", v) ||
	    !(s = curl_slist_append(h->pr->hdrs, "Expect:"))) /* no 100-continue towards the upstream */
		h->failed = true;
	else
		h->pr->hdrs = s;
	free(v);
}

/* ---- the transfer ---- */

static void unpause(struct gw_proxy_req *pr)
{
	bool send = pr->send_paused && pr->slen == pr->soff && !pr->eof;
	bool recv = pr->recv_paused && pr->len - pr->off >= WBUF_MAX / 2;

	if (send == pr->send_paused && recv == pr->recv_paused)
		return; /* nothing changes: no call into curl */
	pr->send_paused = send;
	pr->recv_paused = recv;
	/* may call on_write at once with what curl held back */
	curl_easy_pause(pr->easy, (send ? CURLPAUSE_SEND : 0) | (recv ? CURLPAUSE_RECV : 0));
}

static int start(struct gw *g, struct pconn *pc, struct MHD_Connection *c, struct gw_proxy_req **out,
		 const char *method, const char *uri)
{
	struct gw_proxy_req *pr = calloc(1, sizeof(*pr));
	struct hdr_ctx h = { .pr = pr, .length = -1 };
	size_t ul = strlen(g->cfg->upstream), tl = strlen(uri);
	char *url = malloc(ul + tl + 1);

	if (!pr || !pc || !url)
		return free(url), free(pr), -ENOMEM;
	*out = pr;
	pr->g = g;
	pr->loop = pc->loop;
	pr->c = c;
	pr->easy = pc->easy;
	MHD_get_connection_values(c, MHD_HEADER_KIND, connection_tokens, &h);
	if (!h.failed)
		MHD_get_connection_values(c, MHD_HEADER_KIND, add_header, &h);
	free(h.connection);
	h.connection = NULL;
	forwarded_for(c, &h);
	if (h.failed) /* a header that could not be copied: not forwarded without it */
		return free(url), -ENOMEM;
	memcpy(url, g->cfg->upstream, ul);
	memcpy(url + ul, uri, tl + 1);
	CURL *e = pr->easy;
	/* the rest is set once (easy_defaults); what the last request of the
	 * connection set is set again here, every time: HTTPGET puts the
	 * method back to a GET with no body (no NOBODY, no UPLOAD) */
	curl_easy_setopt(e, CURLOPT_PRIVATE, pr);
	curl_easy_setopt(e, CURLOPT_URL, url); /* curl keeps a copy */
	free(url);
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, pr->hdrs);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, pr->errbuf);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, pr);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, pr);
	curl_easy_setopt(e, CURLOPT_READDATA, pr);
	curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
	curl_easy_setopt(e, CURLOPT_INFILESIZE_LARGE, (curl_off_t)-1);
	bool custom = strcmp(method, "HEAD") != 0 && (strcmp(method, "GET") != 0 || h.body);
	curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, custom ? method : NULL);
	if (strcmp(method, "HEAD") == 0)
		curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
	if (h.body) {
		curl_easy_setopt(e, CURLOPT_UPLOAD, 1L);
		if (!h.chunked && h.length >= 0)
			curl_easy_setopt(e, CURLOPT_INFILESIZE_LARGE, (curl_off_t)h.length);
	} else {
		pr->eof = true;
	}
	if (curl_multi_add_handle(pr->loop->multi, e) != CURLM_OK)
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

	atomic_fetch_add_explicit(timeout ? &g->st->n.upstream_504 : &g->st->n.upstream_502, 1,
				  memory_order_relaxed);
	if (timeout)
		snprintf(body, sizeof(body), "upstream %s did not answer within upstream_timeout_ms = %u\n",
			 g->cfg->upstream, g->cfg->upstream_timeout_ms);
	else if (pr->loop->tearing_down)
		snprintf(body, sizeof(body), "upstream %s: the gateway is stopping\n", g->cfg->upstream);
	else
		snprintf(body, sizeof(body), "upstream %s: %s\n", g->cfg->upstream,
			 pr->headers_too_big ? "its answer's headers are larger than the 16 KiB the gateway passes on"
			 : pr->errbuf[0] ? pr->errbuf
			 : pr->done && pr->result == CURLE_OK ? "the answer ended before its headers did"
			 : pr->done ? curl_easy_strerror(pr->result) : "out of memory");
	drop_transfer(pr);
	struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_COPY);
	if (!r)
		return MHD_NO;
	MHD_add_response_header(r, "Content-Type", "text/plain; charset=utf-8");
	gw_add_decision_headers(r, o);
	gw_response_common(g, r);
	enum MHD_Result ret = MHD_queue_response(c, status, r);
	MHD_destroy_response(r);
	return ret;
}

static ssize_t read_body(void *cls, uint64_t pos, char *out, size_t max)
{
	struct gw_proxy_req *pr = cls;

	(void)pos;
	if (pr->off == pr->len && !pr->done && !pr->failed)
		unpause(pr); /* the buffer is empty: take what curl held back */
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
	if (pr->done || pr->failed || !suspend(pr, WAIT_BODY))
		return MHD_CONTENT_READER_END_WITH_ERROR;
	return 0; /* suspended: called again when bytes are in */
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
		if (connection_lists(pr->resp_connection, pr->rh[i], (size_t)(colon - pr->rh[i])))
			continue;
		*colon = '\0';
		while (*v == ' ' || *v == '\t')
			v++;
		MHD_add_response_header(r, pr->rh[i], v);
		*colon = ':';
	}
	if (o->rd.why) /* admitted without all its data: said, as the nginx module says it */
		MHD_add_response_header(r, "X-Tally-Fail-Open", o->minimal ? "1" : o->rd.why);
	gw_response_common(pr->g, r);
	enum MHD_Result ret = MHD_queue_response(c, (unsigned)pr->status, r);
	MHD_destroy_response(r);
	return ret;
}

/* A piece of the request body into sbuf, as much as fits; the rest waits. */
static void take_piece(struct gw_proxy_req *pr, const char *upload, size_t *upload_size)
{
	if (pr->failed || pr->done) { /* nobody to send it to: dropped */
		*upload_size = 0;
		return;
	}
	if (pr->soff == pr->slen)
		pr->soff = pr->slen = 0;
	else if (pr->soff && pr->slen + *upload_size > SBUF_MAX) {
		memmove(pr->sbuf, pr->sbuf + pr->soff, pr->slen - pr->soff);
		pr->slen -= pr->soff;
		pr->soff = 0;
	}
	size_t want = pr->slen + *upload_size < SBUF_MAX ? pr->slen + *upload_size : SBUF_MAX;
	if (want > pr->scap) {
		size_t cap = grown(pr->scap, want, SBUF_MAX);
		char *b = realloc(pr->sbuf, cap < SBUF_MAX ? cap : SBUF_MAX);
		if (!b) {
			pr->failed = true; /* 502 "out of memory" at the last call */
			drop_transfer(pr);
			*upload_size = 0;
			return;
		}
		pr->sbuf = b;
		pr->scap = cap < SBUF_MAX ? cap : SBUF_MAX;
	}
	size_t room = pr->scap - pr->slen, k = *upload_size < room ? *upload_size : room;
	memcpy(pr->sbuf + pr->slen, upload, k);
	pr->slen += k;
	*upload_size -= k;
	if (k && pr->send_paused) {
		pr->send_paused = false;
		curl_easy_pause(pr->easy, pr->recv_paused ? CURLPAUSE_RECV : CURLPAUSE_CONT);
	}
	if (*upload_size && !suspend(pr, WAIT_UPLOAD)) { /* stopping */
		pr->failed = true;
		drop_transfer(pr);
		*upload_size = 0;
	}
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
	if (*upload_size) {
		take_piece(pr, upload, upload_size);
		return MHD_YES;
	}
	/* the last call: the body is complete; reply once */
	if (!pr->eof) {
		pr->eof = true;
		if (pr->send_paused) { /* curl learns the end from on_read */
			pr->send_paused = false;
			curl_easy_pause(pr->easy, pr->recv_paused ? CURLPAUSE_RECV : CURLPAUSE_CONT);
		}
	}
	if (pr->failed)
		return fail(pr, c, o, pr->timed_out);
	if (pr->headers_done)
		return respond(pr, c, o);
	if (pr->done)
		return fail(pr, c, o, pr->result == CURLE_OPERATION_TIMEDOUT);
	if (!suspend(pr, WAIT_HEADERS)) {
		pr->failed = true;
		return fail(pr, c, o, false);
	}
	return MHD_YES;
}
