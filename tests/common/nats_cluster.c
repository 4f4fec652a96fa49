/* SPDX-License-Identifier: MIT */
/*
 * tests/common/nats_cluster.c: starts and stops a 3-node nats-server
 * JetStream cluster on loopback for the tests (see nats_cluster.h). The
 * cluster ports are picked first (bound to port 0 and released), so every
 * node gets the full route list at start; a node started before its peers
 * keeps retrying its routes, as nats-server does. JetStream readiness is
 * asked through cnats ($JS.API.INFO, which needs a meta leader).
 */
#define _GNU_SOURCE
#include "nats_cluster.h"

#include <arpa/inet.h>
#include <errno.h>
#include <nats/nats.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int free_port(void)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t sl = sizeof(sa);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port = -1;

	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
	    getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
		port = ntohs(sa.sin_port);
	close(fd);
	return port;
}

int tally_test_cluster_index(const char *name)
{
	if (name && name[0] == 'n' && name[1] >= '1' && name[1] <= '0' + TALLY_TEST_CLUSTER_NODES &&
	    !name[2])
		return name[1] - '1';
	return -1;
}

/* 1 when $JS.API.INFO answers without an error on url. */
static int js_ready(const char *url)
{
	natsConnection *nc = NULL;
	natsOptions *o = NULL;
	natsMsg *m = NULL;
	int ok = 0;

	if (natsOptions_Create(&o) != NATS_OK)
		return 0;
	natsOptions_SetURL(o, url);
	natsOptions_SetTimeout(o, 1000);
	natsOptions_SetAllowReconnect(o, false);
	if (natsConnection_Connect(&nc, o) == NATS_OK &&
	    natsConnection_RequestString(&m, nc, "$JS.API.INFO", "", 1000) == NATS_OK)
		ok = strstr(natsMsg_GetData(m), "\"error\"") == NULL;
	natsMsg_Destroy(m);
	natsConnection_Destroy(nc);
	natsOptions_Destroy(o);
	return ok;
}

int tally_test_cluster_wait_js(struct tally_test_cluster *c, int i, int timeout_ms)
{
	long long deadline = now_ms() + timeout_ms;

	while (now_ms() < deadline) {
		if (js_ready(c->node[i].url))
			return 0;
		usleep(100 * 1000);
	}
	snprintf(c->errmsg, sizeof(c->errmsg), "node n%d (%s): JetStream did not answer within %d ms",
		 i + 1, c->node[i].url, timeout_ms);
	return -ETIMEDOUT;
}

static int start_node(struct tally_test_cluster *c, int i, const char *routes)
{
	char args[256];
	int rc;

	snprintf(args, sizeof(args), "-n n%d --cluster_name C --cluster nats://127.0.0.1:%d --routes %s", i + 1,
		 c->cluster_port[i], routes);
	rc = tally_test_nats_start(&c->node[i], args, true);
	if (rc < 0)
		snprintf(c->errmsg, sizeof(c->errmsg), "node n%d: %s", i + 1, c->node[i].errmsg);
	return rc;
}

static int cluster_start_once(struct tally_test_cluster *c)
{
	char routes[200] = "";
	size_t off = 0;
	int rc = 0;

	memset(c, 0, sizeof(*c));
	for (int i = 0; i < TALLY_TEST_CLUSTER_NODES; i++) {
		c->cluster_port[i] = free_port();
		if (c->cluster_port[i] <= 0) {
			snprintf(c->errmsg, sizeof(c->errmsg), "no free loopback port for the cluster routes");
			return -EADDRINUSE;
		}
		off += (size_t)snprintf(routes + off, sizeof(routes) - off, "%snats://127.0.0.1:%d", i ? "," : "",
					c->cluster_port[i]);
	}
	for (int i = 0; i < TALLY_TEST_CLUSTER_NODES && rc == 0; i++)
		rc = start_node(c, i, routes);
	off = 0;
	for (int i = 0; i < TALLY_TEST_CLUSTER_NODES && rc == 0; i++)
		off += (size_t)snprintf(c->urls + off, sizeof(c->urls) - off, "%s%s", i ? "," : "", c->node[i].url);
	for (int i = 0; i < TALLY_TEST_CLUSTER_NODES && rc == 0; i++)
		rc = tally_test_cluster_wait_js(c, i, 30000);
	if (rc < 0)
		tally_test_cluster_stop(c);
	return rc;
}

/* The ports are chosen free but not held: a node may lose one to another
 * node (or test) that bound it first. Then the whole cluster starts again
 * on new ports. */
int tally_test_cluster_start(struct tally_test_cluster *c)
{
	int rc = -EADDRINUSE;

	for (int attempt = 0; attempt < 5; attempt++) {
		rc = cluster_start_once(c);
		if (rc == 0 || !strstr(c->errmsg, "address already in use"))
			break;
		fprintf(stderr, "nats cluster: a port was taken (%s); again on new ports\n", c->errmsg);
	}
	return rc;
}

void tally_test_cluster_stop(struct tally_test_cluster *c)
{
	for (int i = 0; i < TALLY_TEST_CLUSTER_NODES; i++)
		tally_test_nats_stop(&c->node[i]);
}
