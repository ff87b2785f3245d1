# The ExUnit suite of the Elixir side (`make exunit`, part of `make test`). pyport runs with
# `elixir: true`, as an Elixir project would configure it; tests that need another setting
# restart it with that and back (PyportTest.Support.with_env/2).
Code.require_file("support/helpers.exs", __DIR__)
# The application's stop and start reports of the tests that restart it are not news.
:ok = :logger.set_primary_config(:level, :notice)
:ok = Application.stop(:pyport)
Application.put_env(:pyport, :elixir, true)
{:ok, _} = Application.ensure_all_started(:pyport)
ExUnit.start()
