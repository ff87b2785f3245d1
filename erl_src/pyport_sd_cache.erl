%% @doc The VM's read cache of SharedDict values.
%%
%% An Erlang-side `py:shared_dict_get/2,3' of a cached value is answered from
%% this ETS table, without a round trip to the port. Only `pyport_server'
%% writes the table: it inserts the reply bytes of a `get' the port marked
%% cacheable, and deletes entries when the port says they changed. The port
%% sends those invalidations in the same ordered stream as its replies, and
%% the server applies each before it forwards anything that came after it, so
%% whoever has seen the effect of a write (an `ok' from a set, a call's reply)
%% never reads an older value from here afterwards. Callers decode the bytes
%% themselves.
%%
%% The table is bounded in bytes (app env `shared_dict_cache_bytes', default
%% 64 MiB): an insert that would go over the bound empties the table first.
-module(pyport_sd_cache).

-export([new/0, lookup/2, insert/4, invalidate/2, invalidate_dict/1, clear/0,
         stats/0, max_bytes/0]).

-define(TABLE, pyport_sd_cache).
-define(COUNTERS, {?MODULE, counters}).
-define(HITS, 1).
-define(MISSES, 2).
-define(BYTES, 3).
%% Per-entry overhead counted against the bound besides key and value bytes.
-define(ENTRY_OVERHEAD, 64).
-define(DEFAULT_MAX_BYTES, 64 * 1024 * 1024).

%% @doc Creates the (empty) table, owned by the calling process (the supervisor: the
%% pool's servers all write it), or empties it.
-spec new() -> ok.
new() ->
    _ = case ets:whereis(?TABLE) of
            undefined -> ets:new(?TABLE, [named_table, public, ordered_set, {read_concurrency, true},
                                          {write_concurrency, true}]);
            _ -> ets:delete_all_objects(?TABLE)
        end,
    counters:put(counters(), ?BYTES, 0),
    ok.

%% @doc The cached reply payload of a `get' of `Key' in `SD', or `miss'. Runs in
%% the caller's process.
-spec lookup(tuple(), binary()) -> {ok, binary()} | miss.
lookup(SD, Key) ->
    try ets:lookup(?TABLE, {SD, Key}) of
        [{_, Payload}] ->
            count(?HITS),
            {ok, Payload};
        [] ->
            count(?MISSES),
            miss
    catch
        error:badarg ->
            %% No server (yet): nothing is cached.
            miss
    end.

%% Only the server creates the counters (callers never race to).
-spec count(?HITS | ?MISSES) -> ok.
count(Ix) ->
    case persistent_term:get(?COUNTERS, undefined) of
        undefined -> ok;
        C -> counters:add(C, Ix, 1)
    end.

%% @doc Caches `Payload' (server only). `MaxBytes' bounds the whole table.
-spec insert(tuple(), binary(), binary(), non_neg_integer()) -> ok.
insert(SD, Key, Payload, MaxBytes) ->
    C = counters(),
    Size = entry_size(Key, Payload),
    _ = delete_entry(C, {SD, Key}),
    case Size > MaxBytes of
        true ->
            ok;
        false ->
            case counters:get(C, ?BYTES) + Size > MaxBytes of
                true -> clear();
                false -> ok
            end,
            true = ets:insert(?TABLE, {{SD, Key}, Payload}),
            counters:add(C, ?BYTES, Size)
    end.

%% @doc Forgets one key of a dict (server only).
-spec invalidate(tuple(), binary()) -> ok.
invalidate(SD, Key) ->
    _ = delete_entry(counters(), {SD, Key}),
    ok.

%% @doc Forgets every key of a dict (server only): destroyed or cleared.
-spec invalidate_dict(tuple()) -> ok.
invalidate_dict(SD) ->
    %% The key's first element is bound: on an ordered_set this visits only the
    %% dict's own entries.
    Entries = ets:select(?TABLE, [{{{SD, '$1'}, '$2'}, [], [{{'$1', '$2'}}]}]),
    C = counters(),
    lists:foreach(fun({Key, _}) -> delete_entry(C, {SD, Key}) end, Entries).

%% @doc Forgets everything (server only): the port restarted, or the bound was hit.
-spec clear() -> ok.
clear() ->
    true = ets:delete_all_objects(?TABLE),
    counters:put(counters(), ?BYTES, 0).

%% @doc Hits and misses since the VM started, and what the table holds now.
-spec stats() -> #{atom() => non_neg_integer()}.
stats() ->
    C = case persistent_term:get(?COUNTERS, undefined) of
            undefined -> counters:new(3, []);
            Ref -> Ref
        end,
    Entries = case ets:info(?TABLE, size) of
                  N when is_integer(N) -> N;
                  undefined -> 0
              end,
    #{cache_hits => counters:get(C, ?HITS),
      cache_misses => counters:get(C, ?MISSES),
      cache_bytes => counters:get(C, ?BYTES),
      cache_entries => Entries}.

%% @doc The bound on the table's bytes: app env `shared_dict_cache_bytes'.
-spec max_bytes() -> non_neg_integer().
max_bytes() ->
    case application:get_env(pyport, shared_dict_cache_bytes) of
        {ok, N} when is_integer(N), N >= 0 -> N;
        _ -> ?DEFAULT_MAX_BYTES
    end.

%%====================================================================
%% Internal
%%====================================================================

-spec delete_entry(counters:counters_ref(), {tuple(), binary()}) -> ok.
delete_entry(C, {_SD, Key} = K) ->
    case ets:take(?TABLE, K) of
        [{_, Old}] -> counters:sub(C, ?BYTES, entry_size(Key, Old));
        [] -> ok
    end.

-spec entry_size(binary(), binary()) -> non_neg_integer().
entry_size(Key, Payload) ->
    byte_size(Key) + byte_size(Payload) + ?ENTRY_OVERHEAD.

%% The counters outlive the server (hits and misses count since the VM started).
%% Created by the server only.
-spec counters() -> counters:counters_ref().
counters() ->
    case persistent_term:get(?COUNTERS, undefined) of
        undefined ->
            C = counters:new(3, [write_concurrency]),
            ok = persistent_term:put(?COUNTERS, C),
            C;
        C ->
            C
    end.
