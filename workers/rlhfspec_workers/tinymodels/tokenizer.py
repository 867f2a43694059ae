"""Character-level tokenizer shared by every model of the tiny-model kit.

Where it sits: ``build.py`` saves it next to each model (policy, draft, reward) and as its own
``tokenizer/`` directory, so ``transformers.AutoTokenizer`` and vLLM load it from any model dir.
Training code uses :func:`encode_chars` (a dict lookup, no tokenizer object) for speed; a test
checks it equals the saved tokenizer's output.

Layout: ids 0-3 are ``<pad> <bos> <eos> <unk>``, then the ten digits, then the task symbols, then
``<reserved_k>`` filler up to :data:`VOCAB_SIZE`, so the tokenizer's size equals the models'
``vocab_size`` exactly (vLLM and HF then agree on every id; no unreachable logits beyond the
tokenizer). Each character is one token; the post-processor prepends BOS; decoding fuses tokens
without spaces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhfspec_workers.tinymodels.task import DIGITS, PROMPT_PREFIX, PROMPT_SUFFIX

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
# Symbols the task uses, plus a few spare printable ones so a later task variant need not change
# the vocabulary (and with it every model's shape).
SYMBOLS = (PROMPT_PREFIX, PROMPT_SUFFIX, ",", " ", "+", "-", ">")
# 32: the specials, digits and symbols above plus reserved spares; vLLM 0.32 CPU loads and
# samples a vocabulary this small (checked by the engine test).
VOCAB_SIZE = 32
MODEL_MAX_LENGTH = 128


def vocab() -> dict[str, int]:
    """Token -> id, exactly :data:`VOCAB_SIZE` entries."""
    tokens = [*SPECIAL_TOKENS, *DIGITS, *SYMBOLS]
    tokens += [f"<reserved_{i}>" for i in range(VOCAB_SIZE - len(tokens))]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise AssertionError("vocabulary layout is inconsistent")
    return {tok: i for i, tok in enumerate(tokens)}


_VOCAB = vocab()


def encode_chars(text: str, add_bos: bool = False) -> list[int]:
    """Fast path equal to the saved tokenizer on plain text (unknown characters -> ``<unk>``)."""
    ids = [_VOCAB.get(ch, UNK_ID) for ch in text]
    return [BOS_ID, *ids] if add_bos else ids


def decode_ids(ids: list[int]) -> str:
    """Inverse of :func:`encode_chars`, dropping special and reserved tokens."""
    inverse = {i: t for t, i in _VOCAB.items()}
    out = []
    for i in ids:
        tok = inverse.get(int(i), UNK_TOKEN)
        if len(tok) == 1:
            out.append(tok)
    return "".join(out)


def build_tokenizer() -> Any:
    """The raw ``tokenizers.Tokenizer`` (typed ``Any``: the library ships no stubs)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=dict(_VOCAB), unk_token=UNK_TOKEN))
    # Isolating every character (newline included) makes the model character-level.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(out_dir: Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``.

    Written by hand rather than via ``save_pretrained`` so the bytes do not depend on the
    transformers version (the kit must rebuild byte-identically) and the files are the classic
    ``PreTrainedTokenizerFast`` layout every loader understands.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out_dir / "tokenizer.json"), pretty=True)
    added = {
        str(_VOCAB[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
    }
    for name, payload in (
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", special_map),
    ):
        (out_dir / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_tokenizer(path: Path) -> Any:
    """Load a saved tokenizer through ``transformers.AutoTokenizer`` (the path vLLM takes)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
