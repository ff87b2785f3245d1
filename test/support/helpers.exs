defmodule PyportTest.Support do
  @moduledoc false
  # Helpers of the ExUnit suite: the stand-ins for the telemetry and decimal libraries
  # (compiled into memory, and removed again, by the tests that need them), and pyport
  # restarted with another app env.

  @support Path.expand(".", __DIR__)

  @doc "Loads the stand-in `telemetry` module (test/support/telemetry.erl)."
  def load_telemetry do
    {:ok, :telemetry, beam} =
      :compile.file(String.to_charlist(Path.join(@support, "telemetry.erl")), [:binary])

    {:module, :telemetry} = :code.load_binary(:telemetry, ~c"telemetry.erl", beam)
    :ok
  end

  @doc "Loads the stand-in `Decimal` (test/support/decimal.ex)."
  def load_decimal do
    Code.compiler_options(ignore_module_conflict: true)
    true = List.keymember?(Code.compile_file(Path.join(@support, "decimal.ex")), Decimal, 0)
    :ok
  end

  @doc "Removes a module from the VM, as if it had never been there."
  def unload(module) do
    :code.purge(module)
    :code.delete(module)
    :code.purge(module)
    :ok
  end

  @doc "Runs `fun` with pyport restarted under `env` (app env pairs), then restores it."
  def with_env(env, fun) do
    old = for {k, _} <- env, do: {k, Application.fetch_env(:pyport, k)}
    restart(fn -> Enum.each(env, fn {k, v} -> Application.put_env(:pyport, k, v) end) end)

    try do
      fun.()
    after
      restart(fn ->
        Enum.each(old, fn
          {k, {:ok, v}} -> Application.put_env(:pyport, k, v)
          {k, :error} -> Application.delete_env(:pyport, k)
        end)
      end)
    end
  end

  @doc "Stops pyport, runs `set_up`, starts pyport again (it reads its app env at start)."
  def restart(set_up \\ fn -> :ok end) do
    :ok = Application.stop(:pyport)
    set_up.()
    {:ok, _} = Application.ensure_all_started(:pyport)
    :ok
  end
end
