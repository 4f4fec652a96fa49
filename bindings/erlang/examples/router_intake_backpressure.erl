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
-module(router_intake_backpressure).

-export([start/1, stop/0, subject/1]).
-export([get_jetstream_pending/1, get_processing_latency_p95/1, check_backpressure/1]).
-export([handle_event/4]).

-define(SEG, {?MODULE, segment}).
-define(SUBJ(Name), {?MODULE, subject, Name}).

%% Open the segment once per VM (tallyd must be running).
-spec start(iodata()) -> ok | {error, tally:reason()}.
start(Segment) ->
    case tally:open(Segment) of
        {ok, Seg} -> persistent_term:put(?SEG, Seg), ok;
        Error -> Error
    end.

%% Forget the segment and the subjects (their slots go back once nothing
%% refers to them).
-spec stop() -> ok.
stop() ->
    _ = [persistent_term:erase(K) || {K = {?MODULE, _, _}, _} <- persistent_term:get()],
    case persistent_term:get(?SEG, undefined) of
        undefined -> ok;
        Seg -> tally:close(Seg), persistent_term:erase(?SEG), ok
    end.

%% The subject handle for Name, interned on first use.
-spec subject(binary()) -> {ok, tally:subject()} | {error, term()}.
subject(Name) when is_binary(Name) ->
    case persistent_term:get(?SUBJ(Name), undefined) of
        undefined -> intern(Name);
        Subj -> {ok, Subj}
    end.

intern(Name) ->
    case persistent_term:get(?SEG, undefined) of
        undefined -> {error, not_started};
        Seg ->
            case tally:subject(Seg, Name) of
                {ok, Subj} -> persistent_term:put(?SUBJ(Name), Subj), {ok, Subj};
                Error -> Error
            end
    end.

%% Messages waiting in JetStream for Subject: the backlog of the consumers
%% that feed it, as tallyd last polled it.
-spec get_jetstream_pending(binary()) -> {ok, non_neg_integer()} | {error, term()}.
get_jetstream_pending(Subject) ->
    with_subject(Subject, fun(S) ->
        case tally:pending(S) of
            {ok, Pending, _AgeMs} -> {ok, Pending};
            Error -> Error
        end
    end).

%% P95 processing latency of Subject over tallyd's window, in ms (float).
-spec get_processing_latency_p95(binary()) -> {ok, float()} | {error, term()}.
get_processing_latency_p95(Subject) ->
    with_subject(Subject, fun(S) ->
        case tally:stats(S) of
            {ok, #{stale := true}} -> {error, stale};
            {ok, #{p95 := undefined}} -> {error, no_data};
            {ok, #{p95 := P95}} -> {ok, P95 / 1.0e6};
            Error -> Error
        end
    end).

%% Should the intake take more of Subject? The verdict of tallyd
%% (hysteresis included) and, under pressure, how long to wait: ok,
%% {warn, RetryAfterMs}, {overload, RetryAfterMs}, or unknown (no data, or
%% tallyd not publishing: the caller decides whether to fail open).
-spec check_backpressure(binary()) -> ok | {warn | overload, non_neg_integer()} | unknown.
check_backpressure(Subject) ->
    case with_subject(Subject, fun tally:stats/1) of
        {ok, #{stale := true}} -> unknown;
        {ok, #{verdict := ok}} -> ok;
        {ok, #{verdict := V, retry_after_ms := R}} when V =:= warn; V =:= overload -> {V, R};
        _ -> unknown
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
        Error -> Error
    end.
