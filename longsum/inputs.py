"""Documents for `longsum summarize`, read one at a time (memory grows with the batch, not the corpus).

Inputs are text/Markdown/PDF files, folders (recursive; `--glob` patterns matched case-insensitively),
`-` for stdin, and record files (JSONL, CSV, parquet) streamed row by row. A text file is not read
when it is found: its `Text` is read later, only as far as the model can use (`Text.read(max_chars)`),
so a 30 MB file costs a few hundred KB in truncate mode.

Every document gets one key, unique in the output and the same on every rerun, however its file
is named (`docs/a.txt`, `./docs/a.txt`, `/home/me/docs/a.txt`, through a symlink...):

* a file: `path` = its resolved absolute path is the key; `id` = its path as given (for display);
  the same file named twice is read once;
* a record: the key is (`path` of its record file, `id`); `id` = its `--id-field` value (default
  `id`), else `NAME:LINE` (the file's name and line); `source` = the record file as given. Records
  of different files never collide; a record whose id repeats an earlier one of the same file gets
  an error record under its `NAME:LINE` id;
* stdin (`-`) or a pipe (`<(...)`): `id` = `stdin:` or `pipe:` + 12 hex digits of the content's
  sha256 (the key), so a second, different piped document is a new document and the same one is "done".

Text is decoded as UTF-8 (a BOM is honoured); otherwise the encoding is detected (UTF-16/32,
cp1252, latin-1... with charset-normalizer) and reported; data with NUL bytes that is not UTF-16/32
is "binary". A bad document becomes a `Document` with an `error`, never an exception.
"""

from __future__ import annotations

import codecs
import csv
import fnmatch
import hashlib
import json
import os
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from longsum.errors import LongsumError

DEFAULT_GLOB = "*.txt,*.md"
TEXT_FIELDS = ("text", "article")  # record fields tried for the text, in order, without --text-field
RECORD_SUFFIXES = (".jsonl", ".csv", ".parquet")
HEAD_BYTES = 1 << 16  # read to sniff a file's encoding (and to tell text from binary)
DETECT_BYTES = 1 << 20  # at most this much goes to charset detection
CSV_FIELD_LIMIT = 64 << 20  # a larger CSV field is reported (an unterminated quote, most likely)
PARQUET_BATCH = 1024


class DocumentError(Exception):
    """A problem with one document (its record gets this message as `error`)."""


# ------------------------------------------------------------------------------------------ decoding
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip


def _utf8_prefix_ok(data: bytes, complete: bool) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=complete)
        return True
    except UnicodeDecodeError:
        return False


def _utf16_without_bom(data: bytes) -> str | None:
    """UTF-16 text without a BOM has NULs in every other byte (for Latin text): which half?"""
    even, odd = data[0::2], data[1::2]
    if len(data) < 4:
        return None
    zero_even, zero_odd = even.count(0) / len(even), odd.count(0) / len(odd)
    if zero_odd > 0.3 and zero_even < 0.05:
        return "utf-16-le"
    if zero_even > 0.3 and zero_odd < 0.05:
        return "utf-16-be"
    return None


def _plausible(text: str) -> bool:
    """Mostly printable (binary data decoded as UTF-16 is full of control characters)."""
    if not text:
        return True
    bad = sum(1 for c in text if not c.isprintable() and c not in "\n\r\t\f")
    return bad <= 0.02 * len(text)


def _western(head: bytes) -> bool:
    """cp1252 text in a Western language: accented letters are a minority inside mostly-ASCII words.

    (Cyrillic or Greek bytes also decode in cp1252, but to words made only of accented letters.)
    """
    try:
        text = head.decode("cp1252")
    except UnicodeDecodeError:
        return False
    letters = [c for c in text if c.isalpha()]
    accented = sum(1 for c in letters if ord(c) > 127)
    return bool(letters) and accented <= 0.3 * len(letters) and _plausible(text)


