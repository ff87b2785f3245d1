defmodule Pyport.ReadmeTest do
  # The Elixir examples of README.md's "From Elixir" section, run as written: every
  # ```elixir block but the mix.exs and config/config.exs snippets (which
  # ecosystem_SUITE puts into a Mix project), evaluated with the README as their file
  # and their own line numbers.
  use ExUnit.Case, async: false
  import PyportTest.Support

  @readme Path.expand("../README.md", __DIR__)

  defp blocks do
    text = File.read!(@readme)
    [_, section] = String.split(text, "\n## From Elixir\n", parts: 2)
    [section | _] = String.split(section, "\n## ", parts: 2)
    offset = text |> String.split("\n## From Elixir\n") |> hd() |> String.split("\n") |> length()

    ~r/```elixir\n(.*?)```/s
    |> Regex.scan(section, return: :index)
    |> Enum.map(fn [_, {start, len}] ->
      # The heading is line offset + 1; the section starts on the next line.
      line = offset + 1 + (section |> binary_part(0, start) |> String.split("\n") |> length())
      {binary_part(section, start, len), line}
    end)
    |> Enum.reject(fn {code, _} -> code =~ ~r/\A# (mix\.exs|config\/)/ end)
  end

  # Elixir 1.14 cannot read ~PY (one-letter sigils only): there the README's ~PY is run
  # as ~P, the same macro.
  defp runnable(code) do
    if Version.match?(System.version(), ">= 1.15.0"), do: code, else: String.replace(code, "~PY", "~P")
  end

  defp run({code, line}) do
    Code.eval_string(runnable(code), [], file: @readme, line: line)
  end

  test "the section has the blocks this test expects" do
    assert length(blocks()) == 3
  end

  test "the API block" do
    run(Enum.at(blocks(), 0))
  end

  test "the ~PY block: its traceback names README.md at the line of the return" do
    {code, line} = Enum.at(blocks(), 1)
    {_, binding} = run({code, line})
    return_line = line + Enum.find_index(String.split(code, "\n"), &(&1 =~ "return 3.14159"))
    assert binding[:traceback] =~ ~s(File "#{@readme}", line #{return_line}, in area)
  end

  test "the telemetry block prints the call's duration" do
    load_telemetry()
    restart()

    try do
      out = ExUnit.CaptureIO.capture_io(fn -> run(Enum.at(blocks(), 2)) end)
      assert out =~ ~r/^math.sqrt took \d+ µs$/m
    after
      unload(:telemetry)
      restart()
    end
  end
end
