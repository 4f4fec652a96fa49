%% SPDX-License-Identifier: MIT
%% router_intake_backpressure: the router's intake backpressure module,
%% made real on tally. It owns the router's view of one tally segment: the
%% segment and every subject it has seen, kept in persistent_term (interned
%% once, read in a few ns), the three questions the intake asks
%% (get_jetstream_pending/1, get_processing_latency_p95/1,
%% check_backpressure/1), each answered live from what tallyd publishes,
%% and a handler in the shape telemetry expects, so that a router emitting
%% [router, message, stop] events records its processing latencies with no
%% code of its own:
%%
%%   ok = router_intake_backpressure:start(<<"tally">>),
%%   telemetry:attach(<<"tally">>, [router, message, stop],
%%                    fun router_intake_backpressure:handle_event/4, #{}).
%%
%% The event's measurements carry duration (native time units, as
%% telemetry:span/3 gives it) and its metadata the subject (a binary); the
%% handler config may name other keys: #{subject_key => K, measurement => M}.
%% telemetry itself is not a dependency: the handler is a plain function.
%%
%% A restarted tallyd creates a new segment under the same name. Records
%% follow it by themselves (libtally moves the handles); reads through
%% the old handle turn stale, so a read that finds the data stale opens
%% the name again (at most once a second) and from then on every subject
%% is interned in the new segment as it is next used.
-module(router_intake_backpressure).

-export([start/1, stop/0, subject/1]).
-export([get_jetstream_pending/1, get_processing_latency_p95/1, check_backpressure/1]).
-export([handle_event/4]).

-define(SEG, {?MODULE, segment}).     % {Name, Seg}
-define(RETRY, {?MODULE, reopen_at}).  % atomics: no reopen before this (ms)
-define(SUBJ(Name), {?MODULE, subject, Name}). % {Seg, Subj}

%% Open the segment once per VM (tallyd must be running).
-spec start(iodata()) -> ok | {error, tally:reason()}.
start(Segment) ->
    case tally:open(Segment) of
        {ok, Seg} ->
            persistent_term:put(?RETRY, atomics:new(1, [])),
            persistent_term:put(?SEG, {Segment, Seg}),
            ok;
        Error -> Error
    end.

%% Forget the segment and the subjects (their slots go back once nothing
%% refers to them).
-spec stop() -> ok.
stop() ->
    _ = [persistent_term:erase(K) || {K = {?MODULE, subject, _}, _} <- persistent_term:get()],
    persistent_term:erase(?RETRY),
    case persistent_term:get(?SEG, undefined) of
        undefined -> ok;
        {_, Seg} -> tally:close(Seg), persistent_term:erase(?SEG), ok
    end.

%% The subject handle for Name in the current segment, interned on first use.
-spec subject(binary()) -> {ok, tally:subject()} | {error, term()}.
subject(Name) when is_binary(Name) ->
    case persistent_term:get(?SEG, undefined) of
        undefined -> {error, not_started};
        {_, Seg} ->
            case persistent_term:get(?SUBJ(Name), undefined) of
                {Seg, Subj} -> {ok, Subj};
                _ -> intern(Seg, Name) % new, or of a segment replaced since
            end
    end.

intern(Seg, Name) ->
    case tally:subject(Seg, Name) of
        {ok, Subj} -> persistent_term:put(?SUBJ(Name), {Seg, Subj}), {ok, Subj};
        Error -> Error
    end.

%% The data read was stale: tallyd stopped, died or was replaced. Open the
%% name again, at most once a second; true if a live segment was found.
reopen() ->
    Retry = persistent_term:get(?RETRY),
    Now = tally:now() div 1000000, % ms, never negative (unlike Erlang's monotonic time)
    At = atomics:get(Retry, 1),
    case Now >= At andalso atomics:compare_exchange(Retry, 1, At, Now + 1000) =:= ok of
        false -> false;
        true ->
            {Name, _Old} = persistent_term:get(?SEG),
            case tally:open(Name) of
                %% the old handle is dropped, not closed: processes may
                %% still record through its subjects (they follow)
                {ok, New} -> persistent_term:put(?SEG, {Name, New}), true;
                _ -> false
            end
    end.

%% A read of Subject, done again once after a reopen if it was stale.
read(Subject, F) ->
    case with_subject(Subject, F) of
        {stale, R} ->
            case reopen() of
                true -> element(2, with_subject(Subject, F));
                false -> R
            end;
        {live, R} -> R
    end.

%% Messages waiting in JetStream for Subject: the backlog of the consumers
%% that feed it, as tallyd last polled it.
-spec get_jetstream_pending(binary()) -> {ok, non_neg_integer()} | {error, term()}.
get_jetstream_pending(Subject) ->
    read(Subject, fun(S) ->
        case tally:pending(S) of
            {ok, Pending, _AgeMs} -> {live, {ok, Pending}};
            {error, stale} -> {stale, {error, stale}};
            Error -> {live, Error}
        end
    end).

%% P95 processing latency of Subject over tallyd's window, in ms (float).
-spec get_processing_latency_p95(binary()) -> {ok, float()} | {error, term()}.
get_processing_latency_p95(Subject) ->
    read(Subject, fun(S) ->
        case tally:stats(S) of
            {ok, #{stale := true}} -> {stale, {error, stale}};
            {ok, #{p95 := undefined}} -> {live, {error, no_data}};
            {ok, #{p95 := P95}} -> {live, {ok, P95 / 1.0e6}};
            Error -> {live, Error}
        end
    end).

%% Should the intake take more of Subject? The verdict of tallyd
%% (hysteresis included) and, under pressure, how long to wait: ok,
%% {warn, RetryAfterMs}, {overload, RetryAfterMs}, or unknown (no data, or
%% tallyd not publishing: the caller decides whether to fail open).
-spec check_backpressure(binary()) -> ok | {warn | overload, non_neg_integer()} | unknown.
check_backpressure(Subject) ->
    case read(Subject, fun verdict_of/1) of
        ok -> ok;
        {V, R} when V =:= warn; V =:= overload -> {V, R};
        _ -> unknown
    end.

verdict_of(Subj) ->
    case tally:stats(Subj) of
        {ok, #{stale := true}} -> {stale, unknown};
        {ok, #{verdict := ok}} -> {live, ok};
        {ok, #{verdict := V, retry_after_ms := R}} when V =:= warn; V =:= overload -> {live, {V, R}};
        _ -> {live, unknown}
    end.

%% telemetry handler: records the event's duration for its subject.
%% Never raises (telemetry would detach a handler that does).
-spec handle_event([atom()], map(), map(), map()) -> ok.
handle_event(_Event, Measurements, Metadata, Config) ->
    SubjectKey = maps:get(subject_key, Config, subject),
    Measure = maps:get(measurement, Config, duration),
    case {Metadata, Measurements} of
        {#{SubjectKey := Subject}, #{Measure := D}} when is_binary(Subject), is_integer(D), D >= 0 ->
            case subject(Subject) of
                {ok, S} -> _ = tally:record(S, erlang:convert_time_unit(D, native, nanosecond)), ok;
                _ -> ok
            end;
        _ -> ok
    end.

with_subject(Subject, F) ->
    case subject(Subject) of
        {ok, S} -> F(S);
        {error, not_started} -> {live, {error, not_started}};
        Error -> {live, Error}
    end.
