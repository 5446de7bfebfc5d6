"""``sftbridge runs [DIR]`` and ``sftbridge compare RUN_A RUN_B``: runs side by side.

Everything is read from what a run folder holds: the manifest (``sftbridge.json``), ``metrics.jsonl`` (it
grows while a run trains), the resolved ``config.yaml``, and an evaluation summary if ``sftbridge eval`` wrote
one (``runs.evaluation_files``: an ``eval*.json`` shaped like ``{"adapter": {"exact_match": ...}, ...}``).
A folder that never finished (no ``COMPLETE``, or still ``.<name>.partial``) is listed as unfinished with
what it has.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sftbridge.cli.options import add_json
from sftbridge.errors import RunDirError
from sftbridge.runs import (
    COMPLETE,
    CONFIG,
    MANIFEST,
    METRICS,
    MergedManifest,
    MetricsLog,
    RunManifest,
    evaluation_files,
    is_evaluation,
    read_manifest,
)

COLUMNS = (
    "name",
    "status",
    "base model",
    "data",
    "epochs",
    "final loss",
    "exact match",
    "EOS rate",
    "backend",
    "date",
)


def runs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir", nargs="?", type=Path, default=Path("runs"), help="folder of runs (default: runs)"
    )
    add_json(parser, "one JSON object per run, in a list")
    parser.set_defaults(func=cmd_runs)


def compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", type=Path, metavar="RUN_A")
    parser.add_argument("run_b", type=Path, metavar="RUN_B")
    add_json(parser, "print the differences as JSON")
    parser.set_defaults(func=cmd_compare)


@dataclass
class RunSummary:
    """What one run folder says about itself; None where it does not say."""

    path: str
    name: str
    finished: bool
    base_model: str | None = None
    data: str | None = None
    epochs: float | None = None
    final_loss: float | None = None  # the last logged training loss
    final_loss_step: int | None = None  # the step it was logged at
    train_loss: float | None = None  # the mean over the run, as the trainer reports it
    eval_loss: float | None = None
    global_step: int | None = None
    exact_match: float | None = None
    eos_rate: float | None = None
    eval_file: str | None = None
    backend: str | None = None
    date: str | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    evaluation: dict[str, Any] = field(default_factory=dict, repr=False)
    data_sha256: dict[str, str] = field(default_factory=dict, repr=False)

    def same_data(self, other: RunSummary) -> bool | None:
        """Whether both runs trained on the same bytes, wherever the files were (None: a run did not say)."""
        if not self.data_sha256 or not other.data_sha256:
            return None
        return sorted(self.data_sha256.values()) == sorted(other.data_sha256.values())


def _manifest(path: Path) -> RunManifest | MergedManifest | None:
    """The folder's manifest; None when it has none yet (a running run) or it cannot be read."""
    if not (path / MANIFEST).is_file():
        return None
    try:
        return read_manifest(path)
    except RunDirError:
        return None


def summarize(path: Path) -> RunSummary:
    """A run folder (finished or not) as a RunSummary; RunDirError if it is not a run folder at all."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory")
    manifest = _manifest(path)
    if manifest is None and not (path / METRICS).is_file() and not (path / CONFIG).is_file():
        raise RunDirError(f"{path}: not a run directory (no {MANIFEST}, {METRICS} or {CONFIG})")
    if isinstance(manifest, MergedManifest):  # `sftbridge merge` output
        raise RunDirError(f"{path}: a {manifest.kind} model folder, not a run")
    name = path.name.removeprefix(".").removesuffix(".partial")
    finished = manifest is not None and (path / COMPLETE).is_file() and not path.name.endswith(".partial")
    summary = RunSummary(str(path), name, finished)
    config = (manifest.config if manifest is not None else None) or _yaml(path / CONFIG) or {}
    summary.config = config
    summary.base_model = config.get("model", {}).get("name_or_path")
    summary.data = config.get("data", {}).get("train_file")
    summary.epochs = config.get("train", {}).get("epochs")  # until the log says how far it got
    if manifest is not None:
        summary.train_loss = manifest.metrics.train_loss
        summary.eval_loss = manifest.metrics.eval_loss
        summary.global_step = manifest.metrics.global_step
        summary.backend = manifest.backend.name
        summary.data_sha256 = manifest.data.sha256
    logs = MetricsLog(path / METRICS).read()
    losses = [row for row in logs if isinstance(row.get("loss"), int | float)]
    summary.final_loss = losses[-1]["loss"] if losses else None
    summary.final_loss_step = losses[-1].get("step") if losses else None
    epochs = [row["epoch"] for row in logs if isinstance(row.get("epoch"), int | float)]
    if epochs:  # what was trained: train.max_steps or an interruption may have cut train.epochs short
        summary.epochs = round(max(epochs), 2)
    if summary.eval_loss is None:
        evals = [row["eval_loss"] for row in logs if isinstance(row.get("eval_loss"), int | float)]
        summary.eval_loss = evals[-1] if evals else None
    if summary.global_step is None:
        steps = [row["step"] for row in logs if isinstance(row.get("step"), int)]
        summary.global_step = max(steps) if steps else None
    evaluation, eval_file = _evaluation(path, config)
    if evaluation:
        summary.evaluation, summary.eval_file = evaluation, eval_file
        summary.exact_match = evaluation["adapter"].get("exact_match")
        summary.eos_rate = evaluation["adapter"].get("eos_rate")
    summary.date = _date(path)
    return summary


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _yaml(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _evaluation(path: Path, config: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The run's evaluation summary: the one of its data.test_file if there is one, else the newest."""
    found = []
    for candidate in evaluation_files(path):
        body = _json(candidate)
        if is_evaluation(body):
            found.append((candidate, body))
    if not found:
        return {}, None
    test_file = (config.get("data") or {}).get("test_file")
    for candidate, body in found:
        if test_file and Path(str(body.get("data", ""))).name == Path(test_file).name:
            return body, candidate.name
    candidate, body = max(found, key=lambda item: item[0].stat().st_mtime)
    return body, candidate.name


