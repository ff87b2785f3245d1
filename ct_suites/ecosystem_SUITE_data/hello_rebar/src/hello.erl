-module(hello).
-export([sqrt/1]).

%% Starts pyport if it is not running yet and asks Python for a square root.
sqrt(X) ->
    {ok, _} = application:ensure_all_started(pyport),
    py:call(math, sqrt, [X]).
