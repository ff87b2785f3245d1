defmodule Decimal do
  @moduledoc false
  # A stand-in for the `decimal` library (which cannot be fetched here): its struct and
  # `new/1` from a string, as Decimal 2.x has them (`coef` an integer, `:NaN` or `:inf`;
  # no signalling NaN). Compiled by the tests into the VM when they need it.
  defstruct sign: 1, coef: 0, exp: 0

  defmodule Error do
    defexception message: "invalid decimal"
  end

  def new(%Decimal{} = d), do: d

  def new(text) when is_binary(text) do
    {sign, rest} =
      case text do
        "-" <> r -> {-1, r}
        "+" <> r -> {1, r}
        r -> {1, r}
      end

    case String.downcase(rest) do
      r when r in ["nan", "qnan"] -> %Decimal{sign: sign, coef: :NaN}
      r when r in ["inf", "infinity"] -> %Decimal{sign: sign, coef: :inf}
      _ -> finite(sign, rest)
    end
  end

  defp finite(sign, text) do
    case Regex.named_captures(~r/^(?<int>\d*)(?:\.(?<frac>\d*))?(?:[eE](?<exp>[+-]?\d+))?$/, text) do
      %{"int" => int, "frac" => frac, "exp" => exp} when int <> frac != "" ->
        exp = if exp == "", do: 0, else: String.to_integer(exp)
        %Decimal{sign: sign, coef: String.to_integer(int <> frac), exp: exp - byte_size(frac)}

      _ ->
        raise Error, message: "invalid decimal: #{inspect(text)}"
    end
  end
end
