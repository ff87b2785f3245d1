defmodule Pyport.SigilTest do
  # ~P / ~PY: Python code that keeps the Elixir file and line for its tracebacks.
  use ExUnit.Case, async: false
  import Pyport.Sigils

  test "a one-line sigil evaluates and names its file and line in a traceback" do
    assert Pyport.eval!(~P"1 + 1") == 2
    line = __ENV__.line + 1
    {:error, e} = Pyport.eval(~P"1 / 0")
    assert e.type == :ZeroDivisionError
    assert e.traceback =~ ~s(File "#{__ENV__.file}", line #{line}, in <module>)
  end

  test "a heredoc's code starts on the line after its opening quotes" do
    start = __ENV__.line + 1
    code = ~P"""
    def broken(x):
        y = x + 1
        return y / 0
    """

    assert code.line == start + 1
    :ok = Pyport.exec!(code)
    {:error, e} = Pyport.call(:__main__, :broken, [1])
    assert e.traceback =~ ~s(File "#{__ENV__.file}", line #{start + 3}, in broken)
    # Python shows the line itself, read from this file.
    assert e.traceback =~ "return y / 0"
  end

  test "quotes, backslashes and non-ASCII text survive, and locals are bound" do
    assert Pyport.eval!(~P"'it\'s' + ' \\ é\t' + s", s: "!") == "it's \\ é\t!"
  end

  test "a syntax error is reported at its Elixir line" do
    line = __ENV__.line + 1
    {:error, e} = Pyport.exec(~P"def (")
    assert e.type == :SyntaxError
    assert e.traceback =~ ~s(File "#{__ENV__.file}", line #{line})
  end

  test "~PY, where the Elixir version can read it (1.15 and later)" do
    if Version.match?(System.version(), ">= 1.15.0") do
      {value, _} = Code.eval_string(~S|import Pyport.Sigils; Pyport.eval!(~PY"6 * 7")|, [], file: "py.exs")
      assert value == 42
    else
      # Elixir 1.14 reads only one-letter sigils: the macro itself, as ~PY would call it.
      assert {:error, _} = Code.string_to_quoted(~S|~PY"6 * 7"|)
      assert sigil_PY(<<"6 * 7">>, []) == %Pyport.Code{source: "6 * 7", file: __ENV__.file, line: __ENV__.line}
    end
  end
end
