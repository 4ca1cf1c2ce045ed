"""``longshard recipes`` (list, show, copy: torchtune's ``tune ls / cat / cp``) and ``longshard config``
(the resolved YAML of a recipe with overrides, or every field with its type, default and meaning)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from importlib import resources
from pathlib import Path

from longshard.errors import ConfigError
from longshard.files import write_file


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of every recipe shipped in ``longshard/recipes``."""
    folder = resources.files("longshard") / "recipes"
    return {f.name.removesuffix(".yaml"): Path(str(f)) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")}


def _summary(path: Path) -> str:
    """The first comment line of a recipe (what it trains)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def recipes_command(args: argparse.Namespace) -> int:
    """``recipes`` / ``recipes list``: one line each; ``recipes show NAME``; ``recipes copy NAME PATH``."""
    from longshard.train.config import recipe_path

    action = args.recipes_command or "list"
    if action == "list":
        found = shipped_recipes()
        width = max(map(len, found))
        sys.stdout.write("".join(f"{name:<{width}}  {_summary(path)}\n" for name, path in found.items()))
        return 0
    source = recipe_path(args.name)
    if action == "show":
        sys.stdout.write(source.read_text())
        return 0
    dest = Path(args.path)
    if dest.is_dir():
        dest = dest / source.name
    if (dest.exists() or dest.is_symlink()) and not args.force:
        raise ConfigError("PATH", f"{dest} exists.", "give another path, or --force to replace it.")
    if not dest.parent.is_dir():
        raise ConfigError("PATH", f"{dest.parent} is not a folder.", "create it first, or give another path.")
    write_file(dest, source.read_text())  # a link at dest is replaced, never written through
    sys.stdout.write(f"copied {args.name} to {dest}: edit it, then `longshard train {dest}`\n")
    return 0


def _field_help(cls: type) -> dict[str, str]:
    """Field name -> the first line of its description in the dataclass docstring's ``Args:`` section."""
    doc = cls.__doc__ or ""
    if "Args:" not in doc:
        return {}
    out: dict[str, str] = {}
    for m in re.finditer(r"^\s{4,}([a-z_][a-z0-9_, ]*):\s*(.*)$", doc.split("Args:", 1)[1], re.M):
        for name in m.group(1).split(","):
            out.setdefault(name.strip(), m.group(2).strip())
    return out


def _type_name(tp: typing.Any) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or str(tp).replace("typing.", "").replace("longshard.models.attention.", "")


def config_fields(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, help) of every field of the run config, nested sections expanded."""
    from longshard.train.config import Config

    cls = cls or Config
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.append((name, tp.__name__, "(section)", (tp.__doc__ or "").strip().splitlines()[0]))
            rows.extend(config_fields(tp, f"{name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((name, _type_name(tp), default, helps.get(f.name, "")))
    return rows


def config_command(args: argparse.Namespace) -> int:
    """``config RECIPE [overrides]``: the resolved YAML; ``config --fields``: every field."""
    if args.fields:
        rows = config_fields()
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        sys.stdout.write("".join(f"{n:<{w[0]}}  {t:<{w[1]}}  {d:<{w[2]}}  {h}".rstrip() + "\n" for n, t, d, h in rows))
        return 0
    if args.recipe is None:
        raise ConfigError("RECIPE", "is needed (or --fields).", "e.g. longshard config quickstart train.steps=10")
    from longshard.train.config import dump_config, load_config

    sys.stdout.write(dump_config(load_config(args.recipe, args.overrides)))
    return 0


def add_parsers(sub) -> None:  # noqa: ANN001 - argparse's private subparsers action
    """The ``recipes`` and ``config`` subcommands."""
    r = sub.add_parser("recipes", help="list the shipped recipes, print one, or copy one to edit")
    rsub = r.add_subparsers(dest="recipes_command")
    rsub.add_parser("list", help="one line per shipped recipe (the default)")
    show = rsub.add_parser("show", help="print a recipe")
    show.add_argument("name", help="shipped recipe name or YAML path")
    cp = rsub.add_parser("copy", help="copy a recipe to edit")
    cp.add_argument("name", help="shipped recipe name or YAML path")
    cp.add_argument("path", help="destination file or folder")
    cp.add_argument("--force", action="store_true", help="replace an existing file")
    r.set_defaults(func=recipes_command)

    c = sub.add_parser("config", help="print a recipe's resolved config, or every config field (--fields)")
    c.add_argument("recipe", nargs="?", default=None, help="recipe YAML path or shipped name")
    c.add_argument("overrides", nargs="*", help="key=value overrides")
    c.add_argument("--fields", action="store_true", help="every field: dotted name, type, default, meaning")
    c.set_defaults(func=config_command)
