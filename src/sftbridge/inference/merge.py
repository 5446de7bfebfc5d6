"""``sftbridge merge RUN --out DIR``: fold a run's LoRA adapter into its base (PEFT ``merge_and_unload``).

The output is a plain Hugging Face model folder (safetensors shards, config, generation config, tokenizer
with its chat template) that any server loads without PEFT (TGI on SageMaker, vLLM, ``sftbridge serve``),
plus ``sftbridge.json``: a small manifest with the run's prompt format and generation defaults, so the folder
is still served and prompted with the template the adapter was trained on.

Memory: the base is loaded unquantized, also for a QLoRA run (a 4-bit weight cannot absorb the LoRA delta),
at 2 bytes per parameter in bf16/fp16 (Llama-2-7B: ~13.5 GB) or 4 in fp32, the default on the CPU (~27 GB;
pass ``--dtype bfloat16`` to halve it), plus the adapter (megabytes). The merge happens in place and saving
writes one shard at a time, so the peak is about the model's size. A QLoRA adapter was trained against the
4-bit base: the merged 16-bit model answers close to, not bit-identically with, the 4-bit base + adapter.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from sftbridge.errors import UserError
from sftbridge.inference.folder import ModelFolder
from sftbridge.runs import (
    ADAPTER,
    AdapterRecord,
    MergedManifest,
    file_records,
    library_versions,
    require_empty,
    staged,
    write_manifest,
)

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def merge_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    max_shard_size: str = "5GB",
    trust_remote_code: bool = False,
) -> Path:
    """Merge a run's adapter into its (unquantized) base and save the result to ``out_dir``.

    Args:
        run_dir: a finished run directory.
        out_dir: where the merged model goes; must not exist or be empty.
        dtype: weights dtype; auto = fp32 on the CPU, the run's 16-bit precision on a GPU.
        device: where the merge runs (auto = cuda when available).
        max_shard_size: largest safetensors file, e.g. "5GB" (the Hugging Face Hub's usual size).
        trust_remote_code: let a run whose base needs its own code (``model.trust_remote_code``) run it.
    """
    from peft import PeftModel

    from sftbridge.models.loading import load_run_base

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    # every check generate does (a merged folder, or code to run without the user's say, refused)
    folder = ModelFolder.open(run_dir, trust_remote_code=trust_remote_code)
    manifest = folder.run
    require_empty(out_dir, f"--out {out_dir}", "folder", UserError)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    config = folder.loading_config
    # QLoRA or not, the adapter is merged into full-precision weights: a 4-bit weight cannot take the delta.
    base = load_run_base(config, device, unquantized=True, dtype=dtype)
    model = PeftModel.from_pretrained(base, run_dir / ADAPTER).merge_and_unload()
    weights_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    log.info("merged %s into %s (%s)", run_dir / ADAPTER, config.model.name_or_path, weights_dtype)

    with staged(out_dir, label=f"--out {out_dir}", choose="folder") as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        for code in staging.glob("*.py"):  # a trusted base's own modules: the merged folder carries no code
            code.unlink()
        folder.tokenizer().save_pretrained(staging)
        record = MergedManifest(
            run_name=manifest.run_name,
            source_run=str(run_dir.resolve()),
            base_model=manifest.base_model,
            qlora=config.model.load_in_4bit,
            adapter=AdapterRecord(
                r=config.lora.r, alpha=config.lora.alpha, target_modules=config.lora.target_modules
            ),
            dtype=weights_dtype,
            prompt_format=manifest.prompt_format,
            generation=manifest.generation,
            merged_at=datetime.now(timezone.utc).isoformat(),
            versions=library_versions(),
        )
        record.files = file_records(staging, staging)
        write_manifest(staging, record)
    return out_dir
