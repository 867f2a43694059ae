"""Training loops of the tiny-model kit: target policy, distilled draft, reward model.

Where it sits: called by ``build.py`` only (one build per kit); evaluation lives in
``evaluate.py``. Everything is plain torch + transformers on CPU with fp32 master weights (bf16
autocast only where the CPU has native bf16: ``TinyRecipe.autocast_bf16``), seeded per stage so
a rebuild is byte-identical. Fresh task examples are drawn every step (the task distribution is
infinite), so no epoch bookkeeping is needed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from rlhfspec_workers.tinymodels.recipe import ModelShape, TinyRecipe, derive_seed
from rlhfspec_workers.tinymodels.task import DIGITS, TaskExample, random_example, score
from rlhfspec_workers.tinymodels.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    encode_chars,
)

Log = Callable[[str], None]
# Called every ``target_eval_every`` steps with the model in training precision; returns the
# temperature-1 probe accuracy that decides when target training stops.
ProbeFn = Callable[[Any], float]


def llama_config(shape: ModelShape, recipe: TinyRecipe, classifier: bool = False) -> Any:
    """A ``LlamaConfig`` for one of the kit's models (tied embeddings, vocab = tokenizer)."""
    from transformers import LlamaConfig

    extra: dict[str, Any] = {"num_labels": 1} if classifier else {}
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=not classifier,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        **extra,
    )


def new_model(shape: ModelShape, recipe: TinyRecipe, seed: int, classifier: bool = False) -> Any:
    """Freshly initialised fp32 model; the seed fixes the initial weights."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = llama_config(shape, recipe, classifier)
    cls = LlamaForSequenceClassification if classifier else LlamaForCausalLM
    model = cls(config)
    model.config.use_cache = False
    return model


def pack_sequences(
    examples: Sequence[TaskExample], completions: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> prompt completion <eos>`` ids and a mask of the completion+EOS tokens.

    Right padding needs no attention mask under a causal model: real tokens never attend to the
    padding after them, and padded positions are masked out of every loss.
    """
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    for i, ex in enumerate(examples):
        prompt_ids = encode_chars(ex.prompt, add_bos=True)
        text = ex.answer if completions is None else completions[i]
        answer_ids = [*encode_chars(text), EOS_ID]
        rows.append(prompt_ids + answer_ids)
        masks.append([False] * len(prompt_ids) + [True] * len(answer_ids))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m)
    return ids, mask


