%% @private
%% @doc The pool of ports: how many port programs run (app env `ports'), which
%% server serves a request, and the tables the pool's servers share.
%%
%% Each port has a `pyport_server' of its own (the first registered as
%% `pyport_server', the others as `pyport_server_N'). A request goes to
%% <ul>
%% <li>the port of the callback that made it, for a process that runs an Erlang
%% callback (its request runs on the Python thread that waits for the callback);</li>
%% <li>the calling process's home port, once it has one: a process that makes a
%% request that uses its Python namespace (`exec', `eval', a call of `__main__')
%% gets a home, the port with the fewest requests in flight, for as long as it
%% lives or that port lives;</li>
%% <li>else the port with the fewest requests in flight.</li>
%% </ul>
%% The choice is made in the calling process, from an ETS table of homes and an
%% `atomics' array of each port's requests in flight (which the servers keep).
-module(pyport_pool).

-export([check_config/0, init/0, size/0, indexes/0, server_name/1, servers/0, choose/1,
         in_flight/2, home_gone/2, home_index/1, homes_of_port_gone/1, new_generation/1, generation/1]).
-export([stream_started/2, stream_server/1, streams_gone/1]).

-define(HOMES, pyport_homes).
%% stream ref => the server of the port that runs it (for acks and cancels)
-define(STREAMS, pyport_streams).
-define(KEY, {?MODULE, pool}).
%% Port generations: slot 1 counts them for the whole VM (never reused, across
%% restarts of the application), slot 1 + I is port I's current one.
-define(GEN_KEY, {?MODULE, generations}).

%% @doc `ok' if the app env `ports' is a non-negative integer or `auto', else
%% `{error, {bad_config, {ports, Value}}}' (the application does not start).
-spec check_config() -> ok | {error, {bad_config, {ports, term()}}}.
check_config() ->
    case application:get_env(pyport, ports, 1) of
        auto -> ok;
        N when is_integer(N), N >= 0 -> ok;
        Other -> {error, {bad_config, {ports, Other}}}
    end.

%% @doc The number of ports in the pool: the app env `ports', a non-negative
%% integer, or `auto' for one per scheduler online (as the supervisor read it at
%% its start; a value {@link check_config/0} refuses counts as 1).
-spec size() -> non_neg_integer().
size() ->
    case persistent_term:get(?KEY, undefined) of
        undefined -> configured();
        {N, _} -> N
    end.

-spec configured() -> non_neg_integer().
configured() ->
    case application:get_env(pyport, ports, 1) of
        auto -> erlang:system_info(schedulers_online);
        N when is_integer(N), N >= 0 -> N;
        _ -> 1
    end.

%% @doc Creates the pool's tables for `ports' ports (by the supervisor, which owns
%% them). Returns the number of ports.
-spec init() -> non_neg_integer().
init() ->
    N = configured(),
    ok = new_table(?HOMES),
    ok = new_table(?STREAMS),
    ok = pyport_sd_cache:new(),
    persistent_term:put(?KEY, {N, atomics:new(max(1, N), [{signed, true}])}),
    Gens = atomics:new(1 + max(1, N), [{signed, false}]),
    case persistent_term:get(?GEN_KEY, undefined) of
        undefined -> ok;
        Old -> atomics:put(Gens, 1, atomics:get(Old, 1))
    end,
    persistent_term:put(?GEN_KEY, Gens),
    N.

-spec new_table(atom()) -> ok.
new_table(Name) ->
    _ = case ets:whereis(Name) of
            undefined -> ets:new(Name, [named_table, public, set, {read_concurrency, true},
                                        {write_concurrency, true}]);
            _ -> ets:delete_all_objects(Name)
        end,
    ok.

%% @doc A generation for port `I''s next port program (never used before in this VM).
-spec new_generation(pos_integer()) -> pos_integer().
new_generation(I) ->
    Gens = persistent_term:get(?GEN_KEY),
    Gen = atomics:add_get(Gens, 1, 1),
    catch atomics:put(Gens, 1 + I, Gen),
    Gen.

%% @doc Port `I''s current generation; `undefined' if no port has run in this VM.
-spec generation(pos_integer()) -> non_neg_integer() | undefined.
generation(I) ->
    case persistent_term:get(?GEN_KEY, undefined) of
        undefined -> undefined;
        Gens -> try atomics:get(Gens, 1 + I) catch error:badarg -> undefined end
    end.

%% @doc The ports' indexes, 1 to N.
-spec indexes() -> [pos_integer()].
indexes() ->
    lists:seq(1, size()).

%% @doc The registered name of port `I''s server.
-spec server_name(pos_integer()) -> atom().
server_name(1) -> pyport_server;
server_name(I) -> list_to_atom("pyport_server_" ++ integer_to_list(I)).

