"""benchmarks/gpu_suite.sh must refuse at once, clearly, on a machine without a GPU."""
import os
import shutil
import subprocess
from pathlib import Path

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.sh"


def test_gpu_suite_fails_at_once_without_a_gpu(tmp_path):
    # A PATH with the tools the check uses but no nvidia-smi: what a CPU machine looks like, even on a GPU host.
    for tool in ("dirname", "grep"):
        os.symlink(shutil.which(tool), tmp_path / tool)
    done = subprocess.run([shutil.which("bash"), str(SUITE)], env={"PATH": str(tmp_path)}, check=False,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "no NVIDIA GPU visible" in done.stderr and "Nothing ran" in done.stderr
    assert done.stdout == ""
