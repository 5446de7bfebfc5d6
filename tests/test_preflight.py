"""Pre-flight: every config value and every run folder is checked before anything heavy loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli, run_cli

CONFIG = str(ROOT / "configs" / "tiny-cpu.yaml")
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "bitsandbytes")


def test_committed_names_equal_transformers_own() -> None:
    """hf_names keeps copies, so a config is checked without importing transformers; they must not drift."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from sftbridge import hf_names

    for ours, theirs, name in (
        (hf_names.OPTIMIZERS, tuple(o.value for o in OptimizerNames), "OPTIMIZERS"),
        (hf_names.LR_SCHEDULERS, tuple(s.value for s in SchedulerType), "LR_SCHEDULERS"),
        (
            hf_names.ATTN_IMPLEMENTATIONS,
            ("eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()),
            "ATTN_IMPLEMENTATIONS",
        ),
    ):
        assert set(ours) == set(theirs), f"update sftbridge/hf_names.py: {name} = {theirs!r}"


@pytest.mark.parametrize(
    ("override", "key", "nearest"),
    [
        ("train.optim=adamw_torchh", "train.optim", "adamw_torch"),
        ("train.optim=paged_adamw_8bits", "train.optim", "paged_adamw_8bit"),
        ("train.lr_scheduler=cosin", "train.lr_scheduler", "cosine"),
        ("model.attn_implementation=flash_attn_2", "model.attn_implementation", "flash_attention_2"),
        ("model.attn_implementation=sdp", "model.attn_implementation", "sdpa"),
    ],
)
def test_a_typo_is_refused_with_the_nearest_name(override: str, key: str, nearest: str) -> None:
    from sftbridge.config import load_config
    from sftbridge.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, [override])
    line = next(line for line in str(info.value).splitlines() if line.strip().startswith(key))
    assert f"did you mean {nearest!r}?" in line


def test_valid_names_and_hub_kernels_pass() -> None:
    from sftbridge.config import load_config

    config = load_config(
        CONFIG,
        [
            "train.optim=paged_adamw_8bit",
            "train.lr_scheduler=cosine_with_min_lr",
            "model.attn_implementation=kernels-community/flash-attn2",
        ],
    )
    assert config.model.attn_implementation == "kernels-community/flash-attn2"
    assert load_config(CONFIG, ["model.attn_implementation=eager"]).model.attn_implementation == "eager"


def test_checking_a_config_imports_nothing_heavy() -> None:
    probe = (
        "import sys\nfrom sftbridge.config import load_config\n"
        f"load_config({CONFIG!r}, ['train.optim=adamw_torch'])\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv",
    [
        ["train", CONFIG, "train.optim=adamw_torchh"],
        ["train", CONFIG, "--backend", "sagemaker", "--dry-run", "train.lr_scheduler=cosin"],
        ["plan", CONFIG, "model.attn_implementation=flash_attn_2"],
    ],
    ids=["train", "sagemaker-dry-run", "plan"],
)
def test_every_command_refuses_a_typo_at_once(argv: list[str], tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_cli(*argv, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert "did you mean" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, no run folder, nothing
    assert elapsed < 15  # ~1 s alone; generous for a loaded 2-core CI machine (no model, no torch)


def test_warmup_ratio_is_a_share_of_the_steps(tiny_config: object) -> None:
    """sft_config passes warmup_ratio as warmup_steps: transformers 5 reads a value < 1 as a ratio."""
    from sftbridge.training.train import sft_config

    config = tiny_config(train__warmup_ratio=0.1)  # type: ignore[operator]
    args = sft_config(config, output_dir="unused", device="cpu", precision="fp32", do_eval=False)
    assert args.get_warmup_steps(100) == 10
    assert args.get_warmup_steps(7) == 1  # ceil(0.7)


@pytest.fixture
def finished_run(short_run: Path, tmp_path: Path) -> Path:
    """A copy of the session's short run that a test may damage."""
    return Path(shutil.copytree(short_run, tmp_path / "run"))


def quick(*argv: str) -> subprocess.CompletedProcess[str]:
    """A command that must answer before torch is imported: timed, so that a regression shows."""
    started = time.monotonic()
    result = run_cli(*argv)
    assert time.monotonic() - started < 15, "answered only after the heavy imports"
    return result


@pytest.mark.slow
def test_run_folder_problems_are_one_line_before_heavy_imports(finished_run: Path) -> None:
    half = finished_run.parent / "half"
    shutil.copytree(finished_run, half)
    (half / "COMPLETE").unlink()
    for command in (("generate", str(half), "Why?"), ("eval", str(half))):
        result = quick(*command)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: {half}: the run did not finish (no COMPLETE marker); train again or resume it"
        ]

    weights = finished_run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = quick("generate", str(finished_run), "Why?")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {weights}: truncated"), result.stderr

    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    result = quick("eval", str(finished_run), "--limit", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {weights}: corrupt safetensors file")


def test_generate_and_eval_accept_a_merged_folder(short_run: Path, tmp_path: Path) -> None:
    from conftest import SAMPLE_TEST

    merged = tmp_path / "merged"
    assert cli("merge", str(short_run), "--out", str(merged)).returncode == 0
    question = json.loads(SAMPLE_TEST.read_text().splitlines()[0])["question"]
    evaluate = ["eval", str(merged), "--data", str(SAMPLE_TEST), "--limit", "2", "--device", "cpu"]
    from_run = cli("generate", str(short_run), question, "--device", "cpu")
    from_merged = cli("generate", str(merged), question, "--device", "cpu")
    evaluated = cli(*evaluate, "--json", str(tmp_path / "eval.json"))
    assert from_merged.returncode == 0, from_merged.stderr[-2000:]
    assert from_merged.stdout == from_run.stdout  # the same answer, prompted with the same template
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert (tmp_path / "eval.json").is_file()
