%% @doc The Python interpreter or virtualenv the port runs in (app env `python').
%%
%% The port program is a Python interpreter running pyport's extension module (see
%% `priv/pyport'): built for the stable ABI of CPython 3.11, it serves any CPython 3.11 or
%% later, and a virtualenv's interpreter as that virtualenv. {@link resolve/0} picks the
%% interpreter, before any port starts: the app env `python' (an interpreter, or a virtualenv
%% directory; a path, or `{App, RelativePath}' inside an application's directory), else the
%% one pyport was built with (`priv/pyport.python'). With `python_requirements' set, the
%% port runs in a virtualenv built for that file from the interpreter (see {@link
%% pyport_env}). It asks the interpreter, once, for its version and kind, and refuses one
%% that cannot work with a reason that says why. {@link port_env/0} is then the port's
%% environment: `PYPORT_PYTHON', the interpreter the launcher starts.
%%
%% The probe is bounded ({@link pyport_command}): its output is capped, it has a deadline
%% (app env `python_probe_timeout_ms'), and it runs in a process group of its own that is
%% killed on a timeout, past the cap, and when the VM exits.
-module(pyport_python).

-export([resolve/0, port_env/0, default_python/0, probe_max_output/0, app_path/1,
         interpreter/1, probe/1]).

-export_type([facts/0]).

-include_lib("kernel/include/file.hrl").

-define(PROBE_TIMEOUT_MS, 30000).
-define(PROBE_MAX_OUTPUT, 65536).
-define(KEY, {?MODULE, env}).
-define(MIN_VERSION, {3, 11}).

%% Run by the interpreter: one `key=value' line each.
-define(PROBE,
        "import sys, sysconfig\n"
        "print('version=%d.%d' % sys.version_info[:2])\n"
        "print('full_version=%d.%d.%d' % sys.version_info[:3])\n"
        "print('implementation=' + sys.implementation.name)\n"
        "print('free_threaded=%s' % (sysconfig.get_config_var('Py_GIL_DISABLED') or 0))\n"
        "print('prefix=' + sys.prefix)\n"
        "print('executable=' + sys.executable)\n").

-type facts() :: #{string() => string()}.

%% @doc Chooses the port's interpreter and remembers the port's environment for it. Called
%% when the application starts (and by {@link py:restart/0}), so that a wrong setting fails
%% the start with a reason that says what is wrong:
%% `{python_version_mismatch, #{python := Path, version := "3.10", supported := "3.11 or later"}}',
%% `{python_unsupported, Path, Why}' (not CPython, or a free-threaded build),
%% `{python_not_found, Path}', `{python_env_failed, Output}' (see {@link pyport_env}), and
%% `{python_probe_failed, Path, Detail}' (the probe exited with a status other than 0,
%% ran past `python_probe_timeout_ms' or wrote more than {@link probe_max_output/0} bytes:
%% `Detail' is `{Status | timeout | {output_over, Max}, Output}').
-spec resolve() -> ok | {error, term()}.
resolve() ->
    try
        resolve(base())
    catch
        error:{bad_config, What} -> {error, {bad_config, What}}
    end.

-spec base() -> string().
base() ->
    case application:get_env(pyport, python) of
        {ok, Setting} -> interpreter(app_path(Setting));
        undefined -> default_python()
    end.

-spec resolve(string()) -> ok | {error, term()}.
resolve(Base) ->
    Result = case check(Base) of
                 {ok, Facts} ->
                     case application:get_env(pyport, python_requirements) of
                         {ok, Req} -> pyport_env:ensure(Base, Facts, app_path(Req));
                         undefined -> {ok, Base}
                     end;
                 {error, _} = E ->
                     E
             end,
    case Result of
        {ok, Python} ->
            persistent_term:put(?KEY, [{"PYPORT_PYTHON", Python}]),
            ok;
        {error, _} = Error ->
            Error
    end.

%% @doc The environment of the port program, as found by the last {@link resolve/0}.
-spec port_env() -> [{string(), string()}].
port_env() ->
    persistent_term:get(?KEY, []).

%% @doc The interpreter pyport was built with (`priv/pyport.python', written by `make
%% port'), which the port runs without the app env `python'.
-spec default_python() -> string().
default_python() ->
    File = filename:join(filename:dirname(pyport_server:executable()), "pyport.python"),
    case file:read_file(File) of
        {ok, Bin} -> string:trim(unicode:characters_to_list(Bin));
        {error, _} -> "python3"
    end.

%% @doc A path setting: `{App, RelativePath}' is inside the directory of application `App'
%% (`code:lib_dir/1', so that a release finds it where it is installed); a string or binary
%% is a path as it is (a relative one from the VM's working directory).
-spec app_path(string() | binary() | {atom(), string() | binary()}) -> string().
app_path({App, Rel}) when is_atom(App) ->
    case code:lib_dir(App) of
        {error, bad_name} -> erlang:error({bad_config, {unknown_application, App}});
        Dir -> filename:join(Dir, to_list(Rel))
    end;
app_path(Path) ->
    to_list(Path).

%%--------------------------------------------------------------------

-spec to_list(string() | binary()) -> string().
to_list(B) when is_binary(B) -> unicode:characters_to_list(B);
to_list(L) when is_list(L) -> L.

%% @doc A virtualenv directory names its bin/python3; anything else is the interpreter itself.
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

-spec check(string()) -> {ok, facts()} | {error, term()}.
check(Python) ->
    case is_program(Python) of
        false ->
            {error, {python_not_found, Python}};
        true ->
            %% The answer of an interpreter that passed is kept for this VM while its program
            %% file stays the same (size, time, inode): restarts do not ask again.
            Stamp = case file:read_file_info(Python) of
                        {ok, #file_info{size = S, mtime = M, inode = I}} -> {S, M, I};
                        {error, _} -> none
                    end,
            case persistent_term:get({?MODULE, checked, Python}, undefined) of
                {Stamp, Facts} when Stamp =/= none ->
                    {ok, Facts};
                _ ->
                    case probe(Python) of
                        {ok, Facts0} ->
                            case verdict(Python, Facts0) of
                                {ok, Facts} ->
                                    persistent_term:put({?MODULE, checked, Python}, {Stamp, Facts}),
                                    {ok, Facts};
                                Refused ->
                                    Refused
                            end;
                        {error, _} = E ->
                            E
                    end
            end
    end.

%% A path, or a bare name found on PATH (the launcher would find it there too).
-spec is_program(string()) -> boolean().
is_program(Python) ->
    case lists:member($/, Python) of
        true -> filelib:is_regular(Python);
        false -> os:find_executable(Python) =/= false
    end.

-spec verdict(string(), facts()) -> {ok, facts()} | {error, term()}.
verdict(Python, Facts) ->
    Version = maps:get("version", Facts, ""),
    Impl = maps:get("implementation", Facts, ""),
    if
        Impl =/= "cpython" ->
            {error, {python_unsupported, Python,
                     "pyport runs in CPython; this is " ++ Impl}};
        true ->
            case parse_version(Version) of
                {ok, V} when V >= ?MIN_VERSION ->
                    case maps:get("free_threaded", Facts, "0") of
                        "0" -> {ok, Facts};
                        _ -> {error, {python_unsupported, Python,
                                      "a free-threaded build: pyport needs CPython with the GIL"}}
                    end;
                _ ->
                    {error, {python_version_mismatch,
                             #{python => Python, version => Version,
                               supported => "3.11 or later"}}}
            end
    end.

-spec parse_version(string()) -> {ok, {integer(), integer()}} | error.
parse_version(Version) ->
    case string:split(Version, ".") of
        [Ma, Mi] ->
            try {ok, {list_to_integer(Ma), list_to_integer(Mi)}}
            catch error:badarg -> error
            end;
        _ -> error
    end.

%% @doc Asks the interpreter `Python' for its version and kind (bounded: see
%% pyport_command), as `#{Key => Value}'.
-spec probe(string()) -> {ok, facts()} | {error, term()}.
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

-spec parse(binary()) -> facts().
parse(Out) ->
    Lines = string:split(unicode:characters_to_list(Out), "\n", all),
    maps:from_list([{K, V} || Line <- Lines, [K, V] <- [string:split(Line, "=")]]).
