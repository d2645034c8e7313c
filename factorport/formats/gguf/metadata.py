"""The tokenizer's GGUF key/values (vocabulary, merges, special ids, chat
template); the hyper-parameters are in `factorport.llamacpp.hparams`.

Tokenizer, three cases:
* the vocabulary of an embedded model (SmolLM2's BPE, Gemma 3's SentencePiece):
  its GGUF's tokenizer keys are copied as they are (exact, including
  llama.cpp's tokenizer model and pre-tokenizer names, scores and types);
* another Hugging Face BPE tokenizer: tokens, merges and special ids from its
  tokenizer.json, with llama.cpp's "default" (GPT-2) pre-tokenizer;
* no tokenizer (tiny test models): a byte-level vocabulary, token i = byte i.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from ...errors import FactorportError

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


_EMBEDDED_FIELDS: dict[str, tuple] = {}


def _embedded_fields(name: str):
    """(tokens, [(key, value, types)]) of an embedded model's tokenizer keys,
    or None while it is not installed (looked for again on the next call:
    a model installed later in the same process counts)."""
    import gguf

    from ...loading import embedded_gguf

    if name not in _EMBEDDED_FIELDS:
        try:
            reader = gguf.GGUFReader(embedded_gguf(name, install=False))
        except FactorportError:
            return None
        fields = [(k, f.contents(), list(f.types)) for k, f in reader.fields.items() if k.startswith("tokenizer.")]
        tokens = next(v for k, v, _ in fields if k == "tokenizer.ggml.tokens")
        _EMBEDDED_FIELDS[name] = tokens, fields
    return _EMBEDDED_FIELDS[name]


def _hf_tokens(tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def add_tokenizer(writer, tokenizer, vocab_size: int) -> str:
    """Write the tokenizer keys; returns which case was used (for the report)."""
    if tokenizer is None:
        _byte_vocab(writer, vocab_size)
        return "byte-level (no tokenizer)"
    from ...loading import EMBEDDED

    tokens = _hf_tokens(tokenizer)
    for name in EMBEDDED:
        embedded = _embedded_fields(name)
        if embedded is not None and _same_vocabulary(tokens, embedded[0]):
            for key, value, types in embedded[1]:
                writer.add_key_value(key, value, types[0], sub_type=types[1] if len(types) > 1 else None)
            return f"copied from the embedded {name} GGUF"
    _bpe_vocab(writer, tokenizer, tokens, vocab_size)
    return "built from tokenizer.json (BPE, default pre-tokenizer)"


def _same_vocabulary(hf_tokens: list[str], gguf_tokens) -> bool:
    """True when transformers built `hf_tokens` from these GGUF tokens: its
    GGUF loader writes SentencePiece's spaces as '▁', may write a byte token
    ('<0x09>') as its character, and may leave out trailing tokens (Gemma 3's
    262144th)."""
    if len(hf_tokens) > len(gguf_tokens) or len(hf_tokens) < len(gguf_tokens) - 8:
        return False
    return all(a == b or a == b.replace(" ", "▁") or a == _byte_token_text(b) for a, b in zip(hf_tokens, gguf_tokens))


def _byte_token_text(token: str) -> str | None:
    """'<0x09>' -> '\t': the character a SentencePiece byte-fallback token stands for."""
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
    return chr(int(byte.group(1), 16)) if byte else None


def _byte_vocab(writer, vocab_size: int) -> None:
    if vocab_size > 256:
        raise FactorportError(f"a model without a tokenizer needs a vocabulary of at most 256 for GGUF, got {vocab_size}; save its tokenizer with it")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([_byte_symbol(b) for b in range(vocab_size)])
    writer.add_token_types([NORMAL] * vocab_size)
    # llama.cpp requires a merges list; one merge of two control bytes is inert
    writer.add_token_merges([f"{_byte_symbol(0)} {_byte_symbol(1)}"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)


@lru_cache(maxsize=1)
def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character map (printable ASCII maps to itself)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_symbol(b: int) -> str:
    return _byte_symbols()[b]


def _bpe_vocab(writer, tokenizer, tokens: list[str], vocab_size: int) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    if spec is None or spec.get("model", {}).get("type") != "BPE":
        raise FactorportError("GGUF export needs a fast BPE tokenizer (tokenizer.json); this tokenizer is not one")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    special = {t["id"]: t for t in spec.get("added_tokens", [])}
    types = [CONTROL if special.get(i, {}).get("special") else USER_DEFINED if i in special else NORMAL for i in range(len(tokens))]
    pad = vocab_size - len(tokens)  # the embedding may be larger than the vocabulary
    tokens = tokens + [f"[PAD{i}]" for i in range(pad)]
    types = types + [USER_DEFINED] * pad
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
