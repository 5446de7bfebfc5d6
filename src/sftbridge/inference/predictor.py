"""The one inference wrapper: load a run directory, format prompts exactly as training did, generate.

``generate``, ``eval`` (and the server, merge and deploy built on it) all go through :class:`Predictor`, so
there is no second copy of the prompt format anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sftbridge.config import GenerationSection
from sftbridge.data.formatting import Message, PromptFormat
from sftbridge.data.prompter import Prompter

log = logging.getLogger(__name__)
BASE = ""  # Predictor(adapter=BASE): the base of a model holding several adapters, all of them off


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finished: bool  # True when the model emitted EOS before max_new_tokens
    prompt_tokens: int


@dataclass
class Token:
    """One token as Text Generation Inference reports it."""

    id: int
    text: str  # decoded in context, so a word-initial token keeps its leading space
    logprob: float | None  # None for the first prompt token: nothing precedes it
    special: bool


@dataclass
class DetailedGeneration:
    """One answer with the per-token details of TGI's ``details`` (see :meth:`Predictor.generate_details`)."""

    text: str  # special tokens dropped, leading space and any stop sequence kept: TGI's generated_text
    tokens: list[Token]  # the generated tokens, EOS included when the model emitted it
    finish_reason: Literal["eos_token", "length", "stop_sequence"]
    seed: int | None  # the sampling seed; None for greedy decoding
    prompt_tokens: int
    prefill: list[Token]  # the prompt's tokens with their log-probabilities, when asked for


