%% @doc The pyport application: starts {@link pyport_sup}, which starts the
%% pool's {@link pyport_server}s, each the owner of one port program.
-module(pyport_app).
-behaviour(application).

-export([start/2, stop/1]).

%% @doc Application callback: checks the app env (`ports', the SharedDicts' shared memory,
%% the Python named by `python', see {@link pyport_python}) and starts the top supervisor.
-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_StartType, _StartArgs) ->
    %% A wrong app env `python' fails the start here, with a reason that says why.
    case check_config() of
        ok ->
            case pyport_sup:start_link() of
                {ok, Sup} -> wait_ready(Sup, application:get_env(pyport, start_timeout_ms));
                Other -> Other
            end;
        {error, _} = E ->
            E
    end.

%% Fail-fast mode (app env start_timeout_ms set): the start succeeds only once every port is
%% ready (Python initialised, start-up code finished); otherwise the supervision tree is
%% stopped and the start fails with `{pyport_not_ready, #{timeout_ms, last_exit}}'.
%% Without the setting the start returns at once and the port comes up in the background.
-spec check_config() -> ok | {error, term()}.
check_config() ->
    lists:foldl(fun(Check, ok) -> Check();
                   (_Check, Error) -> Error
                end, ok, [fun pyport_pool:check_config/0, fun pyport_shm:setup/0,
                          fun pyport_python:resolve/0]).


-spec wait_ready(pid(), undefined | {ok, term()}) -> {ok, pid()} | {error, term()}.
wait_ready(Sup, {ok, T}) when is_integer(T), T > 0 ->
    poll_ready(Sup, T, erlang:monotonic_time(millisecond) + T);
wait_ready(Sup, _) ->
    {ok, Sup}.

-spec poll_ready(pid(), pos_integer(), integer()) -> {ok, pid()} | {error, term()}.
poll_ready(Sup, T, Deadline) ->
    case pyport_sup:wait_all([{S, 0} || S <- pyport_pool:servers()], T, Deadline) of
        ok ->
            {ok, Sup};
        {error, _} = E ->
            stop_tree(Sup),
            E
    end.

-spec stop_tree(pid()) -> ok.
stop_tree(Sup) ->
    unlink(Sup),
    Ref = monitor(process, Sup),
    exit(Sup, shutdown),
    receive {'DOWN', Ref, process, Sup, _} -> ok end.

%% @doc Application callback: the pool's shared-memory file goes (the servers have
%% closed their ports).
-spec stop(term()) -> ok.
stop(_State) ->
    pyport_shm:remove().
