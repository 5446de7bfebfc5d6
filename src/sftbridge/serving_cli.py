"""Commands that put a run behind an endpoint: ``serve``, ``merge``, ``deploy``, ``invoke``, ``undeploy``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from sftbridge.errors import UserError

log = logging.getLogger(__name__)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {value})")
    return value


def register(commands: Any) -> None:
    from sftbridge.serve_settings import DEFAULT_PORT, ServeSettings

    defaults = ServeSettings()
    serve = commands.add_parser(
        "serve", help="local HTTP endpoint speaking SageMaker's and TGI's API (a run or a merged folder)"
    )
    serve.add_argument("run", type=Path, help="run directory, or a folder written by `sftbridge merge`")
    serve.add_argument(
        "--host", default=defaults.host, help="address to bind (default 127.0.0.1; the server has no auth)"
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 8080; 0 = any free)")
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    serve.add_argument(
        "--max-new-tokens-cap",
        type=_positive,
        default=defaults.max_new_tokens_cap,
        help=f"largest max_new_tokens a request may ask for (default {defaults.max_new_tokens_cap})",
    )
    serve.add_argument(
        "--max-queue",
        type=_positive,
        default=defaults.max_queue,
        help=f"requests that may wait for the model; more get 429 (default {defaults.max_queue})",
    )
    serve.add_argument("--max-body-bytes", type=_positive, default=defaults.max_body_bytes)
    serve.set_defaults(func=cmd_serve)

    merge = commands.add_parser("merge", help="fold the adapter into the base: plain safetensors + tokenizer")
    merge.add_argument("run", type=Path, help="run directory")
    merge.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    merge.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: fp32 on the CPU (4 bytes/param), the run's 16-bit precision on a GPU (2 bytes/param)",
    )
    merge.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    merge.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    merge.set_defaults(func=cmd_merge)

    from sftbridge.deploy import DEFAULT_INSTANCE_TYPE, DEFAULT_PREFIX

    deploy = commands.add_parser("deploy", help="a SageMaker real-time endpoint (Hugging Face LLM/TGI image)")
    deploy.add_argument("run", type=Path, help="run directory (merged on the way) or a merged folder")
    deploy.add_argument("--backend", default="sagemaker", choices=["sagemaker"])
    deploy.add_argument(
        "--instance-type", default=DEFAULT_INSTANCE_TYPE, help=f"default {DEFAULT_INSTANCE_TYPE}"
    )
    deploy.add_argument("--instance-count", type=_positive, default=1)
    deploy.add_argument("--role", help="SageMaker execution role ARN (default: the run's backend.role)")
    deploy.add_argument(
        "--bucket", help="S3 bucket (default: the run's backend.bucket, else sagemaker-REGION-ACCOUNT)"
    )
    deploy.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"S3 key prefix (default {DEFAULT_PREFIX})")
    deploy.add_argument(
        "--region", help="AWS region (default: the run's backend.region, else AWS_DEFAULT_REGION)"
    )
    deploy.add_argument(
        "--name", help="endpoint, endpoint config and model name (default sftbridge-RUN-TIME)"
    )
    deploy.add_argument(
        "--tgi-version", help="Hugging Face LLM image version (default: newest the SDK lists)"
    )
    deploy.add_argument(
        "--dtype", choices=["bfloat16", "float16"], help="merged weights (default: bf16; fp16 on pre-Ampere)"
    )
    deploy.add_argument("--no-wait", action="store_true", help="return once the endpoint is being created")
    deploy.set_defaults(func=cmd_deploy)

    invoke = commands.add_parser("invoke", help="ask a deployed endpoint a question (the run's template)")
    invoke.add_argument("endpoint")
    invoke.add_argument("question")
    invoke.add_argument("--region")
    invoke.add_argument(
        "--run", type=Path, help="format with this run's template (default: the endpoint's record)"
    )
    invoke.add_argument("--raw", action="store_true", help="send the question as is, unformatted")
    invoke.add_argument("--max-new-tokens", type=_positive)
    invoke.add_argument("--temperature", type=float, help="sample at this temperature (default: the run's)")
    invoke.add_argument("--top-p", type=float)
    invoke.add_argument("--json", action="store_true", help="print the request and the whole response")
    invoke.set_defaults(func=cmd_invoke)

    undeploy = commands.add_parser("undeploy", help="delete an endpoint, its endpoint config and its model")
    undeploy.add_argument("endpoint")
    undeploy.add_argument("--region")
    undeploy.set_defaults(func=cmd_undeploy)


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from sftbridge.serve import ServeSettings, load_predictor, make_server

    settings = ServeSettings(
        host=args.host,
        port=args.port,
        max_new_tokens_cap=args.max_new_tokens_cap,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
    )
    predictor = load_predictor(args.run, device=args.device)
    try:
        server = make_server(predictor, settings, source=str(args.run))
    except OSError as exc:
        raise UserError(
            f"--host {args.host} --port {args.port}: cannot listen ({exc}); try --port 0"
        ) from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s: reachable from other machines, and the server has no authentication", args.host
        )
    # SageMaker and process managers stop a container with SIGTERM: shut down as on Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(
        f"serving {args.run} on {server.url} "
        "(POST /generate, /generate_stream, /invocations, /v1/chat/completions)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from sftbridge.merge import merge_run

    out = merge_run(
        args.run, args.out, dtype=args.dtype, device=args.device, max_shard_size=args.max_shard_size
    )
    print(f"merged model: {out}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from sftbridge.deploy import deploy

    result = deploy(
        args.run,
        name=args.name,
        instance_type=args.instance_type,
        instance_count=args.instance_count,
        role=args.role,
        bucket=args.bucket,
        region=args.region,
        prefix=args.prefix,
        tgi_version=args.tgi_version,
        dtype=args.dtype,
        wait=not args.no_wait,
    )
    print(
        f"endpoint {result['endpoint']}: {result['status']} ({result['instance_type']}, {result['region']})"
    )
    print(f"image {result['image']}")
    print(f"model {result['model_data']}")
    print(f'ask it: sftbridge invoke {result["endpoint"]} "your question"')
    return 0


def cmd_invoke(args: argparse.Namespace) -> int:
    from sftbridge.deploy import invoke

    request, answer = invoke(
        args.endpoint,
        args.question,
        region=args.region,
        run=args.run,
        raw=args.raw,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    if args.json:
        print(json.dumps({"request": request, "response": answer}, indent=2, ensure_ascii=False))
    else:
        print(str(answer.get("generated_text", answer) if isinstance(answer, dict) else answer).strip())
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    from sftbridge.deploy import undeploy

    for item in undeploy(args.endpoint, region=args.region):
        print(f"deleted {item}")
    return 0
