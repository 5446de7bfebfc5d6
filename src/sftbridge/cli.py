"""``sftbridge``: train, preview, generate, eval. Heavy libraries load inside each command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from sftbridge.errors import UserError

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # around the trained span in `preview`


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftbridge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune from a YAML config")
    train.add_argument("config", help="YAML config, e.g. configs/tiny-cpu.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=3 lora.r=16")
    train.add_argument("--backend", help="override backend.name (local, sagemaker, ...)")
    train.add_argument("--run-dir", type=Path, help="run folder (default: runs/<run_name>-<time>)")
    train.add_argument("--dry-run", action="store_true", help="print the request; submit nothing (sagemaker)")
    train.add_argument(
        "--detach", action="store_true", help="submit and return; follow with status/logs/fetch (sagemaker)"
    )
    train.add_argument(
        "--resume", type=Path, metavar="RUN", help="finish an interrupted run from its last checkpoint"
    )
    train.set_defaults(func=cmd_train)

    preview = commands.add_parser("preview", help="show training examples exactly as the model sees them")
    preview.add_argument("config")
    preview.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    preview.add_argument("--n", type=int, default=3, help="number of examples (default 3)")
    preview.add_argument(
        "--json", action="store_true", help="one JSON object per example: text, input_ids, labels"
    )
    preview.set_defaults(func=cmd_preview)

    generate = commands.add_parser("generate", help="answer a question with a trained run")
    generate.add_argument("run", type=Path, help="run directory")
    generate.add_argument("question", nargs="+", help="one or more questions")
    generate.add_argument("--base", action="store_true", help="answer with the base model (adapter off)")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--show-prompt", action="store_true", help="print the formatted prompt too")
    generate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    generate.set_defaults(func=cmd_generate)

    evaluate = commands.add_parser("eval", help="adapter vs. base model on a test file")
    evaluate.add_argument("run", type=Path, help="run directory")
    evaluate.add_argument("--data", type=Path, help="JSONL test file (default: the run's data.test_file)")
    evaluate.add_argument("--json", type=Path, dest="json_out", help="write the metrics to this JSON file")
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N examples")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--no-base", action="store_true", help="skip the base model")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.set_defaults(func=cmd_eval)
    # Command groups that live in their own modules register below, one line each.
    _register("sftbridge.serving_cli", commands)
    _register("sftbridge.reproduce", commands)
    _register("sftbridge.jobs_cli", commands)
    _register("sftbridge.plan", commands)
    return parser


def _register(module: str, commands: Any) -> None:
    """Add the subcommands of a command-group module (its ``register(commands)``)."""
    import importlib

    importlib.import_module(module).register(commands)


def cmd_train(args: argparse.Namespace) -> int:
    from sftbridge.backends import get_backend
    from sftbridge.config import load_config
    from sftbridge.data import load_data

    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f"backend.name={args.backend}")
    config = load_config(args.config, overrides)
    # Fail on bad data here, before a subprocess, an upload or a model load (the job checks s3:// data).
    data_files = (config.data.train_file, config.data.validation_file, config.data.test_file)
    if not any(str(path).startswith("s3://") for path in data_files):
        load_data(config.data, eval_strategy=config.train.eval_strategy)
    run_dir = args.resume or args.run_dir
    if args.resume:
        check_resumable(config, args.resume)
    backend = get_backend(config.backend.name)
    if args.dry_run or args.detach:
        return _remote_only(args, backend, config, overrides)
    job = backend.submit(config, config_path=args.config, overrides=overrides, run_dir=run_dir)
    print(f"job {job.id} ({backend.name})", flush=True)
    console_url = getattr(job, "console_url", None)  # a remote job: where to watch it
    if console_url:
        print(console_url, flush=True)
    code = job.wait()
    if code != 0:
        print(f"error: training failed ({job.status()})", file=sys.stderr)
        return code
    print(f"run directory: {job.fetch()}")
    return 0


def check_resumable(config: Any, run_dir: Path) -> None:
    from sftbridge.errors import RunDirError
    from sftbridge.runs import checkpoint_dir_for, is_complete, latest_checkpoint

    if is_complete(run_dir):
        raise RunDirError(f"{run_dir}: this run already finished; nothing to resume")
    folder = Path(config.train.checkpoint_dir) if config.train.checkpoint_dir else checkpoint_dir_for(run_dir)
    if latest_checkpoint(folder) is None:
        raise RunDirError(f"--resume {run_dir}: no complete checkpoint in {folder}; start a new run instead")


def _remote_only(args: argparse.Namespace, backend: Any, config: Any, overrides: list[str]) -> int:
    """``train --dry-run`` (print the request) and ``train --detach`` (submit, don't wait)."""
    from sftbridge.errors import ConfigError

    if args.dry_run:
        if not hasattr(backend, "dry_run"):
            raise ConfigError(f"--dry-run: backend {backend.name!r} has no dry run")
        print(backend.dry_run(config, config_path=args.config, overrides=overrides))
        return 0
    if backend.name == "local":
        raise ConfigError("--detach: the local backend trains in the foreground; drop --detach")
    job = backend.submit(config, config_path=args.config, overrides=overrides, run_dir=args.run_dir)
    print(f"job {job.id} ({backend.name})")
    if getattr(job, "console_url", None):
        print(job.console_url)
    print(f"follow it: sftbridge status {job.id} / sftbridge logs {job.id} -f / sftbridge fetch {job.id}")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from sftbridge.config import load_config
    from sftbridge.data import encode_split, load_data
    from sftbridge.formatting import resolve_chat_format
    from sftbridge.modeling import load_tokenizer

    config = load_config(args.config, args.overrides)
    data = load_data(config.data, eval_strategy=config.train.eval_strategy, with_test=False)
    tokenizer = load_tokenizer(config.model)  # the tokenizer only: no weights are loaded
    chat_format = resolve_chat_format(config.data.chat_format, tokenizer)
    prompt_format = data.prompt_format(chat_format, config.data.system_prompt)
    records = data.train[: args.n]
    encoded, _ = encode_split(
        records, prompt_format, tokenizer, config.data.max_length, config.data.over_length
    )
    for record, item in zip(records, encoded, strict=False):
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
            f"({prompt_format.format}, {chat_format}) ──"
        )
        print(mark_spans(item.text, item.trained_spans))
    if not args.json:
        print(
            f"\n{MARK_OPEN}…{MARK_CLOSE} marks the tokens the loss is computed on; the rest is context only."
        )
    return 0


