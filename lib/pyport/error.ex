defmodule Pyport.Error do
  @moduledoc """
  A failure of a Python call, as an exception.

  The non-bang functions of `Pyport` return `{:error, %Pyport.Error{}}`, the bang functions
  raise it. For an exception raised in Python, `type` is the Python class (an atom for
  Python's built-in exceptions, such as `:ValueError`, and the qualified class name as a
  string for any other, such as `"json.decoder.JSONDecodeError"`), `message` is `str(exc)`
  and `traceback` the formatted traceback. For any other failure `type` and `traceback` are
  `nil` and `reason` is what `:py` returned, for instance `:timeout` or
  `{:pyport_exit, 137}`.

      iex> {:error, error} = Pyport.eval("int('x')")
      iex> {error.type, error.message}
      {:ValueError, "invalid literal for int() with base 10: 'x'"}
      iex> error.traceback =~ "Traceback (most recent call last)"
      true
  """

  defexception [:reason, :type, :message, :traceback]

  @type t :: %__MODULE__{
          reason: term(),
          type: atom() | String.t() | nil,
          message: String.t(),
          traceback: String.t() | nil
        }

  @doc """
  The exception for an error reason of `:py` (the `Reason` of `{error, Reason}`).

      iex> Pyport.Error.from_reason(:timeout).message
      "no answer in time; the Python code was interrupted (it may have run in part or in full)"
  """
  @spec from_reason(term()) :: t()
  def from_reason({:python, type, message, traceback} = reason) do
    %__MODULE__{reason: reason, type: type, message: message, traceback: traceback}
  end

  def from_reason(reason) do
    %__MODULE__{reason: reason, message: describe(reason)}
  end

  @impl true
  def message(%__MODULE__{type: nil, message: message}), do: message

  def message(%__MODULE__{type: type, message: message, traceback: traceback}) do
    "#{type}: #{message}" <> if(traceback in [nil, ""], do: "", else: "\n\n" <> traceback)
  end

  defp describe(:timeout),
    do: "no answer in time; the Python code was interrupted (it may have run in part or in full)"

  defp describe(:cancelled), do: "the request was cancelled (erlang.CallCancelled)"
  defp describe({:pyport_exit, status}), do: "the port program exited (#{inspect(status)})"

  defp describe({:pyport_unavailable, why}),
    do: "no port program is running (#{inspect(why)}); is the :pyport application started?"

  defp describe({:shared_dict_destroyed, _}), do: "the SharedDict is destroyed"
  defp describe({:pyport_timeout, _}), do: "the SharedDict operation got no answer in time"
  defp describe(reason), do: inspect(reason)
end
