"""Builds (or finds) the virtualenv that a requirements file declares, for pyport.

Run by the base interpreter (the app env `python`, or the one pyport was built with):

    python -I pyport_env.py --requirements FILE --envs DIR [--wheels DIR]
                            [--installer auto|uv|pip] [--uv PATH]

FILE is a requirements.txt or a pyproject.toml (its [project] dependencies). The virtualenv
lives in DIR under a name made of the interpreter's version and a hash of: the interpreter
(version and path), the file's contents, and the names and sizes of the wheels in --wheels.
A second run with the same inputs finds it and only prints where it is. A changed file gets
a new one. Concurrent runs (several VMs starting at once) take a lock (flock) on DIR/NAME.lock;
the one that holds it builds in DIR/NAME-<random> and publishes it by an atomic rename of the
symlink DIR/NAME, so nothing half-built is ever found. A failed build is removed.

Each step is printed as it starts and ends ("pyport-env: ..."), with the installer's own
output in between; the last line is "pyport-env-python: PATH", the virtualenv's interpreter.
Exit status 0 when that line was printed, 1 when a step failed, 2 for bad arguments.
"""

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
import tomllib
import uuid

COMPLETE = ".pyport-complete"


def say(msg):
    print("pyport-env: " + msg, flush=True)


def packages_of(path):
    """The requirement lines the file declares."""
    if path.endswith(".toml"):
        with open(path, "rb") as f:
            project = tomllib.load(f).get("project", {})
        return [str(d) for d in project.get("dependencies", [])]
    reqs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                reqs.append(line)
    return reqs


def env_name(path, wheels):
    h = hashlib.sha256()
    h.update(sys.version.encode() + b"\0" + os.path.realpath(sys.executable).encode() + b"\0")
    with open(path, "rb") as f:
        h.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    if wheels:
        for name in sorted(os.listdir(wheels)):
            h.update(("%s %d\n" % (name, os.path.getsize(os.path.join(wheels, name)))).encode())
    return "%d.%d-%s" % (sys.version_info[0], sys.version_info[1], h.hexdigest()[:16])


def ready(link):
    """The interpreter of the published virtualenv (its real folder), or None."""
    real = os.path.realpath(link)
    python = os.path.join(real, "bin", "python3")
    if os.path.isfile(os.path.join(real, COMPLETE)) and os.path.exists(python):
        return python
    return None


def find_uv(explicit):
    for candidate in (explicit, shutil.which("uv"),
                      os.path.join(os.path.dirname(sys.executable), "uv")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def run(step, cmd):
    """Runs one command, its output passed on as it comes; raises on failure."""
    say("%s: %s" % (step, " ".join(cmd)))
    t0 = time.monotonic()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise StepFailed(cmd, p.returncode)
    say("%s: done in %.1f s" % (step, time.monotonic() - t0))


class StepFailed(Exception):
    def __init__(self, cmd, status):
        super().__init__("`%s` exited with status %d" % (" ".join(cmd), status))


def build(args, build_dir, reqs, uv):
    offline = ["--no-index", "--find-links", args.wheels] if args.wheels else []
    listing = ", ".join(reqs) if reqs else "nothing"
    if uv:
        say("creating a virtualenv of %s (Python %s) with uv" % (sys.executable, sys.version.split()[0]))
        run("venv", [uv, "venv", "--quiet", "--python", sys.executable, build_dir])
    else:
        say("creating a virtualenv of %s (Python %s) with venv" % (sys.executable, sys.version.split()[0]))
        run("venv", [sys.executable, "-m", "venv", build_dir])
    python = os.path.join(build_dir, "bin", "python3")
    if reqs:
        req_file = os.path.join(build_dir, "pyport-requirements.txt")
        with open(req_file, "w", encoding="utf-8") as f:
            f.write("\n".join(reqs) + "\n")
        say("installing %d package(s): %s%s" % (len(reqs), listing,
                                                " (offline, from %s)" % args.wheels if args.wheels else ""))
        if uv:
            run("install", [uv, "pip", "install", "--python", python, "-r", req_file] + offline)
        else:
            run("install", [python, "-m", "pip", "install", "--disable-pip-version-check",
                            "--no-input", "-r", req_file] + offline)
    with open(os.path.join(build_dir, COMPLETE), "w", encoding="utf-8") as f:
        f.write("requirements: %s\npython: %s\n" % (args.requirements, sys.executable))


def publish(envs, name, build_dir):
    """Points DIR/NAME at the finished build, atomically (a symlink renamed over it)."""
    tmp = os.path.join(envs, ".%s.%s.tmp" % (name, uuid.uuid4().hex))
    os.symlink(os.path.basename(build_dir), tmp)
    os.replace(tmp, os.path.join(envs, name))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requirements", required=True)
    parser.add_argument("--envs", required=True)
    parser.add_argument("--wheels")
    parser.add_argument("--installer", choices=("auto", "uv", "pip"), default="auto")
    parser.add_argument("--uv")
    args = parser.parse_args()
    if not os.path.isfile(args.requirements):
        say("no such requirements file: %s" % args.requirements)
        return 2
    if args.wheels and not os.path.isdir(args.wheels):
        say("no such wheel folder: %s" % args.wheels)
        return 2
    reqs = packages_of(args.requirements)
    name = env_name(args.requirements, args.wheels)
    link = os.path.join(args.envs, name)
    python = ready(link)
    if python is None:
        os.makedirs(args.envs, exist_ok=True)
        with open(link + ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say("waiting for another build of %s" % link)
                fcntl.flock(lock, fcntl.LOCK_EX)
            python = ready(link)
            if python is None:
                uv = find_uv(args.uv) if args.installer in ("auto", "uv") else None
                if args.installer == "uv" and uv is None:
                    say("installer uv asked for, but no uv found (PATH, or next to %s)" % sys.executable)
                    return 1
                build_dir = "%s-%s" % (link, uuid.uuid4().hex[:8])
                say("building %s for %s" % (link, args.requirements))
                t0 = time.monotonic()
                try:
                    build(args, build_dir, reqs, uv)
                    publish(args.envs, name, build_dir)
                except (StepFailed, OSError) as e:
                    shutil.rmtree(build_dir, ignore_errors=True)
                    say("failed: %s" % e)
                    return 1
                say("built %s in %.1f s" % (link, time.monotonic() - t0))
                python = ready(link)
    print("pyport-env-python: " + python, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
