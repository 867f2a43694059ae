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
    assert any(
        line.startswith("spec.models.critic.path: 'tiny://reward': no such directory")
        for line in lines
    )
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


def test_remote_model_uri_is_read_only_from_its_fetched_copy(kit: Path, tmp_path: Path) -> None:
    spec = spec_of("tiny-grpo.yaml").model_copy(deep=True)
    spec.models.policy.path = "hf://org/model"
    with pytest.raises(PreflightError) as info:
        preflight(spec, tiny=resolver(kit))
    assert str(info.value.errors[0]).startswith(
        "spec.models.policy.path: 'hf://org/model' is read from the job's storage, here none "
        "(a location fetched into the job's storage first"
    )
    storage = tmp_path / "storage"
    fetched = storage / "fetched" / "hf" / "org--model@main"
    assert _errors(spec, kit, storage, cluster=True) == [
        f"spec.models.policy.path: 'hf://org/model' has not been fetched (no {fetched}) (a "
        "location fetched into the job's storage first: on a cluster the job's fetch init "
        "container does it; locally run `rlhfspec worker fetch FILE --storage RUN_DIR` first)"
    ]
    shutil.copytree(kit / "policy", fetched)
    resolved = preflight(spec, storage_root=storage, tiny=resolver(kit), cluster=True)
    assert resolved.models["spec.models.policy"] == fetched
    # A copy that another pod of the job replaced with a symlink out of the storage is refused.
    shutil.rmtree(fetched)
    fetched.symlink_to(kit / "policy")
    assert _errors(spec, kit, storage, cluster=True)[0].startswith(
        f"spec.models.policy.path: 'hf://org/model': its copy {fetched} leads outside the job's "
        "storage"
    )


# --- locations may not leave the job's storage, nor read the pod's filesystem (#17, 5) -------


def _with(spec: RLHFJobSpec, policy: str | None = None, dataset: str | None = None) -> RLHFJobSpec:
    changed = spec.model_copy(deep=True)
    if policy is not None:
        changed.models.policy.path = policy
    if dataset is not None:
        changed.dataset.path = dataset
    return changed


def _errors(spec: RLHFJobSpec, kit: Path, storage: Path, cluster: bool = False) -> list[str]:
    with pytest.raises(PreflightError) as info:
        preflight(spec, storage_root=storage, tiny=resolver(kit), cluster=cluster)
    return [str(e) for e in info.value.errors]


@pytest.mark.parametrize("location", ["pvc://../../../etc", "pvc://models/../../etc", "pvc:///etc"])
def test_a_pvc_location_outside_the_storage_is_refused(
    kit: Path, tmp_path: Path, location: str
) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    lines = _errors(_with(spec_of("tiny-grpo.yaml"), policy=location), kit, storage)
    assert lines == [
        f"spec.models.policy.path: {location!r} leaves the job's storage (pvc://<relative path "
        "under the job's storage>, without '..' or a leading '/')"
    ]


def test_a_symlink_on_the_claim_cannot_lead_out_of_it(kit: Path, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    (storage / "data").symlink_to(kit / "dataset")  # planted by any pod of the job
    spec = _with(spec_of("tiny-grpo.yaml"), dataset="pvc://data/train.jsonl")
    [line] = _errors(spec, kit, storage)
    assert line.startswith("spec.dataset.path: 'pvc://data/train.jsonl' resolves to ")
    assert "outside the job's storage" in line


def test_a_pvc_location_inside_the_storage_resolves(kit: Path, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    shutil.copytree(kit / "policy", storage / "models" / "policy")
    spec = _with(spec_of("tiny-grpo.yaml"), policy="pvc://models/policy")
    resolved = preflight(spec, storage_root=storage, tiny=resolver(kit), cluster=True)
    assert resolved.models["spec.models.policy"] == (storage / "models" / "policy").resolve()


@pytest.mark.parametrize("form", ["file://{}", "{}"], ids=["file-uri", "bare-path"])
def test_a_cluster_pod_refuses_paths_on_its_own_filesystem(
    kit: Path, tmp_path: Path, form: str
) -> None:
    location = form.format(kit / "policy")
    spec = _with(spec_of("tiny-grpo.yaml"), policy=location)
    assert _errors(spec, kit, tmp_path, cluster=True) == [
        f"spec.models.policy.path: {location!r} is a path on the pod's own filesystem, which a "
        "cluster job may not read models or data from (on a cluster: pvc://<path under the "
        "job's storage>, tiny:// or zoo://)"
    ]
    # Local mode reads this machine's files: the same spec passes there.
    assert preflight(spec, storage_root=tmp_path, tiny=resolver(kit)).models


def test_only_local_mode_workers_are_local() -> None:
    from rlhfspec_workers.local.supervisor import local_worker_env
    from rlhfspec_workers.runtime import WorkerEnv

    env = local_worker_env(
        job="j", namespace="n", replicas=1, redis_port=6379, redis_password="p",
        job_config=Path("job.yaml"), storage=Path("."),
    )  # fmt: skip
    assert WorkerEnv.from_environ("trainer", env).local
    pod = {k: v for k, v in env.items() if k != "RLHFSPEC_LOCAL"}  # what the operator sets
    assert not WorkerEnv.from_environ("trainer", pod).local
