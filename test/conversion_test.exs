defmodule Pyport.ConversionTest do
  # App env `elixir: true` (set by test_helper): Python's values come back as Elixir's.
  use ExUnit.Case, async: false
  import PyportTest.Support

  # Each test runs in a process of its own, with a namespace of its own.
  defp py(expr) do
    Pyport.exec!("import datetime as dt, decimal, uuid")
    Pyport.eval!(expr)
  end

  # Decimal is not known when this file compiles: its struct as a map.
  defp dec(sign, coef, exp), do: %{__struct__: Decimal, sign: sign, coef: coef, exp: exp}

  defp back(value), do: Pyport.call!(:builtins, :eval, ["v", %{"v" => value}])

  test "dates at the edges of their range" do
    assert py("dt.date(1, 1, 1)") == ~D[0001-01-01]
    assert py("dt.date(9999, 12, 31)") == ~D[9999-12-31]
    assert py("dt.date(2024, 2, 29)") == ~D[2024-02-29]
  end

  test "naive times and datetimes, with and without microseconds" do
    assert py("dt.time(0, 0)") == ~T[00:00:00]
    assert py("dt.time(23, 59, 59, 999999)") == ~T[23:59:59.999999]
    assert py("dt.time(12, 0, 0, 1)") == ~T[12:00:00.000001]
    assert py("dt.datetime(1, 1, 1)") == ~N[0001-01-01 00:00:00]
    assert py("dt.datetime(9999, 12, 31, 23, 59, 59, 999999)") == ~N[9999-12-31 23:59:59.999999]
  end

  test "aware datetimes keep their UTC offset exactly, up to +-23:59" do
    utc = py("dt.datetime(2024, 3, 1, 12, 30, tzinfo=dt.timezone.utc)")
    assert utc == ~U[2024-03-01 12:30:00Z]
    assert utc.time_zone == "Etc/UTC" and DateTime.to_iso8601(utc) == "2024-03-01T12:30:00Z"

    plus = py("dt.datetime(2024, 3, 1, 23, 59, 59, 5, tzinfo=dt.timezone(dt.timedelta(hours=23, minutes=59)))")
    assert %DateTime{utc_offset: 86_340, std_offset: 0, time_zone: "+23:59"} = plus
    assert DateTime.to_iso8601(plus) == "2024-03-01T23:59:59.000005+23:59"

    minus = py("dt.datetime(1, 1, 2, tzinfo=dt.timezone(-dt.timedelta(hours=23, minutes=59)))")
    assert %DateTime{utc_offset: -86_340, zone_abbr: "-23:59"} = minus
    assert DateTime.compare(minus, ~U[0001-01-02 23:59:00Z]) == :eq

    odd = py("dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30, seconds=15)))")
    assert %DateTime{utc_offset: 19_815, time_zone: "+05:30:15"} = odd
  end

  test "an aware time keeps its tagged form: Elixir's Time has no offset" do
    assert py("dt.time(1, 2, 3, tzinfo=dt.timezone.utc)") == {:"$pyport_time", {1, 2, 3}, 0, 0}
  end

  test "None is nil, and structs inside lists, tuples and map keys are converted" do
    assert py("None") == nil
    assert py("{dt.date(2024, 1, 1): [None, (dt.time(1, 0),)]}") == %{~D[2024-01-01] => [nil, {~T[01:00:00]}]}
  end

  test "timedelta and UUID keep their tagged forms; text that looks like a tag is text" do
    assert py("dt.timedelta(seconds=1)") == {:"$pyport_timedelta", 0, 1, 0}
    assert {:"$pyport_uuid", "12345678-1234-5678-1234-567812345678"} =
             py("uuid.UUID('12345678123456781234567812345678')")
    assert py("'$pyport_date'") == "$pyport_date"
  end

  test "round trips: Elixir struct -> Python -> the same struct" do
    for v <- [~D[0001-01-01], ~D[9999-12-31], ~T[23:59:59.999999], ~T[00:00:00],
              ~N[2024-02-29 12:00:00.000001], ~U[2024-03-01 12:30:00.123456Z]] do
      assert back(v) == v, inspect(v)
    end

    aware = py("dt.datetime(2024, 3, 1, 1, 2, 3, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30)))")
    assert back(aware) == aware
    assert Pyport.eval!("v.utcoffset().total_seconds()", v: aware) == -19_800.0
  end

  test "Decimal structs when Decimal is loaded, the tagged form when it is not" do
    unload(Decimal)
    assert py("decimal.Decimal('1.50')") == {:"$pyport_decimal", "1.50"}

    load_decimal()

    try do
      assert py("decimal.Decimal('1.50')") == dec(1, 150, -2)
      assert py("decimal.Decimal('-1E+3')") == dec(-1, 1, 3)
      assert py("decimal.Decimal('-Infinity')") == dec(-1, :inf, 0)
      assert py("decimal.Decimal('NaN')") == dec(1, :NaN, 0)
      # Decimal has no signalling NaN: that one stays tagged.
      assert py("decimal.Decimal('sNaN')") == {:"$pyport_decimal", "sNaN"}
      assert back(dec(1, 150, -2)) == dec(1, 150, -2)
    after
      unload(Decimal)
    end
  end

  test "SharedDict reads, callback arguments and messages from Python are converted too" do
    {:ok, sd} = Pyport.SharedDict.new()
    Pyport.exec!("import datetime as dt\nerlang.SharedDict(sd)['d'] = dt.date(2000, 1, 2)", sd: sd)
    assert Pyport.SharedDict.get(sd, "d") == ~D[2000-01-02]

    parent = self()
    :ok = Pyport.register_function(:got, fn [v] -> send(parent, {:got, v}) && true end)
    assert py("erlang.got(dt.date(2001, 2, 3))")
    assert_received {:got, ~D[2001-02-03]}
    Pyport.exec!("erlang.send(p, ('msg', dt.time(4, 5)))", p: self())
    assert_receive {"msg", ~T[04:05:00]}, 5000
    assert Pyport.stream(:builtins, :iter, [[~D[2024-01-01]]]) |> Enum.to_list() == [~D[2024-01-01]]
  end

  test "with elixir false (the default), the tagged forms and :undefined" do
    with_env([elixir: false], fn ->
      assert Pyport.eval!("__import__('datetime').date(2024, 3, 1)") == {:"$pyport_date", {2024, 3, 1}}
      assert Pyport.eval!("None") == :undefined
    end)

    assert Pyport.eval!("None") == nil
  end

  test "an explicit none_as wins over elixir's nil" do
    with_env([none_as: :none], fn -> assert Pyport.eval!("None") == :none end)
  end
end
