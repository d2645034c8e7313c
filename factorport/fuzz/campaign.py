"""A fuzz campaign: for each reader, N seeded mutants of its files, each read
in a forked child, and one row of counts.

Columns (what a mutant did):

    clean error         a one-line FactorportError naming one of the reader's files
    identical           it loaded and its logits are bit-identical to the original's
                        (manifest: no problem reported, the same files and hashes listed)
    caught by manifest  it loaded, the logits changed, and verify_manifest (with the
                        original manifest) reports the changed file
                        (manifest: verify_manifest reported a problem)
    uncaught            it loaded, the result changed, and nothing reported it
    bad error           a FactorportError that is not one line or names no file
    crash, hang, memory, traceback   see harness

`FAILURES` are the columns a sound reader never has.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import harness
from .mutators import mutate
from .readers import READERS, Reader, prepare

COLUMNS = ("clean error", "identical", "caught by manifest", "uncaught", "bad error", "crash", "hang", "memory", "traceback")
FAILURES = ("bad error", "crash", "hang", "memory", "traceback")
SAVED = FAILURES  # inputs kept for reproduction
NO_OP_RETRIES = 8  # a mutation that gives back the same bytes is drawn again
MAX_DISTINCT = 20  # distinct causes kept per failing column and reader


@dataclass
class Tally:
    reader: str
    mutants: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, dict] = field(default_factory=dict)  # first mutant of each column
    # failing columns: {column: {signature: first example + "count"}}, distinct causes apart
    distinct: dict[str, dict[str, dict]] = field(default_factory=dict)
    seconds: float = 0.0
    reference_error: str | None = None  # the unmutated artifact did not read

    @property
    def failures(self) -> int:
        return sum(self.counts[c] for c in FAILURES) + (1 if self.reference_error else 0)

    @classmethod
    def from_dict(cls, d: dict) -> "Tally":
        return cls(d["reader"], d["mutants"], Counter(d["counts"]), d["examples"], d.get("distinct", {}), d["seconds"], d["reference_error"])

    def merge(self, other: "Tally") -> None:
        """Add another shard's counts; each column keeps its lowest-index example."""
        self.mutants += other.mutants
        self.counts.update(other.counts)
        for column, example in other.examples.items():
            if column not in self.examples or example["index"] < self.examples[column]["index"]:
                self.examples[column] = example
        for column, causes in other.distinct.items():
            for signature, example in causes.items():
                self.add_failure(column, signature, example, example["count"])
        self.seconds = max(self.seconds, other.seconds)
        self.reference_error = self.reference_error or other.reference_error

    def add_failure(self, column: str, signature: str, example: dict, count: int = 1) -> None:
        """Count `count` failures of one cause; the lowest-index example stays."""
        causes = self.distinct.setdefault(column, {})
        known = causes.get(signature)
        if known is None and len(causes) >= MAX_DISTINCT:
            return
        total = count + (known["count"] if known else 0)
        if known is None or example["index"] < known["index"]:
            causes[signature] = dict(example)
        causes[signature]["count"] = total

    def to_dict(self) -> dict:
        return {"reader": self.reader, "mutants": self.mutants, "counts": {c: self.counts[c] for c in COLUMNS},
                "examples": self.examples, "distinct": self.distinct, "seconds": round(self.seconds, 2), "reference_error": self.reference_error}


def _single_threaded() -> None:
    """In a child: one compute thread, so that runs are deterministic and
    children do not compete for the machine's cores."""
    import torch

    torch.set_num_threads(1)


def _read_in_child(reader: Reader, root: Path, reference: str | None):
    """The function a child runs: the read, plus verify_manifest when the result changed."""
    from ..formats.manifest import verify_manifest

    def run():
        _single_threaded()
        value = reader.read(root)
        if reader.name == "manifest":
            return {"problems": value}
        result = {"digest": value}
        if reference is not None and value != reference:
            result["manifest"] = verify_manifest(root)
        return result

    return run


def is_clean_error(message: str, files: tuple[str, ...]) -> bool:
    """One line, naming one of the files the reader opens."""
    message = message.strip()
    return bool(message) and "\n" not in message and any(name in message for name in files)


