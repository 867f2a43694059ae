"""Drafters without an engine: lookups, grouping, draft-model cache bookkeeping, config errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from family_models import family_model
from rlhfspec_api.generation import DrafterSpec, SpeculativeSpec
from rlhfspec_workers.drafters import registry
from rlhfspec_workers.drafters.base import DraftRow, cap_drafts
from rlhfspec_workers.drafters.draft_model import DraftModelDrafter, check_vocab
from rlhfspec_workers.drafters.llama_forward import LlamaDraftModel
from rlhfspec_workers.drafters.ngram import NgramDrafter, lookup
from rlhfspec_workers.drafters.suffix import SuffixDrafter


def row(
    req_id: str, tokens: list[int], prompt_len: int = 2, group: str = "g", max_k: int = 8
) -> DraftRow:
    return DraftRow(req_id, np.array(tokens, dtype=np.int64), prompt_len, group, max_k)


def tiny_llama(
    path: Path, *, vocab: int = 96, hidden: int = 128, layers: int = 2, seed: int = 0
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = hidden // 64
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("draft"))


# -- ngram --------------------------------------------------------------------------------


def test_ngram_continues_latest_occurrence_of_longest_tail() -> None:
    tokens = np.array([5, 6, 7, 1, 5, 6, 8, 2, 9, 5, 6], dtype=np.int64)
    # Tail (5, 6) occurs at 0 and 4; the latest (4) is followed by 8, 2, 9.
    assert lookup(tokens, 3, 2, 2) == [8, 2, 9]
    # A longer tail (9, 5, 6) has no earlier match; (5, 6) then wins.
    assert lookup(tokens, 2, 2, 3) == [8, 2]
    assert lookup(tokens, 0, 2, 3) == []
    assert lookup(np.array([1, 2, 3], dtype=np.int64), 4, 1, 2) == []


def test_ngram_drafter_respects_row_cap() -> None:
    drafter = NgramDrafter(1, 3)
    rows = [row("a", [1, 2, 3, 1, 2, 3, 1, 2], max_k=2), row("b", [4, 5, 6], max_k=8)]
    assert drafter.propose(rows, 5) == [[3, 1], []]


def test_ngram_index_drafts_what_a_fresh_scan_drafts_as_rows_grow() -> None:
    """The per-request index (built as a request grows) against ``lookup`` scanning the
    whole context: rows growing by 0-4 tokens a step, released now and then, and a request
    id reused for other tokens (the index must notice and rebuild)."""
    rng = np.random.default_rng(7)
    mismatches = 0
    for _ in range(300):
        min_n = int(rng.integers(1, 4))
        max_n = int(rng.integers(min_n, 6))
        drafter, tokens = NgramDrafter(min_n, max_n), list(rng.integers(0, 4, 3))
        for _ in range(12):
            tokens += list(rng.integers(0, 4, int(rng.integers(0, 5))))
            if rng.random() < 0.05:
                drafter.release(["r"])
            if rng.random() < 0.05:  # same id, other tokens: the last token tells
                tokens = [*tokens[:-1], 9]
            arr = np.array(tokens, dtype=np.int64)
            k, cap = int(rng.integers(0, 7)), int(rng.integers(0, 9))
            got = drafter.propose([row("r", tokens, max_k=cap)], k)[0]
            mismatches += got != lookup(arr, min(k, cap), min_n, max_n)
    assert mismatches == 0
    # Released rows leave nothing behind.
    drafter = NgramDrafter()
    drafter.propose([row("a", [1, 2, 1, 2]), row("b", [3, 4, 3])], 2)
    drafter.release(["a", "b"])
    assert drafter._rows == {}


# -- suffix -------------------------------------------------------------------------------


def test_suffix_drafts_from_siblings_of_the_same_group_only() -> None:
    drafter = SuffixDrafter(min_match=2)
    prompt = [1, 2]
    sibling = row("s1", [*prompt, 10, 11, 12, 13, 14], group="g")
    stranger = row("x1", [*prompt, 10, 11, 40, 41, 42], group="other")
    me = row("s2", [*prompt, 10, 11], group="g")
    drafts = drafter.propose([sibling, stranger, me], 3)
    assert drafts[2] == [12, 13, 14]
    # A fresh sibling matches on the prompt tail and drafts the first output tokens.
    assert drafter.propose([row("s3", prompt, group="g")], 2) == [[10, 11]]


def test_suffix_prefers_longest_match_and_keeps_history_across_iterations() -> None:
    drafter = SuffixDrafter(min_match=1, history_iterations=1)
    drafter.propose([row("a", [0, 0, 7, 3, 9, 5]), row("b", [0, 0, 8, 3, 9, 6])], 1)
    # Tail (8, 3, 9) matches b's longer context; (3, 9) alone would also match a.
    assert drafter.propose([row("c", [0, 0, 1, 8, 3, 9])], 1) == [[6]]
    drafter.release(["a", "b", "c"])
    drafter.new_iteration()
    # Next iteration: the same prompt drafts from last iteration's rollouts.
    assert drafter.propose([row("d", [0, 0, 7, 3])], 2) == [[9, 5]]
    drafter.new_iteration()
    drafter.new_iteration()  # history_iterations=1: two iterations later it is gone
    assert drafter.propose([row("e", [0, 0, 7, 3])], 2) == [[]]


def test_suffix_add_history_from_elsewhere() -> None:
    drafter = SuffixDrafter(min_match=2, history_iterations=2)
    drafter.add_history("g", [[1, 2, 3, 4, 5]])
    assert drafter.propose([row("a", [9, 2, 3], prompt_len=1)], 2) == [[4, 5]]


# -- draft model ----------------------------------------------------------------------------


@pytest.mark.parametrize("slot_order", [(2, 0, 1), (0, 1, 2)])
def test_llama_forward_matches_transformers(llama_dir: Path, slot_order: tuple[int, ...]) -> None:
    """Rows scattered over the cache's slots, or filling them in order (attention then runs
    on the queries as they are): either way HF's logits, grouped-query attention included."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    assert_forward_matches(hf, llama_dir, slot_order, lengths=(7, 12, 3))


