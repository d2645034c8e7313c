"""`manifest.json`: where an artifact came from and the sha256 of every file,
so a changed or missing file is caught before anything runs."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from ..errors import FactorportError

MANIFEST = "manifest.json"
# Written by `validate` / `bench` after the artifact: measurements, not the artifact.
UNHASHED = ("report/validation", "report/bench", "report/plots")
PACKAGES = ("factorport", "torch", "transformers", "safetensors", "gguf", "onnx", "onnxruntime", "llama_cpp_python")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(directory: Path, info: dict) -> dict:
    """Hash every file under `directory` (except the manifest) and write the manifest."""
    files = {
        str(p.relative_to(directory)): sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not str(p.relative_to(directory)).startswith(UNHASHED)
    }
    manifest = {**info, "packages": package_versions(), "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def refresh_manifest(directory: Path) -> dict:
    """Re-hash every file after an artifact was added (factorport export)."""
    info = {k: v for k, v in read_manifest(directory).items() if k not in ("packages", "files")}
    return write_manifest(Path(directory), info)


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FactorportError(f"{directory} has no {MANIFEST}; it was not written by factorport convert")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FactorportError(f"{path} is not valid JSON ({exc.msg}); re-convert the artifact") from exc


def verify_manifest(directory: Path) -> list[str]:
    """Problems found (empty when every file matches its hash)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for rel, expected in manifest.get("files", {}).items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256(path) != expected:
            problems.append(f"{rel}: sha256 differs from the manifest")
    return problems
