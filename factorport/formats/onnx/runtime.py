"""Running an exported decoder with onnxruntime (Optimum's input/output names).

Used by the exporter's parity check and by the onnxruntime backend. The
session is built from the graph `graph.validate_directory` checked, as bytes
(never by re-reading model.onnx, which could have changed since), with
external data read from the checked directory. The MatMulNBits
`accuracy_level` is a node attribute, not a session option: a session with
another level gets the attribute rewritten in that in-memory graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from ...errors import FactorportError
from .graph import MODEL_FILE, validate_directory

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 = float32 compute, 4 = int8 activations
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def _session_options(threads: int | None, optimization: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise FactorportError(f"unknown graph optimization level {optimization!r}; choose one of {', '.join(levels)}")
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 3
    return options


def written_accuracy_level(model: onnx.ModelProto) -> int:
    """The highest `accuracy_level` the file's MatMulNBits nodes carry (what
    a runtime that cannot rewrite the graph, onnxruntime-genai, runs)."""
    levels = [a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    return max(levels, default=0)


def with_accuracy_level(model: onnx.ModelProto, level: int) -> int:
    """Set `accuracy_level` on every MatMulNBits node; returns how many."""
    count = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        for attribute in node.attribute:
            if attribute.name == "accuracy_level":
                attribute.i = level
                break
        else:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
        count += 1
    return count


def load_tokenizer(directory: str | Path):
    """The tokenizer saved beside the model (None when there is none), or one line
    saying why its files do not load (validate_directory has parsed their JSON;
    transformers still raises its own errors on JSON of the wrong shape)."""
    directory = Path(directory)
    if not (directory / "tokenizer_config.json").is_file():
        return None
    from ...loading import saved_tokenizer

    try:
        return saved_tokenizer(directory)
    except Exception as exc:  # noqa: BLE001 - transformers and tokenizers raise many kinds
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise FactorportError(f"{directory}: the tokenizer files do not load ({type(exc).__name__}: {first}); re-export it") from exc


def _max_positions(model: onnx.ModelProto) -> int | None:
    """Rows of the cos table the RotaryEmbedding nodes read (checked against config.json)."""
    tables = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "RotaryEmbedding" and node.input[2] in tables:
            return int(tables[node.input[2]].dims[0])
    return None


@dataclass
class DecoderSession:
    session: object
    past_names: list[str]  # past_key_values.N.key / .value, in input order
    kv_shape: tuple[int, int]  # (kv heads, head dim)
    uses_position_ids: bool
    directory: Path
    max_positions: int | None = None  # rows of the rotary cos/sin table (fused attention), None: no table

    @classmethod
    def open(
        cls,
        directory: str | Path,
        threads: int | None = None,
        accuracy_level: int = 0,
        optimization: str = "all",
    ) -> "DecoderSession":
        import onnxruntime as ort

        directory = Path(directory)
        if accuracy_level not in ACCURACY_LEVELS:
            raise FactorportError(f"accuracy_level {accuracy_level} is not one of {ACCURACY_LEVELS}")
        structure = validate_directory(directory)
        options = _session_options(threads, optimization)
        # external locations are relative to the model's directory; bytes carry no directory
        options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(directory.resolve()))
        with_accuracy_level(structure, accuracy_level)  # whatever the file says: the level asked for
        try:
            session = ort.InferenceSession(structure.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own runtime errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FactorportError(f"onnxruntime cannot load {directory / MODEL_FILE} ({first}); re-export it") from exc
        return cls.from_session(session, directory, _max_positions(structure))

    @classmethod
    def from_session(cls, session, directory: Path, max_positions: int | None = None) -> "DecoderSession":
        inputs = {i.name: i for i in session.get_inputs()}
        if "input_ids" not in inputs or session.get_outputs()[0].name != "logits":
            raise FactorportError(f"{directory / MODEL_FILE} is not a decoder with Optimum's names (input_ids -> logits)")
        past = [name for name in inputs if name.startswith("past_key_values.")]
        if not past:
            raise FactorportError(f"{directory / MODEL_FILE} has no KV-cache inputs; export with task text-generation-with-past")
        shape = inputs[past[0]].shape  # [batch, kv heads, past length, head dim]
        if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in (shape[1], shape[3])):
            raise FactorportError(f"{directory / MODEL_FILE}: cache input {past[0]} has shape {shape}, not [batch, heads, past, head dim]; re-export it")
        return cls(session, past, (int(shape[1]), int(shape[3])), "position_ids" in inputs, directory, max_positions)

    def empty_past(self) -> list[np.ndarray]:
        heads, dim = self.kv_shape
        return [np.zeros((1, heads, 0, dim), dtype=np.float32) for _ in self.past_names]

    def step(self, ids, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run `ids` after `past` (one sequence): (logits (n, vocab), present)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        start = past[0].shape[2]
        total = start + ids.shape[1]
        if self.max_positions is not None and total > self.max_positions:
            # RotaryEmbedding would index its cos/sin table past the end
            raise FactorportError(
                f"{self.directory / MODEL_FILE}: {total} positions exceed the model's {self.max_positions} "
                "(max_position_embeddings); use shorter windows"
            )
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), dtype=np.int64)}
        if self.uses_position_ids:
            feeds["position_ids"] = np.arange(start, total, dtype=np.int64).reshape(1, -1)
        feeds.update(zip(self.past_names, past))
        try:
            outputs = self.session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - a graph that loads can still fail on shapes it computes
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FactorportError(f"onnxruntime failed running {self.directory / MODEL_FILE} ({first}); re-export it") from exc
        return outputs[0][0], outputs[1:]

    def logits(self, ids) -> torch.Tensor:
        """(n, vocab) float32 logits of one window, without a cache."""
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        logits, _ = self.step(ids, self.empty_past())
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
