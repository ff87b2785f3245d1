%% @private
%% @doc The process that delivers what Python sends to Erlang processes: the
%% messages of `erlang.send' and the items of streams, in the order the port sent
%% them, decoded here rather than in the server.
%%
%% It also closes two flow-control loops with the port:
%% <ul>
%% <li>`erlang.send': it reports deliveries (`{sent, N, Bytes}', at least every
%% 64 messages and whenever it has nothing left to deliver). The port lets Python
%% have only so many messages undelivered, so a Python loop that outruns the VM
%% waits in Python and the VM's queues stay bounded.</li>
%% <li>streams with `flow => mailbox' (the default): it acknowledges a stream's
%% items as its owner receives them. After each delivery, and while some item
%% of a stream is unacknowledged, it reads the owner's `message_queue_len': the
%% items the owner no longer holds are acknowledged (`{stream_ack, Ref, N}'),
%% so a stream sends while the owner's mailbox holds fewer than `window'
%% messages and pauses (holding no Python thread) while it is full. Streams
%% with `flow => ack' are acknowledged by their owner (`py:stream_ack').</li>
%% </ul>
-module(pyport_sender).

-export([start_link/0, send/4, stream_item/4, stream_last/4, streams_over/2]).
-export([init/0, loop/1]).

-define(T2B_OPTS, [{minor_version, 2}]).
%% Deliveries of erlang.send are reported at least this often.
-define(REPORT_EVERY, 64).
%% How often a stream whose owner holds its items is looked at again: from the
%% first to the last value, doubling while nothing changes.
-define(POLL_FIRST_MS, 1).
-define(POLL_LAST_MS, 32).

-type flow() :: ack | {mailbox, port(), reference(), pos_integer()}.
-export_type([flow/0]).

-record(stream, {port :: port(), owner :: pid(), window :: pos_integer(),
                 delivered = 0 :: non_neg_integer(), acked = 0 :: non_neg_integer()}).
-record(st, {
          %% erlang.send messages delivered and not yet reported: port, count, bytes
          unreported = none :: none | {port(), pos_integer(), non_neg_integer()},
          %% streams with mailbox flow, by reference
          streams = #{} :: #{reference() => #stream{}},
          %% how long to wait before looking at held streams again
          poll = ?POLL_FIRST_MS :: pos_integer()
         }).

%% @doc Starts the sender, linked to the caller (the server).
-spec start_link() -> pid().
start_link() ->
    proc_lib:spawn_link(?MODULE, init, []).

%% @private
-spec init() -> no_return().
init() ->
    ok = pyport_telemetry:label(pyport_sender),
    loop(#st{}).

%% @doc An `erlang.send' message of the port `Port' for `To' (an ETF binary).
-spec send(pid(), port(), pid(), binary()) -> ok.
send(Sender, Port, To, MessageBin) ->
    Sender ! {send, Port, To, MessageBin},
    ok.

%% @doc An item of a stream for its owner `To'.
-spec stream_item(pid(), flow(), pid(), binary()) -> ok.
stream_item(Sender, Flow, To, MessageBin) ->
    Sender ! {item, Flow, To, MessageBin},
    ok.

%% @doc A stream's last message (`done' or its error): delivered after its items,
%% and the stream is forgotten.
-spec stream_last(pid(), reference(), pid(), binary()) -> ok.
stream_last(Sender, Ref, To, MessageBin) ->
    Sender ! {last, Ref, To, MessageBin},
    ok.

%% @doc Streams that are over without a last message (cancelled, or their port died).
-spec streams_over(pid(), [reference()]) -> ok.
streams_over(_Sender, []) ->
    ok;
streams_over(Sender, Refs) ->
    Sender ! {over, Refs},
    ok.

%% @private
-spec loop(#st{}) -> no_return().
loop(St) ->
    receive
        Msg ->
            %% A fully qualified call: a new version of this module takes over the loop.
            ?MODULE:loop(handle(Msg, St))
    after wait(St) ->
            ?MODULE:loop(idle(St))
    end.

%% Nothing to report or look at: sleep; something unreported: only what is queued
%% first; a held stream: look again after the poll interval.
-spec wait(#st{}) -> timeout().
wait(#st{unreported = none, streams = Streams, poll = Poll}) ->
    case any_held(Streams) of
        true -> Poll;
        false -> infinity
    end;
wait(#st{}) ->
    0.

-spec handle(term(), #st{}) -> #st{}.
handle({send, Port, To, Bin}, #st{unreported = U} = St) ->
    send_now(To, Bin),
    St#st{unreported = delivered(Port, byte_size(Bin), U)};
handle({item, ack, To, Bin}, St) ->
    send_now(To, Bin),
    St;
handle({item, {mailbox, Port, Ref, Window}, To, Bin}, #st{streams = Streams} = St) ->
    send_now(To, Bin),
    S0 = maps:get(Ref, Streams, #stream{port = Port, owner = To, window = Window}),
    S1 = acknowledge(Ref, S0#stream{delivered = S0#stream.delivered + 1}),
    St#st{streams = Streams#{Ref => S1}, poll = ?POLL_FIRST_MS};
handle({last, Ref, To, Bin}, #st{streams = Streams} = St) ->
    send_now(To, Bin),
    St#st{streams = maps:remove(Ref, Streams)};
handle({over, Refs}, #st{streams = Streams} = St) ->
    St#st{streams = maps:without(Refs, Streams)};
handle(_Other, St) ->
    St.

%% Nothing left to deliver: report erlang.send deliveries, and look at the streams
%% whose owners held items.
-spec idle(#st{}) -> #st{}.
idle(#st{unreported = U, streams = Streams, poll = Poll} = St) ->
    ok = report(U),
    Streams1 = maps:map(fun acknowledge/2, Streams),
    Progress = Streams1 =/= Streams,
    St#st{unreported = none, streams = Streams1,
          poll = case Progress of
                     true -> ?POLL_FIRST_MS;
                     false -> min(?POLL_LAST_MS, Poll * 2)
                 end}.

-spec any_held(#{reference() => #stream{}}) -> boolean().
any_held(Streams) ->
    lists:any(fun(#stream{delivered = D, acked = A}) -> D > A end, maps:values(Streams)).

%% Acknowledges the items of stream `Ref' its owner no longer holds: all but as many
%% as its mailbox holds messages (other messages count too: never more than the
%% owner consumed). An owner on another node cannot be looked at: its items are
%% acknowledged as they are delivered.
-spec acknowledge(reference(), #stream{}) -> #stream{}.
acknowledge(Ref, #stream{port = Port, owner = Owner, delivered = D, acked = A} = S) when D > A ->
    Held = held_by(Owner),
    Target = max(A, D - Held),
    case Target > A of
        true ->
            _ = (catch erlang:port_command(Port, term_to_binary({stream_ack, term_to_binary(Ref), Target - A},
                                                                ?T2B_OPTS))),
            S#stream{acked = Target};
        false ->
            S
    end;
acknowledge(_Ref, S) ->
    S.

-spec held_by(pid()) -> non_neg_integer().
held_by(Owner) when node(Owner) =:= node() ->
    case erlang:process_info(Owner, message_queue_len) of
        {message_queue_len, N} -> N;
        undefined -> 0                          % gone: its streams are being cancelled
    end;
held_by(_Remote) ->
    0.

-spec send_now(pid(), binary()) -> ok.
send_now(To, Bin) ->
    try pyport_elixir:decode(Bin) of
        %% Like `!': a dead local process is not an error.
        Msg -> _ = (catch erlang:send(To, Msg, [noconnect])), ok
    catch
        error:badarg -> ok
    end.

-spec delivered(port(), non_neg_integer(), none | {port(), pos_integer(), non_neg_integer()}) ->
          none | {port(), pos_integer(), non_neg_integer()}.
delivered(Port, Bytes, {Port, N, Total}) when N + 1 >= ?REPORT_EVERY ->
    ok = report({Port, N + 1, Total + Bytes}),
    none;
delivered(Port, Bytes, {Port, N, Total}) ->
    {Port, N + 1, Total + Bytes};
delivered(Port, Bytes, Other) ->
    %% The first message, or the first of a new port (the old one is gone).
    ok = report(Other),
    {Port, 1, Bytes}.

-spec report(none | {port(), pos_integer(), non_neg_integer()}) -> ok.
report(none) ->
    ok;
report({Port, N, Bytes}) ->
    %% Any process may write to the port; a port that is gone has nobody to tell.
    _ = (catch erlang:port_command(Port, term_to_binary({sent, N, Bytes}, ?T2B_OPTS))),
    ok.
