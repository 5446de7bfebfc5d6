"""Answer quality while it trains: greedy answers to a fixed sample of questions, scored, and a verdict.

At about ``train.answer_metrics_points`` evenly spaced steps (at every epoch's end when there are fewer
epochs) the adapter answers a fixed sample of questions (validation ones, or training ones when nothing is
held out), greedily, in the exact prompt format of training (``inference.predictor.Predictor``), scored
by ``sftbridge eval``'s own ``inference.evaluate.score``. The figures go through
``trainer.log`` as ``answer_exact_match``, ``answer_contains``, ``answer_mean_tokens``,
``answer_reference_tokens`` and ``answer_eos_rate``, so they land in metrics.jsonl, the progress output and
the trackers beside the loss. The base model (adapter disabled) is measured once, at the first point, as
``base_answer_*``: never before the first optimizer step, because a no-grad forward of a 4-bit model on the
CPU before training repacks its weights and spoils the gradients (STACK-NOTES).

At an evaluation the same figures are added to the eval metrics as ``eval_answer_*``, so
``train.metric_for_best_model`` can name them for early stopping and ``load_best_model_at_end``. At the end,
:func:`verdict` says whether the adapter learned its answers, and if not, why it likely did not and which
keys to change. The new-token budget is twice the longest reference answer (plus EOS): enough to see an
answer run long, little enough to keep the cost small (benchmarks/answer_metrics_overhead.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from transformers import EarlyStoppingCallback, TrainerCallback

from sftbridge.errors import ConfigError
from sftbridge.inference.evaluate import Case, answer_tokens, score
from sftbridge.inference.predictor import Predictor

if TYPE_CHECKING:
    from sftbridge.config import RunConfig
    from sftbridge.data.formatting import PromptFormat
    from sftbridge.data.loading import LoadedData, Record

log = logging.getLogger(__name__)

PREFIX = "answer_"
# sftbridge eval's metric → the key it is logged under.
KEYS = {
    "exact_match": "answer_exact_match",
    "contains": "answer_contains",
    "mean_answer_tokens": "answer_mean_tokens",
    "eos_rate": "answer_eos_rate",
}
REFERENCE_TOKENS = "answer_reference_tokens"
# The verdict's thresholds: answers this many times the reference length (and 2 tokens more) run "far longer";
# fewer than this share of answers ending at EOS "rarely stop".
LONG_RATIO = 2.0
MIN_EOS_RATE = 0.5

T = TypeVar("T")


@dataclass
class AnswerSample:
    """The fixed questions every measurement asks, and where they came from."""

    records: list[Record]
    source: str  # "validation" or "train"
    prompt_format: PromptFormat | None = None  # how its records read, when not the run's (DPO pairs: chat)


def sample_questions(config: RunConfig, loaded: LoadedData) -> AnswerSample | None:
    """Up to ``train.answer_metrics_samples`` records chosen by the seed; None when off or none to score."""
    if not config.train.answer_metrics or loaded.format not in ("qa", "template"):
        return None
    source, records = ("validation", loaded.validation) if loaded.validation else ("train", loaded.train)
    if not records:
        return None
    chosen = random.Random(config.seed).sample(
        range(len(records)), min(len(records), config.train.answer_metrics_samples)
    )
    return AnswerSample([records[i] for i in sorted(chosen)], source)


def schedule(max_steps: int, epochs: float, points: int) -> list[int]:
    """The steps that measure: ``points`` evenly spaced, or every epoch's end when there are fewer epochs."""
    n = min(points, max(1, math.ceil(epochs)), max_steps)
    return sorted({max(1, round(k * max_steps / n)) for k in range(1, n + 1)})


