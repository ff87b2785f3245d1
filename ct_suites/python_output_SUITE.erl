%% Python's output reaches the Erlang `logger' (README "Configuration"): each line
%% of stdout at `info', of stderr at `warning', with metadata
%% `#{pyport_source => stdout | stderr}', lines cut at 4096 bytes, at most 100
%% lines/s with bursts of 200, and the suppressed lines counted in a later warning.
%%
%% Each case installs its own logger handler (this module's log/2), which sends
%% every event carrying `pyport_source' to the test process.
-module(python_output_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([stdout_lines_at_info/1, stderr_lines_at_warning/1, long_line_is_cut/1,
         rate_limited_with_suppressed_count/1]).
%% logger handler callback
-export([log/2]).

-define(HANDLER, pyport_ct_output_capture).
-define(LIVENESS_MS, 10000).

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [stdout_lines_at_info, stderr_lines_at_warning, long_line_is_cut,
     rate_limited_with_suppressed_count].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    %% info events pass the primary level only if it lets them through
    #{level := Primary} = logger:get_primary_config(),
    ok = logger:set_primary_config(level, all),
    %% ...and the console handler keeps its usual level: the flood stays off the terminal
    Default = case logger:get_handler_config(default) of
                  {ok, #{level := L}} -> ok = logger:update_handler_config(default, level, notice), L;
                  _ -> undefined
              end,
    [{primary_level, Primary}, {default_handler_level, Default} | Config].

end_per_suite(Config) ->
    ok = logger:set_primary_config(level, ?config(primary_level, Config)),
    case ?config(default_handler_level, Config) of
        undefined -> ok;
        L -> ok = logger:update_handler_config(default, level, L)
    end,
    pyport_ct_lib:stop_app().

init_per_testcase(Case, Config) ->
    %% A fresh port for each case: its rate-limit buckets are full and hold no
    %% output of an earlier case.
    ok = pyport_ct_lib:restart_app(),
    ok = logger:add_handler(?HANDLER, ?MODULE, #{level => all, config => #{pid => self()}}),
    ct:log("~p: capturing pyport log events", [Case]),
    Config.

end_per_testcase(_Case, _Config) ->
    _ = logger:remove_handler(?HANDLER),
    ok.

%% logger handler: forwards the events that came from the port's output.
log(#{level := Level, msg := Msg, meta := #{pyport_source := Source}}, #{config := #{pid := Pid}}) ->
    Pid ! {pyport_output, Level, Source, text(Msg)},
    ok;
log(_Event, _HandlerConfig) ->
    ok.

text({string, S}) -> unicode:characters_to_binary(S);
text({report, R}) -> unicode:characters_to_binary(io_lib:format("~tp", [R]));
text({Format, Args}) -> unicode:characters_to_binary(io_lib:format(Format, Args)).

%%--------------------------------------------------------------------

stdout_lines_at_info(_Config) ->
    ok = py:exec(<<"import os\n"
                   "print('out-line-1 héllo')\n"
                   "print('out-line-2')\n"
                   "os.write(1, b'out-line-3 raw fd 1\\n')\n"/utf8>>),
    Got = receive_matching(3, fun(_, _, T) -> has(T, <<"out-line-">>) end),
    [{info, stdout, L1}, {info, stdout, L2}, {info, stdout, L3}] = Got,
    true = has(L1, <<"out-line-1 héllo"/utf8>>),
    true = has(L2, <<"out-line-2">>),
    true = has(L3, <<"out-line-3 raw fd 1">>),
    ok.

stderr_lines_at_warning(_Config) ->
    ok = py:exec(<<"import os, sys\n"
                   "print('err-line-1', file=sys.stderr)\n"
                   "os.write(2, b'err-line-2 raw fd 2\\n')\n">>),
    [{warning, stderr, L1}, {warning, stderr, L2}] =
        receive_matching(2, fun(_, _, T) -> has(T, <<"err-line-">>) end),
    true = has(L1, <<"err-line-1">>),
    true = has(L2, <<"err-line-2 raw fd 2">>),
    ok.

%% A 10000-byte line arrives as one event whose forwarded text is at most 4096 bytes.
long_line_is_cut(_Config) ->
    ok = py:exec(<<"print('L' * 10000)\nprint('after-the-long-line')">>),
    [{info, stdout, Long}, {info, stdout, After}] =
        receive_matching(2, fun(_, _, T) -> has(T, <<"LLLLLLLL">>) orelse has(T, <<"after-the-long-line">>) end),
    true = has(Long, binary:copy(<<"L">>, 4000)),
    false = has(Long, binary:copy(<<"L">>, 4097)),
    true = has(After, <<"after-the-long-line">>),
    ok.

%% 1000 lines printed at once: a burst of 200 (plus what the 100 lines/s refill
%% allows) is forwarded, the rest is suppressed, and a later warning from the
%% port itself counts exactly the suppressed lines.
rate_limited_with_suppressed_count(_Config) ->
    N = 1000,
    T0 = pyport_ct_lib:now_ms(),
    ok = py:exec(<<"for i in range(n):\n    print('flood-%04d' % i)\n">>, #{n => N}),
    {Forwarded, Reports} = flood_events(N, 0, [], pyport_ct_lib:now_ms() + ?LIVENESS_MS),
    ElapsedS = (pyport_ct_lib:now_ms() - T0) / 1000,
    Suppressed = lists:sum([C || {_, C} <- Reports]),
    ct:log("~b lines forwarded, ~b counted as suppressed in ~p, within ~.1f s",
           [Forwarded, Suppressed, Reports, ElapsedS]),
    ?assert(Forwarded >= 200),
    ?assert(Forwarded < N),
    ?assert(Forwarded =< 200 + 100 * (ElapsedS + 1)),
    ?assertEqual(N, Forwarded + Suppressed),
    [] = [R || {Level, _} = R <- Reports, Level =/= warning],
    ok.

%% Counts the forwarded flood lines and the suppressed-lines reports (source
%% `pyport') until every one of the N lines is accounted for.
flood_events(N, Forwarded, Reports, Deadline) ->
    case Forwarded + lists:sum([C || {_, C} <- Reports]) of
        Total when Total >= N -> {Forwarded, lists:reverse(Reports)};
        Total ->
            Left = max(0, Deadline - pyport_ct_lib:now_ms()),
            receive
                {pyport_output, info, stdout, T} ->
                    true = has(T, <<"flood-">>),
                    flood_events(N, Forwarded + 1, Reports, Deadline);
                {pyport_output, Level, pyport, T} ->
                    {match, [C]} = re:run(T, "([0-9]+) lines of Python stdout suppressed",
                                          [{capture, all_but_first, binary}]),
                    flood_events(N, Forwarded, [{Level, binary_to_integer(C)} | Reports], Deadline);
                {pyport_output, _, _, _} = Other ->
                    ct:fail({unexpected_output_event, Other})
            after Left ->
                    ct:fail({lines_not_accounted_for, N, forwarded, Forwarded,
                             reports, Reports, total, Total})
            end
    end.

%%--------------------------------------------------------------------

%% Receives Count output events for which Pred(Level, Source, Text) holds, in
%% arrival order; other output events are skipped.
receive_matching(Count, Pred) ->
    receive_matching(Count, Pred, [], pyport_ct_lib:now_ms() + ?LIVENESS_MS).

receive_matching(0, _Pred, Acc, _Deadline) ->
    lists:reverse(Acc);
receive_matching(Count, Pred, Acc, Deadline) ->
    Left = max(0, Deadline - pyport_ct_lib:now_ms()),
    receive
        {pyport_output, Level, Source, Text} ->
            case Pred(Level, Source, Text) of
                true -> receive_matching(Count - 1, Pred, [{Level, Source, Text} | Acc], Deadline);
                false -> receive_matching(Count, Pred, Acc, Deadline)
            end
    after Left ->
            ct:fail({python_output_not_logged, missing, Count, got, lists:reverse(Acc)})
    end.

has(Bin, Part) ->
    binary:match(Bin, Part) =/= nomatch.
