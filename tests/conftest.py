"""Session-wide fixtures shared by the whole suite.

``tiny_kit``: the cached tiny-model kit (built once per machine into $RLHFSPEC_CACHE, ~3-5 min
on a 2-core CPU; later sessions reuse it).
``spec_engine``: ONE in-process vLLM CPU engine for the whole session — target ``policy/`` with
``draft/`` as draft model, k=4, greedy-capable, stats enabled. vLLM engines are slow to start
and heavy (~2 GB), so tests share this one instead of building their own. Rules for tests that
use it: do not shut it down or change its state globally; its metrics counters are cumulative
over the session, so measure deltas around your own requests
(``rlhfspec_workers.tinymodels.engine.spec_counters``).
``password_redis``: one real redis-server with the password ``pw`` per test module (tests
that share it keep to keys of their own job, e.g. one job name per test).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The model zoo's session fixtures (smollm2_dir): tests/zoo_fixtures.py.
pytest_plugins = ["zoo_fixtures"]


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from rlhfspec_workers.local.redis_server import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis"), password="pw") as server:
        yield server


@pytest.fixture(scope="session")
def tiny_kit() -> Path:
    from rlhfspec_workers.tinymodels import ensure_tiny_models

    return ensure_tiny_models(seed=0)


@pytest.fixture(scope="session")
def draft_engine(tiny_kit: Path) -> Callable[..., Any]:
    """Builds a ``GenerationEngine`` as a generation worker runs it on the tiny kit: adaptive
    speculation with the tiny draft model (k <= 4), fp32, 16 slots, 64 MiB of KV cache.
    ``draft_engine(max_new_tokens, **engine_kwargs)``; the caller closes it."""

    def build(max_new_tokens: int, **engine_kwargs: Any) -> Any:
        from rlhfspec_api.generation import GenerationSpec
        from rlhfspec_workers.generation.engine import GenerationEngine

        spec = GenerationSpec.model_validate(
            {
                "maxNewTokens": max_new_tokens,
                "speculative": {
                    "mode": "adaptive",
                    "maxDraftTokens": 4,
                    "drafters": [{"method": "draft_model", "model": {"path": "tiny://draft"}}],
                },
            }
        )
        return GenerationEngine(
            spec,
            tiny_kit / "policy",
            draft_models={0: tiny_kit / "draft"},
            dtype="float32",
            max_num_seqs=16,
            kv_cache_bytes=64 << 20,
            **engine_kwargs,
        )

    return build


@pytest.fixture(scope="session")
def spec_engine(tiny_kit: Path) -> Iterator[Any]:
    from rlhfspec_workers.tinymodels.engine import tiny_spec_llm

    # fp32: tests compare its greedy tokens with HF's exactly, on CPUs with and without bf16.
    llm = tiny_spec_llm(tiny_kit, num_speculative_tokens=4, dtype="float32")
    yield llm
    # In-process engine: drop the reference so its memory goes with the session, not earlier.
    del llm
