"""``sftbridge generate`` and ``sftbridge eval``: answers from a trained run, its scores on a test file."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from sftbridge.cli.options import add_device, add_run, add_trust_remote_code


def generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_run(parser)
    parser.add_argument("question", nargs="+", help="one or more questions")
    parser.add_argument("--base", action="store_true", help="answer with the base model (adapter off)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--show-prompt", action="store_true", help="print the formatted prompt too")
    add_device(parser)
    add_trust_remote_code(parser)
    parser.set_defaults(func=cmd_generate)


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_run(parser)
    parser.add_argument("--data", type=Path, help="JSONL test file (default: the run's data.test_file)")
    parser.add_argument(
        "--json",
        type=Path,
        dest="json_out",
        help="write the metrics to this JSON file and every prediction to OUT's stem + "
        "-predictions.jsonl beside it (default: RUN/eval-<data file stem>.json)",
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-base", action="store_true", help="skip the base model")
    parser.add_argument(
        "--pairs",
        type=Path,
        metavar="FILE",
        help="also write DPO pairs to FILE: for each answer wrong or over 1.5x the reference's length, "
        "the reference as chosen and the answer as rejected (train.method=dpo reads them)",
    )
    add_device(parser)
    add_trust_remote_code(parser)
    parser.set_defaults(func=cmd_eval)


def cmd_generate(args: argparse.Namespace) -> int:
    from sftbridge.errors import UserError
    from sftbridge.inference.folder import ModelFolder

    folder = ModelFolder.open(args.run, trust_remote_code=args.trust_remote_code)
    if args.base and folder.is_merged:
        raise UserError(f"--base: {args.run} is a merged model; the base is no longer separate")
    predictor = folder.predictor(device=args.device)
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
    several = len(args.question) > 1
    for question, prompt, generation in zip(args.question, prompts, generations, strict=True):
        if several:  # which answer is which: the question above its answer
            print(f"Q: {question}")
        if args.show_prompt:
            print(f"prompt: {prompt!r}")
        print(f"A: {generation.text}" if several else generation.text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sftbridge.errors import DataError
    from sftbridge.inference.evaluate import evaluate, format_table, load_cases, write_results
    from sftbridge.inference.folder import ModelFolder
    from sftbridge.runs import evaluation_path

    # A run or a merged folder, checked before anything heavy loads; a merged one has no config: pass --data.
    folder = ModelFolder.open(args.run, trust_remote_code=args.trust_remote_code)
    test_file = args.data or (None if folder.is_merged else folder.run_config.data.test_file)
    if not test_file:
        raise DataError(f"{args.run}: the run's config has no data.test_file; pass --data FILE")
    predictor = folder.predictor(device=args.device)
    cases = load_cases(Path(test_file), predictor)[: args.limit]
    progress = EvalProgress(sys.stderr)
    base = not (args.no_base or folder.is_merged)
    try:
        result = evaluate(predictor, cases, batch_size=args.batch_size, base=base, progress=progress)
    finally:
        progress.close()
    result = {"data": str(test_file), "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **result}
    print(f"{test_file}:")
    print(format_table(result))
    summary = args.json_out or evaluation_path(args.run, test_file)
    predictions = write_results(result, summary)
    print(f"summary: {summary}\npredictions: {predictions}")
    if args.pairs:
        from sftbridge.inference.evaluate import preference_pairs, write_pairs

        pairs = preference_pairs(result, cases, predictor.prompt_format)
        write_pairs(pairs, args.pairs)
        print(f"pairs: {args.pairs} ({len(pairs)} of {len(cases)} answers wrong or long)")
    _refresh_report(Path(args.run), summary)
    return 0


def _refresh_report(run: Path, summary: Path) -> None:
    """Rewrite the run's report with this evaluation in it; a failing report is a warning, not an error."""
    from sftbridge.report import REPORT, write_report

    try:
        print(f"report: {write_report(run, run / REPORT, extra_evals=[summary])}")
    except Exception as exc:  # the evaluation is written; a plotting problem must not lose it
        print(f"warning: the report was not refreshed: {exc}", file=sys.stderr)


class EvalProgress:
    """Evaluation progress on stderr: a bar per stage on a terminal; piped, a line every ~10% of a stage.

    Not ``training.progress.Progress``: that one is a trainer callback that also writes ``metrics.jsonl``;
    this one is the ``progress(stage, done, total)`` callable ``inference.evaluate`` reports to."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.bar: Any = None
        self.stage = ""
        self.started = time.monotonic()
        self.shown = -1

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage, self.started, self.shown = stage, time.monotonic(), -1
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=f"eval {stage}", unit="q", file=self.stream, leave=True)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        tenth = done * 10 // total
        if tenth > self.shown:
            self.shown = tenth
            elapsed = time.monotonic() - self.started
            eta = elapsed / done * (total - done) if done else 0.0
            print(
                f"eval {stage}: {done}/{total} ({done / total:.0%}) {elapsed:.0f}s elapsed, eta {eta:.0f}s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