def length_split(examples: Sequence[TaskExample], parts: int) -> list[list[TaskExample]]:
    """Split one random batch into ``parts`` micro-batches of similar length.

    Padding a random batch to its longest row wastes ~2.5x compute on this long-tailed task
    (mean sequence ~22 tokens, batch max ~60). Accumulating gradients over length-sorted slices
    of the *same* random batch gives the same gradient at ~half the cost. (Drawing whole batches
    of similar length instead was tried: each step then sees one length regime and the target
    learned several times slower.)
    """
    ordered = sorted(examples, key=lambda ex: len(ex.prompt))
    size = -(-len(ordered) // max(1, parts))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _optimizer(model: Any, lr: float, recipe: TinyRecipe) -> tuple[Any, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, recipe.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    return opt, sched


def _step(model: Any, opt: Any, sched: Any, recipe: TinyRecipe) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def answer_logits(model: Any, ids: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Logits predicting token t+1 at position t, as fp32 (optionally under bf16 autocast)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits: torch.Tensor = model(input_ids=ids).logits
    return logits[:, :-1].float()


def _accumulate(
    batch: Sequence[TaskExample],
    recipe: TinyRecipe,
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """Backward the per-token mean loss of ``batch`` through length-split micro-batches."""
    total_tokens = sum(len(ex.answer) + 1 for ex in batch)
    total = 0.0
    for part in length_split(batch, recipe.micro_batches):
        ids, mask = pack_sequences(part)
        loss: Any = loss_sum(ids, mask[:, 1:]) / total_tokens
        loss.backward()
        total += float(loss.detach())
    return total


def _ce_sum(model: Any, ids: torch.Tensor, label_mask: torch.Tensor, recipe: TinyRecipe) -> Any:
    logits = answer_logits(model, ids, recipe.autocast_bf16)
    return F.cross_entropy(logits[label_mask], ids[:, 1:][label_mask], reduction="sum")


def _kl_sum(
    target: Any, draft: Any, ids: torch.Tensor, label_mask: torch.Tensor, recipe: TinyRecipe
) -> Any:
    """Forward KL(target || draft) summed over answer positions."""
    with torch.no_grad():
        teacher = F.log_softmax(answer_logits(target, ids, recipe.autocast_bf16)[label_mask], -1)
    student = F.log_softmax(answer_logits(draft, ids, recipe.autocast_bf16)[label_mask], -1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def train_target(recipe: TinyRecipe, seed: int, probe: ProbeFn, log: Log) -> tuple[Any, int]:
    """Next-token training on answers; stops at the probe accuracy. Returns (model, steps)."""
    model = new_model(recipe.target, recipe, derive_seed(seed, "target-init"))
    rng = random.Random(derive_seed(seed, "target-data"))
    opt, sched = _optimizer(model, recipe.target_lr, recipe)
    model.train()
    step = 0
    while step < recipe.target_max_steps:
        batch = [random_example(rng) for _ in range(recipe.target_batch)]
        loss = _accumulate(batch, recipe, lambda ids, m: _ce_sum(model, ids, m, recipe))
        _step(model, opt, sched, recipe)
        step += 1
        due = step >= recipe.target_min_steps and step % recipe.target_eval_every == 0
        if due or step == recipe.target_max_steps:
            model.eval()
            acc = probe(model)
            model.train()
            log(f"target step {step}: loss {loss:.3f}, probe temp-1 accuracy {acc:.3f}")
            if acc >= recipe.target_stop_accuracy:
                break
    model.eval()
    return model, step


def distill_draft(target: Any, recipe: TinyRecipe, seed: int, log: Log) -> Any:
    """Forward KL(target || draft) on answer positions of fresh task sequences."""
    draft = new_model(recipe.draft, recipe, derive_seed(seed, "draft-init"))
    rng = random.Random(derive_seed(seed, "draft-data"))
    opt, sched = _optimizer(draft, recipe.draft_lr, recipe)
    target.eval()
    draft.train()
    for step in range(1, recipe.draft_steps + 1):
        batch = [random_example(rng) for _ in range(recipe.draft_batch)]
        loss = _accumulate(batch, recipe, lambda ids, m: _kl_sum(target, draft, ids, m, recipe))
        _step(draft, opt, sched, recipe)
        if step % 40 == 0 or step == recipe.draft_steps:
            log(f"draft step {step}: KL {loss:.4f}")
    draft.eval()
    return draft


def corrupt_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong completion: one edit away from the answer, or an unsorted list."""
    kinds = ["replace", "delete", "insert", "swap", "truncate"]
    for _ in range(8):
        kind = rng.choice(kinds)
        chars = list(answer)
        pos = rng.randrange(len(chars))
        if kind == "replace":
            chars[pos] = rng.choice(DIGITS)
        elif kind == "delete" and len(chars) > 1:
            del chars[pos]
        elif kind == "insert":
            chars.insert(pos, rng.choice(DIGITS))
        elif kind == "swap" and len(chars) > 1:
            j = min(len(chars) - 1, pos + 1)
            i = j - 1
            chars[i], chars[j] = chars[j], chars[i]
        elif kind == "truncate" and len(chars) > 1:
            chars = chars[: rng.randrange(1, len(chars))]
        wrong = "".join(chars)
        if wrong != answer:
            return wrong
    return answer + rng.choice(DIGITS)


def reward_batch(
    examples: Sequence[TaskExample], completions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> prompt completion`` ids (the text the tokenizer makes) and labels."""
    pairs = zip(examples, completions, strict=True)
    rows = [encode_chars(ex.prompt + c, add_bos=True) for ex, c in pairs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    labels = torch.tensor(
        [score(ex.prompt, c) for ex, c in zip(examples, completions, strict=True)]
    )
    return ids, labels


def reward_scores(model: Any, ids: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Scalar score per row (HF pools the last non-pad token, so right padding is fine)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits: torch.Tensor = model(input_ids=ids).logits
    return logits[:, 0].float()


def train_reward(
    recipe: TinyRecipe,
    seed: int,
    policy_pool: Sequence[tuple[TaskExample, str]],
    log: Log,
    init_from: Any | None = None,
) -> Any:
    """Binary correctness classifier; half of each batch from the policy's own samples.

    Synthetic one-edit corruptions teach "exactly sorted"; the policy's temperature-1 samples
    teach the mistakes RL will actually show it. ``init_from``: a causal LM whose backbone has
    the reward model's shape, copied in before training.
    """
    model = new_model(recipe.reward, recipe, derive_seed(seed, "reward-init"), classifier=True)
    if init_from is not None:
        # Start from a causal LM of the same shape (the draft), as RLHF reward models start
        # from the SFT policy: it already tracks what the next sorted digit should be.
        model.model.load_state_dict(init_from.model.state_dict())
    rng = random.Random(derive_seed(seed, "reward-data"))
    opt, sched = _optimizer(model, recipe.reward_lr, recipe)
    model.train()
    half = recipe.reward_batch // 2
    for step in range(1, recipe.reward_steps + 1):
        examples: list[TaskExample] = []
        completions: list[str] = []
        for _ in range(recipe.reward_batch - (half if policy_pool else 0)):
            ex = random_example(rng)
            examples.append(ex)
            right = rng.random() < 0.5
            completions.append(ex.answer if right else corrupt_answer(ex.answer, rng))
        if policy_pool:
            for _ in range(half):
                ex, completion = policy_pool[rng.randrange(len(policy_pool))]
                examples.append(ex)
                completions.append(completion)
        # Length-sorted micro-batches, as in _accumulate: same gradient, less padding.
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt + completions[i]))
        size = -(-len(order) // max(1, recipe.micro_batches))
        total = 0.0
        for start in range(0, len(order), size):
            part = order[start : start + size]
            ids, labels = reward_batch([examples[i] for i in part], [completions[i] for i in part])
            scores = reward_scores(model, ids, recipe.autocast_bf16)
            bce = F.binary_cross_entropy_with_logits(scores, labels, reduction="sum")
            loss: Any = bce / len(order)
            loss.backward()
            total += float(loss.detach())
        _step(model, opt, sched, recipe)
        if step % 50 == 0 or step == recipe.reward_steps:
            log(f"reward step {step}: BCE {total:.4f}")
    model.eval()
    return model
