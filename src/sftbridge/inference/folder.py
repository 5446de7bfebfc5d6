"""The one opener of model folders: a finished run, a ``sftbridge merge`` folder, or a fetched job's run.

``generate``, ``eval``, ``serve`` (both engines), ``merge`` and ``deploy`` all open what they are given with
:meth:`ModelFolder.open`. It checks the folder before torch is imported (milliseconds): a half-written
run, a missing adapter, tokenizer or config, a truncated or corrupt weights file, an unreadable or damaged
manifest or a link that leaves the folder is refused at once, in one line naming the file and the fix, not as
a traceback after the base model loaded. Then :meth:`~ModelFolder.predictor` loads the model (base + adapter,
or the merged weights), and :attr:`~ModelFolder.prompter` gives the run's prompt path without any weights
(deploy, vLLM).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sftbridge.config import GenerationSection, RunConfig
from sftbridge.data.formatting import PromptFormat
from sftbridge.errors import RunDirError
from sftbridge.runs import (
    ADAPTER,
    COMPLETE,
    MANIFEST,
    MergedManifest,
    RunManifest,
    manifest_kind,
    read_manifest,
    sha256_file,
)

if TYPE_CHECKING:
    from sftbridge.data.prompter import Prompter
    from sftbridge.inference.predictor import Predictor

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer_config.json",)
# Opening checks recorded sha256s up to this many bytes (an adapter: megabytes); beyond (merged 7B weights:
# 13 GB, half a minute to hash) sizes only, and `fetch` or verify="full" every hash.
FULL_CHECK_BYTES = 1 << 30  # with tokenizer.json or a SentencePiece model beside it


@dataclass(frozen=True)
class ModelFolder:
    """A checked model folder: its kind, typed manifest, where its weights and tokenizer are."""

    path: Path
    manifest: RunManifest | MergedManifest
    trusted: bool = False  # the user let this folder's model run its own code (--trust-remote-code)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        weights: bool = True,
        trust_remote_code: bool = False,
        verify: Literal["quick", "full"] = "quick",
    ) -> ModelFolder:
        """Check ``path`` and read its manifest; RunDirError naming the problem and the fix otherwise.

        ``weights=False`` opens a folder that holds only what formatting needs (the manifest, the tokenizer
        and the configs): an endpoint's record, which ``deploy`` uploads without the weights."""
        path = Path(path)
        if not path.is_dir():
            raise RunDirError(f"{path}: no such run directory")
        if not (path / MANIFEST).is_file():
            raise RunDirError(f"{path}: not a run directory (no {MANIFEST})")
        # A run is marked complete last (a merged folder is moved into place whole): before it, the manifest
        # may be half-written, and "did not finish" is the message that helps.
        if not (path / COMPLETE).is_file() and manifest_kind(path) != "merged":
            raise RunDirError(
                f"{path}: the run did not finish (no {COMPLETE} marker); train again or resume it"
            )
        folder = cls(path, read_manifest(path), trust_remote_code)
        folder._check_links()
        folder._check_files(weights)
        folder._check_recorded(weights, full=verify == "full")
        folder._check_code()
        return folder

    # ---- what it is ------------------------------------------------------------------------------------
    @property
    def kind(self) -> Literal["run", "merged"]:
        return self.manifest.kind

    @property
    def is_merged(self) -> bool:
        return isinstance(self.manifest, MergedManifest)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def weights_dir(self) -> Path:
        """The adapter of a run, the model of a merged folder; the tokenizer is saved beside either."""
        return self.path if self.is_merged else self.path / ADAPTER

    @property
    def tokenizer_dir(self) -> Path:
        return self.weights_dir

    @property
    def run(self) -> RunManifest:
        """The manifest of a run; RunDirError for a merged folder (which has no adapter or config)."""
        if not isinstance(self.manifest, RunManifest):
            raise RunDirError(f"{self.path}: a {self.manifest.kind} model folder, not a run")
        return self.manifest

    @property
    def run_config(self) -> RunConfig:
        return self.run.run_config

    @property
    def loading_config(self) -> RunConfig:
        """The run's config as its base is loaded here: trust_remote_code is the user's say (``trusted``),
        never the run's own (see ``_check_code``)."""
        config = self.run_config
        config.model = config.model.model_copy(update={"trust_remote_code": self.trusted})
        return config

    @property
    def base_model(self) -> str:
        """The base a run's adapter goes on (a Hub id, a local folder or ``builtin:...``)."""
        return self.manifest.base_model.name_or_path

    @property
    def qlora(self) -> bool:
        manifest = self.manifest
        return (
            manifest.qlora if isinstance(manifest, MergedManifest) else manifest.run_config.model.load_in_4bit
        )

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat.from_record(self.manifest.prompt_format)

    @property
    def generation(self) -> GenerationSection:
        return self.manifest.generation

    @cached_property
    def adapter_rank(self) -> int:
        """LoRA rank of a run's adapter, as its adapter_config.json says."""
        config = json.loads((self.path / ADAPTER / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        return int(config["r"])

    def weight_files(self) -> list[Path]:
        if self.is_merged:
            return sorted(self.path.glob("*.safetensors"))
        return [self.path / ADAPTER / ADAPTER_WEIGHTS]

    # ---- loading ---------------------------------------------------------------------------------------
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir, trust_remote_code=self.trusted)

    @cached_property
    def prompter(self) -> Prompter:
        """The run's prompt path (its tokenizer and prompt format), without loading any weights."""
        from sftbridge.data.prompter import Prompter

        return Prompter(self.tokenizer(), self.prompt_format)

    def predictor(self, *, device: str = "auto") -> Predictor:
        """The model loaded for inference: the run's base with its adapter, or the merged weights."""
        from safetensors import SafetensorError

        try:
            model = self._load_merged(device) if self.is_merged else self._load_adapter(device)
        except SafetensorError as exc:  # damage the header check cannot see
            where = self.path if self.is_merged else self.path / ADAPTER / ADAPTER_WEIGHTS
            raise RunDirError(f"{where}: corrupt safetensors file ({exc}); train or merge again") from None
        from sftbridge.inference.predictor import Predictor

        return Predictor(model, self.tokenizer(), self.prompt_format, self.generation)

    def load_base(self, device: str = "auto") -> Any:
        """A run's base model, loaded as the run's config says, without its adapter."""
        from sftbridge.models.loading import load_run_base

        return load_run_base(self.loading_config, device)

    def _load_adapter(self, device: str) -> Any:
        from peft import PeftModel

        model = PeftModel.from_pretrained(self.load_base(device), self.path / ADAPTER)
        model.eval()
        return model

    def _load_merged(self, device: str) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        from sftbridge.config import TrainSection
        from sftbridge.models.loading import resolve_device

        target = resolve_device(TrainSection.model_validate({"device": device}))
        # 16-bit weights are upcast on the CPU, where half-precision matmuls are slow or missing.
        dtype: Any = torch.float32 if target == "cpu" else "auto"
        model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=dtype, device_map={"": target}, trust_remote_code=self.trusted
        )
        model.eval()
        return model

    # ---- checks ----------------------------------------------------------------------------------------
    def _check_files(self, weights: bool) -> None:
        fix = "merge again" if self.is_merged else "train again"
        required = ["config.json"] if self.is_merged else [f"{ADAPTER}/{ADAPTER_CONFIG}"]
        prefix = "" if self.is_merged else f"{ADAPTER}/"
        required += [f"{prefix}{name}" for name in TOKENIZER_FILES]
        for name in required:
            if not (self.path / name).is_file():
                raise RunDirError(f"{self.path / name}: missing; the {self.kind} folder is incomplete, {fix}")
        if not weights:
            return
        files = self.weight_files()
        if not files or not files[0].is_file():
            missing = "*.safetensors" if self.is_merged else f"{ADAPTER}/{ADAPTER_WEIGHTS}"
            raise RunDirError(f"{self.path / missing}: missing; the {self.kind} folder is incomplete, {fix}")
        for file in files:
            check_safetensors(file)

    def _check_recorded(self, weights: bool, *, full: bool) -> None:
        """Every file the manifest records is there, with its size and (``full``, or up to
        FULL_CHECK_BYTES in all: an adapter) its sha256; the first that differs is named."""
        recorded = self.manifest.files
        if not weights:  # a record: no weights beside it
            recorded = {k: v for k, v in recorded.items() if not k.endswith(".safetensors")}
        full = full or sum(r.bytes for r in recorded.values()) <= FULL_CHECK_BYTES
        fix = "merge again" if self.is_merged else "train or fetch again"
        for name, record in recorded.items():
            file = self.path / name
            if not file.is_file():
                raise RunDirError(f"{file}: missing, though the manifest records it; {fix}")
            if file.stat().st_size != record.bytes:
                raise RunDirError(
                    f"{file}: {file.stat().st_size} bytes, the manifest records {record.bytes}; {fix}"
                )
            if full and sha256_file(file) != record.sha256:
                raise RunDirError(f"{file}: its sha256 differs from the one the manifest records; {fix}")

    def _check_code(self) -> None:
        """A folder runs no code of its own unless the user says so: someone else may have written it. A run
        whose config set model.trust_remote_code would load its base with that code; a merged folder whose
        config.json maps classes to its own modules (auto_map) would import them."""
        if self.trusted:
            return
        if isinstance(self.manifest, RunManifest) and self.run_config.model.trust_remote_code:
            log.warning(
                "%s: its config sets model.trust_remote_code=true; ignored, so no code from its base model "
                "(%s) runs: pass --trust-remote-code if you trust both",
                self.path,
                self.base_model,
            )
        for name in ("config.json", "tokenizer_config.json"):
            file = self.weights_dir / name
            try:
                raw = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RunDirError(f"{file}: unreadable ({exc}); train or merge again") from None
            if isinstance(raw, dict) and raw.get("auto_map"):
                raise RunDirError(
                    f"{file}: maps its classes to Python modules of its own (auto_map), which loading it "
                    "would run; pass --trust-remote-code if you trust where the folder came from"
                )

    def _check_links(self) -> None:
        """A link inside the folder may only point inside it: reading or overwriting through one must never
        reach another file of the user's."""
        root = self.path.resolve()
        for dirpath, dirnames, filenames in os.walk(self.path):
            for entry in (*dirnames, *filenames):
                candidate = Path(dirpath) / entry
                if candidate.is_symlink() and not candidate.resolve().is_relative_to(root):
                    raise RunDirError(
                        f"{candidate}: a link to {os.readlink(candidate)}, outside the folder; replace it "
                        "with the file itself (cp -L) or remove it"
                    )


def check_safetensors(file: Path) -> None:
    """Refuse a file whose header is not valid safetensors or whose tensors run past its end (truncated)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(length))
        end = max(
            (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
            default=0,
        )
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise RunDirError(f"{file}: corrupt safetensors file ({exc}); train or merge again") from None
    if 8 + length + end > size:
        raise RunDirError(
            f"{file}: truncated ({size} bytes, its header describes {8 + length + end}); train or merge again"
        )
