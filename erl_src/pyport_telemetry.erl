%% @private
%% @doc Telemetry events and process labels: what observability tools see of pyport.
%%
%% When the `telemetry' library is present (its module loads when the application
%% starts; `telemetry' is an optional application of pyport, so a release or Mix
%% project that has it starts it first), pyport emits with `telemetry:execute/3':
%% <ul>
%% <li>spans `[pyport, call | eval | exec, start | stop | exception]' around
%% `py:call/3,4,5', `py:eval/1,2,3', `py:exec/1,2,3' (and so the Elixir `Pyport'
%% functions): measurements `monotonic_time' (start),
%% `duration' and `monotonic_time' (stop, exception), in native time units;
%% metadata `module' and `function' (call) or `code' (its first line, eval and
%% exec), `caller', `telemetry_span_context', and at stop `result' (`ok' |
%% `error'), `error' (the reason) and `port_os_pid'; at exception `kind',
%% `reason', `stacktrace';</li>
%% <li>`[pyport, shared_dict, operation]' for one Erlang-side SharedDict operation
%% in every `telemetry_shared_dict_sample' (app env, default 100) of each kind:
%% measurements `duration', `monotonic_time' and `count' (the operations the event
%% stands for), metadata `op', `sample_rate', `caller', `result' (`ok' | `exception');</li>
%% <li>`[pyport, port, start]' and `[pyport, port, exit]' when a port program
%% starts or exits (a crash, or its replacement by `py:restart()', reason
%% `restart'): measurement `system_time' (and `pending', the requests it fails),
%% metadata `index', `os_pid', `generation' (and `reason').</li>
%% </ul>
%% Without `telemetry' every hook is one `persistent_term' read and nothing is
%% emitted. An exception from a handler never reaches the caller.
-module(pyport_telemetry).

-export([init/1, enabled/0, span/3, shared_dict/2, port_started/3, port_exit/5, label/1,
         sample_rate/0]).

%% An atom key: persistent_term hashes it in half the time of a tuple (this is read per call).
-define(KEY, pyport_telemetry_state).
-define(SD_OPS, [get, set, del, keys, new, destroy, update_counter, compare_and_swap, give_away]).
-define(DEFAULT_SAMPLE, 100).
%% The longest `code' metadata kept: the first line, cut here.
-define(CODE_META_BYTES, 200).

-type state() :: off | {on, OsPids :: atomics:atomics_ref(), SdCounts :: atomics:atomics_ref(),
                        SampleRate :: pos_integer(), Ports :: non_neg_integer()}.
-type sd_op() :: get | set | del | keys | new | destroy | update_counter | compare_and_swap
               | give_away.
-export_type([sd_op/0]).

%% @doc Looks for `telemetry' (at the start of the application, with `Ports'
%% ports in the pool) and reads the app env `telemetry_shared_dict_sample'.
-spec init(non_neg_integer()) -> ok.
init(Ports) ->
    State = case code:ensure_loaded(telemetry) =:= {module, telemetry}
                andalso erlang:function_exported(telemetry, execute, 3) of
                true -> {on, atomics:new(max(1, Ports), []),
                         atomics:new(length(?SD_OPS), []), sample_rate(), Ports};
                false -> off
            end,
    persistent_term:put(?KEY, State).

%% @doc The app env `telemetry_shared_dict_sample' as it applies (default 100).
-spec sample_rate() -> pos_integer().
sample_rate() ->
    case application:get_env(pyport, telemetry_shared_dict_sample, ?DEFAULT_SAMPLE) of
        N when is_integer(N), N >= 1 -> N;
        _ -> ?DEFAULT_SAMPLE
    end.

%% @doc Whether events are emitted.
-spec enabled() -> boolean().
enabled() ->
    persistent_term:get(?KEY, off) =/= off.

%% @doc Runs `Fun' (the body of `py:call', `eval' or `exec') inside a span
%% `[pyport, Kind, ...]'. `What' is `{Module, Function}' for a call, the code for
%% eval and exec, as the caller gave them.
-spec span(call | eval | exec, term(), fun(() -> Result)) -> Result.
span(Kind, What, Fun) ->
    case persistent_term:get(?KEY, off) of
        off -> Fun();
        On -> run_span(On, Kind, What, Fun)
    end.

-spec run_span(state(), call | eval | exec, term(), fun(() -> Result)) -> Result.
run_span(On, Kind, What, Fun) ->
    Meta = meta(Kind, What, #{caller => self(), telemetry_span_context => make_ref()}),
    Start = erlang:monotonic_time(),
    %% No system_time: a clock read costs about 90 ns here, and handlers that want wall
    %% time can read it (the budget is 3 % of a call with no handler attached).
    execute([pyport, Kind, start], #{monotonic_time => Start}, Meta),
    try Fun() of
        Result ->
            Stop = erlang:monotonic_time(),
            execute([pyport, Kind, stop], #{duration => Stop - Start, monotonic_time => Stop},
                    result_meta(Result, os_pid(On), Meta)),
            Result
    catch
        Class:Reason:Stack ->
            Stop = erlang:monotonic_time(),
            execute([pyport, Kind, exception], #{duration => Stop - Start, monotonic_time => Stop},
                    Meta#{kind => Class, reason => Reason, stacktrace => Stack}),
            erlang:raise(Class, Reason, Stack)
    end.

-spec meta(call | eval | exec, term(), map()) -> map().
meta(call, {Module, Function}, Meta) ->
    Meta#{module => text(Module), function => text(Function)};
meta(_EvalOrExec, Code, Meta) ->
    Meta#{code => first_line(text(Code))}.

%% Names and code as binaries where they are text (as the call will read them);
%% anything else as given (the call raises badarg for it).
-spec text(term()) -> term().
text(A) when is_atom(A) -> atom_to_binary(A, utf8);
text(B) when is_binary(B) -> B;
text(L) when is_list(L) ->
    case catch unicode:characters_to_binary(L) of
        B when is_binary(B) -> B;
        _ -> L
    end;
text(Other) -> Other.

-spec first_line(term()) -> term().
first_line(Code) when is_binary(Code) ->
    Line = hd(binary:split(Code, <<"\n">>) ++ [<<>>]),
    case byte_size(Line) > ?CODE_META_BYTES of
        true -> binary:part(Line, 0, ?CODE_META_BYTES);
        false -> Line
    end;
first_line(Code) ->
    Code.

-spec result_meta(term(), non_neg_integer() | undefined, map()) -> map().
result_meta({error, Reason}, OsPid, Meta) ->
    Meta#{result => error, error => Reason, port_os_pid => OsPid};
result_meta(_Ok, OsPid, Meta) ->
    Meta#{result => ok, port_os_pid => OsPid}.

%% The OS pid of the port that served the caller: the only port, or in a pool the
%% caller's home port (`undefined' for a process without a home).
-spec os_pid(state()) -> non_neg_integer() | undefined.
os_pid({on, OsPids, _, _, Ports}) ->
    Index = case Ports =< 1 of
                true -> 1;
                false -> pyport_pool:home_index(self())
            end,
    try atomics:get(OsPids, Index) of
        0 -> undefined;
        OsPid -> OsPid
    catch
        error:badarg -> undefined
    end.

%% @doc Runs `Fun', the body of a SharedDict operation `Op' of `py'; one in
%% `telemetry_shared_dict_sample' of each kind is timed and emitted.
-spec shared_dict(sd_op(), fun(() -> Result)) -> Result.
shared_dict(Op, Fun) ->
    case persistent_term:get(?KEY, off) of
        off ->
            Fun();
        {on, _, Counts, Rate, _} ->
            case atomics:add_get(Counts, op_index(Op, ?SD_OPS, 1), 1) rem Rate of
                0 -> sampled(Op, Rate, Fun);
                _ -> Fun()
            end
    end.

-spec sampled(sd_op(), pos_integer(), fun(() -> Result)) -> Result.
sampled(Op, Rate, Fun) ->
    Start = erlang:monotonic_time(),
    Meta = #{op => Op, sample_rate => Rate, caller => self()},
    try Fun() of
        Result ->
            sd_event(Start, Rate, Meta#{result => ok}),
            Result
    catch
        Class:Reason:Stack ->
            sd_event(Start, Rate, Meta#{result => exception}),
            erlang:raise(Class, Reason, Stack)
    end.

-spec sd_event(integer(), pos_integer(), map()) -> ok.
sd_event(Start, Rate, Meta) ->
    Stop = erlang:monotonic_time(),
    execute([pyport, shared_dict, operation],
            #{duration => Stop - Start, monotonic_time => Stop, count => Rate}, Meta).

-spec op_index(sd_op(), [sd_op()], pos_integer()) -> pos_integer().
op_index(Op, [Op | _], I) -> I;
op_index(Op, [_ | Rest], I) -> op_index(Op, Rest, I + 1).

%% @doc Port `Index' started its program `OsPid' (generation `Gen').
-spec port_started(pos_integer(), non_neg_integer() | undefined, non_neg_integer()) -> ok.
port_started(Index, OsPid, Gen) ->
    case persistent_term:get(?KEY, off) of
        off ->
            ok;
        {on, OsPids, _, _, _} ->
            _ = is_integer(OsPid) andalso put_os_pid(OsPids, Index, OsPid),
            execute([pyport, port, start], #{system_time => erlang:system_time()},
                    #{index => Index, os_pid => OsPid, generation => Gen})
    end.

%% @doc The program `OsPid' of port `Index' (generation `Gen') exited for `Reason'
%% (`restart': replaced by `py:restart()') with `Pending' requests in flight.
-spec port_exit(pos_integer(), non_neg_integer() | undefined, non_neg_integer(), term(),
                non_neg_integer()) -> ok.
port_exit(Index, OsPid, Gen, Reason, Pending) ->
    case persistent_term:get(?KEY, off) of
        off ->
            ok;
        {on, OsPids, _, _, _} ->
            _ = put_os_pid(OsPids, Index, 0),
            execute([pyport, port, exit], #{system_time => erlang:system_time(), pending => Pending},
                    #{index => Index, os_pid => OsPid, generation => Gen, reason => Reason})
    end.

-spec put_os_pid(atomics:atomics_ref(), pos_integer(), non_neg_integer()) -> boolean().
put_os_pid(OsPids, Index, OsPid) ->
    try atomics:put(OsPids, Index, OsPid) of ok -> true
    catch error:badarg -> false
    end.

-spec execute([atom(), ...], map(), map()) -> ok.
execute(Event, Measurements, Meta) ->
    try telemetry:execute(Event, Measurements, Meta) of
        _ -> ok
    catch
        _:_ -> ok
    end.

%% @doc Labels the calling process for observer and `proc_lib:get_label/1' (OTP 27
%% and later; earlier releases keep the label in the same process dictionary key,
%% where observer's dictionary view shows it).
-spec label(term()) -> ok.
label(Label) ->
    case erlang:function_exported(proc_lib, set_label, 1) of
        true -> apply(proc_lib, set_label, [Label]);
        false -> _ = put('$process_label', Label), ok
    end.
