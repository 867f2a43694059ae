"""Preflight names the field and file of every missing model, vocabulary mismatch and bad row."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.preflight import PreflightError, preflight

ROOT = Path(__file__).resolve().parents[2]


def make_model(path: Path, vocab: int) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    (path / "tokenizer.json").write_text("{}")


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    make_model(tmp_path / "kit" / "policy", 64)
    make_model(tmp_path / "kit" / "draft", 64)
    make_model(tmp_path / "kit" / "reward", 64)
    data = tmp_path / "kit" / "dataset"
    data.mkdir()
    rows = [{"prompt": "S312=", "answer": "123"}, {"prompt": "S21=", "answer": "12"}]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "kit"


def spec_of(example: str) -> RLHFJobSpec:
    return parse_rlhfjob(yaml.safe_load((ROOT / "examples" / example).read_text())).spec


def resolver(kit: Path) -> Callable[[str], Path]:
    return lambda uri: kit / uri.removeprefix("tiny://")


def test_examples_pass_with_a_complete_kit(kit: Path) -> None:
    for example in ("tiny-grpo.yaml", "tiny-ppo.yaml"):
        resolved = preflight(spec_of(example), tiny=resolver(kit))
        assert resolved.models["spec.models.policy"] == kit / "policy"
        assert resolved.dataset == kit / "dataset" / "train.jsonl"


def test_missing_model_and_vocab_mismatch_are_named(kit: Path) -> None:
    shutil.rmtree(kit / "reward")
    (kit / "draft" / "config.json").write_text(json.dumps({"vocab_size": 32000}))
    with pytest.raises(PreflightError) as info:
        preflight(spec_of("tiny-ppo.yaml"), tiny=resolver(kit))
    lines = [str(e) for e in info.value.errors]
    assert any(line.startswith("spec.models.critic.path: 'tiny://reward': no such directory")
               for line in lines)
    assert any(line.startswith("spec.models.reward.path:") for line in lines)
    assert (
        "spec.generation.speculative.drafters[0].model.path: the draft model's vocabulary (32000) "
        "differs from the policy's (64) (a draft model sharing the policy's tokenizer)"
    ) in lines


def test_dataset_row_missing_a_field_names_file_line_and_field(kit: Path) -> None:
    path = kit / "dataset" / "train.jsonl"
    path.write_text(path.read_text() + json.dumps({"question": "S9=", "answer": "9"}) + "\n")
    with pytest.raises(PreflightError) as info:
        preflight(spec_of("tiny-grpo.yaml"), tiny=resolver(kit))
    assert [str(e) for e in info.value.errors] == [
        f"spec.dataset.promptField: {path}:3: row has no field 'prompt' "
        "(every row has it (dots name nested keys), or change promptField)"
    ]


def test_remote_model_uri_is_refused_locally(kit: Path) -> None:
    spec = spec_of("tiny-grpo.yaml").model_copy(deep=True)
    spec.models.policy.path = "hf://org/model"
    with pytest.raises(PreflightError) as info:
        preflight(spec, tiny=resolver(kit))
    assert str(info.value.errors[0]).startswith(
        "spec.models.policy.path: hf:// locations are fetched on a cluster, not in local mode"
    )
