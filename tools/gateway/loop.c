/* SPDX-License-Identifier: MIT */
/*
 * loop.c: proxy mode's event loops. Each loop is one thread that owns
 *
 *   - a libmicrohttpd daemon run from outside (MHD_USE_EPOLL with no
 *     thread of its own, MHD_ALLOW_SUSPEND_RESUME), bound to the listening
 *     address with SO_REUSEPORT beside the other loops' daemons, so that
 *     the kernel spreads client connections over the loops;
 *   - a curl multi handle driven by curl_multi_socket_action: curl tells
 *     us (on_socket, on_timer) which sockets to watch and when to call it
 *     back; its connection cache is the loop's pool of upstream
 *     connections (keep-alive);
 *   - one epoll set that holds libmicrohttpd's own epoll descriptor,
 *     curl's sockets and an eventfd that asks the loop to stop.
 *
 * So one wake-up serves every connection of the loop that is ready, on
 * the client side or the upstream side, and a proxied request costs no
 * thread switch: the thread-per-connection design it replaces slept and
 * woke twice per request (BENCHMARKS.md "Gateway"). Nothing is shared
 * between loops but the segment reader and the counters (atomics); within
 * a loop nothing locks, because libmicrohttpd's callbacks, curl's
 * callbacks and the deadlines all run on the loop's thread.
 *
 * One turn of a loop: wait (at most until curl's timer, libmicrohttpd's
 * timeout or the next deadline scan), hand curl the sockets that are ready,
 * run curl's timer when due, take the transfers curl has finished
 * (gw_proxy_transfer_done), expire the requests whose upstream has been
 * silent too long (gw_proxy_expire, every DEADLINE_SCAN_NS), and run
 * libmicrohttpd when its descriptor is ready or a request was resumed.
 * Running libmicrohttpd may start transfers (curl's timer then says 0):
 * the turn goes round again at once, without waiting, up to IMMEDIATE_MAX
 * times before it lets epoll say what else is ready.
 *
 * The request's side of this (why a connection is suspended, what resumes
 * it) is proxy.c's; its header holds that state machine.
 *
 * Stopping (gw_loops_stop, from the main thread): each loop is told by its
 * eventfd and leaves its turn; then, for each loop in the main thread,
 * libmicrohttpd stops accepting (quiesce), every suspended request is
 * failed and resumed (gw_proxy_teardown; a suspended connection left at
 * MHD_stop_daemon is a libmicrohttpd panic, and a resume only takes
 * effect in MHD_run), libmicrohttpd runs until none is left suspended,
 * and only then is the daemon stopped and curl's handle cleaned up.
 */
#include "config.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "gateway.h"

#define DEADLINE_SCAN_NS (10ull * 1000000) /* how late a deadline may fire */
#define IMMEDIATE_MAX 8                      /* turns without waiting in a row */
#define EVENTS_MAX 64

/*
 * curl's sockets in the epoll set. A transfer's socket goes in when curl
 * asks for it and is said to be of no more interest (CURL_POLL_REMOVE) at
 * the end of every transfer, though a kept-alive connection is asked for
 * again by the next one, in the same direction: taking it out and putting
 * it back were two of the ten system calls of a proxied request. So a
 * socket that curl itself opened (on_open_socket: we know when its number
 * is new and, on_close_socket, when it is gone) stays in the set when
 * curl lets it go; if it wakes the loop meanwhile (the upstream closed it,
 * or sent what nobody asked for), it is taken out then, and curl, which
 * did not ask, is not told. Sockets curl did not open through us (its
 * resolver's) are added and removed as curl says.
 */
static struct gw_fd *fd_state(struct gw_loop *l, curl_socket_t s)
{
	if (s < 0)
		return NULL;
	if ((size_t)s >= l->nfds) {
		size_t n = l->nfds ? l->nfds : 64;
		while (n <= (size_t)s)
			n *= 2;
		struct gw_fd *f = realloc(l->fds, n * sizeof(*f));
		if (!f)
			return NULL;
		memset(f + l->nfds, 0, (n - l->nfds) * sizeof(*f));
		l->fds = f;
		l->nfds = n;
	}
	return &l->fds[s];
}

static int watch(struct gw_loop *l, curl_socket_t s, uint32_t events, bool registered)
{
	struct epoll_event ev = { .events = events, .data.fd = s };
	int op = registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;

	if (epoll_ctl(l->ep, op, s, &ev) == 0)
		return 0;
	/* a number epoll forgot at a close (MOD: ENOENT) or still holds (ADD: EEXIST) */
	op = op == EPOLL_CTL_MOD ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
	if (epoll_ctl(l->ep, op, s, &ev) == 0)
		return 0;
	gw_log("proxy: cannot watch upstream socket %d: %s", (int)s, strerror(errno));
	return -1; /* curl fails that transfer */
}

