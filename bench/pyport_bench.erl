%% @doc pyport benchmark: measures pyport against its limits, side by
%% side, in one run interleaved over several rounds.
%%
%% Every round runs every case once, in the same order, and measures each
%% baseline right next to the figures compared with it. A figure's ratio is
%% computed per round (figure / baseline of that round); the table shows the
%% median over rounds, the min..max over rounds and the median ratio.
%%
%% Run through `make bench' (full) or `make bench-smoke' (1 round, tiny counts,
%% exits non-zero on any crash or wrong answer). Arguments (strings):
%%   "smoke"        tiny counts, 1 round, results under _build/bench/smoke
%%   "rounds=N"     number of rounds (default 7)
%%   "out=DIR"      results directory (default bench/results)
%%   "scale=F"      multiply durations and counts by F (default 1.0)
%%   "pin=1"        the run is pinned to one CPU: bench.mk starts erl under
%%                  `taskset -c 0' (the VM, erl_child_setup and every port
%%                  program inherit it); checked here, recorded as `pinned'
%%   "pin=0"        not pinned (the default)
-module(pyport_bench).
-behaviour(gen_server).

-export([main/1]).
%% gen_server baseline: a trivial server.
-export([init/1, handle_call/3, handle_cast/2]).

-define(T2B, [{minor_version, 2}]).
-define(SQRT2, 1.4142135623730951).
-define(CONC, [1, 4, 16, 64, 256]).
-define(SWEEP, [1, 2, 4, 16]).
-define(PAYLOADS, [small_int, bin_1k, bin_100k, map_100, nmap_1k, nmap_100k, list_1m]).
-define(SD_OPS, [get_small, set_small, get_1k, set_1k, get_cached]).
-define(SD16_OPS, ?SD_OPS ++ [update_counter]).
%% Figures measured in one round of a run only (the last), not in every round.
-define(ONCE_PER_RUN, [port_idle_cpu_pct]).
%% The latency breakdown of one call, in the order the time is spent (the
%% remainder, the pipes in and out, is listed where the request enters the port).
-define(BD_STAGES,
        [{bd_encode_us, caller, "caller: build the request (py:call's checks, 2x term_to_binary)"},
         {bd_to_server_us, caller, "caller -> server (gen_server:call sent, server scheduled)"},
         {bd_server_in_us, server, "server: request -> port_command returned"},
         {bd_pipe_us, remainder, "remainder: pipes in+out, write(2), port reader wake-up, VM port read"},
         {bd_route_us, port, "port: frame read -> envelope decoded, routed"},
         {bd_queue_us, port, "port: routed -> taken by the worker (hand-off)"},
         {bd_prepare_us, port, "port: take the GIL, resolve the function, decode args"},
         {bd_python_us, port, "port: the Python call math.sqrt(2.0)"},
         {bd_encode_result_us, port, "port: encode the result into the reply frame"},
         {bd_release_us, port, "port: bookkeeping, release the GIL (reply about to be written)"},
         {bd_server_out_us, server, "server: reply frame -> gen_server:reply (binary_to_term)"},
         {bd_to_caller_us, caller, "server -> caller (reply message, caller scheduled)"},
         {bd_decode_us, caller, "caller: decode the result (binary_to_term [safe])"}]).
%% The port's stage names (latency_trace of py:stats()) and their figures.
-define(BD_PORT, [{route_ns, bd_route_us}, {queue_ns, bd_queue_us}, {prepare_ns, bd_prepare_us},
                  {python_ns, bd_python_us}, {encode_ns, bd_encode_result_us},
                  {release_ns, bd_release_us}]).

%%====================================================================
%% Entry point
%%====================================================================

-spec main([string()]) -> ok.
main(Args) ->
    Opts = opts(Args),
    try run(Opts) of
        0 -> ok;
        NErr ->
            io:format(standard_error, "pyport_bench: ~b error(s), see above~n", [NErr]),
            erlang:halt(1)
    catch
        C:R:St ->
            io:format(standard_error, "pyport_bench crashed: ~p:~tp~n~tp~n", [C, R, St]),
            erlang:halt(1)
    end.

opts(Args) ->
    Base = #{rounds => 7, out => "bench/results", scale => 1.0, smoke => false, pin => false},
    O = lists:foldl(fun opt/2, Base, Args),
    S = maps:get(scale, O),
    Sizes = case maps:get(smoke, O) of
                true ->
                    #{seq_n => 60, seq_ms => 25, conc_ms => 25, pay_ms => 25, py_n => 300,
                      min_n => 3, trace_n => 40, cpu_ms => 100, idle_ms => 300};
                false ->
                    #{seq_n => round(5000 * S), seq_ms => round(400 * S),
                      conc_ms => round(400 * S), pay_ms => round(350 * S),
                      py_n => round(20000 * S), min_n => 10,
                      %% at most 2000: the port keeps the last 4096 traced calls, and
                      %% traced calls are interleaved with as many plain ones
                      trace_n => min(2000, round(2000 * S)),
                      cpu_ms => max(2000, round(2000 * S)), idle_ms => 10000}
            end,
    maps:merge(O, Sizes).

opt("smoke", O) -> O#{smoke := true, rounds := 1, out := "_build/bench/smoke"};
opt("rounds=" ++ N, O) -> O#{rounds := list_to_integer(N)};
opt("out=" ++ D, O) -> O#{out := D};
opt("pin=1", O) -> O#{pin := true};
opt("pin=0", O) -> O#{pin := false};
opt("scale=" ++ F, O) ->
    O#{scale := try list_to_float(F) catch error:badarg -> float(list_to_integer(F)) end};
opt(Other, _) -> erlang:error({bad_argument, Other}).

