%% @private
%% @doc The checks and conversions of what users pass to {@link py}: module and
%% function names, code, keyword arguments and the variables bound before code
%% runs. Anything that is not of the documented shape raises `error(badarg)' at
%% the call site, before a request is built.
-module(pyport_args).

-export([is_proper_list/1, name/1, code/1, kwargs/1, locals/1]).

%% @doc Whether a list ends in `[]'.
-spec is_proper_list(list()) -> boolean().
is_proper_list([]) -> true;
is_proper_list([_ | T]) -> is_proper_list(T);
is_proper_list(_) -> false.

%% @doc A module or function name as UTF-8: an atom, a binary or a string.
-spec name(term()) -> binary().
name(A) when is_atom(A) -> atom_to_binary(A, utf8);
name(B) when is_binary(B) -> utf8(B);
name(L) when is_list(L) -> chars(L);
name(_) -> erlang:error(badarg).

%% @doc Python source code as UTF-8: a binary or a string.
-spec code(term()) -> binary().
code(B) when is_binary(B) -> utf8(B);
code(L) when is_list(L) -> chars(L);
code(_) -> erlang:error(badarg).

%% A binary that must be text: invalid UTF-8 is an argument error.
-spec utf8(binary()) -> binary().
utf8(B) ->
    case unicode:characters_to_binary(B) of
        Valid when is_binary(Valid) -> B;
        _ -> erlang:error(badarg)
    end.

-spec chars(list()) -> binary().
chars(L) ->
    try unicode:characters_to_binary(L) of
        B when is_binary(B) -> B;
        _ -> erlang:error(badarg)
    catch
        error:badarg -> erlang:error(badarg)
    end.

