%% Soak: mixed concurrent calls, SharedDict traffic from Erlang and from
%% Python threads, owner processes dying, and the port disrupted every 15 s
%% (none in the last quarter of the run), for PYPORT_SOAK_SECONDS (default
%% 120, at least 30; `make soak' runs 600). The first three disruptions are
%% stubborn Python, once each: a builtin loop that holds the GIL past its
%% caller's timeout (the 1 s GIL watchdog restarts the port), a fork followed
%% by a segfault (the forked child must die with the port), and SIGSTOP (the
%% 1 s heartbeat replaces the port); the others SIGKILL the port program.
%% At the end:
%%
%% - every call was answered: calls issued = calls answered, and every load
%%   process finished;
%% - no acknowledged SharedDict write was lost on a live port: each writer
%%   reads back all its acknowledged keys while its dict's port generation is
%%   current; a missing or wrong value is a loss, a `shared_dict_destroyed'
%%   for a dict whose generation is still current is a loss too;
%% - py:stats() `dicts' and `namespaces' are back to their baseline once the
%%   owners are dead;
%% - the port's RSS (VmRSS) in the kill-free tail of the run, after a 10 s
%%   warm-up, grows by at most 64 MiB, and never exceeds 1 GiB.
%%
%% Counts and measurements are printed with ct:pal ("soak: ...").
-module(soak_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-import(pyport_ct_lib, [now_ms/0, wait_until/3]).

-define(SERVER, pyport_server).
-define(KILL_EVERY_MS, 15000).
-define(WARMUP_MS, 10000).
-define(RSS_GROWTH_MAX, (64 bsl 20)).
-define(RSS_MAX, (1 bsl 30)).
-define(CALLERS, 6).
-define(WRITERS, 3).
-define(CHURNERS, 2).
-define(KEYS_PER_DICT, 400).

%% counters
-define(ISSUED, 1).
-define(ANSWERED, 2).
-define(OK, 3).
-define(WRONG, 4).
-define(PORT_ERRORS, 5).
-define(ACKED, 6).
-define(VERIFIED, 7).
-define(LOST, 8).
-define(DESTROYED_SEEN, 9).
-define(SD_TIMEOUTS, 10).
-define(OWNERS, 11).
-define(OWNERS_KILLED, 12).
-define(PY_THREADS, 13).
-define(PY_REGRESSIONS, 14).
-define(DICTS_CYCLED, 15).
-define(PY_WRITES_SEEN, 16).
-define(NCOUNTERS, 16).

suite() ->
    [{timetrap, {seconds, soak_seconds() + async_soak_seconds() + 300}}].

all() ->
    [soak, async_soak].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

%% The async soak runs a quarter of the soak's time, at least 30 s (150 s in `make soak').
async_soak_seconds() ->
    max(30, soak_seconds() div 4).

soak_seconds() ->
    case os:getenv("PYPORT_SOAK_SECONDS") of
        false -> 120;
        S -> max(30, list_to_integer(string:trim(S)))
    end.

%%--------------------------------------------------------------------

soak(_Config) ->
    Saved = pyport_ct_lib:save_env([gil_watchdog_ms, heartbeat_timeout_ms]),
    ok = application:set_env(pyport, gil_watchdog_ms, 1000),
    ok = application:set_env(pyport, heartbeat_timeout_ms, 1000),
    try soak_run()
    after pyport_ct_lib:restore_env_and_restart(Saved)
    end.

soak_run() ->
    ok = pyport_ct_lib:restart_app(),
    Seconds = soak_seconds(),
    #{dicts := Dicts0, namespaces := Ns0} = pyport_ct_lib:stats(),
    C = counters:new(?NCOUNTERS, [write_concurrency]),
    T0 = now_ms(),
    Deadline = T0 + Seconds * 1000,
    %% no kills in the last quarter (at least 20 s): leaks and RSS are judged there
    KillUntil = Deadline - max(20000, Seconds * 250),
    Wrong = spawn_link(fun() -> wrong_log([]) end),
    Load = [spawn_monitor(fun() -> caller(Deadline, C, Wrong) end)
            || _ <- lists:seq(1, ?CALLERS)]
        ++ [spawn_monitor(fun() -> writer(N, Deadline, C, Wrong) end)
            || N <- lists:seq(1, ?WRITERS)]
        ++ [spawn_monitor(fun() -> churner(Deadline, C) end)
            || _ <- lists:seq(1, ?CHURNERS)],
    %% every 15 s (more often in runs too short for two kills at that pace)
    KillEvery = min(?KILL_EVERY_MS, (KillUntil - T0) div 2),
    Killer = spawn_link(fun() -> killer(T0 + KillEvery, KillEvery, KillUntil, []) end),
    Rss = spawn_link(fun() -> rss_sampler([]) end),
    %% every load process finishes (a hung call would keep it alive)
    Unfinished = [{Pid, Why} || {Pid, Ref} <- Load,
                                Why <- [receive {'DOWN', Ref, process, Pid, R} -> R
                                        after max(0, Deadline + 60000 - now_ms()) -> hung
                                        end],
                                Why =/= normal],
    {Kills, Forked} = stop(Killer),
    Samples = stop(Rss),
    WrongList = stop(Wrong),
    ElapsedS = (now_ms() - T0) / 1000,
    %% leaks: all owners are dead now
    Final = baseline(Dicts0, Ns0, now_ms() + 10000),
    %% every request the server wrote to the port was answered (or cancelled): with
    %% every load process finished, nothing may still wait in the server
    Pending = pending_drained(now_ms() + 10000),
    Count = fun(I) -> counters:get(C, I) end,
    Names = [issued, answered, ok, wrong, port_errors, sd_acked_writes, sd_verified_reads,
             sd_lost, sd_destroyed_seen, sd_timeouts, owners, owners_killed,
             python_threads, python_counter_regressions, dicts_cycled, python_writes_seen],
    Totals = maps:from_list(lists:zip(Names, [Count(I) || I <- lists:seq(1, ?NCOUNTERS)])),
    ct:pal("soak: ~b s (~.1f s elapsed), ~b port kills, ~b answered calls/s: ~999p",
           [Seconds, ElapsedS, length(Kills), round(Count(?ANSWERED) / ElapsedS), Totals]),
    ct:pal("soak: baseline dicts ~b, namespaces ~b; final stats ~999p",
           [Dicts0, Ns0, Final]),
    {RssReport, RssOk} = rss_report(Samples, lists:max([T0 | Kills])),
    ct:pal("soak: port RSS ~ts", [RssReport]),
    ct:pal("soak: wrong results (first 20): ~999p", [WrongList]),
    %% every check is evaluated and reported before the case fails
    Checks = [{every_load_process_finished, Unfinished =:= [], Unfinished},
              {no_request_left_pending_in_the_server, Pending =:= 0, Pending},
              {no_wrong_results, Count(?WRONG) =:= 0, Count(?WRONG)},
              {no_lost_acknowledged_writes, Count(?LOST) =:= 0, Count(?LOST)},
              {python_counters_never_went_back, Count(?PY_REGRESSIONS) =:= 0,
               Count(?PY_REGRESSIONS)},
              {dicts_back_to_baseline, maps:get(dicts, Final) =:= Dicts0,
               {maps:get(dicts, Final), Dicts0}},
              {namespaces_back_to_baseline, maps:get(namespaces, Final) =:= Ns0,
               {maps:get(namespaces, Final), Ns0}},
              {rss_within_bounds, RssOk, lists:flatten(RssReport)},
              {writes_were_verified, Count(?VERIFIED) > 0, Count(?VERIFIED)},
              {python_threads_wrote, Count(?PY_WRITES_SEEN) > 0, Count(?PY_WRITES_SEEN)},
              {owners_churned, Count(?OWNERS) > 0, Count(?OWNERS)},
              {port_was_killed, Kills =/= [], length(Kills)},
              %% a 2-minute run has room for the three stubborn disruptions
              {stubborn_python_disrupted, Seconds < 120 orelse length(Kills) >= 3, length(Kills)},
              {forked_children_gone, not lists:any(fun pyport_ct_lib:os_alive/1, Forked), Forked}],
    ?assertEqual([], [{Name, Detail} || {Name, false, Detail} <- Checks]),
    ok.

%% The server's count of requests waiting for the port, polled until it is 0 or
%% the deadline passes.
pending_drained(Deadline) ->
    case maps:get(pending, gen_server:call(?SERVER, stats)) of
        0 -> 0;
        N ->
            case now_ms() > Deadline of
                true -> N;
                false ->
                    timer:sleep(50),
                    pending_drained(Deadline)
            end
    end.

%% Polls py:stats() until dicts and namespaces are back to their baseline, or
%% the deadline passes; returns the last stats either way (checked by the caller).
baseline(Dicts0, Ns0, Deadline) ->
    case pyport_ct_lib:stats() of
        #{dicts := Dicts0, namespaces := Ns0} = S -> S;
        S ->
            case now_ms() > Deadline of
                true -> S;
                false ->
                    timer:sleep(100),
                    baseline(Dicts0, Ns0, Deadline)
            end
    end.

stop(Pid) ->
    Pid ! {stop, self()},
    receive {stopped, Pid, V} -> V
    after 30000 -> ct:fail({did_not_stop, Pid})
    end.

%% Collects the first 20 wrong results (details for the report).
wrong_log(Acc) ->
    receive
        {wrong, W} when length(Acc) < 20 -> wrong_log([W | Acc]);
        {wrong, _} -> wrong_log(Acc);
        {stop, From} -> From ! {stopped, self(), lists:reverse(Acc)}
    end.

wrong(Wrong, C, What) ->
    counters:add(C, ?WRONG, 1),
    Wrong ! {wrong, What},
    ok.

%%--------------------------------------------------------------------
%% Callers: mixed calls, each checked

caller(Deadline, C, Wrong) ->
    case now_ms() < Deadline of
        false -> ok;
        true ->
            op(rand:uniform(100), C, Wrong),
            caller(Deadline, C, Wrong)
    end.

%% Runs one call and classifies its result: Check(Result) (or
%% Check(Result, ElapsedMs)) is true for a correct answer.
checked(C, Wrong, What, Fun, Check) ->
    counters:add(C, ?ISSUED, 1),
    T0 = now_ms(),
    R = Fun(),
    Ms = now_ms() - T0,
    counters:add(C, ?ANSWERED, 1),
    case R of
        {error, {pyport_exit, _}} -> counters:add(C, ?PORT_ERRORS, 1);
        {error, {pyport_unavailable, _}} -> counters:add(C, ?PORT_ERRORS, 1);
        _ ->
            Ok = case is_function(Check, 2) of
                     true -> Check(R, Ms);
                     false -> Check(R)
                 end,
            case Ok of
                true -> counters:add(C, ?OK, 1);
                false -> wrong(Wrong, C, {What, R, {ms, Ms}})
            end
    end,
    R.

op(N, C, Wrong) when N =< 35 ->
    X = rand:uniform(1000000),
    checked(C, Wrong, sqrt, fun() -> py:call(math, sqrt, [X]) end,
            fun(R) -> R =:= {ok, math:sqrt(X)} end);
op(N, C, Wrong) when N =< 55 ->
    A = rand:uniform(1000), B = rand:uniform(1000), S = rand:bytes(rand:uniform(100)),
    checked(C, Wrong, eval,
            fun() -> py:eval(<<"a * b + len(s)">>, #{a => A, b => B, s => py:bytes(S)}) end,
            fun(R) -> R =:= {ok, A * B + byte_size(S)} end);
op(N, C, Wrong) when N =< 70 ->
    X = rand:uniform(1000),
    Gen = port_generation(),
    case checked(C, Wrong, exec,
                 fun() -> py:exec(<<"def soak_f(x):\n    return [x, x * 2]\n">>) end,
                 fun(R) -> R =:= ok end) of
        ok ->
            checked(C, Wrong, namespace_call,
                    fun() -> py:call('__main__', soak_f, [X]) end,
                    fun({ok, V}) -> V =:= [X, X * 2];
                       %% only a restart between exec and call may empty the namespace
                       ({error, {python, 'NameError', _, _}}) ->
                            port_generation() =/= Gen;
                       (_) -> false
                    end);
        _ ->
            ok
    end;
op(N, C, Wrong) when N =< 78 ->
    checked(C, Wrong, exception, fun() -> py:eval(<<"1 / 0">>) end,
            fun({error, {python, 'ZeroDivisionError', _, _}}) -> true;
               (_) -> false
            end);
op(N, C, Wrong) when N =< 84 ->
    %% gen_server:call's timer starts when the caller enters its receive: a
    %% caller descheduled for longer than the sleep finds the answer waiting.
    checked(C, Wrong, timeout_sleep,
            fun() -> py:eval(<<"__import__('time').sleep(0.3)">>, #{}, 50) end,
            fun({error, timeout}, _) -> true;
               ({ok, undefined}, Ms) -> Ms >= 300;
               (_, _) -> false
            end);
op(N, C, Wrong) when N =< 88 ->
    checked(C, Wrong, timeout_loop,
            fun() -> py:exec(<<"while True:\n    pass\n">>, #{}, 50) end,
            fun(R) -> R =:= {error, timeout} end);
op(N, C, Wrong) when N =< 94 ->
    Bin = rand:bytes(100000),
    checked(C, Wrong, big, fun() -> py:call(builtins, bytes, [py:bytes(Bin)]) end,
            fun(R) -> R =:= {ok, Bin} end);
op(_, C, Wrong) ->
    checked(C, Wrong, print,
            fun() -> py:exec(<<"print('soak output line')">>) end,
            fun(R) -> R =:= ok end).

%%--------------------------------------------------------------------
%% SharedDict writers: acknowledged writes are read back; a Python thread
%% writes into the same dict meanwhile

-define(PUMP, <<"
import threading, time
from erlang import SharedDict
def _soak_pump(h):
    sd = SharedDict(h)
    n = 0
    try:
        while True:
            n += 1
            sd['py'] = n
            sd['py_%d' % (n % 20)] = n
            if n % 10 == 0:
                sd.get('e1')
                len(sd)
            time.sleep(0.002)
    except RuntimeError:
        return
threading.Thread(target=_soak_pump, args=(h,), daemon=True).start()
">>).

writer(Id, Deadline, C, Wrong) ->
    writer_new_dict(Id, Deadline, C, Wrong).

writer_new_dict(Id, Deadline, C, Wrong) ->
    case now_ms() < Deadline of
        false -> ok;
        true ->
            try py:shared_dict_new() of
                {ok, SD} ->
                    case py:exec(?PUMP, #{h => SD}) of
                        ok -> counters:add(C, ?PY_THREADS, 1);
                        _ -> ok
                    end,
                    writer_loop(Id, SD, 1, #{}, 0, Deadline, C, Wrong)
            catch
                error:{pyport_unavailable, _} ->
                    timer:sleep(100),
                    writer_new_dict(Id, Deadline, C, Wrong);
                error:{pyport_timeout, _} ->
                    counters:add(C, ?SD_TIMEOUTS, 1),
                    writer_new_dict(Id, Deadline, C, Wrong)
            end
    end.

writer_loop(Id, SD, N, Acked, PyLast, Deadline, C, Wrong) when N > ?KEYS_PER_DICT ->
    %% full: verify, destroy explicitly (from Erlang), start over
    case verify(SD, Acked, PyLast, C, Wrong) of
        {ok, _} ->
            try
                ok = py:shared_dict_destroy(SD),
                py:shared_dict_keys(SD)
            of
                Keys -> wrong(Wrong, C, {keys_after_destroy, SD, length(Keys)})
            catch
                error:{shared_dict_destroyed, SD} -> counters:add(C, ?DICTS_CYCLED, 1);
                error:{pyport_timeout, _} -> counters:add(C, ?SD_TIMEOUTS, 1);
                %% A kill landed between the two: the destroy was done (it answered
                %% ok), the keys request found no port to ask.
                error:{pyport_unavailable, _} -> counters:add(C, ?DICTS_CYCLED, 1)
            end;
        gone ->
            ok
    end,
    writer_new_dict(Id, Deadline, C, Wrong);
writer_loop(Id, SD, N, Acked, PyLast, Deadline, C, Wrong) ->
    case now_ms() < Deadline of
        false ->
            _ = verify(SD, Acked, PyLast, C, Wrong),
            ok;
        true ->
            Key = <<"e", (integer_to_binary(N))/binary>>,
            Value = {Id, N, rand:bytes(rand:uniform(64))},
            Acked1 = try py:shared_dict_set(SD, Key, Value) of
                         ok ->
                             counters:add(C, ?ACKED, 1),
                             Acked#{Key => Value};
                         Other ->
                             wrong(Wrong, C, {sd_set, Other}),
                             Acked
                     catch
                         error:{pyport_timeout, _} ->
                             counters:add(C, ?SD_TIMEOUTS, 1),
                             Acked;
                         %% the port is being replaced: the dict is not in it, and
                         %% waits in shared memory; this write was not acknowledged
                         error:{pyport_unavailable, _} ->
                             timer:sleep(50),
                             Acked;
                         error:Reason ->
                             {gone, Reason}
                     end,
            case Acked1 of
                {gone, Why} ->
                    sd_gone(SD, Why, C, Wrong),
                    writer_new_dict(Id, Deadline, C, Wrong);
                _ when N rem 25 =:= 0 ->
                    case verify(SD, Acked1, PyLast, C, Wrong) of
                        {ok, PyLast1} ->
                            writer_loop(Id, SD, N + 1, Acked1, PyLast1, Deadline, C, Wrong);
                        gone ->
                            writer_new_dict(Id, Deadline, C, Wrong)
                    end;
                _ ->
                    writer_loop(Id, SD, N + 1, Acked1, PyLast, Deadline, C, Wrong)
            end
    end.

%% Reads back every acknowledged key (and the keys list, and the Python
%% thread's counter, which must never go back). Returns {ok, PyCounter}, or
%% gone when the dict's port died meanwhile.
verify(SD, Acked, PyLast, C, Wrong) ->
    try
        Keys = py:shared_dict_keys(SD),
        Missing = maps:keys(Acked) -- Keys,
        Missing =:= [] orelse lost(C, Wrong, {missing_keys, SD, lists:sublist(Missing, 5)}),
        maps:foreach(fun(K, V) ->
                             case py:shared_dict_get(SD, K) of
                                 V -> counters:add(C, ?VERIFIED, 1);
                                 Other -> lost(C, Wrong, {SD, K, expected, V, got, Other})
                             end
                     end, Acked),
        Py = py:shared_dict_get(SD, <<"py">>, 0),
        case Py of
            0 -> ok;
            _ when Py < PyLast ->
                counters:add(C, ?PY_REGRESSIONS, 1),
                Wrong ! {wrong, {python_counter_went_back, SD, PyLast, Py}};
            _ ->
                counters:add(C, ?PY_WRITES_SEEN, 1)
        end,
        {ok, max(Py, PyLast)}
    catch
        error:{pyport_timeout, _} ->
            counters:add(C, ?SD_TIMEOUTS, 1),
            {ok, PyLast};
        %% no port to ask right now: verified at the next round instead
        error:{pyport_unavailable, _} ->
            timer:sleep(50),
            {ok, PyLast};
        error:Reason ->
            sd_gone(SD, Reason, C, Wrong),
            gone
    end.

lost(C, Wrong, What) ->
    counters:add(C, ?LOST, 1),
    Wrong ! {wrong, {lost, What}},
    ok.

%% A dict operation of its living owner raised something else than a timeout or an
%% unavailable port: the dict lives in shared memory, which no port's death touches,
%% so a dict that vanished (or any other error) is a loss.
sd_gone(SD, Reason, C, Wrong) ->
    counters:add(C, ?DESTROYED_SEEN, 1),
    lost(C, Wrong, {dict_gone_while_its_owner_lives, SD, Reason}).

%% The generation of the (only) port: it changes when the port is replaced.
port_generation() ->
    maps:get(generation, gen_server:call(?SERVER, stats)).

%%--------------------------------------------------------------------
%% Owner churn: short-lived processes with a namespace, dicts (one given
%% away) and Python threads; they exit normally, crash, or are killed mid-call

churner(Deadline, C) ->
    case now_ms() < Deadline of
        false -> ok;
        true ->
            Self = self(),
            {Pid, Ref} = spawn_monitor(fun() -> owner(Self) end),
            counters:add(C, ?OWNERS, 1),
            receive
                {busy, Pid} ->
                    case rand:uniform(3) of
                        1 -> exit(Pid, kill), counters:add(C, ?OWNERS_KILLED, 1);
                        _ -> Pid ! finish
                    end
            after 10000 -> ok
            end,
            receive {'DOWN', Ref, process, Pid, _} -> ok
            after 60000 -> exit(Pid, kill)
            end,
            churner(Deadline, C)
    end.

owner(Churner) ->
    try
        {ok, SD} = py:shared_dict_new(),
        {ok, SD2} = py:shared_dict_new(),
        [ok = py:shared_dict_set(SD, integer_to_binary(I), lists:seq(1, I)) || I <- lists:seq(1, 5)],
        ok = py:exec(<<"data = list(range(1000))\n"
                       "import threading\n"
                       "from erlang import SharedDict\n"
                       "def _owner_thread(h):\n"
                       "    try:\n"
                       "        SharedDict(h)['from_thread'] = sum(data)\n"
                       "    except RuntimeError:\n"
                       "        pass\n"
                       "threading.Thread(target=_owner_thread, args=(h,)).start()\n">>,
                     #{h => SD}),
        Heir = spawn(fun() -> receive _ -> ok after 200 -> ok end end),
        ok = py:shared_dict_give_away(SD2, Heir)
    catch
        _:_ -> ok
    end,
    Churner ! {busy, self()},
    _ = py:eval(<<"__import__('time').sleep(0.2) or len(data)">>, #{}, 5000),
    receive finish -> ok after 5000 -> ok end,
    case rand:uniform(2) of
        1 -> ok;
        2 -> exit(crash)
    end.

%%--------------------------------------------------------------------
%% Port killer and RSS sampler

%% Disrupts the port every Every ms until KillUntil (see the module doc);
%% returns the disruption times and the pids of the children it forked.
killer(Next, Every, KillUntil, Kills) ->
    killer(Next, Every, KillUntil, Kills, []).

killer(Next, Every, KillUntil, Kills, Forked) ->
    receive
        {stop, From} -> From ! {stopped, self(), {lists:reverse(Kills), Forked}}
    after max(0, Next - now_ms()) ->
            case Next =< KillUntil andalso disrupt(length(Kills) + 1) of
                {true, Children} ->
                    killer(Next + Every, Every, KillUntil, [now_ms() | Kills], Children ++ Forked);
                {false, Children} ->
                    killer(Next + Every, Every, KillUntil, Kills, Children ++ Forked);
                false ->
                    killer(Next + Every, Every, KillUntil, Kills, Forked)
            end
    end.

disrupt(1) ->
    %% Holds the GIL in C and ignores the cancellation: the watchdog ends the port.
    R = py:eval(<<"sum(range(10**11))">>, #{}, 200),
    ct:log("soak: GIL-holding loop: ~p", [R]),
    {R =:= {error, timeout}, []};
disrupt(2) ->
    fork_then_crash();
disrupt(3) ->
    signal_port("STOP");
disrupt(_) ->
    signal_port("9").

%% A child forked from Python sleeps; then the port segfaults. The child
%% must not keep the crash from reaching its caller, and must die with the port.
fork_then_crash() ->
    case py:eval(<<"[__import__('os').fork() or __import__('time').sleep(600)]">>, #{}, 5000) of
        {ok, [Child]} when Child > 0 ->
            R = py:exec(<<"import ctypes; ctypes.string_at(0)">>, #{}, 10000),
            ct:log("soak: fork ~b then segfault: ~p", [Child, R]),
            %% Under load the VM may find the pipe closed (epipe) before it
            %% reads the exit status: any pyport_exit is the crash reaching
            %% its caller.
            case R of
                {error, {pyport_exit, _}} -> {true, [Child]};
                _ -> {false, [Child]}
            end;
        Other ->
            ct:log("soak: fork failed: ~p", [Other]),
            false
    end.

signal_port(Signal) ->
    case gen_server:call(?SERVER, stats) of
        #{port := up, os_pid := P} when is_integer(P) ->
            %% make sure the pid is still our port program before signalling it
            case file:read_file("/proc/" ++ integer_to_list(P) ++ "/cmdline") of
                {ok, Cmd} ->
                    case binary:match(Cmd, <<"pyport">>) of
                        nomatch -> false;
                        _ ->
                            _ = os:cmd("kill -" ++ Signal ++ " " ++ integer_to_list(P)),
                            ct:log("soak: kill -~s port ~b", [Signal, P]),
                            {true, []}
                    end;
                _ -> false
            end;
        _ ->
            false
    end.


rss_sampler(Acc) ->
    receive
        {stop, From} -> From ! {stopped, self(), lists:reverse(Acc)}
    after 1000 ->
            rss_sampler(case rss() of
                            undefined -> Acc;
                            {Pid, Bytes} -> [{now_ms(), Pid, Bytes} | Acc]
                        end)
    end.

rss() ->
    case catch gen_server:call(?SERVER, stats, 5000) of
        #{os_pid := P} when is_integer(P) ->
            case file:read_file("/proc/" ++ integer_to_list(P) ++ "/status") of
                {ok, Status} ->
                    case re:run(Status, "VmRSS:\\s+(\\d+) kB", [{capture, all_but_first, binary}]) of
                        {match, [Kb]} -> {P, binary_to_integer(Kb) * 1024};
                        _ -> undefined
                    end;
                _ -> undefined
            end;
        _ ->
            undefined
    end.

%% RSS of the last port (the kill-free tail), after the warm-up: first and
%% last sample and the peak; plus the peak over the whole run.
rss_report(Samples, LastKill) ->
    Peak = lists:max([0 | [B || {_, _, B} <- Samples]]),
    LastPid = case Samples of [] -> none; _ -> element(2, lists:last(Samples)) end,
    Tail = [{T, B} || {T, P, B} <- Samples, P =:= LastPid, T >= LastKill + ?WARMUP_MS],
    case Tail of
        [{T1, First} | _] ->
            {T2, Last} = lists:last(Tail),
            TailPeak = lists:max([B || {_, B} <- Tail]),
            Growth = TailPeak - First,
            Report = io_lib:format("tail (~b s after warm-up): ~.1f MiB -> ~.1f MiB "
                                   "(peak ~.1f MiB, growth ~.1f MiB, bound ~b MiB); "
                                   "peak over the run ~.1f MiB (bound ~b MiB)",
                                   [round((T2 - T1) / 1000), mib(First), mib(Last), mib(TailPeak),
                                    mib(Growth), ?RSS_GROWTH_MAX bsr 20, mib(Peak),
                                    ?RSS_MAX bsr 20]),
            {Report, Growth =< ?RSS_GROWTH_MAX andalso Peak =< ?RSS_MAX};
        [] ->
            {io_lib:format("no samples after the warm-up (~b samples)", [length(Samples)]),
             false}
    end.

mib(B) -> B / (1 bsl 20).

%%====================================================================
%% The async soak: coroutines, callbacks from coroutines and streams, with
%% coroutines that block the loop, coroutines that hold the GIL past their
%% caller's timeout, and owners that die, for async_soak_seconds(). At the end
%% every call was answered (every load process finished, nothing pending in the
%% server), no answer was wrong, and nothing is left: async_tasks, streams in
%% the port and the server, written-off threads, callback processes; the
%% port's Python threads are back to its hot workers and at most two loop
%% threads, and its RSS stayed under 1 GiB.

-define(ASYNC_SRC, <<"
import asyncio, time, erlang
async def nap(seconds, value):
    await asyncio.sleep(seconds)
    return value
async def via_erlang(x):
    await asyncio.sleep(0)
    return erlang.call('soak_echo', x)
async def blocker(seconds):
    time.sleep(seconds)
    return 'slept'
async def hog():
    return sum(range(10**13))
def gen(n):
    for i in range(n):
        yield i
async def agen(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i
">>).

async_soak(_Config) ->
    Keys = [gil_watchdog_ms, abandon_after_ms, spare_idle_ms],
    Saved = pyport_ct_lib:save_env(Keys),
    ok = application:set_env(pyport, gil_watchdog_ms, 1000),
    ok = application:set_env(pyport, abandon_after_ms, 500),
    ok = application:set_env(pyport, spare_idle_ms, 1000),
    try async_soak_run()
    after
        py:unregister_function(soak_echo),
        pyport_ct_lib:restore_env_and_restart(Saved)
    end.

async_soak_run() ->
    ok = pyport_ct_lib:restart_app(),
    %% Registered functions live with the application.
    ok = py:register_function(soak_echo, fun([X]) -> timer:sleep(rand:uniform(20)), {echo, X} end),
    ok = load_async_module(),
    Seconds = async_soak_seconds(),
    C = counters:new(?NCOUNTERS, [write_concurrency]),
    T0 = now_ms(),
    Deadline = T0 + Seconds * 1000,
    %% disruptions stop 10 s before the end, so that the end state is judged quietly
    DisruptUntil = Deadline - 10000,
    Wrong = spawn_link(fun() -> wrong_log([]) end),
    Load = [spawn_monitor(fun() -> async_caller(Deadline, C, Wrong) end) || _ <- lists:seq(1, 4)]
        ++ [spawn_monitor(fun() -> stream_consumer(Deadline, C, Wrong) end) || _ <- lists:seq(1, 3)]
        ++ [spawn_monitor(fun() -> async_disruptor(1, DisruptUntil, C, Wrong) end)],
    Rss = spawn_link(fun() -> rss_sampler([]) end),
    Unfinished = [{Pid, Why} || {Pid, Ref} <- Load,
                                Why <- [receive {'DOWN', Ref, process, Pid, R} -> R
                                        after max(0, Deadline + 60000 - now_ms()) -> hung
                                        end],
                                Why =/= normal],
    Samples = stop(Rss),
    WrongList = stop(Wrong),
    Pending = pending_drained(now_ms() + 10000),
    Workers = application:get_env(pyport, workers, 1),
    Quiet = fun() ->
                    S = pyport_ct_lib:stats(),
                    #{async_tasks := A, streams := P, open_streams := O, abandoned_workers := W,
                      callbacks := Cb, python_threads := T} = S,
                    Left = #{async_tasks => A, streams => P, open_streams => O,
                             abandoned_workers => W, callbacks => Cb},
                    case lists:all(fun(V) -> V =:= 0 end, maps:values(Left)) andalso T =< Workers + 2 of
                        true -> true;
                        false -> Left#{python_threads => T}
                    end
            end,
    Left = case catch wait_until(Quiet, 20000, nothing_left) of
               ok -> nothing;
               {'EXIT', {test_case_failed, Why}} -> Why
           end,
    Count = fun(I) -> counters:get(C, I) end,
    Peak = lists:max([0 | [B || {_, _, B} <- Samples]]),
    ct:pal("async soak: ~b s, issued ~b, answered ~b, ok ~b, port errors ~b, wrong ~b, "
           "disruptions ~b, owners killed ~b, RSS peak ~.1f MiB; wrong (first 20) ~999p",
           [Seconds, Count(?ISSUED), Count(?ANSWERED), Count(?OK), Count(?PORT_ERRORS),
            Count(?WRONG), Count(?PY_THREADS), Count(?OWNERS_KILLED), mib(Peak), WrongList]),
    Checks = [{every_load_process_finished, Unfinished =:= [], Unfinished},
              {no_request_left_pending_in_the_server, Pending =:= 0, Pending},
              {every_call_answered, Count(?ISSUED) =:= Count(?ANSWERED), {Count(?ISSUED), Count(?ANSWERED)}},
              {no_wrong_results, Count(?WRONG) =:= 0, Count(?WRONG)},
              {nothing_left, Left =:= nothing, Left},
              {loop_was_disrupted, Count(?PY_THREADS) >= 3, Count(?PY_THREADS)},
              %% the blockers block while the callers' coroutines wait: at least one is
              %% written off
              {a_blocked_loop_was_written_off, Count(?OWNERS) >= 1, Count(?OWNERS)},
              {owners_died, Count(?OWNERS_KILLED) > 0, Count(?OWNERS_KILLED)},
              {rss_under_1_gib, Peak < ?RSS_MAX, mib(Peak)}],
    ?assertEqual([], [{Name, Detail} || {Name, false, Detail} <- Checks]),
    ok.

load_async_module() ->
    py:exec(<<"import sys, types\n"
              "m = types.ModuleType('asoak')\n"
              "exec(src, m.__dict__)\n"
              "sys.modules['asoak'] = m\n">>, #{src => ?ASYNC_SRC}).

%% Coroutines that sleep, and coroutines that call back into Erlang. Only a port
%% restart (a hog's watchdog exit) excuses an error.
async_caller(Deadline, C, Wrong) ->
    case now_ms() < Deadline of
        false -> ok;
        true ->
            X = rand:uniform(1000000),
            _ = case rand:uniform(2) of
                    1 -> checked(C, Wrong, async_nap,
                                 fun() -> py:call(asoak, nap, [rand:uniform(50) / 1000, X], #{}, 10000) end,
                                 fun(R) -> R =:= {ok, X} orelse module_gone(R) end);
                    2 -> checked(C, Wrong, async_callback,
                                 fun() -> py:call(asoak, via_erlang, [X], #{}, 10000) end,
                                 fun(R) -> R =:= {ok, {<<"echo">>, X}} orelse module_gone(R) end)
                end,
            async_caller(Deadline, C, Wrong)
    end.

%% After a restart the module is gone until the disruptor loads it again.
module_gone({error, {python, 'ModuleNotFoundError', _, _}}) -> true;
module_gone(_) -> false.

%% Streams of 200 items, sync or async, consumed in full, or abandoned by an
%% owner that dies midway (its stream must be cleaned up).
stream_consumer(Deadline, C, Wrong) ->
    case now_ms() < Deadline of
        false -> ok;
        true ->
            F = element(rand:uniform(2), {gen, agen}),
            Die = rand:uniform(4) =:= 1,
            Self = self(),
            {Pid, Ref} = spawn_monitor(fun() -> Self ! {consumed, self(), consume(F, Die)} end),
            counters:add(C, ?ISSUED, 1),
            receive
                {'DOWN', Ref, process, Pid, _} when Die ->
                    counters:add(C, ?ANSWERED, 1),
                    counters:add(C, ?OWNERS_KILLED, 1);
                {consumed, Pid, R} ->
                    erlang:demonitor(Ref, [flush]),
                    counters:add(C, ?ANSWERED, 1),
                    case R of
                        {done, Items} when Items =:= 200 -> counters:add(C, ?OK, 1);
                        {error, {pyport_exit, _}} -> counters:add(C, ?PORT_ERRORS, 1);
                        {error, {pyport_unavailable, _}} -> counters:add(C, ?PORT_ERRORS, 1);
                        {error, {python, 'ModuleNotFoundError', _, _}} -> counters:add(C, ?PORT_ERRORS, 1);
                        Other -> wrong(Wrong, C, {stream, F, Other})
                    end
            after 60000 -> wrong(Wrong, C, {stream_hung, F})
            end,
            stream_consumer(Deadline, C, Wrong)
    end.

consume(F, Die) ->
    case py:stream_start(asoak, F, [200], #{}, #{window => 8}) of
        {ok, Ref} -> consume(Ref, 0, Die);
        {error, _} = E -> E
    end.

consume(Ref, N, Die) ->
    receive
        {py_stream, Ref, {data, N}} when Die, N =:= 50 -> exit(dying_midway);
        {py_stream, Ref, {data, N}} -> ok = py:stream_ack(Ref), consume(Ref, N + 1, Die);
        {py_stream, Ref, {data, Other}} -> {out_of_order, N, Other};
        {py_stream, Ref, done} -> {done, N};
        {py_stream, Ref, {error, E}} -> {error, E}
    after 30000 -> {stalled, N}
    end.

%% Every 3 s: a coroutine that blocks the loop (time.sleep) for longer than
%% abandon_after_ms while others wait (answered `cancelled', its thread written
%% off and back once the sleep ends), or, every fourth time, a coroutine that
%% holds the GIL past its caller's timeout (the watchdog restarts the port);
%% and a process that dies with async calls in flight.
async_disruptor(N, Until, C, Wrong) ->
    case now_ms() < Until of
        false -> ok;
        true ->
            timer:sleep(3000),
            counters:add(C, ?PY_THREADS, 1),
            case N rem 4 of
                0 ->
                    checked(C, Wrong, hog, fun() -> py:call(asoak, hog, [], #{}, 500) end,
                            fun(R) -> R =:= {error, timeout} orelse module_gone(R) end),
                    %% the new port needs the module again
                    ok = wait_until(fun() -> load_async_module() =:= ok end, 20000, module_reloaded);
                _ ->
                    %% Only a coroutine that nothing else waited for may sleep to its end.
                    R = checked(C, Wrong, blocker, fun() -> py:call(asoak, blocker, [1.5], #{}, infinity) end,
                                fun(R) -> R =:= {ok, <<"slept">>} orelse R =:= {error, cancelled}
                                              orelse module_gone(R) end),
                    R =:= {error, cancelled} andalso counters:add(C, ?OWNERS, 1)
            end,
            Victim = spawn(fun() -> py:call(asoak, nap, [10, x], #{}, 20000) end),
            timer:sleep(rand:uniform(100)),
            exit(Victim, kill),
            counters:add(C, ?OWNERS_KILLED, 1),
            async_disruptor(N + 1, Until, C, Wrong)
    end.
