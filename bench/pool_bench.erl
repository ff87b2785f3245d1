%% @doc The pool's benchmark (`make bench-pool`, also run by `make bench`): what a pool of
%% ports buys and costs, each figure against its baseline from the same run, rounds
%% interleaved so that both see the same machine.
%%
%% <ul>
%% <li>`cpu': CPU-bound pure Python (`sum(i*i for i in range(N))', a module call, so no
%% namespace) from as many callers as schedulers, with `ports => 1' and with `ports => auto',
%% in alternating rounds: calls/s of each and their ratio (target: at least 0.8 x cores).</li>
%% <li>`rss': the idle RSS of each port program (`VmRSS'), `ports => 1' and `auto': the cost
%% of an extra idle port.</li>
%% <li>`cross': a dict written by Python in port 1 and read by Python in port 2 (reads of the
%% other port's writes, ns per read, timed in Python), against the same reads in port 1.</li>
%% </ul>
%% Prints a table and writes `bench/results/pool-latest.json' (or `out=DIR').
-module(pool_bench).
-export([main/1]).

-define(WORK, <<"sum(i*i for i in range(100000))">>).

main(Args) ->
    O = opts(Args),
    ok = logger:set_primary_config(level, warning),
    _ = application:load(pyport),
    Cores = erlang:system_info(schedulers_online),
    io:format("pool_bench: ~b round(s), ~b scheduler(s), ~.1f s per cpu case~n",
              [maps:get(rounds, O), Cores, maps:get(cpu_ms, O) / 1000]),
    Rounds = [round_(R, O, Cores) || R <- lists:seq(1, maps:get(rounds, O))],
    Figs = summarise(Rounds),
    print(Figs, Cores),
    write(O, Figs, Cores),
    _ = application:stop(pyport),
    halt(case check(Figs, Cores, O) of ok -> 0; failed -> 1 end).

opts(Args) ->
    lists:foldl(fun("rounds=" ++ N, O) -> O#{rounds := list_to_integer(N)};
                   ("out=" ++ D, O) -> O#{out := D};
                   ("smoke", O) -> O#{rounds := 1, cpu_ms := 300, reads := 2000, smoke := true};
                   (Other, _) -> erlang:error({bad_argument, Other})
                end, #{rounds => 5, out => "bench/results", cpu_ms => 3000, reads => 200000,
                       smoke => false}, Args).

%% One round: both pool sizes, in an order that alternates by round.
round_(R, O, Cores) ->
    Order = case R rem 2 of 1 -> [1, auto]; 0 -> [auto, 1] end,
    Cpu = maps:from_list([{Ports, cpu_case(Ports, Cores, O)} || Ports <- Order]),
    #{cps := Cps1, rss := Rss1} = maps:get(1, Cpu),
    #{cps := CpsN, rss := RssN} = maps:get(auto, Cpu),
    Cross = cross_case(O),
    Row = Cross#{cps_1 => Cps1, cps_auto => CpsN, ratio => CpsN / Cps1,
                 rss_1_kib => lists:sum(Rss1),
                 rss_extra_kib => (lists:sum(RssN) - lists:sum(Rss1)) / max(1, length(RssN) - 1)},
    io:format("round ~b: ports=1 ~.1f calls/s, ports=auto ~.1f calls/s (~.2fx); idle RSS ~p / ~p KiB; "
              "cross-port read ~b ns, same-port ~b ns~n",
              [R, Cps1, CpsN, CpsN / Cps1, Rss1, RssN, round(maps:get(cross_ns, Cross)), round(maps:get(same_ns, Cross))]),
    Row.

restart(Ports) ->
    _ = application:stop(pyport),
    ok = application:set_env(pyport, ports, Ports),
    {ok, _} = application:ensure_all_started(pyport),
    wait_ready(erlang:monotonic_time(millisecond) + 60000).

