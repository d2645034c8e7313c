"""The safetensors directory: `model.safetensors` (every tensor once, the
layout JSON in the header under `factorport`), plus config, generation config
and tokenizer files, so the directory looks like a Hugging Face model.
`load` gives back a transformers model computing the same logits bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import FactorportError
from .layout import describe, rebuild

SUBDIR = "safetensors"  # inside a `factorport convert` output
WEIGHTS = "model.safetensors"
METADATA_KEY = "factorport"


def state_tensors(model) -> dict[str, torch.Tensor]:
    """Every stored tensor once: shared storage (tied weights) is kept under its first name."""
    seen: dict[int, str] = {}
    tensors = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if t is None:
            continue
        key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else (id(t), 0, t.dtype)
        if key in seen:
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors


def save(model, tokenizer, directory: Path) -> dict:
    """Write the directory (which must exist and be empty); returns the layout metadata."""
    meta = describe(model)
    save_file(state_tensors(model), str(directory / WEIGHTS), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return meta


def read_metadata(directory: Path) -> dict:
    """The layout JSON from the safetensors header (no tensor is read)."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FactorportError(f"{directory} has no {WEIGHTS}; point at a factorport safetensors directory")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise FactorportError(f"{path} is truncated or corrupted ({exc}); re-export it") from exc
    if METADATA_KEY not in header:
        raise FactorportError(f"{path} carries no factorport layout; it is a plain model, load it with transformers")
    return json.loads(header[METADATA_KEY])


def find_artifact(path: str | Path) -> Path | None:
    """The safetensors directory of a factorport output (or `path` itself), or None."""
    path = Path(path)
    for candidate in (path / SUBDIR, path):
        if (candidate / WEIGHTS).is_file() and (candidate / "config.json").is_file():
            try:
                read_metadata(candidate)
            except FactorportError as exc:
                if "plain model" in str(exc):
                    continue
                raise
            return candidate
    return None


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FactorportError(f"{path} is truncated or corrupted ({exc}); re-export it") from exc


def _skeleton(directory: Path):
    """An uninitialised transformers model of the directory's config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older/newer transformers
        from transformers.initialization import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def load(directory: str | Path):
    """(model, tokenizer) from a factorport safetensors directory."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    meta = read_metadata(directory)
    tensors = read_tensors(directory)
    model = _skeleton(directory)
    rebuild(model, meta, tensors)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not _is_tied_alias(model, k)]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        what = "missing" if missing else "unexpected"
        raise FactorportError(f"{directory / WEIGHTS}: tensor '{bad}' is {what}; the file does not match its layout")
    if not meta.get("tied_embeddings") and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").exists() else None
    return model.eval(), tokenizer


def _is_tied_alias(model, key: str) -> bool:
    """lm_head.weight is not stored when it is the embedding table."""
    return getattr(model.config, "tie_word_embeddings", False) and key.endswith("lm_head.weight")