run(O) ->
    put(errors, []),
    put(passed, 0),
    put(load_start, loadavg()),
    %% Application start/stop reports would drown the table.
    ok = logger:set_primary_config(level, warning),
    ok = ensure_loaded(),
    Pinned = check_pinned(O),
    {W0, M0} = {env(workers, 1), env(max_workers, 16)},
    Default = #{workers => W0, max_workers => M0},
    rand:seed(exsss, {17, 42, 2024}),
    Payloads = [{P, payload(P)} || P <- ?PAYLOADS],
    {ok, Gs} = gen_server:start(?MODULE, [], []),
    Rounds = maps:get(rounds, O),
    io:format("pyport_bench: ~b round(s), default pool ~p, ~b scheduler(s), pinned ~p~n",
              [Rounds, Default, erlang:system_info(schedulers_online), Pinned]),
    T0 = erlang:monotonic_time(millisecond),
    Results = [begin
                   Tr = erlang:monotonic_time(millisecond),
                   Res = round_(R, O, Default, Payloads, Gs),
                   io:format("round ~b/~b done in ~.1f s~n",
                             [R, Rounds, (erlang:monotonic_time(millisecond) - Tr) / 1000]),
                   Res
               end || R <- lists:seq(1, Rounds)],
    Meta = (meta(O, Default, erlang:monotonic_time(millisecond) - T0))#{pinned => Pinned},
    _ = application:stop(pyport),
    gen_server:stop(Gs),
    Figs = summarise(figures(), Results),
    Targets = targets(Figs, Pinned),
    case maps:get(smoke, O) of
        true -> ok;   % keeps `make test' output short; the JSON has everything
        false ->
            print_table(Figs, Meta),
            print_breakdown(Figs),
            print_cpu(Figs),
            print_targets(Targets)
    end,
    Errors = lists:reverse(get(errors)),
    write_results(O, Meta, Payloads, Figs, Targets, Errors),
    case maps:get(smoke, O) of
        true ->
            io:format("bench-smoke: ~b passed, ~b failed~n", [get(passed), length(Errors)]);
        false -> ok
    end,
    length(Errors).

ensure_loaded() ->
    case application:load(pyport) of
        ok -> ok;
        {error, {already_loaded, pyport}} -> ok
    end.

env(K, D) ->
    case application:get_env(pyport, K) of
        {ok, V} -> V;
        undefined -> D
    end.

%%====================================================================
%% One round
%%====================================================================

round_(R, O, Default, Payloads, Gs) ->
    put(round, R),
    put(acc, #{}),
    %% Start-up and idle RSS (default pool).
    case_(startup, fun() ->
                           Ms = restart_app(Default),
                           [{startup_ms, Ms}, {rss_idle_kib, port_rss()}]
                   end),
    case_(cat_start, fun() -> [{cat_start_ms, cat_start()}] end),
    {_, Nmap1k} = lists:keyfind(nmap_1k, 1, Payloads),
    SD = try sd_setup(Nmap1k)
         catch Class:Reason:Stack -> case_error(sd_setup, Class, Reason, Stack), undefined
         end,
    %% Sequential calls, interleaved in small blocks with their baselines (the
    %% cat port with the same frame, gen_server:call), so that the ratios
    %% survive load that changes from one second to the next.
    SqrtFrame = call_frame(<<"math">>, <<"sqrt">>, [2.0]),
    case_(sequential,
          fun() ->
                  Cat = cat_open(),
                  Raw = raw_open(),
                  ok = callback_setup(),
                  Fs = [{cat, fun() -> cat_call_echo(Cat, <<"math">>, <<"sqrt">>, [2.0]) end},
                        {gen_call, fun() -> pong = gen_server:call(Gs, ping) end},
                        {raw_sqrt, fun() -> raw_sqrt(Raw) end},
                        {sqrt, fun sqrt_call/0},
                        {eval, fun() -> {ok, 13} = py:eval(<<"x * x + y">>, #{x => 3, y => 4}) end},
                        {cb, fun callback_call/0}]
                      ++ [{fid("sd1_~s", [Op]), F} || SD =/= undefined, {Op, F} <- sd_ops(SD, Nmap1k)],
                  lists:append([seq3(Name, St) || {Name, St} <- interleaved(O, seq, Fs)])
          end),
    %% A stream of small items (window 64, acknowledged 16 at a time), against the
    %% sequential call rate of the same round.
    case_(stream, fun() -> [{stream_ips, stream_items_per_sec(O)}] end),
    %% 1,000 concurrent async def calls that each await asyncio.sleep(0.1).
    case_(aio1000, fun() -> [{aio1000_ms, aio_wall_ms(1000)}] end),
    %% The cat port alone, as the prototype measured it: the calls/s that the
    %% concurrency figures are compared with (in the interleaved case above,
    %% its first calls after a block of Python calls are slower).
    case_(cat_alone, fun() ->
                             Cat = cat_open(),
                             [{cat_alone, St}] =
                                 interleaved(O, seq, [{cat_alone,
                                                       fun() -> cat_echo(Cat, SqrtFrame) end}]),
                             seq3(cat_alone, St)
                     end),
    %% Concurrency, default pool.
    [case_({conc_sqrt, K}, fun() -> conc_figs(sqrt, K, conc(K, O, fun sqrt_call/0)) end)
     || K <- ?CONC],
    [case_({conc_sleep, K}, fun() -> conc_figs(sleep, K, conc(K, O, fun sleep_call/0)) end)
     || K <- ?CONC],
    %% Payloads: t2b+b2t, the cat port with the same frame and the echo, interleaved.
    [payload_case(P, X, O) || {P, X} <- Payloads],
    %% SharedDict from 16 processes, and from Python; Erlang-side get/set while
    %% Python threads keep the GIL busy.
    SD =/= undefined andalso sd_cases(SD, O, Nmap1k),
    SD =/= undefined andalso sd_gil_case(SD, O),
    SD =/= undefined andalso py:shared_dict_destroy(SD),
    case_(rss_after, fun() -> [{rss_after_kib, port_rss()}] end),
    %% Worker sweep on a reduced set: 16 sleepers and 64 sqrt callers.
    [case_({workers, N},
           fun() ->
                   Ms = restart_app(#{workers => N, max_workers => N}),
                   #{cps := Sl} = conc(16, O, fun sleep_call/0),
                   #{cps := Sq} = conc(64, O, fun sqrt_call/0),
                   [{fid("w~b_startup_ms", [N]), Ms},
                    {fid("w~b_sleep16_cps", [N]), Sl},
                    {fid("w~b_sqrt64_cps", [N]), Sq}]
           end) || N <- ?SWEEP],
    %% Home threads: stateless sqrt (no namespace: floats in both modes) and 64
    %% processes that each have a namespace, with thread_affinity none and
    %% namespace, the order alternating from round to round.
    Modes = case R rem 2 of 1 -> [none, namespace]; 0 -> [namespace, none] end,
    [case_({affinity, Mode},
           fun() ->
                   _ = restart_app(Default#{thread_affinity => Mode}),
                   #{cps := S16} = conc(16, O, fun sqrt_call/0),
                   #{cps := S64} = conc(64, O, fun sqrt_call/0),
                   #{cps := E64} = conc(64, O, fun ns_eval_call/0),
                   [{fid("aff_~s_sqrt16_cps", [Mode]), S16},
                    {fid("aff_~s_sqrt64_cps", [Mode]), S64},
                    {fid("aff_~s_nseval64_cps", [Mode]), E64}]
           end) || Mode <- Modes],
    %% Where the time of one small call goes (port restarted with trace_latency).
    case_(breakdown, fun() ->
                             _ = restart_app(Default#{trace_latency => true}),
                             breakdown(O)
                     end),
    _ = restart_app(Default),
    %% CPU per call at 16 callers, pyport and the cat port driven the same way.
    case_(cpu, fun() -> cpu_per_call(R, O) end),
    %% Idle CPU of the port program, heartbeats included: once per run.
    R =:= maps:get(rounds, O) andalso
        case_(idle_cpu, fun() -> [{port_idle_cpu_pct, idle_cpu_pct(maps:get(idle_ms, O))}] end),
    get(acc).

%% The dict is owned by the round's process, which outlives the cases.
%% <<"cached">> is only ever read: after its first read every Erlang-side get
%% of it is answered from the read cache. <<"ctr">> is the update_counter key.
sd_setup(Nmap1k) ->
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"small">>, 42),
    ok = py:shared_dict_set(SD, <<"cached">>, 42),
    ok = py:shared_dict_set(SD, <<"ctr">>, 0),
    ok = py:shared_dict_set(SD, <<"map1k">>, Nmap1k),
    Nmap1k = py:shared_dict_get(SD, <<"map1k">>),
    42 = py:shared_dict_get(SD, <<"cached">>),
    SD.

sd_ops(SD, Nmap1k) ->
    [{get_small, fun() -> 42 = py:shared_dict_get(SD, <<"small">>) end},
     {set_small, fun() -> ok = py:shared_dict_set(SD, <<"small">>, 42) end},
     {get_1k, fun() -> #{} = py:shared_dict_get(SD, <<"map1k">>) end},
     {set_1k, fun() -> ok = py:shared_dict_set(SD, <<"map1k">>, Nmap1k) end},
     {get_cached, fun() -> 42 = py:shared_dict_get(SD, <<"cached">>) end}].

%% From 16 processes only (a failure here costs no sequential figure).
sd16_ops(SD, Nmap1k) ->
    sd_ops(SD, Nmap1k)
    ++ [{update_counter, fun() ->
                                 N = py:shared_dict_update_counter(SD, <<"ctr">>, 1),
                                 true = is_integer(N) andalso N > 0
                         end}].

sd_cases(SD, O, Nmap1k) ->
    [case_({sd16, Op}, fun() -> sd16_case(Op, F, O) end) || {Op, F} <- sd16_ops(SD, Nmap1k)],
    case_(py_sd, fun() ->
                         setup_python(),
                         py_sd_loop(SD, 42, small, O) ++ py_sd_loop(SD, Nmap1k, map1k, O)
                 end).

%% 16 processes calling one operation. For get_cached the cache counters of
%% py:stats() show that (at least) 90 % of those gets were cache hits, the
%% premise of its target; the hit rate is a figure of its own.
sd16_case(get_cached, F, O) ->
    S0 = sd_cache_stats(),
    Figs = sd16_figs(get_cached, conc(16, O, F)),
    S1 = sd_cache_stats(),
    Hits = maps:get(cache_hits, S1) - maps:get(cache_hits, S0),
    Misses = maps:get(cache_misses, S1) - maps:get(cache_misses, S0),
    Pct = 100 * Hits / max(1, Hits + Misses),
    Pct >= 90 orelse erlang:error({cache_hits_below_90_percent, Hits, Misses}),
    [{sd16_get_cached_hit_pct, Pct} | Figs];
sd16_case(Op, F, O) ->
    sd16_figs(Op, conc(16, O, F)).

sd16_figs(Op, #{cps := Cps, p50 := P50}) ->
    [{fid("sd16_~s_ops", [Op]), Cps}, {fid("sd16_~s_p50_us", [Op]), P50}].

sd_cache_stats() ->
    {ok, #{shared_dict := M}} = py:stats(),
    M.

%% Erlang-side get (of a cached value) and set of small plain values, first
%% with Python idle, then while two Python threads run busy loops (each loop
%% step a sum(range(2000)), which holds the GIL throughout): plain values need
%% no GIL, so the busy p50 should stay close to the idle one. The threads are
%% stopped (flag cleared, joined) whatever happens.
sd_gil_case(SD, O) ->
    case_(sd_gil,
          fun() ->
                  setup_python(),
                  Fs = fun(Tag) ->
                               [{fid("sdgil_~s_get", [Tag]),
                                 fun() -> 42 = py:shared_dict_get(SD, <<"cached">>) end},
                                {fid("sdgil_~s_set", [Tag]),
                                 fun() -> ok = py:shared_dict_set(SD, <<"gil_set">>, 42) end}]
                       end,
                  Idle = interleaved(O, seq, Fs(idle)),
                  {ok, 2} = py:call('__main__', bench_busy_start, [2]),
                  Busy = try interleaved(O, seq, Fs(busy))
                         after {ok, 0} = py:call('__main__', bench_busy_stop, [])
                         end,
                  [{fid("~s_p50_us", [Name]), P50} || {Name, #{p50 := P50}} <- Idle ++ Busy]
          end).

sqrt_call() -> {ok, ?SQRT2} = py:call(math, sqrt, [2.0]).

%% Callback round trip: py:call of a Python function (a module function, like sqrt: no
%% namespace, so it floats as sqrt does) that calls the Erlang function `echo'.
callback_call() -> {ok, 1} = py:call(pyport_bench_cb, ping, []).

