#!/usr/bin/env escript
%% Usage: doc_chunks.escript SRC_DIR EBIN_DIR DOC_DIR
%%
%% Writes EEP 48 doc chunks of every module in SRC_DIR with edoc's chunk doclet into
%% DOC_DIR/chunks/, and also puts each one into its module's .beam in EBIN_DIR as a "Docs"
%% chunk. The file is what Erlang's code:get_doc/1 reads (from ebin/../doc/chunks); the beam
%% chunk is what Elixir's Code.fetch_docs/1 (IEx's h) finds in a Mix build, where
%% _build/ENV/lib/pyport holds links to ebin/ and priv/ only.
%%
%% edoc's chunks are cleaned on the way (see clean/1), so that Elixir's renderer (IEx's h)
%% shows plain text as Erlang's shell_docs does: links become their text, a one-line
%% ```code''' quote inside a sentence becomes inline code, text outside any paragraph gets
%% one, and two quoted pieces of code keep the space between them.
-mode(compile).

main([Src, Ebin, Doc]) ->
    Files = filelib:wildcard(filename:join(Src, "*.erl")),
    ok = edoc:files(Files, [{doclet, edoc_doclet_chunks}, {layout, edoc_layout_chunks},
                            {dir, Doc}, {preprocess, true}, {includes, [Src]}]),
    lists:foreach(fun(F) -> embed(filename:basename(F, ".erl"), Ebin, Doc) end, Files);
main(_) ->
    io:format(standard_error, "usage: doc_chunks.escript SRC_DIR EBIN_DIR DOC_DIR~n", []),
    halt(2).

embed(Mod, Ebin, Doc) ->
    File = filename:join([Doc, "chunks", Mod ++ ".chunk"]),
    {ok, Chunk0} = file:read_file(File),
    Chunk = term_to_binary(clean(binary_to_term(Chunk0)), [compressed]),
    ok = file:write_file(File, Chunk),
    Beam = filename:join(Ebin, Mod ++ ".beam"),
    {ok, _, Chunks} = beam_lib:all_chunks(Beam),
    {ok, Bin} = beam_lib:build_module(lists:keydelete("Docs", 1, Chunks) ++ [{"Docs", Chunk}]),
    ok = file:write_file(Beam, Bin).

%% The module's doc and every entry's doc, cleaned.
clean({docs_v1, Anno, Lang, Format, ModDoc, Meta, Entries}) ->
    {docs_v1, Anno, Lang, Format, clean_doc(ModDoc), Meta,
     [{Kind, EAnno, Sig, clean_doc(D), EMeta} || {Kind, EAnno, Sig, D, EMeta} <- Entries]}.

clean_doc(#{} = Langs) -> maps:map(fun(_Lang, Doc) -> blocks(Doc) end, Langs);
clean_doc(Other) -> Other.

%% A list of block elements: runs of inline content become paragraphs.
blocks(Nodes) ->
    blocks(Nodes, [], []).

blocks([], [], Acc) ->
    lists:reverse(Acc);
blocks([], Run, Acc) ->
    blocks([], [], [paragraph(lists:reverse(Run)) | Acc]);
blocks([{p, _, C} | Rest], [{pre, _, _} = Pre | Run], Acc) ->
    %% edoc ends a paragraph at a one-line ```quote''' inside it: the text after the
    %% quote goes on the same paragraph.
    case is_inline(Pre) of
        true -> blocks(Rest, [], [paragraph(lists:reverse([Pre | Run]) ++ C) | Acc]);
        false -> blocks(Rest, [], [block({p, [], C}) | blocks([], [Pre | Run], Acc)])
    end;
blocks([Node | Rest], Run, Acc) ->
    case is_inline(Node) of
        true -> blocks(Rest, [Node | Run], Acc);
        false when Run =:= [] -> blocks(Rest, [], [block(Node) | Acc]);
        false -> blocks(Rest, [], [block(Node), paragraph(lists:reverse(Run)) | Acc])
    end.

paragraph(Inline) ->
    {p, [], inline(Inline)}.

block({p, A, C}) -> {p, A, inline(C)};
block({pre, A, [{code, _, _}] = C}) -> {pre, A, C};
block({pre, A, C}) -> {pre, A, [{code, [], [dedent(text(C))]}]};
block({Tag, A, Items}) when Tag =:= ul; Tag =:= ol; Tag =:= dl -> {Tag, A, [item(I) || I <- Items]};
block(Other) -> Other.

%% A list item holds either inline content only, or blocks.
item({Tag, A, C}) ->
    case lists:all(fun is_inline/1, C) of
        true -> {Tag, A, inline(C)};
        false -> {Tag, A, blocks(C)}
    end;
item(Other) ->
    Other.

is_inline(B) when is_binary(B) -> true;
is_inline({pre, _, C}) -> binary:match(string:trim(text(C)), <<"\n">>) =:= nomatch;
is_inline({Tag, _, _}) -> lists:member(Tag, [a, code, em, i, strong, b, br]);
is_inline(_) -> false.

%% Inline content: a link is its text, a one-line pre is code, and a space goes back
%% between two elements that edoc wrote next to each other (it drops one that stood
%% alone between two quotes).
inline(Nodes) ->
    spaced(lists:flatmap(fun inline_node/1, pre_spaced(Nodes))).

%% The text around a one-line ```quote''' keeps a space from it (edoc drops it).
pre_spaced([B, {pre, _, _} = P | Rest]) when is_binary(B) ->
    [space_after(B) | pre_spaced([P | Rest])];
pre_spaced([{pre, _, _} = P, B | Rest]) when is_binary(B) ->
    [P | pre_spaced([space_before(B) | Rest])];
pre_spaced([X | Rest]) ->
    [X | pre_spaced(Rest)];
pre_spaced([]) ->
    [].

space_after(B) ->
    case re:run(B, "[\\s(\\[]$", [unicode]) of
        nomatch -> <<B/binary, " ">>;
        _ -> B
    end.

space_before(B) ->
    case re:run(B, "^[\\s,.;:)\\]]", [unicode]) of
        nomatch -> <<" ", B/binary>>;
        _ -> B
    end.

inline_node({a, _, C}) -> inline(C);
inline_node({pre, _, C}) -> [{code, [], [string:trim(text(C))]}];
inline_node({Tag, A, C}) when is_list(C) -> [{Tag, A, lists:flatmap(fun inline_node/1, C)}];
inline_node(Other) -> [Other].

spaced([{_, _, _} = X, {_, _, _} = Y | Rest]) -> [X, <<" ">> | spaced([Y | Rest])];
spaced([X | Rest]) -> [X | spaced(Rest)];
spaced([]) -> [].

text(Nodes) when is_list(Nodes) -> unicode:characters_to_binary([text(N) || N <- Nodes]);
text({_, _, C}) -> text(C);
text(B) when is_binary(B) -> B.

%% A code block without the indentation every line shares (edoc keeps the source's).
dedent(Text) ->
    Lines = string:split(string:trim(Text, trailing), "\n", all),
    Cut = case [indent(L) || L <- Lines, string:trim(L) =/= <<>>] of
              [] -> 0;
              Indents -> lists:min(Indents)
          end,
    unicode:characters_to_binary(lists:join("\n", [string:slice(L, min(Cut, indent(L))) || L <- Lines])).

indent(L) -> string:length(L) - string:length(string:trim(L, leading)).
