defmodule Pyport.SharedDict do
  @moduledoc """
  A dictionary that lives in the port program, owned by a process, and read and written by
  Elixir (through these functions) and Python (`erlang.SharedDict(handle)`) alike.

  Keys are strings. A dict is destroyed when its owner exits, by `destroy/1`, or by a
  restart of the port. Operations on a destroyed dict, a port that is down or that does not
  answer within the app env `shared_dict_timeout` raise `Pyport.Error` (whose `reason` is
  `{:shared_dict_destroyed, sd}`, `{:pyport_unavailable, why}` or `{:pyport_timeout, sd}`);
  a key that is not a string raises `ArgumentError`. See the README's SharedDict section for
  the consistency model.

      iex> {:ok, sd} = Pyport.SharedDict.new()
      iex> Pyport.SharedDict.put(sd, "config", %{"host" => "localhost", "port" => 8080})
      :ok
      iex> Pyport.SharedDict.get(sd, "config")
      %{"host" => "localhost", "port" => 8080}
      iex> Pyport.eval("erlang.SharedDict(sd)['config']['port'] + 1", sd: sd)
      {:ok, 8081}
      iex> Pyport.SharedDict.keys(sd)
      ["config"]
      iex> Pyport.SharedDict.destroy(sd)
      :ok
  """

  @typedoc "A SharedDict handle: may be sent to other processes and passed to Python."
  @type t :: :py.shared_dict()

  @doc """
  Creates a SharedDict owned by the caller, or by the process of option `:owner`.

      iex> {:ok, _sd} = Pyport.SharedDict.new(owner: self())
  """
  @spec new(keyword()) :: {:ok, t()}
  def new(opts \\ []) do
    opts = Keyword.validate!(opts, [:owner])
    run(fn -> :py.shared_dict_new(Map.new(opts)) end)
  end

  @doc """
  The value under `key`, or `default` (`nil`) when there is none.

      iex> {:ok, sd} = Pyport.SharedDict.new()
      iex> Pyport.SharedDict.get(sd, "missing", :none)
      :none
  """
  @spec get(t(), String.t(), term()) :: term()
  def get(sd, key, default \\ nil), do: run(fn -> :py.shared_dict_get(sd, key, default) end)

  @doc """
  Stores `value` (converted to Python and pickled) under `key`: `:ok`, or `{:error,
  %Pyport.Error{}}` for a value that cannot be stored.
  """
  @spec put(t(), String.t(), term()) :: :ok | {:error, Pyport.Error.t()}
  def put(sd, key, value) do
    case run(fn -> :py.shared_dict_set(sd, key, value) end) do
      :ok -> :ok
      {:error, reason} -> {:error, Pyport.Error.from_reason(reason)}
    end
  end

  @doc "Deletes `key` (`:ok` also when it is missing)."
  @spec delete(t(), String.t()) :: :ok
  def delete(sd, key), do: run(fn -> :py.shared_dict_del(sd, key) end)

  @doc "The keys, in insertion order."
  @spec keys(t()) :: [String.t()]
  def keys(sd), do: run(fn -> :py.shared_dict_keys(sd) end)

  @doc """
  Adds the integer `increment` to the integer under `key` (a missing key counts from 0)
  and returns the new value, atomically against every other operation.

      iex> {:ok, sd} = Pyport.SharedDict.new()
      iex> Pyport.SharedDict.update_counter(sd, "hits")
      1
      iex> Pyport.SharedDict.update_counter(sd, "hits", 10)
      11
  """
  @spec update_counter(t(), String.t(), integer()) :: integer()
  def update_counter(sd, key, increment \\ 1),
    do: run(fn -> :py.shared_dict_update_counter(sd, key, increment) end)

  @doc """
  Stores `new` under `key` if the value there is `===` `old` (`:absent`: if there is no
  value), atomically; returns whether it did.

      iex> {:ok, sd} = Pyport.SharedDict.new()
      iex> Pyport.SharedDict.compare_and_swap(sd, "lock", :absent, "me")
      true
      iex> Pyport.SharedDict.compare_and_swap(sd, "lock", :absent, "you")
      false
  """
  @spec compare_and_swap(t(), String.t(), :absent | term(), term()) :: boolean()
  def compare_and_swap(sd, key, old, new),
    do: run(fn -> :py.shared_dict_compare_and_swap(sd, key, old, new) end)

  @doc "Makes `pid` the dict's owner (only its owner may give it away)."
  @spec give_away(t(), pid()) :: :ok
  def give_away(sd, pid), do: run(fn -> :py.shared_dict_give_away(sd, pid) end)

  @doc "Destroys the dict; `:ok` also when it is already destroyed."
  @spec destroy(t()) :: :ok
  def destroy(sd), do: run(fn -> :py.shared_dict_destroy(sd) end)

  # `:py`'s failures as Pyport.Error; badarg stays an ArgumentError.
  defp run(fun) do
    fun.()
  catch
    :error, reason when is_tuple(reason) or reason in [:overloaded, :not_owner] ->
      reraise Pyport.Error.from_reason(reason), __STACKTRACE__
  end
end
