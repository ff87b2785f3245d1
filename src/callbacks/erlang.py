"""The Python half of the erlang module that pyport adds at start-up: its exceptions,
the helpers written in Python, and `erlang.name(*args)` / `from erlang import name` for
registered Erlang functions (module `__getattr__`, PEP 562)."""

class ErlangError(Exception):
    """Raised by erlang.call when the Erlang function raised: class_ is 'error', 'exit'
    or 'throw'; reason and stack are their texts."""

    def __init__(self, class_, reason, stack):
        super().__init__("%s: %s" % (class_, reason))
        self.class_ = class_
        self.reason = reason
        self.stack = stack


class UnknownFunction(LookupError):
    """Raised by erlang.call for a name no Erlang function is registered under."""


class NoCaller(Exception):
    """Raised by erlang.self() in a thread that runs no Erlang call."""


def __getattr__(name):
    # Only names registered on the Erlang side right now (the port is told of every
    # registration and unregistration before the call that registered returns):
    # hasattr() and `from erlang import x` follow them exactly.
    if name.startswith("_") or not _is_registered(name):
        raise AttributeError("module 'erlang' has no attribute %r" % (name,))

    def registered(*args):
        return call(name, *args)

    registered.__name__ = registered.__qualname__ = name
    return registered


def __dir__():
    return sorted(set(globals()) | set(_registered_names()))


def _settle(future, ok, value):
    # Run on the future's loop (call_soon_threadsafe): the answer of an erlang.async_call.
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def run(main, *, debug=None):
    """Runs the coroutine `main` on a new event loop and returns its result, as
    asyncio.run does (which it is). RuntimeError when a loop already runs in this thread:
    in a coroutine, await instead."""
    import asyncio
    return asyncio.run(main, debug=debug)


def sleep(seconds):
    """In a coroutine (an event loop runs in this thread): `await erlang.sleep(s)`, the
    same as asyncio.sleep. Elsewhere it sleeps, and the caller giving up interrupts it
    (erlang.CallCancelled) instead of waiting for it as time.sleep would."""
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _sleep(seconds)
    return asyncio.sleep(seconds)


class _OpaqueKind(type):
    # isinstance(x, erlang.Pid) for the opaque terms of that kind.
    def __instancecheck__(cls, obj):
        return isinstance(obj, OpaqueTerm) and obj.kind == cls._kind

    def __subclasscheck__(cls, sub):
        return isinstance(sub, type) and issubclass(sub, OpaqueTerm)


class Pid(metaclass=_OpaqueKind):
    """What isinstance recognises as an Erlang pid (an erlang.OpaqueTerm of kind 'pid')."""
    _kind = "pid"


class Ref(metaclass=_OpaqueKind):
    """What isinstance recognises as an Erlang reference (an erlang.OpaqueTerm of kind
    'reference')."""
    _kind = "reference"
