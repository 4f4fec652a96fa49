/* SPDX-License-Identifier: MIT */
/*
 * sim.c: the simulated router and publisher of sim.h, with cnats.
 */
#include "config.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nats/nats.h>

#include "sim.h"

#define FETCH_BATCH 16
#define FETCH_TIMEOUT_MS 100

/* cnats before 3.9.0 (Debian 12 ships 3.4.1) writes past the message
 * array of natsSubscription_Fetch (nats-io/nats.c#749, "heap buffer
 * overflow in _fetch"): when the subscription already holds k user
 * messages at the call (replies to an earlier pull that came after it
 * gave up, as around a reconnect), 0 < k < batch, it pulls for the rest
 * but compares its count (from k up) with batch - k, so with
 * k >= batch / 2 the count never meets it and the array overflows. It
 * corrupted the heap of test_e2e_overload once at a nats-server restart,
 * and does within a few restarts of test_reconnect under ASan, with a
 * batch of 16 and of 2. With a batch of 1, k is 0 or 1: never in range. */
static int fetch_batch(void)
{
	return nats_GetVersionNumber() >= 0x030900u ? FETCH_BATCH : 1;
}

static void set_err(char *err, size_t len, const char *what, natsStatus s, jsErrCode jerr)
{
	snprintf(err, len, "%s: %s%s", what, natsStatus_GetText(s),
		 jerr ? " (JetStream error)" : "");
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = { (time_t)(ns / 1000000000u), (long)(ns % 1000000000u) };

	while (nanosleep(&ts, &ts) != 0)
		;
}

static int connect_js(const char *url, natsConnection **nc, jsCtx **js, char *err, size_t len)
{
	natsOptions *o = NULL;
	natsStatus s = natsOptions_Create(&o);

	if (s == NATS_OK)
		s = natsOptions_SetURL(o, url);
	if (s == NATS_OK)
		s = natsOptions_SetMaxReconnect(o, -1);
	if (s == NATS_OK)
		s = natsOptions_SetReconnectWait(o, 250);
	if (s == NATS_OK)
		s = natsConnection_Connect(nc, o);
	natsOptions_Destroy(o);
	if (s == NATS_OK)
		s = natsConnection_JetStream(js, *nc, NULL);
	if (s != NATS_OK) {
		snprintf(err, len, "cannot connect to %s: %s", url, natsStatus_GetText(s));
		natsConnection_Destroy(*nc);
		*nc = NULL;
		return -1;
	}
	return 0;
}

int sim_setup(const char *url, const char *stream, const char *subjects, bool file_storage,
	      const char *consumer, const char *filter, char *err, size_t errlen)
{
	natsConnection *nc = NULL;
	jsCtx *js = NULL;
	jsStreamConfig sc;
	jsConsumerConfig cc;
	jsErrCode jerr = 0;
	natsStatus s;
	int rc = -1;

	if (connect_js(url, &nc, &js, err, errlen))
		return -1;
	jsStreamConfig_Init(&sc);
	sc.Name = stream;
	sc.Subjects = &subjects;
	sc.SubjectsLen = 1;
	sc.Storage = file_storage ? js_FileStorage : js_MemoryStorage;
	s = js_AddStream(NULL, js, &sc, NULL, &jerr);
	if (s != NATS_OK && jerr != JSStreamNameExistErr) {
		set_err(err, errlen, "creating the stream", s, jerr);
		goto out;
	}
	jsConsumerConfig_Init(&cc);
	cc.Durable = consumer;
	cc.AckPolicy = js_AckExplicit;
	cc.FilterSubject = filter;
	cc.MaxAckPending = 100000;
	jerr = 0;
	s = js_AddConsumer(NULL, js, stream, &cc, NULL, &jerr);
	if (s != NATS_OK && jerr != JSConsumerNameExistErr && jerr != JSConsumerExistingActiveErr) {
		set_err(err, errlen, "creating the consumer", s, jerr);
		goto out;
	}
	rc = 0;
out:
	jsCtx_Destroy(js);
	natsConnection_Destroy(nc);
	return rc;
}

/* ---- router ---------------------------------------------------------------- */

struct sim_router {
	struct sim_router_config *cfg;
	natsConnection *nc;
	jsCtx *js;
	pthread_t *threads;
	int nthreads;
	atomic_bool stop;
	_Atomic uint64_t processed;
};

struct worker {
	struct sim_router *r;
	uint64_t seed;
};