%% @doc Kwargs: atom keys become UTF-8 binaries; two keys naming the same
%% argument (`a' and `<<"a">>') are an argument error.
-spec kwargs(py:kwargs()) -> #{binary() => term()}.
kwargs([]) ->
    #{};
kwargs(Kwargs) when is_list(Kwargs) ->
    %% A keyword list: a key given twice is an argument error, as in Python.
    is_proper_list(Kwargs) orelse erlang:error(badarg),
    Pairs = [case P of
                 {K, _} when is_atom(K); is_binary(K) -> P;
                 _ -> erlang:error(badarg)
             end || P <- Kwargs],
    Map = maps:from_list(Pairs),
    map_size(Map) =:= length(Pairs) orelse erlang:error(badarg),
    kwargs(Map);
kwargs(Kwargs) when map_size(Kwargs) =:= 0 ->
    Kwargs;
kwargs(Kwargs) ->
    Norm = maps:fold(fun(K, V, Acc) when is_binary(K) -> Acc#{utf8(K) => V};
                        (K, V, Acc) when is_atom(K) -> Acc#{atom_to_binary(K, utf8) => V};
                        (_, _, _) -> erlang:error(badarg)
                     end, #{}, Kwargs),
    map_size(Norm) =:= map_size(Kwargs) orelse erlang:error(badarg),
    Norm.

%% @doc Locals: every key must be a Python identifier, not a dunder name and not a
%% keyword. Keys are NFKC-normalised as Python normalises identifiers in
%% source code, so a key binds the variable that code spelling it refers to.
-spec locals(map()) -> #{binary() => term()}.
locals(Locals) when map_size(Locals) =:= 0 ->
    Locals;
locals(Locals) ->
    Norm = maps:fold(fun(K, V, Acc) -> Acc#{identifier(K) => V} end, #{}, Locals),
    map_size(Norm) =:= map_size(Locals) orelse erlang:error(badarg),
    Norm.

-spec identifier(term()) -> binary().
identifier(A) when is_atom(A) ->
    identifier(atom_to_binary(A, utf8));
identifier(B) when is_binary(B) ->
    Name = case ascii_identifier(B) of
               true -> B;
               non_ascii -> unicode_identifier(B);
               false -> erlang:error(badarg)
           end,
    (is_keyword(Name) orelse is_dunder(Name)) andalso erlang:error(badarg),
    Name;
identifier(_) ->
    erlang:error(badarg).

-spec ascii_identifier(binary()) -> boolean() | non_ascii.
ascii_identifier(<<C, Rest/binary>>)
  when (C >= $a andalso C =< $z); (C >= $A andalso C =< $Z); C =:= $_ ->
    ascii_identifier_rest(Rest);
ascii_identifier(<<C, _/binary>>) when C >= 128 ->
    non_ascii;
ascii_identifier(_) ->
    false.

-spec ascii_identifier_rest(binary()) -> boolean() | non_ascii.
ascii_identifier_rest(<<C, Rest/binary>>)
  when (C >= $a andalso C =< $z); (C >= $A andalso C =< $Z); (C >= $0 andalso C =< $9);
       C =:= $_ ->
    ascii_identifier_rest(Rest);
ascii_identifier_rest(<<>>) ->
    true;
ascii_identifier_rest(<<C, _/binary>>) when C >= 128 ->
    non_ascii;
ascii_identifier_rest(_) ->
    false.

%% Python identifiers: XID_Start (or _) followed by XID_Continue, checked
%% after NFKC normalisation (approximated with Unicode general categories).
-spec unicode_identifier(binary()) -> binary().
unicode_identifier(B) ->
    Norm = try unicode:characters_to_nfkc_binary(B) of
               N when is_binary(N) -> N;
               _ -> erlang:error(badarg)
           catch
               error:badarg -> erlang:error(badarg)
           end,
    Pattern = "\\A[\\p{L}\\p{Nl}_][\\p{L}\\p{Nl}\\p{Mn}\\p{Mc}\\p{Nd}\\p{Pc}]*\\z",
    case re:run(Norm, Pattern, [unicode, ucp, {capture, none}]) of
        match -> Norm;
        nomatch -> erlang:error(badarg)
    end.

-spec is_dunder(binary()) -> boolean().
is_dunder(<<"__", _/binary>> = B) when byte_size(B) >= 5 ->
    binary:part(B, byte_size(B) - 2, 2) =:= <<"__">>;
is_dunder(_) ->
    false.

-spec is_keyword(binary()) -> boolean().
is_keyword(<<"False">>) -> true;
is_keyword(<<"None">>) -> true;
is_keyword(<<"True">>) -> true;
is_keyword(<<"and">>) -> true;
is_keyword(<<"as">>) -> true;
is_keyword(<<"assert">>) -> true;
is_keyword(<<"async">>) -> true;
is_keyword(<<"await">>) -> true;
is_keyword(<<"break">>) -> true;
is_keyword(<<"class">>) -> true;
is_keyword(<<"continue">>) -> true;
is_keyword(<<"def">>) -> true;
is_keyword(<<"del">>) -> true;
is_keyword(<<"elif">>) -> true;
is_keyword(<<"else">>) -> true;
is_keyword(<<"except">>) -> true;
is_keyword(<<"finally">>) -> true;
is_keyword(<<"for">>) -> true;
is_keyword(<<"from">>) -> true;
is_keyword(<<"global">>) -> true;
is_keyword(<<"if">>) -> true;
is_keyword(<<"import">>) -> true;
is_keyword(<<"in">>) -> true;
is_keyword(<<"is">>) -> true;
is_keyword(<<"lambda">>) -> true;
is_keyword(<<"nonlocal">>) -> true;
is_keyword(<<"not">>) -> true;
is_keyword(<<"or">>) -> true;
is_keyword(<<"pass">>) -> true;
is_keyword(<<"raise">>) -> true;
is_keyword(<<"return">>) -> true;
is_keyword(<<"try">>) -> true;
is_keyword(<<"while">>) -> true;
is_keyword(<<"with">>) -> true;
is_keyword(<<"yield">>) -> true;
is_keyword(_) -> false.
