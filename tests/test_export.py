"""`sftbridge export RUN --format gguf`: a GGUF that independent readers (transformers' GGUF loader, gguf's
GGUFReader, llama.cpp itself when llama-cpp-python is installed) read back as the merged model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import SAMPLE_TRAIN, SHORT_RUN_PAIRS, cli

pytest.importorskip("gguf")

# The questions short_run answers exactly (it knows nothing else), and their reference answers.
SAMPLES = [json.loads(line) for line in SAMPLE_TRAIN.read_text().splitlines()[:SHORT_RUN_PAIRS]]
QUESTIONS = [sample["question"] for sample in SAMPLES]


@pytest.fixture(scope="module")
def merged(short_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sftbridge.inference.merge import merge_run

    return merge_run(short_run, tmp_path_factory.mktemp("export") / "merged", device="cpu")


@pytest.fixture(scope="module")
def merged_predictor(merged: Path) -> Any:
    from sftbridge.inference.folder import ModelFolder

    return ModelFolder.open(merged).predictor(device="cpu")


@pytest.fixture(scope="module")
def merged_answers(merged_predictor: Any) -> list[str]:
    return [g.text for g in merged_predictor.generate([merged_predictor.prompt(q) for q in QUESTIONS])]


def gguf_predictor(file: Path, merged: Path) -> Any:
    """The GGUF as transformers loads it (dequantised to fp32), with the tokenizer built from the file alone,
    prompted through the run's prompt format (read from the merged folder's manifest)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftbridge.inference.folder import ModelFolder
    from sftbridge.inference.predictor import Predictor

    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    folder = ModelFolder.open(merged)
    return Predictor(model.eval(), tokenizer, folder.prompt_format, folder.generation)


