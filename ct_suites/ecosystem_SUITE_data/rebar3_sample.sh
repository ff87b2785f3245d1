#!/usr/bin/env bash
# Usage: rebar3_sample.sh DATA_DIR WORK
# The "Use it from rebar3" path of the README on the sample project DATA_DIR/hello_rebar, with
# pyport as a git dependency (the bare clone WORK/pyport.git made by snapshot.sh): compile, a
# call from a plain `erl', a call in `rebar3 shell', then a release that starts and answers.
# CARGO_TARGET_DIR (set by the caller) is shared, so Rust's dependencies are built once.
# Prints "RESULT <what> <term>" lines that the test matches.
set -euo pipefail
data=$(cd "$1" && pwd); work=$2
app="$work/hello"
rm -rf "$app"; cp -r "$data/hello_rebar" "$app"
sed -i "s|file:///tmp/pyport.git|file://$work/pyport.git|" "$app/rebar.config"
cd "$app"

rebar3 compile
echo "RESULT rebar3_docs $(erl -noshell -pa _build/default/lib/*/ebin \
  -eval '{ok, D} = code:get_doc(py), io:format("~p", [element(1, D)]), halt().')"
echo "RESULT compile $(erl -noshell -pa _build/default/lib/*/ebin \
  -eval 'io:format("~p", [hello:sqrt(16.0)]), halt().')"

# rebar3 shell drops input that arrives before it has booted the apps: wait for that line.
coproc R3 { timeout 120 rebar3 shell 2>&1; }
while IFS= read -r line <&"${R3[0]}"; do
  case "$line" in *"Booted hello"*) break;; esac
done
printf 'io:format("~p~n", [{shell_result, hello:sqrt(25.0)}]), halt().\n' >&"${R3[1]}"
while IFS= read -r line <&"${R3[0]}"; do
  case "$line" in *shell_result*) echo "RESULT shell ${line#*> }";; esac
done
wait

rebar3 release
rel="$app/_build/default/rel/hello/bin/hello"
export NODE_NAME="hello_$$"
"$rel" daemon
trap '"$rel" stop >/dev/null 2>&1 || true' EXIT
echo "RESULT release $("$rel" eval 'hello:sqrt(36.0).')"
echo "RESULT release_priv $("$rel" eval 'code:priv_dir(pyport).')"
"$rel" stop
trap - EXIT

# The same project with pyport as a _checkouts path dependency (it overrides the git one).
co="$work/hello_checkouts"
rm -rf "$co"; cp -r "$data/hello_rebar" "$co"
sed -i "s|file:///tmp/pyport.git|file://$work/pyport.git|" "$co/rebar.config"
mkdir -p "$co/_checkouts"; ln -s "$work/pyport-src" "$co/_checkouts/pyport"
cd "$co"
rebar3 compile
echo "RESULT checkouts $(erl -noshell -pa _build/default/lib/*/ebin -pa _build/default/checkouts/*/ebin \
  -eval 'io:format("~p ~s", [hello:sqrt(49.0), code:which(py)]), halt().')"
