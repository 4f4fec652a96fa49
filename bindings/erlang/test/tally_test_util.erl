%% SPDX-License-Identifier: MIT
%% tally_test_util: what the binding's tests share. A TAP runner for
%% EUnit-style test modules (tap/1: one "ok N - name" line per *_test/0
%% function, each run in a process of its own with a time limit), a real
%% tallyd started on a fresh segment name in a temp dir and stopped by
%% pid (it dies with this VM too: a watcher shell kills it when the port
%% closes), a second OS process running erl, and small polling helpers.
-module(tally_test_util).

-export([tap/1]).
-export([start_tallyd/1, start_tallyd/2, stop_tallyd/1, kill_tallyd/1, tallyd_log/1,
         base_ini/0, segname/0, wait_until/3, run_erl/2, cleanup/1]).

-define(TEST_TIMEOUT_MS, 120000).

%% ---- TAP runner -------------------------------------------------------------

tap([ModS | Only]) ->
    Mod = list_to_atom(ModS),
    Tests = [F || {F, 0} <- Mod:module_info(exports),
                  lists:suffix("_test", atom_to_list(F)),
                  Only =:= [] orelse lists:member(atom_to_list(F), Only)],
    io:format("1..~b~n", [length(Tests)]),
    Results = [run_one(Mod, F, N) || {N, F} <- lists:zip(lists:seq(1, length(Tests)), Tests)],
    Failed = length([x || false <- Results]),
    io:format("# ~b passed, ~b failed~n", [length(Results) - Failed, Failed]),
    halt(case Failed of 0 -> 0; _ -> 1 end).

run_one(Mod, F, N) ->
    T0 = erlang:monotonic_time(millisecond),
    {Pid, Ref} = spawn_monitor(fun() -> exit({done, catch_test(Mod, F)}) end),
    Res = receive
              {'DOWN', Ref, process, Pid, {done, R}} -> R;
              {'DOWN', Ref, process, Pid, Other} -> {error, exit, Other, []}
          after ?TEST_TIMEOUT_MS ->
              exit(Pid, kill),
              {error, timeout, ?TEST_TIMEOUT_MS, []}
          end,
    Ms = erlang:monotonic_time(millisecond) - T0,
    case Res of
        ok ->
            io:format("ok ~b - ~s (~b ms)~n", [N, F, Ms]),
            true;
        {error, Class, Reason, Stack} ->
            io:format("not ok ~b - ~s (~b ms)~n", [N, F, Ms]),
            Text = io_lib:format("~p:~p~n~p", [Class, Reason, Stack]),
            [io:format("# ~s~n", [L]) || L <- string:split(lists:flatten(Text), "\n", all)],
            false
    end.

catch_test(Mod, F) ->
    try Mod:F() of
        _ -> ok
    catch Class:Reason:Stack -> {error, Class, Reason, Stack}
    end.

%% ---- tallyd ------------------------------------------------------------------

%% Test-sized defaults: short slices and publish interval, fast reaping.
base_ini() ->
    "[segment]\nproducer_slots = 32\nring_capacity = 65536\nsubject_capacity = 256\n"
    "producer_cooloff_ms = 200\n"
    "[engine]\nslice_ms = 100\nwindow_ms = 10000\npublish_interval_ms = 50\nreap_interval_ms = 50\n".

segname() ->
    lists:flatten(io_lib:format("tt-erl-~s-~b-~b", [os:getpid(),
        erlang:unique_integer([positive]), erlang:system_time(millisecond) rem 100000000])).

start_tallyd(Ini) -> start_tallyd(Ini, segname()).

%% A real tallyd (the build tree's, $TALLYD) on segment Seg (a new name:
%% segname()), waited for until it logs "ready:". Returns a map that
%% stop/kill take.
start_tallyd(Ini, Seg) ->
    Tallyd = env("TALLYD"),
    Dir = mktemp_dir(),
    IniFile = filename:join(Dir, "tallyd.ini"),
    Log = filename:join(Dir, "tallyd.log"),
    ok = file:write_file(IniFile, Ini),
    %% the shell starts tallyd, says its pid, and kills it when its stdin
    %% (the port) closes: with this VM, or after stop
    %% (an asynchronous list reads /dev/null: the watcher reads fd 3)
    Script = "exec 3<&0 2>/dev/null; \"$@\" >>\"$LOG\" 2>&1 </dev/null & p=$!; echo \"pid $p\"; "
             "(read _ <&3; kill -9 $p 2>/dev/null) & wait $p; echo \"exit $?\"",
    Port = open_port({spawn_executable, "/bin/sh"},
                     [{args, ["-c", Script, "sh", Tallyd, "-c", IniFile, "-s", Seg, "--no-http"]},
                      {env, [{"LOG", Log}]}, {line, 256}, binary, use_stdio]),
    OsPid = receive {Port, {data, {eol, <<"pid ", P/binary>>}}} -> binary_to_integer(P)
            after 5000 -> error({tallyd_no_pid, Tallyd})
            end,
    T = #{seg => Seg, os_pid => OsPid, port => Port, dir => Dir, log => Log, ini => IniFile},
    case wait_until(fun() -> binary:match(read_log(Log), <<"ready:">>) =/= nomatch end, 10000, 20) of
        true -> T;
        false -> error({tallyd_not_ready, tallyd_log(T)})
    end.

