"""Document sources: random-access sequences of text documents, read lazily.

A source spec is a string (so it can be overridden from the command line):

    stdlib                   the .py files of the running interpreter's standard library
    pydocs                   the Python documentation as plain text (reStructuredText), as
                             Debian/Ubuntu's `python3-doc` package installs it (see below)
    text:<glob>              one document per file
    jsonl:<glob>[:field]     one document per line, text in `field` (default "text")
    arrayrecord:<glob>       one document per ArrayRecord record (UTF-8 bytes)

Every document has a stable name (its path, path:line or path:record), and `split_by_name`
assigns it to 'train' or 'heldout' by a hash of that name, so the split does not depend on file
order.

`pydocs` is the natural-language companion of the `stdlib` code corpus: ~500 files, ~11 MB of
English prose with code examples (tutorial, library reference, HOWTOs, FAQ, What's New). Sphinx
keeps each page's source next to the HTML as `_sources/**/*.rst.txt`, and Debian ships that tree:

    apt-get install python3-doc      # -> /usr/share/doc/python3.X/html/_sources/**/*.rst.txt

Nothing is downloaded at run time; without the package the source fails with that command in
its message.
"""

from __future__ import annotations

import abc
import bisect
import glob as globlib
import json
import os
import sysconfig
import sys
import zlib
from typing import Sequence

# Directories of the standard library that are tests, or that hold installed third-party code.
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
                         "__pycache__"}


class SourceError(ValueError):
    """An unreadable or malformed data source; the message names the file (and line)."""


class Documents(abc.ABC):
    """A random-access sequence of documents with stable names."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of documents."""

    @abc.abstractmethod
    def name(self, index: int) -> str:
        """Stable name of document `index` (path or path:line)."""

    @abc.abstractmethod
    def __getitem__(self, index: int) -> str:
        """Text of document `index`."""


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        raise SourceError(f"cannot read data file {path}: {e.strerror}") from None


class FileDocuments(Documents):
    """One document per file."""

    def __init__(self, paths: Sequence[str], root: str = ""):
        self.paths = list(paths)
        self.root = root

    def __len__(self):
        return len(self.paths)

    def name(self, index):
        return os.path.relpath(self.paths[index], self.root) if self.root else self.paths[index]

    def __getitem__(self, index):
        return _read_text(self.paths[index])


def _jsonl_text(path: str, line_no: int, line: bytes, field_name: str) -> str:
    """The `field_name` string of one JSONL line, or a SourceError naming file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or field_name not in record:
        raise SourceError(f"{path}:{line_no}: no field {field_name!r} in the JSON object")
    text = record[field_name]
    if not isinstance(text, str):
        raise SourceError(f"{path}:{line_no}: field {field_name!r} is not a string")
    return text


class JsonlDocuments(Documents):
    """One document per JSONL line; the byte offset of every line is indexed up front.

    Every line is parsed once while indexing, so a malformed line fails the launch before
    the first step instead of whenever the shuffle first reaches it (possibly hours in, and
    possibly never if it lands in the held-out split). Texts are not kept in memory.
    """

    def __init__(self, paths: Sequence[str], field_name: str = "text"):
        self.field_name = field_name
        self.index: list[tuple[str, int, int]] = []  # (path, line number, byte offset)
        for path in paths:
            try:
                with open(path, "rb") as f:
                    offset, line_no = 0, 0
                    for line in f:
                        line_no += 1
                        if line.strip():
                            _jsonl_text(path, line_no, line, field_name)
                            self.index.append((path, line_no, offset))
                        offset += len(line)
            except OSError as e:
                raise SourceError(f"cannot read data file {path}: {e.strerror}") from None

    def __len__(self):
        return len(self.index)

    def name(self, index):
        path, line_no, _ = self.index[index]
        return f"{path}:{line_no}"

    def __getitem__(self, index):
        path, line_no, offset = self.index[index]
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        return _jsonl_text(path, line_no, line, self.field_name)


class ArrayRecordDocuments(Documents):
    """One document per record of ArrayRecord files (each record UTF-8 text). Readers open
    lazily, tuned for random access."""

    def __init__(self, paths: Sequence[str]):
        from array_record.python.array_record_module import ArrayRecordReader  # ships with grain

        self._reader_cls = ArrayRecordReader
        self.paths = list(paths)
        self._readers: dict[str, object] = {}
        self.offsets = [0]
        for path in self.paths:
            reader = self._open(path)
            self.offsets.append(self.offsets[-1] + reader.num_records())

    def _open(self, path):
        reader = self._readers.get(path)
        if reader is None:
            reader = self._reader_cls(path, "readahead_buffer_size:0,max_parallelism:0")
            if not reader.ok():
                raise SourceError(f"data file {path}: not a readable ArrayRecord file")
            self._readers[path] = reader
        return reader

    def _locate(self, index):
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.paths[k], index - self.offsets[k]

    def __len__(self):
        return self.offsets[-1]

    def name(self, index):
        path, record = self._locate(index)
        return f"{path}:{record}"

    def __getitem__(self, index):
        path, record = self._locate(index)
        data = self._open(path).read([record])[0]
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SourceError(f"{path}:{record}: record is not UTF-8 text ({e.reason} at byte "
                              f"{e.start})") from None


def write_arrayrecord(path: str, texts: Sequence[str]) -> str:
    """Writes `texts` as one UTF-8 record each: converts a corpus into the `arrayrecord:`
    source format (and makes test fixtures)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    for text in texts:
        writer.write(text.encode("utf-8"))
    writer.close()
    return path


