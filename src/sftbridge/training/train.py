"""The training script: arguments (and SageMaker's environment) → data → model → SFTTrainer → run directory.

Run it as ``sftbridge train CONFIG``, ``python -m sftbridge.training.train --config FILE [--key value ...]``,
under ``torchrun``, or unchanged as the entry script of a SageMaker Hugging Face training job. It knows
nothing of backends: where ``SM_CHANNEL_*``/``SM_MODEL_DIR``/``SM_HPS`` are set it reads data and writes the
run there (``sagemaker_env``). ``train()`` reads top to bottom in three phases: ``prepare`` (data, tokenizer,
device, run folder) → ``fit`` (model, trainer, training) → ``publish`` (adapter, manifest, documents).
``sft_config`` maps the config onto TRL's arguments; ``describe_run`` and ``build_manifest`` write down what
the run was. Heavy libraries are imported inside functions so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftbridge import environment
from sftbridge.config import (
    RunConfig,
    deep_merge,
    dump_config,
    load_config,
    parse_flag_overrides,
    parse_value,
    set_dotted,
)
from sftbridge.errors import ConfigError, DataError, Interrupted, UserError, print_error
from sftbridge.runs import (
    ADAPTER,
    CHECKPOINT_PATTERN,
    CONFIG,
    MANIFEST_VERSION,
    METRICS,
    MetricsLog,
    RunManifest,
    RunWriter,
    checkpoint_dir_for,
    default_run_dir,
    git_state,
    latest_checkpoint,
    library_versions,
    run_lock,
    storage_error,
)
from sftbridge.training.sagemaker_env import SageMakerEnv

if TYPE_CHECKING:
    from trl import SFTConfig

    from sftbridge.data.formatting import PromptFormat
    from sftbridge.data.loading import LoadedData
    from sftbridge.inference.folder import ModelFolder
    from sftbridge.models.loading import Device, Precision
    from sftbridge.training.answer_metrics import AnswerSample

log = logging.getLogger("sftbridge.training.train")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """``--config FILE --run-dir DIR`` plus ``--section.key value`` (SageMaker's form) or ``key=value``."""
    parser = argparse.ArgumentParser(
        prog="sftbridge-train",
        description="Fine-tune a chat model with LoRA/QLoRA. Set any config key as --section.key value.",
        allow_abbrev=False,  # an override like --run... must never be taken for --run-dir
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--run-dir", help="where the run directory goes (default: runs/<run_name>-<time>)")
    parser.add_argument("--runs-root", default="runs", help="parent of the default run directory")
    args, rest = parser.parse_known_args(argv)
    return args, parse_flag_overrides(rest)


def resolve_config(argv: list[str] | None, env: SageMakerEnv) -> tuple[RunConfig, Path]:
    args, cli_overrides = parse_args(argv)
    hp_overrides: dict[str, Any] = {}
    config_file = args.config
    for key, value in env.hyperparameters.items():
        if key == "config":
            config_file = config_file or value
        elif key not in ("run-dir", "runs-root"):
            set_dotted(hp_overrides, key, parse_value(value))
    config = load_config(config_file, deep_merge(hp_overrides, cli_overrides))
    if env.channels:
        config = load_config(
            config_file, deep_merge(deep_merge(hp_overrides, cli_overrides), env.data_overrides(config))
        )
    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif env.model_dir is not None:
        run_dir = env.model_dir
    elif environment.world_size() > 1:
        raise ConfigError("under torchrun every process must agree on the run folder: pass --run-dir")
    else:
        run_dir = default_run_dir(args.runs_root, config.run_name)
    return config, run_dir


@dataclass
class TrainingData:
    """The encoded splits TRL trains on, and what the manifest records about them."""

    train: Any  # datasets.Dataset of input_ids + labels (the prompt already at -100)
    eval: Any | None  # None when there is nothing to evaluate on, or train.eval_strategy is "no"
    prompt_format: PromptFormat
    record: dict[str, Any]  # the manifest's "data": sha256s, template source, length reports


def encode_data(config: RunConfig, data: LoadedData, tokenizer: Any) -> TrainingData:
    """Render and tokenize every split through the model's chat format; raises DataError if no example fits.

    Only Arrow tables leave this function: the Python copies (records, texts, token lists) are not held in RAM
    beside the model for the whole run.
    """
    from sftbridge.data.encoding import encode

    encoded = encode(data, config.data, tokenizer, ("train", "validation"))
    prompt_format = encoded.prompt_format
    train_set, eval_set = encoded.splits["train"], encoded.splits["validation"]
    if not train_set:
        policy = config.data.over_length
        raise DataError(f"{config.data.train_file}: no training example left after data.over_length={policy}")
    log.info(
        "data: %d train / %d validation examples (%s, %s)",
        len(train_set),
        len(eval_set),
        prompt_format.format,
        prompt_format.chat_format,
    )
    do_eval = bool(eval_set) and config.train.eval_strategy != "no"
    return TrainingData(
        train=_as_dataset(train_set),
        eval=_as_dataset(eval_set) if do_eval else None,
        prompt_format=prompt_format,
        record={
            "sha256": data.sha256,
            "template_source": data.template_source,
            "train": encoded.reports["train"].to_dict(),
            "validation": encoded.reports["validation"].to_dict(),
        },
    )


def _as_dataset(examples: list[Any]) -> Any:
    """What TRL trains on: ready-made ``input_ids`` and ``labels`` (the prompt already at -100)."""
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])