class Predictor:
    """A model (a base with a run's LoRA adapter, or merged weights), its tokenizer and its prompt format.

    Open a folder with :meth:`ModelFolder.open(path).predictor() <sftbridge.inference.folder.ModelFolder>`
    (or :meth:`from_run`). ``adapter`` names the adapter to generate with when the model holds several
    (``inference.adapters``: predictors that share one model), :data:`BASE` for none; None, the model as
    loaded."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompt_format: PromptFormat,
        generation: GenerationSection,
        *,
        adapter: str | None = None,
        in_training: bool = False,
    ):
        """``in_training``: the model is being trained meanwhile (answer metrics): generate under ``no_grad``,
        not ``inference_mode``, whose tensors FSDP would keep gathered into the next backward pass."""
        self.model = model
        self.adapter = adapter
        self.in_training = in_training
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.generation = generation
        self.tokenizer.padding_side = "left"  # decoder-only batches are padded on the left
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.prompter = Prompter(tokenizer, prompt_format)

    @classmethod
    def from_run(cls, path: str | Path, *, device: str = "auto") -> Predictor:
        """A run or merged folder, checked and loaded (:meth:`ModelFolder.predictor`)."""
        from sftbridge.inference.folder import ModelFolder

        return ModelFolder.open(path).predictor(device=device)

    def prompt(self, question: str | Sequence[Message]) -> str:
        """A question (or a chat history ending with the user) → the exact text the model continues."""
        if isinstance(question, str):
            return self.prompter.question(question)
        return self.prompter.chat(question)

    @contextlib.contextmanager
    def _generating(self) -> Iterator[None]:
        """Around every ``generate``: no autograd (``no_grad`` while the model trains, see ``in_training``;
        else ``inference_mode``) and this predictor's adapter active (a no-op with one adapter)."""
        import torch

        with torch.no_grad() if self.in_training else torch.inference_mode():
            if self.adapter == BASE:
                with self.model.disable_adapter():
                    yield
                return
            if self.adapter is not None and self.model.active_adapter != self.adapter:
                self.model.set_adapter(self.adapter, inference_mode=True)
            yield

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

    def _decoding(self, settings: GenerationSection) -> dict[str, Any]:
        """``model.generate`` arguments: greedy, or sampled with temperature/top-p/top-k."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "repetition_penalty": settings.repetition_penalty,
            "eos_token_id": self.tokenizer.eos_token_id,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or 0)
        return kwargs

    def _generate_batch(self, prompts: list[str], overrides: dict[str, Any]) -> list[Generation]:
        settings = self.generation.model_copy(update=overrides)
        # The prompt text already holds BOS (as the chat template writes it): add no second one.
        batch = self.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        kwargs = self._decoding(settings)
        with self._generating():
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

    def generate_details(
        self,
        prompt: str,
        *,
        stop: Sequence[str] = (),
        seed: int | None = None,
        prefill: bool = False,
        on_token: Callable[[Token], None] | None = None,
        **overrides: Any,
    ) -> DetailedGeneration:
        """Generate for one formatted prompt, with each token's log-probability (what TGI's details hold).

        Decoding is :meth:`generate`'s (same settings and overrides, stops at EOS). Besides: generation also
        stops once any of ``stop`` appears in the text; ``seed`` fixes sampling (a random one is drawn and
        reported otherwise); ``prefill`` adds the prompt tokens' log-probabilities (one more forward pass);
        ``on_token`` is called with each token as soon as it is chosen (streaming), and an exception it
        raises stops generation and propagates. Log-probabilities are those of the distribution sampled
        from, after temperature, top-k and top-p, as TGI reports them.
        """
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        settings = self.generation.model_copy(update=overrides)
        prompt_ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if settings.do_sample:
            seed = random.getrandbits(63) if seed is None else seed
            torch.manual_seed(seed)  # callers serialize generation, so the global generator is ours
        else:
            seed = None
        tracker = _TokenTracker(self.tokenizer, prompt_ids, list(stop), on_token)
        kwargs = self._decoding(settings)
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        with self._generating():
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                # Custom processors run after the built-in ones: these are the scores sampled from.
                logits_processor=LogitsProcessorList([tracker]),
                stopping_criteria=StoppingCriteriaList([tracker.stop_sequence_seen] if stop else []),
                streamer=tracker,
                **kwargs,
            )
            prefill_tokens = self._prefill(input_ids) if prefill else []
        new_ids = [token.id for token in tracker.tokens]
        text = tracker.text(new_ids)
        finish: Literal["eos_token", "length", "stop_sequence"] = "length"
        if new_ids and new_ids[-1] == self.tokenizer.eos_token_id:
            finish = "eos_token"
        elif any(sequence in text for sequence in stop):
            finish = "stop_sequence"
        return DetailedGeneration(text, tracker.tokens, finish, seed, len(prompt_ids), prefill_tokens)

    def generate_details_batch(
        self, prompts: Sequence[str], *, abandoned: Callable[[], bool] | None = None, **overrides: Any
    ) -> list[DetailedGeneration]:
        """:meth:`generate_details` for several formatted prompts in one left-padded batch, greedy only (no
        stop sequences, seed or prefill): the server's batched path. Each answer has the tokens, texts and
        log-probabilities :meth:`generate_details` gives it alone. ``abandoned`` is asked at every step:
        once it says True (no one waits for these answers any more) generation stops where it is."""
        import torch
        from transformers import StoppingCriteriaList

        settings = self.generation.model_copy(update=overrides)
        if settings.do_sample:
            raise ValueError("batched details are for greedy decoding")
        batch = self.tokenizer(list(prompts), add_special_tokens=False, padding=True, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        stop: list[Any] = []
        if abandoned is not None:

            def stop_if_abandoned(input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full(
                    (input_ids.shape[0],), abandoned(), dtype=torch.bool, device=input_ids.device
                )

            stop.append(stop_if_abandoned)
        with self._generating():
            output = self.model.generate(
                **batch,
                **self._decoding(settings),
                stopping_criteria=StoppingCriteriaList(stop),
                output_scores=True,
                return_dict_in_generate=True,
            )
        width = batch["input_ids"].shape[1]
        logprobs = torch.log_softmax(
            torch.stack(output.scores, dim=1).float(), dim=-1
        )  # [batch, step, vocab]
        results = []
        for row, mask in enumerate(batch["attention_mask"]):
            prompt_ids = batch["input_ids"][row][mask.bool()].tolist()
            new = output.sequences[row, width:].tolist()
            eos = self.tokenizer.eos_token_id
            new = new[: new.index(eos) + 1] if eos in new else new
            tracker = _TokenTracker(self.tokenizer, prompt_ids, [], None)
            tokens = []
            for step, token_id in enumerate(new):
                tracker.ids.append(token_id)
                logprob = float(logprobs[row, step, token_id])
                tokens.append(Token(token_id, tracker._token_text(), logprob, token_id in tracker.special))
            finish: Literal["eos_token", "length", "stop_sequence"] = (
                "eos_token" if new and new[-1] == eos else "length"
            )
            results.append(DetailedGeneration(tracker.text(new), tokens, finish, None, len(prompt_ids), []))
        return results

    def _prefill(self, input_ids: Any) -> list[Token]:
        """The prompt's tokens, each with its log-probability given the tokens before it."""
        import torch

        logits = self.model(input_ids=input_ids).logits[0, :-1].float()
        ids = input_ids[0].tolist()
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, input_ids[0, 1:, None])[:, 0].tolist()
        texts = self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
        special = set(self.tokenizer.all_special_ids)
        return [
            Token(i, text, None if k == 0 else logprobs[k - 1], i in special)
            for k, (i, text) in enumerate(zip(ids, texts, strict=True))
        ]


