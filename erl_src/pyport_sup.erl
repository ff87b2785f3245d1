%% @doc Top supervisor of pyport (one_for_one). Its children are the watcher of the
%% SharedDicts' owners ({@link pyport_sd_owners}) and the servers of the pool's ports ({@link pyport_server}, one per port, app env `ports'), each of which
%% never dies from a port crash itself: it restarts its port. This supervisor only
%% restarts a server after a bug in it. It owns the pool's tables (see
%% {@link pyport_pool}).
-module(pyport_sup).
-behaviour(supervisor).

-export([start_link/0, init/1, restart_ports/0, wait_all/3]).

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
    case whereis(?MODULE) of
        undefined ->
            {error, {pyport_unavailable, not_started}};
        _ ->
            case pyport_python:resolve() of
                ok ->
                    Timeout = case application:get_env(pyport, start_timeout_ms) of
                                  {ok, T} when is_integer(T), T > 0 -> T;
                                  _ -> ?READY_TIMEOUT_MS
                              end,
                    %% Every port is replaced before any is waited for: they start together.
                    Gens = [{S, pyport_server:restart_port(S)} || S <- pyport_pool:servers()],
                    wait_all(Gens, Timeout, erlang:monotonic_time(millisecond) + Timeout);
                {error, _} = E ->
                    E
            end
    end.

%% @doc Waits until every port of the pool is ready, each of generation `Gen' or later
%% (`[{Server, Gen}]'), until the monotonic time `Deadline' (ms), `Timeout' ms in all:
%% `ok' or the first port's `{error, {pyport_not_ready, ...}}'.
-spec wait_all([{atom(), non_neg_integer()}], pos_integer(), integer()) -> ok | {error, term()}.
wait_all([], _Timeout, _Deadline) ->
    ok;
wait_all([{Server, Gen} | Rest], Timeout, Deadline) ->
    case pyport_server:wait_ready(Server, Gen, Timeout, Deadline) of
        ok -> wait_all(Rest, Timeout, Deadline);
        {error, _} = E -> E
    end.

%% @doc Supervisor callback.
-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    %% Functions registered for Python's callbacks outlive restarts of the servers.
    ok = pyport_callbacks:new_table(),
    N = pyport_pool:init(),
    ok = pyport_telemetry:init(N),
    ok = pyport_elixir:configure(),
    %% The pool's ports are independent: one crash restarts one server. The
    %% intensity grows with the pool so that a bug hitting every server once is
    %% survived as it is with one.
    Flags = #{strategy => one_for_one, intensity => 5 * max(1, N), period => 10},
    %% The owners' watcher first: servers tell it of new owners.
    Owners = #{id => pyport_sd_owners,
               start => {pyport_sd_owners, start_link, []},
               restart => permanent,
               shutdown => 5000,
               type => worker,
               modules => [pyport_sd_owners]},
    {ok, {Flags, [Owners | [server_spec(I) || I <- lists:seq(1, N)]]}}.

-spec server_spec(pos_integer()) -> supervisor:child_spec().
server_spec(I) ->
    #{id => pyport_pool:server_name(I),
      start => {pyport_server, start_link, [I]},
      restart => permanent,
      shutdown => 5000,
      type => worker,
      modules => [pyport_server]}.
