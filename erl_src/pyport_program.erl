%% @doc The port program as an OS process: where its binary is, the command
%% line it gets from the application environment, killing it with the
%% processes Python started (its process group), and the rest of its
%% configuration that the server reads from the application environment
%% (start-up code, start-up and heartbeat timeouts, restart back-off).
-module(pyport_program).

-include_lib("kernel/include/logger.hrl").

-export([executable/0, args/1, kill/2, kill_group/2, is_group_leader/1, env_int/2]).
-export([startup_config/0, startup_timeout/0, heartbeat_timeout/0, check_interval/1,
         restart_delay/1, python_log_level/0, python_log_format/0, restart_backoff_max/0]).

-define(FIRST_BACKOFF, 100).

%% @doc The path of the port program: app env `pyport_executable' if set, else
%% `priv/pyport' of the application (located from this module's `.beam' when
%% the code path does not name the application directory `pyport').
-spec executable() -> file:filename().
executable() ->
    case application:get_env(pyport, pyport_executable) of
        {ok, Path} when is_binary(Path) -> binary_to_list(Path);
        {ok, Path} when is_list(Path) -> Path;
        _ ->
            case code:priv_dir(pyport) of
                {error, bad_name} ->
                    Ebin = filename:dirname(code:which(pyport_server)),
                    filename:join([filename:dirname(Ebin), "priv", "pyport"]);
                Priv ->
                    filename:join(Priv, "pyport")
            end
    end.

%% @doc The port program's command line for port generation `Gen', from the
%% application environment (see docs/PROTOCOL.md, "Command line").
-spec args(non_neg_integer()) -> [string()].
args(Gen) ->
    ["--generation", integer_to_list(Gen)]
        ++ pyport_shm:args()
        ++ ["--workers", integer_to_list(env_int(workers, 1)),
            "--max-workers", integer_to_list(env_int(max_workers, 16))]
        ++ watchdog_arg()
        %% --thread-affinity: which processes get a home thread in the port.
        ++ choice_arg(thread_affinity, "--thread-affinity", [namespace, always, none])
        %% --worker-reads: whether idle workers read requests themselves (by default
        %% only where the port may use a single CPU, where it saves a hand-off per call).
        ++ choice_arg(worker_reads, "--worker-reads", [auto, always, never])
        ++ trace_arg()
        ++ ["--python-log-level", integer_to_list(python_log_level())]
        ++ case python_log_format() of
               undefined -> [];
               Format -> ["--python-log-format", binary_to_list(Format)]
           end
        ++ ["--none-as", atom_to_list(none_as()),
            "--node", atom_to_list(node()),
            "--otp-release", erlang:system_info(otp_release)]
        ++ optional_args([{spare_after_ms, "--spare-after-ms"},
                          {spare_idle_ms, "--spare-idle-ms"},
                          {abandon_after_ms, "--abandon-after-ms"},
                          {max_abandoned_workers, "--max-abandoned"},
                          {max_reply_bytes, "--max-reply-bytes"},
                          {oom_score_adj, "--oom-score-adj"},
                          {max_memory_bytes, "--max-memory-bytes"},
                          {max_frame_bytes, "--max-frame-bytes"},
                          {log_lines_per_sec, "--log-lines-per-sec"},
                          {sd_decode_workers, "--sd-decode-workers"},
                          {callback_timeout, "--callback-timeout-ms"},
                          {max_threads, "--max-threads"}]).

%% @doc SIGKILL for the port program `OsPid' and, if it leads one, its group.
-spec kill(non_neg_integer() | undefined, boolean()) -> ok.
kill(OsPid, GroupLeader) when is_integer(OsPid) ->
    kill_group(OsPid, GroupLeader),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid) ++ " 2>/dev/null"),
    ok;
kill(undefined, _GroupLeader) ->
    ok.

%% @doc SIGKILL for the process group of `OsPid', so that processes Python
%% started die with it; only when the program leads its own group.
-spec kill_group(non_neg_integer() | undefined, boolean()) -> ok.
kill_group(OsPid, true) when is_integer(OsPid) ->
    _ = os:cmd("kill -9 -" ++ integer_to_list(OsPid) ++ " 2>/dev/null"),
    ok;
