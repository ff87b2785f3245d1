%% SharedDict at ETS speed: the atomic operations (update_counter,
%% compare_and_swap) from Erlang and Python, the Erlang-side read cache (what
%% invalidates it, what drops it, its stats and its size bound), the
%% consistency promised across the two sides, and the decoding of values only
%% Python can decode (user classes) on a small pool that writes off a decoder
%% that hangs, so that only the callers asking for that value wait.
%%
%% Python helpers are in shared_dict_atomic_SUITE_data/sd_atomic.py.
-module(shared_dict_atomic_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-import(pyport_ct_lib, [stat/1, now_ms/0, wait_until/3, wait_down/1, wait_waiting/1,
                        collect/2]).

%% Generous bound for anything that should happen "at once" on a loaded 2-core box.
-define(LIVENESS_MS, 10000).
%% Bound for the load cases (hundreds of thousands of operations).
-define(LOAD_MS, 100000).

-define(SD_STATS, [cache_hits, cache_misses, python_decodes, decode_queued, decode_stuck]).

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [%% update_counter
     update_counter_counts_from_missing_key,
     update_counter_big_integers,
     update_counter_badarg_on_non_integer_value,
     update_counter_badarg_on_bad_arguments,
     atomic_ops_on_destroyed_dict,
     %% compare_and_swap
     compare_and_swap_true_and_false,
     compare_and_swap_absent,
     compare_and_swap_compares_normalised_forms,
     compare_and_swap_badarg,
     compare_and_swap_zero_signs_follow_the_vm,
     %% both sides at once
     counter_from_both_sides_is_exact,
     cas_retry_from_both_sides_is_exact,
     %% the read cache
     writes_from_either_side_invalidate_the_cache,
     causal_order_with_warm_cache,
     causal_order_with_concurrent_reader,
     cached_value_gone_after_erlang_destroy,
     cached_value_gone_after_python_destroy,
     cached_value_gone_after_owner_death,
     cached_value_survives_a_port_restart,
     stats_shape,
     stats_counters_move,
     cache_bounded_by_cache_bytes,
     %% the GIL and Python decoding
     plain_values_do_not_wait_for_the_gil,
     hanging_decode_only_delays_its_callers].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

%% Cases that change the app env or leave Python threads hanging get a fresh
%% application (and port) afterwards, with the env as it was.
-define(RESTART_AFTER, [cache_bounded_by_cache_bytes, plain_values_do_not_wait_for_the_gil,
                        hanging_decode_only_delays_its_callers, cached_value_survives_a_port_restart]).

init_per_testcase(Case, Config0) ->
    Config = [{saved_env, pyport_ct_lib:save_env([shared_dict_timeout, shared_dict_cache_bytes])}
              | Config0],
    case Case of
        cache_bounded_by_cache_bytes ->
            %% 16 KiB: room for at most 16 of the 64 values of 1 KiB the case reads.
            ok = application:set_env(pyport, shared_dict_cache_bytes, 16384),
            ok = pyport_ct_lib:restart_app();
        _ ->
            ok
    end,
    ok = add_data_dir_to_sys_path(Config),
    Config.

end_per_testcase(Case, Config) ->
    Saved = ?config(saved_env, Config),
    case lists:member(Case, ?RESTART_AFTER) of
        true -> pyport_ct_lib:restore_env_and_restart(Saved);
        false -> pyport_ct_lib:restore_env(Saved)
    end,
    ok.

%% sd_atomic.py is in the data dir.
add_data_dir_to_sys_path(Config) ->
    DataDir = list_to_binary(?config(data_dir, Config)),
    ok = py:exec(<<"import sys\nif data_dir not in sys.path:\n    sys.path.insert(0, data_dir)\n">>,
                 #{data_dir => DataDir}).

uc(SD, Key, Incr) -> py:shared_dict_update_counter(SD, Key, Incr).
cas(SD, Key, Old, New) -> py:shared_dict_compare_and_swap(SD, Key, Old, New).
get(SD, Key) -> py:shared_dict_get(SD, Key).
set(SD, Key, Value) -> ok = py:shared_dict_set(SD, Key, Value).

%% The shared_dict part of py:stats().
sd_stats() ->
    maps:get(shared_dict, pyport_ct_lib:stats()).

%% How much each SharedDict counter moved from Before to After.
deltas(Before, After) ->
    maps:from_list([{K, maps:get(K, After) - maps:get(K, Before)} || K <- ?SD_STATS]).

%% Receives one {Tag, Pid, Result} per pid, with a bound fit for load cases.
collect_long(Tag, Pids) ->
    [receive {Tag, P, R} -> R
     after ?LOAD_MS -> ct:fail({no_result_from, P, Tag})
     end || P <- Pids].

new_sd() ->
    {ok, SD} = py:shared_dict_new(),
    SD.

%%--------------------------------------------------------------------
%% update_counter

%% A missing key counts from 0; every call returns the new value, which get reads back.
update_counter_counts_from_missing_key(_Config) ->
    SD = new_sd(),
    ?assertEqual(5, uc(SD, <<"c">>, 5)),
    ?assertEqual(3, uc(SD, <<"c">>, -2)),
    ?assertEqual(3, get(SD, <<"c">>)),
    ?assertEqual(0, uc(SD, <<"zero">>, 0)),
    %% an increment of 0 on a missing key stores 0: the key now exists
    ?assertEqual(0, py:shared_dict_get(SD, <<"zero">>, missing)),
    ?assertEqual(-1, uc(SD, <<"neg">>, -1)),
    %% counting onto an integer stored with set, and one stored from Python
    set(SD, <<"set">>, 40),
    ?assertEqual(42, uc(SD, <<"set">>, 2)),
    {ok, true} = py:call(sd_atomic, set_value, [SD, <<"py">>, 100]),
    ?assertEqual(101, uc(SD, <<"py">>, 1)),
    ?assertEqual(101, get(SD, <<"py">>)),
    %% Python reads the counter as an int
    ?assertEqual({ok, [101, <<"int">>]},
                 py:eval(<<"[__import__('erlang').SharedDict(h)['py'], "
                           "type(__import__('erlang').SharedDict(h)['py']).__name__]">>, #{h => SD})),
    ok = py:shared_dict_destroy(SD).

%% Increments and values of any size, across the 64-bit boundary both ways.
update_counter_big_integers(_Config) ->
    SD = new_sd(),
    Big = 1 bsl 100,
    ?assertEqual(Big, uc(SD, <<"b">>, Big)),
    ?assertEqual(2 * Big, uc(SD, <<"b">>, Big)),
    ?assertEqual(-1, uc(SD, <<"b">>, -(2 * Big) - 1)),
    set(SD, <<"edge">>, (1 bsl 63) - 1),
    ?assertEqual(1 bsl 63, uc(SD, <<"edge">>, 1)),
    ?assertEqual(1 bsl 64, uc(SD, <<"edge">>, 1 bsl 63)),
    set(SD, <<"nedge">>, -(1 bsl 63)),
    ?assertEqual(-(1 bsl 63) - 1, uc(SD, <<"nedge">>, -1)),
    {ok, true} = py:call(sd_atomic, set_value, [SD, <<"pybig">>, 1 bsl 200]),
    ?assertEqual((1 bsl 200) + 1, uc(SD, <<"pybig">>, 1)),
    ?assertEqual(1, uc(SD, <<"pybig">>, -(1 bsl 200))),
    ?assertEqual(1, get(SD, <<"pybig">>)),
    ok = py:shared_dict_destroy(SD).

%% A stored value that is not an integer raises badarg and stays as it was:
%% booleans and floats included, whichever side stored them.
update_counter_badarg_on_non_integer_value(_Config) ->
    SD = new_sd(),
    FromErlang = [{<<"true">>, true, true}, {<<"false">>, false, false},
                  {<<"float">>, 1.0, 1.0}, {<<"bin">>, <<"1">>, <<"1">>},
                  {<<"str">>, "1", "1"}, {<<"list">>, [1], [1]}, {<<"tuple">>, {1}, {1}},
                  {<<"map">>, #{}, #{}}, {<<"none">>, undefined, undefined},
                  {<<"atom">>, one, <<"one">>}],
    lists:foreach(fun({K, V, Read}) ->
                          set(SD, K, V),
                          ?assertError(badarg, uc(SD, K, 1)),
                          ?assertEqual({K, Read}, {K, get(SD, K)})
                  end, FromErlang),
    FromPython = [{<<"py_true">>, <<"True">>, true}, {<<"py_float">>, <<"1.5">>, 1.5},
                  {<<"py_str">>, <<"'1'">>, <<"1">>}],
    lists:foreach(fun({K, Expr, Read}) ->
                          ok = py:exec(<<"__import__('erlang').SharedDict(h)[k] = ", Expr/binary>>,
                                       #{h => SD, k => K}),
                          ?assertError(badarg, uc(SD, K, 1)),
                          ?assertEqual({K, Read}, {K, get(SD, K)})
                  end, FromPython),
    ok = py:shared_dict_destroy(SD).

%% A non-integer increment, a non-binary key or a non-handle raises badarg
%% and creates nothing.
update_counter_badarg_on_bad_arguments(_Config) ->
    SD = new_sd(),
    [?assertError(badarg, uc(SD, <<"k">>, I)) || I <- [1.0, <<"1">>, "1", one, [1], {1}, true]],
    [?assertError(badarg, uc(SD, K, 1)) || K <- [key, "key", 1, {<<"k">>}, [<<"k">>], <<1:3>>]],
    [?assertError(badarg, uc(H, <<"k">>, 1)) || H <- [foo, 123, <<"sd">>, make_ref(), self()]],
    ?assertEqual([], py:shared_dict_keys(SD)),
    ok = py:shared_dict_destroy(SD).

atomic_ops_on_destroyed_dict(_Config) ->
    SD = new_sd(),
    ?assertEqual(1, uc(SD, <<"k">>, 1)),
    ok = py:shared_dict_destroy(SD),
    ?assertError({shared_dict_destroyed, SD}, uc(SD, <<"k">>, 1)),
    ?assertError({shared_dict_destroyed, SD}, cas(SD, <<"k">>, 1, 2)),
    ?assertError({shared_dict_destroyed, SD}, cas(SD, <<"k">>, absent, 2)),
    ok.

%%--------------------------------------------------------------------
%% compare_and_swap

compare_and_swap_true_and_false(_Config) ->
    SD = new_sd(),
    set(SD, <<"k">>, 1),
    ?assertEqual(true, cas(SD, <<"k">>, 1, 2)),
    ?assertEqual(2, get(SD, <<"k">>)),
    %% a stale Old: nothing stored
    ?assertEqual(false, cas(SD, <<"k">>, 1, 3)),
    ?assertEqual(2, get(SD, <<"k">>)),
    %% =:=, not ==: 2.0 is not 2
    ?assertEqual(false, cas(SD, <<"k">>, 2.0, 4)),
    ?assertEqual(2, get(SD, <<"k">>)),
    %% New can be any storable value, Old any term
    ?assertEqual(true, cas(SD, <<"k">>, 2, [1, #{<<"a">> => {2, 3.5}}])),
    ?assertEqual(true, cas(SD, <<"k">>, [1, #{<<"a">> => {2, 3.5}}], <<"x">>)),
    ?assertEqual(<<"x">>, get(SD, <<"k">>)),
    %% a stored None reads back as undefined, so undefined matches it
    set(SD, <<"n">>, undefined),
    ?assertEqual(true, cas(SD, <<"n">>, undefined, 5)),
    ?assertEqual(5, get(SD, <<"n">>)),
    %% a value stored from Python compares in the form get/2 returns
    {ok, true} = py:call(sd_atomic, set_value, [SD, <<"py">>, #{<<"a">> => [1, 2]}]),
    ?assertEqual(false, cas(SD, <<"py">>, #{a => [1, 2]}, 0)),
    ?assertEqual(true, cas(SD, <<"py">>, #{<<"a">> => [1, 2]}, 0)),
    ?assertEqual(0, get(SD, <<"py">>)),
    ok = py:shared_dict_destroy(SD).

%% Old = absent: true (and stored) only when the key is absent.
compare_and_swap_absent(_Config) ->
    SD = new_sd(),
    ?assertEqual(true, cas(SD, <<"k">>, absent, 1)),
    ?assertEqual(1, get(SD, <<"k">>)),
    ?assertEqual(false, cas(SD, <<"k">>, absent, 2)),
    ?assertEqual(1, get(SD, <<"k">>)),
    %% a key holding None is present
    set(SD, <<"n">>, undefined),
    ?assertEqual(false, cas(SD, <<"n">>, absent, 2)),
    ?assertEqual(undefined, get(SD, <<"n">>)),
    %% the atom stored as a value reads back as a binary, so it never matches absent
    set(SD, <<"a">>, absent),
    ?assertEqual(false, cas(SD, <<"a">>, absent, 2)),
    ?assertEqual(true, cas(SD, <<"a">>, <<"absent">>, 2)),
    %% absent again once deleted
    ok = py:shared_dict_del(SD, <<"k">>),
    ?assertEqual(true, cas(SD, <<"k">>, absent, 3)),
    ?assertEqual(3, get(SD, <<"k">>)),
    ok = py:shared_dict_destroy(SD).

%% Old is compared with the value as get/2 returns it: atom keys and atom
%% values come back as binaries.
compare_and_swap_compares_normalised_forms(_Config) ->
    SD = new_sd(),
    set(SD, <<"m">>, #{host => 1}),
    ?assertEqual(false, cas(SD, <<"m">>, #{host => 1}, 2)),
    ?assertEqual(#{<<"host">> => 1}, get(SD, <<"m">>)),
    ?assertEqual(true, cas(SD, <<"m">>, #{<<"host">> => 1}, 2)),
    ?assertEqual(2, get(SD, <<"m">>)),
    set(SD, <<"a">>, hello),
    ?assertEqual(false, cas(SD, <<"a">>, hello, 1)),
    ?assertEqual(true, cas(SD, <<"a">>, <<"hello">>, 1)),
    %% an Erlang string is a list both ways
    set(SD, <<"s">>, "abc"),
    ?assertEqual(true, cas(SD, <<"s">>, "abc", 1)),
    %% py:bytes is stored as bytes and read as a binary
    set(SD, <<"b">>, py:bytes(<<"xyz">>)),
    ?assertEqual(true, cas(SD, <<"b">>, <<"xyz">>, 1)),
    ok = py:shared_dict_destroy(SD).

compare_and_swap_badarg(_Config) ->
    SD = new_sd(),
    [?assertError(badarg, cas(SD, K, absent, 1)) || K <- [key, "key", 1, {<<"k">>}, <<1:3>>]],
    [?assertError(badarg, cas(H, <<"k">>, absent, 1)) || H <- [foo, 123, <<"sd">>, self()]],
    ?assertEqual([], py:shared_dict_keys(SD)),
    ok = py:shared_dict_destroy(SD).

%%--------------------------------------------------------------------
%% Both sides at once

counter_from_both_sides_is_exact() ->
    [{timetrap, {seconds, 120}}].

%% 16 Erlang processes and 8 Python threads each add 1 to one counter 10,000
%% times at the same time: not one increment is lost.
counter_from_both_sides_is_exact(_Config) ->
    SD = new_sd(),
    N = 10000,
    Self = self(),
    Py = spawn_link(fun() ->
                            Self ! {py, self(), py:call(sd_atomic, incr_threads, [SD, <<"c">>, 8, N],
                                                        #{}, ?LOAD_MS)}
                    end),
    Erl = [spawn_link(fun() -> Self ! {erl, self(), erl_incr(SD, N, 0, [])} end)
           || _ <- lists:seq(1, 16)],
    ErlProblems = collect_long(erl, Erl),
    [PyResult] = collect_long(py, [Py]),
    ?assertEqual([], lists:append(ErlProblems)),
    ?assertEqual({ok, []}, PyResult),
    ?assertEqual(240000, get(SD, <<"c">>)),
    ok = py:shared_dict_destroy(SD).

%% Others only add too, so the values one process gets back strictly grow.
erl_incr(_SD, 0, _Last, Problems) ->
    lists:sublist(lists:reverse(Problems), 10);
erl_incr(SD, N, Last, Problems) ->
    V = uc(SD, <<"c">>, 1),
    P = case is_integer(V) andalso V > Last of
            true -> Problems;
            false -> [{not_growing, Last, V} | Problems]
        end,
    erl_incr(SD, N - 1, V, P).

cas_retry_from_both_sides_is_exact() ->
    [{timetrap, {seconds, 120}}].

%% 8 Erlang processes and 4 Python threads each add 1 to one counter 1,000
%% times with a read / compare_and_swap retry loop: the total is exact.
cas_retry_from_both_sides_is_exact(_Config) ->
    SD = new_sd(),
    N = 1000,
    set(SD, <<"c">>, 0),
    Self = self(),
    Py = spawn_link(fun() ->
                            Self ! {py, self(), py:call(sd_atomic, cas_threads, [SD, <<"c">>, 4, N],
                                                        #{}, ?LOAD_MS)}
                    end),
    Erl = [spawn_link(fun() -> Self ! {erl, self(), erl_cas_add(SD, N, [])} end)
           || _ <- lists:seq(1, 8)],
    ErlProblems = collect_long(erl, Erl),
    [PyResult] = collect_long(py, [Py]),
    ?assertEqual([], lists:append(ErlProblems)),
    ?assertEqual({ok, []}, PyResult),
    ?assertEqual(12000, get(SD, <<"c">>)),
    ok = py:shared_dict_destroy(SD).

erl_cas_add(_SD, 0, Problems) ->
    lists:sublist(lists:reverse(Problems), 10);
erl_cas_add(SD, N, Problems) ->
    Cur = get(SD, <<"c">>),
    case cas(SD, <<"c">>, Cur, Cur + 1) of
        true -> erl_cas_add(SD, N - 1, Problems);
        false -> erl_cas_add(SD, N, Problems);
        Other -> erl_cas_add(SD, N - 1, [{not_a_boolean, Other} | Problems])
    end.

%%--------------------------------------------------------------------
%% The read cache

%% A value read (and so cached) changes for Erlang readers as soon as either
%% side writes or deletes it, by every kind of write.
writes_from_either_side_invalidate_the_cache(_Config) ->
    SD = new_sd(),
    K = <<"k">>,
    Warm = fun(Expected) -> Expected = get(SD, K), Expected = get(SD, K) end,
    set(SD, K, 1),
    Warm(1),
    {ok, true} = py:call(sd_atomic, set_value, [SD, K, 2]),
    Warm(2),
    {ok, true} = py:call(sd_atomic, delete, [SD, K]),
    ?assertEqual(missing, py:shared_dict_get(SD, K, missing)),
    {ok, true} = py:call(sd_atomic, set_value, [SD, K, 3]),
    Warm(3),
    {ok, 4} = py:eval(<<"__import__('erlang').SharedDict(h).incr('k')">>, #{h => SD}),
    Warm(4),
    {ok, true} = py:eval(<<"__import__('erlang').SharedDict(h).compare_and_swap('k', 4, 5)">>,
                         #{h => SD}),
    Warm(5),
    set(SD, K, 6),
    Warm(6),
    ?assertEqual(7, uc(SD, K, 1)),
    Warm(7),
    ?assertEqual(true, cas(SD, K, 7, 8)),
    Warm(8),
    ok = py:shared_dict_del(SD, K),
    ?assertEqual(missing, py:shared_dict_get(SD, K, missing)),
    ok = py:shared_dict_destroy(SD).

causal_order_with_warm_cache() ->
    [{timetrap, {seconds, 120}}].

%% 10,000 rounds: a Python function stores n at k (directly or from a thread
%% it joins) and returns n; the Erlang caller, having got the reply, reads k
%% from a warm cache and sees at least n.
causal_order_with_warm_cache(_Config) ->
    SD = new_sd(),
    set(SD, <<"k">>, 0),
    0 = get(SD, <<"k">>),
    0 = get(SD, <<"k">>),
    ?assertEqual([], causal_rounds(SD, 1, 10000, none, [])),
    ok = py:shared_dict_destroy(SD).

causal_order_with_concurrent_reader() ->
    [{timetrap, {seconds, 120}}].

%% The same with another Erlang process reading k all the time (racing its
%% cache fills against the invalidations): the caller still sees at least n;
%% the reader, told n by the caller after the reply, sees at least n too, and
%% never sees k go back (Erlang-side reads are linearizable and k only grows).
causal_order_with_concurrent_reader(_Config) ->
    SD = new_sd(),
    set(SD, <<"k">>, 0),
    0 = get(SD, <<"k">>),
    Self = self(),
    Reader = spawn_link(fun() -> Self ! {reader, self(), reader_loop(SD, 0, [])} end),
    Mine = causal_rounds(SD, 1, 10000, Reader, []),
    Reader ! stop,
    [Theirs] = collect_long(reader, [Reader]),
    ?assertEqual({[], []}, {Mine, Theirs}),
    ok = py:shared_dict_destroy(SD).

causal_rounds(_SD, N, Max, _Reader, Bad) when N > Max ->
    lists:reverse(Bad);
causal_rounds(SD, N, Max, Reader, Bad) ->
    {ok, N} = py:call(sd_atomic, write_then_return, [SD, N]),
    V = get(SD, <<"k">>),
    is_pid(Reader) andalso (Reader ! {written, N}),
    Bad1 = case V >= N of
               true -> Bad;
               false when length(Bad) < 10 -> [{wrote, N, read, V} | Bad];
               false -> Bad
           end,
    causal_rounds(SD, N + 1, Max, Reader, Bad1).

reader_loop(SD, Last, Bad) ->
    receive
        stop -> lists:reverse(Bad);
        {written, N} ->
            V = get(SD, <<"k">>),
            reader_loop(SD, max(Last, V), note(V >= N andalso V >= Last, {told, N, read, V}, Bad))
    after 0 ->
            V = get(SD, <<"k">>),
            reader_loop(SD, max(Last, V), note(V >= Last, {went_back, Last, V}, Bad))
    end.

note(true, _What, Bad) -> Bad;
note(false, What, Bad) when length(Bad) < 10 -> [What | Bad];
note(false, _What, Bad) -> Bad.

%% A cached value does not outlive its dict: destroyed from Erlang...
cached_value_gone_after_erlang_destroy(_Config) ->
    SD = new_sd(),
    set(SD, <<"k">>, <<"v">>),
    <<"v">> = get(SD, <<"k">>),
    <<"v">> = get(SD, <<"k">>),
    ok = py:shared_dict_destroy(SD),
    ?assertError({shared_dict_destroyed, SD}, get(SD, <<"k">>)),
    ?assertError({shared_dict_destroyed, SD}, py:shared_dict_get(SD, <<"k">>, dflt)),
    pyport_ct_lib:assert_destroyed(SD).

%% ... from Python ...
cached_value_gone_after_python_destroy(_Config) ->
    SD = new_sd(),
    set(SD, <<"k">>, <<"v">>),
    <<"v">> = get(SD, <<"k">>),
    <<"v">> = get(SD, <<"k">>),
    {ok, true} = py:call(sd_atomic, destroy, [SD]),
    ?assertError({shared_dict_destroyed, SD}, get(SD, <<"k">>)),
    pyport_ct_lib:assert_destroyed(SD).

%% ... by its owner's death ...
cached_value_gone_after_owner_death(_Config) ->
    Self = self(),
    Owner = spawn(fun() ->
                          SD = new_sd(),
                          set(SD, <<"k">>, <<"v">>),
                          Self ! {sd, self(), SD},
                          receive stop -> ok end
                  end),
    [SD] = collect(sd, [Owner]),
    <<"v">> = get(SD, <<"k">>),
    <<"v">> = get(SD, <<"k">>),
    %% monitored before the kill, so the DOWN carries the real reason
    Mon = erlang:monitor(process, Owner),
    exit(Owner, kill),
    receive {'DOWN', Mon, process, Owner, killed} -> ok
    after ?LIVENESS_MS -> ct:fail(owner_did_not_die)
    end,
    wait_until(fun() ->
                       try get(SD, <<"k">>) of
                           V -> {still_read, V}
                       catch
                           error:{shared_dict_destroyed, SD} -> true
                       end
               end, ?LIVENESS_MS, cached_value_dropped),
    pyport_ct_lib:assert_destroyed(SD).

%% A port restart (its OS process killed) destroys nothing: the dict and its cached value
%% live on, and a Python-side change made in the new port is seen through the cache.
cached_value_survives_a_port_restart(_Config) ->
    SD = new_sd(),
    set(SD, <<"k">>, <<"v">>),
    <<"v">> = get(SD, <<"k">>),
    <<"v">> = get(SD, <<"k">>),
    OsPid = stat(os_pid),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    wait_until(fun() -> not pyport_ct_lib:os_alive(OsPid) end, ?LIVENESS_MS, port_killed),
    wait_until(fun() -> catch stat(os_pid) =/= OsPid end, ?LIVENESS_MS, port_restarted),
    ok = pyport_ct_lib:wait_ready(),
    ?assertEqual(<<"v">>, get(SD, <<"k">>)),
    ?assertEqual(<<"v">>, get(SD, <<"k">>)),
    ok = py:exec(<<"__import__('erlang').SharedDict(sd)['k'] = 'w'">>, #{sd => SD}),
    ?assertEqual(<<"w">>, get(SD, <<"k">>)).

%% py:stats() has a shared_dict map with the cache and decoding counters.
stats_shape(_Config) ->
    {ok, #{shared_dict := M}} = py:stats(),
    ?assert(is_map(M)),
    Bad = [{K, maps:get(K, M, missing)} || K <- ?SD_STATS,
                                           not (is_integer(maps:get(K, M, missing))
                                                andalso maps:get(K, M) >= 0)],
    ?assertEqual([], Bad).

%% A first read is a cache miss, a second one a hit; reading a user-class
%% value decodes it in Python once.
stats_counters_move(_Config) ->
    SD = new_sd(),
    set(SD, <<"k">>, #{a => 1}),
    S0 = sd_stats(),
    #{<<"a">> := 1} = get(SD, <<"k">>),
    S1 = sd_stats(),
    ?assertMatch(#{cache_misses := 1, cache_hits := 0}, deltas(S0, S1)),
    #{<<"a">> := 1} = get(SD, <<"k">>),
    S2 = sd_stats(),
    ?assertMatch(#{cache_misses := 0, cache_hits := 1}, deltas(S1, S2)),
    {ok, true} = py:call(sd_atomic, store_quick, [SD, <<"q">>]),
    S3 = sd_stats(),
    ?assertEqual({python_object, <<"sd_atomic.Quick">>, <<"Quick(7)">>}, get(SD, <<"q">>)),
    S4 = sd_stats(),
    ?assertMatch(#{python_decodes := 1}, deltas(S3, S4)),
    ok = py:shared_dict_destroy(SD).

%% shared_dict_cache_bytes bounds the cache (16 KiB here, set by
%% init_per_testcase): of 64 values of 1 KiB read twice in a row, at most 16
%% can be hits the second time; a small value still is one.
cache_bounded_by_cache_bytes(_Config) ->
    SD = new_sd(),
    set(SD, <<"small">>, 1),
    1 = get(SD, <<"small">>),
    S0 = sd_stats(),
    1 = get(SD, <<"small">>),
    ?assertMatch(#{cache_hits := 1}, deltas(S0, sd_stats())),
    Keys = [<<"big", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 64)],
    Values = [<<I:32, (binary:copy(<<I>>, 1020))/binary>> || I <- lists:seq(1, 64)],
    KVs = lists:zip(Keys, Values),
    [set(SD, K, V) || {K, V} <- KVs],
    [V = get(SD, K) || {K, V} <- KVs],
    S1 = sd_stats(),
    [V = get(SD, K) || {K, V} <- KVs],
    #{cache_misses := Misses} = deltas(S1, sd_stats()),
    ?assert(Misses >= 48),
    ok = py:shared_dict_destroy(SD).

%%--------------------------------------------------------------------
%% The GIL and Python decoding

%% While Python holds the GIL in one long C call, Erlang-side get, set and
%% update_counter of plain values (stored from either side, cached or not)
%% all answer within shared_dict_timeout. The port is killed afterwards
%% (nothing else stops that call) and end_per_testcase restarts the app.
plain_values_do_not_wait_for_the_gil(_Config) ->
    SD = new_sd(),
    set(SD, <<"e_int">>, 1),
    set(SD, <<"e_map">>, #{a => [1, 2]}),
    set(SD, <<"c">>, 0),
    {ok, true} = py:call(sd_atomic, store_plain_values, [SD]),
    1 = get(SD, <<"e_int">>),                    % cached; the others are not yet
    OsPid = stat(os_pid),
    Self = self(),
    %% It stores "hog" just before the long sum, so once Erlang reads it the
    %% GIL is held.
    Hog = spawn(fun() ->
                        Self ! {hog, self(),
                                py:eval(<<"__import__('erlang').SharedDict(h).__setitem__('hog', 1)"
                                          " or sum(range(10**10))">>, #{h => SD}, infinity)}
                end),
    wait_until(fun() -> get(SD, <<"hog">>) =:= 1 end, ?LIVENESS_MS, gil_holder_started),
    Expected = #{<<"e_int">> => 1, <<"e_map">> => #{<<"a">> => [1, 2]}, <<"py_int">> => 12345,
                 <<"py_list">> => [1, <<"two">>, 3.5, undefined, true],
                 <<"py_map">> => #{<<"a">> => [1, 2], <<"b">> => #{<<"c">> => <<"d">>}}},
    Ops = lists:append(
            [[fun() -> {get, K, get(SD, K) =:= V} end || {K, V} <- maps:to_list(Expected)],
             [fun() -> {set, py:shared_dict_set(SD, <<"s">>, #{n => 1}) =:= ok} end],
             [fun() -> {update_counter, is_integer(uc(SD, <<"c">>, 1))} end]]),
    T0 = now_ms(),
    Results = [(lists:nth(I rem length(Ops) + 1, Ops))() || I <- lists:seq(1, 100)],
    ct:log("100 SharedDict operations took ~b ms while Python held the GIL", [now_ms() - T0]),
    ?assertEqual([], [R || R <- Results, element(tuple_size(R), R) =/= true]),
    ?assertEqual(14 + 1, uc(SD, <<"c">>, 1)),
    %% the GIL was held all along: the sum has not finished
    ?assert(is_process_alive(Hog)),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    _ = wait_down(Hog),
    ok.

%% Two values whose decoding hangs (their __reduce__ makes unpickling sleep
%% for 100,000 s) are read by two Erlang processes: those two get
%% {pyport_timeout, SD} after shared_dict_timeout; meanwhile plain gets and
%% sets work, a third user-class value still decodes, ordinary calls work and
%% the stats count a stuck decoder.
hanging_decode_only_delays_its_callers(_Config) ->
    SD = new_sd(),
    {ok, true} = py:call(sd_atomic, store_user_values, [SD]),
    set(SD, <<"plain">>, 1),
    ok = application:set_env(pyport, shared_dict_timeout, 1000),
    Self = self(),
    Readers = [spawn_link(fun() ->
                                  R = try get(SD, K) of
                                          V -> {value, V}
                                      catch
                                          error:E -> {error, E}
                                      end,
                                  Self ! {read, self(), R}
                          end) || K <- [<<"hang1">>, <<"hang2">>]],
    %% the readers have read the 1 s timeout and are waiting for the values
    wait_waiting(Readers),
    ok = application:set_env(pyport, shared_dict_timeout, ?LIVENESS_MS),
    ?assertEqual(1, get(SD, <<"plain">>)),
    set(SD, <<"plain">>, 2),
    ?assertEqual(2, get(SD, <<"plain">>)),
    ?assertEqual({python_object, <<"sd_atomic.Quick">>, <<"Quick(7)">>}, get(SD, <<"quick">>)),
    ?assertEqual([{error, {pyport_timeout, SD}}, {error, {pyport_timeout, SD}}],
                 collect(read, Readers)),
    ?assertEqual({ok, 2.0}, py:call(math, sqrt, [4.0])),
    wait_until(fun() ->
                       case sd_stats() of
                           #{decode_stuck := N} when N >= 1 -> true;
                           Other -> Other
                       end
               end, ?LIVENESS_MS, decode_stuck_counted),
    ?assertEqual(3, uc(SD, <<"plain">>, 1)),
    ok.

%% Old is compared with =:= as this VM has it: before OTP 27, 0.0 =:= -0.0.
compare_and_swap_zero_signs_follow_the_vm(_Config) ->
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"z">>, -0.0),
    Expected = (0.0 =:= -0.0),
    ?assertEqual(Expected, py:shared_dict_compare_and_swap(SD, <<"z">>, 0.0, 1)),
    ok = py:shared_dict_destroy(SD).