%% Registers `echo' and makes module pyport_bench_cb, from a throwaway process so that
%% the bench process gets no namespace (its calls would move to a home thread).
callback_setup() ->
    ok = py:register_function(echo, fun([X]) -> X end),
    Code = <<"import sys, types\n"
             "m = types.ModuleType('pyport_bench_cb')\n"
             "exec(\"import erlang\\ndef ping():\\n    return erlang.call('echo', 1)\\n\", m.__dict__)\n"
             "sys.modules['pyport_bench_cb'] = m\n">>,
    exec_elsewhere(Code, callback_setup).

%% Runs py:exec(Code) in a throwaway process (so that the caller gets no
%% namespace, and with it no home thread); fails with What if it does.
exec_elsewhere(Code, What) ->
    {Pid, Mon} = spawn_monitor(fun() -> exit(py:exec(Code)) end),
    receive {'DOWN', Mon, process, Pid, ok} -> ok;
            {'DOWN', Mon, process, Pid, Other} -> erlang:error({What, Other})
    after 30000 -> erlang:error({What, timeout})
    end.
sleep_call() -> {ok, undefined} = py:call(time, sleep, [0.001]).

aio_wall_ms(N) ->
    Code = <<"import sys, types\n"
             "m = types.ModuleType('pyport_bench_aio')\n"
             "exec(\"import asyncio\\nasync def nap():\\n    await asyncio.sleep(0.1)\\n    return 1\\n\", m.__dict__)\n"
             "sys.modules['pyport_bench_aio'] = m\n">>,
    ok = exec_elsewhere(Code, aio_setup),
    Self = self(),
    T0 = erlang:monotonic_time(microsecond),
    Pids = [spawn(fun() -> Self ! {aio, self(), py:call(pyport_bench_aio, nap, [], #{}, 30000)} end)
            || _ <- lists:seq(1, N)],
    [receive {aio, P, {ok, 1}} -> ok; {aio, P, Err} -> erlang:error({aio, Err}) after 60000 -> erlang:error(aio_timeout) end
     || P <- Pids],
    (erlang:monotonic_time(microsecond) - T0) / 1000.

stream_items_per_sec(O) ->
    N = case maps:get(smoke, O) of
            true -> 2000;
            false -> round(50000 * maps:get(scale, O))
        end,
    T0 = erlang:monotonic_time(microsecond),
    {ok, Ref} = py:stream_start(builtins, range, [N], #{}, #{window => 64}),
    N = stream_drain(Ref, 0),
    N * 1000000 / max(1, erlang:monotonic_time(microsecond) - T0).

stream_drain(Ref, Got) ->
    receive
        {py_stream, Ref, {data, _}} ->
            (Got + 1) rem 16 =:= 0 andalso py:stream_ack(Ref, 16),
            stream_drain(Ref, Got + 1);
        {py_stream, Ref, done} -> Got;
        {py_stream, Ref, {error, E}} -> erlang:error({stream, E})
    after 30000 -> erlang:error({stream_stalled, Got})
    end.
%% A small eval in the calling process's namespace.
ns_eval_call() -> {ok, 13} = py:eval(<<"x * x + y">>, #{x => 3, y => 4}).

seq3(Name, #{p50 := P50, p99 := P99, cps := Cps}) ->
    [{fid("~s_p50_us", [Name]), P50}, {fid("~s_p99_us", [Name]), P99},
     {fid("~s_cps", [Name]), Cps}].

conc_figs(Name, K, #{p50 := P50, p99 := P99, cps := Cps}) ->
    [{fid("c~s~b_cps", [Name, K]), Cps}, {fid("c~s~b_p50_us", [Name, K]), P50},
     {fid("c~s~b_p99_us", [Name, K]), P99}].

payload_case(P, X, O) ->
    case_({payload, P},
          fun() ->
                  setup_python(),
                  %% Checked once, outside the timing: an echo must be exact.
                  case py:call('__main__', echo, [X]) of
                      {ok, X} -> ok;
                      Other -> erlang:error({echo_mismatch, P, trunc_term(Other)})
                  end,
                  Cat = cat_open(),
                  Fs = [{t2b, fun() -> _ = binary_to_term(term_to_binary(X, ?T2B)) end},
                        {cat, fun() -> cat_call_echo(Cat, <<"__main__">>, <<"echo">>, [X]) end},
                        {echo, fun() -> {ok, _} = py:call('__main__', echo, [X]) end}],
                  Figs = [{fid("~s_~s_us", [Name, P]), T}
                          || {Name, #{p50 := T}} <- interleaved(O, pay, Fs)],
                  %% The echo once more, against the cat port instead of t2b+b2t.
                  Figs ++ [{fid("echoc_~s_us", [P]), T}
                           || {Id, T} <- Figs, Id =:= fid("echo_~s_us", [P])]
          end).

trunc_term(T) ->
    S = io_lib:format("~tP", [T, 12]),
    lists:flatten(S).

%% Runs one case in a fresh process (so that no case pays for another's heap
%% or Python namespace); a crash or a wrong answer is recorded and the run
%% goes on.
case_(Name, F) ->
    {Pid, Mon} = spawn_monitor(fun() ->
                                       try F() of
                                           Figs -> exit({case_ok, Figs})
                                       catch
                                           C:R:St -> exit({case_failed, C, R, St})
                                       end
                               end),
    receive
        {'DOWN', Mon, process, Pid, {case_ok, Figs}} ->
            put(passed, get(passed) + 1),
            put(acc, maps:merge(get(acc), maps:from_list(Figs)));
        {'DOWN', Mon, process, Pid, {case_failed, C, R, St}} ->
            case_error(Name, C, R, St);
        {'DOWN', Mon, process, Pid, Other} ->
            case_error(Name, exit, Other, [])
    after 300000 ->
            exit(Pid, kill),
            case_error(Name, exit, case_timeout, [])
    end.

case_error(Name, C, R, St) ->
    Where = case St of
                [{M, F, A, Loc} | _] ->
                    io_lib:format(" at ~p:~p/~p line ~p",
                                  [M, F, if is_list(A) -> length(A); true -> A end,
                                   proplists:get_value(line, Loc)]);
                _ -> ""
            end,
    Msg = lists:flatten([io_lib:format("~p:~0tP", [C, R, 12]), Where]),
    io:format(standard_error, "ERROR round ~b case ~p: ~ts~n", [get(round), Name, Msg]),
    put(errors, [#{round => get(round), 'case' => iolist_to_binary(io_lib:format("~p", [Name])),
                   error => unicode:characters_to_binary(Msg)} | get(errors)]).

fid(Fmt, Args) -> list_to_atom(lists:flatten(io_lib:format(Fmt, Args))).

%%====================================================================
%% Measuring
%%====================================================================

%% Sequential calls of several functions, interleaved: a few unmeasured
%% warm-up calls of each, then blocks of B timed calls of each in turn, until
%% the time budget is spent (at least min_n calls each) or each function made
%% seq_n calls. B is chosen so that a block of the slowest function takes about
%% 2 ms. calls/s of a function = its calls / the time spent in its blocks.
interleaved(O, Kind, Fs) ->
    MaxN = maps:get(seq_n, O),
    MinN = maps:get(min_n, O),
    Ms = case Kind of
             seq -> maps:get(seq_ms, O) * length(Fs);
             pay -> maps:get(pay_ms, O) * length(Fs)
         end,
    Slowest = lists:max([warm_up(F, max(2, min(20, MaxN div 50))) || {_, F} <- Fs]),
    Block = max(1, min(50, round(2.0e6 / max(1, Slowest)))),
    Deadline = now_ns() + Ms * 1000000,
    Init = [{Name, F, [], 0} || {Name, F} <- Fs],
    Done = interleave_loop(Init, Block, 0, MaxN, MinN, Deadline),
    [{Name, stats(Samples, length(Samples), Spent)} || {Name, _, Samples, Spent} <- Done].

%% Median ns of N calls.
warm_up(F, N) ->
    Ts = [begin T0 = now_ns(), _ = F(), now_ns() - T0 end || _ <- lists:seq(1, N)],
    lists:nth((N + 1) div 2, lists:sort(Ts)).

interleave_loop(Acc, Block, N, MaxN, MinN, Deadline) ->
    B = min(Block, MaxN - N),
    Acc1 = [begin
                Ss = timed(F, B, Samples),
                {Name, F, Ss, Spent + lists:sum(lists:sublist(Ss, B))}
            end || {Name, F, Samples, Spent} <- Acc],
    N1 = N + B,
    case N1 >= MaxN orelse (N1 >= MinN andalso now_ns() >= Deadline) of
        true -> Acc1;
        false -> interleave_loop(Acc1, Block, N1, MaxN, MinN, Deadline)
    end.

timed(_F, 0, Acc) -> Acc;
timed(F, N, Acc) ->
    T0 = now_ns(),
    _ = F(),
    T1 = now_ns(),
    timed(F, N - 1, [T1 - T0 | Acc]).

%% K processes, each calling F sequentially for conc_ms milliseconds. Each
%% does one warm-up call first; all start together. calls/s = all calls /
%% wall time from the start signal to the last process done.
conc(K, O, F) ->
    Ms = maps:get(conc_ms, O),
    Parent = self(),
    Ref = make_ref(),
    Pids = [spawn(fun() -> conc_proc(Parent, Ref, F) end) || _ <- lists:seq(1, K)],
    Mons = [erlang:monitor(process, P) || P <- Pids],
    ok = conc_gather(Ref, ready, K),
    Start = now_ns(),
    Deadline = Start + Ms * 1000000,
    [P ! {Ref, go, Deadline} || P <- Pids],
    {Samples, N} = conc_collect(Ref, K, [], 0),
    Wall = now_ns() - Start,
    [erlang:demonitor(M, [flush]) || M <- Mons],
    stats(Samples, N, Wall).

conc_proc(Parent, Ref, F) ->
    try
        _ = F(),
        Parent ! {Ref, ready},
        receive {Ref, go, Deadline} -> ok end,
        Samples = conc_loop(F, Deadline, []),
        Parent ! {Ref, done, Samples}
    catch
        C:R -> Parent ! {Ref, failed, {C, R}}
    end.

conc_loop(F, Deadline, Acc) ->
    T0 = now_ns(),
    _ = F(),
    T1 = now_ns(),
    case T1 >= Deadline of
        true -> [T1 - T0 | Acc];
        false -> conc_loop(F, Deadline, [T1 - T0 | Acc])
    end.

conc_gather(_Ref, _What, 0) -> ok;
conc_gather(Ref, What, N) ->
    receive
        {Ref, What} -> conc_gather(Ref, What, N - 1);
        {Ref, failed, Why} -> erlang:error({caller_failed, Why})
    after 60000 -> erlang:error({timeout, What})
    end.

conc_collect(_Ref, 0, Acc, N) -> {Acc, N};
conc_collect(Ref, K, Acc, N) ->
    receive
        {Ref, done, S} -> conc_collect(Ref, K - 1, S ++ Acc, N + length(S));
        {Ref, failed, Why} -> erlang:error({caller_failed, Why})
    after 120000 -> erlang:error(conc_timeout)
    end.

stats(Samples, N, WallNs) ->
    Sorted = list_to_tuple(lists:sort(Samples)),
    #{p50 => pct(Sorted, 0.50) / 1000, p99 => pct(Sorted, 0.99) / 1000,
      cps => N / (WallNs / 1.0e9), n => N}.

pct(T, Q) ->
    Size = tuple_size(T),
    element(max(1, min(Size, round(Q * Size + 0.5))), T).

now_ns() -> erlang:monotonic_time(nanosecond).

%%====================================================================
%% Pinning
%%====================================================================

%% Whether this VM runs on a single CPU (its Cpus_allowed_list). pin=1 only
%% checks: bench.mk pins by starting erl under `taskset -c 0', so that the VM's
%% threads, erl_child_setup and every port program started later (the bench
%% restarts the application many times) inherit the one CPU.
check_pinned(O) ->
    Cpus = cpus_allowed(os:getpid()),
    Pinned = is_one_cpu(Cpus),
    case {maps:get(pin, O), Pinned} of
        {true, false} ->
            erlang:error({not_pinned, Cpus, "pin=1 wants the VM started under taskset -c 0: "
                          "make bench BENCH_ARGS=\"pin=1\" does that"});
        _ -> Pinned
    end.

cpus_allowed(OsPid) ->
    {ok, Status} = file:read_file(lists:concat(["/proc/", OsPid, "/status"])),
    {match, [Cpus]} = re:run(Status, "Cpus_allowed_list:\\s*(\\S+)",
                             [{capture, all_but_first, list}]),
    Cpus.

