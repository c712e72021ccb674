"""The ``rankwise`` command: one typer app, one module per sub-command.

Every user-caused problem surfaces as a :class:`~rankwise.errors.RankwiseError`; :func:`run` prints it
as a single ``error: ...`` line on stderr and exits with code 2, never with a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

try:  # typer >= 0.17 vendors click; older versions use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover
    from click.exceptions import Abort, ClickException, NoArgsIsHelpError

from rankwise.errors import RankwiseError

app = typer.Typer(
    name="rankwise",
    help="Low-rank decomposition of transformer language models, and its accuracy-efficiency trade-off.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Sub-command modules; each defines its command on ``app`` when imported.
COMMAND_MODULES = (
    "rankwise.cli.inspect_cmd",
    "rankwise.cli.eval_cmd",
    "rankwise.cli.decompose_cmd",
    "rankwise.cli.bench_cmd",
    "rankwise.cli.cache_cmd",
    "rankwise.cli.allocate_cmd",
    "rankwise.cli.study_cmd",
    "rankwise.cli.report_cmd",
    "rankwise.cli.paper_cmd",
)


@app.callback()
def _root() -> None:
    """Low-rank decomposition of transformer language models, and its accuracy-efficiency trade-off."""


for _module in COMMAND_MODULES:
    importlib.import_module(_module)


def _quiet_libraries() -> None:
    """transformers' and hub's own progress bars and advice would drown rankwise's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def run(argv: list[str] | None = None) -> None:
    """Console entry point: every user error is one ``error: ...`` line on stderr and exit code 2.

    Usage errors (unknown option, bad value) come from click; everything else a user can cause is a
    RankwiseError. Typer's boxed multi-line error panels are not used, so scripts can parse the line.
    """
    from rankwise.cli.common import command_scope, interrupt_note

    _quiet_libraries()
    try:
        with command_scope():
            try:
                code = app(args=argv, standalone_mode=False)  # typer returns 130 for Ctrl-C (no command does)
            except (KeyboardInterrupt, Abort) as exc:
                if not isinstance(exc, KeyboardInterrupt) and not isinstance(exc.__context__, KeyboardInterrupt):
                    raise
                code = 130
            if code == 130:  # Ctrl-C: say what was kept (the command's note) and exit as shells expect
                print(f"\ninterrupted: {interrupt_note()}", file=sys.stderr)
                sys.exit(130)
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

