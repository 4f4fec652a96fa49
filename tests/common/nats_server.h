/* SPDX-License-Identifier: MIT */
/*
 * tests/common/nats_server.h: a real nats-server for the tests and the
 * benchmarks. Starts /usr/bin/nats-server (or $TALLY_NATS_SERVER, or the
 * first nats-server on PATH) on 127.0.0.1 with a free port and its own
 * temporary directory (JetStream store and log file), waits until it
 * answers with its INFO line, and stops, kills or restarts it on the same
 * port and store directory. A missing binary is an error with a message
 * that says so: the caller turns it into a test failure, never a skip.
 *
 * Not thread-safe: one thread drives one struct tally_test_nats. The
 * server gets PR_SET_PDEATHSIG(SIGKILL), so it dies with the thread that
 * started it if a test crashes before it calls stop.
 */
#ifndef TALLY_TEST_NATS_SERVER_H
#define TALLY_TEST_NATS_SERVER_H

#include <stdbool.h>
#include <sys/types.h>

#define TALLY_TEST_NATS_ARGS_MAX 16

struct tally_test_nats {
	char url[64];          /* "nats://127.0.0.1:PORT" */
	char store_dir[256];   /* temp dir: JetStream store ("js/") and server.log */
	char binary[256];      /* the nats-server that was started */
	char errmsg[1024];     /* why the last call failed, for cr_assert messages */
	char extra[256];       /* copy of extra_args, reused by restart */
	pid_t pid;             /* 0 when not running */
	int port;
	bool jetstream;
};

/*
 * Start a server. extra_args: whitespace-separated arguments passed as they
 * are (no quoting), e.g. "--user a --pass b", or NULL. Returns 0, or a
 * negative errno with n->errmsg filled (-ENOENT: no nats-server binary;
 * -ETIMEDOUT: did not answer within 10 s). Blocks up to about 10 s.
 */
int tally_test_nats_start(struct tally_test_nats *n, const char *extra_args, bool jetstream);

/* SIGTERM, then SIGKILL after 5 s; waits for it; removes the temp dir. Idempotent. */
void tally_test_nats_stop(struct tally_test_nats *n);

/* SIGKILL and wait, keep port and store dir (for a later restart). */
void tally_test_nats_kill(struct tally_test_nats *n);

/*
 * Start again on the same port and store dir with the same arguments
 * (after kill, or while running: then it is killed first). Retries while
 * the port is still held. Returns 0 or a negative errno (n->errmsg).
 */
int tally_test_nats_restart(struct tally_test_nats *n);

#endif /* TALLY_TEST_NATS_SERVER_H */
