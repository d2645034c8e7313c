"""`genai_config.json`: what onnxruntime-genai needs to run an exported directory.

onnxruntime-genai (`og.Model(DIR)`) reads the decoder's file name, its
input/output names, the attention shape and the search defaults from this
file, and the tokenizer from the same tokenizer files Optimum reads. The
graph keeps Optimum's form (KV cache in and out as separate tensors, the
present = past + new), so the config says `past_present_share_buffer: false`;
one directory serves `ORTModelForCausalLM` and `og.Model` both.

`genai_config` builds the file from config.json, generation_config.json and
the graph; `check_genai_config` checks a written one against the graph before
onnxruntime-genai reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from ...errors import FactorportError
from . import nodes

GENAI_CONFIG = "genai_config.json"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
# generation_config.json keys onnxruntime-genai's search options take as they are
SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams")


def _token_ids(value) -> list[int]:
    ids = value if isinstance(value, list) else [value]
    return [i for i in ids if type(i) is int]


def genai_config(config: dict, generation: dict, model: onnx.ModelProto) -> dict:
    """The genai_config.json of an exported decoder (`config`: config.json,
    `generation`: generation_config.json or {}); og's model types are
    Hugging Face's `model_type` names (llama, qwen2, phi3, gemma3_text, ...)."""
    shape = nodes.model_shape(config)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in {i.name for i in model.graph.input}:
        inputs["position_ids"] = "position_ids"
    inputs |= {"past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    eos = _token_ids(generation.get("eos_token_id", config.get("eos_token_id")))
    bos = _token_ids(generation.get("bos_token_id", config.get("bos_token_id")))
    pad = _token_ids(generation.get("pad_token_id", config.get("pad_token_id"))) or eos
    search = {"max_length": shape.max_positions, "past_present_share_buffer": False, "do_sample": False}
    search |= {key: generation[key] for key in SEARCH_KEYS if key in generation}
    return {
        "model": {
            "type": config["model_type"],
            "bos_token_id": bos[0] if bos else None,
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad[0] if pad else None,
            "vocab_size": shape.vocab,
            "context_length": shape.max_positions,
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": shape.hidden,
                "head_size": shape.head_dim,
                "num_attention_heads": shape.heads,
                "num_key_value_heads": shape.kv_heads,
                "num_hidden_layers": shape.layers,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
            },
        },
        "search": search,
    }


def write_genai_config(directory: Path, model: onnx.ModelProto) -> Path:
    """Write DIR/genai_config.json beside an exported model.onnx."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    generation_path = directory / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    path = directory / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(config, generation, model), indent=2) + "\n")
    return path


def check_genai_config(written: dict, config: dict, generation: dict, model: onnx.ModelProto) -> None:
    """A genai_config.json must say what the graph and config.json say: the
    names onnxruntime-genai binds, the attention shape, the layer count."""
    expected = genai_config(config, generation, model)["model"]
    decoder = written.get("model", {}).get("decoder") if isinstance(written.get("model"), dict) else None
    if not isinstance(decoder, dict):
        raise FactorportError(f"{GENAI_CONFIG} has no model.decoder section")
    for key, value in expected["decoder"].items():
        if key != "session_options" and decoder.get(key) != value:
            raise FactorportError(f"{GENAI_CONFIG}: model.decoder.{key} is {decoder.get(key)!r}, the graph and config.json say {value!r}")
    for key in ("type", "vocab_size", "context_length"):
        if written["model"].get(key) != expected[key]:
            raise FactorportError(f"{GENAI_CONFIG}: model.{key} is {written['model'].get(key)!r}, config.json says {expected[key]!r}")
    search = written.get("search", {})
    if not isinstance(search, dict) or search.get("past_present_share_buffer", False) is not False:
        raise FactorportError(f"{GENAI_CONFIG}: search.past_present_share_buffer must be false (the graph concatenates its KV cache)")
