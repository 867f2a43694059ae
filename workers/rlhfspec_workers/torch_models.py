"""Torch helpers shared by the inference and trainer workers: load models, pad, score tokens.

Where it sits: below ``inference.experience`` (reference log-probs, critic values, reward-model
scores) and ``trainer.policy_trainer`` (the same quantities with gradients), so both stages
compute log-probs with one function and agree to the bit on equal weights. Never imports vLLM.

Layout of a batch (verl ``core_algos`` shape names): ``B`` sequences, ``L`` tokens of
``prompt + response`` right-padded, ``T`` response tokens right-padded. Right padding needs no
attention mask under a causal model: a real token never attends to the padding after it, and
positions start at 0 in every row exactly as in the generator. Response token ``j`` of row ``i``
sits at ``prompt_len[i] + j`` and is predicted by the logits at ``prompt_len[i] + j - 1``
(:attr:`PaddedBatch.predict_index`); the critic's value "before token j" is read at that same
position. Models load in fp32: this CPU has no fast bf16, and fp32 keeps the trainer's master
weights exact.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Files of an HF model dir that save_pretrained does not write and vLLM needs (or uses).
SIDECAR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def completion_mask(token_ids: torch.Tensor, eos_id: int, lengths: torch.Tensor) -> torch.Tensor:
    """[B, T] mask of response tokens up to and including the first EOS.

    token_ids: [B, T] sampled ids (right-padded); lengths: [B] number of sampled tokens.
    Built from EOS position and length, never from ``token != pad``: a policy may sample the
    pad id mid-answer, and masking it would misalign log-probs with what was sampled.
    """
    batch, width = token_ids.shape
    positions = torch.arange(width, device=token_ids.device).expand(batch, width)
    within = positions < lengths.unsqueeze(1)
    is_eos = (token_ids == eos_id) & within
    # Index of the first EOS, or width when there is none.
    first_eos = torch.where(is_eos, positions, torch.full_like(positions, width)).min(dim=1).values
    return (within & (positions <= first_eos.unsqueeze(1))).to(torch.float32)


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _quiet_transformers() -> None:
    # Progress bars would print on every weight load/save of a long-running worker.
    from transformers.utils import logging as hf_logging

    logging_module: Any = hf_logging  # untyped in transformers' stubs
    logging_module.disable_progress_bar()


def load_causal_lm(path: Path, device: torch.device | None = None, trainable: bool = False) -> Any:
    """An HF causal LM from ``path`` in fp32 on ``device``; frozen and in eval mode unless
    ``trainable``. KV caching is off: every pass here is one full forward."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.config.use_cache = False
    model.to(device or default_device())
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


class ValueModel(nn.Module):
    """A sequence-classification model read at every position: ``[B, L] ids -> [B, L]``.

    An HF ``*ForSequenceClassification`` model pools its head's output at the last token; PPO's
    critic needs the head at every position, so this runs the trunk and applies the scalar
    head (``score``, or ``classifier`` when it is a plain Linear) to every hidden state. The
    wrapped model stays an ordinary HF model, so :meth:`save_pretrained` writes a directory
    that loads back as the same sequence-classification model (a reward model, or a critic).
    """

    def __init__(self, classifier: Any) -> None:
        super().__init__()
        self.classifier = classifier
        self.trunk: nn.Module = getattr(classifier, classifier.base_model_prefix)
        head = getattr(classifier, "score", None)
        if not isinstance(head, nn.Linear):
            head = getattr(classifier, "classifier", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ValueError(
                f"{type(classifier).__name__} has no scalar Linear head (score/classifier)"
            )
        self.head: nn.Linear = head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] (right-padded) -> values [B, L] in fp32."""
        hidden = self.trunk(input_ids=input_ids).last_hidden_state
        values: torch.Tensor = self.head(hidden).squeeze(-1)
        return values.float()

    @property
    def config(self) -> Any:
        return self.classifier.config

    def save_pretrained(self, out_dir: Path) -> None:
        self.classifier.save_pretrained(str(out_dir))


def load_value_model(
    path: Path, device: torch.device | None = None, trainable: bool = False
) -> ValueModel:
    """A :class:`ValueModel` over the sequence-classification model in ``path`` (fp32)."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    classifier = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    classifier.config.use_cache = False
    model = ValueModel(classifier).to(device or default_device())
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def eos_token_id(model_dir: Path) -> int | None:
    """The EOS id of a model dir (generation_config.json first, then config.json)."""
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((model_dir / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int):
            return value
    return None


@dataclass(frozen=True)
class PaddedBatch:
    """``prompt + response`` rows right-padded to one tensor, and where the response sits."""

    input_ids: torch.Tensor
    """[B, L] long: prompt then response, then pad."""
    response_ids: torch.Tensor
    """[B, T] long: the response tokens, right-padded."""
    response_mask: torch.Tensor
    """[B, T] float: 1.0 on real response tokens (up to and including the first EOS)."""
    predict_index: torch.Tensor
    """[B, T] long: position in ``input_ids`` whose output predicts each response token
    (clamped into range on padding, where the mask is 0)."""
    prompt_lengths: torch.Tensor
    """[B] long."""
    response_lengths: torch.Tensor
    """[B] long: tokens in each response (the mask's row sums when no EOS cuts it short)."""

    @property
    def sequence_lengths(self) -> torch.Tensor:
        """[B] long: prompt + response tokens of each row."""
        return self.prompt_lengths + self.response_lengths

    def to(self, device: torch.device) -> PaddedBatch:
        return PaddedBatch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.response_ids,
                    self.response_mask,
                    self.predict_index,
                    self.prompt_lengths,
                    self.response_lengths,
                )
            )
        )


