%% @doc A/B helper for bench/ab.sh: prints "P50 P99 P10 MEAN" (us) of N sequential
%% calls after 1000 warm-up calls, with the port binary Exe and whatever pyport
%% beams are first on the code path. The call is py:call(math, sqrt, [2.0]), or
%% with Case "map_100" the echo of the bench's 100-entry map (100 binary keys to
%% integers) through a Python identity function.
-module(ab_sqrt).
-export([main/1]).

main([Exe, N0]) ->
    main([Exe, N0, "sqrt"]);
main([Exe, N0, Case]) ->
    N = list_to_integer(N0),
    ok = application:load(pyport),
    ok = application:set_env(pyport, pyport_executable, Exe),
    ok = logger:set_primary_config(level, warning),
    ok = application:start(pyport),
    Call = case Case of
               "sqrt" ->
                   fun() -> {ok, _} = py:call(math, sqrt, [2.0]) end;
               "map_100" ->
                   ok = py:exec(<<"def echo(x): return x">>),
                   Map = maps:from_list([{<<"key", (integer_to_binary(I))/binary>>, I}
                                         || I <- lists:seq(1, 100)]),
                   fun() -> {ok, Map} = py:call('__main__', echo, [Map]) end
           end,
    _ = [Call() || _ <- lists:seq(1, 1000)],
    Ts = [begin
              T0 = erlang:monotonic_time(nanosecond),
              Call(),
              erlang:monotonic_time(nanosecond) - T0
          end || _ <- lists:seq(1, N)],
    S = list_to_tuple(lists:sort(Ts)),
    io:format("~.3f ~.3f ~.3f ~.3f~n",
              [element(N div 2, S) / 1000, element(round(N * 0.99), S) / 1000,
               element(max(1, N div 10), S) / 1000, lists:sum(Ts) / N / 1000]),
    halt().
