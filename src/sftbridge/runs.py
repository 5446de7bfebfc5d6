"""The run directory every backend produces and every consumer (eval, serve, merge) reads.

Layout::

    runs/<run_name>-<YYYYmmdd-HHMMSS>/
      adapter/          PEFT adapter (adapter_config.json, adapter_model.safetensors) + tokenizer, and
                        README.md: the model card (base model, data, config, metrics, how to load it)
      config.yaml       the resolved config (re-run with `sftbridge train config.yaml`)
      sftbridge.json    the manifest (RunManifest): base model, prompt format, data hashes, versions,
                        git, timings, metrics
      metrics.jsonl     training and evaluation logs, one JSON object per line
      report.html       the run's report (train writes it, every eval rewrites it)
      tensorboard/      TensorBoard event files, when train.report_to has tensorboard
      eval-<data>.json  what `sftbridge eval` wrote, with eval-<data>-predictions.jsonl beside it
      COMPLETE          written last; a folder without it is never loaded as a finished run

It is assembled under a temporary name beside the target and moved into place when complete.

``sftbridge.json`` is written and read only through the typed models here: :class:`RunManifest` for a run,
:class:`MergedManifest` for a ``sftbridge merge`` folder, told apart by ``kind``. :func:`read_manifest` also
reads what earlier versions wrote (version 1 had no ``kind`` on a run).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from sftbridge import __version__
from sftbridge.config import GenerationSection, RunConfig, Template
from sftbridge.errors import RunDirError, UserError

MANIFEST = "sftbridge.json"
COMPLETE = "COMPLETE"
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
# 2: `kind` on every manifest. 3: a run's config may hold model.adapter and train.method (a DPO run), which
# an older sftbridge's config schema refuses: it says "written by a newer sftbridge" instead; `parent_run`.
MANIFEST_VERSION = 3
CHECKPOINT_COMPLETE = "SFTBRIDGE_COMPLETE"  # inside checkpoint-N/, written last
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

# Values of these variables are scrubbed from anything we write, should one ever reach a string.
SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def default_run_dir(root: str | Path, run_name: str) -> Path:
    return Path(root) / f"{run_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def redact(text: str) -> str:
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, "***")
    return text


def require_empty(target: Path, label: str, choose: str, error: type[UserError] = RunDirError) -> None:
    """``target`` is absent or an empty folder, or ``error`` names ``label`` and says to choose another."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise error(f"{label}: already exists and is not empty; choose another {choose}")


def staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.partial"


def publish(staging: Path, target: Path) -> None:
    """Move a finished staging folder into place. An existing (empty) target keeps its inode: SageMaker's
    ``SM_MODEL_DIR`` is a mount point that cannot be replaced, only filled."""
    if target.is_dir():
        for child in staging.iterdir():
            child.rename(target / child.name)
        staging.rmdir()
    else:
        staging.rename(target)


@contextmanager
def staged(target: Path, *, label: str | None = None, choose: str = "--run-dir") -> Iterator[Path]:
    """Write a folder atomically: the block fills an empty ``.<name>.partial`` beside ``target``, which is
    moved into place when the block ends and deleted if it raises, so ``target`` is never half-written."""
    require_empty(target, label or str(target), choose)
    staging = staging_dir(target)
    shutil.rmtree(staging, ignore_errors=True)  # left over from a crashed attempt
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, target)


# ---- the manifest ----------------------------------------------------------------------------------------
class _Record(BaseModel):
    # A manifest written by a newer sftbridge may hold keys this one does not know: keep them, round trip.
    model_config = ConfigDict(extra="allow")


class BaseModelRecord(_Record):
    name_or_path: str
    resolved_path: str | None = None  # the built-in model's cache folder
    revision: str | None = None  # the Hub commit the weights came from
    load_in_4bit: bool = False


class PromptRecord(_Record):
    """How records and questions become model input (``data.formatting.PromptFormat``)."""

    format: Literal["qa", "template", "messages", "text"]
    chat_format: Literal["chat_template", "plain"]
    template: Template | None = None
    system_prompt: str | None = None