def sft_config(
    config: RunConfig,
    *,
    output_dir: str | Path,
    device: Device,
    precision: Precision,
    do_eval: bool,
    fsdp_layers: list[str] | None = None,
) -> SFTConfig:
    """The ``train`` section as TRL's SFTConfig; checkpoints go to ``output_dir``; under ``train.fsdp`` one
    FSDP unit per class of ``fsdp_layers`` (``fsdp.decoder_layers``)."""
    from trl import SFTConfig

    from sftbridge.training import fsdp

    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=config.train.epochs,
        max_steps=config.train.max_steps,
        per_device_train_batch_size=config.train.per_device_batch_size,
        per_device_eval_batch_size=config.train.per_device_eval_batch_size,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        learning_rate=config.train.learning_rate,
        lr_scheduler_type=config.train.lr_scheduler,
        warmup_steps=config.train.warmup_ratio,  # < 1 is a ratio: get_warmup_steps = ceil(total * r)
        weight_decay=config.train.weight_decay,
        max_grad_norm=config.train.max_grad_norm,
        optim=config.train.optim,
        # transformers 5's name; under FSDP, FSDP's own (fsdp.training_arguments) replaces it
        activation_checkpointing=config.train.gradient_checkpointing and not config.train.fsdp,
        logging_steps=config.train.logging_steps,
        logging_first_step=True,
        eval_strategy=config.train.eval_strategy if do_eval else "no",
        eval_steps=config.train.eval_steps,
        save_strategy="steps" if config.train.save_steps else "epoch",
        save_steps=config.train.save_steps or 500,
        save_total_limit=config.train.save_total_limit,
        report_to=[str(t) for t in config.train.report_to] or "none",  # tracking.py points them
        run_name=config.run_name,
        project=config.train.tracking_project,  # Trackio's project
        disable_tqdm=True,  # progress.Progress draws the bar or prints the lines instead
        seed=config.seed,
        data_seed=config.seed,
        # Every LoRA weight is used in every forward pass. transformers' own default (True for a PEFT model,
        # which is no PreTrainedModel) costs DDP an extra autograd traversal per step and a warning per rank.
        ddp_find_unused_parameters=False,
        use_cpu=device == "cpu",
        # TRL defaults to bf16; the CPU trains in fp32 (bf16 autocast there is slower and changes logits).
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Examples are already cut to data.max_length by encode_split; TRL refuses max_length with
        # padding-free batches unless it packs, so it only gets the length when it needs it.
        max_length=None if config.train.padding_free and not config.train.packing else config.data.max_length,
        dataset_num_proc=None,
        packing=config.train.packing,
        padding_free=config.train.padding_free,
        use_liger_kernel=config.train.use_liger_kernel,
        train_sampling_strategy="group_by_length" if config.train.group_by_length else "random",
        load_best_model_at_end=config.train.load_best_model_at_end and do_eval,
        metric_for_best_model=config.train.metric_for_best_model if do_eval else None,
        greater_is_better=config.train.metric_for_best_model != "eval_loss",
        **fsdp.training_arguments(config, fsdp_layers or []),
    )