def assert_forward_matches(
    hf: Any, path: Path, slot_order: tuple[int, ...], lengths: tuple[int, ...]
) -> None:
    """The draft forward of the model in ``path`` gives ``hf``'s last-token logits: rows of
    ``lengths`` prefilled in one padded call into the slots ``slot_order``, then topped up
    with two more tokens (one for the second row: rows of one call differ in length)."""
    model = LlamaDraftModel(path, max_slots=len(lengths), max_len=64, dtype=torch.float32)
    vocab = int(hf.config.vocab_size)
    seqs = [torch.randint(0, vocab, (n,)) for n in lengths]
    tokens = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    starts = torch.tensor(lengths)
    slots = torch.tensor(slot_order)
    first = model.forward(tokens, slots, torch.zeros(len(seqs), dtype=torch.long), starts)
    extra = torch.randint(0, vocab, (len(seqs), 2))
    added = [1 if i == 1 else 2 for i in range(len(seqs))]
    second = model.forward(extra, slots, starts, torch.tensor(added))
    with torch.no_grad():
        for i, s in enumerate(seqs):
            assert torch.allclose(first[i], hf(s[None]).logits[0, -1], atol=1e-4), i
            ref = hf(torch.cat([s, extra[i, : added[i]]])[None]).logits[0, -1]
            assert torch.allclose(second[i], ref, atol=1e-4), i


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so 15-token contexts reach its bands
}
FAMILY = {
    # name: (config class, its extra settings); every one differs from plain Llama in a way
    # the draft forward must reproduce (each was checked to fail, by 0.4-1.8 in the logits,
    # with that part of the forward left out).
    "llama-3-rope-and-biases": (
        "LlamaConfig",
        {"attention_bias": True, "mlp_bias": True, "rope_scaling": LLAMA3_ROPE},
    ),
    "mistral-sliding-window": ("MistralConfig", {"sliding_window": 4}),
    "qwen2-qkv-biases": ("Qwen2Config", {}),
    "qwen2-window-in-later-layers": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    "qwen3-query-key-norms": ("Qwen3Config", {}),
}


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_the_draft_forward_matches_transformers_across_the_llama_family(
    family: str, tmp_path: Path
) -> None:
    """Draft models for Llama-3, Mistral, Qwen2 and Qwen3 policies: the same logits as HF's
    own model, prefilled in one batched call and then topped up, rows scattered over slots."""
    import transformers

    config_class, extra = FAMILY[family]
    family_model(
        config_class, vocab_size=96, hidden_size=128, intermediate_size=256, head_dim=64, **extra
    ).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_forward_matches(hf, tmp_path, (2, 0, 1), lengths=(7, 13, 3))


def test_an_unsupported_rope_scaling_is_refused_naming_what_is(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=256,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"rope_type 'linear'.*\(default, llama3\)"):
        LlamaDraftModel(tmp_path, max_slots=1, max_len=32, dtype=torch.float32)


def test_a_draft_of_another_architecture_is_refused_naming_the_supported_ones(
    tmp_path: Path,
) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["GPTNeoXForCausalLM"]}')
    with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM.*Qwen2ForCausalLM"):
        LlamaDraftModel(tmp_path, max_slots=1, max_len=32, dtype=torch.float32)


def _fresh_drafts(path: Path, rows: list[DraftRow], k: int) -> list[list[int]]:
    fresh = DraftModelDrafter(path, max_slots=8, max_len=96, dtype=torch.float32)
    return fresh.propose(rows, k)


