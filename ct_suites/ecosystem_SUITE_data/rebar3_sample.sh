#!/usr/bin/env bash
# Usage: rebar3_sample.sh DATA_DIR WORK
# The "Use it from rebar3" path of the README, as written there: `rebar3 new app hello`, its
# rebar.config's `{deps, []}.` replaced by the README's deps and relx block
# (hello_rebar/rebar.config.snippet), pyport added to the applications of src/hello.app.src,
# src/hello.erl written (hello_rebar/src/hello.erl); pyport is the bare clone WORK/pyport.git
# made by snapshot.sh. Then: compile, a call from a plain `erl', a call in `rebar3 shell', the
# README's virtualenv recipe in `rebar3 shell' (shell_venv.erl.txt, /tmp/pyport_venv replaced by
# a virtualenv of WORK), a release that starts and answers, and the project with pyport as a
# _checkouts path dependency. Prints "RESULT <what> <term>" lines that the test matches.
set -euo pipefail
data=$(cd "$1" && pwd); work=$2
cd "$work"
rm -rf hello
rebar3 new app hello >/dev/null
app="$work/hello"
cd "$app"
python3 - "$data/hello_rebar/rebar.config.snippet" "$work/pyport.git" <<'PY'
import sys
snippet = open(sys.argv[1]).read().replace("file:///tmp/pyport.git", "file://" + sys.argv[2])
text = open("rebar.config").read()
assert "{deps, []}." in text, text
open("rebar.config", "w").write(text.replace("{deps, []}.", snippet.rstrip("\n")))
PY
sed -i 's/^\( *\)stdlib$/\1stdlib,\n\1pyport/' src/hello.app.src
grep -q pyport src/hello.app.src
cp "$data/hello_rebar/src/hello.erl" src/hello.erl

rebar3 compile
echo "RESULT rebar3_docs $(erl -noshell -pa _build/default/lib/*/ebin \
  -eval '{ok, D} = code:get_doc(py), io:format("~p", [element(1, D)]), halt().')"
echo "RESULT compile $(erl -noshell -pa _build/default/lib/*/ebin \
  -eval 'io:format("~p", [hello:sqrt(16.0)]), halt().')"

# The README's virtualenv recipe types into the shell; its folder is one of ours.
venv="$work/pyport_venv"
rm -rf "$venv"; python3 -m venv --without-pip "$venv"

# rebar3 shell drops input that arrives before it has booted the apps: wait for that line.
coproc R3 { timeout 180 rebar3 shell 2>&1; }
while IFS= read -r line <&"${R3[0]}"; do
  case "$line" in *"Booted hello"*) break;; esac
done
printf 'io:format("~p~n", [{shell_result, hello:sqrt(25.0)}]).\n' >&"${R3[1]}"
n=0
while IFS= read -r cmd; do
  n=$((n + 1))
  cmd=${cmd//\/tmp\/pyport_venv/$venv}
  printf 'io:format("~p~n", [{shell_venv_%d, %s}]).\n' "$n" "${cmd%.}" >&"${R3[1]}"
done < "$data/shell_venv.erl.txt"
printf 'halt().\n' >&"${R3[1]}"
while IFS= read -r line <&"${R3[0]}"; do
  case "$line" in
    *shell_result*) echo "RESULT shell ${line#*> }";;
    *"{shell_venv_"*) n=${line#*\{shell_venv_}; echo "RESULT shell_venv_${n%%,*} ${line#*> }";;
  esac
done
wait

rebar3 release
rel="$app/_build/default/rel/hello/bin/hello"
# The default vm.args names the node `hello': one of our own, so that runs can overlap.
sed -i "s/^-sname hello\$/-sname hello_$$/" "$app/_build/default/rel/hello/releases/0.1.0/vm.args"
"$rel" daemon
trap '"$rel" stop >/dev/null 2>&1 || true' EXIT
echo "RESULT release $("$rel" eval 'hello:sqrt(36.0).')"
echo "RESULT release_priv $("$rel" eval 'code:priv_dir(pyport).')"
"$rel" stop
trap - EXIT

# The same project with pyport as a _checkouts path dependency (it overrides the git one).
co="$work/hello_checkouts"
rm -rf "$co"; cp -r "$app" "$co"; rm -rf "$co/_build"
mkdir -p "$co/_checkouts"; ln -s "$work/pyport-src" "$co/_checkouts/pyport"
cd "$co"
rebar3 compile
echo "RESULT checkouts $(erl -noshell -pa _build/default/lib/*/ebin -pa _build/default/checkouts/*/ebin \
  -eval 'io:format("~p ~s", [hello:sqrt(49.0), code:which(py)]), halt().')"
