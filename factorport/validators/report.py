"""Reports a person reads in a PR (Markdown) and a CI renders (JUnit XML),
written from the plain result dicts of `validate` and `bench`."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.{digits}f}"
    return str(value)


def validation_markdown(result: dict) -> str:
    lines = [f"# Validation of `{result['artifact']}`", ""]
    lines.append(f"**{'PASSED' if result['passed'] else 'FAILED'}** — {result['windows']} windows x {result['seq_len']} tokens of `{Path(result['text']).name}`")
    lines += ["", "## Files", ""]
    manifest = result["manifest"]
    if not manifest.get("checked", True):
        lines.append("**manifest.json not checked** (--no-verify): nothing here says these are the files that were converted")
    else:
        lines.append("every file matches manifest.json" if manifest["passed"] else "\n".join(f"- {p}" for p in manifest["problems"]))
    reference = result.get("reference")
    if reference:
        lines += ["", "## Quality", "", "| model | perplexity |", "|---|---|"]
        lines.append(f"| original ({reference['original']}) | {_num(reference['original_perplexity'])} |")
        lines.append(f"| compressed reference (torch) | {_num(reference['perplexity'])} |")
        for label, entry in result["backends"].items():
            lines.append(f"| {label} | {_num(entry.get('perplexity'))} |")
    if result["backends"]:
        lines += ["", "## Parity with the torch reference", ""]
        lines.append("| backend | max abs logit diff | rel. to max logit | mean abs diff | mean KL | top-1 agreement | ppl diff | passed |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for label, entry in result["backends"].items():
            lines.append(
                f"| {label} | {_num(entry.get('max_abs_logit_diff'))} | {_num(entry.get('max_abs_logit_diff_rel'))} | "
                f"{_num(entry.get('mean_abs_logit_diff'))} | {_num(entry.get('mean_kl'))} | {_num(entry.get('top1_agreement'))} | "
                f"{_num(entry.get('perplexity_rel_diff'))} | {'yes' if entry['passed'] else '**no**'} |"
            )
        lines += ["", "## Checks", "", "| backend | check | value | threshold | passed |", "|---|---|---|---|---|"]
        for label, entry in result["backends"].items():
            for check in entry["checks"]:
                lines.append(f"| {label} | {check['check']} | {_num(check['value'], 6)} | {check['threshold']} | {'yes' if check['passed'] else '**no**'} |")
    if result["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in result["failures"]]
    return "\n".join(lines) + "\n"


def validation_junit(result: dict) -> str:
    """One test suite per backend (plus the manifest), one test case per check."""
    suites = ET.Element("testsuites", name="factorport validate", tests="0", failures="0")
    manifest = result["manifest"]
    cases = [("manifest", "sha256", manifest["passed"], "; ".join(manifest["problems"]) if manifest.get("checked", True) else None)]
    for label, entry in result["backends"].items():
        for check in entry["checks"]:
            cases.append((label, check["check"], check["passed"], f"{check['check']} = {check['value']} (needs {check['threshold']})"))
    total = failed = 0
    for suite_name in dict.fromkeys(c[0] for c in cases):
        members = [c for c in cases if c[0] == suite_name]
        suite_failures = sum(not c[2] for c in members)
        suite = ET.SubElement(suites, "testsuite", name=suite_name, tests=str(len(members)), failures=str(suite_failures))
        for _, name, passed, message in members:
            case = ET.SubElement(suite, "testcase", classname=f"factorport.validate.{suite_name}", name=name)
            if message is None:  # not checked (--no-verify)
                ET.SubElement(case, "skipped", message="manifest.json not checked (--no-verify)")
            elif not passed:
                ET.SubElement(case, "failure", message=message)
        total, failed = total + len(members), failed + suite_failures
    suites.set("tests", str(total))
    suites.set("failures", str(failed))
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def _mb(value) -> str:
    return "–" if value is None else f"{value / 1e6:.1f}"


def _ratios(run: dict, key: str) -> str:
    """'; 1.31x optimum fp32' for each anchor of the run's backend."""
    parts = [f"{r[key]:.2f}x {label}" for label, r in run.get("vs_anchors", {}).items()]
    return "; " + ", ".join(parts) if parts else ""


