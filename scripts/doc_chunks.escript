#!/usr/bin/env escript
%% Usage: doc_chunks.escript SRC_DIR EBIN_DIR DOC_DIR
%%
%% Writes EEP 48 doc chunks of every module in SRC_DIR with edoc's chunk doclet into
%% DOC_DIR/chunks/, and also puts each one into its module's .beam in EBIN_DIR as a "Docs"
%% chunk. The file is what Erlang's code:get_doc/1 reads (from ebin/../doc/chunks); the beam
%% chunk is what Elixir's Code.fetch_docs/1 (IEx's h) finds in a Mix build, where
%% _build/ENV/lib/pyport holds links to ebin/ and priv/ only.
main([Src, Ebin, Doc]) ->
    Files = filelib:wildcard(filename:join(Src, "*.erl")),
    ok = edoc:files(Files, [{doclet, edoc_doclet_chunks}, {layout, edoc_layout_chunks},
                            {dir, Doc}, {preprocess, true}, {includes, [Src]}]),
    lists:foreach(fun(F) -> embed(filename:basename(F, ".erl"), Ebin, Doc) end, Files);
main(_) ->
    io:format(standard_error, "usage: doc_chunks.escript SRC_DIR EBIN_DIR DOC_DIR~n", []),
    halt(2).

embed(Mod, Ebin, Doc) ->
    {ok, Chunk} = file:read_file(filename:join([Doc, "chunks", Mod ++ ".chunk"])),
    Beam = filename:join(Ebin, Mod ++ ".beam"),
    {ok, _, Chunks} = beam_lib:all_chunks(Beam),
    {ok, Bin} = beam_lib:build_module(lists:keydelete("Docs", 1, Chunks) ++ [{"Docs", Chunk}]),
    ok = file:write_file(Beam, Bin).
