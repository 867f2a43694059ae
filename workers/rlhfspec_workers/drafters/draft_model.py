"""Draft-model drafter: a small Llama-family model proposes k tokens greedily, batched over rows.

Where it sits: a candidate drafter of the adaptive proposer
(``generation.proposer.AdaptiveProposer``); also the vLLM-native ``draft_model`` baseline
config (:func:`speculative_config`), including vLLM's Dynamic SD schedule
(``num_speculative_tokens_per_batch_size``), and the vocabulary check that must pass before
any engine starts (:func:`check_vocab`, and :func:`check_forward` for the proposer's path).

Cache bookkeeping: each request owns a cache slot and remembers the tokens it fed. At every
call the fed tokens are compared with the request's real context; the common prefix stays,
the rest (rejected drafts, tokens sampled while another drafter was in use) is recomputed.
So a step where this drafter is not chosen costs nothing, and the next step where it is
chosen catches up in one batched forward.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import BuildContext, DrafterEntry, DraftRow, NativeContext, TokenArray
from .llama_forward import LlamaDraftModel, read_config, unsupported

NAME = "draft_model"


def _tokenizer_vocab(path: Path) -> dict[str, int] | None:
    """The tokenizer's token -> id map from ``tokenizer.json`` (None when there is none)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    vocab = dict(data.get("model", {}).get("vocab", {}) or {})
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    return vocab


def check_vocab(policy: Path, draft: Path) -> str | None:
    """Why the draft cannot draft for the policy (None when it can).

    Drafts are token ids verified by the policy, so both must number tokens identically:
    same vocab_size in config.json and, where both ship a tokenizer, the same token -> id map.
    """
    try:
        policy_cfg, draft_cfg = read_config(policy), read_config(draft)
    except FileNotFoundError as err:
        return str(err)
    pv, dv = policy_cfg.get("vocab_size"), draft_cfg.get("vocab_size")
    if pv != dv:
        return f"vocabulary size {dv} differs from the policy's {pv}"
    p_tok, d_tok = _tokenizer_vocab(policy), _tokenizer_vocab(draft)
    if p_tok is not None and d_tok is not None and p_tok != d_tok:
        differing = sorted(t for t in set(p_tok) | set(d_tok) if p_tok.get(t) != d_tok.get(t))
        return (
            f"tokenizer differs from the policy's ({len(differing)} tokens map to other ids, "
            f"e.g. {differing[:3]})"
        )
    return None


def check_forward(draft: Path) -> str | None:
    """Why the proposer's own draft forward cannot run ``draft`` (None when it can): its
    architecture or RoPE scaling is outside the Llama family it implements."""
    try:
        return unsupported(read_config(draft))
    except FileNotFoundError as err:
        return str(err)


