%% @doc A stand-in for the `telemetry' library (which cannot be fetched here), with its
%% API and the cost structure of its `execute/3': handlers in an ETS table keyed by event
%% name, looked up by the emitting process and called there; a handler that raises is
%% detached. Loaded by the tests (Common Test and ExUnit) into the VM, never shipped.
-module(telemetry).

-export([attach/4, attach_many/4, detach/1, execute/3, span/3, list_handlers/1]).

-define(TABLE, telemetry_handler_table).

attach(Id, Event, Fun, Config) ->
    attach_many(Id, [Event], Fun, Config).

attach_many(Id, Events, Fun, Config) when is_function(Fun, 4) ->
    table(),
    case ets:match_object(?TABLE, {'_', Id, '_', '_'}) of
        [] -> ets:insert(?TABLE, [{E, Id, Fun, Config} || E <- Events]), ok;
        _ -> {error, already_exists}
    end.

detach(Id) ->
    table(),
    case ets:match_object(?TABLE, {'_', Id, '_', '_'}) of
        [] -> {error, not_found};
        Objects -> [ets:delete_object(?TABLE, O) || O <- Objects], ok
    end.

list_handlers(Prefix) ->
    table(),
    [#{id => Id, event_name => E, function => F, config => C}
     || {E, Id, F, C} <- ets:tab2list(?TABLE), lists:prefix(Prefix, E)].

execute(Event, Measurements, Metadata) when is_map(Measurements), is_map(Metadata) ->
    Handlers = try ets:lookup(?TABLE, Event) catch error:badarg -> [] end,
    lists:foreach(fun({_, Id, Fun, Config}) ->
                          try Fun(Event, Measurements, Metadata, Config)
                          catch _:_ -> detach(Id)
                          end
                  end, Handlers).

span(Prefix, Meta, Fun) ->
    Start = erlang:monotonic_time(),
    execute(Prefix ++ [start], #{monotonic_time => Start, system_time => erlang:system_time()}, Meta),
    {Result, StopMeta} = Fun(),
    Stop = erlang:monotonic_time(),
    execute(Prefix ++ [stop], #{duration => Stop - Start, monotonic_time => Stop}, StopMeta),
    Result.

%% The table lives in a process of its own, as the real library's does in its application.
table() ->
    case ets:whereis(?TABLE) of
        undefined ->
            Self = self(),
            Owner = spawn(fun() ->
                                  ets:new(?TABLE, [named_table, public, duplicate_bag,
                                                   {read_concurrency, true}]),
                                  Self ! {?MODULE, ready},
                                  receive stop -> ok end
                          end),
            receive {?MODULE, ready} -> ok after 5000 -> exit(Owner, kill), error(no_table) end;
        _ ->
            ok
    end.
