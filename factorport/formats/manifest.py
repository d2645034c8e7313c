"""`manifest.json`: where an artifact came from and the sha256 and size of
every file, so a changed, missing or added file is caught before anything
runs. Entries are checked before a byte is hashed: a relative path inside the
directory (no absolute path, no `..`, no link leaving it), a regular file,
the recorded size (manifests written before sizes were recorded are read
too; their files are hashed without the size check)."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Sequence

from ..errors import FactorportError

MANIFEST = "manifest.json"
# Written by `validate` / `bench` after the artifact: measurements, not the artifact.
UNHASHED = ("report/validation", "report/bench", "report/plots")
MANIFEST_LIMIT = 64 << 20  # bytes: hashes and a recipe text are far smaller
SHA256_HEX = 64
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


def _artifact_files(directory: Path) -> list[str]:
    """Relative POSIX paths of every file under `directory` the manifest
    covers: all but the manifest and the unhashed report files. Links to
    directories are not followed (a listed file behind one is refused)."""
    found = []
    for top, dirs, names in os.walk(directory, followlinks=False):
        for name in names + [d for d in dirs if (Path(top) / d).is_symlink()]:
            rel = (Path(top) / name).relative_to(directory).as_posix()
            if rel not in (MANIFEST, f".{MANIFEST}.partial") and not rel.startswith(UNHASHED):
                found.append(rel)
    return sorted(found)


def _inside(directory: Path, rel: str) -> bool:
    """`rel` names a regular file inside `directory`, also once links are resolved."""
    path = directory / rel
    return path.is_file() and path.resolve().is_relative_to(directory.resolve())


def _hash_files(directory: Path, selected=lambda rel: True) -> tuple[dict[str, str], dict[str, int]]:
    """sha256 and size of every file of the artifact under `directory` (of those `selected`)."""
    files, sizes = {}, {}
    for rel in filter(selected, _artifact_files(directory)):
        if not _inside(directory, rel):
            raise FactorportError(f"{directory / rel} is a link leaving {directory} or not a file; remove it and convert again")
        files[rel], sizes[rel] = sha256(directory / rel), (directory / rel).stat().st_size
    return files, sizes


def _write(directory: Path, info: dict, files: dict[str, str], sizes: dict[str, int]) -> dict:
    manifest = {**info, "packages": package_versions(), "files": dict(sorted(files.items())), "sizes": dict(sorted(sizes.items()))}
    tmp = directory / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def write_manifest(directory: Path, info: dict) -> dict:
    """Hash every file under `directory` (except the manifest and the report
    files `validate` / `bench` add) and write the manifest."""
    directory = Path(directory)
    return _write(directory, info, *_hash_files(directory))


def refresh_manifest(directory: Path, written: Sequence[str] | None = None) -> dict:
    """Re-hash after files were added. `written`: the relative paths or folder
    prefixes ("onnx/") that were (re)written; only they are hashed anew and
    every other entry is kept as it was, so that a file changed or added
    behind the manifest's back stays a problem (`export --no-verify` vouches
    only for what it wrote). None: re-hash everything."""
    directory = Path(directory)
    old = read_manifest(directory)
    info = {k: v for k, v in old.items() if k not in ("packages", "files", "sizes")}
    if written is None:
        return _write(directory, info, *_hash_files(directory))

    def rewritten(rel: str) -> bool:
        return any(rel == w or (w.endswith("/") and rel.startswith(w)) for w in written)

    files, sizes = _hash_files(directory, rewritten)  # only what was written: the rest keeps its recorded hash
    files = {**{rel: d for rel, d in (old.get("files") or {}).items() if not rewritten(rel)}, **files}
    sizes = {**{rel: n for rel, n in (old.get("sizes") or {}).items() if not rewritten(rel)}, **sizes}
    return _write(directory, info, files, sizes)


def read_manifest(directory: Path) -> dict:
    """The manifest as a JSON object; a one-line error if it cannot be read."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FactorportError(f"{directory} has no {MANIFEST}; it was not written by factorport convert")
    if path.stat().st_size > MANIFEST_LIMIT:
        raise FactorportError(f"{path} is {path.stat().st_size} bytes, far more than a manifest holds; re-convert the artifact")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise FactorportError(f"{path} is not UTF-8 text; re-convert the artifact") from None
    except json.JSONDecodeError as exc:
        raise FactorportError(f"{path} is not valid JSON ({exc.msg}); re-convert the artifact") from None
    if not isinstance(manifest, dict):
        raise FactorportError(f"{path} is not a JSON object; re-convert the artifact")
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shape_problem(files, sizes) -> str | None:
    """What is wrong with the `files` / `sizes` maps themselves, if anything."""
    fix = "the manifest is damaged, re-convert the artifact"
    hashes_ok = isinstance(files, dict) and files and all(
        isinstance(k, str) and isinstance(v, str) and len(v) == SHA256_HEX for k, v in files.items()
    )
    if not hashes_ok:
        return f"{MANIFEST}: 'files' is not a non-empty map of file -> sha256; {fix}"
    if sizes is not None and not (isinstance(sizes, dict) and set(sizes) == set(files) and all(map(_is_count, sizes.values()))):
        return f"{MANIFEST}: 'sizes' does not give one byte count per file of 'files'; {fix}"
    return None


def _is_plain_relative(rel: str) -> bool:
    """A normalised relative POSIX path with no `..` (and no NUL, which no file name holds)."""
    pure = PurePosixPath(rel)
    return bool(rel) and "\x00" not in rel and not pure.is_absolute() and ".." not in pure.parts and pure.as_posix() == rel and rel != MANIFEST


def _entry_problem(directory: Path, rel: str, expected: str, size: int | None) -> str | None:
    if not _is_plain_relative(rel):
        return f"{rel[:200]!r}: not a relative path inside the artifact; the manifest was altered, re-convert the artifact"
    try:
        return _file_problem(directory, rel, expected, size)
    except OSError as exc:  # a name too long, a permission: the file is not what was written
        return f"{rel[:200]}: cannot be read ({exc.strerror or exc})"


def _file_problem(directory: Path, rel: str, expected: str, size: int | None) -> str | None:
    path = directory / rel
    if not path.is_file():
        return f"{rel}: missing"
    if not _inside(directory, rel):
        return f"{rel}: a link leaving the artifact directory; replace it by the file, or re-convert the artifact"
    actual = path.stat().st_size
    if size is not None and actual != size:  # checked first: hashing a huge file is slow
        return f"{rel}: {'truncated, ' if actual < size else ''}{actual} bytes, the manifest says {size}"
    if sha256(path) != expected:
        return f"{rel}: sha256 differs from the manifest"
    return None


def verify_manifest(directory: Path, manifest: dict | None = None) -> list[str]:
    """Problems found (empty when the manifest lists every file of the
    artifact and each matches its size and hash). `manifest`: the one already
    read from `directory`, if the caller has it. Raises FactorportError only
    when the manifest itself cannot be read."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    files, sizes = manifest.get("files"), manifest.get("sizes")  # no `sizes` before they were recorded
    shape = _shape_problem(files, sizes)
    if shape:
        return [shape]
    problems = [p for rel, digest in files.items() if (p := _entry_problem(directory, rel, digest, None if sizes is None else sizes[rel]))]
    problems += [f"{rel}: not in the manifest (added after it was written); remove it or re-convert the artifact" for rel in _artifact_files(directory) if rel not in files]
    return problems