def train(config: RunConfig, run_dir: Path) -> Path:
    """Validate the data, train, write the run directory. Returns its path.

    Three phases, each callable alone (a test of the loss or of resuming calls what it tests): ``prepare``
    (data, tokenizer, device, run folder, checkpoints), ``fit`` (model, trainer, training) and ``publish``
    (adapter, manifest, documents, the finished folder). Only rank 0 publishes.
    """
    run = prepare(config, run_dir)
    try:
        fitted = fit(run)
        return publish(run, fitted) if run.rank == 0 else run_dir
    except BaseException:
        if run.rank == 0:
            run.writer.abort()
        raise


@dataclass
class PreparedRun:
    """What ``prepare`` checked and set up: everything training needs but the model."""

    config: RunConfig
    run_dir: Path
    rank: int
    started: float  # time.time() when preparation began
    tokenizer: Any
    data: TrainingData
    questions: AnswerSample | None  # what the answer metrics ask during training (None: they are off)
    device: Device
    precision: Precision
    writer: RunWriter  # the run folder, assembled under a temporary name
    checkpoints: Path
    resume_from: Path | None
    live_metrics: MetricsLog
    parent: ModelFolder | None = None  # model.adapter's run, whose adapter training starts from


@dataclass
class FittedRun:
    """What ``fit`` trained and measured."""

    trainer: Any  # SafeSFTTrainer, or dpo.SafeDPOTrainer
    adapter_state: dict[str, Any] | None  # under FSDP: the adapters gathered whole, what rank 0 saves
    result: Any  # what trainer.train() returned
    final_eval: dict[str, float]
    answers: Any | None  # the AnswerMetrics callback, if the run measured answers
    description: dict[str, Any]  # describe_run's record ({} on ranks other than 0)
    load_seconds: float


def prepare(config: RunConfig, run_dir: Path) -> PreparedRun:
    """Data, tokenizer and device, then the run folder and the checkpoints a restart resumes from.

    Everything that can fail on bad input fails here, before the run folder or the weights exist.
    """
    from transformers import set_seed

    from sftbridge.aws.secrets import export_hf_token, export_secret_environment
    from sftbridge.data.loading import load_data
    from sftbridge.models.loading import check_attention, load_tokenizer, resolve_device, resolve_precision
    from sftbridge.training import fsdp, tracking
    from sftbridge.training.answer_metrics import sample_questions
    from sftbridge.training.continuation import open_parent, with_parent_lora
    from sftbridge.training.trainer import clean_partial_checkpoints

    started = time.time()
    rank = int(os.environ.get("RANK", "0"))
    set_seed(config.seed)

    parent = open_parent(config)
    if parent is not None:
        config = with_parent_lora(config, parent)
    export_hf_token(config.model.hf_token_secret)
    export_secret_environment(config.backend.secret_environment)  # a tracker's key, before trackers start
    if config.train.method == "dpo":
        from sftbridge.training.dpo import prepare_pairs

        tokenizer = load_tokenizer(config.model)
        data, questions = prepare_pairs(config, tokenizer, parent)
    else:
        loaded = load_data(config.data, eval_strategy=config.train.eval_strategy, with_test=True)
        tokenizer = load_tokenizer(config.model)
        data = encode_data(config, loaded, tokenizer)
        # the fixed sample the answer metrics ask during training
        questions = sample_questions(config, loaded)
        del loaded  # the records and texts: the Arrow tables in `data` are all that training needs from here
    device = resolve_device(config.train)
    check_attention(config.model, device)
    precision = resolve_precision(config.train, device)
    fsdp.check(config, world_size=environment.world_size(), device=device, precision=precision)
    log.info("device %s, %s%s", device, precision, ", FSDP" if config.train.fsdp else "")

    writer = RunWriter(run_dir, create=rank == 0)
    checkpoints = (
        Path(config.train.checkpoint_dir) if config.train.checkpoint_dir else checkpoint_dir_for(run_dir)
    )
    if rank == 0:
        clean_partial_checkpoints(checkpoints)
    resume_from = latest_checkpoint(checkpoints)
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    # metrics.jsonl grows beside the checkpoints while training (it outlives a crash there, and SageMaker
    # syncs it to S3 with them); save_outputs copies it into the run.
    live_metrics = MetricsLog(checkpoints / METRICS)
    if rank == 0:
        live_metrics.restart_at(_checkpoint_step(resume_from))
        log.info("metrics: %s", live_metrics.path)
    tracking.prepare(config, checkpoints)
    return PreparedRun(
        config=config,
        run_dir=run_dir,
        rank=rank,
        started=started,
        tokenizer=tokenizer,
        data=data,
        questions=questions,
        device=device,
        precision=precision,
        writer=writer,
        checkpoints=checkpoints,
        resume_from=resume_from,
        live_metrics=live_metrics,
        parent=parent,
    )


