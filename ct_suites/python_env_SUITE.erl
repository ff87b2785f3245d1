%% @doc The app env `python' chooses the interpreter or virtualenv at run time: a
%% virtualenv's packages import, a Python moved to another path is used from there, and an
%% interpreter that cannot work (another version, no shared libpython) fails the
%% application's start with a reason that names the problem.
-module(python_env_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-include_lib("kernel/include/file.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2, end_per_testcase/2]).
-export([readme_section_matches/1]).
-export([virtualenv_packages_import/1, virtualenv_is_sys_executable/1,
         moved_python_is_used_from_its_new_place/1, other_version_is_refused/1,
         static_python_is_refused/1, missing_python_is_refused/1]).
-export([probe_output_at_the_cap_is_read/1, probe_output_past_the_cap_is_refused/1,
         endless_probe_output_is_refused/1, hung_probe_is_killed_with_its_children/1,
         probe_dies_with_the_vm/1]).

-define(SCRIPT_TIMEOUT_MS, 120000).

all() ->
    [readme_section_matches, virtualenv_packages_import, virtualenv_is_sys_executable,
     moved_python_is_used_from_its_new_place, other_version_is_refused,
     static_python_is_refused, missing_python_is_refused,
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
     {saved_env, pyport_ct_lib:save_env([python])} | Config].

end_per_suite(Config) ->
    ok = pyport_ct_lib:stop_app(),
    pyport_ct_lib:restore_env(?config(saved_env, Config)).

init_per_testcase(_Case, Config) ->
    ok = pyport_ct_lib:stop_app(),
    Config.

end_per_testcase(_Case, _Config) ->
    ok = pyport_ct_lib:stop_app(),
    application:unset_env(pyport, python_probe_timeout_ms),
    application:unset_env(pyport, python).

%% The README's session is what virtualenv_is_sys_executable/1 checks: sys.executable of
%% the virtualenv named by `python'; and it names every refusal this suite provokes.
readme_section_matches(_Config) ->
    Readme = filename:join(filename:dirname(filename:dirname(code:which(py))), "README.md"),
    {ok, Text} = file:read_file(Readme),
    [_, From] = binary:split(Text, <<"## Choose a Python or a virtualenv\n">>),
    [Section | _] = binary:split(From, <<"\n## ">>),
    [?assertNotEqual(nomatch, binary:match(Section, P), P)
     || P <- [<<"application:set_env(pyport, python, \"/tmp/pyport_venv\")">>,
              <<"{ok,<<\"/tmp/pyport_venv/bin/python3\">>}">>,
              <<"python_version_mismatch">>, <<"python_not_shared">>, <<"python_not_found">>]].

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
%% machine would have it installed elsewhere): the port loads that libpython and that
%% standard library.
moved_python_is_used_from_its_new_place(Config) ->
    Moved = filename:join(?config(priv_dir, Config), "moved_python"),
    {0, Out} = sh(["set -e; src=\"$1\"; dst=\"$2\"; mkdir -p \"$dst/bin\" \"$dst/lib\"; "
                   "cp -al \"$src\"/lib/libpython3* \"$dst/lib/\"; "
                   "cp -al \"$src\"/lib/python3.* \"$dst/lib/\"; "
                   "cp -al \"$(readlink -f \"$3\")\" \"$dst/bin/python3\"",
                   "sh", ?config(base_prefix, Config), Moved, ?config(base_python, Config)]),
    ct:log("~ts", [Out]),
    ok = application:set_env(pyport, python, filename:join([Moved, "bin", "python3"])),
    _ = pyport_ct_lib:start_app(),
    {ok, [Prefix, OsFile, Libs]} =
        py:eval(<<"[__import__('sys').base_prefix, __import__('os').__file__,\n"
                  " sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libpython' in l})]">>),
    ?assertEqual(Moved, binary_to_list(Prefix)),
    ?assert(lists:prefix(Moved ++ "/lib/", binary_to_list(OsFile))),
    ?assertMatch([_ | _], Libs),
    ?assertEqual([], [L || L <- Libs, not lists:prefix(Moved ++ "/lib/", binary_to_list(L))]).

%% A stub interpreter that says it is Python 3.99: the start fails, naming both versions.
other_version_is_refused(Config) ->
    Stub = stub_python(Config, "3.99", "1"),
    ok = application:set_env(pyport, python, Stub),
    {error, {Reason, _}} = application:start(pyport),
    Built = pyport_python:built_for(),
    ?assertMatch({python_version_mismatch, #{python := Stub, version := "3.99", built_for := Built}},
                 Reason),
    ?assertMatch([_, _ | _], Built).

%% An interpreter without a shared libpython cannot host the port: refused by name.
static_python_is_refused(Config) ->
    Stub = stub_python(Config, pyport_python:built_for(), "0"),
    ok = application:set_env(pyport, python, Stub),
    ?assertMatch({error, {{python_not_shared, Stub}, _}}, application:start(pyport)).

missing_python_is_refused(Config) ->
    Path = filename:join(?config(priv_dir, Config), "no_such_python"),
    ok = application:set_env(pyport, python, Path),
    ?assertMatch({error, {{python_not_found, _}, _}}, application:start(pyport)).

%%--------------------------------------------------------------------
%% The probe is bounded: output, time, and the life of the VM

%% A probe that writes exactly the cap (a valid answer padded with comment lines) is read
%% in full: the interpreter is judged on what it said (here: no shared libpython).
probe_output_at_the_cap_is_read(Config) ->
    Stub = padded_stub(Config, pyport_python:probe_max_output()),
    ok = application:set_env(pyport, python, Stub),
    ?assertMatch({error, {{python_not_shared, Stub}, _}}, application:start(pyport)).

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

%% A stub whose answer (no shared libpython) is padded with comment lines to Size bytes.
padded_stub(Config, Size) ->
    Answer = iolist_to_binary(["version=", pyport_python:built_for(), "\nlibdir=/usr/lib\n",
                               "soname=libpython.so\nshared=0\nprefix=/usr\nexecutable=/x\n"]),
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

%% A virtualenv of the build's Python with the wheel `pyport_wheel_demo' installed.
make_venv(Config) ->
    Dir = ?config(priv_dir, Config),
    Venv = filename:join(Dir, "venv"),
    case filelib:is_regular(filename:join([Venv, "bin", "python3"])) of
        true -> Venv;
        false ->
            Wheel = write_wheel(Dir),
            Base = ?config(base_python, Config),
            {0, Out} = sh(["set -e; \"$1\" -m venv \"$2\"; "
                           "\"$2/bin/python3\" -m pip install -q --no-index --no-cache-dir "
                           "--disable-pip-version-check \"$3\"",
                           "sh", Base, Venv, Wheel]),
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
stub_python(Config, Version, Shared) ->
    Stub = filename:join(?config(priv_dir, Config), "stub_python_" ++ Version ++ "_" ++ Shared),
    ok = file:write_file(Stub, ["#!/bin/sh\n",
                                "echo version=", Version, "\n",
                                "echo libdir=/usr/lib\n",
                                "echo soname=libpython", Version, ".so.1.0\n",
                                "echo shared=", Shared, "\n",
                                "echo prefix=/usr\n",
                                "echo executable=$0\n"]),
    ok = file:change_mode(Stub, 8#755),
    Stub.

sh(Args) ->
    run(os:find_executable("sh"), ["-c" | Args]).

run(Exe, Args) ->
    pyport_ct_lib:run_command(Exe, Args, [], ?SCRIPT_TIMEOUT_MS).