class DataRecord(_Record):
    sha256: dict[str, str] = Field(default_factory=dict)  # data file as given -> its digest
    template_source: str | None = None
    train: dict[str, Any] = Field(default_factory=dict)  # length report (data.loading.LengthReport)
    validation: dict[str, Any] = Field(default_factory=dict)


class GitRecord(_Record):
    commit: str | None = None
    dirty: bool | None = None


class BackendRecord(_Record):
    name: str = "direct"
    job_id: str | None = None


class DeviceRecord(_Record):
    type: str | None = None
    precision: str | None = None
    world_size: int = 1
    gpu: str | None = None


class Timings(_Record):
    load_seconds: float | None = None
    train_seconds: float | None = None
    total_seconds: float | None = None


class FinalMetrics(_Record):
    train_loss: float | None = None
    global_step: int | None = None
    eval_loss: float | None = None


class ParentRecord(_Record):
    """The run whose adapter a run started from (``model.adapter``): the DPO reference, or the SFT run that
    more SFT continued."""

    path: str  # as the config gave it
    run_name: str
    adapter_sha256: str  # of its adapter_model.safetensors: which weights, should the folder change later
    method: str = "sft"  # how the parent itself was trained


class FileRecord(_Record):
    sha256: str
    bytes: int


class RunManifest(_Record):
    """A training run's ``sftbridge.json``: what it was trained from, how and where, and how it ended."""

    kind: Literal["run"] = "run"
    manifest_version: int = MANIFEST_VERSION
    run_name: str
    base_model: BaseModelRecord
    prompt_format: PromptRecord
    generation: GenerationSection
    config: dict[str, Any]  # the resolved config, as config.yaml holds it (see :attr:`run_config`)
    data: DataRecord = Field(default_factory=DataRecord)
    seed: int | None = None
    versions: dict[str, str | None] = Field(default_factory=dict)
    git: GitRecord = Field(default_factory=GitRecord)
    backend: BackendRecord = Field(default_factory=BackendRecord)
    device: DeviceRecord = Field(default_factory=DeviceRecord)
    timings: Timings = Field(default_factory=Timings)
    resumed_from: str | None = None
    parent_run: ParentRecord | None = None  # model.adapter's run (manifests before it: None)
    metrics: FinalMetrics = Field(default_factory=FinalMetrics)
    best_model: dict[str, Any] | None = None  # training.answer_metrics.best_model_record
    answer_metrics: dict[str, Any] | None = None  # training.answer_metrics.answer_record
    sagemaker: dict[str, Any] | None = None  # the job, added by `fetch` (backends.sagemaker.job)
    files: dict[str, FileRecord] = Field(default_factory=dict)  # adapter/* as written (version 1: none)

    @property
    def run_config(self) -> RunConfig:
        return RunConfig.model_validate(self.config)


class AdapterRecord(_Record):
    r: int
    alpha: int | float
    target_modules: list[str] | str


class MergedManifest(_Record):
    """A ``sftbridge merge`` folder's ``sftbridge.json``: the run it came from, its prompt format and
    generation defaults, so it is prompted as the adapter was trained."""

    kind: Literal["merged"] = "merged"
    manifest_version: int = MANIFEST_VERSION
    run_name: str | None = None
    source_run: str
    base_model: BaseModelRecord
    qlora: bool = False
    adapter: AdapterRecord
    dtype: str
    prompt_format: PromptRecord
    generation: GenerationSection
    merged_at: str
    versions: dict[str, str | None] = Field(default_factory=dict)
    files: dict[str, FileRecord] = Field(default_factory=dict)  # every weight, config and tokenizer file


Manifest = Annotated[RunManifest | MergedManifest, Field(discriminator="kind")]
_MANIFEST = TypeAdapter(Manifest)


def upgrade_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    """A manifest as an earlier version wrote it, in the current version's shape."""
    raw = dict(raw)
    version = int(raw.get("manifest_version", 1))
    if version < 2:
        raw.setdefault("kind", "run")  # version 1 marked only merged folders
    # Version 3 only added what version 2 runs lack (parent_run, defaulting to None).
    raw["manifest_version"] = max(version, MANIFEST_VERSION)
    return raw


