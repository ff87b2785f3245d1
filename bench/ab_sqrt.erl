%% @doc A/B helper for bench/ab.sh: prints "P50 P99 P10 MEAN" (us) of N sequential
%% calls after 1000 warm-up calls, with the port binary Exe and whatever pyport
%% beams are first on the code path. The call is py:call(math, sqrt, [2.0]), or
%% with Case "map_100" the echo of the bench's 100-entry map (100 binary keys to
%% integers) through a Python identity function, or with "sd_get_cached" a SharedDict
%% get from the VM's read cache, or with "sd_py_loop" 1000 Python-side `d['k'] = i; d['k']'
%% on a SharedDict per call. "CASE+elixir" sets the app env elixir to true.
-module(ab_sqrt).
-export([main/1]).

main([Exe, N0]) ->
    main([Exe, N0, "sqrt"]);
main([Exe, N0, Case0]) ->
    N = list_to_integer(N0),
    %% "CASE+elixir" runs CASE with the app env elixir set to true.
    [Case | Flags] = string:split(Case0, "+", all),
    ok = application:load(pyport),
    ok = application:set_env(pyport, pyport_executable, Exe),
    [ok = application:set_env(pyport, elixir, true) || "elixir" <- Flags],
    ok = logger:set_primary_config(level, warning),
    %% A telemetry module on the code path (the stand-in of test/support for an A/B of
    %% pyport's events) gets a handler of some other event, as in an application that
    %% uses telemetry for other things: none for pyport's.
    _ = code:ensure_loaded(telemetry) =:= {module, telemetry}
        andalso telemetry:attach(ab, [ab, other], fun(_, _, _, _) -> ok end, nil),
    ok = application:start(pyport),
    Call = case Case of
               "sqrt" ->
                   fun() -> {ok, _} = py:call(math, sqrt, [2.0]) end;
               "map_100" ->
                   ok = py:exec(<<"def echo(x): return x">>),
                   Map = maps:from_list([{<<"key", (integer_to_binary(I))/binary>>, I}
                                         || I <- lists:seq(1, 100)]),
                   fun() -> {ok, Map} = py:call('__main__', echo, [Map]) end;
               "sd_py_loop" ->
                   %% Python's `d['k'] = i; d['k']' on a SharedDict, 1000 times a call:
                   %% the figures (us per call) read as ns per loop.
                   {ok, SD} = py:shared_dict_new(),
                   ok = py:exec(<<"from erlang import SharedDict\n"
                                  "def loop(h):\n"
                                  "    d = SharedDict(h)\n"
                                  "    for i in range(1000):\n"
                                  "        d['k'] = i\n"
                                  "        d['k']\n">>),
                   fun() -> {ok, _} = py:call('__main__', loop, [SD]) end;
               "sd_get_cached" ->
                   %% A SharedDict get answered from the VM's read cache (no port round trip).
                   {ok, SD} = py:shared_dict_new(),
                   ok = py:shared_dict_set(SD, <<"k">>, 42),
                   fun() -> 42 = py:shared_dict_get(SD, <<"k">>) end
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
