"""``sftbridge export RUN --format gguf --out DIR``: one GGUF file and an Ollama Modelfile."""

from __future__ import annotations

import argparse
from pathlib import Path

from sftbridge.cli.options import add_device, add_merge_dtype, add_run, add_trust_remote_code


def export_arguments(parser: argparse.ArgumentParser) -> None:
    add_run(parser, "run directory (merged on the way) or a merged folder")
    parser.add_argument(
        "--format", default="gguf", choices=["gguf"], help="gguf: llama.cpp, Ollama, LM Studio"
    )
    parser.add_argument(
        "--quant",
        default="f16",
        choices=["f16", "q8_0"],
        help="f16: 2 bytes/param; q8_0: ~1.06 bytes/param, llama.cpp's 8-bit blocks (norms stay fp32)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    add_merge_dtype(
        parser, "a run's merge: auto = fp32 on the CPU, the run's 16-bit precision on a GPU (see `merge`)"
    )
    add_device(parser)
    add_trust_remote_code(parser)
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from sftbridge.inference.export import export_folder

    exported = export_folder(
        args.run,
        args.out,
        format=args.format,
        quant=args.quant,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"gguf: {exported.gguf}")
    print(f"ollama: {exported.modelfile} (ollama create NAME -f {exported.modelfile})")
    return 0
