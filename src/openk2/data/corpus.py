"""Text corpora (paper §2.2 pre-training data, in small): the default offline corpus and readers for user corpora.

The default corpus is real text found on any Debian machine without network access beyond apt: the running
interpreter's standard library (`.py`) plus the English reStructuredText of Debian's Python and Linux docs
packages, fetched with `apt-get download` and unpacked with `dpkg-deb -x` (neither installs nor needs root).

On-disk form of a prepared corpus folder:
    <source>.jsonl   one document per line: {"text": ..., "source": ..., "path": ...}
    manifest.json    per source: file, documents, bytes (UTF-8 bytes of text), skipped files; plus totals
    .cache/          downloaded .deb files (hidden: `iter_documents` never reads hidden paths)
So `iter_documents([folder])` reads a prepared corpus like any user corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CORPUS_FORMAT = "openk2-corpus/1"
STDLIB_SOURCE = "cpython-stdlib"
DEFAULT_DOC_PACKAGES = ("python3.11-doc", "linux-doc-6.1")
# Debian gzips large docs in place; python3.11-doc ships its sources as `_sources/*.rst.txt`.
DOC_SUFFIXES = (".rst", ".txt", ".rst.gz", ".txt.gz")
SKIP_DIRS = frozenset({"translations", "__pycache__", "site-packages", "dist-packages"})
# Larger files are generated tables or test data, not prose or code anyone wrote (our threshold).
DEFAULT_MAX_DOC_BYTES = 1 << 20
APT_TIMEOUT_S = 900

PathLike = str | os.PathLike


# ---------------------------------------------------------------- user corpora


def _read_text(path: Path) -> Iterator[str]:
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def _read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno}: each line needs a string 'text' field")
            yield record["text"]


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    table = pq.ParquetFile(path)
    if "text" not in table.schema_arrow.names:
        raise ValueError(f"{path}: no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


READERS: dict[str, Callable[[Path], Iterator[str]]] = {
    ".txt": _read_text,
    ".md": _read_text,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def _hidden_or_skipped(path: Path, root: Path) -> bool:
    return any(part.startswith(".") or part in SKIP_DIRS for part in path.relative_to(root).parts)


def corpus_files(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Expand files and folders into corpus files (sorted per folder, hidden paths skipped).

    A missing path raises FileNotFoundError, a file of another kind or a folder holding none raises
    ValueError; each names the path."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"corpus path does not exist: {path}")
        if path.is_file():
            if path.suffix.lower() not in READERS:
                raise ValueError(f"{path}: unsupported corpus file (expected {', '.join(READERS)})")
            files.append(path)
            continue
        found = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in READERS and not _hidden_or_skipped(p, path)
        )
        if not found:
            raise ValueError(f"empty corpus: no {', '.join(READERS)} files under {path}")
        files.extend(found)
    if not files:
        raise ValueError("empty corpus: no paths given")
    return files


def iter_documents(paths: PathLike | Iterable[PathLike]) -> Iterator[str]:
    """Documents (non-blank strings) of .txt / .md files (one each), .jsonl lines and .parquet rows (`text`).

    Paths are checked now (see `corpus_files`); a corpus with no non-blank document raises ValueError
    when iteration ends."""
    files = corpus_files(paths)
    return _documents(files)


def _documents(files: list[Path]) -> Iterator[str]:
    count = 0
    for path in files:
        for text in READERS[path.suffix.lower()](path):
            if text.strip():
                count += 1
                yield text
    if count == 0:
        raise ValueError(f"empty corpus: no non-blank documents in {', '.join(map(str, files))}")


# ---------------------------------------------------------------- the default corpus


def _python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not _hidden_or_skipped(p, root))


def _doc_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.name.lower().endswith(DOC_SUFFIXES) and not _hidden_or_skipped(p, root)
    )


def _read_doc(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()


def _run(cmd: list[str], cwd: Path) -> str | None:
    """Run a command; None on success, else a one-line reason."""
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]} not found"
    try:
        result = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"`{' '.join(cmd)}` timed out after {APT_TIMEOUT_S}s"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return f"`{' '.join(cmd)}` failed (exit {result.returncode}): {lines[-1] if lines else 'no output'}"
    return None


def fetch_debian_package(package: str, cache_dir: Path) -> Path | None:
    """`apt-get download` a package's .deb into cache_dir (reused when present); None with a warning on failure."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    error = _run(["apt-get", "download", package], cwd=cache_dir)
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if error or not cached:
        log.warning("could not fetch Debian package %s (%s); the default corpus goes on without it. "
                    "On Debian/Ubuntu, `apt-get update` may help.", package, error or "no .deb written")
        return None
    return cached[-1]