class Subset(Documents):
    def __init__(self, parent: Documents, indices: Sequence[int]):
        self.parent, self.indices = parent, list(indices)

    def __len__(self):
        return len(self.indices)

    def name(self, index):
        return self.parent.name(self.indices[index])

    def __getitem__(self, index):
        return self.parent[self.indices[index]]


class ConcatDocuments(Documents):
    """Several sources one after the other."""

    def __init__(self, parts: Sequence[Documents]):
        self.parts = list(parts)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def _locate(self, index):
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[k], index - self.offsets[k]

    def __len__(self):
        return self.offsets[-1]

    def name(self, index):
        part, i = self._locate(index)
        return part.name(i)

    def __getitem__(self, index):
        part, i = self._locate(index)
        return part[i]


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """Sorted .py files of the standard library, without tests and site-packages."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS)
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out)


# Where Debian/Ubuntu's python3-doc puts the documentation's plain-text sources.
PYDOCS_ROOTS = "/usr/share/doc/python3*/html/_sources"


def pydocs_root() -> str:
    """The `_sources` tree of the installed Python documentation, preferring this interpreter's
    version; SourceError with the install command if there is none."""
    roots = sorted(p for p in globlib.glob(PYDOCS_ROOTS) if os.path.isdir(p))
    own = [p for p in roots if f"python{sys.version_info.major}.{sys.version_info.minor}"
           f"{os.sep}" in p]
    if not roots:
        raise SourceError(f"data source 'pydocs': the plain-text Python documentation is not "
                          f"installed (no {PYDOCS_ROOTS}); install it with "
                          "'apt-get install python3-doc' (Debian/Ubuntu)")
    return (own or roots)[-1]


def pydocs_files() -> list[str]:
    root = pydocs_root()
    paths = sorted(globlib.glob(os.path.join(root, "**", "*.rst.txt"), recursive=True))
    if not paths:
        raise SourceError(f"data source 'pydocs': no *.rst.txt files under {root}")
    return paths


def _glob(pattern: str, spec: str) -> list[str]:
    paths = sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not paths:
        raise SourceError(f"data source {spec!r}: no files match {pattern!r}")
    for p in paths:
        if os.path.getsize(p) == 0:
            raise SourceError(f"data source {spec!r}: file {p} is empty")
        if not os.access(p, os.R_OK):
            raise SourceError(f"data source {spec!r}: file {p} is not readable")
    return paths


def open_source(spec: str) -> Documents:
    """Documents of one source spec (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "stdlib" and not rest:
        return FileDocuments(stdlib_files(), root=stdlib_root())
    if kind == "pydocs" and not rest:
        return FileDocuments(pydocs_files(), root=pydocs_root())
    if kind == "text" and rest:
        return FileDocuments(_glob(rest, spec))
    if kind == "jsonl" and rest:
        pattern, _, field_name = rest.partition(":") if not os.path.exists(rest) else (rest, "", "")
        return JsonlDocuments(_glob(pattern, spec), field_name or "text")
    if kind == "arrayrecord" and rest:
        return ArrayRecordDocuments(_glob(rest, spec))
    raise SourceError(f"data source {spec!r}: expected 'stdlib', 'pydocs', 'text:<glob>', "
                      "'jsonl:<glob>[:field]' or 'arrayrecord:<glob>'")


def in_heldout(name: str, heldout_fraction: float) -> bool:
    return zlib.crc32(name.encode("utf-8")) % 10_000 < heldout_fraction * 10_000


def split_by_name(docs: Documents, split: str, heldout_fraction: float) -> Documents:
    """The 'train' or 'heldout' part of `docs`, decided by a hash of each document's name."""
    want_heldout = split == "heldout"
    keep = [i for i in range(len(docs)) if in_heldout(docs.name(i), heldout_fraction) == want_heldout]
    return Subset(docs, keep)


def open_split(specs: Sequence[str], split: str, heldout_fraction: float) -> list[Documents]:
    """The `split` part ('train' or 'heldout') of every source, one Documents per spec."""
    return [split_by_name(open_source(spec), split, heldout_fraction) for spec in specs]
