"""What the commands share: the click parameter types (a size as a person writes it:
64G, 2M), and turning a failed call into one line with a hint."""

from __future__ import annotations

import click

from .common import parse_size


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except click.BadParameter as e:
            self.fail(str(e.message), param, ctx)


def call_or_say(what: str, hints: dict[int, str], fn, *args):
    """fn(*args); an OSError becomes one line, "what: strerror (hint for its errno)"."""
    try:
        return fn(*args)
    except OSError as e:
        raise click.ClickException(f"{what}: {e.strerror}{hints.get(e.errno, '')}") from None
