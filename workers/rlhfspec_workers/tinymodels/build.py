"""Build, cache and resolve the tiny-model kit (policy, draft, reward model, tokenizer, dataset).

Where it sits: the first step of every local run and test. Models cannot be downloaded here, so
the project trains its own small HF-format models from a seeded recipe; manifests name them as
``tiny://policy`` / ``tiny://draft`` / ``tiny://reward`` and :func:`resolve_model_uri` maps those
to directories of the cached kit, which :func:`ensure_tiny_models` builds on first use.

Kit layout (every model dir is self-contained: weights, config, tokenizer, generation config)::

    <kit>/policy/      LlamaForCausalLM target, bf16 safetensors
    <kit>/draft/       smaller LlamaForCausalLM distilled from the target
    <kit>/reward/      LlamaForSequenceClassification (num_labels=1), score > 0 = "correct"
    <kit>/tokenizer/   the shared character-level tokenizer alone
    <kit>/dataset/     train.jsonl, eval.jsonl (fields prompt, answer)
    <kit>/kit.json     KitReport: recipe, versions, timings, quality numbers, relative paths
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rlhfspec_workers.tinymodels.recipe import RECIPE_VERSION, TinyRecipe
from rlhfspec_workers.tinymodels.report import KitReport

KIT_FILE = "kit.json"
MODEL_NAMES = ("policy", "draft", "reward")
URI_NAMES = (*MODEL_NAMES, "tokenizer", "dataset")
TINY_SCHEME = "tiny://"

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def cache_root() -> Path:
    """``$RLHFSPEC_CACHE/tiny-models`` (default ``~/.cache/rlhfspec/tiny-models``)."""
    base = os.environ.get("RLHFSPEC_CACHE") or str(Path.home() / ".cache" / "rlhfspec")
    return Path(base).expanduser() / "tiny-models"


def default_kit_dir(seed: int = 0, recipe: TinyRecipe | None = None) -> Path:
    """Cache directory of the kit for ``(recipe, seed)``; its name is the recipe hash."""
    return cache_root() / (recipe or TinyRecipe()).key(seed)


def load_report(kit_dir: Path) -> KitReport:
    """The KitReport of a built kit (raises FileNotFoundError when the kit is incomplete)."""
    return KitReport.from_json(json.loads((kit_dir / KIT_FILE).read_text()))


def build_tiny_models(
    out_dir: Path,
    seed: int = 0,
    force: bool = False,
    recipe: TinyRecipe | None = None,
    steps_scale: float = 1.0,
    log: Log | None = None,
) -> KitReport:
    """Build the kit into ``out_dir``; a no-op returning the stored report if it is complete.

    The kit is built in a sibling temp dir and renamed into place, so ``out_dir`` is either
    absent, the old kit, or the complete new kit, never half-written. ``steps_scale`` < 1
    shrinks every training stage (tests use it to exercise the real code path cheaply).
    Raises FileExistsError when ``out_dir`` holds something that is not a kit.
    """
    out_dir = Path(out_dir)
    if (out_dir / KIT_FILE).exists() and not force:
        return load_report(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / KIT_FILE).exists():
        raise FileExistsError(f"{out_dir} exists, is not empty and holds no {KIT_FILE}")
    recipe = recipe or TinyRecipe()
    if steps_scale != 1.0:
        recipe = recipe.scaled(steps_scale)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        # Imported here: building needs torch, resolving a cached kit does not.
        from rlhfspec_workers.tinymodels.pipeline import run_build

        report = run_build(tmp, seed, recipe, log or _quiet)
        _normalise_permissions(tmp)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _normalise_permissions(root: Path) -> None:
    """mkdtemp makes 0700 dirs and some writers 0600 files; a shared cache must be readable
    by other users (e.g. an engine container running as another uid), so apply the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace_dir(new: Path, dest: Path) -> None:
    """Move ``new`` to ``dest``; an existing ``dest`` is moved aside first, then deleted."""
    old: Path | None = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        dest.rename(old)
    new.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock: a second process building the same kit waits, then reuses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_tiny_models(
    seed: int = 0, recipe: TinyRecipe | None = None, log: Log | None = None
) -> Path:
    """The cached kit dir for ``(recipe, seed)``, built on first use (once across processes)."""
    recipe = recipe or TinyRecipe()
    kit_dir = default_kit_dir(seed, recipe)
    if (kit_dir / KIT_FILE).exists():
        return kit_dir
    with _file_lock(kit_dir.with_name(f".{kit_dir.name}.lock")):
        # Another process may have finished the build while this one waited for the lock.
        if not (kit_dir / KIT_FILE).exists():
            build_tiny_models(kit_dir, seed=seed, force=True, recipe=recipe, log=log)
    return kit_dir


def resolve_model_uri(uri: str, seed: int = 0) -> Path:
    """``tiny://<name>[/<sub/path>]`` -> path inside the cached kit; a plain path -> Path.

    ``name`` is one of policy, draft, reward, tokenizer, dataset. Other ``scheme://`` URIs are
    rejected rather than treated as relative paths, so a typo fails loudly.
    """
    if uri.startswith(TINY_SCHEME):
        rest = uri[len(TINY_SCHEME) :].strip("/")
        name, _, sub = rest.partition("/")
        if name not in URI_NAMES:
            raise ValueError(f"unknown tiny model {name!r} in {uri!r}; expected one of {URI_NAMES}")
        target = ensure_tiny_models(seed=seed) / name
        return target / sub if sub else target
    if "://" in uri:
        raise ValueError(f"unsupported model URI scheme in {uri!r} (only tiny:// and paths)")
    return Path(uri).expanduser()


__all__ = [
    "KIT_FILE",
    "MODEL_NAMES",
    "RECIPE_VERSION",
    "KitReport",
    "TinyRecipe",
    "build_tiny_models",
    "cache_root",
    "default_kit_dir",
    "ensure_tiny_models",
    "load_report",
    "resolve_model_uri",
]
