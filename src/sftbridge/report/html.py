"""The report as one HTML page: inline CSS, figures as data: URIs, no script, nothing fetched."""

from __future__ import annotations

import json
from html import escape
from typing import Any

from sftbridge.report import plots
from sftbridge.report.collect import SAMPLES, Evaluation, ReportData
from sftbridge.runs import RunManifest

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.muted { color: #666; } .grid { display: flex; flex-wrap: wrap; gap: 1em; }
table { border-collapse: collapse; margin: 0.6em 0; } th, td { border: 1px solid #ddd; padding: 4px 8px; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.samples td { vertical-align: top; max-width: 22em; word-wrap: break-word; }
.hit { background: #e8f5e9; } .miss { background: #ffebee; } .meta { color: #666; font-size: 0.85em; }
code { background: #f4f4f4; padding: 0 3px; } img { max-width: 100%; }
"""

METRIC_ROWS = (
    ("exact_match", "exact match", "{:.1%}"),
    ("contains", "answer contained", "{:.1%}"),
    ("mean_answer_tokens", "mean answer tokens", "{:.1f}"),
    ("eos_rate", "stopped at EOS", "{:.1%}"),
)


def render(data: ReportData) -> str:
    manifest = data.manifest
    title = f"sftbridge report: {manifest.run_name}"
    where = escape(str(data.shown_as or data.run_dir))
    body = [
        f"<h1>{escape(title)}</h1>",
        f"<p class='muted'>{where} · base model <code>{escape(manifest.base_model.name_or_path)}</code></p>",
        _verdict(manifest),
        _curves(data),
        *(_evaluation(e, manifest) for e in data.evaluations),
        ""
        if data.evaluations
        else "<h2>Evaluation</h2><p>No evaluation yet: run <code>sftbridge eval "
        f"{where}</code> and this report is refreshed with it.</p>",
        _data(data),
        _config(data),
        _manifest(manifest),
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _verdict(manifest: RunManifest) -> str:
    """The end-of-run verdict of the answer metrics: whether the adapter learned its answers, and why not."""
    record = manifest.answer_metrics or {}
    verdict = record.get("verdict")
    if not isinstance(verdict, dict):
        return ""
    if verdict.get("learned"):
        return "<p class='verdict hit'>Learned its answers: the answer metrics raised no problem.</p>"
    problems = "".join(f"<li>{escape(str(problem))}</li>" for problem in verdict.get("problems", []))
    return (
        "<div class='verdict miss'><p>The adapter did not learn its answers "
        f"({record.get('sample')} {escape(str(record.get('source')))} questions, greedy):</p>"
        f"<ul>{problems}</ul><p>The training log's warning names the likely causes and the keys to change; "
        "configs/facts-small-model.yaml is a recipe that learns.</p></div>"
    )


def _img(b64: str, alt: str) -> str:
    return f"<img alt='{escape(alt)}' src='data:image/png;base64,{b64}'>"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return (
        f"<table class='{cls}'><tr>{head}</tr>" + "".join(f"<tr>{''.join(r)}</tr>" for r in rows) + "</table>"
    )


def _td(value: Any, num: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("num" if num else "", cls) if c)
    return f"<td class='{classes}'>{escape(str(value))}</td>" if classes else f"<td>{escape(str(value))}</td>"


def _curves(data: ReportData) -> str:
    if not data.curves:
        return "<h2>Training curves</h2><p>metrics.jsonl holds no logged steps.</p>"
    images = [
        _img(plots.curve(title, keys, data.curves), title) for title, keys in plots.curve_groups(data.curves)
    ]
    return "<h2>Training curves</h2><div class='grid'>" + "".join(images) + "</div>"


def _evaluation(evaluation: Evaluation, manifest: RunManifest) -> str:
    summary, predictions = evaluation.summary, evaluation.predictions
    sides: list[str] = [side for side in ("adapter", "base") if side in summary]
    rows = [
        [_td(label), *(_td(fmt.format(summary[side][key]), num=True) for side in sides)]
        for key, label, fmt in METRIC_ROWS
    ]
    losses = summary.get("eval_loss") or {}
    if any(losses.get(side) is not None for side in sides):
        rows.append(
            [_td("eval loss (reference answers)")]
            + [_td("-" if losses.get(s) is None else f"{losses[s]:.3f}", num=True) for s in sides]
        )
    where = summary.get("data", evaluation.path.name)
    parts = [
        f"<h2>Evaluation: {escape(str(where))}</h2>",
        f"<p class='muted'>{summary['n']} questions, greedy decoding · {escape(evaluation.path.name)}"
        f"{' · ' + escape(summary['evaluated_at']) if summary.get('evaluated_at') else ''}</p>",
        _table(["metric", *sides], rows),
    ]
    if predictions:
        series = {side: [p[f"{side}_tokens"] for p in predictions if f"{side}_tokens" in p] for side in sides}
        series["reference"] = [p["reference_tokens"] for p in predictions if "reference_tokens" in p]
        max_new = manifest.generation.max_new_tokens
        parts.append(_img(plots.answer_lengths(series, max_new), "answer length histogram"))
        parts.append(f"<h3>{min(SAMPLES, len(predictions))} sample questions</h3>")
        parts.append(_samples(predictions[:SAMPLES], sides))
    else:
        parts.append(
            "<p>No predictions file beside this summary: answer lengths and samples are not shown.</p>"
        )
    return "\n".join(parts)


def _samples(predictions: list[dict[str, Any]], sides: list[str]) -> str:
    rows = []
    for p in predictions:
        cells = [_td(p.get("question", "")), _td(p.get("reference", ""))]
        for side in sides:
            stop = "EOS" if p.get(f"{side}_stopped_at_eos") else "cut at max_new_tokens"
            cls = "hit" if p.get(f"{side}_exact_match") else "miss"
            cells.append(
                f"<td class='{cls}'>{escape(str(p.get(f'{side}_answer', '')))}"
                f"<div class='meta'>{p.get(f'{side}_tokens')} tokens, {stop}</div></td>"
            )
        rows.append(cells)
    return _table(["question", "reference", *sides], rows, cls="samples")


def _data(data: ReportData) -> str:
    record = data.manifest.data
    splits = [(name, report) for name, report in (("train", record.train), ("validation", record.validation))]
    splits = [(name, report) for name, report in splits if report]
    rows = [
        [
            _td(name),
            *(
                _td(report.get(key, "-"), num=True)
                for key in ("total", "over_length", "dropped", "truncated")
            ),
        ]
        for name, report in splits
    ]
    max_length = data.manifest.run_config.data.max_length
    parts = [
        "<h2>Data</h2>",
        _table(["split", "examples", f"over {max_length} tokens", "dropped", "truncated"], rows),
        _table(
            ["file", "sha256"],
            [
                [_td(path), f"<td><code>{escape(digest)}</code></td>"]
                for path, digest in record.sha256.items()
            ],
        ),
    ]
    if record.template_source:
        parts.append(f"<p class='muted'>template: {escape(record.template_source)}</p>")
    if data.lengths:
        stats_rows = []
        for split, lengths in data.lengths.items():
            for which, label in (("tokens", "prompt + answer"), ("trained", "answer (trained)")):
                stats = lengths.stats(which)
                stats_rows.append(
                    [
                        _td(split),
                        _td(label),
                        *(_td(f"{stats[k]:.4g}", num=True) for k in ("min", "median", "mean", "p95", "max")),
                    ]
                )
        parts.append("<h3>Token lengths</h3>")
        parts.append(_table(["split", "tokens", "min", "median", "mean", "p95", "max"], stats_rows))
        parts.append(_img(plots.data_lengths(data.lengths, max_length), "example length histogram"))
    else:
        parts.append(
            f"<p class='muted'>Token lengths not available: {escape(data.lengths_problem or 'no data')}</p>"
        )
    return "\n".join(parts)


def _config(data: ReportData) -> str:
    rows = [
        [_td(key), _td(_short(value)), _td(_short(default))] for key, value, default in data.config_changes
    ]
    return "<h2>Config: differences from the defaults</h2>" + (
        _table(["key", "value", "default"], rows) if rows else "<p>Every setting is the default.</p>"
    )


def _manifest(manifest: RunManifest) -> str:
    base, device, git, backend = manifest.base_model, manifest.device, manifest.git, manifest.backend
    fields = [
        ("base model", base.name_or_path),
        ("revision", base.revision),
        ("4-bit (QLoRA)", base.load_in_4bit),
        ("prompt format", manifest.prompt_format.model_dump()),
        ("generation", manifest.generation.model_dump()),
        ("seed", manifest.seed),
        ("backend", f"{backend.name} (job {backend.job_id})"),
        ("device", f"{device.type} {device.gpu or ''} {device.precision} × {device.world_size}"),
        ("git", f"{git.commit}{' (dirty)' if git.dirty else ''}"),
        ("timings", manifest.timings.model_dump()),
        ("final metrics", manifest.metrics.model_dump()),
        ("resumed from", manifest.resumed_from),
        ("versions", manifest.versions),
    ]
    rows = [[_td(name), _td(_short(value))] for name, value in fields]
    return "<h2>Manifest</h2>" + _table(["", "value"], rows)


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