class AnswerMetrics(TrainerCallback):
    """Measures the sample at the scheduled steps (and evaluations) and logs it through the trainer."""

    def __init__(
        self, trainer: Any, sample: AnswerSample, prompt_format: PromptFormat, config: RunConfig
    ) -> None:
        from sftbridge.data.loading import to_example

        self.trainer = trainer
        self.source = sample.source
        self.points = config.train.answer_metrics_points
        self.batch_size = config.train.per_device_eval_batch_size
        tokenizer = trainer.processing_class
        with _padding_kept(tokenizer):  # the Predictor pads on the left; training's tokenizer stays as it was
            self.predictor = Predictor(
                trainer.model, tokenizer, prompt_format, config.generation, in_training=True
            )
        self.cases = []
        for record in sample.records:
            *history, answer = to_example(record, prompt_format).messages or []
            self.cases.append(Case(record.where, self.predictor.prompt(history), answer["content"].strip()))
        lengths = [answer_tokens(tokenizer, c.reference) for c in self.cases]
        self.reference_tokens = sum(lengths) / len(lengths)
        self.max_new_tokens = 2 * max(lengths) + 1  # + 1: room for EOS after an answer twice the longest
        self.steps: list[int] = []
        self.base: dict[str, float] | None = None
        self.last: tuple[int, dict[str, float]] | None = None  # (step, figures) of the newest measurement
        self.final: dict[str, float] | None = None  # the saved adapter's figures, set at the end of training
        self.seconds = 0.0  # wall time spent measuring: the overhead, beside the run's train_runtime

    # ---- the trainer's events ----------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps = schedule(state.max_steps, state.num_train_epochs, self.points)
        # A resumed run measured the base already: its figures are in the restored log history.
        for entry in state.log_history:
            if "base_answer_exact_match" in entry:
                self.base = {key: entry[f"base_{key}"] for key in KEYS.values()}
                self.base[REFERENCE_TOKENS] = self.reference_tokens

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self.steps:
            self._measure_and_log(state)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Adds ``eval_answer_*`` to the evaluation's metrics, where early stopping and the best-model choice
        (which run after this callback) read ``metric_for_best_model``."""
        wanted = (args.metric_for_best_model or "").removeprefix("eval_").startswith(PREFIX)
        if wanted and (self.last is None or self.last[0] != state.global_step):
            self._measure_and_log(state)
        if self.last is not None and self.last[0] == state.global_step:
            kwargs["metrics"].update({f"eval_{key}": value for key, value in self.last[1].items()})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The figures of the adapter the run saves: the last measurement, or a new one when training stopped
        early or the best checkpoint was loaded."""
        best_loaded = args.load_best_model_at_end and state.best_model_checkpoint is not None
        if self.last is not None and self.last[0] == state.global_step and not best_loaded:
            self.final = self.last[1]
        else:
            self.final = self._measure(base=False)

    # ---- measuring -----------------------------------------------------------------------------------------
    def _measure_and_log(self, state: Any) -> None:
        logs: dict[str, float] = {}
        if self.base is None:
            self.base = self._measure(base=True)
            logs.update({f"base_{key}": value for key, value in self.base.items() if key != REFERENCE_TOKENS})
        figures = self._measure(base=False)
        self.last = (state.global_step, figures)
        # Trainer.log ends in on_log, which clears control.should_log: called from on_step_end, that would
        # drop the step's own loss line (and fold its loss into the next one). Keep the trainer's decision.
        # And log through transformers' Trainer.log, not TRL's: TRL's merges (and clears) the training
        # batches' metrics (num_tokens, token accuracy), which belong to the next loss line, not to these.
        from transformers import Trainer

        control = self.trainer.control
        should_log = control.should_log
        Trainer.log(self.trainer, {**figures, **logs})
        control.should_log = should_log

    def _measure(self, *, base: bool) -> dict[str, float]:
        """Greedy answers of the adapter (or the base), scored; computed on rank 0, shared with every rank.
        Under FSDP every rank generates the same answers: each forward pass gathers the layers' shards from
        all ranks, so a rank generating alone would wait forever for the others."""
        started = time.perf_counter()
        if self.trainer.is_fsdp_enabled:
            figures = self._score(base)
        else:
            figures = _on_rank_zero(lambda: self._score(base))
        self.seconds += time.perf_counter() - started
        return figures

    def _score(self, base: bool) -> dict[str, float]:
        import torch

        model = self.predictor.model
        was_training = model.training
        model.eval()  # no dropout; gradient checkpointing is only active in train mode
        try:
            with torch.no_grad(), _padding_kept(self.predictor.tokenizer):
                self.predictor.tokenizer.padding_side = "left"
                with self.predictor.base_model() if base else contextlib.nullcontext():
                    generations = self.predictor.generate(
                        [case.prompt for case in self.cases],
                        batch_size=self.batch_size,
                        do_sample=False,
                        max_new_tokens=self.max_new_tokens,
                    )
        finally:
            model.train(was_training)
        figures = {
            KEYS[name]: value
            for name, value in score(self.cases, generations, self.predictor.tokenizer).items()
        }
        figures[REFERENCE_TOKENS] = self.reference_tokens
        return figures


def keep_best_callbacks(config: RunConfig, *, do_eval: bool) -> list[TrainerCallback]:
    """transformers' EarlyStoppingCallback when ``train.early_stopping_patience`` is set; raises ConfigError
    when the run keeps the best or stops early but has no validation data to evaluate on."""
    wants = config.train.load_best_model_at_end or config.train.early_stopping_patience
    if wants and not do_eval:
        raise ConfigError(
            "train.load_best_model_at_end / train.early_stopping_patience need evaluations: hold out "
            "validation data (data.validation_file, or data.validation_split_ratio > 0)"
        )
    if config.train.early_stopping_patience is None:
        return []
    return [
        EarlyStoppingCallback(
            early_stopping_patience=config.train.early_stopping_patience,
            early_stopping_threshold=config.train.early_stopping_threshold,
        )
    ]


