%% @doc The machinery behind {@link py:spawn_call/4}, {@link py:await/2} and
%% {@link py:cast/4}.
%%
%% Each asynchronous call has a <em>holder</em>: a small proc_lib process that
%% sends the request to the server of a port of the pool (chosen by the caller, see
%% `pyport_pool'), receives its reply and keeps it until
%% the caller awaits it. A holder, rather than a reply sent straight to the
%% caller (through an alias), because a reply must never be left in the
%% caller's mailbox: not for work the caller never awaits, not after an await
%% that timed out, and not for work that finished before anyone asked. The
%% holder exits once the result is handed over, the call is abandoned or the
%% caller exits, so nothing of it outlives the caller.
%%
%% The request frame is built by the caller, with the caller as its owner
%% (`{call, Id, Caller, M, F, Payload}'), so the call runs in the caller's
%% namespace. It is sent as `{request, Id, Frame, Caller}': the server watches
%% the caller as an owner (its namespace is freed when it exits) and the holder
%% as the requester (a holder that exits cancels the request).
%%
%% Life of a call:
%% <ul>
%% <li>nobody awaits it: it is cancelled in the port `WorkTimeout' (the app env
%% `call_timeout') after it started; a later await returns `{error, timeout}'.</li>
%% <li>an await times out: the caller sends `{cancel, Id}' to the server, as a
%% timed-out {@link py:call/5} does, and the holder exits (dropping any reply).</li>
%% <li>the caller exits: the holder cancels the request and exits.</li>
%% </ul>
-module(pyport_async).

-include_lib("kernel/include/logger.hrl").

-export([spawn_call/5, cast/5, await/2]).
%% proc_lib entry point of a holder
-export([holder/1]).

-export_type([ref/0]).

-include("pyport.hrl").

-define(TAG, '$pyport_async').

-opaque ref() :: {?TAG, Caller :: pid(), Holder :: pid(), Id :: pos_integer(), server()}.
%% What {@link py:spawn_call/4} returns: only `Caller' may await it.

-type mode() :: call | cast.
%% the server of the port that runs the call
-type server() :: atom() | pid().
-type reply() :: {ok, binary()} | {error, term()}.
%% `{Module, Function}' of the call, for the warning of a failed cast.
-type what() :: {binary(), binary()}.

-record(holder, {
          mode :: mode(),
          caller :: pid(),
          caller_mon :: reference(),
          id :: pos_integer(),
          server :: server(),
          what :: what(),
          %% the gen_server request while it is in flight
          req :: gen_server:request_id() | undefined,
          %% the end of the work, while nobody awaits it
          timer :: reference() | undefined,
          result :: reply() | undefined,
          %% the alias of an await that waits for the result
          awaiter :: reference() | undefined
         }).
-type holder() :: #holder{}.

%%====================================================================
%% API (called in the caller)
%%====================================================================

%% @doc Starts request `Id' (its frame built by the caller, with the caller as
%% owner) at `Server' and returns at once a reference that the caller alone may await.
-spec spawn_call(server(), pos_integer(), binary(), timeout(), what()) -> ref().
spawn_call(Server, Id, Frame, WorkTimeout, What) ->
    Holder = start(call, Server, Id, Frame, WorkTimeout, What),
    {?TAG, self(), Holder, Id, Server}.

%% @doc Starts request `Id' at `Server' and forgets it: its failure is logged (warning).
-spec cast(server(), pos_integer(), binary(), timeout(), what()) -> ok.
cast(Server, Id, Frame, WorkTimeout, What) ->
    _ = start(cast, Server, Id, Frame, WorkTimeout, What),
    ok.

