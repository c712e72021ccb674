"""``rankwise cache``: what the cache folder holds, and clearing parts of it."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rankwise.caches import KINDS, clear_report, parse_kinds, usage
from rankwise.cli.main import app
from rankwise.efficiency.compare import format_bytes
from rankwise.settings import cache_dir


@app.command()
def cache(
    clear_kinds: Annotated[str | None, typer.Option(
        "--clear", help=f"Delete what rankwise wrote of these kinds: {', '.join(KINDS)} (comma-separated) or all.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print usage as JSON.")] = False,
) -> None:
    """Show what $RANKWISE_CACHE holds (converted models, calibration statistics, timings); --clear frees it."""
    if clear_kinds is not None:
        kinds = parse_kinds(clear_kinds)
        freed, kept = clear_report(kinds)
        if not as_json:
            Console().print(f"cleared {', '.join(kinds)}: {format_bytes(freed)} freed")
            if kept:
                Console().print(f"kept {len(kept)} entries rankwise did not write: "
                                f"{', '.join(str(p) for p in kept[:3])}{' ...' if len(kept) > 3 else ''}")
    rows = usage()
    if as_json:
        typer.echo(json.dumps({"cache_dir": str(cache_dir()), "kinds": [r.to_dict() for r in rows]}, indent=2))
        return
    table = Table(title=f"rankwise cache: {cache_dir()}")
    for col in ("kind", "files", "size", "what"):
        table.add_column(col, justify="right" if col in ("files", "size") else "left")
    for r in rows:
        table.add_row(r.kind, str(r.files), format_bytes(r.bytes), r.description)
    table.caption = f"total {format_bytes(sum(r.bytes for r in rows))}; all of it is rebuilt on demand"
    Console().print(table)
