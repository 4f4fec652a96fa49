/* SPDX-License-Identifier: MIT */
/*
 * text.c: cleaning text for export (see text.h), by the library's own
 * UTF-8 rule (tally_utf8_seq), so what it refuses at intern is what is
 * cleaned here.
 */
#include "config.h"

#include <stdbool.h>
#include <string.h>

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
