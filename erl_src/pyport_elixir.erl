%% @private
%% @doc Elixir values for what Python sends back, when the app env `elixir' is
%% `true': `datetime.date', naive `time', naive and aware `datetime' become
%% `%Date{}', `%Time{}', `%NaiveDateTime{}' and `%DateTime{}' (the UTC offset kept
%% exactly, without a time zone database), `decimal.Decimal' becomes `%Decimal{}'
%% while Elixir's `Decimal' module is loaded, and `None' becomes `nil' (through
%% the port's `none_as', see {@link pyport_program}).
%%
%% The port itself sends the tagged tuples of the conversion table
%% (`{'$pyport_date', {Y, M, D}}', ...); they are rewritten here, in the process
%% that decodes the result, after `binary_to_term'. Only a payload whose bytes hold
%% the text `$pyport_' can hold one (atoms are stored as text in the external term
%% format), so every other payload is returned as decoded without a walk. With
%% `elixir' `false' (the default) the cost is one `persistent_term' read.
-module(pyport_elixir).

-export([configure/0, enabled/0, decoded/1, decode/1, values/1]).

%% An atom key: persistent_term hashes it in half the time of a tuple (this is read per call).
-define(KEY, pyport_elixir_enabled).
-define(MARKER, <<"$pyport_">>).
-define(ISO, 'Elixir.Calendar.ISO').

%% @doc Reads the app env `elixir' (at the application's start and by
%% `py:restart()'), and loads Elixir's `Decimal' when it is on the code path.
-spec configure() -> ok.
configure() ->
    Enabled = application:get_env(pyport, elixir, false) =:= true,
    _ = Enabled andalso code:ensure_loaded('Elixir.Decimal'),
    case persistent_term:get(?KEY, undefined) of
        Enabled -> ok;
        _ -> persistent_term:put(?KEY, Enabled)
    end.

%% @doc Whether Python's values come back as Elixir values.
-spec enabled() -> boolean().
enabled() ->
    persistent_term:get(?KEY, false).

%% @doc `pyport_request:decoded/1', with Elixir values when they are on.
-spec decoded({ok, binary()} | {error, term()}) -> {ok, term()} | {error, term()}.
decoded({ok, Payload} = Reply) ->
    case pyport_request:decoded(Reply) of
        {ok, Value} -> {ok, convert(Payload, Value)};
        Error -> Error
    end;
decoded(Error) ->
    Error.

%% @doc `binary_to_term(Bin, [safe])' with Elixir values when they are on (raises
%% `badarg' as that does).
-spec decode(binary()) -> term().
decode(Bin) ->
    convert(Bin, binary_to_term(Bin, [safe])).

-spec convert(binary(), term()) -> term().
convert(Payload, Value) ->
    case persistent_term:get(?KEY, false) andalso binary:match(Payload, ?MARKER) =/= nomatch of
        true -> values(Value);
        false -> Value
    end.

%% @doc `Term' with every tagged date, time, datetime and decimal in it (keys of
%% maps too) replaced by its Elixir struct.
-spec values(term()) -> term().
values({'$pyport_date', {Y, M, D}}) when is_integer(Y) ->
    #{'__struct__' => 'Elixir.Date', calendar => ?ISO, year => Y, month => M, day => D};
values({'$pyport_time', {H, Mi, S}, Micro, Offset} = T) when is_integer(Micro) ->
    case naive(Offset) of
        true ->
            #{'__struct__' => 'Elixir.Time', calendar => ?ISO, hour => H, minute => Mi,
              second => S, microsecond => micro(Micro)};
        false ->
            T   % Elixir's Time has no UTC offset: an aware time stays tagged
    end;
values({'$pyport_datetime', {{Y, M, D}, {H, Mi, S}}, Micro, Offset}) when is_integer(Micro) ->
    Fields = #{calendar => ?ISO, year => Y, month => M, day => D, hour => H, minute => Mi,
               second => S, microsecond => micro(Micro)},
    case naive(Offset) of
        true -> Fields#{'__struct__' => 'Elixir.NaiveDateTime'};
        false -> datetime(Fields, Offset)
    end;
values({'$pyport_decimal', Text} = T) when is_binary(Text) ->
    decimal(Text, T);
values(L) when is_list(L) ->
    list(L);
values(T) when is_tuple(T) ->
    list_to_tuple(list(tuple_to_list(T)));
values(M) when is_map(M) ->
    maps:from_list([{values(K), values(V)} || {K, V} <- maps:to_list(M)]);
values(Other) ->
    Other.

%% Lists element by element (an improper tail cannot come from Python, but is kept).
-spec list(term()) -> term().
list([H | T]) -> [values(H) | list(T)];
list(Tail) -> Tail.

-spec naive(term()) -> boolean().
naive(Offset) ->
    not is_integer(Offset).

%% Python keeps microseconds, not a precision: whole seconds read as Elixir's
%% `~T[12:00:00]' (precision 0), anything else with all six digits.
-spec micro(non_neg_integer()) -> {non_neg_integer(), 0 | 6}.
micro(0) -> {0, 0};
micro(Micro) -> {Micro, 6}.

%% A fixed offset needs no time zone database: UTC is Elixir's own "Etc/UTC";
%% any other offset is named by itself ("+05:30"), as an ISO 8601 offset reads.
-spec datetime(map(), integer()) -> map().
datetime(Fields, 0) ->
    Fields#{'__struct__' => 'Elixir.DateTime', time_zone => <<"Etc/UTC">>,
            zone_abbr => <<"UTC">>, utc_offset => 0, std_offset => 0};
datetime(Fields, Offset) ->
    Name = offset_name(Offset),
    Fields#{'__struct__' => 'Elixir.DateTime', time_zone => Name, zone_abbr => Name,
            utc_offset => Offset, std_offset => 0}.

-spec offset_name(integer()) -> binary().
offset_name(Offset) ->
    Sign = case Offset < 0 of true -> $-; false -> $+ end,
    A = abs(Offset),
    HM = io_lib:format("~c~2..0b:~2..0b", [Sign, A div 3600, A rem 3600 div 60]),
    case A rem 60 of
        0 -> iolist_to_binary(HM);
        S -> iolist_to_binary([HM, io_lib:format(":~2..0b", [S])])
    end.

%% Elixir's Decimal parses Python's text (`str(d)'); a value it refuses (Python's
%% signalling NaN, which Decimal 2 has no form for) stays tagged, as it does when
%% Decimal is not loaded.
-spec decimal(binary(), tuple()) -> term().
decimal(Text, Tagged) ->
    case erlang:module_loaded('Elixir.Decimal') of
        true ->
            try 'Elixir.Decimal':new(Text)
            catch _:_ -> Tagged
            end;
        false ->
            Tagged
    end.