is_one_cpu(Cpus) -> string:find(Cpus, ",") =:= nomatch andalso string:find(Cpus, "-") =:= nomatch.

%% A port program runs where the VM runs (when pinned, on the same one CPU).
check_port_affinity() ->
    Vm = cpus_allowed(os:getpid()),
    case cpus_allowed(os_pid()) of
        Vm -> ok;
        Port -> erlang:error({port_affinity_differs, Vm, Port})
    end.

%%====================================================================
%% Latency breakdown
%%====================================================================

%% Sequential py:call(math, sqrt, [2.0]) against a port started with
%% trace_latency: traced calls (built here exactly as py:call builds them, sent
%% as {traced_request, ...} so that the server returns its timestamps) are
%% interleaved in blocks of 10 with plain py:call's. The caller's and the
%% server's stages are erlang:monotonic_time differences; the port's stages are
%% durations measured in the port, per request id (from py:stats()), joined
%% here with the same call; what neither sees (write(2), the pipes, the port
%% reader waking up, the VM reading the port) is, call by call, the remainder
%% of "port_command returned -> reply received" after the port's stages. So
%% each call's stages add up exactly to its end-to-end time. Figures, in us:
%% bd_<stage>_us the stage's mean over the calls whose end-to-end time lies
%% between the 40th and 60th percentile (these add up to that band's mean,
%% which is close to the p50), bd_<stage>_med_us its median over all calls
%% (medians need not add up: a stage that is slow in some calls only, such as a
%% wake-up, has a small median).
breakdown(O) ->
    check_port_affinity(),
    N = maps:get(trace_n, O),
    _ = [{traced_sqrt(), sqrt_call()} || _ <- lists:seq(1, 20)],
    {ok, _} = py:stats(),   % the port forgets the warm-up calls' traces
    {Traced, Plain} = bd_loop(N, [], []),
    {ok, #{latency_trace := #{stages := Names, calls := PortCalls}}} = py:stats(),
    Names =:= [K || {K, _} <- ?BD_PORT] orelse erlang:error({unexpected_stages, Names}),
    PortById = maps:from_list(PortCalls),
    Rows = [{Total, bd_row(Parts, maps:get(Id, PortById))}
            || {Id, Total, Parts} <- Traced, is_map_key(Id, PortById)],
    length(Rows) >= N div 2 orelse erlang:error({too_few_traced_calls, length(Rows), N}),
    Sorted = lists:sort(Rows),
    Len = length(Sorted),
    Band = lists:sublist(Sorted, max(1, round(0.4 * Len)), max(1, round(0.2 * Len))),
    Means = [lists:sum(C) / length(C) / 1000 || C <- transpose([R || {_, R} <- Band])],
    Medians = [median(C) / 1000 || C <- transpose([R || {_, R} <- Rows])],
    Ids = [Id || {Id, _, _} <- ?BD_STAGES],
    #{p50 := PlainP50} = stats(Plain, length(Plain), 1),
    [{bd_sum_us, lists:sum(Means)},
     {bd_med_sum_us, lists:sum(Medians)},
     {bd_traced_p50_us, median([T || {T, _} <- Rows]) / 1000},
     {bd_pycall_p50_us, PlainP50},
     {bd_traced_calls, Len}]
    ++ lists:zip(Ids, Means)
    ++ [{med_id(Id), M} || {Id, M} <- lists:zip(Ids, Medians)].

med_id(Id) ->
    list_to_atom(lists:flatten(string:replace(atom_to_list(Id), "_us", "_med_us", trailing))).

%% One call's 13 stages (ns) in ?BD_STAGES order, from the Erlang-side parts
%% and the port's durations.
bd_row([Enc, ToServer, ServerIn, InPort, ServerOut, ToCaller, Dec], PortDs) ->
    [Enc, ToServer, ServerIn, InPort - lists:sum(PortDs)] ++ PortDs
        ++ [ServerOut, ToCaller, Dec].

bd_loop(N, Traced, Plain) when N =< 0 ->
    {Traced, Plain};
bd_loop(N, Traced, Plain) ->
    B = min(10, N),
    Tr = [traced_sqrt() || _ <- lists:seq(1, B)],
    Pl = [begin T0 = now_ns(), _ = sqrt_call(), now_ns() - T0 end || _ <- lists:seq(1, B)],
    bd_loop(N - B, Tr ++ Traced, Pl ++ Plain).

%% One traced call: {Id, end-to-end ns, [ns of each Erlang-side stage]}, the
%% fourth being "port_command returned -> reply frame received" (port + pipe).
%% Before sending it does what py:call does (name conversion, argument check,
%% the two term_to_binary, the two app env reads).
traced_sqrt() ->
    T0 = now_ns(),
    {M, F} = {atom_to_binary(math, utf8), atom_to_binary(sqrt, utf8)},
    Args = [2.0],
    true = is_list(Args) andalso length(Args) >= 0,
    _ = application:get_env(pyport, call_timeout),
    Payload = term_to_binary({Args, #{}}, ?T2B),
    Id = erlang:unique_integer([positive, monotonic]),
    Frame = term_to_binary({call, Id, self(), M, F, Payload}, ?T2B),
    _ = application:get_env(pyport, max_frame_bytes),
    T1 = now_ns(),
    {traced, {ok, Res}, #{received := S1, forwarded := S2, reply_rx := S3, replied := S4}} =
        gen_server:call(pyport_server, {traced_request, Id, Frame}, 10000),
    T2 = now_ns(),
    ?SQRT2 = binary_to_term(Res, [safe]),
    T3 = now_ns(),
    {Id, T3 - T0, [T1 - T0, S1 - T1, S2 - S1, S3 - S2, S4 - S3, T2 - S4, T3 - T2]}.

transpose([[] | _]) -> [];
transpose(Rows) -> [[hd(R) || R <- Rows] | transpose([tl(R) || R <- Rows])].

%%====================================================================
%% CPU
%%====================================================================

%% 16 callers for cpu_ms (at least 2 s in a full run): CPU time (utime +
%% stime of /proc/<pid>/stat, all threads) of the VM and of the port program
%% per call, for pyport (py:call math.sqrt) and for the cat port driven the
%% same way (a server process owning the port; callers encode the same frame,
%% the server decodes the echo with binary_to_term to find the caller, the
%% caller decodes the payload). The order alternates from round to round.
cpu_per_call(R, O) ->
    O1 = O#{conc_ms := maps:get(cpu_ms, O)},
    Hz = clock_ticks(),
    Py = fun() ->
                 cpu_run(Hz, os_pid(), fun() -> conc(16, O1, fun sqrt_call/0) end)
         end,
    Cat = fun() ->
                  {Srv, CatPid} = cat_server_start(),
                  try cpu_run(Hz, CatPid, fun() -> conc(16, O1, fun() -> cat_call(Srv) end) end)
                  after Srv ! stop
                  end
          end,
    {{PyVm, PyPort, PyCps}, {CatVm, CatPort, CatCps}} =
        case R rem 2 of
            1 -> {Py(), Cat()};
            0 -> C = Cat(), {Py(), C}
        end,
    [{cpu_py_vm_us, PyVm}, {cpu_py_port_us, PyPort}, {cpu_py_total_us, PyVm + PyPort},
     {cpu_py_cps, PyCps},
     {cpu_cat_vm_us, CatVm}, {cpu_cat_port_us, CatPort}, {cpu_cat_total_us, CatVm + CatPort},
     {cpu_cat_cps, CatCps}].

%% {VM us of CPU per call, port us of CPU per call, calls/s} over F().
cpu_run(Hz, PortPid, F) ->
    Vm = list_to_integer(os:getpid()),
    {V0, P0} = {cpu_ticks(Vm), cpu_ticks(PortPid)},
    #{n := N, cps := Cps} = F(),
    {V1, P1} = {cpu_ticks(Vm), cpu_ticks(PortPid)},
    Calls = N + 16,   % and one warm-up call per caller
    PerCall = fun(Ticks) -> Ticks * 1.0e6 / Hz / Calls end,
    {PerCall(V1 - V0), PerCall(P1 - P0), Cps}.

%% utime + stime of a process (all its threads), in clock ticks.
cpu_ticks(OsPid) ->
    {ok, Stat} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/stat"),
    %% "pid (comm) state ppid ...": comm may hold spaces; utime and stime are
    %% fields 14 and 15, the 12th and 13th after the closing paren.
    [_, Rest] = string:split(Stat, ")", trailing),
    Fields = string:lexemes(Rest, " "),
    binary_to_integer(lists:nth(12, Fields)) + binary_to_integer(lists:nth(13, Fields)).

clock_ticks() ->
    case string:to_integer(os:cmd("getconf CLK_TCK")) of
        {Hz, _} when is_integer(Hz), Hz > 0 -> Hz;
        _ -> 100
    end.

%% The port program's CPU while nobody calls (heartbeats included), in % of
%% one core over Ms. Read from each thread's schedstat (ns on a CPU), since
%% the 10 ms clock ticks of /proc/<pid>/stat would show 0 over 10 s.
idle_cpu_pct(Ms) ->
    Pid = os_pid(),
    T0 = cpu_ns(Pid),
    W0 = now_ns(),
    timer:sleep(Ms),
    T1 = cpu_ns(Pid),
    W1 = now_ns(),
    100 * (T1 - T0) / (W1 - W0).

%% ns on a CPU of all threads of a process (threads that ended are not counted).
cpu_ns(OsPid) ->
    Dir = "/proc/" ++ integer_to_list(OsPid) ++ "/task",
    {ok, Tids} = file:list_dir(Dir),
    lists:sum([case file:read_file(filename:join([Dir, Tid, "schedstat"])) of
                   {ok, B} -> binary_to_integer(hd(binary:split(B, <<" ">>)));
                   {error, _} -> 0
               end || Tid <- Tids]).

%% A process that owns a /bin/cat port and serves gen_server:call's the way
%% pyport_server does: writes the caller's frame, decodes each echo to find
%% whom it answers. {Pid, os pid of the cat}.
cat_server_start() ->
    Parent = self(),
    Pid = spawn_link(fun() ->
                             Port = cat_open(),
                             {os_pid, OsPid} = erlang:port_info(Port, os_pid),
                             Parent ! {cat_server, self(), OsPid},
                             cat_server_loop(Port, #{})
                     end),
    receive {cat_server, Pid, OsPid} -> {Pid, OsPid}
    after 10000 -> erlang:error(cat_server_timeout)
    end.

cat_server_loop(Port, Pending) ->
    receive
        {'$gen_call', From, {request, Id, Frame}} ->
            true = port_command(Port, Frame),
            cat_server_loop(Port, Pending#{Id => From});
        {Port, {data, Bin}} ->
            {call, Id, _, _, _, Payload} = binary_to_term(Bin, [safe]),
            {From, Pending1} = maps:take(Id, Pending),
            gen_server:reply(From, {ok, Payload}),
            cat_server_loop(Port, Pending1);
        stop ->
            cat_close(Port)
    end.

%% What a py:call of math.sqrt does in the caller, with the cat server instead.
cat_call(Srv) ->
    Payload = term_to_binary({[2.0], #{}}, ?T2B),
    Id = erlang:unique_integer([positive, monotonic]),
    Frame = term_to_binary({call, Id, self(), <<"math">>, <<"sqrt">>, Payload}, ?T2B),
    {ok, Echo} = gen_server:call(Srv, {request, Id, Frame}, 10000),
    {[2.0], #{}} = binary_to_term(Echo, [safe]).

%%====================================================================
%% Baselines
%%====================================================================

%% The frame py:call writes for these arguments (same envelope and size).
call_frame(M, F, Args) ->
    Payload = term_to_binary({Args, #{}}, ?T2B),
    term_to_binary({call, 1 bsl 40, self(), M, F, Payload}, ?T2B).

cat_open() ->
    open_port({spawn_executable, "/bin/cat"}, [{packet, 4}, binary, use_stdio, exit_status]).

cat_close(Port) ->
    catch port_close(Port),
    ok.

%% The cat port's round trip with the Erlang-side codec work of a py:call:
%% the caller encodes the payload and the envelope (two term_to_binary), and
%% decodes the echoed frame (as the server does, `safe') and the payload in it.
cat_call_echo(Port, M, F, Args) ->
    Payload = term_to_binary({Args, #{}}, ?T2B),
    Id = erlang:unique_integer([positive, monotonic]),
    Frame = term_to_binary({call, Id, self(), M, F, Payload}, ?T2B),
    true = port_command(Port, Frame),
    receive
        {Port, {data, Data}} ->
            {call, Id, _, M, F, Echo} = binary_to_term(Data, [safe]),
            {Args, #{}} = binary_to_term(Echo, [safe])
    after 10000 -> erlang:error(cat_timeout)
    end.

cat_echo(Port, Frame) ->
    true = port_command(Port, Frame),
    receive
        {Port, {data, Data}} -> byte_size(Data) =:= byte_size(Frame) orelse erlang:error(cat_short)
    after 10000 -> erlang:error(cat_timeout)
    end.

%% Process start and first answered frame: the floor of the application start-up.
cat_start() ->
    T0 = now_ns(),
    P = cat_open(),
    cat_echo(P, <<131, 97, 1>>),
    T1 = now_ns(),
    cat_close(P),
    (T1 - T0) / 1.0e6.

%% A second port program driven directly, without py and pyport_server: what
%% the API layer costs on top of the port itself.
raw_open() ->
    Args = ["--generation", "999999", "--workers", "1", "--max-workers", "1"],
    P = open_port({spawn_executable, pyport_server:executable()},
                  [{packet, 4}, binary, exit_status, use_stdio, hide, {args, Args}]),
    raw_ready(P).

raw_ready(P) ->
    receive
        {P, {data, B}} ->
            case binary_to_term(B) of
                {pyport_ready, _} -> P;
                _ -> raw_ready(P)
            end;
        {P, {exit_status, St}} -> erlang:error({raw_port_exit, St})
    after 10000 -> erlang:error(raw_port_not_ready)
    end.

raw_sqrt(P) ->
    Id = erlang:unique_integer([positive, monotonic]),
    Payload = term_to_binary({[2.0], #{}}, ?T2B),
    true = port_command(P, term_to_binary({call, Id, self(), <<"math">>, <<"sqrt">>, Payload},
                                          ?T2B)),
    receive
        {P, {data, B}} ->
            {Id, ok, Res} = binary_to_term(B),
            ?SQRT2 = binary_to_term(Res)
    after 10000 -> erlang:error(raw_port_timeout)
    end.

init([]) -> {ok, nostate}.
handle_call(ping, _From, S) -> {reply, pong, S}.
handle_cast(_, S) -> {noreply, S}.

%%====================================================================
%% Application control
%%====================================================================

%% Stops the application (waiting until its port program is gone), sets the
%% pool size, starts it again; returns the ms from start to the first
%% answered call.
restart_app(#{workers := W, max_workers := M} = Pool) ->
    Old = try os_pid() catch _:_ -> undefined end,
    _ = application:stop(pyport),
    wait_gone(Old, 200),
    ok = application:set_env(pyport, workers, W),
    ok = application:set_env(pyport, max_workers, M),
    case Pool of
        #{thread_affinity := A} -> ok = application:set_env(pyport, thread_affinity, A);
        _ -> ok = application:unset_env(pyport, thread_affinity)
    end,
    case Pool of
        #{trace_latency := true} -> ok = application:set_env(pyport, trace_latency, true);
        _ -> ok = application:unset_env(pyport, trace_latency)
    end,
    T0 = now_ns(),
    ok = application:start(pyport),
    {ok, ?SQRT2} = py:call(math, sqrt, [2.0]),
    T1 = now_ns(),
    (T1 - T0) / 1.0e6.

wait_gone(undefined, _) -> ok;
wait_gone(_Pid, 0) -> ok;
wait_gone(Pid, N) ->
    case filelib:is_dir("/proc/" ++ integer_to_list(Pid)) of
        true -> timer:sleep(10), wait_gone(Pid, N - 1);
        false -> ok
    end.

os_pid() ->
    {ok, #{os_pid := P}} = py:stats(),
    true = is_integer(P),
    P.

%% VmRSS of the port program in KiB.
port_rss() ->
    {ok, Status} = file:read_file("/proc/" ++ integer_to_list(os_pid()) ++ "/status"),
    {match, [Kb]} = re:run(Status, "VmRSS:\\s+(\\d+) kB", [{capture, all_but_first, binary}]),
    binary_to_integer(Kb).

%% The calling process's namespace: an identity function for the echo cases
%% and the Python-side SharedDict timing loop.
setup_python() ->
    ok = py:exec(<<"
import time as _time, pickle as _pickle, erlang as _erlang

def echo(x):
    return x

_bench_busy = {'run': False, 'threads': []}

def bench_busy_start(n):
    # n daemon threads busy in Python (sum(range(2000)) keeps the GIL for its
    # whole call) until bench_busy_stop clears the flag; returns how many run.
    import threading
    _bench_busy['run'] = True
    def loop():
        while _bench_busy['run']:
            sum(range(2000))
    ts = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
    for t in ts:
        t.start()
    _bench_busy['threads'] = ts
    return sum(t.is_alive() for t in ts)

def bench_busy_stop():
    # Clears the flag and joins the threads; returns how many still run (0).
    _bench_busy['run'] = False
    for t in _bench_busy['threads']:
        t.join()
    return sum(t.is_alive() for t in _bench_busy['threads'])

def bench_sd_loop(h, n, v):
    # Interleaved in chunks: SharedDict set/get, then a plain dict that
    # pickles on store and unpickles on read (the SharedDict pickles with
    # protocol 5 too). Returns ns per operation.
    sd = _erlang.SharedDict(h)
    d = {}
    dumps, loads, proto = _pickle.dumps, _pickle.loads, _pickle.HIGHEST_PROTOCOL
    pc = _time.perf_counter
    sd['k'] = v
    d['k'] = dumps(v, proto)
    chunks = 5
    r = range(max(1, n // chunks))
    t = [0.0, 0.0, 0.0, 0.0]
    for _c in range(chunks):
        t0 = pc()
        for _ in r:
            sd['k'] = v
        t1 = pc()
        for _ in r:
            x = sd['k']
        t2 = pc()
        for _ in r:
            d['k'] = dumps(v, proto)
        t3 = pc()
        for _ in r:
            x = loads(d['k'])
        t4 = pc()
        t[0] += t1 - t0; t[1] += t2 - t1; t[2] += t3 - t2; t[3] += t4 - t3
    ops = len(r) * chunks
    if x != v:
        raise AssertionError('read back a different value')
    return [s / ops * 1e9 for s in t]
">>),
    ok.

py_sd_loop(SD, V, Tag, O) ->
    N = case Tag of
            small -> maps:get(py_n, O);
            map1k -> max(100, maps:get(py_n, O) div 4)
        end,
    {ok, [SdSet, SdGet, PkSet, PkGet]} =
        py:eval(<<"bench_sd_loop(h, n, v)">>, #{h => SD, n => N, v => V}),
    [{fid("pysd_set_~s_ns", [Tag]), SdSet}, {fid("pysd_get_~s_ns", [Tag]), SdGet},
     {fid("pickle_set_~s_ns", [Tag]), PkSet}, {fid("pickle_get_~s_ns", [Tag]), PkGet}].

%%====================================================================
%% Payloads
%%====================================================================

payload(small_int) -> 42;
payload(bin_1k) -> rand:bytes(1024);
payload(bin_100k) -> rand:bytes(100 * 1024);
payload(map_100) -> maps:from_list([{iolist_to_binary(io_lib:format("key_~3..0b", [I])), I * 7}
                                    || I <- lists:seq(1, 100)]);
payload(nmap_1k) -> nested_map(1024);
payload(nmap_100k) -> nested_map(100 * 1024);
%% 1 MiB of ETF: INTEGER_EXT ints (5 bytes each), as a list.
payload(list_1m) -> lists:seq(1000, 1000 + (1024 * 1024 - 6) div 5 - 1).

%% A map of records (maps nested 3 deep: strings, ints, floats, booleans,
%% lists), grown until its ETF is at least Bytes long.
nested_map(Bytes) -> nested_map(Bytes, 1, #{}).

nested_map(Bytes, I, Acc) ->
    case byte_size(term_to_binary(Acc, ?T2B)) >= Bytes of
        true -> Acc;
        false ->
            Key = iolist_to_binary(io_lib:format("user_~5..0b", [I])),
            Rec = #{<<"id">> => I,
                    <<"name">> => iolist_to_binary(["User number ", integer_to_binary(I)]),
                    <<"active">> => I rem 3 =/= 0,
                    <<"score">> => I * 1.25,
                    <<"tags">> => [<<"alpha">>, <<"beta">>, I rem 10],
                    <<"address">> => #{<<"city">> => <<"Springfield">>,
                                       <<"zip">> => 10000 + I,
                                       <<"geo">> => #{<<"lat">> => 1.5, <<"lon">> => -2.25}}},
            nested_map(Bytes, I + 1, Acc#{Key => Rec})
    end.

%%====================================================================
%% Figures, summaries, targets
%%====================================================================

%% {Id, Group, Label, Unit, Baseline | none}
figures() ->
    Pl = fun(P) -> atom_to_list(P) end,
    [{startup_ms, startup, "app start to first answered call", "ms", cat_start_ms},
     {cat_start_ms, baseline, "/bin/cat port open + first echo", "ms", none},
     {rss_idle_kib, rss, "port RSS, idle after start", "KiB", none},
     {rss_after_kib, rss, "port RSS, after the round", "KiB", rss_idle_kib},
     {cat_p50_us, baseline, "cat port {packet,4} p50 (sqrt frame, with t2b+b2t)", "us", none},
     {cat_p99_us, baseline, "cat port p99", "us", none},
     {cat_cps, baseline, "cat port sequential (interleaved, with t2b+b2t)", "calls/s", none},
     {cat_alone_p50_us, baseline, "cat port alone p50", "us", none},
     {cat_alone_cps, baseline, "cat port alone sequential", "calls/s", none},
     {gen_call_p50_us, baseline, "gen_server:call p50", "us", none},
     {raw_sqrt_p50_us, sequential, "raw port frames (no py/server) sqrt p50", "us", cat_p50_us},
     {sqrt_p50_us, sequential, "py:call math.sqrt p50", "us", cat_p50_us},
     {sqrt_p99_us, sequential, "py:call math.sqrt p99", "us", cat_p99_us},
     {sqrt_cps, sequential, "py:call math.sqrt sequential", "calls/s", cat_cps},
     {eval_p50_us, sequential, "py:eval x*x+y p50", "us", cat_p50_us},
     {eval_p99_us, sequential, "py:eval x*x+y p99", "us", cat_p99_us},
     {eval_cps, sequential, "py:eval x*x+y sequential", "calls/s", cat_cps},
     {cb_p50_us, sequential, "callback round trip (py:call -> erlang.call('echo', 1)) p50", "us",
      sqrt_p50_us},
     {cb_p99_us, sequential, "callback round trip p99", "us", sqrt_p99_us},
     {cb_cps, sequential, "callback round trip sequential", "calls/s", sqrt_cps},
     {stream_ips, sequential, "stream items (window 64, acked 16 at a time)", "items/s", sqrt_cps},
     {aio1000_ms, sequential, "1,000 concurrent async def calls awaiting sleep(0.1), wall", "ms", none}]
    ++ lists:append(
         [[{fid("csqrt~b_cps", [K]), concurrency, lbl("sqrt, ~b caller(s)", [K]), "calls/s",
            cat_alone_cps},
           {fid("csqrt~b_p50_us", [K]), concurrency, lbl("sqrt, ~b caller(s) p50", [K]), "us",
            cat_p50_us},
           {fid("csqrt~b_p99_us", [K]), concurrency, lbl("sqrt, ~b caller(s) p99", [K]), "us",
            cat_p99_us}] || K <- ?CONC])
    ++ lists:append(
         [[{fid("csleep~b_cps", [K]), concurrency, lbl("sleep 1ms, ~b caller(s)", [K]), "calls/s",
            base_if(K, csleep1_cps)},
           {fid("csleep~b_p50_us", [K]), concurrency, lbl("sleep 1ms, ~b caller(s) p50", [K]), "us",
            base_if(K, csleep1_p50_us)},
           {fid("csleep~b_p99_us", [K]), concurrency, lbl("sleep 1ms, ~b caller(s) p99", [K]), "us",
            base_if(K, csleep1_p99_us)}] || K <- ?CONC])
    ++ lists:append(
         [[{fid("t2b_~s_us", [P]), baseline, lbl("t2b+b2t ~s", [Pl(P)]), "us", none},
           {fid("cat_~s_us", [P]), baseline, lbl("cat port, ~s frame (with t2b+b2t)", [Pl(P)]),
            "us", none},
           {fid("echo_~s_us", [P]), payload, lbl("echo ~s p50", [Pl(P)]), "us",
            fid("t2b_~s_us", [P])},
           {fid("echoc_~s_us", [P]), payload, lbl("echo ~s p50 vs the cat port", [Pl(P)]), "us",
            fid("cat_~s_us", [P])}] || P <- ?PAYLOADS])
    ++ lists:append(
         [[{fid("sd1_~s_p50_us", [Op]), shared_dict, lbl("SD Erlang ~s, 1 proc p50", [Op]), "us",
            sqrt_p50_us},
           {fid("sd1_~s_p99_us", [Op]), shared_dict, lbl("SD Erlang ~s, 1 proc p99", [Op]), "us",
            sqrt_p99_us}] || Op <- ?SD_OPS])
    ++ lists:append(
         [[{fid("sd16_~s_ops", [Op]), shared_dict, lbl("SD Erlang ~s, 16 procs", [Op]), "ops/s",
            csqrt16_cps},
           {fid("sd16_~s_p50_us", [Op]), shared_dict, lbl("SD Erlang ~s, 16 procs p50", [Op]),
            "us", csqrt16_p50_us}] || Op <- ?SD16_OPS])
    ++ [{sd16_get_cached_hit_pct, shared_dict, "SD Erlang get_cached, 16 procs: cache hits",
         "%", none},
        {sdgil_idle_get_p50_us, baseline, "SD Erlang get (cached), Python idle p50", "us", none},
        {sdgil_idle_set_p50_us, baseline, "SD Erlang set small, Python idle p50", "us", none},
        {sdgil_busy_get_p50_us, shared_dict, "SD Erlang get (cached), 2 busy Python threads p50",
         "us", sdgil_idle_get_p50_us},
        {sdgil_busy_set_p50_us, shared_dict, "SD Erlang set small, 2 busy Python threads p50",
         "us", sdgil_idle_set_p50_us}]
    ++ lists:append(
         [[{fid("pickle_set_~s_ns", [T]), baseline, lbl("Python dict+pickle set ~s", [T]), "ns/op",
            none},
           {fid("pickle_get_~s_ns", [T]), baseline, lbl("Python dict+unpickle get ~s", [T]),
            "ns/op", none},
           {fid("pysd_set_~s_ns", [T]), shared_dict, lbl("Python sd[k] = v ~s", [T]), "ns/op",
            fid("pickle_set_~s_ns", [T])},
           {fid("pysd_get_~s_ns", [T]), shared_dict, lbl("Python sd[k] get ~s", [T]), "ns/op",
            fid("pickle_get_~s_ns", [T])}] || T <- [small, map1k]])
    ++ lists:append(
         [[{fid("w~b_sleep16_cps", [N]), workers, lbl("~b worker(s): sleep 1ms, 16 callers", [N]),
            "calls/s", w1_sleep16_cps},
           {fid("w~b_sqrt64_cps", [N]), workers, lbl("~b worker(s): sqrt, 64 callers", [N]),
            "calls/s", cat_alone_cps},
           {fid("w~b_startup_ms", [N]), workers, lbl("~b worker(s): start-up", [N]), "ms",
            cat_start_ms}] || N <- ?SWEEP])
    ++ [{Id, breakdown, L, "us", bd_pycall_p50_us} || {Id, _, L} <- ?BD_STAGES]
    ++ [{med_id(Id), breakdown, "median: " ++ L, "us", bd_pycall_p50_us}
        || {Id, _, L} <- ?BD_STAGES]
    ++ [{bd_sum_us, breakdown, "breakdown: sum of the stages (calls near the p50)", "us",
         bd_pycall_p50_us},
        {bd_med_sum_us, breakdown, "breakdown: sum of the stage medians", "us",
         bd_pycall_p50_us},
        {bd_traced_p50_us, breakdown, "breakdown: traced call end to end p50", "us",
         bd_pycall_p50_us},
        {bd_pycall_p50_us, breakdown, "breakdown: py:call sqrt p50, trace on, interleaved", "us",
         sqrt_p50_us},
        {bd_traced_calls, breakdown, "breakdown: calls the port traced", "calls", none},
        {cpu_cat_vm_us, baseline, "CPU/call, cat port, 16 callers: VM", "us", none},
        {cpu_cat_port_us, baseline, "CPU/call, cat port, 16 callers: port", "us", none},
        {cpu_cat_total_us, baseline, "CPU/call, cat port, 16 callers: VM + port", "us", none},
        {cpu_cat_cps, baseline, "cat port (served like pyport), 16 callers", "calls/s", none},
        {cpu_py_vm_us, cpu, "CPU/call, py:call sqrt, 16 callers: VM", "us", cpu_cat_vm_us},
        {cpu_py_port_us, cpu, "CPU/call, py:call sqrt, 16 callers: port", "us", cpu_cat_port_us},
        {cpu_py_total_us, cpu, "CPU/call, py:call sqrt, 16 callers: VM + port", "us",
         cpu_cat_total_us},
        {cpu_py_cps, cpu, "py:call sqrt, 16 callers (CPU case)", "calls/s", cpu_cat_cps},
        {port_idle_cpu_pct, cpu, "port program idle CPU (heartbeats included)", "% core", none}]
    ++ [{aff_none_sqrt16_cps, affinity, "affinity none: sqrt, 16 callers", "calls/s", cat_alone_cps},
        {aff_none_sqrt64_cps, affinity, "affinity none: sqrt, 64 callers", "calls/s", cat_alone_cps},
        {aff_none_nseval64_cps, affinity, "affinity none: eval in own namespace, 64 procs",
         "calls/s", cat_alone_cps},
        {aff_namespace_sqrt16_cps, affinity, "affinity namespace: sqrt, 16 callers", "calls/s",
         aff_none_sqrt16_cps},
        {aff_namespace_sqrt64_cps, affinity, "affinity namespace: sqrt, 64 callers", "calls/s",
         aff_none_sqrt64_cps},
        {aff_namespace_nseval64_cps, affinity, "affinity namespace: eval in own namespace, 64 procs",
         "calls/s", aff_none_nseval64_cps}].

base_if(1, _) -> none;
base_if(_, B) -> B.

lbl(F, A) -> lists:flatten(io_lib:format(F, A)).

summarise(Specs, Rounds) ->
    [begin
         Vs = [V || R <- Rounds, {ok, V} <- [maps:find(Id, R)]],
         Ratios = case Base of
                      none -> [];
                      _ -> [V / B || R <- Rounds, {ok, V} <- [maps:find(Id, R)],
                                     {ok, B} <- [maps:find(Base, R)], B /= 0]
                  end,
         #{id => Id, group => G, label => list_to_binary(L), unit => list_to_binary(U),
           baseline => Base,
           values => [maps:get(Id, R, null) || R <- Rounds],
           median => median(Vs), min => lmin(Vs), max => lmax(Vs),
           ratios => Ratios, ratio_median => median(Ratios), ratio_min => lmin(Ratios),
           ratio_max => lmax(Ratios)}
     end || {Id, G, L, U, Base} <- Specs].

median([]) -> null;
median(L) ->
    S = lists:sort(L),
    N = length(S),
    case N rem 2 of
        1 -> lists:nth(N div 2 + 1, S);
        0 -> (lists:nth(N div 2, S) + lists:nth(N div 2 + 1, S)) / 2
    end.

lmin([]) -> null;
lmin(L) -> lists:min(L).
lmax([]) -> null;
lmax(L) -> lists:max(L).

%% Targets: {Id, Text, Figure, '=<' | '>=' | within | below, Limit}, or the
%% same with a sixth element, the run it is judged in (pinned | unpinned;
%% in the other run it shows as OTHER RUN). The figure's ratio to its
%% baseline is compared with the limit (`below': the figure's own value, for
%% a figure without a baseline). A target is met when the median over rounds
%% meets it and so do at least 5 rounds in 7 of all the run's rounds (a round
%% without the figure counts as not meeting it, except for the figures that
%% are measured once per run, ?ONCE_PER_RUN; every round in a run of fewer
%% than 3).
targets(Figs, Pinned) ->
    Ts = [{sqrt_p50, "sequential math.sqrt p50 <= 1.6x cat-port p50", sqrt_p50_us, '=<', 1.6,
           pinned},
          {sqrt_p99, "sequential math.sqrt p99 <= 2.5x cat-port p99", sqrt_p99_us, '=<', 2.5,
           pinned},
          {echo_map_100, "100-entry map echo p50 <= 2.0x cat port, frame of the same size",
           echoc_map_100_us, '=<', 2.0, pinned},
          {cpu16, "CPU/call at 16 callers (VM + port) <= 2.1x the cat port's",
           cpu_py_total_us, '=<', 2.1, unpinned},
          {idle_cpu, "idle port program over 10 s < 1% of a core", port_idle_cpu_pct, below, 1.0},
          {conc64, "64 callers math.sqrt (default pool) >= 1.5x cat-port sequential calls/s",
           csqrt64_cps, '>=', 1.5},
          {echo_100k, "100 KB nested map echo <= 2.0x t2b+b2t", echo_nmap_100k_us, '=<', 2.0,
           unpinned},
          {callback, "callback round trip (Python -> Erlang -> Python) p50 <= 2.0x py:call math.sqrt p50",
           cb_p50_us, '=<', 2.0},
          {stream, "stream items/s >= 5x sequential py:call math.sqrt calls/s",
           stream_ips, '>=', 5.0},
          {sd_get, "Erlang SharedDict get (small) <= 1.5x py:call math.sqrt (p50)",
           sd1_get_small_p50_us, '=<', 1.5},
          {py_sd_get, "Python sd[k] get <= 2x dict+unpickle", pysd_get_small_ns, '=<', 2.0},
          {py_sd_set, "Python sd[k] = v <= 2x dict+pickle", pysd_set_small_ns, '=<', 2.0},
          {sleep_speedup, "16 sleepers: 16 workers >= 12x 1 worker", w16_sleep16_cps, '>=', 12.0},
          {aff_sqrt16, "home threads: stateless sqrt, 16 callers >= 0.95x affinity none",
           aff_namespace_sqrt16_cps, '>=', 0.95},
          {aff_sqrt64, "home threads: stateless sqrt, 64 callers >= 0.95x affinity none",
           aff_namespace_sqrt64_cps, '>=', 0.95},
          %% SharedDict at ETS speed: a cached Erlang-side get costs no port round trip,
          %% plain values need no GIL, and 16 processes outrun 16 math.sqrt callers.
          {sd_get_cached, "Erlang SharedDict get of a cached small value <= 0.25x py:call math.sqrt (p50)",
           sd1_get_cached_p50_us, '=<', 0.25},
          {sd_gil_get, "Erlang SharedDict get (cached), 2 busy Python threads <= 2x Python idle (p50)",
           sdgil_busy_get_p50_us, '=<', 2.0},
          {sd_gil_set, "Erlang SharedDict set (small), 2 busy Python threads <= 2x Python idle (p50)",
           sdgil_busy_set_p50_us, '=<', 2.0},
          {sd16_get_cached, "16 procs SharedDict get (>= 90% cache hits) >= 3x 16 math.sqrt callers",
           sd16_get_cached_ops, '>=', 3.0},
          {sd16_set, "16 procs SharedDict set (small) >= 1x 16 math.sqrt callers",
           sd16_set_small_ops, '>=', 1.0},
          {sd16_update_counter, "16 procs SharedDict update_counter >= 1x 16 math.sqrt callers",
           sd16_update_counter_ops, '>=', 1.0},
          {breakdown, "latency breakdown: stage sum within 15% of py:call sqrt p50 (same case)",
           bd_sum_us, within, 0.15}],
    [begin
         F = lists:keyfind(Fig, 1, [{maps:get(id, X), X} || X <- Figs]),
         #{ratio_median := R0, ratio_min := Rmin, ratio_max := Rmax, median := V,
           baseline := B, ratios := Rs0, values := Vs} = element(2, F),
         BV = case [X || X <- Figs, maps:get(id, X) =:= B] of
                  [#{median := M}] -> M;
                  [] -> null
              end,
         %% `below' judges the figure's own values, the others its ratios.
         {R, Rs} = case Op of
                       below -> {V, [X || X <- Vs, X =/= null]};
                       _ -> {R0, Rs0}
                   end,
         Meets = fun(X) when Op =:= '=<' -> X =< Lim;
                    (X) when Op =:= within -> abs(X - 1) =< Lim;
                    (X) when Op =:= below -> X < Lim;
                    (X) -> X >= Lim
                 end,
         RoundsMet = length([X || X <- Rs, Meets(X)]),
         %% A figure measured once per run (in its last round) is judged on that one.
         Rounds = case lists:member(Fig, ?ONCE_PER_RUN) of
                      true -> length(Rs);
                      false -> length(Vs)
                  end,
         Run = case Pinned of true -> pinned; false -> unpinned end,
         Met = case R of
                   _ when Mode =/= any, Mode =/= Run -> other_run;
                   null -> null;
                   _ -> Meets(R) andalso enough_rounds(RoundsMet, Rounds)
               end,
         #{id => Id, text => list_to_binary(Text), figure => Fig, baseline => B,
           op => case Op of
                     '=<' -> <<"<=">>; '>=' -> <<">=">>; within -> <<"within">>;
                     below -> <<"below">>
                 end,
           limit => Lim, rounds_met => RoundsMet, rounds => Rounds, judged_in => Mode,
           ratio_median => R, ratio_min => Rmin, ratio_max => Rmax,
           value_median => V, baseline_median => BV, met => Met}
     end || T <- Ts,
            {Id, Text, Fig, Op, Lim, Mode} <- [case T of
                                                  {_, _, _, _, _, _} -> T;
                                                  {I, Tx, Fg, O, L} -> {I, Tx, Fg, O, L, any}
                                              end]].

%% At least 5 rounds in 7 (rounded up); every round when there are fewer than 3.
enough_rounds(Met, N) when N < 3 -> Met =:= N;
enough_rounds(Met, N) -> Met * 7 >= 5 * N.

%%====================================================================
%% Output
%%====================================================================

print_table(Figs, Meta) ->
    io:format("~npyport benchmark  ~s  commit ~s~s  ~s, ~b cores, OTP ~s, Python ~s, ~b round(s), "
              "pinned => ~p~n",
              [maps:get(date, Meta), maps:get(commit, Meta),
               case maps:get(dirty, Meta) of [] -> ""; _ -> " (+uncommitted changes)" end,
               maps:get(cpu, Meta),
               maps:get(cores, Meta), maps:get(otp, Meta), maps:get(python, Meta),
               maps:get(rounds, Meta), maps:get(pinned, Meta)]),
    io:format("~-44s ~12s ~23s ~-8s ~8s ~15s  ~s~n",
              ["figure", "median", "min..max", "unit", "ratio", "ratio min..max", "baseline"]),
    lists:foreach(
      fun(#{label := L, unit := U, median := M, min := Mn, max := Mx, baseline := B,
            ratio_median := R, ratio_min := Rmin, ratio_max := Rmax}) ->
              io:format("~-44s ~12s ~23s ~-8s ~8s ~15s  ~s~n",
                        [L, num(M), [num(Mn), "..", num(Mx)], U,
                         case R of null -> ""; _ -> [num(R), "x"] end,
                         case R of null -> ""; _ -> [num(Rmin), "..", num(Rmax)] end,
                         case B of none -> ""; _ -> atom_to_list(B) end])
      end, Figs).

%% The breakdown: each stage's median over rounds and its share of the py:call
%% p50 measured in the same case (median over rounds of the per-round share).
print_breakdown(Figs) ->
    ById = maps:from_list([{maps:get(id, F), F} || F <- Figs]),
    case maps:get(median, maps:get(bd_pycall_p50_us, ById)) of
        null -> ok;
        P50 ->
            io:format("~nlatency breakdown: py:call(math, sqrt, [2.0]), sequential, port with "
                      "trace_latency (median over rounds)~n"),
            io:format("  calls near the p50: the traced calls between the 40th and 60th "
                      "percentile of end-to-end time;~n  share: of the py:call p50 below~n"),
            io:format("  ~-70s ~12s ~7s ~12s~n",
                      ["stage", "near p50 us", "share", "median us"]),
            Row = fun(Id, Label) ->
                          #{median := M, ratio_median := R} = maps:get(Id, ById),
                          Med = case maps:find(med_id(Id), ById) of
                                    {ok, #{median := X}} -> num(X);
                                    error -> ""
                                end,
                          io:format("  ~-70s ~12s ~6s% ~12s~n", [Label, num(M), pct_num(R), Med])
                  end,
            [Row(Id, L) || {Id, _, L} <- ?BD_STAGES],
            Row(bd_sum_us, "sum of the stages"),
            #{median := MedSum} = maps:get(bd_med_sum_us, ById),
            io:format("  ~-70s ~12s ~7s ~12s~n", ["sum of the stage medians", "", "",
                                                  num(MedSum)]),
            Row(bd_traced_p50_us, "traced calls, end to end p50"),
            io:format("  ~-68s ~10s~n", ["py:call sqrt p50 (interleaved with the traced calls)",
                                        num(P50)]),
            #{ratio_median := Sum} = maps:get(bd_sum_us, ById),
            io:format("  stages (calls near the p50) sum to ~s% of that p50: ~s~n",
                      [pct_num(Sum), case Sum =/= null andalso abs(Sum - 1) =< 0.15 of
                                         true -> "within 15%";
                                         false -> "NOT within 15%"
                                     end])
    end.

pct_num(null) -> "-";
pct_num(R) -> float_to_list(100 * R, [{decimals, 1}]).

print_cpu(Figs) ->
    ById = maps:from_list([{maps:get(id, F), F} || F <- Figs]),
    M = fun(Id) -> num(maps:get(median, maps:get(Id, ById))) end,
    R = fun(Id) -> case maps:get(ratio_median, maps:get(Id, ById)) of
                       null -> "-";
                       X -> [num(X), "x"]
                   end
        end,
    io:format("~nCPU per call, 16 callers (us of CPU per call, median over rounds):~n"),
    io:format("  ~-26s ~10s ~10s ~10s ~12s~n", ["", "VM", "port", "total", "calls/s"]),
    io:format("  ~-26s ~10s ~10s ~10s ~12s~n",
              ["cat port, served alike", M(cpu_cat_vm_us), M(cpu_cat_port_us),
               M(cpu_cat_total_us), M(cpu_cat_cps)]),
    io:format("  ~-26s ~10s ~10s ~10s ~12s~n",
              ["pyport py:call sqrt", M(cpu_py_vm_us), M(cpu_py_port_us), M(cpu_py_total_us),
               M(cpu_py_cps)]),
    io:format("  ~-26s ~10s ~10s ~10s~n",
              ["ratio pyport / cat", R(cpu_py_vm_us), R(cpu_py_port_us), R(cpu_py_total_us)]),
    io:format("  port program idle: ~s % of a core~n", [M(port_idle_cpu_pct)]).

print_targets(Ts) ->
    io:format("~ntargets (median ratio over rounds; min..max):~n"),
    lists:foreach(
      fun(#{text := T, ratio_median := R, ratio_min := Rmin, ratio_max := Rmax, met := Met,
            value_median := V, baseline_median := BV, figure := F, baseline := B,
            rounds_met := RM, rounds := RN}) ->
              Verdict = case Met of
                            true -> "MET";
                            false -> "NOT MET";
                            null -> "NO DATA";
                            other_run -> "OTHER RUN"
                        end,
              case B of
                  none ->
                      io:format("  ~-9s ~-72s value ~s, ~b/~b rounds  ~s~n",
                                [Verdict, T, num(V), RM, RN, F]);
                  _ ->
                      io:format("  ~-9s ~-72s ratio ~sx (~s..~s), ~b/~b rounds  ~s=~s vs ~s=~s~n",
                                [Verdict, T, num(R), num(Rmin), num(Rmax), RM, RN, F, num(V), B,
                                 num(BV)])
              end
      end, Ts).

num(null) -> "-";
num(X) when is_integer(X) -> integer_to_list(X);
num(X) when abs(X) >= 1000 -> integer_to_list(round(X));
num(X) when abs(X) >= 100 -> float_to_list(X, [{decimals, 1}]);
num(X) when abs(X) >= 10 -> float_to_list(X, [{decimals, 2}]);
num(X) -> float_to_list(X, [{decimals, 3}]).

meta(O, Default, WallMs) ->
    {{Y, Mo, D}, {H, Mi, S}} = calendar:universal_time(),
    Stamp = lbl("~4..0b~2..0b~2..0bT~2..0b~2..0b~2..0bZ", [Y, Mo, D, H, Mi, S]),
    Python = case py:eval(<<"__import__('sys').version.split()[0]">>) of
                 {ok, V} when is_binary(V) -> binary_to_list(V);
                 _ -> "?"
             end,
    Strs = #{date => lbl("~4..0b-~2..0b-~2..0b ~2..0b:~2..0b:~2..0b UTC", [Y, Mo, D, H, Mi, S]),
      stamp => Stamp,
      commit => string:trim(os:cmd("git rev-parse --short HEAD 2>/dev/null")),
      host => net_adm:localhost(),
      cpu => cpu_model(),
      otp => erlang:system_info(otp_release),
      erts => erlang:system_info(version),
      python => Python},
    Meta = maps:map(fun(_, V) -> unicode:characters_to_binary(V) end, Strs),
    %% Uncommitted changes to what is measured make the commit id approximate.
    Dirty = [unicode:characters_to_binary(L)
             || L <- string:lexemes(os:cmd("git status --porcelain --untracked-files=no "
                                          "-- src erl_src Cargo.toml Cargo.lock build.rs "
                                          "2>/dev/null"), "\n")],
    Meta#{dirty => Dirty,
      cores => erlang:system_info(logical_processors),
      rounds => maps:get(rounds, O),
      smoke => maps:get(smoke, O),
      scale => maps:get(scale, O),
      default_pool => Default,
      concurrency => ?CONC,
      worker_sweep => ?SWEEP,
      wall_s => WallMs / 1000,
      loadavg_start => get(load_start),
      loadavg_end => loadavg(),
      sizes => maps:with([seq_n, seq_ms, conc_ms, pay_ms, py_n], O)}.

loadavg() ->
    case file:read_file("/proc/loadavg") of
        {ok, B} -> hd(binary:split(B, <<" ">>));
        _ -> null
    end.

cpu_model() ->
    case file:read_file("/proc/cpuinfo") of
        {ok, B} ->
            case re:run(B, "model name\\s*:\\s*([^\\n]+)", [{capture, all_but_first, list}]) of
                {match, [M]} -> M;
                _ -> "?"
            end;
        _ -> "?"
    end.

write_results(O, Meta, Payloads, Figs, Targets, Errors) ->
    Dir = maps:get(out, O),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    Pay = [#{name => P, etf_bytes => byte_size(term_to_binary(X, ?T2B)),
             frame_bytes => byte_size(call_frame(<<"__main__">>, <<"echo">>, [X]))}
           || {P, X} <- Payloads],
    Doc = #{meta => Meta, payloads => Pay, figures => Figs, targets => Targets,
            errors => Errors},
    Json = json(Doc),
    Csv = csv(Figs, maps:get(rounds, O)),
    Base = filename:join(Dir, "pyport_bench-" ++ binary_to_list(maps:get(stamp, Meta))),
    [begin
         Tmp = F ++ ".tmp",
         ok = file:write_file(Tmp, Data),
         ok = file:rename(Tmp, F)
     end || {F, Data} <- [{Base ++ ".json", Json}, {Base ++ ".csv", Csv},
                          {filename:join(Dir, "latest.json"), Json},
                          {filename:join(Dir, "latest.csv"), Csv}]],
    io:format("~nresults: ~s.json, ~s.csv (and latest.*)~n", [Base, Base]).

csv(Figs, Rounds) ->
    Head = ["id,group,label,unit,median,min,max,baseline,ratio_median,ratio_min,ratio_max"
            | [lbl(",round~b", [R]) || R <- lists:seq(1, Rounds)]],
    Rows = [[atom_to_list(Id), $,, atom_to_list(G), $,, $", L, $", $,, U, $,,
             cnum(M), $,, cnum(Mn), $,, cnum(Mx), $,,
             case B of none -> ""; _ -> atom_to_list(B) end, $,,
             cnum(R), $,, cnum(Rmin), $,, cnum(Rmax),
             [[$,, cnum(V)] || V <- Vs]]
            || #{id := Id, group := G, label := L, unit := U, median := M, min := Mn,
                 max := Mx, baseline := B, ratio_median := R, ratio_min := Rmin,
                 ratio_max := Rmax, values := Vs} <- Figs],
    [lists:join("\n", [Head | Rows]), "\n"].

cnum(null) -> "";
cnum(X) -> jnum(X).

jnum(X) when is_integer(X) -> integer_to_list(X);
jnum(X) when is_float(X), abs(X) >= 1 -> float_to_list(X, [{decimals, 4}, compact]);
jnum(X) when is_float(X) -> float_to_list(X, [short]).

%% A small JSON encoder (OTP 25 has no json module).
json(null) -> "null";
json(true) -> "true";
json(false) -> "false";
json(none) -> "null";
json(X) when is_number(X) -> jnum(X);
json(A) when is_atom(A) -> jstr(atom_to_binary(A, utf8));
json(B) when is_binary(B) -> jstr(B);
json(M) when is_map(M) ->
    Kvs = lists:sort([{key(K), V} || {K, V} <- maps:to_list(M)]),
    ["{", lists:join(",", [[jstr(K), ":", json(V)] || {K, V} <- Kvs]), "}"];
%% Lists are arrays: every string in the document is a binary.
json(L) when is_list(L) ->
    ["[", lists:join(",", [json(X) || X <- L]), "]"];
json(T) -> jstr(iolist_to_binary(io_lib:format("~p", [T]))).

key(K) when is_atom(K) -> atom_to_binary(K, utf8);
key(K) when is_binary(K) -> K;
key(K) -> iolist_to_binary(io_lib:format("~p", [K])).

jstr(B) ->
    [$", [esc(C) || C <- unicode:characters_to_list(B)], $"].

esc($") -> "\\\"";
esc($\\) -> "\\\\";
esc($\n) -> "\\n";
esc(C) when C < 32 -> io_lib:format("\\u~4.16.0b", [C]);
esc(C) -> unicode:characters_to_binary([C]).
