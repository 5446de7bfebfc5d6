"""Several runs' adapters on one base, loaded once: what ``sftbridge serve A B`` serves.

Teams train one adapter per task or customer on one base. :func:`load_adapters` loads the base once, puts
every run's adapter on it under its own name (PEFT's ``load_adapter(path, adapter_name)``), and gives one
:class:`~sftbridge.inference.predictor.Predictor` per adapter, plus one for the base with the adapters
off, named ``<first>-base`` (the name vLLM's launch options give it too). The predictors share the model:
each one activates its adapter before it generates, so callers must serialize generation (the server's one
model thread does) and batch only requests of the same predictor.

Runs are refused, each named, unless they share the base, its revision and how it loads (4-bit or not, dtype):
the adapter of another base would load without an error and answer nonsense.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from sftbridge.errors import RunDirError
from sftbridge.runs import ADAPTER

if TYPE_CHECKING:
    from sftbridge.inference.folder import ModelFolder
    from sftbridge.inference.predictor import Predictor

BASE_SUFFIX = "-base"


def base_name(names: list[str]) -> str:
    """The name the base is served under: the first adapter's name + ``-base``."""
    return names[0] + BASE_SUFFIX


def check_shared_base(folders: Mapping[str, ModelFolder]) -> None:
    """RunDirError naming the runs that are merged folders or were trained on another base, revision or
    loading than the first."""
    merged = [f"{name}={folder.path}" for name, folder in folders.items() if folder.is_merged]
    if merged:
        raise RunDirError(
            f"{', '.join(merged)}: merged folders have no adapter to share a base with; serve a merged "
            "folder alone, or give the run directories"
        )
    (first_name, first), *rest = folders.items()
    expected = _base_key(first)
    others = [
        f"{name}={folder.path} ({_describe(_base_key(folder))})"
        for name, folder in rest
        if _base_key(folder) != expected
    ]
    if others:
        raise RunDirError(
            f"{'; '.join(others)}: trained on another base than {first_name}={first.path} "
            f"({_describe(expected)}); adapters share one server only on the same base: serve those apart"
        )
    names = list(folders)
    if base_name(names) in folders:
        raise RunDirError(
            f"{base_name(names)}: the name the base is served under; name that run otherwise (NAME=RUN)"
        )


def _base_key(folder: ModelFolder) -> tuple[str, str | None, bool, str]:
    base = folder.manifest.base_model
    return (base.name_or_path, base.revision, base.load_in_4bit, folder.run_config.model.dtype)


def _describe(key: tuple[str, str | None, bool, str]) -> str:
    name, revision, four_bit, dtype = key
    return f"base {name}, revision {revision or 'unpinned'}, {'4-bit' if four_bit else dtype}"


def served_predictors(folders: Mapping[str, ModelFolder], *, device: str = "auto") -> dict[str, Predictor]:
    """What ``serve`` serves for ``name -> folder``: a merged folder given alone as is, under its name; runs'
    adapters on their shared base (:func:`load_adapters`)."""
    if len(folders) == 1:
        ((name, folder),) = folders.items()
        if folder.is_merged:
            return {name: folder.predictor(device=device)}
    return load_adapters(folders, device=device)


def load_adapters(folders: Mapping[str, ModelFolder], *, device: str = "auto") -> dict[str, Predictor]:
    """Predictors for ``name -> run folder`` (in that order), then ``<first>-base``, sharing one model."""
    from peft import PeftModel

    from sftbridge.inference.predictor import BASE, Predictor

    check_shared_base(folders)
    names = list(folders)
    first = folders[names[0]]
    model = PeftModel.from_pretrained(first.load_base(device), first.path / ADAPTER, adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name].path / ADAPTER, adapter_name=name)
    model.eval()
    predictors = {
        name: Predictor(model, folder.tokenizer(), folder.prompt_format, folder.generation, adapter=name)
        for name, folder in folders.items()
    }
    _check_same_vocabulary(folders, predictors)
    predictors[base_name(names)] = Predictor(
        model, first.tokenizer(), first.prompt_format, first.generation, adapter=BASE
    )
    return predictors


def _check_same_vocabulary(folders: Mapping[str, ModelFolder], predictors: Mapping[str, Predictor]) -> None:
    """One embedding matrix serves every run: a tokenizer that added tokens would index past it."""
    sizes = {name: len(predictor.tokenizer) for name, predictor in predictors.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}={folders[name].path}: {size}" for name, size in sizes.items())
        raise RunDirError(f"the runs' tokenizers differ in size ({listed}); serve them apart")
