#!/bin/sh
# SPDX-License-Identifier: MIT
# dev.sh: the quick start. From a fresh clone on Debian 12, as root:
#   ./dev.sh demo    install dependencies, build, run the live demo
#   ./dev.sh test    install dependencies, build, run the whole test suite
# Also: ./dev.sh deps | build | bench. Every step is idempotent: packages
# already installed are not fetched again, and the build is incremental.
# BUILD_DIR (default _build) and CONFIGURE_FLAGS choose the build tree.
set -eu

cd "$(dirname "$0")"
BUILD_DIR=${BUILD_DIR:-_build}
CONFIGURE_FLAGS=${CONFIGURE_FLAGS:---enable-werror}

PACKAGES="build-essential autoconf automake libtool pkg-config
liburcu-dev libck-dev libnats-dev libcriterion-dev nats-server
libinih-dev libmicrohttpd-dev libncurses-dev libjansson-dev
prometheus valgrind clang libclang-rt-14-dev gnuplot-nox wrk procps tmux
gdb nginx nginx-dev libcurl4-openssl-dev curl openssl
zlib1g-dev libcrypt-dev libsystemd-dev systemd
erlang-nox erlang-dev erlang-eunit erlang-common-test rebar3"

deps() {
	missing=""
	for p in $PACKAGES; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
	done
	[ -z "$missing" ] && return 0
	if [ "$(id -u)" -ne 0 ]; then
		echo "dev.sh: missing Debian packages:$missing" >&2
		echo "dev.sh: run as root (or: sudo apt-get install$missing)" >&2
		exit 1
	fi
	echo "dev.sh: installing$missing"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends $missing
}

build() {
	[ -x configure ] && [ configure -nt configure.ac ] || autoreconf -fi
	mkdir -p "$BUILD_DIR"
	if [ ! -f "$BUILD_DIR/config.status" ]; then
		(cd "$BUILD_DIR" && ../configure $CONFIGURE_FLAGS)
	fi
	make -C "$BUILD_DIR" -j"$(nproc)"
}

check() {
	status=0
	erl_log="$BUILD_DIR/bindings/erlang/test-suite.log"
	rm -f "$erl_log"
	make -C "$BUILD_DIR" -j"$(nproc)" check || status=$?
	tests/summarize "$BUILD_DIR/tests/test-suite.log" || status=1
	# the Erlang binding's tests: no log only when configured --disable-erlang
	if [ -f "$erl_log" ]; then
		tests/summarize "$erl_log" || status=1
	fi
	return $status
}

case "${1:-}" in
deps) deps ;;
build) deps; build ;;
test) deps; build; check ;;
demo) deps; build; exec "$BUILD_DIR/tools/tally" demo ;;
bench) deps; build; make -C "$BUILD_DIR" bench ;;
*) echo "usage: ./dev.sh demo|test|deps|build|bench" >&2; exit 2 ;;
esac
