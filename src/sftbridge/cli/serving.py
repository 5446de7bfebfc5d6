"""Commands that put a run behind an endpoint: ``serve``, ``merge``, ``deploy``, ``invoke``, ``undeploy``."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from sftbridge.cli.options import (
    add_device,
    add_json,
    add_merge_dtype,
    add_region,
    add_run,
    add_runs,
    add_trust_remote_code,
    named_runs,
)
from sftbridge.errors import UserError
from sftbridge.serving import defaults

if TYPE_CHECKING:
    from sftbridge.inference.folder import ModelFolder


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {value})")
    return value


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_runs(
        parser,
        "run directories on one base, each served under its folder's name or as NAME=RUN, the base as "
        "<first>-base; or one folder written by `sftbridge merge`",
    )
    parser.add_argument(
        "--host",
        default=defaults.HOST,
        help="address to bind (default 127.0.0.1; the server has no auth)",
    )
    parser.add_argument("--port", type=int, default=defaults.PORT, help="port (default 8080; 0 = any free)")
    add_device(parser)
    add_trust_remote_code(parser)
    parser.add_argument(
        "--max-new-tokens-cap",
        type=_positive,
        default=defaults.MAX_NEW_TOKENS_CAP,
        help=f"largest max_new_tokens a request may ask for (default {defaults.MAX_NEW_TOKENS_CAP})",
    )
    parser.add_argument(
        "--max-queue",
        type=_positive,
        default=defaults.MAX_QUEUE,
        help=f"requests that may wait for the model; more get 429 (default {defaults.MAX_QUEUE})",
    )
    parser.add_argument("--max-body-bytes", type=_positive, default=defaults.MAX_BODY_BYTES)
    parser.add_argument(
        "--max-batch-size",
        type=_positive,
        default=defaults.MAX_BATCH_SIZE,
        help=f"concurrent greedy requests generated together (default {defaults.MAX_BATCH_SIZE})",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=defaults.BATCH_WINDOW_S * 1000,
        help="under load, how long to wait for more requests to fill a batch "
        f"(default {defaults.BATCH_WINDOW_S * 1000:g}; a lone request never waits)",
    )
    parser.add_argument(
        "--engine",
        default="sftbridge",
        choices=["sftbridge", "vllm"],
        help="sftbridge: this server (CPU or GPU); vllm: `vllm serve` with the runs' base, each adapter as "
        "a LoRA module, and the chat template (a GPU and `pip install 'sftbridge[vllm]'`)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="--engine vllm: print the vllm command, start nothing"
    )
    parser.set_defaults(func=cmd_serve)


def merge_arguments(parser: argparse.ArgumentParser) -> None:
    add_run(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    add_merge_dtype(
        parser, "auto: fp32 on the CPU (4 bytes/param), the run's 16-bit precision on a GPU (2 bytes/param)"
    )
    add_device(parser)
    add_trust_remote_code(parser)
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.set_defaults(func=cmd_merge)


def deploy_arguments(parser: argparse.ArgumentParser) -> None:
    add_trust_remote_code(parser)
    add_runs(
        parser,
        "run directory (merged on the way) or a merged folder; or, with --mode adapter, several runs on one "
        "base (NAME=RUN to name an adapter), each a LoRA module of one endpoint",
    )
    parser.add_argument("--backend", default="sagemaker", choices=["sagemaker"])
    parser.add_argument(
        "--instance-type", default=defaults.INSTANCE_TYPE, help=f"default {defaults.INSTANCE_TYPE}"
    )
    parser.add_argument("--instance-count", type=_positive, default=1)
    parser.add_argument("--role", help="SageMaker execution role ARN (default: the run's backend.role)")
    parser.add_argument(
        "--bucket", help="S3 bucket (default: the run's backend.bucket, else sagemaker-REGION-ACCOUNT)"
    )
    parser.add_argument(
        "--prefix", default=defaults.S3_PREFIX, help=f"S3 key prefix (default {defaults.S3_PREFIX})"
    )
    add_region(parser, "AWS region (default: the run's backend.region, else AWS_DEFAULT_REGION)")
    parser.add_argument(
        "--name", help="endpoint, endpoint config and model name (default sftbridge-RUN-TIME)"
    )
    parser.add_argument(
        "--engine",
        default="vllm",
        choices=["vllm", "tgi"],
        help="vllm: Hugging Face's vLLM image (default); tgi: its LLM (TGI) image, in maintenance mode",
    )
    parser.add_argument(
        "--mode",
        default="merged",
        choices=["merged", "adapter"],
        help="merged: the adapter merged into 16-bit weights (default); adapter: the base from the Hub "
        "or --base s3://..., the run's adapter as a vLLM LoRA module",
    )
    parser.add_argument(
        "--base",
        help="--mode adapter: base model Hub id or s3://BUCKET/PREFIX/ (default: the run's base)",
    )
    parser.add_argument(
        "--image-version",
        "--tgi-version",
        dest="image_version",
        help="the engine's image version (default: the newest the SageMaker SDK lists)",
    )
    parser.add_argument("--image-uri", help="a serving image URI, instead of the SDK's")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16"],
        help="merged weights, or vLLM's --dtype (default: bf16; fp16 on pre-Ampere)",
    )
    parser.add_argument("--no-wait", action="store_true", help="return once the endpoint is being created")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything that writes nothing, print the model, endpoint config and endpoint requests "
        "(with the container's environment), and create nothing",
    )
    parser.set_defaults(func=cmd_deploy)


def invoke_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", help="a SageMaker endpoint name, or http://HOST:PORT (sftbridge serve)")
    parser.add_argument("question")
    parser.add_argument(
        "--engine",
        choices=["vllm", "tgi"],
        help="the API to speak (default: the endpoint's sftbridge:engine tag; vllm for a URL)",
    )
    add_region(parser)
    parser.add_argument(
        "--run", type=Path, help="format with this run's template (default: the endpoint's record)"
    )
    parser.add_argument("--raw", action="store_true", help="send the question as is, unformatted")
    parser.add_argument(
        "--model",
        help="which served model answers: an adapter's name (`deploy A B --mode adapter`, `serve A B`) or "
        "<first>-base (default: the endpoint's own, or the server's first run)",
    )
    parser.add_argument("--max-new-tokens", type=_positive)
    parser.add_argument("--temperature", type=float, help="sample at this temperature (default: the run's)")
    parser.add_argument("--top-p", type=float)
    add_json(parser, "print the request and the whole response")
    parser.set_defaults(func=cmd_invoke)


def undeploy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint")
    add_region(parser)
    parser.set_defaults(func=cmd_undeploy)


def cmd_serve(args: argparse.Namespace) -> int:
    import contextlib
    import signal

    if args.engine == "vllm":
        return _serve_vllm(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("serve needs FastAPI and uvicorn: pip install 'sftbridge[serve]'") from None
    from sftbridge.inference.adapters import served_predictors
    from sftbridge.serving.server import LocalServer, ServeSettings, listen

    folders = _open_runs(args)  # checked before torch: one line on a bad folder

    settings = ServeSettings(
        host=args.host,
        port=args.port,
        max_new_tokens_cap=args.max_new_tokens_cap,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000,
    )
    try:
        listener = listen(
            settings
        )  # before the model loads (seconds to minutes): a taken port is said at once
    except OSError as exc:
        raise UserError(
            f"--host {args.host} --port {args.port}: cannot listen ({exc}); try --port 0"
        ) from None
    predictors = served_predictors(folders, device=args.device)
    # uvicorn's own logging set-up: its lines, one access line per request included, at INFO.
    server = LocalServer(predictors, settings, log_config=uvicorn.config.LOGGING_CONFIG, listener=listener)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning(
            "listening on %s: reachable from other machines, and the server has no authentication", args.host
        )
    served = ", ".join(f"{name} ({folders[name].path})" if name in folders else name for name in predictors)
    print(
        f"serving {served} on {server.url} "
        "(POST /generate, /generate_stream, /invocations, /v1/chat/completions, /v1/completions; "
        "OpenAI's model or TGI's parameters.adapter_id picks one)",
        flush=True,
    )
    # uvicorn stops gracefully on SIGINT or SIGTERM (how SageMaker and process managers stop a container),
    # then raises the signal again for the handler it found: a clean stop, so exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve()
    return 0


def _open_runs(args: argparse.Namespace) -> dict[str, ModelFolder]:
    """Every RUN (or NAME=RUN) opened and checked; several must be runs on one base."""
    from sftbridge.inference.adapters import check_shared_base
    from sftbridge.inference.folder import ModelFolder

    folders = {
        name: ModelFolder.open(path, trust_remote_code=args.trust_remote_code)
        for name, path in named_runs(args.runs).items()
    }
    if len(folders) > 1 or not next(iter(folders.values())).is_merged:
        check_shared_base(folders)
    return folders


def _serve_vllm(args: argparse.Namespace) -> int:
    """``vllm serve`` with the runs' base, adapters and chat template; replaces this process."""
    import os
    import shutil

    from sftbridge.serving.vllm import serve_command

    command = serve_command(_open_runs(args), host=args.host, port=args.port)
    if args.dry_run:
        print(shlex.join(command))  # quoted where a path needs it: copy, paste, run
        return 0
    executable = shutil.which("vllm")
    if executable is None:
        raise UserError("--engine vllm needs vLLM on a GPU machine: pip install 'sftbridge[vllm]'")
    print(f"starting: {shlex.join(command)}", flush=True)
    os.execv(executable, command)
    return 0  # not reached: exec replaced this process