kill_group(_OsPid, _GroupLeader) ->
    ok.

%% @doc Whether `OsPid' leads its own process group (it does under `open_port').
-spec is_group_leader(non_neg_integer() | undefined) -> boolean().
is_group_leader(OsPid) when is_integer(OsPid) ->
    case file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/stat") of
        {ok, Stat} ->
            %% "pid (comm) state ppid pgrp ...": comm may hold spaces and parens.
            case string:split(Stat, ")", trailing) of
                [_, Rest] ->
                    case string:lexemes(Rest, " ") of
                        [_State, _PPid, PGrp | _] ->
                            PGrp =:= integer_to_binary(OsPid);
                        _ -> false
                    end;
                _ -> false
            end;
        {error, _} ->
            false
    end;
is_group_leader(undefined) ->
    false.

%% @doc An integer app env value, or `Default'.
-spec env_int(atom(), integer()) -> integer().
env_int(Key, Default) ->
    case application:get_env(pyport, Key) of
        {ok, N} when is_integer(N) -> N;
        _ -> Default
    end.

%%====================================================================
%% Internal
%%====================================================================

%% @doc The level of Python's root logger (a Python level number): app env
%% `python_log_level' (`debug', `info', `warning', `error', `critical'), or by
%% default the `logger' primary level of the VM when the port starts, so that a
%% Python record is forwarded when the VM would show it (`notice' is Python's
%% WARNING, Python having no level between WARNING and INFO).
-spec python_log_level() -> non_neg_integer().
python_log_level() ->
    Level = case application:get_env(pyport, python_log_level, vm) of
                vm -> maps:get(level, logger:get_primary_config());
                L -> L
            end,
    case Level of
        all -> 10;
        debug -> 10;
        info -> 20;
        notice -> 30;
        warning -> 30;
        error -> 40;
        critical -> 50;
        alert -> 50;
        emergency -> 50;
        none -> 60;
        _ -> 30
    end.

%% @doc The format of the Python records forwarded to `logger' (app env
%% `python_log_format', a `logging.Formatter' format), or `undefined' for
%% `"%(message)s"'.
-spec python_log_format() -> binary() | undefined.
python_log_format() ->
    case application:get_env(pyport, python_log_format) of
        {ok, F} when is_binary(F); is_list(F) ->
            case unicode:characters_to_binary(F) of
                B when is_binary(B) -> B;
                _ -> undefined
            end;
        _ -> undefined
    end.

%% What Python's `None' becomes: app env `none_as', `undefined' (default), `nil'
%% (Elixir) or `none' (erlang_python); unset, `nil' when the app env `elixir' is `true'.
-spec none_as() -> undefined | nil | none.
none_as() ->
    case application:get_env(pyport, none_as) of
        {ok, nil} -> nil;
        {ok, none} -> none;
        {ok, _} -> undefined;
        undefined ->
            case application:get_env(pyport, elixir) of
                {ok, true} -> nil;
                _ -> undefined
            end
    end.

%% Port program flags for the app env keys that are set to a non-negative integer.
-spec optional_args([{atom(), string()}]) -> [string()].
optional_args(Keys) ->
    lists:append([[Flag, integer_to_list(N)]
                  || {Key, Flag} <- Keys,
                     {ok, N} <- [application:get_env(pyport, Key)],
                     is_integer(N), N >= 0]).

%% The port program flag for the app env key `Key' when it is set to one of the
%% atoms `Allowed'; any other value is logged and ignored (the port's default holds).
-spec choice_arg(atom(), string(), [atom(), ...]) -> [string()].
choice_arg(Key, Flag, Allowed) ->
    case application:get_env(pyport, Key) of
        {ok, Value} ->
            case lists:member(Value, Allowed) of
                true ->
                    [Flag, atom_to_list(Value)];
                false ->
                    Choices = lists:join(" | ", [atom_to_list(A) || A <- Allowed]),
                    ?LOG_ERROR("pyport: ignoring ~ts ~tp (~ts)", [Key, Value, Choices]),
                    []
            end;
        undefined ->
            []
    end.

%% --trace-latency: the port stamps every call for the benchmark's latency
%% breakdown (`py:stats()' then has `latency_trace'). Off by default.
-spec trace_arg() -> [string()].
trace_arg() ->
    case application:get_env(pyport, trace_latency) of
        {ok, true} -> ["--trace-latency", "1"];
        _ -> []
    end.

