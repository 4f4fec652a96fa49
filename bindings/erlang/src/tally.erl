%% SPDX-License-Identifier: MIT
%% tally: the Erlang API of libtally. Owns the module's NIF loading (priv/
%% tally_nif.so, see c_src/tally_nif.c), the thin wrappers that keep the
%% operator's help of the last failure for format_error/1, and the help
%% texts themselves. Recording goes through the calling scheduler's own
%% producer slot (claimed on its first record): no lock, no allocation,
%% never blocks. Reads come from the segment the owner (tallyd) publishes.
-module(tally).

-export([open/1, close/1, subject/2,
         record/2, record_since/2, record_jetstream/2, record_jetstream/3, now/0,
         stats/1, verdict/1, pending/1,
         format_error/1,
         counters/1, slots/1, slots_needed/0]).
%% for the benchmark and the tests
-export([bench_noop/2, bench_ring/2, record_dirty_cpu/2, record_dirty_io/2]).

-on_load(load_nif/0).
-compile({no_auto_import, [now/0]}).

-opaque segment() :: reference().
-opaque subject() :: reference().
-type reason() :: enoent | eacces | version_mismatch | owner_dead | not_ready | corrupt
                | bad_name | full | replaced | stale | closed | no_data | not_ack_reply | atom().
-export_type([segment/0, subject/0, reason/0]).

-define(NOT_LOADED, erlang:nif_error({not_loaded, ?MODULE})).

%% ---- NIF loading -------------------------------------------------------

%% priv/tally_nif.so of the application, or beside ebin/ when the
%% application is not installed under a tally-VSN directory (a build
%% tree); TALLY_NIF_DIR overrides both (packagers, upgrade tests).
load_nif() ->
    Dir = case os:getenv("TALLY_NIF_DIR") of
              false -> priv_dir();
              D -> D
          end,
    erlang:load_nif(filename:join(Dir, "tally_nif"), 0).

priv_dir() ->
    case code:priv_dir(tally) of
        {error, bad_name} ->
            filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
        P -> P
    end.

%% ---- segment and subjects ----------------------------------------------

%% Attach to the segment an owner (tallyd) created. {error, owner_dead}
%% when its owner is not running.
-spec open(iodata()) -> {ok, segment()} | {error, reason()}.
open(Name) -> keep_detail(open_nif(Name)).

%% Mark the segment closed: every later record through it or its subjects
%% raises badarg, reads return {error, closed}. Its producer slots go back
%% when the last reference to it is garbage-collected.
-spec close(segment()) -> ok.
close(_Seg) -> ?NOT_LOADED.

