"""DPO after SFT: TRL's DPOTrainer on preference pairs, in the same script, run folder and guarantees as SFT.

``train.method: dpo`` swaps three things in ``train.py`` and nothing else: the data (pairs, ``encode_pairs``:
rendered through the run's chat format exactly as SFT renders an answer), the arguments (``dpo_config``: the
very SFTConfig the run would train with, plus the DPO keys) and the trainer (``SafeDPOTrainer``).

The reference model is the SFT model. With ``model.adapter: SFT_RUN`` the policy starts as that run's adapter
(PEFT's ``default``, trainable) and TRL's DPOTrainer, given a PEFT model that already holds an adapter, adds a
frozen copy of it named ``ref`` and computes the reference log-probabilities with that adapter active: policy
and reference share the base weights, and at step 0 they are the same model (loss = log 2, rewards 0). The
reference is not the bare base with the adapter disabled, which makes a continued SFT adapter look already
far from its reference (LLaMA-Factory #8974). Without ``model.adapter`` a new adapter trains against the base.
Only ``default`` is saved: the run's adapter is an ordinary one that generate/eval/serve/merge load.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from sftbridge.data.pairs import EncodedPair, encode_pairs, load_pairs, pairs_prompt_format, sample_records
from sftbridge.errors import DataError
from sftbridge.training.answer_metrics import AnswerSample
from sftbridge.training.trainer import SafeTraining

if TYPE_CHECKING:
    from sftbridge.config import RunConfig
    from sftbridge.inference.folder import ModelFolder
    from sftbridge.training.train import TrainingData

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of a continued adapter
POLICY_ADAPTER = "default"


class SafeDPOTrainer(SafeTraining, DPOTrainer):
    """DPOTrainer with SafeTraining's guarantees, on pairs ``data.pairs`` already tokenized.

    One more private override: ``_prepare_dataset``, TRL's tokenization of prompt/chosen/rejected text, which
    would render the pairs a second way (TRL's own chat-template call, a BOS added by the tokenizer). Pairs
    come as ``prompt_ids``/``chosen_ids``/``rejected_ids`` (what that method itself produces), so it returns
    them as they are. ``tests/test_dpo.py`` checks the signature and the columns this relies on.
    """

    PRIVATE_OVERRIDES = (*SafeTraining.PRIVATE_OVERRIDES, "_prepare_dataset")

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset


def dpo_config(sft_args: Any, config: RunConfig) -> DPOConfig:
    """The run's SFTConfig (every shared training argument, device and precision settings included) as a
    DPOConfig, plus the ``train.dpo_*`` keys."""
    from transformers import TrainingArguments

    shared = {f.name: getattr(sft_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    # A pair is two sequences of different lengths: TRL's collator batches them, no length grouping.
    shared["train_sampling_strategy"] = "random"
    train = config.train
    return DPOConfig(
        **shared,
        max_length=config.data.max_length,  # longer pairs were dropped, or the collator cuts them (truncate)
        beta=train.dpo_beta,
        # RPO: the DPO loss plus alpha x the chosen answer's SFT loss (TRL's multi-loss form)
        loss_type=[train.dpo_loss_type, *(["sft"] if train.dpo_rpo_alpha is not None else [])],
        loss_weights=[1.0, train.dpo_rpo_alpha] if train.dpo_rpo_alpha is not None else None,
        label_smoothing=train.dpo_label_smoothing,
        ld_alpha=train.dpo_ld_alpha,
        precompute_ref_log_probs=train.dpo_precompute_ref_log_probs,
    )


def prepare_pairs(
    config: RunConfig, tokenizer: Any, parent: ModelFolder | None
) -> tuple[TrainingData, AnswerSample | None]:
    """Pairs read, validated and encoded (train, validation) and the answer metrics' sample of them."""
    from sftbridge.training.train import TrainingData

    loaded = load_pairs(config.data, eval_strategy=config.train.eval_strategy)
    parent_format = parent.prompt_format if parent is not None else None
    prompt_format = pairs_prompt_format(config.data, loaded.format, tokenizer, parent_format)
    args = (prompt_format, tokenizer, config.data.max_length, config.data.over_length)
    train, train_report = encode_pairs(loaded.train, *args)
    validation, validation_report = encode_pairs(loaded.validation, *args)
    if not train:
        raise DataError(
            f"{config.data.train_file}: no pair left after data.over_length={config.data.over_length}"
        )
    log.info(
        "data: %d train / %d validation pairs (%s)", len(train), len(validation), prompt_format.chat_format
    )
    do_eval = bool(validation) and config.train.eval_strategy != "no"
    data = TrainingData(
        train=_as_dataset(train),
        eval=_as_dataset(validation) if do_eval else None,
        prompt_format=prompt_format,
        record={
            "sha256": loaded.sha256,
            "template_source": None,
            "pairs": True,
            "train": train_report.to_dict(),
            "validation": validation_report.to_dict(),
        },
    )
    sample = None
    if config.train.answer_metrics:
        source, records = ("validation", loaded.validation) if loaded.validation else ("train", loaded.train)
        chosen = sample_records(records, prompt_format, config.train.answer_metrics_samples, config.seed)
        # Scored against the chosen answer, asked exactly as training renders the pair's context.
        sample = AnswerSample(chosen, source, dataclasses.replace(prompt_format, format="messages"))
    return data, sample


def _as_dataset(pairs: list[EncodedPair]) -> Any:
    return Dataset.from_list(
        [
            {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
            for p in pairs
        ]
    )
