/* SPDX-License-Identifier: MIT */
/*
 * poller_api.c: the public face of the JetStream poller (tally/poller.h):
 * ties a poller to the pending table of a segment this process owns.
 * The polling itself is poller.c's.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>

#include <tally/poller.h>

#include "common.h"
#include "poller.h"
#include "segment.h"

struct tally_poller {
	struct tally__poller *impl;
	struct tally_segment *seg;
};

TALLY_API int tally_poller_config_check(const struct tally_poller_config *cfg, char *why, size_t len)
{
	return tally__poller_config_check(cfg, why, len);
}

TALLY_API int tally_poller_start(struct tally_segment *seg, const struct tally_poller_config *cfg,
				 struct tally_poller **out)
{
	char why[256] = "";
	struct tally_poller *p;
	int rc;

	tally__clear_errmsg();
	*out = NULL;
	if (!seg->is_owner)
		return tally__fail(-EPERM, "segment \"%s\": only its owner can run the poller", seg->name);
	if ((rc = tally__poller_config_check(cfg, why, sizeof(why))))
		return tally__fail(rc, "poller configuration: %s", why);
	if (!(p = calloc(1, sizeof(*p))))
		return -ENOMEM;
	p->seg = seg;
	rc = tally__poller_start(cfg, tally__seg_section(seg, &seg->pending), seg->pending.size,
				 seg->pending_cap, &p->impl);
	if (rc) {
		free(p);
		if (rc == -ENOSPC)
			return tally__fail(rc, "segment \"%s\": more watched consumers than its "
					   "pending_capacity (%u)", seg->name, seg->pending_cap);
		return tally__fail(rc, "cannot start the poller: %s", tally_strerror(rc));
	}
	*out = p;
	return 0;
}

TALLY_API void tally_poller_stop(struct tally_poller **pp)
{
	if (!pp || !*pp)
		return;
	tally__poller_stop(&(*pp)->impl);
	free(*pp);
	*pp = NULL;
}

TALLY_API int tally_poller_reconfigure(struct tally_poller *p, const struct tally_poller_config *cfg)
{
	char why[256] = "";
	int rc;

	tally__clear_errmsg();
	if ((rc = tally__poller_config_check(cfg, why, sizeof(why))))
		return tally__fail(rc, "poller configuration: %s", why);
	rc = tally__poller_reconfigure(p->impl, cfg);
	return rc ? tally__fail(rc, "poller reconfiguration failed (%s); the old one keeps running",
				tally_strerror(rc))
		  : 0;
}
