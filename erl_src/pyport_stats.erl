%% @private
%% @doc {@link py:stats/0}: each port's figures (its server's and its program's),
%% gathered from every port of the pool at once, and their sums.
%%
%% With one port the map is that port's, as it always was, plus `ports => [Map]'.
%% With several, every count is the sum over the ports; `port' is `up' and `ready'
%% `true' only when they are for every port; `os_pid', `generation' and `last_exit'
%% are the first answering port's; figures of the pool as a whole (the dicts, the VM's read
%% cache, the settings) are taken once. `ports' holds one map per port.
-module(pyport_stats).

-export([stats/1]).

-define(T2B_OPTS, [{minor_version, 2}]).

%% Figures that belong to the whole pool (the same in every port's answer).
-define(POOL_WIDE, [dicts, dict_keys, dict_bytes, config, worker_reads,
                    cache_hits, cache_misses, cache_entries, cache_bytes,
                    memory_used, memory_limit, max_dicts, lock_recoveries]).
%% Figures that name one port: the first port's at the top, each port's in `ports'.
-define(OF_FIRST, [os_pid, generation, last_exit]).
%% What each port's map in `ports' holds.
-define(PER_PORT, [index, os_pid, generation, port, ready, pending, workers, busy_workers,
                   queued, namespaces, async_tasks, python_threads, restarts, last_exit]).

%% @doc The pool's figures (see the module doc); `{error, Reason}' when no port answers.
-spec stats(timeout()) -> {ok, map()} | {error, py:error_reason()}.
stats(Timeout) ->
    Servers = pyport_pool:servers(),
    Results = gather(Servers, Timeout),
    case Results of
        [] -> {error, {pyport_unavailable, not_started}};
        [{ok, S}] -> {ok, S#{ports => [per_port(S)]}};
        [{error, _, _} = Error] -> error_of(Error);
        _ -> combine(Results)
    end.

-spec error_of(port_result()) -> {error, term()}.
error_of({error, Reason, _Local}) -> {error, Reason}.

%% Every server's stats, asked at once (a slow port costs the timeout once).
-spec gather([atom()], timeout()) -> [port_result()].
gather([Server], Timeout) ->
    [port_stats(Server, Timeout)];
gather(Servers, Timeout) ->
    Self = self(),
    Tagged = [{I, spawn_monitor(fun() -> Self ! {self(), port_stats(S, Timeout)} end)}
              || {I, S} <- lists:enumerate(Servers)],
    [collect(Pid, MRef) || {_I, {Pid, MRef}} <- Tagged].

-spec collect(pid(), reference()) -> port_result().
collect(Pid, MRef) ->
    receive
        {Pid, Result} ->
            erlang:demonitor(MRef, [flush]),
            Result;
        {'DOWN', MRef, process, Pid, Reason} ->
            {error, {pyport_stats_failed, Reason}, #{}}
    end.

%% One port's stats: its server's own figures and its program's; when the program
%% does not answer, why, with what the server knows (`#{}' if it did not answer either).
-type port_result() :: {ok, map()} | {error, term(), map()}.

-spec port_stats(atom(), timeout()) -> port_result().
port_stats(Server, Timeout) ->
    try gen_server:call(Server, stats, Timeout) of
        Local when is_map(Local) ->
            Id = pyport_request:new_id(),
            Frame = term_to_binary({stats, Id}, ?T2B_OPTS),
            case pyport_request:decoded(pyport_request:request(Server, Id, Frame, Timeout)) of
                {ok, Port} when is_map(Port) ->
                    %% SharedDict numbers come from both: decoding from the port,
                    %% the read cache from the VM.
                    SD = maps:merge(maps:get(shared_dict, Port, #{}),
                                    maps:get(shared_dict, Local, #{})),
                    %% Settings too: the port's own and those the VM side applies.
                    Config = maps:merge(maps:get(config, Port, #{}),
                                        maps:get(config, Local, #{})),
                    {ok, (maps:merge(Port, Local))#{shared_dict => SD, config => Config}};
                {ok, Other} -> {error, {pyport_bad_reply, Other}, Local};
                {error, Reason} -> {error, Reason, Local}
            end
    catch
        exit:{timeout, _} -> {error, timeout, #{}};
        exit:{noproc, _} -> {error, {pyport_unavailable, not_started}, #{}};
        exit:{Reason, _} -> {error, {pyport_unavailable, {server_exit, Reason}}, #{}}
    end.

%% The sums over several ports (a port whose program did not answer adds what its
%% server knows); `{error, Reason}' of the first port if none answered.
-spec combine([port_result()]) -> {ok, map()} | {error, term()}.
combine(Results) ->
    Indexed = lists:enumerate(Results),
    case [S || {ok, S} <- Results] of
        [] -> error_of(hd(Results));
        [First | _] = Answered -> {ok, combine(Indexed, First, Answered)}
    end.

-spec combine([{pos_integer(), port_result()}], map(), [map()]) -> map().
combine(Indexed, First, Answered) ->
    Maps = [S || {_, {ok, S}} <- Indexed] ++ [L || {_, {error, _, L}} <- Indexed],
    Summed = lists:foldl(fun(S, Acc) -> add(maps:without(?POOL_WIDE ++ ?OF_FIRST, S), Acc) end,
                         #{}, Maps),
    SD = lists:foldl(fun(S, Acc) ->
                             add(maps:without(?POOL_WIDE, maps:get(shared_dict, S, #{})), Acc)
                     end, maps:with(?POOL_WIDE, maps:get(shared_dict, First, #{})), Maps),
    Ports = [case R of
                 {ok, S} -> per_port(S#{index => I});
                 {error, Reason, L} -> (per_port(L#{index => I}))#{error => Reason}
             end || {I, R} <- Indexed],
    AllAnswered = length(Answered) =:= length(Indexed),
    maps:merge(maps:merge(Summed, maps:with(?POOL_WIDE ++ ?OF_FIRST, First)),
               #{shared_dict => SD,
                 port => up_if(AllAnswered andalso lists:all(fun(S) -> maps:get(port, S, down) =:= up end, Maps)),
                 ready => AllAnswered andalso lists:all(fun(S) -> maps:get(ready, S, false) =:= true end, Maps),
                 ports => Ports}).

-spec up_if(boolean()) -> up | down.
up_if(true) -> up;
up_if(false) -> down.

%% Adds the figures of `S' to `Acc': numbers are summed, lists (per worker thread)
%% appended; anything else is kept from the first port that has it.
-spec add(map(), map()) -> map().
add(S, Acc) ->
    maps:fold(fun(K, V, A) ->
                      case {V, A} of
                          {_, #{K := Old}} when is_integer(V), is_integer(Old) -> A#{K := Old + V};
                          {_, #{K := Old}} when is_list(V), is_list(Old) -> A#{K := Old ++ V};
                          {_, #{K := _}} -> A;
                          _ -> A#{K => V}
                      end
              end, Acc, S).

-spec per_port(map()) -> map().
per_port(S) ->
    maps:with(?PER_PORT, maps:merge(#{index => 1}, S)).
