%% SharedDicts of a pool of ports: one set of dicts in shared memory that every port reads
%% and writes, a read cache in the VM that stays right whichever port serves, dicts that
%% outlive any port (a SIGKILL in the middle of writes included), the size bound, and the
%% shared-memory file's life.
%%
%% random_kills: Python in both ports hammers counters and sets while a port is SIGKILLed
%% at random moments, `POOL_KILLS' times (default 100; `make soak' sets thousands). After:
%% every acknowledged write is there, every counter equals its acknowledged increments (plus
%% at most the ones in flight at a kill), and the store's checker finds nothing wrong.
-module(shared_dict_pool_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-include_lib("kernel/include/file.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2,
         end_per_testcase/2]).
-export([a_write_in_one_port_is_read_in_the_other/1,
         the_cache_follows_python_writes_of_any_port/1,
         a_reader_through_the_cache_never_goes_back/1,
         a_destroy_in_another_port_is_seen_at_once/1,
         owner_death_destroys_the_dicts_once/1,
         a_full_store_fails_the_write_alone/1,
         handles_survive_restarts_of_every_port/1,
         the_file_lives_with_the_pool/1,
         stale_files_of_dead_vms_are_removed/1,
         bad_shared_dict_memory_fails_the_start/1,
         destroy_without_a_port_raises_and_keeps_the_dict/1,
         random_kills/1]).

-define(LIB, pyport_ct_lib).
-define(ENV_KEYS, [ports, shared_dict_memory, shared_dict_dir, sys_path, startup_code,
                   start_timeout_ms]).
-define(DEFAULT_KILLS, 100).

suite() ->
    [{timetrap, {minutes, 15}}].

all() ->
    [a_write_in_one_port_is_read_in_the_other,
     the_cache_follows_python_writes_of_any_port,
     a_reader_through_the_cache_never_goes_back,
     a_destroy_in_another_port_is_seen_at_once,
     owner_death_destroys_the_dicts_once,
     a_full_store_fails_the_write_alone,
     handles_survive_restarts_of_every_port,
     the_file_lives_with_the_pool,
     stale_files_of_dead_vms_are_removed,
     bad_shared_dict_memory_fails_the_start,
     destroy_without_a_port_raises_and_keeps_the_dict,
     random_kills].

init_per_suite(Config) ->
    Saved = ?LIB:save_env(?ENV_KEYS),
    ok = ?LIB:stop_app(),
    [{saved_env, Saved} | Config].

end_per_suite(Config) ->
    ?LIB:restore_env_and_restart(?config(saved_env, Config)).

init_per_testcase(_Case, Config) ->
    ?LIB:restore_env(?config(saved_env, Config)),
    _ = application:load(pyport),
    ok = application:set_env(pyport, ports, 2),
    ok = application:set_env(pyport, sys_path, [?config(data_dir, Config)]),
    Config.

end_per_testcase(_Case, _Config) ->
    ?LIB:stop_app().

%%--------------------------------------------------------------------

start() ->
    _ = ?LIB:start_app(),
    ok = ?LIB:wait_until(fun() -> maps:get(ready, ?LIB:stats()) end, 30000, pool_ready).

%% Runs Fun in a fresh process whose home is port I, and returns its result.
on_port(I, Fun) ->
    ?LIB:run_in_process(fun() ->
                                true = ets:insert_new(pyport_homes, {self(), I}),
                                Fun()
                        end).

port_eval(I, Code, Locals) ->
    on_port(I, fun() -> py:eval(Code, Locals) end).

port_exec(I, Code, Locals) ->
    on_port(I, fun() -> py:exec(Code, Locals) end).

os_pids() ->
    [maps:get(os_pid, P) || P <- maps:get(ports, ?LIB:stats())].

%%--------------------------------------------------------------------