static int on_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
	struct gw_loop *l = userp;
	struct gw_fd *f = fd_state(l, s);
	uint32_t want = what == CURL_POLL_REMOVE ? 0u
			: (what & CURL_POLL_IN ? EPOLLIN : 0u) | (what & CURL_POLL_OUT ? EPOLLOUT : 0u);

	(void)easy;
	(void)socketp;
	if (!f || !f->ours) { /* not ours to keep: as curl says */
		if (!want)
			return epoll_ctl(l->ep, EPOLL_CTL_DEL, s, NULL), 0; /* EBADF after a close: fine */
		return watch(l, s, want, true);
	}
	f->want = want;
	if (!want || (f->registered && f->events == want))
		return 0; /* kept in the set as it is */
	if (watch(l, s, want, f->registered) != 0)
		return -1;
	f->registered = true;
	f->events = want;
	return 0;
}

/* An event for a socket curl let go: taken out now, curl not told. true:
 * it was one. */
static bool unwanted(struct gw_loop *l, int fd)
{
	struct gw_fd *f = (size_t)fd < l->nfds ? &l->fds[fd] : NULL;

	if (!f || !f->ours || f->want)
		return false;
	epoll_ctl(l->ep, EPOLL_CTL_DEL, fd, NULL);
	f->registered = false;
	return true;
}

curl_socket_t gw_loop_open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *a)
{
	struct gw_loop *l = clientp;
	int fd = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
	struct gw_fd *f;

	(void)purpose;
	if (fd < 0)
		return CURL_SOCKET_BAD;
	if (!(f = fd_state(l, fd))) { /* no memory for its state: curl's way, not kept */
		close(fd);
		return CURL_SOCKET_BAD;
	}
	*f = (struct gw_fd){ .ours = true };
	return fd;
}

int gw_loop_close_socket(void *clientp, curl_socket_t fd)
{
	struct gw_loop *l = clientp;

	if ((size_t)fd < l->nfds)
		l->fds[fd] = (struct gw_fd){ 0 }; /* epoll forgets it at the close */
	return close(fd);
}

static int on_timer(CURLM *multi, long ms, void *userp)
{
	struct gw_loop *l = userp;

	(void)multi;
	l->curl_due = ms < 0 ? 0 : gw_now_ns() + (uint64_t)ms * 1000000u;
	if (l->curl_due == 0) /* ms >= 0 at the clock's zero: never, but 0 means none */
		l->curl_due = 1;
	return 0;
}

/* The transfers curl has finished. */
static void take_done(struct gw_loop *l)
{
	CURLMsg *msg;
	int q;

	while ((msg = curl_multi_info_read(l->multi, &q)))
		if (msg->msg == CURLMSG_DONE)
			gw_proxy_transfer_done(l, msg->easy_handle, msg->data.result);
}

static void curl_action(struct gw_loop *l, curl_socket_t s, int flags)
{
	int running;

	curl_multi_socket_action(l->multi, s, flags, &running);
	take_done(l);
}

/* curl's timer, when it is due. true: it ran. */
static bool curl_timer(struct gw_loop *l, uint64_t now)
{
	if (!l->curl_due || now < l->curl_due)
		return false;
	l->curl_due = 0;
	curl_action(l, CURL_SOCKET_TIMEOUT, 0);
	return true;
}

/* How long epoll may wait, in ms: until the first of curl's timer,
 * libmicrohttpd's timeout and the next deadline scan (-1: none). */
static int wait_ms(struct gw_loop *l, uint64_t now)
{
	uint64_t due = UINT64_MAX;
	MHD_UNSIGNED_LONG_LONG mt;

	if (l->curl_due)
		due = l->curl_due;
	if (MHD_get_timeout(l->d, &mt) == MHD_YES) {
		uint64_t t = now + (uint64_t)mt * 1000000u;
		due = t < due ? t : due;
	}
	if (l->waiting) {
		uint64_t t = l->next_scan > now ? l->next_scan : now;
		due = t < due ? t : due;
	}
	if (due == UINT64_MAX)
		return -1;
	if (due <= now)
		return 0;
	uint64_t ms = (due - now + 999999) / 1000000;
	return ms > 60000 ? 60000 : (int)ms;
}

/* Accept no more connections (from the loop's own thread, which runs its
 * daemon): the listening socket is ours then, and closed. The kernel
 * refuses new connections once every loop's socket of the port is gone. */
