"""``sftbridge config show|init|schema|from-jumpstart``: every config key, a starter file, a JSON Schema.

Everything comes from the one schema in ``sftbridge.config``; pydantic and yaml load inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from sftbridge.cli.options import add_config, add_json
from sftbridge.errors import UserError

HEADER = """\
# sftbridge config: every key with its default; `sftbridge config show` lists them with their types.
# Defaults follow SageMaker JumpStart's Llama-2 fine-tuning. Override any key on the command line:
#   sftbridge train {file} train.epochs=3 lora.r=16
"""


def config_arguments(parser: argparse.ArgumentParser) -> None:
    # `sftbridge config` alone is `sftbridge config show`.
    parser.set_defaults(func=cmd_show, config=None, overrides=[], json=False)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="every key with its type, default and description; with CONFIG: its resolved values",
        description="Every config key with its type, default and description; given CONFIG (and "
        "KEY=VALUE overrides), the values a run would use.",
    )
    add_config(show, "a YAML config to resolve", optional=True, overrides_example="train.epochs=3")
    add_json(show, "print JSON")
    show.set_defaults(func=cmd_show)

    init = actions.add_parser(
        "init",
        help="write a commented starter config (every section, descriptions as comments)",
        description="Write a starter config: every key at its default, its description as a comment.",
    )
    init.add_argument("file", nargs="?", type=Path, help="where to write it (default: print it)")
    init.add_argument("--model", help="model.name_or_path, e.g. meta-llama/Llama-2-7b-chat-hf")
    init.add_argument("--train-file", default="data/train.jsonl", help="data.train_file (required key)")
    init.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    init.set_defaults(func=cmd_init)

    schema = actions.add_parser(
        "schema",
        help="the JSON Schema of a config, for editors (configs/schema.json)",
        description="The JSON Schema of a config file, for editors' completion and checks.",
    )
    schema.add_argument("--out", type=Path, help="write it here (default: print it)")
    schema.set_defaults(func=cmd_schema)

    jumpstart = actions.add_parser(
        "from-jumpstart",
        help="a config from a SageMaker JumpStart Llama-2 fine-tuning hyperparameter JSON",
        description="Convert the hyperparameters JumpStart recorded for a Llama-2 fine-tuning job (all "
        "values strings) into a config; each one is mapped, or named with the reason it is not.",
    )
    jumpstart.add_argument("hyperparameters", type=Path, metavar="HP.json")
    jumpstart.add_argument("--out", type=Path, help="write the config here (default: print it)")
    jumpstart.add_argument("--model", help="model.name_or_path (default: meta-llama/Llama-2-7b-chat-hf)")
    jumpstart.add_argument(
        "--train-file",
        default="train.jsonl",
        help="data.train_file: the JSONL of JumpStart's training channel",
    )
    jumpstart.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    jumpstart.set_defaults(func=cmd_from_jumpstart)


@dataclass
class Key:
    """One config key as the schema defines it."""

    key: str
    type: str
    default: Any  # REQUIRED when the key has none
    description: str


REQUIRED = object()


def schema_keys() -> list[Key]:
    """Every key of ``RunConfig``, sections walked in order (``train.epochs``, ``data.template.prompt``)."""
    from sftbridge.config import RunConfig

    return list(_walk(RunConfig, ""))


def _walk(model: Any, prefix: str) -> Iterator[Key]:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = [a for a in _flat(info.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        nested = [a for a in nested if a is not BaseModel]  # backend.options: a backend's own settings
        if nested and info.annotation is nested[0]:  # a section: its keys, not itself
            yield from _walk(nested[0], f"{key}.")
            continue
        if info.default is not PydanticUndefined:
            default = info.default
        elif info.default_factory is not None:
            default = info.default_factory()
        else:
            default = REQUIRED
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        yield Key(key, type_name(info.annotation), default, info.description or "")
        for sub in nested:
            yield from _walk(sub, f"{key}.")


def _flat(annotation: Any) -> list[Any]:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _flat(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [a for arg in get_args(annotation) for a in _flat(arg)]
    return [annotation]


def type_name(annotation: Any) -> str:
    """``float``, ``str | None``, ``list[str]``, ``'auto' | 'cpu' | 'cuda'``."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "Any"
    return getattr(annotation, "__name__", str(annotation))


def cmd_show(args: argparse.Namespace) -> int:
    if args.config is None:
        if args.overrides:
            raise UserError("config show: KEY=VALUE overrides need a CONFIG to apply to")
        keys = schema_keys()
        if args.json:
            rows = [{**vars(k), "default": None if k.default is REQUIRED else k.default} for k in keys]
            for row, k in zip(rows, keys, strict=True):
                row["required"] = k.default is REQUIRED
            print(json.dumps(rows, indent=2))
        else:
            print(render_keys(keys))
        return 0
    from sftbridge.backends import options_model
    from sftbridge.config import dump_config, load_config

    config = load_config(args.config, args.overrides, options_model=options_model)
    print(json.dumps(config.to_dict(), indent=2) if args.json else dump_config(config), end="")
    if args.json:
        print()
    return 0


