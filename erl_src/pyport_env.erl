%% @doc Declared Python environments: the app env `python_requirements' names a
%% `requirements.txt' or a `pyproject.toml' (its `[project]' dependencies), and the port runs
%% in a virtualenv built for it from the base interpreter.
%%
%% The work is done by `priv/pyport_env.py', run by the base interpreter through {@link
%% pyport_command} (bounded by `python_env_timeout_ms', killed with the VM): it finds the
%% virtualenv in the cache folder (app env `python_env_dir', default the user's cache folder,
%% `~/.cache/pyport/python_envs') under a name made of the interpreter's version and a hash
%% of the interpreter, the file and the wheels; or builds it, under a lock, with `uv' when it
%% is found (PATH, or next to the base interpreter: `make bootstrap' installs it) or else
%% `python -m venv' and `pip' (app env `python_installer': `auto', `uv', `pip'), and publishes
%% it by an atomic rename. With `python_wheels' (a folder) it installs from there only, with
%% no index (offline). Each step is logged as it starts and ends, with the installer's lines.
-module(pyport_env).

-include_lib("kernel/include/logger.hrl").

-export([ensure/3, env_dir/0]).

-define(DEFAULT_TIMEOUT_MS, 1800000).
%% What is kept of the builder's output for an error (its tail), not a limit on the build.
-define(KEEP_OUTPUT, 65536).
-define(LAST_LINES, 20).

%% @doc The interpreter of the virtualenv that `Requirements' declares, built from `Base'
%% (whose probe said `Facts') if it is not in the cache yet. `{error, {python_env_failed,
%% Output}}' when it cannot be built: `Output' names the command that failed and its last
%% lines; nothing half-built is used.
-spec ensure(string(), pyport_python:facts(), string()) -> {ok, string()} | {error, term()}.
ensure(Base, Facts, Requirements) ->
    try args(Requirements) of
        Args ->
            ?LOG_INFO("pyport: Python environment for ~ts (Python ~ts, ~ts)",
                      [Requirements, maps:get("full_version", Facts, "?"), Base]),
            T0 = erlang:monotonic_time(millisecond),
            Opts = #{timeout_ms => timeout(), keep_output => ?KEEP_OUTPUT,
                     on_line => fun log_line/1},
            Result = pyport_command:run(Base, ["-I", script() | Args], Opts),
            answer(Result, Base, Args, erlang:monotonic_time(millisecond) - T0)
    catch
        error:{bad_config, What} -> {error, {python_env_failed, bad_config_text(What)}}
    end.

%% @doc The folder of the cached environments: app env `python_env_dir' (a path, or
%% `{App, RelativePath}'), else `python_envs' in the user's cache folder.
-spec env_dir() -> string().
env_dir() ->
    case application:get_env(pyport, python_env_dir) of
        {ok, Dir} -> pyport_python:app_path(Dir);
        undefined -> filename:join(filename:basedir(user_cache, "pyport"), "python_envs")
    end.

%%--------------------------------------------------------------------

-spec args(string()) -> [string()].
args(Requirements) ->
    Wheels = case application:get_env(pyport, python_wheels) of
                 {ok, W} -> ["--wheels", filename:absname(pyport_python:app_path(W))];
                 undefined -> []
             end,
    Installer = case application:get_env(pyport, python_installer, auto) of
                    I when I =:= auto; I =:= uv; I =:= pip -> atom_to_list(I);
                    Other -> erlang:error({bad_config, {python_installer, Other}})
                end,
    Uv = case os:getenv("PYPORT_UV") of
             false -> uv_next_to(pyport_python:default_python());
             Path -> ["--uv", Path]
         end,
    ["--requirements", filename:absname(Requirements), "--envs", filename:absname(env_dir()),
     "--installer", Installer] ++ Wheels ++ Uv.

%% uv installed into the build's interpreter by `make bootstrap' (pip puts it next to it).
-spec uv_next_to(string()) -> [string()].
uv_next_to(Python) ->
    Uv = filename:join(filename:dirname(Python), "uv"),
    case filelib:is_regular(Uv) of
        true -> ["--uv", Uv];
        false -> []
    end.

-spec answer(pyport_command:result(), string(), [string()], integer()) ->
          {ok, string()} | {error, term()}.
answer({ok, 0, Out}, _Base, _Args, Ms) ->
    case [P || L <- binary:split(Out, <<"\n">>, [global]),
               <<"pyport-env-python: ", P/binary>> <- [L]] of
        [Python | _] ->
            ?LOG_INFO("pyport: Python environment ready in ~b ms: ~ts", [Ms, Python]),
            {ok, unicode:characters_to_list(Python)};
        [] ->
            failed("the environment builder named no interpreter", Out)
    end;
answer({ok, Status, Out}, _Base, _Args, _Ms) ->
    failed(io_lib:format("the environment build failed (exit status ~b)", [Status]), Out);
answer({error, {timeout, Out}}, _Base, _Args, Ms) ->
    failed(io_lib:format("the environment build ran past python_env_timeout_ms (~b ms) "
                         "and was killed", [Ms]), Out);
answer({error, {spawn_failed, Reason}}, Base, _Args, _Ms) ->
    failed(io_lib:format("cannot run ~ts: ~tp", [Base, Reason]), <<>>).

%% The reason names what failed and the last lines of what was said (the failing command is
%% among them: the builder prints each command before it runs it).
-spec failed(iodata(), binary()) -> {error, {python_env_failed, binary()}}.
failed(What, Out) ->
    Text = iolist_to_binary([What, ":\n", pyport_command:last_lines(Out, ?LAST_LINES)]),
    ?LOG_ERROR("pyport: no Python environment: ~ts", [Text]),
    {error, {python_env_failed, Text}}.

-spec bad_config_text(term()) -> binary().
bad_config_text(What) ->
    unicode:characters_to_binary(io_lib:format("bad configuration: ~tp", [What])).

-spec log_line(binary()) -> ok.
log_line(<<"pyport-env-python: ", _/binary>>) ->
    ok;
log_line(<<"pyport-env: ", Msg/binary>>) ->
    ?LOG_NOTICE("pyport: Python environment: ~ts", [Msg]);
log_line(Line) ->
    ?LOG_INFO("pyport: Python environment: ~ts", [Line]).

-spec script() -> string().
script() ->
    filename:join(filename:dirname(pyport_server:executable()), "pyport_env.py").

-spec timeout() -> pos_integer().
timeout() ->
    case application:get_env(pyport, python_env_timeout_ms) of
        {ok, T} when is_integer(T), T > 0 -> T;
        _ -> ?DEFAULT_TIMEOUT_MS
    end.
