%% @doc Top supervisor of pyport (one_for_one). Its only child is
%% {@link pyport_server}, which never dies from a port crash itself: it restarts
%% the port. This supervisor only restarts the server after a bug in it.
-module(pyport_sup).
-behaviour(supervisor).

-export([start_link/0, init/1]).

%% @doc Starts the supervisor, registered as `pyport_sup'.
-spec start_link() -> supervisor:startlink_ret().
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

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
