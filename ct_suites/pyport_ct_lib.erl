%% Helpers shared by the pyport Common Test suites (ct_run compiles this module
%% together with the suites in this directory).
%%
%% Liveness bounds are generous (about 10 s): the CI box is a noisy 2-core machine.
%% Waiting is done by polling with a deadline or by monitors, never by a bare sleep.
-module(pyport_ct_lib).

-export([start_app/0, stop_app/0, restart_app/0, wait_ready/0, assert_python_asserts/0,
         stat/1, stats/0, now_ms/0,
         wait_until/2, wait_until/3, wait_down/1, wait_down/2,
         assert_mailbox_empty/0, wait_waiting/1, collect/2,
         has/2, nest/1, run_in_process/1, thread_idents_of_callers/2,
         save_env/1, restore_env/1, restore_env_and_restart/1, run_command/4, assert_destroyed/1,
         os_alive/1, all_gone/1, capture_logs/1, logged/0]).
%% logger handler callback of capture_logs/1
-export([log/2]).

-include_lib("stdlib/include/assert.hrl").

-define(LIVENESS_MS, 10000).

%% Starts the application and waits until the port answers a trivial call.
%% Refuses to go on (failing the suite's init, so every case fails) when the
%% port's Python runs with assertions disabled.
start_app() ->
    {ok, Apps} = application:ensure_all_started(pyport),
    ok = wait_ready(),
    ok = assert_python_asserts(),
    Apps.

%% With PYTHONOPTIMIZE set, `__debug__' is false in the port and every `assert'
%% in the Python snippets of the suites silently passes: such a run proves
%% nothing. Checked in the port itself (through a module call, which creates no
%% process namespace, so exact-count tests keep their baseline).
assert_python_asserts() ->
    case py:call(builtins, eval, [<<"__debug__">>, #{}]) of
        {ok, true} -> ok;
        Other ->
            ct:fail({python_assertions_disabled_in_the_port, Other,
                     {'PYTHONOPTIMIZE', os:getenv("PYTHONOPTIMIZE")}})
    end.

stop_app() ->
    _ = application:stop(pyport),
    ok.

%% A fresh server and port: used where a test needs exact counts that earlier
%% test processes (whose namespaces and dicts are freed asynchronously) could disturb.
restart_app() ->
    ok = stop_app(),
    _ = start_app(),
    ok.

%% Polls py:stats/0 (answered by the port once Python is initialised): unlike a
%% py:eval it creates no namespace, so exact-count tests keep a clean baseline.
wait_ready() ->
    wait_until(fun() ->
                       case catch py:stats() of
                           {ok, M} when is_map(M) -> true;
                           Other -> Other
                       end
               end, ?LIVENESS_MS, port_not_ready).

stats() ->
    {ok, M} = py:stats(),
    M.

stat(Key) ->
    maps:get(Key, stats()).

now_ms() ->
    erlang:monotonic_time(millisecond).

%% Polls Fun until it returns true (or {true, V}, which returns V); fails the
%% test case with the last value after TimeoutMs.
wait_until(Fun, TimeoutMs) ->
    wait_until(Fun, TimeoutMs, condition_not_met).

wait_until(Fun, TimeoutMs, What) ->
    poll(Fun, now_ms() + TimeoutMs, What).

poll(Fun, Deadline, What) ->
    case Fun() of
        true -> ok;
        {true, V} -> V;
        Last ->
            case now_ms() > Deadline of
                true -> ct:fail({timeout_waiting_for, What, last, Last});
                false ->
                    timer:sleep(20),
                    poll(Fun, Deadline, What)
            end
    end.

%% Waits for a process to terminate; returns its exit reason.
wait_down(Pid) ->
    wait_down(Pid, ?LIVENESS_MS).

wait_down(Pid, TimeoutMs) ->
    Ref = erlang:monitor(process, Pid),
    receive
        {'DOWN', Ref, process, Pid, Reason} -> Reason
    after TimeoutMs ->
            ct:fail({process_did_not_exit, Pid, erlang:process_info(Pid, current_stacktrace)})
    end.

assert_mailbox_empty() ->
    receive
        Msg -> ct:fail({unexpected_message, Msg})
    after 0 -> ok
    end.

%% Waits until every process in Pids is blocked in a receive (e.g. waiting for
%% its reply from the port), so the requests have certainly been issued.
wait_waiting(Pids) ->
    wait_until(fun() ->
                       lists:all(fun(P) ->
                                         erlang:process_info(P, status) =:= {status, waiting}
                                 end, Pids)
               end, ?LIVENESS_MS, callers_blocked).

%% Receives one {Tag, Pid, Result} per pid, in pid order.
collect(Tag, Pids) ->
    [receive {Tag, P, R} -> R
     after ?LIVENESS_MS -> ct:fail({no_result_from, P, Tag})
     end || P <- Pids].

%% NProcs processes at once, each with a namespace, each making NCalls evals
%% that sleep a millisecond and return the thread ident they ran on: one sorted
%% list of idents per process.
thread_idents_of_callers(NProcs, NCalls) ->
    Self = self(),
    Pids = [spawn_link(fun() ->
                               Ids = [begin
                                          {ok, Id} = py:eval(<<"__import__('time').sleep(0.001) or "
                                                               "__import__('threading').get_ident()">>),
                                          Id
                                      end || _ <- lists:seq(1, NCalls)],
                               Self ! {idents, self(), lists:usort(Ids)}
                       end) || _ <- lists:seq(1, NProcs)],
    collect(idents, Pids).

has(Bin, Part) ->
    binary:match(Bin, Part) =/= nomatch.

%% N nested lists around the integer 1: exactly N containers deep.
nest(0) -> 1;
nest(N) -> [nest(N - 1)].

%% Runs Fun in a fresh process and returns its result (or {crashed, Reason}).
run_in_process(Fun) ->
    {Pid, Ref} = spawn_monitor(fun() -> exit({result, Fun()}) end),
    receive
        {'DOWN', Ref, process, Pid, {result, R}} -> R;
        {'DOWN', Ref, process, Pid, Other} -> {crashed, Other}
    end.

%% The current values of the pyport app env keys `Keys', for restore_env_and_restart/1.
save_env(Keys) ->
    [{K, application:get_env(pyport, K)} || K <- Keys].

%% Puts back what save_env/1 saw (unsetting keys that were unset) and restarts the
%% application with it.
restore_env_and_restart(Saved) ->
    ok = stop_app(),
    restore_env(Saved),
    _ = start_app(),
    ok.

%% Puts back what save_env/1 saw, without starting anything.
restore_env(Saved) ->
    lists:foreach(fun({K, undefined}) -> application:unset_env(pyport, K);
                     ({K, {ok, V}}) -> application:set_env(pyport, K, V)
                  end, Saved).

%% Runs Exe with Args (and Env) to its end; returns {ExitStatus, Output} (stdout
%% and stderr). Fails the test case if it runs longer than TimeoutMs.
run_command(Exe, Args, Env, TimeoutMs) ->
    Port = open_port({spawn_executable, Exe},
                     [{args, Args}, {env, Env}, exit_status, stderr_to_stdout, binary, hide]),
    command_output(Port, now_ms() + TimeoutMs, []).

command_output(Port, Deadline, Acc) ->
    receive
        {Port, {data, D}} -> command_output(Port, Deadline, [D | Acc]);
        {Port, {exit_status, S}} -> {S, unicode:characters_to_list(lists:reverse(Acc))}
    after max(0, Deadline - now_ms()) ->
            catch port_close(Port),
            ct:fail({command_timeout, unicode:characters_to_list(lists:reverse(Acc))})
    end.

%% Every Erlang-side operation but destroy raises shared_dict_destroyed for SD;
%% destroy stays idempotent.
assert_destroyed(SD) ->
    ?assertError({shared_dict_destroyed, SD}, py:shared_dict_get(SD, <<"k">>)),
    ?assertError({shared_dict_destroyed, SD}, py:shared_dict_get(SD, <<"k">>, dflt)),
    ?assertError({shared_dict_destroyed, SD}, py:shared_dict_set(SD, <<"k">>, 1)),
    ?assertError({shared_dict_destroyed, SD}, py:shared_dict_del(SD, <<"k">>)),
    ?assertError({shared_dict_destroyed, SD}, py:shared_dict_keys(SD)),
    ok = py:shared_dict_destroy(SD),
    ok.

%% An OS process (or thread) that exists and is not a zombie.
os_alive(Pid) ->
    case file:read_file("/proc/" ++ integer_to_list(Pid) ++ "/stat") of
        {ok, Stat} ->
            [_, Rest] = string:split(Stat, <<")">>, trailing),
            [State | _] = string:lexemes(Rest, " "),
            not lists:member(State, [<<"Z">>, <<"X">>, <<"x">>]);
        {error, _} ->
            false
    end.

%% For wait_until/3: true once none of the OS pids is alive, else the /proc
%% status lines of those that are (so that a failure says which and how).
all_gone(Pids) ->
    case [{P, proc_state(P)} || P <- Pids, os_alive(P)] of
        [] -> true;
        Alive -> {alive, Alive}
    end.

proc_state(Pid) ->
    case file:read_file("/proc/" ++ integer_to_list(Pid) ++ "/status") of
        {ok, Status} ->
            [L || L <- binary:split(Status, <<"\n">>, [global]),
                  lists:any(fun(F) -> binary:match(L, F) =:= {0, byte_size(F)} end,
                            [<<"Name:">>, <<"State:">>, <<"PPid:">>, <<"SigQ:">>])];
        {error, E} ->
            E
    end.

%% Captures every logger event's text into a table of the calling process,
%% read back with logged/0. The test removes the handler HandlerId when done.
capture_logs(HandlerId) ->
    Tab = ets:new(pyport_ct_logs, [public, duplicate_bag]),
    put(pyport_ct_logs, Tab),
    ok = logger:add_handler(HandlerId, ?MODULE, #{config => #{tab => Tab}, level => all}).

logged() ->
    [Text || {log, Text} <- ets:tab2list(get(pyport_ct_logs))].

log(#{msg := Msg}, #{config := #{tab := Tab}}) ->
    Text = case Msg of
               {report, R} -> iolist_to_binary(io_lib:format("~tp", [R]));
               {string, S} -> unicode:characters_to_binary(S);
               {Format, Args} -> unicode:characters_to_binary(io_lib:format(Format, Args))
           end,
    catch ets:insert(Tab, {log, Text}),
    ok.
