%% @doc pyport as a dependency of other projects, built the way their users build them, from
%% the README's text: a project made by `rebar3 new app' that depends on pyport by git URL
%% (compile, a call from `erl' and from `rebar3 shell', the virtualenv recipe in `rebar3
%% shell', a release that starts and answers) and as a `_checkouts' path dependency; a project
%% made by `mix new' (calls, docs in IEx, the virtualenv recipe in `iex -S mix'). Each project
%% is built from a clean copy of this checkout (a bare git clone of its files as they are now),
%% sharing the cargo target folder every build on the machine shares, so Rust is compiled once.
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
-export([readme_from_elixir_names_a_path_dependency/1, mix_path_dep_calls_with_elixir_values/1,
         mix_path_dep_streams/1, mix_path_dep_h_shows_clean_docs/1]).
-export([rebar3_git_dep_compiles_and_calls/1, rebar3_shell_calls/1,
         rebar3_release_answers/1, rebar3_release_finds_priv/1,
         rebar3_checkouts_dep_calls/1, rebar3_shell_switches_to_a_virtualenv/1,
         iex_switches_to_a_virtualenv/1, readme_shell_recipes_are_what_the_shells_run/1,
         build_without_cargo_says_what_to_install/1]).

%% A whole sample build (cargo for pyport's own crate, rebar3, a release) on a busy
%% 2-core machine.
-define(SCRIPT_TIMEOUT_MS, 600000).

all() -> [readme_rebar3_section_is_the_sample, readme_mix_section_is_the_sample,
          readme_shell_recipes_are_what_the_shells_run, build_without_cargo_says_what_to_install,
          bootstrap_check_names_what_is_missing, bootstrap_check_is_quick_when_nothing_is_missing,
          make_test_as_a_user_prints_the_command, readme_from_elixir_names_a_path_dependency,
          {group, rebar3}, {group, mix}, {group, mix_path}].

groups() ->
    [{rebar3, [], [rebar3_git_dep_compiles_and_calls, rebar3_shell_calls,
                   rebar3_shell_switches_to_a_virtualenv,
                   rebar3_release_answers, rebar3_release_finds_priv,
                   rebar3_checkouts_dep_calls, rebar3_build_has_docs]},
     {mix, [], [mix_project_calls_with_none_as_nil, mix_build_has_docs, iex_h_shows_docs,
                iex_switches_to_a_virtualenv]},
     {mix_path, [], [mix_path_dep_calls_with_elixir_values, mix_path_dep_streams,
                     mix_path_dep_h_shows_clean_docs]}].

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
init_per_group(Group, Config) when Group =:= mix; Group =:= mix_path ->
    Script = case Group of
                 mix -> "mix_sample.sh";
                 mix_path -> "mix_path_sample.sh"
             end,
    case os:find_executable("mix") of
        false ->
            {skip, "Elixir (mix) is not installed: run `make bootstrap`"};
        _ ->
            Data = ?config(data_dir, Config),
            {Status, Out} = run(filename:join(Data, Script),
                                [Data, ?config(work, Config)], ?config(checkout, Config)),
            ct:log("~s exited ~p:~n~ts", [Script, Status, Out]),
            [{results, results(Out)}, {script_status, Status} | Config]
    end.

end_per_group(_Group, _Config) ->
    ok.

%% The README's "Use it from rebar3" section shows what the sample script puts into the
%% project `rebar3 new app' made: the deps and relx block, and the module, verbatim.
readme_rebar3_section_is_the_sample(Config) ->
    Data = ?config(data_dir, Config),
    Section = readme_section(?config(checkout, Config), "## Use it from rebar3"),
    [?assertNotEqual(nomatch, binary:match(Section, Part), Part)
     || F <- ["hello_rebar/src/hello.erl", "hello_rebar/rebar.config.snippet"],
        {ok, Part} <- [file:read_file(filename:join(Data, F))]],
    ?assertNotEqual(nomatch, binary:match(Section, <<"replace `{deps, []}.`">>)),
    ?assertNotEqual(nomatch, binary:match(Section, <<"Add `pyport` to `applications` in `src/hello.app.src` (after `stdlib`)">>)).

%% The README's "Use it from Elixir/mix" section shows the deps function, the config and the
%% module the sample script puts into the project `mix new' made, verbatim.
readme_mix_section_is_the_sample(Config) ->
    Data = ?config(data_dir, Config),
    Section = readme_section(?config(checkout, Config), "## Use it from Elixir/mix"),
    [?assertNotEqual(nomatch, binary:match(Section, Part), Part)
     || F <- ["hello_mix/lib/hello_mix.ex", "hello_mix/config/config.exs", "hello_mix/deps.snippet"],
        {ok, Part} <- [file:read_file(filename:join(Data, F))]].

%% The shell sessions of "Choose a Python or a virtualenv" are what the samples type into
%% `rebar3 shell' and `iex -S mix'.
readme_shell_recipes_are_what_the_shells_run(Config) ->
    Data = ?config(data_dir, Config),
    Section = readme_section(?config(checkout, Config), "## Choose a Python or a virtualenv"),
    {ok, Erl} = file:read_file(filename:join(Data, "shell_venv.erl.txt")),
    {ok, Exs} = file:read_file(filename:join(Data, "shell_venv.exs.txt")),
    Lines = fun(B) -> [L || L <- binary:split(B, <<"\n">>, [global]), L =/= <<>>] end,
    [?assertNotEqual(nomatch, binary:match(Section, <<(integer_to_binary(N))/binary, "> ", L/binary>>), L)
     || {N, L} <- lists:zip(lists:seq(1, 3), Lines(Erl))],
    [?assertNotEqual(nomatch, binary:match(Section, <<"iex(", (integer_to_binary(N))/binary, ")> ", L/binary>>), L)
     || {N, L} <- lists:zip(lists:seq(1, 3), Lines(Exs))].

%% `rebar3 shell': set `python' to a virtualenv, py:restart(), and Python runs there.
rebar3_shell_switches_to_a_virtualenv(Config) ->
    Venv = filename:join(?config(work, Config), "pyport_venv"),
    ?assertEqual("{shell_venv_1,ok} {shell_venv_2,ok} {shell_venv_3,{ok,<<\"" ++ Venv ++ "/bin/python3\">>}}",
                 lists:flatten(lists:join(" ", results_of(shell_venv, Config)))).

%% The same in `iex -S mix'.
iex_switches_to_a_virtualenv(Config) ->
    Venv = filename:join(?config(work, Config), "pyport_venv_mix"),
    ?assertEqual([":ok", ":ok", "{:ok, \"" ++ Venv ++ "/bin/python3\"}"],
                 [result(K, Config) || K <- [iex_venv_1, iex_venv_2, iex_venv_3]]).

%% Without cargo on PATH the build stops at once and says what is missing and how to
%% install it.
build_without_cargo_says_what_to_install(Config) ->
    Checkout = ?config(checkout, Config),
    Bin = path_without_rebar3(Config, "no_cargo"),
    {Status, Out} = run("-c", ["PATH=\"$1\" exec \"$2\" \"$3\" /nonexistent/target python3",
                               "sh", Bin, os:find_executable("bash"),
                               filename:join(Checkout, "scripts/build_port.sh")],
                        Checkout),
    ?assertEqual(1, Status),
    [?assertMatch({match, _}, re:run(Out, P), P)
     || P <- ["needs Rust's cargo, and there is no `cargo' on PATH", "rustup", "apt-get install cargo"]].

%% A Mix project with pyport as a `manager: :make' git dependency calls Python from Elixir
%% (a keyword list as kwargs, a SharedDict, a Date struct), and with `none_as: nil' gets nil
%% for None, in replies and SharedDict reads.
mix_project_calls_with_none_as_nil(Config) ->
    ?assertEqual("{4.0, [3, 2, 1], %{\"none\" => nil, \"value\" => 42}, \"2024-02-29\", {:ok, nil}}",
                 result(mix_demo, Config)).

%% The README's "From Elixir" names pyport as a plain dependency, by git or by path, without
%% `manager: :make': the form mix_path_sample.sh puts into its project.
readme_from_elixir_names_a_path_dependency(Config) ->
    Section = readme_section(?config(checkout, Config), "## From Elixir"),
    [?assertNotEqual(nomatch, binary:match(Section, Part), Part)
     || Part <- [<<"{:pyport, path: \"../pyport\"}">>, <<"{:pyport, git: ">>,
                 <<"config :pyport, elixir: true">>]],
    ?assertEqual(nomatch, binary:match(Section, <<"manager: :make}">>)).

%% A project made by `mix new' with pyport as a path dependency (no manager: :make, a
%% folder not named pyport) compiles offline, calls Python through Pyport, and with
%% `elixir: true' gets a Date struct.
mix_path_dep_calls_with_elixir_values(Config) ->
    ?assertEqual("{:ok, 9.0}", result(path_call, Config)),
    ?assertEqual("{:ok, ~D[2024-02-29]}", result(path_date, Config)).

mix_path_dep_streams(Config) ->
    ?assertEqual("[5, 6, 7]", result(path_stream, Config)).

%% `h Pyport.call' and `h :py.call' in that project's IEx: the docs, without raw tags.
mix_path_dep_h_shows_clean_docs(Config) ->
    ?assertEqual({"1", "1", "0"}, {result(path_h_pyport, Config), result(path_h_py, Config),
                                   result(path_h_raw, Config)}).

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

%% Runs a script with bash; returns its exit status and its output (stdout and stderr). The
%% scripts find their way from their arguments (Dir is unused). The builds use the cargo target folder every build here uses (the Makefile's
%% default, or CARGO_TARGET_DIR when set), as a user's would.
run(Script, Args, Dir) ->
    _ = Dir,
    pyport_ct_lib:run_command(os:find_executable("bash"), [Script | Args], [], ?SCRIPT_TIMEOUT_MS).

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

%% The values of the "RESULT Key_N ..." lines, in order.
results_of(Key, Config) ->
    [V || {K, V} <- lists:sort(maps:to_list(?config(results, Config))),
          lists:prefix(atom_to_list(Key), K)].

result(Key, Config) ->
    Results = ?config(results, Config),
    case maps:find(atom_to_list(Key), Results) of
        {ok, V} -> V;
        error -> ct:fail({no_result, Key, {script_status, ?config(script_status, Config)}})
    end.
