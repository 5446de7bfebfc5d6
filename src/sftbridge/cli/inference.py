"""``sftbridge generate`` and ``sftbridge eval``: answers from a trained run, its scores on a test file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run directory")
    if command == "generate":
        parser.add_argument("question", nargs="+", help="one or more questions")
        parser.add_argument("--base", action="store_true", help="answer with the base model (adapter off)")
        parser.add_argument("--max-new-tokens", type=int)
        parser.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
        parser.add_argument("--top-p", type=float)
        parser.add_argument("--show-prompt", action="store_true", help="print the formatted prompt too")
        parser.set_defaults(func=cmd_generate)
    elif command == "eval":
        parser.add_argument("--data", type=Path, help="JSONL test file (default: the run's data.test_file)")
        parser.add_argument("--json", type=Path, dest="json_out", help="write the metrics to this JSON file")
        parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
        parser.add_argument("--batch-size", type=int, default=16)
        parser.add_argument("--no-base", action="store_true", help="skip the base model")
        parser.set_defaults(func=cmd_eval)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def cmd_generate(args: argparse.Namespace) -> int:
    from sftbridge.inference.predictor import Predictor

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
    from sftbridge.inference.evaluate import evaluate, format_table, load_cases
    from sftbridge.inference.predictor import Predictor
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