def best_model_record(config: RunConfig, state: Any) -> dict[str, Any]:
    """The manifest's account of keep-the-best: the metric, its best value and step, whether it was loaded."""
    return {
        "metric": config.train.metric_for_best_model,
        "best_metric": state.best_metric,
        "best_step": state.best_global_step,
        "load_best_model_at_end": config.train.load_best_model_at_end,
        "loaded_from": state.best_model_checkpoint if config.train.load_best_model_at_end else None,
        "early_stopping_patience": config.train.early_stopping_patience,
        "stopped_early": bool(config.train.early_stopping_patience) and state.global_step < state.max_steps,
    }


# ---- the verdict ---------------------------------------------------------------------------------------


@dataclass
class Verdict:
    learned: bool
    problems: list[str]
    message: str  # the warning, "" when it learned

    def to_dict(self) -> dict[str, Any]:
        return {"learned": self.learned, "problems": self.problems}


def verdict(
    base: dict[str, float],
    final: dict[str, float],
    *,
    config: RunConfig,
    steps: int,
    n: int,
    source: str,
    epochs: float | None = None,
) -> Verdict:
    """Did the adapter learn its answers? No when its exact match is no better than the base model's, its
    answers run far longer than the references, or it rarely stops at EOS; the message names the figures,
    the likely causes and the keys to change."""
    exact, base_exact = final[KEYS["exact_match"]], base[KEYS["exact_match"]]
    tokens, reference = final[KEYS["mean_answer_tokens"]], final[REFERENCE_TOKENS]
    eos = final[KEYS["eos_rate"]]
    problems = []
    if exact <= base_exact and exact < 1.0:
        problems.append(f"exact match {exact:.0%} is no better than the base model's {base_exact:.0%}")
    if tokens > LONG_RATIO * reference and tokens > reference + 2:
        problems.append(f"answers run {tokens:.1f} tokens against {reference:.1f} in the references")
    if eos < MIN_EOS_RATE:
        problems.append(f"only {eos:.0%} of the answers stop at EOS")
    if not problems:
        return Verdict(True, [], "")
    t, lora = config.train, config.lora
    # train.max_steps ended the run before train.epochs did: that, not the epochs, is what limited it.
    cut = t.max_steps > 0 and steps >= t.max_steps and epochs is not None and epochs < t.epochs
    span = (
        f"stopped by train.max_steps={t.max_steps} after {epochs:.3g} of train.epochs={t.epochs:g}"
        if cut
        else f"over train.epochs={t.epochs:g}"
    )
    keys = [
        *(["train.max_steps (-1 trains every epoch)"] if cut else []),
        *(
            ["train.learning_rate (1e-3 to 2e-3 teaches a small model new facts)"]
            if t.learning_rate < 1e-3
            else []
        ),
        *(["train.epochs"] if not cut else []),
        *(["train.lr_scheduler=constant"] if not t.lr_scheduler.startswith("constant") else []),
        "lora.target_modules (every projection)",
        "lora.r",
        *(["lora.dropout=0"] if lora.dropout else []),
    ]
    message = (
        f"the adapter did not learn its answers: {'; '.join(problems)} "
        f"({n} {source} questions, greedy; exact match {exact:.0%} vs base {base_exact:.0%}, "
        f"{tokens:.1f} answer tokens vs {reference:.1f} reference, EOS rate {eos:.0%}).\n"
        f"  Likely causes: {steps} optimizer steps at train.learning_rate={t.learning_rate:g} "
        f"(train.lr_scheduler={t.lr_scheduler}, train.warmup_ratio={t.warmup_ratio:g}) {span}; "
        f"LoRA r={lora.r}, dropout {lora.dropout:g} on {', '.join(lora.target_modules)}.\n"
        f"  Keys to change: {', '.join(keys)}; configs/facts-small-model.yaml is a recipe that learns."
    )
    return Verdict(False, problems, message)


def answer_record(
    callback: AnswerMetrics, config: RunConfig, state: Any
) -> tuple[dict[str, Any], Verdict | None]:
    """The manifest's ``answer_metrics`` and the verdict, from a finished run's callback."""
    if callback.base is None or callback.final is None:
        return {"sample": len(callback.cases), "source": callback.source, "measured": False}, None
    result = verdict(
        callback.base,
        callback.final,
        config=config,
        steps=state.global_step,
        n=len(callback.cases),
        source=callback.source,
        epochs=state.epoch,
    )
    record = {
        "sample": len(callback.cases),
        "source": callback.source,
        "max_new_tokens": callback.max_new_tokens,
        "seconds": round(callback.seconds, 3),
        "steps": callback.steps,
        "base": callback.base,
        "final": callback.final,
        "verdict": result.to_dict(),
    }
    return record, result


@contextlib.contextmanager
def _padding_kept(tokenizer: Any) -> Iterator[None]:
    side = tokenizer.padding_side
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _on_rank_zero(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0 only, its result broadcast, so that every rank logs and decides alike."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return compute()
    box: list[Any] = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
