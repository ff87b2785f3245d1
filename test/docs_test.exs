defmodule Pyport.DocsTest do
  # `h :py.call` and `h Pyport.call` in IEx: clean text, rendered here by IEx itself.
  use ExUnit.Case, async: false
  import ExUnit.CaptureIO

  defp h(quoted), do: capture_io(fn -> IEx.Introspection.h(quoted) end)

  # What edoc and Elixir's renderer of erlang+html used to leave in the text.
  defp assert_clean(text) do
    refute text =~ "<pre>" or text =~ "</", text
    refute text =~ ~r/\(#[a-z_]+\/\d\)/, text
    refute text =~ "``", text
    refute text =~ "No documentation", text
  end

  test "h :py shows the module doc as wrapped text with its code quoted" do
    text = h(:py)
    assert_clean(text)
    assert text =~ "`exec/1` and `call('__main__', F, Args)`, not to other processes"
    # Paragraphs are wrapped (80 columns), none runs on for hundreds of characters.
    assert text |> String.split("\n") |> Enum.map(&String.length/1) |> Enum.max() <= 100
  end

  test "h :py.call and every other function of :py render clean" do
    call = h({:py, :call})
    assert call =~ "`Module` `__main__` means the caller's own namespace"

    for {f, a} <- :py.module_info(:exports), f not in [:module_info] do
      assert_clean(h({:py, f, a}))
    end
  end

  test "h Pyport.call" do
    text = h({Pyport, :call})
    assert_clean(text)
    assert text =~ "Calls `module.function(*args, **kwargs)` in Python"
    assert text =~ "Pyport.call(:operator, :add, [\"a-\", \"b\"])"
  end
end
