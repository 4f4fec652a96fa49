%% SPDX-License-Identifier: MIT
%% tally_bench_srv: the gen_server of the benchmark's cast baseline. It
%% owns a count and a sum of the values cast to it, the least a server
%% that aggregates latencies would do per message.
-module(tally_bench_srv).
-behaviour(gen_server).

-export([init/1, handle_call/3, handle_cast/2]).

init([]) -> {ok, {0, 0}}.

handle_cast({record, V}, {N, Sum}) -> {noreply, {N + 1, Sum + V}}.

handle_call(count, _From, State = {N, _}) -> {reply, N, State}.
