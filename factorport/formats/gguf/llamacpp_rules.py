"""What llama.cpp needs of model.gguf and adapter.gguf, checked on a
structurally valid `Layout` before llama.cpp sees the file.

llama.cpp asserts (aborting the process) on several hyper-parameters
(block_count outside 1..512, head sizes that differ, a quantized norm in an
element-wise multiply), and llama-cpp-python keeps a NULL adapter when
llama.cpp refuses one, which segfaults at the first evaluation. So the
checks here are complete for what factorport writes: every key llama.cpp
reads has the type and range it needs, unknown keys under the prefixes it
reads are refused, every tensor has the shape the metadata implies and a
type from an allowed set. Derived from the vendored llama.cpp
(src/llama-model.cpp, models/llama.cpp, models/qwen2.cpp, models/qwen3.cpp, models/phi3.cpp, src/llama-vocab.cpp,
src/llama-adapter.cpp).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ...errors import FactorportError
from ...llamacpp.hparams import ROPE_FREQS_ARCHS
from ...llamacpp.names import OUTPUT, OUTPUT_NORM, ROPE_FREQS, TOKEN_EMBEDDING
from .structure import ARRAY, BOOL, FLOAT32, INT32, REEXPORT, STRING, UINT32, KeyValue, Layout, shown, type_name

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
NATIVE_ARCH = "factorport"
# llama.cpp's architecture -> the per-layer linears that may carry a bias it loads
BIASES = {
    "llama": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
    "qwen2": ("attn_q", "attn_k", "attn_v"),
    "qwen3": ("attn_q", "attn_k", "attn_v"),
    "phi3": (),
    "gemma3": (),
}
_SEPARATE = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# llama.cpp's architecture -> the linears of a block (models/phi3.cpp: q/k/v
# fused in attn_qkv; ffn_up holds gate's rows, then up's, and no ffn_gate)
BLOCK_LINEARS = {
    "llama": _SEPARATE, "qwen2": _SEPARATE, "qwen3": _SEPARATE, "gemma3": _SEPARATE,
    "phi3": ("attn_qkv", "attn_output", "ffn_up", "ffn_down"),
}
# llama.cpp's architecture -> its per-block norms over each head of q and k (models/qwen3.cpp)
HEAD_NORMS = {"qwen3": ("attn_q_norm", "attn_k_norm"), "gemma3": ("attn_q_norm", "attn_k_norm")}
# llama.cpp's architecture -> its norms after attention and after the MLP (models/gemma3.cpp)
POST_NORMS = {"gemma3": ("post_attention_norm", "post_ffw_norm")}
# a general.name containing one of these makes llama.cpp set attributes of
# these tokens by text, failing the load when one is absent (src/llama-vocab.cpp)
PHI3_NAMES = ("phi-3", "phi3")
PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")
BLOCK_NORMS = ("attn_norm", "ffn_norm")  # the per-block norms of every architecture above
# types a weight matrix may have: those factorport writes (its lossless blocks,
# the --gguf-type choices and the per-tensor types of llama.cpp's mixes)
WEIGHT_TYPES = frozenset({
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0",
})
VECTOR_TYPES = frozenset({"F32"})  # norms and biases: ggml's element-wise ops need F32 here
LORA_TYPES = frozenset({"F32", "F16"})
NORM, BIAS, WEIGHT = "norm", "bias", "weight"

# {arch}.<suffix> -> (type, required); every key factorport writes, nothing else
ARCH_KEYS = {
    "block_count": (UINT32, True),
    "context_length": (UINT32, True),
    "embedding_length": (UINT32, True),
    "feed_forward_length": (UINT32, True),
    "attention.head_count": (UINT32, True),
    "attention.head_count_kv": (UINT32, False),
    "attention.layer_norm_rms_epsilon": (FLOAT32, True),
    "attention.key_length": (UINT32, False),
    "attention.value_length": (UINT32, False),
    "rope.freq_base": (FLOAT32, False),
    "rope.dimension_count": (UINT32, False),
    "rope.scaling.type": (STRING, False),
    "rope.scaling.factor": (FLOAT32, False),
    "vocab_size": (UINT32, False),
    # gemma3's sliding layers (attention.sliding_window_pattern: one BOOL a block)
    "attention.sliding_window": (UINT32, False),
    "attention.sliding_window_pattern": (ARRAY, False),
    "rope.freq_base_swa": (FLOAT32, False),
    "final_logit_softcapping": (FLOAT32, False),
}
ARCH_ARRAY_ITEMS = {"attention.sliding_window_pattern": BOOL}
# general.* keys llama.cpp reads with a fixed type (others it only prints)
GENERAL_KEYS = {
    "general.architecture": STRING, "general.type": STRING, "general.name": STRING,
    "general.alignment": UINT32, "general.quantization_version": UINT32, "general.file_type": UINT32,
}
# tokenizer keys factorport writes (or copies from an embedded model: SmolLM2, Gemma 3): key -> (type, element type)
TOKENIZER_KEYS = {
    "tokenizer.ggml.model": (STRING, None),
    "tokenizer.ggml.pre": (STRING, None),
    "tokenizer.ggml.tokens": (ARRAY, STRING),
    "tokenizer.ggml.token_type": (ARRAY, INT32),
    "tokenizer.ggml.scores": (ARRAY, FLOAT32),
    "tokenizer.ggml.merges": (ARRAY, STRING),
    "tokenizer.ggml.add_bos_token": (BOOL, None),
    "tokenizer.ggml.add_eos_token": (BOOL, None),
    "tokenizer.ggml.add_sep_token": (BOOL, None),
    "tokenizer.ggml.add_space_prefix": (BOOL, None),
    "tokenizer.chat_template": (STRING, None),
}
TOKENIZER_MODELS = ("gpt2", "llama")  # llama.cpp's names of BPE and SentencePiece
TOKEN_ID_KEYS = ("bos", "eos", "unknown", "padding", "seperator", "eot", "eom")
TOKENIZER_KEYS.update({f"tokenizer.ggml.{k}_token_id": (UINT32, None) for k in TOKEN_ID_KEYS})
ADAPTER_KEYS = {"adapter.type": STRING, "adapter.lora.alpha": FLOAT32}
BLOCK = re.compile(r"blk\.(\d+)\.")


def _fail(layout: Layout, what: str):
    raise FactorportError(f"{layout.path}: {what}; {REEXPORT}")


def _expect_type(layout: Layout, key: str, kv: KeyValue, value_type: int, item_type: int | None = None) -> None:
    if kv.type != value_type or (value_type == ARRAY and kv.item_type != item_type):
        wanted = f"ARRAY[{type_name(item_type)}]" if value_type == ARRAY else type_name(value_type)
        _fail(layout, f"key {shown(key)} is {kv.describe()}, llama.cpp needs {wanted}")


@dataclass(frozen=True)
class HyperParameters:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_k: int
    head_v: int
    n_vocab: int


# ---------------------------------------------------------------- model.gguf


def architecture(layout: Layout) -> str:
    kv = layout.kv.get("general.architecture")
    if kv is None:
        _fail(layout, "key general.architecture is missing")
    _expect_type(layout, "general.architecture", kv, STRING)
    return kv.value


def check_model(layout: Layout) -> None:
    """Refuse a model.gguf llama.cpp would refuse, assert on, or misread."""
    arch = architecture(layout)
    if arch == NATIVE_ARCH:
        raise FactorportError(f"{layout.path} is factorport's own GGUF layout, which llama.cpp does not run; use model.gguf")
    if arch not in BIASES:
        _fail(layout, f"key general.architecture is {shown(repr(arch))}; factorport writes {' or '.join(map(repr, BIASES))}")
    kind = layout.kv.get("general.type")
    if kind is not None and kind.type == STRING and kind.value != "model":
        _fail(layout, f"key general.type is {shown(repr(kind.value))}, a model file needs 'model'")
    _check_keys(layout, arch)
    hyper = _hyper_parameters(layout, arch)
    _check_tokenizer(layout, hyper.n_vocab)
    _check_tensors(layout, arch, hyper)


def _check_keys(layout: Layout, arch: str) -> None:
    for key, kv in layout.kv.items():
        if key in GENERAL_KEYS:
            _expect_type(layout, key, kv, GENERAL_KEYS[key])
        elif key.startswith(f"{arch}."):
            suffix = key.removeprefix(f"{arch}.")
            if suffix not in ARCH_KEYS:
                _fail(layout, f"key {shown(key)} is not a hyper-parameter factorport writes (llama.cpp may assert on it)")
            _expect_type(layout, key, kv, ARCH_KEYS[suffix][0], ARCH_ARRAY_ITEMS.get(suffix))
        elif key.startswith("tokenizer."):
            if key not in TOKENIZER_KEYS:
                _fail(layout, f"key {shown(key)} is not a tokenizer key factorport writes")
            _expect_type(layout, key, kv, *TOKENIZER_KEYS[key])
        elif not key.startswith(("general.", "factorport.", "quantize.")):  # quantize.*: llama-quantize's record of its imatrix, only printed
            _fail(layout, f"key {shown(key)} is not one factorport writes into a model for llama.cpp")
    for suffix, (_, required) in ARCH_KEYS.items():
        if required and f"{arch}.{suffix}" not in layout.kv:
            _fail(layout, f"key {arch}.{suffix} is missing")


def _positive(layout: Layout, key: str, value: int, upper: int | None = None) -> int:
    if value < 1 or (upper is not None and value > upper):
        _fail(layout, f"key {shown(key)} is {value}; llama.cpp needs 1 to {upper}" if upper else f"key {shown(key)} is {value}; llama.cpp needs a positive value")
    return value


def _hyper_parameters(layout: Layout, arch: str) -> HyperParameters:
    def get(suffix, default=None):
        kv = layout.kv.get(f"{arch}.{suffix}")
        return default if kv is None else kv.value

    n_layer = _positive(layout, f"{arch}.block_count", get("block_count"), MAX_LAYERS)
    _positive(layout, f"{arch}.context_length", get("context_length"))
    n_embd = _positive(layout, f"{arch}.embedding_length", get("embedding_length"))
    n_ff = _positive(layout, f"{arch}.feed_forward_length", get("feed_forward_length"))
    n_head = _positive(layout, f"{arch}.attention.head_count", get("attention.head_count"))
    n_head_kv = _positive(layout, f"{arch}.attention.head_count_kv", get("attention.head_count_kv", n_head))
    if n_head % n_head_kv:
        _fail(layout, f"key {arch}.attention.head_count_kv is {n_head_kv}, which does not divide head_count {n_head}")
    if get("attention.key_length") is None and n_embd % n_head:
        _fail(layout, f"key {arch}.attention.head_count is {n_head}, which does not divide embedding_length {n_embd}")
    head_k = _positive(layout, f"{arch}.attention.key_length", get("attention.key_length", n_embd // n_head))
    head_v = _positive(layout, f"{arch}.attention.value_length", get("attention.value_length", n_embd // n_head))
    if head_v != head_k or head_k % 2:
        _fail(layout, f"key {arch}.attention.value_length is {head_v} and key_length {head_k}; llama.cpp needs them equal and even")
    rot = get("rope.dimension_count", head_k)
    if rot != head_k:
        _fail(layout, f"key {arch}.rope.dimension_count is {rot}; llama.cpp's {arch} needs the head size {head_k}")
    if arch in ("qwen2", "phi3") and head_k * n_head != n_embd:
        _fail(layout, f"key {arch}.attention.key_length is {head_k}; {arch} in llama.cpp needs head_count x head size = embedding_length {n_embd}")
    pattern = get("attention.sliding_window_pattern")
    if pattern is not None and len(pattern) != n_layer:
        _fail(layout, f"key {arch}.attention.sliding_window_pattern has {len(pattern)} entries for {n_layer} blocks")
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        _fail(layout, f"key {arch}.rope.scaling.type is {scaling!r}; factorport writes only 'linear' (or no scaling)")
    for suffix in ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.freq_base_swa", "rope.scaling.factor", "final_logit_softcapping"):
        value = get(suffix, 1.0)
        if not (math.isfinite(value) and value > 0):
            _fail(layout, f"key {arch}.{suffix} is {value}; llama.cpp needs a finite positive number")
    n_vocab = _token_count(layout)
    vocab = get("vocab_size", n_vocab)
    if vocab != n_vocab:
        _fail(layout, f"key {arch}.vocab_size is {vocab} but tokenizer.ggml.tokens holds {n_vocab} tokens")
    return HyperParameters(n_layer, n_embd, n_ff, n_head, n_head_kv, head_k, head_v, n_vocab)


def _token_count(layout: Layout) -> int:
    kv = layout.kv.get("tokenizer.ggml.tokens")
    if kv is None:
        _fail(layout, "key tokenizer.ggml.tokens is missing")
    if not kv.value:
        _fail(layout, "key tokenizer.ggml.tokens is empty")
    return len(kv.value)


def _check_tokenizer(layout: Layout, n_vocab: int) -> None:
    model = layout.kv.get("tokenizer.ggml.model")
    if model is None or model.value not in TOKENIZER_MODELS:
        _fail(layout, f"key tokenizer.ggml.model is {None if model is None else repr(model.value)}; factorport writes 'gpt2' (BPE) or 'llama' (SentencePiece, copied from Gemma 3)")
    if model.value == "gpt2" and "tokenizer.ggml.merges" not in layout.kv:
        _fail(layout, "key tokenizer.ggml.merges is missing (llama.cpp's BPE needs it)")
    tokens = layout.kv["tokenizer.ggml.tokens"].value
    # llama.cpp asserts that every token text is distinct; an empty special token trips its splitter
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if not token:
            _fail(layout, f"key tokenizer.ggml.tokens: token {i} is empty")
        if token in seen:
            _fail(layout, f"key tokenizer.ggml.tokens: token {i} repeats token {seen[token]} ({token[:40]!r})")
        seen[token] = i
    name = layout.kv.get("general.name")
    if name is not None and name.type == STRING and any(s in name.value.lower() for s in PHI3_NAMES):
        missing = [t for t in PHI3_TOKENS if t not in seen]
        if missing:
            _fail(layout, f"key general.name is {shown(repr(name.value))}, so llama.cpp looks up the Phi-3 tokens {missing}, which the vocabulary lacks (loading fails); export with the model's tokenizer")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        kv = layout.kv.get(key)
        if kv is not None and len(kv.value) != n_vocab:
            _fail(layout, f"key {shown(key)} has {len(kv.value)} entries for {n_vocab} tokens")
    for name in TOKEN_ID_KEYS:
        kv = layout.kv.get(f"tokenizer.ggml.{name}_token_id")
        if kv is not None and kv.value >= n_vocab:
            _fail(layout, f"key tokenizer.ggml.{name}_token_id is {kv.value}, outside the {n_vocab} tokens")
    add_bos = layout.kv.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None and add_bos.value and "tokenizer.ggml.bos_token_id" not in layout.kv:
        _fail(layout, "key tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is missing (llama.cpp asserts)")


def expected_tensors(arch: str, h: HyperParameters) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """{name: (ggml-order dims, role, required)} of every tensor llama.cpp's
    `arch` loads for these hyper-parameters."""
    q, kv_k, kv_v = h.head_k * h.n_head, h.head_k * h.n_head_kv, h.head_v * h.n_head_kv
    stems = BLOCK_LINEARS[arch]
    up = h.n_ff if "ffn_gate" in stems else 2 * h.n_ff  # without ffn_gate, ffn_up carries the gate too
    rows = {"attn_q": q, "attn_k": kv_k, "attn_v": kv_v, "attn_qkv": q + kv_k + kv_v, "attn_output": h.n_embd, "ffn_gate": h.n_ff, "ffn_up": up, "ffn_down": h.n_embd}
    cols = {"attn_output": q, "ffn_down": h.n_ff}
    expected = {
        TOKEN_EMBEDDING: ((h.n_embd, h.n_vocab), WEIGHT, True),
        OUTPUT: ((h.n_embd, h.n_vocab), WEIGHT, False),
        OUTPUT_NORM: ((h.n_embd,), NORM, True),
    }
    if arch in ROPE_FREQS_ARCHS:  # a rescaled rotary's per-frequency factors
        expected[ROPE_FREQS] = ((h.head_k // 2,), NORM, False)
    for i in range(h.n_layer):
        for stem in BLOCK_NORMS:
            expected[f"blk.{i}.{stem}.weight"] = ((h.n_embd,), NORM, True)
        for stem in POST_NORMS.get(arch, ()):
            expected[f"blk.{i}.{stem}.weight"] = ((h.n_embd,), NORM, True)
        for stem in HEAD_NORMS.get(arch, ()):
            expected[f"blk.{i}.{stem}.weight"] = ((h.head_k,), NORM, True)
        for stem in stems:
            expected[f"blk.{i}.{stem}.weight"] = ((cols.get(stem, h.n_embd), rows[stem]), WEIGHT, True)
            if stem in BIASES[arch]:
                expected[f"blk.{i}.{stem}.bias"] = ((rows[stem],), BIAS, False)
    return expected


def _check_tensors(layout: Layout, arch: str, h: HyperParameters) -> None:
    expected = expected_tensors(arch, h)
    for t in layout.tensors:
        if t.name not in expected:
            block = BLOCK.match(t.name)
            if block and int(block.group(1)) >= h.n_layer:
                _fail(layout, f"tensor {shown(t.name)} belongs to block {block.group(1)} but {arch}.block_count is {h.n_layer}")
            _fail(layout, f"tensor {shown(t.name)} is not one llama.cpp's {arch} loads")
        dims, role, _ = expected[t.name]
        if t.dims != dims:
            _fail(layout, f"tensor {shown(t.name)} has shape {list(t.shape)}, the metadata implies {list(reversed(dims))}")
        allowed = WEIGHT_TYPES if role == WEIGHT else VECTOR_TYPES
        if t.type_name not in allowed:
            _fail(layout, f"tensor {shown(t.name)} has type {t.type_name}; a {role} must be {' or '.join(sorted(allowed)) if len(allowed) < 4 else 'a ggml weight type'}")
    present = {t.name for t in layout.tensors}
    for name, (_, _, required) in expected.items():
        if required and name not in present:
            _fail(layout, f"tensor {name} is missing ({arch}.block_count is {h.n_layer})")


# -------------------------------------------------------------- adapter.gguf


def check_adapter(adapter: Layout, model_dims: dict[str, tuple[int, ...]], model_arch: str) -> None:
    """Refuse an adapter llama.cpp's LoRA loader would refuse (a NULL adapter
    that llama-cpp-python keeps, then crashes on) or that does not fit the model.
    `model_dims`: {tensor name: ggml-order dims} of the model."""
    for key, value_type in {**ADAPTER_KEYS, "general.type": STRING, "general.architecture": STRING}.items():
        kv = adapter.kv.get(key)
        if kv is None:
            if key != "adapter.lora.alpha":
                _fail(adapter, f"key {shown(key)} is missing")
            continue
        _expect_type(adapter, key, kv, value_type)  # llama.cpp's typed getters assert on another type
    for key, kv in adapter.kv.items():
        if key in GENERAL_KEYS:
            _expect_type(adapter, key, kv, GENERAL_KEYS[key])
        elif not (key in ADAPTER_KEYS or key.startswith(("general.", "factorport."))):
            _fail(adapter, f"key {shown(key)} is not one factorport writes into an adapter")
    if adapter.kv["general.type"].value != "adapter":
        _fail(adapter, f"key general.type is {adapter.kv['general.type'].value!r}, not 'adapter'")
    if adapter.kv["adapter.type"].value != "lora":
        _fail(adapter, f"key adapter.type is {adapter.kv['adapter.type'].value!r}, not 'lora'")
    arch = adapter.kv["general.architecture"].value
    if arch != model_arch:
        _fail(adapter, f"key general.architecture is {shown(repr(arch))} but the model's is {shown(repr(model_arch))}; export both together")
    alpha = adapter.kv.get("adapter.lora.alpha")
    if alpha is not None and not (math.isfinite(alpha.value) and alpha.value >= 0):
        _fail(adapter, f"key adapter.lora.alpha is {alpha.value}; it must be finite and not negative")
    if not adapter.tensors:
        _fail(adapter, "the adapter holds no tensor")
    _check_lora_tensors(adapter, model_dims)


def _check_lora_tensors(adapter: Layout, model_dims: dict[str, tuple[int, ...]]) -> None:
    by_name = {t.name: t for t in adapter.tensors}
    for t in adapter.tensors:
        target, dot, part = t.name.rpartition(".")
        if not dot or part not in ("lora_a", "lora_b"):
            _fail(adapter, f"tensor {shown(t.name)} is not a LoRA tensor (its name must end in .lora_a or .lora_b)")
        other = f"{target}.{'lora_b' if part == 'lora_a' else 'lora_a'}"
        if other not in by_name:
            _fail(adapter, f"tensor {shown(t.name)} has no {other.rpartition('.')[2]} ({shown(other)} is missing)")
        if t.type_name not in LORA_TYPES:
            _fail(adapter, f"tensor {shown(t.name)} has type {t.type_name}; LoRA tensors must be F32 or F16")
        weight = model_dims.get(target)
        if weight is None or len(weight) != 2 or target == TOKEN_EMBEDDING:
            _fail(adapter, f"tensor {shown(t.name)}: the model has no weight matrix {shown(target)} (the adapter belongs to another model)")
        if len(t.dims) != 2:
            _fail(adapter, f"tensor {shown(t.name)} has shape {list(t.shape)}; a LoRA tensor is a matrix")
        if part == "lora_a":
            b = by_name[other]
            in_f, out_f = weight
            rank = t.dims[1]
            # numpy order: A (r, in), B (out, r); ggml order reversed
            if t.dims[0] != in_f or len(b.dims) != 2 or b.dims != (rank, out_f):
                _fail(
                    adapter,
                    f"tensor {shown(target)} LoRA shapes A{list(t.shape)} B{list(b.shape)} do not fit the weight ({out_f}, {in_f}) "
                    "(the adapter belongs to another model)",
                )
