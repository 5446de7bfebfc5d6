"""What a training run shows while it runs: a progress bar on a terminal, one line per log otherwise, and
``metrics.jsonl`` written as the trainer logs.

``Progress`` replaces transformers' ``PrinterCallback`` (a raw dict per log). On a TTY it draws one tqdm bar:
step/total, epoch, loss, learning rate, non-pad tokens/s and ETA; evaluation results are written above it.
Elsewhere (SageMaker/CloudWatch, CI, a pipe) it prints one line per log, never a bar::

    [train] step=20/150 epoch=0.67 loss=2.346 lr=9.87e-05 grad_norm=1.23 tokens/s=5432 eta=0:01:23
    [eval] step=30/150 epoch=1 eval_loss=2.1 eval_runtime=0.41 ...

Any other key the trainer logs (``mean_token_accuracy``, ``answer_exact_match``, ...) follows as
``key=value``; ``backends.sagemaker.spec.METRIC_DEFINITIONS`` are the SageMaker regexes that chart these
lines.

Whether the *user's* terminal is a TTY: the local backend pipes this process's output to its own, so it sets
``SFTBRIDGE_TTY=1`` (or ``0``) from its own stdout; without that variable, this process's stderr decides.

Tokens/s is TRL's ``num_tokens`` (non-pad tokens, all ranks) over wall time since the previous log; TRL
counts from zero in each process, so a resumed run measures only its own steps, as it should.
"""

from __future__ import annotations

import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sftbridge.environment import TTY
from sftbridge.runs import MetricsLog

TOKENS_PER_SECOND = "tokens_per_second"

# The fields every train line starts with, in order: (log key, name on the line).
TRAIN_FIELDS = (
    ("loss", "loss"),
    ("learning_rate", "lr"),
    ("grad_norm", "grad_norm"),
    # DPO (TRL's names): the implicit rewards of the chosen and rejected answers, their margin, and the
    # share of pairs where the chosen one wins
    ("rewards/chosen", "reward_chosen"),
    ("rewards/rejected", "reward_rejected"),
    ("rewards/margins", "margin"),
    ("rewards/accuracies", "reward_acc"),
)
# Keys not repeated on a line: counters, and the fields shown above under their own names.
HIDDEN = {"epoch", "step", "total_flos", "num_tokens", "eval_num_tokens", "num_input_tokens_seen"}
# DPO's mean raw logits of the answers' tokens say nothing a user acts on (the log-probabilities, shown, do:
# falling logps/chosen is the chosen answer unlearned); metrics.jsonl and the trackers keep them.
HIDDEN |= {f"{split}logits/{answer}" for split in ("", "eval_") for answer in ("chosen", "rejected")}


def terminal_is_tty() -> bool:
    """True when the user watches on a terminal: ``SFTBRIDGE_TTY`` if set, else whether stderr is a TTY."""
    value = os.environ.get(TTY)
    if value is not None:
        return value.strip().lower() in ("1", "true", "yes")
    return sys.stderr.isatty()


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4g}"


def _eta(seconds: float | None) -> str:
    return str(timedelta(seconds=round(seconds))) if seconds is not None else "?"


class Progress(TrainerCallback):
    """The bar (on a TTY) or the lines (elsewhere), and ``metrics.jsonl`` as each log happens.

    Args:
        metrics_path: where the live ``metrics.jsonl`` goes (appended, one flushed line per log); None = none.
        tty: draw a bar; None = ``terminal_is_tty()``.
    """

    def __init__(self, metrics_path: Path | None = None, *, tty: bool | None = None) -> None:
        self.metrics = MetricsLog(metrics_path) if metrics_path is not None else None
        self.tty = terminal_is_tty() if tty is None else tty
        self.bar: Any = None
        self._started = 0.0
        self._first_step = 0
        self._last: tuple[float, float] = (0.0, 0.0)  # (time, num_tokens) at the previous train log
        self._logged = ""  # the bar's postfix from the last training log

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = time.time()
        self._first_step = state.global_step  # > 0 when resumed from a checkpoint
        self._last = (self._started, 0.0)
        if self.tty and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix_now(state), refresh=False)
            self.bar.update(state.global_step - self.bar.n)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = dict(logs)
        now = time.time()
        if "loss" in record and "num_tokens" in record:  # a training log
            then, tokens_then = self._last
            tokens = float(record["num_tokens"])
            if now > then and tokens >= tokens_then:
                record[TOKENS_PER_SECOND] = round((tokens - tokens_then) / (now - then), 1)
            self._last = (now, tokens)
        if self.metrics is not None:
            self.metrics.write({"time": round(now, 3), "step": state.global_step, **record})
        line = self.format(record, state, now)
        if self.bar is not None:
            if "loss" in record:
                self._logged = f"{self._postfix(record)} (step {state.global_step})"
                self.bar.set_postfix_str(self._postfix_now(state), refresh=True)
            else:
                self.bar.write(line, file=sys.stderr)
        else:
            print(line, flush=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def eta_seconds(self, state: Any, now: float) -> float | None:
        done = state.global_step - self._first_step
        if done <= 0 or not state.max_steps:
            return None
        return (now - self._started) / done * max(state.max_steps - state.global_step, 0)

    def format(self, record: dict[str, Any], state: Any, now: float) -> str:
        """One compact line: ``[train]``/``[eval]``/``[metrics]``/``[done]``, step, epoch, the fields (and
        the ETA, for training)."""
        if "train_runtime" in record:
            kind = "done"  # the trainer's summary at the end of train()
        elif "loss" in record:
            kind = "train"
        else:  # an evaluation, or metrics another callback logs on their own (answer_* while training)
            kind = "eval" if any(k.startswith("eval_") for k in record) else "metrics"
        parts = [f"[{kind}]", f"step={state.global_step}/{state.max_steps}"]
        if "epoch" in record:
            parts.append(f"epoch={_number(round(float(record['epoch']), 2))}")
        shown = set(HIDDEN)
        if kind == "train":
            for key, name in TRAIN_FIELDS:
                if key in record:
                    parts.append(f"{name}={_number(record[key])}")
                    shown.add(key)
            if TOKENS_PER_SECOND in record:
                parts.append(f"tokens/s={record[TOKENS_PER_SECOND]:.0f}")
            shown.add(TOKENS_PER_SECOND)
        parts += [f"{key}={_number(value)}" for key, value in record.items() if key not in shown]
        if kind == "train":
            parts.append(f"eta={_eta(self.eta_seconds(state, now))}")
        return " ".join(parts)

    def _postfix_now(self, state: Any) -> str:
        """The epoch moves every step, the loss only when logged: the postfix says which step it is from."""
        return f"epoch={float(state.epoch or 0):.2f} {self._logged}".strip()

    def _postfix(self, record: dict[str, Any]) -> str:
        """The last logged loss and throughput (the epoch is the bar's own, updated every step)."""
        shown = ("loss", "learning_rate", "rewards/margins")
        parts = [
            f"{name}={_number(record[key])}" for key, name in TRAIN_FIELDS if key in shown and key in record
        ]
        if TOKENS_PER_SECOND in record:
            parts.append(f"tok/s={record[TOKENS_PER_SECOND]:.0f}")
        return " ".join(parts)
