"""Imported by py_call_SUITE:config_from_app_env through the `sys_path` app env."""

VALUE = 4242


def hello():
    return 'from the data dir'
