#!/usr/bin/env bash
# Usage: mix_path_sample.sh DATA_DIR WORK
# The "From Elixir" path of the README: `mix new hello_path`, pyport as a plain path
# dependency (no manager: :make) on WORK/pyport-src, the copy snapshot.sh made (a folder not
# named pyport), with `config :pyport, elixir: true`. Mix compiles pyport's erl_src/ and lib/
# and its mix.exs's compiler step builds the port program, offline (no Hex). Then calls
# through Pyport, and h in IEx. Prints "RESULT <what> <term>" lines that the test matches.
set -euo pipefail
data=$(cd "$1" && pwd); work=$2
export MIX_HOME="$work/mix_home_path" HEX_OFFLINE=1
cd "$work"
rm -rf hello_path
mix new hello_path >/dev/null
cd hello_path
python3 - "$work/pyport-src" <<'PY'
import re, sys
text = open("mix.exs").read()
deps = '  defp deps do\n    [\n      {:pyport, path: "%s"}\n    ]\n  end\n' % sys.argv[1]
new, n = re.subn(r"  defp deps do\n.*?\n  end\n", lambda m: deps, text, flags=re.S)
assert n == 1, text
open("mix.exs", "w").write(new)
PY
mkdir -p config
printf 'import Config\nconfig :pyport, elixir: true\n' > config/config.exs

mix compile
mix run --no-compile -e 'IO.puts("\nRESULT path_call " <> inspect(Pyport.call(:math, :sqrt, [81.0])))'
mix run --no-compile -e 'IO.puts("\nRESULT path_date " <> inspect(Pyport.eval("__import__(\"datetime\").date(2024, 2, 29)")))'
mix run --no-compile -e 'IO.puts("\nRESULT path_stream " <> inspect(Enum.take(Pyport.stream(:itertools, :count, [5]), 3)))'
h=$(printf 'h Pyport.call\nh :py.call\n' | iex -S mix 2>/dev/null)
echo "RESULT path_h_pyport $(grep -c 'Calls `module.function(\*args, \*\*kwargs)` in Python' <<<"$h" || true)"
echo "RESULT path_h_py $(grep -c 'Calls `Module.Function(\*Args, \*\*Kwargs)` in Python' <<<"$h" || true)"
echo "RESULT path_h_raw $(grep -cE '<pre>|\(#[a-z_]+/[0-9]\)' <<<"$h" || true)"
