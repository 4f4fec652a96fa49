%% SPDX-License-Identifier: MIT
%% tally_tests: the binding's tests (EUnit style, run as TAP by
%% test/run-tests from make check). Each test starts a real tallyd of the
%% build tree on a segment of its own and stops it by pid; nothing is
%% mocked. They cover exact counts and P95 from 1,000 processes over every
%% scheduler, a verdict rising and falling, a killed owner, bad arguments,
%% the NIF upgraded and unloaded while processes record, producer slots on
%% dirty schedulers and their exhaustion, a second OS process on the same
%% segment, JetStream pending from a real nats-server, waits and pending
%% recorded from ack reply subjects (both layouts, and real ones pulled
%% from a nats-server), and the example router module with its telemetry
%% handler.
-module(tally_tests).

-include_lib("eunit/include/eunit.hrl").

-import(tally_test_util, [start_tallyd/1, start_tallyd/2, stop_tallyd/1, kill_tallyd/1, base_ini/0,
                          wait_until/3]).

%% Run F with a tallyd started from Ini; stopped (and checked to exit 0)
%% whatever F does.
with_tallyd(Ini, F) ->
    T = #{seg := Seg} = start_tallyd(Ini),
    try F(T)
    after
        case get({killed, Seg}) of
            true -> tally_test_util:cleanup(T);
            _ -> ?assertEqual(0, stop_tallyd(T))
        end
    end.

