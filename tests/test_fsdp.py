"""FSDP2 (``train.fsdp``): the arguments it builds, the refusals before it starts, and real 2-process runs on
the CPU (gloo) against DDP: the same losses, resume to the same adapter, an adapter that loads."""

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SAMPLE_TRAIN
from sftbridge.errors import ConfigError
from sftbridge.runs import load_manifest
from sftbridge.training import fsdp

RUN_FILES = {"COMPLETE", "adapter", "config.yaml", "metrics.jsonl", "report.html", "sftbridge.json"}


def test_fsdp2_arguments_wrap_the_decoder_layer(tiny_config: Any) -> None:
    """FSDP2 through TrainingArguments: the model's own decoder layer wrapped, FSDP's activation
    checkpointing instead of transformers' (both on raises), full state dicts, no FSDP1-only keys."""
    from sftbridge.models.loading import load_model
    from sftbridge.training.train import sft_config

    config = tiny_config(train__fsdp=True, train__gradient_checkpointing=True)
    layers = fsdp.decoder_layers(load_model(config.model, "cpu", "fp32"))
    assert layers == ["LlamaDecoderLayer"]
    args = sft_config(
        config, output_dir="out", device="cpu", precision="fp32", do_eval=False, fsdp_layers=layers
    )
    plugin = args.fsdp_plugin_args
    assert args.fsdp is True and args.activation_checkpointing is False
    assert plugin["fsdp_version"] == 2
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["activation_checkpointing"] is True
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["cpu_ram_efficient_loading"] is True and "cpu_offload" not in plugin
    fsdp1_only = {"use_orig_params", "sync_module_states", "forward_prefetch", "backward_prefetch"}
    assert not fsdp1_only & set(plugin)  # FSDP2 would ignore them without a word

    qlora = tiny_config(train__fsdp=True, train__fsdp_offload=True, model__load_in_4bit=True)
    settings = fsdp.training_arguments(qlora, layers)["fsdp_config"]
    assert settings["cpu_offload"] is True
    assert settings["cpu_ram_efficient_loading"] is False  # accelerate skips it for 4-bit weights anyway
    assert (
        sft_config(tiny_config(), output_dir="out", device="cpu", precision="fp32", do_eval=False).fsdp
        is None
    )


def test_qlora_under_fsdp_stores_4bit_weights_in_bf16(tiny_config: Any) -> None:
    """accelerate shards a 4-bit weight only when its storage is a float dtype; the load dtype matches it."""
    from sftbridge.models.loading import load_model

    config = tiny_config(train__fsdp=True, model__load_in_4bit=True)
    assert fsdp.loading(config).dtype == "bfloat16"
    model = load_model(fsdp.loading(config), "cpu", "fp32", quant_storage=fsdp.quant_storage(config))
    packed = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    assert packed and {p.dtype for p in packed} == {torch.bfloat16}
    assert fsdp.quant_storage(tiny_config(model__load_in_4bit=True)) is None  # without FSDP: uint8, as before


@pytest.mark.parametrize(
    ("overrides", "world_size", "device", "precision", "names"),
    [
        ({}, 1, "cuda", "bf16", "backend.num_processes"),
        ({"train__fsdp_offload": True}, 2, "cpu", "fp32", "train.fsdp_offload=false"),
        ({"model__load_in_4bit": True}, 2, "cuda", "fp16", "bf16"),
        ({"model__load_in_4bit": True, "model__dtype": "float16"}, 2, "cuda", "bf16", "model.dtype=auto"),
    ],
    ids=["one-process", "offload-on-the-cpu", "qlora-without-bf16", "qlora-in-fp16"],
)
def test_combinations_that_cannot_shard_are_refused_in_one_line(
    tiny_config: Any, overrides: dict[str, Any], world_size: int, device: str, precision: str, names: str
) -> None:
    config = tiny_config(train__fsdp=True, **overrides)
    with pytest.raises(ConfigError) as error:
        fsdp.check(config, world_size=world_size, device=device, precision=precision)
    assert names in str(error.value) and "\n" not in str(error.value)


def test_without_fsdp_nothing_is_checked(tiny_config: Any) -> None:
    fsdp.check(tiny_config(model__load_in_4bit=True), world_size=1, device="cuda", precision="fp16")


def test_one_local_process_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """`sftbridge train ... train.fsdp=true` without backend.num_processes: one line at once, no run folder
    (not after torch and the data have loaded in a child process)."""
    from conftest import cli

    run_dir = tmp_path / "run"
    result = cli("train", "configs/tiny-cpu.yaml", "train.fsdp=true", "--run-dir", str(run_dir))
    assert result.returncode != 0
    assert "train.fsdp shards the model across processes but this run has 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not run_dir.exists() and not list(tmp_path.iterdir())


def test_offload_without_fsdp_is_a_config_error(tiny_config: Any) -> None:
    with pytest.raises(ConfigError, match=r"train\.fsdp_offload: .*set train\.fsdp=true"):
        tiny_config(train__fsdp_offload=True)


def test_a_model_without_a_named_decoder_layer_is_refused() -> None:
    with pytest.raises(ConfigError, match="does not name its decoder layer"):
        fsdp.decoder_layers(torch.nn.Linear(2, 2))


def test_accelerate_still_drops_fsdp_on_the_cpu() -> None:
    """``fsdp.shard_on_cpu`` turns FSDP on where accelerate keeps its plugin only for GPU-like devices. When
    this fails, accelerate keeps FSDP under MULTI_CPU (or moved the decision): drop the workaround."""
    from accelerate.state import AcceleratorState

    source = inspect.getsource(AcceleratorState.__init__)
    branch = source.split("elif self.distributed_type in [", 1)[1].split("]", 1)[0]
    assert "DistributedType.MULTI_GPU" in branch and "MULTI_CPU" not in branch
    assert "self.fsdp_plugin = fsdp_plugin" in source.split("elif self.distributed_type in [", 1)[1]


