"""Imported by the start-up code in py_crash_SUITE:startup_config_reapplied."""
import os


def mark():
    # the port's OS pid: differs after every restart of the port program
    return os.getpid()


def name():
    return __name__
