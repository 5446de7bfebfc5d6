"""The CLI owns its output: a library that logs a warning while it is imported changes no command's output.

On a CPU with AVX512-BF16 (most current Xeon and Zen 4 servers), importing bitsandbytes logs
``Failed to load CPU gemm_4bit_forward from kernels-community``; PEFT imports bitsandbytes, so every
command did.
Our machines lack the instruction, so a ``sitecustomize`` on the subprocess's PYTHONPATH makes bitsandbytes
believe it has it (``bitsandbytes.functional.has_avx512bf16`` answers True), and the real import-time warning
fires as it does on those servers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
QUESTION = "What pigment produced by skin cells gives human skin, hair, and eyes much of their color?"

SITECUSTOMIZE = '''
"""Test hook: bitsandbytes believes this CPU has AVX512-BF16 (its CPU ops then warn at import)."""
import importlib.abc
import sys


class _PatchAfterLoad(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util

            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            module.has_avx512bf16 = lambda: True

        loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchAfterLoad())
'''


def avx512bf16_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess on a (simulated) CPU with AVX512-BF16."""
    hook = tmp_path / "avx512bf16"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def plain_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "SFTBRIDGE_VERBOSE"}, **extra}


@pytest.mark.slow
def test_the_hook_makes_bitsandbytes_warn_at_import(tmp_path: Path) -> None:
    """The simulation has teeth: outside the CLI, importing bitsandbytes under the hook prints the warning."""
    pytest.importorskip("bitsandbytes")
    probe = "import logging; logging.basicConfig(); import bitsandbytes"
    hooked = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=avx512bf16_env(tmp_path)
    )
    assert hooked.returncode == 0, hooked.stderr[-2000:]
    assert WARNING in hooked.stderr
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=plain_env())
    assert WARNING not in plain.stderr


@pytest.mark.slow
def test_an_import_time_warning_changes_no_command(trained_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    hooked, plain = avx512bf16_env(tmp_path), plain_env()
    run = shutil.copytree(trained_run, tmp_path / "run")  # eval writes its results into the run it scores
    commands = [
        ("generate", str(run), QUESTION, "--device", "cpu"),
        ("eval", str(run), "--limit", "2", "--no-base", "--device", "cpu"),
        ("generate", str(tmp_path / "missing-run"), QUESTION),  # an error exits the same way too
    ]
    for argv in commands:
        expected = run_cli(*argv, env=plain)
        got = run_cli(*argv, env=hooked)
        assert (got.returncode, got.stdout, got.stderr) == (
            expected.returncode,
            expected.stdout,
            expected.stderr,
        ), argv
        assert WARNING not in got.stderr + got.stdout

    # merge writes a folder: compare its output with the same command's on a plain CPU.
    merged = [
        run_cli("merge", str(trained_run), "--out", str(tmp_path / name), env=env)
        for name, env in (("plain", plain), ("hooked", hooked))
    ]
    assert [m.returncode for m in merged] == [0, 0], merged[1].stderr[-2000:]
    assert merged[1].stderr == merged[0].stderr
    assert merged[1].stdout == merged[0].stdout.replace("plain", "hooked")

    # -v (or SFTBRIDGE_VERBOSE=1) shows the libraries' warnings again.
    verbose = run_cli("-v", *commands[0], env=hooked)
    assert verbose.returncode == 0 and WARNING in verbose.stderr
    by_env = run_cli(*commands[0], env={**hooked, "SFTBRIDGE_VERBOSE": "1"})
    assert by_env.returncode == 0 and WARNING in by_env.stderr


@pytest.mark.slow
def test_train_child_keeps_library_warnings_out(tmp_path: Path) -> None:
    """The training child process owns its output the same way (PEFT imports bitsandbytes in it).

    Not in 4-bit: the hook makes bitsandbytes run AVX512-BF16 code, which a CPU without it cannot execute."""
    pytest.importorskip("bitsandbytes")
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        str(ROOT / "configs" / "tiny-cpu.yaml"),
        "--run-dir",
        str(run_dir),
        "train.max_steps=2",
        "data.test_file=null",
        env=avx512bf16_env(tmp_path),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert WARNING not in result.stdout + result.stderr
    assert f"run directory: {run_dir}" in result.stdout
