"""A seeded mutation fuzzer for every reader of a factorport artifact.

* `mutators`: `mutate(kind, data, seed)`, generic and structure-aware
  (GGUF, safetensors, JSON, ONNX) mutations, deterministic for a seed;
* `harness`: `run_in_child(fn)`, one forked child per input under RLIMIT_AS
  and a deadline, classified as ok / error / crash / hang / memory / traceback;
* `readers`: the table of readers (which file each mutates, how it reads);
* `artifact`: the tiny artifact the readers are fuzzed on;
* `campaign`: `run_campaign(...)` -> one `Tally` row per reader.

benchmarks/fuzz.py runs long campaigns; tests/test_fuzz.py a bounded one.
"""

from .campaign import COLUMNS, FAILURES, Tally, format_failures, format_table, replay, run_campaign
from .harness import ChildOutcome, run_in_child
from .mutators import mutate
from .readers import READERS

__all__ = ["COLUMNS", "FAILURES", "READERS", "ChildOutcome", "Tally", "format_failures", "format_table", "mutate", "replay", "run_campaign", "run_in_child"]
