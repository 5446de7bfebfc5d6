"""The one inference wrapper: load a run directory, format prompts exactly as training did, generate.

``generate``, ``eval`` (and the server, merge and deploy built on it) all go through :class:`Predictor`, so
there is no second copy of the prompt format anywhere.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftbridge.config import GenerationSection, RunConfig
from sftbridge.formatting import Message, PromptFormat
from sftbridge.runs import ADAPTER, load_manifest

log = logging.getLogger(__name__)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finished: bool  # True when the model emitted EOS before max_new_tokens
    prompt_tokens: int


class Predictor:
    """A base model with a run's LoRA adapter, its tokenizer and its prompt format."""

    def __init__(
        self, model: Any, tokenizer: Any, prompt_format: PromptFormat, generation: GenerationSection
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.generation = generation
        self.tokenizer.padding_side = "left"  # decoder-only batches are padded on the left
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto") -> Predictor:
        from peft import PeftModel

        from sftbridge.modeling import load_model, resolve_device, resolve_precision

        run_dir = Path(run_dir)
        manifest = load_manifest(run_dir)
        config = RunConfig.model_validate(manifest["config"])
        if device != "auto":
            config.train.device = device  # type: ignore[assignment]
        target = resolve_device(config.train)
        base = load_model(config.model, target, resolve_precision(config.train, target))
        if target == "cuda" and not config.model.load_in_4bit:
            base = base.to("cuda")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run_dir / ADAPTER)
        model = PeftModel.from_pretrained(base, run_dir / ADAPTER)
        model.eval()
        return cls(model, tokenizer, PromptFormat.from_dict(manifest["prompt_format"]), config.generation)

    def prompt(self, question: str | Sequence[Message]) -> str:
        """A question (or a chat history ending with the user) → the exact text the model continues."""
        messages = (
            self.prompt_format.question_to_messages(question) if isinstance(question, str) else list(question)
        )
        return self.prompt_format.render_prompt(self.tokenizer, messages)

    @contextlib.contextmanager
    def base_model(self) -> Iterator[None]:
        """Within this block the adapter is off: the base model answers (same prompts, same decoding)."""
        with self.model.disable_adapter():
            yield

    def generate(self, prompts: Sequence[str], batch_size: int = 16, **overrides: Any) -> list[Generation]:
        """Generate for formatted prompts (see :meth:`prompt`), stopping at EOS."""
        results: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            results.extend(self._generate_batch(list(prompts[start : start + batch_size]), overrides))
        return results

    def _generate_batch(self, prompts: list[str], overrides: dict[str, Any]) -> list[Generation]:
        import torch

        settings = self.generation.model_copy(update=overrides)
        # The prompt text already holds BOS (as the chat template writes it): add no second one.
        batch = self.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "repetition_penalty": settings.repetition_penalty,
            "eos_token_id": self.tokenizer.eos_token_id,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or 0)
        with torch.inference_mode():
            output = self.model.generate(**batch, **kwargs)
        width = batch["input_ids"].shape[1]
        generations = []
        for row, mask in zip(output, batch["attention_mask"], strict=True):
            new = row[width:].tolist()
            finished = self.tokenizer.eos_token_id in new
            if finished:
                new = new[: new.index(self.tokenizer.eos_token_id)]
            else:
                new = [t for t in new if t != self.tokenizer.pad_token_id]
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            generations.append(Generation(text, new, finished, int(mask.sum())))
        return generations
