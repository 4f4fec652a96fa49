/* SPDX-License-Identifier: MIT */
/*
 * text.h: text that leaves the tools (Prometheus labels, JSON, terminal
 * lines) is valid UTF-8 whatever the segment holds. The library refuses
 * subjects that are not valid UTF-8 when they are interned and when they
 * are read back, but a segment is shared memory: the exporters do not
 * rely on that and clean what they print.
 */
#ifndef TALLY_TOOLS_TEXT_H
#define TALLY_TOOLS_TEXT_H

#include <stddef.h>

/* Copy in to out (outlen > 0, always NUL-terminated), each byte that does
 * not start a valid sequence and each control character replaced by
 * U+FFFD. Returns the number of replacements. */
size_t text_utf8_clean(const char *in, char *out, size_t outlen);

#endif /* TALLY_TOOLS_TEXT_H */
