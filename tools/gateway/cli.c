/* SPDX-License-Identifier: MIT */
/*
 * cli.c: the helpers of tally-gateway's command line and log that are not
 * about gateways: a timestamped log line on stderr, the ADDR:PORT parser
 * shared by the command line and the INI file, the monotonic clock.
 */
#include "config.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "gateway.h"

void (*gw_log_sink)(const char *line);

void gw_log(const char *fmt, ...)
{
	char ts[32], line[1024];
	time_t t = time(NULL);
	struct tm tm;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (gw_log_sink) {
		gw_log_sink(line);
		return;
	}
	strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&t, &tm));
	fprintf(stderr, "%s tally-gateway: %s\n", ts, line); /* one write: lines do not mix */
}

int gw_parse_listen(const char *s, struct sockaddr_storage *ss, char *why, size_t whylen)
{
	char host[64];
	const char *colon = s[0] == '[' ? strstr(s, "]:") : strrchr(s, ':');
	size_t hl;
	char *end;
	long port;

	memset(ss, 0, sizeof(*ss));
	if (!colon || (hl = (size_t)(colon - s) - (s[0] == '[')) >= sizeof(host) || hl == 0) {
		snprintf(why, whylen, "\"%s\": expected ADDR:PORT, e.g. 127.0.0.1:8090 or [::1]:8090", s);
		return -1;
	}
	memcpy(host, s + (s[0] == '['), hl);
	host[hl] = '\0';
	colon += s[0] == '[' ? 2 : 1;
	port = strtol(colon, &end, 10);
	if (!*colon || *end || port < 1 || port > 65535) {
		snprintf(why, whylen, "\"%s\": the port is a number from 1 to 65535", s);
		return -1;
	}
	if (s[0] == '[') {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons((uint16_t)port);
		if (inet_pton(AF_INET6, host, &a->sin6_addr) == 1)
			return 0;
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)ss;
		a->sin_family = AF_INET;
		a->sin_port = htons((uint16_t)port);
		if (inet_pton(AF_INET, host, &a->sin_addr) == 1)
			return 0;
	}
	snprintf(why, whylen, "\"%s\": \"%s\" is not an IP address (names are not resolved)", s, host);
	return -1;
}

uint64_t gw_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
