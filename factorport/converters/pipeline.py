"""The layer-by-layer conversion (GPTQ's reference script, llm-compressor's
sequential pipeline): memory bounded by one decoder layer.

The calibration sequences' hidden states enter layer 0. For each decoder
layer in turn the driver

1. reads that layer's weights from the source (float32, on the device) — the
   only float32 copy of a decoder layer that exists;
2. runs the sequences through it, collecting XᵀX of its linears' inputs;
3. runs every recipe step on that layer alone (`targets.scope`);
4. runs the sequences through the layer again, now compressed, to give the
   next layer its inputs (`mode: sequential`: each layer is fitted to what the
   compressed layers before it produce), or keeps the uncompressed outputs of
   step 2 (`mode: parallel`: every layer's statistics from the dense model);
   `mode: asymmetric` is sequential, and also carries the uncompressed
   model's hidden states alongside, so that each linear aims at the
   uncompressed model's output (`aim_at_dense_outputs_`);
5. hands the layer to the caller (which writes it) and frees it.

The output projection comes last, with the final norm's output as its input.
The driver writes nothing; `convert_layers` yields one `Piece` per layer and
the caller decides where it goes (and can stop and `resume` at any layer).

A step that spreads one budget over every layer runs here twice (see
`converters`): first with a scoring `Allocation` (in `parallel` mode, the
pieces thrown away), then with the solved one. Steps that need every layer
at once (`whole_model_reason`) are not run here; `api.convert` runs them on
the whole model in memory.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..architectures import arch_for
from ..errors import FactorportError
from . import apply
from .calibration import BATCH_TOKENS, MODES, GramCollector
from .lowrank import Allocation, input_transform
from .report import LayerReport
from .targets import compressible_linears, scope


@dataclass
class Piece:
    """One finished part of the model: a decoder layer (`index` >= 0) or the
    rest (`index` == -1: embedding, final norm, output projection). Its
    modules are in `model` until the caller asks for the next piece."""

    index: int
    prefix: str  # module path of the layer, "" for the rest
    linears: list[str]  # the compressible linears it holds
    reports: list[LayerReport]
    hidden: torch.Tensor | None  # (sequences, tokens, hidden) entering the next layer; None after the last
    seconds: float = 0.0
    calibration_seconds: float = 0.0  # of `seconds`: the forward passes and XᵀX
    dense_hidden: torch.Tensor | None = None  # mode asymmetric: the uncompressed model's `hidden`
    table_dtype: str | None = None  # the rest: the 16-bit type its plain embedding/output tables keep
    # with calibration: per linear, Σ over the calibration tokens of x² per
    # input column (XᵀX's diagonal), what llama.cpp calls an importance matrix
    input_sums: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Resume:
    """Where an interrupted conversion continues: the layer, and the hidden states entering it."""

    layer: int
    hidden: torch.Tensor | None
    dense_hidden: torch.Tensor | None = None


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer to record what the decoder passes it
    (layers may differ: Gemma 3 gives sliding and global layers their own
    masks). It passes the hidden states on untouched, as a 1-tuple (a
    decoder either hands the result to the next layer, which is a catcher
    too, or takes its [0], as Gemma 3's does), so nothing computes; the
    last one raises, so nothing after the layers runs."""

    def __init__(self, layer: nn.Module, index: int, record: dict, last: bool) -> None:
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule: only read
        self.index, self.record, self.last = index, record, last

    def __getattr__(self, name: str):
        # the decoder may read the layer's own attributes before calling it
        # (Qwen2 in transformers 4.57 picks its mask by `attention_type`)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, hidden, **kwargs):
        self.record[self.index] = (hidden, kwargs)
        if self.last:
            raise _Captured()
        return (hidden,)


