%% @doc `make' writes EEP 48 doc chunks, so that h(py) and h(py, call) in erl (and
%% h :py.call in IEx) show pyport's documentation.
-module(docs_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0]).
-export([every_export_of_py_is_documented/1, h_renders_a_function/1,
         module_doc_quotes_code_intact/1]).

all() -> [every_export_of_py_is_documented, h_renders_a_function, module_doc_quotes_code_intact].

every_export_of_py_is_documented(_Config) ->
    {ok, {docs_v1, _, erlang, _, #{<<"en">> := _}, _, Entries}} = code:get_doc(py),
    Documented = [{F, A} || {{function, F, A}, _, _, #{<<"en">> := Doc}, _} <- Entries, Doc =/= []],
    Exports = [FA || FA = {F, _} <- py:module_info(exports), F =/= module_info],
    ?assertEqual([], Exports -- Documented).

%% What h(py, call) prints: the rendered text of call/3,4,5.
h_renders_a_function(_Config) ->
    {ok, Docs} = code:get_doc(py),
    Text = unicode:characters_to_list(shell_docs:render(py, call, Docs)),
    ?assertNotEqual(nomatch, string:find(Text, "Module.Function(*Args, **Kwargs)")).

%% The module doc's quoted code `call('__main__', F, Args)' is one piece of code.
module_doc_quotes_code_intact(_Config) ->
    {ok, Docs} = code:get_doc(py),
    Text = unicode:characters_to_list(shell_docs:render(py, Docs)),
    ?assertNotEqual(nomatch, string:find(Text, "call('__main__', F, Args)")).