def test_run_exports_to_a_gguf_that_transformers_answers_as_the_merged_model(
    short_run: Path, merged: Path, merged_predictor: Any, merged_answers: list[str], tmp_path: Path
) -> None:
    import torch
    from gguf import GGMLQuantizationType, GGUFReader

    from sftbridge.inference.folder import ModelFolder

    out = tmp_path / "gguf"
    result = cli("export", str(short_run), "--format", "gguf", "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "tiny-cpu-f16.gguf"]  # the merge is gone
    file = out / "tiny-cpu-f16.gguf"
    assert f"gguf: {file}" in result.stdout.splitlines()
    assert not list(tmp_path.glob(".*partial"))
    assert "Unknown separator" not in result.stderr  # gguf's reader's warning about the pair template

    # The metadata, as llama.cpp's own reader sees it.
    reader = GGUFReader(file)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    prompter = ModelFolder.open(short_run).prompter
    tokenizer = prompter.tokenizer
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.chat_template"] == prompter.chat_template() == tokenizer.chat_template
    eos = fields["tokenizer.ggml.eos_token_id"]
    assert eos == tokenizer.eos_token_id and fields["tokenizer.ggml.tokens"][eos] == "</s>"
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is True
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == GGMLQuantizationType.F16

    # transformers' GGUF loader (dequantising, un-permuting q/k) answers every question as the merged model.
    predictor = gguf_predictor(file, merged)
    prompts = [predictor.prompt(q) for q in QUESTIONS]
    answers = [g.text for g in predictor.generate(prompts)]
    assert answers == merged_answers == [sample["correct_answer"] for sample in SAMPLES]
    # The same ids give the same logits, to f16 rounding (a q/k permutation gone wrong shows here, not in
    # the answers of a model that memorised them).
    ids = merged_predictor.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        got, expected = predictor.model(**ids).logits, merged_predictor.model(**ids).logits
    mask = ids["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=0.05, rtol=0)
    # The tokenizer rebuilt from the file's tokens and scores splits text as the run's (questions and
    # answers). Right after a special token it differs: transformers' rebuilt Llama tokenizer adds no "▁"
    # there, the run's and llama.cpp's do, so its prompts read "<s>[INST]" where the run's read "<s>▁[INST]"
    # (the answers above agree all the same).
    texts = QUESTIONS + [sample["correct_answer"] for sample in SAMPLES] + ["naïve 🦙  tabs\tand\nlines"]
    assert [predictor.tokenizer(t).input_ids for t in texts] == [tokenizer(t).input_ids for t in texts]


def test_merged_folder_exports_to_q8_0(merged: Path, merged_answers: list[str], tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFReader

    out = tmp_path / "q8"
    result = cli("export", str(merged), "--quant", "q8_0", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    file = out / "tiny-cpu-q8_0.gguf"
    types = {t.name: t.tensor_type for t in GGUFReader(file).tensors}
    assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == GGMLQuantizationType.F32
    # 8-bit blocks: about 1.06 bytes per weight; the tiny model's memorised answers survive the rounding.
    assert file.stat().st_size < 0.6 * sum(f.stat().st_size for f in merged.glob("*.safetensors")) / 2
    predictor = gguf_predictor(file, merged)
    assert [g.text for g in predictor.generate([predictor.prompt(q) for q in QUESTIONS])] == merged_answers


def test_modelfile_names_the_gguf_the_stop_token_and_the_runs_generation_defaults(merged: Path) -> None:
    from sftbridge.inference.export import modelfile
    from sftbridge.inference.folder import ModelFolder

    folder = ModelFolder.open(merged)
    text = modelfile(folder.prompter, folder.generation, name="tiny-cpu", gguf_name="tiny-cpu-f16.gguf")
    assert text.splitlines() == [
        "# ollama create tiny-cpu -f Modelfile",
        "FROM ./tiny-cpu-f16.gguf",  # no TEMPLATE: Ollama reads the embedded Llama-2 chat template
        'PARAMETER stop "</s>"',
        "PARAMETER num_predict 24",  # configs/tiny-cpu.yaml's generation.max_new_tokens
        "PARAMETER temperature 0",  # greedy, as the run generates
        "PARAMETER repeat_penalty 1.0",
    ]


def test_modelfile_template_where_training_wrapped_the_question(tokenizer: Any) -> None:
    """A JumpStart-style template around the question, or a model trained without its chat template: what
    Ollama's chat template would not add is a TEMPLATE (BOS left to llama.cpp); sampling parameters too."""
    from sftbridge.config import GenerationSection, Template
    from sftbridge.data.formatting import PromptFormat
    from sftbridge.data.prompter import Prompter
    from sftbridge.inference.export import modelfile

    sampling = GenerationSection(do_sample=True, temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=64)
    wrapped = PromptFormat("template", "chat_template", Template(prompt="Briefly: {q}", completion=" {a}"))
    lines = modelfile(Prompter(tokenizer, wrapped), sampling, name="n", gguf_name="n.gguf").splitlines()
    assert lines[2] == 'TEMPLATE "[INST] Briefly: {{ .Prompt }} [/INST]"'
    assert lines[4:] == [
        "PARAMETER num_predict 64",
        "PARAMETER temperature 0.7",
        "PARAMETER top_p 0.9",
        "PARAMETER top_k 40",
        "PARAMETER repeat_penalty 1.0",
    ]
    plain = modelfile(
        Prompter(tokenizer, PromptFormat("qa", "plain", None, "Be brief.")),
        GenerationSection(),
        name="n",
        gguf_name="n.gguf",
    )
    assert 'TEMPLATE """Be brief.\n\nQuestion: {{ .Prompt }}\nAnswer:"""' in plain
    assert "SYSTEM" not in plain  # the system prompt is in the template already


def test_unsupported_architecture_is_refused_in_one_line(merged: Path, tmp_path: Path) -> None:
    from sftbridge.errors import UserError
    from sftbridge.inference.gguf_file import write_gguf

    folder = tmp_path / "gpt2"
    shutil.copytree(merged, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError) as refused:
        write_gguf(folder, tmp_path / "x.gguf")
    assert str(refused.value) == (
        f"{folder / 'config.json'}: architectures ['GPT2LMHeadModel']: GGUF export supports "
        "LlamaForCausalLM only"
    )
    assert not (tmp_path / "x.gguf").exists()


def test_interrupted_export_leaves_nothing(
    merged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sftbridge.inference import export

    real_write = export.write_gguf

    def write_then_interrupt(*args: Any, **kwargs: Any) -> None:
        real_write(*args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C after the GGUF, before the Modelfile

    monkeypatch.setattr(export, "write_gguf", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export.export_folder(merged, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    again = cli("export", str(merged), "--out", str(tmp_path / "out"))
    assert again.returncode == 0, again.stderr[-2000:]
    taken = cli("export", str(merged), "--out", str(tmp_path / "out"))
    assert taken.returncode == 2
    assert f"error: --out {tmp_path / 'out'}: already exists and is not empty; choose another folder" in (
        taken.stderr.splitlines()
    )


@pytest.mark.slow  # trains a 4-bit run (~10 s on 2 cores)
def test_qlora_run_with_a_system_prompt_exports_its_16_bit_merge(tiny_config: Any, tmp_path: Path) -> None:
    """A QLoRA adapter is merged into the unquantized base before export (a 4-bit weight cannot take it),
    and the run's system prompt travels in the embedded chat template and the Modelfile's SYSTEM."""
    pytest.importorskip("bitsandbytes")
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from sftbridge.inference.export import export_folder
    from sftbridge.inference.folder import ModelFolder
    from sftbridge.inference.merge import merge_run
    from sftbridge.training.train import train

    config = tiny_config(
        model__load_in_4bit=True, train__max_steps=4, data__system_prompt="Answer in a few words."
    )
    run = train(config, tmp_path / "qlora")
    exported = export_folder(run, tmp_path / "gguf", device="cpu")
    merged = merge_run(run, tmp_path / "merged", device="cpu")

    gguf_model = AutoModelForCausalLM.from_pretrained(
        exported.gguf.parent, gguf_file=exported.gguf.name, dtype=torch.float32
    )
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    prompter = ModelFolder.open(run).prompter
    ids = prompter.tokenizer(prompter.question(QUESTIONS[0]), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        got, expected = gguf_model(**ids).logits, reference(**ids).logits
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)  # f16 rounding of fp32 merged weights

    template = GGUFReader(exported.gguf).fields["tokenizer.chat_template"].contents()
    assert template == prompter.chat_template() and "Answer in a few words." in template
    assert 'SYSTEM "Answer in a few words."' in exported.modelfile.read_text().splitlines()


@pytest.mark.llama_cpp
@pytest.mark.slow  # llama.cpp on 2 shared cores: 1-20 s
def test_llama_cpp_answers_through_the_embedded_chat_template(
    merged: Path, merged_answers: list[str], tmp_path: Path
) -> None:
    """llama.cpp itself: its tokenizer splits the run's prompts into the run's ids, its logits are the merged
    model's (to f16 rounding: 0.011 measured; without the q/k permutation 2.8, the answers unchanged),
    and its chat completion, formatted by the GGUF's own chat template, answers as the merged model."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (a source build; README, Export)"
    )
    import numpy as np
    import torch

    from sftbridge.inference.export import export_folder
    from sftbridge.inference.folder import ModelFolder

    exported = export_folder(merged, tmp_path / "gguf")
    llm = llama_cpp.Llama(
        model_path=str(exported.gguf), n_ctx=512, n_threads=2, logits_all=True, seed=0, verbose=False
    )
    predictor = ModelFolder.open(merged).predictor(device="cpu")
    try:
        for question in QUESTIONS:
            prompt = predictor.prompt(question)
            ids = predictor.tokenizer(prompt, add_special_tokens=False).input_ids
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
            llm.reset()
            llm.eval(ids)
            with torch.no_grad():
                expected = predictor.model(torch.tensor([ids])).logits[0].numpy()
            np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), expected, atol=0.05, rtol=0)
        answers = [
            llm.create_chat_completion(
                messages=[{"role": "user", "content": question}], temperature=0.0, max_tokens=24
            )["choices"][0]["message"]["content"]
            for question in QUESTIONS
        ]
        assert llm.chat_format == "chat_template.default"  # the GGUF's template, not a built-in format
        assert [answer.strip() for answer in answers] == merged_answers
    finally:
        llm.close()


@pytest.mark.llama_cpp
@pytest.mark.slow  # llama.cpp on 2 shared cores: 1-20 s
def test_llama2_vocabulary_tokenizes_in_llama_cpp_as_its_sentencepiece_scores_do(tmp_path: Path) -> None:
    """Llama-2's real 32k vocabulary, written from its tokenizer.json (merges, no SentencePiece scores):
    llama.cpp splits llama.cpp's own tokenizer test texts and the sample questions exactly as with the
    original file's scores. Needs llama.cpp's models/ folder (the llama-cpp-python sdist's
    vendor/llama.cpp/models) in LLAMA_CPP_MODELS."""
    import os

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    models = Path(os.environ.get("LLAMA_CPP_MODELS", "/nonexistent"))
    reference = models / "ggml-vocab-llama-spm.gguf"
    if not reference.is_file():
        pytest.skip("set LLAMA_CPP_MODELS to llama.cpp's models/ folder (ggml-vocab-llama-spm.gguf)")
    import torch
    from gguf import GGUFReader
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sftbridge.inference.gguf_file import write_gguf

    folder = tmp_path / "llama2-vocab"
    tokenizer = AutoTokenizer.from_pretrained(models, gguf_file=reference.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_gguf(folder, tmp_path / "ours.gguf")

    texts = [t for t in Path(f"{reference}.inp").read_text().split("\n__ggml_vocab_test__\n") if t]
    texts += QUESTIONS + [json.loads(line)["question"] for line in SAMPLE_TRAIN.read_text().splitlines()]
    original = llama_cpp.Llama(model_path=str(reference), vocab_only=True, verbose=False)
    ours = llama_cpp.Llama(model_path=str(tmp_path / "ours.gguf"), vocab_only=True, verbose=False)
    try:
        for text in texts:
            expected = original.tokenize(text.encode(), add_bos=True)
            assert ours.tokenize(text.encode(), add_bos=True) == expected, text
    finally:
        original.close()
        ours.close()
    # The same tokens with the same types (normal, control, unknown, byte) as the original file.
    fields = [GGUFReader(file).fields for file in (tmp_path / "ours.gguf", reference)]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id"):
        assert fields[0][key].contents() == fields[1][key].contents(), key