static void quiesce(struct gw_loop *l)
{
	if (l->quiesced)
		return;
	l->quiesced = true;
	MHD_socket lfd = MHD_quiesce_daemon(l->d);
	if (lfd != MHD_INVALID_SOCKET)
		close(lfd);
}

static void *loop_main(void *arg)
{
	struct gw_loop *l = arg;
	struct epoll_event ev[EVENTS_MAX];
	int immediate = 0;

	for (;;) {
		uint64_t now = gw_now_ns();
		int tmo = wait_ms(l, now);
		if (tmo == 0 && ++immediate > IMMEDIATE_MAX) /* let epoll say what else is ready */
			immediate = 0;
		int n = epoll_wait(l->ep, ev, EVENTS_MAX, immediate ? 0 : tmo);
		bool mhd = false;
		if (tmo != 0)
			immediate = 0;
		if (n < 0 && errno != EINTR) {
			gw_log("proxy: epoll_wait: %s", strerror(errno));
			break;
		}
		for (int i = 0; i < n; i++) {
			int fd = ev[i].data.fd;
			if (fd == l->mhd_fd) {
				mhd = true;
			} else if (fd == l->stop_fd) {
				return NULL;
			} else if (fd == l->drain_fd) {
				eventfd_t v;
				(void)eventfd_read(l->drain_fd, &v);
				quiesce(l);
			} else if (!unwanted(l, fd)) {
				uint32_t e = ev[i].events;
				curl_action(l, fd, (e & (EPOLLIN | EPOLLHUP) ? CURL_CSELECT_IN : 0) |
							   (e & EPOLLOUT ? CURL_CSELECT_OUT : 0) |
							   (e & EPOLLERR ? CURL_CSELECT_ERR : 0));
			}
		}
		now = gw_now_ns();
		curl_timer(l, now);
		if (l->waiting && now >= l->next_scan) {
			gw_proxy_expire(l, now);
			l->next_scan = now + DEADLINE_SCAN_NS;
		}
		MHD_UNSIGNED_LONG_LONG mt = 1;
		if (mhd || l->kick || (MHD_get_timeout(l->d, &mt) == MHD_YES && mt == 0)) {
			l->kick = false;
			MHD_run(l->d);
		}
		/* what the handlers started: curl's timer is now due */
		if (curl_timer(l, gw_now_ns()) && l->kick) {
			l->kick = false;
			MHD_run(l->d);
		}
	}
	return NULL;
}