wait_ready(Deadline) ->
    case py:stats() of
        {ok, #{ready := true, ports := Ports}} -> Ports;
        _ ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> erlang:error(pool_not_ready);
                false -> receive after 20 -> wait_ready(Deadline) end
            end
    end.

cpu_case(Ports, Cores, O) ->
    PortMaps = restart(Ports),
    Rss = [rss_kib(maps:get(os_pid, P)) || P <- PortMaps],
    Work = fun() -> {ok, _} = py:call(builtins, eval, [?WORK]) end,
    %% Warm-up: every port has imported what it needs.
    _ = [Work() || _ <- lists:seq(1, 4 * length(PortMaps))],
    Ms = maps:get(cpu_ms, O),
    Self = self(),
    T0 = erlang:monotonic_time(millisecond),
    Pids = [spawn_link(fun() -> Self ! {n, self(), loop(Work, T0 + Ms, 0)} end)
            || _ <- lists:seq(1, Cores)],
    N = lists:sum([receive {n, P, K} -> K end || P <- Pids]),
    Wall = erlang:monotonic_time(millisecond) - T0,
    #{cps => N * 1000 / Wall, rss => Rss}.

loop(F, Deadline, N) ->
    case erlang:monotonic_time(millisecond) >= Deadline of
        true -> N;
        false -> F(), loop(F, Deadline, N + 1)
    end.

%% Port 1 writes N keys; port 2 reads them back, and so does port 1 (timed in Python).
cross_case(O) ->
    _ = restart(2),
    {ok, SD} = py:shared_dict_new(),
    N = maps:get(reads, O),
    Write = <<"d = __import__('erlang').SharedDict(sd)\nfor i in range(1000): d[str(i)] = i">>,
    Read = <<"import time\nd = __import__('erlang').SharedDict(sd)\nt = time.perf_counter()\n"
             "for i in range(n): d[str(i % 1000)]\nns = (time.perf_counter() - t) * 1e9 / n">>,
    ok = on_port(1, fun() -> py:exec(Write, #{sd => SD}) end),
    [Cross, Same] = [on_port(I, fun() ->
                                        ok = py:exec(Read, #{sd => SD, n => N}),
                                        {ok, Ns} = py:eval(<<"ns">>),
                                        Ns
                                end) || I <- [2, 1]],
    #{cross_ns => Cross, same_ns => Same}.

on_port(I, Fun) ->
    Self = self(),
    {Pid, Ref} = spawn_monitor(fun() ->
                                       true = ets:insert_new(pyport_homes, {self(), I}),
                                       Self ! {self(), Fun()}
                               end),
    receive
        {Pid, R} -> erlang:demonitor(Ref, [flush]), R;
        {'DOWN', Ref, process, Pid, Why} -> erlang:error({on_port, I, Why})
    end.

rss_kib(OsPid) ->
    {ok, S} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/status"),
    [Line] = [L || L <- binary:split(S, <<"\n">>, [global]), binary:match(L, <<"VmRSS:">>) =/= nomatch],
    [_, Kib | _] = string:lexemes(binary_to_list(Line), " \t"),
    list_to_integer(Kib).

%% The median over rounds of every figure.
summarise(Rounds) ->
    Keys = maps:keys(hd(Rounds)),
    maps:from_list([{K, median([maps:get(K, R) || R <- Rounds])} || K <- Keys]).

median(L) ->
    S = lists:sort(L),
    lists:nth((length(S) + 1) div 2, S).

print(F, Cores) ->
    io:format("~npool of ports (medians over rounds):~n"
              "  CPU-bound Python, ~b callers:  ports=1 ~.1f calls/s   ports=auto (~b) ~.1f calls/s   ratio ~.2fx (target >= ~.2fx)~n"
              "  idle RSS: one port ~b KiB, each extra port ~b KiB~n"
              "  a dict written in port 1, read by Python in port 2: ~b ns per read (port 1 itself: ~b ns)~n",
              [Cores, maps:get(cps_1, F), Cores, maps:get(cps_auto, F), maps:get(ratio, F), 0.8 * Cores,
               round(maps:get(rss_1_kib, F)), round(maps:get(rss_extra_kib, F)),
               round(maps:get(cross_ns, F)), round(maps:get(same_ns, F))]).

write(O, F, Cores) ->
    Dir = maps:get(out, O),
    ok = filelib:ensure_path(Dir),
    Json = ["{\"cores\": ", integer_to_list(Cores), ", \"target_ratio\": ", float_to_list(0.8 * Cores, [{decimals, 2}]),
            [[", \"", atom_to_list(K), "\": ", io_lib:format("~.3f", [V * 1.0])] || {K, V} <- maps:to_list(F)], "}\n"],
    File = case maps:get(smoke, O) of
               true -> filename:join(Dir, "pool-smoke.json");
               false -> filename:join(Dir, "pool-latest.json")
           end,
    ok = file:write_file(File, Json).

%% The smoke run checks only that every case ran and answered; the full run checks the
%% scaling target.
check(_F, _Cores, #{smoke := true}) ->
    io:format("bench-pool-smoke: 3 passed, 0 failed~n"),
    ok;
check(F, Cores, _O) ->
    case maps:get(ratio, F) >= 0.8 * Cores of
        true -> io:format("target cpu_scaling: met~n"), ok;
        false -> io:format("target cpu_scaling: MISSED (~.2fx < ~.2fx)~n", [maps:get(ratio, F), 0.8 * Cores]), failed
    end.