%% @doc Every port's server name.
-spec servers() -> [atom()].
servers() ->
    [server_name(I) || I <- indexes()].

%% @doc The server for a request of the calling process (see the module doc).
%% `UsesNamespace': the request uses the caller's Python namespace, so that a
%% process without a home gets one.
-spec choose(boolean()) -> atom() | pid().
choose(UsesNamespace) ->
    case size() of
        N when N =< 1 -> pyport_server;
        _ ->
            case pyport_callbacks:chain_server() of
                undefined -> server_name(home(pyport_callbacks:owner(), UsesNamespace));
                Server -> Server
            end
    end.

-spec home(pid(), boolean()) -> pos_integer().
home(Owner, UsesNamespace) ->
    case ets:lookup(?HOMES, Owner) of
        [{_, I}] ->
            I;
        [] when UsesNamespace ->
            I = least_loaded(),
            %% Two requests of one process racing: the first home stays.
            case ets:insert_new(?HOMES, {Owner, I}) of
                true -> I;
                false -> home(Owner, UsesNamespace)
            end;
        [] ->
            least_loaded()
    end.

%% The port with the fewest requests in flight (the lowest index among equals, so
%% that a quiet pool fills from its first port).
-spec least_loaded() -> pos_integer().
least_loaded() ->
    {_, Counts} = persistent_term:get(?KEY),
    least(Counts, 2, size(), 1, atomics:get(Counts, 1)).

least(_Counts, I, N, Best, _BestLoad) when I > N ->
    Best;
least(Counts, I, N, Best, BestLoad) ->
    case atomics:get(Counts, I) of
        Load when Load < BestLoad -> least(Counts, I + 1, N, I, Load);
        _ -> least(Counts, I + 1, N, Best, BestLoad)
    end.

%% @doc Port `I' has `N' requests in flight (kept by its server).
-spec in_flight(pos_integer(), non_neg_integer()) -> ok.
in_flight(I, N) ->
    case persistent_term:get(?KEY, undefined) of
        {Size, Counts} when I =< Size -> atomics:put(Counts, I, N);
        _ -> ok
    end.

%% @doc The index of the home port of process `Pid'; `undefined' if it has none.
-spec home_index(pid()) -> pos_integer() | undefined.
home_index(Pid) ->
    lookup(?HOMES, Pid).

%% @doc The process `Owner' is gone: its home at port `I' with it.
-spec home_gone(pid(), pos_integer()) -> ok.
home_gone(Owner, I) ->
    _ = (catch ets:delete_object(?HOMES, {Owner, I})),
    ok.

%% @doc Port `I' died: the namespaces homed there died with it, and so do their
%% homes (those processes get a new one at their next request).
-spec homes_of_port_gone(pos_integer()) -> ok.
homes_of_port_gone(I) ->
    _ = (catch ets:match_delete(?HOMES, {'_', I})),
    ok.

%% @doc Stream `Ref' runs in the port of `Server' (told by that server when it takes
%% the stream's start, so that acknowledgements and cancels find it).
-spec stream_started(reference(), atom() | pid()) -> ok.
stream_started(Ref, Server) ->
    _ = (catch ets:insert(?STREAMS, {Ref, Server})),
    ok.

%% @doc The server of the port that runs stream `Ref'; `undefined' once it ended.
-spec stream_server(reference()) -> atom() | pid() | undefined.
stream_server(Ref) ->
    lookup(?STREAMS, Ref).

%% The value under `Key' in one of the pool's tables; `undefined' when there is none
%% (or no table: the application is not running).
-spec lookup(atom(), term()) -> term() | undefined.
lookup(Table, Key) ->
    try ets:lookup(Table, Key) of
        [{_, Value}] -> Value;
        [] -> undefined
    catch error:badarg -> undefined
    end.

%% @doc Streams `Refs' ended.
-spec streams_gone([reference()]) -> ok.
streams_gone(Refs) ->
    lists:foreach(fun(Ref) -> catch ets:delete(?STREAMS, Ref) end, Refs).
