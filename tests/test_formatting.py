"""The prompt format: Llama-2-chat gets exactly <s>[INST] {question} [/INST] {answer} </s>."""

from typing import Any

import pytest

from sftbridge.data.formatting import IGNORE_INDEX, Example, FormatError, PromptFormat

QUESTION = "Bones, cartilage, and ligaments make up what anatomical system?"
ANSWER = "skeletal system"


def qa_example(fmt: PromptFormat) -> Example:
    return Example("t", messages=fmt.record_to_messages({"question": QUESTION, "correct_answer": ANSWER}))


def trained_text(tokenizer: Any, encoded: Any) -> str:
    return str(
        tokenizer.decode(
            [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
        )
    )


def test_llama2_qa_renders_exactly(tokenizer: Any) -> None:
    fmt = PromptFormat("qa", "chat_template")
    encoded = fmt.encode(tokenizer, qa_example(fmt))
    assert encoded.text == f"<s>[INST] {QUESTION} [/INST] {ANSWER} </s>"
    assert (
        encoded.input_ids.count(tokenizer.bos_token_id) == 1
        and encoded.input_ids[0] == tokenizer.bos_token_id
    )
    assert encoded.input_ids[-1] == tokenizer.eos_token_id and encoded.labels[-1] == tokenizer.eos_token_id
    # Loss on the answer only: every prompt token is -100, every answer token is trained.
    prompt_ids = tokenizer(fmt.render_prompt(tokenizer, qa_example(fmt).messages), add_special_tokens=False)
    n_prompt = len(prompt_ids["input_ids"])
    assert encoded.input_ids[:n_prompt] == prompt_ids["input_ids"]  # inference sees the same prefix
    assert set(encoded.labels[:n_prompt]) == {IGNORE_INDEX}
    assert encoded.labels[n_prompt:] == encoded.input_ids[n_prompt:]
    assert trained_text(tokenizer, encoded).startswith(ANSWER)


def test_inference_prompt_is_the_training_prefix(tokenizer: Any) -> None:
    fmt = PromptFormat("qa", "chat_template")
    assert fmt.render_prompt(tokenizer, fmt.question_to_messages(QUESTION)) == f"<s>[INST] {QUESTION} [/INST]"


def test_system_prompt_goes_into_the_first_turn(tokenizer: Any) -> None:
    fmt = PromptFormat("qa", "chat_template", system_prompt="Answer briefly.")
    text, _ = fmt.render(tokenizer, qa_example(fmt))
    assert text == f"<s>[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\n{QUESTION} [/INST] {ANSWER} </s>"


def test_multi_turn_trains_every_assistant_turn(tokenizer: Any) -> None:
    fmt = PromptFormat("messages", "chat_template")
    messages = [
        {"role": "user", "content": "What is H2O?"},
        {"role": "assistant", "content": "water"},
        {"role": "user", "content": "And NaCl?"},
        {"role": "assistant", "content": "salt"},
    ]
    encoded = fmt.encode(tokenizer, Example("t", messages=messages))
    assert encoded.text == "<s>[INST] What is H2O? [/INST] water </s><s>[INST] And NaCl? [/INST] salt </s>"
    spans = [encoded.text[a:b] for a, b in encoded.trained_spans]
    assert spans == [" water </s>", " salt </s>"]
    assert encoded.labels.count(tokenizer.eos_token_id) == 2


def test_template_fills_fields(tokenizer: Any) -> None:
    from sftbridge.config import Template

    fmt = PromptFormat("template", "chat_template", Template(prompt="Q: {q} ({topic})", completion="{a}"))
    encoded = fmt.encode(
        tokenizer, Example("t", messages=fmt.record_to_messages({"q": "Why?", "topic": "x", "a": "y"}))
    )
    assert encoded.text == "<s>[INST] Q: Why? (x) [/INST] y </s>"
    # A bare question fills the template's single field... only when it has one.
    assert fmt.question_to_messages("Hi")[-1]["content"] == "Hi"


def test_plain_format_without_chat_template(tokenizer: Any) -> None:
    fmt = PromptFormat("qa", "plain")
    encoded = fmt.encode(tokenizer, qa_example(fmt))
    assert encoded.text == f"<s>Question: {QUESTION}\nAnswer: {ANSWER}</s>"
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1
    assert encoded.labels[-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, encoded).startswith(ANSWER)
    assert (
        fmt.render_prompt(tokenizer, fmt.question_to_messages(QUESTION))
        == f"<s>Question: {QUESTION}\nAnswer:"
    )


def test_plain_text_is_trained_whole(tokenizer: Any) -> None:
    fmt = PromptFormat("text", "chat_template")
    encoded = fmt.encode(tokenizer, Example("t", text="Cells divide by mitosis."))
    assert encoded.text == "<s>Cells divide by mitosis.</s>"
    assert encoded.labels[0] == IGNORE_INDEX  # BOS is context
    assert all(label != IGNORE_INDEX for label in encoded.labels[1:])


def test_multi_turn_without_chat_template_is_refused(tokenizer: Any) -> None:
    fmt = PromptFormat("messages", "plain")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    with pytest.raises(FormatError, match="chat template"):
        fmt.encode(tokenizer, Example("t", messages=messages))


def test_manifest_round_trip() -> None:
    from sftbridge.config import Template

    fmt = PromptFormat("template", "plain", Template(prompt="{x}", completion="{y}"), "sys")
    assert PromptFormat.from_record(fmt.to_record()) == fmt


def test_chat_history_gets_the_system_prompt_once(tokenizer: Any) -> None:
    fmt = PromptFormat("messages", "chat_template", system_prompt="Be brief.")
    history = [{"role": "user", "content": "What is H2O?"}]
    with_system = fmt.with_system(history)
    assert with_system[0] == {"role": "system", "content": "Be brief."}
    assert fmt.with_system(with_system) == with_system
    assert fmt.render_prompt(tokenizer, with_system).startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>")
