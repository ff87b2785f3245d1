%% @doc Times bench/floor's port program (inline, relay, select, borrow) against /bin/cat:
%% sequential echoes of the frame py:call(math, sqrt, [2.0]) writes, each with the
%% term codec work of a call (two term_to_binary, two binary_to_term), interleaved
%% in blocks of 50 calls, 400 blocks per port after 2000 warm-up calls each.
%% Prints p50 and p99 of each and their ratio to the cat port. Run it in a VM
%% started under `taskset -c 0' (make bench-floor does) to get the one-CPU figures.
-module(floor_probe).
-export([main/1]).

main([Exe]) ->
    Ports = [{cat, open_port({spawn_executable, "/bin/cat"}, [{packet, 4}, binary])}]
        ++ [{list_to_atom(M), open_port({spawn_executable, Exe}, [{packet, 4}, binary, {args, [M]}])}
            || M <- ["inline", "relay", "select", "borrow"]],
    _ = [echo(P) || _ <- lists:seq(1, 2000), {_, P} <- Ports],
    Times = lists:foldl(
              fun(_, Acc) ->
                      lists:foldl(fun({Name, P}, A) ->
                                          Ts = [time_echo(P) || _ <- lists:seq(1, 50)],
                                          maps:update_with(Name, fun(L) -> Ts ++ L end, Ts, A)
                                  end, Acc, Ports)
              end, #{}, lists:seq(1, 400)),
    {Cat50, Cat99} = percentiles(maps:get(cat, Times)),
    _ = [begin
             {P50, P99} = percentiles(maps:get(Name, Times)),
             io:format("~-7s p50 ~6.2f us (~4.2fx cat)  p99 ~6.2f us (~4.2fx cat)~n",
                       [Name, P50, P50 / Cat50, P99, P99 / Cat99])
         end || {Name, _} <- Ports],
    halt().

time_echo(P) ->
    T0 = erlang:monotonic_time(nanosecond),
    echo(P),
    erlang:monotonic_time(nanosecond) - T0.

echo(P) ->
    Payload = term_to_binary({[2.0], #{}}),
    Frame = term_to_binary({call, 1, self(), <<"math">>, <<"sqrt">>, Payload}),
    true = port_command(P, Frame),
    receive
        {P, {data, D}} ->
            {call, 1, _, _, _, Echo} = binary_to_term(D, [safe]),
            {[2.0], #{}} = binary_to_term(Echo, [safe])
    after 10000 -> erlang:error(timeout)
    end.

percentiles(L) ->
    S = list_to_tuple(lists:sort(L)),
    N = tuple_size(S),
    {element(N div 2, S) / 1000, element(round(N * 0.99), S) / 1000}.