a_write_in_one_port_is_read_in_the_other(_Config) ->
    ok = start(),
    [P1, P2] = os_pids(),
    {ok, SD} = py:shared_dict_new(),
    ok = port_exec(1, <<"from erlang import SharedDict\nSharedDict(sd)['one'] = {'a': [1, 2]}">>, #{sd => SD}),
    ?assertEqual({ok, {P2, #{<<"a">> => [1, 2]}}},
                 port_eval(2, <<"(__import__('os').getpid(), __import__('erlang').SharedDict(sd)['one'])">>, #{sd => SD})),
    ok = py:shared_dict_set(SD, <<"two">>, 2),
    ?assertEqual([{ok, {P, 2}} || P <- [P1, P2]],
                 [port_eval(I, <<"(__import__('os').getpid(), __import__('erlang').SharedDict(sd)['two'])">>, #{sd => SD})
                  || I <- [1, 2]]),
    ?assertEqual(#{<<"a">> => [1, 2]}, py:shared_dict_get(SD, <<"one">>)),
    ?assertEqual([<<"one">>, <<"two">>], py:shared_dict_keys(SD)).

%% Whoever has seen a Python-side write, through the reply of the call that wrote or of a
%% later call in any port, reads that value or a newer one, with the value cached before.
the_cache_follows_python_writes_of_any_port(_Config) ->
    ok = start(),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, 0),
    lists:foreach(
      fun(N) ->
              %% Cached (a miss, then a hit).
              _ = py:shared_dict_get(SD, <<"k">>),
              ?assertEqual(N - 1, py:shared_dict_get(SD, <<"k">>)),
              Writer = 1 + N rem 2,
              ok = port_exec(Writer, <<"__import__('erlang').SharedDict(sd)['k'] = n">>, #{sd => SD, n => N}),
              ?assertEqual(N, py:shared_dict_get(SD, <<"k">>), {write_in_port, Writer}),
              %% A later call in the other port saw it: so does the cache.
              _ = py:shared_dict_get(SD, <<"k">>),
              ok = port_exec(3 - Writer, <<"d = __import__('erlang').SharedDict(sd)\nd['k'] = d['k'] + 1000 - 1000">>, #{sd => SD}),
              ?assertEqual(N, py:shared_dict_get(SD, <<"k">>))
      end, lists:seq(1, 200)),
    #{cache_hits := Hits} = maps:get(shared_dict, ?LIB:stats()),
    ?assert(Hits >= 200, Hits).

%% A process reading through the cache while Python in both ports counts never reads a
%% smaller count than one it read before, and reads the last one once the writers are done.
a_reader_through_the_cache_never_goes_back(_Config) ->
    ok = start(),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"n">>, 0),
    Self = self(),
    Writers = [spawn_link(fun() ->
                                  true = ets:insert_new(pyport_homes, {self(), I}),
                                  [{ok, _} = py:eval(<<"__import__('erlang').SharedDict(sd).incr('n')">>, #{sd => SD})
                                   || _ <- lists:seq(1, 300)],
                                  Self ! {written, self(), ok}
                          end) || I <- [1, 2]],
    Reader = spawn_link(fun() -> read_loop(SD, 0, 0, Self) end),
    [ok, ok] = ?LIB:collect(written, Writers),
    ?assertEqual(600, py:shared_dict_get(SD, <<"n">>)),
    Reader ! stop,
    [{Reads, Last}] = ?LIB:collect(reads, [Reader]),
    ct:pal("~b reads through the cache; last ~b", [Reads, Last]),
    ?assert(Reads > 0).

read_loop(SD, Reads, Last, Parent) ->
    receive
        stop -> Parent ! {reads, self(), {Reads, Last}}
    after 0 ->
            N = py:shared_dict_get(SD, <<"n">>),
            N >= Last orelse exit({went_back, Last, N}),
            read_loop(SD, Reads + 1, N, Parent)
    end.

a_destroy_in_another_port_is_seen_at_once(_Config) ->
    ok = start(),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, 1),
    1 = py:shared_dict_get(SD, <<"k">>),
    1 = py:shared_dict_get(SD, <<"k">>),
    ok = port_exec(2, <<"__import__('erlang').SharedDict(sd).destroy()">>, #{sd => SD}),
    ?assertError({shared_dict_destroyed, SD}, py:shared_dict_get(SD, <<"k">>)),
    ?assertMatch({error, {python, <<"erlang.SharedDictDestroyed">>, <<"SharedDict has been destroyed">>, _}},
                 port_eval(1, <<"__import__('erlang').SharedDict(sd)['k']">>, #{sd => SD})).

owner_death_destroys_the_dicts_once(_Config) ->
    ok = start(),
    Dicts0 = maps:get(dicts, ?LIB:stats()),
    {ok, Kept} = py:shared_dict_new(),
    Self = self(),
    Owner = spawn(fun() ->
                          true = ets:insert_new(pyport_homes, {self(), 2}),
                          SDs = [begin
                                     {ok, SD} = py:shared_dict_new(),
                                     ok = py:shared_dict_set(SD, <<"k">>, I),
                                     I = py:shared_dict_get(SD, <<"k">>),
                                     SD
                                 end || I <- lists:seq(1, 5)],
                          Self ! {made, SDs},
                          receive stop -> ok end
                  end),
    SDs = receive {made, L} -> L after 10000 -> ct:fail(no_dicts) end,
    ?assertEqual(Dicts0 + 6, maps:get(dicts, ?LIB:stats())),
    [I = py:shared_dict_get(SD, <<"k">>) || {I, SD} <- lists:enumerate(SDs)],
    exit(Owner, kill),
    ok = ?LIB:wait_until(fun() -> maps:get(dicts, ?LIB:stats()) =:= Dicts0 + 1 end, 10000, owner_dicts_gone),
    [?assertError({shared_dict_destroyed, SD}, py:shared_dict_get(SD, <<"k">>)) || SD <- SDs],
    [?assertMatch({error, {python, <<"erlang.SharedDictDestroyed">>, _, _}},
                  port_eval(1, <<"__import__('erlang').SharedDict(sd)['k']">>, #{sd => SD})) || SD <- SDs],
    ?assertEqual(0, pyport_sd_owners:pending_drops()),
    ok = py:shared_dict_set(Kept, <<"k">>, kept),
    ?assertEqual(<<"kept">>, py:shared_dict_get(Kept, <<"k">>)).

a_full_store_fails_the_write_alone(_Config) ->
    ok = application:set_env(pyport, shared_dict_memory, 1 bsl 20),
    ok = start(),
    {ok, Other} = py:shared_dict_new(),
    ok = py:shared_dict_set(Other, <<"small">>, 1),
    {ok, SD} = py:shared_dict_new(),
    Big = binary:copy(<<"x">>, 10000),
    N = fill(SD, Big, 0),
    ?assert(N > 20 andalso N < 110, N),
    ?assertError({shared_dict_full, SD}, py:shared_dict_set(SD, <<"more">>, Big)),
    ?assertMatch({error, {python, 'MemoryError', _, _}},
                 port_exec(2, <<"__import__('erlang').SharedDict(sd)['py'] = b'y' * 20000">>, #{sd => SD})),
    ?assertEqual(1, py:shared_dict_get(Other, <<"small">>)),
    ok = py:shared_dict_set(Other, <<"small">>, 2),
    [ok = py:shared_dict_del(SD, integer_to_binary(I)) || I <- lists:seq(1, N)],
    ?assertEqual(N, fill(SD, Big, 0)),
    #{memory_used := Used, memory_limit := Limit} = maps:get(shared_dict, ?LIB:stats()),
    ?assert(Used =< Limit andalso Limit < 1 bsl 20, {Used, Limit}).

fill(SD, V, N) ->
    try py:shared_dict_set(SD, integer_to_binary(N + 1), V) of
        ok -> fill(SD, V, N + 1)
    catch
        error:{shared_dict_full, SD} -> N
    end.

handles_survive_restarts_of_every_port(_Config) ->
    ok = start(),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, 1),
    1 = py:shared_dict_get(SD, <<"k">>),
    Before = os_pids(),
    ok = py:restart(),
    ?assertEqual([], [P || P <- os_pids(), lists:member(P, Before)]),
    ?assertEqual(1, py:shared_dict_get(SD, <<"k">>)),
    ?assertEqual({ok, 2}, port_eval(2, <<"__import__('erlang').SharedDict(sd).incr('k')">>, #{sd => SD})),
    ?assertEqual(2, py:shared_dict_get(SD, <<"k">>)).

the_file_lives_with_the_pool(_Config) ->
    ok = start(),
    Path = pyport_shm:path(),
    ?assertEqual("/dev/shm", filename:dirname(Path)),
    {ok, #file_info{mode = Mode, size = Size}} = file:read_file_info(Path),
    ?assertEqual(8#600, Mode band 8#777),
    ?assertEqual(1 bsl 30, Size),
    %% The sparse file costs what is used, not its size.
    ?assert(disk_kib(Path) < 64 * 1024, disk_kib(Path)),
    ok = ?LIB:stop_app(),
    ?assertNot(filelib:is_file(Path)),
    ?assertEqual(undefined, pyport_shm:path()).

%% A VM killed with kill -9 leaves its file; the next pool's start removes the files of VMs
%% that are gone, and keeps those of VMs that run.
stale_files_of_dead_vms_are_removed(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "shm"),
    ok = filelib:ensure_path(Dir),
    ok = application:set_env(pyport, shared_dict_dir, Dir),
    Dead = dead_os_pid(),
    {ok, Peer, Node} = peer:start_link(#{name => peer:random_name(?MODULE)}),
    Alive = erpc:call(Node, os, getpid, []),
    Stale = filename:join(Dir, "pyport-gone_host-" ++ Dead ++ "-7.sd"),
    StaleNew = Stale ++ ".new-" ++ Dead,
    Live = filename:join(Dir, "pyport-other_host-" ++ Alive ++ "-7.sd"),
    Unrelated = filename:join(Dir, "not-pyport-" ++ Dead ++ "-7.sd"),
    [ok = file:write_file(F, <<"x">>) || F <- [Stale, StaleNew, Live, Unrelated]],
    ok = start(),
    ?assertEqual([false, false, true, true], [filelib:is_file(F) || F <- [Stale, StaleNew, Live, Unrelated]]),
    ?assertEqual(Dir, filename:dirname(pyport_shm:path())),
    peer:stop(Peer).

bad_shared_dict_memory_fails_the_start(_Config) ->
    [begin
         ok = application:set_env(pyport, shared_dict_memory, Bad),
         ?assertMatch({error, {pyport, {{bad_config, {shared_dict_memory, Bad, _}}, _}}},
                      application:ensure_all_started(pyport))
     end || Bad <- [(1 bsl 20) - 1, 0, -1, big]],
    ok = application:set_env(pyport, shared_dict_memory, 1 bsl 20),
    {ok, _} = application:ensure_all_started(pyport).

%%--------------------------------------------------------------------
%% Random kills

%% No port is up (its start-up code fails, it restarts with back-off): a destroy
%% raises `{pyport_unavailable, _}' instead of answering `ok', and the dict is still
%% there with its entries when a port is back; then the destroy does it.
%% (Before dicts lived in shared memory, `ok' was true: the dict died with its port.)
destroy_without_a_port_raises_and_keeps_the_dict(_Config) ->
    ok = application:set_env(pyport, ports, 1),
    ok = application:set_env(pyport, start_timeout_ms, 2000),
    ok = start(),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, <<"v">>),
    ok = application:set_env(pyport, startup_code, <<"raise SystemExit(3)">>),
    {error, _} = py:restart(),
    ?assertError({pyport_unavailable, _}, py:shared_dict_destroy(SD)),
    ok = application:unset_env(pyport, startup_code),
    ok = py:restart(),
    ?assertEqual([<<"k">>], py:shared_dict_keys(SD)),
    ?assertEqual(<<"v">>, py:shared_dict_get(SD, <<"k">>)),
    ok = py:shared_dict_destroy(SD),
    ?assertError({shared_dict_destroyed, SD}, py:shared_dict_keys(SD)),
    ok = py:shared_dict_destroy(SD).

random_kills(_Config) ->
    Kills = case os:getenv("POOL_KILLS") of
                false -> ?DEFAULT_KILLS;
                "" -> ?DEFAULT_KILLS;
                S -> list_to_integer(S)
            end,
    ok = start(),
    {ok, SD} = py:shared_dict_new(),
    Self = self(),
    Drivers = [spawn_link(fun() -> driver(SD, I, Self) end) || I <- lists:seq(1, 4)],
    T0 = erlang:monotonic_time(millisecond),
    Acked0 = wait_acks(Drivers, 1),
    ok = kill_loop(Kills, rand:uniform(2)),
    [D ! stop || D <- Drivers],
    Results = ?LIB:collect(driver_done, Drivers),
    Ms = erlang:monotonic_time(millisecond) - T0,
    ok = ?LIB:wait_until(fun() -> maps:get(ready, ?LIB:stats()) end, 30000, pool_back),
    [check_driver(SD, R) || R <- Results],
    ?assertEqual({ok, []}, sd_check()),
    Acked = lists:sum([length(maps:get(acked, R)) || R <- Results]),
    ct:pal("~b kills in ~b ms; ~b acknowledged steps (~b before the first kill), ~b "
           "answered with an error; store: ~tp",
           [Kills, Ms, Acked, Acked0, lists:sum([maps:get(failed, R) || R <- Results]),
            maps:with([lock_recoveries, memory_used], maps:get(shared_dict, ?LIB:stats()))]).

%% Each driver lives on one port's side of the pool (its home), and steps: Python
%% increments its counter and sets a key, the Erlang side increments another counter.
driver(SD, I, Parent) ->
    true = ets:insert_new(pyport_homes, {self(), 1 + I rem 2}),
    Me = integer_to_binary(I),
    driver_loop(SD, Me, 1, #{me => Me, acked => [], failed => 0, erl_acked => 0, erl_failed => 0},
                Parent).

driver_loop(SD, Me, N, Acc, Parent) ->
    receive
        stop -> Parent ! {driver_done, self(), Acc}
    after 0 ->
            %% A failure that may have happened in the port (its death or a timeout with
            %% the step in flight) leaves the counters one higher at most; one of a port
            %% that was not there cannot have.
            Acc1 = case py:call(pool_hammer, step, [SD, Me, N], #{}, 10000) of
                       {ok, N} -> Acc#{acked := [N | maps:get(acked, Acc)]};
                       {error, {pyport_unavailable, _}} -> Acc;
                       {error, _} -> Acc#{failed := maps:get(failed, Acc) + 1}
                   end,
            Acc2 = try py:shared_dict_update_counter(SD, <<"e_", Me/binary>>, 1) of
                       _ -> Acc1#{erl_acked := maps:get(erl_acked, Acc1) + 1}
                   catch
                       error:{pyport_unavailable, {exit_status, _}} -> Acc1#{erl_failed := maps:get(erl_failed, Acc1) + 1};
                       error:{pyport_timeout, _} -> Acc1#{erl_failed := maps:get(erl_failed, Acc1) + 1};
                       error:{pyport_unavailable, _} -> Acc1
                   end,
            Parent ! {acked, self()},
            driver_loop(SD, Me, N + 1, Acc2, Parent)
    end.

wait_acks(Drivers, Min) ->
    Counts = [receive {acked, D} -> 1 after 30000 -> ct:fail({no_progress, D}) end
              || D <- Drivers, _ <- lists:seq(1, Min)],
    lists:sum(Counts).

%% Kills a random port, waits until it serves again, then lets work run a random moment.
kill_loop(0, _) ->
    ok;
kill_loop(N, _) ->
    I = rand:uniform(2),
    Old = port_field(I, os_pid),
    _ = os:cmd("kill -9 " ++ integer_to_list(Old)),
    ok = ?LIB:wait_until(fun() ->
                                 port_field(I, ready) =:= true andalso port_field(I, os_pid) =/= Old
                         end, 30000, {port_back, I}),
    flush_acks(),
    receive after rand:uniform(30) - 1 -> ok end,
    kill_loop(N - 1, I).

flush_acks() ->
    receive {acked, _} -> flush_acks() after 0 -> ok end.

port_field(I, Key) ->
    case py:stats() of
        {ok, #{ports := Ports}} when length(Ports) >= I -> maps:get(Key, lists:nth(I, Ports), undefined);
        _ -> undefined
    end.

check_driver(SD, #{me := Me, acked := Acked, failed := Failed, erl_acked := EAcked, erl_failed := EFailed}) ->
    Missing = [{N, V} || N <- Acked,
                         V <- [py:shared_dict_get(SD, <<"k_", Me/binary, "_", (integer_to_binary(N))/binary>>)],
                         V =/= N],
    ?assertEqual([], Missing, {driver, Me}),
    C = py:shared_dict_get(SD, <<"c_", Me/binary>>, 0),
    ?assert(C >= length(Acked) andalso C =< length(Acked) + Failed, {counter, Me, C, length(Acked), Failed}),
    E = py:shared_dict_get(SD, <<"e_", Me/binary>>, 0),
    ?assert(E >= EAcked andalso E =< EAcked + EFailed, {erlang_counter, Me, E, EAcked, EFailed}).

sd_check() ->
    Id = pyport_request:new_id(),
    pyport_request:decoded(pyport_request:request(caller, Id, term_to_binary({sd_check, Id}), 60000)).

%%--------------------------------------------------------------------

%% The OS pid of a process that has exited.
dead_os_pid() ->
    Port = open_port({spawn, "true"}, [exit_status]),
    {os_pid, Pid} = erlang:port_info(Port, os_pid),
    receive {Port, {exit_status, _}} -> ok end,
    integer_to_list(Pid).

disk_kib(Path) ->
    list_to_integer(string:trim(os:cmd("du -k " ++ Path ++ " | cut -f1"))).
