"""How fast ``sftbridge export --format gguf`` writes, and in how much memory: a random Llama with the
built-in tokenizer, saved as fp32 safetensors, then written as f16 and as q8_0 in a fresh process each. It
reports the time, the peak RSS and the peak growth of private memory (the writer streams: that growth should
be a few times the largest tensor, not the model). A run's merge comes first in a real export and is not
timed here (``sftbridge merge``).

    python benchmarks/gguf_export.py                       # hidden 2048, 4 layers: ~0.2 B parameters
    python benchmarks/gguf_export.py --hidden 1024 --layers 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20


def build(folder: Path, hidden: int, layers: int) -> int:
    """A random Llama with Llama-2's proportions (head 128, MLP 2.75 x hidden) and the built-in tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftbridge.config import ModelSection
    from sftbridge.models.loading import load_tokenizer

    tokenizer = load_tokenizer(ModelSection())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 256 * 256,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def anonymous_mib() -> float:
    """This process's private memory (RssAnon): the safetensors it reads are mapped files, counted in RSS as
    page cache the kernel can drop, so peak RSS alone would count the whole input file."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write(folder: Path, quant: str) -> dict[str, Any]:
    """In this (fresh) process: write the GGUF; seconds, size, peak RSS and peak private memory (sampled
    every 5 ms) over what the process held before (Python, torch, gguf imported)."""
    import gguf  # noqa: F401 (imported before the baseline)
    import torch  # noqa: F401

    from sftbridge.inference.gguf_file import write_gguf

    out = folder / f"model-{quant}.gguf"
    baseline = anonymous_mib()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], anonymous_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    write_gguf(folder, out, quant=quant)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {
        "quant": quant,
        "seconds": round(seconds, 2),
        "gguf_mib": round(out.stat().st_size / MIB, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_private_growth_mib": round(max(peak[0], anonymous_mib()) - baseline, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "QUANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(write(Path(args.worker[0]), args.worker[1])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parameters = build(folder, args.hidden, args.layers)
        fp32_mib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / MIB
        rows = []
        for quant in ("f16", "q8_0"):
            done = subprocess.run(
                [sys.executable, __file__, "--worker", str(folder), quant],
                check=True,
                capture_output=True,
                text=True,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["input_mib_per_s"] = round(fp32_mib / row["seconds"], 1)
            rows.append(row)
    result = {
        "parameters": parameters,
        "hidden": args.hidden,
        "layers": args.layers,
        "fp32_safetensors_mib": round(fp32_mib, 1),
        "results": rows,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
