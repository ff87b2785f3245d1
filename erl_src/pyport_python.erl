%% @doc The Python interpreter or virtualenv the port program uses (app env `python').
%%
%% The port program is linked against libpython and records, at build time, where that
%% Python lives. When the app env `python' names an interpreter (a path to `python3') or a
%% virtualenv directory, {@link resolve/0} asks that interpreter, before any port starts, for
%% its version, library folder, prefix and site-packages, and refuses it with a clear reason
%% when it cannot work: another major.minor version than the binary was built for, or no
%% shared libpython. {@link port_env/0} is then the environment that makes the dynamic
%% loader and CPython use it: `LD_LIBRARY_PATH' (its libpython), `PYPORT_PYTHONHOME' (its
%% prefix), `PYPORT_PYTHON' (its executable, also `sys.executable') and
%% `PYPORT_SITE_PACKAGES' (site directories added with `site.addsitedir', `.pth' files
%% included). Without the setting the port uses the Python it was built with.
-module(pyport_python).

-export([resolve/0, port_env/0, built_for/0]).

-define(PROBE_TIMEOUT_MS, 30000).
-define(KEY, {?MODULE, env}).

%% Run by the interpreter: one `key=value' line each (site: one line per directory).
%% LIBDIR is recorded when Python is built; for an installation moved since, it is
%% rebased onto the prefix the interpreter finds itself in.
-define(PROBE,
        "import os, sys, site, sysconfig\n"
        "v = sysconfig.get_config_var\n"
        "libdir, built = v('LIBDIR') or '', v('prefix') or ''\n"
        "if built and libdir.startswith(built) and built != sys.base_prefix:\n"
        "    libdir = sys.base_prefix + libdir[len(built):]\n"
        "print('version=%d.%d' % sys.version_info[:2])\n"
        "print('libdir=' + libdir)\n"
        "print('soname=' + (v('INSTSONAME') or ''))\n"
        "print('shared=%s' % (v('Py_ENABLE_SHARED') or 0))\n"
        "print('prefix=' + sys.base_prefix)\n"
        "print('executable=' + sys.executable)\n"
        "for d in (site.getsitepackages() if sys.prefix != sys.base_prefix else []):\n"
        "    print('site=' + d)\n").

-type env() :: [{string(), string() | false}].

%% @doc Checks the interpreter named by the app env `python' and remembers the port's
%% environment for it. `ok' when the setting is absent. Called when the application starts,
%% so that a wrong setting fails the start with a reason that says what is wrong:
%% `{python_version_mismatch, #{python := Path, version := "3.12", built_for := "3.11"}}',
%% `{python_not_shared, Path}' (no shared libpython), `{python_not_found, Path}',
%% `{python_probe_failed, Path, Output}'.
-spec resolve() -> ok | {error, term()}.
resolve() ->
    case application:get_env(pyport, python) of
        undefined ->
            persistent_term:put(?KEY, []),
            ok;
        {ok, Setting} ->
            case check(interpreter(to_list(Setting))) of
                {ok, Env} ->
                    persistent_term:put(?KEY, Env),
                    ok;
                {error, _} = E ->
                    E
            end
    end.

%% @doc The environment of the port program, as found by the last {@link resolve/0}.
-spec port_env() -> env().
port_env() ->
    persistent_term:get(?KEY, []).

%% @doc The Python major.minor version the port program was built for (`"3.11"'), read
%% from `priv/pyport.python-version' written by `make port'; `unknown' without it.
-spec built_for() -> string() | unknown.
built_for() ->
    File = filename:join(filename:dirname(pyport_server:executable()), "pyport.python-version"),
    case file:read_file(File) of
        {ok, Bin} -> string:trim(binary_to_list(Bin));
        {error, _} -> unknown
    end.

%%--------------------------------------------------------------------

-spec to_list(string() | binary()) -> string().
to_list(B) when is_binary(B) -> unicode:characters_to_list(B);
to_list(L) when is_list(L) -> L.

%% A virtualenv directory names its bin/python3; anything else is the interpreter itself.
-spec interpreter(string()) -> string().
interpreter(Path) ->
    case filelib:is_dir(Path) of
        true ->
            Candidates = [filename:join([Path, "bin", N]) || N <- ["python3", "python"]],
            case [C || C <- Candidates, filelib:is_regular(C)] of
                [First | _] -> First;
                [] -> filename:join([Path, "bin", "python3"])
            end;
        false ->
            Path
    end.

-spec check(string()) -> {ok, env()} | {error, term()}.
check(Python) ->
    case filelib:is_regular(Python) of
        false ->
            {error, {python_not_found, Python}};
        true ->
            case probe(Python) of
                {ok, Facts} -> verdict(Python, Facts);
                {error, _} = E -> E
            end
    end.

-spec verdict(string(), #{string() => [string()]}) -> {ok, env()} | {error, term()}.
verdict(Python, Facts) ->
    One = fun(K) -> case maps:get(K, Facts, []) of [V | _] -> V; [] -> "" end end,
    Version = One("version"),
    Built = built_for(),
    Shared = One("shared") =:= "1" andalso One("soname") =/= ""
        andalso filelib:is_regular(filename:join(One("libdir"), One("soname"))),
    if
        Built =/= unknown, Version =/= Built ->
            {error, {python_version_mismatch,
                     #{python => Python, version => Version, built_for => Built}}};
        not Shared ->
            {error, {python_not_shared, Python}};
        true ->
            {ok, env(One, maps:get("site", Facts, []))}
    end.

-spec env(fun((string()) -> string()), [string()]) -> env().
env(One, Sites) ->
    LibDir = One("libdir"),
    LdPath = case os:getenv("LD_LIBRARY_PATH") of
                 false -> LibDir;
                 "" -> LibDir;
                 Old -> LibDir ++ ":" ++ Old
             end,
    [{"LD_LIBRARY_PATH", LdPath},
     {"PYPORT_PYTHONHOME", One("prefix")},
     {"PYPORT_PYTHON", One("executable")},
     {"PYPORT_SITE_PACKAGES", string:join(Sites, ":")}].

%% Runs the probe with a deadline; its output as #{Key => [Value]} in output order.
-spec probe(string()) -> {ok, #{string() => [string()]}} | {error, term()}.
probe(Python) ->
    try open_port({spawn_executable, Python},
                  [{args, ["-I", "-c", ?PROBE]}, exit_status, stderr_to_stdout, binary, hide]) of
        Port ->
            Deadline = erlang:monotonic_time(millisecond) + ?PROBE_TIMEOUT_MS,
            case collect(Port, Deadline, []) of
                {0, Out} -> {ok, parse(Out)};
                {Status, Out} -> {error, {python_probe_failed, Python, {Status, Out}}}
            end
    catch
        error:Reason -> {error, {python_probe_failed, Python, Reason}}
    end.

-spec collect(port(), integer(), [binary()]) -> {integer() | timeout, binary()}.
collect(Port, Deadline, Acc) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {Port, {data, D}} -> collect(Port, Deadline, [D | Acc]);
        {Port, {exit_status, S}} -> {S, iolist_to_binary(lists:reverse(Acc))}
    after Left ->
        catch port_close(Port),
        {timeout, iolist_to_binary(lists:reverse(Acc))}
    end.

-spec parse(binary()) -> #{string() => [string()]}.
parse(Out) ->
    Lines = string:split(unicode:characters_to_list(Out), "\n", all),
    lists:foldr(fun(Line, Acc) ->
                        case string:split(Line, "=") of
                            [K, V] -> maps:update_with(K, fun(Vs) -> [V | Vs] end, [V], Acc);
                            _ -> Acc
                        end
                end, #{}, Lines).
