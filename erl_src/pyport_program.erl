%% @doc The port program as an OS process: where its binary is, the command
%% line it gets from the application environment, and killing it with the
%% processes Python started (its process group).
-module(pyport_program).

-include_lib("kernel/include/logger.hrl").

-export([executable/0, args/1, kill/2, kill_group/2, is_group_leader/1, env_int/2]).

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
    ["--generation", integer_to_list(Gen),
     "--workers", integer_to_list(env_int(workers, 1)),
     "--max-workers", integer_to_list(env_int(max_workers, 16))]
        ++ watchdog_arg()
        ++ affinity_arg()
        ++ trace_arg()
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

%% What Python's `None' becomes: app env `none_as', `undefined' (default) or `nil'.
-spec none_as() -> undefined | nil.
none_as() ->
    case application:get_env(pyport, none_as) of
        {ok, nil} -> nil;
        _ -> undefined
    end.

%% Port program flags for the app env keys that are set to a non-negative integer.
-spec optional_args([{atom(), string()}]) -> [string()].
optional_args(Keys) ->
    lists:append([[Flag, integer_to_list(N)]
                  || {Key, Flag} <- Keys,
                     {ok, N} <- [application:get_env(pyport, Key)],
                     is_integer(N), N >= 0]).

%% --thread-affinity: which processes get a home thread in the port.
-spec affinity_arg() -> [string()].
affinity_arg() ->
    case application:get_env(pyport, thread_affinity) of
        {ok, Mode} when Mode =:= namespace; Mode =:= always; Mode =:= none ->
            ["--thread-affinity", atom_to_list(Mode)];
        {ok, Other} ->
            ?LOG_ERROR("pyport: ignoring thread_affinity ~tp (namespace | always | none)", [Other]),
            [];
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

