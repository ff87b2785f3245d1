%% A separate Erlang VM for fault_SUITE's no-orphan cases (compiled by the suite
%% into its priv_dir and started with `erl -noshell -run fault_vm main').
%%
%% Starts pyport, makes Python start a child process (`sleep 600') and keeps
%% one worker busy in C (`time.sleep(600)'), then prints
%% `pids BeamOsPid PortOsPid ChildOsPid' and serves commands read from stdin:
%% `stop' stops the pyport application (closing the port while Python is busy
%% in C) and prints `stopped'. End of input halts the VM, so a test that
%% closes its side never leaves this VM behind.
-module(fault_vm).
-export([main/0]).

main() ->
    try
        {ok, _} = application:ensure_all_started(pyport),
        ok = wait(fun() -> element(1, py:stats()) =:= ok end, 30000),
        ok = py:exec(<<"import subprocess\nchild = subprocess.Popen(['sleep', '600'])\n">>),
        {ok, Child} = py:eval(<<"child.pid">>),
        _ = spawn(fun() -> py:eval(<<"__import__('time').sleep(600)">>, #{}, infinity) end),
        ok = wait(fun() ->
                          {ok, #{busy_workers := B}} = py:stats(),
                          B >= 1
                  end, 30000),
        {ok, #{os_pid := PortPid}} = py:stats(),
        io:format("pids ~s ~b ~b~n", [os:getpid(), PortPid, Child])
    catch
        C:R:St ->
            io:format("fault_vm failed: ~p~n", [{C, R, St}]),
            halt(1)
    end,
    loop().

loop() ->
    case io:get_line("") of
        "stop\n" ->
            ok = application:stop(pyport),
            io:format("stopped~n"),
            loop();
        Line when is_list(Line) ->
            loop();
        _EofOrError ->
            halt()
    end.

wait(Fun, Ms) when Ms =< 0 ->
    {timeout, Fun()};
wait(Fun, Ms) ->
    case catch Fun() of
        true -> ok;
        _ ->
            timer:sleep(50),
            wait(Fun, Ms - 50)
    end.
