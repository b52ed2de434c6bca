import gzip
import json
import logging
import shutil
import subprocess

import pytest

from openk2.data import corpus
from openk2.data.corpus import MANIFEST, corpus_files, iter_documents, prepare_default_corpus


def test_reads_each_format_in_sorted_order(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.md").write_text("# beta\n\nmarkdown")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma", "id": 1}) + "\n\n"
                                      + json.dumps({"text": "delta"}) + "\n")
    pq.write_table(pa.table({"text": ["epsilon", None, "zeta"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.txt").write_text("eta")
    (tmp_path / "notes.json").write_text("{}")  # not a corpus format: ignored inside a folder
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "hidden.txt").write_text("never read")
    (tmp_path / "blank.txt").write_text("  \n")  # blank documents are dropped
    assert list(iter_documents(tmp_path)) == [
        "alpha text", "# beta\n\nmarkdown", "gamma", "delta", "epsilon", "zeta", "eta"]
    # files and folders mix; order follows the arguments
    assert list(iter_documents([tmp_path / "sub", tmp_path / "a.txt"])) == ["eta", "alpha text"]


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        iter_documents([missing])


def test_empty_folder_and_unsupported_file_are_named(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=f"empty corpus.*{tmp_path.name}"):
        corpus_files(tmp_path)
    with pytest.raises(ValueError, match="x.csv: unsupported"):
        corpus_files(tmp_path / "x.csv")


def test_corpus_of_blank_documents_is_empty(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    with pytest.raises(ValueError, match="empty corpus"):
        list(iter_documents(tmp_path))


def test_bad_jsonl_lines_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:2: .*'text'"):
        list(iter_documents(tmp_path))
    (tmp_path / "a.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match=r"a.jsonl:1: invalid JSON"):
        list(iter_documents(tmp_path))


def test_parquet_without_text_column_or_pyarrow(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="a.parquet: no 'text' column"):
        list(iter_documents(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(iter_documents(tmp_path))


def _fake_stdlib(tmp_path):
    root = tmp_path / "stdlib"
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "os.py").write_text("import sys\n")
    (root / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "pkg" / "copy.py").write_text("x = 1\n")  # duplicate of mod.py: kept once
    (root / "pkg" / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))  # not UTF-8: skipped
    (root / "pkg" / "__pycache__" / "mod.py").write_text("cached")
    return root


def test_prepare_without_apt_warns_and_keeps_the_stdlib(tmp_path, monkeypatch, caplog):
    root = _fake_stdlib(tmp_path)
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)  # no apt-get, no dpkg-deb
    out = tmp_path / "corpus"
    with caplog.at_level(logging.WARNING):
        manifest = prepare_default_corpus(out, stdlib_dir=root, progress=False)
    assert "could not fetch Debian package python3.11-doc (apt-get not found)" in caplog.text
    assert manifest["missing_packages"] == ["python3.11-doc", "linux-doc-6.1"]
    stdlib = manifest["sources"]["cpython-stdlib"]
    assert (stdlib["documents"], stdlib["skipped"], stdlib["duplicates"]) == (2, 1, 1)
    rows = [json.loads(line) for line in (out / "cpython-stdlib.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == ["os.py", "pkg/copy.py"]
    assert {r["source"] for r in rows} == {"cpython-stdlib"}
    assert list(iter_documents(out)) == ["import sys\n", "x = 1\n"]
    assert not list(out.glob(".*.tmp"))


def test_prepare_is_idempotent_unless_forced(tmp_path):
    root = _fake_stdlib(tmp_path)
    out = tmp_path / "corpus"
    first = prepare_default_corpus(out, packages=(), stdlib_dir=root, progress=False)
    (root / "new.py").write_text("y = 2\n")
    assert prepare_default_corpus(out, packages=(), stdlib_dir=root, progress=False) == first
    rebuilt = prepare_default_corpus(out, packages=(), stdlib_dir=root, progress=False, force=True)
    assert rebuilt["documents"] == first["documents"] + 1
    assert sorted(p.name for p in out.iterdir()) == ["cpython-stdlib.jsonl", MANIFEST]
    # a rebuild without a source leaves no stale file of it behind
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_default_corpus(out, packages=(), include_stdlib=False, progress=False, force=True)
    assert list(out.iterdir()) == []


def test_prepare_with_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_default_corpus(tmp_path / "c", packages=(), include_stdlib=False, progress=False)
    assert not (tmp_path / "c" / MANIFEST).exists()


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_docs_keep_english_rst_and_txt(tmp_path):
    """A locally built .deb in the cache stands in for `apt-get download`."""
    pkg = tmp_path / "pkg"
    docs = pkg / "usr" / "share" / "doc" / "demo" / "Documentation"
    (docs / "translations" / "it_IT").mkdir(parents=True)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        "Package: demo-doc\nVersion: 1.0\nArchitecture: all\nMaintainer: x <x@y>\nDescription: demo\n")
    (docs / "index.rst").write_text("Index\n=====\n")
    (docs / "big.rst.gz").write_bytes(gzip.compress(b"Gzipped\n=======\n"))
    (docs / "notes.txt").write_text("plain notes")
    (docs / "copy.rst").write_text("Index\n=====\n")  # duplicate
    (docs / "conf.py").write_text("not a doc")
    (docs / "translations" / "it_IT" / "index.rst").write_text("Indice")
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(cache / "demo-doc_1.0_all.deb")],
                   check=True, capture_output=True)
    manifest = prepare_default_corpus(tmp_path / "out", packages=["demo-doc"], include_stdlib=False,
                                      cache_dir=cache, progress=False)
    assert manifest["sources"]["demo-doc"]["documents"] == 3
    assert sorted(iter_documents(tmp_path / "out")) == ["Gzipped\n=======\n", "Index\n=====\n", "plain notes"]
    assert not [p for p in cache.iterdir() if p.is_dir()]  # unpacked trees are removed


@pytest.mark.slow
def test_real_default_corpus(tmp_path):
    """The real thing: the interpreter's stdlib plus `apt-get download` of the Debian docs (when apt works)."""
    manifest = prepare_default_corpus(tmp_path, progress=False)
    assert manifest["sources"]["cpython-stdlib"]["documents"] > 500
    for package in set(corpus.DEFAULT_DOC_PACKAGES) - set(manifest["missing_packages"]):
        assert manifest["sources"][package]["documents"] > 100
    first = next(iter_documents(tmp_path))
    assert isinstance(first, str) and first.strip()
