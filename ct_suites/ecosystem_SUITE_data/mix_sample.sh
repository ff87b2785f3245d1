#!/usr/bin/env bash
# Usage: mix_sample.sh DATA_DIR WORK
# The "Use it from Elixir/mix" path of the README on the sample project DATA_DIR/hello_mix,
# with pyport as a git dependency built by its Makefile (manager: :make) from the bare clone
# WORK/pyport.git made by snapshot.sh: a call, kwargs, a SharedDict and a Date from Elixir with
# none_as: nil, then the docs in IEx. CARGO_TARGET_DIR (set by the caller) is shared.
# Prints "RESULT <what> <term>" lines that the test matches.
set -euo pipefail
data=$(cd "$1" && pwd); work=$2
app="$work/hello_mix"
rm -rf "$app"; cp -r "$data/hello_mix" "$app"
sed -i "s|file:///tmp/pyport.git|file://$work/pyport.git|" "$app/mix.exs"
cd "$app"
export MIX_HOME="$work/mix_home" HEX_OFFLINE=1

mix deps.get
mix compile
# The logger prints to stdout too: the RESULT lines are written on lines of their own.
mix run --no-compile -e 'IO.puts("\nRESULT mix_demo " <> inspect(HelloMix.demo()))'
mix run --no-compile -e 'IO.puts("\nRESULT mix_docs " <> inspect(elem(Code.fetch_docs(:py), 0)))'
echo "RESULT iex_h $(printf 'h :py.call\n' | iex -S mix 2>/dev/null | grep -c 'Module.Function(\*Args, \*\*Kwargs)' || true)"
