"""Command-line flags and YAML files, mapped onto the typed configuration (config.py).

`add_config_flags` gives every field of the sections a stage uses a `--kebab-case` flag,
with the field's type, choices and help; `read_yaml` reads the same names from a file of
sections; `config_from_args` layers preset, model recipe, YAML and flags into one Config.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import fields
from pathlib import Path

from cifar_ray.config import PRESETS, SECTIONS, Config, field_type, flatten, item_type, section_of, with_recipe


def read_yaml(path: str | Path) -> dict:
    """A nested YAML config (sections data/model/train/...), checked for unknown keys and types."""
    import yaml

    with open(path) as fh:
        nested = yaml.safe_load(fh) or {}
    Config.from_dict(nested)
    return nested


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """Add one `--flag` per field of the given sections, plus --preset and --config."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="named starting configuration (default: %(default)s)")
    parser.add_argument("--config", metavar="YAML", help="YAML file with config sections; flags override it")
    for section in sections:
        group = parser.add_argument_group(section)
        for f in fields(SECTIONS[section]):
            _add_flag(group, SECTIONS[section], f)


def add_field_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """Add the `--flag`s of single config fields (a CLI that needs a few, not whole sections)."""
    for name in names:
        section = SECTIONS[section_of(name)]
        _add_flag(parser, section, next(f for f in fields(section) if f.name == name))


def _add_flag(group, section: type, f: dataclasses.Field) -> None:
    flag = "--" + f.name.replace("_", "-")
    kind = field_type(section, f.name)
    help_text = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")  # argparse formats help
    if kind is bool:
        group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif kind is tuple:
        group.add_argument(flag, dest=f.name, nargs="+", type=item_type(section, f.name), default=None,
                           help=help_text)
    else:
        group.add_argument(flag, dest=f.name, type=kind, default=None, choices=f.metadata.get("choices"),
                           help=help_text)


def config_from_args(args: argparse.Namespace) -> Config:
    """The preset, the chosen model's recipe, the YAML file, explicit flags: later ones win."""
    from_yaml = flatten(read_yaml(args.config)) if args.config else {}
    from_flags = {f.name: getattr(args, f.name) for section in SECTIONS.values()
                  for f in fields(section) if getattr(args, f.name, None) is not None}
    preset = PRESETS[args.preset]
    model = from_flags.get("model", from_yaml.get("model", preset.model.model))
    return with_recipe(preset, model).with_overrides({**from_yaml, **from_flags})
