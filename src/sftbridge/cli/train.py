"""``sftbridge train`` and ``sftbridge preview``: a config in, a run (or what it would train on) out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sftbridge.cli.options import add_config, add_json

if TYPE_CHECKING:
    from sftbridge.backends import Backend
    from sftbridge.config import RunConfig

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # around the trained span in `preview`


def train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config(
        parser,
        "YAML config, e.g. configs/tiny-cpu.yaml; keys: sftbridge config show",
        overrides_example="train.epochs=3 lora.r=16",
    )
    parser.add_argument("--backend", help="override backend.name (local, sagemaker, ...)")
    parser.add_argument("--run-dir", type=Path, help="run folder (default: runs/<run_name>-<time>)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the request; submit nothing (sagemaker, ...)"
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="submit and return; follow with status/logs/fetch (sagemaker, ...)",
    )
    parser.add_argument(
        "--resume", type=Path, metavar="RUN", help="finish an interrupted run from its last checkpoint"
    )
    parser.set_defaults(func=cmd_train)


def preview_arguments(parser: argparse.ArgumentParser) -> None:
    add_config(parser)
    parser.add_argument("--n", type=int, default=3, help="number of examples (default 3)")
    add_json(parser, "one JSON object per example: text, input_ids, labels")
    parser.set_defaults(func=cmd_preview)


def cmd_train(args: argparse.Namespace) -> int:
    from sftbridge.backends import get_backend, options_model
    from sftbridge.config import load_config
    from sftbridge.data.loading import load_data
    from sftbridge.errors import UserError, print_error

    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f"backend.name={args.backend}")
    config = load_config(args.config, overrides, options_model=options_model)
    backend = get_backend(config.backend.name)
    check_capabilities(args, backend)
    # Fail on bad data here, before a subprocess, an upload or a model load (the job checks s3:// data).
    data_files = (config.data.train_file, config.data.validation_file, config.data.test_file)
    if config.model.adapter:
        from sftbridge.training.continuation import open_parent

        open_parent(config)  # the run to continue: checked like any run folder, on the same base
    local_data = not any(str(path).startswith("s3://") for path in data_files)
    if local_data and config.train.method == "dpo":
        from sftbridge.data.pairs import load_pairs

        load_pairs(config.data, eval_strategy=config.train.eval_strategy)
    elif local_data:
        loaded = load_data(config.data, eval_strategy=config.train.eval_strategy)
        warn_if_too_little_training(config, len(loaded.train))
    if args.dry_run:
        print(backend.dry_run(config, config_path=args.config, overrides=overrides))
        return 0
    if args.resume:
        from sftbridge.resume import check_resumable

        check_resumable(config, args.resume)
    job = backend.submit(
        config, config_path=args.config, overrides=overrides, run_dir=args.resume or args.run_dir
    )
    print(f"job {job.id} ({backend.name})", flush=True)
    if job.console_url:
        print(job.console_url, flush=True)
    if args.detach:
        print(
            f"follow it: sftbridge status {job.id} --backend {backend.name} / "
            f"sftbridge logs {job.id} -f --backend {backend.name} / "
            f"sftbridge fetch {job.id} --backend {backend.name}"
        )
        return 0
    code = job.wait()
    if code in (130, 143):  # stopped by SIGINT/SIGTERM: the job printed where it stopped and how to resume
        return code
    if code == UserError.exit_code:  # the script refused its input and printed the one line that says why
        return code
    if code != 0:
        print_error(f"training failed ({job.status()})")
        return code
    print(f"run directory: {job.fetch()}")
    return 0


def warn_if_too_little_training(config: RunConfig, train_examples: int) -> None:
    """Say before a run starts (locally, or a SageMaker job) when it will barely move the adapter: the
    seed's JumpStart defaults answered at length and never stopped."""
    from sftbridge.planning.estimate import learning_for

    warning = learning_for(config, train_examples).warning
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def check_capabilities(args: argparse.Namespace, backend: Backend) -> None:
    """``--dry-run`` and ``--detach`` need a backend that declares them (``supports_*``)."""
    from sftbridge.errors import ConfigError

    if args.dry_run and not backend.supports_dry_run:
        raise ConfigError(f"--dry-run: backend {backend.name!r} has no dry run; drop --dry-run")
    if args.detach and not backend.supports_detach:
        raise ConfigError(
            f"--detach: backend {backend.name!r} cannot detach (its job ends with this command); "
            "drop --detach"
        )