class _TokenTracker:
    """Follows one generation step by step: records the final scores (a logits processor), receives each
    chosen token (a streamer), decodes it in context, and checks the stop sequences (a stopping criterion).
    """

    CONTEXT = 5  # prompt tokens decoded before the first new one, so its leading space survives (as TGI)

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        stop: list[str],
        on_token: Callable[[Token], None] | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.prompt_length = len(prompt_ids)
        self.stop = stop
        self.on_token = on_token
        self.special = set(tokenizer.all_special_ids)
        self.tokens: list[Token] = []
        self.logprobs: dict[int, Any] = {}  # step -> log-softmax of that step's scores, until its token comes
        self.step = 0
        self.prompt_seen = False
        self.prefix_offset = max(len(prompt_ids) - self.CONTEXT, 0)
        self.read_offset = len(prompt_ids)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """The logits-processor protocol: keep this step's log-probabilities, change nothing.

        (A plain method, not a bound method's wrapper: transformers inspects its signature every step.)
        """
        import torch

        self.logprobs[self.step] = torch.log_softmax(scores[0].float(), dim=-1)
        self.step += 1
        return scores

    def stop_sequence_seen(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        seen = any(s in self.text(input_ids[0, self.prompt_length :].tolist()) for s in self.stop)
        return torch.full((input_ids.shape[0],), seen, dtype=torch.bool, device=input_ids.device)

    def text(self, new_ids: list[int]) -> str:
        """The generated text without special tokens, decoded after the prompt's last token (keeps a
        leading space, as TGI's generated_text does)."""
        context = self.ids[self.prompt_length - 1 : self.prompt_length]
        head = self.tokenizer.decode(context, skip_special_tokens=True)
        full = self.tokenizer.decode(context + new_ids, skip_special_tokens=True)
        return full[len(head) :] if full.startswith(head) else full

    # The streamer protocol of transformers' generate(): the prompt first, then one token per step.
    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        token_id = int(value.reshape(-1)[0])
        logprobs = self.logprobs.pop(len(self.tokens))
        self.ids.append(token_id)
        token = Token(token_id, self._token_text(), float(logprobs[token_id]), token_id in self.special)
        self.tokens.append(token)
        if self.on_token is not None:
            self.on_token(token)

    def end(self) -> None:
        self.logprobs.clear()

    def _token_text(self) -> str:
        """TGI's incremental decoding: the new token's text given a few tokens before it ("" while a
        multi-byte character is incomplete; it then comes with the token that completes it)."""
        before = self.tokenizer.decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=False
        )
        after = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""