open_subject(#{seg := Seg}, Name) ->
    {ok, S} = tally:open(Seg),
    {ok, J} = tally:subject(S, Name),
    {S, J}.

stats(J) ->
    {ok, M} = tally:stats(J),
    M.

%% Samples since tallyd started, 0 before its first publish of the subject.
total(J) ->
    case tally:stats(J) of
        {ok, #{total_count := N}} -> N;
        {error, no_data} -> 0
    end.

%% ---- 1,000 processes, 1,000,000 samples --------------------------------------

%% Process I records (K * 1000 + I + 1) us for K in 0..999: every value from
%% 1 us to 1 s exactly once, so the exact nearest-rank P95 is 950,000 us.
million_samples_exact_test() ->
    with_tallyd(base_ini(), fun(T) ->
        {S, J} = open_subject(T, <<"orders.million">>),
        Parent = self(),
        Pids = [spawn_link(fun() -> Parent ! {done, self(), record_range(J, I)} end)
                || I <- lists:seq(0, 999)],
        Results = [receive {done, P, R} -> R after 60000 -> error(recorder_timeout) end || P <- Pids],
        Oks = lists:sum([N || {N, _, _} <- Results]),
        Scheds = lists:usort(lists:append([L || {_, _, L} <- Results])),
        ?assertEqual(1000000, Oks),
        ?assertEqual(lists:seq(1, erlang:system_info(schedulers_online)), Scheds),
        ?assert(wait_until(fun() -> total(J) >= 1000000 end, 20000, 20)),
        M = stats(J),
        ?assertEqual(1000000, maps:get(total_count, M)),
        ?assertEqual(1000000, maps:get(count, M)),
        ?assertEqual(1000, maps:get(min, M)),
        ?assertEqual(1000000000, maps:get(max, M)),
        Exact = 950000 * 1000,
        P95 = maps:get(p95, M),
        ?assert(abs(P95 - Exact) =< Exact div 100, {p95, P95, exact, Exact}),
        %% one slot per scheduler thread that recorded, no more
        {ok, Slots} = tally:slots(S),
        Mine = [X || X = #{os_pid := P} <- Slots, P =:= list_to_integer(os:getpid())],
        ?assertEqual(erlang:system_info(schedulers_online), length(Mine)),
        ?assertEqual(#{no_slot => 0, last_error => undefined}, tally:counters(S))
    end).

%% {Stored, Retries, SchedulersSeen}: a dropped sample (full ring) is
%% recorded again after a yield, so every value is stored exactly once.
record_range(J, I) ->
    lists:foldl(fun(K, {N, R, Sch}) ->
                        R1 = record_retry(J, (K * 1000 + I + 1) * 1000, R),
                        Id = erlang:system_info(scheduler_id),
                        {N + 1, R1, case lists:member(Id, Sch) of true -> Sch; false -> [Id | Sch] end}
                end, {0, 0, []}, lists:seq(0, 999)).

record_retry(J, V, R) ->
    case tally:record(J, V) of
        ok -> R;
        dropped -> erlang:yield(), record_retry(J, V, R + 1)
    end.

%% ---- verdicts ----------------------------------------------------------------

verdict_rises_and_falls_test() ->
    Ini = "[segment]\nproducer_slots = 32\nring_capacity = 4096\nproducer_cooloff_ms = 200\n"
          "[engine]\nslice_ms = 100\nwindow_ms = 500\npublish_interval_ms = 50\nreap_interval_ms = 50\n"
          "[thresholds orders.verdict]\np95_warn_ms = 20\np95_overload_ms = 50\nmin_samples = 5\n"
          "min_dwell_ms = 200\n",
    with_tallyd(Ini, fun(T) ->
        {_S, J} = open_subject(T, <<"orders.verdict">>),
        Rec = spawn_link(fun() -> steady(J, 1000000) end),
        ?assert(wait_until(fun() -> tally:verdict(J) =:= ok end, 5000, 10)),
        Rec ! {value, 100000000},
        ?assert(wait_until(fun() -> tally:verdict(J) =:= overload end, 5000, 10)),
        #{verdict := overload, reasons := Reasons, stale := false, retry_after_ms := Retry} = stats(J),
        ?assert(lists:member(latency, Reasons)),
        ?assert(Retry > 0),
        Rec ! {value, 1000000},
        ?assert(wait_until(fun() -> tally:verdict(J) =:= ok end, 5000, 10)),
        #{verdict := ok, p95 := P95} = stats(J),
        ?assert(P95 < 20000000),
        unlink(Rec), exit(Rec, kill)
    end).

%% Record V ns ten times a millisecond until told another value.
steady(J, V) ->
    receive {value, V2} -> steady(J, V2)
    after 1 -> [tally:record(J, V) || _ <- lists:seq(1, 10)], steady(J, V)
    end.

%% ---- the owner killed --------------------------------------------------------

owner_killed_is_stale_and_unknown_test() ->
    with_tallyd(base_ini(), fun(T = #{seg := Seg}) ->
        {_S, J} = open_subject(T, <<"orders.killed">>),
        ok = router_intake_backpressure:start(Seg),
        [ok = tally:record(J, 1000000) || _ <- lists:seq(1, 100)],
        ?assert(wait_until(fun() -> tally:verdict(J) =:= ok end, 5000, 10)),
        ?assertMatch(#{stale := false, verdict := ok}, stats(J)),
        ?assertEqual(ok, router_intake_backpressure:check_backpressure(<<"orders.killed">>)),
        put({killed, Seg}, true),
        kill_tallyd(T),
        %% the last snapshot is no longer live after 10 publish intervals
        %% (at least 1 s): from then on it is stale and unknown
        ?assert(wait_until(fun() -> maps:get(stale, stats(J)) end, 5000, 10)),
        Reads = [begin timer:sleep(5), {tally:verdict(J), stats(J), tally:pending(J)} end
                 || _ <- lists:seq(1, 60)],
        [begin
             ?assertEqual(unknown, V),
             ?assertMatch(#{stale := true, verdict := unknown}, M),
             ?assertEqual({error, stale}, P)
         end || {V, M, P} <- Reads],
        %% recording into a segment without an owner neither blocks nor crashes
        [?assert(lists:member(tally:record(J, 1), [ok, dropped])) || _ <- lists:seq(1, 1000)],
        ?assertEqual(unknown, router_intake_backpressure:check_backpressure(<<"orders.killed">>)),
        ?assertEqual({error, stale}, router_intake_backpressure:get_processing_latency_p95(<<"orders.killed">>)),
        ?assertEqual({error, stale}, router_intake_backpressure:get_jetstream_pending(<<"orders.killed">>)),
        router_intake_backpressure:stop()
    end).

%% ---- bad arguments -------------------------------------------------------------

bad_arguments_raise_badarg_test() ->
    with_tallyd(base_ini(), fun(T) ->
        {S, J} = open_subject(T, <<"orders.bad">>),
        Sentinel = spawn(fun() -> receive stop -> ok end end),
        Badargs = [
            fun() -> tally:record(foo, 1) end,
            fun() -> tally:record(J, -1) end,
            fun() -> tally:record(J, 1.0) end,
            fun() -> tally:record(J, <<"1">>) end,
            fun() -> tally:record(S, 1) end,
            fun() -> tally:record(make_ref(), 1) end,
            fun() -> tally:record_since(J, 1.5) end,
            fun() -> tally:record_since(J, 1 bsl 70) end,
            fun() -> tally:record_since(S, 0) end,
            fun() -> tally:stats(foo) end,
            fun() -> tally:stats(S) end,
            fun() -> tally:verdict(make_ref()) end,
            fun() -> tally:verdict(S) end,
            fun() -> tally:pending(S) end,
            fun() -> tally:subject(S, "orders.list") end,
            fun() -> tally:subject(S, orders) end,
            fun() -> tally:subject(foo, <<"orders.x">>) end,
            fun() -> tally:subject(J, <<"orders.x">>) end,
            fun() -> tally:open(123) end,
            fun() -> tally:open([<<"a">>, 1000]) end,
            fun() -> tally:close(foo) end,
            fun() -> tally:close(J) end,
            fun() -> tally:counters(J) end,
            fun() -> tally:slots(J) end,
            fun() -> tally:record_dirty_cpu(foo, 1) end
        ],
        [?assertError(badarg, F()) || F <- Badargs],
        %% bad names are errors, with the operator's help
        ?assertEqual({error, bad_name}, tally:open(<<"bad/name">>)),
        ?assertEqual({error, bad_name}, tally:open(<<>>)),
        ?assertEqual({error, enoent}, tally:open(<<"tt-erl-no-such-segment">>)),
        ?assertNotEqual(nomatch, string:find(tally:format_error(enoent), "tt-erl-no-such-segment")),
        ?assertEqual({error, bad_name}, tally:subject(S, <<"orders created">>)),
        ?assertEqual({error, bad_name}, tally:subject(S, <<"orders.*">>)),
        ?assertEqual({error, bad_name}, tally:subject(S, <<"orders.", 0, "x">>)),
        ?assertEqual({error, bad_name}, tally:subject(S, binary:copy(<<"a">>, 300))),
        ?assert(length(tally:format_error(bad_name)) > 10),
        ?assert(is_list(tally:format_error({something, else}))),
        %% a value beyond 64 bits is clamped, not refused
        ?assertEqual(ok, tally:record(J, 1 bsl 80)),
        ?assertEqual(ok, tally:record(J, 0)),
        %% a closed segment: records raise badarg, reads say closed
        ok = tally:close(S),
        ?assertError(badarg, tally:record(J, 1)),
        ?assertError(badarg, tally:record_since(J, tally:now())),
        ?assertEqual({error, closed}, tally:stats(J)),
        ?assertEqual({error, closed}, tally:pending(J)),
        ?assertEqual(unknown, tally:verdict(J)),
        ?assertEqual({error, closed}, tally:subject(S, <<"orders.y">>)),
        ?assertEqual({error, closed}, tally:slots(S)),
        ?assertEqual(ok, tally:close(S)),
        %% the VM and other processes are untouched
        ?assert(is_process_alive(Sentinel)),
        Sentinel ! stop
    end).

%% ---- upgrade and unload while recording ----------------------------------------

nif_reloaded_while_recording_test() ->
    with_tallyd(base_ini(), fun(T) ->
        %% the handles live in a process of their own, so that nothing
        %% refers to them once it is done: see step 4
        Stored = in_process(fun() -> record_through_upgrades(T) end),
        ?assert(Stored > 0),
        %% 4: the final unload (no successor): erts calls unload() once no
        %% resource of the library is left, after their destructors closed
        %% every segment: the slots go back
        Me = list_to_integer(os:getpid()),
        true = code:delete(tally),
        true = code:soft_purge(tally),
        {module, tally} = code:load_file(tally),
        {ok, S2} = tally:open(maps:get(seg, T)),
        Released = wait_until(fun() ->
                    {ok, L} = tally:slots(S2),
                    [x || #{os_pid := P} <- L, P =:= Me] =:= []
                end, 5000, 20),
        ?assert(Released, tally:slots(S2))
    end).

record_through_upgrades(T) ->
    {S, J} = open_subject(T, <<"orders.reload">>),
    Parent = self(),
    Recs = [spawn_link(fun() -> loop_record(J, Parent, 0) end) || _ <- lists:seq(1, 8)],
    timer:sleep(100),
    %% 1: the same library file again: a new module instance, upgrade()
    {module, tally} = code:load_file(tally),
    timer:sleep(100),
    true = code:soft_purge(tally),
    %% 2: a copy at another path: another library instance takes over
    Dir = filename:join("/tmp", "tally-erl-nif-" ++ tally_test_util:segname()),
    ok = file:make_dir(Dir),
    {ok, _} = file:copy(filename:join(priv_dir(), "tally_nif.so"), filename:join(Dir, "tally_nif.so")),
    os:putenv("TALLY_NIF_DIR", Dir),
    {module, tally} = code:load_file(tally),
    os:unsetenv("TALLY_NIF_DIR"),
    timer:sleep(100),
    true = code:soft_purge(tally),
    %% 3: back to the original file
    {module, tally} = code:load_file(tally),
    timer:sleep(100),
    true = code:soft_purge(tally),
    ok = file:delete(filename:join(Dir, "tally_nif.so")),
    ok = file:del_dir(Dir),
    [R ! stop || R <- Recs],
    Counts = [receive {stored, R, N} -> N after 10000 -> error(recorder_lost) end || R <- Recs],
    Stored = lists:sum(Counts),
    ?assert(lists:all(fun(N) -> N > 0 end, Counts)),
    %% nothing lost across the upgrades: every ok is counted by tallyd
    ?assert(wait_until(fun() -> total(J) >= Stored end, 10000, 20)),
    timer:sleep(200),
    ?assertEqual(Stored, total(J)),
    %% the slots stayed one per scheduler thread: none leaked
    Me = list_to_integer(os:getpid()),
    {ok, Slots} = tally:slots(S),
    Mine = [x || #{os_pid := P, state := active} <- Slots, P =:= Me],
    ?assert(length(Mine) =< erlang:system_info(schedulers_online), Slots),
    Stored.

%% F() in a new process that exits afterwards: its result, or its error.
in_process(F) ->
    {Pid, Ref} = spawn_monitor(fun() -> exit({result, catch_all(F)}) end),
    receive
        {'DOWN', Ref, process, Pid, {result, {ok, R}}} -> R;
        {'DOWN', Ref, process, Pid, {result, {error, C, E, St}}} -> erlang:raise(C, E, St);
        {'DOWN', Ref, process, Pid, Other} -> error(Other)
    end.

catch_all(F) ->
    try {ok, F()} catch C:E:St -> {error, C, E, St} end.

loop_record(J, Parent, N) ->
    receive stop -> Parent ! {stored, self(), N}
    after 0 ->
        case tally:record(J, 1000) of
            ok -> loop_record(J, Parent, N + 1);
            dropped -> erlang:yield(), loop_record(J, Parent, N)
        end
    end.

priv_dir() ->
    filename:join(filename:dirname(filename:dirname(code:which(tally))), "priv").

%% ---- producer slots: dirty schedulers, exhaustion -----------------------------

dirty_schedulers_get_their_own_slots_test() ->
    with_tallyd(base_ini(), fun(T) ->
        {S, J} = open_subject(T, <<"orders.dirty">>),
        Parent = self(),
        Fs = [fun tally:record/2, fun tally:record_dirty_cpu/2, fun tally:record_dirty_io/2],
        Pids = [spawn_link(fun() -> Parent ! {n, self(), dirty_loop(F, J, 2000, 0)} end)
                || F <- Fs, _ <- lists:seq(1, 8)],
        Total = lists:sum([receive {n, P, N} -> N after 30000 -> error(timeout) end || P <- Pids]),
        ?assertEqual(8 * 3 * 2000, Total),
        ?assert(wait_until(fun() -> total(J) =:= Total end, 10000, 20)),
        Me = list_to_integer(os:getpid()),
        {ok, Slots} = tally:slots(S),
        Mine = [Tid || #{os_pid := P, tid := Tid} <- Slots, P =:= Me],
        %% at least one normal, one dirty CPU and one dirty IO scheduler
        %% thread, each with a slot of its own (the VM may run all eight
        %% record/2 loops on one normal scheduler: how many normal ones
        %% recorded is the VM's choice); never more than its scheduler threads
        ?assert(length(Mine) >= 3, Mine),
        ?assert(length(Mine) =< tally:slots_needed(), Mine),
        ?assertEqual(length(Mine), length(lists:usort(Mine)))
    end).

dirty_loop(_F, _J, 0, N) -> N;
dirty_loop(F, J, K, N) ->
    case F(J, 5000) of
        ok -> dirty_loop(F, J, K - 1, N + 1);
        dropped -> erlang:yield(), dirty_loop(F, J, K, N)
    end.

slots_exhausted_are_counted_test() ->
    Ini = "[segment]\nproducer_slots = 1\nring_capacity = 4096\nproducer_cooloff_ms = 200\n"
          "[engine]\nslice_ms = 100\nwindow_ms = 1000\npublish_interval_ms = 50\n",
    with_tallyd(Ini, fun(T) ->
        {S, J} = open_subject(T, <<"orders.full">>),
        ?assertEqual(ok, tally:record(J, 1000)),   % this scheduler takes the only slot
        ?assertEqual(dropped, tally:record_dirty_cpu(J, 1000)), % a dirty CPU thread finds none
        ?assertEqual(dropped, tally:record_dirty_cpu(J, 1000)), % and does not retry at once
        #{no_slot := N, last_error := full} = tally:counters(S),
        ?assert(N >= 2),
        ?assertNotEqual(nomatch, string:find(tally:format_error(no_slot), "producer_slots")),
        ?assert(wait_until(fun() -> total(J) =:= 1 end, 5000, 20))
    end).

%% ---- a second OS process -------------------------------------------------------

second_os_process_reads_the_segment_test() ->
    with_tallyd(base_ini(), fun(T = #{seg := Seg}) ->
        {S, J} = open_subject(T, <<"orders.shared">>),
        [ok = tally:record(J, 2000000) || _ <- lists:seq(1, 500)],
        ?assert(wait_until(fun() -> total(J) =:= 500 end, 5000, 10)),
        Expr = lists:flatten(io_lib:format(
            "{ok, S} = tally:open(~p), {ok, J} = tally:subject(S, <<\"orders.shared\">>),"
            "{ok, #{total_count := C, p50 := P50}} = tally:stats(J),"
            "V = tally:verdict(J),"
            "[ok = tally:record(J, 3000000) || _ <- lists:seq(1, 300)],"
            "io:format(\"read ~~b ~~b ~~p~~n\", [C, P50, V]), halt(0).", [Seg])),
        {0, Out, OtherPid} = tally_test_util:run_erl(Expr, 30000),
        {match, [C, P50, V]} = re:run(Out, "read (\\d+) (\\d+) (\\w+)", [{capture, all_but_first, list}]),
        ?assertEqual("500", C),
        ?assert(abs(list_to_integer(P50) - 2000000) =< 20000),
        ?assertEqual("ok", V),
        %% its records count, from its own slot
        ?assert(wait_until(fun() -> total(J) =:= 800 end, 5000, 10)),
        %% and at its exit its slot goes back (reaped: its process is gone)
        ?assert(wait_until(fun() ->
                    {ok, L} = tally:slots(S),
                    [x || #{os_pid := P} <- L, P =:= OtherPid] =:= []
                end, 5000, 20))
    end).

%% ---- JetStream pending, the example module, telemetry --------------------------

pending_from_jetstream_test() ->
    Nats = nats_proto:start_server(),
    try
        C = nats_proto:connect(maps:get(port, Nats)),
        R1 = nats_proto:request(C, <<"$JS.API.STREAM.CREATE.ORDERS">>,
                                <<"{\"name\":\"ORDERS\",\"subjects\":[\"orders.>\"]}">>),
        ?assertEqual(nomatch, binary:match(R1, <<"\"error\"">>)),
        R2 = nats_proto:request(C, <<"$JS.API.CONSUMER.DURABLE.CREATE.ORDERS.worker">>,
                                <<"{\"stream_name\":\"ORDERS\",\"config\":{\"durable_name\":\"worker\","
                                  "\"ack_policy\":\"explicit\",\"filter_subject\":\"orders.created\"}}">>),
        ?assertEqual(nomatch, binary:match(R2, <<"\"error\"">>)),
        [nats_proto:publish(C, <<"orders.created">>, <<"m">>) || _ <- lists:seq(1, 37)],
        nats_proto:flush(C),
        Ini = base_ini() ++ "[nats]\nurl = " ++ maps:get(url, Nats) ++ "\npoll_interval_ms = 100\n"
              "[watch ORDERS/worker]\n",
        with_tallyd(Ini, fun(#{seg := Seg}) ->
            ok = router_intake_backpressure:start(Seg),
            try
                {ok, J} = router_intake_backpressure:subject(<<"orders.created">>),
                ?assert(wait_until(fun() -> tally:pending(J) =/= {error, no_data} end, 5000, 20)),
                {ok, 37, Age} = tally:pending(J),
                ?assert(Age < 5000),
                ?assertEqual({ok, 37}, router_intake_backpressure:get_jetstream_pending(<<"orders.created">>)),
                ?assertMatch(#{pending := 37, pending_source := live}, stats(J)),
                %% more messages: the backlog seen from Erlang follows
                [nats_proto:publish(C, <<"orders.created">>, <<"m">>) || _ <- lists:seq(1, 5)],
                nats_proto:flush(C),
                ?assert(wait_until(fun() -> case tally:pending(J) of {ok, 42, _} -> true; _ -> false end end,
                                   5000, 20))
            after
                router_intake_backpressure:stop()
            end
        end),
        nats_proto:close(C)
    after
        nats_proto:stop_server(Nats)
    end.

%% ---- wait and pending from the ack reply (record_jetstream) ------------------

%% An ack reply of the 9-token layout (nats-server 2.9) and the same fields
%% in the 12-token one (domain, account hash, and a token after pending).
ack_v1(Stream, Consumer, Seq, Ts, Pending) ->
    iolist_to_binary(io_lib:format("$JS.ACK.~s.~s.1.~b.~b.~b.~b", [Stream, Consumer, Seq, Seq, Ts, Pending])).
ack_v2(Domain, Stream, Consumer, Seq, Ts, Pending) ->
    iolist_to_binary(io_lib:format("$JS.ACK.~s.AcCt7H4sh.~s.~s.1.~b.~b.~b.~b.rNd~b",
                                   [Domain, Stream, Consumer, Seq, Seq, Ts, Pending, Seq])).

%% Waits published so far, 0 before the subject's first publish.
wait_count(J) ->
    case tally:stats(J) of
        {ok, #{wait_count := N}} -> N;
        {error, no_data} -> 0
    end.

%% Within the histograms' 1% (and the few ms between taking Ts here and
%% the record call's own clock).
near(Expected, Got) ->
    Got >= Expected * 99 div 100 andalso Got =< Expected * 101 div 100 + 20000000.

record_jetstream_both_layouts_test() ->
    with_tallyd(base_ini(), fun(T) ->
        {_S, J} = open_subject(T, <<"orders.jetstream">>),
        Ms = 1000000,
        Now = os:system_time(nanosecond),
        %% 9-token layout, as binaries: 50 messages that waited 100 ms, 7 pending
        %% (the same for all: rings of two schedulers may drain in either order)
        [ok = tally:record_jetstream(J, ack_v1("ORDERS", "worker", I, Now - 100 * Ms, 7))
         || I <- lists:seq(1, 50)],
        ?assert(wait_until(fun() -> wait_count(J) =:= 50 end, 5000, 10)),
        M1 = stats(J),
        ?assert(near(100 * Ms, maps:get(wait_p50, M1)), M1),
        ?assertMatch(#{pending := 7, pending_source := live, count := 0, wait_skewed := 0}, M1),
        %% 12-token layout, as iolists, "_" (no domain) and a named one: 50 that
        %% waited 400 ms, and with record_jetstream/3 their 5 ms processing too
        Now2 = os:system_time(nanosecond),
        [ok = tally:record_jetstream(J, [<<"$JS.ACK.">>, binary:part(R, 8, byte_size(R) - 8)])
         || I <- lists:seq(51, 75), R <- [ack_v2("_", "ORDERS", "worker", I, Now2 - 400 * Ms, 3)]],
        [ok = tally:record_jetstream(J, ack_v2("hub", "ORDERS", "worker", I, Now2 - 400 * Ms, 3), 5 * Ms)
         || I <- lists:seq(76, 100)],
        ?assert(wait_until(fun() -> wait_count(J) =:= 100 end, 5000, 10)),
        M2 = stats(J),
        ?assert(near(400 * Ms, maps:get(wait_p99, M2)), M2),
        ?assert(near(100 * Ms, maps:get(wait_p50, M2)), M2),
        ?assertMatch(#{pending := 3, count := 25}, M2),
        ?assert(near(5 * Ms, maps:get(p50, M2)), M2),
        %% a clock 2 s ahead on the server's host: a wait of 0, counted
        ok = tally:record_jetstream(J, ack_v1("ORDERS", "worker", 101, os:system_time(nanosecond) + 2000 * Ms, 0)),
        ?assert(wait_until(fun() -> maps:get(wait_skewed, stats(J)) =:= 1 end, 5000, 10)),
        ?assertMatch(#{wait_count := 101, pending := 0}, stats(J)),
        %% the graded signals are published beside them
        #{pressure := P, shed_probability := Shed} = stats(J),
        ?assert(is_float(P) andalso P >= 0.0 andalso P =< 1.0),
        ?assert(is_float(Shed) andalso Shed >= 0.0 andalso Shed =< 1.0)
    end).

record_jetstream_refuses_what_is_not_an_ack_reply_test() ->
    with_tallyd(base_ini(), fun(T) ->
        {_S, J} = open_subject(T, <<"orders.badreply">>),
        Now = os:system_time(nanosecond),
        Bad = [<<"_INBOX.abc.def">>, <<"$JS.ACK.ORDERS.worker.1.2.3.4">>,   % a token short
               <<"$JS.ACK.ORDERS.worker.1.2.3.x.5">>, <<"$JS.ACK.ORDERS..1.2.3.4.5">>,
               <<"$JS.ACK.ORDERS.worker.1.2.3.99999999999999999999.5">>,
               <<"$JS.ACK.ORDERS.worker.1.2.3.4.5\n">>, <<>>,
               ["$JS.ACK.ORDERS", <<".worker.1.2.3.4.-5">>]],
        [?assertEqual({error, not_ack_reply}, tally:record_jetstream(J, B)) || B <- Bad],
        [?assertEqual({error, not_ack_reply}, tally:record_jetstream(J, B, 1000000)) || B <- Bad],
        ?assertEqual("not a JetStream ack reply subject", lists:sublist(tally:format_error(not_ack_reply), 33)),
        ?assertError(badarg, tally:record_jetstream(J, 42)),
        ?assertError(badarg, tally:record_jetstream(J, ack_v1("S", "C", 1, Now, 0), -1)),
        ?assertError(badarg, tally:record_jetstream(not_a_subject, ack_v1("S", "C", 1, Now, 0))),
        %% nothing was recorded: one good reply after them is the only wait,
        %% and no latency came with the refused ones
        ok = tally:record_jetstream(J, ack_v1("ORDERS", "worker", 1, Now - 10000000, 4)),
        ?assert(wait_until(fun() -> wait_count(J) =:= 1 end, 5000, 10)),
        timer:sleep(300), % six publish intervals
        ?assertMatch(#{wait_count := 1, count := 0, total_count := 0, pending := 4}, stats(J))
    end).

%% Real replies: messages stored in a real nats-server, pulled from a
%% durable consumer, their reply subjects recorded as they came.
record_jetstream_real_replies_test() ->
    Nats = nats_proto:start_server(),
    try
        C = nats_proto:connect(maps:get(port, Nats)),
        R1 = nats_proto:request(C, <<"$JS.API.STREAM.CREATE.ORDERS">>,
                                <<"{\"name\":\"ORDERS\",\"subjects\":[\"orders.>\"]}">>),
        ?assertEqual(nomatch, binary:match(R1, <<"\"error\"">>)),
        R2 = nats_proto:request(C, <<"$JS.API.CONSUMER.DURABLE.CREATE.ORDERS.router">>,
                                <<"{\"stream_name\":\"ORDERS\",\"config\":{\"durable_name\":\"router\","
                                  "\"ack_policy\":\"explicit\"}}">>),
        ?assertEqual(nomatch, binary:match(R2, <<"\"error\"">>)),
        [nats_proto:publish(C, <<"orders.created">>, <<"m">>) || _ <- lists:seq(1, 5)],
        nats_proto:flush(C),
        Stored = os:system_time(nanosecond),
        timer:sleep(200), % the messages wait in the stream
        with_tallyd(base_ini(), fun(T) ->
            {_S, J} = open_subject(T, <<"orders.created">>),
            %% each one seen published before the next (so the last pending is the third's)
            Replies = [begin
                           {<<"orders.created">>, Reply, <<"m">>} = nats_proto:next_msg(C, <<"ORDERS">>, <<"router">>),
                           ?assertMatch(<<"$JS.ACK.ORDERS.router.", _/binary>>, Reply),
                           ok = tally:record_jetstream(J, Reply, 1000000),
                           ?assert(wait_until(fun() -> wait_count(J) =:= K end, 5000, 5)),
                           nats_proto:publish(C, Reply, <<"+ACK">>),
                           Reply
                       end || K <- lists:seq(1, 3)],
            Waited = os:system_time(nanosecond) - Stored,
            M = stats(J),
            %% 2 left behind the third message; each waited 200 ms or more, less than since publishing
            ?assertMatch(#{pending := 2, pending_source := live, count := 3, wait_skewed := 0}, M),
            ?assert(maps:get(wait_p50, M) >= 200000000 * 99 div 100, M),
            ?assert(maps:get(wait_p99, M) =< Waited * 101 div 100 + 100000000, {M, Waited}),
            ?assertEqual(3, length(lists:usort(Replies)))
        end),
        nats_proto:flush(C),
        nats_proto:close(C)
    after
        nats_proto:stop_server(Nats)
    end.

router_module_and_telemetry_handler_test() ->
    with_tallyd(base_ini(), fun(#{seg := Seg}) ->
        ok = router_intake_backpressure:start(Seg),
        try
            Subject = <<"orders.telemetry">>,
            ?assertEqual({error, no_data}, router_intake_backpressure:get_processing_latency_p95(Subject)),
            D = erlang:convert_time_unit(5, millisecond, native),
            [ok = router_intake_backpressure:handle_event([router, message, stop], #{duration => D},
                                                           #{subject => Subject}, #{})
             || _ <- lists:seq(1, 100)],
            %% other keys, named by the handler's config
            [ok = router_intake_backpressure:handle_event([router, message, stop], #{took => D},
                                                           #{route => Subject},
                                                           #{subject_key => route, measurement => took})
             || _ <- lists:seq(1, 50)],
            %% events it cannot use are ignored, never raised
            ok = router_intake_backpressure:handle_event([router, message, stop], #{}, #{}, #{}),
            ok = router_intake_backpressure:handle_event([x], #{duration => -1}, #{subject => Subject}, #{}),
            ok = router_intake_backpressure:handle_event([x], #{duration => D}, #{subject => <<"bad subject">>}, #{}),
            ?assert(wait_until(fun() ->
                        element(1, router_intake_backpressure:get_processing_latency_p95(Subject)) =:= ok
                    end, 5000, 10)),
            {ok, J} = router_intake_backpressure:subject(Subject),
            ?assert(wait_until(fun() -> total(J) =:= 150 end, 5000, 10)),
            {ok, P95} = router_intake_backpressure:get_processing_latency_p95(Subject),
            ?assert(abs(P95 - 5.0) =< 0.05, P95),
            ?assert(wait_until(fun() -> router_intake_backpressure:check_backpressure(Subject) =:= ok end,
                               5000, 10)),
            ?assertEqual({error, no_data}, router_intake_backpressure:get_jetstream_pending(Subject))
        after
            router_intake_backpressure:stop()
        end
    end).

%% tallyd stopped and started again on the same name: the router module's
%% records follow the new owner, and its reads reopen the name once they
%% find the old segment stale.
router_module_follows_a_restarted_tallyd_test() ->
    T1 = #{seg := Seg} = start_tallyd(base_ini()),
    Subject = <<"orders.restart">>,
    Event = fun(Ms) ->
                D = erlang:convert_time_unit(Ms, millisecond, native),
                router_intake_backpressure:handle_event([router, message, stop], #{duration => D},
                                                        #{subject => Subject}, #{})
            end,
    ok = router_intake_backpressure:start(Seg),
    try
        [ok = Event(3) || _ <- lists:seq(1, 50)],
        ?assert(wait_until(fun() -> router_intake_backpressure:check_backpressure(Subject) =:= ok end,
                           5000, 10)),
        {ok, P1} = router_intake_backpressure:get_processing_latency_p95(Subject),
        ?assert(abs(P1 - 3.0) =< 0.03, P1),
        ?assertEqual(0, stop_tallyd(T1)),
        T2 = start_tallyd(base_ini(), Seg),
        try
            %% records made now reach the new tallyd (through the old handles)
            Fed = wait_until(fun() ->
                                     [ok = Event(7) || _ <- lists:seq(1, 20)],
                                     case router_intake_backpressure:get_processing_latency_p95(Subject) of
                                         {ok, P} -> abs(P - 7.0) =< 0.07;
                                         _ -> false
                                     end
                             end, 10000, 50),
            ?assert(Fed, router_intake_backpressure:get_processing_latency_p95(Subject)),
            ?assertEqual(ok, router_intake_backpressure:check_backpressure(Subject))
        after
            ?assertEqual(0, stop_tallyd(T2))
        end
    after
        router_intake_backpressure:stop()
    end.