def fit(run: PreparedRun) -> FittedRun:
    """Model, trainer and callbacks, then training: a SIGTERM/SIGINT stops at the next step boundary with a
    checkpoint to resume from (``Interrupted``). Ends with the final evaluation, every rank in step."""
    import torch
    from transformers import PrinterCallback

    from sftbridge.models.loading import load_model, lora_config
    from sftbridge.training import fsdp, tracking
    from sftbridge.training.answer_metrics import AnswerMetrics, keep_best_callbacks
    from sftbridge.training.progress import Progress
    from sftbridge.training.trainer import SafeSFTTrainer, StopOnSignal

    config, data, rank = run.config, run.data, run.rank
    model = load_model(
        fsdp.loading(config), run.device, run.precision, quant_storage=fsdp.quant_storage(config)
    )
    peft_config = lora_config(config)
    if run.parent is not None:  # model.adapter: the parent's adapter is the one trained
        from sftbridge.training.continuation import load_parent_adapter

        model, peft_config = load_parent_adapter(model, run.parent), None
    load_seconds = time.time() - run.started
    do_eval = data.eval is not None
    stopper = StopOnSignal()
    trainer_class: Any = SafeSFTTrainer
    args: Any = sft_config(
        config,
        output_dir=run.checkpoints,
        device=run.device,
        precision=run.precision,
        do_eval=do_eval,
        fsdp_layers=fsdp.decoder_layers(model) if config.train.fsdp else None,
    )
    if config.train.method == "dpo":
        from sftbridge.training.dpo import SafeDPOTrainer, dpo_config

        trainer_class, args = SafeDPOTrainer, dpo_config(args, config)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=run.tokenizer,
        peft_config=peft_config,
        callbacks=[stopper, Progress(run.live_metrics.path)],
    )
    trainer.remove_callback(PrinterCallback)  # Progress prints instead of a raw dict per log
    # Answer metrics first: they add eval_answer_* to an evaluation's metrics before early stopping reads.
    questions = run.questions
    answers = (
        AnswerMetrics(trainer, questions, questions.prompt_format or data.prompt_format, config)
        if questions
        else None
    )
    for callback in ([answers] if answers else []) + keep_best_callbacks(config, do_eval=do_eval):
        trainer.add_callback(callback)
    # What the run is (the manifest's first half, what the trackers log): only rank 0 writes either.
    device, precision = run.device, run.precision
    description = (
        describe_run(config, model=model, data=data, device=device, precision=precision, parent=run.parent)
        if rank == 0
        else {}
    )
    if config.train.report_to and rank == 0:
        params = tracking.run_params(description, run.run_dir)
        trainer.add_callback(tracking.RunParams(trainer, list(config.train.report_to), params))

    stopper.install()
    tracking.start(config, rank=rank)
    resume_from = run.resume_from
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError as exc:
        raise out_of_memory(config, run.device) from exc
    finally:
        stopper.uninstall()
    if stopper.signum is not None:
        raise Interrupted(stopper.signum, latest_checkpoint(run.checkpoints))
    final_eval = trainer.evaluate() if do_eval else {}
    tracking.finish(config, rank=rank)
    adapter_state = fsdp.full_state_dict(trainer)  # every rank takes part; rank 0 receives it
    trainer.accelerator.wait_for_everyone()
    return FittedRun(
        trainer=trainer,
        adapter_state=adapter_state,
        result=result,
        final_eval=final_eval,
        answers=answers,
        description=description,
        load_seconds=load_seconds,
    )


