%% @private
%% @doc Watches the owners of SharedDicts for the whole pool: when an owner exits, its
%% dicts are destroyed, once, by whichever port is up (they live in shared memory, not
%% in a port).
%%
%% A port's server tells this process of an owner after the port has created a dict for
%% it (or handed one over to it), so that an owner that died before (or while) its dict
%% was made is seen too: monitoring a dead process reports it at once. A drop that finds
%% no port up is tried again until one is.
-module(pyport_sd_owners).
-behaviour(gen_server).

-include_lib("kernel/include/logger.hrl").

-export([start_link/0, watch/1, pending_drops/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(T2B_OPTS, [{minor_version, 2}]).
-define(RETRY_FIRST_MS, 50).
-define(RETRY_MAX_MS, 1000).
%% Owners per request, and how long a port may take for them.
-define(BATCH, 1000).
-define(DROP_TIMEOUT_MS, 30000).

-record(state, {
          %% owner => its monitor
          owners = #{} :: #{pid() => reference()},
          %% owners whose dicts are still to be dropped (no port was up), and the next wait
          drops = [] :: [pid()],
          retry_ms = ?RETRY_FIRST_MS :: pos_integer(),
          timer :: reference() | undefined
         }).

%% @doc Starts the watcher, registered as `pyport_sd_owners'.
-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc `Owner' owns a dict now: its exit will destroy its dicts.
-spec watch(pid()) -> ok.
watch(Owner) when is_pid(Owner) ->
    gen_server:cast(?MODULE, {watch, Owner}).

%% @doc How many dead owners' dicts wait for a port to drop them (for stats and tests).
-spec pending_drops() -> non_neg_integer().
pending_drops() ->
    try gen_server:call(?MODULE, pending_drops, 5000)
    catch exit:_ -> 0
    end.

%% @private
-spec init([]) -> {ok, #state{}}.
init([]) ->
    {ok, #state{}}.

%% @private
-spec handle_call(term(), gen_server:from(), #state{}) -> {reply, term(), #state{}}.
handle_call(pending_drops, _From, State) ->
    {reply, length(State#state.drops), State};
handle_call(_Other, _From, State) ->
    {reply, {error, bad_call}, State}.

%% @private
-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast({watch, Owner}, #state{owners = Owners} = State) ->
    case Owners of
        #{Owner := _} -> {noreply, State};
        _ -> {noreply, State#state{owners = Owners#{Owner => erlang:monitor(process, Owner)}}}
    end;
handle_cast(_Other, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), #state{}) -> {noreply, #state{}}.
handle_info({'DOWN', MRef, process, Owner, _Reason}, #state{owners = Owners} = State) ->
    case Owners of
        #{Owner := MRef} ->
            {noreply, drop_all(State#state{owners = maps:remove(Owner, Owners),
                                           drops = [Owner | State#state.drops]})};
        _ ->
            {noreply, State}
    end;
handle_info({timeout, TRef, retry}, #state{timer = TRef} = State) ->
    {noreply, drop_all(State#state{timer = undefined})};
handle_info(_Other, State) ->
    {noreply, State}.

%%====================================================================
%% Internal
%%====================================================================

%% Asks a port to destroy the dead owners' dicts, in batches; what no port could take
%% waits for the retry timer.
-spec drop_all(#state{}) -> #state{}.
drop_all(#state{drops = Drops} = State) ->
    case drop_batches(Drops) of
        [] ->
            State#state{drops = [], retry_ms = ?RETRY_FIRST_MS};
        Left when State#state.timer =:= undefined ->
            Wait = State#state.retry_ms,
            State#state{drops = Left, retry_ms = min(?RETRY_MAX_MS, 2 * Wait),
                        timer = erlang:start_timer(Wait, self(), retry)};
        Left ->
            State#state{drops = Left}
    end.

%% The owners left to drop.
-spec drop_batches([pid()]) -> [pid()].
drop_batches([]) ->
    [];
drop_batches(Owners) ->
    {Batch, Rest} = lists:split(min(?BATCH, length(Owners)), Owners),
    case drop(Batch) of
        ok -> drop_batches(Rest);
        {error, _} -> Owners
    end.

%% The port destroys the owners' dicts and answers once they are gone (after the VM has
%% forgotten what it cached of them).
-spec drop([pid()]) -> ok | {error, term()}.
drop(Owners) ->
    Id = pyport_request:new_id(),
    Frame = term_to_binary({sd_drop_owners, Id, Owners}, ?T2B_OPTS),
    case pyport_request:request(caller, Id, Frame, ?DROP_TIMEOUT_MS) of
        {ok, _} ->
            ok;
        {error, {pyport_unavailable, _}} = E ->
            E;
        {error, {pyport_exit, _}} = E ->
            E;
        {error, Reason} = E ->
            ?LOG_WARNING("pyport: dropping the SharedDicts of ~b dead owner(s) failed (~tP); "
                         "trying again", [length(Owners), Reason, 20]),
            E
    end.
