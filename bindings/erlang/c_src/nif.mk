# SPDX-License-Identifier: MIT
# nif.mk: builds priv/tally_nif.so for rebar3 (rebar.config's pre_hook),
# outside the autotools build. libtally comes from pkg-config (an
# installed tally, `make install`), or from a build tree of this
# repository: make -f c_src/nif.mk TALLY_BUILD=../../_build. Run from
# bindings/erlang. GNU make.
ERL ?= erl
ERL_INCLUDE := $(shell $(ERL) -noshell -eval 'io:put_chars(code:root_dir() ++ "/usr/include"), halt().')
TALLY_SRC ?= $(CURDIR)/../..

ifdef TALLY_BUILD
TALLY_CFLAGS := -I$(TALLY_SRC)/include
TALLY_LIBS := -L$(abspath $(TALLY_BUILD))/lib/.libs -Wl,-rpath,$(abspath $(TALLY_BUILD))/lib/.libs -ltally
else
TALLY_CFLAGS := $(shell pkg-config --cflags tally 2>/dev/null)
TALLY_LIBS := $(shell pkg-config --libs tally 2>/dev/null)
endif

CFLAGS ?= -O2 -g
WARN := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wno-unused-parameter -Werror

priv/tally_nif.so: c_src/tally_nif.c
	@if [ -z "$(TALLY_LIBS)" ]; then \
		echo "nif.mk: libtally not found: install it (make install; pkg-config tally) or pass TALLY_BUILD=/path/to/_build" >&2; \
		exit 1; fi
	@if [ ! -f "$(ERL_INCLUDE)/erl_nif.h" ]; then \
		echo "nif.mk: erl_nif.h not found in $(ERL_INCLUDE): install the Debian package erlang-dev" >&2; \
		exit 1; fi
	mkdir -p priv
	$(CC) -std=gnu11 -fPIC -shared -fvisibility=hidden $(CFLAGS) $(WARN) -isystem $(ERL_INCLUDE) \
		$(TALLY_CFLAGS) -o $@ c_src/tally_nif.c $(TALLY_LIBS) -ldl -lpthread

clean:
	rm -f priv/tally_nif.so

.PHONY: clean
