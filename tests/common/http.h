/* SPDX-License-Identifier: MIT */
/*
 * http.h: a minimal HTTP/1.1 client over loopback for the tests of the
 * daemons (tallyd's /metrics, the gateway), and a free-port finder.
 * Nothing here talks to anything but 127.0.0.1.
 */
#ifndef TALLY_TEST_HTTP_H
#define TALLY_TEST_HTTP_H

#include <stddef.h>

/* A TCP port on 127.0.0.1 that was free a moment ago; 0 on failure. */
int tt_free_port(void);

/*
 * Send req as it is to 127.0.0.1:port and read the reply until the server
 * closes (5 s at most) into *reply (malloc'd, NUL-terminated; free it).
 * Returns the HTTP status, 0 if nothing answered.
 */
int tt_http_raw(int port, const char *req, size_t reqlen, char **reply);

/* METHOD path HTTP/1.1 with Connection: close. Same return as above. */
int tt_http(int port, const char *method, const char *path, char **reply);

/* The body of a reply (after the blank line), or "". */
const char *tt_http_body(const char *reply);

/* The value of header name (case-insensitive) into buf; 0 or -1 absent. */
int tt_http_header(const char *reply, const char *name, char *buf, size_t len);

#endif
