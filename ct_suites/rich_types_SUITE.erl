%% @doc Conversions beyond the core types: numpy scalars and arrays and `__index__'
%% objects, dates/times/Decimal/UUID in their documented reversible form, Elixir's
%% calendar and Decimal structs, keyword-list kwargs and the `none_as' setting.
-module(rich_types_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, init_per_suite/1, end_per_suite/1, init_per_group/2,
         end_per_group/2]).
-export([numpy_integer_scalars_are_integers/1, numpy_float_scalars_are_floats/1,
         numpy_bools_are_booleans/1, numpy_arrays_are_nested_lists/1,
         index_objects_are_integers/1,
         dates_and_times_have_a_tagged_form/1, tagged_forms_round_trip/1,
         elixir_structs_become_python_objects/1, malformed_tagged_form_is_a_python_error/1,
         keyword_list_kwargs/1, keyword_list_kwargs_reject_duplicates/1,
         none_is_undefined_by_default/1, none_as_nil_applies_to_replies/1,
         none_as_nil_applies_to_shared_dict_reads/1]).

all() ->
    [{group, numpy}, index_objects_are_integers, dates_and_times_have_a_tagged_form,
     tagged_forms_round_trip, elixir_structs_become_python_objects,
     malformed_tagged_form_is_a_python_error, keyword_list_kwargs,
     keyword_list_kwargs_reject_duplicates, none_is_undefined_by_default,
     {group, none_as_nil}].

groups() ->
    [{numpy, [], [numpy_integer_scalars_are_integers, numpy_float_scalars_are_floats,
                  numpy_bools_are_booleans, numpy_arrays_are_nested_lists]},
     {none_as_nil, [], [none_as_nil_applies_to_replies,
                        none_as_nil_applies_to_shared_dict_reads]}].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

init_per_group(numpy, Config) ->
    %% CI installs numpy (make bootstrap); elsewhere these cases skip, and say so.
    case py:eval(<<"__import__('importlib.util').util.find_spec('numpy') is not None">>) of
        {ok, true} -> Config;
        _ -> {skip, "numpy is not installed for this Python: run `make bootstrap`"}
    end;
init_per_group(none_as_nil, Config) ->
    Saved = pyport_ct_lib:save_env([none_as]),
    ok = application:set_env(pyport, none_as, nil),
    ok = pyport_ct_lib:restart_app(),
    [{saved_env, Saved} | Config].

end_per_group(none_as_nil, Config) ->
    pyport_ct_lib:restore_env_and_restart(?config(saved_env, Config));
end_per_group(_Group, _Config) ->
    ok.

numpy_integer_scalars_are_integers(_Config) ->
    ?assertEqual({ok, [7, -3, 255, 123456789012345]},
                 py:eval(<<"(lambda np: [np.int64(7), np.int8(-3), np.uint8(255), "
                           "np.int64(123456789012345)])(__import__('numpy'))">>)).

numpy_float_scalars_are_floats(_Config) ->
    ?assertEqual({ok, [1.5, 0.25, 2.0]},
                 py:eval(<<"(lambda np: [np.float64(1.5), np.float32(0.25), np.float16(2)])"
                           "(__import__('numpy'))">>)).

numpy_bools_are_booleans(_Config) ->
    ?assertEqual({ok, [true, false]},
                 py:eval(<<"(lambda np: [np.bool_(True), np.bool_(False)])(__import__('numpy'))">>)).

numpy_arrays_are_nested_lists(_Config) ->
    ?assertEqual({ok, {[[1, 2], [3, 4]], [0.5, 1.5], [true, false], 9}},
                 py:eval(<<"(lambda np: (np.array([[1, 2], [3, 4]]), np.array([0.5, 1.5]), "
                           "np.array([True, False]), np.array(9)))(__import__('numpy'))">>)).

%% Any object with __index__ (what Python accepts as an integer index) is an integer.
index_objects_are_integers(_Config) ->
    ok = py:exec(<<"class Idx:\n    def __index__(self):\n        return 42\n">>),
    ?assertEqual({ok, [42]}, py:eval(<<"[Idx()]">>)).

%% The documented forms of datetime, date, time, timedelta, Decimal and UUID.
dates_and_times_have_a_tagged_form(_Config) ->
    ok = py:exec(<<"import datetime as dt, decimal, uuid\n"
                   "tz = dt.timezone(dt.timedelta(hours=2))\n">>),
    ?assertEqual({ok, {'$pyport_date', {2024, 2, 29}}}, py:eval(<<"dt.date(2024, 2, 29)">>)),
    ?assertEqual({ok, {'$pyport_time', {13, 5, 9}, 250, undefined}},
                 py:eval(<<"dt.time(13, 5, 9, 250)">>)),
    ?assertEqual({ok, {'$pyport_datetime', {{2024, 2, 29}, {13, 5, 9}}, 7, 7200}},
                 py:eval(<<"dt.datetime(2024, 2, 29, 13, 5, 9, 7, tzinfo=tz)">>)),
    ?assertEqual({ok, {'$pyport_datetime', {{2024, 1, 1}, {0, 0, 0}}, 0, undefined}},
                 py:eval(<<"dt.datetime(2024, 1, 1)">>)),
    ?assertEqual({ok, {'$pyport_timedelta', -1, 86399, 500000}},
                 py:eval(<<"dt.timedelta(seconds=-0.5)">>)),
    ?assertEqual({ok, {'$pyport_decimal', <<"1.50">>}}, py:eval(<<"decimal.Decimal('1.50')">>)),
    ?assertEqual({ok, {'$pyport_uuid', <<"12345678-1234-5678-1234-567812345678">>}},
                 py:eval(<<"uuid.UUID('12345678123456781234567812345678')">>)).

