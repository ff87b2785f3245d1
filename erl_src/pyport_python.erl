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
%%
%% The probe is bounded ({@link pyport_command}): its output is capped, it has a deadline
%% (app env `python_probe_timeout_ms'), and it runs in a process group of its own that is
%% killed on a timeout, past the cap, and when the VM exits.
-module(pyport_python).

-export([resolve/0, port_env/0, built_for/0, probe_max_output/0]).

-define(PROBE_TIMEOUT_MS, 30000).
-define(PROBE_MAX_OUTPUT, 65536).
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
%% `{python_probe_failed, Path, Detail}' (the probe exited with a status other than 0,
%% ran past `python_probe_timeout_ms' or wrote more than {@link probe_max_output/0} bytes:
%% `Detail' is `{Status | timeout | {output_over, Max}, Output}').
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

%% Runs the probe, bounded (see pyport_command): its output as #{Key => [Value]} in
%% output order.
-spec probe(string()) -> {ok, #{string() => [string()]}} | {error, term()}.
probe(Python) ->
    Opts = #{timeout_ms => probe_timeout(), max_output => ?PROBE_MAX_OUTPUT},
    case pyport_command:run(Python, ["-I", "-c", ?PROBE], Opts) of
        {ok, 0, Out} -> {ok, parse(Out)};
        {ok, Status, Out} -> {error, {python_probe_failed, Python, {Status, Out}}};
        {error, {timeout, Out}} -> {error, {python_probe_failed, Python, {timeout, Out}}};
        {error, {output_over, Max, Out}} ->
            {error, {python_probe_failed, Python, {{output_over, Max}, Out}}};
        {error, {spawn_failed, Reason}} -> {error, {python_probe_failed, Python, Reason}}
    end.

%% @doc The most output the interpreter probe may write (bytes): past it the probe is
%% killed and the interpreter refused with `{python_probe_failed, Path, {{output_over,
%% Max}, FirstMaxBytes}}'. A real interpreter writes well under a kilobyte.
-spec probe_max_output() -> pos_integer().
probe_max_output() ->
    ?PROBE_MAX_OUTPUT.

%% App env `python_probe_timeout_ms' (default 30 s): how long the probe may take.
-spec probe_timeout() -> pos_integer().
probe_timeout() ->
    case application:get_env(pyport, python_probe_timeout_ms) of
        {ok, T} when is_integer(T), T > 0 -> T;
        _ -> ?PROBE_TIMEOUT_MS
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
