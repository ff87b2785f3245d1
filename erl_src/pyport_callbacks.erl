%% @doc Python talking back: the functions Python may call (`erlang.call'), the
%% processes that run them, and the delivery of `erlang.send' messages.
%%
%% Registered functions live in a public ETS table owned by the supervisor,
%% so they survive restarts of the server and of the port. Names are binaries:
%% a name coming from Python never becomes an atom.
%%
%% Each callback runs in a process of its own, never in the server. It knows
%% its callback id (process dictionary `$pyport_chain'), and requests it makes
%% carry that id (see `pyport_request:chained/1'): the port runs them on the Python thread that waits
%% for this callback, so Python → Erlang → Python chains need no extra threads.
%% The process answers the port directly; the server only kills it when Python
%% stops waiting.
%%
%% Messages from `erlang.send' and the items of streams are delivered by
%% `pyport_sender'.
-module(pyport_callbacks).

-export([new_table/0, register/2, unregister/1, lookup/1, names/0, start/5, chain/0, chain_server/0,
         owner/0]).
-export([started/6, cancelled/2, ended/2, kill_all/1]).

-define(TABLE, pyport_functions).
-define(CHAIN_KEY, '$pyport_chain').
-define(OWNER_KEY, '$pyport_owner').
-define(SERVER_KEY, '$pyport_server').
-define(T2B_OPTS, [{minor_version, 2}]).

-type function_spec() :: fun((list()) -> term()) | {module(), atom()}.
-export_type([function_spec/0, running/0]).

-type running() :: #{non_neg_integer() => {pid(), reference()}}.
%% The callbacks of the port that run in processes of their own, by callback id:
%% the process and the server's monitor of it. Kept by `pyport_server'.

%% @doc Creates the registry table, owned by the calling process (the supervisor).
-spec new_table() -> ok.
new_table() ->
    case ets:whereis(?TABLE) of
        undefined ->
            _ = ets:new(?TABLE, [named_table, public, set, {read_concurrency, true}]),
            ok;
        _ ->
            ok
    end.

%% @doc Registers (or replaces) the function Python calls as `Name'. The port
%% knows the name before this returns: `hasattr(erlang, Name)' is true from then on.
-spec register(binary(), function_spec()) -> ok.
register(Name, Spec) ->
    true = ets:insert(?TABLE, {Name, Spec}),
    pyport_server:functions_changed().

%% @doc Removes `Name'; `ok' also when it was not registered. The port knows before
%% this returns: `hasattr(erlang, Name)' is false from then on.
-spec unregister(binary()) -> ok.
unregister(Name) ->
    true = ets:delete(?TABLE, Name),
    pyport_server:functions_changed().

%% @doc The names of the registered functions.
-spec names() -> [binary()].
names() ->
    try ets:select(?TABLE, [{{'$1', '_'}, [], ['$1']}])
    catch error:badarg -> []
    end.

%% @doc The function registered as `Name'.
-spec lookup(binary()) -> {ok, function_spec()} | error.
lookup(Name) ->
    try ets:lookup(?TABLE, Name) of
        [{_, Spec}] -> {ok, Spec};
        [] -> error
    catch
        error:badarg -> error
    end.

%% @doc The callback id the calling process runs for, if it is a callback process.
-spec chain() -> non_neg_integer() | undefined.
chain() ->
    get(?CHAIN_KEY).

%% @doc For a callback process: the server of the port whose Python thread waits for
%% the callback, where the process's requests must go (see {@link chain/0}).
-spec chain_server() -> pid() | undefined.
chain_server() ->
    get(?SERVER_KEY).

%% @doc The process whose namespace the calling process's requests use: for a
%% callback process, the process whose call made the callback (so that what it
%% defined with `py:exec' is found); for any other, itself.
-spec owner() -> pid().
owner() ->
    case get(?OWNER_KEY) of
        undefined -> self();
        Pid -> Pid
    end.

%% @doc Starts callback `CbId' of the port `Port', made while Python ran a call
%% of `Caller': `{ok, Pid}' when a process runs it, `answered' when it was
%% answered at once (built-ins, unknown names).
-spec start(non_neg_integer(), binary(), binary(), pid() | undefined, port()) ->
          {ok, pid()} | answered.
start(CbId, <<"$pyport_whereis">>, ArgsBin, _Caller, Port) ->
    Result = case decode(ArgsBin) of
                 {ok, [Name]} when is_binary(Name) -> whereis_binary(Name);
                 _ -> undefined
             end,
    reply(Port, CbId, ok, term_to_binary(Result, ?T2B_OPTS)),
    answered;
start(CbId, <<"$pyport_connected">>, ArgsBin, _Caller, Port) ->
    Result = case decode(ArgsBin) of
                 {ok, [Pid]} when is_pid(Pid) -> lists:member(node(Pid), nodes());
                 _ -> false
             end,
    reply(Port, CbId, ok, term_to_binary(Result, ?T2B_OPTS)),
    answered;
start(CbId, Name, ArgsBin, Caller, Port) ->
    case lookup(Name) of
        {ok, Spec} ->
            %% Called by the port's server: its requests go back there.
            Server = self(),
            {ok, proc_lib:spawn(fun() ->
                                        ok = pyport_telemetry:label({pyport_callback, Name}),
                                        put(?SERVER_KEY, Server),
                                        run(CbId, Spec, ArgsBin, Caller, Port)
                                end)};
        error ->
            reply(Port, CbId, error, term_to_binary({unknown_function, Name}, ?T2B_OPTS)),
            answered
    end.

-spec run(non_neg_integer(), function_spec(), binary(), pid() | undefined, port()) -> ok.
run(CbId, Spec, ArgsBin, Caller, Port) ->
    put(?CHAIN_KEY, CbId),
    is_pid(Caller) andalso put(?OWNER_KEY, Caller),
    {Status, Payload} =
        case decode(ArgsBin) of
            {ok, Args} when is_list(Args) ->
                try call(Spec, Args) of
                    Result -> {ok, term_to_binary(Result, ?T2B_OPTS)}
                catch
                    Class:Reason:Stack -> {error, error_payload(Class, Reason, Stack)}
                end;
            _ ->
                {error, error_payload(error, badarg, [])}
        end,
    reply(Port, CbId, Status, Payload).

-spec call(function_spec(), list()) -> term().
call(Fun, Args) when is_function(Fun, 1) -> Fun(Args);
call({M, F}, Args) -> M:F(Args).

-spec error_payload(atom(), term(), list()) -> binary().
error_payload(Class, Reason, Stack) ->
    Text = fun(T) -> unicode:characters_to_binary(io_lib:format("~tP", [T, 50])) end,
    term_to_binary({atom_to_binary(Class, utf8), Text(Reason), Text(Stack)}, ?T2B_OPTS).

-spec reply(port(), non_neg_integer(), ok | error, binary()) -> ok.
reply(Port, CbId, Status, Payload) ->
    Frame0 = term_to_binary({callback_reply, CbId, Status, Payload}, ?T2B_OPTS),
    %% The port treats a frame over its limit as a corrupt stream and exits: a result
    %% that large is an error for the one callback instead.
    Frame = case byte_size(Frame0) > max_frame() of
                true ->
                    Reason = iolist_to_binary(io_lib:format("reply_too_large: ~b bytes", [byte_size(Frame0)])),
                    term_to_binary({callback_reply, CbId, error,
                                    term_to_binary({<<"error">>, Reason, <<>>}, ?T2B_OPTS)}, ?T2B_OPTS);
                false ->
                    Frame0
            end,
    %% Any process may write to the port; a port that is gone has nobody to tell.
    _ = (catch erlang:port_command(Port, Frame)),
    ok.

-spec max_frame() -> pos_integer().
max_frame() ->
    case application:get_env(pyport, max_frame_bytes) of
        {ok, N} when is_integer(N), N > 0 -> N;
        _ -> 1 bsl 30
    end.

%% Only atoms that exist: a name Python chose never becomes one.
-spec whereis_binary(binary()) -> pid() | port() | undefined.
whereis_binary(Name) ->
    try binary_to_existing_atom(Name, utf8) of
        A -> erlang:whereis(A)
    catch
        error:badarg -> undefined
    end.

-spec decode(binary()) -> {ok, term()} | error.
decode(Bin) ->
    try {ok, pyport_elixir:decode(Bin)}
    catch error:badarg -> error
    end.

%%====================================================================
%% The server's record of running callback processes
%%====================================================================

%% @doc The port asks for callback `CbId': start it (see {@link start/5}) and,
%% when it runs in a process, watch that process.
-spec started(non_neg_integer(), binary(), binary(), term(), port(), running()) -> running().
started(CbId, Name, Args, Caller0, Port, Running) ->
    Caller = case is_pid(Caller0) of
                 true -> Caller0;
                 false -> undefined
             end,
    case start(CbId, Name, Args, Caller, Port) of
        {ok, Pid} -> maps:put(CbId, {Pid, erlang:monitor(process, Pid)}, Running);
        answered -> Running
    end.

%% @doc Python stopped waiting for callback `CbId': its work is of no use to
%% anyone, so its process is killed.
-spec cancelled(non_neg_integer(), running()) -> running().
cancelled(CbId, Running) ->
    case maps:take(CbId, Running) of
        {{Pid, MRef}, Running1} ->
            erlang:demonitor(MRef, [flush]),
            exit(Pid, kill),
            Running1;
        error ->
            Running
    end.

%% @doc The monitor `MRef' fired: if it watched a callback process, that
%% callback ended (it answered the port itself, or died trying).
-spec ended(reference(), running()) -> running().
ended(MRef, Running) ->
    case [Id || {Id, {_, R}} <- maps:to_list(Running), R =:= MRef] of
        [Id] -> maps:remove(Id, Running);
        [] -> Running
    end.

%% @doc The port died: its callbacks' processes are killed.
-spec kill_all(running()) -> ok.
kill_all(Running) ->
    maps:foreach(fun(_Id, {Pid, MRef}) ->
                         erlang:demonitor(MRef, [flush]),
                         exit(Pid, kill)
                 end, Running).
