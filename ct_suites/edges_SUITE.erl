%% The edges of the README's promises, through the Erlang API: each number,
%% bound, default and growth at the limit and one past it, operations repeated
%% after completion, and truncated and overlong input. Each case names the
%% mutant it was checked against (docs/PROMISES.md, "boundary" column; the
%% hand-written mutants are in mutants/erlang/).
-module(edges_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([restart_backoff_grows_gap_by_gap/1,
         cache_bytes_at_and_one_past_the_bound/1,
         second_await_after_a_finished_result_is_badarg/1,
         truncated_and_overlong_utf8_is_badarg_everywhere/1,
         restart_only_past_max_abandoned_workers/1,
         max_threads_counts_written_off_threads/1,
         decimal_digits_round_trip_exactly/1,
         timeout_argument_bounds/1,
         call_timeout_applies_to_call_eval_await_not_exec/1,
         max_in_flight_at_and_one_past/1,
         max_frame_bytes_at_and_one_past/1,
         stream_window_at_and_one_past/1,
         conversion_edges/1,
         repeated_operations_after_completion/1,
         shared_dict_shortest_and_longest_keys/1]).

-import(pyport_ct_lib, [stat/1, wait_until/3, now_ms/0]).

-define(LIVENESS_MS, 10000).
%% shared_dict_cache_bytes of cache_bytes_at_and_one_past_the_bound
-define(CACHE_BOUND, 4096).
%% max_frame_bytes of max_frame_bytes_at_and_one_past
-define(FRAME_MAX, 65536).
%% The largest timeout `receive ... after' takes.
-define(MAX_TIMEOUT, 16#FFFFFFFF).
%% A module whose calls wait for a file (max_in_flight_at_and_one_past).
-define(FLAG_PY, <<"import os, sys, time, types\n"
                   "m = types.ModuleType('edges_flag')\n"
                   "def wait(flag, n):\n"
                   "    t = time.monotonic()\n"
                   "    while not os.path.exists(flag) and time.monotonic() - t < 60:\n"
                   "        time.sleep(0.005)\n"
                   "    return n * 2\n"
                   "m.wait = wait\n"
                   "sys.modules['edges_flag'] = m\n">>).

%% A module whose calls wait for a gate (second_await_after_a_finished_result_is_badarg).
-define(GATE_PY, <<"import sys, types, threading\n"
                   "m = types.ModuleType('edges_gate')\n"
                   "m.gate = threading.Event()\n"
                   "def gated(x):\n    m.gate.wait(30)\n    m.gate.clear()\n    return x * 2\n"
                   "m.gated = gated\n"
                   "sys.modules['edges_gate'] = m\n">>).


suite() ->
    [{timetrap, {seconds, 90}}].

all() ->
    [restart_backoff_grows_gap_by_gap,
     cache_bytes_at_and_one_past_the_bound,
     second_await_after_a_finished_result_is_badarg,
     truncated_and_overlong_utf8_is_badarg_everywhere,
     restart_only_past_max_abandoned_workers,
     max_threads_counts_written_off_threads,
     decimal_digits_round_trip_exactly,
     timeout_argument_bounds,
     call_timeout_applies_to_call_eval_await_not_exec,
     max_in_flight_at_and_one_past,
     max_frame_bytes_at_and_one_past,
     stream_window_at_and_one_past,
     conversion_edges,
     repeated_operations_after_completion,
     shared_dict_shortest_and_longest_keys].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

%% App env a case runs with, set before a fresh start of the application.
case_env(restart_backoff_grows_gap_by_gap) ->
    [{restart_backoff_max, 800}];
case_env(cache_bytes_at_and_one_past_the_bound) ->
    [{shared_dict_cache_bytes, ?CACHE_BOUND}];
case_env(restart_only_past_max_abandoned_workers) ->
    [{abandon_after_ms, 300}, {max_abandoned_workers, 2}];
case_env(max_threads_counts_written_off_threads) ->
    [{workers, 1}, {max_workers, 16}, {max_threads, 3}, {abandon_after_ms, 300}];
case_env(max_in_flight_at_and_one_past) ->
    [{max_in_flight, 3}];
case_env(max_frame_bytes_at_and_one_past) ->
    [{max_frame_bytes, ?FRAME_MAX}];
case_env(_) ->
    [].

%% Keys a case changes (restored afterwards).
case_keys(restart_backoff_grows_gap_by_gap) -> [pyport_executable, restart_backoff_max];
case_keys(call_timeout_applies_to_call_eval_await_not_exec) -> [call_timeout];
case_keys(Case) -> [K || {K, _} <- case_env(Case)].

init_per_testcase(Case, Config) ->
    Saved = pyport_ct_lib:save_env(case_keys(Case)),
    case case_env(Case) of
        [] -> ok;
        Env ->
            ok = pyport_ct_lib:stop_app(),
            [ok = application:set_env(pyport, K, V) || {K, V} <- Env],
            case Case of
                restart_backoff_grows_gap_by_gap -> ok;   % the case starts it
                _ -> _ = pyport_ct_lib:start_app()
            end
    end,
    [{saved_env, Saved} | Config].

end_per_testcase(Case, Config) ->
    _ = logger:remove_handler(edges_capture),
    case case_env(Case) of
        [] -> pyport_ct_lib:restore_env(?config(saved_env, Config));
        _ -> pyport_ct_lib:restore_env_and_restart(?config(saved_env, Config))
    end.

%%--------------------------------------------------------------------
%% Restart back-off (README "Failure semantics": restarts back off
%% exponentially, up to restart_backoff_max)

%% A port that keeps dying before it is ready is restarted at once the first
%% time, then after 100, 200, 400 ms, ... up to restart_backoff_max (800 here):
%% each gap measured on its own, from the time each port program started
%% (a wrapper script writes it down before it runs the real binary with a
%% flag it refuses). A timer never fires early, so each gap is at least its
%% delay; the gaps at the cap are checked against the uncapped doubling.
%% Mutant: the failure counter never grows (every delay 100 ms).
restart_backoff_grows_gap_by_gap(Config) ->
    Dir = ?config(priv_dir, Config),
    Starts = filename:join(Dir, "starts_" ++ integer_to_list(erlang:unique_integer([positive]))),
    Script = filename:join(Dir, "pyport_bad_flag_stamped.sh"),
    ok = file:write_file(Script, ["#!/bin/sh\ndate +%s%N >> '", Starts, "'\nexec '",
                                  real_binary(), "' --no-such-flag \"$@\"\n"]),
    ok = file:change_mode(Script, 8#755),
    ok = application:set_env(pyport, pyport_executable, Script),
    {ok, _} = application:ensure_all_started(pyport),
    Stamps = wait_until(fun() ->
                                case start_stamps(Starts) of
                                    S when length(S) >= 7 -> {true, lists:sublist(S, 7)};
                                    S -> {starts, length(S)}
                                end
                        end, 30000, seven_port_starts),
    ok = pyport_ct_lib:stop_app(),
    Gaps = gaps(Stamps),
    ct:log("gaps between port starts (ms): ~p", [Gaps]),
    %% at once, 100, 200, 400, 800 (at the cap), 800 (one past it: 1600 uncapped)
    Delays = [0, 100, 200, 400, 800, 800],
    ?assertEqual([], [{N, Gap, Delay} || {N, Gap, Delay} <- lists:zip3(lists:seq(1, 6), Gaps, Delays),
                                         Gap < Delay]),
    %% The last gap is the capped delay, not the doubled one (1600 ms): a
    %% start never takes 800 ms longer than its delay, even on a busy machine.
    ?assert(lists:last(Gaps) < 1600, Gaps).

start_stamps(File) ->
    case file:read_file(File) of
        {ok, Bin} ->
            [binary_to_integer(L) div 1000000
             || L <- binary:split(Bin, <<"\n">>, [global, trim_all])];
        {error, enoent} ->
            []
    end.

gaps([A, B | Rest]) -> [B - A | gaps([B | Rest])];
gaps(_) -> [].

real_binary() ->
    filename:join([filename:dirname(filename:dirname(code:which(pyport_server))),
                   "priv", "pyport"]).

%%--------------------------------------------------------------------
%% SharedDict read cache (README "Speed and consistency": bounded by
%% shared_dict_cache_bytes)

%% `cache_bytes' never exceeds `shared_dict_cache_bytes': entries that fill the
%% cache exactly to the bound are all kept (and answer later gets), one byte
%% past it empties the cache before the new entry goes in; a single entry of
%% exactly the bound is cached, one of a byte more is not.
%% Mutants: the bound checked before adding the new entry's size (the cache
%% then holds more than the bound); `>=' for `>' (a full cache emptied at the
%% bound); a lone entry of exactly the bound refused.
cache_bytes_at_and_one_past_the_bound(_Config) ->
    ?assertEqual(?CACHE_BOUND, maps:get(shared_dict_cache_bytes, stat(config))),
    {ok, SD} = py:shared_dict_new(),
    %% What an entry costs beyond its value's bytes, measured on an empty value.
    ok = py:shared_dict_set(SD, <<"k0">>, <<>>),
    <<>> = py:shared_dict_get(SD, <<"k0">>),
    #{cache_bytes := Fixed, cache_entries := 1} = cache(),
    ok = py:shared_dict_del(SD, <<"k0">>),
    #{cache_bytes := 0, cache_entries := 0} = cache(),
    %% A value of N bytes under a two-byte key makes an entry of Fixed + N bytes.
    Put = fun(Key, EntrySize) ->
                  V = binary:copy(<<"v">>, EntrySize - Fixed),
                  ok = py:shared_dict_set(SD, Key, V),
                  V
          end,
    Get = fun(Key, V) ->
                  ?assertEqual(V, py:shared_dict_get(SD, Key)),
                  #{cache_bytes := Bytes} = C = cache(),
                  ?assert(Bytes =< ?CACHE_BOUND, {over_the_bound, Key, C}),
                  C
          end,
    %% At the bound: four entries of a quarter each are all kept.
    Quarter = ?CACHE_BOUND div 4,
    Full = [{K, Put(K, Quarter)} || K <- [<<"k1">>, <<"k2">>, <<"k3">>, <<"k4">>]],
    [Get(K, V) || {K, V} <- Full],
    ?assertMatch(#{cache_bytes := ?CACHE_BOUND, cache_entries := 4}, cache()),
    #{cache_hits := Hits0, cache_misses := Misses0} = cache(),
    [Get(K, V) || {K, V} <- Full],
    #{cache_hits := Hits1, cache_misses := Misses1} = cache(),
    ?assertEqual({4, 0}, {Hits1 - Hits0, Misses1 - Misses0}),
    %% One byte past the bound: the cache is emptied, then holds the new entry.
    ok = py:shared_dict_del(SD, <<"k4">>),
    ThreeQuarters = 3 * Quarter,
    ?assertMatch(#{cache_bytes := ThreeQuarters, cache_entries := 3}, cache()),
    QuarterAndOne = Quarter + 1,
    OnePast = Put(<<"k5">>, QuarterAndOne),
    ?assertMatch(#{cache_bytes := QuarterAndOne, cache_entries := 1}, Get(<<"k5">>, OnePast)),
    %% A single entry of exactly the bound is cached; one byte more is not.
    Whole = Put(<<"k6">>, ?CACHE_BOUND),
    ?assertMatch(#{cache_bytes := ?CACHE_BOUND, cache_entries := 1}, Get(<<"k6">>, Whole)),
    TooBig = Put(<<"k7">>, ?CACHE_BOUND + 1),
    ?assertMatch(#{cache_bytes := ?CACHE_BOUND, cache_entries := 1}, Get(<<"k7">>, TooBig)),
    #{cache_misses := Misses2} = cache(),
    Get(<<"k7">>, TooBig),
    ?assertMatch(#{cache_misses := M} when M =:= Misses2 + 1, cache()),
    ok = py:shared_dict_destroy(SD).

cache() ->
    maps:get(shared_dict, pyport_ct_lib:stats()).

%%--------------------------------------------------------------------
%% await (README "Asynchronous calls": only once, any other await is badarg)

%% Whichever way the result reached the caller, a second await is badarg:
%% - the result was in before the await (the holder hands it over at once);
%% - the await waited for it (the holder hands it over when it comes);
%% - `await(Ref, 0)' found it in.
%% Mutants: the holder keeps serving awaits after handing over a result that
%% was in; after handing over one it waited for.
second_await_after_a_finished_result_is_badarg(_Config) ->
    %% A module whose calls wait for a gate that another process opens; made
    %% and opened from other processes, so this one has no namespace (its
    %% calls would otherwise queue behind the gated one on its home thread).
    {ok, _} = in_process(fun() -> py:exec(?GATE_PY) end),
    %% in before the await: the holder holds it when the await comes
    In = gated_call(8),
    {ok, _} = open_gate(),
    ok = wait_until(fun() -> holder_holds_result(In) end, ?LIVENESS_MS, result_held),
    ?assertEqual({ok, 16}, py:await(In)),
    ?assertError(badarg, py:await(In)),
    ?assertError(badarg, py:await(In, 0)),
    %% awaited while it runs: the gate opens once this process waits in the await
    Waited = gated_call(21),
    Self = self(),
    _ = spawn_link(fun() ->
                           ok = pyport_ct_lib:wait_waiting([Self]),
                           {ok, _} = open_gate()
                   end),
    ?assertEqual({ok, 42}, py:await(Waited)),
    ?assertError(badarg, py:await(Waited)),
    %% await(Ref, 0) of a result that is in
    Zero = gated_call(3),
    {ok, _} = open_gate(),
    ok = wait_until(fun() -> holder_holds_result(Zero) end, ?LIVENESS_MS, result_held),
    ?assertEqual({ok, 6}, py:await(Zero, 0)),
    ?assertError(badarg, py:await(Zero, 0)),
    pyport_ct_lib:assert_mailbox_empty().

%% A call that runs until the gate opens, once the server has it in flight.
gated_call(X) ->
    Ref = py:spawn_call(edges_gate, gated, [X]),
    ok = wait_until(fun() -> maps:get(pending, gen_server:call(pyport_server, stats)) >= 1 end,
                    ?LIVENESS_MS, request_in_flight),
    Ref.

open_gate() ->
    in_process(fun() -> py:call(edges_gate, 'gate.set', []) end).

in_process(Fun) ->
    case pyport_ct_lib:run_in_process(Fun) of
        ok -> {ok, undefined};
        Other -> Other
    end.

%% The server no longer has the request in flight (it has sent the reply) and
%% the holder is idle with nothing in its mailbox: it has taken the reply in
%% (white-box: the reference holds the holder's pid).
holder_holds_result(Ref) ->
    Holder = element(3, Ref),
    #{pending := Pending} = gen_server:call(pyport_server, stats),
    Pending =:= 0 andalso erlang:process_info(Holder, [status, message_queue_len])
        =:= [{status, waiting}, {message_queue_len, 0}].

%%--------------------------------------------------------------------
%% Argument checks (README "API": invalid UTF-8 in code, names, Kwargs and
%% Locals keys raises badarg at the call site)

%% Not just byte 255: a multi-byte sequence cut short at the end (the shortest
%% way to make text invalid), overlong encodings, UTF-16 surrogates and code
%% points past U+10FFFF, and strings holding such code points, are refused in
%% every argument that must be text, of every function that takes it. The
%% longest valid sequence (four bytes) is accepted in each.
%% Mutant: the check refuses only `{error, _, _}' and lets `{incomplete, _, _}'
%% (a truncated sequence) through.
truncated_and_overlong_utf8_is_badarg_everywhere(_Config) ->
    BadBins = [<<"1", 16#C3>>,                        % 2-byte sequence cut after 1
               <<"a", 16#E2, 16#82>>,                 % 3-byte cut after 2
               <<"a", 16#F0, 16#9F, 16#98>>,          % 4-byte cut after 3
               <<"a", 16#C0, 16#AF>>,                 % overlong '/'
               <<"a", 16#E0, 16#80, 16#AF>>,          % overlong, 3 bytes
               <<"a", 16#ED, 16#A0, 16#80>>,          % surrogate U+D800
               <<"a", 16#F4, 16#90, 16#80, 16#80>>,   % U+110000
               <<"a", 255>>],
    BadLists = [[$a, 16#D800], [$a, 16#110000], [$a, -1]],
    [assert_text_refused(Bad) || Bad <- BadBins ++ BadLists],
    %% the longest valid sequences (four bytes) are accepted everywhere: U+1F600
    %% in text, U+1D400 (a letter) in identifiers
    Smile = <<"k", 16#F0, 16#9F, 16#98, 16#80>>,
    {ok, #{Smile := 1}} = py:call(builtins, dict, [], #{Smile => 1}),
    {ok, #{Smile := 1}} = py:call(builtins, dict, [], [{Smile, 1}]),
    {ok, Smile} = py:eval(<<"'", Smile/binary, "'">>),
    {error, {python, 'ModuleNotFoundError', _, _}} = py:call(Smile, f, []),
    {error, {python, 'AttributeError', _, _}} = py:call(math, Smile, []),
    Letter = <<"k", 16#F0, 16#9D, 16#90, 16#80>>,
    {ok, 1} = py:eval(Letter, #{Letter => 1}),
    ok = py:exec(<<Letter/binary, " += 1">>, #{Letter => 1}),
    {ok, 2} = py:eval(Letter),
    ok.

%% `Bad' (a binary or a string) refused wherever text is required.
assert_text_refused(Bad) ->
    Code = text_join(<<"1 # ">>, Bad),
    Name = text_join(<<"os">>, Bad),
    Key = text_join(<<"k">>, Bad),
    Checks = [{eval_code, fun() -> py:eval(Code) end},
              {exec_code, fun() -> py:exec(Code) end},
              {call_module, fun() -> py:call(Name, getcwd, []) end},
              {call_function, fun() -> py:call(os, Name, []) end},
              {kwargs_map_key, fun() -> py:call(builtins, dict, [], #{Key => 1}) end},
              {kwargs_list_key, fun() -> py:call(builtins, dict, [], [{Key, 1}]) end},
              {eval_locals_key, fun() -> py:eval(<<"1">>, #{Key => 1}) end},
              {exec_locals_key, fun() -> py:exec(<<"pass">>, #{Key => 1}) end},
              {spawn_call_module, fun() -> py:spawn_call(Name, getcwd, []) end},
              {spawn_call_kwargs_key, fun() -> py:spawn_call(builtins, dict, [], #{Key => 1}) end},
              {cast_function, fun() -> py:cast(os, Name, []) end},
              {stream_module, fun() -> py:stream_start(Name, f, []) end},
              {stream_kwargs_key, fun() -> py:stream_start(builtins, iter, [[]], #{Key => 1}, #{}) end}],
    Passed = [{What, Bad, R} || {What, F} <- Checks, R <- [catch F()], not is_badarg(R)],
    ?assertEqual([], Passed).

is_badarg({'EXIT', {badarg, _}}) -> true;
is_badarg(_) -> false.

text_join(Prefix, Bad) when is_binary(Bad) -> <<Prefix/binary, Bad/binary>>;
text_join(Prefix, Bad) when is_list(Bad) -> binary_to_list(Prefix) ++ Bad.

%%--------------------------------------------------------------------
%% Written-off workers (README "Configuration": more written-off workers than
%% max_abandoned_workers restart the port; max_threads counts them)

%% With max_abandoned_workers = 2: two stuck workers are written off and the
%% port lives on (the second write-off is logged as within the limit); a third
%% restarts the port with exit status 6.
%% Mutant: `>=' for `>' (the port restarts at the limit).
restart_only_past_max_abandoned_workers(_Config) ->
    ok = pyport_ct_lib:capture_logs(edges_capture),
    OsPid = stat(os_pid),
    #{restarts := Restarts0} = gen_server:call(pyport_server, stats),
    stuck_calls(2),
    ok = wait_until(fun() -> logged_write_off(2) end, ?LIVENESS_MS, second_write_off_logged),
    ?assertEqual(2, stat(abandoned_workers)),
    ?assertEqual({ok, 2}, py:eval(<<"1 + 1">>)),
    ?assertEqual(OsPid, stat(os_pid)),
    ?assertMatch(#{restarts := Restarts0}, gen_server:call(pyport_server, stats)),
    %% one past the limit
    stuck_calls(1),
    ok = wait_until(fun() ->
                            maps:get(restarts, gen_server:call(pyport_server, stats)) > Restarts0
                    end, ?LIVENESS_MS, port_restarted),
    ?assertMatch(#{last_exit := {exit_status, 6}}, gen_server:call(pyport_server, stats)),
    ok = pyport_ct_lib:wait_ready(),
    ?assertEqual({ok, 2}, py:eval(<<"1 + 1">>)),
    ?assertNotEqual(OsPid, stat(os_pid)).

%% N calls stuck in C (time.sleep ignores the cancellation) from N processes
%% at once, each timing out after 200 ms.
stuck_calls(N) ->
    Self = self(),
    Pids = [spawn(fun() -> Self ! {stuck, self(), py:call(time, sleep, [60], #{}, 200)} end)
            || _ <- lists:seq(1, N)],
    ?assertEqual(lists:duplicate(N, {error, timeout}), pyport_ct_lib:collect(stuck, Pids)).

logged_write_off(N) ->
    Text = iolist_to_binary(io_lib:format("(~b written off, limit ", [N])),
    lists:any(fun(Line) -> pyport_ct_lib:has(Line, Text) end, pyport_ct_lib:logged()).

%% With max_threads = 3 and two threads written off (stuck in C), one more
%% thread may run: six callers that sleep are served by it alone, the port
%% holding exactly three worker threads (at the cap) and never four. The
%% threads are counted by the kernel (/proc/<pid>/task, by name), not by the
%% port's own counter, which a bug in the counting would skew as well.
%% Mutant: a written-off worker's thread stops counting against the cap.
max_threads_counts_written_off_threads(_Config) ->
    stuck_calls(2),
    ok = wait_until(fun() -> stat(abandoned_workers) =:= 2 end, ?LIVENESS_MS, two_written_off),
    OsPid = stat(os_pid),
    ?assertEqual(2, worker_threads(OsPid)),
    Self = self(),
    Pids = [spawn_link(fun() ->
                               Self ! {done, self(), py:call(time, sleep, [0.2], #{}, 30000)}
                       end) || _ <- lists:seq(1, 6)],
    Peak = peak_threads(OsPid, Pids, 0),
    ct:log("max_threads 3 with 2 written off: peak of ~b worker threads", [Peak]),
    ?assertEqual(3, Peak),
    ?assertEqual(2, stat(abandoned_workers)).

peak_threads(_OsPid, [], Peak) ->
    Peak;
peak_threads(OsPid, Pids, Peak) ->
    Now = worker_threads(OsPid),
    receive
        {done, Pid, Result} ->
            ?assertEqual({ok, undefined}, Result),
            peak_threads(OsPid, lists:delete(Pid, Pids), max(Peak, Now))
    after 20 ->
            peak_threads(OsPid, Pids, max(Peak, Now))
    end.

%% The port's worker threads alive now (hot workers and spares), by name.
worker_threads(OsPid) ->
    Dir = "/proc/" ++ integer_to_list(OsPid) ++ "/task",
    {ok, Tasks} = file:list_dir(Dir),
    length([T || T <- Tasks,
                 {ok, Comm} <- [file:read_file(filename:join([Dir, T, "comm"]))],
                 lists:member(string:trim(Comm), [<<"pyport-worker">>, <<"pyport-spare">>])]).

%%--------------------------------------------------------------------
%% Decimal (README "Type conversion": reversible tagged form, str(d))

%% Decimals keep every digit both ways, far past the 28 of Python's default
%% context: 32 digits, and the shortest and a 1000-digit one; from the tagged
%% form and from an Elixir %Decimal{}.
%% Mutant: the tagged form converted through the context (`+Decimal(t)'), which
%% rounds to 28 digits.
decimal_digits_round_trip_exactly(_Config) ->
    ok = py:exec(<<"import decimal">>),
    D32 = <<"1234567890123456.7890123456789012">>,
    Long = iolist_to_binary(["9.", lists:duplicate(999, $7)]),
    lists:foreach(
      fun(Text) ->
              Tagged = {'$pyport_decimal', Text},
              [Mantissa | _] = binary:split(Text, <<"E">>),
              Digits = length([C || <<C>> <= Mantissa, C >= $0, C =< $9]),
              ?assertEqual({ok, Tagged}, py:eval(<<"d">>, #{d => Tagged})),
              ?assertEqual({ok, Digits}, py:eval(<<"len(d.as_tuple().digits)">>, #{d => Tagged})),
              ?assertEqual({ok, true}, py:eval(<<"d == decimal.Decimal(t)">>, #{d => Tagged, t => Text})),
              ?assertEqual({ok, Tagged}, py:eval(<<"decimal.Decimal(t)">>, #{t => Text}))
      end, [D32, Long, <<"0">>, <<"-1E-32">>]),
    Struct = #{'__struct__' => 'Elixir.Decimal', sign => 1,
               coef => 12345678901234567890123456789012, exp => -16},
    ?assertEqual({ok, {'$pyport_decimal', D32}}, py:eval(<<"d">>, #{d => Struct})).

%%--------------------------------------------------------------------
%% Timeouts (README "API": Timeout arguments; default timeouts: call_timeout
%% for call and eval, infinity for exec)

%% Every function that takes a timeout takes 0 through 16#FFFFFFFF and
%% `infinity'; one past the largest, a negative one or a float is badarg, and an
%% await refused that way leaves its reference to be awaited.
%% Mutant: `<' for `=<' in the timeout guard (the largest timeout refused).
timeout_argument_bounds(_Config) ->
    [begin
         ?assertEqual({ok, 2.0}, py:call(math, sqrt, [4.0], #{}, T)),
         ?assertEqual({ok, 2}, py:eval(<<"1 + 1">>, #{}, T)),
         ?assertEqual(ok, py:exec(<<"pass">>, #{}, T)),
         ?assertEqual({ok, 3.0}, py:await(py:spawn_call(math, sqrt, [9.0]), T))
     end || T <- [?MAX_TIMEOUT, infinity]],
    %% 0: no time at all for work that takes some
    ?assertEqual({error, timeout}, py:eval(<<"__import__('time').sleep(0.5)">>, #{}, 0)),
    Ref = py:spawn_call(math, sqrt, [16.0]),
    [begin
         ?assertError(badarg, py:call(math, sqrt, [4.0], #{}, T)),
         ?assertError(badarg, py:eval(<<"1">>, #{}, T)),
         ?assertError(badarg, py:exec(<<"pass">>, #{}, T)),
         ?assertError(badarg, py:await(Ref, T))
     end || T <- [?MAX_TIMEOUT + 1, -1, 1.0, forever]],
    ?assertEqual({ok, 4.0}, py:await(Ref, ?MAX_TIMEOUT)).

%% With call_timeout 300 ms, call, eval and await give up at it; exec, whose
%% default is infinity, runs to its end (1 s).
%% Mutant: exec/2 defaults to call_timeout.
call_timeout_applies_to_call_eval_await_not_exec(_Config) ->
    ok = application:set_env(pyport, call_timeout, 300),
    ?assertEqual(300, maps:get(call_timeout, stat(config))),
    Sleep = <<"__import__('time').sleep(1)">>,
    ?assertEqual({error, timeout}, in_process(fun() -> py:eval(Sleep) end)),
    ?assertEqual({error, timeout}, in_process(fun() -> py:call(time, sleep, [1]) end)),
    ?assertEqual({error, timeout}, in_process(fun() -> py:await(py:spawn_call(time, sleep, [1])) end)),
    ?assertEqual({ok, undefined}, in_process(fun() -> py:exec(Sleep) end)),
    ?assertEqual({ok, undefined}, in_process(fun() -> py:exec(Sleep, #{}) end)).

%%--------------------------------------------------------------------
%% Back-pressure and request size (README "Configuration": max_in_flight,
%% max_frame_bytes)

%% With max_in_flight = 3: two requests in flight, a third is still taken (at
%% the limit); with three in flight, calls get {error, overloaded} and
%% SharedDict operations raise it, at once (one past); when they finish,
%% requests are taken again. The three wait for a file the test creates.
%% Mutant: `>' for `>=' (a fourth request taken).
max_in_flight_at_and_one_past(Config) ->
    ?assertEqual(3, maps:get(max_in_flight, stat(config))),
    Flag = filename:join(?config(priv_dir, Config),
                         "in_flight_" ++ integer_to_list(erlang:unique_integer([positive]))),
    {ok, _} = in_process(fun() -> py:exec(?FLAG_PY) end),
    Self = self(),
    Start = fun(N) ->
                    spawn_link(fun() ->
                                       Self ! {waited, self(), py:call(edges_flag, wait,
                                                                       [list_to_binary(Flag), N],
                                                                       #{}, 60000)}
                               end)
            end,
    First = [Start(N) || N <- [1, 2]],
    ok = wait_until(fun() -> pending() =:= 2 end, ?LIVENESS_MS, two_in_flight),
    Third = Start(3),
    ok = wait_until(fun() -> pending() =:= 3 end, ?LIVENESS_MS, third_taken_at_the_limit),
    try
        ?assertEqual({error, overloaded}, py:eval(<<"1">>)),
        ?assertEqual({error, overloaded}, py:call(math, sqrt, [4.0])),
        ?assertError(overloaded, py:shared_dict_new()),
        ?assertEqual(3, pending())
    after
        ok = file:write_file(Flag, <<>>)
    end,
    ?assertEqual([{ok, 2}, {ok, 4}, {ok, 6}], pyport_ct_lib:collect(waited, First ++ [Third])),
    ok = wait_until(fun() -> pending() =:= 0 end, ?LIVENESS_MS, none_in_flight),
    ?assertEqual({ok, 1}, py:eval(<<"1">>)).

pending() ->
    maps:get(pending, gen_server:call(pyport_server, stats)).

%% With max_frame_bytes = 64 KiB: a request of exactly 64 KiB is sent and
%% served (by the port too, which exits on a frame over its limit), one of a
%% byte more is refused in the caller with its size and nothing is sent.
%% Mutants: `>=' for `>' in the caller's check; the port's frame limit `>='.
max_frame_bytes_at_and_one_past(_Config) ->
    OsPid = stat(os_pid),
    ?assertEqual(?FRAME_MAX, maps:get(max_frame_bytes, stat(config))),
    %% A call's frame with an N-byte argument: N plus what surrounds it.
    {error, {request_too_large, Size, ?FRAME_MAX}} = py:call(builtins, len, [x(100000)]),
    N = ?FRAME_MAX - (Size - 100000),
    ?assertEqual({ok, N}, py:call(builtins, len, [x(N)])),
    Past = ?FRAME_MAX + 1,
    ?assertEqual({error, {request_too_large, Past, ?FRAME_MAX}}, py:call(builtins, len, [x(N + 1)])),
    ?assertEqual(OsPid, stat(os_pid)),
    ?assertMatch(#{restarts := 0}, gen_server:call(pyport_server, stats)).

x(N) ->
    binary:copy(<<"x">>, N).

%%--------------------------------------------------------------------
%% Streams (README "Streams": at most `window' items unacknowledged, option
%% `window', default 64)

-define(COUNTING_PY, <<"import sys, types\n"
                       "from erlang import SharedDict\n"
                       "m = types.ModuleType('edges_streams')\n"
                       "def counting(h):\n"
                       "    sd, n = SharedDict(h), 0\n"
                       "    while True:\n"
                       "        n += 1\n"
                       "        sd['produced'] = n\n"
                       "        yield n\n"
                       "m.counting = counting\n"
                       "sys.modules['edges_streams'] = m\n">>).

%% With `flow => ack', without acknowledgements exactly `window' items come
%% (1, 5, and 64 when the option is left out), and the generator is advanced
%% exactly that many times (one past the window, it would have been advanced
%% once more); each acknowledgement lets exactly one more through. Windows 1
%% and 2^20 are taken, 0 and 2^20 + 1 are badarg, as is acknowledging 0 items.
%% (The default `mailbox' flow's bound is erlang_python_compat_SUITE's.)
%% Mutants: a stream's first credit one more than its window; default window 65.
stream_window_at_and_one_past(_Config) ->
    {ok, _} = in_process(fun() -> py:exec(?COUNTING_PY) end),
    [window_holds(W, Opts#{flow => ack})
     || {W, Opts} <- [{1, #{window => 1}}, {5, #{window => 5}}, {64, #{}}]],
    {ok, SD} = py:shared_dict_new(),
    {ok, Big} = py:stream_start(edges_streams, counting, [SD], #{}, #{window => 1 bsl 20, flow => ack}),
    receive {py_stream, Big, {data, 1}} -> ok after ?LIVENESS_MS -> ct:fail(no_first_item) end,
    ok = py:stream_cancel(Big),
    [?assertError(badarg, py:stream_start(edges_streams, counting, [SD], #{}, #{window => W, flow => F}))
     || W <- [0, (1 bsl 20) + 1, -1, 1.0], F <- [ack, mailbox]],
    ?assertError(badarg, py:stream_ack(Big, 0)),
    ok = py:shared_dict_destroy(SD).

window_holds(W, Opts) ->
    {ok, SD} = py:shared_dict_new(),
    {ok, Ref} = py:stream_start(edges_streams, counting, [SD], #{}, Opts),
    ?assertEqual(lists:seq(1, W), [item(Ref) || _ <- lists:seq(1, W)]),
    %% The pulling job ends when the credit is spent: the generator has then
    %% been advanced exactly W times.
    ?assertEqual(W, produced_when_idle(SD)),
    ok = py:stream_ack(Ref),
    ?assertEqual(W + 1, item(Ref)),
    ?assertEqual(W + 1, produced_when_idle(SD)),
    ok = py:stream_ack(Ref, 2),
    ?assertEqual([W + 2, W + 3], [item(Ref), item(Ref)]),
    ?assertEqual(W + 3, produced_when_idle(SD)),
    ok = py:stream_cancel(Ref),
    ok = py:shared_dict_destroy(SD).

item(Ref) ->
    receive {py_stream, Ref, {data, I}} -> I
    after ?LIVENESS_MS -> ct:fail({no_item, Ref})
    end.

produced_when_idle(SD) ->
    ok = wait_until(fun() -> stat(busy_workers) =:= 0 end, ?LIVENESS_MS, stream_job_ended),
    py:shared_dict_get(SD, <<"produced">>).

%%--------------------------------------------------------------------
%% Conversion (README "Type conversion": integers of any size; UTF-8 binaries
%% are str, others bytes; floats)

%% Integers at the edge of each external-format width both ways, the last
%% one that fits 255 bytes (SMALL_BIG_EXT) and the first that does not
%% (LARGE_BIG_EXT); a binary that is valid UTF-8 up to a sequence cut short is
%% bytes, one that ends in a four-byte character is str; floats at their ends.
%% Mutant: LARGE_BIG_EXT decoded as SMALL_BIG_EXT.
conversion_edges(_Config) ->
    Ints = [(1 bsl 2040) - 1, 1 bsl 2040, -(1 bsl 2040), -((1 bsl 2040) - 1), (1 bsl 4096) + 1],
    [begin
         ?assertEqual({ok, I}, py:eval(<<"x">>, #{x => I})),
         ?assertEqual({ok, I}, py:eval(<<"int(s)">>, #{s => integer_to_binary(I)})),
         ?assertEqual({ok, integer_to_binary(I)}, py:eval(<<"str(x)">>, #{x => I}))
     end || I <- Ints],
    ?assertEqual({ok, <<"bytes">>}, py:eval(<<"type(b).__name__">>, #{b => <<"1", 16#C3>>})),
    ?assertEqual({ok, <<"str">>}, py:eval(<<"type(b).__name__">>, #{b => <<"1", 16#C3, 16#A9>>})),
    ?assertEqual({ok, <<"str">>}, py:eval(<<"type(b).__name__">>, #{b => <<"k", 16#F0, 16#9F, 16#98, 16#80>>})),
    ?assertEqual({ok, <<"bytes">>}, py:eval(<<"type(b).__name__">>, #{b => <<"k", 16#F0, 16#9F, 16#98>>})),
    Floats = [1.7976931348623157e308, -1.7976931348623157e308, 5.0e-324, 2.2250738585072014e-308, -0.0],
    [?assertEqual({ok, F}, py:eval(<<"x">>, #{x => F})) || F <- Floats],
    ?assertEqual({ok, <<"-0.0">>}, py:eval(<<"repr(x)">>, #{x => -0.0})),
    ?assertEqual({ok, <<"5e-324">>}, py:eval(<<"repr(x)">>, #{x => 5.0e-324})).

%%--------------------------------------------------------------------
%% Repeated operations after completion

%% Whatever has ended can be ended again, harmlessly: a finished stream
%% acknowledged and cancelled twice, a function unregistered twice (and its
%% name then unknown to Python), a destroyed dict destroyed twice, an exited
%% holder's reference awaited (badarg, once the result was taken). The
%% shortest valid names work.
repeated_operations_after_completion(_Config) ->
    {ok, Ref} = py:stream_start(builtins, iter, [[1]]),
    ?assertEqual(1, item(Ref)),
    ok = py:stream_ack(Ref),
    receive {py_stream, Ref, done} -> ok after ?LIVENESS_MS -> ct:fail(no_done) end,
    [ok = F() || _ <- [1, 2], F <- [fun() -> py:stream_ack(Ref) end,
                                     fun() -> py:stream_cancel(Ref) end]],
    ok = py:register_function(z, fun([X]) -> X + 1 end),
    ?assertEqual({ok, 2}, py:eval(<<"__import__('erlang').call('z', 1)">>)),
    ok = py:register_function(<<"y">>, fun([X]) -> X + 2 end),
    ?assertEqual({ok, 3}, py:eval(<<"__import__('erlang').y(1)">>)),
    [ok = py:unregister_function(N) || _ <- [1, 2], N <- [z, <<"y">>]],
    ?assertMatch({error, {python, <<"erlang.UnknownFunction">>, _, _}},
                 py:eval(<<"__import__('erlang').call('z', 1)">>)),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, 1),
    [ok = py:shared_dict_destroy(SD) || _ <- [1, 2, 3]],
    pyport_ct_lib:assert_destroyed(SD),
    pyport_ct_lib:assert_mailbox_empty().

%%--------------------------------------------------------------------
%% SharedDict keys (README "SharedDict": keys are binaries; Python's 'k',
%% b'k' and Erlang's <<"k">> are the same key)

%% The shortest key, <<>>, and a 1 MiB key work like any other, from both
%% sides and in insertion order; a key that is not valid UTF-8 too (Python
%% sees it as bytes).
%% Mutant: an empty key refused as badarg.
shared_dict_shortest_and_longest_keys(_Config) ->
    {ok, SD} = py:shared_dict_new(),
    Long = binary:copy(<<"k">>, 1 bsl 20),
    Bytes = <<"k", 255>>,
    [ok = py:shared_dict_set(SD, K, V)
     || {K, V} <- [{<<>>, <<"empty">>}, {Long, <<"long">>}, {Bytes, <<"bytes">>}]],
    ?assertEqual([<<>>, Long, Bytes], py:shared_dict_keys(SD)),
    ?assertEqual([<<"empty">>, <<"long">>, <<"bytes">>],
                 [py:shared_dict_get(SD, K) || K <- [<<>>, Long, Bytes]]),
    %% In Python, '' and b'' are the empty key.
    ?assertEqual({ok, [<<"empty">>, <<"empty">>, <<"long">>, <<"bytes">>]},
                 py:eval(<<"(lambda d: [d[''], d[b''], d['k' * (1 << 20)], d[b'k\\xff']])"
                           "(__import__('erlang').SharedDict(h))">>, #{h => SD})),
    ok = py:shared_dict_del(SD, <<>>),
    ?assertEqual([Long, Bytes], py:shared_dict_keys(SD)),
    ?assertEqual(1, py:shared_dict_update_counter(SD, <<>>, 1)),
    ?assertEqual(true, py:shared_dict_compare_and_swap(SD, <<>>, 1, 2)),
    ?assertEqual([Long, Bytes, <<>>], py:shared_dict_keys(SD)),
    ok = py:shared_dict_destroy(SD).
