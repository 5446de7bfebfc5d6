"""Latency and throughput of the local endpoint against the inference wrapper called in-process.

    python benchmarks/serve_latency.py [--run RUN] [--requests 100] [--threads 1] [--rounds 5]

Without ``--run`` the shipped tiny config is trained first (a minute or more on 2 CPU cores). The endpoint is
``sftbridge serve`` in a subprocess, as a user runs it, called over HTTP/1.1 keep-alive with TGI's
``POST /generate``; the baseline is ``Predictor.generate`` in this process on the same questions with the
same decoding, and ``Predictor.generate_details`` (what the server runs per request) is timed too. The three
must give the same answers. Two scenarios: "short", greedy as the run's defaults say (the tiny model answers
the test questions in ~3 tokens, so the fixed cost of HTTP weighs most), and "long", sampled at temperature
1.5 with a seed per request (answers run to max_new_tokens, closer to real use).

The methods take turns in blocks of ``--block`` requests, in rotating order, so that noise from other work on
the machine hits all alike while each keeps its caches warm within a block (server and client are two
processes sharing the CPU). Server and baseline get the same number of torch threads (``--threads``,
default 1: on a shared 2-core machine multi-threaded timings swing several-fold).

Burst: 32 different test questions sent at once (32 connections, released together) against the same 32
sent one by one on one keep-alive connection, ``--rounds`` times in alternation; the server batches the
burst (``--max-batch-size``). Both must give the same greedy answers. Figure: requests/s of the burst over
requests/s one by one (median over rounds).

Prints Markdown tables and writes benchmarks/results/serve_latency.json and .md. Targets: the endpoint's p50
latency <= 1.10x the wrapper's ``generate``; the burst >= 3x the throughput of one by one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_latency.json"
BURST = 32
LONG_TEMPERATURE = 1.5  # hot enough that the tiny model rarely stops before max_new_tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def train_tiny(where: Path) -> Path:
    from sftbridge.config import load_config
    from sftbridge.training.train import train

    os.chdir(ROOT)  # the config's data paths are relative to the repository root
    return train(load_config(ROOT / "configs" / "tiny-cpu.yaml"), where / "tiny")


def start_server(run: Path, threads: int, max_batch_size: int) -> tuple[subprocess.Popen[str], str, int]:
    command = [sys.executable, "-m", "sftbridge.cli", "serve", str(run), "--port", "0", "--device", "cpu"]
    command += ["--max-batch-size", str(max_batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in the server
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()  # "serving RUN on http://127.0.0.1:PORT (...)"
    if " on http://" not in line:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    host, port = line.split(" on http://", 1)[1].split()[0].split(":")
    # Its access log follows on stdout: keep reading, or a full pipe would stall the server.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, host, int(port)


class Client:
    """One keep-alive connection, like a client library's session."""

    def __init__(self, host: str, port: int) -> None:
        self.connection = http.client.HTTPConnection(host, port, timeout=120)

    def generate(self, question: str, parameters: dict[str, Any]) -> str:
        body = json.dumps({"inputs": question, "parameters": parameters})
        self.connection.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload}")
        return str(payload["generated_text"])


Method = Callable[[int, str], str]  # (request number, question) -> answer


def methods_for(scenario: str, predictor: Any, client: Client) -> dict[str, Method]:
    import torch

    if scenario == "short":  # the run's own decoding (greedy)
        return {
            "Predictor.generate": lambda i, q: predictor.generate([predictor.prompt(q)])[0].text,
            "Predictor.generate_details": lambda i, q: predictor.generate_details(predictor.prompt(q)).text,
            "HTTP /generate": lambda i, q: client.generate(q, {}),
        }

    def seeded_generate(i: int, q: str) -> str:
        torch.manual_seed(i)  # what generate_details and the server do with "seed": i
        return str(
            predictor.generate([predictor.prompt(q)], do_sample=True, temperature=LONG_TEMPERATURE)[0].text
        )

    sampling = {"do_sample": True, "temperature": LONG_TEMPERATURE}
    return {
        "Predictor.generate": seeded_generate,
        "Predictor.generate_details": lambda i, q: (
            predictor.generate_details(predictor.prompt(q), seed=i, **sampling).text
        ),
        "HTTP /generate": lambda i, q: client.generate(q, {**sampling, "seed": i}),
    }


