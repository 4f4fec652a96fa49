/* SPDX-License-Identifier: MIT */
/*
 * http.c: see http.h.
 */
#include "config.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "common/http.h"

int tt_free_port(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port = 0;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
	    getsockname(fd, (struct sockaddr *)&a, &len) == 0)
		port = ntohs(a.sin_port);
	if (fd >= 0)
		close(fd);
	return port;
}

int tt_http_raw(int port, const char *req, size_t reqlen, char **reply)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	struct timeval tv = { .tv_sec = 5 };
	size_t len = 0, cap = 1 << 16;
	char *buf = malloc(cap);
	int fd = socket(AF_INET, SOCK_STREAM, 0), status = 0;
	ssize_t n;

	*reply = buf;
	if (!buf || fd < 0) {
		if (fd >= 0)
			close(fd);
		return 0;
	}
	buf[0] = '\0';
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
		close(fd);
		return 0;
	}
	for (size_t off = 0; off < reqlen; off += (size_t)n)
		if ((n = send(fd, req + off, reqlen - off, MSG_NOSIGNAL)) <= 0)
			break;
	while ((n = recv(fd, buf + len, cap - len - 1, 0)) > 0) {
		len += (size_t)n;
		if (len + 1 == cap) {
			char *bigger = realloc(buf, cap * 2);
			if (!bigger)
				break;
			*reply = buf = bigger;
			cap *= 2;
		}
	}
	buf[len] = '\0';
	close(fd);
	sscanf(buf, "HTTP/1.%*d %d", &status);
	return status;
}

int tt_http(int port, const char *method, const char *path, char **reply)
{
	char req[1024];
	int n = snprintf(req, sizeof(req), "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
			 method, path);

	return tt_http_raw(port, req, (size_t)n, reply);
}

const char *tt_http_body(const char *reply)
{
	const char *b = strstr(reply, "\r\n\r\n");

	return b ? b + 4 : "";
}

int tt_http_header(const char *reply, const char *name, char *buf, size_t len)
{
	size_t n = strlen(name);
	const char *end = strstr(reply, "\r\n\r\n");

	for (const char *l = strstr(reply, "\r\n"); l && (!end || l < end); l = strstr(l + 2, "\r\n")) {
		const char *h = l + 2;
		if (strncasecmp(h, name, n) == 0 && h[n] == ':') {
			const char *v = h + n + 1, *e = strstr(v, "\r\n");
			while (*v == ' ')
				v++;
			snprintf(buf, len, "%.*s", (int)(e ? e - v : (long)strlen(v)), v);
			return 0;
		}
	}
	return -1;
}
