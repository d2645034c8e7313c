"""Running an exported decoder with onnxruntime (Optimum's input/output names).

Used by the exporter's parity check and by the onnxruntime backend. The
MatMulNBits `accuracy_level` is a node attribute, not a session option: a
session with another level is built from a copy of the graph with the
attribute rewritten (in memory; external data is still read from the
directory, which `graph.validate_directory` has checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from ...errors import FactorportError
from .graph import MODEL_FILE, external_tensors, validate_directory

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


@dataclass
class DecoderSession:
    session: object
    past_names: list[str]  # past_key_values.N.key / .value, in input order
    kv_shape: tuple[int, int]  # (kv heads, head dim)
    uses_position_ids: bool
    directory: Path

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
        providers = ["CPUExecutionProvider"]
        try:
            if accuracy_level and with_accuracy_level(structure, accuracy_level):
                if any(True for _ in external_tensors(structure)):
                    options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(directory.resolve()))
                session = ort.InferenceSession(structure.SerializeToString(), options, providers=providers)
            else:
                session = ort.InferenceSession(str(directory / MODEL_FILE), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own runtime errors
            first = str(exc).strip().splitlines()[0][:200]
            raise FactorportError(f"onnxruntime cannot load {directory / MODEL_FILE} ({first}); re-export it") from exc
        return cls.from_session(session, directory)

    @classmethod
    def from_session(cls, session, directory: Path) -> "DecoderSession":
        inputs = {i.name: i for i in session.get_inputs()}
        if "input_ids" not in inputs or session.get_outputs()[0].name != "logits":
            raise FactorportError(f"{directory / MODEL_FILE} is not a decoder with Optimum's names (input_ids -> logits)")
        past = [name for name in inputs if name.startswith("past_key_values.")]
        if not past:
            raise FactorportError(f"{directory / MODEL_FILE} has no KV-cache inputs; export with task text-generation-with-past")
        shape = inputs[past[0]].shape  # [batch, kv heads, past length, head dim]
        return cls(session, past, (int(shape[1]), int(shape[3])), "position_ids" in inputs, directory)

    def empty_past(self) -> list[np.ndarray]:
        heads, dim = self.kv_shape
        return [np.zeros((1, heads, 0, dim), dtype=np.float32) for _ in self.past_names]

    def step(self, ids, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run `ids` after `past` (one sequence): (logits (n, vocab), present)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        start = past[0].shape[2]
        total = start + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), dtype=np.int64)}
        if self.uses_position_ids:
            feeds["position_ids"] = np.arange(start, total, dtype=np.int64).reshape(1, -1)
        feeds.update(zip(self.past_names, past))
        outputs = self.session.run(None, feeds)
        return outputs[0][0], outputs[1:]

    def logits(self, ids) -> torch.Tensor:
        """(n, vocab) float32 logits of one window, without a cache."""
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        logits, _ = self.step(ids, self.empty_past())
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