def measure(methods: dict[str, Method], questions: list[str], requests: int, block: int, warmup: int) -> Any:
    names = list(methods)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    answers: dict[str, list[str]] = {name: [] for name in names}
    for name in names:
        for i in range(warmup):
            methods[name](i, questions[i])
    for b in range(-(-requests // block)):
        numbers = range(b * block, (b + 1) * block)
        for name in names[b % 3 :] + names[: b % 3]:  # rotate who goes first
            for i in numbers:
                start = time.perf_counter()
                answer = methods[name](i, questions[i % len(questions)])
                latencies[name].append(time.perf_counter() - start)
                answers[name].append(answer.strip())
    if len({tuple(texts) for texts in answers.values()}) != 1:
        raise AssertionError("the methods gave different answers to the same requests")
    return latencies, answers[names[0]]


def summarize(latencies: dict[str, list[float]]) -> dict[str, Any]:
    stats: dict[str, Any] = {
        name: {
            "p50_ms": percentile(values, 50) * 1000,
            "p95_ms": percentile(values, 95) * 1000,
            "min_ms": min(values) * 1000,
            "mean_ms": sum(values) / len(values) * 1000,
            "requests_per_s": len(values) / sum(values),
        }
        for name, values in latencies.items()
    }
    base, http_ = latencies["Predictor.generate"], latencies["HTTP /generate"]
    stats["p50_ratio_http_vs_generate"] = (
        stats["HTTP /generate"]["p50_ms"] / stats["Predictor.generate"]["p50_ms"]
    )
    stats["paired_ratio_http_vs_generate_p50"] = percentile(
        [h / g for h, g in zip(http_, base, strict=True)], 50
    )
    stats["http_cost_ms_min_difference"] = (min(http_) - min(base)) * 1000
    return stats


def burst_round(host: str, port: int, questions: list[str]) -> tuple[float, list[str]]:
    """Seconds for all of ``questions`` sent at once, each on its own connection; the answers in order."""
    answers = [""] * len(questions)
    clients = [Client(host, port) for _ in questions]
    for client in clients:
        client.connection.connect()  # connected beforehand: the figure is the requests, not TCP set-up
    gate = threading.Barrier(len(questions) + 1)

    def send(i: int) -> None:
        gate.wait()
        answers[i] = clients[i].generate(questions[i], {}).strip()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    gate.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, answers


def one_by_one_round(client: Client, questions: list[str]) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = [client.generate(q, {}).strip() for q in questions]
    return time.perf_counter() - start, answers


def burst_figures(host: str, port: int, questions: list[str], rounds: int) -> dict[str, Any]:
    client = Client(host, port)
    one_by_one_round(client, questions[:4])  # warm-up
    burst_s, alone_s = [], []
    for r in range(rounds):
        order = [burst_round, one_by_one_round] if r % 2 == 0 else [one_by_one_round, burst_round]
        for method in order:
            if method is burst_round:
                seconds, together = burst_round(host, port, questions)
                burst_s.append(seconds)
            else:
                seconds, alone = one_by_one_round(client, questions)
                alone_s.append(seconds)
        if together != alone:
            raise AssertionError("the burst's greedy answers differ from the same questions one by one")
    ratios = sorted(a / b for a, b in zip(alone_s, burst_s, strict=True))
    return {
        "requests": len(questions),
        "rounds": rounds,
        "burst_seconds": burst_s,
        "one_by_one_seconds": alone_s,
        "burst_requests_per_s_median": len(questions) / percentile(burst_s, 50),
        "one_by_one_requests_per_s_median": len(questions) / percentile(alone_s, 50),
        "throughput_ratio_per_round": ratios,
        "throughput_ratio_median": percentile(ratios, 50),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run directory (default: train configs/tiny-cpu.yaml)")
    parser.add_argument("--requests", type=int, default=100, help="timed requests per method and scenario")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--block", type=int, default=10, help="requests per method in a row")
    parser.add_argument("--rounds", type=int, default=5, help="burst vs one-by-one rounds")
    parser.add_argument("--scenarios", default="short,long", help="lone-request scenarios to time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and in-process alike")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's --max-batch-size")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sftbridge.inference.predictor import Predictor

    scratch = tempfile.TemporaryDirectory(prefix="serve-bench-")
    run = args.run or train_tiny(Path(scratch.name))
    predictor = Predictor.from_run(run, device="cpu")
    test_file = ROOT / "data" / "sciq-sample" / "test.jsonl"
    questions = [json.loads(line)["question"] for line in test_file.read_text().splitlines() if line.strip()]
    process, host, port = start_server(run, args.threads, args.max_batch_size)
    scenarios: dict[str, Any] = {}
    try:
        client = Client(host, port)
        for scenario in args.scenarios.split(","):
            methods = methods_for(scenario, predictor, client)
            latencies, answers = measure(methods, questions, args.requests, args.block, args.warmup)
            tokens = [len(predictor.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
            scenarios[scenario] = {"mean_new_tokens": sum(tokens) / len(tokens), **summarize(latencies)}
        burst = burst_figures(host, port, questions[:BURST], args.rounds)
    finally:
        process.terminate()
        process.wait(timeout=30)
        scratch.cleanup()

    result = {
        "device": "cpu",
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "model": "builtin:tiny-llama + LoRA (configs/tiny-cpu.yaml)",
        "requests_per_method": args.requests,
        "max_new_tokens": predictor.generation.max_new_tokens,
        "scenarios": scenarios,
        "server": "sftbridge serve (FastAPI on uvicorn)",
        "max_batch_size": args.max_batch_size,
        "burst": burst,
        "load_average_1m_after": os.getloadavg()[0],
    }
    lines = [
        f"{args.requests} requests per method, CPU, {args.threads} torch thread(s), "
        f"load average {result['load_average_1m']:.1f} before / {result['load_average_1m_after']:.1f} after "
        "(a machine shared with other work: figures swing with it)",
        "",
        "| scenario | method | p50 ms | p95 ms | min ms | requests/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for scenario, stats in scenarios.items():
        label = f"{scenario} ({stats['mean_new_tokens']:.1f} tokens)"
        for name in ("Predictor.generate", "Predictor.generate_details", "HTTP /generate"):
            row = stats[name]
            lines.append(
                f"| {label} | {name} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['min_ms']:.1f} "
                f"| {row['requests_per_s']:.1f} |"
            )
    lines.append("")
    for scenario, stats in scenarios.items():
        lines.append(
            f"- {scenario}: p50 HTTP / Predictor.generate = {stats['p50_ratio_http_vs_generate']:.3f} "
            f"(target <= 1.10); paired median ratio {stats['paired_ratio_http_vs_generate_p50']:.3f}; "
            f"HTTP cost (difference of minima) {stats['http_cost_ms_min_difference']:.2f} ms"
        )
    lines.append(
        f"- burst of {burst['requests']} at once vs one by one ({burst['rounds']} rounds): "
        f"{burst['burst_requests_per_s_median']:.1f} vs {burst['one_by_one_requests_per_s_median']:.1f} "
        f"requests/s, throughput ratio {burst['throughput_ratio_median']:.2f}x median "
        f"(rounds: {', '.join(f'{r:.2f}' for r in burst['throughput_ratio_per_round'])}; target >= 3)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
