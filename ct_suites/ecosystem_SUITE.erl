%% @doc pyport as a dependency of other projects, built the way their users build them:
%% a rebar3 application that depends on pyport by git URL (compile, a call from `erl' and
%% from `rebar3 shell', a release that starts and answers) and as a `_checkouts' path
%% dependency. Each project is built from a clean copy of this checkout (a bare git clone of
%% its files as they are now), sharing this checkout's cargo target folder so that Rust's
%% dependencies are compiled once.
%%
%% The shell scripts in ecosystem_SUITE_data/ do the building and print `RESULT' lines; each
%% test case checks one of them.
-module(ecosystem_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([readme_rebar3_section_is_the_sample/1, readme_mix_section_is_the_sample/1]).
-export([rebar3_build_has_docs/1, bootstrap_check_names_what_is_missing/1,
         make_test_as_a_user_prints_the_command/1,
         bootstrap_check_is_quick_when_nothing_is_missing/1]).
-export([mix_project_calls_with_none_as_nil/1, mix_build_has_docs/1, iex_h_shows_docs/1]).
-export([rebar3_git_dep_compiles_and_calls/1, rebar3_shell_calls/1,
         rebar3_release_answers/1, rebar3_release_finds_priv/1,
         rebar3_checkouts_dep_calls/1]).

%% A whole sample build (cargo for pyport's own crate, rebar3, a release) on a busy
%% 2-core machine.
-define(SCRIPT_TIMEOUT_MS, 600000).

all() -> [readme_rebar3_section_is_the_sample, readme_mix_section_is_the_sample,
          bootstrap_check_names_what_is_missing, bootstrap_check_is_quick_when_nothing_is_missing,
          make_test_as_a_user_prints_the_command,
          {group, rebar3}, {group, mix}].

groups() ->
    [{rebar3, [], [rebar3_git_dep_compiles_and_calls, rebar3_shell_calls,
                   rebar3_release_answers, rebar3_release_finds_priv,
                   rebar3_checkouts_dep_calls, rebar3_build_has_docs]},
     {mix, [], [mix_project_calls_with_none_as_nil, mix_build_has_docs, iex_h_shows_docs]}].

init_per_suite(Config) ->
    Data = ?config(data_dir, Config),
    Checkout = filename:dirname(filename:dirname(filename:absname(Data))),
    %% Not under the CT log folder: its name holds '@' and ':', which git URLs and node
    %% names do not like.
    Work = string:trim(os:cmd("mktemp -d /tmp/pyport_eco.XXXXXX")),
    {0, Out} = run(filename:join(Data, "snapshot.sh"), [Checkout, Work], Checkout),
    ct:log("snapshot:~n~ts", [Out]),
    [{checkout, Checkout}, {work, Work} | Config].

end_per_suite(Config) ->
    _ = os:cmd("rm -rf " ++ ?config(work, Config)),
    ok.

init_per_group(rebar3, Config) ->
    case os:find_executable("rebar3") of
        false ->
            {skip, "rebar3 is not installed: run `make bootstrap`"};
        _ ->
            Data = ?config(data_dir, Config),
            {Status, Out} = run(filename:join(Data, "rebar3_sample.sh"),
                                [Data, ?config(work, Config)], ?config(checkout, Config)),
            ct:log("rebar3_sample.sh exited ~p:~n~ts", [Status, Out]),
            [{results, results(Out)}, {script_status, Status} | Config]
    end;
init_per_group(mix, Config) ->
    case os:find_executable("mix") of
        false ->
            {skip, "Elixir (mix) is not installed: run `make bootstrap`"};
        _ ->
            Data = ?config(data_dir, Config),
            {Status, Out} = run(filename:join(Data, "mix_sample.sh"),
                                [Data, ?config(work, Config)], ?config(checkout, Config)),
            ct:log("mix_sample.sh exited ~p:~n~ts", [Status, Out]),
            [{results, results(Out)}, {script_status, Status} | Config]
    end.

end_per_group(_Group, _Config) ->
    ok.

%% The README's "Use it from rebar3" section shows the sample project these tests build: its
%% dependency entry and its module, verbatim.
readme_rebar3_section_is_the_sample(Config) ->
    Data = ?config(data_dir, Config),
    Section = readme_section(?config(checkout, Config), "## Use it from rebar3"),
    {ok, Mod} = file:read_file(filename:join(Data, "hello_rebar/src/hello.erl")),
    {ok, RebarConfig} = file:read_file(filename:join(Data, "hello_rebar/rebar.config")),
    [Deps | _] = binary:split(RebarConfig, <<"\n{relx">>),
    [_, DepsEntry] = binary:split(Deps, <<"\n">>),
    ?assertNotEqual(nomatch, binary:match(Section, Mod)),
    ?assertNotEqual(nomatch, binary:match(Section, DepsEntry)).

%% The README's "Use it from Elixir/mix" section shows the sample Mix project: its
%% dependency entry, its config and its module, verbatim.
readme_mix_section_is_the_sample(Config) ->
    Data = ?config(data_dir, Config),
    Section = readme_section(?config(checkout, Config), "## Use it from Elixir/mix"),
    {ok, Mod} = file:read_file(filename:join(Data, "hello_mix/lib/hello_mix.ex")),
    {ok, Cfg} = file:read_file(filename:join(Data, "hello_mix/config/config.exs")),
    {ok, MixExs} = file:read_file(filename:join(Data, "hello_mix/mix.exs")),
    {match, [Dep]} = re:run(MixExs, "\\{:pyport,[^\n]*", [{capture, all, binary}]),
    [?assertNotEqual(nomatch, binary:match(Section, Part), Part) || Part <- [Mod, Cfg, Dep]].

%% A Mix project with pyport as a `manager: :make' git dependency calls Python from Elixir
%% (a keyword list as kwargs, a SharedDict, a Date struct), and with `none_as: nil' gets nil
%% for None, in replies and SharedDict reads.
mix_project_calls_with_none_as_nil(Config) ->
    ?assertEqual("{4.0, [3, 2, 1], %{\"none\" => nil, \"value\" => 42}, \"2024-02-29\", {:ok, nil}}",
                 result(mix_demo, Config)).

%% In the Mix build Elixir finds pyport's docs (Code.fetch_docs/1, which IEx's h uses).
mix_build_has_docs(Config) ->
    ?assertEqual(":docs_v1", result(mix_docs, Config)).

%% `h :py.call' in IEx prints the documentation of py:call.
iex_h_shows_docs(Config) ->
    ?assertNotEqual("0", result(iex_h, Config)).

%% `make test' and `make demo' run `scripts/bootstrap.sh --check' first: with rebar3 missing
%% from PATH (every other tool there) it fails and names it.
bootstrap_check_names_what_is_missing(Config) ->
    Checkout = ?config(checkout, Config),
    Bin = path_without_rebar3(Config, "id"),
    {Status, Out} = run("-c", ["PATH=\"$1\" exec \"$2\" \"$3\" --check python3", "sh", Bin,
                               os:find_executable("bash"),
                               filename:join(Checkout, "scripts/bootstrap.sh")],
                        Checkout),
    ?assertEqual(1, Status),
    ?assertMatch({match, _}, re:run(Out, "missing OS packages: rebar3;")).

%% Not root and not CI: `make test' (here its first step, `make tools') does not install
%% anything; it prints the command to run and stops.
make_test_as_a_user_prints_the_command(Config) ->
    Checkout = ?config(checkout, Config),
    Bin = path_without_rebar3(Config, "fake_id"),
    %% `id -u' answers 1000 here: an ordinary user.
    ok = file:write_file(filename:join(Bin, "id"), "#!/bin/sh\necho 1000\n"),
    ok = file:change_mode(filename:join(Bin, "id"), 8#755),
    {Status, Out} = run("-c", ["unset CI; PATH=\"$1\" exec \"$2\" -s -C \"$3\" tools", "sh", Bin,
                               os:find_executable("make"), Checkout],
                        Checkout),
    ?assertNotEqual(0, Status),
    ?assertMatch({match, _}, re:run(Out, "Run this first \\(it uses sudo for apt-get\\):  make bootstrap")),
    ?assertEqual(nomatch, re:run(Out, "installing")).

%% ... and it is quick when nothing is missing (a fraction of a second; 5 s bounds it on a
%% busy machine).
bootstrap_check_is_quick_when_nothing_is_missing(Config) ->
    Checkout = ?config(checkout, Config),
    T0 = erlang:monotonic_time(millisecond),
    {Status, Out} = run(filename:join(Checkout, "scripts/bootstrap.sh"), ["--check", "python3"],
                        Checkout),
    ?assertEqual({0, ""}, {Status, Out}),
    ?assert(erlang:monotonic_time(millisecond) - T0 < 5000).

%% The rebar3 build has pyport's docs (h(py) works in its shell).
rebar3_build_has_docs(Config) ->
    ?assertEqual("docs_v1", result(rebar3_docs, Config)).

%% A project that names pyport as a git dependency compiles, and its code calls Python.
rebar3_git_dep_compiles_and_calls(Config) ->
    ?assertEqual("{ok,4.0}", result(compile, Config)).

%% `rebar3 shell' boots pyport with the project and a call works at its prompt.
rebar3_shell_calls(Config) ->
    ?assertEqual("{shell_result,{ok,5.0}}", result(shell, Config)).

%% `rebar3 release' builds a release whose node starts pyport and answers a call.
rebar3_release_answers(Config) ->
    ?assertMatch("{ok, 6.0" ++ _, result(release, Config)).

%% In the release the port program lies in pyport's own priv folder, found by
%% code:priv_dir/1 (not in the build tree the release was made from).
rebar3_release_finds_priv(Config) ->
    Priv = string:trim(result(release_priv, Config), both, "\""),
    Work = ?config(work, Config),
    ?assertEqual(filename:join([Work, "hello/_build/default/rel/hello/lib/pyport-0.1.0/priv"]),
                 Priv),
    ?assertMatch({ok, _}, file:read_file_info(filename:join(Priv, "pyport"))).

%% With pyport under _checkouts/ (a path dependency) the project uses that copy and calls.
rebar3_checkouts_dep_calls(Config) ->
    [Reply, Beam] = string:split(result(checkouts, Config), " "),
    ?assertEqual("{ok,7.0}", Reply),
    ?assertMatch({match, _}, re:run(Beam, "/checkouts/pyport/ebin/py.beam$")).

%%--------------------------------------------------------------------
%% Helpers
%%--------------------------------------------------------------------

%% Runs a script with bash; returns its exit status and its output (stdout and stderr).
%% CARGO_TARGET_DIR points at the checkout's own target folder.
run(Script, Args, Checkout) ->
    Target = case os:getenv("CARGO_TARGET_DIR") of
                 false -> filename:join(Checkout, "target");
                 Dir -> Dir
             end,
    pyport_ct_lib:run_command(os:find_executable("bash"), [Script | Args],
                              [{"CARGO_TARGET_DIR", Target}], ?SCRIPT_TIMEOUT_MS).

%% The text of the README from the heading Title to the next second-level heading.
readme_section(Checkout, Title) ->
    {ok, Readme} = file:read_file(filename:join(Checkout, "README.md")),
    [_, From] = binary:split(Readme, list_to_binary(Title ++ "\n")),
    hd(binary:split(From, <<"\n## ">>)).

%% A folder of links to the tools the bootstrap check looks for, all but rebar3 (and `id'
%% unless Id is "id"), with the Python interpreter itself rather than a launcher such as a
%% pyenv shim (which needs more of PATH).
path_without_rebar3(Config, Id) ->
    Bin = filename:join(?config(priv_dir, Config), "path_without_rebar3_" ++ Id),
    ok = filelib:ensure_dir(filename:join(Bin, "x")),
    [ok = file:make_symlink(Exe, filename:join(Bin, T))
     || T <- ["erl", "erlc", "ct_run", "dialyzer", "elixir", "mix", "sort", "bash", Id],
        Exe <- [os:find_executable(T)], Exe =/= false],
    Python = string:trim(os:cmd("python3 -c 'import sys; print(sys.executable)'")),
    ok = file:make_symlink(Python, filename:join(Bin, "python3")),
    Bin.

%% "RESULT Key Rest" lines of a script's output, as #{Key => Rest}.
results(Out) ->
    Lines = string:split(Out, "\n", all),
    maps:from_list([{K, string:trim(V)} || L <- Lines,
                                          {match, [K, V]} <- [re:run(L, "RESULT (\\S+) ?(.*)$",
                                                                    [{capture, all_but_first, list}])]]).

result(Key, Config) ->
    Results = ?config(results, Config),
    case maps:find(atom_to_list(Key), Results) of
        {ok, V} -> V;
        error -> ct:fail({no_result, Key, {script_status, ?config(script_status, Config)}})
    end.
