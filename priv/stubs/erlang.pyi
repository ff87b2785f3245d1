"""Type stubs for `erlang`, the module built into pyport's port program.

The module exists only inside the port (it is compiled into priv/pyport), so editors and type
checkers cannot import it: point them at this folder (mypy: `mypy_path`, pyright:
`stubPath`, or copy the file next to your code). A test checks that these names match
`dir(erlang)` in the port.
"""

import asyncio
import logging
from collections.abc import Coroutine, Iterator, MutableMapping
from typing import Any, Literal, TypeVar, overload

_T = TypeVar("_T")

#: Most containers a value may nest, both ways.
NESTING_LIMIT: int

ABSENT: object

class ErlangError(Exception):
    """Raised by a callback whose Erlang function raised: class_ is 'error', 'exit' or
    'throw'; reason and stack are their texts."""
    class_: str
    reason: str
    stack: str
    def __init__(self, class_: str, reason: str, stack: str) -> None: ...

class UnknownFunction(LookupError):
    """Raised by call() for a name no Erlang function is registered under."""

class NoCaller(Exception):
    """Raised by self() in a thread that runs no Erlang call."""

def call(name: str, *args: Any) -> Any:
    """Runs the Erlang function registered as name (py:register_function) with args and
    returns its result. erlang.name(*args) and `from erlang import name` work too."""

def send(pid: OpaqueTerm, message: Any) -> None:
    """Sends message to the Erlang process pid, like `!`."""

def self() -> OpaqueTerm:
    """The pid of the Erlang process whose call this thread runs (threads started during a
    call inherit it); NoCaller elsewhere."""

def whereis(name: str) -> OpaqueTerm | None:
    """The pid registered under name in the VM, or None."""
"""SharedDict.compare_and_swap(key, ABSENT, new) stores new only if key is absent."""

def async_call(name: str, *args: Any) -> "asyncio.Future[Any]":
    """The awaitable form of `call`, for asyncio code: a future of the running loop (no
    running loop: RuntimeError). Many may be in flight at once; cancelling it (its task's
    caller gave up) kills the callback's process."""

def run(main: Coroutine[Any, Any, _T], *, debug: bool | None = None) -> _T:
    """Runs the coroutine to its end on a new event loop, as asyncio.run does."""

def sleep(seconds: float) -> Any:
    """In a coroutine, `await erlang.sleep(s)` (asyncio.sleep). Elsewhere it sleeps, and
    the caller giving up interrupts it (CallCancelled)."""

class Pid:
    """isinstance(x, erlang.Pid): x is an OpaqueTerm of kind 'pid'."""

class Ref:
    """isinstance(x, erlang.Ref): x is an OpaqueTerm of kind 'reference'."""

class CallCancelled(BaseException):
    """Raised in Python code whose Erlang caller timed out or died. A BaseException, so
    `except Exception` does not swallow it."""

class SharedDictDestroyed(RuntimeError):
    """Raised by every SharedDict operation after the dict was destroyed."""

class OpaqueTerm:
    """A pid, reference, port or fun sent by Erlang; hashable, picklable, passed back as the
    identical term. Python cannot make one up: `mac` must match what this port computed."""
    def __init__(self, kind: str, data: bytes, mac: bytes | None = None) -> None: ...
    @property
    def kind(self) -> Literal["pid", "reference", "port", "fun"]: ...
    @property
    def data(self) -> bytes: ...
    def __hash__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...

class SharedDictHandle:
    """The handle of a SharedDict, as Erlang passes it (`py:shared_dict_new/0`)."""
    def __init__(self, generation: int, id: int, token: bytes) -> None: ...
    def __hash__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...

class SharedDict(MutableMapping[str | bytes, Any]):
    """A dictionary shared between Erlang and Python, owned by an Erlang process. Keys are
    str or bytes ('k' and b'k' are the same key); values are pickled on store."""
    def __init__(self, handle: SharedDictHandle | SharedDict) -> None: ...
    @property
    def handle(self) -> SharedDictHandle: ...
    @property
    def destroyed(self) -> bool: ...
    def __getitem__(self, key: str | bytes) -> Any: ...
    def __setitem__(self, key: str | bytes, value: Any) -> None: ...
    def __delitem__(self, key: str | bytes) -> None: ...
    def __contains__(self, key: object) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def keys(self) -> list[str]: ...  # type: ignore[override]
    @overload
    def get(self, key: str | bytes) -> Any | None: ...
    @overload
    def get(self, key: str | bytes, default: Any) -> Any: ...
    def pop(self, key: str | bytes, *default: Any) -> Any: ...
    def clear(self) -> None: ...
    def incr(self, key: str | bytes, n: int = 1) -> int:
        """Adds n to the int under key (a missing key counts from 0) and returns the new
        value, atomically; TypeError if the value is not an int."""
    def compare_and_swap(self, key: str | bytes, old: Any, new: Any) -> bool:
        """Stores new if the value is of old's type and == old (old=ABSENT: only if the key
        is absent), atomically; returns whether it did."""
    def destroy(self) -> None:
        """Destroys the dict (idempotent); afterwards every operation raises
        SharedDictDestroyed."""

class LogHandler(logging.Handler):
    """Sends records to Erlang's logger; pyport puts one on the root logger at start-up."""
    def __init__(self, level: int = ...) -> None: ...
    def emit(self, record: logging.LogRecord) -> None: ...
