"""The build pipeline of the tiny-model kit: datasets -> target -> draft -> reward -> kit.json.

Where it sits: ``build.py`` calls :func:`run_build` on an empty temp dir and renames it into
place; this module holds the torch-heavy part so resolving an already-built kit never imports
torch. Models are evaluated as saved (weights rounded to bf16), since that is what vLLM serves.
"""

from __future__ import annotations

import copy
import json
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhfspec_workers.tinymodels import evaluate, training
from rlhfspec_workers.tinymodels.recipe import RECIPE_VERSION, TinyRecipe, derive_seed
from rlhfspec_workers.tinymodels.report import KitReport
from rlhfspec_workers.tinymodels.task import (
    TaskExample,
    make_examples,
    read_dataset_jsonl,
    write_dataset_jsonl,
)
from rlhfspec_workers.tinymodels.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    save_tokenizer,
)

Log = Callable[[str], None]
LENGTH_BUCKETS = ((3, 5), (6, 10), (11, 20), (21, 40))


def _versions() -> dict[str, str]:
    import safetensors
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def _rounded(model: Any) -> Any:
    """fp32 copy whose weights equal the bf16 weights that get saved.

    Evaluating in fp32 (not bf16) because bf16 matmuls are emulated, hence slow, on CPUs
    without native bf16; the logits differ from vLLM's bf16 compute only by rounding.
    """
    return copy.deepcopy(model).to(torch.bfloat16).to(torch.float32).eval()


def _save_model(model: Any, path: Path, generative: bool) -> None:
    from transformers import GenerationConfig

    gen_config_cls: Any = GenerationConfig  # untyped in transformers' stubs

    saved = copy.deepcopy(model).to(torch.bfloat16)
    saved.config.use_cache = True  # training turned it off; inference wants the KV cache
    saved.save_pretrained(str(path))
    save_tokenizer(path)
    if generative:
        # Only token ids: vLLM applies generation_config.json sampling fields as defaults, and
        # the kit must not change anyone's temperature or top-k behind their back.
        gen_config_cls(
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
        ).save_pretrained(str(path))


def _n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _by_length(examples: list[TaskExample], completions: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for lo, hi in LENGTH_BUCKETS:
        idx = [i for i, ex in enumerate(examples) if lo <= len(ex.answer) <= hi]
        if idx:
            picked = [examples[i] for i in idx]
            out[f"{lo}-{hi}"] = evaluate.accuracy(picked, [completions[i] for i in idx])
    return out


def run_build(out: Path, seed: int, recipe: TinyRecipe, log: Log) -> KitReport:
    """Build every kit artifact into the (empty) directory ``out`` and return its report."""
    start = time.perf_counter()
    stages: dict[str, float] = {}
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    # vLLM's in-process CPU worker replaces torch.set_num_threads with a no-op; record what the
    # build actually ran with (byte-reproducibility is only promised at equal thread counts).
    threads = torch.get_num_threads()
    notes: list[str] = []
    if threads != recipe.threads:
        notes.append(f"ran on {threads} threads, recipe asks {recipe.threads}")
    try:
        t = time.perf_counter()
        data = out / "dataset"
        write_dataset_jsonl(data / "train.jsonl", recipe.train_rows, derive_seed(seed, "train"))
        write_dataset_jsonl(data / "eval.jsonl", recipe.eval_rows, derive_seed(seed, "eval"))
        save_tokenizer(out / "tokenizer")
        eval_set = read_dataset_jsonl(data / "eval.jsonl")[: recipe.eval_prompts]
        eval_prompts = [ex.prompt for ex in eval_set]
        probe = make_examples(recipe.probe_prompts, derive_seed(seed, "probe"))
        probe_seed = derive_seed(seed, "probe-sampling")

        def probe_fn(model: Any) -> float:
            return evaluate.sample_accuracy(model, probe, probe_seed)

        target, target_steps = training.train_target(recipe, seed, probe_fn, log)
        target_q = _rounded(target)
        _save_model(target, out / "policy", generative=True)
        stages["target"] = time.perf_counter() - t

        t = time.perf_counter()
        greedy = evaluate.generate(target_q, eval_prompts, True, derive_seed(seed, "eval-g"))
        sampled = evaluate.generate(target_q, eval_prompts, False, derive_seed(seed, "eval-s"))
        greedy_acc = evaluate.accuracy(eval_set, greedy)
        temp1_acc = evaluate.accuracy(eval_set, sampled)
        log(f"target: greedy accuracy {greedy_acc:.3f}, temp-1 accuracy {temp1_acc:.3f}")
        stages["eval"] = time.perf_counter() - t

        t = time.perf_counter()
        draft = training.distill_draft(target_q, recipe, seed, log)
        draft_q = _rounded(draft)
        _save_model(draft, out / "draft", generative=True)
        agreement = evaluate.greedy_agreement(target_q, draft_q, eval_set, greedy)
        log(f"draft: greedy agreement {agreement:.3f}")
        stages["draft"] = time.perf_counter() - t

        t = time.perf_counter()
        pool_set = make_examples(recipe.reward_policy_samples, derive_seed(seed, "reward-pool"))
        pool_samples = evaluate.generate(
            target_q, [ex.prompt for ex in pool_set], False, derive_seed(seed, "reward-pool-s")
        )
        reward = training.train_reward(
            recipe,
            seed,
            list(zip(pool_set, pool_samples, strict=True)),
            log,
            init_from=draft if recipe.reward == recipe.draft else None,
        )
        reward_q = _rounded(reward)
        _save_model(reward, out / "reward", generative=False)
        rng = random.Random(derive_seed(seed, "reward-eval"))
        synthetic = [
            ex.answer if i % 2 == 0 else training.corrupt_answer(ex.answer, rng)
            for i, ex in enumerate(eval_set)
        ]
        reward_acc = evaluate.reward_accuracy(reward_q, eval_set, synthetic)
        reward_policy_acc = evaluate.reward_accuracy(reward_q, eval_set, sampled)
        log(f"reward: accuracy {reward_acc:.3f} synthetic, {reward_policy_acc:.3f} policy samples")
        stages["reward"] = time.perf_counter() - t
    finally:
        torch.set_num_threads(prev_threads)

    report = KitReport(
        seed=seed,
        key=recipe.key(seed),
        recipe_version=RECIPE_VERSION,
        recipe=recipe.to_json(),
        versions=_versions(),
        threads=threads,
        build_seconds=round(time.perf_counter() - start, 2),
        stage_seconds={k: round(v, 2) for k, v in stages.items()},
        vocab_size=VOCAB_SIZE,
        target_steps=target_steps,
        eval_prompts=len(eval_set),
        target_greedy_accuracy=greedy_acc,
        target_temp1_accuracy=temp1_acc,
        target_greedy_accuracy_by_length=_by_length(eval_set, greedy),
        draft_greedy_agreement=agreement,
        reward_accuracy=reward_acc,
        reward_accuracy_policy_samples=reward_policy_acc,
        reward_policy_base_rate=max(temp1_acc, 1.0 - temp1_acc),
        param_counts={
            "policy": _n_params(target),
            "draft": _n_params(draft),
            "reward": _n_params(reward),
        },
        paths={name: name for name in ("policy", "draft", "reward", "tokenizer", "dataset")},
        notes=notes,
    )

    (out / "kit.json").write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    return report
