/* SPDX-License-Identifier: MIT */
/*
 * ngx_http_tally_module_modules.c: what nginx's load_module looks for in a
 * dynamic module, the table its own build writes for each module (the
 * modules the .so holds, their names, and the order of filter modules,
 * none here). Kept by hand so that the module builds with our own
 * toolchain against nginx's headers (tools/Makefile.am).
 */
#include <ngx_config.h>
#include <ngx_core.h>

extern ngx_module_t ngx_http_tally_module;

ngx_module_t *ngx_modules[] = { &ngx_http_tally_module, NULL };

char *ngx_module_names[] = { (char *)"ngx_http_tally_module", NULL };

char *ngx_module_order[] = { NULL };
