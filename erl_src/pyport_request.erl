%% @private
%% @doc Sending one request to the port through `pyport_server' and reading its
%% answer: request ids, the callback chain of a nested request, the frame-size
%% check, timeouts (a caller that gives up cancels its request) and the safe
%% decoding of results. Used by {@link py} and by nothing that users call.
-module(pyport_request).

-export([new_id/0, chained/1, request/3, request/4, request_msg/3, request_msg/4, decoded/1,
         default_timeout/2, frame_allowed/1, server/1,
         call_timeout/0, shared_dict_timeout/0, max_frame_bytes/0]).
-export_type([route/0]).

%% Which port's server gets a request (see pyport_pool): `namespace', a request that
%% uses the caller's Python namespace (its home port, given one if need be);
%% `caller', any other request of the caller (its home port if it has one, else the
%% least loaded); or that server.
-type route() :: namespace | caller | atom() | pid().

-include("pyport.hrl").

%% Default of the largest request frame (app env max_frame_bytes, passed to the
%% port program as --max-frame-bytes): 1 GiB.
-define(MAX_FRAME, (1 bsl 30)).

%% @doc A request made by a callback's process names the callback: the port runs it
%% on the Python thread that waits for that callback (and in the namespace of
%% the process whose call made the callback, see pyport_callbacks:owner/0).
-spec chained(tuple()) -> tuple().
chained(Request) ->
    case pyport_callbacks:chain() of
        undefined -> Request;
        Chain -> erlang:append_element(Request, Chain)
    end.

%% @doc A request id: unique in this VM and increasing.
-spec new_id() -> pos_integer().
new_id() ->
    erlang:unique_integer([positive, monotonic]).

%% @doc Sends the request frame `Frame' (id `Id') of the caller to its port (route
%% `caller') and waits up to `Timeout' for the port's answer.
-spec request(pos_integer(), binary(), timeout()) -> {ok, binary()} | {error, py:error_reason()}.
request(Id, Frame, Timeout) ->
    request(caller, Id, Frame, Timeout).

%% @doc Sends the request frame `Frame' (id `Id') to the port `Route' names and waits
%% up to `Timeout' for its answer.
-spec request(route(), pos_integer(), binary(), timeout()) -> {ok, binary()} | {error, py:error_reason()}.
request(Route, Id, Frame, Timeout) ->
    request_msg(Route, Id, {request, Id, Frame}, Timeout).

%% @doc {@link request_msg/4} to the caller's port.
-spec request_msg(pos_integer(), tuple(), timeout()) ->
          {ok, binary()} | {error, py:error_reason()}.
request_msg(Id, Msg, Timeout) ->
    request_msg(caller, Id, Msg, Timeout).

%% @doc Sends `Msg' (`{request, Id, Frame, ...}', as the server takes it) to the port
%% `Route' names, unless its frame is over `max_frame_bytes'. The server answers
%% `{ok, PayloadBinary}' or `{error, Reason}'. A caller that times out cancels its
%% request; gen_server:call's alias drops a late reply.
-spec request_msg(route(), pos_integer(), tuple(), timeout()) ->
          {ok, binary()} | {error, py:error_reason()}.
request_msg(Route, Id, Msg, Timeout) ->
    case frame_allowed(element(3, Msg)) of
        ok -> send_request(server(Route), Id, Msg, Timeout);
        {error, _} = TooLarge -> TooLarge
    end.

%% @doc The server a request of the calling process goes to by `Route'.
-spec server(route()) -> atom() | pid().
server(namespace) -> pyport_pool:choose(true);
server(caller) -> pyport_pool:choose(false);
server(Server) -> Server.

%% @doc Whether a request frame may be sent: the port program treats a frame
%% longer than the app env `max_frame_bytes' as a corrupt stream and exits, so
%% such a frame is refused here, before it costs other callers their requests.
-spec frame_allowed(binary()) -> ok | {error, {request_too_large, non_neg_integer(), integer()}}.
frame_allowed(Frame) ->
    Size = byte_size(Frame),
    case max_frame_bytes() of
        Max when Size > Max -> {error, {request_too_large, Size, Max}};
        _ -> ok
    end.

%% @doc The largest request frame sent: the app env `max_frame_bytes' (1 GiB).
-spec max_frame_bytes() -> non_neg_integer().
max_frame_bytes() ->
    case application:get_env(pyport, max_frame_bytes) of
        {ok, Max} when is_integer(Max), Max >= 0 -> Max;
        _ -> ?MAX_FRAME
    end.

-spec send_request(atom() | pid(), pos_integer(), tuple(), timeout()) ->
          {ok, binary()} | {error, py:error_reason()}.
send_request(Server, Id, Msg, Timeout) ->
    try
        gen_server:call(Server, Msg, Timeout)
    catch
        exit:{timeout, _} ->
            ok = gen_server:cast(Server, {cancel, Id}),
            {error, timeout};
        exit:{noproc, _} ->
            {error, {pyport_unavailable, not_started}};
        exit:{Reason, _} ->
            {error, {pyport_unavailable, {server_exit, Reason}}}
    end.

%% @doc Results are decoded with `[safe]': nothing Python returns can create an
%% atom (or a pid of a made-up node) in this VM.
-spec decoded({ok, binary()} | {error, py:error_reason()}) -> py:result(term()).
decoded({ok, Payload}) ->
    try binary_to_term(Payload, [safe]) of
        Value -> {ok, Value}
    catch
        error:badarg -> {error, {pyport_bad_reply, undecodable}}
    end;
decoded({error, _} = Error) ->
    Error.

%% @doc The timeout of `call', `eval', `spawn_call' work and `await': the app
%% env `call_timeout' (30000 ms).
-spec call_timeout() -> timeout().
call_timeout() ->
    default_timeout(call_timeout, 30000).

%% @doc How long a SharedDict operation (and `py:stats()') waits for the port:
%% the app env `shared_dict_timeout' (5000 ms).
-spec shared_dict_timeout() -> timeout().
shared_dict_timeout() ->
    default_timeout(shared_dict_timeout, 5000).

%% @doc The app env `Key' if it is a valid timeout, else `Default'.
-spec default_timeout(atom(), timeout()) -> timeout().
default_timeout(Key, Default) ->
    case application:get_env(pyport, Key) of
        {ok, T} when ?IS_TIMEOUT(T) -> T;
        _ -> Default
    end.
