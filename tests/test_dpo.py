"""DPO after SFT (issue 23): pairs rendered as SFT renders answers, a run that continues another's adapter
(``model.adapter``), and a few real DPO steps whose reference is the SFT model."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import SAMPLE_TRAIN, SHORT_RUN_PAIRS, write_jsonl
from sftbridge.config import load_config
from sftbridge.errors import ConfigError, DataError


def pair_rows(count: int = SHORT_RUN_PAIRS) -> list[dict[str, str]]:
    """The short run's questions, its answer preferred to the same answer padded out."""
    rows = [json.loads(line) for line in SAMPLE_TRAIN.read_text().splitlines()[:count]]
    return [
        {
            "question": r["question"],
            "chosen": r["correct_answer"],
            "rejected": f"{r['correct_answer']}, as the chapter on it explains at length",
        }
        for r in rows
    ]


def test_a_pair_is_encoded_exactly_as_sft_encodes_its_answers(tokenizer: Any) -> None:
    from sftbridge.data.formatting import PromptFormat
    from sftbridge.data.loading import Record
    from sftbridge.data.pairs import encode_pair, to_pair

    fmt = PromptFormat("qa", "chat_template", system_prompt="Answer in one word.")
    row = pair_rows(1)[0]
    pair = encode_pair(to_pair(Record("p line 1", row), fmt), fmt, tokenizer)
    for answer, ids in ((row["chosen"], pair.chosen_ids), (row["rejected"], pair.rejected_ids)):
        sft = fmt.encode(tokenizer, fmt_example(fmt, row["question"], answer))
        assert pair.prompt_ids + ids == sft.input_ids  # one BOS, the system prompt, EOS at the end
        assert ids == [t for t in sft.labels if t >= 0]  # the completion is exactly SFT's trained span
    assert pair.prompt_ids[0] == tokenizer.bos_token_id and pair.prompt_ids.count(tokenizer.bos_token_id) == 1
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tokenizer.eos_token_id
    # The chat form of the same pair (TRL's conversational names) is the same sequence.
    chat = {
        "prompt": [{"role": "user", "content": row["question"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }
    again = encode_pair(to_pair(Record("p line 2", chat), fmt), fmt, tokenizer)
    assert (again.prompt_ids, again.chosen_ids, again.rejected_ids) == (
        pair.prompt_ids,
        pair.chosen_ids,
        pair.rejected_ids,
    )


@pytest.mark.parametrize(
    ("policy", "kept", "dropped", "truncated"), [("drop", 2, 2, 0), ("truncate", 3, 1, 1)]
)
def test_over_length_pairs_follow_data_over_length(
    tokenizer: Any, policy: Any, kept: int, dropped: int, truncated: int
) -> None:
    """SFT's data.over_length for pairs: a long answer is kept whole for TRL's collator to cut; a prompt
    alone at max_length leaves nothing to compare and is dropped even under truncate; error names the line."""
    from sftbridge.data.formatting import PromptFormat
    from sftbridge.data.loading import Record
    from sftbridge.data.pairs import encode_pairs

    fmt = PromptFormat("qa", "chat_template")
    short, long_answer, long_prompt = pair_rows(3)
    long_answer = {**long_answer, "rejected": "and so on " * 40}
    long_prompt = {**long_prompt, "question": "Why? " * 60}
    rows = [short, long_answer, long_prompt, pair_rows(4)[3]]
    records = [Record(f"pairs.jsonl line {i}", row) for i, row in enumerate(rows, 1)]
    encoded, report = encode_pairs(records, fmt, tokenizer, 64, policy)
    assert (len(encoded), report.over_length, report.dropped, report.truncated) == (
        kept,
        2,
        dropped,
        truncated,
    )
    assert report.lines == ["pairs.jsonl line 2", "pairs.jsonl line 3"]
    with pytest.raises(DataError, match=r"pairs.jsonl line 2: \d+ tokens, over data.max_length=64"):
        encode_pairs(records, fmt, tokenizer, 64, "error")


def fmt_example(fmt: Any, question: str, answer: str) -> Any:
    from sftbridge.data.formatting import Example

    return Example(
        "x",
        messages=fmt.with_system(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ),
    )


def test_bad_pairs_are_all_reported_with_their_lines(tmp_path: Path) -> None:
    from sftbridge.data.pairs import load_pairs

    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"question": "q", "chosen": "a", "rejected": "b"},
            {"question": "q", "chosen": "a"},
            {"chosen": "a", "rejected": "b"},
            {"question": "q", "chosen": "same", "rejected": "same "},
            {"messages": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},
            {"question": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            "not json",
        ],
    )
    config = load_config(None, [f"data.train_file={path}", "train.method=dpo"])
    with pytest.raises(DataError) as raised:
        load_pairs(config.data)
    message = str(raised.value)
    assert message.startswith("6 data problem(s)")
    for expected in (
        f"{path} line 2: missing field 'rejected'",
        f'{path} line 3: missing field "question"',
        f"{path} line 4: chosen and rejected are the same answer",
        f"{path} line 5: the last turn of messages must be the user's",
        f"{path} line 6: field 'chosen' must be a string or one assistant turn",
        f"{path} line 7: invalid JSON",
    ):
        assert expected in message


def test_model_adapter_is_checked_before_anything_loads(short_run: Path, tmp_path: Path) -> None:
    from sftbridge.training.continuation import open_parent

    def parent_of(*overrides: str) -> Any:
        return open_parent(load_config(None, ["data.train_file=x.jsonl", *overrides]))

    assert parent_of().__class__ is type(None)
    assert parent_of(f"model.adapter={short_run}").run.run_name == "tiny-cpu"
    with pytest.raises(ConfigError, match=r"model.adapter: .*nowhere: no such run directory"):
        parent_of(f"model.adapter={tmp_path / 'nowhere'}")
    with pytest.raises(
        ConfigError, match=r"was trained on builtin:tiny-llama.*set model.name_or_path=builtin"
    ):
        parent_of(f"model.adapter={short_run}", f"model.name_or_path={tmp_path}")


@pytest.mark.slow  # ~20 s on 2 shared cores: TRL's DPO set-up, 3 steps, the run's report
def test_dpo_continues_the_sft_run_against_it_as_reference(short_run: Path, tmp_path: Path) -> None:
    """Four DPO steps from the short SFT run. At step 1 the policy is the reference (the SFT adapter, not
    the bare base): loss log 2 and rewards 0 exactly; then the margin grows and the loss falls. The run is
    an ordinary one: its adapter alone (not the reference copy), its parent in the manifest."""
    from safetensors.torch import load_file

    from sftbridge.inference.folder import ModelFolder
    from sftbridge.runs import load_manifest
    from sftbridge.training.train import train

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    config = load_config(
        None,
        [
            f"data.train_file={pairs}",
            f"model.adapter={short_run}",
            "train.method=dpo",
            "train.max_steps=3",
            "train.per_device_batch_size=8",
            "train.learning_rate=1e-3",
            "train.logging_steps=1",
            "train.answer_metrics=false",
            "train.device=cpu",
            "data.max_length=128",
            "data.validation_split_ratio=0",
        ],
    )
    run = train(config, tmp_path / "dpo")
    logs = [
        line for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in line
    ]
    first, last = logs[0], logs[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert last["rewards/margins"] > 0 and last["rewards/accuracies"] == 1.0
    assert 1e-6 < last["loss"] < 0.95 * first["loss"]

    assert sorted(p.name for p in (run / "adapter").iterdir()) == sorted(
        p.name for p in (short_run / "adapter").iterdir()
    )
    manifest = load_manifest(run)
    assert manifest.parent_run is not None and manifest.parent_run.path == str(short_run)
    assert manifest.parent_run.run_name == "tiny-cpu" and manifest.run_config.train.method == "dpo"
    assert manifest.run_config.lora == load_manifest(short_run).run_config.lora  # the parent's shape
    sft = load_file(short_run / "adapter" / "adapter_model.safetensors")
    dpo = load_file(run / "adapter" / "adapter_model.safetensors")
    assert sft.keys() == dpo.keys() and any(not sft[k].equal(dpo[k]) for k in sft)
    folder = ModelFolder.open(run)  # every check a served or merged run passes
    assert folder.prompt_format == ModelFolder.open(short_run).prompt_format


def test_dpo_private_override_still_fits_trl() -> None:
    """SafeDPOTrainer skips TRL's tokenization (pairs come tokenized): the method it replaces must still take
    these arguments, and the collator still read the columns that method would have written."""
    from trl import DPOTrainer

    from sftbridge.training.dpo import SafeDPOTrainer
    from test_fault_tolerance import private_overrides

    assert private_overrides(SafeDPOTrainer) == set(SafeDPOTrainer.PRIVATE_OVERRIDES)
    params = list(inspect.signature(DPOTrainer._prepare_dataset).parameters)
    assert params == ["self", "dataset", "processing_class", "args", "dataset_name"]
    source = inspect.getsource(DPOTrainer)
    for column in ('output["prompt_ids"]', 'output["chosen_ids"]', 'output["rejected_ids"]'):
        assert column in source


def test_eval_pairs_prefer_the_reference_to_each_wrong_or_long_answer(
    short_run: Path, tmp_path: Path
) -> None:
    """The short run knows the sample's first 8 answers and nothing else: of 12 questions, the pairs are the
    ones it got wrong or answered long, each with the reference chosen and its own answer rejected; the file
    is DPO data as it stands (through preview, which renders it as training would)."""
    from conftest import cli
    from sftbridge.inference.evaluate import LONG_ANSWER_RATIO

    run = Path(shutil.copytree(short_run, tmp_path / "run"))
    pairs_file = tmp_path / "pairs.jsonl"
    args = ("eval", str(run), "--data", str(SAMPLE_TRAIN), "--limit", "12", "--no-base")
    result = cli(*args, "--pairs", str(pairs_file))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "eval-train-predictions.jsonl").read_text().splitlines()]
    expected = [
        {"question": r["question"], "chosen": r["reference"], "rejected": r["adapter_answer"].strip()}
        for r in rows
        if not r["adapter_exact_match"] or r["adapter_tokens"] > LONG_ANSWER_RATIO * r["reference_tokens"]
    ]
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert pairs == expected and 4 <= len(pairs) < 12
    assert f"pairs: {pairs_file} ({len(pairs)} of 12 answers wrong or long)" in result.stdout

    shown = cli(
        "preview",
        "configs/dpo-concise.yaml",
        f"data.train_file={pairs_file}",
        f"model.adapter={run}",
        "--n",
        "2",
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    first = pairs[0]
    assert "chosen (" in shown.stdout and f"⟦ {first['chosen']} </s>⟧" in shown.stdout
    assert f"⟦ {first['rejected']} </s>⟧" in shown.stdout and shown.stdout.count("<s>[INST]") == 4


def test_report_draws_the_rewards_beside_the_loss(tmp_path: Path) -> None:
    from sftbridge.report.collect import read_curves
    from sftbridge.report.plots import curve_groups

    metrics = write_jsonl(
        tmp_path / "metrics.jsonl",
        [
            {
                "step": step,
                "loss": 0.69 / step,
                "learning_rate": 5e-4,
                "logps/chosen": -1.0,
                "rewards/chosen": 0.1 * step,
                "rewards/rejected": -step,
                "rewards/margins": 1.1 * step,
                "rewards/accuracies": 1.0,
            }
            for step in (1, 2)
        ]
        + [{"step": 2, "eval_loss": 0.3, "eval_rewards/margins": 2.0, "eval_rewards/accuracies": 1.0}],
    )
    groups = dict(curve_groups(read_curves(metrics)))
    assert groups["Loss"] == ["loss", "eval_loss"]
    assert groups["DPO rewards"] == [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "eval_rewards/margins",
    ]
    assert groups["DPO reward accuracy"] == ["rewards/accuracies", "eval_rewards/accuracies"]
    assert "logps/chosen" not in {key for keys in groups.values() for key in keys}


def test_model_adapter_continues_sft_from_the_runs_adapter(short_run: Path, tmp_path: Path) -> None:
    """More SFT on a run: its adapter is where training starts (the first loss is the memorised answers'
    small one, not a fresh adapter's), in its LoRA shape, and the new run names its parent."""
    from sftbridge.runs import load_manifest
    from sftbridge.training.train import train

    data = write_jsonl(tmp_path / "train.jsonl", SAMPLE_TRAIN.read_text().splitlines()[:SHORT_RUN_PAIRS])
    config = load_config(
        None,
        [
            f"data.train_file={data}",
            f"model.adapter={short_run}",
            "lora.r=4",  # the parent's shape wins
            "train.max_steps=2",
            "train.per_device_batch_size=8",
            "train.logging_steps=1",
            "train.answer_metrics=false",
            "train.device=cpu",
            "data.validation_split_ratio=0",
        ],
    )
    run = train(config, tmp_path / "more")
    first = losses(run)[0]
    assert first < 0.1 < losses(short_run)[0]  # a fresh adapter starts from the random model's ~8
    manifest = load_manifest(run)
    assert manifest.parent_run is not None and manifest.parent_run.method == "sft"
    assert manifest.run_config.lora.r == load_manifest(short_run).run_config.lora.r != 4
    assert (
        json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == manifest.run_config.lora.r
    )


def losses(run: Path) -> list[float]:
    lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [line["loss"] for line in lines if "loss" in line]


def test_dpo_arguments_are_the_runs_sft_arguments_plus_the_dpo_keys(tmp_path: Path) -> None:
    """One home for the training arguments: DPO takes the SFTConfig the run would train with (device,
    precision, checkpointing, schedule, checkpoints...) and adds its own keys."""
    from sftbridge.training.dpo import dpo_config
    from sftbridge.training.train import sft_config

    config = load_config(
        None,
        [
            "data.train_file=x.jsonl",
            "train.method=dpo",
            "train.dpo_beta=0.3",
            "train.dpo_rpo_alpha=0.5",
            "train.device=cpu",
            "train.learning_rate=2e-4",
            "train.save_steps=7",
        ],
    )
    sft = sft_config(config, output_dir=tmp_path, device="cpu", precision="fp32", do_eval=False)
    dpo = dpo_config(sft, config)
    shared = (
        "output_dir",
        "learning_rate",
        "use_cpu",
        "bf16",
        "activation_checkpointing",
        "seed",
        "save_steps",
    )
    for name in (*shared, "num_train_epochs", "lr_scheduler_type", "ddp_find_unused_parameters", "report_to"):
        assert getattr(dpo, name) == getattr(sft, name), name
    assert (dpo.use_cpu, dpo.bf16, dpo.activation_checkpointing) == (True, False, False)
    assert (dpo.beta, dpo.loss_type, dpo.loss_weights) == (0.3, ["sigmoid", "sft"], [1.0, 0.5])
    assert dpo.max_length == config.data.max_length and dpo.train_sampling_strategy == "random"


def test_a_version_2_manifest_still_reads(short_run: Path) -> None:
    """Manifest version 3 added parent_run: a run written before it (version 2) reads as one without a
    parent."""
    from sftbridge.runs import MANIFEST_VERSION, parse_manifest

    raw = json.loads((short_run / "sftbridge.json").read_text())
    raw["manifest_version"] = 2
    raw.pop("parent_run")
    manifest = parse_manifest(raw, "old/sftbridge.json")
    assert manifest.manifest_version == MANIFEST_VERSION == 3 and manifest.parent_run is None


@pytest.mark.slow  # ~30 s: two processes under torchrun
def test_dpo_under_fsdp_continues_the_sft_run(short_run: Path, tmp_path: Path) -> None:
    """DPO on 2 processes sharded with FSDP2 (gloo): the reference copy of the SFT adapter is sharded beside
    the trained one, so rewards start at 0 exactly; the saved adapter holds the trained weights alone."""
    from safetensors.torch import load_file

    from conftest import run_cli

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    run_dir = tmp_path / "dpo"
    result = run_cli(
        "train",
        "configs/dpo-concise.yaml",
        f"model.adapter={short_run}",
        f"data.train_file={pairs}",
        "train.max_steps=3",
        "train.logging_steps=1",
        "train.answer_metrics=false",
        "data.max_length=128",
        "backend.num_processes=2",
        "train.fsdp=true",
        "--run-dir",
        str(run_dir),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    logs = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logs[0]["rewards/margins"] == 0.0 and logs[-1]["rewards/margins"] > 0
    sft = load_file(short_run / "adapter" / "adapter_model.safetensors")
    dpo = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert sft.keys() == dpo.keys() and any(not sft[k].equal(dpo[k]) for k in sft)
    manifest = json.loads((run_dir / "sftbridge.json").read_text())
    assert manifest["config"]["train"]["fsdp"] is True and manifest["device"]["world_size"] == 2
