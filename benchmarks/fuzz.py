"""Mutation fuzzing of every reader of a factorport artifact (factorport.fuzz).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fuzz.py [--mutants 10000] [--readers gguf-model,onnx]
        [--seed 0] [--timeout 30] [--jobs CORES] [--out DIR] [--artifact OUTPUT] [--json F]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fuzz.py --replay DIR/READER/crash-00042 [--artifact OUTPUT]

Without --artifact, a tiny random Llama artifact is built for the run.
Prints progress, then one row per reader (clean error | identical | caught
by manifest | uncaught | bad error | crash | hang | memory | traceback) and
each distinct cause of a failure with the first mutant that showed it; exits
1 when any reader crashed, hung, ran out of memory, let an exception escape
or gave a malformed error. --out keeps every failing input (the mutated file
+ info.json) for --replay, which runs it on a copy of the artifact (the tiny
one is rebuilt from its seed when --artifact is not given).
"""

from __future__ import annotations

import os

# before torch / numpy are imported: one compute thread per child
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from factorport.fuzz import READERS, format_failures, format_table, replay, run_campaign  # noqa: E402
from factorport.fuzz.artifact import build_in_child  # noqa: E402
from factorport.fuzz.harness import DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT  # noqa: E402
from factorport.fuzz.readers import prepare  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, default=10000, help="mutants per reader (default 10000)")
    parser.add_argument("--readers", default=",".join(READERS), help=f"comma-separated, from: {', '.join(READERS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per mutant before it counts as a hang")
    parser.add_argument("--memory", type=float, default=DEFAULT_MEMORY_LIMIT / 2**30, help="RLIMIT_AS of each child, GiB (default 4)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="children at a time, one artifact copy each (default: one per core)")
    parser.add_argument("--out", type=Path, help="folder for the failing inputs (crash, hang, memory, traceback, bad error)")
    parser.add_argument("--artifact", type=Path, help="fuzz this factorport output instead of a freshly built tiny one")
    parser.add_argument("--json", type=Path, help="write the tallies as JSON here")
    parser.add_argument("--replay", type=Path, help="re-run one saved input folder and print its outcome")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def run_replay(args) -> int:
    prepare()
    with tempfile.TemporaryDirectory(prefix="factorport-fuzz-") as tmp:
        artifact = args.artifact or build_in_child(Path(tmp) / "built")
        column, outcome = replay(args.replay, artifact, args.timeout, int(args.memory * 2**30))
    print(f"{column}: {outcome.detail}")
    if outcome.stderr:
        print(outcome.stderr[-2000:])
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replay:
        return run_replay(args)
    readers = [r for r in args.readers.split(",") if r]
    try:
        tallies = run_campaign(
            args.artifact, readers, args.mutants, args.seed, args.timeout, int(args.memory * 2**30), args.out, not args.quiet, args.jobs
        )
    except ValueError as exc:  # unknown reader, incomplete artifact
        print(f"fuzz: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(tallies))
    failures = format_failures(tallies)
    if failures:
        print("\nfailures, by cause:\n" + failures)
    if args.json:
        args.json.write_text(json.dumps([t.to_dict() for t in tallies], indent=2) + "\n")
    return 1 if any(t.failures for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