/* log-normal factor with median 1 (Box-Muller) */
static double lognormal(uint64_t *seed, double sigma)
{
	*seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
	double u1 = ((double)(*seed >> 11) + 1.0) / 9007199254740993.0;
	*seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
	double u2 = (double)(*seed >> 11) / 9007199254740992.0;
	return exp(sigma * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static void handle(struct worker *w, struct tally_producer *p, natsMsg *m)
{
	struct sim_router *r = w->r;
	tally_subject_t id;
	uint64_t sent = 0;

	if (natsMsg_GetDataLength(m) == (int)sizeof(sent))
		memcpy(&sent, natsMsg_GetData(m), sizeof(sent));
	uint64_t work = (uint64_t)((double)atomic_load(&r->cfg->processing_ns) * lognormal(&w->seed, r->cfg->sigma));
	bool known = tally_subject_intern(r->cfg->seg, natsMsg_GetSubject(m), &id) == 0;
	const char *reply = natsMsg_GetReply(m);
	uint64_t start = now_ns();
	if (known && r->cfg->jetstream_wait && reply)
		tally_record_jetstream(p, id, reply, strlen(reply)); /* the wait, from JetStream's own timestamp */
	sleep_ns(work);
	uint64_t done = now_ns();
	if (known && r->cfg->jetstream_wait)
		tally_record(p, id, done - start); /* processing alone: the wait is its own series */
	else if (known)
		tally_record(p, id, sent && sent < done ? done - sent : work);
	natsMsg_Ack(m, NULL);
	atomic_fetch_add(&r->processed, 1);
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct sim_router *r = w->r;
	struct tally_producer *p;
	natsSubscription *sub = NULL;
	jsErrCode jerr = 0;

	if (tally_producer_attach(r->cfg->seg, &p) != 0) {
		fprintf(stderr, "sim: router worker: %s\n", tally_errmsg());
		return NULL;
	}
	int batch = fetch_batch();

	while (!atomic_load(&r->stop)) {
		if (!sub && js_PullSubscribe(&sub, r->js, r->cfg->filter, r->cfg->consumer, NULL, NULL,
					     &jerr) != NATS_OK) {
			sub = NULL;
			sleep_ns(100000000); /* server away: try again */
			continue;
		}
		natsMsgList list = { 0 };
		natsStatus s = natsSubscription_Fetch(&list, sub, batch, FETCH_TIMEOUT_MS, &jerr);
		if (s == NATS_OK)
			for (int i = 0; i < list.Count; i++)
				handle(w, p, list.Msgs[i]);
		natsMsgList_Destroy(&list);
		if (s != NATS_OK && s != NATS_TIMEOUT)
			sleep_ns(50000000); /* connection trouble: do not spin */
	}
	natsSubscription_Destroy(sub);
	tally_producer_detach(&p);
	free(w);
	return NULL;
}

int sim_router_start(struct sim_router_config *cfg, struct sim_router **out, char *err, size_t errlen)
{
	struct sim_router *r = calloc(1, sizeof(*r));

	if (!r || connect_js(cfg->url, &r->nc, &r->js, err, errlen)) {
		free(r);
		return -1;
	}
	r->cfg = cfg;
	r->threads = calloc((size_t)cfg->workers, sizeof(pthread_t));
	for (int i = 0; i < cfg->workers; i++) {
		struct worker *w = calloc(1, sizeof(*w));
		w->r = r;
		w->seed = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
		if (pthread_create(&r->threads[i], NULL, worker_main, w) != 0) {
			free(w);
			break;
		}
		r->nthreads++;
	}
	*out = r;
	return 0;
}

void sim_router_stop(struct sim_router **rp)
{
	struct sim_router *r = *rp;

	if (!r)
		return;
	atomic_store(&r->stop, true);
	for (int i = 0; i < r->nthreads; i++)
		pthread_join(r->threads[i], NULL);
	free(r->threads);
	natsConnection_Close(r->nc);
	jsCtx_Destroy(r->js);
	natsConnection_Destroy(r->nc);
	free(r);
	*rp = NULL;
}

uint64_t sim_router_processed(const struct sim_router *r)
{
	return atomic_load(&((struct sim_router *)r)->processed);
}

/* ---- publisher ---------------------------------------------------------------- */

struct sim_publisher {
	struct sim_publisher_config *cfg;
	natsConnection *nc;
	jsCtx *js;
	pthread_t thread;
	atomic_bool stop;
	_Atomic uint64_t published;
};

static void *publisher_main(void *arg)
{
	struct sim_publisher *p = arg;
	const uint64_t tick = 10000000; /* 10 ms */
	uint64_t next = now_ns(), k = 0;
	double owed = 0;

	while (!atomic_load(&p->stop)) {
		owed += atomic_load(&p->cfg->rate) * (double)tick / 1e9;
		for (; owed >= 1.0; owed -= 1.0) {
			uint64_t t = now_ns();
			const char *subj = p->cfg->subjects[k++ % (uint64_t)p->cfg->nsubjects];
			if (js_PublishAsync(p->js, subj, &t, sizeof(t), NULL) == NATS_OK)
				atomic_fetch_add(&p->published, 1);
		}
		next += tick;
		uint64_t now = now_ns();
		if (next > now)
			sleep_ns(next - now);
		else
			next = now; /* fell behind (server away): do not burst to catch up */
	}
	jsPubOptions po;
	jsPubOptions_Init(&po);
	po.MaxWait = 2000;
	if (js_PublishAsyncComplete(p->js, &po) != NATS_OK) {
		/* acks lost to a server restart: take the publishes back, so that
		 * nothing of ours is left in the context when it is destroyed */
		natsMsgList pending = { 0 };
		if (js_PublishAsyncGetPendingList(&pending, p->js) == NATS_OK)
			natsMsgList_Destroy(&pending);
	}
	return NULL;
}

int sim_publisher_start(struct sim_publisher_config *cfg, struct sim_publisher **out, char *err,
			size_t errlen)
{
	struct sim_publisher *p = calloc(1, sizeof(*p));

	if (!p || connect_js(cfg->url, &p->nc, &p->js, err, errlen)) {
		free(p);
		return -1;
	}
	p->cfg = cfg;
	if (pthread_create(&p->thread, NULL, publisher_main, p) != 0) {
		jsCtx_Destroy(p->js);
		natsConnection_Destroy(p->nc);
		free(p);
		snprintf(err, errlen, "cannot start the publisher thread");
		return -1;
	}
	*out = p;
	return 0;
}

void sim_publisher_stop(struct sim_publisher **pp)
{
	struct sim_publisher *p = *pp;

	if (!p)
		return;
	atomic_store(&p->stop, true);
	pthread_join(p->thread, NULL);
	natsConnection_Close(p->nc); /* no callback runs after this */
	jsCtx_Destroy(p->js);
	natsConnection_Destroy(p->nc);
	free(p);
	*pp = NULL;
}

uint64_t sim_publisher_published(const struct sim_publisher *p)
{
	return atomic_load(&((struct sim_publisher *)p)->published);
}
