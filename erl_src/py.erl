%% @doc Public API of pyport: run Python code in the port program and share
%% dictionaries with it.
%%
%% Every calling process has its own Python namespace (globals) in the port:
%% what {@link exec/1} defines in a process is visible to that process's later
%% {@link eval/1}, {@link exec/1} and ```call('__main__', F, Args)''', not to other
%% processes, and is freed when the process exits.
%%
%% Argument errors (code that is not a binary or string, text that is not
%% valid UTF-8 in code, names and keys, Args that is not a proper list,
%% Kwargs/Locals that is not a map, a Locals key that is not a Python
%% identifier, two keys naming the same variable, a SharedDict handle of the
%% wrong shape) raise `error(badarg)' at the call site. Failures at run time are
%% returned as `{error, Reason}':
%% <ul>
%% <li>`{python, Type, Message, Traceback}': Python raised. `Type' is an atom
%% for Python's built-in exceptions (such as `ValueError') and a binary of the
%% qualified class name for any other (`<<"json.decoder.JSONDecodeError">>').</li>
%% <li>`timeout': no answer in time; the Python work was interrupted. A
%% timeout means no answer, not that the code did not run: it may have run in
%% part or in full.</li>
%% <li>`cancelled': the request was cancelled (the Python code raised, or let
%% through, `erlang.CallCancelled').</li>
%% <li>`{pyport_exit, Status}': the port program died while the request ran
%% (a fresh one is started; namespaces start empty).</li>
%% <li>`{pyport_unavailable, Why}': no port program is running right now
%% (`not_started' when the application is not running).</li>
%% <li>the other reasons listed in `docs/PROTOCOL.md'.</li>
%% </ul>
%%
%% SharedDict functions return plain values and raise on failure:
%% `error(badarg)', `error({shared_dict_destroyed, SD})',
%% `error({pyport_unavailable, Why})', `error({pyport_timeout, SD})'.
-module(py).

-export([call/3, call/4, call/5,
         eval/1, eval/2, eval/3,
         exec/1, exec/2, exec/3,
         bytes/1,
         shared_dict_new/0, shared_dict_new/1, shared_dict_give_away/2,
         shared_dict_get/2, shared_dict_get/3, shared_dict_set/3,
         shared_dict_del/2, shared_dict_keys/1, shared_dict_destroy/1,
         shared_dict_update_counter/3, shared_dict_compare_and_swap/4,
         register_function/2, register_function/3, unregister_function/1,
         stats/0, restart/0]).
%% Asynchronous calls (the machinery is in pyport_async).
-export([cast/3, cast/4, spawn_call/3, spawn_call/4, await/1, await/2]).
-export([stream_start/3, stream_start/4, stream_start/5, stream_ack/1, stream_ack/2,
         stream_cancel/1, stream/3, stream/4, stream_eval/1, stream_eval/2]).
%% erlang_python's names for asynchronous calls and logging.
-export([async_call/3, async_call/4, async_await/1, async_await/2, async_gather/1,
         async_gather/2, configure_logging/0, configure_logging/1]).
-export_type([async_ref/0]).

-export_type([name/0, code/0, kwargs/0, locals/0, result/1, error_reason/0,
              shared_dict/0, py_bytes/0, stream_opts/0]).

-include("pyport.hrl").

-define(T2B_OPTS, [{minor_version, 2}]).
-define(SD_TAG, '$pyport_shared_dict').
%% Where SharedDict requests go: any port (they all map the pool's dicts), the caller's
%% home port if it has one.
-define(SD_ROUTE, caller).
-define(IS_U64(N), (is_integer(N) andalso N >= 0 andalso N < 16#10000000000000000)).
-define(TOKEN_SIZE, 16).
%% A handle of the shape the port makes: anything else is an argument error.
-define(IS_HANDLE(SD), (is_tuple(SD) andalso tuple_size(SD) =:= 4
                        andalso element(1, SD) =:= ?SD_TAG
                        andalso ?IS_U64(element(2, SD))
                        andalso ?IS_U64(element(3, SD))
                        andalso is_binary(element(4, SD))
                        andalso byte_size(element(4, SD)) =:= ?TOKEN_SIZE)).

-type name() :: atom() | binary() | string().
%% A Python module or function name.
-type code() :: binary() | string().
%% Python source code (UTF-8).
-type kwargs() :: #{atom() | binary() => term()} | [{atom() | binary(), term()}].
%% Keyword arguments of a call.
-type locals() :: #{atom() | binary() => term()}.
%% Variables bound in the caller's namespace before code runs.
-type error_reason() :: timeout
                      | cancelled
                      | {python, Type :: atom() | binary(), Message :: binary(),
                         Traceback :: binary()}
                      | {pyport_exit, term()}
                      | {pyport_unavailable, term()}
                      | term().
-type result(T) :: {ok, T} | {error, error_reason()}.
-opaque shared_dict() :: {'$pyport_shared_dict', Generation :: non_neg_integer(),
                          Id :: non_neg_integer(), Token :: binary()}.
%% A SharedDict handle: may be sent to other processes, stored, and passed to
%% Python (where `erlang.SharedDict(handle)' wraps it).
-type py_bytes() :: {'$pyport_bytes', binary()}.
-type stream_opts() :: #{owner => pid(), window => pos_integer(), flow => mailbox | ack}.
%% Options of a stream: its owner (default the caller), its window (default 64)
%% and its flow control (default `mailbox').
%% A binary that Python receives as `bytes' even if it is valid UTF-8.

%%====================================================================
%% call / eval / exec
%%====================================================================

%% @equiv call(Module, Function, Args, #{})
-spec call(name(), name(), list()) -> result(term()).
call(Module, Function, Args) ->
    call(Module, Function, Args, #{}).

%% @doc Same as {@link call/5} with the app env `call_timeout' (default
%% 30000 ms) as the timeout.
-spec call(name(), name(), list(), kwargs()) -> result(term()).
call(Module, Function, Args, Kwargs) ->
    call(Module, Function, Args, Kwargs, pyport_request:call_timeout()).

%% @doc Calls `Module.Function(*Args, **Kwargs)' in Python and returns its
%% result. `Module' `__main__' means the caller's own namespace; any other
%% module is imported. `Function' may be a dotted path inside the module.
%% Kwargs is a map or a keyword list (`[{reverse, true}]', Elixir's
%% `[reverse: true]'); keys may be atoms or binaries. When the result is a
%% coroutine (an `async def' function was called), the port awaits it on its
%% asyncio event loop and returns the coroutine's result; a timeout cancels
%% the task (README "async def").
-spec call(name(), name(), list(), kwargs(), timeout()) -> result(term()).
call(Module, Function, Args, Kwargs, Timeout)
  when is_list(Args), (is_map(Kwargs) orelse is_list(Kwargs)), ?IS_TIMEOUT(Timeout) ->
    pyport_telemetry:span(call, {Module, Function},
                          fun() -> call_port(Module, Function, Args, Kwargs, Timeout) end);
call(_Module, _Function, _Args, _Kwargs, _Timeout) ->
    erlang:error(badarg).

-spec call_port(name(), name(), list(), kwargs(), timeout()) -> result(term()).
call_port(Module, Function, Args, Kwargs, Timeout) ->
    M = pyport_args:name(Module),
    F = pyport_args:name(Function),
    pyport_args:is_proper_list(Args) orelse erlang:error(badarg),
    Payload = term_to_binary({Args, pyport_args:kwargs(Kwargs)}, ?T2B_OPTS),
    Id = pyport_request:new_id(),
    Request = pyport_request:chained({call, Id, pyport_callbacks:owner(), M, F, Payload}),
    Frame = term_to_binary(Request, ?T2B_OPTS),
    pyport_elixir:decoded(pyport_request:request(call_route(M), Id, Frame, Timeout)).

%% @equiv eval(Code, #{})
-spec eval(code()) -> result(term()).
eval(Code) ->
    eval(Code, #{}).

%% @doc Same as {@link eval/3} with the app env `call_timeout' (default
%% 30000 ms) as the timeout.
-spec eval(code(), locals()) -> result(term()).
eval(Code, Locals) ->
    eval(Code, Locals, pyport_request:call_timeout()).

%% @doc Evaluates the Python expression `Code' in the caller's namespace,
%% after binding every entry of `Locals' as a variable there, and returns its
%% value (awaited first when it is a coroutine, as for {@link call/5}).
-spec eval(code(), locals(), timeout()) -> result(term()).
eval(Code, Locals, Timeout) when is_map(Locals), ?IS_TIMEOUT(Timeout) ->
    pyport_telemetry:span(eval, Code, fun() -> eval_port(Code, Locals, Timeout) end);
eval(_Code, _Locals, _Timeout) ->
    erlang:error(badarg).

-spec eval_port(code(), locals(), timeout()) -> result(term()).
eval_port(Code, Locals, Timeout) ->
    C = pyport_args:code(Code),
    Payload = term_to_binary(pyport_args:locals(Locals), ?T2B_OPTS),
    Id = pyport_request:new_id(),
    Request = pyport_request:chained({eval, Id, pyport_callbacks:owner(), C, Payload}),
    Frame = term_to_binary(Request, ?T2B_OPTS),
    pyport_elixir:decoded(pyport_request:request(namespace, Id, Frame, Timeout)).

%% @equiv exec(Code, #{}, infinity)
-spec exec(code()) -> ok | {error, error_reason()}.
exec(Code) ->
    exec(Code, #{}, infinity).

%% @equiv exec(Code, Locals, infinity)
-spec exec(code(), locals()) -> ok | {error, error_reason()}.
exec(Code, Locals) ->
    exec(Code, Locals, infinity).

%% @doc Executes the Python statements `Code' in the caller's namespace, after
%% binding every entry of `Locals' as a variable there. What the code defines
%% or assigns stays available to the caller's later calls.
-spec exec(code(), locals(), timeout()) -> ok | {error, error_reason()}.
exec(Code, Locals, Timeout) when is_map(Locals), ?IS_TIMEOUT(Timeout) ->
    pyport_telemetry:span(exec, Code, fun() -> exec_port(Code, Locals, Timeout) end);
exec(_Code, _Locals, _Timeout) ->
    erlang:error(badarg).

-spec exec_port(code(), locals(), timeout()) -> ok | {error, error_reason()}.
exec_port(Code, Locals, Timeout) ->
    C = pyport_args:code(Code),
    Payload = term_to_binary(pyport_args:locals(Locals), ?T2B_OPTS),
    Id = pyport_request:new_id(),
    Request = pyport_request:chained({exec, Id, pyport_callbacks:owner(), C, Payload}),
    Frame = term_to_binary(Request, ?T2B_OPTS),
    case pyport_request:request(namespace, Id, Frame, Timeout) of
        {ok, _Payload} -> ok;
        {error, _} = Error -> Error
    end.

%% A call of `__main__' uses the caller's namespace, so it goes to the caller's home
%% port (see pyport_pool); a call of any other module may go to any port.
-spec call_route(binary()) -> pyport_request:route().
call_route(<<"__main__">>) -> namespace;
call_route(_Module) -> caller.

%% @doc Marks a binary to be passed to Python as `bytes', even when it is valid
%% UTF-8 (which would otherwise become `str').
-spec bytes(binary()) -> py_bytes().
bytes(Bin) when is_binary(Bin) ->
    {'$pyport_bytes', Bin};
bytes(_) ->
    erlang:error(badarg).

%%====================================================================
%% Asynchronous calls (names as in the erlang_python library)
%%====================================================================

-type async_ref() :: pyport_async:ref().
%% What {@link spawn_call/4} returns; only the process that made it may await it.

%% @equiv cast(Module, Function, Args, #{})
-spec cast(name(), name(), list()) -> ok.
cast(Module, Function, Args) ->
    cast(Module, Function, Args, #{}).

%% @doc Runs `Module.Function(*Args, **Kwargs)' as {@link call/4} would, in the
%% caller's namespace, and returns `ok' at once without waiting for it. A
%% failure (a Python exception, no answer within the app env `call_timeout',
%% the port down) is logged as a warning and never sent to the caller. The work
%% is cancelled if the caller exits before it is done.
-spec cast(name(), name(), list(), kwargs()) -> ok.
cast(Module, Function, Args, Kwargs) ->
    {Id, Frame, {M, _} = What} = async_call_frame(Module, Function, Args, Kwargs),
    pyport_async:cast(pyport_request:server(call_route(M)), Id, Frame,
                      pyport_request:call_timeout(), What).

%% @equiv spawn_call(Module, Function, Args, #{})
-spec spawn_call(name(), name(), list()) -> async_ref().
spawn_call(Module, Function, Args) ->
    spawn_call(Module, Function, Args, #{}).

%% @doc Starts `Module.Function(*Args, **Kwargs)' as {@link call/4} would, in
%% the caller's namespace, and returns at once a reference for {@link await/2}.
%% Arguments are checked as by {@link call/4}. Work that nobody awaits is
%% cancelled in the port after the app env `call_timeout' (default 30000 ms),
%% and work whose caller exits is cancelled at once. No reply ever reaches the
%% caller's mailbox: the result is held until it is awaited. Several
%% asynchronous calls of one process may start in any order.
-spec spawn_call(name(), name(), list(), kwargs()) -> async_ref().
spawn_call(Module, Function, Args, Kwargs) ->
    {Id, Frame, {M, _} = What} = async_call_frame(Module, Function, Args, Kwargs),
    pyport_async:spawn_call(pyport_request:server(call_route(M)), Id, Frame,
                            pyport_request:call_timeout(), What).

%% @doc Same as {@link await/2} with the app env `call_timeout' (default
%% 30000 ms) as the timeout.
-spec await(async_ref()) -> result(term()).
await(Ref) ->
    await(Ref, pyport_request:call_timeout()).

%% @doc Waits up to `Timeout' for the result of a {@link spawn_call/4} and
%% returns what {@link call/5} would have returned. `{error, timeout}' also
%% interrupts the Python work, as a timed-out call does; so does
%% `{error, timeout}' for work that was cancelled because it was not awaited
%% within `call_timeout'. `Timeout' 0 returns a result that is in, without
%% waiting. A reference can be awaited once, by the process that made it (an
%% await that timed out counts): any other await raises `error(badarg)'.
-spec await(async_ref(), timeout()) -> result(term()).
await(Ref, Timeout) ->
    pyport_elixir:decoded(pyport_async:await(Ref, Timeout)).

%% @equiv spawn_call(Module, Function, Args)
-spec async_call(name(), name(), list()) -> async_ref().
async_call(Module, Function, Args) ->
    spawn_call(Module, Function, Args).

%% @doc erlang_python's name for {@link spawn_call/4}: starts the call (an
%% `async def' function's coroutine is awaited in the port, any other function's
%% result is the result) and returns a reference for {@link async_await/2}.
-spec async_call(name(), name(), list(), kwargs()) -> async_ref().
async_call(Module, Function, Args, Kwargs) ->
    spawn_call(Module, Function, Args, Kwargs).

%% @equiv await(Ref)
-spec async_await(async_ref()) -> result(term()).
async_await(Ref) ->
    await(Ref).

%% @doc erlang_python's name for {@link await/2}.
-spec async_await(async_ref(), timeout()) -> result(term()).
async_await(Ref, Timeout) ->
    await(Ref, Timeout).

%% @doc Same as {@link async_gather/2} with the app env `call_timeout' (default
%% 30000 ms) as the timeout.
-spec async_gather([pyport_collect:call()]) -> {ok, list()} | {error, {gather_failed, [{pos_integer(), term()}]}}.
async_gather(Calls) ->
    async_gather(Calls, pyport_request:call_timeout()).

%% @doc Starts every call of `Calls' (`{Module, Function, Args}' or `{Module,
%% Function, Args, Kwargs}') at once and waits for all of them, within `Timeout'
%% in all: `{ok, Values}' in the order of `Calls', or `{error, {gather_failed,
%% [{Index, Reason}]}}' naming every call that failed (1-based; one not answered
%% in time fails with `timeout' and is interrupted). Every call is checked before
%% any starts (`error(badarg)').
-spec async_gather([pyport_collect:call()], timeout()) ->
          {ok, list()} | {error, {gather_failed, [{pos_integer(), term()}]}}.
async_gather(Calls, Timeout) when is_list(Calls), ?IS_TIMEOUT(Timeout) ->
    pyport_collect:gather(Calls, Timeout);
async_gather(_Calls, _Timeout) ->
    erlang:error(badarg).

%% The request of call/4, checked and built as call/5 builds it: the caller
%% is its owner, so it runs in the caller's namespace.
-spec async_call_frame(name(), name(), list(), kwargs()) ->
          {pos_integer(), binary(), {binary(), binary()}}.
async_call_frame(Module, Function, Args, Kwargs)
  when is_list(Args), (is_map(Kwargs) orelse is_list(Kwargs)) ->
    M = pyport_args:name(Module),
    F = pyport_args:name(Function),
    pyport_args:is_proper_list(Args) orelse erlang:error(badarg),
    Payload = term_to_binary({Args, pyport_args:kwargs(Kwargs)}, ?T2B_OPTS),
    Id = pyport_request:new_id(),
    {Id, term_to_binary({call, Id, self(), M, F, Payload}, ?T2B_OPTS), {M, F}};
async_call_frame(_Module, _Function, _Args, _Kwargs) ->
    erlang:error(badarg).

%%====================================================================
%% SharedDict
%%====================================================================

%% @doc Creates a SharedDict owned by the calling process. It is destroyed when
%% its owner exits.
-spec shared_dict_new() -> {ok, shared_dict()}.
shared_dict_new() ->
    shared_dict_new(#{}).

%% @doc Creates a SharedDict. Option `owner => Pid' makes `Pid' its owner
%% instead of the caller.
-spec shared_dict_new(#{owner => pid()}) -> {ok, shared_dict()}.
shared_dict_new(Opts) when is_map(Opts) ->
    pyport_telemetry:shared_dict(new, fun() -> sd_new(Opts) end);
shared_dict_new(_Opts) ->
    erlang:error(badarg).

-spec sd_new(#{owner => pid()}) -> {ok, shared_dict()}.
sd_new(Opts) ->
    Owner = case maps:to_list(Opts) of
                [] -> self();
                [{owner, P}] when is_pid(P) -> P;
                _ -> erlang:error(badarg)
            end,
    Id = pyport_request:new_id(),
    Frame = term_to_binary({sd_new, Id, Owner}, ?T2B_OPTS),
    Msg = {sd_request, Id, Frame, {owns, Owner}},
    case sd_result(shared_dict_new, pyport_request:request_msg(?SD_ROUTE, Id, Msg, sd_timeout())) of
        {ok, Payload} ->
            case sd_payload(Payload) of
                SD when ?IS_HANDLE(SD) -> {ok, SD};
                Other -> erlang:error({pyport_bad_reply, Other})
            end;
        {error, Reason} ->
            erlang:error(Reason)
    end.

%% @doc Hands a SharedDict over to `Pid', which owns it from then on (like
%% `ets:give_away/3'): it is destroyed when `Pid' exits. Only the owner may
%% give a dict away; anyone else gets `error(not_owner)'.
-spec shared_dict_give_away(shared_dict(), pid()) -> ok.
shared_dict_give_away(SD, Pid) when ?IS_HANDLE(SD), is_pid(Pid) ->
    pyport_telemetry:shared_dict(give_away, fun() -> sd_give_away(SD, Pid) end);
shared_dict_give_away(_SD, _Pid) ->
    erlang:error(badarg).

-spec sd_give_away(shared_dict(), pid()) -> ok.
sd_give_away(SD, Pid) ->
    Id = pyport_request:new_id(),
    Frame = term_to_binary({sd_give_away, Id, SD, Pid, self()}, ?T2B_OPTS),
    _ = sd_ok(SD, sd_request(SD, Id, {sd_request, Id, Frame, {owns, Pid}})),
    ok.

%% @doc The value stored under `Key', or `undefined' if there is none.
-spec shared_dict_get(shared_dict(), binary()) -> term().
shared_dict_get(SD, Key) ->
    shared_dict_get(SD, Key, undefined).

%% @doc The value stored under `Key', or `Default' (as is) if there is none.
%%
%% A value read once is kept in the VM's read cache until it changes, so later
%% gets of it are answered without a round trip to the port (see the README's
%% SharedDict section for the consistency model).
-spec shared_dict_get(shared_dict(), binary(), Default) -> term() | Default.
shared_dict_get(SD, Key, Default) when ?IS_HANDLE(SD), is_binary(Key) ->
    pyport_telemetry:shared_dict(get, fun() -> sd_get(SD, Key, Default) end);
shared_dict_get(_SD, _Key, _Default) ->
    erlang:error(badarg).

-spec sd_get(shared_dict(), binary(), Default) -> term() | Default.
sd_get(SD, Key, Default) ->
    Payload = case pyport_sd_cache:lookup(SD, Key) of
                  {ok, Cached} ->
                      Cached;
                  miss ->
                      Id = pyport_request:new_id(),
                      Frame = term_to_binary({sd_get, Id, SD, Key}, ?T2B_OPTS),
                      %% Stamped before it is sent: its reply may be cached only if
                      %% nothing changed the key since (see pyport_sd_cache).
                      Read = {read, pyport_sd_cache:stamp()},
                      sd_ok(SD, sd_request(SD, Id, {sd_request, Id, Frame, Read}))
              end,
    case sd_payload(Payload) of
        {found, Value} -> Value;
        not_found -> Default;
        Other -> erlang:error({pyport_bad_reply, Other})
    end.

%% @doc Stores `Value' (converted to Python and pickled) under `Key'. A value
%% that cannot be stored gives `{error, Reason}'.
-spec shared_dict_set(shared_dict(), binary(), term()) -> ok | {error, term()}.
shared_dict_set(SD, Key, Value) when ?IS_HANDLE(SD), is_binary(Key) ->
    pyport_telemetry:shared_dict(set, fun() -> sd_set(SD, Key, Value) end);
shared_dict_set(_SD, _Key, _Value) ->
    erlang:error(badarg).

-spec sd_set(shared_dict(), binary(), term()) -> ok | {error, term()}.
sd_set(SD, Key, Value) ->
    Id = pyport_request:new_id(),
    Payload = term_to_binary(Value, ?T2B_OPTS),
    Frame = term_to_binary({sd_set, Id, SD, Key, Payload}, ?T2B_OPTS),
    case sd_request(SD, Id, {sd_request, Id, Frame, {write, SD, Key}}) of
        {ok, _} -> ok;
        {error, _} = Error -> Error
    end.

%% @doc Deletes `Key'; `ok' also when it is missing.
-spec shared_dict_del(shared_dict(), binary()) -> ok.
shared_dict_del(SD, Key) when ?IS_HANDLE(SD), is_binary(Key) ->
    pyport_telemetry:shared_dict(del, fun() -> sd_del(SD, Key) end);
shared_dict_del(_SD, _Key) ->
    erlang:error(badarg).

-spec sd_del(shared_dict(), binary()) -> ok.
sd_del(SD, Key) ->
    Id = pyport_request:new_id(),
    Frame = term_to_binary({sd_del, Id, SD, Key}, ?T2B_OPTS),
    _ = sd_ok(SD, sd_request(SD, Id, {sd_request, Id, Frame, {write, SD, Key}})),
    ok.

%% @doc The keys, in insertion order.
-spec shared_dict_keys(shared_dict()) -> [binary()].
shared_dict_keys(SD) when ?IS_HANDLE(SD) ->
    pyport_telemetry:shared_dict(keys, fun() -> sd_keys(SD) end);
shared_dict_keys(_SD) ->
    erlang:error(badarg).

-spec sd_keys(shared_dict()) -> [binary()].
sd_keys(SD) ->
    Id = pyport_request:new_id(),
    Frame = term_to_binary({sd_keys, Id, SD}, ?T2B_OPTS),
    case sd_payload(sd_ok(SD, sd_request(SD, Id, {request, Id, Frame}))) of
        Keys when is_list(Keys) -> Keys;
        Other -> erlang:error({pyport_bad_reply, Other})
    end.

%% @doc Adds the integer `Incr' to the integer stored under `Key' and returns the
%% new value, as one step against every other operation from Erlang or Python.
%% A missing key counts from 0. A stored value that is not an integer (a float,
%% `true', a string) raises `error(badarg)' and stays as it is.
-spec shared_dict_update_counter(shared_dict(), binary(), integer()) -> integer().
shared_dict_update_counter(SD, Key, Incr) when ?IS_HANDLE(SD), is_binary(Key), is_integer(Incr) ->
    pyport_telemetry:shared_dict(update_counter, fun() -> sd_update_counter(SD, Key, Incr) end);
shared_dict_update_counter(_SD, _Key, _Incr) ->
    erlang:error(badarg).

-spec sd_update_counter(shared_dict(), binary(), integer()) -> integer().
sd_update_counter(SD, Key, Incr) ->
    Id = pyport_request:new_id(),
    Frame = term_to_binary({sd_update_counter, Id, SD, Key, term_to_binary(Incr)}, ?T2B_OPTS),
    case sd_payload(sd_ok(SD, sd_request(SD, Id, {sd_request, Id, Frame, {write, SD, Key}}))) of
        N when is_integer(N) -> N;
        Other -> erlang:error({pyport_bad_reply, Other})
    end.

%% @doc Stores `New' under `Key' if the value there, as {@link shared_dict_get/2}
%% would return it, is `=:=' `Old'; returns whether it did. One step against
%% every other operation from Erlang or Python. `Old = absent' means "only if
%% `Key' is absent" (a stored value never reads back as that atom).
-spec shared_dict_compare_and_swap(shared_dict(), binary(), absent | term(), term()) -> boolean().
shared_dict_compare_and_swap(SD, Key, Old, New) when ?IS_HANDLE(SD), is_binary(Key) ->
    pyport_telemetry:shared_dict(compare_and_swap, fun() -> sd_compare_and_swap(SD, Key, Old, New) end);
shared_dict_compare_and_swap(_SD, _Key, _Old, _New) ->
    erlang:error(badarg).

-spec sd_compare_and_swap(shared_dict(), binary(), absent | term(), term()) -> boolean().
sd_compare_and_swap(SD, Key, Old, New) ->
    Id = pyport_request:new_id(),
    OldArg = case Old of
                 absent -> absent;
                 _ -> term_to_binary(Old, ?T2B_OPTS)
             end,
    Frame = term_to_binary({sd_cas, Id, SD, Key, OldArg, term_to_binary(New, ?T2B_OPTS)},
                           ?T2B_OPTS),
    case sd_payload(sd_ok(SD, sd_request(SD, Id, {sd_request, Id, Frame, {write, SD, Key}}))) of
        B when is_boolean(B) -> B;
        Other -> erlang:error({pyport_bad_reply, Other})
    end.

%% @doc Destroys the SharedDict. Idempotent: `ok' for a dict that is already
%% destroyed, by anyone, and for a handle of a pool that is gone (the application
%% stopped or restarted). Dicts live in shared memory and outlive any one port: while
%% no port is up it raises `{pyport_unavailable, Why}' (the dict is still there) and
%% `{pyport_timeout, SD}' when no port answers in time.
-spec shared_dict_destroy(shared_dict()) -> ok.
shared_dict_destroy(SD) when ?IS_HANDLE(SD) ->
    pyport_telemetry:shared_dict(destroy, fun() -> sd_destroy(SD) end);
shared_dict_destroy(_SD) ->
    erlang:error(badarg).

%% The dict lives in shared memory, not in a port: `ok' only once a port has
%% destroyed it. A port that dies under the request may or may not have: destroy
%% is idempotent, so it is asked again (of the next port up).
-spec sd_destroy(shared_dict()) -> ok.
sd_destroy(SD) ->
    case is_current(SD) of
        false -> ok;
        true -> sd_destroy(SD, 3)
    end.

-spec sd_destroy(shared_dict(), non_neg_integer()) -> ok.
sd_destroy(SD, Tries) ->
    Id = pyport_request:new_id(),
    Frame = term_to_binary({sd_destroy, Id, SD}, ?T2B_OPTS),
    case pyport_request:request_msg(?SD_ROUTE, Id, {request, Id, Frame}, sd_timeout()) of
        {ok, _} -> ok;
        {error, shared_dict_destroyed} -> ok;
        %% no pool: its shared memory, and every dict in it, went with it
        {error, {pyport_unavailable, not_started}} -> ok;
        {error, {pyport_unavailable, _} = Why} -> erlang:error(Why);
        {error, {pyport_exit, _}} when Tries > 0 -> sd_destroy(SD, Tries - 1);
        {error, {pyport_exit, Status}} -> erlang:error({pyport_unavailable, {exit_status, Status}});
        {error, timeout} -> erlang:error({pyport_timeout, SD});
        {error, Reason} -> erlang:error(Reason)
    end.

%%====================================================================
%% Streams
%%====================================================================

%% @equiv stream(Module, Function, Args, #{})
-spec stream(name(), name(), list()) -> result(list()).
stream(Module, Function, Args) ->
    stream(Module, Function, Args, #{}).

%% @doc Calls `Module.Function(*Args, **Kwargs)' in the caller's namespace and
%% returns every item of the generator (or iterable, or async iterator) it
%% returns: `{ok, Items}', or the error that ended the stream or its start
%% (`{error, timeout}' when an item takes longer than the app env `call_timeout';
%% the stream is then cancelled). The items travel as a stream's, one by one
%% (each must fit `max_reply_bytes'), and nothing of them reaches the caller's
%% mailbox. As erlang_python's `py:stream/3,4'.
-spec stream(name(), name(), list(), kwargs()) -> result(list()).
stream(Module, Function, Args, Kwargs) ->
    pyport_collect:stream(Module, Function, Args, Kwargs,
                          pyport_request:call_timeout(), fun() -> ok end).

%% @equiv stream_eval(Code, #{})
-spec stream_eval(code()) -> result(list()).
stream_eval(Code) ->
    stream_eval(Code, #{}).

%% @doc Evaluates the expression `Code' in the caller's namespace (after binding
%% `Locals' there, as {@link eval/2} does) and returns every item of the iterable
%% it gives, as {@link stream/4} does: `py:stream_eval(<<"(x * x for x in range(5))">>)'
%% is `{ok, [0, 1, 4, 9, 16]}'. As erlang_python's `py:stream_eval/1,2'.
-spec stream_eval(code(), locals()) -> result(list()).
stream_eval(Code, Locals) when is_map(Locals) ->
    C = pyport_args:code(Code),
    _ = pyport_args:locals(Locals),
    Bind = case map_size(Locals) of
               0 -> fun() -> ok end;
               _ -> fun() -> exec(<<"pass">>, Locals) end
           end,
    %% builtins.eval through call evaluates in the caller's namespace (README, "API").
    pyport_collect:stream(builtins, eval, [C], #{}, pyport_request:call_timeout(), Bind);
stream_eval(_Code, _Locals) ->
    erlang:error(badarg).

%% @equiv stream_start(Module, Function, Args, #{}, #{})
-spec stream_start(name(), name(), list()) -> {ok, reference()} | {error, error_reason()}.
stream_start(Module, Function, Args) ->
    stream_start(Module, Function, Args, #{}, #{}).

%% @doc Same as {@link stream_start/5} without keyword arguments: `Opts' are the
%% stream's options (`owner', `window', `flow'), as in erlang_python.
-spec stream_start(name(), name(), list(), stream_opts()) -> {ok, reference()} | {error, error_reason()}.
stream_start(Module, Function, Args, Opts) ->
    stream_start(Module, Function, Args, #{}, Opts).

%% @doc Calls `Module.Function(*Args, **Kwargs)', which returns a generator or
%% any iterable (or an async iterator), and streams its items to the owner
%% (option `owner', default the caller) as messages `{py_stream, Ref, {data, V}}',
%% then `{py_stream, Ref, done}' or `{py_stream, Ref, {error, Reason}}' (`Reason'
%% shaped like a call's).
%%
%% Flow control (option `flow'): with `mailbox' (the default) the stream sends
%% while the owner's mailbox holds fewer than `window' (option, default 64)
%% messages and pauses, holding no Python thread, while it is full: an owner that
%% just receives gets everything, one that never receives holds at most `window'
%% items. With `ack' at most `window' items are unacknowledged: the owner calls
%% {@link stream_ack/1} for each item it consumed.
%%
%% The owner's exit cancels the stream; if the port program dies, the owner gets
%% `{py_stream, Ref, {error, Reason}}' with the reason calls get
%% (`{pyport_exit, Status}'). An owner that cannot receive (not alive, or of a
%% node that is not connected), or that dies before the stream has started, gets
%% no stream: `{error, owner_down}' (the generator, if one was made, is closed).
-spec stream_start(name(), name(), list(), kwargs(), stream_opts()) ->
          {ok, reference()} | {error, error_reason()}.
stream_start(Module, Function, Args, Kwargs, Opts)
  when is_list(Args), (is_map(Kwargs) orelse is_list(Kwargs)), is_map(Opts) ->
    M = pyport_args:name(Module),
    F = pyport_args:name(Function),
    pyport_args:is_proper_list(Args) orelse erlang:error(badarg),
    Owner = maps:get(owner, Opts, self()),
    Window = maps:get(window, Opts, 64),
    Flow = case maps:get(flow, Opts, mailbox) of
               mailbox -> {mailbox, Window};
               ack -> ack;
               _ -> erlang:error(badarg)
           end,
    (is_pid(Owner) andalso is_integer(Window) andalso Window >= 1 andalso Window =< 1 bsl 20
     andalso maps:size(maps:without([owner, window, flow], Opts)) =:= 0)
        orelse erlang:error(badarg),
    Payload = term_to_binary({Args, pyport_args:kwargs(Kwargs)}, ?T2B_OPTS),
    case can_receive(Owner) of
        false ->
            {error, owner_down};
        true ->
            Ref = make_ref(),
            Id = pyport_request:new_id(),
            Frame = term_to_binary({stream_start, Id, pyport_callbacks:owner(), M, F, Payload,
                                    term_to_binary(Ref), Owner, Window}, ?T2B_OPTS),
            Server = pyport_request:server(call_route(M)),
            case pyport_request:request_msg(Server, Id, {stream_request, Id, Frame, Owner, Ref, Flow},
                                            pyport_request:call_timeout()) of
                {ok, _} ->
                    {ok, Ref};
                {error, _} = Error ->
                    %% A start that timed out may still have begun in the port (the
                    %% cancel reaches the server after the start).
                    ok = notify(Server, {stream_cancel, term_to_binary(Ref)}),
                    Error
            end
    end;
stream_start(_Module, _Function, _Args, _Kwargs, _Opts) ->
    erlang:error(badarg).

%% Whether a stream's owner can receive at all: a local process that is alive, or
%% a process of a connected node. (One that dies later is seen by its monitor.)
-spec can_receive(pid()) -> boolean().
can_receive(Pid) when node(Pid) =:= node() ->
    is_process_alive(Pid);
can_receive(Pid) ->
    lists:member(node(Pid), nodes(connected)).

%% @equiv stream_ack(Ref, 1)
-spec stream_ack(reference()) -> ok.
stream_ack(Ref) ->
    stream_ack(Ref, 1).

%% @doc Acknowledges `N' items of stream `Ref' (one started with `flow => ack'):
%% `N' more may be sent. `ok' also for a stream that has ended, and ignored for a
%% stream with mailbox flow (the default), which needs no acknowledgements.
-spec stream_ack(reference(), pos_integer()) -> ok.
stream_ack(Ref, N) when is_reference(Ref), is_integer(N), N >= 1 ->
    case pyport_pool:stream_server(Ref) of
        undefined -> ok;   % ended
        Server -> gen_server:cast(Server, {stream_ack, Ref, N})
    end;
stream_ack(_Ref, _N) ->
    erlang:error(badarg).

%% @doc Stops stream `Ref': its generator is closed (its `finally' clauses run)
%% and no more items are sent. Items already sent may still arrive.
-spec stream_cancel(reference()) -> ok.
stream_cancel(Ref) when is_reference(Ref) ->
    case pyport_pool:stream_server(Ref) of
        undefined -> ok;   % ended
        Server -> notify(Server, {stream_cancel, term_to_binary(Ref)})
    end;
stream_cancel(_Ref) ->
    erlang:error(badarg).

-spec notify(atom() | pid(), tuple()) -> ok.
notify(Server, Msg) ->
    gen_server:cast(Server, {notify, term_to_binary(Msg, ?T2B_OPTS)}).

%%====================================================================
%% Callbacks: Python calling Erlang
%%====================================================================

%% @doc Registers `Fun' as the function Python calls as `Name':
%% `erlang.call("Name", A, B)', `erlang.Name(A, B)' or `from erlang import Name'.
%% `Fun' gets the argument list (`[A, B]'); its result goes back to Python
%% through the conversion table, and an exception it raises becomes
%% `erlang.ErlangError' there. It runs in a process of its own (not the
%% caller's); `py:call/3' and friends made from it run on the Python thread
%% that waits for it. `Name' is an atom or a binary; replaces an earlier
%% registration of the same name.
-spec register_function(atom() | binary(), fun((list()) -> term())) -> ok.
register_function(Name, Fun) when is_function(Fun, 1) ->
    pyport_callbacks:register(function_name(Name), Fun);
register_function(_Name, _Fun) ->
    erlang:error(badarg).

%% @doc Registers `Module:Function/1' (called with the argument list) as the
%% function Python calls as `Name'; see {@link register_function/2}.
-spec register_function(atom() | binary(), module(), atom()) -> ok.
register_function(Name, Module, Function) when is_atom(Module), is_atom(Function) ->
    pyport_callbacks:register(function_name(Name), {Module, Function});
register_function(_Name, _Module, _Function) ->
    erlang:error(badarg).

%% @doc Removes the function registered as `Name'; `ok' also if there is none.
%% Python calling it afterwards gets `erlang.UnknownFunction'.
-spec unregister_function(atom() | binary()) -> ok.
unregister_function(Name) ->
    pyport_callbacks:unregister(function_name(Name)).

-spec function_name(term()) -> binary().
function_name(Name) ->
    case pyport_args:name(Name) of
        <<"$", _/binary>> -> erlang:error(badarg);   % reserved for pyport itself
        <<>> -> erlang:error(badarg);
        B -> B
    end.

%%====================================================================
%% Logging
%%====================================================================

%% @equiv configure_logging(#{})
-spec configure_logging() -> ok | {error, error_reason()}.
configure_logging() ->
    configure_logging(#{}).

%% @doc Sets what Python's `logging' forwards to `logger': option `level' (`debug',
%% `info', `warning', `error', `critical', or `vm': the VM's `logger' primary level
%% when the port starts, the default) is the level of Python's root logger, and
%% option `format' (a `logging.Formatter' format, default `"%(message)s"') the text
%% of each event. Applied at once and kept (app env `python_log_level',
%% `python_log_format') for every later (re)start of the port; an option left out
%% goes back to its default. `ok' also when no port runs now. A format that Python
%% refuses is `{error, {python, 'ValueError', _, _}}' and nothing changes.
-spec configure_logging(#{level => debug | info | warning | error | critical | vm,
                          format => binary() | string()}) -> ok | {error, error_reason()}.
configure_logging(Opts) when is_map(Opts) ->
    Level = maps:get(level, Opts, vm),
    lists:member(Level, [debug, info, warning, error, critical, vm]) orelse erlang:error(badarg),
    Format = case Opts of
                 #{format := F} -> pyport_args:code(F);
                 _ -> undefined
             end,
    maps:size(maps:without([level, format], Opts)) =:= 0 orelse erlang:error(badarg),
    Saved = {application:get_env(pyport, python_log_level), application:get_env(pyport, python_log_format)},
    set_log_env(python_log_level, Level =/= vm, Level),
    set_log_env(python_log_format, Format =/= undefined, Format),
    case configure_ports(pyport_pool:servers(), pyport_program:python_log_level(), Format) of
        ok -> ok;
        {error, _} = Error ->
            {OldLevel, OldFormat} = Saved,
            restore_log_env(python_log_level, OldLevel),
            restore_log_env(python_log_format, OldFormat),
            Error
    end;
configure_logging(_Opts) ->
    erlang:error(badarg).

%% Every port of the pool, one after another: the first refuses a bad format before
%% any other port has changed.
-spec configure_ports([atom()], pos_integer(), binary() | undefined) -> ok | {error, error_reason()}.
configure_ports([], _Level, _Format) ->
    ok;
configure_ports([Server | Rest], Level, Format) ->
    Id = pyport_request:new_id(),
    Frame = term_to_binary({configure_logging, Id, Level, Format}, ?T2B_OPTS),
    case pyport_request:request(Server, Id, Frame, sd_timeout()) of
        {ok, _} -> configure_ports(Rest, Level, Format);
        %% A port that is down applies the app env when it starts.
        {error, {pyport_unavailable, _}} -> configure_ports(Rest, Level, Format);
        {error, _} = Error -> Error
    end.

-spec set_log_env(atom(), boolean(), term()) -> ok.
set_log_env(Key, true, Value) -> application:set_env(pyport, Key, Value);
set_log_env(Key, false, _) -> application:unset_env(pyport, Key).

-spec restore_log_env(atom(), undefined | {ok, term()}) -> ok.
restore_log_env(Key, undefined) -> application:unset_env(pyport, Key);
restore_log_env(Key, {ok, V}) -> application:set_env(pyport, Key, V).

%%====================================================================
%% stats
%%====================================================================

%% @doc Restarts the port program(s) with the application environment as it is now, for
%% instance after `application:set_env(pyport, python, "/path/to/venv")' in a running shell
%% (the app env is otherwise read when the application starts). The interpreter is checked
%% first, as at start (`python', `python_requirements', see the README): when it cannot
%% work, `{error, Reason}' with the start's reasons and the running port is left as it is.
%% Otherwise the port is replaced as a crash would replace it: callers in flight get
%% `{error, {pyport_exit, restart}}', namespaces start empty, start-up code runs
%% again; SharedDicts live in shared memory and are kept, with their contents. Returns `ok' once the new port
%% is ready (Python up, start-up code finished), or `{error, {pyport_not_ready,
%% #{timeout_ms, last_exit}}}' after `start_timeout_ms' (default 60 s) without a ready port
%% (it keeps trying in the background, as after a crash).
-spec restart() -> ok | {error, term()}.
restart() ->
    ok = pyport_elixir:configure(),
    pyport_sup:restart_ports().


%% @doc What the port holds (`dicts', `dict_keys', `dict_bytes',
%% `namespaces', `workers', `busy_workers', `queued', `async_tasks' (coroutines
%% being awaited), see `docs/PROTOCOL.md')
%% plus Erlang-side numbers: `pending' requests, `owners' (monitored
%% processes), `generation', `restarts', `port' (`up' | `down'), `last_exit',
%% `os_pid', `callbacks' (callback processes running), `open_streams' (streams
%% the server tracks). `shared_dict' is a map: the VM's read cache (`cache_hits',
%% `cache_misses', `cache_entries', `cache_bytes') and the port's decoding of
%% values that need Python (`python_decodes', `decode_queued', `decode_stuck').
%% `config' is a map of the settings in effect, defaults included, named as the
%% application env names them (see the README's "Configuration").
%% With a pool of ports (app env `ports') every count is the sum over the ports,
%% `port' is `up' and `ready' `true' only when every port's is, `os_pid',
%% `generation' and `last_exit' are the first answering port's, and `ports' is a list of one
%% map per port (`index', `os_pid', `generation', `port', `ready', `pending',
%% `workers', `busy_workers', `queued', `namespaces', `async_tasks',
%% `python_threads', `restarts', `last_exit'; a port that did not answer has
%% `error' instead of its figures).
-spec stats() -> {ok, map()} | {error, error_reason()}.
stats() ->
    pyport_stats:stats(sd_timeout()).

%%====================================================================
%% Internal: SharedDict requests
%%====================================================================

-spec sd_payload(binary()) -> term().
sd_payload(Payload) ->
    case pyport_elixir:decoded({ok, Payload}) of
        {ok, Value} -> Value;
        {error, Reason} -> erlang:error(Reason)
    end.

-spec sd_timeout() -> timeout().
sd_timeout() ->
    pyport_request:shared_dict_timeout().

%% A handle of another pool (one that ran before an application restart) is destroyed:
%% no need to ask.
-spec is_current(shared_dict()) -> boolean().
is_current({?SD_TAG, Gen, _, _}) ->
    case pyport_shm:generation() of
        undefined -> true;   % never started: let the request say not_started
        Current -> Gen =:= Current
    end.

%% Sends a SharedDict request for an existing handle. Failures that are not
%% about the value itself are raised here.
-spec sd_request(shared_dict(), pos_integer(), tuple()) -> {ok, binary()} | {error, term()}.
sd_request(SD, Id, Msg) ->
    is_current(SD) orelse erlang:error({shared_dict_destroyed, SD}),
    sd_result(SD, pyport_request:request_msg(?SD_ROUTE, Id, Msg, sd_timeout())).

-spec sd_result(shared_dict() | shared_dict_new,
                {ok, binary()} | {error, error_reason()}) ->
          {ok, binary()} | {error, term()}.
sd_result(_SD, {ok, _} = Ok) -> Ok;
sd_result(SD, {error, shared_dict_destroyed}) -> erlang:error({shared_dict_destroyed, SD});
sd_result(shared_dict_new, {error, shared_dict_full}) -> erlang:error(shared_dict_full);
sd_result(SD, {error, shared_dict_full}) -> erlang:error({shared_dict_full, SD});
sd_result(SD, {error, timeout}) -> erlang:error({pyport_timeout, SD});
sd_result(_SD, {error, {pyport_unavailable, _} = Reason}) -> erlang:error(Reason);
sd_result(_SD, {error, overloaded}) -> erlang:error(overloaded);
sd_result(_SD, {error, {pyport_exit, Status}}) ->
    erlang:error({pyport_unavailable, {exit_status, Status}});
sd_result(_SD, {error, _} = Error) -> Error.

-spec sd_ok(shared_dict(), {ok, binary()} | {error, term()}) -> binary().
sd_ok(_SD, {error, not_owner}) -> erlang:error(not_owner);
sd_ok(_SD, {ok, Payload}) -> Payload;
sd_ok(_SD, {error, Reason}) -> erlang:error(Reason).

