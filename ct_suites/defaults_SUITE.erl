%% The documented defaults of the README's "Configuration" table as the
%% running system applies them: read from the port and the server (the
%% `config' map of py:stats()), not from the `.app' file. Twice: with the
%% application env as the `.app' file ships it, and with no pyport app env at
%% all, so that the defaults written in the code (the server's, the port
%% program's) are the documented ones too.
-module(defaults_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1]).
-export([defaults_as_shipped/1, defaults_with_no_app_env/1, port_limits_as_applied/1]).

%% README keys that py:stats() does not report, each with the test that pins
%% its default.
-define(PINNED_ELSEWHERE,
        [sys_path,           % promises_SUITE:documented_defaults (the .app file)
         startup_code,       % promises_SUITE:documented_defaults (the .app file)
         start_timeout_ms,   % start_timeout_SUITE:default_start_does_not_wait
         pyport_executable,  % promises_SUITE:binary_found_next_to_ebin
         python,             % python_env_SUITE (unset: the Python of the build)
         %% The declared-environment keys are read by pyport_python and
         %% pyport_env when a port starts, and py:stats() does not report them
         %% (yet): python_env_SUITE sets each where it tests it.
         python_probe_timeout_ms, python_requirements, python_wheels, python_env_dir,
         python_installer, python_env_timeout_ms]).

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [defaults_as_shipped, defaults_with_no_app_env, port_limits_as_applied].

init_per_suite(Config) ->
    ok = pyport_ct_lib:stop_app(),
    _ = application:load(pyport),
    [{saved_all_env, application:get_all_env(pyport)} | Config].

end_per_suite(Config) ->
    ok = pyport_ct_lib:stop_app(),
    restore_all_env(?config(saved_all_env, Config)),
    _ = pyport_ct_lib:start_app(),
    ok.

%% The app env as the .app file has it (earlier suites may have left keys).
defaults_as_shipped(_Config) ->
    ok = pyport_ct_lib:stop_app(),
    ok = application:unload(pyport),
    ok = application:load(pyport),
    _ = pyport_ct_lib:start_app(),
    assert_documented_defaults().

%% No pyport app env at all: every default is the code's own.
defaults_with_no_app_env(_Config) ->
    ok = pyport_ct_lib:stop_app(),
    [application:unset_env(pyport, K) || {K, _} <- application:get_all_env(pyport),
                                         K =/= included_applications],
    ?assertEqual([], [K || {K, _} <- application:get_all_env(pyport), K =/= included_applications]),
    _ = pyport_ct_lib:start_app(),
    assert_documented_defaults(),
    %% and what the defaults mean where a caller sees them
    {ok, 2.0} = py:call(math, sqrt, [4.0]),
    ok.

%% README "Failure semantics": the port program runs with core dumps disabled
%% and a raised oom_score_adj (500 by default), and without an address-space
%% cap unless max_memory_bytes is set: read from the running port's /proc
%% entries, with no pyport app env.
port_limits_as_applied(_Config) ->
    ok = pyport_ct_lib:stop_app(),
    [application:unset_env(pyport, K) || {K, _} <- application:get_all_env(pyport)],
    _ = pyport_ct_lib:start_app(),
    Proc = "/proc/" ++ integer_to_list(pyport_ct_lib:stat(os_pid)),
    {ok, Adj} = file:read_file(Proc ++ "/oom_score_adj"),
    ?assertEqual(<<"500">>, string:trim(Adj)),
    {ok, Limits} = file:read_file(Proc ++ "/limits"),
    Limit = fun(Name) ->
                    [Line] = [L || L <- binary:split(Limits, <<"\n">>, [global]),
                                   binary:match(L, Name) =:= {0, byte_size(Name)}],
                    string:lexemes(binary:part(Line, byte_size(Name), byte_size(Line) - byte_size(Name)), " ")
            end,
    ?assertMatch([<<"0">>, <<"0">> | _], Limit(<<"Max core file size">>)),
    ?assertMatch([<<"unlimited">>, <<"unlimited">> | _], Limit(<<"Max address space">>)),
    %% and the VM keeps its own score
    {ok, VmAdj} = file:read_file("/proc/" ++ os:getpid() ++ "/oom_score_adj"),
    ?assertNotEqual(<<"500">>, string:trim(VmAdj)).

%%--------------------------------------------------------------------

assert_documented_defaults() ->
    {ok, #{config := InEffect}} = py:stats(),
    Documented = readme_defaults(),
    ct:log("README defaults: ~p~nin effect: ~p", [Documented, InEffect]),
    %% Every setting py:stats() reports is documented, and every documented
    %% one is reported or pinned by another test.
    ?assertEqual([], maps:keys(InEffect) -- maps:keys(Documented)),
    ?assertEqual([], (maps:keys(Documented) -- maps:keys(InEffect)) -- ?PINNED_ELSEWHERE),
    Wrong = [{K, #{documented => V, in_effect => maps:get(K, InEffect)}}
             || {K, V0} <- maps:to_list(Documented), maps:is_key(K, InEffect),
                V <- [as_applied(K, V0)], maps:get(K, InEffect) =/= V],
    ?assertEqual([], Wrong).

%% A documented default as the port applies it, where the README names it in
%% other terms: python_log_level `vm' is the Python level number of the VM's
%% logger level when the port started (`notice' being Python's WARNING).
as_applied(python_log_level, vm) ->
    case maps:get(level, logger:get_primary_config()) of
        L when L =:= all; L =:= debug -> 10;
        info -> 20;
        L when L =:= notice; L =:= warning -> 30;
        error -> 40;
        none -> 60;
        _ -> 50
    end;
as_applied(_Key, Value) ->
    Value.

%% #{Key => Default} from the README's "Configuration" table: `N' an integer,
%% `word' an atom, `unset' undefined; other cells (paths, lists, strings) as
%% their text.
readme_defaults() ->
    Readme = filename:join(repo_dir(), "README.md"),
    {ok, Text} = file:read_file(Readme),
    [_, AfterHeading] = binary:split(Text, <<"\n## Configuration\n">>),
    [Section | _] = binary:split(AfterHeading, <<"\n## ">>),
    Rows = [Cells || Line <- binary:split(Section, <<"\n">>, [global]),
                     Cells <- [cells(Line)], length(Cells) >= 3],
    maps:from_list([{binary_to_atom(Key), default_value(Default)}
                    || [<<"`", KeyQ/binary>>, Default | _] <- Rows,
                       Key <- [binary:part(KeyQ, 0, byte_size(KeyQ) - 1)]]).

cells(<<"|", _/binary>> = Line) ->
    [string:trim(C) || C <- tl(binary:split(string:trim(Line), <<"|">>, [global])), C =/= <<>>];
cells(_) ->
    [].

default_value(<<"unset">>) -> undefined;
default_value(<<"`\"", Rest/binary>>) ->
    %% a quoted text: `"%(message)s"'
    binary:part(Rest, 0, byte_size(Rest) - 2);
default_value(<<"`", Rest/binary>>) ->
    V = binary:part(Rest, 0, byte_size(Rest) - 1),
    case re:run(V, "\\A[0-9]+\\z", [{capture, none}]) of
        match -> binary_to_integer(V);
        nomatch ->
            case re:run(V, "\\A[a-z_]+\\z", [{capture, none}]) of
                match -> binary_to_atom(V);
                nomatch -> V
            end
    end;
default_value(Other) ->
    Other.

repo_dir() ->
    filename:dirname(filename:dirname(code:which(pyport_server))).

restore_all_env(Saved) ->
    [application:unset_env(pyport, K) || {K, _} <- application:get_all_env(pyport)],
    [application:set_env(pyport, K, V) || {K, V} <- Saved],
    ok.
