"""The pmemfs-fsck command line (click): options, the confirm prompt, text or JSON."""

from __future__ import annotations

import json
import os
import stat as statmod
import sys

from ...media import check
from ...media.format import FormatError
from ...media.journal import JournalFull
from ...media.region import RegionError
from .pipeline import fsck
from .report import EXIT_OPERATIONAL, EXIT_USAGE, FsckError, Report, format_text


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _print_text(report: Report, verbose: bool) -> None:
    import click

    for line in format_text(report, verbose):
        click.echo(line)


def _command():
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("-n", "no", is_flag=True, help="Check only; never write (default when stdin is not a terminal).")
    @click.option("-p", "-a", "preen", is_flag=True, help="Repair what is safe without asking.")
    @click.option("-y", "yes", is_flag=True, help="Repair everything that can be repaired.")
    @click.option("-f", "force", is_flag=True, hidden=True, help="Accepted for fsck(8); checks always run.")
    @click.option("--backup", type=click.Path(dir_okay=False), help="Save the metadata area here before repairing.")
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    @click.option("-v", "--verbose", is_flag=True, help="List every check run.")
    @click.argument("region")
    def fsck_command(no, preen, yes, force, backup, as_json, verbose, region):
        """Check a pmemfs REGION and repair it (-p safe repairs, -y all)."""
        if no + preen + yes > 1:
            raise click.UsageError("only one of -n, -p and -y may be given")
        mode = "p" if preen else "y" if yes else "n"
        interactive = not (no or preen or yes) and _is_tty(sys.stdin)
        if not os.path.exists(region):
            raise RegionError(f"{region}: no such region")
        if statmod.S_ISDIR(os.stat(region).st_mode):
            raise RegionError(f"{region}: is a directory, not a region")
        from ..common import progress_bar

        tick = None if as_json else progress_bar("checking", len(check.CHECK_NAMES), unit="checks")
        try:
            report = fsck(region, mode, backup, progress=tick)
            if (interactive and report.errors and any(f.fix for f in report.errors)
                    and click.confirm(f"{len(report.errors)} error(s); repair them (as -y)?", default=False)):
                report = fsck(region, "y", backup)
        except (RegionError, FormatError, FsckError, JournalFull):
            raise
        except OSError:
            raise
        except Exception as e:  # a bug here must still end in one line
            raise FsckError(f"internal error: {type(e).__name__}: {e}") from None
        if as_json:
            click.echo(json.dumps(report.as_dict(), indent=2))
        else:
            _print_text(report, verbose)
        return report.exit_code

    return fsck_command


def main(argv: list[str] | None = None) -> None:
    from ..common import run

    run(_command(), "pmemfs-fsck", usage_status=EXIT_USAGE, errors=(FsckError, JournalFull),
        error_status=EXIT_OPERATIONAL)(argv)