def _same_files(a: bytes, b: bytes) -> bool:
    """Whether two manifests ask for the same checks: the same {file: sha256}.
    The rest of a manifest (source, recipe, packages) describes the artifact
    and cannot be verified against it."""
    try:
        files_a, files_b = json.loads(a).get("files"), json.loads(b).get("files")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(files_b, dict) and files_a == files_b


def column_of(reader: Reader, outcome: harness.ChildOutcome, reference: str | None, target: str, original: bytes, mutated: bytes) -> str:
    """Which column of the table one mutant's outcome falls in."""
    if outcome.kind == "error":
        return "clean error" if is_clean_error(outcome.detail, reader.files) else "bad error"
    if outcome.kind != "ok":
        return outcome.kind
    value = outcome.value if isinstance(outcome.value, dict) else {}
    if reader.name == "manifest":
        if value.get("problems"):
            return "caught by manifest"
        return "identical" if _same_files(original, mutated) else "uncaught"
    if value.get("digest") == reference:
        return "identical"
    reported = [p for p in value.get("manifest", []) if p.startswith(target + ":")]
    return "caught by manifest" if reported else "uncaught"


def mutant_seed(seed: int, reader: str, index: int) -> int:
    return random.Random(f"{seed}:{reader}:{index}").getrandbits(63)


def draw_mutant(reader: Reader, originals: dict[str, bytes], seed: int) -> tuple[str, bytes, str]:
    """(target path, mutated bytes, description) of one seeded mutant."""
    rng = random.Random(seed)
    target = rng.choices(reader.targets, [t.weight for t in reader.targets])[0]
    original = originals[target.path]
    for attempt in range(NO_OP_RETRIES):
        mutated, description = mutate(target.kind, original, seed + attempt)
        if mutated != original:
            break
    return target.path, mutated, description