/* One loop's libmicrohttpd, curl and epoll set: 0, or -1 with errno. */
static int loop_init(struct gw_loop *l, struct gw *g, const struct gw_daemon_options *o)
{
	struct epoll_event ev = { .events = EPOLLIN };
	const union MHD_DaemonInfo *di;

	l->ep = l->stop_fd = l->drain_fd = l->mhd_fd = -1;
	l->g = g;
	if ((l->ep = epoll_create1(EPOLL_CLOEXEC)) < 0 || (l->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0 ||
	    (l->drain_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
		return -1;
	if (!(l->multi = curl_multi_init()))
		return errno = ENOMEM, -1;
	curl_multi_setopt(l->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
	curl_multi_setopt(l->multi, CURLMOPT_SOCKETDATA, l);
	curl_multi_setopt(l->multi, CURLMOPT_TIMERFUNCTION, on_timer);
	curl_multi_setopt(l->multi, CURLMOPT_TIMERDATA, l);
	l->d = MHD_start_daemon(o->flags | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME, 0, NULL, NULL,
				o->on_request, g, MHD_OPTION_EXTERNAL_LOGGER, gw_mhd_log, NULL,
				MHD_OPTION_SOCK_ADDR, o->addr,
				MHD_OPTION_URI_LOG_CALLBACK, o->on_uri, g,
				MHD_OPTION_NOTIFY_COMPLETED, o->on_completed, g,
				MHD_OPTION_NOTIFY_CONNECTION, o->on_connection, l,
				MHD_OPTION_CONNECTION_LIMIT, o->connection_limit,
				MHD_OPTION_CONNECTION_TIMEOUT, o->idle_timeout_s,
				MHD_OPTION_CONNECTION_MEMORY_LIMIT, o->memory,
				MHD_OPTION_LISTENING_ADDRESS_REUSE, 1u, /* SO_REUSEPORT: the loops share the port */
				MHD_OPTION_END);
	if (!l->d)
		return -1;
	if (!(di = MHD_get_daemon_info(l->d, MHD_DAEMON_INFO_EPOLL_FD)) || di->epoll_fd < 0)
		return errno = EINVAL, -1;
	l->mhd_fd = di->epoll_fd;
	ev.data.fd = l->mhd_fd;
	if (epoll_ctl(l->ep, EPOLL_CTL_ADD, l->mhd_fd, &ev) != 0)
		return -1;
	ev.data.fd = l->drain_fd;
	if (epoll_ctl(l->ep, EPOLL_CTL_ADD, l->drain_fd, &ev) != 0)
		return -1;
	ev.data.fd = l->stop_fd;
	return epoll_ctl(l->ep, EPOLL_CTL_ADD, l->stop_fd, &ev);
}

/* Everything of a loop whose thread has returned (or never ran). */
static void loop_fini(struct gw_loop *l)
{
	if (l->d) {
		quiesce(l); /* accept no more */
		gw_proxy_teardown(l); /* fails and resumes the suspended ones; none suspends again */
		for (int i = 0; i < 3; i++)
			MHD_run(l->d); /* takes the resumed ones off libmicrohttpd's suspended list */
		MHD_stop_daemon(l->d); /* closes every connection: their requests free their transfers */
	}
	if (l->multi)
		curl_multi_cleanup(l->multi);
	if (l->ep >= 0)
		close(l->ep);
	if (l->stop_fd >= 0)
		close(l->stop_fd);
	if (l->drain_fd >= 0)
		close(l->drain_fd);
	free(l->fds);
	memset(l, 0, sizeof(*l));
}

/* Stops the first n loops, their threads running. */
static void stop_started(struct gw_loop *loops, unsigned n)
{
	for (unsigned k = 0; k < n; k++)
		eventfd_write(loops[k].stop_fd, 1);
	for (unsigned k = 0; k < n; k++) {
		pthread_join(loops[k].thread, NULL);
		loop_fini(&loops[k]);
	}
}

/* Is the port free? The loops bind it with SO_REUSEPORT, which would
 * let them share it with another gateway already there (and take part of
 * its traffic); a bind without it fails if any socket holds the port. 0
 * or -1 with errno. (A second gateway starting in the same instant could
 * still pass: the window is this probe's close and the first loop's bind.) */
static int port_free(const struct sockaddr_storage *ss)
{
	socklen_t len = ss->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
	int one = 1, fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0), err = 0;

	if (fd < 0)
		return -1;
	(void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)); /* as libmicrohttpd does */
	if (ss->ss_family == AF_INET6) /* and IPv6 only, as it binds with MHD_USE_IPv6 */
		(void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (bind(fd, (const struct sockaddr *)ss, len) != 0)
		err = errno;
	close(fd);
	errno = err;
	return err ? -1 : 0;
}

static uint16_t port_of(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET6)
		return ntohs(((const struct sockaddr_in6 *)(const void *)ss)->sin6_port);
	return ntohs(((const struct sockaddr_in *)(const void *)ss)->sin_port);
}

int gw_loops_start(struct gw *g, struct gw_loop *loops, unsigned n, const struct gw_daemon_options *opts)
{
	struct gw_daemon_options o = *opts;
	struct sockaddr_storage ss;

	memcpy(&ss, opts->addr, sizeof(ss));
	o.addr = &ss;
	if (port_of(&ss) && port_free(&ss) != 0)
		return -1;
	for (unsigned k = 0; k < n; k++) {
		int err = loop_init(&loops[k], g, &o) != 0 ? errno : 0;
		if (!err && k == 0) { /* port 0: the others bind the port the first one got */
			const union MHD_DaemonInfo *di = MHD_get_daemon_info(loops[0].d, MHD_DAEMON_INFO_BIND_PORT);
			if (di && di->port && ss.ss_family == AF_INET6)
				((struct sockaddr_in6 *)(void *)&ss)->sin6_port = htons(di->port);
			else if (di && di->port)
				((struct sockaddr_in *)(void *)&ss)->sin_port = htons(di->port);
		}
		if (!err)
			err = pthread_create(&loops[k].thread, NULL, loop_main, &loops[k]);
		if (err) {
			loop_fini(&loops[k]);
			stop_started(loops, k);
			errno = err;
			return -1;
		}
		char name[32];
		snprintf(name, sizeof(name), "gw-loop%u", k);
		name[15] = '\0'; /* the kernel's limit */
		pthread_setname_np(loops[k].thread, name);
	}
	return 0;
}

void gw_loops_quiesce(struct gw_loop *loops, unsigned n)
{
	for (unsigned k = 0; k < n; k++)
		eventfd_write(loops[k].drain_fd, 1);
}

void gw_loops_stop(struct gw_loop *loops, unsigned n)
{
	stop_started(loops, n);
}
