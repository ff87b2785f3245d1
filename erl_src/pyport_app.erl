%% @doc The pyport application: starts {@link pyport_sup}, which starts
%% {@link pyport_server}, the process that owns the port program.
-module(pyport_app).
-behaviour(application).

-export([start/2, stop/1]).

%% @doc Application callback: checks the Python named by the app env `python' (see
%% {@link pyport_python}) and starts the top supervisor.
-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_StartType, _StartArgs) ->
    %% A wrong app env `python' fails the start here, with a reason that says why.
    case pyport_python:resolve() of
        ok ->
            case pyport_sup:start_link() of
                {ok, Sup} -> wait_ready(Sup, application:get_env(pyport, start_timeout_ms));
                Other -> Other
            end;
        {error, _} = E ->
            E
    end.

%% Fail-fast mode (app env start_timeout_ms set): the start succeeds only once a port is
%% ready (Python initialised, start-up code finished); otherwise the supervision tree is
%% stopped and the start fails with `{pyport_not_ready, #{timeout_ms, last_exit}}'.
%% Without the setting the start returns at once and the port comes up in the background.
-spec wait_ready(pid(), undefined | {ok, term()}) -> {ok, pid()} | {error, term()}.
wait_ready(Sup, {ok, T}) when is_integer(T), T > 0 ->
    poll_ready(Sup, T, erlang:monotonic_time(millisecond) + T);
wait_ready(Sup, _) ->
    {ok, Sup}.

-spec poll_ready(pid(), pos_integer(), integer()) -> {ok, pid()} | {error, term()}.
poll_ready(Sup, T, Deadline) ->
    Stats = try gen_server:call(pyport_server, stats, max(1, Deadline - now_ms()))
            catch exit:_ -> #{}
            end,
    case Stats of
        #{ready := true} ->
            {ok, Sup};
        _ ->
            case now_ms() >= Deadline of
                true ->
                    stop_tree(Sup),
                    {error, {pyport_not_ready, #{timeout_ms => T,
                                                 last_exit => maps:get(last_exit, Stats, unknown)}}};
                false ->
                    %% The port announces readiness by a frame the server handles; a short
                    %% poll keeps this module independent of the server's internals.
                    receive after 20 -> ok end,
                    poll_ready(Sup, T, Deadline)
            end
    end.

-spec stop_tree(pid()) -> ok.
stop_tree(Sup) ->
    unlink(Sup),
    Ref = monitor(process, Sup),
    exit(Sup, shutdown),
    receive {'DOWN', Ref, process, Sup, _} -> ok end.

-spec now_ms() -> integer().
now_ms() ->
    erlang:monotonic_time(millisecond).

%% @doc Application callback: nothing to clean up (the server closes the port).
-spec stop(term()) -> ok.
stop(_State) ->
    ok.
