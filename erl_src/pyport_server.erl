%% @doc The process that owns the `priv/pyport' port program.
%%
%% The server is deliberately thin. Callers (through {@link py} and
%% `pyport_request') encode their request frames themselves and decode the
%% result payloads themselves; the
%% server only writes frames to the port, remembers who waits for which request
%% id, routes replies back and watches the processes that own state in the port
%% (their Python namespace and SharedDicts).
%%
%% When the port program dies, every pending caller is answered
%% `{error, {pyport_exit, Status}}', the port generation is bumped (so old
%% SharedDict handles read as destroyed) and a fresh port is started:
%% immediately after a port that was up and ready, with an exponential back-off
%% (capped by the `restart_backoff_max' app env) while it keeps dying before it
%% is ready. While no port runs, requests are answered
%% `{error, {pyport_unavailable, LastExit}}'.
%%
%% The wire protocol is described in `docs/PROTOCOL.md'.
-module(pyport_server).
-behaviour(gen_server).

-include_lib("kernel/include/logger.hrl").

-export([start_link/1, executable/0, functions_changed/0, restart_port/1,
         wait_ready/4]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2,
         code_change/3]).

-define(T2B_OPTS, [{minor_version, 2}]).
%% What a port that is not ready counts as in flight, for the pool's routing.
-define(NOT_READY_LOAD, (1 bsl 32)).

-type request_id() :: pos_integer().
-type exit_info() :: not_started | {exit_status, integer()} | {port_exit, term()}
                   | {spawn_failed, term()} | {startup_failed, term()} | restart.
-type waiter() :: gen_server:from() | startup.
%% A stream's flow control: acknowledged by its owner, or by the sender as the owner's
%% mailbox empties (with the stream's window).
-type stream_flow() :: ack | {mailbox, pos_integer()}.
%% What a SharedDict request does: a read stamped by the read cache's clock, an
%% Erlang-side write of one key, or a new owner of a dict (after sd_new, give_away).
-type sd_effect() :: {read, pos_integer()} | {write, tuple(), binary()} | {owns, pid()}.

-record(state, {
          %% this server's port in the pool (see pyport_pool)
          index = 1 :: pos_integer(),
          port :: port() | undefined,
          %% Port generation: written into SharedDict handles by the port.
          gen :: non_neg_integer(),
          %% request id => who waits for its reply
          pending = #{} :: #{request_id() => waiter()},
          %% SharedDict requests in flight and what their end means for the VM's read
          %% cache (see pyport_sd_cache): kept until the port answers, even if cancelled
          sd_effects = #{} :: #{request_id() => sd_effect()},
          %% monitored pid => {monitor, ids of its pending requests}
          owners = #{} :: #{pid() => {reference(), [request_id()]}},
          restarts = 0 :: non_neg_integer(),
          %% consecutive port exits before a port became ready (crash loop)
          failures = 0 :: non_neg_integer(),
          last_exit = not_started :: exit_info(),
          ready :: map() | undefined,
          %% id of the start-up request while it runs
          startup :: request_id() | undefined,
          os_pid :: non_neg_integer() | undefined,
          %% true when the port program is its own process-group leader
          group_leader = false :: boolean(),
          restart_timer :: reference() | undefined,
          %% most requests in the port at once (app env max_in_flight)
          max_in_flight = 10000 :: pos_integer(),
          %% requests held while start-up code runs, oldest first
          held = queue:new() :: queue:queue({request_id(), binary()}),
          startup_timer :: reference() | undefined,
          %% liveness: when the last frame came (monotonic ms), the last check,
          %% consecutive checks that found the port silent
          last_rx = 0 :: integer(),
          last_check = 0 :: integer(),
          silent_checks = 0 :: non_neg_integer(),
          heartbeat_seq = 0 :: non_neg_integer(),
          %% bound on the SharedDict read cache (app env shared_dict_cache_bytes)
          cache_max = 0 :: non_neg_integer(),
          %% callbacks running in processes of their own: id => {pid, monitor}
          callbacks = #{} :: pyport_callbacks:running(),
          %% delivers erlang.send messages (decoding them outside this process)
          sender :: pid() | undefined,
          %% streams the port runs: ref => {owner, flow}; owners are told if the port dies
          streams = #{} :: #{reference() => {pid(), stream_flow()}},
          %% traced requests (the benchmark's latency breakdown): id => {when
          %% the request was received, when port_command returned}; nanoseconds
          %% of erlang:monotonic_time
          traces = #{} :: #{request_id() => {integer(), integer()}},
          %% when the frame being handled arrived (set only while traces is non-empty)
          rx_at = 0 :: integer()
         }).
-type state() :: #state{}.

%%====================================================================
%% API
%%====================================================================

%% @doc Starts the server of port `Index' of the pool (registered as
%% {@link pyport_pool:server_name/1} says) and its port program.
-spec start_link(pos_integer()) -> {ok, pid()} | ignore | {error, term()}.
start_link(Index) ->
    gen_server:start_link({local, pyport_pool:server_name(Index)}, ?MODULE, [Index], []).

%% @doc Replaces the port program of server `Server' now, as a crash would (callers in
%% flight get `{error, {pyport_exit, restart}}'), with the command line and environment
%% of the current app env; returns the generation of the new port (see {@link py:restart/0}).
-spec restart_port(atom()) -> non_neg_integer().
restart_port(Server) ->
    gen_server:call(Server, restart_port, infinity).

%% @doc Waits until server `Server''s port, of generation `Gen' or later, is ready
%% (Python up, start-up code finished), until the monotonic time `Deadline' (ms): `ok',
%% or `{error, {pyport_not_ready, #{timeout_ms => Timeout, last_exit}}}'. `Timeout' is
%% the whole wait's, for the error.
-spec wait_ready(atom(), non_neg_integer(), pos_integer(), integer()) -> ok | {error, term()}.
wait_ready(Server, Gen, Timeout, Deadline) ->
    poll_ready(Server, Gen, Timeout, Deadline).

-spec poll_ready(atom(), non_neg_integer(), pos_integer(), integer()) -> ok | {error, term()}.
poll_ready(Server, Gen, Timeout, Deadline) ->
    Stats = try gen_server:call(Server, stats, max(1, Deadline - now_ms()))
            catch exit:_ -> #{}
            end,
    case Stats of
        #{ready := true, generation := G} when G >= Gen ->
            ok;
        _ ->
            case now_ms() >= Deadline of
                true ->
                    {error, {pyport_not_ready, #{timeout_ms => Timeout,
                                                 last_exit => maps:get(last_exit, Stats, unknown)}}};
                false ->
                    %% Readiness arrives as a frame the server handles; a short poll keeps
                    %% the server free of waiters.
                    receive after 20 -> ok end,
                    poll_ready(Server, Gen, Timeout, Deadline)
            end
    end.

