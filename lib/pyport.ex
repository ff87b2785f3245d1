defmodule Pyport do
  @moduledoc """
  Python for Elixir, run in a separate, crash-isolated OS process.

  `Pyport` is the Elixir face of the `:pyport` application (whose Erlang module is `:py`):
  call Python functions, evaluate expressions, run statements, stream a generator's items
  and share dictionaries (`Pyport.SharedDict`). Every function returns `{:ok, value}` or
  `{:error, %Pyport.Error{}}`; the `!` variants return the value or raise the error.

      iex> Pyport.call(:math, :sqrt, [16.0])
      {:ok, 4.0}
      iex> Pyport.call!(:builtins, :sorted, [[3, 1, 2]], kwargs: [reverse: true])
      [3, 2, 1]
      iex> Pyport.eval("x * x + y", x: 3, y: 4)
      {:ok, 13}

  Each Elixir process has its own Python namespace: what `exec/3` defines there is seen by
  that process's later `eval/3`, `exec/3` and `call(:__main__, ...)`, and by no other.

      iex> Pyport.exec("def greet(name):\\n    return 'hello ' + name\\n")
      :ok
      iex> Pyport.call(:__main__, :greet, ["joe"])
      {:ok, "hello joe"}

  Values convert as the README's "Type conversion" table says. With the app env `elixir` set
  to `true` (`config :pyport, elixir: true`), Python's `None` is `nil` and its dates, times,
  datetimes and decimals come back as `Date`, `Time`, `NaiveDateTime`, `DateTime` and
  `Decimal` structs:

      iex> Pyport.eval("__import__('datetime').date(2024, 2, 29)")
      {:ok, ~D[2024-02-29]}

  Python code in Elixir source, with tracebacks that point at the Elixir file and line:
  see `Pyport.Sigils`.
  """

  alias Pyport.Error

  @typedoc "A Python module or function name."
  @type name :: atom() | String.t()
  @typedoc "Python source, or code written with `Pyport.Sigils`."
  @type code :: String.t() | Pyport.Code.t()
  @typedoc "Variables bound in the caller's namespace before the code runs."
  @type locals :: %{optional(atom() | String.t()) => term()} | keyword()
  @type result(value) :: {:ok, value} | {:error, Error.t()}

  @doc """
  Calls `module.function(*args, **kwargs)` in Python and returns its result.

  `module` `:__main__` is the caller's own namespace; any other module is imported, and
  `function` may be a dotted path in it. When the function is an `async def`, its coroutine
  is awaited in the port.

  Options:
    * `:kwargs` - keyword arguments, a keyword list or a map (default none);
    * `:timeout` - milliseconds, or `:infinity` (default: the app env `call_timeout`,
      30 000). A call that times out is interrupted in Python.

  ## Examples

      iex> Pyport.call(:operator, :add, ["a-", "b"])
      {:ok, "a-b"}
      iex> {:error, %Pyport.Error{type: :ZeroDivisionError}} = Pyport.call(:operator, :truediv, [1, 0])
      iex> Pyport.call(:time, :sleep, [0.5], timeout: 100)
      {:error, %Pyport.Error{reason: :timeout, message: "no answer in time; the Python code was interrupted (it may have run in part or in full)"}}
  """
  @spec call(name(), name(), list(), keyword()) :: result(term())
  def call(module, function, args \\ [], opts \\ []) do
    opts = Keyword.validate!(opts, [:kwargs, :timeout])
    kwargs = Keyword.get(opts, :kwargs, [])

    result(
      case Keyword.fetch(opts, :timeout) do
        {:ok, timeout} -> :py.call(module, function, args, kwargs, timeout)
        :error -> :py.call(module, function, args, kwargs)
      end
    )
  end

  @doc """
  Same as `call/4`, but returns the value or raises `Pyport.Error`.

      iex> Pyport.call!(:math, :pow, [2, 10])
      1024.0
  """
  @spec call!(name(), name(), list(), keyword()) :: term()
  def call!(module, function, args \\ [], opts \\ []),
    do: unwrap!(call(module, function, args, opts))

  @doc """
  Evaluates the Python expression `code` in the caller's namespace, after binding `locals`
  there, and returns its value (awaited first when it is a coroutine).

  Options: `:timeout` (default: the app env `call_timeout`, 30 000 ms).

      iex> Pyport.eval("sum(xs)", %{xs: [1, 2, 3]})
      {:ok, 6}
      iex> Pyport.eval("None")
      {:ok, nil}
  """
  @spec eval(code(), locals(), keyword()) :: result(term())
  def eval(code, locals \\ %{}, opts \\ []) do
    opts = Keyword.validate!(opts, [:timeout])
    source = Pyport.Code.python(code, :eval)

    result(
      case Keyword.fetch(opts, :timeout) do
        {:ok, timeout} -> :py.eval(source, Map.new(locals), timeout)
        :error -> :py.eval(source, Map.new(locals))
      end
    )
  end

  @doc """
  Same as `eval/3`, but returns the value or raises `Pyport.Error`.

      iex> Pyport.eval!("len('héllo')")
      5
  """
  @spec eval!(code(), locals(), keyword()) :: term()
  def eval!(code, locals \\ %{}, opts \\ []), do: unwrap!(eval(code, locals, opts))

  @doc """
  Runs the Python statements `code` in the caller's namespace, after binding `locals`
  there. What it defines or assigns stays for the caller's later calls.

  Options: `:timeout` (default `:infinity`).

      iex> Pyport.exec("total = a + b", a: 1, b: 2)
      :ok
      iex> Pyport.eval("total")
      {:ok, 3}
  """
  @spec exec(code(), locals(), keyword()) :: :ok | {:error, Error.t()}
  def exec(code, locals \\ %{}, opts \\ []) do
    opts = Keyword.validate!(opts, timeout: :infinity)

    case :py.exec(Pyport.Code.python(code, :exec), Map.new(locals), opts[:timeout]) do
      :ok -> :ok
      {:error, reason} -> {:error, Error.from_reason(reason)}
    end
  end

  @doc """
  Same as `exec/3`, but returns `:ok` or raises `Pyport.Error`.

      iex> Pyport.exec!("import json")
      :ok
  """
  @spec exec!(code(), locals(), keyword()) :: :ok
  def exec!(code, locals \\ %{}, opts \\ []) do
    case exec(code, locals, opts) do
      :ok -> :ok
      {:error, error} -> raise error
    end
  end

  @doc """
  The items of the generator (or any iterable, or async iterator) that
  `module.function(*args, **kwargs)` returns, as a lazy Elixir `Stream`.

  The function is called, in the namespace of the process that enumerates, when the
  enumeration starts; items are produced as they are consumed, at most `:window` ahead
  (default 64), and an enumeration that stops early (`Enum.take/2`) closes the generator
  (its `finally` runs). Nothing reaches the enumerating process's mailbox. An item that
  does not come within `:timeout` ms (default: the app env `call_timeout`), or a Python
  exception, raises `Pyport.Error`.

  Options: `:kwargs`, `:window`, `:timeout`.

      iex> Pyport.exec!("def countdown(n):\\n    while n > 0:\\n        yield n\\n        n -= 1\\n")
      iex> Pyport.stream(:__main__, :countdown, [3]) |> Enum.to_list()
      [3, 2, 1]
      iex> Pyport.stream(:itertools, :count, [1]) |> Enum.take(2)
      [1, 2]
  """
  @spec stream(name(), name(), list(), keyword()) :: Enumerable.t()
  def stream(module, function, args \\ [], opts \\ []) do
    opts = Keyword.validate!(opts, [:kwargs, :timeout, window: 64])
    Pyport.Stream.new(module, function, args, opts)
  end

  @doc """
  What the port holds and does (`:py.stats/0`): workers, namespaces, SharedDicts, requests
  in flight, the port's OS pid and restarts, and with a pool of ports one map per port.

      iex> {:ok, %{ready: true, port: :up}} = Pyport.stats()
  """
  @spec stats() :: result(map())
  def stats, do: result(:py.stats())

  @doc """
  Marks a binary to be passed to Python as `bytes` even when it is valid UTF-8 (which
  would otherwise become `str`).

      iex> Pyport.eval("type(b).__name__", b: Pyport.bytes("abc"))
      {:ok, "bytes"}
  """
  @spec bytes(binary()) :: {:"$pyport_bytes", binary()}
  defdelegate bytes(binary), to: :py

  @doc """
  Registers `fun` (which gets the argument list) as the Erlang function Python calls as
  `erlang.name(...)`.

      iex> Pyport.register_function(:double, fn [x] -> 2 * x end)
      :ok
      iex> Pyport.eval("erlang.double(21)")
      {:ok, 42}
  """
  @spec register_function(atom() | String.t(), (list() -> term())) :: :ok
  defdelegate register_function(name, fun), to: :py

  @doc "Removes the function registered as `name` (`:ok` also if there is none)."
  @spec unregister_function(atom() | String.t()) :: :ok
  defdelegate unregister_function(name), to: :py

  @doc """
  Restarts the port program(s) with the application environment as it is now (for
  instance after `Application.put_env(:pyport, :python, "/path/to/venv")`); see
  `:py.restart/0`.
  """
  @spec restart() :: :ok | {:error, term()}
  defdelegate restart(), to: :py

  defp result({:ok, value}), do: {:ok, value}
  defp result({:error, reason}), do: {:error, Error.from_reason(reason)}

  defp unwrap!({:ok, value}), do: value
  defp unwrap!({:error, error}), do: raise(error)
end
