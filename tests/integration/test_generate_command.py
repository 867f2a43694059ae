"""`rlhfspec generate`: offline rollouts from a manifest, and lossless checked from outside."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhfspec_workers.generation.offline import OUTPUT_FIELDS

ROOT = Path(__file__).resolve().parents[2]


def _generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", "generate", *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.engine
def test_generate_writes_every_sample_and_speculation_changes_no_token(
    tiny_kit: Path, tmp_path: Path
) -> None:
    job = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    job["spec"]["generation"]["speculative"] = {
        "mode": "fixed", "maxDraftTokens": 4,
        "drafters": [{"method": "draft_model", "model": {"path": "tiny://draft"}}],
    }  # fmt: skip
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    rows = [json.loads(line) for line in (tiny_kit / "dataset" / "eval.jsonl").open()][:6]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    common = ["--prompts", str(prompts), "--temperature", "0", "--max-new-tokens", "24",
              "--samples", "2", "--dtype", "float32"]  # fmt: skip
    outputs = {}
    for mode in ("fixed", "off"):
        out = tmp_path / f"{mode}.jsonl"
        result = _generate(str(manifest), *common, "--out", str(out), "--speculative", mode)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[mode] = [json.loads(line) for line in out.open()]
    fixed, off = outputs["fixed"], outputs["off"]
    assert len(fixed) == len(off) == 12
    assert all(set(row) == set(OUTPUT_FIELDS) for row in fixed)

    def key(row: dict[str, object]) -> tuple[str, int]:
        return str(row["prompt_id"]), int(str(row["sample_index"]))

    by_key = {key(row): row for row in off}
    assert {key(row) for row in fixed} == set(by_key)
    for row in fixed:
        ref = by_key[key(row)]
        assert row["token_ids"] == ref["token_ids"]
        assert len(row["logprobs"]) == len(row["token_ids"]) > 0
    assert sum(r["num_draft_tokens"] for r in fixed) > 0
    assert sum(r["num_draft_tokens"] for r in off) == 0
    # The trained tiny policy sorts most short lists: the text is the detokenised answer.
    assert all(isinstance(r["text"], str) and r["finish_reason"] in ("stop", "length")
               for r in fixed)  # fmt: skip
