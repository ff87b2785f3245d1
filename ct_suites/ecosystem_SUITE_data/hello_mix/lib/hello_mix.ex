defmodule HelloMix do
  @doc "Asks Python for a square root, then keeps a value in a SharedDict."
  def demo do
    {:ok, root} = :py.call(:math, :sqrt, [16.0])
    {:ok, sorted} = :py.call(:builtins, :sorted, [[1, 3, 2]], reverse: true)
    {:ok, sd} = :py.shared_dict_new()
    :ok = :py.shared_dict_set(sd, "answer", %{"value" => 42, "none" => nil})
    stored = :py.shared_dict_get(sd, "answer")
    {:ok, date} = :py.call(:builtins, :str, [~D[2024-02-29]])
    {root, sorted, stored, date, :py.eval("None")}
  end
end