%% @doc The path of the port program (see {@link pyport_program:executable/0}).
-spec executable() -> file:filename().
executable() ->
    pyport_program:executable().

%% @doc The registered functions changed: every port is sent their names before this
%% returns, so that Python sees exactly what is registered (`hasattr(erlang, Name)').
%% `ok' also where no server runs (a port started later gets them at its start).
-spec functions_changed() -> ok.
functions_changed() ->
    lists:foreach(fun(Server) ->
                          try gen_server:call(Server, functions_changed, infinity)
                          catch exit:{noproc, _} -> ok
                          end
                  end, pyport_pool:servers()).

%%====================================================================
%% gen_server callbacks
%%====================================================================

%% @private
%% @doc gen_server callback: starts the first port.
-spec init([pos_integer()]) -> {ok, state()}.
init([Index]) ->
    process_flag(trap_exit, true),
    ok = pyport_telemetry:label({pyport_server, Index}),
    %% A new server never reuses a generation: the previous server's port is gone.
    Gen = pyport_pool:new_generation(Index),
    MaxInFlight = max(1, pyport_program:env_int(max_in_flight, 10000)),
    _ = pyport_frames:port_atoms(),
    State = start_port(#state{index = Index, gen = Gen, max_in_flight = MaxInFlight,
                              cache_max = pyport_sd_cache:max_bytes(),
                              sender = pyport_sender:start_link()}),
    ok = pyport_pool:in_flight(Index, load(State)),
    {ok, schedule_heartbeat(State#state{last_check = now_ms()})}.

%% @private
%% @doc gen_server callback: requests from {@link py} and local stats.
-spec handle_call(term(), gen_server:from(), state()) ->
          {reply, term(), state()} | {noreply, state()}.
handle_call(Msg, From, State) ->
    counted(call(Msg, From, State)).

%% @private
%% @doc gen_server callback: `{cancel, Id}' from a caller that timed out, stream flow.
-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast(Msg, State) ->
    counted(cast(Msg, State)).

%% @private
%% @doc gen_server callback: port data, port exit, owner exit, restart timer.
-spec handle_info(term(), state()) -> {noreply, state()}.
handle_info(Msg, State) ->
    counted(info(Msg, State)).

%% The pool chooses ports by their requests in flight: told after every message.
-spec counted(T) -> T when T :: {reply, term(), state()} | {noreply, state()}.
counted(Result) ->
    State = element(tuple_size(Result), Result),
    ok = pyport_pool:in_flight(State#state.index, load(State)),
    Result.

%% A port that is not up and ready is chosen only when every port is down.
-spec load(state()) -> non_neg_integer().
load(#state{port = Port, ready = Ready, startup = Startup, pending = Pending}) ->
    case Port =/= undefined andalso Ready =/= undefined andalso Startup =:= undefined of
        true -> map_size(Pending);
        false -> ?NOT_READY_LOAD + map_size(Pending)
    end.

-spec call(term(), gen_server:from(), state()) -> {reply, term(), state()} | {noreply, state()}.
call({request, Id, Frame}, From, State) ->
    request(Id, Frame, From, State);
call({request, Id, Frame, Owner}, From, #state{port = Port} = State)
  when is_pid(Owner), Port =/= undefined ->
    %% sd_new with an explicit owner, sd_give_away: the owner holds state in
    %% the port from now on, so it is watched like any requester. (A dead
    %% owner's 'DOWN' is handled after this frame is written: its dict is freed.)
    request(Id, Frame, From, monitor_owner(Owner, State));
call({request, Id, Frame, _Owner}, From, State) ->
    request(Id, Frame, From, State);
call({sd_request, Id, Frame, Effect}, From, State) ->
    sd_request(Id, Frame, Effect, From, State);
call({stream_request, Id, Frame, Owner, Ref, Flow}, From, #state{port = Port} = State)
  when is_pid(Owner), is_reference(Ref), Port =/= undefined ->
    %% Remembered until the port says the stream ended or the port dies (the owner is
    %% then told, instead of waiting for ever).
    State1 = State#state{streams = maps:put(Ref, {Owner, Flow}, State#state.streams)},
    ok = pyport_pool:stream_started(Ref, pyport_pool:server_name(State#state.index)),
    request(Id, Frame, From, monitor_owner(Owner, State1));
call({stream_request, Id, Frame, _Owner, _Ref, _Flow}, From, State) ->
    request(Id, Frame, From, State);
call({traced_request, Id, Frame}, From, State) ->
    %% The benchmark's latency breakdown: a request like any other, whose reply
    %% is {traced, Reply, Stamps} (see traced_reply/4).
    Received = now_ns(),
    case request(Id, Frame, From, State) of
        {noreply, State1} ->
            Traces = maps:put(Id, {Received, now_ns()}, State1#state.traces),
            {noreply, State1#state{traces = Traces}};
        Answered ->
            Answered
    end;
call(stats, _From, State) ->
    {reply, local_stats(State), State};
call(functions_changed, _From, State) ->
    send_functions(State),
    {reply, ok, State};
call(restart_port, _From, State) ->
    State1 = restart(State#state{max_in_flight = max(1, pyport_program:env_int(max_in_flight, 10000)),
                                 cache_max = pyport_sd_cache:max_bytes()}),
    {reply, State1#state.gen, State1};
call(_Other, _From, State) ->
    {reply, {error, bad_call}, State}.

-spec cast(term(), state()) -> {noreply, state()}.
cast({cancel, Id}, #state{pending = Pending} = State) ->
    case maps:take(Id, Pending) of
        {From, Pending1} ->
            State1 = forget_owner_id(From, Id, State#state{pending = Pending1,
                                                           traces = maps:remove(Id, State#state.traces)}),
            send_frame(State1, {cancel, Id}),
            {noreply, State1};
        error ->
            {noreply, State}
    end;
cast({notify, Frame}, #state{port = Port} = State) when Port =/= undefined ->
    %% A frame that needs no answer (a stream's cancel): lost with the port.
    _ = (catch erlang:port_command(Port, Frame)),
    {noreply, State};
cast({stream_ack, Ref, N}, #state{streams = Streams} = State) ->
    %% An owner's acknowledgement counts only for a stream it acknowledges itself:
    %% the sender acknowledges the others as their owners receive.
    case Streams of
        #{Ref := {_, ack}} -> send_frame(State, {stream_ack, term_to_binary(Ref), N});
        _ -> ok
    end,
    {noreply, State};
cast(_Other, State) ->
    {noreply, State}.

-spec info(term(), state()) -> {noreply, state()}.
info({Port, {data, Bin}}, #state{port = Port} = State) ->
    {noreply, port_data(Bin, stamp_rx(State#state{last_rx = now_ms(), silent_checks = 0}))};
info(heartbeat, State) ->
    {noreply, schedule_heartbeat(check_liveness(State))};
info({timeout, TRef, startup_timeout}, #state{startup_timer = TRef} = State) ->
    {noreply, startup_failed(timeout, State)};
info({'DOWN', MRef, process, Pid, _Reason}, #state{owners = Owners} = State) ->
    case maps:take(Pid, Owners) of
        error ->
            {noreply, callback_down(MRef, State)};
        {{MRef, Ids}, Owners1} ->
            ok = pyport_pool:home_gone(Pid, State#state.index),
            Pending = lists:foldl(
                        fun(Id, P) ->
                                send_frame(State, {cancel, Id}),
                                maps:remove(Id, P)
                        end, State#state.pending, Ids),
            %% The owner's streams stay tracked until the port ends them (it sends
            %% pyport_stream_end for each): open_streams and the port's count agree.
            send_frame(State, {owner_down, Pid}),
            {noreply, State#state{owners = Owners1, pending = Pending,
                                  traces = maps:without(Ids, State#state.traces)}};
        _ ->
            %% Another monitor of an owner: a callback process that also made requests.
            {noreply, callback_down(MRef, State)}
    end;
info({Port, {exit_status, Status}}, #state{port = Port} = State) ->
    {noreply, port_down({exit_status, Status}, {error, {pyport_exit, Status}}, State)};
info({'EXIT', Port, Reason}, #state{port = Port} = State) ->
    %% The port closed without an exit status (e.g. a write error).
    {noreply, port_down({port_exit, Reason}, {error, {pyport_exit, Reason}}, State)};
info({'EXIT', Sender, Reason}, #state{sender = Sender} = State) ->
    %% Messages from Python must keep flowing: a new sender takes over. What the old
    %% one had not reported is lost: the port stops counting it.
    ?LOG_ERROR("pyport: the erlang.send sender exited (~tp); starting another", [Reason]),
    send_frame(State, {sent, reset}),
    {noreply, State#state{sender = pyport_sender:start_link()}};
info({'EXIT', _OldPort, _Reason}, State) ->
    {noreply, State};
info({timeout, TRef, restart_port}, #state{restart_timer = TRef} = State) ->
    {noreply, start_port(State#state{restart_timer = undefined})};
info(Other, State) ->
    ?LOG_DEBUG("pyport_server: unexpected message ~tp", [Other]),
    {noreply, State}.

%% @private
%% @doc gen_server callback: closes the port and kills its process group.
-spec terminate(term(), state()) -> ok.
terminate(_Reason, #state{port = undefined} = State) ->
    forget_pool_entries(State);
terminate(_Reason, #state{port = Port, index = Index} = State) ->
    ok = forget_pool_entries(State),
    _ = pyport_pool:new_generation(Index),
    _ = (catch erlang:port_close(Port)),
    kill_group_of(State),
    ok.

%% What the pool's tables say of this port's streams and homes ends with the server.
-spec forget_pool_entries(state()) -> ok.
forget_pool_entries(#state{index = Index, streams = Streams}) ->
    ok = pyport_pool:streams_gone(maps:keys(Streams)),
    pyport_pool:homes_of_port_gone(Index).

%% @private
%% @doc gen_server callback.
-spec code_change(term(), state(), term()) -> {ok, state()}.
code_change(_OldVsn, State, _Extra) ->
    {ok, State}.

%%====================================================================
%% Requests and replies
%%====================================================================

-spec request(request_id(), binary(), gen_server:from(), state()) ->
          {reply, term(), state()} | {noreply, state()}.
request(_Id, _Frame, _From, #state{port = undefined, last_exit = Exit} = State) ->
    {reply, {error, {pyport_unavailable, Exit}}, State};
request(_Id, _Frame, _From, #state{pending = Pending, max_in_flight = Max} = State)
  when map_size(Pending) >= Max ->
    %% Back-pressure: a bounded number of requests in the port at once. Callers
    %% beyond it are told at once instead of queueing without bound.
    {reply, {error, overloaded}, State};
request(Id, Frame, {Pid, _} = From, #state{startup = StartupId} = State)
  when StartupId =/= undefined ->
    %% Start-up code is still running: nothing else runs before it is done.
    State1 = monitor_owner(Pid, Id, State),
    {noreply, State1#state{pending = maps:put(Id, From, State1#state.pending),
                           held = queue:in({Id, Frame}, State1#state.held)}};
request(Id, Frame, {Pid, _} = From, #state{port = Port} = State) ->
    try erlang:port_command(Port, Frame) of
        true ->
            State1 = monitor_owner(Pid, Id, State),
            {noreply, State1#state{pending = maps:put(Id, From, State1#state.pending)}}
    catch
        error:badarg ->
            %% The port is closing; its exit status is on its way.
            {reply, {error, {pyport_unavailable, closing}}, State}
    end.

%% A SharedDict request: its effect on the read cache begins before the frame goes
%% to the port, and ends when the port answers (sd_done/3) or dies.
-spec sd_request(request_id(), binary(), sd_effect(), gen_server:from(), state()) ->
          {reply, term(), state()} | {noreply, state()}.
sd_request(Id, Frame, Effect, From, State) ->
    ok = sd_begin(Effect),
    case request(Id, Frame, From, State) of
        {noreply, S} ->
            {noreply, S#state{sd_effects = maps:put(Id, Effect, S#state.sd_effects)}};
        {reply, _, _} = Refused ->
            ok = sd_end(Effect, error),
            Refused
    end.

-spec sd_begin(sd_effect()) -> ok.
sd_begin({write, SD, Key}) -> pyport_sd_cache:write_begin(SD, Key);
sd_begin(_) -> ok.

%% The port answered request `Id' (`Status'), or died with it in flight (`error').
-spec sd_done(request_id(), ok | error, state()) -> state().
sd_done(Id, Status, #state{sd_effects = Effects} = State) when is_map_key(Id, Effects) ->
    {Effect, Effects1} = maps:take(Id, Effects),
    ok = sd_end(Effect, Status),
    State#state{sd_effects = Effects1};
sd_done(_Id, _Status, State) ->
    State.

-spec sd_end(sd_effect(), ok | error) -> ok.
sd_end({write, SD, Key}, _Status) ->
    pyport_sd_cache:write_end(SD, Key);
sd_end({owns, Owner}, ok) ->
    %% The dict exists now: its owner's exit (even one before now) destroys it.
    pyport_sd_owners:watch(Owner);
sd_end(_, _) ->
    ok.

-spec port_data(binary(), state()) -> state().
port_data(Bin, State) ->
    %% `safe': a frame can never create atoms (nor external funs) in this VM.
    try binary_to_term(Bin, [safe]) of
        Msg -> port_message(Msg, State)
    catch
        error:badarg -> bad_frame(Bin, State)
    end.

%% A frame that does not decode safely (it names an atom that does not exist,
%% or is corrupt): its caller, if the id can be read, is answered and never
%% left waiting.
-spec bad_frame(binary(), state()) -> state().
bad_frame(Bin, #state{pending = Pending} = State) ->
    case pyport_frames:frame_id(Bin) of
        {ok, Id} when is_map_key(Id, Pending) ->
            ?LOG_WARNING("pyport: undecodable reply to request ~b (~b bytes)",
                         [Id, byte_size(Bin)]),
            port_message({Id, error, {pyport_bad_reply, undecodable}}, State);
        _ ->
            ?LOG_WARNING("pyport: undecodable frame from the port (~b bytes)",
                         [byte_size(Bin)]),
            State
    end.

-spec port_message(term(), state()) -> state().
port_message({Id, Status, Result}, #state{pending = Pending} = State0)
  when is_integer(Id), (Status =:= ok orelse Status =:= error) ->
    %% What the answer means for the read cache is done before anyone hears of it.
    State = sd_done(Id, Status, State0),
    case maps:take(Id, Pending) of
        {startup, Pending1} ->
            startup_result(Status, Result, State#state{pending = Pending1});
        {From, Pending1} ->
            State1 = reply(Id, From, {Status, Result}, State),
            forget_owner_id(From, Id, State1#state{pending = Pending1});
        error ->
            %% Cancelled or timed out: nobody waits for it.
            State
    end;
port_message({Id, cached, {SD, Key, Payload}}, #state{sd_effects = Effects} = State)
  when is_integer(Id), is_tuple(SD), is_binary(Key), is_binary(Payload) ->
    %% A get's reply that may be cached (with the stamp its read took before it was
    %% sent): cached before it is forwarded.
    case Effects of
        #{Id := {read, Stamp}} -> ok = pyport_sd_cache:insert(SD, Key, Stamp, Payload, State#state.cache_max);
        _ -> ok
    end,
    port_message({Id, ok, Payload}, State);
port_message({pyport_sd_invalidate, Token, SD, Key}, State)
  when is_integer(Token), is_tuple(SD), is_binary(Key) ->
    %% A change made in the port (by Python, or a dead owner's drop) waits for this
    %% before anyone can see it.
    ok = pyport_sd_cache:invalidate(SD, Key),
    send_frame(State, {sd_invalidated, Token}),
    State;
port_message({pyport_sd_invalidate, Token, SD}, State) when is_integer(Token), is_tuple(SD) ->
    ok = pyport_sd_cache:invalidate_dict(SD),
    send_frame(State, {sd_invalidated, Token}),
    State;
port_message({pyport_callback, CbId, Name, Args, Caller}, #state{port = Port} = State)
  when is_integer(CbId), is_binary(Name), is_binary(Args), Port =/= undefined ->
    Cbs = pyport_callbacks:started(CbId, Name, Args, Caller, Port, State#state.callbacks),
    State#state{callbacks = Cbs};
port_message({pyport_callback_cancel, CbId}, #state{callbacks = Cbs} = State) ->
    State#state{callbacks = pyport_callbacks:cancelled(CbId, Cbs)};
port_message({pyport_send, To, Msg}, #state{sender = Sender, port = Port} = State)
  when is_pid(To), is_binary(Msg), Port =/= undefined ->
    ok = pyport_sender:send(Sender, Port, To, Msg),
    State;
port_message({pyport_stream_send, Ref, To, Msg}, #state{sender = Sender, port = Port} = State)
  when is_reference(Ref), is_pid(To), is_binary(Msg), Port =/= undefined ->
    Flow = case State#state.streams of
               #{Ref := {_, {mailbox, Window}}} -> {mailbox, Port, Ref, Window};
               _ -> ack
           end,
    ok = pyport_sender:stream_item(Sender, Flow, To, Msg),
    State;
port_message({pyport_stream_end, Ref}, #state{streams = Streams, sender = Sender} = State) ->
    ok = pyport_sender:streams_over(Sender, [Ref]),
    ok = pyport_pool:streams_gone([Ref]),
    State#state{streams = maps:remove(Ref, Streams)};
port_message({pyport_stream_end, Ref, To, Msg}, #state{streams = Streams, sender = Sender} = State)
  when is_pid(To), is_binary(Msg) ->
    %% The stream's last message (done, or its error) comes with its end, so that a
    %% port that dies in between cannot leave the owner without either.
    ok = pyport_sender:stream_last(Sender, Ref, To, Msg),
    ok = pyport_pool:streams_gone([Ref]),
    State#state{streams = maps:remove(Ref, Streams)};
port_message({pyport_log, Level, Source, Msg}, State) ->
    pyport_frames:log_python(Level, Source, Msg),
    State;
port_message({pyport_log_record, Level, Logger, Module, Line, Caller, Msg}, State) ->
    pyport_frames:log_python_record(Level, {Logger, Module, Line, Caller}, Msg),
    State;
port_message({pyport_heartbeat, _Seq}, State) ->
    State;
port_message({pyport_ready, Info0}, State) when is_map(Info0) ->
    {Names, Info} = case maps:take(builtin_exceptions, Info0) of
                        {N, I} -> {N, I};
                        error -> {[], Info0}
                    end,
    ok = pyport_frames:make_exception_atoms(Names),
    ?LOG_INFO("pyport: port ready (generation ~b): ~tp", [State#state.gen, Info]),
    OsPid = case maps:get(os_pid, Info, State#state.os_pid) of
                P when is_integer(P), P > 0 -> P;
                _ -> State#state.os_pid
            end,
    Failures = case State#state.startup of
                   undefined -> 0;     % healthy: a later exit restarts at once
                   _ -> State#state.failures
               end,
    State#state{ready = Info, failures = Failures, os_pid = OsPid,
                group_leader = pyport_program:is_group_leader(OsPid)};
port_message({undefined, error, Reason}, State) ->
    ?LOG_WARNING("pyport: the port could not decode a request: ~tp", [Reason]),
    State;
port_message(Other, State) ->
    ?LOG_WARNING("pyport: unexpected frame from the port: ~tP", [Other, 30]),
    State.

%% Answers a request; a traced one with the server's timestamps.
-spec reply(request_id(), gen_server:from(), term(), state()) -> state().
reply(_Id, From, Reply, #state{traces = Traces} = State) when map_size(Traces) =:= 0 ->
    gen_server:reply(From, Reply),
    State;
reply(Id, From, Reply, #state{traces = Traces} = State) ->
    case maps:take(Id, Traces) of
        {{Received, Forwarded}, Traces1} ->
            traced_reply(From, Reply, {Received, Forwarded}, State#state.rx_at),
            State#state{traces = Traces1};
        error ->
            gen_server:reply(From, Reply),
            State
    end.

%% The reply to a traced request: {traced, Reply, Stamps}, Stamps in ns of
%% erlang:monotonic_time: the request received, port_command returned, the
%% reply frame received from the port, and just before this reply was sent.
-spec traced_reply(gen_server:from(), term(), {integer(), integer()}, integer()) -> ok.
traced_reply(From, Reply, {Received, Forwarded}, RxAt) ->
    Stamps = #{received => Received, forwarded => Forwarded, reply_rx => RxAt,
               replied => now_ns()},
    gen_server:reply(From, {traced, Reply, Stamps}).

%% Notes when a frame arrived, only while some request is traced.
-spec stamp_rx(state()) -> state().
stamp_rx(#state{traces = Traces} = State) when map_size(Traces) =:= 0 ->
    State;
stamp_rx(State) ->
    State#state{rx_at = now_ns()}.

%% Start-up code finished: send what was held, in order. Or it failed: its
%% callers cannot be served by this port.
-spec startup_result(ok | error, term(), state()) -> state().
startup_result(ok, _, State) ->
    ?LOG_DEBUG("pyport: start-up code done"),
    cancel_timer(State#state.startup_timer),
    %% Ready and set up: a later exit is not part of a crash loop.
    flush_held(State#state{startup = undefined, startup_timer = undefined, failures = 0});
startup_result(error, Reason, State) ->
    startup_failed(Reason, State).

-spec startup_failed(term(), state()) -> state().
startup_failed(Reason, #state{port = Port} = State) ->
    ?LOG_ERROR("pyport: start-up (sys_path / startup_code) failed: ~tP; "
               "restarting the port with back-off", [Reason, 30]),
    _ = (catch erlang:port_close(Port)),
    Exit = {startup_failed, Reason},
    %% Counted as a failure before readiness, so the restart backs off.
    port_down(Exit, {error, {pyport_unavailable, Exit}},
              State#state{failures = max(1, State#state.failures)}).

%% Sends the requests held during start-up whose callers still wait.
-spec flush_held(state()) -> state().
flush_held(#state{held = Held} = State) ->
    lists:foldl(fun({Id, Frame}, S) ->
                        case maps:is_key(Id, S#state.pending) of
                            true -> send_held(Id, Frame, S);
                            false -> S
                        end
                end, State#state{held = queue:new()}, queue:to_list(Held)).

-spec send_held(request_id(), binary(), state()) -> state().
send_held(Id, Frame, #state{port = Port, pending = Pending} = State) ->
    try erlang:port_command(Port, Frame) of
        true -> State
    catch
        error:badarg ->
            {From, Pending1} = maps:take(Id, Pending),
            gen_server:reply(From, {error, {pyport_unavailable, closing}}),
            forget_owner_id(From, Id, State#state{pending = Pending1})
    end.

%% A callback process ended (it answered the port itself, or died trying).
-spec callback_down(reference(), state()) -> state().
callback_down(MRef, #state{callbacks = Cbs} = State) ->
    State#state{callbacks = pyport_callbacks:ended(MRef, Cbs)}.

-spec local_stats(state()) -> map().
local_stats(#state{} = S) ->
    #{pending => map_size(S#state.pending),
      owners => map_size(S#state.owners),
      generation => S#state.gen,
      restarts => S#state.restarts,
      port => case S#state.port of undefined -> down; _ -> up end,
      %% Python initialised and start-up code finished: requests run at once.
      ready => S#state.ready =/= undefined andalso S#state.startup =:= undefined,
      last_exit => S#state.last_exit,
      os_pid => S#state.os_pid,
      max_in_flight => S#state.max_in_flight,
      %% callback processes running, streams the server would tell of a port exit
      callbacks => map_size(S#state.callbacks),
      open_streams => map_size(S#state.streams),
      shared_dict => pyport_sd_cache:stats(),
      %% The settings the Erlang side applies, defaults included; py:stats()
      %% merges them with the port's own.
      config => #{call_timeout => pyport_request:call_timeout(),
                  shared_dict_timeout => pyport_request:shared_dict_timeout(),
                  max_frame_bytes => pyport_request:max_frame_bytes(),
                  restart_backoff_max => pyport_program:restart_backoff_max(),
                  heartbeat_timeout_ms => pyport_program:heartbeat_timeout(),
                  startup_timeout_ms => pyport_program:startup_timeout(),
                  max_in_flight => S#state.max_in_flight,
                  shared_dict_cache_bytes => S#state.cache_max,
                  print_level => pyport_frames:print_level(),
                  ports => pyport_pool:size(),
                  shared_dict_dir => shared_dict_dir(),
                  elixir => pyport_elixir:enabled(),
                  telemetry_shared_dict_sample => pyport_telemetry:sample_rate()}}.

%% The folder of the pool's shared-memory file, as its path says.
-spec shared_dict_dir() -> binary() | undefined.
shared_dict_dir() ->
    case pyport_shm:path() of
        undefined -> undefined;
        Path -> unicode:characters_to_binary(filename:dirname(Path))
    end.

%%====================================================================
%% Owners (processes that hold state in the port)
%%====================================================================

-spec monitor_owner(pid(), state()) -> state().
monitor_owner(Pid, #state{owners = Owners} = State) ->
    case maps:is_key(Pid, Owners) of
        true -> State;
        false ->
            MRef = erlang:monitor(process, Pid),
            State#state{owners = Owners#{Pid => {MRef, []}}}
    end.

-spec monitor_owner(pid(), request_id(), state()) -> state().
monitor_owner(Pid, Id, #state{owners = Owners} = State) ->
    case Owners of
        #{Pid := {MRef, Ids}} ->
            State#state{owners = Owners#{Pid := {MRef, [Id | Ids]}}};
        _ ->
            MRef = erlang:monitor(process, Pid),
            State#state{owners = Owners#{Pid => {MRef, [Id]}}}
    end.

-spec forget_owner_id(gen_server:from(), request_id(), state()) -> state().
forget_owner_id({Pid, _}, Id, #state{owners = Owners} = State) ->
    case Owners of
        #{Pid := {MRef, Ids}} ->
            State#state{owners = Owners#{Pid := {MRef, lists:delete(Id, Ids)}}};
        _ ->
            State
    end.

%%====================================================================
%% Port life cycle
%%====================================================================

%% The port program's environment: the interpreter's, and which port of the pool it
%% is (Python may read them, e.g. to give each port its own GPU).
-spec port_env(state()) -> [{string(), string() | false}].
port_env(#state{index = Index}) ->
    [{"PYPORT_PORT_INDEX", integer_to_list(Index)},
     {"PYPORT_POOL_SIZE", integer_to_list(pyport_pool:size())}
     | pyport_python:port_env()].

-spec start_port(state()) -> state().
start_port(#state{gen = Gen} = State) ->
    Exe = executable(),
    Args = pyport_program:args(Gen),
    try erlang:open_port({spawn_executable, Exe},
                         [{packet, 4}, binary, exit_status, use_stdio, hide,
                          {args, Args}, {env, port_env(State)}]) of
        Port ->
            OsPid = case erlang:port_info(Port, os_pid) of
                        {os_pid, P} -> P;
                        undefined -> undefined
                    end,
            ?LOG_INFO("pyport: started ~ts (generation ~b, os pid ~p)", [Exe, Gen, OsPid]),
            ok = pyport_telemetry:port_started(State#state.index, OsPid, Gen),
            State1 = State#state{port = Port},
            send_functions(State1),
            send_startup(State1#state{port = Port, os_pid = OsPid, ready = undefined,
                                     startup = undefined, group_leader = false,
                                     last_rx = now_ms(), silent_checks = 0})
    catch
        error:Reason ->
            ?LOG_ERROR("pyport: cannot start ~ts: ~tp", [Exe, Reason]),
            schedule_restart(State#state{port = undefined, os_pid = undefined,
                                         last_exit = {spawn_failed, Reason}})
    end.

-spec send_startup(state()) -> state().
send_startup(State) ->
    try pyport_program:startup_config() of
        {[], <<>>} ->
            State;
        {SysPath, Code} ->
            Id = erlang:unique_integer([positive, monotonic]),
            send_frame(State, {startup, Id, SysPath, Code}),
            TRef = case pyport_program:startup_timeout() of
                       infinity -> undefined;
                       T -> erlang:start_timer(T, self(), startup_timeout)
                   end,
            State#state{pending = maps:put(Id, startup, State#state.pending), startup = Id,
                        startup_timer = TRef}
    catch
        error:{bad_config, Bad} ->
            ?LOG_ERROR("pyport: ignoring sys_path / startup_code: not a string: ~tp", [Bad]),
            State
    end.

%% The port program exited (or its port closed, or it was given up on): answer
%% everyone who waits with Reply, forget all owners (their state died with the
%% port), bump the generation and restart.
-spec port_down(exit_info(), term(), state()) -> state().
port_down(Exit, Reply, #state{pending = Pending, owners = Owners} = State) ->
    kill_group_of(State),
    %% Callbacks of the dead port: nobody waits for them, and their ids would name
    %% the new port's callbacks.
    ok = pyport_callbacks:kill_all(State#state.callbacks),
    %% The streams of the dead port end with the reason its callers get.
    %% (Through the sender: after the items it still holds.)
    {error, StreamReason} = Reply,
    maps:foreach(fun(Ref, {Owner, _Flow}) ->
                         Last = term_to_binary({py_stream, Ref, {error, StreamReason}}, ?T2B_OPTS),
                         pyport_sender:stream_last(State#state.sender, Ref, Owner, Last)
                 end, State#state.streams),
    ok = pyport_pool:streams_gone(maps:keys(State#state.streams)),
    %% The namespaces homed there are gone.
    %% The dicts live on (in shared memory); what the port may have changed without
    %% telling the VM is forgotten, and the writes it had in flight end.
    ok = pyport_sd_cache:clear(),
    maps:foreach(fun(_Id, Effect) -> sd_end(Effect, error) end, State#state.sd_effects),
    ok = pyport_pool:homes_of_port_gone(State#state.index),
    cancel_timer(State#state.startup_timer),
    reply_all(Pending, Reply),
    maps:foreach(fun(_Pid, {MRef, _}) -> erlang:demonitor(MRef, [flush]) end, Owners),
    Gen = pyport_pool:new_generation(State#state.index),
    case Exit of
        restart ->
            ?LOG_NOTICE("pyport: port program replaced (py:restart/0) with ~b request(s) "
                        "pending; now generation ~b", [map_size(Pending), Gen]);
        _ ->
            ?LOG_ERROR("pyport: port program exited (~tp) with ~b request(s) pending; "
                       "restarting as generation ~b", [Exit, map_size(Pending), Gen])
    end,
    ok = pyport_telemetry:port_exit(State#state.index, State#state.os_pid, State#state.gen, Exit,
                                    map_size(Pending)),
    State1 = State#state{port = undefined, pending = #{}, sd_effects = #{}, owners = #{}, gen = Gen,
                         callbacks = #{},
                         streams = #{}, traces = #{},
                         restarts = State#state.restarts + 1, last_exit = Exit,
                         ready = undefined, startup = undefined, os_pid = undefined,
                         group_leader = false, held = queue:new(),
                         startup_timer = undefined},
    schedule_restart(State1).

%% py:restart(): the port goes as in a crash (port_down answers everyone and starts the next
%% one at once: failures 0), or, while none runs (a crash loop's back-off), one starts now.
-spec restart(state()) -> state().
restart(#state{port = undefined, restart_timer = TRef} = State) ->
    cancel_timer(TRef),
    ?LOG_NOTICE("pyport: restarting the port program (py:restart/0)"),
    start_port(State#state{restart_timer = undefined, failures = 1});
restart(#state{port = Port} = State) ->
    _ = (catch erlang:port_close(Port)),
    port_down(restart, {error, {pyport_exit, restart}}, State#state{failures = 0}).

-spec reply_all(#{request_id() => waiter()}, term()) -> ok.
reply_all(Pending, Reply) ->
    maps:foreach(fun(_Id, startup) -> ok;
                    (_Id, From) -> gen_server:reply(From, Reply)
                 end, Pending).

%%====================================================================
%% Liveness
%%====================================================================

-spec schedule_heartbeat(state()) -> state().
schedule_heartbeat(State) ->
    case pyport_program:heartbeat_timeout() of
        infinity -> State;
        Timeout -> erlang:send_after(pyport_program:check_interval(Timeout), self(), heartbeat), State
    end.

%% Each check asks the port for a heartbeat and counts the checks that found
%% it silent for the whole timeout; two in a row and the port is replaced. A
%% check that runs late (the VM itself was paused) proves nothing about the
%% port: it starts the count again.
-spec check_liveness(state()) -> state().
check_liveness(#state{port = undefined} = State) ->
    State#state{last_check = now_ms(), silent_checks = 0};
check_liveness(#state{last_check = LastCheck, last_rx = LastRx} = State) ->
    Now = now_ms(),
    case pyport_program:heartbeat_timeout() of
        infinity ->
            State#state{last_check = Now};
        Timeout ->
            Late = Now - LastCheck > 2 * pyport_program:check_interval(Timeout),
            Silent = Now - LastRx >= Timeout,
            Seq = State#state.heartbeat_seq + 1,
            send_frame(State, {heartbeat, Seq}),
            State1 = State#state{last_check = Now, heartbeat_seq = Seq},
            if
                Late -> State1#state{silent_checks = 0, last_rx = Now};
                not Silent -> State1#state{silent_checks = 0};
                State#state.silent_checks + 1 >= 2 -> unresponsive(Now - LastRx, State1);
                true -> State1#state{silent_checks = State#state.silent_checks + 1}
            end
    end.

%% The port has not answered for too long (stopped, or its reader stuck): kill
%% it with its process group and restart, as if it had been killed by SIGKILL.
-spec unresponsive(integer(), state()) -> state().
unresponsive(SilentMs, #state{port = Port, os_pid = OsPid} = State) ->
    ?LOG_ERROR("pyport: the port program (os pid ~p) has not answered for ~b ms; "
               "killing it", [OsPid, SilentMs]),
    pyport_program:kill(State#state.os_pid, State#state.group_leader),
    _ = (catch erlang:port_close(Port)),
    port_down({exit_status, 137}, {error, {pyport_exit, 137}}, State#state{group_leader = false}).

-spec now_ns() -> integer().
now_ns() ->
    erlang:monotonic_time(nanosecond).

-spec now_ms() -> integer().
now_ms() ->
    erlang:monotonic_time(millisecond).

-spec cancel_timer(reference() | undefined) -> ok.
cancel_timer(undefined) -> ok;
cancel_timer(TRef) -> _ = erlang:cancel_timer(TRef), ok.

%% First failure after a healthy port: restart now. While ports keep dying
%% before they are ready (and through their start-up code): 100 ms, 200 ms,
%% ... up to restart_backoff_max.
-spec schedule_restart(state()) -> state().
schedule_restart(#state{failures = 0} = State) ->
    start_port(State#state{failures = 1});
schedule_restart(#state{failures = N} = State) ->
    TRef = erlang:start_timer(pyport_program:restart_delay(N), self(), restart_port),
    State#state{failures = N + 1, restart_timer = TRef}.

%% Kill the port program's process group, so that processes Python started die
%% with it (only when the program leads its own group).
-spec kill_group_of(state()) -> ok.
kill_group_of(#state{group_leader = GroupLeader, os_pid = OsPid}) ->
    pyport_program:kill_group(OsPid, GroupLeader).

%% The names of the registered functions, all of them: the port answers
%% `hasattr(erlang, Name)' from them.
-spec send_functions(state()) -> ok.
send_functions(State) ->
    send_frame(State, {functions, pyport_callbacks:names()}).

-spec send_frame(state(), term()) -> ok.
send_frame(#state{port = undefined}, _Term) ->
    ok;
send_frame(#state{port = Port}, Term) ->
    try erlang:port_command(Port, term_to_binary(Term, ?T2B_OPTS)) of
        true -> ok
    catch
        error:badarg -> ok
    end.