%% @doc The reply of a call started by {@link spawn_call/4}, as the server
%% gave it (the payload still encoded), or `{error, timeout}'. Raises
%% `error(badarg)' for a reference that is not the caller's own, or that was
%% awaited already.
-spec await(ref(), timeout()) -> reply().
await({?TAG, Caller, Holder, Id, Server}, Timeout)
  when Caller =:= self(), is_pid(Holder), is_integer(Id), ?IS_TIMEOUT(Timeout) ->
    MRef = erlang:monitor(process, Holder, [{alias, demonitor}]),
    Holder ! {await, MRef, Id},
    %% The holder answers at once (a result or `pending'), so Timeout 0 polls.
    receive
        {MRef, {result, Reply}} ->
            erlang:demonitor(MRef, [flush]),
            Reply;
        {MRef, pending} ->
            wait(MRef, Holder, Id, Server, Timeout);
        {'DOWN', MRef, process, _, _} ->
            %% The holder is gone: the result was handed over already (or the
            %% call was abandoned by an earlier await that timed out).
            erlang:error(badarg)
    end;
await(_Ref, _Timeout) ->
    erlang:error(badarg).

-spec wait(reference(), pid(), pos_integer(), server(), timeout()) -> reply().
wait(MRef, Holder, Id, Server, Timeout) ->
    %% The alias dies with the monitor: a reply that comes after the timeout
    %% below is dropped by the runtime, never queued here.
    receive
        {MRef, {result, Reply}} ->
            erlang:demonitor(MRef, [flush]),
            Reply;
        {'DOWN', MRef, process, _, Reason} ->
            %% Only a bug or an exit signal from outside ends a holder that
            %% still has to answer.
            erlang:error({pyport_async_holder_exit, Reason})
    after Timeout ->
            erlang:demonitor(MRef, [flush]),
            receive
                {MRef, {result, Reply}} -> Reply   % came in just before the alias went
            after 0 ->
                    %% Interrupt the Python work exactly as a timed-out py:call does.
                    ok = gen_server:cast(Server, {cancel, Id}),
                    Holder ! {abandon, Id},
                    {error, timeout}
            end
    end.

%%====================================================================
%% The holder
%%====================================================================

-spec start(mode(), server(), pos_integer(), binary(), timeout(), what()) -> pid().
start(Mode, Server, Id, Frame, WorkTimeout, What) ->
    proc_lib:spawn(?MODULE, holder, [{Mode, self(), Server, Id, Frame, WorkTimeout, What}]).

%% @private
%% @doc proc_lib entry point: sends the request, then holds its result.
-spec holder({mode(), pid(), server(), pos_integer(), binary(), timeout(), what()}) -> ok.
holder({Mode, Caller, Server, Id, Frame, WorkTimeout, What}) ->
    ok = pyport_telemetry:label({pyport_async, Mode, What}),
    S = #holder{mode = Mode, caller = Caller, caller_mon = erlang:monitor(process, Caller),
                id = Id, server = Server, what = What},
    case pyport_request:frame_allowed(Frame) of
        {error, _} = TooLarge ->
            finished(TooLarge, S);
        ok ->
            Req = gen_server:send_request(Server, {request, Id, Frame, Caller}),
            Timer = case WorkTimeout of
                        infinity -> undefined;
                        T -> erlang:start_timer(T, self(), work_timeout)
                    end,
            loop(S#holder{req = Req, timer = Timer})
    end.

-spec loop(holder()) -> ok.
loop(#holder{req = Req} = S) ->
    receive
        Msg ->
            case response(Msg, Req) of
                {done, Reply} -> finished(Reply, S#holder{req = undefined});
                no_reply -> message(Msg, S)
            end
    end.

-spec response(term(), gen_server:request_id() | undefined) -> {done, reply()} | no_reply.
response(_Msg, undefined) ->
    no_reply;
response(Msg, Req) ->
    case gen_server:check_response(Msg, Req) of
        {reply, Reply} -> {done, reply_of(Reply)};
        {error, {Reason, _}} -> {done, {error, server_down(Reason)}};
        no_reply -> no_reply
    end.

-spec reply_of(term()) -> reply().
reply_of({ok, Payload} = Ok) when is_binary(Payload) -> Ok;
reply_of({error, _} = Error) -> Error;
reply_of(Other) -> {error, {pyport_bad_reply, Other}}.

%% The same reasons as py:call's when the server is not there.
-spec server_down(term()) -> {pyport_unavailable, term()}.
server_down(noproc) -> {pyport_unavailable, not_started};
server_down(Reason) -> {pyport_unavailable, {server_exit, Reason}}.

-spec message(term(), holder()) -> ok.
message({timeout, Timer, work_timeout}, #holder{timer = Timer} = S) ->
    case S of
        #holder{awaiter = undefined, req = Req} when Req =/= undefined ->
            %% Nobody awaits the work: it ends here.
            S1 = S#holder{req = undefined, timer = undefined},
            case gen_server:receive_response(Req, 0) of
                {reply, Reply} ->
                    finished(reply_of(Reply), S1);
                {error, {Reason, _}} ->
                    finished({error, server_down(Reason)}, S1);
                timeout ->
                    %% receive_response/2 has dropped the request: a late reply
                    %% will not come here either.
                    ok = gen_server:cast(S#holder.server, {cancel, S#holder.id}),
                    finished({error, timeout}, S1)
            end;
        _ ->
            %% Awaited: the await's own timeout governs from now on.
            loop(S#holder{timer = undefined})
    end;
message({await, MRef, Id}, #holder{id = Id, result = undefined} = S) ->
    MRef ! {MRef, pending},
    loop(S#holder{awaiter = MRef});
message({await, MRef, Id}, #holder{id = Id, result = Result}) ->
    MRef ! {MRef, {result, Result}},
    ok;
message({abandon, Id}, #holder{id = Id, req = Req}) ->
    %% The await timed out and the caller cancelled the request: drop its reply.
    _ = Req =/= undefined andalso gen_server:receive_response(Req, 0),
    ok;
message({'DOWN', MRef, process, _, _}, #holder{caller_mon = MRef, req = Req, id = Id} = S) ->
    %% The caller is gone: so is the reason to run its work.
    _ = Req =/= undefined andalso gen_server:cast(S#holder.server, {cancel, Id}),
    ok;
message(_Other, S) ->
    loop(S).

%% The work is over with Reply: a cast logs a failure and ends; a call hands
%% the result to its awaiter, or holds it until the caller awaits it or exits.
-spec finished(reply(), holder()) -> ok.
finished(Reply, #holder{timer = Timer} = S) when Timer =/= undefined ->
    _ = erlang:cancel_timer(Timer),
    receive {timeout, Timer, work_timeout} -> ok after 0 -> ok end,
    finished(Reply, S#holder{timer = undefined});
finished(Reply, #holder{mode = cast} = S) ->
    log_cast(Reply, S);
finished(Reply, #holder{awaiter = undefined} = S) ->
    loop(S#holder{result = Reply});
finished(Reply, #holder{awaiter = MRef}) ->
    MRef ! {MRef, {result, Reply}},
    ok.

-spec log_cast(reply(), holder()) -> ok.
log_cast({ok, _}, _S) ->
    ok;
log_cast({error, Reason}, #holder{caller = Caller, what = {M, F}}) ->
    ?LOG_WARNING("pyport: py:cast(~ts, ~ts, ...) from ~p failed: ~tP",
                 [M, F, Caller, Reason, 30]),
    ok.
