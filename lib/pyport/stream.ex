defmodule Pyport.Stream do
  @moduledoc false
  # `Pyport.stream/4`: a Python stream, owned by a small process of its own (its proxy),
  # read by the enumerating process a batch at a time. The proxy's mailbox holds at most
  # `window` items (the stream's mailbox flow control pauses the generator there), and
  # whatever is still on its way when the enumeration stops dies with the proxy, whose
  # exit also closes the generator: nothing reaches the enumerating process's mailbox.

  alias Pyport.Error

  @spec new(Pyport.name(), Pyport.name(), list(), keyword()) :: Enumerable.t()
  def new(module, function, args, opts) do
    Stream.resource(
      fn -> start(module, function, args, opts) end,
      &next/1,
      &stop/1
    )
  end

  defp start(module, function, args, opts) do
    window = opts[:window]

    unless is_integer(window) and window >= 1,
      do: raise(ArgumentError, "window must be a positive integer, got: #{inspect(window)}")

    timeout = Keyword.get_lazy(opts, :timeout, fn -> default_timeout() end)
    label = {:pyport_stream, module, function}
    proxy = :proc_lib.spawn(__MODULE__, :proxy, [self(), label, window])
    mon = Process.monitor(proxy)
    stream_opts = %{owner: proxy, window: window}

    case :py.stream_start(module, function, args, Keyword.get(opts, :kwargs, []), stream_opts) do
      {:ok, ref} ->
        send(proxy, {:stream, ref})
        {proxy, mon, timeout, :cont}

      {:error, reason} ->
        stop({proxy, mon, timeout, :done})
        raise Error.from_reason(reason)
    end
  end

  defp next({_proxy, _mon, _timeout, :done} = state), do: {:halt, state}

  defp next({proxy, mon, timeout, :cont}) do
    send(proxy, {:next, mon, timeout})

    receive do
      {^mon, items, :cont} -> {items, {proxy, mon, timeout, :cont}}
      {^mon, items, :done} -> {items, {proxy, mon, timeout, :done}}
      {^mon, [], {:error, reason}} -> raise Error.from_reason(reason)
      {^mon, items, {:error, _} = error} -> {items, {proxy, mon, timeout, error}}
      {:DOWN, ^mon, :process, _, reason} -> raise Error.from_reason({:stream_owner_exit, reason})
    end
  end

  defp next({_proxy, _mon, _timeout, {:error, reason}}), do: raise(Error.from_reason(reason))

  defp stop({proxy, mon, _timeout, _status}) do
    Process.demonitor(mon, [:flush])
    Process.exit(proxy, :kill)
    :ok
  end

  defp default_timeout do
    case Application.get_env(:pyport, :call_timeout, 30_000) do
      t when (is_integer(t) and t >= 0) or t == :infinity -> t
      _ -> 30_000
    end
  end

  @doc false
  # The proxy: the stream's owner. Ends with its consumer.
  def proxy(consumer, label, window) do
    :ok = :pyport_telemetry.label(label)
    mon = Process.monitor(consumer)

    receive do
      {:stream, ref} -> serve(consumer, mon, ref, window)
      {:DOWN, ^mon, :process, _, _} -> :ok
    end
  end

  defp serve(consumer, mon, ref, window) do
    receive do
      {:next, tag, timeout} ->
        {items, status} = take(ref, timeout, window)
        send(consumer, {tag, items, status})
        if status == :cont, do: serve(consumer, mon, ref, window), else: :ok

      {:DOWN, ^mon, :process, _, _} ->
        :ok
    end
  end

  # The first item within `timeout`, then whatever else has come, up to `window` items.
  defp take(ref, timeout, window) do
    receive do
      {:py_stream, ^ref, {:data, value}} -> more(ref, window - 1, [value])
      {:py_stream, ^ref, :done} -> {[], :done}
      {:py_stream, ^ref, {:error, reason}} -> {[], {:error, reason}}
    after
      timeout -> {[], {:error, :timeout}}
    end
  end

  defp more(_ref, 0, acc), do: {Enum.reverse(acc), :cont}

  defp more(ref, n, acc) do
    receive do
      {:py_stream, ^ref, {:data, value}} -> more(ref, n - 1, [value | acc])
      {:py_stream, ^ref, :done} -> {Enum.reverse(acc), :done}
      {:py_stream, ^ref, {:error, reason}} -> {Enum.reverse(acc), {:error, reason}}
    after
      0 -> {Enum.reverse(acc), :cont}
    end
  end
end