def sniff_encoding(head: bytes, complete: bool) -> str | None:
    """The encoding of text that starts with `head` (None: binary or unknown).

    `complete` says `head` is the whole text (else a multi-byte character may be cut at its end).
    UTF-8 first; then a BOM; then UTF-16 without BOM; then cp1252 for Western text (statistical
    detectors often pick cp1250/cp1257 for it); then charset-normalizer.
    """
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    if _utf8_prefix_ok(head, complete) and b"\x00" not in head:
        return "utf-8"
    if b"\x00" in head:
        name = _utf16_without_bom(head)
        return name if name and _plausible(head[: len(head) // 2 * 2].decode(name, errors="replace")) else None
    if _western(head[:DETECT_BYTES]):
        return "cp1252"
    import charset_normalizer

    best = charset_normalizer.from_bytes(head[:DETECT_BYTES]).best()
    if best is None or not _plausible(str(best)):
        return None
    return best.encoding


def _decode(data: bytes, encoding: str, complete: bool) -> str:
    """Decode a prefix (`complete=False`: a character cut at the end is left out)."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict" if encoding.startswith("utf") else "replace")
    return decoder.decode(data, final=complete)


def decode_bytes(data: bytes, complete: bool = True) -> tuple[str, str]:
    """(text, encoding) of `data`; raises DocumentError for binary or undecodable data."""
    encoding = sniff_encoding(data[:DETECT_BYTES], complete and len(data) <= DETECT_BYTES)
    if encoding is None:
        raise DocumentError("binary file, not text" if b"\x00" in data[:HEAD_BYTES] else
                            "not text in a known encoding: re-encode it as UTF-8")  # fmt: skip
    try:
        return _decode(data, encoding, complete), encoding
    except UnicodeDecodeError as err:
        raise DocumentError(f"not valid {encoding} text (byte {err.start}): re-encode it as UTF-8") from None


# ------------------------------------------------------------------------------------------ texts
class Text:
    """A document's text, read only as far as needed.

    `read(max_chars)` returns `(text, complete)`: the first `max_chars` characters (all of them
    when None) and whether that is the whole document. It raises `DocumentError` for a document
    that cannot be read. `encoding` is the encoding used (known after the first read).
    """

    encoding: str | None = "utf-8"
    chars_in_memory: int = 0  # what holding this object costs (for the batching window)

    def read(self, max_chars: int | None) -> tuple[str, bool]:
        raise NotImplementedError


class StringText(Text):
    """Text already in memory (a record's field, stdin)."""

    def __init__(self, value: str, encoding: str | None = "utf-8"):
        self.value, self.encoding, self.chars_in_memory = value, encoding, len(value)

    def read(self, max_chars: int | None) -> tuple[str, bool]:
        if max_chars is None or max_chars >= len(self.value):
            return self.value, True
        return self.value[:max_chars], False


class FileText(Text):
    """A text file, read lazily from disk (at most ~4 bytes per character asked for)."""

    def __init__(self, path: Path, encoding: str, size: int):
        self.path, self.encoding, self.size = path, encoding, size

    def read(self, max_chars: int | None) -> tuple[str, bool]:
        limit = None if max_chars is None else 4 * max_chars + 4
        try:
            with open(self.path, "rb") as f:
                data = f.read() if limit is None else f.read(limit)
                complete = limit is None or len(data) < limit or not f.read(1)
        except OSError as err:
            raise DocumentError(f"cannot read file: {err.strerror or err}") from None
        try:
            text = _decode(data, self.encoding, complete)
        except UnicodeDecodeError:  # invalid bytes beyond the sniffed head: detect on what we have
            text, self.encoding = decode_bytes(data, complete)
        if max_chars is not None and len(text) > max_chars:
            return text[:max_chars], False
        return text, complete


class PdfText(Text):
    """A PDF's extracted text (pypdf), page by page until enough characters are there."""

    encoding = None

    def __init__(self, path: Path):
        self.path = path

    def read(self, max_chars: int | None) -> tuple[str, bool]:
        try:
            from pypdf import PdfReader
        except ImportError:
            raise DocumentError("PDF input needs pypdf: pip install 'longsum[pdf]'") from None
        parts, n = [], 0
        try:
            pages = PdfReader(self.path).pages
            for i, page in enumerate(pages):
                parts.append(page.extract_text() or "")
                n += len(parts[-1]) + 1
                if max_chars is not None and n > max_chars and i + 1 < len(pages):
                    return "\n".join(parts)[:max_chars], False
        except Exception as err:  # noqa: BLE001  a broken PDF is this document's problem only
            raise DocumentError(f"cannot read PDF: {type(err).__name__}: {err}") from None
        text = "\n".join(parts)
        if not text.strip():
            raise DocumentError("PDF has no extractable text")
        return text, True


# ------------------------------------------------------------------------------------------ documents
@dataclass
class Document:
    """One input document: `text` to summarize, or the `error` that its record will carry."""

    id: str
    source: str | None = None  # the record file a record came from, as given (None for files and stdin)
    text: Text | None = None
    error: str | None = None
    path: str | None = None  # the resolved path of the file it came from (None for stdin and pipes)

    @property
    def key(self) -> tuple[str | None, str | None]:
        """What identifies this document in the output, on every rerun (`longsum.store.record_key`)."""
        if self.path is None:
            return (None, self.id)
        return (self.path, self.id if self.source is not None else None)

    @property
    def encoding(self) -> str | None:
        return None if self.text is None else self.text.encoding


def read_text_file(path: Path) -> Document:
    """A text file as a lazily read Document (binary, empty or unreadable: an error Document)."""
    doc_id, real = str(path), os.path.realpath(path)
    if path.suffix.lower() == ".pdf":
        return Document(doc_id, text=PdfText(path), path=real)
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            size = os.fstat(f.fileno()).st_size
    except OSError as err:
        return Document(doc_id, error=f"cannot read file: {err.strerror or err}", path=real)
    complete = len(head) >= size
    try:
        text, encoding = decode_bytes(head, complete)
    except DocumentError as err:
        return Document(doc_id, error=str(err), path=real)
    if complete and not text.strip():
        return Document(doc_id, error="empty document", path=real)
    return Document(doc_id, text=FileText(path, encoding, size), path=real)


def read_stream(data: bytes, prefix: str) -> Document:
    """Piped text: its id is `prefix:` + a hash of the content (the path of a pipe means nothing)."""
    doc_id = f"{prefix}:{hashlib.sha256(data).hexdigest()[:12]}"
    try:
        text, encoding = decode_bytes(data)
    except DocumentError as err:
        return Document(doc_id, error=str(err))
    if not text.strip():
        return Document(doc_id, error="empty document")
    return Document(doc_id, text=StringText(text, encoding))


# ------------------------------------------------------------------------------------------ records
def _binary_lines(f, encoding: str) -> Iterator[tuple[int, str | None]]:
    """(line number, text or None if undecodable) of a byte stream, line endings kept."""
    first = True
    for n, raw in enumerate(f, 1):
        if first and encoding == "utf-8-sig" and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        first = False
        try:
            yield n, raw.decode("utf-8" if encoding == "utf-8-sig" else encoding)
        except UnicodeDecodeError:
            yield n, None


def _record_lines(f) -> tuple[Iterator[tuple[int, str | None]], str]:
    """Lines of a record file opened in binary mode, decoded with its sniffed encoding."""
    head = f.peek(HEAD_BYTES)[:HEAD_BYTES] if hasattr(f, "peek") else b""
    encoding = sniff_encoding(head, complete=False) or "utf-8"
    if encoding.startswith(("utf-16", "utf-32")):  # NUL bytes inside lines: decode as a stream
        stream = codecs.getreader(encoding)(f)
        return ((n, line) for n, line in enumerate(stream, 1)), encoding
    return _binary_lines(f, encoding), encoding


Row = tuple[int, dict | None, str | None]  # (line or row number, record, problem)


def jsonl_rows(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        lines, _ = _record_lines(f)
        for n, line in lines:
            if line is None:
                yield n, None, "line is not valid text in the file's encoding (UTF-8 expected)"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                yield n, None, f"invalid JSON: {getattr(err, 'msg', err)}"
                continue
            yield (n, record, None) if isinstance(record, dict) else (n, None, "a JSON line must be an object")


class _LineFeed:
    """Feeds lines to `csv.reader`, remembering those of the record being read.

    After a malformed record, `resync()` hands back every line after the record's first line, so
    one bad row (an unterminated quote, say) costs that row only and the next rows are still read.
    """

    def __init__(self, lines: Iterator[tuple[int, str | None]]):
        self._lines = lines
        self._pending: deque[tuple[int, str | None]] = deque()
        self.current: list[tuple[int, str | None]] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        item = self._pending.popleft() if self._pending else next(self._lines)
        self.current.append(item)
        if item[1] is None:
            raise csv.Error("line is not valid text in the file's encoding")
        return item[1]

    def start(self) -> None:
        self.current = []

    def resync(self) -> int:
        """Re-read from the line after the bad record's first line; returns that first line."""
        first, rest = self.current[0][0], self.current[1:]
        self._pending.extendleft(reversed(rest))
        self.current = []
        return first


def csv_rows(path: Path) -> Iterator[Row]:
    """Rows of a CSV file; a malformed row (or one with the wrong number of fields) is reported alone."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with open(path, "rb") as f:
        lines, _ = _record_lines(f)
        feed = _LineFeed(lines)
        try:
            header = next(csv.reader(feed, strict=True))
        except StopIteration:
            return
        except csv.Error as err:
            raise DocumentError(f"cannot read the CSV header: {err}") from None
        reader = csv.reader(feed, strict=True)
        while True:
            feed.start()
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                line = feed.resync()
                reason = str(err)
                if "encoding" not in reason:
                    reason += " (an unterminated or stray quote?)"
                yield line, None, f"malformed CSV row: {reason}"
                reader = csv.reader(feed, strict=True)
                continue
            if not row:
                continue
            line = feed.current[0][0]
            if len(row) != len(header):
                yield line, None, (f"CSV row has {len(row)} fields but the header has {len(header)} "
                                   f"(an unquoted comma or quote?)")  # fmt: skip
                continue
            yield line, dict(zip(header, row)), None


def parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH):
        for record in batch.to_pylist():
            n += 1
            yield n, record, None


ROW_READERS: dict[str, Callable[[Path], Iterator[Row]]] = {".jsonl": jsonl_rows, ".csv": csv_rows,
                                                            ".parquet": parquet_rows}  # fmt: skip


def iter_rows(path: Path) -> Iterator[Row]:
    """(number, record, problem) for each row of a JSONL/CSV/parquet file, streamed.

    Raises DocumentError when the file as a whole cannot be read.
    """
    try:
        yield from ROW_READERS[path.suffix.lower()](path)
    except (OSError, ValueError) as err:  # unreadable file, broken parquet footer...
        raise DocumentError(f"cannot read records: {err}") from None


def record_text(record: dict, fields: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(text, problem) of a record: the first of `fields` that holds a string."""
    text = next((record[f] for f in fields if isinstance(record.get(f), str)), None)
    if text is None:
        names = ", ".join(map(str, record))
        return None, f"record has no text field {' or '.join(map(repr, fields))} (fields: {names}); use --text-field"
    if not text.strip():
        return None, "empty document"
    return text, None


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class InputPlan:
    """What the command line names, resolved cheaply (folders listed, nothing read yet)."""

    items: list[tuple[str, Path | None]] = field(default_factory=list)  # (kind, path): file|records|stdin|pipe
    warnings: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # folders where no file matched the patterns


def _patterns(glob: str) -> list[str]:
    return [p.strip().lower() for p in glob.split(",") if p.strip()]


def _matches(relative: str, name: str, patterns: list[str]) -> bool:
    """Case-insensitive: `*.txt` matches `NOTES.TXT`; a pattern with `/` matches the relative path."""
    return any(fnmatch.fnmatchcase(relative.lower() if "/" in p else name.lower(), p) for p in patterns)


def list_folder(folder: Path, glob: str = DEFAULT_GLOB) -> list[Path]:
    """Files under `folder` (recursive, sorted) whose name matches one of the comma-separated patterns."""
    patterns = _patterns(glob)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if _matches(path.relative_to(folder).as_posix(), name, patterns) and path.is_file():
                found.append(path)
    return found


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        return "folder"
    suffix = path.suffix.lower()
    if suffix in RECORD_SUFFIXES:
        return "records"
    return "file" if stat.S_ISREG(mode) else "pipe"


def plan_inputs(inputs: list[str], glob: str = DEFAULT_GLOB) -> InputPlan:
    """Resolve the command line's inputs; raises LongsumError for a missing path or when nothing matched."""
    if not inputs:
        raise LongsumError("name at least one input: a file, a folder, '-' for stdin, or a JSONL/CSV/parquet file")
    missing = [p for p in inputs if p != "-" and not Path(p).exists()]
    if missing:
        raise LongsumError(f"input path does not exist: {missing[0]}")
    if inputs.count("-") > 1:
        raise LongsumError("'-' (stdin) can be named once")
    if not _patterns(glob):
        raise LongsumError(f"--glob '{glob}' has no pattern; use e.g. '*.txt,*.md'")
    plan = InputPlan()
    seen: dict[str, str] = {}  # resolved path -> as given: the same file named twice is read once
    for item in inputs:
        if item == "-":
            plan.items.append(("stdin", None))
            continue
        path = Path(item)
        kind = _kind(path)
        if kind == "folder":
            files = list_folder(path, glob)
            if not files:
                plan.unmatched.append(item)
                plan.warnings.append(f"no file in {item} matches '{glob}' (matched case-insensitively; use --glob)")
            entries = [("file", f) if f.suffix.lower() not in RECORD_SUFFIXES else ("records", f) for f in files]
        else:
            entries = [(kind, path)]
        for entry_kind, entry in entries:
            real = str(entry.resolve()) if entry_kind != "pipe" else str(entry)
            if real in seen:
                plan.warnings.append(f"{entry} is also named as {seen[real]}: read once")
                continue
            seen[real] = str(entry)
            plan.items.append((entry_kind, entry))
    if not plan.items:
        raise LongsumError(f"no input documents: {'; '.join(plan.warnings)}")
    return plan


def source_name(path: Path, kind: str) -> tuple[str, str | None]:
    """(`source`, `path`) of records from `path`: as given and resolved; a pipe's path changes on every run."""
    return ("pipe", None) if kind == "pipe" else (str(path), os.path.realpath(path))


def iter_documents(plan: InputPlan, text_field: str | None = None, id_field: str | None = None,
                   stdin=None) -> Iterator[Document]:  # fmt: skip
    """Every document of `plan`, in order, one at a time, each with a key that is unique in the run.

    Ids that repeat inside one record file give error Documents (see the module docstring).
    """
    fields = (text_field,) if text_field else TEXT_FIELDS
    for kind, path in plan.items:
        if kind == "stdin":
            yield read_stream((stdin or sys.stdin.buffer).read(), "stdin")
        elif kind == "file":
            yield read_text_file(path)
        elif kind == "pipe" and path.suffix.lower() not in RECORD_SUFFIXES:
            try:
                data = path.read_bytes()
            except OSError as err:
                yield Document(str(path), error=f"cannot read: {err.strerror or err}")
                continue
            yield read_stream(data, "pipe")
        else:
            yield from _record_documents(path, *source_name(path, kind), fields, id_field)


def _record_documents(path: Path, source: str, real: str | None, fields: tuple[str, ...],
                      id_field: str | None) -> Iterator[Document]:  # fmt: skip
    first_line: dict[str, int] = {}  # id -> line where it first appeared (every id used in this file)
    n_records = 0
    name = path.name if real is not None else source

    def unused(doc_id: str) -> str:  # a positional id that a record already took as its own id
        k = 2
        while f"{doc_id}#{k}" in first_line:
            k += 1
        return doc_id if doc_id not in first_line else f"{doc_id}#{k}"

    def document(doc_id: str, line: int, error: str | None = None, text: str | None = None) -> Document:
        first_line.setdefault(doc_id, line)
        return Document(doc_id, source, None if text is None else StringText(text), error, real)

    try:
        for n, record, problem in iter_rows(path):
            n_records += 1
            positional = f"{name}:{n}"
            if record is None:
                yield document(unused(positional), n, error=problem)
                continue
            value = record.get(id_field or "id")
            doc_id = positional if value is None or value == "" else str(value)
            if doc_id in first_line:
                yield document(unused(positional), n, error=f"duplicate id {doc_id!r} (first at line "
                               f"{first_line[doc_id]} of {source}); give every record its own id")  # fmt: skip
                continue
            first_line[doc_id] = n
            text, problem = record_text(record, fields)
            yield document(doc_id, n, error=problem) if problem else document(doc_id, n, text=text)
    except DocumentError as err:
        yield document(unused(name), 0, error=str(err))
    if n_records == 0:
        yield document(unused(name), 0, error="no records in this file")