%% Each form sent back to Python is the same object again.
tagged_forms_round_trip(_Config) ->
    ok = py:exec(<<"import datetime as dt, decimal, uuid\n"
                   "tz = dt.timezone(dt.timedelta(hours=-5, minutes=-30))\n"
                   "values = [dt.date(1999, 12, 31), dt.time(1, 2, 3, 4, tzinfo=tz),\n"
                   "          dt.datetime(2000, 1, 2, 3, 4, 5, 6), dt.datetime(2000, 1, 2, tzinfo=tz),\n"
                   "          dt.timedelta(days=3, microseconds=9), decimal.Decimal('-0.001'),\n"
                   "          uuid.uuid4()]\n">>),
    {ok, Terms} = py:eval(<<"values">>),
    ?assertEqual(7, length(Terms)),
    ?assertEqual({ok, true}, py:eval(<<"back == values and all(type(a) is type(b) "
                                       "for a, b in zip(back, values))">>, #{back => Terms})).

%% Maps with __struct__ of Elixir's Date, Time, NaiveDateTime, DateTime and Decimal arrive
%% as the Python objects (built here as an Elixir VM would send them).
elixir_structs_become_python_objects(_Config) ->
    Date = #{'__struct__' => 'Elixir.Date', calendar => 'Elixir.Calendar.ISO',
             year => 2024, month => 2, day => 29},
    Time = #{'__struct__' => 'Elixir.Time', calendar => 'Elixir.Calendar.ISO',
             hour => 13, minute => 5, second => 9, microsecond => {250, 6}},
    Naive = maps:merge(maps:remove('__struct__', Date), maps:remove('__struct__', Time)),
    NaiveDT = Naive#{'__struct__' => 'Elixir.NaiveDateTime'},
    DT = Naive#{'__struct__' => 'Elixir.DateTime', time_zone => <<"Etc/UTC">>,
                zone_abbr => <<"UTC">>, utc_offset => 3600, std_offset => 0},
    Dec = #{'__struct__' => 'Elixir.Decimal', sign => -1, coef => 150, exp => -2},
    ?assertEqual({ok, [<<"2024-02-29">>, <<"13:05:09.000250">>, <<"2024-02-29T13:05:09.000250">>,
                       <<"2024-02-29T13:05:09.000250+01:00">>, <<"-1.50">>]},
                 py:eval(<<"[str(x) if not hasattr(x, 'isoformat') else x.isoformat() "
                           "for x in values]">>,
                         #{values => [Date, Time, NaiveDT, DT, Dec]})),
    ?assertEqual({ok, <<"datetime.date">>}, py:eval(<<"type(d).__module__ + '.' + type(d).__name__">>,
                                                    #{d => Date})),
    %% Any other struct stays a dict.
    ?assertEqual({ok, <<"dict">>}, py:eval(<<"type(m).__name__">>,
                                           #{m => #{'__struct__' => 'Elixir.URI', host => 1}})).

malformed_tagged_form_is_a_python_error(_Config) ->
    ?assertMatch({error, {python, 'ValueError', <<"malformed $pyport_date term", _/binary>>, _}},
                 py:eval(<<"d">>, #{d => {'$pyport_date', {2024, 13, 1}}})).

%% A keyword list works as Kwargs (Elixir: `[reverse: true]').
keyword_list_kwargs(_Config) ->
    ?assertEqual({ok, [3, 2, 1]}, py:call(builtins, sorted, [[1, 3, 2]], [{reverse, true}])),
    ?assertEqual({ok, <<"a-b">>}, py:call(builtins, 'str.join', [<<"-">>, [<<"a">>, <<"b">>]], [])).

keyword_list_kwargs_reject_duplicates(_Config) ->
    ?assertError(badarg, py:call(builtins, sorted, [[1]], [{reverse, true}, {reverse, false}])),
    ?assertError(badarg, py:call(builtins, sorted, [[1]], [reverse])).

none_is_undefined_by_default(_Config) ->
    ?assertEqual({ok, [undefined, 1]}, py:eval(<<"[None, 1]">>)).

%% With app env none_as = nil (Elixir), None is nil in replies...
none_as_nil_applies_to_replies(_Config) ->
    ?assertEqual({ok, [nil, #{<<"k">> => nil}]}, py:eval(<<"[None, {'k': None}]">>)),
    %% ...and nil still becomes None on the way in.
    ?assertEqual({ok, true}, py:eval(<<"x is None">>, #{x => nil})).

%% ...and in SharedDict reads from Erlang.
none_as_nil_applies_to_shared_dict_reads(_Config) ->
    {ok, SD} = py:shared_dict_new(),
    ok = py:exec(<<"from erlang import SharedDict\nSharedDict(h)['v'] = [None]\n">>, #{h => SD}),
    ?assertEqual([nil], py:shared_dict_get(SD, <<"v">>)),
    ok = py:shared_dict_destroy(SD).
