%% @private
%% @doc The pool's shared-memory file: where the SharedDicts of every port live.
%%
%% One file per running pool, `pyport-<node>-<os pid>-<n>.sd' in the app env
%% `shared_dict_dir' (default `/dev/shm'), of `shared_dict_memory' bytes (default
%% 1 GiB; sparse: it costs memory only as dicts fill it). The first port to start
%% creates it (mode 0600) and every port maps it. It outlives any port, and goes when
%% the application stops. Files of pools whose VM is gone (killed with `kill -9') are
%% removed when the next pool starts.
-module(pyport_shm).

-export([setup/0, remove/0, args/0, generation/0, path/0]).

-define(KEY, {?MODULE, pool}).
-define(DEFAULT_SIZE, (1 bsl 30)).
%% Smaller than this leaves no room for a dict.
-define(MIN_SIZE, (1 bsl 20)).
-define(SUFFIX, ".sd").

%% @doc Chooses this pool's file and generation (by the supervisor, at its start) after
%% removing the files of dead pools. `{error, {bad_config, ...}}' for a bad app env.
-spec setup() -> ok | {error, term()}.
setup() ->
    case {dir(), size()} of
        {{ok, Dir}, {ok, Size}} ->
            _ = remove_stale(Dir),
            %% Never reused in this VM, across restarts of the application: a handle of
            %% an earlier pool can never name a dict of this one.
            N = erlang:unique_integer([positive]),
            Path = filename:join(Dir, lists:flatten(["pyport-", safe_node(), "-", os:getpid(), "-",
                                                     integer_to_list(N), ?SUFFIX])),
            persistent_term:put(?KEY, #{path => Path, size => Size, generation => N}),
            ok;
        {{error, _} = E, _} -> E;
        {_, {error, _} = E} -> E
    end.

%% @doc Removes this pool's file (the application stopped; ports that still map it keep
%% their mapping until they exit).
-spec remove() -> ok.
remove() ->
    case persistent_term:get(?KEY, undefined) of
        #{path := Path} ->
            _ = file:delete(Path),
            _ = persistent_term:erase(?KEY),
            ok;
        undefined ->
            ok
    end.

%% @doc The port program's flags for the pool's file (none when no pool runs).
-spec args() -> [string()].
args() ->
    case persistent_term:get(?KEY, undefined) of
        #{path := Path, size := Size, generation := Gen} ->
            ["--shm-path", Path, "--shm-size", integer_to_list(Size),
             "--pool-generation", integer_to_list(Gen)];
        undefined ->
            []
    end.

%% @doc The pool's generation, carried by every SharedDict handle: `undefined' when no
%% pool runs.
-spec generation() -> pos_integer() | undefined.
generation() ->
    case persistent_term:get(?KEY, undefined) of
        #{generation := G} -> G;
        undefined -> undefined
    end.

%% @doc The pool's file; `undefined' when no pool runs.
-spec path() -> file:filename() | undefined.
path() ->
    case persistent_term:get(?KEY, undefined) of
        #{path := P} -> P;
        undefined -> undefined
    end.

%%====================================================================
%% Internal
%%====================================================================

-spec dir() -> {ok, file:filename()} | {error, term()}.
dir() ->
    case application:get_env(pyport, shared_dict_dir) of
        undefined ->
            case filelib:is_dir("/dev/shm") of
                true -> {ok, "/dev/shm"};
                false -> {ok, temp_dir()}
            end;
        {ok, D} when is_list(D); is_binary(D) ->
            case filelib:is_dir(D) of
                true -> {ok, unicode:characters_to_list(D)};
                false -> {error, {bad_config, {shared_dict_dir, D, not_a_directory}}}
            end;
        {ok, Other} ->
            {error, {bad_config, {shared_dict_dir, Other}}}
    end.

-spec temp_dir() -> file:filename().
temp_dir() ->
    case os:getenv("TMPDIR") of
        false -> "/tmp";
        "" -> "/tmp";
        T -> T
    end.

-spec size() -> {ok, pos_integer()} | {error, term()}.
size() ->
    case application:get_env(pyport, shared_dict_memory, ?DEFAULT_SIZE) of
        N when is_integer(N), N >= ?MIN_SIZE -> {ok, N};
        Other -> {error, {bad_config, {shared_dict_memory, Other, {at_least, ?MIN_SIZE}}}}
    end.

%% The node's name as it may appear in a file name.
-spec safe_node() -> string().
safe_node() ->
    [case C of
         _ when C >= $a, C =< $z; C >= $A, C =< $Z; C >= $0, C =< $9; C =:= $_; C =:= $. -> C;
         _ -> $_
     end || C <- atom_to_list(node())].

%% Removes the files whose VM is not running any more (or is this VM: an earlier pool
%% of it, whose application did not stop cleanly), and what a port that was creating
%% one of them left.
-spec remove_stale(file:filename()) -> [file:filename()].
remove_stale(Dir) ->
    Own = os:getpid(),
    [begin _ = file:delete(filename:join(Dir, F)), F end
     || F <- filelib:wildcard("pyport-*" ++ ?SUFFIX, Dir) ++ filelib:wildcard("pyport-*" ++ ?SUFFIX ++ ".new-*", Dir),
        case owner_pid(F) of
            {ok, Own} -> true;
            {ok, Pid} -> not vm_alive(Pid);
            error -> false
        end].

%% `pyport-<node>-<pid>-<n>.sd' (or a port's `.sd.new-<os pid>' that it did not get to
%% rename): the node may hold dashes, so the pid is read from the end.
-spec owner_pid(string()) -> {ok, string()} | error.
owner_pid(F) ->
    [Base | _] = string:split(F, ?SUFFIX, trailing),
    case lists:reverse(string:split(Base, "-", all)) of
        [N, Pid | _] ->
            case lists:all(fun(C) -> C >= $0 andalso C =< $9 end, N ++ Pid) andalso Pid =/= "" of
                true -> {ok, Pid};
                false -> error
            end;
        _ ->
            error
    end.

%% Whether `Pid' is a running Erlang VM (a pid reused by anything else is not).
-spec vm_alive(string()) -> boolean().
vm_alive(Pid) ->
    case file:read_file("/proc/" ++ Pid ++ "/comm") of
        {ok, Comm} -> binary:match(Comm, <<"beam">>) =/= nomatch;
        {error, _} -> false
    end.
