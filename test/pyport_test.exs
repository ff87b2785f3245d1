defmodule PyportTest do
  # The Elixir API: the examples of its docs (doctests) and what they do not show.
  use ExUnit.Case, async: false

  doctest Pyport
  doctest Pyport.Error
  doctest Pyport.SharedDict
  doctest Pyport.Code

  describe "call/4, eval/3, exec/3" do
    test "kwargs as a keyword list or a map, and a Python exception as a Pyport.Error" do
      assert {:ok, [3, 2, 1]} = Pyport.call(:builtins, :sorted, [[1, 3, 2]], kwargs: %{reverse: true})
      assert {:error, %Pyport.Error{} = e} = Pyport.call(:json, :loads, ["{"])
      assert e.type == "json.decoder.JSONDecodeError"
      assert e.reason == {:python, e.type, e.message, e.traceback}
      assert Exception.message(e) =~ ~r/^json.decoder.JSONDecodeError: Expecting .*\n\nTraceback/s
    end

    test "the bang functions raise the error the others return" do
      e = assert_raise Pyport.Error, fn -> Pyport.call!(:operator, :truediv, [1, 0]) end
      assert e.type == :ZeroDivisionError
      assert_raise Pyport.Error, ~r/^NameError: name 'nope' is not defined/, fn -> Pyport.eval!("nope") end
      assert_raise Pyport.Error, ~r/^SyntaxError/, fn -> Pyport.exec!("def (") end
    end

    test "a timeout is an error with reason :timeout, and the next call works" do
      assert {:error, %Pyport.Error{reason: :timeout, type: nil}} = Pyport.eval("__import__('time').sleep(0.5)", %{}, timeout: 50)
      assert {:error, %Pyport.Error{reason: :timeout}} = Pyport.exec("while True:\n    pass", %{}, timeout: 50)
      assert {:ok, 2} = Pyport.eval("1 + 1")
    end

    test "unknown options and arguments of the wrong kind raise ArgumentError" do
      assert_raise ArgumentError, fn -> Pyport.call(:math, :sqrt, [2.0], timout: 5) end
      assert_raise ArgumentError, fn -> Pyport.eval(42) end
      assert_raise ArgumentError, fn -> Pyport.call(:math, :sqrt, :not_a_list) end
    end

    test "locals as a keyword list or a map" do
      assert {:ok, 7} = Pyport.eval("a + b", a: 3, b: 4)
      assert {:ok, 7} = Pyport.eval("a + b", %{"a" => 3, "b" => 4})
    end
  end

  describe "stream/4" do
    setup do
      Pyport.exec!("""
      closed = []
      def numbers(n, fail_at=None, notify=None):
          try:
              for i in range(n):
                  if i == fail_at:
                      raise ValueError('at %d' % i)
                  yield i
          finally:
              closed.append(n)
              if notify is not None:
                  erlang.send(notify, ('closed', n))
      """)
    end

    test "every item, in order, more than a window of them" do
      assert Enum.to_list(Pyport.stream(:__main__, :numbers, [1000], window: 8)) == Enum.to_list(0..999)
      assert Pyport.eval!("closed") == [1000]
    end

    test "a stream is lazy and can be enumerated again" do
      s = Pyport.stream(:__main__, :numbers, [3])
      assert Pyport.eval!("closed") == []
      assert Enum.to_list(s) == [0, 1, 2]
      assert Enum.to_list(s) == [0, 1, 2]
    end

    test "stopping early closes the generator and leaves nothing in the mailbox" do
      s = Pyport.stream(:__main__, :numbers, [100_000], window: 4, kwargs: [notify: self()])
      assert Enum.take(s, 3) == [0, 1, 2]
      # The proxy's exit cancels the stream; the port closes the generator in its own time
      # and its `finally` says so. Nothing else arrived.
      assert_receive {"closed", 100_000}, 5000
      assert Process.info(self(), :message_queue_len) == {:message_queue_len, 0}
    end

    test "a Python exception in the middle raises after the items before it" do
      parent = self()
      s = Pyport.stream(:__main__, :numbers, [10], kwargs: [fail_at: 2])

      e =
        assert_raise Pyport.Error, fn ->
          Enum.each(s, &send(parent, {:item, &1}))
        end

      assert e.type == :ValueError and e.message == "at 2"
      assert_received {:item, 0}
      assert_received {:item, 1}
      refute_received {:item, 2}
    end

    test "a start that fails raises at once, and an item that takes too long times out" do
      assert_raise Pyport.Error, ~r/AttributeError/, fn -> Enum.to_list(Pyport.stream(:math, :nope)) end
      Pyport.exec!("def slow():\n    yield 1\n    while True:\n        pass\n")

      assert_raise Pyport.Error, ~r/no answer in time/, fn ->
        Enum.to_list(Pyport.stream(:__main__, :slow, [], timeout: 100))
      end
    end
  end

  describe "SharedDict" do
    test "a destroyed dict raises Pyport.Error, a bad key ArgumentError" do
      {:ok, sd} = Pyport.SharedDict.new()
      :ok = Pyport.SharedDict.put(sd, "k", 1)
      assert_raise ArgumentError, fn -> Pyport.SharedDict.get(sd, :k) end
      :ok = Pyport.SharedDict.destroy(sd)
      e = assert_raise Pyport.Error, fn -> Pyport.SharedDict.get(sd, "k") end
      assert e.reason == {:shared_dict_destroyed, sd}
      assert :ok = Pyport.SharedDict.destroy(sd)
    end

    test "a value that cannot be stored is an error" do
      {:ok, sd} = Pyport.SharedDict.new()
      assert {:error, %Pyport.Error{}} = Pyport.SharedDict.put(sd, "k", [1 | 2])
    end

    test "delete, give_away" do
      {:ok, sd} = Pyport.SharedDict.new()
      :ok = Pyport.SharedDict.put(sd, "a", 1)
      :ok = Pyport.SharedDict.delete(sd, "a")
      assert Pyport.SharedDict.keys(sd) == []
      other = spawn(fn -> receive do: (:stop -> :ok) end)
      :ok = Pyport.SharedDict.give_away(sd, other)
      e = assert_raise Pyport.Error, fn -> Pyport.SharedDict.give_away(sd, self()) end
      assert e.reason == :not_owner
      send(other, :stop)
    end
  end

  test "stats/0 is :py.stats/0" do
    assert {:ok, %{workers: w}} = Pyport.stats()
    assert is_integer(w) and w >= 1
  end
end
