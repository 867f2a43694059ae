"""``rlhfspec bench suffix``: our grouped suffix drafter vs Arctic Inference's SuffixDecoding
(the ``suffix_tree`` drafter), replayed on the same rollouts.

Where it sits: a side benchmark of the ``suffix`` drafter (``drafters/suffix.py``). It needs
no engine: it reads rollouts that ``rlhfspec generate`` wrote (one file per RL iteration, the
same prompts each time, with ``prompt_token_ids`` and ``token_ids``) and replays them.

How: every iteration's samples advance together, one token per step, as a batch decodes. At
each position every drafter proposes up to ``k`` tokens for every live sample from what it
has seen so far (the sample's prompt and output, its siblings' outputs up to this step, and
the previous iteration's rollouts); then every drafter observes the token the sample really
generated. Both drafters propose deterministic tokens, so under lossless verification a
draft token is accepted exactly when it equals the token the target samples there: the
number of leading draft tokens equal to the real continuation is the accepted length, in
distribution (the same argument as the hindsight oracle's, ``spec_decode/hindsight.py``).

Compared, at each ``k``:

- ``suffix``: our ``SuffixDrafter``: n-gram index per prompt group (live siblings, finished
  siblings, the previous iteration's rollouts), longest match, most recent first.
- ``suffix_tree``: the ``SuffixTreeDrafter``: Arctic's ``SuffixDecodingCache`` per prompt
  group (a suffix tree over the group's responses, live ones too, plus a per-request tree of
  the prompt and output), frequency-scored drafts (``min_token_prob`` 0.1,
  ``max_spec_factor`` 1).
- ``arctic-global``: the same library as vLLM's ``suffix`` method drives it: one cache for
  every request, across prompt groups.

Printed per iteration: accepted tokens per position (the speed-up's numerator), drafted
tokens per position (what verification pays for), the acceptance rate, and the drafter's
own microseconds per row lookup. Arctic's extension is imported from ``arctic_inference``;
where it is not importable the bench says so and compares nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rlhfspec_workers.drafters.base import DraftRow
from rlhfspec_workers.drafters.suffix import SuffixDrafter
from rlhfspec_workers.drafters.suffix_tree import MAX_DEPTH, SuffixTreeDrafter, load_cache_class
from rlhfspec_workers.spec_decode.hindsight import match_length


@dataclass(frozen=True)
class Rollout:
    group: str
    sample: str
    prompt: list[int]
    response: list[int]


def read_rollouts(path: Path) -> list[Rollout]:
    """The samples of one ``rlhfspec generate`` output file."""
    rows: list[Rollout] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt_token_ids" not in row:
            raise ValueError(f"{path}:{line_no}: no prompt_token_ids (rerun rlhfspec generate)")
        group = str(row["prompt_id"])
        rows.append(
            Rollout(
                group, f"{group}/{row['sample_index']}", row["prompt_token_ids"], row["token_ids"]
            )
        )
    return rows


class ReplayDrafter(Protocol):
    name: str

    def start(self, rollouts: Sequence[Rollout]) -> None: ...
    def propose(self, live: Sequence[tuple[Rollout, int]], k: int) -> list[list[int]]: ...
    def observe(self, live: Sequence[tuple[Rollout, int]]) -> None: ...
    def finish(self, rollouts: Iterable[Rollout]) -> None: ...
    def end_iteration(self) -> None: ...


class DrafterReplay:
    """A registered per-step drafter (``suffix`` or ``suffix_tree``), driven the way the
    adaptive proposer drives it: observe every step, propose, release finished rows, and
    ``new_iteration`` between iterations."""

    def __init__(self, name: str, drafter: SuffixDrafter | SuffixTreeDrafter) -> None:
        self.name, self.drafter = name, drafter

    def _rows(self, live: Sequence[tuple[Rollout, int]], k: int) -> list[DraftRow]:
        return [
            DraftRow(
                r.sample,
                np.asarray(r.prompt + r.response[:t], dtype=np.int64),
                len(r.prompt),
                r.group,
                k,
            )
            for r, t in live
        ]

    def start(self, rollouts: Sequence[Rollout]) -> None:
        pass

    def propose(self, live: Sequence[tuple[Rollout, int]], k: int) -> list[list[int]]:
        return self.drafter.propose(self._rows(live, k), k)

    def observe(self, live: Sequence[tuple[Rollout, int]]) -> None:
        self.drafter.observe(self._rows(live, 0))

    def finish(self, rollouts: Iterable[Rollout]) -> None:
        self.drafter.release(r.sample for r in rollouts)

    def end_iteration(self) -> None:
        self.drafter.new_iteration()


class ArcticReplay:
    """Arctic Inference's ``SuffixDecodingCache`` used directly: one cache per prompt group
    (``grouped``), or one for every request (what ``suffix_tree`` wraps)."""

    def __init__(self, grouped: bool, depth: int = MAX_DEPTH, spec_factor: float = 1.0) -> None:
        cache_class = load_cache_class()
        self.name = "arctic-grouped" if grouped else "arctic-global"
        self.grouped, self.depth, self.spec_factor = grouped, depth, spec_factor
        self._new: Callable[[], Any] = lambda: cache_class(
            max_tree_depth=depth, max_cached_requests=-1
        )
        self.caches: dict[str, Any] = {}
        self.fed: dict[str, int] = {}
        self.iteration = 0

    def _cache(self, r: Rollout) -> Any:
        key = r.group if self.grouped else ""
        if key not in self.caches:
            self.caches[key] = self._new()
        return self.caches[key]

    def _req(self, r: Rollout) -> str:
        return f"{self.iteration}:{r.sample}"

    def start(self, rollouts: Sequence[Rollout]) -> None:
        for r in rollouts:
            self._cache(r).start_request(self._req(r), r.prompt)
            self.fed[r.sample] = 0

    def propose(self, live: Sequence[tuple[Rollout, int]], k: int) -> list[list[int]]:
        drafts: list[list[int]] = []
        for r, t in live:
            context = (r.prompt + r.response[:t])[-self.depth :]
            draft = self._cache(r).speculate(
                self._req(r), context, max_spec_tokens=k, max_spec_factor=self.spec_factor
            )
            drafts.append(list(draft.token_ids[:k]))
        return drafts

    def observe(self, live: Sequence[tuple[Rollout, int]]) -> None:
        for r, t in live:
            have = self.fed[r.sample]
            if t > have:
                self._cache(r).add_active_response(self._req(r), r.response[have:t])
                self.fed[r.sample] = t

    def finish(self, rollouts: Iterable[Rollout]) -> None:
        for r in rollouts:
            self._cache(r).stop_request(self._req(r))

    def end_iteration(self) -> None:
        self.iteration += 1


@dataclass
class Tally:
    positions: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0

    def row(self) -> dict[str, float]:
        return {
            "accepted_per_position": self.accepted / max(self.positions, 1),
            "drafted_per_position": self.drafted / max(self.positions, 1),
            "acceptance": self.accepted / max(self.drafted, 1),
            "us_per_row": 1e6 * self.seconds / max(self.positions, 1),
        }


@dataclass
class Replay:
    k: int
    drafters: list[ReplayDrafter]
    tallies: dict[str, list[Tally]] = field(default_factory=lambda: defaultdict(list))

    def iteration(self, rollouts: Sequence[Rollout]) -> None:
        """Replay one iteration's batch for every drafter, in lockstep."""
        for drafter in self.drafters:
            tally = Tally()
            drafter.start(rollouts)
            longest = max(len(r.response) for r in rollouts)
            for t in range(1, longest):
                live = [(r, t) for r in rollouts if t < len(r.response)]
                drafter.observe(live)
                started = time.perf_counter()
                drafts = drafter.propose(live, self.k)
                tally.seconds += time.perf_counter() - started
                for (r, pos), draft in zip(live, drafts, strict=True):
                    tally.positions += 1
                    tally.drafted += len(draft)
                    tally.accepted += match_length(draft, r.response[pos : pos + self.k])
                drafter.finish(r for r in rollouts if len(r.response) == t + 1)
            drafter.finish(r for r in rollouts if len(r.response) <= 1)
            drafter.end_iteration()
            self.tallies[drafter.name].append(tally)


