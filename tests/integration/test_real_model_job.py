"""`rlhfspec run` on a real pretrained chat model (SmolLM2 from the zoo): two GRPO iterations
through every stage (generation with adaptive speculation, rule reward, reference log-probs,
training, weight sync back to generation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.engine
@pytest.mark.slow
def test_two_grpo_iterations_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    job = yaml.safe_load((ROOT / "examples" / "smollm2-grpo.yaml").read_text())
    job["spec"]["algorithm"].update(iterations=2, promptsPerIteration=4, samplesPerPrompt=2,
                                    microBatchSize=4)  # fmt: skip
    job["spec"]["generation"]["maxNewTokens"] = 48
    job["spec"]["dataset"]["path"] = str(ROOT / "examples" / "data" / "arithmetic-chat.jsonl")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", "run", str(manifest), "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["iteration"] for r in records] == [1, 2]
    for record in records:
        assert record["samples"] == 8
        assert record["tokens"] > 0 and record["tokens_per_second"] > 0
        assert 0.0 <= record["reward_mean"] <= 1.0
        assert record["kl"] is not None
    # The second iteration sampled from the policy the first one trained.
    assert records[1]["weight_version"] == 2
    generation_log = (run_dir / "logs" / "generation-0.log").read_text()
    assert "policy v1 loaded" in generation_log
