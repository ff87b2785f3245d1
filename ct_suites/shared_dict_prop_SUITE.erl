%% SharedDict against a model, with PropEr: random sequences of the Erlang-side
%% operations (get, set, del, keys, update_counter, compare_and_swap) on three
%% keys and a handful of plain values behave like a dict that keeps the values
%% in the form get/2 returns them (atoms as binaries, atom map keys as binary
%% keys) and its keys in insertion order; and when two processes run such
%% sequences at once, every outcome matches some interleaving of them
%% (proper_statem's parallel check: Erlang-side operations are linearizable), also
%% with a pool of two ports where the two processes' operations go through
%% different ports (and the VM's read cache is filled and invalidated by both).
%%
%% Bounded by time: PROPER_SECONDS (default 50) for both properties together,
%% as many PropEr runs as fit; `make proper-long' sets it to 600. PropEr comes
%% from the OS package (scripts/bootstrap.sh installs it): without it the suite
%% fails, it does not skip.
%%
%% PropEr is used through its functions (proper:forall/2 and so on) rather than
%% proper.hrl: Debian's erlang-proper ships no include files, and a suite that
%% fails to compile would not be counted as failed.
-module(shared_dict_prop_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-define(KEYS, [<<"a">>, <<"b">>, <<"c">>]).
-define(DEFAULT_SECONDS, 50).
%% Shares of the time budget for the parallel properties (the rest is sequential).
-define(PARALLEL_SHARE, 0.4).
-define(POOL_SHARE, 0.3).

suite() ->
    [{timetrap, {seconds, budget_seconds() + 120}}].

all() ->
    [proper_is_installed,
     sequential_matches_model,
     parallel_is_linearizable,
     parallel_is_linearizable_across_ports].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

budget_seconds() ->
    case os:getenv("PROPER_SECONDS") of
        false -> ?DEFAULT_SECONDS;
        "" -> ?DEFAULT_SECONDS;
        S -> list_to_integer(S)
    end.

%%--------------------------------------------------------------------
%% Cases

%% A machine without PropEr cannot check these promises: that is a failure.
proper_is_installed(_Config) ->
    require_proper().

require_proper() ->
    case code:which(proper) of
        non_existing -> ct:fail("PropEr is not installed: run `make bootstrap` (erlang-proper)");
        _ -> ok
    end.

sequential_matches_model(_Config) ->
    require_proper(),
    Seconds = budget_seconds() * (1 - ?PARALLEL_SHARE - ?POOL_SHARE),
    run_for(fun prop_sequential/0, Seconds, [{max_size, 40}]).

parallel_is_linearizable(_Config) ->
    require_proper(),
    Seconds = budget_seconds() * ?PARALLEL_SHARE,
    %% short sequences: checking every interleaving of two branches is exponential
    run_for(fun prop_parallel/0, Seconds, [{max_size, 12}]).

%% The same with `ports => 2': each process's operations go to a port of its own (the
%% first process that operates gets one port, the next the other, and so on).
parallel_is_linearizable_across_ports(_Config) ->
    require_proper(),
    Saved = pyport_ct_lib:save_env([ports]),
    ok = pyport_ct_lib:stop_app(),
    ok = application:set_env(pyport, ports, 2),
    _ = pyport_ct_lib:start_app(),
    persistent_term:put({?MODULE, ports}, atomics:new(1, [])),
    try
        run_for(fun prop_parallel/0, budget_seconds() * ?POOL_SHARE, [{max_size, 12}])
    after
        persistent_term:erase({?MODULE, ports}),
        pyport_ct_lib:restore_env_and_restart(Saved)
    end.

%% With a pool: the calling process's home port, given at its first operation.
ensure_port() ->
    case persistent_term:get({?MODULE, ports}, undefined) of
        undefined ->
            ok;
        Counter ->
            case ets:lookup(pyport_homes, self()) of
                [_] -> ok;
                [] -> true = ets:insert_new(pyport_homes, {self(), 1 + atomics:add_get(Counter, 1, 1) rem 2}), ok
            end
    end.

%% Runs batches of 20 PropEr tests until Seconds have passed (at least one
%% batch); fails with PropEr's counterexample on the first failure.
run_for(PropFun, Seconds, Opts) ->
    Deadline = erlang:monotonic_time(millisecond) + round(Seconds * 1000),
    run_batches(PropFun, Deadline, Opts, 0).

run_batches(PropFun, Deadline, Opts, Done) ->
    case proper:quickcheck(PropFun(), [{numtests, 20}, long_result | Opts]) of
        true ->
            Done1 = Done + 20,
            case erlang:monotonic_time(millisecond) >= Deadline of
                true ->
                    ct:log("~b PropEr tests passed", [Done1]),
                    ok;
                false ->
                    run_batches(PropFun, Deadline, Opts, Done1)
            end;
        Failed ->
            ct:fail({property_failed_after, Done, tests, counterexample, Failed})
    end.

%%--------------------------------------------------------------------
%% Properties

prop_sequential() ->
    proper:forall(
      proper_statem:commands(?MODULE),
      fun(Cmds) ->
              fresh_dict(),
              {History, State, Result} = proper_statem:run_commands(?MODULE, Cmds),
              proper:whenfail(
                fun() ->
                        io:format("commands: ~p~nhistory: ~p~nmodel: ~p~nresult: ~p~n",
                                  [Cmds, History, State, Result])
                end,
                fun() -> Result =:= ok end)
      end).

prop_parallel() ->
    proper:forall(
      proper_statem:parallel_commands(?MODULE),
      fun(Cmds) ->
              fresh_dict(),
              {Seq, Par, Result} = proper_statem:run_parallel_commands(?MODULE, Cmds),
              proper:whenfail(
                fun() ->
                        io:format("commands: ~p~nsequential part: ~p~nbranches: ~p~nresult: ~p~n",
                                  [Cmds, Seq, Par, Result])
                end,
                fun() -> Result =:= ok end)
      end).

%% Each PropEr test gets an empty dict of its own; the commands find it here
%% (the parallel branches run in processes of their own).
fresh_dict() ->
    case persistent_term:get({?MODULE, sd}, undefined) of
        undefined -> ok;
        Old -> ok = py:shared_dict_destroy(Old)
    end,
    {ok, SD} = py:shared_dict_new(),
    persistent_term:put({?MODULE, sd}, SD).

sd() ->
    persistent_term:get({?MODULE, sd}).

%%--------------------------------------------------------------------
%% The commands, as run on the real dict. Every exception becomes a result
%% ({exception, Class, Reason}) that no postcondition accepts, so PropEr
%% reports it as an ordinary counterexample, shrunk, with its history. (It
%% also has to: when a property raises, Debian's PropEr 1.2 calls
%% erlang:get_stacktrace/0, which OTP 23 removed, and dies with undef.) The
%% one error the model expects, update_counter's badarg, is {error, badarg}.

sd_get(K) -> guard(fun() -> py:shared_dict_get(sd(), K) end).
sd_set(K, V) -> guard(fun() -> py:shared_dict_set(sd(), K, V) end).
sd_del(K) -> guard(fun() -> py:shared_dict_del(sd(), K) end).
sd_keys() -> guard(fun() -> py:shared_dict_keys(sd()) end).

sd_update_counter(K, Incr) ->
    guard(fun() ->
                  try py:shared_dict_update_counter(sd(), K, Incr)
                  catch error:badarg -> {error, badarg}
                  end
          end).

sd_compare_and_swap(K, Old, New) ->
    guard(fun() -> py:shared_dict_compare_and_swap(sd(), K, Old, New) end).

guard(F) ->
    ok = ensure_port(),
    try F()
    catch Class:Reason -> {exception, Class, Reason}
    end.

%%--------------------------------------------------------------------
%% proper_statem callbacks. The model: [{Key, Value as get/2 returns it}] in
%% insertion order (overwriting keeps a key's place, deleting forgets it).

initial_state() -> [].

command(S) ->
    Key = proper_types:elements(?KEYS),
    Value = proper_types:elements(values()),
    Old = proper_types:oneof([absent, Value | [proper_types:elements([V || {_, V} <- S]) || S =/= []]]),
    Incr = proper_types:elements([1, -1, 3, 1 bsl 65, -(1 bsl 65), 1.5]),
    proper_types:frequency(
      [{4, {call, ?MODULE, sd_get, [Key]}},
       {4, {call, ?MODULE, sd_set, [Key, Value]}},
       {2, {call, ?MODULE, sd_del, [Key]}},
       {1, {call, ?MODULE, sd_keys, []}},
       {4, {call, ?MODULE, sd_update_counter, [Key, Incr]}},
       {4, {call, ?MODULE, sd_compare_and_swap, [Key, Old, Value]}}]).

%% Plain values: integers (a big one too), a float, binaries, lists, tuples,
%% maps with binary keys, and two that get/2 returns in another form (an atom,
%% a map with an atom key), plus a counter-friendly 0.
values() ->
    [0, 1, -5, 1 bsl 70, 1.0, <<"bin">>, <<>>, [1, 2], [<<"a">>, [3]], {1, <<"t">>},
     #{<<"k">> => 1}, #{<<"k">> => [1, <<"x">>]}, #{k => 1}, hello].

precondition(_S, _Call) -> true.

next_state(S, _Res, {call, _, sd_set, [K, V]}) -> store(S, K, normalise(V));
next_state(S, _Res, {call, _, sd_del, [K]}) -> lists:keydelete(K, 1, S);
next_state(S, _Res, {call, _, sd_update_counter, [K, Incr]}) ->
    case counter(S, K, Incr) of
        {error, badarg} -> S;
        New -> store(S, K, New)
    end;
next_state(S, _Res, {call, _, sd_compare_and_swap, [K, Old, New]}) ->
    case swaps(S, K, Old) of
        true -> store(S, K, normalise(New));
        false -> S
    end;
next_state(S, _Res, _Call) -> S.

postcondition(S, {call, _, sd_get, [K]}, R) ->
    case lists:keyfind(K, 1, S) of
        {K, V} -> R =:= V;
        false -> R =:= undefined
    end;
postcondition(_S, {call, _, sd_set, _}, R) -> R =:= ok;
postcondition(_S, {call, _, sd_del, _}, R) -> R =:= ok;
postcondition(S, {call, _, sd_keys, []}, R) -> R =:= [K || {K, _} <- S];
postcondition(S, {call, _, sd_update_counter, [K, Incr]}, R) -> R =:= counter(S, K, Incr);
postcondition(S, {call, _, sd_compare_and_swap, [K, Old, _New]}, R) -> R =:= swaps(S, K, Old).

%% The new value of update_counter, or {error, badarg}.
counter(_S, _K, Incr) when not is_integer(Incr) -> {error, badarg};
counter(S, K, Incr) ->
    case lists:keyfind(K, 1, S) of
        false -> Incr;
        {K, V} when is_integer(V) -> V + Incr;
        {K, _} -> {error, badarg}
    end.

swaps(S, K, absent) -> not lists:keymember(K, 1, S);
swaps(S, K, Old) ->
    case lists:keyfind(K, 1, S) of
        {K, V} -> V =:= Old;
        false -> false
    end.

store(S, K, V) ->
    case lists:keymember(K, 1, S) of
        true -> lists:keyreplace(K, 1, S, {K, V});
        false -> S ++ [{K, V}]
    end.

%% What get/2 returns for a value set from Erlang (README's conversion table,
%% for the kinds of values above).
normalise(A) when is_atom(A), A =/= true, A =/= false, A =/= undefined -> atom_to_binary(A, utf8);
normalise(L) when is_list(L) -> [normalise(X) || X <- L];
normalise(T) when is_tuple(T) -> list_to_tuple(normalise(tuple_to_list(T)));
normalise(M) when is_map(M) -> maps:from_list([{normalise(K), normalise(V)} || {K, V} <- maps:to_list(M)]);
normalise(X) -> X.