def cmd_preview(args: argparse.Namespace) -> int:
    from sftbridge.backends import options_model
    from sftbridge.config import load_config
    from sftbridge.data.encoding import encode
    from sftbridge.data.loading import load_data
    from sftbridge.models.loading import load_tokenizer

    config = load_config(args.config, args.overrides, options_model=options_model)
    if config.train.method == "dpo":
        return preview_pairs(config, args)
    data = load_data(config.data, eval_strategy=config.train.eval_strategy, with_test=False)
    tokenizer = load_tokenizer(config.model)  # the tokenizer only: no weights are loaded
    encoded = encode(data, config.data, tokenizer, ("train",), limit=args.n)
    prompt_format = encoded.prompt_format
    for record, item in zip(data.train, encoded.splits["train"], strict=False):
        if args.json:
            print(
                json.dumps(
                    {
                        "where": record.where,
                        "text": item.text,
                        "input_ids": item.input_ids,
                        "labels": item.labels,
                    },
                    ensure_ascii=False,
                )
            )
            continue
        trained = sum(label >= 0 for label in item.labels)
        print(
            f"── {record.where} · {len(item.input_ids)} tokens, {trained} trained "
            f"({prompt_format.format}, {prompt_format.chat_format}) ──"
        )
        print(mark_spans(item.text, item.trained_spans))
    if not args.json:
        print(
            f"\n{MARK_OPEN}…{MARK_CLOSE} marks the tokens the loss is computed on; the rest is context only."
        )
    return 0


def preview_pairs(config: RunConfig, args: argparse.Namespace) -> int:
    """``preview`` of a DPO config: each pair's chosen and rejected sequence, the trained answer marked."""
    from sftbridge.data.pairs import encode_pair, load_pairs, pairs_prompt_format, to_pair
    from sftbridge.models.loading import load_tokenizer
    from sftbridge.training.continuation import open_parent

    parent = open_parent(config)
    loaded = load_pairs(config.data, eval_strategy="no")
    tokenizer = load_tokenizer(config.model)  # the tokenizer only: no weights are loaded
    parent_format = parent.prompt_format if parent is not None else None
    prompt_format = pairs_prompt_format(config.data, loaded.format, tokenizer, parent_format)
    for record in loaded.train[: args.n]:
        pair = encode_pair(to_pair(record, prompt_format), prompt_format, tokenizer)
        sides = (("chosen", pair.chosen), ("rejected", pair.rejected))
        if args.json:
            row = {"where": record.where, "prompt_ids": pair.prompt_ids}
            for name, encoded in sides:
                row.update({name: encoded.text, f"{name}_ids": encoded.input_ids[len(pair.prompt_ids) :]})
            print(json.dumps(row, ensure_ascii=False))
            continue
        print(f"── {record.where} · {len(pair.prompt_ids)} prompt tokens ({prompt_format.chat_format}) ──")
        for name, encoded in sides:
            trained = len(encoded.input_ids) - len(pair.prompt_ids)
            print(f"{name} ({trained} tokens): {mark_spans(encoded.text, encoded.trained_spans)}")
    if not args.json:
        print(f"\n{MARK_OPEN}…{MARK_CLOSE} marks the answer DPO compares; the rest is the shared prompt.")
    return 0


def mark_spans(text: str, spans: list[tuple[int, int]]) -> str:
    out, cursor = [], 0
    for start, end in spans:
        out += [text[cursor:start], MARK_OPEN, text[start:end], MARK_CLOSE]
        cursor = end
    out.append(text[cursor:])
    return "".join(out)