tallyd_log(#{log := Log}) -> binary_to_list(read_log(Log)).

read_log(Log) ->
    case file:read_file(Log) of
        {ok, B} -> B;
        _ -> <<>>
    end.

%% SIGTERM and its exit status; SIGKILL after 5 s.
stop_tallyd(T = #{os_pid := Pid}) ->
    os:cmd("kill -TERM " ++ integer_to_list(Pid)),
    Status = wait_exit(T, 5000),
    cleanup(T),
    Status.

kill_tallyd(T = #{os_pid := Pid}) ->
    os:cmd("kill -KILL " ++ integer_to_list(Pid)),
    wait_exit(T, 5000).

wait_exit(#{port := Port, os_pid := Pid}, Ms) ->
    receive {Port, {data, {eol, <<"exit ", S/binary>>}}} -> binary_to_integer(S)
    after Ms ->
        os:cmd("kill -KILL " ++ integer_to_list(Pid)),
        receive {Port, {data, {eol, <<"exit ", S/binary>>}}} -> {killed, binary_to_integer(S)}
        after 5000 -> error({tallyd_does_not_exit, Pid})
        end
    end.

%% Close the port (the watcher kills a tallyd still running), remove the
%% segment name a killed tallyd left and the temp dir.
cleanup(#{port := Port, seg := Seg, dir := Dir}) ->
    catch port_close(Port),
    _ = file:delete("/dev/shm/" ++ Seg),
    _ = [file:delete(F) || F <- filelib:wildcard(filename:join(Dir, "*"))],
    _ = file:del_dir(Dir),
    ok.

mktemp_dir() ->
    Dir = filename:join("/tmp", "tally-erl-" ++ segname()),
    ok = file:make_dir(Dir),
    Dir.

env(Name) ->
    case os:getenv(Name) of
        false -> error({missing_environment, Name, "run the tests through make check"});
        V -> V
    end.

%% ---- helpers ----------------------------------------------------------------

%% Poll F every StepMs until it returns true, at most Ms. true | false.
wait_until(F, Ms, StepMs) ->
    Deadline = erlang:monotonic_time(millisecond) + Ms,
    wait_until_(F, Deadline, StepMs).

wait_until_(F, Deadline, StepMs) ->
    case F() of
        true -> true;
        _ ->
            case erlang:monotonic_time(millisecond) >= Deadline of
                true -> F() =:= true;
                false -> timer:sleep(StepMs), wait_until_(F, Deadline, StepMs)
            end
    end.

%% Run Expr (a string of Erlang expressions) in a second OS process: a new
%% erl with this build's ebin. Returns {ExitStatus, Output, OsPid}.
run_erl(Expr, TimeoutMs) ->
    Erl = case os:getenv("ERL") of V when V =:= false; V =:= "" -> os:find_executable("erl"); E -> E end,
    Port = open_port({spawn_executable, Erl},
                     [{args, ["-noshell", "-noinput", "-pa", env("TALLY_EBIN"), "-eval", Expr]},
                      exit_status, binary, stderr_to_stdout, use_stdio]),
    {os_pid, OsPid} = erlang:port_info(Port, os_pid),
    collect(Port, OsPid, <<>>, erlang:monotonic_time(millisecond) + TimeoutMs).

collect(Port, OsPid, Acc, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {Port, {data, D}} -> collect(Port, OsPid, <<Acc/binary, D/binary>>, Deadline);
        {Port, {exit_status, S}} -> {S, binary_to_list(Acc), OsPid}
    after Left ->
        os:cmd("kill -KILL " ++ integer_to_list(OsPid)),
        error({second_vm_timeout, binary_to_list(Acc)})
    end.
