%% @doc Python's `logging' reaches Erlang's `logger': levels mapped, structured metadata
%% (binaries and integers, never new atoms, no misleading `mfa'), the calling Erlang pid
%% (also from threads a call starts), a traceback as one event; a user's own
%% `logging.basicConfig()' still works, and `print' output has a configurable level.
-module(logging_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2, end_per_testcase/2]).
-export([levels_are_mapped/1, metadata_names_python_not_erlang/1, caller_pid_is_metadata/1,
         threads_inherit_the_caller/1, traceback_is_one_event/1, print_level_is_configurable/1,
         basic_config_still_works/1, rate_limit_is_configurable/1]).
%% logger handler callback
-export([log/2]).

-define(LIVENESS_MS, 10000).

all() ->
    [levels_are_mapped, metadata_names_python_not_erlang, caller_pid_is_metadata,
     threads_inherit_the_caller, traceback_is_one_event, print_level_is_configurable,
     %% It changes the root logger's configuration of the running port.
     basic_config_still_works,
     %% Restarts the port with another rate.
     rate_limit_is_configurable].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    #{level := Primary} = logger:get_primary_config(),
    ok = logger:set_primary_config(level, all),
    [{primary_level, Primary} | Config].

end_per_suite(Config) ->
    ok = logger:set_primary_config(level, ?config(primary_level, Config)),
    pyport_ct_lib:stop_app().