def parse_manifest(raw: Any, where: str | Path) -> RunManifest | MergedManifest:
    """A manifest's JSON as a typed model; RunDirError naming the file and field otherwise."""
    if not isinstance(raw, dict):
        raise RunDirError(f"{where}: not a manifest (a JSON object); train or merge again")
    version = raw.get("manifest_version", 1)
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise RunDirError(
            f"{where}: manifest_version {version} was written by a newer sftbridge (this one reads up to "
            f"{MANIFEST_VERSION}); upgrade sftbridge"
        )
    try:
        return _MANIFEST.validate_python(upgrade_manifest(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"][1:]) or "(top level)"
        raise RunDirError(
            f"{where}: {field}: {first['msg']} ({exc.error_count()} problem(s)); "
            "the manifest was edited or damaged, train or merge again"
        ) from None


def read_manifest(path: str | Path) -> RunManifest | MergedManifest:
    """The manifest of a folder (a run or a merged folder), typed; RunDirError if it has none or it is
    unreadable. Says nothing of whether the run finished (see :func:`load_manifest`)."""
    file = Path(path) / MANIFEST
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: not a run directory (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{file}: unreadable ({exc}); train or merge again") from None
    return parse_manifest(raw, file)


def sha256_file(path: Path) -> str:
    """A file's sha256, read a MiB at a time."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(root: Path, folder: Path) -> dict[str, FileRecord]:
    """sha256 and size of every file under ``folder``, keyed by its path relative to ``root``."""
    return {
        file.relative_to(root).as_posix(): FileRecord(sha256=sha256_file(file), bytes=file.stat().st_size)
        for file in sorted(folder.rglob("*"))
        if file.is_file() and not file.is_symlink()
    }


def manifest_kind(path: str | Path) -> str | None:
    """What a folder's manifest says it is (``run``, ``merged``), without validating the rest; None when it
    cannot be read."""
    try:
        raw = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    kind = raw.get("kind", "run")
    return kind if isinstance(kind, str) else None


def write_manifest(folder: Path, manifest: RunManifest | MergedManifest) -> None:
    """``sftbridge.json`` in ``folder``, secrets scrubbed, written whole (temporary file, then rename)."""
    text = redact(manifest.model_dump_json(indent=2, exclude_none=False)) + "\n"
    partial = folder / f".{MANIFEST}.tmp"
    partial.write_text(text, encoding="utf-8")
    partial.replace(folder / MANIFEST)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One trainer per run folder: an exclusive lock on ``.<name>.lock`` beside it, held while the block runs.

    A second trainer on the same folder is refused at once (RunDirError naming the holder's pid) instead of
    mixing two runs' checkpoints, metrics and manifest. The kernel drops the lock when its process ends,
    however it ends (a lock left by a dead process is simply taken); a holder that ends normally removes the
    file. A taker checks that the file it locked is still the one at the path, so a removal between its open
    and its lock cannot give two holders."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f".{run_dir.name}.lock"
    handle = path.open("a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
                raise BlockingIOError  # its holder finished and removed it meanwhile: busy a moment ago
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunDirError(
                f"{run_dir}: another training run ({holder}) is writing this run folder; wait for it to end, "
                "or choose another --run-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still holding the lock: no one else can have taken this file
    finally:
        handle.close()


def storage_error(exc: BaseException, where: Path) -> UserError | None:
    """A full disk, a read-only or unwritable target as one line naming the path (and the space left), or
    None for any other error. torch's checkpoint writer and safetensors report a full disk in their own words
    (``unexpected pos``, ``No space left``)."""
    import errno
    import shutil as _shutil

    path = Path(getattr(exc, "filename", None) or where)
    text = str(exc)
    number = getattr(exc, "errno", None)
    full = number in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "unexpected pos" in text
    if not full and number not in (errno.EROFS, errno.EACCES, errno.EPERM):
        return None
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free = _shutil.disk_usage(existing).free / 2**30
    if full:
        return UserError(
            f"{path}: no space left on its disk ({free:.1f} GiB free); free some, or write the run and its "
            "checkpoints elsewhere (--run-dir, train.checkpoint_dir), then run the same command to resume"
        )
    return UserError(
        f"{path}: cannot write there ({os.strerror(number or errno.EACCES)}); choose a writable --run-dir "
        "(and train.checkpoint_dir)"
    )


class RunWriter:
    """Builds a run directory under ``.<name>.partial`` and moves it into place on ``finalize``."""

    def __init__(self, target: Path, *, create: bool = True) -> None:
        self.target = Path(target)
        require_empty(self.target, str(self.target), "--run-dir")
        self.staging = staging_dir(self.target)
        if create:
            shutil.rmtree(self.staging, ignore_errors=True)  # left over from a crashed run
            self.staging.mkdir(parents=True)

    def write_text(self, name: str, text: str) -> None:
        (self.staging / name).write_text(redact(text), encoding="utf-8")

    def finalize(self, manifest: RunManifest) -> Path:
        manifest.files = file_records(self.staging, self.staging / ADAPTER)  # what opening it checks
        write_manifest(self.staging, manifest)
        publish(self.staging, self.target)
        (self.target / COMPLETE).write_text(datetime.now(timezone.utc).isoformat() + "\n", encoding="utf-8")
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file() and (Path(path) / MANIFEST).is_file()


def load_manifest(path: str | Path) -> RunManifest:
    """The manifest of a finished run; RunDirError if the folder is not one."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory")
    if not (path / MANIFEST).is_file():
        raise RunDirError(f"{path}: not a run directory (no {MANIFEST})")
    kind = manifest_kind(path)
    if kind not in (None, "run"):
        raise RunDirError(f"{path}: a {kind} model folder, not a run")
    if not (path / COMPLETE).is_file():
        raise RunDirError(f"{path}: the run did not finish (no {COMPLETE} marker); train again or resume it")
    manifest = read_manifest(path)
    if not isinstance(manifest, RunManifest):
        raise RunDirError(f"{path}: a {manifest.kind} model folder, not a run")
    return manifest


def checkpoint_dir_for(run_dir: Path) -> Path:
    """Default checkpoint folder of a run: beside it, so it survives a failed run and can be resumed."""
    return run_dir.parent / f"{run_dir.name}.checkpoints"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (half-written ones are ignored)."""
    if not folder.is_dir():
        return None
    complete = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := CHECKPOINT_PATTERN.match(path.name)) and (path / CHECKPOINT_COMPLETE).is_file()
    ]
    return max(complete)[1] if complete else None


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "sftbridge": __version__}
    for name in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "datasets",
        "accelerate",
        "bitsandbytes",
        "tokenizers",
        "safetensors",
        "huggingface-hub",
        "pydantic",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(where: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout sftbridge runs from (None outside a git checkout)."""
    where = where or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, each with its own ``time``, written as the trainer logs.

    Every line is appended and closed at once, so a running or killed run can be read (and plotted) up to the
    last step it logged.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        if "time" not in record:
            record = {"time": round(time.time(), 3), **record}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(redact(json.dumps(record)) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every complete line, as a dict; a line cut short by a kill (or not a JSON object) is skipped, and a
        missing file reads as no lines: a run may be read while it trains, or after it crashed."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def restart_at(self, step: int) -> None:
        """Keep only the lines up to ``step`` (the checkpoint a run resumes from): the steps after it are
        trained again, and their old lines would be duplicates; so would the summary (``train_runtime``) of
        the attempt that stopped. ``step`` 0 starts an empty file."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step and "train_runtime" not in r]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        partial.replace(self.path)


def evaluation_path(run_dir: Path, data_file: str | Path) -> Path:
    """Where ``sftbridge eval`` writes its summary of ``data_file`` in a run folder by default."""
    return Path(run_dir) / f"eval-{Path(data_file).stem}.json"


def evaluation_files(run_dir: Path) -> list[Path]:
    """The files of a run folder that may be ``sftbridge eval`` summaries (``eval*.json``), by name: keep
    those whose body ``is_evaluation``. Their ``eval-<data>-predictions.jsonl`` files are not matched."""
    return sorted(Path(run_dir).glob("eval*.json"))


def is_evaluation(body: Any) -> bool:
    """Whether a decoded JSON file is an ``sftbridge eval`` summary: an object with the adapter's results."""
    return isinstance(body, dict) and isinstance(body.get("adapter"), dict)
