/* SPDX-License-Identifier: MIT */
/*
 * text.c: cleaning text for export (see text.h), by the library's own
 * UTF-8 rule (tally_utf8_seq), so what it refuses at intern is what is
 * cleaned here; and the stderr guard that escapes control bytes in every
 * message the tools print.
 */
#define _GNU_SOURCE /* fopencookie */
#include "config.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <tally/tally.h>

#include "text.h"

size_t text_utf8_clean(const char *in, char *out, size_t outlen)
{
	const unsigned char *s = (const unsigned char *)in;
	size_t n = strlen(in), o = 0, bad = 0;

	while (n) {
		size_t len = tally_utf8_seq(s, n);
		bool control = len == 1 ? (*s < 0x20 || *s == 0x7f)
					: len == 2 && s[0] == 0xc2 && s[1] < 0xa0; /* C1 */
		const char *put = (const char *)s;
		size_t put_len = len;
		if (len == 0 || control) {
			put = "\xef\xbf\xbd";
			put_len = 3;
			len = len ? len : 1;
			bad++;
		}
		if (o + put_len >= outlen)
			break;
		memcpy(out + o, put, put_len);
		o += put_len;
		s += len;
		n -= len;
	}
	out[o] = '\0';
	return bad;
}

/* ---- stderr guard ---- */

struct guard {
	int fd;
	unsigned char held[2]; /* a sequence cut by a write: ESC, ESC [, or C2 */
	size_t nheld;
};

static void out_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0)
			return; /* nowhere else to say it */
		p += w;
		n -= (size_t)w;
	}
}

static bool plain_control(unsigned char c)
{
	return (c < 0x20 && c != '\t' && c != '\n' && c != '\r') || c == 0x7f;
}

/* Escape one chunk into out (4 bytes per input byte at most). */
static size_t guard_chunk(struct guard *g, const unsigned char *in, size_t n, char *out)
{
	size_t o = 0;

	for (size_t i = 0; i < n; i++) {
		unsigned char c = in[i];
		if (g->nheld) {
			unsigned char h0 = g->held[0];
			if (h0 == 0x1b && g->nheld == 1 && c == '[') {
				g->held[g->nheld++] = c;
				continue;
			}
			if (h0 == 0x1b && g->nheld == 2 && c == 'K') {
				memcpy(out + o, "\033[K", 3);
				o += 3;
				g->nheld = 0;
				continue;
			}
			if (h0 == 0xc2 && c >= 0x80 && c <= 0x9f) { /* a C1 control */
				o += (size_t)sprintf(out + o, "\\x%02x", c);
				g->nheld = 0;
				continue;
			}
			/* not the sequence: what was held goes out as it is (escaped) */
			if (h0 == 0x1b) {
				memcpy(out + o, "\\x1b", 4);
				o += 4;
				if (g->nheld == 2)
					out[o++] = '[';
			} else {
				out[o++] = (char)h0;
			}
			g->nheld = 0;
		}
		if (c == 0x1b || c == 0xc2) {
			g->held[0] = c;
			g->nheld = 1;
		} else if (plain_control(c)) {
			o += (size_t)sprintf(out + o, "\\x%02x", c);
		} else {
			out[o++] = (char)c;
		}
	}
	return o;
}

static ssize_t guard_write(void *cookie, const char *buf, size_t n)
{
	struct guard *g = cookie;
	char out[4 * 256 + 8];

	for (size_t done = 0; done < n;) {
		size_t k = n - done < 256 ? n - done : 256;
		size_t o = guard_chunk(g, (const unsigned char *)buf + done, k, out);
		out_all(g->fd, out, o);
		done += k;
	}
	return (ssize_t)n; /* an ESC or C2 at the end waits for the next byte */
}

static int guard_close(void *cookie)
{
	struct guard *g = cookie;

	if (g->nheld && g->held[0] == 0x1b)
		out_all(g->fd, g->nheld == 2 ? "\\x1b[" : "\\x1b", g->nheld == 2 ? 5 : 4);
	else if (g->nheld)
		out_all(g->fd, (const char *)g->held, 1);
	g->nheld = 0;
	close(g->fd);
	return 0;
}

void text_guard_stderr(void)
{
	static struct guard g;
	cookie_io_functions_t io = { .write = guard_write, .close = guard_close };

	g.fd = dup(STDERR_FILENO);
	if (g.fd < 0)
		return;
	FILE *f = fopencookie(&g, "w", io);
	if (!f) {
		close(g.fd);
		return;
	}
	setvbuf(f, NULL, _IONBF, 0);
	stderr = f;
}

size_t text_escape_controls(const char *in, char *out, size_t outlen)
{
	const unsigned char *s = (const unsigned char *)in;
	size_t o = 0;

	for (; *s; s++) {
		bool c1 = s[0] == 0xc2 && s[1] >= 0x80 && s[1] <= 0x9f;
		bool esc = plain_control(*s) || *s == 0x1b || c1;
		size_t need = esc ? 4 : 1;
		if (o + need >= outlen)
			break;
		if (c1)
			s++;
		if (esc)
			o += (size_t)snprintf(out + o, outlen - o, "\\x%02x", *s);
		else
			out[o++] = (char)*s;
	}
	out[o] = '\0';
	return o;
}