%% --gil-watchdog-ms: `infinity' turns the watchdog off (0 for the port).
-spec watchdog_arg() -> [string()].
watchdog_arg() ->
    case application:get_env(pyport, gil_watchdog_ms) of
        {ok, infinity} -> ["--gil-watchdog-ms", "0"];
        {ok, N} when is_integer(N), N > 0 -> ["--gil-watchdog-ms", integer_to_list(N)];
        _ -> []
    end.

%%====================================================================
%% Configuration read from the app env
%%====================================================================

%% @doc What the port runs before anything else: the app env `sys_path' (a list
%% of directories; a single directory string is accepted too) and
%% `startup_code', as binaries. Raises `{bad_config, Value}' for a value that is
%% not a string.
-spec startup_config() -> {[binary()], binary()}.
startup_config() ->
    {[to_binary(P) || P <- sys_path()],
     to_binary(application:get_env(pyport, startup_code, <<>>))}.

%% @doc The wait before the `N'th restart of a port that keeps dying before it
%% is ready: 100 ms, 200 ms, ... up to the app env `restart_backoff_max'.
-spec restart_delay(pos_integer()) -> integer().
restart_delay(N) ->
    min(restart_backoff_max(), ?FIRST_BACKOFF bsl min(N - 1, 20)).

%% @doc The cap of the restart back-off: the app env `restart_backoff_max' (ms).
-spec restart_backoff_max() -> integer().
restart_backoff_max() ->
    env_int(restart_backoff_max, 5000).

%% @doc The app env `heartbeat_timeout_ms': how long the port may stay silent.
-spec heartbeat_timeout() -> pos_integer() | infinity.
heartbeat_timeout() ->
    case application:get_env(pyport, heartbeat_timeout_ms) of
        {ok, infinity} -> infinity;
        {ok, N} when is_integer(N), N > 0 -> N;
        _ -> 5000
    end.

%% @doc How often liveness is checked for a heartbeat timeout.
-spec check_interval(pos_integer()) -> pos_integer().
check_interval(Timeout) ->
    max(10, Timeout div 2).

%% @doc The app env `startup_timeout_ms': how long start-up code may run.
-spec startup_timeout() -> timeout().
startup_timeout() ->
    case application:get_env(pyport, startup_timeout_ms) of
        {ok, T} when T =:= infinity; is_integer(T), T >= 0 -> T;
        _ -> 60000
    end.

-spec sys_path() -> list().
sys_path() ->
    case application:get_env(pyport, sys_path) of
        {ok, []} -> [];
        {ok, L} when is_list(L) ->
            case io_lib:printable_unicode_list(L) of
                true -> [L];
                false -> L
            end;
        {ok, B} when is_binary(B) -> [B];
        _ -> []
    end.

-spec to_binary(term()) -> binary().
to_binary(B) when is_binary(B) -> B;
to_binary(A) when is_atom(A) -> atom_to_binary(A, utf8);
to_binary(L) when is_list(L) ->
    try unicode:characters_to_binary(L) of
        B when is_binary(B) -> B;
        _ -> erlang:error({bad_config, L})
    catch
        error:badarg -> erlang:error({bad_config, L})
    end;
to_binary(Other) ->
    erlang:error({bad_config, Other}).
