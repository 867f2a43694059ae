"""``rlhfspec models distill-draft``: build, distil, measure and save a draft for a policy.

Where it sits: ``tinymodels.cli`` (``rlhfspec models ...``) hands the sub-command's parsed
options to :func:`run`. The output directory is a standard HF model directory (safetensors,
config, the policy's tokenizer files) that ``generation.speculative.drafters[].model.path``
takes, plus ``distill.json``: size, layers, timings and the acceptance per draft position on
held-out prompts, of the layer-subset initialisation and of the distilled draft.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_DATASET = Path("examples/data/arith-train.jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="policy: a model dir, tiny://, zoo://")
    parser.add_argument("--out", type=Path, required=True, help="new (or empty) model directory")
    parser.add_argument("--layers", type=int, default=2, help="draft blocks (default 2)")
    parser.add_argument(
        "--tokens", type=int, default=16384, help="policy response tokens to distil on"
    )
    parser.add_argument(
        "--dataset", default=str(DEFAULT_DATASET), help="prompts: JSONL or Parquet, path or tiny://"
    )
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200, help="distillation steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts")
    parser.add_argument("--train-head", action="store_true", help="also train embeddings/head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")


def _resolve(location: str) -> Path:
    from rlhfspec_workers.model_uris import resolve_builtin

    return resolve_builtin(location) or Path(location)


def _check(args: argparse.Namespace) -> str | None:
    for name in ("layers", "tokens", "steps", "batch_size", "max_new_tokens", "eval_prompts"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')}: must be at least 1"
    if not _resolve(args.dataset).is_file():
        return f"--dataset: {args.dataset} is not a file"
    return None


def run(args: argparse.Namespace) -> int:
    """The whole recipe; exit code 0 done, 1 refused input or failure."""
    problem = _check(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        report = distill_draft(args)
    except ValueError as exc:  # DraftInputError, DatasetError: input the user can fix
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    print(args.out)
    return 0


def distill_draft(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from rlhfspec_workers.chat import end_of_turn_ids
    from rlhfspec_workers.distill.acceptance import acceptance_report
    from rlhfspec_workers.distill.layers import check_architecture, draft_from_policy
    from rlhfspec_workers.distill.rollouts import (
        policy_sampler,
        prompt_token_ids,
        sample_rollouts,
    )
    from rlhfspec_workers.distill.train import distill
    from rlhfspec_workers.torch_models import (
        atomic_directory,
        eos_token_id,
        load_causal_lm,
        save_model_dir,
    )

    def log(line: str) -> None:
        if not args.quiet:
            print(f"  .. {line}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    policy_dir = _resolve(args.policy)
    config = AutoConfig.from_pretrained(str(policy_dir))
    check_architecture(config)
    layers = int(config.num_hidden_layers)
    if args.layers > layers:
        from rlhfspec_workers.distill.layers import DraftInputError

        raise DraftInputError(
            "--layers", f"{args.layers} exceeds the policy's {layers}", f"1..{layers}"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    stops = [t for t in {eos_token_id(policy_dir), *end_of_turn_ids(tokenizer)} if t is not None]
    prompts = prompt_token_ids(tokenizer, _resolve(args.dataset), args.prompt_field)
    if len(prompts) <= args.eval_prompts:
        raise ValueError(
            f"--dataset: {len(prompts)} prompts, at least {args.eval_prompts + 1} needed "
            f"(--eval-prompts are held out)"
        )
    held_out, train_prompts = prompts[: args.eval_prompts], prompts[args.eval_prompts :]
    sampling = time.perf_counter()
    # Sampled before the transformers copy of the policy is loaded: the two never share memory.
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    max_len = min(longest, int(getattr(config, "max_position_embeddings", longest)))
    sample = dict(max_new_tokens=args.max_new_tokens, stop_ids=stops)
    with policy_sampler(policy_dir, max_model_len=max_len, seed=args.seed) as llm:
        train_set = sample_rollouts(
            llm, train_prompts, token_budget=args.tokens, seed=args.seed, **sample
        )
        eval_set = sample_rollouts(llm, held_out, token_budget=10**9, seed=args.seed, **sample)
    sampling_seconds = time.perf_counter() - sampling
    log(f"{len(train_set)} training rollouts, {len(eval_set)} held out ({sampling_seconds:.0f} s)")
    torch.manual_seed(args.seed)
    policy = load_causal_lm(policy_dir, torch.device("cpu")).float()
    pad = policy.config.pad_token_id
    pad_id = int(pad) if pad is not None else 0
    draft = draft_from_policy(policy, args.layers, train_head=args.train_head)
    before = acceptance_report(policy, draft, eval_set, pad_id=pad_id)
    log(f"layer-subset draft: acceptance per position {before.per_position}")
    stats = distill(
        policy,
        draft,
        train_set,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        pad_id=pad_id,
        seed=args.seed,
        log=log,
    )
    after = acceptance_report(policy, draft, eval_set, pad_id=pad_id)
    log(f"distilled draft: acceptance per position {after.per_position}")
    with atomic_directory(args.out) as tmp:
        save_model_dir(draft, tmp, dtype=torch.bfloat16, sidecar_from=policy_dir)
        report = {
            "policy": str(args.policy),
            "layers": list(draft.config.rlhfspec_draft_layers),
            "policy_layers": layers,
            "draft_parameters": sum(p.numel() for p in draft.parameters()),
            "policy_parameters": sum(p.numel() for p in policy.parameters()),
            "train_head": args.train_head,
            "rollout_tokens": sum(len(e.response_ids) for e in train_set),
            "sampling_seconds": round(sampling_seconds, 1),
            "distill_seconds": round(stats.seconds, 1),
            "teacher_seconds": round(stats.teacher_seconds, 1),
            "steps": stats.steps,
            "kl_first": round(stats.first_loss, 4),
            "kl_last": round(stats.last_loss, 4),
            "acceptance_before": before.to_dict(),
            "acceptance_after": after.to_dict(),
            "total_seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / "distill.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