init_per_testcase(_Case, Config) ->
    ok = logger:add_handler(pyport_collect, ?MODULE, #{config => #{pid => self()}}),
    Config.

end_per_testcase(_Case, _Config) ->
    _ = logger:remove_handler(pyport_collect),
    application:unset_env(pyport, print_level),
    ok.

%% logger handler: forwards events from pyport to the test process.
log(#{meta := #{pyport_source := _}} = Event, #{config := #{pid := Pid}}) ->
    Pid ! {pyport_event, Event},
    ok;
log(_Event, _Config) ->
    ok.

%% Every Python level becomes the Erlang level of the same name (WARNING: warning).
levels_are_mapped(_Config) ->
    ok = py:exec(<<"import logging\n"
                   "l = logging.getLogger('lv')\n"
                   "l.setLevel(1)\n"
                   "for f in (l.debug, l.info, l.warning, l.error, l.critical):\n"
                   "    f('level %s', f.__name__)\n">>),
    Events = events(<<"lv">>, 5),
    ?assertEqual([debug, info, warning, error, critical], [L || #{level := L} <- Events]),
    ?assertEqual(["python lv: level debug", "python lv: level info", "python lv: level warning",
                  "python lv: level error", "python lv: level critical"],
                 [text(E) || E <- Events]).

%% Metadata names the Python logger, module and line as binaries and an integer; there is
%% no `mfa' (which would point at pyport_server) and no `domain'.
metadata_names_python_not_erlang(Config) ->
    Dir = ?config(priv_dir, Config),
    ok = file:write_file(filename:join(Dir, "logmod_meta.py"),
                         <<"import logging\n\ndef run():\n    logging.getLogger('svc.\\u00e9t\\u00e9').warning('hi')\n">>),
    {ok, _} = py:call(sys, 'path.insert', [0, list_to_binary(Dir)]),
    {ok, undefined} = py:call(logmod_meta, run, []),
    [#{meta := Meta}] = events(<<"svc.été"/utf8>>, 1),
    ?assertMatch(#{pyport_source := logging, python_logger := <<"svc.été"/utf8>>,
                   python_module := <<"logmod_meta">>, python_line := 4}, Meta),
    ?assertNot(maps:is_key(mfa, Meta)),
    ?assertNot(maps:is_key(domain, Meta)).

%% A record made while serving a call carries the pid of the Erlang process that called.
caller_pid_is_metadata(_Config) ->
    Self = self(),
    Other = pyport_ct_lib:run_in_process(
              fun() ->
                      ok = py:exec(<<"import logging\nlogging.getLogger('who').warning('x')\n">>),
                      self()
              end),
    ?assertNotEqual(Self, Other),
    [#{meta := #{pid := Pid}}] = events(<<"who">>, 1),
    ?assertEqual(Other, Pid).

%% A thread started by a call logs on behalf of the caller too.
threads_inherit_the_caller(_Config) ->
    ok = py:exec(<<"import logging, threading\n"
                   "t = threading.Thread(target=lambda: logging.getLogger('thr').warning('from a thread'))\n"
                   "t.start(); t.join()\n">>),
    [#{meta := #{pid := Pid}} = E] = events(<<"thr">>, 1),
    ?assertEqual(self(), Pid),
    ?assertEqual("python thr: from a thread", text(E)).

%% logger.exception(): the message and its traceback are one event.
traceback_is_one_event(_Config) ->
    ok = py:exec(<<"import logging\n"
                   "try:\n    1 / 0\n"
                   "except ZeroDivisionError:\n    logging.getLogger('tb').exception('it broke')\n">>),
    [#{level := error} = E] = events(<<"tb">>, 1),
    Text = text(E),
    ?assertMatch("python tb: it broke\nTraceback (most recent call last):\n" ++ _, Text),
    ?assertNotEqual(nomatch, string:find(Text, "ZeroDivisionError: division by zero")),
    %% Nothing else from that logger (no second event for the traceback's lines).
    ?assertEqual([], events_now(<<"tb">>)).

%% `print' output is logged at app env print_level (info when unset).
print_level_is_configurable(_Config) ->
    ok = application:set_env(pyport, print_level, notice),
    ok = py:exec(<<"print('printed line')">>),
    E = wait_event(fun(#{meta := #{pyport_source := stdout}} = Ev) ->
                           text(Ev) =:= "python stdout: printed line";
                      (_) -> false
                   end),
    ?assertMatch(#{level := notice}, E).

%% After the user's logging.basicConfig(), their handler (here: stderr with their format)
%% gets the records, exactly as in a plain interpreter.
basic_config_still_works(_Config) ->
    ok = py:exec(<<"import logging, sys\n"
                   "logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='BC %(levelname)s %(message)s')\n"
                   "logging.getLogger('bc').info('configured')\n">>),
    E = wait_event(fun(#{meta := #{pyport_source := stderr}} = Ev) ->
                           text(Ev) =:= "python stderr: BC INFO configured";
                      (_) -> false
                   end),
    ?assertMatch(#{level := warning}, E),
    ?assertEqual([], events_now(<<"bc">>)).

%% App env log_lines_per_sec: at 5 per second (bursts of 10) a flood of 50 records gives at
%% most 10 events, and the rest are counted in a later warning.
rate_limit_is_configurable(_Config) ->
    Saved = pyport_ct_lib:save_env([log_lines_per_sec]),
    ok = application:set_env(pyport, log_lines_per_sec, 5),
    ok = pyport_ct_lib:restart_app(),
    try
        ok = py:exec(<<"import logging\nl = logging.getLogger('flood')\n"
                       "for i in range(50):\n    l.warning('n %d', i)\n">>),
        Passed = events_now(<<"flood">>),
        ?assert(length(Passed) =< 10),
        ?assert(length(Passed) >= 1),
        %% A later record, once the bucket has refilled, brings the count of the others
        %% (the wait is Python's, to make that later record; the test waits for the event).
        ok = py:exec(<<"import time\ntime.sleep(0.5)\nl.warning('after')\n">>),
        E = wait_event(fun(#{meta := #{pyport_source := pyport}} = Ev) ->
                               string:find(text(Ev), "Python log records suppressed") =/= nomatch;
                          (_) -> false
                       end),
        ?assertMatch({match, _}, re:run(text(E), "pyport: [0-9]+ Python log records suppressed"))
    after
        pyport_ct_lib:restore_env_and_restart(Saved)
    end.

%%--------------------------------------------------------------------

%% The next N events of Python logger Logger, in order (other events are dropped).
events(Logger, N) ->
    Deadline = erlang:monotonic_time(millisecond) + ?LIVENESS_MS,
    events(Logger, N, Deadline, []).

events(_Logger, 0, _Deadline, Acc) ->
    lists:reverse(Acc);
events(Logger, N, Deadline, Acc) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {pyport_event, #{meta := #{python_logger := Logger}} = E} ->
            events(Logger, N - 1, Deadline, [E | Acc]);
        {pyport_event, _} ->
            events(Logger, N, Deadline, Acc)
    after Left ->
        ct:fail({missing_events, Logger, N, lists:reverse(Acc)})
    end.

%% Events of Logger already delivered (a round trip through the port first, so that any
%% frame sent before it has been handled).
events_now(Logger) ->
    {ok, _} = py:eval(<<"1">>),
    {ok, _} = py:stats(),
    receive_all(Logger, []).

receive_all(Logger, Acc) ->
    receive
        {pyport_event, #{meta := #{python_logger := Logger}} = E} -> receive_all(Logger, [E | Acc]);
        {pyport_event, _} -> receive_all(Logger, Acc)
    after 0 -> lists:reverse(Acc)
    end.

wait_event(Pred) ->
    Deadline = erlang:monotonic_time(millisecond) + ?LIVENESS_MS,
    wait_event(Pred, Deadline).

wait_event(Pred, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {pyport_event, E} ->
            case Pred(E) of
                true -> E;
                false -> wait_event(Pred, Deadline)
            end
    after Left ->
        ct:fail(no_matching_event)
    end.

text(#{msg := {string, S}}) ->
    unicode:characters_to_list(S);
text(#{msg := {Format, Args}}) ->
    unicode:characters_to_list(io_lib:format(Format, Args)).