def _save(out_dir: Path, reader: Reader, index: int, seed: int, column: str, target: str, mutated: bytes, description: str, outcome) -> Path:
    folder = Path(out_dir) / reader.name / f"{column.replace(' ', '-')}-{index:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / Path(target).name).write_bytes(mutated)
    info = {"reader": reader.name, "index": index, "seed": seed, "target": target, "mutation": description,
            "outcome": column, "detail": outcome.detail, "stderr": outcome.stderr, "seconds": round(outcome.seconds, 3)}
    (folder / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def failure_signature(column: str, outcome, description: str) -> str:
    """What tells one cause of a failure from another: the exception type and
    where it was raised, the signal and the innermost Python frame, or (hangs,
    malformed errors) the kind of mutation / the message without numbers."""
    if column in ("traceback", "memory") and outcome.detail:
        kind = outcome.detail.split(":", 1)[0]
        where = re.findall(r"\(([^()]*:\d+)\)$", outcome.detail)
        return f"{kind} at {where[0]}" if where else kind
    if column in ("crash", "hang"):
        frames = re.findall(r'File "([^"]+)", line (\d+)', outcome.stderr)
        top = f" at {os.path.basename(frames[0][0])}:{frames[0][1]}" if frames else ""
        return (outcome.detail if column == "crash" else "hang") + top
    if column == "bad error":
        return re.sub(r"\d+", "N", outcome.detail.strip().splitlines()[0] if outcome.detail.strip() else "(empty)")[:100]
    return description.split(":", 1)[0][:80]


def _example(index: int, target: str, description: str, outcome) -> dict:
    example = {"index": index, "target": target, "mutation": description, "detail": outcome.detail[:500]}
    if outcome.stderr:
        example["stderr"] = harness.stderr_summary(outcome.stderr)
    return example


def reference_digest(reader: Reader, root: Path, timeout: float, memory_limit: int | None) -> tuple[str | None, str | None]:
    """(digest of the unmutated artifact, None) or (None, why it did not read)."""
    outcome = harness.run_in_child(_read_in_child(reader, root, None), timeout, memory_limit)
    if outcome.kind != "ok":
        return None, f"{outcome.kind}: {outcome.detail}"
    value = outcome.value or {}
    if reader.name == "manifest":
        problems = value.get("problems")
        return ("no problems", None) if not problems else (None, f"verify_manifest reports {problems[0]}")
    return value.get("digest"), None


def fuzz_reader(
    reader: Reader,
    roots: list[Path],
    mutants: int,
    seed: int = 0,
    timeout: float = harness.DEFAULT_TIMEOUT,
    memory_limit: int | None = harness.DEFAULT_MEMORY_LIMIT,
    out_dir: Path | None = None,
    progress: bool = True,
) -> Tally:
    """Fuzz one reader with mutants 0..mutants-1, split over one forked
    shard per artifact copy in `roots` (each mutates its copy in place)."""
    started = time.monotonic()
    reference, why = reference_digest(reader, roots[0], timeout, memory_limit)
    if reference is None:
        return Tally(reader.name, reference_error=f"the unmutated artifact does not read: {why}", seconds=time.monotonic() - started)
    _progress_fd()
    if len(roots) == 1:
        return fuzz_shard(reader, roots[0], range(mutants), reference, seed, timeout, memory_limit, out_dir, progress)
    budget = timeout * (mutants // len(roots) + 2) + 60  # a shard that overran every mutant's deadline
    shards = [
        harness.start_child(
            lambda k=k: fuzz_shard(reader, roots[k], range(k, mutants, len(roots)), reference, seed, timeout, memory_limit, out_dir,
                                   progress and k == 0, mutants).to_dict(),
            budget,
            memory_limit=None,
        )
        for k in range(len(roots))
    ]
    tally = Tally(reader.name)
    for k, shard in enumerate(shards):
        outcome = harness.finish_child(shard)
        if outcome.kind != "ok":
            raise RuntimeError(f"fuzz shard {k} of {reader.name} failed: {outcome.kind}: {outcome.detail} {outcome.stderr[-300:]}")
        tally.merge(Tally.from_dict(outcome.value))
    tally.seconds = time.monotonic() - started
    return tally


def fuzz_shard(
    reader: Reader,
    root: Path,
    indices: range,
    reference: str,
    seed: int,
    timeout: float,
    memory_limit: int | None,
    out_dir: Path | None,
    progress: bool,
    total: int | None = None,
) -> Tally:
    """Mutants `indices` of one reader on the artifact copy at `root` (each
    mutated file is restored after its mutant)."""
    started = time.monotonic()
    tally = Tally(reader.name)
    originals = {t.path: (root / t.path).read_bytes() for t in reader.targets}
    step = max(1, len(indices) // 10)
    for index in indices:
        this_seed = mutant_seed(seed, reader.name, index)
        target, mutated, description = draw_mutant(reader, originals, this_seed)
        (root / target).write_bytes(mutated)
        try:
            outcome = harness.run_in_child(_read_in_child(reader, root, reference), timeout, memory_limit)
        finally:
            (root / target).write_bytes(originals[target])
        column = column_of(reader, outcome, reference, target, originals[target], mutated)
        tally.mutants += 1
        tally.counts[column] += 1
        tally.examples.setdefault(column, _example(index, target, description, outcome))
        if column in FAILURES:
            tally.add_failure(column, failure_signature(column, outcome, description), _example(index, target, description, outcome))
        if out_dir is not None and column in SAVED:
            _save(out_dir, reader, index, this_seed, column, target, mutated, description, outcome)
        if progress and (tally.mutants % step == 0 or tally.mutants == len(indices)):
            _print_progress(tally, time.monotonic() - started, len(indices), total)
    tally.seconds = time.monotonic() - started
    return tally


def _print_progress(tally: Tally, seconds: float, planned: int, total: int | None) -> None:
    counts = ", ".join(f"{c} {tally.counts[c]}" for c in COLUMNS if tally.counts[c])
    rate = tally.mutants / seconds if seconds else 0.0
    of = f" (one shard of {total})" if total else ""
    line = f"fuzz: {tally.reader}: {tally.mutants}/{planned}{of} mutants in {seconds:.0f} s ({rate:.1f}/s): {counts}\n"
    # to the campaign's stderr: a shard's own stderr is captured by the harness
    os.write(_progress_fd(), line.encode())


_PROGRESS_FD: list[int] = []


def _progress_fd() -> int:
    """A copy of this process's stderr, taken before any shard is forked."""
    if not _PROGRESS_FD:
        sys.stderr.flush()
        _PROGRESS_FD.append(os.dup(2))
    return _PROGRESS_FD[0]


def working_copy(artifact: Path, parent: Path) -> Path:
    """A copy of the artifact that mutants are written into (the original stays untouched)."""
    root = Path(parent) / "artifact"
    shutil.copytree(artifact, root, symlinks=False)
    return root


def run_campaign(
    artifact: Path | None,
    readers: list[str] | None = None,
    mutants: int = 10000,
    seed: int = 0,
    timeout: float = harness.DEFAULT_TIMEOUT,
    memory_limit: int | None = harness.DEFAULT_MEMORY_LIMIT,
    out_dir: Path | None = None,
    progress: bool = True,
    jobs: int = 1,
) -> list[Tally]:
    """Fuzz `readers` (default: all) on `artifact` (None: build the tiny
    artifact for this run), `jobs` children at a time. Call in a process
    that has not computed with torch or onnxruntime yet (see harness)."""
    from .artifact import build_in_child

    names = list(readers or READERS)
    unknown = [n for n in names if n not in READERS]
    if unknown:
        raise ValueError(f"unknown reader {unknown[0]!r}; choose from {', '.join(READERS)}")
    prepare()
    with tempfile.TemporaryDirectory(prefix="factorport-fuzz-") as tmp:
        if artifact is None:
            if progress:
                print("fuzz: building the tiny artifact", file=sys.stderr, flush=True)
            artifact = build_in_child(Path(tmp) / "built")
        lacking = [t.path for n in names for t in READERS[n].targets if not (Path(artifact) / t.path).is_file()]
        if not (Path(artifact) / "manifest.json").is_file():
            lacking.append("manifest.json")
        if lacking:
            raise ValueError(f"{artifact} lacks {', '.join(lacking)}; fuzz a complete factorport output or choose --readers")
        roots = [working_copy(Path(artifact), Path(tmp) / f"shard-{k}") for k in range(max(1, jobs))]
        return [fuzz_reader(READERS[n], roots, mutants, seed, timeout, memory_limit, out_dir, progress) for n in names]


def format_table(tallies: list[Tally]) -> str:
    header = ["reader", "mutants", *COLUMNS]
    rows = [header, ["---"] * len(header)]
    for t in tallies:
        rows.append([t.reader, str(t.mutants), *(str(t.counts[c]) for c in COLUMNS)])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    for t in tallies:
        if t.reference_error:
            lines.append(f"{t.reader}: {t.reference_error}")
    return "\n".join(lines)


def format_failures(tallies: list[Tally]) -> str:
    """Each distinct cause of each failing column, per reader: how often, the
    first mutant that showed it and what came out."""
    lines = []
    for t in tallies:
        for column in FAILURES:
            for signature, example in t.distinct.get(column, {}).items():
                lines.append(f"{t.reader} / {column} x{example['count']} [{signature}] first #{example['index']} "
                             f"({example['target']}): {example['mutation']}\n    -> {example['detail'][:300]}")
                if example.get("stderr"):
                    lines.append("    stderr: " + example["stderr"].replace("\n", "\n            "))
    return "\n".join(lines)


def replay(saved: Path, artifact: Path, timeout: float = harness.DEFAULT_TIMEOUT, memory_limit: int | None = harness.DEFAULT_MEMORY_LIMIT) -> tuple[str, harness.ChildOutcome]:
    """Re-run one saved input (a folder written for a failing mutant) on a
    copy of `artifact`: (column, outcome)."""
    info = json.loads((Path(saved) / "info.json").read_text())
    reader = READERS[info["reader"]]
    prepare()
    with tempfile.TemporaryDirectory(prefix="factorport-fuzz-replay-") as tmp:
        root = working_copy(Path(artifact), Path(tmp))
        reference, why = reference_digest(reader, root, timeout, memory_limit)
        if reference is None:
            raise ValueError(f"{artifact}: the unmutated artifact does not read: {why}")
        original = (root / info["target"]).read_bytes()
        mutated = (Path(saved) / Path(info["target"]).name).read_bytes()
        (root / info["target"]).write_bytes(mutated)
        outcome = harness.run_in_child(_read_in_child(reader, root, reference), timeout, memory_limit)
        return column_of(reader, outcome, reference, info["target"], original, mutated), outcome


__all__ = ["COLUMNS", "FAILURES", "Tally", "column_of", "draw_mutant", "format_failures", "format_table", "fuzz_reader",
           "is_clean_error", "replay", "run_campaign"]