def publish(run: PreparedRun, fitted: FittedRun) -> Path:
    """Rank 0: adapter, tokenizer, logs and config, then the manifest and documents, and only then the run
    folder moves into place (COMPLETE). Returns the finished folder."""
    from sftbridge.report import write_run_documents

    config, writer, trainer = run.config, run.writer, fitted.trainer
    description, result, final_eval = fitted.description, fitted.result, fitted.final_eval
    resume_from, started, load_seconds = run.resume_from, run.started, fitted.load_seconds
    learning = learning_verdict(fitted.answers, trainer, config)

    save_outputs(writer, trainer, run.tokenizer, config, state_dict=fitted.adapter_state)
    manifest = build_manifest(
        description,
        learning=learning,
        result=result,
        final_eval=final_eval,
        resumed_from=resume_from,
        timings={
            "load_seconds": round(load_seconds, 2),
            "train_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
            "total_seconds": round(time.time() - started, 2),
        },
    )
    # adapter/README.md (replacing PEFT's empty card) and report.html; a failure is only a warning
    write_run_documents(writer.staging, manifest, final=writer.target)
    finished = writer.finalize(manifest)
    if not config.train.checkpoint_dir:
        shutil.rmtree(run.checkpoints, ignore_errors=True)  # the run is complete; its default checkpoints go
    return finished


