"""Answer-only loss stays correct with each speed option: TRL's real packing, collators and samplers (CPU).

For each option the first batch its dataloader yields is scored, and so is a plain padded batch of the same
examples: the two losses must agree, and every packed segment must carry its example's labels (the prompt at
-100) exactly.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import torch

from sftbridge.data.formatting import IGNORE_INDEX


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """The sample Q/A rows encoded by our pipeline, as train.py hands them to TRL."""
    from conftest import SAMPLE_TRAIN
    from sftbridge.config import load_config
    from sftbridge.data.formatting import resolve_chat_format
    from sftbridge.data.loading import encode_split, load_data
    from sftbridge.models.loading import load_tokenizer

    config = load_config(None, [f"data.train_file={SAMPLE_TRAIN}", "data.validation_split_ratio=0"])
    data = load_data(config.data, eval_strategy="no", with_test=False)
    tokenizer = load_tokenizer(config.model)
    prompt_format = data.prompt_format(resolve_chat_format("auto", tokenizer), None)
    items, _ = encode_split(data.train[:48], prompt_format, tokenizer, 128, "drop")
    return items


def make_trainer(encoded: list[Any], trainer_class: Any = None, **options: Any) -> Any:
    """An SFTTrainer with train.py's own arguments (``sft_config``), LoRA dropout off: deterministic losses.

    ``options`` are ``train.*`` settings (packing, padding_free, group_by_length).
    """
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    from sftbridge.config import ModelSection, load_config
    from sftbridge.models.loading import load_model, load_tokenizer, lora_config
    from sftbridge.training.train import sft_config

    set_seed(0)
    train_options = {"per_device_batch_size": 8, "group_by_length": False, **options}
    config = load_config(
        None,
        ["data.train_file=x.jsonl", "data.max_length=128", "seed=0", "lora.dropout=0", "lora.r=8"]
        + [f"train.{key}={json.dumps(value)}" for key, value in train_options.items()],
    )
    args = sft_config(config, output_dir="unused", device="cpu", precision="fp32", do_eval=False)
    assert args.use_cpu and not args.bf16 and not args.gradient_checkpointing  # what the CPU losses need
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded])
    return (trainer_class or SFTTrainer)(
        model=load_model(ModelSection(attn_implementation="sdpa"), "cpu", "fp32"),
        args=args,
        train_dataset=dataset,
        processing_class=load_tokenizer(ModelSection()),
        peft_config=lora_config(config),
    )


def first_batch(trainer: Any) -> dict[str, torch.Tensor]:
    return dict(next(iter(trainer.get_train_dataloader())))


def examples_in(batch: dict[str, torch.Tensor], encoded: list[Any]) -> list[tuple[Any, list[int]]]:
    """(example, labels it carries in the batch) for each example in a padded or flattened batch."""
    by_ids = {tuple(e.input_ids): e for e in encoded}
    found = []
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        if "position_ids" in batch:  # flattened: a segment starts where the positions restart at 0
            starts = [i for i, p in enumerate(batch["position_ids"][row].tolist()) if p == 0] + [len(ids)]
            spans = list(itertools.pairwise(starts))
        else:
            spans = [(0, int(batch["attention_mask"][row].sum()))]
        for start, end in spans:
            found.append((by_ids[tuple(ids[start:end])], labels[start:end]))
    return found


def loss(trainer: Any, batch: dict[str, torch.Tensor]) -> float:
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


@pytest.fixture(scope="module")
def plain(encoded: list[Any]) -> Any:
    return make_trainer(encoded)


@pytest.mark.parametrize(
    "options",
    [{"packing": True}, {"padding_free": True}, {"group_by_length": True}],
    ids=["packing", "padding_free", "group_by_length"],
)
def test_first_step_loss_matches_the_plain_run(
    encoded: list[Any], plain: Any, options: dict[str, Any]
) -> None:
    trainer = make_trainer(encoded, **dict(options))
    batch = first_batch(trainer)
    members = examples_in(batch, encoded)
    assert len(members) >= 8
    for example, labels in members:
        # Every prompt token (and the first token of a segment, which has no previous token) stays -100.
        assert labels == [IGNORE_INDEX, *example.labels[1:]]
        assert sum(label != IGNORE_INDEX for label in labels) > 0
    if "packing" in options:
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # padding-free rows
    # The same examples, padded the plain way, through the same model and loss.
    padded = plain.data_collator([{"input_ids": e.input_ids, "labels": e.labels} for e, _ in members])
    assert loss(trainer, batch) == pytest.approx(loss(plain, padded), rel=1e-4)


def test_packed_rows_keep_examples_apart(encoded: list[Any], plain: Any) -> None:
    """Remove the segment boundaries of a packed row and the loss changes: attention really is per example."""
    trainer = make_trainer(encoded, packing=True)
    batch = first_batch(trainer)
    joined = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    joined.pop("cu_seq_lens_q", None), joined.pop("cu_seq_lens_k", None)
    assert abs(loss(trainer, joined) - loss(trainer, batch)) > 1e-3


def test_group_by_length_batches_similar_lengths(encoded: list[Any], plain: Any) -> None:
    grouped = examples_in(first_batch(make_trainer(encoded, group_by_length=True)), encoded)
    lengths = sorted(len(e.input_ids) for e, _ in grouped)
    everything = sorted(len(e.input_ids) for e in encoded)
    assert lengths[-1] - lengths[0] <= everything[-1] - everything[0]
    assert lengths[-1] == everything[-1]  # transformers puts the longest batch first (an early OOM)


def test_train_accepts_padding_free(tiny_config: Any, tmp_path: Any) -> None:
    from sftbridge.training.train import train

    run = train(tiny_config(train__padding_free=True, train__max_steps=1), tmp_path / "run")
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def losses_of_a_run(config: Any, run_dir: Any) -> list[float]:
    from sftbridge.training.train import train

    run = train(config, run_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row and "step" in row]


@pytest.mark.parametrize(
    "option",
    [{"train__gradient_checkpointing": True}, {"model__attn_implementation": "eager"}],
    ids=["gradient_checkpointing", "eager_attention"],
)
def test_option_keeps_the_training_losses(tiny_config: Any, tmp_path: Any, option: dict[str, Any]) -> None:
    """Three real optimizer steps with the option on and off: same losses, step by step (dropout off).

    Recomputing the forward (checkpointing) or another attention kernel must not change what is learned.
    """
    common = {"train__max_steps": 3, "lora__dropout": 0.0, "model__attn_implementation": "sdpa"}
    plain = losses_of_a_run(tiny_config(**common), tmp_path / "plain")
    changed = losses_of_a_run(tiny_config(**{**common, **option}), tmp_path / "changed")
    assert len(plain) == 3
    assert changed == pytest.approx(plain, rel=1e-4)


def test_length_grouped_order_is_fixed_by_seed_and_epoch(encoded: list[Any]) -> None:
    """Same (seed, epoch), same batches, whatever the global RNG did before: what resuming relies on."""
    from sftbridge.training.trainer import EpochSeededLengthGroupedSampler, SafeSFTTrainer

    lengths = [len(e.input_ids) for e in encoded]
    first = EpochSeededLengthGroupedSampler(8, lengths, seed=42)
    order = list(first)
    torch.manual_seed(1234)  # a different global RNG state, as after a restart
    again = EpochSeededLengthGroupedSampler(8, lengths, seed=42)
    assert list(again) == order
    again.set_epoch(1)
    assert list(again) != order and sorted(again) == sorted(order)

    trainer = make_trainer(encoded, SafeSFTTrainer, group_by_length=True)
    assert isinstance(trainer._get_train_sampler(), EpochSeededLengthGroupedSampler)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "option",
    [{"train__use_liger_kernel": True}, {"train__optim": "paged_adamw_8bit"}],
    ids=["liger", "paged_adamw_8bit"],
)
def test_gpu_option_keeps_the_training_losses(
    tiny_config: Any, tmp_path: Any, option: dict[str, Any]
) -> None:
    """The CUDA-only options, on and off, three steps in fp32 (dropout off).

    Liger's fused linear cross-entropy must give the same answer-only loss; 8-bit AdamW changes the updates,
    not the loss, so its first step (before any update) must match and the rest stay close.
    """
    if "train__use_liger_kernel" in option:
        pytest.importorskip("liger_kernel")
    common = {
        "train__max_steps": 3,
        "lora__dropout": 0.0,
        "train__device": "cuda",
        "train__precision": "fp32",
        "model__attn_implementation": "sdpa",
    }
    plain = losses_of_a_run(tiny_config(**common), tmp_path / "plain")
    changed = losses_of_a_run(tiny_config(**{**common, **option}), tmp_path / "changed")
    assert len(changed) == len(plain) == 3
    if "train__optim" in option:
        assert changed[0] == pytest.approx(plain[0], rel=1e-5)
        assert changed == pytest.approx(plain, rel=0.05)
    else:
        assert changed == pytest.approx(plain, rel=1e-3)
