defmodule Mix.Tasks.Compile.Pyport do
  @moduledoc """
  Mix compiler of pyport's own build steps, run after Mix compiled `erl_src/` and `lib/`:
  builds the port program into `priv/` (`make port`: cargo, in the cargo target folder every
  build on the machine shares) and writes the doc chunks of the Erlang modules into their
  beams, so that `h :py.call` works in IEx. Defined here, in `mix.exs`, so that a project
  that names pyport as a plain `git:` or `path:` dependency needs no Hex package for it.
  """
  use Mix.Task.Compiler

  @root Path.dirname(__ENV__.file)

  @impl true
  def run(_args) do
    with :ok <- make_port(),
         :ok <- doc_chunks() do
      {:ok, []}
    end
  end

  defp make_port do
    case System.cmd("make", ["--no-print-directory", "port"],
           cd: @root,
           into: IO.stream(:stdio, :line),
           stderr_to_stdout: true
         ) do
      {_, 0} -> :ok
      {_, status} -> error("building the port program (make port) failed with status #{status}")
    end
  end

  # The chunks are written again when a beam is newer than they are.
  defp doc_chunks do
    ebin = Mix.Project.compile_path()
    doc = Path.join(Path.dirname(ebin), "doc")
    stamp = Path.join([doc, "chunks", "py.chunk"])
    beams = Path.wildcard(Path.join(ebin, "py*.beam"))
    script = Path.join(@root, "scripts/doc_chunks.escript")

    if stale?(stamp, [script | beams]) do
      case System.cmd("escript", [script, Path.join(@root, "erl_src"), ebin, doc],
             stderr_to_stdout: true
           ) do
        {_, 0} -> File.touch!(stamp)
        {out, status} -> error("writing the doc chunks failed with status #{status}:\n#{out}")
      end
    else
      :ok
    end
  end

  defp stale?(target, sources) do
    case File.stat(target, time: :posix) do
      {:ok, %{mtime: t}} -> Enum.any?(sources, &(File.stat!(&1, time: :posix).mtime > t))
      {:error, _} -> true
    end
  end

  defp error(message) do
    Mix.shell().error("pyport: " <> message)
    {:error, []}
  end
end

defmodule Pyport.MixProject do
  use Mix.Project

  # The OTP application resource of the Makefile and rebar3 builds is the one source of
  # the application's version, module, registered names and app env defaults.
  @app_src (fn ->
              {:ok, [{:application, :pyport, props}]} =
                :file.consult(String.to_charlist(Path.join(__DIR__, "erl_src/pyport.app.src")))

              props
            end).()

  def project do
    [
      app: :pyport,
      version: to_string(@app_src[:vsn]),
      elixir: "~> 1.14",
      description: to_string(@app_src[:description]),
      erlc_paths: ["erl_src"],
      erlc_include_path: "erl_src",
      erlc_options: [:debug_info],
      elixirc_paths: ["lib"],
      compilers: Mix.compilers() ++ [:pyport],
      deps: [],
      docs: [main: "Pyport"]
    ]
  end

  def application do
    [
      mod: @app_src[:mod],
      env: @app_src[:env],
      registered: @app_src[:registered],
      # telemetry is optional: started first when the project has it.
      extra_applications: [:telemetry],
      optional_applications: [:telemetry]
    ]
  end
end
