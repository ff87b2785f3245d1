%% @private
%% @doc Results that come in several pieces, collected into one: a stream's items
%% into a list (`py:stream/3,4', `py:stream_eval/1,2'), and several asynchronous
%% calls into a list of their values (`py:async_gather/1,2').
%%
%% A stream is collected by a process of its own, its owner: if the collection
%% gives up (an item does not come in time), the stream is cancelled and whatever
%% was still on its way dies with that process instead of reaching the caller's
%% mailbox. The stream itself is started by the caller, so that its function is
%% found in the caller's namespace.
-module(pyport_collect).

-export([stream/6, gather/2]).
-export([collector/2]).

-type call() :: {py:name(), py:name(), list()} | {py:name(), py:name(), list(), py:kwargs()}.
-export_type([call/0]).

%% @doc Starts `Module.Function(*Args, **Kwargs)' as a stream and returns all its
%% items, or the error that ended it. `ItemTimeout' bounds the wait for each item
%% (and for the start); `Prepare' runs in the caller first (binding Locals).
-spec stream(py:name(), py:name(), list(), py:kwargs(), timeout(), fun(() -> ok | {error, term()})) ->
          {ok, list()} | {error, term()}.
stream(Module, Function, Args, Kwargs, ItemTimeout, Prepare) ->
    Caller = self(),
    {Collector, MRef} = spawn_monitor(?MODULE, collector, [Caller, ItemTimeout]),
    Result = case Prepare() of
                 ok ->
                     case py:stream_start(Module, Function, Args, Kwargs, #{owner => Collector}) of
                         {ok, Ref} ->
                             Collector ! {collect, Ref},
                             receive
                                 {'DOWN', MRef, process, Collector, {collected, R}} -> R;
                                 {'DOWN', MRef, process, Collector, Other} -> {error, {collector_exit, Other}}
                             end;
                         {error, _} = E ->
                             E
                     end;
                 {error, _} = E ->
                     E
             end,
    exit(Collector, kill),
    receive {'DOWN', MRef, process, Collector, _} -> ok after 0 -> erlang:demonitor(MRef, [flush]) end,
    Result.

%% @private The collecting process: it exits with `{collected, Result}'.
-spec collector(pid(), timeout()) -> no_return().
collector(Caller, ItemTimeout) ->
    ok = pyport_telemetry:label({pyport_stream_collector, Caller}),
    CMRef = erlang:monitor(process, Caller),
    receive
        {collect, Ref} -> exit({collected, collect(Ref, ItemTimeout, CMRef, [])});
        {'DOWN', CMRef, process, Caller, _} -> exit(normal)
    end.

-spec collect(reference(), timeout(), reference(), list()) -> {ok, list()} | {error, term()}.
collect(Ref, ItemTimeout, CMRef, Acc) ->
    receive
        {py_stream, Ref, {data, V}} -> collect(Ref, ItemTimeout, CMRef, [V | Acc]);
        {py_stream, Ref, done} -> {ok, lists:reverse(Acc)};
        {py_stream, Ref, {error, Reason}} -> {error, Reason};
        {'DOWN', CMRef, process, _, _} -> ok = py:stream_cancel(Ref), {error, caller_down}
    after ItemTimeout ->
            ok = py:stream_cancel(Ref),
            {error, timeout}
    end.

%% @doc Starts every call at once (as `py:spawn_call' does) and awaits them all
%% within `Timeout' in all: `{ok, Values}' in the order of `Calls', or
%% `{error, {gather_failed, [{Index, Reason}]}}' naming each call that failed
%% (1-based; a call not answered in time fails with `timeout').
-spec gather([call()], timeout()) -> {ok, list()} | {error, {gather_failed, [{pos_integer(), term()}]}}.
gather(Calls, Timeout) ->
    %% Every call checked before any starts: none is left running for a bad neighbour.
    lists:foreach(fun check/1, Calls),
    Refs = [start(C) || C <- Calls],
    Deadline = case Timeout of
                   infinity -> infinity;
                   _ -> erlang:monotonic_time(millisecond) + Timeout
               end,
    Results = [py:await(R, left(Deadline)) || R <- Refs],
    case [{I, Reason} || {I, {error, Reason}} <- lists:zip(lists:seq(1, length(Results)), Results)] of
        [] -> {ok, [V || {ok, V} <- Results]};
        Failed -> {error, {gather_failed, Failed}}
    end.

-spec check(term()) -> ok.
check({M, F, A}) -> check({M, F, A, #{}});
check({M, F, A, Kw}) ->
    _ = pyport_args:name(M),
    _ = pyport_args:name(F),
    (pyport_args:is_proper_list(A) andalso (is_map(Kw) orelse is_list(Kw))) orelse erlang:error(badarg),
    _ = pyport_args:kwargs(Kw),
    ok;
check(_) -> erlang:error(badarg).

-spec start(call()) -> py:async_ref().
start({M, F, A}) -> py:spawn_call(M, F, A);
start({M, F, A, Kw}) -> py:spawn_call(M, F, A, Kw).

-spec left(integer() | infinity) -> timeout().
left(infinity) -> infinity;
left(Deadline) -> max(0, Deadline - erlang:monotonic_time(millisecond)).