class _SourceWriter:
    """Writes one source's documents to `<name>.jsonl` atomically, skipping duplicates across the corpus."""

    def __init__(self, out_dir: Path, name: str, seen: set[bytes], max_doc_bytes: int):
        self.name, self.seen, self.max_doc_bytes = name, seen, max_doc_bytes
        self.path = out_dir / f"{name}.jsonl"
        self.tmp = out_dir / f".{name}.jsonl.tmp"
        self.file = self.tmp.open("w", encoding="utf-8")
        self.stats = {"file": self.path.name, "documents": 0, "bytes": 0, "skipped": 0, "duplicates": 0}

    def add(self, raw: bytes, rel_path: str) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or not text.strip() or len(raw) > self.max_doc_bytes:
            self.stats["skipped"] += 1
            return
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if digest in self.seen:
            self.stats["duplicates"] += 1
            return
        self.seen.add(digest)
        self.file.write(json.dumps({"text": text, "source": self.name, "path": rel_path}, ensure_ascii=False))
        self.file.write("\n")
        self.stats["documents"] += 1
        self.stats["bytes"] += len(raw)

    def close(self) -> dict:
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.stats


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(out_dir: PathLike) -> dict | None:
    """The manifest of a prepared corpus, or None when the folder holds no complete corpus."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if not all((path.parent / s["file"]).exists() for s in manifest["sources"].values()):
        return None
    return manifest


def prepare_default_corpus(
    out_dir: PathLike,
    *,
    packages: Iterable[str] = DEFAULT_DOC_PACKAGES,
    include_stdlib: bool = True,
    stdlib_dir: PathLike | None = None,
    cache_dir: PathLike | None = None,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Build the default corpus into out_dir and return its manifest (issue 4 item 1); a no-op when present.

    Sources: the `.py` files of stdlib_dir (default: the running interpreter's standard library), then
    each Debian docs package's English .rst/.txt (translations skipped). A package that cannot be fetched
    or unpacked is logged as a warning and skipped; an empty result raises ValueError. Exact duplicate
    documents are kept once."""
    out_dir = Path(out_dir)
    if not force and (manifest := read_manifest(out_dir)) is not None:
        log.info("corpus already prepared in %s (%d documents); pass force=True to rebuild",
                 out_dir, manifest["documents"])
        return manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    # Remove the previous corpus first: a crash below leaves no manifest (so no "complete" corpus), and a
    # source that fails this time leaves no stale file for iter_documents to read.
    if (out_dir / MANIFEST).exists():
        for source in json.loads((out_dir / MANIFEST).read_text())["sources"].values():
            (out_dir / source["file"]).unlink(missing_ok=True)
        (out_dir / MANIFEST).unlink()
    cache = (Path(cache_dir) if cache_dir is not None else out_dir / ".cache").resolve()
    seen: set[bytes] = set()
    sources: dict[str, dict] = {}
    missing: list[str] = []

    if include_stdlib:
        root = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
        files = _python_files(root)
        writer = _SourceWriter(out_dir, STDLIB_SOURCE, seen, max_doc_bytes)
        for path in tqdm(files, desc=STDLIB_SOURCE, unit="file", disable=not progress):
            writer.add(path.read_bytes(), str(path.relative_to(root)))
        sources[STDLIB_SOURCE] = writer.close()

    for package in packages:
        deb = fetch_debian_package(package, cache)
        if deb is None:
            missing.append(package)
            continue
        with tempfile.TemporaryDirectory(dir=cache, prefix=f"{package}-") as tmp:
            error = _run(["dpkg-deb", "-x", str(deb), tmp], cwd=cache)
            if error:
                log.warning("could not unpack %s (%s); the default corpus goes on without it.", deb, error)
                missing.append(package)
                continue
            writer = _SourceWriter(out_dir, package, seen, max_doc_bytes)
            for path in tqdm(_doc_files(Path(tmp)), desc=package, unit="file", disable=not progress):
                writer.add(_read_doc(path), str(path.relative_to(tmp)))
            sources[package] = writer.close()

    documents = sum(s["documents"] for s in sources.values())
    if documents == 0:
        raise ValueError(f"empty corpus: no documents from the stdlib or {', '.join(packages) or 'any package'} "
                         f"in {out_dir}")
    manifest = {
        "format": CORPUS_FORMAT,
        "documents": documents,
        "bytes": sum(s["bytes"] for s in sources.values()),
        "sources": sources,
        "missing_packages": missing,
    }
    _write_json(out_dir / MANIFEST, manifest)
    return manifest
