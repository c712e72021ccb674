"""``python -m rankwise`` is the ``rankwise`` command."""

from rankwise.cli.main import run

run()