def make_drafters(spec_factor: float) -> list[ReplayDrafter]:
    drafters: list[ReplayDrafter] = [DrafterReplay("suffix", SuffixDrafter())]
    try:
        drafters += [
            DrafterReplay("suffix_tree", SuffixTreeDrafter()),
            ArcticReplay(False, spec_factor=spec_factor),
        ]
    except ImportError as exc:
        print(f"arctic_inference is not importable ({exc}): .ci/setup builds it")
    return drafters


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhfspec bench suffix", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "rollouts", nargs="+", type=Path, help="rlhfspec generate outputs, one per iteration"
    )
    parser.add_argument("--ks", default="1,2,4,8", help="draft lengths")
    parser.add_argument("--spec-factor", type=float, default=1.0, help="Arctic's max_spec_factor")
    parser.add_argument("--out", type=Path, help="JSON written here")
    args = parser.parse_args(argv)
    iterations = [read_rollouts(p) for p in args.rollouts]
    report: dict[str, Any] = {"rollouts": [str(p) for p in args.rollouts], "ks": {}}
    for k in (int(x) for x in args.ks.split(",")):
        replay = Replay(k, make_drafters(args.spec_factor))
        for rollouts in iterations:
            replay.iteration(rollouts)
        report["ks"][k] = {name: [t.row() for t in ts] for name, ts in replay.tallies.items()}
        print(f"k={k}  (per iteration: accepted/position, drafted/position, acceptance, us/row)")
        for name, ts in replay.tallies.items():
            cells = "  |  ".join(
                "{accepted_per_position:.3f} {drafted_per_position:.2f} {acceptance:.0%} "
                "{us_per_row:.1f}".format(**t.row())
                for t in ts
            )
            print(f"  {name:<15} {cells}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0
