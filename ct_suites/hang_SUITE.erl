%% Hang isolation: Python that stops cooperating never wedges pyport, never
%% reaches into the VM, and never leaves a caller waiting for ever.
%%
%% Each case is one way Python can stop cooperating (or one attack by code
%% that controls Python) and asserts the one outcome the README's failure
%% table promises. Liveness bounds are generous (the CI box is a noisy
%% 2-core machine); small app env values (watchdog, heartbeat, abandon time)
%% keep the cases short, not tight timing.
-module(hang_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-import(pyport_ct_lib, [stat/1, now_ms/0, wait_until/3, has/2]).

-define(LIVENESS_MS, 10000).

suite() ->
    [{timetrap, {seconds, 90}}].

all() ->
    [gil_holding_loop_restarts_port,
     catastrophic_regex_restarts_port,
     long_gil_work_of_a_waiting_caller_is_left_alone,
     forked_children_never_hold_the_protocol,
     stopped_port_is_replaced,
     exception_names_never_become_atoms,
     long_exception_name_is_answered,
     forged_opaque_terms_are_refused,
     unsafe_replies_answer_their_caller,
     opaque_terms_from_erlang_survive_pickling,
     oversized_reply_fails_only_its_caller,
     startup_code_runs_before_any_request,
     failing_startup_code_makes_port_unavailable,
     slow_startup_code_times_out,
     heartbeats_are_answered_during_startup,
     stuck_sleepers_do_not_restart_the_port,
     invalid_utf8_is_badarg,
     malformed_handles_are_badarg,
     give_away_only_by_the_owner,
     frame_builtins_use_the_callers_namespace,
     eval_accepts_leading_whitespace,
     code_raising_call_cancelled_is_cancelled].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

%% App env a case runs with (set before a fresh start of the application).
case_env(gil_holding_loop_restarts_port) -> [{gil_watchdog_ms, 1000}];
case_env(catastrophic_regex_restarts_port) -> [{gil_watchdog_ms, 1000}];
case_env(long_gil_work_of_a_waiting_caller_is_left_alone) ->
    [{gil_watchdog_ms, 300}, {heartbeat_timeout_ms, 300}];
case_env(stopped_port_is_replaced) -> [{heartbeat_timeout_ms, 1000}];
case_env(oversized_reply_fails_only_its_caller) -> [{max_reply_bytes, 1 bsl 20}];
case_env(startup_code_runs_before_any_request) ->
    [{startup_code, <<"import time\ntime.sleep(1)\nready = True\n">>}];
case_env(failing_startup_code_makes_port_unavailable) ->
    [{startup_code, <<"raise RuntimeError('no config')">>}];
case_env(slow_startup_code_times_out) ->
    [{startup_code, <<"import time\ntime.sleep(30)\n">>}, {startup_timeout_ms, 300}];
case_env(stuck_sleepers_do_not_restart_the_port) -> [{abandon_after_ms, 300}];
case_env(heartbeats_are_answered_during_startup) ->
    [{startup_code, <<"import time\ntime.sleep(2)\nready = True\n">>}, {heartbeat_timeout_ms, 300}];
case_env(unsafe_replies_answer_their_caller) ->
    [{pyport_executable, {data_dir, "unsafe_port.py"}}, {heartbeat_timeout_ms, infinity}];
case_env(_) -> [].

init_per_testcase(Case, Config) ->
    Saved = pyport_ct_lib:save_env([K || {K, _} <- case_env(Case)]),
    ok = pyport_ct_lib:stop_app(),
    [ok = application:set_env(pyport, K, in_data_dir(V, Config)) || {K, V} <- case_env(Case)],
    {ok, _} = application:ensure_all_started(pyport),
    [{saved_env, Saved} | Config].

in_data_dir({data_dir, File}, Config) -> filename:join(?config(data_dir, Config), File);
in_data_dir(V, _Config) -> V.

end_per_testcase(_Case, Config) ->
    _ = logger:remove_handler(hang_capture),
    pyport_ct_lib:restore_env_and_restart(?config(saved_env, Config)).

%%--------------------------------------------------------------------
%% C code that holds the GIL

%% A builtin loop holds the GIL and ignores its cancellation: the watchdog
%% restarts the port, the log names the culprit with its CPU time, and the
%% next call is served.
gil_holding_loop_restarts_port(_Config) ->
    gil_holder_restarts_port(<<"sum(range(10**11))">>).

catastrophic_regex_restarts_port(_Config) ->
    gil_holder_restarts_port(<<"__import__('re').match(r'(a+)+$', 'a' * 60 + 'b')">>).

gil_holder_restarts_port(Code) ->
    ok = pyport_ct_lib:wait_ready(),
    pyport_ct_lib:capture_logs(hang_capture),
    {error, timeout} = py:eval(Code, #{}, 500),
    wait_answering(),
    #{restarts := 1, last_exit := {exit_status, 7}} = pyport_ct_lib:stats(),
    Logs = pyport_ct_lib:logged(),
    ?assert(lists:any(fun(L) -> has(L, <<"GIL watchdog">>) end, Logs), Logs),
    ?assert(lists:any(fun(L) -> has(L, Code) andalso has(L, <<"CPU">>) end, Logs), Logs),
    ok.

%% Work that holds the GIL for longer than the watchdog and heartbeat times,
%% for a caller that still waits, is never interrupted: only a caller that
%% gave up asks for a cancellation, and the reader answers heartbeats without
%% the GIL.
%% The GIL is held for 1.5 s in C (usleep through ctypes.PyDLL, which keeps it),
%% however fast or busy the machine: a `sum(range(N))' sometimes ended in 535 ms
%% on a fast moment, too soon to prove anything.
long_gil_work_of_a_waiting_caller_is_left_alone(_Config) ->
    ok = pyport_ct_lib:wait_ready(),
    T0 = now_ms(),
    {ok, 0} = py:eval(<<"__import__('ctypes').PyDLL(None).usleep(1500000)">>, #{}, infinity),
    Ms = now_ms() - T0,
    ct:pal("hang: GIL held ~b ms by a waiting caller (watchdog and heartbeat 300 ms)", [Ms]),
    ?assert(Ms >= 1500, {too_short_to_prove_anything, Ms}),
    #{restarts := 0} = pyport_ct_lib:stats(),
    ok.

%%--------------------------------------------------------------------
%% Forked children

%% In a VM of its own: a multiprocessing child (fork start method) and an
%% os.fork() child are alive when the port segfaults. The crash reaches the
%% caller, the children die with the port's process group, and once that VM
%% exits (with its new port stopped by SIGSTOP) nothing of it is left.
forked_children_never_hold_the_protocol(_Config) ->
    Ebin = filename:dirname(code:which(py)),
    {ok, Peer, Node} = peer:start_link(#{name => peer:random_name(hang),
                                         args => ["-pa", Ebin]}),
    try
        {ok, _} = erpc:call(Node, application, ensure_all_started, [pyport], ?LIVENESS_MS),
        {ok, [PortPid, MpChild, ForkChild]} =
            erpc:call(Node, py, eval, [fork_children(), #{}, ?LIVENESS_MS], ?LIVENESS_MS),
        ct:log("hang: peer ~p: port ~b, multiprocessing child ~b, os.fork child ~b",
               [Node, PortPid, MpChild, ForkChild]),
        ?assert(pyport_ct_lib:os_alive(MpChild) andalso pyport_ct_lib:os_alive(ForkChild)),
        T0 = now_ms(),
        {error, {pyport_exit, 139}} =
            erpc:call(Node, py, exec, [<<"import ctypes; ctypes.string_at(0)">>], ?LIVENESS_MS),
        ct:pal("hang: segfault with forked children answered after ~b ms", [now_ms() - T0]),
        wait_until(fun() -> not lists:any(fun pyport_ct_lib:os_alive/1,
                                          [PortPid, MpChild, ForkChild]) end,
                   ?LIVENESS_MS, forked_children_gone),
        %% The restarted port forks again; then the whole VM goes.
        {ok, [PortPid2, MpChild2, ForkChild2]} =
            wait_until(fun() ->
                               case catch erpc:call(Node, py, eval, [fork_children(), #{}, ?LIVENESS_MS],
                                                    ?LIVENESS_MS) of
                                   {ok, [_, _, _]} = R -> {true, R};
                                   Other -> Other
                               end
                       end, ?LIVENESS_MS, restarted_port_forks),
        %% Stopped, the port cannot clean up after itself: the kernel's
        %% parent-death signal ends it and the reaper ends its group.
        _ = os:cmd("kill -STOP " ++ integer_to_list(PortPid2)),
        peer:stop(Peer),
        wait_until(fun() -> not lists:any(fun pyport_ct_lib:os_alive/1,
                                          [PortPid2, MpChild2, ForkChild2]) end,
                   ?LIVENESS_MS, nothing_left_after_vm_exit)
    after
        catch peer:stop(Peer)
    end,
    ok.

%% One expression (each peer:call runs in a new process, with a new
%% namespace): forks both kinds of children, returns [port, mp child, os.fork child].
fork_children() ->
    <<"(lambda g: (exec(\"\"\"
import multiprocessing, os, time
p = multiprocessing.get_context('fork').Process(target=time.sleep, args=(600,))
p.start()
child = os.fork()
if child == 0:
    time.sleep(600)
\"\"\", g), [__import__('os').getpid(), g['p'].pid, g['child']])[1])({})">>.

%%--------------------------------------------------------------------
%% A stopped port

%% SIGSTOP: heartbeats go unanswered, the port is killed (with its group) and
%% reported as status 137, its caller is answered, and a fresh port serves.
stopped_port_is_replaced(_Config) ->
    ok = pyport_ct_lib:wait_ready(),
    OsPid = stat(os_pid),
    Self = self(),
    Caller = spawn(fun() ->
                           R = py:eval(<<"__import__('time').sleep(2) or 2">>, #{}, 60000),
                           Self ! {result, self(), R}
                   end),
    wait_until(fun() -> stat(busy_workers) =:= 1 end, ?LIVENESS_MS, call_running),
    _ = os:cmd("kill -STOP " ++ integer_to_list(OsPid)),
    %% The caller's request is in a stopped port: only the port's replacement
    %% answers it.
    receive {result, Caller, R} -> ?assertEqual({error, {pyport_exit, 137}}, R)
    after 20000 -> ct:fail(stopped_port_caller_not_answered)
    end,
    wait_answering(),
    ?assertNotEqual(OsPid, stat(os_pid)),
    wait_until(fun() -> not pyport_ct_lib:os_alive(OsPid) end, ?LIVENESS_MS, stopped_process_gone),
    #{last_exit := {exit_status, 137}} = pyport_ct_lib:stats(),
    ok.

%%--------------------------------------------------------------------
%% Names and terms chosen by Python never become atoms

exception_names_never_become_atoms(_Config) ->
    Before = erlang:system_info(atom_count),
    Raise = <<"(_ for _ in ()).throw(type(n, (Exception,), {})('x'))">>,
    lists:foreach(
      fun(I) ->
              Name = <<"HangErr", (integer_to_binary(I))/binary, "_", (integer_to_binary(erlang:unique_integer([positive])))/binary>>,
              {error, {python, Type, <<"x">>, _}} = py:eval(Raise, #{n => Name}),
              ?assertEqual(<<"__main__.", Name/binary>>, Type)
      end, lists:seq(1, 10000)),
    Grown = erlang:system_info(atom_count) - Before,
    ct:pal("hang: 10000 distinct exception classes grew the atom table by ~b", [Grown]),
    ?assert(Grown < 100, Grown),
    %% Built-in classes stay atoms; a class that only claims to be built in does not.
    {error, {python, 'ValueError', _, _}} = py:eval(<<"int('x')">>),
    {error, {python, 'KeyError', _, _}} = py:eval(<<"{}['k']">>),
    %% an alias of a built-in class is named as Python names the class
    {error, {python, 'OSError', _, _}} = py:exec(<<"raise IOError('x')">>),
    {error, {python, <<"Spoofed">>, _, _}} =
        py:eval(<<"(_ for _ in ()).throw(type('Spoofed', (Exception,), {'__module__': 'builtins'})())">>),
    ok.

%% A class name longer than an atom can be: its caller (with no timeout) is
%% answered.
long_exception_name_is_answered(_Config) ->
    Name = binary:copy(<<"E">>, 300),
    Code = <<"raise type('", Name/binary, "', (Exception,), {})('long')">>,
    {error, {python, Type, <<"long">>, _}} = py:exec(Code, #{}, infinity),
    ?assertEqual(<<"__main__.", Name/binary>>, Type),
    ok.

%% Python cannot build pids (of made-up nodes or any other): the constructor
%% refuses bytes that Erlang did not send, with or without a guessed MAC.
forged_opaque_terms_are_refused(_Config) ->
    Before = erlang:system_info(atom_count),
    Code = <<"
import erlang
refused = 0
for i in range(1000):
    node = ('forged%d@nowhere' % i).encode()
    data = bytes([88, 119, len(node)]) + node + bytes(12)
    for args in (('pid', data), ('pid', data, bytes(16))):
        try:
            erlang.OpaqueTerm(*args)
        except ValueError:
            refused += 1
">>,
    ok = py:exec(Code),
    {ok, 2000} = py:eval(<<"refused">>),
    Grown = erlang:system_info(atom_count) - Before,
    ?assert(Grown < 100, Grown),
    ok.

%% A port program whose replies name atoms the VM has never seen (as one that
%% let Python choose atoms would): every frame is decoded with [safe], so the
%% caller is answered {pyport_bad_reply, undecodable} and no atom is made.
unsafe_replies_answer_their_caller(_Config) ->
    Before = erlang:system_info(atom_count),
    {error, {pyport_bad_reply, undecodable}} = py:eval(<<"payload">>, #{}, ?LIVENESS_MS),
    {error, {pyport_bad_reply, undecodable}} = py:eval(<<"envelope">>, #{}, ?LIVENESS_MS),
    ?assertEqual(Before, erlang:system_info(atom_count)),
    ok.

%% What Erlang sent comes back identical, also through pickle (as SharedDict
%% values and multiprocessing use it).
opaque_terms_from_erlang_survive_pickling(_Config) ->
    Terms = [self(), make_ref(), fun lists:reverse/1, hd(erlang:ports())],
    {ok, Back} = py:eval(<<"__import__('pickle').loads(__import__('pickle').dumps(ts))">>,
                         #{ts => Terms}),
    ?assertEqual(Terms, Back),
    ok.

%%--------------------------------------------------------------------
%% Per-request limits

oversized_reply_fails_only_its_caller(_Config) ->
    ok = pyport_ct_lib:wait_ready(),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, <<"v">>),
    Self = self(),
    Other = spawn(fun() ->
                          Self ! {result, self(), py:eval(<<"__import__('time').sleep(0.5) or 'fine'">>)}
                  end),
    {error, {reply_too_large, Size, Max}} = py:eval(<<"b'x' * 2000000">>),
    ?assertEqual(1 bsl 20, Max),
    ?assert(Size > 2000000, Size),
    receive {result, Other, R} -> ?assertEqual({ok, <<"fine">>}, R)
    after ?LIVENESS_MS -> ct:fail(other_caller_not_answered)
    end,
    <<"v">> = py:shared_dict_get(SD, <<"k">>),
    {ok, 1} = py:eval(<<"1">>),
    #{restarts := 0} = pyport_ct_lib:stats(),
    ok.

%%--------------------------------------------------------------------
%% Start-up code

%% The first request, sent the moment the application has started (and again
%% right after a restart), runs after start-up code has finished.
startup_code_runs_before_any_request(_Config) ->
    {ok, true} = py:eval(<<"__import__('__main__').ready">>),
    OsPid = stat(os_pid),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    wait_until(fun() -> catch stat(os_pid) =/= OsPid end, ?LIVENESS_MS, restarted),
    {ok, true} = py:eval(<<"__import__('__main__').ready">>),
    ok.

failing_startup_code_makes_port_unavailable(_Config) ->
    {error, {pyport_unavailable, {startup_failed, {python, 'RuntimeError', <<"no config">>, _}}}} =
        py:eval(<<"1">>),
    %% It keeps restarting, with back-off, and keeps saying why.
    wait_until(fun() -> maps:get(restarts, gen_server:call(pyport_server, stats)) >= 2 end,
               ?LIVENESS_MS, restarts_with_backoff),
    {error, {pyport_unavailable, {startup_failed, {python, 'RuntimeError', _, _}}}} =
        py:eval(<<"1">>),
    ok.

slow_startup_code_times_out(_Config) ->
    {error, {pyport_unavailable, {startup_failed, timeout}}} = py:eval(<<"1">>, #{}, ?LIVENESS_MS),
    ok.

%% Start-up code that takes several heartbeat timeouts: the port's reader
%% answers heartbeats meanwhile, so the port is not taken for stopped.
heartbeats_are_answered_during_startup(_Config) ->
    {ok, true} = py:eval(<<"__import__('__main__').ready">>, #{}, ?LIVENESS_MS),
    #{restarts := 0} = pyport_ct_lib:stats(),
    ok.

%%--------------------------------------------------------------------
%% Stuck workers are cheap

%% Twenty calls stuck in C (time.sleep ignores the cancellation) from twenty
%% processes: their workers are written off, spares serve an unrelated call,
%% and the port is not restarted.
stuck_sleepers_do_not_restart_the_port(_Config) ->
    ok = pyport_ct_lib:wait_ready(),
    Self = self(),
    Pids = [spawn(fun() ->
                          Self ! {result, self(), py:eval(<<"__import__('time').sleep(30)">>, #{}, 100)}
                  end) || _ <- lists:seq(1, 20)],
    [{error, timeout} = R || R <- pyport_ct_lib:collect(result, Pids)],
    wait_until(fun() -> stat(abandoned_workers) >= 1 end, ?LIVENESS_MS, written_off),
    T0 = now_ms(),
    {ok, 2} = py:eval(<<"1 + 1">>, #{}, ?LIVENESS_MS),
    ct:pal("hang: unrelated call answered ~b ms after 20 stuck sleepers (~b written off)",
           [now_ms() - T0, stat(abandoned_workers)]),
    #{restarts := 0} = pyport_ct_lib:stats(),
    ok.

%%--------------------------------------------------------------------
%% Argument errors are badarg

invalid_utf8_is_badarg(_Config) ->
    Bad = <<"x = '", 255, "'">>,
    ?assertError(badarg, py:eval(Bad)),
    ?assertError(badarg, py:exec(Bad)),
    ?assertError(badarg, py:call(<<"os", 255>>, getcwd, [])),
    ?assertError(badarg, py:call(os, <<"getcwd", 255>>, [])),
    ?assertError(badarg, py:call(builtins, dict, [], #{<<"k", 255>> => 1})),
    ?assertError(badarg, py:eval(<<"1">>, #{<<"k", 255>> => 1})),
    %% Binaries that are not text are still fine as values.
    {ok, 1} = py:call(builtins, len, [[<<255>>]]),
    ok.

malformed_handles_are_badarg(_Config) ->
    {ok, SD} = py:shared_dict_new(),
    {Tag, Gen, Id, Token} = SD,
    Malformed = [{Tag, Gen, -1, Token}, {Tag, Gen, 1 bsl 64, Token}, {Tag, -1, Id, Token},
                 {Tag, Gen, Id, <<"short">>}, {Tag, Gen, Id, binary:copy(Token, 2)},
                 {Tag, Gen, 1.0, Token}],
    lists:foreach(fun(H) ->
                          ?assertError(badarg, py:shared_dict_get(H, <<"k">>)),
                          ?assertError(badarg, py:shared_dict_set(H, <<"k">>, 1)),
                          ?assertError(badarg, py:shared_dict_keys(H)),
                          ?assertError(badarg, py:shared_dict_destroy(H))
                  end, Malformed),
    %% Well formed but stale: destroyed, as documented.
    Stale = {Tag, Gen, Id + 1000000, Token},
    ?assertError({shared_dict_destroyed, Stale}, py:shared_dict_get(Stale, <<"k">>)),
    ok = py:shared_dict_destroy(SD).

give_away_only_by_the_owner(_Config) ->
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, 1),
    Thief = self(),
    Owner = spawn(fun() -> receive stop -> ok end end),
    R = pyport_ct_lib:run_in_process(
          fun() ->
                  try py:shared_dict_give_away(SD, Thief) of Ok -> Ok
                  catch error:E -> {raised, E}
                  end
          end),
    ?assertEqual({raised, not_owner}, R),
    ok = py:shared_dict_give_away(SD, Owner),
    ?assertError(not_owner, py:shared_dict_give_away(SD, self())),
    1 = py:shared_dict_get(SD, <<"k">>),
    Owner ! stop,
    wait_until(fun() ->
                       try py:shared_dict_keys(SD) of _ -> alive
                       catch error:{shared_dict_destroyed, _} -> true
                       end
               end, ?LIVENESS_MS, destroyed_with_new_owner),
    ok.

%%--------------------------------------------------------------------
%% Smaller surprises

frame_builtins_use_the_callers_namespace(_Config) ->
    ok = py:exec(<<"mine = 41">>),
    {ok, 42} = py:call(builtins, eval, [<<"mine + 1">>]),
    {ok, undefined} = py:call(builtins, exec, [<<"mine = 43">>]),
    {ok, 43} = py:eval(<<"mine">>),
    {ok, #{<<"mine">> := 43}} = py:call(builtins, vars, []),
    {ok, #{<<"mine">> := 43}} = py:call(builtins, locals, []),
    {ok, #{<<"mine">> := 43}} = py:call(builtins, globals, []),
    {ok, Names} = py:call(builtins, dir, []),
    ?assert(lists:member(<<"mine">>, Names)),
    %% With explicit arguments they are the ordinary builtins.
    {ok, 3} = py:call(builtins, eval, [<<"a + b">>, #{a => 1, b => 2}]),
    {ok, Attrs} = py:call(builtins, dir, [<<"s">>]),
    ?assert(lists:member(<<"upper">>, Attrs)),
    %% Another process sees its own namespace.
    {ok, false} = pyport_ct_lib:run_in_process(
                    fun() -> py:call(builtins, eval, [<<"'mine' in globals()">>]) end),
    ok.

eval_accepts_leading_whitespace(_Config) ->
    {ok, 2} = py:eval(<<"  1+1">>),
    {ok, 3} = py:eval(<<"\t 1+2">>),
    ok.

code_raising_call_cancelled_is_cancelled(_Config) ->
    {error, cancelled} = py:exec(<<"import erlang\nraise erlang.CallCancelled()">>),
    {ok, 1} = py:eval(<<"1">>),
    ok.

%%--------------------------------------------------------------------
%% helpers

wait_answering() ->
    wait_until(fun() -> py:eval(<<"1 + 1">>, #{}, 5000) =:= {ok, 2} end, 30000, port_answering).


