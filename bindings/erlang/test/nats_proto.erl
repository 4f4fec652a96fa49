%% SPDX-License-Identifier: MIT
%% nats_proto: just enough of the NATS client protocol (over gen_tcp) for
%% the binding's tests to drive a real nats-server: start one with
%% JetStream on a free loopback port in a temp dir, create a stream and a
%% durable consumer through the JetStream API, publish messages, pull one
%% message of a consumer with its reply subject. There is
%% no Erlang NATS client in Debian; this is test code, not a client.
-module(nats_proto).

-export([start_server/0, stop_server/1, connect/1, close/1, request/3, publish/3, flush/1, next_msg/3]).

%% nats-server -js on 127.0.0.1:<free port>; {Url, Server}.
start_server() ->
    Bin = case os:getenv("TALLY_NATS_SERVER") of
              V when V =:= false; V =:= "" -> "/usr/sbin/nats-server";
              V -> V
          end,
    true = filelib:is_regular(Bin) orelse error({no_nats_server, Bin, "install the Debian package nats-server"}),
    {ok, L} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(L),
    gen_tcp:close(L),
    Dir = filename:join("/tmp", "tally-erl-nats-" ++ os:getpid() ++ "-" ++ integer_to_list(Port)),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    Script = "exec 3<&0; \"$@\" >\"$LOG\" 2>&1 </dev/null & p=$!; echo \"pid $p\"; "
             "(read _ <&3; kill -9 $p 2>/dev/null) & wait $p",
    P = open_port({spawn_executable, "/bin/sh"},
                  [{args, ["-c", Script, "sh", Bin, "-js", "-a", "127.0.0.1", "-p", integer_to_list(Port),
                           "-sd", Dir]},
                   {env, [{"LOG", filename:join(Dir, "server.log")}]}, {line, 256}, binary]),
    OsPid = receive {P, {data, {eol, <<"pid ", X/binary>>}}} -> binary_to_integer(X)
            after 5000 -> error(nats_server_no_pid)
            end,
    Url = "nats://127.0.0.1:" ++ integer_to_list(Port),
    S = #{url => Url, port => Port, os_pid => OsPid, dir => Dir, sh => P},
    Up = tally_test_util:wait_until(fun() ->
             case gen_tcp:connect({127, 0, 0, 1}, Port, [], 200) of
                 {ok, C} -> gen_tcp:close(C), true;
                 _ -> false
             end
         end, 10000, 50),
    Up orelse error({nats_server_not_up, Url}),
    S.

stop_server(#{os_pid := Pid, sh := P, dir := Dir}) ->
    os:cmd("kill -TERM " ++ integer_to_list(Pid)),
    timer:sleep(100),
    catch port_close(P),
    os:cmd("rm -rf '" ++ Dir ++ "'"),
    ok.

%% A connection; the server's INFO read and CONNECT sent.
connect(Port) ->
    {ok, S} = gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {active, false}, {packet, line}], 2000),
    {ok, <<"INFO ", _/binary>>} = gen_tcp:recv(S, 0, 2000),
    ok = gen_tcp:send(S, <<"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false}\r\n">>),
    flush(S),
    S.

close(S) -> gen_tcp:close(S).

%% PING and wait for PONG: everything sent before is processed.
flush(S) ->
    ok = gen_tcp:send(S, <<"PING\r\n">>),
    wait_pong(S).

wait_pong(S) ->
    case gen_tcp:recv(S, 0, 5000) of
        {ok, <<"PONG\r\n">>} -> ok;
        {ok, <<"PING\r\n">>} -> gen_tcp:send(S, <<"PONG\r\n">>), wait_pong(S);
        {ok, <<"-ERR", _/binary>> = E} -> error({nats_error, E});
        {ok, _} -> wait_pong(S)
    end.

publish(S, Subject, Payload) ->
    ok = gen_tcp:send(S, [<<"PUB ">>, Subject, <<" ">>, integer_to_list(byte_size(Payload)), <<"\r\n">>,
                          Payload, <<"\r\n">>]).

%% A request and its reply's payload.
request(S, Subject, Payload) ->
    Inbox = <<"_INBOX.tally", (integer_to_binary(erlang:unique_integer([positive])))/binary>>,
    ok = gen_tcp:send(S, [<<"SUB ">>, Inbox, <<" 1\r\n">>,
                          <<"PUB ">>, Subject, <<" ">>, Inbox, <<" ">>,
                          integer_to_list(byte_size(Payload)), <<"\r\n">>, Payload, <<"\r\n">>]),
    Reply = wait_msg(S),
    ok = gen_tcp:send(S, <<"UNSUB 1\r\n">>),
    Reply.

wait_msg(S) ->
    {_Fields, Body} = wait_msg_fields(S),
    Body.

%% The next MSG: its fields (subject, sid, [reply,] size) and its payload.
wait_msg_fields(S) ->
    case gen_tcp:recv(S, 0, 5000) of
        {ok, <<"MSG ", Rest/binary>>} ->
            Fields = binary:split(string:trim(Rest), <<" ">>, [global]),
            Len = binary_to_integer(lists:last(Fields)),
            ok = inet:setopts(S, [{packet, raw}]),
            {ok, <<Body:Len/binary, "\r\n">>} = gen_tcp:recv(S, Len + 2, 5000),
            ok = inet:setopts(S, [{packet, line}]),
            {Fields, Body};
        {ok, <<"PING\r\n">>} -> gen_tcp:send(S, <<"PONG\r\n">>), wait_msg_fields(S);
        {ok, <<"-ERR", _/binary>> = E} -> error({nats_error, E});
        {ok, _} -> wait_msg_fields(S)
    end.

%% Pull one message of a durable pull consumer: {Subject, ReplySubject,
%% Payload}, the reply subject as nats-server wrote it ($JS.ACK...).
next_msg(S, Stream, Consumer) ->
    Inbox = <<"_INBOX.tally", (integer_to_binary(erlang:unique_integer([positive])))/binary>>,
    Api = <<"$JS.API.CONSUMER.MSG.NEXT.", Stream/binary, ".", Consumer/binary>>,
    ok = gen_tcp:send(S, [<<"SUB ">>, Inbox, <<" 1\r\n">>,
                          <<"PUB ">>, Api, <<" ">>, Inbox, <<" 1\r\n1\r\n">>]),
    {[Subject, _Sid, Reply, _Len], Body} = wait_msg_fields(S),
    ok = gen_tcp:send(S, <<"UNSUB 1\r\n">>),
    {Subject, Reply, Body}.
