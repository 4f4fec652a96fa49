/* SPDX-License-Identifier: MIT */
/*
 * sanitize.h (private): which sanitizer this translation unit is built
 * with, for gcc and clang alike. gcc defines __SANITIZE_THREAD__ and
 * __SANITIZE_ADDRESS__; clang (14 at least) defines neither and answers
 * __has_feature(thread_sanitizer) / __has_feature(address_sanitizer)
 * instead. Code that must differ under a sanitizer tests TALLY__TSAN and
 * TALLY__ASAN (always defined, 0 or 1), never the compiler's own macros.
 */
#ifndef TALLY_LIB_SANITIZE_H
#define TALLY_LIB_SANITIZE_H

#ifndef __has_feature
#define __has_feature(x) 0 /* gcc before 14 */
#endif

#if defined(__SANITIZE_THREAD__) || __has_feature(thread_sanitizer)
#define TALLY__TSAN 1
#else
#define TALLY__TSAN 0
#endif

#if defined(__SANITIZE_ADDRESS__) || __has_feature(address_sanitizer)
#define TALLY__ASAN 1
#else
#define TALLY__ASAN 0
#endif

#endif /* TALLY_LIB_SANITIZE_H */
