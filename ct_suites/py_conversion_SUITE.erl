%% The conversion table of docs/PROTOCOL.md, row by row, both
%% directions. Values go to Python through both payload paths (eval locals and
%% call args/kwargs), Python checks what it received, and results come back.
-module(py_conversion_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-import(pyport_ct_lib, [has/2, nest/1]).

-define(HELPERS_PY, <<"
import pickle

def ident(v=None):
    return v

def tname(v):
    return type(v).__name__

def pnest(n, kind='list'):
    x = 1
    for i in range(n):
        if kind == 'list':
            x = [x]
        elif kind == 'tuple':
            x = (x,)
        elif kind == 'dict':
            x = {'k': x}
        else:
            x = [x] if i % 3 == 0 else ((x,) if i % 3 == 1 else {'k': x})
    return x
">>).

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [integers,
     python_big_integers,
     small_int_lists_from_python,
     floats,
     nan_and_infinity_from_python,
     booleans,
     none_atoms,
     other_atoms,
     utf8_binaries,
     non_utf8_binaries,
     bytes_wrapper,
     bytes_from_python,
     lists,
     tuples,
     maps,
     duplicate_keys,
     opaque_terms,
     sets_from_python,
     unknown_objects,
     unsupported_terms,
     nesting_limit_from_erlang,
     nesting_limit_call_args,
     nesting_limit_from_python,
     large_values].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

%% every test case runs in its own process, hence its own namespace
init_per_testcase(_, Config) ->
    ok = py:exec(?HELPERS_PY),
    Config.

end_per_testcase(_, _Config) ->
    ok.

%%--------------------------------------------------------------------
%% helpers

%% Sends V to Python through every payload path and returns what came back
%% (all paths must agree).
rt(V) ->
    {ok, R1} = py:eval(<<"x">>, #{x => V}),
    {ok, R2} = py:call('__main__', ident, [V]),
    {ok, R3} = py:call('__main__', ident, [], #{v => V}),
    ?assertEqual(R1, R2),
    ?assertEqual(R1, R3),
    R1.

same(V) ->
    ?assertEqual(V, rt(V)).

same(V, Expected) ->
    ?assertEqual(Expected, rt(V)).

%% The Python type name V arrives as, through eval locals and call args alike.
pytype(V) ->
    {ok, Name} = py:eval(<<"type(x).__name__">>, #{x => V}),
    ?assertEqual({ok, Name}, py:call('__main__', tname, [V])),
    Name.

%% Runs a Python boolean expression over `x` (eval locals) and over the
%% argument of a lambda (call args path); both must be True.
check(Expr, V) ->
    {ok, true} = py:eval(Expr, #{x => V}),
    ok = py:exec(<<"def _check(x):\n    return ", Expr/binary, "\n">>),
    {ok, true} = py:call('__main__', '_check', [V]),
    ok.

%%--------------------------------------------------------------------
%% integer <-> int

integers(_Config) ->
    Ints = [0, 1, -1, 127, 128, 255, 256, -128, -129, -255, -256, 65535, 65536,
            2147483647, -2147483648, 2147483648, -2147483649,
            9223372036854775807, -9223372036854775808,
            9223372036854775808, -9223372036854775809,
            18446744073709551615, 18446744073709551616,
            1 bsl 100, -(1 bsl 100), (1 bsl 1000) + 7, -pow10(400)],
    lists:foreach(fun(I) ->
                          same(I),
                          <<"int">> = pytype(I),
                          %% Python holds the exact value
                          check(<<"str(x) == '", (integer_to_binary(I))/binary, "'">>, I),
                          {ok, R} = py:eval(<<"x + 1">>, #{x => I}),
                          ?assertEqual(I + 1, R)
                  end, Ints),
    ok.

python_big_integers(_Config) ->
    ?assertEqual({ok, 1 bsl 100}, py:eval(<<"2**100">>)),
    ?assertEqual({ok, -pow(3, 200)}, py:eval(<<"-(3**200)">>)),
    ?assertEqual({ok, pow10(400)}, py:eval(<<"10**400">>)),
    ?assertEqual({ok, (1 bsl 64) - 1}, py:eval(<<"2**64 - 1">>)),
    ?assertEqual({ok, 1 bsl 64}, py:eval(<<"2**64">>)),
    ?assertEqual({ok, 1 bsl 63}, py:eval(<<"2**63">>)),
    ?assertEqual({ok, -(1 bsl 63)}, py:eval(<<"-(2**63)">>)),
    ?assertEqual({ok, -(1 bsl 63) - 1}, py:eval(<<"-(2**63) - 1">>)),
    ?assertEqual({ok, [1 bsl 70, -(1 bsl 70), 0]}, py:eval(<<"[2**70, -(2**70), 0]">>)),
    ok.

%% eetf writes lists of small ints as STRING_EXT (platform.md): [-1, 2] must
%% not come back as [255, 2], nor a long list be corrupted.
small_int_lists_from_python(_Config) ->
    ?assertEqual({ok, [-1, 2]}, py:eval(<<"[-1, 2]">>)),
    ?assertEqual({ok, [0, 255, 256, -1]}, py:eval(<<"[0, 255, 256, -1]">>)),
    ?assertEqual({ok, lists:seq(0, 299)}, py:eval(<<"list(range(300))">>)),
    ?assertEqual({ok, [I rem 256 || I <- lists:seq(0, 69999)]},
                 py:eval(<<"[i % 256 for i in range(70000)]">>)),
    ?assertEqual({ok, "abc"}, py:eval(<<"[97, 98, 99]">>)),
    %% an Erlang string is a list of ints in Python
    same("abc"),
    <<"list">> = pytype("abc"),
    check(<<"x == [97, 98, 99]">>, "abc"),
    ok.

%%--------------------------------------------------------------------
%% float <-> float

floats(_Config) ->
    Floats = [0.0, 1.5, -2.25, 3.141592653589793, 1.0e300, -1.0e-300,
              5.0e-324, 1.7976931348623157e308, 0.1],
    lists:foreach(fun(F) ->
                          R = rt(F),
                          true = is_float(R),
                          true = (R =:= F),
                          <<"float">> = pytype(F)
                  end, Floats),
    check(<<"x == 1.5">>, 1.5),
    check(<<"x == 0.1">>, 0.1),
    {ok, F2} = py:eval(<<"2.0">>),
    true = is_float(F2) andalso F2 == 2.0,
    {ok, 0.30000000000000004} = py:eval(<<"0.1 + 0.2">>),
    %% Erlang atoms named like special floats are just atoms (strings in Python)
    <<"str">> = pytype(infinity),
    <<"str">> = pytype(nan),
    ok.

nan_and_infinity_from_python(_Config) ->
    {ok, nan} = py:eval(<<"float('nan')">>),
    {ok, infinity} = py:eval(<<"float('inf')">>),
    {ok, neg_infinity} = py:eval(<<"float('-inf')">>),
    {ok, infinity} = py:eval(<<"1e308 * 10">>),
    ?assertEqual({ok, [infinity, #{<<"a">> => nan}, {neg_infinity}]},
                 py:eval(<<"[float('inf'), {'a': float('nan')}, (float('-inf'),)]">>)),
    ok.

%%--------------------------------------------------------------------
%% atoms

booleans(_Config) ->
    same(true),
    same(false),
    <<"bool">> = pytype(true),
    <<"bool">> = pytype(false),
    check(<<"x is True">>, true),
    check(<<"x is False">>, false),
    ?assertEqual({ok, [true, false, 1, 0]}, py:eval(<<"[True, False, 1, 0]">>)),
    {ok, 1} = py:eval(<<"1">>),
    ok.

none_atoms(_Config) ->
    lists:foreach(fun(A) ->
                          same(A, undefined),
                          <<"NoneType">> = pytype(A),
                          check(<<"x is None">>, A)
                  end, [undefined, nil, none]),
    {ok, undefined} = py:eval(<<"None">>),
    ?assertEqual({ok, [undefined, {undefined}]}, py:eval(<<"[None, (None,)]">>)),
    ok.

other_atoms(_Config) ->
    same(hello, <<"hello">>),
    <<"str">> = pytype(hello),
    check(<<"x == 'hello'">>, hello),
    same('Hello World', <<"Hello World">>),
    same('héllo wörld', <<"héllo wörld"/utf8>>),
    check(<<"x == 'h\\u00e9llo w\\u00f6rld'">>, 'héllo wörld'),
    same('日本', <<"日本"/utf8>>),
    same('True', <<"True">>),
    same(infinity, <<"infinity">>),
    same('', <<>>),
    ok.

%%--------------------------------------------------------------------
%% binaries

utf8_binaries(_Config) ->
    Bins = [<<>>, <<"abc">>, <<"héllo"/utf8>>, <<"日本語"/utf8>>, <<"😀"/utf8>>, <<0>>,
            <<"line\nbreak">>],
    lists:foreach(fun(B) ->
                          same(B),
                          <<"str">> = pytype(B)
                  end, Bins),
    %% Python sees characters, not bytes
    check(<<"len(x) == 3">>, <<"日本語"/utf8>>),
    check(<<"x == '\\U0001F600'">>, <<"😀"/utf8>>),
    {ok, <<"é"/utf8>>} = py:eval(<<"'\\u00e9'">>),
    {ok, <<"ab">>} = py:eval(<<"'a' + x">>, #{x => <<"b">>}),
    ok.

non_utf8_binaries(_Config) ->
    Bins = [<<255>>, <<0, 255, 1>>, <<"abc", 200>>,
            <<16#C0, 16#80>>,                 % overlong encoding of U+0000
            <<16#ED, 16#A0, 16#80>>,          % encoded surrogate
            <<16#E6, 16#97>>],                % truncated sequence
    lists:foreach(fun(B) ->
                          same(B),
                          <<"bytes">> = pytype(B),
                          check(<<"len(x) == ", (integer_to_binary(byte_size(B)))/binary>>, B)
                  end, Bins),
    check(<<"x == b'\\xff'">>, <<255>>),
    ok.

%% py:bytes/1 passes a binary as bytes even when it is valid UTF-8.
bytes_wrapper(_Config) ->
    same(py:bytes(<<"abc">>), <<"abc">>),
    <<"bytes">> = pytype(py:bytes(<<"abc">>)),
    check(<<"x == b'abc'">>, py:bytes(<<"abc">>)),
    <<"bytes">> = pytype(py:bytes(<<>>)),
    same(py:bytes(<<>>), <<>>),
    <<"bytes">> = pytype(py:bytes(<<255>>)),
    check(<<"x == [b'a', {'k': b'v'}]">>, [py:bytes(<<"a">>), #{k => py:bytes(<<"v">>)}]),
    ok.

bytes_from_python(_Config) ->
    {ok, <<0, 255, "abc">>} = py:eval(<<"b'\\x00\\xffabc'">>),
    {ok, <<"abc">>} = py:eval(<<"b'abc'">>),
    {ok, <<>>} = py:eval(<<"b''">>),
    {ok, <<"xy">>} = py:eval(<<"bytearray(b'xy')">>),
    {ok, [<<1, 2>>]} = py:eval(<<"[bytes([1, 2])]">>),
    ok.

%%--------------------------------------------------------------------
%% containers

lists(_Config) ->
    same([]),
    same([1, <<"a">>, [2, [3]], {4}, 1.5]),
    <<"list">> = pytype([]),
    <<"list">> = pytype([1, 2]),
    check(<<"x == [1, 'a', [True, None]]">>, [1, <<"a">>, [true, undefined]]),
    ?assertEqual({ok, [1, <<"a">>, [undefined]]}, py:eval(<<"[1, 'a', [None]]">>)),
    ok.

tuples(_Config) ->
    same({}),
    same({1, {2, <<"x">>}, [3]}),
    <<"tuple">> = pytype({}),
    <<"tuple">> = pytype({1, 2}),
    check(<<"x == (1, ('a',))">>, {1, {<<"a">>}}),
    ?assertEqual({ok, {1, <<"a">>, {undefined}}}, py:eval(<<"(1, 'a', (None,))">>)),
    {ok, {}} = py:eval(<<"()">>),
    ok.

maps(_Config) ->
    same(#{}),
    <<"dict">> = pytype(#{}),
    same(#{a => 1, <<"b">> => [1], 3 => x, {1, 2} => y, 1.5 => #{c => undefined}},
         #{<<"a">> => 1, <<"b">> => [1], 3 => <<"x">>, {1, 2} => <<"y">>,
           1.5 => #{<<"c">> => undefined}}),
    check(<<"x == {'a': 1, 'b': {'c': None}}">>, #{a => 1, <<"b">> => #{c => nil}}),
    check(<<"x['a'] == 1">>, #{a => 1}),
    ?assertEqual({ok, #{<<"k">> => [1, 2], 2 => undefined, {1, <<"a">>} => <<255>>,
                        undefined => true}},
                 py:eval(<<"{'k': [1, 2], 2: None, (1, 'a'): b'\\xff', None: True}">>)),
    ok.

%% Two keys that collide after conversion are an error, never a silent drop.
duplicate_keys(_Config) ->
    Colliding = [#{a => 1, <<"a">> => 2},
                 #{undefined => 1, nil => 2},
                 #{none => 1, undefined => 2},
                 #{1 => a, 1.0 => b},             % 1 == 1.0 in Python
                 #{true => 1, 1 => 2}],           % True == 1 in Python
    lists:foreach(fun(M) ->
                          {error, {duplicate_key, R1}} = py:eval(<<"x">>, #{x => M}),
                          true = is_binary(R1),
                          {error, {duplicate_key, _}} = py:call('__main__', ident, [M]),
                          {error, {duplicate_key, _}} = py:call('__main__', ident, [], #{v => M}),
                          {error, {duplicate_key, _}} = py:eval(<<"x">>, #{x => [{M}]})
                  end, Colliding),
    %% Python -> Erlang: 'a' and b'a' both become <<"a">>
    {error, {duplicate_key, R2}} = py:eval(<<"{'a': 1, b'a': 2}">>),
    true = is_binary(R2),
    {error, {duplicate_key, _}} = py:eval(<<"[{'k': {'a': 1, b'a': 2}}]">>),
    %% the port keeps serving
    {ok, 2} = py:eval(<<"1 + 1">>),
    ok.

%%--------------------------------------------------------------------
%% pid, reference, port, fun: opaque in Python, identical when they come back

opaque_terms(_Config) ->
    Port = open_port({spawn_executable, "/bin/cat"}, [binary]),
    Dead = spawn(fun() -> ok end),
    Terms = [self(), Dead, make_ref(), Port, fun() -> ok end, fun lists:map/2,
             fun(X) -> X + 1 end],
    try
        lists:foreach(fun(T) ->
                              R = rt(T),
                              true = (R =:= T),
                              <<"OpaqueTerm">> = pytype(T),
                              %% hashable and comparable
                              ?assertEqual({ok, #{T => 1}}, py:eval(<<"{x: 1}">>, #{x => T})),
                              {ok, true} = py:eval(<<"x == y and hash(x) == hash(y)">>, #{x => T, y => T}),
                              %% picklable (users store pids in SharedDicts)
                              {ok, T} = py:eval(<<"pickle.loads(pickle.dumps(x))">>, #{x => T}),
                              %% inside structures
                              ?assertEqual({ok, [T, {T}]}, py:eval(<<"[x, (x,)]">>, #{x => T}))
                      end, Terms),
        {ok, false} = py:eval(<<"x == y">>, #{x => self(), y => Dead}),
        {ok, F} = py:eval(<<"x">>, #{x => fun(X) -> X * 2 end}),
        42 = F(21)
    after
        port_close(Port)
    end,
    ok.

%%--------------------------------------------------------------------
%% Python-only types

sets_from_python(_Config) ->
    {ok, L} = py:eval(<<"{3, 1, 2}">>),
    [1, 2, 3] = lists:sort(L),
    {ok, [<<"a">>]} = py:eval(<<"frozenset(['a'])">>),
    {ok, []} = py:eval(<<"set()">>),
    {ok, [[1]]} = py:eval(<<"[{1}]">>),
    ok.

unknown_objects(_Config) ->
    {ok, {python_object, <<"object">>, R1}} = py:eval(<<"object()">>),
    true = has(R1, <<"<object object at">>),
    {ok, {python_object, <<"complex">>, <<"(1+2j)">>}} = py:eval(<<"complex(1, 2)">>),
    {ok, {python_object, <<"range">>, <<"range(0, 3)">>}} = py:eval(<<"range(3)">>),
    {ok, {python_object, <<"module">>, R2}} = py:eval(<<"__import__('math')">>),
    true = has(R2, <<"math">>),
    ok = py:exec(<<"class Point:\n    def __repr__(self):\n        return 'Point(1, 2)'\n">>),
    %% builtin types by bare name, others module-qualified
    {ok, {python_object, <<"__main__.Point">>, <<"Point(1, 2)">>}} = py:eval(<<"Point()">>),
    {ok, {python_object, <<"fractions.Fraction">>, <<"Fraction(1, 2)">>}} =
        py:eval(<<"__import__('fractions').Fraction(1, 2)">>),
    {ok, [{python_object, <<"object">>, _}, 1]} = py:eval(<<"[object(), 1]">>),
    {ok, {python_object, <<"__main__.Point">>, <<"Point(1, 2)">>}} = py:call('__main__', 'Point', []),
    %% an object whose repr raises is still a python_object (with a stand-in repr)
    ok = py:exec(<<"class BadRepr:\n    def __repr__(self):\n        raise ValueError('no repr')\n">>),
    {ok, {python_object, <<"__main__.BadRepr">>, BadRepr}} = py:eval(<<"BadRepr()">>),
    true = is_binary(BadRepr),
    {ok, 2} = py:eval(<<"1 + 1">>),
    ok.

%% Terms Python can't hold.
unsupported_terms(_Config) ->
    Bad = [[1 | 2], [a, b | c], #{k => [1, 2 | 3]}, <<1:3>>, {<<0:7>>}],
    lists:foreach(fun(T) ->
                          {error, {unsupported_term, _}} = py:eval(<<"x">>, #{x => T}),
                          {error, {unsupported_term, _}} = py:call('__main__', ident, [T]),
                          {error, {unsupported_term, _}} = py:call('__main__', ident, [], #{v => T})
                  end, Bad),
    {ok, 2} = py:eval(<<"1 + 1">>),
    ok.

%%--------------------------------------------------------------------
%% nesting limit: 1000 levels ok, deeper is {error, {nesting_too_deep, 1000}}

nesting_limit_from_erlang(_Config) ->
    %% each container kind alone, and mixed, exactly at and just past the limit
    Cases = [{K, D} || D <- [1000, 1001], K <- [list, tuple, map, mixed]],
    Wrong = [{K, D, summary(R)} || {K, D} <- Cases,
                                   R <- [py:eval(<<"x">>, #{x => deep(K, D)})],
                                   R =/= expected(K, D)],
    ?assertEqual([], Wrong),
    {error, {nesting_too_deep, 1000}} = py:call('__main__', ident, [nest(1500)]),
    {error, {nesting_too_deep, 1000}} = py:call('__main__', ident, [], #{v => nest(1500)}),
    {error, {nesting_too_deep, 1000}} = py:eval(<<"x">>, #{x => nest(100000)}),
    {error, {nesting_too_deep, 1000}} = py:eval(<<"x">>, #{x => deep(tuple, 100000)}),
    {ok, 2} = py:eval(<<"1 + 1">>),
    ok.

%% The limit applies to the value, whichever path it takes: a 1000-level
%% argument is as acceptable as a 1000-level local.
nesting_limit_call_args(_Config) ->
    Wrong = [{Path, K, summary(R)} || K <- [list, tuple, map],
                                      {Path, R} <- [{args, py:call('__main__', ident, [deep(K, 1000)])},
                                                    {kwargs, py:call('__main__', ident, [],
                                                                     #{v => deep(K, 1000)})}],
                                      R =/= expected(K, 1000)],
    ?assertEqual([], Wrong),
    ok.

deep(list, N) -> nest(N);
deep(tuple, 0) -> 1;
deep(tuple, N) -> {deep(tuple, N - 1)};
deep(map, 0) -> 1;
deep(map, N) -> #{k => deep(map, N - 1)};
deep(mixed, N) -> mixed(N).

expected(K, D) when D =< 1000 -> {ok, back(K, D)};
expected(_, _) -> {error, {nesting_too_deep, 1000}}.

back(map, 0) -> 1;
back(map, N) -> #{<<"k">> => back(map, N - 1)};
back(mixed, N) -> mixed_back(N);
back(K, N) -> deep(K, N).

%% results of deep terms are too big to print
summary({ok, V}) -> {ok, {depth, depth(V)}};
summary(Other) -> Other.

nesting_limit_from_python(_Config) ->
    ?assertEqual({ok, nest(1000)}, py:eval(<<"pnest(1000)">>)),
    {ok, T} = py:eval(<<"pnest(1000, 'tuple')">>),
    1000 = depth(T),
    {ok, D} = py:eval(<<"pnest(1000, 'dict')">>),
    1000 = depth(D),
    {error, {nesting_too_deep, 1000}} = py:eval(<<"pnest(1001)">>),
    {error, {nesting_too_deep, 1000}} = py:eval(<<"pnest(1001, 'dict')">>),
    {error, {nesting_too_deep, 1000}} = py:eval(<<"pnest(1001, 'tuple')">>),
    {error, {nesting_too_deep, 1000}} = py:eval(<<"pnest(1500)">>),
    {error, {nesting_too_deep, 1000}} = py:call('__main__', pnest, [1500, <<"mixed">>]),
    {error, {nesting_too_deep, 1000}} = py:eval(<<"pnest(100000)">>),
    %% a self-referencing list is infinitely deep
    {error, {nesting_too_deep, 1000}} = py:eval(<<"(lambda l: (l.append(l), l)[1])([])">>),
    {ok, 2} = py:eval(<<"1 + 1">>),
    ok.

%%--------------------------------------------------------------------
%% sizes

large_values(_Config) ->
    Rand = rand:bytes(1 bsl 20),
    same(Rand),
    Utf8 = binary:copy(<<"é"/utf8>>, 500000),
    same(Utf8),
    check(<<"len(x) == 500000">>, Utf8),
    Ints = lists:seq(-50000, 50000),
    same(Ints),
    Map = maps:from_list([{integer_to_binary(I), I} || I <- lists:seq(1, 20000)]),
    same(Map),
    {ok, Big} = py:eval(<<"'x' * 3000000">>),
    3000000 = byte_size(Big),
    ok.

%%--------------------------------------------------------------------

pow10(N) -> pow(10, N).

pow(_, 0) -> 1;
pow(B, N) -> B * pow(B, N - 1).

%% list / tuple / map, cycling, N containers deep, around 1
mixed(0) -> 1;
mixed(N) ->
    case N rem 3 of
        0 -> [mixed(N - 1)];
        1 -> {mixed(N - 1)};
        2 -> #{k => mixed(N - 1)}
    end.

mixed_back(0) -> 1;
mixed_back(N) ->
    case N rem 3 of
        0 -> [mixed_back(N - 1)];
        1 -> {mixed_back(N - 1)};
        2 -> #{<<"k">> => mixed_back(N - 1)}
    end.

depth(L) when is_list(L) -> 1 + depth(hd(L));
depth(T) when is_tuple(T) -> 1 + depth(element(1, T));
depth(M) when is_map(M) -> 1 + depth(maps:get(<<"k">>, M));
depth(_) -> 0.