def pad_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int = 0,
    eos_id: int | None = None,
    device: torch.device | None = None,
) -> PaddedBatch:
    """Pack prompts and responses into a :class:`PaddedBatch`.

    With ``eos_id`` the response mask ends at the first EOS (:func:`completion_mask`);
    without it every given response token counts. Never derived from ``token != pad``: a
    policy may sample the pad id mid-answer. Every prompt needs at least one token (the
    first response token is predicted from the prompt's last position).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if not prompt_ids:
        raise ValueError("empty batch")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (BOS)")
    p_len = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    r_len = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
    width = int((p_len + r_len).max())
    resp_width = max(1, int(r_len.max()))
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    responses = torch.full((len(prompt_ids), resp_width), pad_id, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        row = [*p, *r]
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        if r:
            responses[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    offsets = torch.arange(resp_width, dtype=torch.long).unsqueeze(0)
    predict_index = (p_len.unsqueeze(1) - 1 + offsets).clamp(max=width - 1)
    if eos_id is None:
        mask = (offsets < r_len.unsqueeze(1)).to(torch.float32)
    else:
        mask = completion_mask(responses, eos_id, r_len)
    batch = PaddedBatch(input_ids, responses, mask, predict_index, p_len, r_len)
    return batch.to(device) if device is not None else batch


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward accepts ``logits_to_keep`` (HF causal LMs do)."""
    cls = type(model)
    if cls not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    return _LOGITS_TO_KEEP[cls]


def response_logits(model: Any, batch: PaddedBatch) -> torch.Tensor:
    """[B, T, V] fp32 logits predicting each response token.

    The LM head runs only from the first position that predicts a response token on (HF's
    ``logits_to_keep``): prompt positions' logits are never read, and with a real vocabulary
    they are the largest activation of the pass ([B, L, V] fp32)."""
    first = int(batch.predict_index.min())
    if first > 0 and _takes_logits_to_keep(model):
        keep = batch.input_ids.shape[1] - first
        logits = model(input_ids=batch.input_ids, logits_to_keep=keep).logits
    else:
        first = 0
        logits = model(input_ids=batch.input_ids).logits
    index = (batch.predict_index - first).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    picked: torch.Tensor = logits.gather(1, index)
    return picked.float()


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # vLLM's processed logprobs divide by the temperature; greedy (0) keeps the raw logits.
    return logits / temperature if temperature > 0 else logits


def response_logprobs(model: Any, batch: PaddedBatch, temperature: float = 1.0) -> torch.Tensor:
    """log p(response token | prefix) under ``model``: [B, T] (0 where the mask is 0).

    ``log_softmax(logits / temperature)`` is what vLLM returns as processed log-probs with
    top_p = 1 and top_k off (with top-p/top-k vLLM also renormalises over the kept tokens;
    this does not). Gradients flow when the model is trainable and grad is enabled.
    """
    logprobs, _ = response_logprobs_and_entropy(model, batch, temperature, with_entropy=False)
    return logprobs


def response_logprobs_and_entropy(
    model: Any, batch: PaddedBatch, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [B, T], entropy [B, T] of the tempered next-token distribution or None)."""
    log_dist = torch.log_softmax(_scaled(response_logits(model, batch), temperature), dim=-1)
    token_logp = log_dist.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(log_dist.exp() * log_dist).sum(-1) * batch.response_mask
    return token_logp * batch.response_mask, entropy


def response_values(value_model: nn.Module, batch: PaddedBatch) -> torch.Tensor:
    """Critic value before each response token: [B, T] (0 where the mask is 0)."""
    values: torch.Tensor = value_model(batch.input_ids)
    return values.gather(1, batch.predict_index) * batch.response_mask


def last_token_scores(
    value_model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Sequence-classification score at each row's last real token: [B, L], [B] -> [B].

    Equals the HF model's own pooled logit, but takes the position from ``lengths`` rather
    than from the first/last pad id, so a pad token inside a response cannot move it."""
    values: torch.Tensor = value_model(input_ids)
    return values.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)


def copy_sidecar_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy tokenizer and generation files of ``src_dir`` into ``dst_dir``; returns the names."""
    copied = []
    for name in SIDECAR_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def save_model_dir(
    model: Any, out_dir: Path, dtype: torch.dtype | None = None, sidecar_from: Path | None = None
) -> None:
    """Write ``model`` as an HF model dir (safetensors + config.json) into ``out_dir``.

    ``dtype`` casts a copy (the live fp32 weights stay untouched; no copy when the model
    already has that dtype); ``sidecar_from`` copies the tokenizer and generation files of
    that dir, so vLLM and transformers load ``out_dir`` on its own. KV caching is switched
    back on in the saved config: inference wants it."""
    _quiet_transformers()
    same = dtype is None or all(t.dtype == dtype for t in model.state_dict().values())
    # A deep copy of the model costs more than writing it (~0.1-0.4 s for the tiny policy).
    saved = model if same else copy.deepcopy(model).to(dtype)
    target = saved.classifier if isinstance(saved, ValueModel) else saved
    use_cache = target.config.use_cache
    target.config.use_cache = True
    try:
        target.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        target.config.use_cache = use_cache
    if sidecar_from is not None:
        copy_sidecar_files(sidecar_from, out_dir)


@contextlib.contextmanager
def atomic_directory(dest: Path) -> Iterator[Path]:
    """Yield an empty sibling temp dir; on success it replaces ``dest`` in one rename.

    Readers see the old ``dest`` or the complete new one, never a half-written dir; on an
    exception the temp dir is removed and ``dest`` is left as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes 0700; other pods (another uid) must read it
        old: Path | None = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
