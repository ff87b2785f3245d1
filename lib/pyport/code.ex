defmodule Pyport.Code do
  @moduledoc """
  Python source that knows where it was written: what `Pyport.Sigils` makes.

  `Pyport.eval/3` and `Pyport.exec/3` compile it with its file as Python's file name and
  its first line as the line of the sigil's first line of code, so a traceback names the
  Elixir file and line (and Python shows that line of the file).
  """

  @enforce_keys [:source, :file, :line]
  defstruct [:source, :file, :line]

  @type t :: %__MODULE__{source: String.t(), file: String.t(), line: pos_integer()}

  @doc """
  The Python text `Pyport.eval/3` (`mode` `:eval`) or `Pyport.exec/3` (`:exec`) sends for
  `code`: a string as it is; a `Pyport.Code` compiled with its file and line.

      iex> Pyport.Code.python("1 + 1", :eval)
      "1 + 1"
      iex> Pyport.Code.python(%Pyport.Code{source: "1 + 1", file: "lib/a.ex", line: 3}, :eval)
      "eval(compile('\\\\n' * 2 + '1 + 1', 'lib/a.ex', 'eval'))"
  """
  @spec python(String.t() | t(), :eval | :exec) :: String.t()
  def python(%__MODULE__{source: source, file: file, line: line}, mode)
      when is_binary(source) and is_binary(file) and is_integer(line) and line >= 1 do
    # Leading newlines put the code at its line: a syntax error is reported there too.
    padded = if line > 1, do: "'\\n' * #{line - 1} + #{literal(source)}", else: literal(source)
    "#{mode}(compile(#{padded}, #{literal(file)}, '#{mode}'))"
  end

  def python(code, _mode) when is_binary(code), do: code

  def python(other, _mode) do
    raise ArgumentError, "expected Python code (a string or a Pyport.Code), got: #{inspect(other)}"
  end

  # A Python string literal of `text`: control characters, quotes and backslashes escaped,
  # the rest as UTF-8 (Python source is UTF-8).
  defp literal(text) do
    escaped =
      for <<c::utf8 <- text>>, into: "" do
        case c do
          ?\\ -> "\\\\"
          ?' -> "\\'"
          ?\n -> "\\n"
          ?\r -> "\\r"
          ?\t -> "\\t"
          c when c < 0x20 or c == 0x7F -> "\\x" <> String.pad_leading(Integer.to_string(c, 16), 2, "0")
          c -> <<c::utf8>>
        end
      end

    "'" <> escaped <> "'"
  end
end

defmodule Pyport.Sigils do
  @moduledoc """
  `~PY` (Elixir 1.15 and later) and `~P` (any Elixir: 1.14 knows only one-letter sigils):
  Python code in Elixir source that keeps its file and line.

      import Pyport.Sigils

      Pyport.exec!(~P\"\"\"
      def area(r):
          return 3.14159 * r * r
      \"\"\")
      Pyport.eval!(~P"area(2)")   #=> 12.56636

  A traceback of such code names the Elixir file and the line the Python code is on there.
  Like Elixir's own uppercase sigils, they do not interpolate: bind values with the
  `locals` of `Pyport.eval/3` and `Pyport.exec/3`.
  """

  @doc "Python code with the file and line it was written at (Elixir 1.15 and later)."
  defmacro sigil_PY(source, modifiers), do: code(source, modifiers, __CALLER__)

  @doc "The same as `sigil_PY/2`, for Elixir 1.14."
  defmacro sigil_P(source, modifiers), do: code(source, modifiers, __CALLER__)

  defp code({:<<>>, meta, [source]}, [], caller) when is_binary(source) do
    # A heredoc's code starts on the line after the opening quotes.
    line = (meta[:line] || caller.line) + if(meta[:indentation], do: 1, else: 0)
    Macro.escape(%Pyport.Code{source: source, file: caller.file, line: line})
  end

  defp code(_source, modifiers, _caller) when modifiers != [] do
    raise ArgumentError, "~PY takes no modifiers, got: #{modifiers}"
  end
end
