"""Session-wide fixtures shared by the whole suite.

``tiny_kit``: the cached tiny-model kit (built once per machine into $RLHFSPEC_CACHE, ~3-5 min
on a 2-core CPU; later sessions reuse it).
``spec_engine``: ONE in-process vLLM CPU engine for the whole session — target ``policy/`` with
``draft/`` as draft model, k=4, greedy-capable, stats enabled. vLLM engines are slow to start
and heavy (~2 GB), so tests share this one instead of building their own. Rules for tests that
use it: do not shut it down or change its state globally; its metrics counters are cumulative
over the session, so measure deltas around your own requests
(``rlhfspec_workers.tinymodels.engine.spec_counters``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_kit() -> Path:
    from rlhfspec_workers.tinymodels import ensure_tiny_models

    return ensure_tiny_models(seed=0)


@pytest.fixture(scope="session")
def spec_engine(tiny_kit: Path) -> Iterator[Any]:
    from rlhfspec_workers.tinymodels.engine import tiny_spec_llm

    llm = tiny_spec_llm(tiny_kit, num_speculative_tokens=4)
    yield llm
    # In-process engine: drop the reference so its memory goes with the session, not earlier.
    del llm