# ---- 2 processes under torchrun on the CPU (gloo) ----------------------------------------------------------
STEPS = 6  # 32 examples / (2 ranks x 16 per batch): one optimizer step per epoch


def torchrun_train(cwd: Path, *overrides: str) -> Path:
    """``sftbridge train configs/tiny-cpu.yaml backend.num_processes=2 ...`` on 32 pairs, STEPS steps."""
    train_file = cwd / "train.jsonl"
    if not train_file.exists():
        train_file.write_text("".join(SAMPLE_TRAIN.read_text().splitlines(keepends=True)[:32]))
    run_dir = cwd / "run"
    command = [
        sys.executable,
        "-m",
        "sftbridge.cli",
        "-v",  # the libraries' warnings too: accelerate's about 4-bit weights it leaves unsharded
        "train",
        str(ROOT / "configs" / "tiny-cpu.yaml"),
        f"data.train_file={train_file}",
        "data.test_file=null",
        f"train.epochs={STEPS}",
        "train.logging_steps=1",
        "train.save_steps=2",
        "train.save_total_limit=3",  # checkpoint-2 stays: the resume test starts from it
        "train.answer_metrics_points=2",
        "train.answer_metrics_samples=8",
        f"train.checkpoint_dir={cwd / 'checkpoints'}",  # kept after the run: the resume test starts from one
        "backend.num_processes=2",
        *overrides,
        "--run-dir",
        str(run_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (cwd / "output.txt").write_text(result.stdout + result.stderr)
    return run_dir


def records(run: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return torchrun_train(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return torchrun_train(tmp_path_factory.mktemp("fsdp"), "train.fsdp=true")


# FSDP reduce-scatters each layer's fp32 gradients and DDP all-reduces flat buckets of them: the same sums
# added in another order and grouping (and divided by the world size at another point), so gradients differ
# by float32 rounding (~1e-7 relative; the logged grad norms differ in the 7th digit). Adam normalises each
# step by the gradient's own scale, so those differences grow only slowly over a few steps; measured after 6
# steps: losses within 1.5e-7 relative, adapter weights within 3.4e-6 absolute (of weights up to ~0.1). The
# tolerances below are ~30-60x that: a real difference (a layer left unsharded and unreduced, a rank training
# on other data, a wrong average) moves the loss by far more than 1e-4 from the first steps on.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_saves_an_ordinary_adapter(ddp_run: Path, fsdp_run: Path) -> None:
    manifest = load_manifest(fsdp_run).model_dump(mode="json")
    assert manifest["device"]["world_size"] == 2 and manifest["config"]["train"]["fsdp"] is True
    assert {p.name for p in fsdp_run.iterdir()} == RUN_FILES
    sharded, replicated = records(fsdp_run, "loss"), records(ddp_run, "loss")
    assert len(sharded) == len(replicated) == STEPS
    torch.testing.assert_close(sharded, replicated, rtol=LOSS_RTOL, atol=0.0)
    assert sharded[-1] < sharded[0]
    # answer metrics were measured on every rank (a rank generating alone would hang FSDP's gathers)
    assert records(fsdp_run, "answer_exact_match") == records(ddp_run, "answer_exact_match")

    # The adapter is an ordinary PEFT adapter of whole tensors (gathered, not one rank's shards)
    first, second = adapter(ddp_run), adapter(fsdp_run)
    assert first.keys() == second.keys()
    for name in first:
        assert second[name].shape == first[name].shape
        torch.testing.assert_close(second[name], first[name], rtol=0.0, atol=WEIGHT_ATOL)
    from sftbridge.inference.predictor import Predictor

    predictor = Predictor.from_run(fsdp_run, device="cpu")
    assert predictor.generate([predictor.prompt([{"role": "user", "content": "What is water?"}])])


@pytest.mark.slow
def test_fsdp_resumes_from_a_checkpoint_to_the_same_adapter(fsdp_run: Path) -> None:
    """The same command, left with the checkpoint of step 2 only (FSDP's full state dict, optimizer included),
    resumes to the adapter of the uninterrupted run: the same reductions in the same order."""
    uninterrupted = adapter(fsdp_run)
    shutil.rmtree(fsdp_run)
    for later in ("checkpoint-4", "checkpoint-6"):
        shutil.rmtree(fsdp_run.parent / "checkpoints" / later)
    resumed = torchrun_train(fsdp_run.parent, "train.fsdp=true")
    assert load_manifest(resumed).model_dump(mode="json")["resumed_from"].endswith("checkpoint-2")
    again = adapter(resumed)
    for name in uninterrupted:
        torch.testing.assert_close(again[name], uninterrupted[name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_qlora_under_fsdp_shards_the_4bit_weights_and_its_adapter_loads(tmp_path: Path) -> None:
    """bitsandbytes' 4-bit weights stored in bf16 are sharded like any other (accelerate warns about each
    one it has to leave whole); the adapter is an ordinary one over a 4-bit base."""
    run = torchrun_train(tmp_path, "train.fsdp=true", "model.load_in_4bit=true", "train.answer_metrics=false")
    assert "Params4bit" not in (tmp_path / "output.txt").read_text()
    values = records(run, "loss")
    assert len(values) == STEPS and all(value == value for value in values)  # finite, every step
    from sftbridge.inference.predictor import Predictor

    predictor = Predictor.from_run(run, device="cpu")
    assert "Linear4bit" in {type(m).__name__ for m in predictor.model.modules()}
    assert predictor.generate([predictor.prompt([{"role": "user", "content": "What is water?"}])])
