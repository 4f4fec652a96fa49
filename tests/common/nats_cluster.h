/* SPDX-License-Identifier: MIT */
/*
 * tests/common/nats_cluster.h: a real 3-node JetStream cluster for the
 * tests and benchmarks of "many hosts": three nats-server processes on
 * 127.0.0.1, each with its own client port, cluster port, store directory
 * and server name ("n1".."n3"), routes between them on loopback, cluster
 * name "C". Built on tests/common/nats_server.c (one struct per node, so
 * kill, restart and stop work per node). Ready means: every node answers
 * its INFO line and the JetStream meta group has a leader ($JS.API.INFO
 * answers on every node). Not thread-safe, like nats_server.h.
 */
#ifndef TALLY_TEST_NATS_CLUSTER_H
#define TALLY_TEST_NATS_CLUSTER_H

#include "nats_server.h"

#define TALLY_TEST_CLUSTER_NODES 3

struct tally_test_cluster {
	struct tally_test_nats node[TALLY_TEST_CLUSTER_NODES];
	int cluster_port[TALLY_TEST_CLUSTER_NODES];
	char urls[256];       /* "nats://127.0.0.1:P1,nats://127.0.0.1:P2,..." (all nodes) */
	char errmsg[1024];
};

/*
 * Start three nodes and wait (up to about 30 s) until JetStream answers
 * on each. Returns 0 or a negative errno with c->errmsg filled.
 */
int tally_test_cluster_start(struct tally_test_cluster *c);

/* Wait until JetStream answers on node i (restart, election); 0 or -ETIMEDOUT. */
int tally_test_cluster_wait_js(struct tally_test_cluster *c, int i, int timeout_ms);

/* Index (0..2) of the node whose name ("n1".."n3") is given; -1 none. */
int tally_test_cluster_index(const char *name);

/* Stop every node (SIGTERM, then SIGKILL) and remove their directories. */
void tally_test_cluster_stop(struct tally_test_cluster *c);

#endif /* TALLY_TEST_NATS_CLUSTER_H */
