/* SPDX-License-Identifier: MIT */
/*
 * lib/rules.h: the rules section of the shm segment (private layout, ABI
 * 3.2): the threshold rules the owner's engine judges by, written whenever
 * it takes a new set (at start and after every reload), so that any reader
 * can say which rule judged a subject and with what levels (`tally status
 * SUBJECT`, `tally stat --json`). The engine is the only writer.
 *
 * Entry 0 is the default rule (pattern ""); entry 1 + i is the i-th
 * pattern of the set, in the order tally_thresholds_add took them. A set
 * larger than the section holds only its first TALLY__RULES_CAP - 1
 * patterns here; `total` says how many there were. A subject's snapshot
 * word TALLY__SW_RULE holds (generation & 0xffffffff) << 32 | (entry + 1),
 * 0 for an owner that wrote none: the entry is the subject's rule only
 * while the section's generation is that one (a reload in between: read
 * the subject again).
 *
 * Seqlock over the whole section (rules change rarely): the writer stores
 * seq + 1, every word with release, then seq + 2 with release; a reader
 * loads seq with acquire, the words, then seq again, bounded retries, then
 * -EAGAIN. Every word is a C11 atomic; the pattern is packed into 64-bit
 * words. Readers trust nothing: magic, version, capacity and entry size
 * against the mapped length, count within capacity, the pattern must end
 * inside its field and be a valid NATS subject or pattern, the stale
 * policy and ratio in range.
 */
#ifndef TALLY_RULES_H
#define TALLY_RULES_H

#include <stdatomic.h>
#include <stdint.h>

#include <tally/verdict.h>

#define TALLY__RULES_MAGIC   0x534c5254u /* "TRLS" */
#define TALLY__RULES_VERSION 1u
#define TALLY__RULES_CAP     256u        /* entries, the default rule's included */
#define TALLY__RULES_PATTERN_WORDS 32u   /* 256 bytes: TALLY_SUBJECT_MAX + 1 */
#define TALLY__RULES_READ_TRIES 64

/* The levels of one rule, as words (enum tally__rule_word). */
enum tally__rule_word {
	TALLY__RW_P95_WARN, TALLY__RW_P95_OVERLOAD,
	TALLY__RW_PENDING_WARN, TALLY__RW_PENDING_OVERLOAD,
	TALLY__RW_WAIT_WARN, TALLY__RW_WAIT_OVERLOAD,
	TALLY__RW_CODEL_TARGET, TALLY__RW_CODEL_INTERVAL_MS,
	TALLY__RW_MIN_SAMPLES, TALLY__RW_STALE_AFTER_MS, TALLY__RW_STALE_POLICY,
	TALLY__RW_CLEAR_RATIO_PPM, TALLY__RW_MIN_DWELL_MS,
	TALLY__RW_RETRY_AFTER_MS, TALLY__RW_RETRY_AFTER_MAX_MS, TALLY__RW_STALL_AFTER_MS,
	TALLY__RW_WORDS
};

struct tally__rules_entry {
	_Atomic uint64_t pattern[TALLY__RULES_PATTERN_WORDS];
	_Atomic uint64_t w[TALLY__RW_WORDS];
};

struct tally__rules_hdr {
	uint32_t magic;
	uint32_t version;
	uint32_t capacity;
	uint32_t entry_size;
	_Atomic uint32_t seq;
	_Atomic uint32_t count;   /* entries written, 1 (the default) .. capacity; 0 never written */
	_Atomic uint64_t gen;     /* the engine's thresholds generation */
	_Atomic uint64_t total;   /* rules in the set, the default's included (may exceed capacity) */
	uint64_t reserved[3];
};

uint64_t tally__rules_section_size(uint32_t capacity);
void tally__rules_init(void *section, uint64_t len, uint32_t capacity);

/* Writer (the engine). */
void tally__rules_write(void *section, const struct tally_thresholds *t, uint64_t gen);

/* Reader: entry (0: the default rule) of generation gen (low 32 bits
 * compared). 0; -ENOENT (no such entry: never written, or past the
 * section), -ESTALE (the section holds another generation), -EAGAIN (a
 * write kept racing), TALLY_ECORRUPT (a field fails validation). */
int tally__rules_read(const void *section, uint64_t len, uint32_t entry, uint32_t gen,
		      struct tally_rule_info *out);

#endif /* TALLY_RULES_H */
