%% @doc Top supervisor of pyport (one_for_one). Its only child is
%% {@link pyport_server}, which never dies from a port crash itself: it restarts
%% the port. This supervisor only restarts the server after a bug in it.
-module(pyport_sup).
-behaviour(supervisor).

-export([start_link/0, init/1, restart_ports/0]).

-define(READY_TIMEOUT_MS, 60000).

%% @doc Starts the supervisor, registered as `pyport_sup'.
-spec start_link() -> supervisor:startlink_ret().
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @doc Restarts every port program with the current app env (see {@link py:restart/0}): the
%% interpreter is resolved again, then each port server replaces its port, then this waits
%% until they are ready. The one place that knows which servers own ports.
-spec restart_ports() -> ok | {error, term()}.
restart_ports() ->
    case whereis(pyport_server) of
        undefined ->
            {error, {pyport_unavailable, not_started}};
        _ ->
            case pyport_python:resolve() of
                ok ->
                    Timeout = case application:get_env(pyport, start_timeout_ms) of
                                  {ok, T} when is_integer(T), T > 0 -> T;
                                  _ -> ?READY_TIMEOUT_MS
                              end,
                    Gen = pyport_server:restart_port(),
                    pyport_server:wait_ready(Gen, Timeout);
                {error, _} = E ->
                    E
            end
    end.

%% @doc Supervisor callback.
-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    %% Functions registered for Python's callbacks outlive restarts of the server.
    ok = pyport_callbacks:new_table(),
    Flags = #{strategy => one_for_one, intensity => 5, period => 10},
    Server = #{id => pyport_server,
               start => {pyport_server, start_link, []},
               restart => permanent,
               shutdown => 5000,
               type => worker,
               modules => [pyport_server]},
    {ok, {Flags, [Server]}}.