@dataclass
class LayerDriver:
    model: nn.Module  # the skeleton: layers on the meta device until they are read
    source: object  # a loading.WeightSource
    steps: list
    mode: str = "sequential"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    allocation: Allocation | None = None  # for a step that spreads a budget over every layer

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FactorportError(f"calibration mode '{self.mode}' is not one of {', '.join(MODES)}")
        self.arch = arch_for(self.model.config)
        self.layers = self.model.get_submodule(self.arch.layers)
        self._load_embedding()
        self._kwargs: list[dict] | None = None  # per layer
        self.dense_hidden: torch.Tensor | None = None  # mode asymmetric: the uncompressed model's hidden states

    # ----------------------------------------------------------- the source

    def _read(self, module: nn.Module, prefix: str, dtype: torch.dtype | None = torch.float32) -> None:
        """Give a meta-device module its source tensors (float32, on the device)."""
        names = list(module.state_dict().keys())
        tensors = {n: self.source.tensor(f"{prefix}.{n}", dtype).to(self.device) for n in names}
        module.load_state_dict(tensors, strict=True, assign=True)

    def _load_embedding(self) -> None:
        # as stored until the output projection's turn: an 8B model's table
        # is 1 GB in bfloat16 and 2 GB in float32
        self._read(self.model.get_submodule(self.arch.embed), self.arch.embed, dtype=None)
        self._read(self.model.get_submodule(self.arch.norm), self.arch.norm)
        decoder = self.model.get_submodule(self.arch.decoder)
        decoder.get_submodule(self.arch.rotary).to(self.device)  # its tables, computed from the config

    def _load_head(self, targeted: bool) -> str | None:
        """The output projection: float32 when a step compresses it, else as
        stored. Plain tables keep the source's 16-bit type (written as read:
        an 8B model's two are 2.1 GB in bfloat16, 4.2 GB in float32); returns
        that type, None when they are float32."""
        embedding = self.model.get_submodule(self.arch.embed)
        head = self.model.get_submodule(self.arch.lm_head)
        if getattr(self.model.config, "tie_word_embeddings", False):
            if targeted:  # the one table is compressed: from float32
                embedding.weight = nn.Parameter(embedding.weight.float(), requires_grad=False)
            head.weight = embedding.weight  # one table for both
            tables = [] if targeted else [embedding]
        else:
            self._read(head, self.arch.lm_head, dtype=torch.float32 if targeted else None)
            tables = [embedding] if targeted else [embedding, head]
        kept = {t.weight.dtype for t in tables}
        if len(kept) != 1 or not kept <= {torch.float16, torch.bfloat16}:  # float32 (or mixed) tables: float32 throughout
            for table in tables:
                table.weight = nn.Parameter(table.weight.float(), requires_grad=False)
            return None
        return str(kept.pop()).removeprefix("torch.")

    # ---------------------------------------------------------- activations

    @torch.inference_mode()
    def embed(self, sequences: list[torch.Tensor]) -> torch.Tensor:
        """The hidden states entering layer 0, (sequences, tokens, hidden)."""
        out = []
        layers, record = list(self.layers), {}
        for i, layer in enumerate(layers):
            self.layers[i] = _Catcher(layer, i, record, last=i == len(layers) - 1)
        decoder = self.model.get_submodule(self.arch.decoder)
        try:
            embedding = self.model.get_submodule(self.arch.embed)
            for seq in sequences:
                try:  # float32 from the start (a bfloat16 table would give bfloat16 rotary tables)
                    decoder(inputs_embeds=embedding(seq.to(self.device)).float(), use_cache=False)
                except _Captured:
                    out.append(record[0][0][0])
                    self._kwargs = [record[i][1] for i in range(len(layers))]
                else:  # pragma: no cover - a decoder that does not call its layers
                    raise FactorportError("the decoder did not call its layers; this architecture needs its own driver")
        finally:
            for i, layer in enumerate(layers):
                self.layers[i] = layer
        return torch.stack(out)

    def _layer_kwargs(self, index: int, length: int) -> dict:
        if self._kwargs is None:  # resumed: capture them from one dummy sequence
            self.embed([torch.zeros(1, length, dtype=torch.long)])
        return self._kwargs[index]

    @torch.inference_mode()
    def _forward(self, index: int, layer: nn.Module, hidden: torch.Tensor, collector: GramCollector | None = None, keep: bool = True) -> None:
        """Run `hidden` through `layer`, batch by batch; with `keep`, each
        batch's output replaces its input in place (sequences are independent),
        so the calibration activations exist once however many layers run.
        With mode asymmetric and a collector, each batch of the uncompressed
        model's hidden states runs first (recorded, and advanced in place)."""
        kwargs = self._layer_kwargs(index, hidden.shape[1])
        # batched as `collect` batches the whole model (and one dequantization
        # of a compressed layer per batch)
        batch = max(1, BATCH_TOKENS // hidden.shape[1])
        paired = collector is not None and self.mode == "asymmetric"

        def run(x: torch.Tensor) -> torch.Tensor:
            result = layer(x, **kwargs)
            return result[0] if isinstance(result, tuple) else result

        for i in range(0, hidden.shape[0], batch):
            if paired:
                collector.recording = True
                self.dense_hidden[i : i + batch] = run(self.dense_hidden[i : i + batch])
                collector.recording = False
            if collector is not None:
                collector.sequence = i
            result = run(hidden[i : i + batch])
            if keep:
                hidden[i : i + batch] = result

    # --------------------------------------------------------------- steps

    def _compress(self, names: list[str], stats, owner: nn.Module) -> list[LayerReport]:
        """The recipe's steps on `names` (inside `owner`) alone. They run on the
        CPU: their kernels (GPTQ's sweep, the SVDs) are tested there only; the
        forward passes around them use the device, and `owner` goes back to it."""
        if self.device.type != "cpu":
            owner.to("cpu")
            if stats is not None:
                cpu = lambda tensors: {k: v.cpu() for k, v in tensors.items()}  # noqa: E731
                stats = dataclasses.replace(stats, grams=cpu(stats.grams), first_tokens=cpu(stats.first_tokens))
        with scope(names):
            reports = apply(self.model, self.steps, stats, progress=False, allocation=self.allocation)
        if self.device.type != "cpu":
            owner.to(self.device)
        return reports

    def layer(self, index: int, hidden: torch.Tensor | None, calibration: str) -> Piece:
        """Read, calibrate, compress and (with calibration) run decoder layer `index`."""
        started = time.perf_counter()
        prefix = f"{self.arch.layers}.{index}"
        layer = self.layers[index]
        self._read(layer, prefix)
        names = [f"{prefix}.{rel}" for rel in self.arch.linears]
        if hidden is None:  # a recipe without calibration: nothing runs through the model
            return Piece(index, prefix, names, self._compress(names, None, layer), None, time.perf_counter() - started)
        read = time.perf_counter()
        asymmetric = self.mode == "asymmetric"
        collector = GramCollector(self.model, names, hidden.shape[0], self.device, shifts=asymmetric)
        # sequential: the uncompressed outputs only feed the statistics; the
        # compressed layer's replace the inputs below. parallel: they are the next inputs
        self._forward(index, layer, hidden, collector, keep=self.mode == "parallel")
        stats = collector.stats(hidden.shape[0] * hidden.shape[1], calibration, 0.0)
        del collector
        sums = stats.input_sums(names)
        if asymmetric:
            aim_at_dense_outputs_(self.model, names, stats)
        calibrated = time.perf_counter()
        reports = self._compress(names, stats, layer)
        compressed_at = time.perf_counter()
        compressed = self.layers[index]  # the steps replaced its linears in place
        if self.mode != "parallel":
            self._forward(index, compressed, hidden)
        done = time.perf_counter()
        return Piece(index, prefix, names, reports, hidden, done - started, (calibrated - read) + (done - compressed_at),
                     self.dense_hidden, input_sums=sums)

    def head(self, hidden: torch.Tensor | None, calibration: str) -> Piece:
        """Embedding, final norm and output projection: compressed when a step targets the lm_head."""
        started = time.perf_counter()
        name = self.arch.lm_head
        reports, calibrated = [], 0.0
        with scope([name]):
            targeted = any(compressible_linears(self.model, cfg.targets) for _, cfg in self.steps)
        table_dtype = self._load_head(targeted)
        sums = {}
        if targeted and hidden is None:
            reports = self._compress([name], None, self.model.get_submodule(name))
        elif hidden is not None:  # the output projection's input statistics, compressed or not
            collector = GramCollector(self.model, [name], hidden.shape[0], self.device)
            norm = self.model.get_submodule(self.arch.norm)
            with torch.inference_mode():
                for i in range(hidden.shape[0]):
                    collector.sequence = i
                    collector.add(name, norm(hidden[i : i + 1]))
            stats = collector.stats(hidden.shape[0] * hidden.shape[1], calibration, 0.0)
            sums = stats.input_sums([name])
            calibrated = time.perf_counter() - started
            if targeted:
                reports = self._compress([name], stats, self.model.get_submodule(name))
        return Piece(-1, "", [name], reports, None, time.perf_counter() - started, calibrated, table_dtype=table_dtype, input_sums=sums)

    def release(self, piece: Piece) -> None:
        """Free a written layer: its modules stay as meta-device shapes."""
        if piece.index >= 0:
            self.layers[piece.index] = self.layers[piece.index].to("meta")


ASYMMETRIC_DAMPING = 0.01  # of mean(diag XᵀX), as GPTQ damps its Hessian
# how far towards the least-squares target a linear moves: GPTAQ's reference
# scales its asymmetric term by 0.25; the full step (1.0) overfits the drift
# (SmolLM2 w4-gptq: 33.19 sequential -> 114 with 1.0)
ASYMMETRIC_SHARE = 0.25


@torch.no_grad()
def aim_at_dense_outputs_(model, names: list[str], stats, damping: float = ASYMMETRIC_DAMPING, share: float = ASYMMETRIC_SHARE) -> None:
    """Move each linear's W towards the W' its asymmetric objective reduces to:
    with X its inputs here and X_d the uncompressed model's on the same
    tokens, ‖X_d·Wᵀ - X·Ŵᵀ‖² = ‖X·(W' - Ŵ)ᵀ‖² + const for
    W' = W + W·E·(XᵀX)⁻¹, E = (X_d - X)ᵀX (least squares), so every step fits
    its target on X exactly as in sequential mode; the target is
    W + share·(W' - W). The damping shrinks W' towards W where X determines
    the shift poorly."""
    for key in dict.fromkeys(stats.key_of[n] for n in names):
        factor = input_transform("whitened", stats.grams[key], 0.0, damping).scale  # damped XᵀX's Cholesky factor
        shift = torch.cholesky_solve(stats.shifts[key].T.contiguous(), factor).T  # E·(XᵀX)⁻¹
        del factor
        for name in names:
            if stats.key_of[name] == key:
                w = model.get_submodule(name).weight
                w.copy_(torch.addmm(w.double(), w.double(), shift, alpha=share))
        del shift


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def _glibc():
    """The process's C library when it is glibc (it has malloc_trim), else None.
    Resolved once: the driver asks after every layer."""
    libc = ctypes.CDLL(None)  # the symbols already loaded; no library search
    return libc if hasattr(libc, "malloc_trim") else None


def _fix_mmap_threshold() -> None:
    """Allocate buffers of 8 MB and more with mmap, so freeing one returns it
    to the system. glibc's threshold otherwise adapts up to 32 MB and freed
    layer-sized buffers stay on its heaps: resident memory crept up by about
    one float32 layer per layer while the live tensors stayed the same
    (measured on a 1024-wide model: 0.59 -> 0.80 GiB over 8 layers; fixed:
    0.44 flat, same speed)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 8 << 20)


def _return_freed_memory() -> None:
    """Give the heaps' free pages (buffers under the threshold) back to the system."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def convert_layers(
    model,
    source,
    steps,
    sequences: list[torch.Tensor],
    calibration: str,
    mode: str = "sequential",
    device: str | torch.device = "cpu",
    resume: Resume | None = None,
    progress: bool = True,
    allocation: Allocation | None = None,
) -> Iterator[Piece]:
    """Compress `model` (a meta-device skeleton of `source`) layer by layer,
    yielding each finished `Piece`; the caller writes it before the next.
    With a scoring `allocation` the pieces only fill its options."""
    _fix_mmap_threshold()
    driver = LayerDriver(model, source, steps, mode, torch.device(device), allocation)
    start = 0
    if resume is not None:
        start, hidden = resume.layer, None if resume.hidden is None else resume.hidden.to(driver.device)
        if resume.dense_hidden is not None:
            driver.dense_hidden = resume.dense_hidden.to(driver.device)
    else:
        hidden = driver.embed(sequences) if sequences else None
        if mode == "asymmetric" and hidden is not None:
            driver.dense_hidden = hidden.clone()
    count = len(driver.layers)
    desc = "score" if allocation is not None and allocation.scoring else "convert"
    bar = tqdm(total=count + 1, initial=start, desc=desc, unit="layer", disable=not progress)
    try:
        for index in range(start, count):
            bar.set_postfix_str(f"layer {index}: {'/'.join(name for name, _ in steps)}")
            piece = driver.layer(index, hidden, calibration)
            hidden = piece.hidden
            yield piece
            driver.release(piece)
            _return_freed_memory()
            bar.update()
        bar.set_postfix_str("output projection")
        yield driver.head(hidden, calibration)
        bar.update()
    finally:
        bar.close()


__all__ = ["Piece", "Resume", "convert_layers"]