%% Intern a subject once; keep Subj (persistent_term, a process's state).
-spec subject(segment(), binary()) -> {ok, subject()} | {error, reason()}.
subject(Seg, Name) -> keep_detail(subject_nif(Seg, Name)).

open_nif(_Name) -> ?NOT_LOADED.
subject_nif(_Seg, _Name) -> ?NOT_LOADED.

%% ---- recording -----------------------------------------------------------

%% Record one latency in ns. dropped: the ring of this scheduler was full,
%% or it has no producer slot (counters/1), the sample is counted, never
%% stored.
-spec record(subject(), non_neg_integer()) -> ok | dropped.
record(_Subj, _Ns) -> ?NOT_LOADED.

%% Record now() - T0, the timestamp taken in C.
-spec record_since(subject(), integer()) -> ok | dropped.
record_since(_Subj, _T0) -> ?NOT_LOADED.

%% @doc Record what JetStream tells in a message's ack reply subject
%% (`Reply`: the reply of the delivered message, a binary or an iolist):
%% the message's wait in the stream (the wall clock now minus the time
%% nats-server stored it, into the subject's wait series; a timestamp
%% ahead of now, clock skew between hosts, is a wait of 0, counted as
%% `wait_skewed') and its consumer's pending (a live sample of that
%% consumer's backlog, at no API cost). Both reply layouts are taken:
%% `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>'
%% and the one with a domain and an account hash in front (nats-server
%% 2.10 and later). stats/1 shows them as `wait_p50', `wait_p95',
%% `wait_p99', `wait_min' (CoDel), `pending', `pressure',
%% `shed_probability'. `{error, not_ack_reply}': `Reply' is not an ack
%% reply (nothing is recorded). `dropped': as for record/2. Inline on the
%% calling scheduler, like record/2: no lock, no allocation for a binary,
%% never blocks.
-spec record_jetstream(subject(), iodata()) -> ok | dropped | {error, not_ack_reply}.
record_jetstream(_Subj, _Reply) -> ?NOT_LOADED.

%% @doc record_jetstream/2 and, in the same call, the message's processing
%% latency `LatencyNs' (as record/2); a reply that is not an ack reply
%% records neither.
-spec record_jetstream(subject(), iodata(), non_neg_integer()) -> ok | dropped | {error, not_ack_reply}.
record_jetstream(_Subj, _Reply, _LatencyNs) -> ?NOT_LOADED.

%% CLOCK_MONOTONIC in ns, the clock of tally_now_ns().
-spec now() -> non_neg_integer().
now() -> ?NOT_LOADED.

%% ---- reads -----------------------------------------------------------------

%% The subject's published statistics. Quantiles, min and max are
%% undefined while the window holds no sample; pending is undefined with
%% no consumer. stale: the owner has not published for 10 intervals
%% (dead or stuck): verdict is then unknown.
-spec stats(subject()) -> {ok, map()} | {error, reason()}.
stats(_Subj) -> ?NOT_LOADED.

%% The verdict alone; unknown when stale or not yet published.
-spec verdict(subject()) -> ok | warn | overload | unknown.
verdict(_Subj) -> ?NOT_LOADED.

%% The backlog of the JetStream consumers feeding the subject and the age
%% of that figure. no_data: no consumer, or never fetched; stale: the
%% owner stopped publishing.
-spec pending(subject()) -> {ok, non_neg_integer(), non_neg_integer()} | {error, no_data | stale | closed}.
pending(_Subj) -> ?NOT_LOADED.

%% Records this VM dropped for want of a producer slot in the segment, and
%% the reason of the last failed claim.
-spec counters(segment()) -> #{no_slot := non_neg_integer(), last_error := atom()}.
counters(_Seg) -> ?NOT_LOADED.

%% Every producer slot of the segment that is not free (all processes).
-spec slots(segment()) -> {ok, [map()]} | {error, reason()}.
slots(_Seg) -> ?NOT_LOADED.

%% Producer slots this VM may claim in one segment: one per scheduler
%% thread that records, normal, dirty CPU and dirty IO.
-spec slots_needed() -> pos_integer().
slots_needed() ->
    erlang:system_info(schedulers) + erlang:system_info(dirty_cpu_schedulers)
        + erlang:system_info(dirty_io_schedulers).

bench_noop(_A, _B) -> ?NOT_LOADED.
bench_ring(_A, _B) -> ?NOT_LOADED.
record_dirty_cpu(_Subj, _Ns) -> ?NOT_LOADED.
record_dirty_io(_Subj, _Ns) -> ?NOT_LOADED.

%% ---- errors ------------------------------------------------------------------

%% The NIF answers {error, Reason, Detail}: Detail (tally_errmsg(), the
%% sentence naming the object and the fix) is kept in the caller's
%% process dictionary for format_error/1, as errno-like state.
keep_detail({error, Reason, Detail}) ->
    put({?MODULE, detail, Reason}, Detail),
    {error, Reason};
keep_detail(Other) -> Other.

%% What went wrong and what to do: the detail of this process's last
%% failure with Reason when there is one, else the general help.
-spec format_error(term()) -> string().
format_error(Reason) ->
    case get({?MODULE, detail, Reason}) of
        Detail when is_list(Detail), Detail =/= "" -> Detail;
        _ -> help(Reason)
    end.

help(enoent) -> "no such segment: start its owner (tallyd -s NAME) or check the name (TALLY_SEGMENT)";
help(eacces) -> "the segment belongs to another user: run as that user, or give tallyd group_readable and the group";
help(version_mismatch) -> "the segment was made by a libtally of another ABI version: restart tallyd with the installed version";
help(owner_dead) -> "the segment's owner is not running: start tallyd (--replace over a dead owner's segment)";
help(not_ready) -> "the segment did not become ready within 1 s: its owner is starting or stuck; try again";
help(corrupt) -> "the segment is corrupt: restart tallyd with --replace";
help(bad_name) -> "invalid name: segments are 1-200 of [A-Za-z0-9._-]; subjects are NATS subjects without wildcards";
help(full) -> "a table of the segment is full: raise subject_capacity or producer_slots in tallyd.ini and restart it";
help(replaced) -> "the segment was re-created by a new owner: tally:open/1 it again";
help(stale) -> "the owner has not published for 10 publish intervals: check that tallyd runs";
help(closed) -> "the segment was closed with tally:close/1: open it again";
help(no_data) -> "nothing published for this subject yet (no sample, no consumer)";
help(not_ack_reply) -> "not a JetStream ack reply subject ($JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>."
                           "<timestamp>.<pending>, or with a domain and an account hash): pass the reply "
                           "subject of a message delivered by a JetStream consumer";
help(no_slot) -> "every producer slot of the segment is taken: raise producer_slots to at least "
                     "tally:slots_needed() per VM (plus other producers) and restart tallyd";
help(Reason) -> lists:flatten(io_lib:format("tally error ~p", [Reason])).