class DraftModelDrafter:
    """Greedy drafts from a small Llama-family model run in torch inside the proposer."""

    name = NAME

    def __init__(
        self,
        path: Path,
        *,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = LlamaDraftModel(
            path, max_slots=max_slots, max_len=max_len, dtype=dtype, device=device
        )
        self.max_slots = max_slots
        self.slot: dict[str, int] = {}
        self.owner: dict[int, str] = {}
        """Slots in use are always 0..len(slot)-1 (compact), see :meth:`release`."""
        self.fed: dict[str, TokenArray] = {}
        """req_id -> tokens whose keys/values sit in the slot's positions 0..len-1."""

    def load_weights(self, path: Path) -> None:
        """Draft with the model in ``path`` from now on (a refreshed draft, same shape).

        Every request's cached keys and values came from the old weights: forgetting what
        was fed makes the next call recompute each context with the new ones."""
        self.model.load_weights(path)
        for req_id in self.fed:
            self.fed[req_id] = np.zeros(0, dtype=np.int64)

    def _slot_of(self, req_id: str) -> int:
        if req_id not in self.slot:
            slot = len(self.slot)
            if slot >= self.max_slots:
                raise RuntimeError("draft cache has no free slot (max_slots < running requests)")
            self.slot[req_id], self.owner[slot] = slot, req_id
            self.fed[req_id] = np.zeros(0, dtype=np.int64)
        return self.slot[req_id]

    def _valid_prefix(self, req_id: str, tokens: TokenArray) -> int:
        fed = self.fed[req_id]
        n = min(len(fed), len(tokens) - 1)  # the last token is always re-fed: its logits seed
        if n <= 0:
            return 0
        diff = np.flatnonzero(fed[:n] != tokens[:n])
        return int(diff[0]) if diff.size else n

    def _forward(self, seqs: list[TokenArray], slots: list[int], starts: list[int]) -> torch.Tensor:
        device = self.model.device
        width = max(len(s) for s in seqs)
        tokens = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.from_numpy(s)
        return self.model.forward(
            tokens.to(device),
            torch.tensor(slots, device=device),
            torch.tensor(starts, device=device),
            torch.tensor([len(s) for s in seqs], device=device),
        )

    def propose(self, rows: Sequence[DraftRow], k: int) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in rows]
        todo = [i for i, r in enumerate(rows) if min(k, r.max_k) > 0]
        if not todo:
            return drafts
        # 1) Catch up: feed each row's tokens past its valid prefix. Rows a few tokens behind
        # (the common case: bonus token, plus the last draft when all were accepted) run
        # together; rows catching up on many (new requests, or rows drafted by another
        # drafter for a while) run padded in their own batch so the others are not padded.
        next_tok: dict[int, int] = {}
        for i in todo:
            self._slot_of(rows[i].req_id)
        pending = {i: self._valid_prefix(rows[i].req_id, rows[i].tokens) for i in todo}
        short = max(2, k + 1)
        for part in (
            [i for i in todo if len(rows[i].tokens) - pending[i] <= short],
            [i for i in todo if len(rows[i].tokens) - pending[i] > short],
        ):
            if not part:
                continue
            logits = self._forward(
                [rows[i].tokens[pending[i] :] for i in part],
                [self._slot_of(rows[i].req_id) for i in part],
                [pending[i] for i in part],
            )
            for i, tok in zip(part, logits.argmax(-1).tolist(), strict=True):
                next_tok[i] = int(tok)
        # 2) Draft: one batched one-token forward per further position.
        active = todo
        for i in active:
            drafts[i].append(next_tok[i])
        for _ in range(1, k):
            active = [i for i in active if len(drafts[i]) < min(k, rows[i].max_k)]
            if not active:
                break
            logits = self._forward(
                [np.array([drafts[i][-1]], dtype=np.int64) for i in active],
                [self.slot[rows[i].req_id] for i in active],
                [len(rows[i].tokens) + len(drafts[i]) - 1 for i in active],
            )
            for i, tok in zip(active, logits.argmax(-1).tolist(), strict=True):
                drafts[i].append(int(tok))
        for i in todo:
            # Every draft but the last was fed; the next call keeps what matches the context.
            fed_drafts = np.array(drafts[i][:-1], dtype=np.int64)
            self.fed[rows[i].req_id] = np.concatenate([rows[i].tokens, fed_drafts])
        return drafts

    def release(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            slot = self.slot.pop(req_id, None)
            self.fed.pop(req_id, None)
            if slot is None:
                continue
            # Keep slots compact: the highest slot moves into the hole, so attention runs on
            # the cache's first rows as a view (see LlamaDraftModel.forward).
            last = len(self.slot)
            del self.owner[slot]
            if slot != last:
                mover = self.owner.pop(last)
                self.model.move_slot(last, slot)
                self.slot[mover], self.owner[slot] = slot, mover


def speculative_config(
    draft: Path,
    num_tokens: int,
    per_batch_size: Sequence[tuple[int, int, int]] | None = None,
) -> dict[str, Any]:
    """vLLM-native draft model (baseline): fixed k, or vLLM Dynamic SD's k per batch size."""
    config: dict[str, Any] = {
        "method": "draft_model",
        "model": str(draft),
        "num_speculative_tokens": num_tokens,
    }
    if per_batch_size is not None:
        config["num_speculative_tokens_per_batch_size"] = [list(r) for r in per_batch_size]
    return config


def _build(context: BuildContext) -> DraftModelDrafter:
    if context.model_path is None:
        raise ValueError(f"{context.field}.model: no model path")
    # On CPU the draft computes in float32: eager bf16 matmuls of these small shapes run
    # ~10x slower than fp32 on a CPU without native bf16 (torch 2.13 CPU, measured; vLLM's
    # own kernels differ), and even with AMX a bf16 draft's drafting calls took 1.08-1.12x
    # the fp32 draft's (tiny bench, 64 rows, 10 interleaved rounds).
    dtype = torch.float32
    if context.device != "cpu" and context.spec.model is not None:
        dtype = getattr(torch, context.spec.model.dtype.value)
    return DraftModelDrafter(
        context.model_path,
        max_slots=context.max_slots,
        max_len=context.max_len,
        dtype=dtype,
        device=context.device,
    )


def _native(context: NativeContext) -> dict[str, Any]:
    if context.model_path is None:
        raise ValueError("draft_model needs a model path")
    return speculative_config(context.model_path, context.num_tokens, context.per_batch_size)


ENTRY = DrafterEntry(NAME, build=_build, native=_native)