def save_outputs(
    writer: RunWriter,
    trainer: Any,
    tokenizer: Any,
    config: RunConfig,
    *,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write the adapter (with the tokenizer), metrics.jsonl and the resolved config into the run folder;
    ``state_dict``: the model's full weights where they are sharded (FSDP), else read from the model."""
    from sftbridge.training.tracking import TENSORBOARD

    adapter_dir = writer.staging / ADAPTER
    # Only the trained adapter: a DPO run's model also holds its frozen reference copy (training/dpo.py).
    trainer.model.save_pretrained(adapter_dir, state_dict=state_dict, selected_adapters=["default"])
    tokenizer.save_pretrained(adapter_dir)
    # Written as training logged, beside the checkpoints: complete across resumes (see MetricsLog.restart_at).
    shutil.copyfile(Path(trainer.args.output_dir) / METRICS, writer.staging / METRICS)
    if (events := Path(trainer.args.output_dir) / TENSORBOARD).is_dir():
        shutil.copytree(events, writer.staging / TENSORBOARD)
    writer.write_text(CONFIG, dump_config(config))


def describe_run(
    config: RunConfig,
    *,
    model: Any,
    data: TrainingData,
    device: Device,
    precision: Precision,
    parent: ModelFolder | None = None,
) -> dict[str, Any]:
    """What the run is, known before it trains: the first half of its manifest, and what the trackers log."""
    import torch

    from sftbridge.models.loading import model_path
    from sftbridge.training.continuation import parent_record

    builtin = config.model.name_or_path.startswith("builtin:")
    return {
        "kind": "run",
        "manifest_version": MANIFEST_VERSION,
        "run_name": config.run_name,
        "base_model": {
            "name_or_path": config.model.name_or_path,
            "resolved_path": model_path(config.model) if builtin else None,
            "revision": config.model.revision or _commit_hash(model),
            "load_in_4bit": config.model.load_in_4bit,
        },
        "prompt_format": data.prompt_format.to_record().model_dump(),
        "generation": config.generation.model_dump(),
        "config": config.to_dict(),
        "data": data.record,
        "parent_run": parent_record(parent).model_dump() if parent is not None else None,
        "seed": config.seed,
        "versions": library_versions(),
        "git": git_state(),
        "backend": {
            "name": os.environ.get(environment.BACKEND, "direct"),
            "job_id": os.environ.get(environment.JOB_ID),
        },
        "device": {
            "type": device,
            "precision": precision,
            "world_size": environment.world_size(),
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        },
    }


def build_manifest(
    description: dict[str, Any],
    *,
    result: Any,
    final_eval: dict[str, float],
    resumed_from: Path | None,
    timings: dict[str, float],
    learning: dict[str, Any] | None = None,
) -> RunManifest:
    """The run's ``sftbridge.json``: what it was trained from, how and where (``describe_run``), how it ended.

    ``result`` is what ``trainer.train()`` returned, ``final_eval`` what ``trainer.evaluate()`` did (or {}),
    ``learning`` what :func:`learning_verdict` found (answer metrics, verdict, best model).
    """
    return RunManifest.model_validate(
        {
            **description,
            "timings": timings,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "metrics": {
                "train_loss": result.training_loss,
                "global_step": result.global_step,
                "eval_loss": final_eval.get("eval_loss"),
            },
            **(learning or {}),
        }
    )


def learning_verdict(answers: Any, trainer: Any, config: RunConfig) -> dict[str, Any]:
    """The manifest's ``answer_metrics`` and ``best_model``; warns, with figures, causes and keys, when the
    adapter did not learn its answers."""
    from sftbridge.training.answer_metrics import answer_record, best_model_record

    learning: dict[str, Any] = {"best_model": best_model_record(config, trainer.state)}
    if answers is not None:
        learning["answer_metrics"], found = answer_record(answers, config, trainer.state)
        if found is not None and not found.learned:
            log.warning(found.message)
    return learning


def out_of_memory(config: RunConfig, device: str) -> UserError:
    return UserError(
        f"out of {device} memory at train.per_device_batch_size={config.train.per_device_batch_size}, "
        f"data.max_length={config.data.max_length}. Lower train.per_device_batch_size (and raise "
        "train.gradient_accumulation_steps to keep the effective batch), lower data.max_length, set "
        "train.gradient_checkpointing=true, or load the base in 4-bit (model.load_in_4bit=true)."
    )


def _checkpoint_step(checkpoint: Path | None) -> int:
    match = CHECKPOINT_PATTERN.match(checkpoint.name) if checkpoint is not None else None
    return int(match.group(1)) if match else 0


def _commit_hash(model: Any) -> str | None:
    return getattr(model.config, "_commit_hash", None)


def main(argv: list[str] | None = None) -> int:
    from sftbridge.output import configure_output, verbose_from_env

    # Our progress at INFO; the libraries' warnings only with SFTBRIDGE_VERBOSE=1 (what `sftbridge -v` sets).
    configure_output(
        verbose_from_env(), fmt="%(asctime)s %(levelname)s %(name)s: %(message)s", own_level=logging.INFO
    )
    # Until training starts (and its step-boundary handler takes over), SIGTERM stops at once like Ctrl-C.
    signal.signal(signal.SIGTERM, _stop_now)
    supervised = environment.is_supervised()  # `sftbridge train` prints the outcome
    run_dir = None
    try:
        sagemaker = SageMakerEnv.from_environ()
        config, run_dir = resolve_config(argv, sagemaker)
        # One trainer per run folder. Under `sftbridge train` the supervising process holds the lock; a
        # SageMaker job has its container to itself.
        lock = environment.rank() == 0 and not supervised and sagemaker.model_dir is None
        with run_lock(run_dir) if lock else contextlib.nullcontext():
            out = train(config, run_dir)
    except UserError as exc:
        print_error(exc)
        return exc.exit_code
    except Interrupted as exc:
        if not supervised:
            print(f"interrupted: {exc}; resume: the same command with --run-dir {run_dir}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # a second signal, or one before training began: stopped at once
        signum = getattr(exc, "signum", signal.SIGINT)
        if not supervised:
            print(f"interrupted by {signal.Signals(signum).name}: stopped at once", file=sys.stderr)
        return 128 + signum
    except Exception as exc:
        # A full disk or a read-only target (torch and safetensors say it in their own words): one line.
        problem = storage_error(exc, run_dir or Path("."))
        if problem is None:
            raise
        print_error(problem)
        return problem.exit_code
    if environment.rank() == 0 and not supervised:
        print(f"run directory: {out}")
    return 0


class _StoppedAtOnce(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_now(signum: int, _frame: Any) -> None:
    raise _StoppedAtOnce(signum)


if __name__ == "__main__":
    sys.exit(main())
