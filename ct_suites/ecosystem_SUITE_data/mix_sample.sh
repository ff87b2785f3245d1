#!/usr/bin/env bash
# Usage: mix_sample.sh DATA_DIR WORK
# The "Use it from Elixir/mix" path of the README, as written there: `mix new hello_mix`, the
# deps function of its mix.exs replaced by the README's (hello_mix/deps.snippet), the README's
# config/config.exs and lib/hello_mix.ex; pyport is the bare clone WORK/pyport.git made by
# snapshot.sh, built by its Makefile (manager: :make). Then a call, kwargs, a SharedDict and a
# Date from Elixir with none_as: nil, the docs in IEx, and the README's virtualenv recipe in
# `iex -S mix' (shell_venv.exs.txt, /tmp/pyport_venv replaced by a virtualenv of WORK).
# Prints "RESULT <what> <term>" lines that the test matches.
set -euo pipefail
data=$(cd "$1" && pwd); work=$2
export MIX_HOME="$work/mix_home" HEX_OFFLINE=1
cd "$work"
rm -rf hello_mix
mix new hello_mix >/dev/null
app="$work/hello_mix"
cd "$app"
python3 - "$data/hello_mix/deps.snippet" "$work/pyport.git" <<'PY'
import re, sys
snippet = open(sys.argv[1]).read().replace("file:///tmp/pyport.git", "file://" + sys.argv[2])
text = open("mix.exs").read()
new, n = re.subn(r"  defp deps do\n.*?\n  end\n", lambda m: snippet, text, flags=re.S)
assert n == 1, text
open("mix.exs", "w").write(new)
PY
mkdir -p config
cp "$data/hello_mix/config/config.exs" config/config.exs
cp "$data/hello_mix/lib/hello_mix.ex" lib/hello_mix.ex

mix deps.get
mix compile
# The logger prints to stdout too: the RESULT lines are written on lines of their own.
mix run --no-compile -e 'IO.puts("\nRESULT mix_demo " <> inspect(HelloMix.demo()))'
mix run --no-compile -e 'IO.puts("\nRESULT mix_docs " <> inspect(elem(Code.fetch_docs(:py), 0)))'
echo "RESULT iex_h $(printf 'h :py.call\n' | iex -S mix 2>/dev/null | grep -c 'Module.Function(\*Args, \*\*Kwargs)' || true)"

venv="$work/pyport_venv_mix"
rm -rf "$venv"; python3 -m venv --without-pip "$venv"
{
  n=0
  while IFS= read -r cmd; do
    n=$((n + 1))
    cmd=${cmd//\/tmp\/pyport_venv/$venv}
    printf 'IO.puts("\\nRESULT iex_venv_%d " <> inspect(%s))\n' "$n" "$cmd"
  done < "$data/shell_venv.exs.txt"
} | iex -S mix 2>&1 | grep -a '^RESULT' || true