def test_draft_model_cache_rolls_back_to_accepted_prefix(llama_dir: Path) -> None:
    """Drafts after partial acceptance, skipped steps and slot compaction equal drafts from
    an empty cache: the cache bookkeeping never leaks a rejected token."""
    drafter = DraftModelDrafter(llama_dir, max_slots=8, max_len=96, dtype=torch.float32)
    rng = np.random.default_rng(0)
    ctx = {f"r{i}": list(rng.integers(0, 96, 5 + 3 * i)) for i in range(4)}
    for step in range(6):
        rows = [row(r, t, prompt_len=5) for r, t in ctx.items()]
        k = [3, 1, 5, 2, 4, 3][step]
        drafts = drafter.propose(rows, k)
        assert drafts == _fresh_drafts(llama_dir, rows, k)
        for t, d in zip(list(ctx.values()), drafts, strict=True):
            accepted = int(rng.integers(0, len(d) + 1))
            t.extend([*d[:accepted], int(rng.integers(0, 96))])  # + bonus/recovered token
            if step == 2:  # tokens appended while another drafter was in use
                t.extend(int(x) for x in rng.integers(0, 96, 3))
        if step == 3:  # r1 finishes: r3's slot moves into the hole
            drafter.release(["r1"])
            del ctx["r1"]
            assert sorted(drafter.slot.values()) == list(range(len(ctx)))


def test_draft_model_respects_caps(llama_dir: Path) -> None:
    drafter = DraftModelDrafter(llama_dir, max_slots=4, max_len=64, dtype=torch.float32)
    rows = [row("a", [1, 2, 3], max_k=0), row("b", [4, 5, 6], max_k=2), row("c", [7, 8, 9])]
    lengths = [len(d) for d in drafter.propose(rows, 4)]
    assert lengths == [0, 2, 4]
    assert cap_drafts([[1, 2, 3], [4]], rows[1:], 1) == [[1], [4]]


# -- registry and errors --------------------------------------------------------------------


def spec_with(*drafters: dict[str, object], **extra: object) -> SpeculativeSpec:
    return SpeculativeSpec.model_validate({"mode": "adaptive", "drafters": list(drafters), **extra})


def test_check_accepts_model_free_and_matching_draft(llama_dir: Path) -> None:
    spec = spec_with(
        {"method": "suffix"}, {"method": "ngram"}, {"method": "draft_model", "model": {"path": "d"}}
    )
    registry.check(spec, llama_dir, {2: llama_dir}, device="cpu")


def test_check_names_the_draft_model_with_another_vocabulary(
    llama_dir: Path, tmp_path: Path
) -> None:
    other = tiny_llama(tmp_path / "other", vocab=128)
    assert check_vocab(llama_dir, other) == "vocabulary size 128 differs from the policy's 96"
    spec = spec_with({"method": "ngram"}, {"method": "draft_model", "model": {"path": "tiny://x"}})
    with pytest.raises(registry.DrafterConfigError) as err:
        registry.check(spec, llama_dir, {1: other}, device="cpu")
    assert str(err.value).startswith(
        "generation.speculative.drafters[1].model: tiny://x: vocabulary size 128 differs"
    )


def test_check_names_a_draft_the_proposer_cannot_run_before_any_engine_starts(
    llama_dir: Path, tmp_path: Path
) -> None:
    """Same vocabulary, another architecture: the proposer's draft forward cannot run it, so
    the job's preflight says so on the drafter's field; vLLM's native path may still run it."""
    import json
    import shutil

    other = tmp_path / "neox"
    shutil.copytree(llama_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]})
    )
    spec = spec_with({"method": "suffix"}, {"method": "draft_model", "model": {"path": "tiny://x"}})
    with pytest.raises(registry.DrafterConfigError) as err:
        registry.check(spec, llama_dir, {1: other}, device="cpu")
    assert str(err.value).startswith(
        "generation.speculative.drafters[1].model: tiny://x: draft architecture "
        "['GPTNeoXForCausalLM'] is not supported"
    )
    native = spec_with({"method": "draft_model", "model": {"path": "tiny://x"}})
    registry.check(native, llama_dir, {0: other}, device="cpu", native=True)  # no error


