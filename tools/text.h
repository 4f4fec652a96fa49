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

/* Make stderr escape control bytes, so that no message (a bad value, a
 * config key, an unknown option echoed by getopt, a log line quoting what
 * a server sent) can move the cursor or retitle the terminal: every byte
 * below 0x20 but tab, newline and carriage return, DEL and the C1 controls
 * (UTF-8 C2 80..C2 9F) are written as \xHH. The one sequence the tools
 * write on purpose, ESC [ K (clear to the end of the line, tally record's
 * progress line), passes. Call once at the start of main; on failure
 * stderr stays as it was. */
void text_guard_stderr(void);

/* in with the same bytes escaped as the stderr guard escapes (no ESC [ K
 * exception) into out (outlen > 0, always NUL-terminated, cut at a whole
 * escape). Returns the length written. For a line written with write(2). */
size_t text_escape_controls(const char *in, char *out, size_t outlen);

#endif /* TALLY_TOOLS_TEXT_H */
