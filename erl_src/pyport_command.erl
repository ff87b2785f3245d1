%% @doc Runs an external command (the interpreter probe, `uv', `pip') to its end, bounded:
%% a deadline, a cap on the output kept, and no process left behind.
%%
%% The command runs under a small `/bin/sh' wrapper that `open_port' makes the leader of
%% its own process group. The wrapper hands the command `/dev/null' as input and keeps the
%% port's input pipe for itself: when that pipe reaches end of file (the port is closed,
%% or the VM is gone, however it died) it kills the whole group, so the command and the
%% children it started in its group never outlive the VM. On a timeout or when the output
%% passes the cap, the group is killed at once. When the command ends by itself, what it
%% left running in its group is killed too.
-module(pyport_command).

-export([run/3, last_lines/2]).

-export_type([opts/0, result/0]).

-type opts() :: #{timeout_ms => pos_integer(),
                  %% past this many bytes of output the command is killed
                  max_output => pos_integer(),
                  %% instead: keep only the last this many bytes, and let it run
                  keep_output => pos_integer(),
                  env => [{string(), string() | false}],
                  cd => file:filename(),
                  %% called with each complete line of output as it arrives
                  on_line => fun((binary()) -> any())}.
-type result() :: {ok, non_neg_integer(), binary()}
                | {error, {timeout, binary()}
                        | {output_over, pos_integer(), binary()}
                        | {spawn_failed, term()}}.

-define(DEFAULT_TIMEOUT_MS, 30000).
-define(DEFAULT_MAX_OUTPUT, 65536).

%% $1 is the command, the rest its arguments. fd 3 keeps the port's input pipe; the
%% watcher waits for its end of file and then kills the process group (itself included).
-define(WRAPPER,
        "exec 3<&0 </dev/null\n"
        "{ while read -r _ <&3; do :; done; kill -KILL 0; } >/dev/null 2>&1 &\n"
        "watcher=$!\n"
        "\"$@\" 3<&-\n"
        "status=$?\n"
        "kill $watcher 2>/dev/null\n"
        "exit $status\n").

%% @doc Runs `Exe' with `Args' and returns its exit status and output (stdout and stderr
%% together). `{error, {timeout, Output}}' after `timeout_ms' (default 30 s), `{error,
%% {output_over, Max, Output}}' as soon as the output passes `max_output' bytes (default
%% 64 KiB; `Output' is the first `Max' bytes); in both cases the command's process group has
%% been killed. With `keep_output' instead, a command may say as much as it likes and
%% `Output' is the last `keep_output' bytes of it. `on_line' sees each line as it comes
%% (progress reports).
-spec run(file:filename(), [string()], opts()) -> result().
run(Exe, Args, Opts) ->
    PortOpts = [{args, ["-c", ?WRAPPER, "pyport-command", Exe | Args]},
                exit_status, stderr_to_stdout, binary, hide]
        ++ [{env, E} || E <- [maps:get(env, Opts, [])], E =/= []]
        ++ [{cd, D} || D <- [maps:get(cd, Opts, undefined)], D =/= undefined],
    try open_port({spawn_executable, "/bin/sh"}, PortOpts) of
        Port ->
            OsPid = case erlang:port_info(Port, os_pid) of
                        {os_pid, P} -> P;
                        undefined -> undefined
                    end,
            Deadline = erlang:monotonic_time(millisecond)
                + maps:get(timeout_ms, Opts, ?DEFAULT_TIMEOUT_MS),
            Limit = case Opts of
                        #{keep_output := Keep} -> {tail, Keep};
                        _ -> {kill, maps:get(max_output, Opts, ?DEFAULT_MAX_OUTPUT)}
                    end,
            OnLine = maps:get(on_line, Opts, undefined),
            Result = collect(Port, #{deadline => Deadline, limit => Limit, on_line => OnLine},
                             {[], 0, <<>>}),
            kill_group(OsPid),
            close(Port),
            Result
    catch
        error:Reason -> {error, {spawn_failed, Reason}}
    end.

%% @doc The last `N' non-empty lines of `Output', joined by newlines (for error reasons
%% that name what a command said last).
-spec last_lines(binary(), pos_integer()) -> binary().
last_lines(Output, N) ->
    Lines = [L || L <- binary:split(Output, <<"\n">>, [global]), string:trim(L) =/= <<>>],
    Last = lists:nthtail(max(0, length(Lines) - N), Lines),
    iolist_to_binary(lists:join(<<"\n">>, Last)).

%%--------------------------------------------------------------------

%% Acc: {chunks kept (reversed), bytes kept, the unfinished line for on_line}.
-spec collect(port(), map(), {[binary()], non_neg_integer(), binary()}) -> result().
collect(Port, #{deadline := Deadline, limit := Limit, on_line := OnLine} = Ctx,
        {Chunks, Size, Partial}) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {Port, {data, D}} when element(1, Limit) =:= kill,
                               Size + byte_size(D) > element(2, Limit) ->
            Max = element(2, Limit),
            Kept = binary:part(D, 0, Max - Size),
            {error, {output_over, Max, output([Kept | Chunks])}};
        {Port, {data, D}} ->
            Partial1 = lines(OnLine, <<Partial/binary, D/binary>>),
            collect(Port, Ctx, keep(Limit, [D | Chunks], Size + byte_size(D), Partial1));
        {Port, {exit_status, S}} ->
            _ = lines(OnLine, <<Partial/binary, "\n">>),
            {ok, S, output(Chunks)}
    after Left ->
        {error, {timeout, output(Chunks)}}
    end.

%% With {tail, N}: past 2N bytes kept, only the last N are (bounded memory, one copy per N).
-spec keep({kill | tail, pos_integer()}, [binary()], non_neg_integer(), binary()) ->
          {[binary()], non_neg_integer(), binary()}.
keep({tail, N}, Chunks, Size, Partial) when Size > 2 * N ->
    All = output(Chunks),
    {[binary:part(All, Size - N, N)], N, Partial};
keep(_Limit, Chunks, Size, Partial) ->
    {Chunks, Size, Partial}.

-spec output([binary()]) -> binary().
output(Chunks) ->
    iolist_to_binary(lists:reverse(Chunks)).

%% Passes each complete line to OnLine; returns what follows the last newline.
-spec lines(undefined | fun((binary()) -> any()), binary()) -> binary().
lines(undefined, _Bin) ->
    <<>>;
lines(OnLine, Bin) ->
    case binary:split(Bin, <<"\n">>) of
        [Line, Rest] ->
            _ = case string:trim(Line) of
                    <<>> -> ok;
                    _ -> OnLine(Line)
                end,
            lines(OnLine, Rest);
        [Partial] ->
            Partial
    end.

%% SIGKILL for the wrapper's process group: the command and what it started there.
-spec kill_group(non_neg_integer() | undefined) -> ok.
kill_group(undefined) ->
    ok;
kill_group(OsPid) ->
    _ = os:cmd("kill -KILL -- -" ++ integer_to_list(OsPid) ++ " 2>/dev/null"),
    ok.

-spec close(port()) -> ok.
close(Port) ->
    _ = (catch port_close(Port)),
    receive {Port, {exit_status, _}} -> ok after 0 -> ok end,
    flush(Port).

-spec flush(port()) -> ok.
flush(Port) ->
    receive {Port, _} -> flush(Port) after 0 -> ok end.
