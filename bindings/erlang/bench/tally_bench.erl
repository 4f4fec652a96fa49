%% SPDX-License-Identifier: MIT
%% tally_bench: the Erlang benchmark behind `make bench` (bench/run-bench).
%% It owns the measurement of the cost per record from Erlang and of a
%% verdict read, against a real tallyd draining the rings, and of the
%% baselines measured in the same run and the same way: a no-op NIF (the
%% floor: every figure is also given as a ratio to it), counters:add/3, an
%% ETS histogram updated with ets:update_counter/3 in a write_concurrency
%% table (as prometheus.erl's histogram does), and a gen_server cast. Each
%% case is a tight loop of its own (no fun call per iteration), run on 1
%% scheduler and on every scheduler at once; each figure is the median of
%% the repetitions (per worker, then the median of workers).
-module(tally_bench).

-export([main/0]).

-define(REPS, 7).
-define(N, 1000000).
-define(N_SLOW, 200000).
%% prometheus' default buckets, in ns
-define(BOUNDS, [5000000, 10000000, 25000000, 50000000, 100000000, 250000000, 500000000,
                 1000000000, 2500000000, 5000000000, 10000000000]).

main() ->
    Ini = "[segment]\nproducer_slots = 64\nring_capacity = 65536\n"
          "[engine]\nslice_ms = 1000\nwindow_ms = 10000\npublish_interval_ms = 100\n",
    T = tally_test_util:start_tallyd(Ini),
    try run(T)
    after tally_test_util:stop_tallyd(T)
    end,
    halt(0).

run(#{seg := Seg}) ->
    {ok, S} = tally:open(Seg),
    {ok, J} = tally:subject(S, <<"bench.record">>),
    [ok = tally:record(J, 1000) || _ <- lists:seq(1, 1000)],
    timer:sleep(300), % a published snapshot for the verdict reads
    All = erlang:system_info(schedulers),
    io:format("# Erlang/OTP ~s, erts ~s, ~b schedulers, JIT: ~p~n",
              [erlang:system_info(otp_release), erlang:system_info(version), All,
               erlang:system_info(emu_flavor)]),
    io:format("# ~b repetitions, median; ns per call, loop included; ratio to the no-op NIF~n", [?REPS]),
    R1 = measure(1, J),
    RA = case All > 1 of true -> measure(All, J); false -> R1 end,
    erlang:system_flag(schedulers_online, All),
    report(R1, RA, All),
    #{no_slot := 0} = tally:counters(S),
    ok.

cases() ->
    [{noop, "no-op NIF (floor)", ?N},
     {ring, "NIF: 2 integers into a thread-local ring (floor)", ?N},
     {record, "tally:record/2", ?N},
     {record_since, "tally:record_since/2 (timestamp in C)", ?N},
     {jetstream, "tally:record_jetstream/2 (a 56-byte ack reply: wait + pending)", ?N},
     {counters, "counters:add/3", ?N},
     {ets, "ETS histogram, update_counter + write_concurrency", ?N_SLOW},
     {cast, "gen_server:cast/2 (sender; processed)", ?N_SLOW},
     {verdict, "tally:verdict/1", ?N},
     {stats, "tally:stats/1 (a map of 29 keys)", ?N_SLOW}].

%% #{Case => {NsPerOp, Extra}} with Workers schedulers online, one worker each.
measure(Workers, J) ->
    erlang:system_flag(schedulers_online, Workers),
    Ctx = #{j => J,
            reply => iolist_to_binary(io_lib:format("$JS.ACK.ORDERS.router.1.4711.4711.~b.12",
                                                    [os:system_time(nanosecond)])),
            counters => counters:new(1, [write_concurrency]),
            ets => new_ets_histogram()},
    Reps = [[{C, run_case(C, N, Workers, Ctx)} || {C, _, N} <- cases()] || _ <- lists:seq(1, ?REPS)],
    maps:from_list([{C, median_case([proplists:get_value(C, R) || R <- Reps])} || {C, _, _} <- cases()]).

median_case(L) ->
    {median([A || {A, _} <- L]), median([B || {_, B} <- L])}.

%% Every worker runs N calls; ns per call of each worker, median of the
%% workers. For the cast, Extra is the time until the server has handled
%% every message, per message.
run_case(cast, N, Workers, _Ctx) ->
    {ok, Srv} = gen_server:start(tally_bench_srv, [], []),
    Parent = self(),
    T0 = erlang:monotonic_time(nanosecond),
    Ws = [spawn_link(fun() -> Parent ! {ns, self(), timed(fun() -> cast_loop(N, Srv) end) / N} end)
          || _ <- lists:seq(1, Workers)],
    PerOp = median([receive {ns, W, X} -> X end || W <- Ws]),
    ok = wait_count(Srv, N * Workers),
    Done = erlang:monotonic_time(nanosecond) - T0,
    gen_server:stop(Srv),
    {PerOp, Done / (N * Workers)};
run_case(C, N, Workers, Ctx) ->
    Parent = self(),
    Ws = [spawn_link(fun() -> Parent ! {ns, self(), timed(fun() -> loop(C, N, Ctx) end) / N} end)
          || _ <- lists:seq(1, Workers)],
    {median([receive {ns, W, X} -> X end || W <- Ws]), none}.

timed(F) ->
    T0 = erlang:monotonic_time(nanosecond),
    F(),
    erlang:monotonic_time(nanosecond) - T0.

loop(noop, N, _) -> noop_loop(N, 1);
loop(ring, N, _) -> ring_loop(N, 1);
loop(record, N, #{j := J}) -> record_loop(N, J);
loop(record_since, N, #{j := J}) -> since_loop(N, J, tally:now());
loop(jetstream, N, #{j := J, reply := R}) -> jetstream_loop(N, J, R);
loop(counters, N, #{counters := C}) -> counters_loop(N, C);
loop(ets, N, #{ets := T}) -> ets_loop(N, T);
loop(verdict, N, #{j := J}) -> verdict_loop(N, J);
loop(stats, N, #{j := J}) -> stats_loop(N, J).

noop_loop(0, _) -> ok;
noop_loop(N, A) -> tally:bench_noop(A, N), noop_loop(N - 1, A).

ring_loop(0, _) -> ok;
ring_loop(N, A) -> tally:bench_ring(A, N), ring_loop(N - 1, A).

record_loop(0, _) -> ok;
record_loop(N, J) -> tally:record(J, N), record_loop(N - 1, J).

since_loop(0, _, _) -> ok;
since_loop(N, J, T0) -> tally:record_since(J, T0), since_loop(N - 1, J, T0).

jetstream_loop(0, _, _) -> ok;
jetstream_loop(N, J, R) -> tally:record_jetstream(J, R), jetstream_loop(N - 1, J, R).

counters_loop(0, _) -> ok;
counters_loop(N, C) -> counters:add(C, 1, N), counters_loop(N - 1, C).

verdict_loop(0, _) -> ok;
verdict_loop(N, J) -> tally:verdict(J), verdict_loop(N - 1, J).

stats_loop(0, _) -> ok;
stats_loop(N, J) -> tally:stats(J), stats_loop(N - 1, J).

cast_loop(0, _) -> ok;
cast_loop(N, Srv) -> gen_server:cast(Srv, {record, N}), cast_loop(N - 1, Srv).

%% ---- the ETS histogram, as prometheus_histogram keeps one ------------------------
%% One row per series: {Key, Bucket1..BucketK, Sum}; an observation finds
%% its bucket and adds 1 to it and the value to the sum in one
%% update_counter/3.

new_ets_histogram() ->
    T = ets:new(bench_histogram, [set, public, {write_concurrency, true}, {read_concurrency, true}]),
    Row = list_to_tuple([key | lists:duplicate(length(?BOUNDS) + 2, 0)]),
    true = ets:insert(T, Row),
    T.

ets_loop(0, _) -> ok;
ets_loop(N, T) ->
    V = N * 100,
    Pos = bucket_pos(V, ?BOUNDS, 2),
    ets:update_counter(T, key, [{Pos, 1}, {length(?BOUNDS) + 3, V}]),
    ets_loop(N - 1, T).

bucket_pos(V, [B | _], Pos) when V =< B -> Pos;
bucket_pos(V, [_ | Bs], Pos) -> bucket_pos(V, Bs, Pos + 1);
bucket_pos(_, [], Pos) -> Pos.

%% The server has handled Total casts (each worker's casts reach it in
%% order; a call may overtake another sender's, so ask again).
wait_count(Srv, Total) ->
    case gen_server:call(Srv, count, 120000) of
        Total -> ok;
        _ -> timer:sleep(1), wait_count(Srv, Total)
    end.

%% ---- report -------------------------------------------------------------------------

report(R1, RA, All) ->
    {Noop1, _} = maps:get(noop, R1),
    {NoopA, _} = maps:get(noop, RA),
    io:format("~n| call | 1 scheduler | ratio | ~b schedulers | ratio |~n| --- | --- | --- | --- | --- |~n", [All]),
    [begin
         {A, XA} = maps:get(C, R1),
         {B, XB} = maps:get(C, RA),
         io:format("| ~s | ~s | ~.2fx | ~s | ~.2fx |~n",
                   [Label, fmt(A, XA), A / Noop1, fmt(B, XB), B / NoopA])
     end || {C, Label, _} <- cases()],
    {Rec1, _} = maps:get(record, R1),
    {RecA, _} = maps:get(record, RA),
    {Ver1, _} = maps:get(verdict, R1),
    {EtsA, _} = maps:get(ets, RA),
    {Ets1, _} = maps:get(ets, R1),
    io:format("~ntargets (medians of this run):~n", []),
    target("record <= 30 ns per call, 1 scheduler", Rec1 =< 30,
           io_lib:format("~.1f ns = ~.2fx the no-op NIF (~.1f ns)", [Rec1, Rec1 / Noop1, Noop1])),
    target("verdict <= 100 ns, 1 scheduler", Ver1 =< 100,
           io_lib:format("~.1f ns = ~.2fx the no-op NIF", [Ver1, Ver1 / Noop1])),
    target(io_lib:format(">= 3x faster than the ETS histogram, ~b schedulers recording", [All]),
           EtsA / RecA >= 3,
           io_lib:format("ETS ~.1f ns / record ~.1f ns = ~.1fx (1 scheduler: ~.1fx); as no-op ratios ~.2fx vs ~.2fx",
                         [EtsA, RecA, EtsA / RecA, Ets1 / Rec1, RecA / NoopA, EtsA / NoopA])),
    ok.

fmt(A, none) -> io_lib:format("~.1f ns", [A]);
fmt(A, X) -> io_lib:format("~.1f ns; ~.1f ns", [A, X]).

target(What, Met, Detail) ->
    io:format("  ~s: ~s (~s)~n", [case Met of true -> "met"; false -> "MISSED" end, What, Detail]).

median(L) ->
    S = lists:sort(L),
    lists:nth((length(S) + 1) div 2, S).
