%% @doc The app env `python' chooses the interpreter or virtualenv at run time: one build
%% runs every CPython 3.11+ on the machine (each runs a battery of calls), a virtualenv's
%% packages import, a Python moved to another path is used from there, and an interpreter
%% that cannot work (too old, not CPython) fails the application's start with a reason that
%% names the problem. The probe that asks is bounded. `python_requirements' builds declared
%% environments (offline, from wheels the test writes; cached, locked, failures named), and
%% py:restart/0 switches Python in a running VM.
-module(python_env_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-include_lib("kernel/include/file.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2, end_per_testcase/2]).
-export([readme_section_matches/1]).
-export([virtualenv_packages_import/1, virtualenv_is_sys_executable/1,
         moved_python_is_used_from_its_new_place/1, older_version_is_refused/1,
         other_implementation_is_refused/1, missing_python_is_refused/1,
         every_installed_python_runs/1, app_relative_paths/1]).
-export([requirements_env_is_built_and_used/1, cached_env_is_reused/1,
         changed_file_builds_a_new_env/1, pyproject_dependencies_are_installed/1,
         pip_installer_builds_the_env/1, missing_package_fails_the_start/1,
         concurrent_builds_build_once/1, make_python_env_builds_ahead_of_time/1]).
-export([restart_switches_python/1, restart_answers_callers_in_flight/1,
         restart_with_a_bad_python_keeps_the_port/1]).
-export([probe_output_at_the_cap_is_read/1, probe_output_past_the_cap_is_refused/1,
         endless_probe_output_is_refused/1, hung_probe_is_killed_with_its_children/1,
         probe_dies_with_the_vm/1]).

-define(SCRIPT_TIMEOUT_MS, 120000).
-define(ENV_KEYS, [python, python_probe_timeout_ms, python_requirements, python_wheels,
                   python_env_dir, python_installer]).

all() ->
    [readme_section_matches, virtualenv_packages_import, virtualenv_is_sys_executable,
     moved_python_is_used_from_its_new_place, older_version_is_refused,
     other_implementation_is_refused, missing_python_is_refused,
     every_installed_python_runs, app_relative_paths,
     requirements_env_is_built_and_used, cached_env_is_reused,
     changed_file_builds_a_new_env, pyproject_dependencies_are_installed,
     pip_installer_builds_the_env, missing_package_fails_the_start,
     concurrent_builds_build_once, make_python_env_builds_ahead_of_time,
     restart_switches_python, restart_answers_callers_in_flight,
     restart_with_a_bad_python_keeps_the_port,
     probe_output_at_the_cap_is_read, probe_output_past_the_cap_is_refused,
     endless_probe_output_is_refused, hung_probe_is_killed_with_its_children,
     probe_dies_with_the_vm].

%% The interpreter the port program was built with (what it runs without the setting).
init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    {ok, Exe} = py:eval(<<"__import__('sys').executable">>),
    {ok, Prefix} = py:eval(<<"__import__('sys').base_prefix">>),
    ok = pyport_ct_lib:stop_app(),
    [{base_python, binary_to_list(Exe)}, {base_prefix, binary_to_list(Prefix)},
     {saved_env, pyport_ct_lib:save_env(?ENV_KEYS)} | Config].

end_per_suite(Config) ->
    ok = pyport_ct_lib:stop_app(),
    pyport_ct_lib:restore_env(?config(saved_env, Config)).

init_per_testcase(_Case, Config) ->
    ok = pyport_ct_lib:stop_app(),
    Config.

end_per_testcase(_Case, _Config) ->
    ok = pyport_ct_lib:stop_app(),
    [application:unset_env(pyport, K) || K <- ?ENV_KEYS],
    ok.

%% The README's session is what virtualenv_is_sys_executable/1 checks: sys.executable of
%% the virtualenv named by `python'; and it names every refusal this suite provokes.
readme_section_matches(_Config) ->
    Readme = filename:join(filename:dirname(filename:dirname(code:which(py))), "README.md"),
    {ok, Text} = file:read_file(Readme),
    [_, From] = binary:split(Text, <<"## Choose a Python or a virtualenv\n">>),
    [Section | _] = binary:split(From, <<"\n## ">>),
    [?assertNotEqual(nomatch, binary:match(Section, P), P)
     || P <- [<<"application:set_env(pyport, python, \"/tmp/pyport_venv\")">>,
              <<"{ok,<<\"/tmp/pyport_venv/bin/python3\">>}">>, <<"py:restart()">>,
              <<"python_version_mismatch">>, <<"python_unsupported">>, <<"python_not_found">>,
              <<"python_env_failed">>, <<"python_requirements">>, <<"python_wheels">>,
              <<"make python-env">>]].

%% A virtualenv made by the test, with a pure-Python package installed from a wheel the
%% test writes itself (no network): set `python' to the virtualenv, and the package imports.
virtualenv_packages_import(Config) ->
    Venv = make_venv(Config),
    ok = application:set_env(pyport, python, Venv),
    _ = pyport_ct_lib:start_app(),
    ?assertEqual({ok, <<"hello from a wheel">>}, py:call(pyport_wheel_demo, greet, [])).

%% ... and sys.executable is the virtualenv's interpreter (subprocess, multiprocessing).
virtualenv_is_sys_executable(Config) ->
    Venv = make_venv(Config),
    ok = application:set_env(pyport, python, list_to_binary(Venv)),
    _ = pyport_ct_lib:start_app(),
    {ok, Exe} = py:eval(<<"__import__('sys').executable">>),
    ?assertEqual(filename:join([Venv, "bin", "python3"]), binary_to_list(Exe)).

%% The same Python at another path (its files linked into a new folder, as a release
%% machine would have it installed elsewhere): the port runs it as it runs itself there, its
%% prefix and standard library from the new folder, the libpython it loads by itself.
moved_python_is_used_from_its_new_place(Config) ->
    Moved = filename:join(?config(priv_dir, Config), "moved_python"),
    {0, Out} = sh(["set -e; src=\"$1\"; dst=\"$2\"; mkdir -p \"$dst/bin\" \"$dst/lib\"; "
                   "cp -al \"$src\"/lib/libpython3* \"$dst/lib/\"; "
                   "cp -al \"$src\"/lib/python3.* \"$dst/lib/\"; "
                   "cp -al \"$(readlink -f \"$3\")\" \"$dst/bin/python3\"",
                   "sh", ?config(base_prefix, Config), Moved, ?config(base_python, Config)]),
    ct:log("~ts", [Out]),
    Python = filename:join([Moved, "bin", "python3"]),
    Libs = <<"sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libpython' in l})">>,
    {0, Own} = run(Python, ["-c", "print(" ++ binary_to_list(Libs) ++ ")"]),
    ok = application:set_env(pyport, python, Python),
    _ = pyport_ct_lib:start_app(),
    {ok, [Prefix, OsFile, PortLibs]} =
        py:eval(<<"[__import__('sys').base_prefix, __import__('os').__file__, ", Libs/binary, "]">>),
    ?assertEqual(Moved, binary_to_list(Prefix)),
    ?assert(lists:prefix(Moved ++ "/lib/", binary_to_list(OsFile))),
    ?assertEqual(string:trim(Own),
                 lists:flatten(["[", lists:join(", ", ["'" ++ binary_to_list(L) ++ "'" || L <- PortLibs]), "]"])).

%% A stub interpreter that says it is CPython 3.10: the start fails, naming the version and
%% what is supported.
older_version_is_refused(Config) ->
    Stub = stub_python(Config, "3.10", "cpython"),
    ok = application:set_env(pyport, python, Stub),
    {error, {Reason, _}} = application:start(pyport),
    ?assertEqual({python_version_mismatch,
                  #{python => Stub, version => "3.10", supported => "3.11 or later"}}, Reason).

%% PyPy 3.11 cannot load a CPython extension: refused by name.
other_implementation_is_refused(Config) ->
    Stub = stub_python(Config, "3.11", "pypy"),
    ok = application:set_env(pyport, python, Stub),
    ?assertMatch({error, {{python_unsupported, Stub, "pyport runs in CPython; this is pypy"}, _}},
                 application:start(pyport)).

missing_python_is_refused(Config) ->
    Path = filename:join(?config(priv_dir, Config), "no_such_python"),
    ok = application:set_env(pyport, python, Path),
    ?assertMatch({error, {{python_not_found, _}, _}}, application:start(pyport)).

%%--------------------------------------------------------------------
%% One build, every CPython 3.11+

%% Every CPython 3.11 or later found here (pyenv's versions, /usr/bin/python3.1x) runs the
%% same build: calls, conversions both ways, rich types, SharedDict from both sides, an
%% async def, a callback into Erlang, a stream, an exception, a virtualenv of that version.
%% The versions that ran are the case's comment; the build's own is always among them.
every_installed_python_runs(Config) ->
    Pythons = installed_pythons(),
    ct:log("interpreters: ~p", [Pythons]),
    Ran = [run_battery(Config, Py, Version) || {Py, Version} <- Pythons],
    {ok, BuildVersion} = version_of(?config(base_python, Config)),
    ?assert(lists:member(BuildVersion, [V || {_, V} <- Ran])),
    Comment = lists:join(", ", [V ++ " (" ++ P ++ ")" || {P, V} <- Ran]),
    {comment, lists:flatten(["ran on ", Comment])}.

run_battery(Config, Python, Version) ->
    ok = pyport_ct_lib:stop_app(),
    ok = application:set_env(pyport, python, Python),
    _ = pyport_ct_lib:start_app(),
    Self = self(),
    {ok, Info} = py:eval(<<"['%d.%d' % __import__('sys').version_info[:2], __import__('sys').executable]">>),
    ?assertEqual([list_to_binary(Version), list_to_binary(Python)], Info),
    ?assertEqual({ok, [3, 2, 1]}, py:call(builtins, sorted, [[1, 3, 2]], #{reverse => true})),
    Term = #{<<"a">> => [1, -2, 2.5, <<"t">>, {1, <<"x">>}, true, undefined], <<"big">> => 1 bsl 80},
    ?assertEqual({ok, Term}, py:eval(<<"x">>, #{x => Term})),
    ok = py:exec(<<"import datetime, decimal\ndef shift(d):\n    return d + datetime.timedelta(days=1)\n">>),
    {ok, Date} = py:call('__main__', shift, [{'$pyport_date', {2024, 2, 28}}]),
    ?assertEqual({'$pyport_date', {2024, 2, 29}}, Date),
    ?assertEqual({ok, <<"2024-02-29">>}, py:call(builtins, str, [Date])),
    ?assertMatch({error, {python, 'ZeroDivisionError', _, _}}, py:eval(<<"1/0">>)),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, #{<<"v">> => 1}),
    ?assertEqual({ok, 1}, py:eval(<<"__import__('erlang').SharedDict(h)['k']['v']">>, #{h => SD})),
    ok = py:exec(<<"__import__('erlang').SharedDict(h)['p'] = [1, 2]">>, #{h => SD}),
    ?assertEqual([1, 2], py:shared_dict_get(SD, <<"p">>)),
    ok = py:exec(<<"async def answer():\n    import asyncio\n    await asyncio.sleep(0)\n    return 42\n">>),
    ?assertEqual({ok, 42}, py:call('__main__', answer, [])),
    ok = py:register_function(battery_double, fun([X]) -> 2 * X end),
    ?assertEqual({ok, 42}, py:eval(<<"__import__('erlang').call('battery_double', 21)">>)),
    ok = py:unregister_function(battery_double),
    ok = py:exec(<<"def count(n):\n    yield from range(n)\n">>),
    {ok, Ref} = py:stream_start('__main__', count, [3]),
    ?assertEqual([0, 1, 2], stream_items(Ref, [])),
    Venv = make_venv(Config, Python, "venv_" ++ Version ++ "_" ++ integer_to_list(erlang:phash2(Python))),
    ok = pyport_ct_lib:stop_app(),
    ok = application:set_env(pyport, python, Venv),
    _ = pyport_ct_lib:start_app(),
    ?assertEqual({ok, <<"hello from a wheel">>}, py:call(pyport_wheel_demo, greet, [])),
    Self ! {ran, Python},
    {Python, Version}.

stream_items(Ref, Acc) ->
    receive
        {py_stream, Ref, {data, V}} -> ok = py:stream_ack(Ref), stream_items(Ref, [V | Acc]);
        {py_stream, Ref, done} -> lists:reverse(Acc);
        {py_stream, Ref, {error, R}} -> ct:fail({stream_failed, R})
    after 10000 -> ct:fail(stream_timeout)
    end.

%% CPython 3.11+ interpreters of this machine, one per distinct program, with their version.
installed_pythons() ->
    Root = case os:getenv("PYENV_ROOT") of
               false -> filename:join(os:getenv("HOME"), ".pyenv");
               R -> R
           end,
    Candidates = filelib:wildcard(filename:join(Root, "versions/*/bin/python3"))
        ++ filelib:wildcard("/usr/bin/python3.1[1-9]")
        ++ filelib:wildcard("/usr/local/bin/python3.1[1-9]"),
    Found = [{P, V, Real} || P <- Candidates, {ok, V} <- [version_of(P)],
                             Real <- [string:trim(os:cmd("readlink -f '" ++ P ++ "'"))]],
    %% One per real program (pyenv's python3 is a link to python3.X).
    maps:values(maps:from_list([{Real, {P, V}} || {P, V, Real} <- lists:reverse(Found)])).

%% "3.X" of a CPython 3.11+ with the GIL, else error.
version_of(Python) ->
    case pyport_python:probe(Python) of
        {ok, #{"implementation" := "cpython", "free_threaded" := "0", "version" := V}} ->
            case lists:map(fun list_to_integer/1, string:split(V, ".")) of
                [3, Minor] when Minor >= 11 -> {ok, V};
                _ -> error
            end;
        _ -> error
    end.

%% `{App, RelativePath}' settings are inside that application's directory, as a release
%% installs it; a plain path is taken as it is.
app_relative_paths(_Config) ->
    ?assertEqual(filename:join(code:lib_dir(stdlib), "ebin"),
                 pyport_python:app_path({stdlib, "ebin"})),
    ?assertEqual("rel/x", pyport_python:app_path(<<"rel/x">>)),
    ok = application:set_env(pyport, python, {no_such_app_here, "bin/python3"}),
    ?assertMatch({error, {{bad_config, {unknown_application, no_such_app_here}}, _}},
                 application:start(pyport)).

%%--------------------------------------------------------------------
%% Declared environments (python_requirements), offline from wheels the test writes

%% requirements.txt naming the test's wheel, `python_wheels' its folder: the port runs in a
%% virtualenv built for it, in `python_env_dir', and the package imports.
requirements_env_is_built_and_used(Config) ->
    Envs = declare_env(Config, "envs_built", "requirements.txt", "pyport-wheel-demo==1.0\n"),
    _ = pyport_ct_lib:start_app(),
    ?assertEqual({ok, <<"hello from a wheel">>}, py:call(pyport_wheel_demo, greet, [])),
    {ok, Prefix} = py:eval(<<"__import__('sys').prefix">>),
    ?assert(lists:prefix(Envs, binary_to_list(Prefix))),
    ?assertMatch([_], published(Envs)).

%% A second start with the same file finds the environment: nothing is built, the same
%% interpreter runs. (Its time is printed: the start takes a fraction of a second.)
cached_env_is_reused(Config) ->
    Envs = declare_env(Config, "envs_cached", "requirements.txt", "pyport-wheel-demo==1.0\n"),
    _ = pyport_ct_lib:start_app(),
    {ok, First} = py:eval(<<"__import__('sys').executable">>),
    Dirs = filelib:wildcard(filename:join(Envs, "*")),
    ok = pyport_ct_lib:stop_app(),
    T0 = erlang:monotonic_time(microsecond),
    ok = application:start(pyport),
    Us = erlang:monotonic_time(microsecond) - T0,
    ct:pal("python_env: application:start/1 with a cached environment took ~.1f ms", [Us / 1000]),
    ok = pyport_ct_lib:wait_ready(),
    ?assertEqual({ok, First}, py:eval(<<"__import__('sys').executable">>)),
    ?assertEqual(Dirs, filelib:wildcard(filename:join(Envs, "*"))).

%% Another file's contents: another environment, the first one left as it was.
changed_file_builds_a_new_env(Config) ->
    Envs = declare_env(Config, "envs_changed", "requirements.txt", "pyport-wheel-demo==1.0\n"),
    _ = pyport_ct_lib:start_app(),
    [Old] = published(Envs),
    ok = pyport_ct_lib:stop_app(),
    ok = file:write_file(req_path(Config, "envs_changed", "requirements.txt"),
                         "pyport-wheel-demo>=1.0\n"),
    _ = pyport_ct_lib:start_app(),
    ?assertEqual({ok, <<"hello from a wheel">>}, py:call(pyport_wheel_demo, greet, [])),
    New = published(Envs),
    ?assertEqual(2, length(New)),
    ?assert(lists:member(Old, New)).

%% pyproject.toml: its [project] dependencies are installed.
pyproject_dependencies_are_installed(Config) ->
    _ = declare_env(Config, "envs_pyproject", "pyproject.toml",
                    "[project]\nname = \"app\"\nversion = \"0.1\"\n"
                    "dependencies = [\"pyport-wheel-demo\"]\n"),
    _ = pyport_ct_lib:start_app(),
    ?assertEqual({ok, <<"hello from a wheel">>}, py:call(pyport_wheel_demo, greet, [])).

%% Without uv (python_installer pip): venv and pip build the same environment.
pip_installer_builds_the_env(Config) ->
    _ = declare_env(Config, "envs_pip", "requirements.txt", "pyport-wheel-demo\n"),
    ok = application:set_env(pyport, python_installer, pip),
    Logs = capture(fun() -> _ = pyport_ct_lib:start_app() end),
    ?assertEqual({ok, <<"hello from a wheel">>}, py:call(pyport_wheel_demo, greet, [])),
    ?assert(lists:any(fun(L) -> pyport_ct_lib:has(L, <<"with venv">>) end, Logs), Logs),
    ?assert(lists:any(fun(L) -> pyport_ct_lib:has(L, <<"-m pip install">>) end, Logs), Logs).

%% A package that is not there (offline): the start fails with python_env_failed, naming
%% the command and what it said; nothing is published, no build folder is left; each step
%% was logged as it started, the packages named.
missing_package_fails_the_start(Config) ->
    Envs = declare_env(Config, "envs_missing", "requirements.txt",
                       "pyport-wheel-demo\nno-such-package-pyport==9.9\n"),
    Logs = capture(fun() ->
                           {error, {{python_env_failed, Output}, _}} = application:start(pyport),
                           put(output, Output)
                   end),
    Output = get(output),
    ct:log("~ts", [Output]),
    ?assert(pyport_ct_lib:has(Output, <<"exit status 1">>), Output),
    ?assert(pyport_ct_lib:has(Output, <<" pip install ">>), Output),
    ?assert(pyport_ct_lib:has(Output, <<"no-such-package-pyport">>), Output),
    ?assertEqual([], published(Envs)),
    ?assertEqual([], [D || D <- filelib:wildcard(filename:join(Envs, "*")),
                           filelib:is_dir(D)]),
    ?assert(lists:any(fun(L) -> pyport_ct_lib:has(L, <<"installing 2 package(s): pyport-wheel-demo, no-such-package-pyport==9.9">>) end, Logs), Logs).

%% Four builds of one environment at once (as four VMs starting together): one builds, the
%% others wait for its lock and use what it published; one environment exists after.
concurrent_builds_build_once(Config) ->
    Envs = declare_env(Config, "envs_concurrent", "requirements.txt", "pyport-wheel-demo\n"),
    Base = ?config(base_python, Config),
    {ok, Facts} = pyport_python:probe(Base),
    Req = req_path(Config, "envs_concurrent", "requirements.txt"),
    Self = self(),
    Pids = [spawn_link(fun() -> Self ! {built, self(), pyport_env:ensure(Base, Facts, Req)} end)
            || _ <- lists:seq(1, 4)],
    Results = pyport_ct_lib:collect(built, Pids),
    ?assertMatch([{ok, _}, {ok, _}, {ok, _}, {ok, _}], Results),
    ?assertEqual(1, length(lists:usort(Results))),
    ?assertEqual(1, length(published(Envs))),
    ?assertEqual(1, length([D || D <- filelib:wildcard(filename:join(Envs, "*")),
                                 filelib:is_dir(D), not is_link(D)])).

%% `make python-env' builds the environment ahead of time (as for a release): the
%% application's start then builds nothing.
make_python_env_builds_ahead_of_time(Config) ->
    Envs = declare_env(Config, "envs_make", "requirements.txt", "pyport-wheel-demo\n"),
    Checkout = filename:dirname(filename:dirname(code:which(py))),
    {ok, Wheels} = application:get_env(pyport, python_wheels),
    {Status, Out} = pyport_ct_lib:run_command(
                      os:find_executable("make"),
                      ["-s", "-C", Checkout, "python-env",
                       "PYTHON_REQUIREMENTS=" ++ req_path(Config, "envs_make", "requirements.txt"),
                       "PYTHON_ENV_DIR=" ++ Envs, "PYTHON_WHEELS=" ++ Wheels],
                      [], ?SCRIPT_TIMEOUT_MS),
    ct:log("make python-env: ~ts", [Out]),
    ?assertEqual(0, Status),
    [Built] = published(Envs),
    Logs = capture(fun() -> _ = pyport_ct_lib:start_app() end),
    ?assertEqual({ok, <<"hello from a wheel">>}, py:call(pyport_wheel_demo, greet, [])),
    ?assertEqual([Built], published(Envs)),
    ?assertNot(lists:any(fun(L) -> pyport_ct_lib:has(L, <<"building">>) end, Logs)).

%% Writes the file, sets python_requirements, python_wheels (the test's wheel) and
%% python_env_dir (returned).
declare_env(Config, Name, File, Text) ->
    Dir = filename:join(?config(priv_dir, Config), Name),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    ok = file:write_file(filename:join(Dir, File), Text),
    Wheels = filename:join(?config(priv_dir, Config), "wheels"),
    ok = filelib:ensure_dir(filename:join(Wheels, "x")),
    _ = write_wheel(Wheels),
    Envs = filename:join(Dir, "envs"),
    ok = application:set_env(pyport, python_requirements, filename:join(Dir, File)),
    ok = application:set_env(pyport, python_wheels, Wheels),
    ok = application:set_env(pyport, python_env_dir, Envs),
    Envs.

req_path(Config, Name, File) ->
    filename:join([?config(priv_dir, Config), Name, File]).

%% The published environments (symlinks) of an env folder.
published(Envs) ->
    lists:sort([P || P <- filelib:wildcard(filename:join(Envs, "*")), is_link(P)]).

is_link(P) ->
    case file:read_link_info(P) of
        {ok, #file_info{type = symlink}} -> true;
        _ -> false
    end.

%% Log texts of everything logged while Fun ran.
capture(Fun) ->
    ok = pyport_ct_lib:capture_logs(python_env_capture),
    try
        Fun(),
        pyport_ct_lib:logged()
    after
        logger:remove_handler(python_env_capture)
    end.

%%--------------------------------------------------------------------
%% py:restart/0

%% In a running VM: set `python' to a virtualenv, py:restart(), and the port runs there
%% (the README's shell recipe).
restart_switches_python(Config) ->
    _ = pyport_ct_lib:start_app(),
    ?assertMatch({error, {python, 'ModuleNotFoundError', _, _}},
                 py:call(pyport_wheel_demo, greet, [])),
    Gen = pyport_ct_lib:stat(generation),
    Venv = make_venv(Config),
    ok = application:set_env(pyport, python, Venv),
    ?assertEqual(ok, py:restart()),
    ?assertEqual({ok, <<"hello from a wheel">>}, py:call(pyport_wheel_demo, greet, [])),
    ?assert(pyport_ct_lib:stat(generation) > Gen),
    %% and back
    ok = application:unset_env(pyport, python),
    ok = py:restart(),
    ?assertMatch({error, {python, 'ModuleNotFoundError', _, _}},
                 py:call(pyport_wheel_demo, greet, [])).

%% A call in flight when the port restarts is answered as a crash answers it; SharedDicts
%% live on (they belong to the pool, not to a port).
restart_answers_callers_in_flight(_Config) ->
    _ = pyport_ct_lib:start_app(),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, 0),
    Self = self(),
    Caller = spawn_link(fun() -> Self ! {slow, self(), py:eval(<<"__import__('time').sleep(30)">>)} end),
    pyport_ct_lib:wait_until(fun() -> pyport_ct_lib:stat(pending) >= 1 end, 10000, call_in_flight),
    ok = py:restart(),
    ?assertEqual([{error, {pyport_exit, restart}}], pyport_ct_lib:collect(slow, [Caller])),
    ok = py:shared_dict_set(SD, <<"k">>, 1),
    ?assertEqual(1, py:shared_dict_get(SD, <<"k">>)),
    ?assertEqual({ok, 2}, py:eval(<<"1 + 1">>)).

%% A python setting that cannot work: py:restart() says why and the port keeps running.
restart_with_a_bad_python_keeps_the_port(Config) ->
    _ = pyport_ct_lib:start_app(),
    ok = py:exec(<<"kept = 1">>),
    Gen = pyport_ct_lib:stat(generation),
    Missing = filename:join(?config(priv_dir, Config), "no_python_here"),
    ok = application:set_env(pyport, python, Missing),
    ?assertEqual({error, {python_not_found, Missing}}, py:restart()),
    ?assertEqual({ok, 1}, py:eval(<<"kept">>)),
    ?assertEqual(Gen, pyport_ct_lib:stat(generation)),
    ok = application:unset_env(pyport, python),
    ?assertEqual({error, {pyport_unavailable, not_started}},
                 begin ok = pyport_ct_lib:stop_app(), py:restart() end).

%%--------------------------------------------------------------------
%% The probe is bounded: output, time, and the life of the VM

%% A probe that writes exactly the cap (a valid answer padded with comment lines) is read
%% in full: the interpreter is judged on what it said (here: too old).
probe_output_at_the_cap_is_read(Config) ->
    Stub = padded_stub(Config, pyport_python:probe_max_output()),
    ok = application:set_env(pyport, python, Stub),
    ?assertMatch({error, {{python_version_mismatch, #{python := Stub, version := "3.10"}}, _}},
                 application:start(pyport)).

%% One byte more and the probe is refused, the cap named, the output kept up to the cap.
probe_output_past_the_cap_is_refused(Config) ->
    Max = pyport_python:probe_max_output(),
    Stub = padded_stub(Config, Max + 1),
    ok = application:set_env(pyport, python, Stub),
    {error, {{python_probe_failed, Stub, {{output_over, Max}, Out}}, _}} = application:start(pyport),
    ?assertEqual(Max, byte_size(Out)).

%% A "python" that prints for ever (it took the VM to 12 GB in 100 s when all of it was
%% kept): refused as soon as it passes the cap, and killed.
endless_probe_output_is_refused(Config) ->
    PidFile = filename:join(?config(priv_dir, Config), "endless.pid"),
    Stub = write_stub(Config, "endless_python",
                      ["echo $$ > '", PidFile, "'\n", "exec yes 'version=3.11 and more'\n"]),
    ok = application:set_env(pyport, python, Stub),
    {error, {{python_probe_failed, Stub, {{output_over, Max}, Out}}, _}} = application:start(pyport),
    ?assertEqual({Max, Max}, {pyport_python:probe_max_output(), byte_size(Out)}),
    pyport_ct_lib:wait_until(fun() -> pyport_ct_lib:all_gone(read_pids(PidFile)) end,
                             10000, endless_probe_gone).

%% A "python" that hangs, with a child of its own: refused after
%% `python_probe_timeout_ms', and neither it nor its child lives on.
hung_probe_is_killed_with_its_children(Config) ->
    PidFile = filename:join(?config(priv_dir, Config), "hung.pids"),
    Stub = hanging_stub(Config, PidFile),
    ok = application:set_env(pyport, python, Stub),
    ok = application:set_env(pyport, python_probe_timeout_ms, 1000),
    ?assertMatch({error, {{python_probe_failed, Stub, {timeout, _}}, _}}, application:start(pyport)),
    Pids = read_pids(PidFile),
    ?assertMatch([_, _], Pids),
    pyport_ct_lib:wait_until(fun() -> pyport_ct_lib:all_gone(Pids) end, 10000,
                             hung_probe_and_child_gone).

%% The VM dies (SIGKILL) while the probe hangs: the probe and its child die with it
%% (they used to live on with ppid 1).
probe_dies_with_the_vm(Config) ->
    PidFile = filename:join(?config(priv_dir, Config), "vm_exit.pids"),
    Stub = hanging_stub(Config, PidFile),
    Ebin = filename:dirname(code:which(py)),
    {ok, Peer, Node} = peer:start(#{name => peer:random_name(probe), args => ["-pa", Ebin]}),
    try
        VmPid = list_to_integer(erpc:call(Node, os, getpid, [])),
        ok = erpc:call(Node, application, load, [pyport]),
        ok = erpc:call(Node, application, set_env, [pyport, python, Stub]),
        ok = erpc:call(Node, application, set_env, [pyport, python_probe_timeout_ms, 600000]),
        ok = erpc:cast(Node, application, start, [pyport]),
        Pids = pyport_ct_lib:wait_until(fun() ->
                                                case read_pids(PidFile) of
                                                    [_, _] = Ps -> {true, Ps};
                                                    Other -> Other
                                                end
                                        end, 10000, probe_started),
        ?assertEqual([], [P || P <- Pids, not pyport_ct_lib:os_alive(P)]),
        _ = os:cmd("kill -KILL " ++ integer_to_list(VmPid)),
        pyport_ct_lib:wait_until(fun() -> pyport_ct_lib:all_gone(Pids) end, 10000,
                                 probe_gone_with_the_vm)
    after
        catch peer:stop(Peer)
    end.

%% A stub that writes its own pid and its child's to PidFile, then waits for ever.
hanging_stub(Config, PidFile) ->
    write_stub(Config, "hanging_python",
               ["sleep 600 &\n", "echo $$ $! > '", PidFile, ".tmp'\n",
                "mv '", PidFile, ".tmp' '", PidFile, "'\n", "exec sleep 600\n"]).

%% A stub whose answer (CPython 3.10) is padded with comment lines to Size bytes.
padded_stub(Config, Size) ->
    Answer = <<"version=3.10\nimplementation=cpython\nprefix=/usr\nexecutable=/x\n">>,
    Pad = Size - byte_size(Answer),
    Padding = binary:copy(<<"#", (binary:copy(<<"p">>, 98))/binary, "\n">>, Pad div 100),
    Tail = binary:copy(<<"p">>, Pad rem 100),
    Data = filename:join(?config(priv_dir, Config), "answer_" ++ integer_to_list(Size)),
    ok = file:write_file(Data, [Answer, Padding, Tail]),
    {ok, #file_info{size = Size}} = file:read_file_info(Data),
    write_stub(Config, "padded_python_" ++ integer_to_list(Size), ["exec cat '", Data, "'\n"]).

write_stub(Config, Name, Body) ->
    Stub = filename:join(?config(priv_dir, Config), Name),
    ok = file:write_file(Stub, ["#!/bin/sh\n" | Body]),
    ok = file:change_mode(Stub, 8#755),
    Stub.

read_pids(File) ->
    case file:read_file(File) of
        {ok, Bin} -> [binary_to_integer(P) || P <- string:lexemes(string:trim(Bin), " ")];
        {error, E} -> E
    end.

%%--------------------------------------------------------------------

%% A virtualenv of the build's Python (or of Python, in folder Name) with the wheel
%% `pyport_wheel_demo' installed.
make_venv(Config) ->
    make_venv(Config, ?config(base_python, Config), "venv").

make_venv(Config, Python, Name) ->
    Dir = ?config(priv_dir, Config),
    Venv = filename:join(Dir, Name),
    case filelib:is_regular(filename:join([Venv, "bin", "python3"])) of
        true -> Venv;
        false ->
            Wheel = write_wheel(Dir),
            {0, Out} = sh(["set -e; \"$1\" -m venv --without-pip \"$2\"; "
                           "\"$4\" -m pip --python \"$2/bin/python3\" install -q --no-index "
                           "--no-cache-dir --disable-pip-version-check \"$3\"",
                           "sh", Python, Venv, Wheel, ?config(base_python, Config)]),
            ct:log("venv: ~ts", [Out]),
            Venv
    end.

%% A minimal pure-Python wheel written with zipfile (by the build's Python).
write_wheel(Dir) ->
    Wheel = filename:join(Dir, "pyport_wheel_demo-1.0-py3-none-any.whl"),
    Code = "import sys, zipfile, hashlib, base64\n"
           "files = {\n"
           "  'pyport_wheel_demo/__init__.py': 'def greet():\\n    return \"hello from a wheel\"\\n',\n"
           "  'pyport_wheel_demo-1.0.dist-info/METADATA': 'Metadata-Version: 2.1\\nName: pyport-wheel-demo\\nVersion: 1.0\\n',\n"
           "  'pyport_wheel_demo-1.0.dist-info/WHEEL': 'Wheel-Version: 1.0\\nGenerator: pyport-test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n',\n"
           "}\n"
           "def h(b):\n"
           "    return 'sha256=' + base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()\n"
           "rec = ''.join('%s,%s,%d\\n' % (n, h(c.encode()), len(c.encode())) for n, c in files.items())\n"
           "rec += 'pyport_wheel_demo-1.0.dist-info/RECORD,,\\n'\n"
           "with zipfile.ZipFile(sys.argv[1], 'w') as z:\n"
           "    for n, c in files.items():\n"
           "        z.writestr(n, c)\n"
           "    z.writestr('pyport_wheel_demo-1.0.dist-info/RECORD', rec)\n",
    {0, _} = run(os:find_executable("python3"), ["-c", Code, Wheel]),
    Wheel.

%% A shell script that answers the probe like an interpreter of Version would.
stub_python(Config, Version, Implementation) ->
    Stub = filename:join(?config(priv_dir, Config), "stub_python_" ++ Version ++ "_" ++ Implementation),
    ok = file:write_file(Stub, ["#!/bin/sh\n",
                                "echo version=", Version, "\n",
                                "echo implementation=", Implementation, "\n",
                                "echo free_threaded=0\n",
                                "echo prefix=/usr\n",
                                "echo executable=$0\n"]),
    ok = file:change_mode(Stub, 8#755),
    Stub.

sh(Args) ->
    run(os:find_executable("sh"), ["-c" | Args]).

run(Exe, Args) ->
    pyport_ct_lib:run_command(Exe, Args, [], ?SCRIPT_TIMEOUT_MS).