def render_keys(keys: list[Key]) -> str:
    width = max(len(k.key) for k in keys)
    lines = []
    section = None
    for k in keys:
        head = k.key.split(".")[0] if "." in k.key else ""
        if head != section:
            section = head
            lines.append(f"\n[{head}]" if head else "[top level]")
        default = "required" if k.default is REQUIRED else _scalar(k.default)
        lines.append(f"{k.key:<{width}}  {k.type}  = {default}")
        if k.description:
            lines += [f"{'':<{width}}    {line}" for line in textwrap.wrap(k.description, 80)]
    lines.append("\nset a key in the YAML file (section: key: value) or as an override: train.epochs=3")
    return "\n".join(lines).lstrip("\n")


def _scalar(value: Any) -> str:
    """A value as YAML (JSON's scalars, lists and objects are valid YAML flow style)."""
    return json.dumps(value, ensure_ascii=False)


def commented_yaml(values: dict[str, Any], comments: dict[str, str], *, above: bool) -> str:
    """Nested YAML of ``values`` (dotted keys, in order), each key's comment above it or at the line's end."""
    lines: list[str] = []
    open_sections: list[str] = []
    for dotted, value in values.items():
        *sections, leaf = dotted.split(".")
        common = 0
        while common < min(len(sections), len(open_sections)) and sections[common] == open_sections[common]:
            common += 1
        for depth in range(common, len(sections)):
            if depth == 0:
                lines.append("")
            lines.append(f"{'  ' * depth}{sections[depth]}:")
        open_sections = sections
        indent = "  " * len(sections)
        comment = comments.get(dotted, "")
        if above and comment:
            lines += [f"{indent}# {line}" for line in textwrap.wrap(comment, 100 - len(indent))]
        line = f"{indent}{leaf}: {_scalar(value)}"
        lines.append(f"{line}  # {comment}" if comment and not above else line)
    return "\n".join(lines).lstrip("\n") + "\n"


def starter_config(*, train_file: str, model: str | None = None) -> str:
    """Every key at its default (sub-keys of an unset optional block left out), descriptions as comments."""
    values: dict[str, Any] = {}
    comments: dict[str, str] = {}
    unset: list[str] = []
    for k in schema_keys():
        if any(k.key.startswith(f"{parent}.") for parent in unset):
            continue  # data.template.prompt when data.template is null
        default = k.default
        if k.key == "data.train_file":
            default = train_file
        elif k.key == "model.name_or_path" and model:
            default = model
        if default is None and k.type.endswith("None") and "|" in k.type and "." in k.key:
            unset.append(k.key)
        values[k.key] = default
        required = "(required) " if k.default is REQUIRED else ""
        comments[k.key] = f"{required}{k.description} [{k.type}]".strip()
    return commented_yaml(values, comments, above=True)


def cmd_init(args: argparse.Namespace) -> int:
    text = starter_config(train_file=args.train_file, model=args.model)
    if args.file is None:
        print(HEADER.format(file="CONFIG") + "\n" + text, end="")
        return 0
    _write(args.file, HEADER.format(file=args.file) + "\n" + text, force=args.force)
    print(f"wrote {args.file}; check it with: sftbridge config show {args.file}")
    return 0


def json_schema() -> str:
    """The JSON Schema of a config file, as committed in configs/schema.json."""
    from sftbridge.config import RunConfig

    schema = RunConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def cmd_schema(args: argparse.Namespace) -> int:
    if args.out is None:
        print(json_schema(), end="")
    else:
        args.out.write_text(json_schema(), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def cmd_from_jumpstart(args: argparse.Namespace) -> int:
    from sftbridge.backends import options_model
    from sftbridge.config import set_dotted, validate_config
    from sftbridge.jumpstart import DEFAULT_MODEL, convert, read_hyperparameters

    hyperparameters = read_hyperparameters(args.hyperparameters)
    result = convert(hyperparameters, train_file=args.train_file, model=args.model or DEFAULT_MODEL)
    nested: dict[str, Any] = {}
    for key, value in result.values.items():
        set_dotted(nested, key, value)
    # e.g. a ratio JumpStart allows that sftbridge does not
    validate_config(nested, source=f"{args.hyperparameters} converted", options_model=options_model)
    comments = {key: result.origin(key) for key in result.values}
    comments["data.train_file"] = "JumpStart's training channel: point this at its JSONL"
    text = (
        f"# converted from SageMaker JumpStart hyperparameters ({args.hyperparameters}) by "
        "sftbridge config from-jumpstart\n# every other key is at its default: sftbridge config show\n\n"
        + commented_yaml(nest_order(result.values), comments, above=False)
    )
    if result.unmapped:
        text += "\n# not converted:\n" + "".join(
            f"#   {name}={value or '(default)'}: {reason}\n" for name, value, reason in result.unmapped
        )
    if args.out is None:
        print(text, end="")
        return 0
    _write(args.out, text, force=args.force)
    print(f"wrote {args.out}: {len(result.mapped)} hyperparameter(s) mapped", file=sys.stderr)
    for name, value, reason in result.unmapped:
        print(f"  not converted: {name}={value or '(default)'}: {reason}", file=sys.stderr)
    return 0


def nest_order(values: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys grouped by section in the schema's order, so each section is written once."""
    order = {k.key: index for index, k in enumerate(schema_keys())}
    return dict(sorted(values.items(), key=lambda item: order.get(item[0], len(order))))


def _write(path: Path, text: str, *, force: bool) -> None:
    if path.exists() and not force:
        raise UserError(f"{path}: already exists; choose another file or pass --force")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