def cmd_merge(args: argparse.Namespace) -> int:
    from sftbridge.inference.merge import merge_run

    out = merge_run(
        args.run,
        args.out,
        dtype=args.dtype,
        device=args.device,
        max_shard_size=args.max_shard_size,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"merged model: {out}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from sftbridge.serving.deploy import MODEL_DIR, VLLM_CONFIG, deploy

    runs = named_runs(args.runs)
    result = deploy(
        runs if len(runs) > 1 else runs[next(iter(runs))],
        name=args.name,
        instance_type=args.instance_type,
        engine=args.engine,
        mode=args.mode,
        base=args.base,
        instance_count=args.instance_count,
        role=args.role,
        bucket=args.bucket,
        region=args.region,
        prefix=args.prefix,
        image_version=args.image_version,
        image_uri=args.image_uri,
        dtype=args.dtype,
        wait=not args.no_wait,
        dry_run=args.dry_run,
        trust_remote_code=args.trust_remote_code,
    )
    if args.dry_run:
        import json

        print(json.dumps(result["requests"], indent=2))
        if result["vllm_config"]:
            print(f"{MODEL_DIR}/{VLLM_CONFIG}, in the model data:\n{result['vllm_config']}", end="")
        print(f"dry run: nothing uploaded or created; the model data would go to {result['model_data']}")
        return 0
    print(
        f"endpoint {result['endpoint']}: {result['status']} ({result['instance_type']}, {result['region']})"
    )
    print(f"image {result['image']} ({result['engine']}, {result['mode']})")
    print(f"model {result['model_data']}")
    if len(runs) > 1:
        print(f"adapters {', '.join(runs)}; the base as {result['endpoint']}-base")
        print(f'ask one: sftbridge invoke {result["endpoint"]} "your question" --model {next(iter(runs))}')
    else:
        print(f'ask it: sftbridge invoke {result["endpoint"]} "your question"')
    return 0


def cmd_invoke(args: argparse.Namespace) -> int:
    from sftbridge.serving.endpoint import invoke

    request, answer = invoke(
        args.endpoint,
        args.question,
        region=args.region,
        run=args.run,
        raw=args.raw,
        engine=args.engine,
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    if args.json:
        print(json.dumps({"request": request, "response": answer}, indent=2, ensure_ascii=False))
    else:
        print(str(answer["generated_text"]).strip())
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    from sftbridge.serving.deploy import undeploy

    for item in undeploy(args.endpoint, region=args.region):
        print(f"deleted {item}")
    return 0
