"""The click parameter types the commands share: a size as a person writes it (64G, 2M)."""

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
