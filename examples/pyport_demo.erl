%% @doc A short, readable tour of pyport: `make demo' runs `pyport_demo:main()'.
%%
%% Each step prints the Erlang expression it runs and what it returned (or
%% raised). The SharedDict examples are the ones of the API reference, with the
%% glue they leave implicit (their Python functions defined first with py:exec,
%% a `shop' module written to a temporary directory on sys.path).
%% The demo exits with status 1 if any step returned something unexpected.
-module(pyport_demo).

-export([main/0]).

-spec main() -> ok.
main() ->
    setup_logger(),
    put(unexpected, 0),
    {ok, _} = application:ensure_all_started(pyport),
    io:format("pyport demo: Python runs in a separate OS process (~ts)~n",
              [pyport_server:executable()]),
    basics(),
    conversions(),
    namespaces(),
    exceptions_and_timeouts(),
    python_calls_erlang(),
    shared_dict_quick_start(),
    shared_dict_configuration(),
    shared_dict_session_state(),
    shared_dict_cache(),
    crash(),
    section("What the port holds now"),
    step("py:stats()", fun() -> py:stats() end, fun({ok, M}) -> is_map(M); (_) -> false end),
    ok = application:stop(pyport),
    case get(unexpected) of
        0 ->
            io:format("~nDone: every step returned what it should.~n");
        N ->
            io:format("~nDone, but ~b step(s) returned something unexpected (marked !!).~n", [N]),
            erlang:halt(1)
    end,
    ok.

%%--------------------------------------------------------------------

basics() ->
    section("call / eval / exec"),
    step("py:call(math, sqrt, [16])",
         fun() -> py:call(math, sqrt, [16]) end,
         fun(R) -> R =:= {ok, 4.0} end),
    step("py:call(builtins, round, [3.14159], #{ndigits => 2})",
         fun() -> py:call(builtins, round, [3.14159], #{ndigits => 2}) end,
         fun(R) -> R =:= {ok, 3.14} end),
    step("py:call(<<\"os.path\">>, join, [<<\"/tmp\">>, <<\"demo.txt\">>])",
         fun() -> py:call(<<"os.path">>, join, [<<"/tmp">>, <<"demo.txt">>]) end,
         fun(R) -> R =:= {ok, <<"/tmp/demo.txt">>} end),
    step("py:eval(<<\"[x * x for x in range(6)]\">>)",
         fun() -> py:eval(<<"[x * x for x in range(6)]">>) end,
         fun(R) -> R =:= {ok, [0, 1, 4, 9, 16, 25]} end),
    step("py:eval(<<\"a * b\">>, #{a => 6, b => 7})",
         fun() -> py:eval(<<"a * b">>, #{a => 6, b => 7}) end,
         fun(R) -> R =:= {ok, 42} end),
    step("py:exec(<<\"def greet(name):\\n    return 'hello, ' + name\\n\">>)",
         fun() -> py:exec(<<"def greet(name):\n    return 'hello, ' + name\n">>) end,
         fun(R) -> R =:= ok end),
    step("py:eval(<<\"greet('erlang')\">>)",
         fun() -> py:eval(<<"greet('erlang')">>) end,
         fun(R) -> R =:= {ok, <<"hello, erlang">>} end),
    step("py:call('__main__', greet, [<<\"world\">>])",
         fun() -> py:call('__main__', greet, [<<"world">>]) end,
         fun(R) -> R =:= {ok, <<"hello, world">>} end),
    step("py:eval(<<\"2 ** 100\">>)",
         fun() -> py:eval(<<"2 ** 100">>) end,
         fun(R) -> R =:= {ok, 1 bsl 100} end).

conversions() ->
    section("Conversions (see the table in the README)"),
    Map = #{name => <<"ada">>, <<"age">> => 36, tags => [a, b], pos => {1.5, 2},
            nothing => undefined},
    step("py:eval(<<\"{k: type(v).__name__ for k, v in m.items()}\">>, #{m => Map})",
         fun() -> py:eval(<<"{k: type(v).__name__ for k, v in m.items()}">>, #{m => Map}) end,
         fun(R) -> R =:= {ok, #{<<"name">> => <<"str">>, <<"age">> => <<"int">>,
                                <<"tags">> => <<"list">>, <<"pos">> => <<"tuple">>,
                                <<"nothing">> => <<"NoneType">>}} end),
    step("py:eval(<<\"(type(b).__name__, type(s).__name__)\">>, "
         "#{b => py:bytes(<<\"abc\">>), s => <<\"abc\">>})",
         fun() -> py:eval(<<"(type(b).__name__, type(s).__name__)">>,
                          #{b => py:bytes(<<"abc">>), s => <<"abc">>}) end,
         fun(R) -> R =:= {ok, {<<"bytes">>, <<"str">>}} end),
    Self = self(),
    step("py:eval(<<\"p\">>, #{p => self()})   % a pid comes back as itself",
         fun() -> py:eval(<<"p">>, #{p => Self}) end,
         fun(R) -> R =:= {ok, Self} end),
    step("py:eval(<<\"float('nan'), {1, 2}, object()\">>)",
         fun() -> py:eval(<<"float('nan'), {1, 2}, object()">>) end,
         fun({ok, {nan, [1, 2], {python_object, <<"object">>, _}}}) -> true;
            (_) -> false end).

namespaces() ->
    section("Each Erlang process has its own Python namespace"),
    step("py:exec(<<\"counter = 1\">>)",
         fun() -> py:exec(<<"counter = 1">>) end,
         fun(R) -> R =:= ok end),
    step("in another process: py:eval(<<\"counter\">>)",
         fun() -> in_process(fun() -> py:eval(<<"counter">>) end) end,
         fun({error, {python, 'NameError', _, _}}) -> true; (_) -> false end),
    step("in another process: py:exec(<<\"counter = 100\">>), py:eval(<<\"counter\">>)",
         fun() -> in_process(fun() ->
                                     ok = py:exec(<<"counter = 100">>),
                                     py:eval(<<"counter">>)
                             end) end,
         fun(R) -> R =:= {ok, 100} end),
    step("back here: py:eval(<<\"counter\">>)",
         fun() -> py:eval(<<"counter">>) end,
         fun(R) -> R =:= {ok, 1} end).

python_calls_erlang() ->
    section("Python calls Erlang"),
    step("py:register_function(user_name, fun([Id]) -> maps:get(Id, #{1 => <<\"joe\">>}) end)",
         fun() -> py:register_function(user_name, fun([Id]) -> maps:get(Id, #{1 => <<"joe">>}) end) end,
         fun(R) -> R =:= ok end),
    step("py:exec(<<\"import erlang\\ndef greet_user(uid):\\n    return 'hello ' + erlang.user_name(uid)\\n\">>)",
         fun() -> py:exec(<<"import erlang\ndef greet_user(uid):\n    return 'hello ' + erlang.user_name(uid)\n">>) end,
         fun(R) -> R =:= ok end),
    step("py:call('__main__', greet_user, [1])   % Python -> Erlang -> Python",
         fun() -> py:call('__main__', greet_user, [1]) end,
         fun(R) -> R =:= {ok, <<"hello joe">>} end),
    step("py:call('__main__', greet_user, [2])   % the Erlang error, raised in Python",
         fun() -> py:call('__main__', greet_user, [2]) end,
         fun({error, {python, <<"erlang.ErlangError">>, <<"error: {badkey,2}">>, _}}) -> true;
            (_) -> false end),
    step("py:exec(<<\"erlang.send(erlang.self(), ('progress', 50))\">>), receive M -> M end",
         fun() ->
                 ok = py:exec(<<"erlang.send(erlang.self(), ('progress', 50))">>),
                 receive M -> M after 5000 -> no_message end
         end,
         fun(R) -> R =:= {<<"progress">>, 50} end),
    ok = py:unregister_function(user_name),
    step("py:stream_start(builtins, range, [3]), then receive {py_stream, Ref, ...} and stream_ack",
         fun() ->
                 {ok, Ref} = py:stream_start(builtins, range, [3]),
                 demo_stream(Ref, [])
         end,
         fun(R) -> R =:= {done, [0, 1, 2]} end).

%% The items of a stream, acknowledged one by one, until done.
demo_stream(Ref, Acc) ->
    receive
        {py_stream, Ref, {data, V}} -> ok = py:stream_ack(Ref), demo_stream(Ref, [V | Acc]);
        {py_stream, Ref, done} -> {done, lists:reverse(Acc)};
        {py_stream, Ref, {error, E}} -> {error, E}
    after 5000 -> stalled
    end.

exceptions_and_timeouts() ->
    section("Exceptions, argument errors and timeouts"),
    step("py:eval(<<\"1 / 0\">>)",
         fun() -> py:eval(<<"1 / 0">>) end,
         fun({error, {python, 'ZeroDivisionError', <<"division by zero">>, TB}}) ->
                 is_binary(TB);
            (_) -> false end),
    step("py:call(math, sqrt, [-1])",
         fun() -> py:call(math, sqrt, [-1]) end,
         fun({error, {python, 'ValueError', _, _}}) -> true; (_) -> false end),
    step("py:call(no_such_module, f, [])",
         fun() -> py:call(no_such_module, f, []) end,
         fun({error, {python, 'ModuleNotFoundError', _, _}}) -> true; (_) -> false end),
    step("py:eval(<<\"x\">>, #{<<\"not an identifier\">> => 1})   % raises badarg",
         fun() -> py:eval(<<"x">>, #{<<"not an identifier">> => 1}) end,
         fun(R) -> R =:= {raised, error, badarg} end),
    step("py:exec(<<\"while True: pass\">>, #{}, 300)   % interrupted after 300 ms",
         fun() -> py:exec(<<"while True: pass">>, #{}, 300) end,
         fun(R) -> R =:= {error, timeout} end),
    step("py:eval(<<\"'still serving'\">>)",
         fun() -> py:eval(<<"'still serving'">>) end,
         fun(R) -> R =:= {ok, <<"still serving">>} end).

%%--------------------------------------------------------------------
%% SharedDict: the examples of the API reference

shared_dict_quick_start() ->
    section("SharedDict Quick Start, Erlang side"),
    {ok, SD} = show("{ok, SD} = py:shared_dict_new()", py:shared_dict_new()),
    show("ok = py:shared_dict_set(SD, <<\"config\">>, "
         "#{host => <<\"localhost\">>, port => 8080})",
         py:shared_dict_set(SD, <<"config">>, #{host => <<"localhost">>, port => 8080})),
    Config = show("Config = py:shared_dict_get(SD, <<\"config\">>)",
                  py:shared_dict_get(SD, <<"config">>)),
    expect(Config =:= #{<<"host">> => <<"localhost">>, <<"port">> => 8080}),
    Value = show("Value = py:shared_dict_get(SD, <<\"missing\">>, default_value)",
                 py:shared_dict_get(SD, <<"missing">>, default_value)),
    expect(Value =:= default_value),
    Keys = show("Keys = py:shared_dict_keys(SD)", py:shared_dict_keys(SD)),
    expect(Keys =:= [<<"config">>]),
    ok = show("ok = py:shared_dict_del(SD, <<\"config\">>)", py:shared_dict_del(SD, <<"config">>)),
    ok = show("ok = py:shared_dict_destroy(SD)", py:shared_dict_destroy(SD)),
    step("py:shared_dict_get(SD, <<\"config\">>)   % after destroy",
         fun() -> py:shared_dict_get(SD, <<"config">>) end,
         fun(R) -> R =:= {raised, error, {shared_dict_destroyed, SD}} end),

    section("SharedDict Quick Start, Python side"),
    ok = show("py:exec(<<\"def process_with_config(sd_handle): ...\">>)",
              py:exec(<<"
from erlang import SharedDict

def process_with_config(sd_handle):
    # Wrap the handle
    sd = SharedDict(sd_handle)

    # Dict-like access
    config = sd['config']
    host = config.get('host') or config.get(b'host')

    # Set values
    sd['result'] = {'status': 'ok', 'count': 42}

    # Check membership
    if 'config' in sd:
        print(\"Config found\")

    # Iterate keys
    for key in sd.keys():
        print(f\"Key: {key}\")

    # Delete
    del sd['result']
    return host
">>)),
    {ok, SD2} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD2, <<"config">>, #{host => <<"localhost">>, port => 8080}),
    step("py:call('__main__', process_with_config, [SD2])   % prints go to logger",
         fun() -> py:call('__main__', process_with_config, [SD2]) end,
         fun(R) -> R =:= {ok, <<"localhost">>} end),
    settle(),
    step("py:shared_dict_keys(SD2)",
         fun() -> py:shared_dict_keys(SD2) end,
         fun(R) -> R =:= [<<"config">>] end),
    ok = py:shared_dict_destroy(SD2).

shared_dict_configuration() ->
    section("SharedDict example: Configuration Passing"),
    ok = show("py:exec(<<\"def process_data(sd_handle): ...\">>)   % connect() is a stub",
              py:exec(<<"
from erlang import SharedDict

def connect(host, port):
    return f'connection to {host}:{port}'

def process_data(sd_handle):
    sd = SharedDict(sd_handle)
    db_config = sd['db']

    # Use config to connect to database
    conn = connect(
        host=db_config.get('host') or db_config.get(b'host'),
        port=db_config.get('port') or db_config.get(b'port')
    )

    # Store results back
    sd['results'] = {'rows_processed': 1000}
">>)),
    {ok, SD} = show("{ok, SD} = py:shared_dict_new()", py:shared_dict_new()),
    ok = show("ok = py:shared_dict_set(SD, <<\"db\">>, "
              "#{host => <<\"localhost\">>, port => 5432, user => <<\"admin\">>})",
              py:shared_dict_set(SD, <<"db">>, #{host => <<"localhost">>, port => 5432,
                                                 user => <<"admin">>})),
    {ok, _} = show("{ok, _} = py:eval(<<\"process_data(handle)\">>, #{<<\"handle\">> => SD})",
                   py:eval(<<"process_data(handle)">>, #{<<"handle">> => SD})),
    step("py:shared_dict_get(SD, <<\"results\">>)",
         fun() -> py:shared_dict_get(SD, <<"results">>) end,
         fun(R) -> R =:= #{<<"rows_processed">> => 1000} end),
    ok = py:shared_dict_destroy(SD).

shared_dict_session_state() ->
    section("SharedDict example: Session State (module shop on sys.path)"),
    Dir = filename:join(tmp_dir(), "pyport_demo_" ++ os:getpid()),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    ok = file:write_file(filename:join(Dir, "shop.py"), <<"
from erlang import SharedDict

def add_to_cart(session_handle, item_id):
    session = SharedDict(session_handle)
    cart = session['cart']
    cart.append(item_id)
    session['cart'] = cart
    return len(cart)
">>),
    io:format("  (wrote ~ts)~n", [filename:join(Dir, "shop.py")]),
    ok = show("py:exec(<<\"import sys; sys.path.insert(0, dir)\">>, #{dir => Dir})",
              py:exec(<<"import sys; sys.path.insert(0, dir)">>,
                      #{dir => unicode:characters_to_binary(Dir)})),
    UserId = 42,
    ItemId = <<"apple">>,
    Item2Id = <<"pear">>,
    {ok, Session} = show("{ok, Session} = py:shared_dict_new()", py:shared_dict_new()),
    ok = show("ok = py:shared_dict_set(Session, <<\"user_id\">>, UserId)   % UserId = 42",
              py:shared_dict_set(Session, <<"user_id">>, UserId)),
    ok = show("ok = py:shared_dict_set(Session, <<\"cart\">>, [])",
              py:shared_dict_set(Session, <<"cart">>, [])),
    {ok, _} = show("{ok, _} = py:call(shop, add_to_cart, [Session, ItemId])   % <<\"apple\">>",
                   py:call(shop, add_to_cart, [Session, ItemId])),
    {ok, _} = show("{ok, _} = py:call(shop, add_to_cart, [Session, Item2Id])   % <<\"pear\">>",
                   py:call(shop, add_to_cart, [Session, Item2Id])),
    Cart = show("Cart = py:shared_dict_get(Session, <<\"cart\">>)",
                py:shared_dict_get(Session, <<"cart">>)),
    expect(Cart =:= [<<"apple">>, <<"pear">>]),
    ok = show("ok = py:shared_dict_destroy(Session)", py:shared_dict_destroy(Session)),
    _ = file:del_dir_r(Dir),
    ok.

shared_dict_cache() ->
    section("SharedDict example: Cache Sharing"),
    ok = show("py:exec(<<\"def expensive_computation(): ...\">>)",
              py:exec(<<"
def expensive_computation():
    return sum(i * i for i in range(100000))
">>)),
    {ok, Cache} = show("{ok, Cache} = py:shared_dict_new()", py:shared_dict_new()),
    Code = <<"
from erlang import SharedDict
cache = SharedDict(handle)
cache['computed'] = expensive_computation()
">>,
    ok = show("ok = py:exec(Code, #{<<\"handle\">> => Cache})",
              py:exec(Code, #{<<"handle">> => Cache})),
    CachedValue = show("CachedValue = py:shared_dict_get(Cache, <<\"computed\">>)",
                       py:shared_dict_get(Cache, <<"computed">>)),
    expect(CachedValue =:= lists:sum([I * I || I <- lists:seq(0, 99999)])),
    ok = py:shared_dict_destroy(Cache).

%%--------------------------------------------------------------------

crash() ->
    section("A crash of the Python process is survived"),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, 1),
    io:format("  (SD is a SharedDict created before the crash)~n"),
    step("py:exec(<<\"import os; os.abort()\">>)",
         fun() -> py:exec(<<"import os; os.abort()">>) end,
         fun({error, {pyport_exit, _}}) -> true; (_) -> false end),
    settle(),
    step("py:call(math, sqrt, [2.0])   % a fresh port answers",
         fun() -> py:call(math, sqrt, [2.0]) end,
         fun(R) -> R =:= {ok, math:sqrt(2.0)} end),
    step("py:eval(<<\"greet('again')\">>)   % namespaces start empty after a crash",
         fun() -> py:eval(<<"greet('again')">>) end,
         fun({error, {python, 'NameError', _, _}}) -> true; (_) -> false end),
    step("py:shared_dict_get(SD, <<\"k\">>)   % dicts died with the old port",
         fun() -> py:shared_dict_get(SD, <<"k">>) end,
         fun(R) -> R =:= {raised, error, {shared_dict_destroyed, SD}} end),
    step("py:shared_dict_destroy(SD)   % destroy stays idempotent",
         fun() -> py:shared_dict_destroy(SD) end,
         fun(R) -> R =:= ok end).

%%--------------------------------------------------------------------
%% Helpers

section(Title) ->
    io:format("~n== ~ts ==~n", [Title]).

%% Runs Fun, prints what it returned or raised, checks it with Check.
step(Label, Fun, Check) ->
    Result = try Fun() catch Class:Reason -> {raised, Class, Reason} end,
    print(Label, Result),
    expect(try Check(Result) catch _:_ -> false end),
    Result.

%% Prints an expression's label and value and returns the value (for
%% matches written as in the reference).
show(Label, Value) ->
    print(Label, Value),
    Value.

print(Label, {error, {python, Type, Message, Traceback}}) when is_binary(Traceback) ->
    io:format("~ts~n  -> {error, {python, ~tp, ~tp, Traceback}}~n", [Label, Type, Message]),
    Lines = string:split(string:trim(Traceback), "\n", all),
    io:format("     Traceback (last lines):~n~ts", [[["       ", L, "\n"] || L <- last(3, Lines)]]);
print(Label, {raised, Class, Reason}) ->
    io:format("~ts~n  -> raised ~p:~0tp~n", [Label, Class, Reason]);
print(Label, Value) ->
    io:format("~ts~n  -> ~0tp~n", [Label, Value]).

expect(true) ->
    ok;
expect(false) ->
    io:format("  !! unexpected result~n"),
    put(unexpected, get(unexpected) + 1),
    ok.

last(N, L) when length(L) =< N -> L;
last(N, L) -> lists:nthtail(length(L) - N, L).

%% Runs Fun in a new process and returns its result.
in_process(Fun) ->
    {Pid, MRef} = spawn_monitor(fun() -> exit({result, Fun()}) end),
    receive
        {'DOWN', MRef, process, Pid, {result, R}} -> R;
        {'DOWN', MRef, process, Pid, Other} -> {process_died, Other}
    after 10000 ->
            exit(Pid, kill),
            {error, no_answer}
    end.

%% Lets log lines forwarded from Python print before the next step.
settle() ->
    timer:sleep(200).

tmp_dir() ->
    case os:getenv("TMPDIR") of
        false -> "/tmp";
        "" -> "/tmp";
        D -> D
    end.

%% One line per log event, Python output included (it arrives at level info).
setup_logger() ->
    ok = logger:set_primary_config(level, info),
    ok = logger:add_primary_filter(no_progress, {fun logger_filters:progress/2, stop}),
    ok = logger:update_formatter_config(default, #{single_line => true,
                                                   template => ["  [", level, "] ", msg, "\n"]}).
