/* SPDX-License-Identifier: MIT */
/*
 * tally/tally.h: the umbrella header of libtally. Include this one.
 *
 *   tally/common.h   errors, version, export macro
 *   tally/segment.h  the shared-memory segment and subjects
 *   tally/record.h   producers and the wait-free tally_record()
 *   tally/engine.h   the aggregator, and reading what it publishes
 *   tally/verdict.h  thresholds and ok/warn/overload verdicts
 *   tally/poller.h   JetStream consumer pending, polled with cnats
 *   tally/jsack.h    the wait and pending JetStream puts in each ack reply
 */
#ifndef TALLY_TALLY_H
#define TALLY_TALLY_H

#include <tally/common.h>
#include <tally/segment.h>
#include <tally/record.h>
#include <tally/engine.h>
#include <tally/verdict.h>
#include <tally/poller.h>
#include <tally/jsack.h>
#include <tally/share.h>

#endif /* TALLY_TALLY_H */
