%% @doc What the port program sends: frames decoded safely, the only atoms a
%% frame may name, and Python's output and log records handed to `logger'.
%%
%% Nothing the port sends becomes a new atom: frames are decoded with
%% `binary_to_term(B, [safe])', and only the names of Python's built-in
%% exceptions, listed by the port before any user code runs, are made atoms.
-module(pyport_frames).

-include_lib("kernel/include/logger.hrl").

-export([frame_id/1, make_exception_atoms/1, port_atoms/0, log_python/3,
         log_python_record/3, print_level/0]).

%% Most built-in exception names accepted from a ready frame, and their length.
-define(MAX_BUILTIN_NAMES, 512).
-define(MAX_BUILTIN_NAME, 64).

%% @doc The id of a reply frame `{Id, _, _}' read from its first bytes: small
%% integer, integer or small bignum, as the port writes them.
-spec frame_id(binary()) -> {ok, integer()} | error.
frame_id(<<131, 104, 3, 97, Id, _/binary>>) -> {ok, Id};
frame_id(<<131, 104, 3, 98, Id:32/signed, _/binary>>) -> {ok, Id};
frame_id(<<131, 104, 3, 110, N, 0, Digits:N/binary, _/binary>>) ->
    {ok, binary:decode_unsigned(Digits, little)};
frame_id(_) -> error.

%% @doc Makes atoms of the names of Python's built-in exception classes, which the
%% port lists once, before any user code runs, so that `{python, Type, ...}'
%% replies can carry them as atoms and still decode with `[safe]'. Bounded in
%% number and length, and only identifiers.
-spec make_exception_atoms(term()) -> ok.
make_exception_atoms(Names) when is_list(Names) ->
    lists:foreach(fun(N) ->
                          case is_exception_name(N) of
                              true -> _ = binary_to_atom(N, utf8), ok;
                              false -> ok
                          end
                  end, lists:sublist(Names, ?MAX_BUILTIN_NAMES));
make_exception_atoms(_) ->
    ok.

-spec is_exception_name(term()) -> boolean().
is_exception_name(N) when is_binary(N), byte_size(N) > 0, byte_size(N) =< ?MAX_BUILTIN_NAME ->
    lists:all(fun(C) -> (C >= $a andalso C =< $z) orelse (C >= $A andalso C =< $Z)
                            orelse (C >= $0 andalso C =< $9) orelse C =:= $_
              end, binary_to_list(N));
is_exception_name(_) ->
    false.

%% @doc Every atom that the port program may put in a frame. Frames are decoded
%% with `[safe]', which accepts existing atoms only: these literals make sure
%% they exist. (pytests/test_hang.py checks this list against src/.)
-spec port_atoms() -> [atom()].
port_atoms() ->
    [ok, error, undefined, true, false, nan, infinity, neg_infinity,
     python, python_object, '$pyport_shared_dict', '$pyport_bytes', found, not_found,
     cancelled, timeout, bad_request, bad_term, unsupported_term, nesting_too_deep,
     duplicate_key, not_callable, internal_error, reply_too_large, not_owner,
     shared_dict_destroyed, shared_dict_full, encode_failed,
     memory_used, memory_limit, max_dicts, lock_recoveries, shared_dict_memory,
     pyport_log, pyport_ready, pyport_heartbeat, info, warning, stdout, stderr, pyport,
     pyport_log_record, debug, critical, nil,
     '$pyport_date', '$pyport_time', '$pyport_datetime', '$pyport_timedelta',
     '$pyport_decimal', '$pyport_uuid',
     builtin_exceptions, os_pid, workers, max_workers, generation,
     dicts, dict_keys, dict_bytes, namespaces, busy_workers, queued, abandoned_workers, worker_reads,
     async_tasks,
     thread_homes, thread_queues,
     cached, pyport_sd_invalidate, badarg, shared_dict, python_decodes, decode_queued,
     decode_stuck, pyport_callback, pyport_callback_cancel, pyport_send,
     py_stream, data, done, streams, python_threads, pyport_stream_end, pyport_stream_send,
     %% py:stats(): the port's settings in effect (config)
     config, spare_after_ms, spare_idle_ms, max_frame_bytes, abandon_after_ms,
     max_abandoned_workers, gil_watchdog_ms, max_reply_bytes, thread_affinity, namespace,
     always, none, oom_score_adj, max_memory_bytes, log_lines_per_sec, none_as,
     sd_decode_workers, callback_timeout, max_threads, trace_latency, auto, never,
     python_log_level, python_log_format,
     %% py:stats() with the app env trace_latency
     latency_trace, stages, calls, route_ns, queue_ns, prepare_ns, python_ns, encode_ns,
     release_ns].

%% @doc Python's output lines (and the port's own messages) to `logger'.
-spec log_python(term(), term(), term()) -> ok.
log_python(Level0, Source, Msg) ->
    Level = case Level0 of
                info -> info;
                warning -> warning;
                error -> error;
                _ -> warning
            end,
    %% No `domain': the default handler drops events of unknown domains.
    Meta = #{pyport_source => Source},
    case Source of
        pyport -> ?LOG(Level, "pyport: ~ts", [Msg], Meta);
        stdout -> logger:log(print_level(), "python stdout: ~ts", [Msg], Meta);
        _ -> logger:log(Level, "python ~p: ~ts", [Source, Msg], Meta)
    end.

%% @doc A record of Python's `logging'. Logged with logger:log/4, not the ?LOG macro: the macro
%% would add this module's `mfa' and line, which say nothing about where Python logged.
%% `pid' is the Erlang process whose request made the record, when there was one.
-spec log_python_record(term(), {term(), term(), term(), term()}, term()) -> ok.
log_python_record(Level0, {Logger, Module, Line, Caller}, Msg)
  when is_binary(Logger), is_binary(Module), is_integer(Line), is_binary(Msg) ->
    Level = case lists:member(Level0, [debug, info, warning, error, critical]) of
                true -> Level0;
                false -> warning
            end,
    Meta0 = #{pyport_source => logging, python_logger => Logger,
              python_module => Module, python_line => Line},
    Meta = case is_pid(Caller) of
               true -> Meta0#{pid => Caller};
               false -> Meta0
           end,
    logger:log(Level, "python ~ts: ~ts", [Logger, Msg], Meta);
log_python_record(_Level, _Fields, _Msg) ->
    ok.

%% @doc The level of lines Python writes to stdout (`print'): app env `print_level'.
-spec print_level() -> logger:level().
print_level() ->
    Levels = [emergency, alert, critical, error, warning, notice, info, debug],
    case application:get_env(pyport, print_level) of
        {ok, L} when is_atom(L) ->
            case lists:member(L, Levels) of
                true -> L;
                false -> info
            end;
        _ -> info
    end.

