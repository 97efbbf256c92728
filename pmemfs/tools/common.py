"""What the commands share: sizes as a person writes and reads them, the entry-point
wrapper that turns every expected failure into one line, and the progress bar."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable

import click

from ..media.errors import FormatError, MountError
from ..media.region import RegionError

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (use a number with K, M, G or T)")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(command: click.Command, prog: str, usage_status: int = 2,
        errors: tuple[type[Exception], ...] = (), error_status: int = 1) -> Callable[[], None]:
    """Entry point that turns every expected failure into one line and an exit code."""
    from ..serve.mountctl import SupervisorError
    from ..serve.mounting import MountFailed

    expected = (RegionError, FormatError, MountError, MountFailed, SupervisorError, *errors)

    def main(argv: list[str] | None = None) -> None:
        try:
            rv = command.main(args=argv, prog_name=prog, standalone_mode=False)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo(f"{prog}: aborted", err=True)
            sys.exit(usage_status)
        except click.UsageError as e:
            click.echo(f"{prog}: {e.format_message()}", err=True)
            sys.exit(usage_status)
        except click.ClickException as e:
            click.echo(f"{prog}: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except expected as e:
            click.echo(f"{prog}: {e}", err=True)
            sys.exit(error_status)
        except KeyboardInterrupt:
            click.echo(f"{prog}: interrupted", err=True)
            sys.exit(130)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"{prog}: {where}{e.strerror or e}", err=True)
            sys.exit(error_status)
        sys.exit(rv if isinstance(rv, int) else 0)

    return main


def progress_bar(label: str, total: int, unit: str = "bytes") -> Callable[[int], None]:
    """A rich progress bar on stderr that only appears when the work takes more than a
    second and stderr is a terminal. unit "bytes" counts sizes; anything else is shown
    as "done/total unit" (fsck counts checks)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    started = time.monotonic()
    state: dict = {"bar": None, "done": 0}

    def tick(n: int) -> None:
        state["done"] += n
        if state["bar"] is None and time.monotonic() - started > 1.0 and sys.stderr.isatty():
            # On stderr, where the decision was made: stdout may be a file of results.
            counts = [DownloadColumn()] if unit == "bytes" else [MofNCompleteColumn(), TextColumn(unit)]
            bar = Progress("[progress.description]{task.description}", BarColumn(), *counts,
                           TimeRemainingColumn(), transient=True, console=Console(stderr=True))
            bar.start()
            state["bar"] = bar
            state["task"] = bar.add_task(label, total=total, completed=state["done"])
        if state["bar"] is not None:
            state["bar"].update(state["task"], completed=state["done"])
            if state["done"] >= total:
                state["bar"].stop()

    return tick
