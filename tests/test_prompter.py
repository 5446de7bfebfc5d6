"""The one prompt path at inference: a raw prompt that holds the run's template is normalised to exactly what
training rendered, for Llama-2's template (the built-in tokenizer), ChatML and the plain format."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sftbridge.config import Template
from sftbridge.data.formatting import PromptFormat
from sftbridge.data.prompter import Prompter

QUESTION = "What gas do plants take in?"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def llama2(tokenizer: Any) -> Prompter:
    return Prompter(tokenizer, PromptFormat("qa", "chat_template"))


def test_the_seeds_form_and_its_variants_render_as_training_did(llama2: Prompter) -> None:
    trained = llama2.question(QUESTION)
    assert trained == f"<s>[INST] {QUESTION} [/INST]"
    for given in (
        f"<s>[INST] {QUESTION} [/INST] ",  # the seed's payload
        f"<s>[INST] {QUESTION} [/INST]\n\n",
        f"<s>[INST]   {QUESTION}\t[/INST]",
        f"[INST] {QUESTION} [/INST] ",  # without BOS
        trained,
    ):
        assert llama2.raw(given) == trained, given
    assert llama2.raw(QUESTION) == trained  # a plain question goes through the template


def test_a_prompt_with_its_own_system_prompt_keeps_it_and_gets_the_end_back(llama2: Prompter) -> None:
    own = f"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{QUESTION} [/INST]"
    assert llama2.raw(own + "  ") == own
    assert llama2.raw(own) == own
    assert llama2.raw(own.removeprefix("<s>") + " ") == own  # BOS back too
    other = "<s>something else entirely"  # starts like a prompt, no template end: left as written
    assert llama2.raw(other) == other


def test_the_template_and_system_prompt_of_the_run_are_part_of_the_frame(tokenizer: Any) -> None:
    fmt = PromptFormat(
        "qa", "chat_template", Template(prompt="Answer briefly: {question}", completion=" {a}"), "S"
    )
    prompter = Prompter(tokenizer, fmt)
    trained = prompter.question(QUESTION)
    assert "Answer briefly: " in trained and "S" in trained
    assert prompter.raw(trained + " ") == trained


def test_chatml_gets_exactly_one_newline_after_assistant(tokenizer: Any) -> None:
    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = CHATML
    prompter = Prompter(chatml, PromptFormat("qa", "chat_template"))
    trained = prompter.question(QUESTION)
    assert trained.endswith("<|im_start|>assistant\n")
    for given in (trained, trained.rstrip("\n"), trained + "\n", trained + " \n"):
        assert prompter.raw(given) == trained, repr(given)
    system = f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
    assert prompter.raw(system + "<|im_start|>assistant") == system + "<|im_start|>assistant\n"


def test_plain_format_drops_whitespace_after_answer(tokenizer: Any) -> None:
    prompter = Prompter(tokenizer, PromptFormat("qa", "plain"))
    trained = prompter.question(QUESTION)
    assert trained == f"<s>Question: {QUESTION}\nAnswer:"
    assert prompter.raw(trained + " ") == trained
    assert prompter.raw(f"Question: {QUESTION}\nAnswer: ") == trained


def test_completions_are_text_to_continue(llama2: Prompter) -> None:
    """OpenAI completions continue the text as written (a trailing space is the user's), after BOS."""
    assert llama2.completion("Once upon a time ") == "<s>Once upon a time "
    assert llama2.completion("<s>[INST] q [/INST] ") == "<s>[INST] q [/INST] "