def mark_spans(text: str, spans: list[tuple[int, int]]) -> str:
    out, cursor = [], 0
    for start, end in spans:
        out += [text[cursor:start], MARK_OPEN, text[start:end], MARK_CLOSE]
        cursor = end
    out.append(text[cursor:])
    return "".join(out)


def cmd_generate(args: argparse.Namespace) -> int:
    from sftbridge.inference import Predictor

    predictor = Predictor.from_run(args.run, device=args.device)
    overrides: dict[str, Any] = {}
    if args.max_new_tokens:
        overrides["max_new_tokens"] = args.max_new_tokens
    if args.temperature:
        overrides.update(do_sample=True, temperature=args.temperature)
    if args.top_p:
        overrides["top_p"] = args.top_p
    prompts = [predictor.prompt(question) for question in args.question]
    if args.base:
        with predictor.base_model():
            generations = predictor.generate(prompts, **overrides)
    else:
        generations = predictor.generate(prompts, **overrides)
    for prompt, generation in zip(prompts, generations, strict=True):
        if args.show_prompt:
            print(f"prompt: {prompt!r}")
        print(generation.text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sftbridge.errors import DataError
    from sftbridge.evaluate import evaluate, format_table, load_cases
    from sftbridge.inference import Predictor
    from sftbridge.runs import load_manifest

    test_file = args.data or load_manifest(args.run)["config"]["data"].get("test_file")
    if not test_file:
        raise DataError(f"{args.run}: the run's config has no data.test_file; pass --data FILE")
    predictor = Predictor.from_run(args.run, device=args.device)
    cases = load_cases(Path(test_file), predictor)[: args.limit]
    result = evaluate(predictor, cases, batch_size=args.batch_size, base=not args.no_base)
    print(f"{test_file}:")
    print(format_table(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
