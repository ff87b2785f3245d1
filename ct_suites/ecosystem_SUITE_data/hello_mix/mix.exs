defmodule HelloMix.MixProject do
  use Mix.Project

  def project do
    [app: :hello_mix, version: "0.1.0", elixir: "~> 1.14", deps: deps()]
  end

  def application do
    [extra_applications: [:logger]]
  end

  defp deps do
    [
      {:pyport, git: "file:///tmp/pyport.git", branch: "main", manager: :make}
    ]
  end
end
