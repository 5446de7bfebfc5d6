"""The CLI owns its output: a library that logs a warning while it is imported changes no command's output.

On a CPU with AVX512-BF16 (most current Xeon and Zen 4 servers), importing bitsandbytes logs
``Failed to load CPU gemm_4bit_forward from kernels-community``; PEFT imports bitsandbytes, so every
command did.
So that every machine tests both kinds of CPU, a ``sitecustomize`` on the subprocess's PYTHONPATH makes
bitsandbytes believe it has the instruction (``bitsandbytes.functional.has_avx512bf16`` answers True), and the
real import-time warning fires as it does on those servers; without the hook the CPU's own flags decide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, run_clis

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


def cpu_has_avx512bf16() -> bool:
    """Whether this CPU has AVX512-BF16: the kernel's flags, else bitsandbytes' own probe."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        return "avx512_bf16" in cpuinfo.read_text().split()
    probe = "import bitsandbytes.functional as F; print(bool(F.has_avx512bf16()))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=plain_env())
    return result.stdout.strip().endswith("True")


@pytest.mark.slow
def test_the_hook_makes_bitsandbytes_warn_at_import(tmp_path: Path) -> None:
    """The simulation has teeth: outside the CLI, importing bitsandbytes under the hook prints the warning;
    a plain import prints it exactly when the CPU has AVX512-BF16 (the CLI hides it on both kinds of CPU)."""
    pytest.importorskip("bitsandbytes")
    probe = "import logging; logging.basicConfig(); import bitsandbytes"
    hooked = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=avx512bf16_env(tmp_path)
    )
    assert hooked.returncode == 0, hooked.stderr[-2000:]
    assert WARNING in hooked.stderr
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=plain_env())
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert (WARNING in plain.stderr) == cpu_has_avx512bf16()


@pytest.mark.slow
def test_an_import_time_warning_changes_no_command(short_run: Path, tmp_path: Path) -> None:
    """Each command on a plain CPU and on a hooked one, side by side, each on its own copy of the run (eval
    writes into the run it scores): the same exit code and output, but for the copy's name."""
    pytest.importorskip("bitsandbytes")
    envs = {"plain": plain_env(), "hooked": avx512bf16_env(tmp_path)}
    for name in envs:
        shutil.copytree(short_run, tmp_path / name)

    def argv_for(name: str) -> list[list[str]]:
        run = str(tmp_path / name)
        return [
            ["generate", run, QUESTION, "--device", "cpu"],
            ["eval", run, "--limit", "2", "--no-base", "--device", "cpu"],
            ["merge", run, "--out", str(tmp_path / f"{name}-merged")],
            ["generate", str(tmp_path / "missing-run"), QUESTION],  # an error exits the same way too
        ]

    for plain_argv, hooked_argv in zip(argv_for("plain"), argv_for("hooked"), strict=True):
        expected, got = run_clis((plain_argv, envs["plain"]), (hooked_argv, envs["hooked"]))
        assert expected.returncode == 0 or plain_argv[1].endswith("missing-run"), expected.stderr[-2000:]
        assert (got.returncode, got.stdout, got.stderr) == (
            expected.returncode,
            expected.stdout.replace("plain", "hooked"),
            expected.stderr.replace("plain", "hooked"),
        ), hooked_argv
        assert WARNING not in got.stderr + got.stdout

    # -v (or SFTBRIDGE_VERBOSE=1) shows the libraries' warnings again.
    question = ["generate", str(tmp_path / "hooked"), QUESTION, "--device", "cpu"]
    verbose, by_env = run_clis(
        (["-v", *question], envs["hooked"]), (question, {**envs["hooked"], "SFTBRIDGE_VERBOSE": "1"})
    )
    assert verbose.returncode == 0 and WARNING in verbose.stderr
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