def test_check_compares_tokenizers_when_both_have_one(llama_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(llama_dir, a)
    shutil.copytree(llama_dir, b)
    tok = {"model": {"vocab": {"x": 0, "y": 1}}, "added_tokens": []}
    (a / "tokenizer.json").write_text(json.dumps(tok))
    tok["model"]["vocab"] = {"x": 1, "y": 0}
    (b / "tokenizer.json").write_text(json.dumps(tok))
    assert "tokenizer differs" in (check_vocab(a, b) or "")


def test_eagle_is_refused_on_cpu_naming_the_field(llama_dir: Path) -> None:
    spec = SpeculativeSpec.model_validate(
        {"mode": "fixed", "drafters": [{"method": "eagle", "model": {"path": "e"}}]}
    )
    with pytest.raises(
        registry.DrafterConfigError, match=r"drafters\[0\]\.method: eagle needs a GPU"
    ):
        registry.check(spec, llama_dir, {0: llama_dir}, device="cpu", native=True)
    config = registry.native_config(spec.drafters[0], 4, llama_dir)
    assert config == {"method": "eagle", "model": str(llama_dir), "num_speculative_tokens": 4}


def test_unknown_drafter_and_bad_k_and_native_suffix(llama_dir: Path) -> None:
    with pytest.raises(
        registry.DrafterConfigError, match=r"drafters\[3\]\.method: unknown drafter 'medusa'"
    ):
        registry.entry("medusa", "generation.speculative.drafters[3].method")
    spec = spec_with({"method": "ngram"})
    with pytest.raises(registry.DrafterConfigError, match=r"perBatchSize\[1\.\.4\]: k=20"):
        registry.check(spec, llama_dir, {}, device="cpu", per_batch_size=[(1, 4, 20)])
    fixed = SpeculativeSpec.model_validate({"mode": "fixed", "drafters": [{"method": "suffix"}]})
    with pytest.raises(registry.DrafterConfigError, match="no vLLM-native baseline"):
        registry.check(fixed, llama_dir, {}, device="cpu", native=True)


def test_native_configs_for_baselines(llama_dir: Path) -> None:
    ngram = DrafterSpec.model_validate(
        {"method": "ngram", "promptLookupMin": 2, "promptLookupMax": 3}
    )
    assert registry.native_config(ngram, 4, None) == {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_min": 2,
        "prompt_lookup_max": 3,
    }
    draft = DrafterSpec.model_validate({"method": "draft_model", "model": {"path": "d"}})
    config = registry.native_config(draft, 8, llama_dir, per_batch_size=[(1, 4, 8), (5, 64, 2)])
    assert config == {
        "method": "draft_model",
        "model": str(llama_dir),
        "num_speculative_tokens": 8,
        "num_speculative_tokens_per_batch_size": [[1, 4, 8], [5, 64, 2]],
    }


def test_every_drafter_module_registers_itself_and_agrees_with_the_contract() -> None:
    from rlhfspec_api.generation import MODEL_BASED_DRAFTERS, DrafterMethod

    # Each method of the spec, plus "off", is one module with an ENTRY; nothing else is.
    assert set(registry.REGISTRY) == {m.value for m in DrafterMethod} | {"off"}
    for name, entry in registry.REGISTRY.items():
        assert entry.name == name
        is_model_based = name in {m.value for m in MODEL_BASED_DRAFTERS}
        assert entry.needs_model == is_model_based, name
    assert not registry.REGISTRY["eagle"].per_step and registry.REGISTRY["eagle"].gpu_only
    assert registry.REGISTRY["suffix"].native is None
    # A per-step factory builds the class the module defines.
    built = registry.build(spec_with({"method": "ngram"}).drafters[0], None, max_slots=2, max_len=8)
    assert isinstance(built, NgramDrafter)


def test_only_drafters_with_history_hear_about_new_iterations() -> None:
    from rlhfspec_workers.drafters.base import KeepsHistory

    assert isinstance(SuffixDrafter(), KeepsHistory)
    assert not isinstance(NgramDrafter(), KeepsHistory)


def test_draft_cache_grows_with_the_context_and_keeps_what_it_cached(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache starts with a few positions and doubles as contexts grow (an engine's
    max_len of 8192 would otherwise be allocated for every slot); drafts across the growth
    equal those of a cache allocated whole."""
    from rlhfspec_workers.drafters import llama_forward

    whole = DraftModelDrafter(llama_dir, max_slots=4, max_len=96, dtype=torch.float32)
    monkeypatch.setattr(llama_forward, "INITIAL_POSITIONS", 8)
    growing = DraftModelDrafter(llama_dir, max_slots=4, max_len=96, dtype=torch.float32)
    assert growing.model.capacity == 8 and growing.model.k_cache.shape[3] == 8
    rng = np.random.default_rng(1)
    ctx = {f"r{i}": [int(t) for t in rng.integers(0, 96, 4 + i)] for i in range(3)}
    for _ in range(8):
        rows = [row(r, t, prompt_len=4) for r, t in ctx.items()]
        drafts = growing.propose(rows, 3)
        assert drafts == whole.propose(rows, 3)
        for t, d in zip(ctx.values(), drafts, strict=True):
            t.extend([*d[:1], int(rng.integers(0, 96))])  # one accepted + the bonus token
    assert 8 < growing.model.capacity <= 96  # it grew, within the engine's max_len
    assert growing.model.k_cache.shape[3] == growing.model.capacity
