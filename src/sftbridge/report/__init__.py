"""The run report and the adapter's model card: what a run did, readable without Python.

``write_report`` renders one self-contained HTML file (curves, evaluations, answer lengths, sample answers,
data, config, manifest; images embedded, nothing fetched); ``write_model_card`` replaces PEFT's empty
``adapter/README.md``. ``write_run_documents`` is what training calls at the end: both, each guarded so that a
problem with a document is a warning and never fails the run. Matplotlib is imported only when plotting.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sftbridge.runs import RunManifest

log = logging.getLogger(__name__)

REPORT = "report.html"  # in the run directory


def write_report(
    run_dir: Path,
    out: Path | None = None,
    *,
    manifest: RunManifest | None = None,
    extra_evals: Iterable[Path] = (),
    final: Path | None = None,
) -> Path:
    """Render ``run_dir``'s report to ``out`` (default ``run_dir/report.html``) and return its path.

    ``manifest`` and ``final`` are for a run still being written (training passes them before the manifest
    exists and while the folder has its staging name): the report names ``final``, where the run will be.
    Evaluations are the ``eval*.json`` summaries in the run directory plus ``extra_evals``.
    """
    from sftbridge.report.collect import collect
    from sftbridge.report.html import render

    out = out or run_dir / REPORT
    data = collect(run_dir, manifest=manifest, extra_evals=extra_evals)
    data.shown_as = final or run_dir
    html = render(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return out


def write_run_documents(folder: Path, manifest: RunManifest, final: Path | None = None) -> None:
    """The model card and the report of a run being written into ``folder`` (to be moved to ``final``);
    failures are only logged."""
    from sftbridge.report.model_card import write_model_card

    try:
        write_model_card(folder, manifest)
    except Exception:  # a document must never fail the run it documents
        log.warning("the adapter's model card was not written", exc_info=True)
    try:
        write_report(folder, manifest=manifest, final=final)
    except Exception:
        log.warning("the run report was not written", exc_info=True)
