%% @doc The pyport application: starts {@link pyport_sup}, which starts
%% {@link pyport_server}, the process that owns the port program.
-module(pyport_app).
-behaviour(application).

-export([start/2, stop/1]).

%% @doc Application callback: checks the Python named by the app env `python' (see
%% {@link pyport_python}) and starts the top supervisor.
-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_StartType, _StartArgs) ->
    %% A wrong app env `python' fails the start here, with a reason that says why.
    case pyport_python:resolve() of
        ok -> pyport_sup:start_link();
        {error, _} = E -> E
    end.

%% @doc Application callback: nothing to clean up (the server closes the port).
-spec stop(term()) -> ok.
stop(_State) ->
    ok.
