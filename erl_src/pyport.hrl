%% Shared by the modules that check what callers pass in.

%% A timeout as `receive ... after' takes it.
-define(IS_TIMEOUT(T), (T =:= infinity orelse (is_integer(T) andalso T >= 0 andalso T =< 16#FFFFFFFF))).
