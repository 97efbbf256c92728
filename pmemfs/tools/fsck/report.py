"""What a run of fsck found and did: the report, the per-file changes, the exit codes
(fsck(8)'s) and the text form of the report."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...media.check import Finding

EXIT_CLEAN, EXIT_CORRECTED, EXIT_UNCORRECTED, EXIT_OPERATIONAL, EXIT_USAGE = 0, 1, 4, 8, 16


class FsckError(Exception):
    """fsck cannot do its job (exit 8); the message is one line."""


@dataclass
class Report:
    region: str
    mode: str
    live: bool = False
    holder: int | None = None
    superblock: str | None = None  # "primary", "backup" or None (none usable)
    findings: list[Finding] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    modified: bool = False
    passes: int = 0
    backup_file: str | None = None
    elapsed: float = 0.0
    files: list[FileChange] = field(default_factory=list)  # what the repair may have changed, per file

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error" and not f.repaired]

    @property
    def exit_code(self) -> int:
        if self.errors:
            return EXIT_UNCORRECTED
        return EXIT_CORRECTED if self.modified else EXIT_CLEAN

    @property
    def status(self) -> str:
        return {EXIT_CLEAN: "clean", EXIT_CORRECTED: "corrected", EXIT_UNCORRECTED: "uncorrected"}[self.exit_code]

    def as_dict(self) -> dict:
        return {"region": self.region, "mode": self.mode, "live": self.live, "holder_pid": self.holder,
                "superblock": self.superblock, "status": self.status, "exit_code": self.exit_code,
                "modified": self.modified, "passes": self.passes, "backup_file": self.backup_file,
                "elapsed_seconds": round(self.elapsed, 3), "checks": self.checks,
                "findings": [f.as_dict() for f in self.findings],
                "files": [c.as_dict() for c in self.files]}


def decode_name(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def display(path: str) -> str:
    """A path as the text report prints it (bytes that are not UTF-8 as \\xNN)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class FileChange:
    """One file the repair may have changed, and what happened to it."""

    inode: int
    path: str | None  # where it is now, else where it was, else None
    paths: list[str]  # every name it has after the repair
    was: list[str]  # the names it had before the repair (as far as the damaged tables tell)
    what: list[str]  # codes: see docs/FSCK.md, "Naming every changed file"
    details: list[str]

    def as_dict(self) -> dict:
        return {"path": self.path, "inode": self.inode, "paths": self.paths, "was": self.was,
                "what": self.what, "details": self.details}

    def label(self) -> str:
        return f"{display(self.path)} (inode {self.inode})" if self.path else f"inode {self.inode} (no path)"


def format_text(report: Report, verbose: bool = False) -> list[str]:
    """The text report, line by line."""
    out = []
    if report.live:
        out.append(f"{report.region}: mounted (live image, daemon pid {report.holder}): "
                   "the findings may include changes in flight")
    if report.superblock == "backup":
        out.append(f"{report.region}: using the backup superblock")
    if verbose:
        counts: dict[str, int] = {}
        for f in report.findings:
            counts[f.check] = counts.get(f.check, 0) + 1
        for name in report.checks:
            out.append(f"check {name}: {counts.get(name, 0)} finding(s)")
    for f in report.findings:
        tag = "FIXED" if f.repaired else ("warning" if f.severity == "warning" else "ERROR")
        hint = "" if f.repaired or f.fix is None or report.mode == "y" else f" [repair with -{f.fix}]"
        out.append(f"{tag}: {f.check}: {f.message}{hint}")
    for c in report.files:
        out.append(f"CHANGED: {c.label()}: {', '.join(c.what)}: {'; '.join(c.details)}")
    n_err = len(report.errors)
    fixed = sum(f.repaired for f in report.findings)
    if report.backup_file:
        out.append(f"metadata saved to {report.backup_file}")
    named = f", {len(report.files)} file(s) changed" if report.files else ""
    out.append(f"{report.region}: {report.status}: {n_err} error(s) left, {fixed} repaired{named} "
               f"({len(report.checks)} checks, {report.elapsed:.2f} s)")
    return out
