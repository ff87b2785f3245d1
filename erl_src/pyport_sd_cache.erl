%% @doc The VM's read cache of SharedDict values, kept correct across every port of
%% the pool.
%%
%% An Erlang-side `py:shared_dict_get/2,3' of a cached value is answered from this ETS
%% table, without a round trip to a port. The dicts live in shared memory that every
%% port changes (README "Speed and consistency"), and each port's replies and
%% invalidations reach the VM through its own server, in its own order. So an entry is
%% trusted only if nothing that changed it could have been applied after the read that
%% produced it:
%% <ul>
%% <li>Every read sent to a port takes a <em>stamp</em> from one clock first; its
%% cached reply is kept with that stamp.</li>
%% <li>Every invalidation (of a key, or of a whole dict) takes a stamp when it is
%% applied and raises the key's (or dict's) bucket to it: an `atomics' array indexed
%% by a hash. An entry whose stamp is below its key's bucket, its dict's bucket or
%% the global floor is stale: a lookup treats it as missing (and so does nothing else
%% need to be ordered across servers).</li>
%% <li>A Python-side write of a cached entry waits, in its port, until its server has
%% applied the invalidation: the new value is visible to no one before the VM has
%% forgotten the old one (whoever sees the write, through any port, reads it or a
%% newer one here).</li>
%% <li>An Erlang-side write puts a <em>marker</em> in the table for its key while it is
%% in flight ({@link write_begin/2}, {@link write_end/2}): a key with a marker is never
%% answered from here nor cached, and its bucket is raised when the write ends. Changes
%% of a whole dict (a destroy from either side, a dead owner's dicts) are made by a port,
%% which waits for {@link invalidate_dict/1} as for a Python-side write.</li>
%% <li>A port that dies with changes waiting for the VM may leave their counts behind
%% in shared memory, which a later port start may drop: the floor is raised and every
%% value forgotten ({@link clear/0}), so that nothing cached before counts.</li>
%% </ul>
%% Callers decode the bytes themselves.
%%
%% The table is bounded in bytes (app env `shared_dict_cache_bytes', default 64 MiB):
%% an insert that would go over the bound empties the table of values first.
-module(pyport_sd_cache).

-export([new/0, stamp/0, lookup/2, insert/5, invalidate/2, invalidate_dict/1, clear/0,
         write_begin/2, write_end/2, stats/0, max_bytes/0]).

-define(TABLE, pyport_sd_cache).
%% Atom keys: persistent_term hashes an atom in about half the time of a tuple, and a
%% cache hit reads both.
-define(STATE, pyport_sd_cache_state).
-define(COUNTERS, pyport_sd_cache_counters).
-define(HITS, 1).
-define(MISSES, 2).
-define(BYTES, 3).
%% Per-entry overhead counted against the bound besides key and value bytes.
-define(ENTRY_OVERHEAD, 64).
-define(DEFAULT_MAX_BYTES, 64 * 1024 * 1024).
%% Buckets of keys and of dicts (hash collisions only cost cache hits).
-define(KEY_BUCKETS, 65536).
-define(DICT_BUCKETS, 4096).
%% In the `stamps' array: the clock, the floor, then the key buckets, then the dict buckets.
-define(CLOCK, 1).
-define(FLOOR, 2).
-define(KEY_IX(SD, Key), (3 + erlang:phash2({SD, Key}, ?KEY_BUCKETS))).
-define(DICT_IX(SD), (3 + ?KEY_BUCKETS + erlang:phash2(SD, ?DICT_BUCKETS))).
%% An Erlang-side write in flight: `{{SD, Key}, ?MARKER, Count}'.
-define(MARKER, '$pyport_write').

-record(cache, {stamps :: atomics:atomics_ref()}).

%% @doc Creates the (empty) table and its clock, owned by the calling process (the
%% supervisor: the pool's servers all write them), or empties them.
-spec new() -> ok.
new() ->
    _ = case ets:whereis(?TABLE) of
            %% Not write_concurrency: on an ordered_set that makes a contention-adapting
            %% tree, and hits (what this table is for) measured slower with it.
            undefined -> ets:new(?TABLE, [named_table, public, ordered_set, {read_concurrency, true}]);
            _ -> ets:delete_all_objects(?TABLE)
        end,
    persistent_term:put(?STATE, #cache{stamps = atomics:new(2 + ?KEY_BUCKETS + ?DICT_BUCKETS, [{signed, false}])}),
    counters:put(counters(), ?BYTES, 0),
    ok.

%% @doc A stamp for a read about to be sent to a port (see the module doc).
-spec stamp() -> pos_integer().
stamp() ->
    #cache{stamps = A} = persistent_term:get(?STATE),
    atomics:add_get(A, ?CLOCK, 1).

%% @doc The cached reply payload of a `get' of `Key' in `SD', or `miss'. Runs in
%% the caller's process.
-spec lookup(tuple(), binary()) -> {ok, binary()} | miss.
lookup(SD, Key) ->
    try ets:lookup(?TABLE, {SD, Key}) of
        [{_, Stamp, Payload, KeyIx, DictIx}] ->
            case fresh(KeyIx, DictIx, Stamp) of
                true -> count(?HITS), {ok, Payload};
                false -> count(?MISSES), miss
            end;
        _ ->
            count(?MISSES),
            miss
    catch
        error:badarg ->
            %% Not started (yet): nothing is cached.
            miss
    end.

%% Whether nothing that invalidates an entry read at `Stamp' has been applied since.
%% The bucket indexes are kept in the entry: hashing the handle and key costs more than
%% the rest of a hit.
-spec fresh(pos_integer(), pos_integer(), pos_integer()) -> boolean().
fresh(KeyIx, DictIx, Stamp) ->
    #cache{stamps = A} = persistent_term:get(?STATE),
    atomics:get(A, KeyIx) < Stamp andalso atomics:get(A, DictIx) < Stamp
        andalso atomics:get(A, ?FLOOR) < Stamp.

%% Only the supervisor creates the counters (callers never race to).
-spec count(?HITS | ?MISSES) -> ok.
count(Ix) ->
    case persistent_term:get(?COUNTERS, undefined) of
        undefined -> ok;
        C -> counters:add(C, Ix, 1)
    end.

%% @doc Caches `Payload', the reply of a read stamped `Stamp' (by a server).
%% `MaxBytes' bounds the whole table. Nothing is cached for a key with an
%% Erlang-side write in flight, or for a read that is stale already.
-spec insert(tuple(), binary(), pos_integer(), binary(), non_neg_integer()) -> ok.
insert(SD, Key, Stamp, Payload, MaxBytes) ->
    Size = entry_size(Key, Payload),
    KeyIx = ?KEY_IX(SD, Key),
    DictIx = ?DICT_IX(SD),
    case Size > MaxBytes orelse not fresh(KeyIx, DictIx, Stamp) of
        true ->
            ok = delete_value({SD, Key}),
            ok;
        false ->
            C = counters(),
            case counters:get(C, ?BYTES) + Size > MaxBytes of
                true -> clear_values();
                false -> ok
            end,
            put_value({{SD, Key}, Stamp, Payload, KeyIx, DictIx}, Size, C)
    end.

%% Every value entry is added by insert_new and removed by delete_value, so that the
%% byte count stays exact while several servers write the same key.
%% A value entry: `{{SD, Key}, Stamp, Payload, KeyBucketIx, DictBucketIx}'.
-spec put_value({{tuple(), binary()}, pos_integer(), binary(), pos_integer(), pos_integer()},
                non_neg_integer(), counters:counters_ref()) -> ok.
put_value({K, Stamp, _, _, _} = Entry, Size, C) ->
    case ets:insert_new(?TABLE, Entry) of
        true ->
            counters:add(C, ?BYTES, Size);
        false ->
            case ets:lookup(?TABLE, K) of
                [{_, ?MARKER, _}] -> ok;   % a write in flight: not cached
                [{_, Old, _, _, _}] when Old > Stamp -> ok;   % a later read got here first
                _ -> ok = delete_value(K), put_value(Entry, Size, C)
            end
    end.

%% @doc A Python-side change of `Key' in `SD' (its port waits until this returns).
-spec invalidate(tuple(), binary()) -> ok.
invalidate(SD, Key) ->
    #cache{stamps = A} = persistent_term:get(?STATE),
    ok = raise(A, ?KEY_IX(SD, Key), atomics:add_get(A, ?CLOCK, 1)),
    delete_value({SD, Key}).

%% @doc A change of every key of `SD' (cleared or destroyed from Python).
-spec invalidate_dict(tuple()) -> ok.
invalidate_dict(SD) ->
    #cache{stamps = A} = persistent_term:get(?STATE),
    ok = raise(A, ?DICT_IX(SD), atomics:add_get(A, ?CLOCK, 1)),
    delete_dict_values(SD).

%% @doc An Erlang-side write of `Key' in `SD' is about to be sent to a port.
-spec write_begin(tuple(), binary()) -> ok.
write_begin(SD, Key) ->
    K = {SD, Key},
    ok = delete_value(K),
    try ets:update_counter(?TABLE, K, {3, 1}, {K, ?MARKER, 0}) of
        _ -> ok
    catch
        error:badarg ->
            %% A value was cached in between: drop it, and mark again.
            write_begin(SD, Key)
    end.

%% @doc The Erlang-side write of `Key' in `SD' begun by {@link write_begin/2} is over
%% (answered, failed, cancelled or lost with its port).
-spec write_end(tuple(), binary()) -> ok.
write_end(SD, Key) ->
    K = {SD, Key},
    #cache{stamps = A} = persistent_term:get(?STATE),
    ok = raise(A, ?KEY_IX(SD, Key), atomics:add_get(A, ?CLOCK, 1)),
    try ets:update_counter(?TABLE, K, {3, -1}) of
        0 -> _ = ets:select_delete(?TABLE, [{{K, ?MARKER, 0}, [], [true]}]), ok;
        _ -> ok
    catch
        error:badarg -> ok
    end.

%% @doc A port died: a change it made may have lost its invalidation. Every value is
%% forgotten, and every read sent before now is stale.
-spec clear() -> ok.
clear() ->
    #cache{stamps = A} = persistent_term:get(?STATE),
    ok = raise(A, ?FLOOR, atomics:add_get(A, ?CLOCK, 1)),
    clear_values().

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

%% Raises slot `Ix' to `Stamp' unless it is there already.
-spec raise(atomics:atomics_ref(), pos_integer(), pos_integer()) -> ok.
raise(A, Ix, Stamp) ->
    case atomics:get(A, Ix) of
        Old when Old >= Stamp -> ok;
        Old ->
            case atomics:compare_exchange(A, Ix, Old, Stamp) of
                ok -> ok;
                _ -> raise(A, Ix, Stamp)
            end
    end.

%% Removes the value entry of `K' (not a marker), keeping the byte count exact.
-spec delete_value({tuple(), binary()}) -> ok.
delete_value({_SD, Key} = K) ->
    case ets:lookup(?TABLE, K) of
        [{_, Stamp, Payload, _, _}] ->
            case ets:select_delete(?TABLE, [{{K, Stamp, '_', '_', '_'}, [], [true]}]) of
                1 -> counters:sub(counters(), ?BYTES, entry_size(Key, Payload));
                0 -> delete_value(K)
            end;
        _ ->
            ok
    end.

-spec delete_dict_values(tuple()) -> ok.
delete_dict_values(SD) ->
    %% The key's first element is bound: on an ordered_set this visits only the
    %% dict's own entries.
    Keys = ets:select(?TABLE, [{{{SD, '$1'}, '_', '_', '_', '_'}, [], ['$1']}]),
    lists:foreach(fun(Key) -> delete_value({SD, Key}) end, Keys).

-spec clear_values() -> ok.
clear_values() ->
    Keys = ets:select(?TABLE, [{{'$1', '_', '_', '_', '_'}, [], ['$1']}]),
    lists:foreach(fun delete_value/1, Keys).

-spec entry_size(binary(), binary()) -> non_neg_integer().
entry_size(Key, Payload) ->
    byte_size(Key) + byte_size(Payload) + ?ENTRY_OVERHEAD.

%% The counters outlive the servers (hits and misses count since the VM started).
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
