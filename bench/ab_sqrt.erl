%% @doc A/B helper for bench/ab.sh: prints "P50 P99 P10 MEAN" (us) of N sequential
%% py:call(math, sqrt, [2.0]) after 1000 warm-up calls, with the port binary Exe
%% and whatever pyport beams are first on the code path.
-module(ab_sqrt).
-export([main/1]).

main([Exe, N0]) ->
    N = list_to_integer(N0),
    ok = application:load(pyport),
    ok = application:set_env(pyport, pyport_executable, Exe),
    ok = logger:set_primary_config(level, warning),
    ok = application:start(pyport),
    _ = [{ok, _} = py:call(math, sqrt, [2.0]) || _ <- lists:seq(1, 1000)],
    Ts = [begin
              T0 = erlang:monotonic_time(nanosecond),
              {ok, _} = py:call(math, sqrt, [2.0]),
              erlang:monotonic_time(nanosecond) - T0
          end || _ <- lists:seq(1, N)],
    S = list_to_tuple(lists:sort(Ts)),
    io:format("~.3f ~.3f ~.3f ~.3f~n",
              [element(N div 2, S) / 1000, element(round(N * 0.99), S) / 1000,
               element(max(1, N div 10), S) / 1000, lists:sum(Ts) / N / 1000]),
    halt().
