%% @doc The examples of README.md, run as written, so that the documentation cannot drift
%% away from the product.
-module(readme_SUITE).

-include_lib("common_test/include/ct.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1]).
-export([intro/1, examples/1, async_def/1, shared_dict/1, shared_dict_atomic/1, streams/1,
         per_process_state/1, python_calls_erlang/1, pool/1]).

all() -> [intro, examples, async_def, shared_dict, shared_dict_atomic, streams,
          per_process_state, python_calls_erlang, pool].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

%% The session at the top of the README.
intro(_Config) ->
    {ok, 1.4142135623730951} = py:call(math, sqrt, [2.0]),
    ok = py:exec(<<"def greet(name):\n    return 'hello ' + name\n">>),
    {ok, <<"hello joe">>} = py:call('__main__', greet, [<<"joe">>]),
    {ok, 13} = py:eval(<<"x * x + y">>, #{x => 3, y => 4}),
    {error, {python, 'ZeroDivisionError', <<"division by zero">>, Tb}} = py:eval(<<"1 / 0">>),
    <<"Traceback (most recent call last):\n  File \"<pyport>\", line 1, in <module>\n"
      "ZeroDivisionError: division by zero\n">> = Tb.

%% "Examples" under "API".
examples(_Config) ->
    {ok, <<"a-b">>} = py:call(<<"operator">>, add, [<<"a-">>, <<"b">>]),
    {ok, <<"3.14">>} = py:call(builtins, format, [3.14159, <<".2f">>]),
    {ok, 16.0} = py:call(math, pow, [2, 4]),
    {ok, [3, 1]} = py:call(builtins, sorted, [[1, 3]], #{reverse => true}),
    ok = py:exec(<<"counter = 0\ndef bump(n):\n    global counter\n    counter += n\n    return counter\n">>),
    {ok, 5} = py:call('__main__', bump, [5]),
    {ok, 7} = py:call('__main__', bump, [2]),
    {ok, <<"bytes">>} = py:eval(<<"type(b).__name__">>, #{b => py:bytes(<<"abc">>)}),
    {ok, <<"str">>} = py:eval(<<"type(s).__name__">>, #{s => <<"abc">>}),
    {error, timeout} = py:eval(<<"__import__('time').sleep(10)">>, #{}, 100).

%% The Erlang block under "async def", read from README.md and evaluated as written.
async_def(_Config) ->
    eval_block(readme_block("### async def")).

%% The Erlang block under "SharedDict".
shared_dict(_Config) ->
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"config">>, #{host => <<"localhost">>, port => 8080}),
    #{<<"host">> := <<"localhost">>, <<"port">> := 8080} = py:shared_dict_get(SD, <<"config">>),
    default_value = py:shared_dict_get(SD, <<"missing">>, default_value),
    undefined = py:shared_dict_get(SD, <<"missing">>),
    [<<"config">>] = py:shared_dict_keys(SD),
    ok = py:shared_dict_del(SD, <<"config">>),
    ok = py:shared_dict_destroy(SD),
    ok = py:shared_dict_destroy(SD).

%% The SharedDict block on atomic updates, read from README.md and evaluated as written.
shared_dict_atomic(_Config) ->
    eval_block(readme_block("Atomic updates, from any number of processes at once:")).

%% The Erlang block under "Streams", read from README.md and evaluated as written.
streams(_Config) ->
    eval_block(readme_block("### Streams")).

%% The Erlang block under "Per-process state and threads", read from README.md
%% and evaluated as written, under load from 8 other processes.
per_process_state(_Config) ->
    Block = readme_block("### Per-process state and threads"),
    Stop = atomics:new(1, []),
    Load = [spawn_link(fun() -> load(Stop) end) || _ <- lists:seq(1, 8)],
    try
        eval_block(Block)
    after
        atomics:put(Stop, 1, 1),
        [pyport_ct_lib:wait_down(P) || P <- Load]
    end,
    ok.

%% The Erlang block under "Python calls Erlang", read from README.md and evaluated as
%% written (in a process of its own, whose mailbox holds only what the block sends).
python_calls_erlang(_Config) ->
    Block = readme_block("### Python calls Erlang"),
    ok = pyport_ct_lib:run_in_process(fun() -> eval_block(Block) end).

%% The Erlang block under "A pool of ports", with the pool it names (2 ports).
pool(_Config) ->
    Saved = pyport_ct_lib:save_env([ports]),
    ok = pyport_ct_lib:stop_app(),
    ok = application:set_env(pyport, ports, 2),
    _ = pyport_ct_lib:start_app(),
    try
        ok = pyport_ct_lib:run_in_process(fun() -> eval_block(readme_block("## A pool of ports")) end)
    after
        pyport_ct_lib:restore_env_and_restart(Saved)
    end.

load(Stop) ->
    case atomics:get(Stop, 1) of
        1 -> ok;
        0 -> {ok, _} = py:eval(<<"__import__('time').sleep(0.02)">>), load(Stop)
    end.

eval_block(Block) ->
    {ok, Tokens, _} = erl_scan:string(Block),
    {ok, Exprs} = erl_parse:parse_exprs(Tokens),
    {value, _, _} = erl_eval:exprs(Exprs, erl_eval:new_bindings()),
    ok.

%% The first ```erlang block after Heading in README.md.
readme_block(Heading) ->
    Readme = filename:join([filename:dirname(code:which(py)), "..", "README.md"]),
    {ok, Text} = file:read_file(Readme),
    [_, After] = binary:split(Text, list_to_binary(Heading)),
    [_, Code0] = binary:split(After, <<"```erlang\n">>),
    [Code | _] = binary:split(Code0, <<"```">>),
    binary_to_list(Code).