def _date(path: Path) -> str:
    """When the run finished (the COMPLETE marker holds the time), else when its folder last changed."""
    marker = path / COMPLETE
    if marker.is_file():
        text = marker.read_text(encoding="utf-8").strip()
        try:
            return datetime.fromisoformat(text).astimezone().strftime("%Y-%m-%d %H:%M")
        except ValueError:
            pass
    newest = max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.iterdir() if p.is_file()])
    return datetime.fromtimestamp(newest, tz=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M")


def find_runs(root: Path) -> list[RunSummary]:
    """Every run folder directly under ``root`` (checkpoint folders are not runs), oldest first."""
    if not root.is_dir():
        raise RunDirError(f"{root}: no such folder of runs; pass the folder: sftbridge runs DIR")
    runs = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.endswith(".checkpoints"):
            continue
        try:
            runs.append(summarize(child))
        except RunDirError:
            continue  # any other folder
    return sorted(runs, key=lambda run: (run.date or "", run.name))


def cmd_runs(args: argparse.Namespace) -> int:
    runs = find_runs(args.dir)
    nested = args.dir / "runs"
    if not runs and args.dir.name != "runs" and nested.is_dir() and (inner := find_runs(nested)):
        print(f"no runs directly in {args.dir}; these are in {nested}:", file=sys.stderr)
        runs = inner
    if args.json:
        fields = ("config", "evaluation", "data_sha256")
        print(
            json.dumps([{k: v for k, v in asdict(run).items() if k not in fields} for run in runs], indent=2)
        )
        return 0
    if not runs:
        print(f"no runs in {args.dir}")
        return 0
    print(table(runs))
    return 0


def table(runs: list[RunSummary]) -> str:
    rows = [COLUMNS] + [
        (
            run.name,
            "done" if run.finished else "unfinished",
            _text(run.base_model),
            Path(run.data).name if run.data else "-",
            _number(run.epochs),
            _loss(run),
            _percent(run.exact_match),
            _percent(run.eos_rate),
            _text(run.backend),
            _text(run.date),
        )
        for run in runs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _loss(run: RunSummary) -> str:
    """The last logged loss, with its step when the run went on past it (a loss logged every 50 steps)."""
    if run.final_loss is None:
        return "-"
    late = run.final_loss_step is not None and run.global_step not in (None, run.final_loss_step)
    return f"{run.final_loss:.4g}" + (f" @{run.final_loss_step}" if late else "")


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def cmd_compare(args: argparse.Namespace) -> int:
    a, b = summarize(args.run_a), summarize(args.run_b)
    differences = config_differences(a.config, b.config)
    metrics = metric_rows(a, b)
    if args.json:
        body = {
            "runs": [a.path, b.path],
            "config": [{"key": k, "a": va, "b": vb} for k, va, vb in differences],
            "metrics": [{"metric": m, "a": va, "b": vb} for m, va, vb in metrics],
            "same_data": a.same_data(b),
        }
        print(json.dumps(body, indent=2))
        return 0
    print(f"A  {a.path}{'' if a.finished else '  (unfinished)'}")
    print(f"B  {b.path}{'' if b.finished else '  (unfinished)'}")
    print("\nconfig differences" + ("" if differences else ": none"))
    print(_columns([(key, _show(va), _show(vb)) for key, va, vb in differences], ("key", "A", "B")))
    same = a.same_data(b)
    if same is not None:
        moved = same and sorted(a.data_sha256) != sorted(b.data_sha256)
        said = "different content (the data changed)" if not same else "the same content"
        print(f"\ndata files: {said}{' (at other paths)' if moved else ''}")
    print("\nmetrics")
    print(_columns([(m, _show(va), _show(vb)) for m, va, vb in metrics], ("metric", "A", "B")))
    return 0


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every key whose values differ, in a's order."""
    from sftbridge.config import flatten

    flat_a, flat_b = flatten(a), flatten(b)
    keys = list(flat_a) + [k for k in flat_b if k not in flat_a]
    return [(k, flat_a.get(k), flat_b.get(k)) for k in keys if flat_a.get(k) != flat_b.get(k)]


def metric_rows(a: RunSummary, b: RunSummary) -> list[tuple[str, Any, Any]]:
    from sftbridge.inference.evaluate import METRICS as EVAL_METRICS  # what `sftbridge eval` scores

    rows: list[tuple[str, Any, Any]] = [
        ("global_step", a.global_step, b.global_step),
        ("final loss (last logged)", a.final_loss, b.final_loss),
        ("train_loss (mean)", a.train_loss, b.train_loss),
        ("eval_loss", a.eval_loss, b.eval_loss),
    ]
    for side in ("adapter", "base"):
        for metric in EVAL_METRICS:
            va = (a.evaluation.get(side) or {}).get(metric)
            vb = (b.evaluation.get(side) or {}).get(metric)
            if va is not None or vb is not None:
                rows.append((f"{side} {metric}", va, vb))
    if a.evaluation or b.evaluation:
        rows.append(("evaluated on", a.evaluation.get("data"), b.evaluation.get("data")))
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list | dict | bool) else str(value)


def _columns(rows: list[tuple[str, str, str]], header: tuple[str, str, str]) -> str:
    if not rows:
        return ""
    table_rows = [header, *rows]
    widths = [max(len(row[i]) for row in table_rows) for i in range(3)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table_rows
    )