def _machine_lines(machine: dict) -> list[str]:
    """How busy the machine was, and a warning when it was too busy for the absolute figures."""
    if "load_before" not in machine:  # a result written before these were recorded
        return []
    before, after = machine["load_before"], machine.get("load_after") or {}
    runnable = "/".join("–" if p.get("runnable_others") is None else f"{p['runnable_others']:g}" for p in (before, after))
    lines = [
        f"Machine: {machine['cores']} cores; 1-minute load average {before['loadavg'][0]:g} before, "
        f"{after.get('loadavg', ['–'])[0]} after (the latter counts this benchmark); other runnable tasks before/after {runnable}; "
        f"bandwidth passes spread {machine['bandwidth_spread']:.0%} (median vs best).",
    ]
    if machine.get("loaded"):
        lines += [
            "",
            "**Taken on a loaded machine**: " + "; ".join(machine["loaded_reasons"]) + ". "
            "Absolute figures are low and noisy; the ratios to the anchors of the same run are the figures to compare.",
        ]
    return lines


def bench_markdown(result: dict) -> str:
    machine, settings = result["machine"], result["settings"]
    lines = [
        "# Benchmark",
        "",
        f"Measured memory bandwidth {machine['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; prompt {settings['prompt_tokens']} tokens, "
        f"{settings['new_tokens']} new tokens, greedy; median (min–max) of {settings['repeats']} repeats, each backend in a fresh process.",
        "Bound = bandwidth / weight bytes read per decoded token (decode at batch 1 is memory-bound). "
        "After each figure, its ratio to each anchor of the same backend in this run.",
        "",
        *_machine_lines(machine),
        *([] if result.get("manifest", {}).get("checked", True) else ["", "**manifest.json not checked** (--no-verify)."]),
        "",
        "| artifact | backend | disk MB | read/token MB | load s | prefill s | decode tok/s | bound tok/s | of bound | peak RSS MB (model) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        label = f"{run['label']} (anchor)" if run["anchor"] else run["label"]
        if "error" in run:
            lines.append(f"| {label} | {run['backend']} | {_mb(run['disk_bytes'])} | {_mb(run['bytes_read_per_token'])} | **{run['error']}** |||||")
            continue
        p, d = run["prefill_seconds"], run["decode_tokens_per_s"]
        lines.append(
            f"| {label} | {run['backend']} | {_mb(run['disk_bytes'])} | {_mb(run['bytes_read_per_token'])} | {run['load_seconds']:.2f} | "
            f"{p['median']:.3f} ({p['min']:.3f}–{p['max']:.3f}){_ratios(run, 'prefill')} | "
            f"{d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f}){_ratios(run, 'decode')} | "
            f"{run['bound_tokens_per_s']:.1f} | {run['fraction_of_bound']:.0%} | "
            f"{_mb(run['peak_rss_bytes'])} ({_mb(run['peak_rss_bytes'] - run['baseline_rss_bytes'])}) |"
        )
    lines += ["", "Peak RSS is the whole process; in parentheses, what it grew by after the libraries were imported."]
    notes = [f"- {run['label']}: {run['note']}" for run in result["runs"] if run.get("note")]
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines) + "\n"


def write_validation_reports(result: dict, report: Path) -> None:
    report.mkdir(parents=True, exist_ok=True)
    (report / "validation.md").write_text(validation_markdown(result))
    (report / "validation.json").write_text(json.dumps(result, indent=2) + "\n")


def write_bench_reports(result: dict, report: Path) -> None:
    """bench.md, bench.json and the two plots under report/plots/."""
    from .plots import pareto_plot, speed_plot

    report.mkdir(parents=True, exist_ok=True)
    (report / "bench.md").write_text(bench_markdown(result))
    (report / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (report / "plots").mkdir(exist_ok=True)
    points = [
        {"label": r["label"] if r["backend"] in r["label"] else f"{r['label']} ({r['backend']})",
         "bytes": r["disk_bytes"], "perplexity": r["perplexity"], "anchor": r["anchor"]}
        for r in result["runs"]
        if r.get("perplexity")
    ]
    pareto_plot(points, report / "plots" / "pareto.png")
    speed_plot(result["runs"], report / "plots" / "decode_speed.png")
