"""Documents for `longsum summarize`, read one at a time (memory grows with the batch, not the corpus).

Inputs are text/Markdown/PDF files, folders (recursive; `--glob` patterns matched case-insensitively),
`-` for stdin, and record files (JSONL, CSV with a `,` `;` tab or `|` delimiter, parquet) streamed row
by row. A text file is not read when it is found: its `Text` is read later, only as far as the model
can use (`Text.read(max_chars)`), so a 30 MB file costs a few hundred KB in truncate mode. A `.gz`
file is decompressed as it is read, as the name without `.gz` says (`a.txt.gz` text, `r.jsonl.gz`
records; `*.txt` finds `a.txt.gz` too), its limits on its decompressed bytes; a damaged one, or
any file that cannot be read at all, is one error record.

A folder never gives the run's output or the files beside it (sidecar, lock, part files:
`output_files`), so a rerun sees what the first run saw. A file in a folder that cannot be read
(a dangling link, a loop of links, a FIFO) is an error record, not left out.

Every document gets one key, unique in the output and the same on every rerun, however its file
is named (`docs/a.txt`, `./docs/a.txt`, `/home/me/docs/a.txt`, through a symlink...):

* a file: `path` = its resolved absolute path is the key; `id` = its path as given (for display);
  the same file named twice is read once;
* a record: the key is (`path` of its record file, `id`); `id` = its `--id-field` value (default
  `id`) as JSON has it (a string, or a number, `true`, `{"a": 1}`: `record_id`), else `NAME:LINE`
  (the file's name and line); `source` = the record file as given. Records of different files never
  collide; a record whose id repeats an earlier one of the same file (as the store keys ids: by
  their text, so 1 and "1" are alike there) gets an error record under its `NAME:LINE` id;
* stdin (`-`) or a pipe (`<(...)`): `id` = `stdin:` or `pipe:` + 12 hex digits of the content's
  sha256 (the key), so a second, different piped document is a new document and the same one is "done".

Ids, sources and paths are valid Unicode: a file name that is not UTF-8 (`caf\\xe9.txt` on Linux, which
Python reads as `caf\\udce9.txt`) is written with its bytes escaped, `caf\\xe9.txt` (`printable`), the
same on every run. A record whose id holds a lone surrogate (JSON's `"\\ud800"`) is an error record
under `NAME:LINE`; one in a text is replaced by U+FFFD: 'utf-8 (1 lone surrogate replaced)'.

Text is decoded as UTF-8 (a BOM is honoured); otherwise the encoding is detected (UTF-16/32,
cp1252, latin-1... with charset-normalizer) and reported; data with NUL bytes that is not UTF-16/32
is "binary". The encoding is decided on all of the part read (not only the sniffed head): UTF-8 with
a few invalid bytes stays UTF-8, each bad byte U+FFFD, and `encoding` says so ('utf-8 (2 invalid
bytes replaced)'); only text whose non-ASCII bytes are mostly invalid UTF-8 is another encoding.

One document is read into memory up to `max_document_bytes()` (MAX_DOCUMENT_BYTES, 64 MB, or
LONGSUM_MAX_DOCUMENT_MB): a whole text file (chunk mode), stdin or a pipe, a record's line. Past
it, the document is an error record after a bounded read ("document larger than 64 MB"), an endless
stream (`- < /dev/zero`, `yes |`) included; binary stdin stops at its first 64 KB. Character and
block devices and sockets (`/dev/zero`, `/dev/urandom`) are never read: "not a regular file".
A bad document becomes a `Document` with an `error`, never an exception.
"""

from __future__ import annotations

import codecs
import csv
import errno
import fnmatch
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import stat
import sys
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from longsum.data.store import record_key
from longsum.errors import LongsumError

DEFAULT_GLOB = "*.txt,*.md"
TEXT_FIELDS = ("text", "article")  # record fields tried for the text, in order, without --text-field
RECORD_SUFFIXES = (".jsonl", ".csv", ".parquet")
HEAD_BYTES = 1 << 16  # read to sniff a file's encoding (and to tell text from binary)
DETECT_BYTES = 1 << 20  # at most this much goes to charset detection
CSV_FIELD_LIMIT = 64 << 20  # a larger CSV field is reported (an unterminated quote, most likely)
# The most one document may be read into memory: a whole text file (chunk mode), stdin or a pipe, a
# record's line. Larger: an error record, after a bounded read (an endless stream included). A text
# file in truncate mode is read only as far as the model reads, so it may be larger. Set per run
# with LONGSUM_MAX_DOCUMENT_MB (`max_document_bytes`).
MAX_DOCUMENT_BYTES = 64 << 20
PARQUET_BATCH = 1024
GZIP_SUFFIX = ".gz"  # read decompressed, as the name without it says (`notes.txt.gz` is text)
CSV_DELIMITERS = ",\t;|"  # tried on a CSV header; a tie goes to the first (see `_csv_delimiter`)
# What reading a gzip file raises besides OSError (BadGzipFile is one): cut short, or damaged inside.
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
_READ_ERRORS = (OSError, *_GZIP_ERRORS)


class DocumentError(Exception):
    """A problem with one document (its record gets this message as `error`)."""


# ------------------------------------------------------------------------------------------ decoding
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as the surrogateescape handler writes them
_SURROGATES = re.compile("[\ud800-\udfff]")  # never valid in text (the tokenizer and the writer refuse them)
_HIGH_BYTE = re.compile(rb"[\x80-\xff]")


def _utf8_replaced(data: bytes, complete: bool, codec: str = "utf-8") -> tuple[str, int, int]:
    """(text, invalid bytes, valid non-ASCII characters) of UTF-8 `data`, each invalid byte replaced by U+FFFD.

    `complete=False`: a character cut at the end is left out (it is not invalid, only unfinished).
    Valid text (nothing to count: 0 for both) takes the strict decoder's fast path.
    """
    try:
        return codecs.getincrementaldecoder(codec)("strict").decode(data, final=complete), 0, 0
    except UnicodeDecodeError:
        pass
    text = codecs.getincrementaldecoder(codec)("surrogateescape").decode(data, final=complete)
    text, bad = _ESCAPED.subn("\ufffd", text)
    non_ascii = len(text) - len(text.encode("ascii", "ignore"))
    return text, bad, non_ascii - bad


def _mostly_utf8(bad: int, valid_non_ascii: int) -> bool:
    """UTF-8 with a few damaged bytes, rather than another encoding?

    Text in a legacy 8-bit encoding (cp1252, latin-2...) has accented letters that are invalid UTF-8
    almost every time and valid multi-byte sequences only by rare accident; damaged UTF-8 has far
    more valid non-ASCII characters than bad bytes. Pure ASCII with a few high bytes is not UTF-8 by
    this rule: it decodes the same in cp1252 except those bytes, which cp1252 reads as letters.
    """
    return bad == 0 or valid_non_ascii >= bad


def _replaced(codec: str, bad: int, what: str = "invalid byte") -> str:
    """The `encoding` that a record shows: 'utf-8 (2 invalid bytes replaced)'."""
    return codec if bad == 0 else f"{codec} ({bad} {what}{'s' if bad > 1 else ''} replaced)"


def valid_text(text: str) -> tuple[str, int]:
    """(`text` with each lone surrogate replaced by U+FFFD, how many): JSON's `"\\ud800"` gives such text."""
    return _SURROGATES.subn("\ufffd", text) if _SURROGATES.search(text) else (text, 0)


def _escape(match: re.Match) -> str:
    code = ord(match[0])
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def printable(name: str) -> str:
    """`name` (a path, an id) as valid Unicode: a byte that is not UTF-8 in a file name, which Python
    reads as a surrogate U+DC80..U+DCFF, is written `\\xNN` (`caf\\xe9.txt`, as Python's backslashreplace
    shows it); any other lone surrogate `\\uNNNN`. Valid names are unchanged (their keys stay as they
    were) and the escaping is the same on every run, so resuming works. Reversible but for a name that
    also holds a literal `\\xNN`: `plan_inputs` reports two files whose escaped names collide.
    """
    return _SURROGATES.sub(_escape, name) if _SURROGATES.search(name) else name


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


def _legacy_encoding(data: bytes) -> str | None:
    """The 8-bit encoding of text that is not UTF-8: cp1252 for Western text (statistical detectors
    often pick cp1250/cp1257 for it), else charset-normalizer's guess. Judged on DETECT_BYTES around the
    first non-ASCII byte: a long ASCII start says nothing, the words around the accents do."""
    first = _HIGH_BYTE.search(data)
    start = max(0, first.start() - DETECT_BYTES // 2) if first else 0
    sample = bytes(data[start : start + DETECT_BYTES])
    if _western(sample):
        return "cp1252"
    import charset_normalizer

    best = charset_normalizer.from_bytes(sample).best()
    if best is None or not _plausible(str(best)):
        return None
    return best.encoding


def sniff_encoding(head: bytes, complete: bool) -> str | None:
    """The encoding of text that starts with `head` (None: binary or unknown).

    `complete` says `head` is the whole text (else a multi-byte character may be cut at its end).
    A BOM; then NUL bytes: UTF-16 without BOM, or binary; then UTF-8, also with a few invalid bytes
    (`_mostly_utf8`: `decode` replaces them); then a legacy 8-bit encoding (`_legacy_encoding`).
    """
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    if b"\x00" in head:
        name = _utf16_without_bom(head)
        return name if name and _plausible(head[: len(head) // 2 * 2].decode(name, errors="replace")) else None
    if _mostly_utf8(*_utf8_replaced(head, complete)[1:]):
        return "utf-8"
    return _legacy_encoding(head)


def decode(data: bytes, codec: str, complete: bool) -> tuple[str, str]:
    """(text, encoding) of `data` in the sniffed `codec`, decided on all of `data` (the part read).

    UTF-8 that has invalid bytes stays UTF-8 when `_mostly_utf8` (valid text around a few bad bytes is
    never re-decoded as another encoding): each bad byte becomes U+FFFD and the encoding says how many,
    'utf-8 (2 invalid bytes replaced)'. UTF-8 whose non-ASCII bytes are mostly invalid is decoded
    in its legacy encoding. `complete=False`: a character cut at the end is left out.
    Raises DocumentError for data that cannot be decoded.
    """
    if codec in ("utf-8", "utf-8-sig"):
        text, bad, valid_non_ascii = _utf8_replaced(data, complete, codec)
        if _mostly_utf8(bad, valid_non_ascii) or codec == "utf-8-sig":  # a UTF-8 BOM is proof enough
            return text, _replaced(codec, bad)
        codec = _legacy_encoding(data)
        if codec is None:
            raise DocumentError("not text in a known encoding: re-encode it as UTF-8")
    try:
        # Legacy 8-bit codecs leave a few bytes undefined (cp1252: 0x81...): replaced; UTF-16/32 must be valid.
        errors = "strict" if codec.startswith("utf") else "replace"
        return codecs.getincrementaldecoder(codec)(errors).decode(data, final=complete), codec
    except UnicodeDecodeError as err:
        raise DocumentError(f"not valid {codec} text (byte {err.start}): re-encode it as UTF-8") from None


def decode_bytes(data: bytes, complete: bool = True) -> tuple[str, str]:
    """(text, encoding) of `data`; raises DocumentError for binary or undecodable data."""
    codec = sniff_encoding(data[:DETECT_BYTES], complete and len(data) <= DETECT_BYTES)
    if codec is None:
        raise DocumentError("binary file, not text" if b"\x00" in data[:HEAD_BYTES] else
                            "not text in a known encoding: re-encode it as UTF-8")  # fmt: skip
    return decode(data, codec, complete)


# ------------------------------------------------------------------------------------------ limits
def max_document_bytes() -> int:
    """The most bytes one document may be read into memory: LONGSUM_MAX_DOCUMENT_MB (megabytes, 2**20
    bytes; a fraction is fine) when set, else MAX_DOCUMENT_BYTES. Raises LongsumError for a bad value."""
    value = os.environ.get("LONGSUM_MAX_DOCUMENT_MB", "").strip()
    if not value:
        return MAX_DOCUMENT_BYTES
    try:
        limit = int(float(value) * (1 << 20))
    except ValueError:
        limit = 0
    if limit <= 0:
        raise LongsumError(f"LONGSUM_MAX_DOCUMENT_MB={value!r}: give a positive number of megabytes")
    return limit


def _megabytes(limit: int) -> str:
    return f"{limit / (1 << 20):g} MB (LONGSUM_MAX_DOCUMENT_MB)"


# ------------------------------------------------------------------------------------------ files
def format_suffix(path: Path) -> str:
    """The suffix that says how `path` is read, lower-case, after a `.gz` is taken off: `.jsonl` for
    `a.jsonl.gz`, `.txt` for `notes.TXT.gz`, `` for `notes.gz` (read as text, like any other name)."""
    name = path.name.lower()
    if name.endswith(GZIP_SUFFIX):
        name = name[: -len(GZIP_SUFFIX)]
    return os.path.splitext(name)[1]


def gzipped(path: Path) -> bool:
    return path.name.lower().endswith(GZIP_SUFFIX)


def open_binary(path: Path) -> BinaryIO:
    """`path` opened for reading bytes, decompressed when its name ends in `.gz`.

    A gzip file is decompressed as it is read: `read(n)` inflates about n bytes and no more, so the
    document limit bounds the decompressed size and a gzip bomb costs only what is read of it.
    """
    return gzip.open(path, "rb") if gzipped(path) else open(path, "rb")


def _read_problem(err: BaseException, what: str = "cannot read file") -> str:
    """One line for an error of reading (a damaged gzip file says so: its OSError has no strerror)."""
    if isinstance(err, _GZIP_ERRORS):
        return f"corrupt gzip data: {err}"
    return f"{what}: {getattr(err, 'strerror', None) or err}"


# ------------------------------------------------------------------------------------------ texts
class Text:
    """A document's text, read only as far as needed.

    `read(max_chars)` returns `(text, complete)`: the first `max_chars` characters (all of them
    when None) and whether that is the whole document. It raises `DocumentError` for a document
    that cannot be read, or that is larger than `max_document_bytes()` when more than that is asked
    for. `encoding` is the encoding used (known after the first read), as records show it:
    'utf-8 (2 invalid bytes replaced)' says what was replaced in the part read.
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


class UnreadableText(Text):
    """A document known not to be readable (its `error`): every read raises it, so the document
    gets its error record where the others get theirs."""

    def __init__(self, error: str):
        self.error = error

    def read(self, max_chars: int | None) -> tuple[str, bool]:
        raise DocumentError(self.error)


def record_string_text(value: str) -> StringText:
    """A record's text; a lone surrogate (JSON's `"\\ud800"`, which the tokenizer refuses) is replaced
    by U+FFFD and counted in `encoding`: 'utf-8 (1 lone surrogate replaced)'."""
    value, bad = valid_text(value)
    return StringText(value, _replaced("utf-8", bad, "lone surrogate"))


class FileText(Text):
    """A text file, read lazily from disk: at most ~4 bytes per character asked for, and never more
    than `max_document_bytes()` (a larger file gives a prefix, but not the whole). A `.gz` file is
    decompressed as it is read, so these bounds are on its decompressed bytes."""

    def __init__(self, path: Path, encoding: str, size: int | None = None):
        self.path, self.codec, self.encoding, self.size = path, encoding, encoding, size

    def read(self, max_chars: int | None) -> tuple[str, bool]:
        limit = max_document_bytes()
        n = limit if max_chars is None else min(4 * max_chars + 4, limit)
        try:
            with open_binary(self.path) as f:
                data = f.read(n)
                complete = len(data) < n or not f.read(1)
        except _READ_ERRORS as err:  # a gzip file damaged past the head that was sniffed, too
            raise DocumentError(_read_problem(err)) from None
        # The encoding is decided on all that was read (a bad byte past the sniffed head included).
        text, self.encoding = decode(data, self.codec, complete)
        if max_chars is not None and len(text) >= max_chars:
            return text[:max_chars], complete and len(text) == max_chars
        if not complete and len(data) >= limit:  # more is asked for than a document may be
            raise DocumentError(f"document larger than {_megabytes(limit)}")
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
        limit = max_document_bytes()  # in characters here: extracted text is not bytes yet
        try:
            pages = PdfReader(self.path).pages
            for i, page in enumerate(pages):
                parts.append(valid_text(page.extract_text() or "")[0])  # a broken ToUnicode map: U+FFFD
                n += len(parts[-1]) + 1
                if max_chars is not None and n > max_chars and i + 1 < len(pages):
                    return "\n".join(parts)[:max_chars], False
                if n > limit:
                    raise DocumentError(f"document larger than {_megabytes(limit)}")
        except DocumentError:
            raise
        except Exception as err:  # noqa: BLE001  a broken PDF is this document's problem only
            raise DocumentError(f"cannot read PDF: {type(err).__name__}: {err}") from None
        text = "\n".join(parts)
        if not text.strip():
            raise DocumentError("PDF has no extractable text")
        return text, True


# ------------------------------------------------------------------------------------------ documents
@dataclass
class Document:
    """One input document: `text` to summarize, or the `error` that its record will carry.

    `id`, `source`, `path` and `error` are valid Unicode: names that are not are escaped (`printable`).
    `id` is a string, but for a record whose id is another JSON value (`1`, `true`, `{"a": 1}`):
    that value, which its record carries as it is (`record_id`).
    """

    id: Any
    source: str | None = None  # the record file a record came from, as given (None for files and stdin)
    text: Text | None = None
    error: str | None = None
    path: str | None = None  # the resolved path of the file it came from (None for stdin and pipes)

    def __post_init__(self):
        # A file name that is not UTF-8 would stop the writer (a lone surrogate cannot be encoded).
        if isinstance(self.id, str):
            self.id = printable(self.id)
        for name in ("source", "error", "path"):
            if getattr(self, name) is not None:
                setattr(self, name, printable(getattr(self, name)))

    @property
    def key(self) -> tuple:
        """What identifies this document in the output, on every rerun: the key that the store makes
        of its record (`longsum.data.store.record_key`), so a rerun finds it done, whatever the id's type."""
        record = {"id": self.id, "path": self.path}
        if self.source is not None:
            record["source"] = self.source
        return record_key(record)

    @property
    def encoding(self) -> str | None:
        return None if self.text is None else self.text.encoding


def read_text_file(path: Path) -> Document:
    """A text file as a lazily read Document (binary, empty or unreadable: an error Document)."""
    doc_id, real = str(path), os.path.realpath(path)
    if format_suffix(path) == ".pdf":
        if gzipped(path):  # pypdf seeks all over a file: a gzip stream cannot be read so
            return Document(doc_id, error="a gzipped PDF is not read: gunzip it first", path=real)
        return Document(doc_id, text=PdfText(path), path=real)
    try:
        with open_binary(path) as f:
            head = f.read(HEAD_BYTES)
            # The size on disk says nothing of a gzip file's text: whether more follows is read.
            complete = len(head) < HEAD_BYTES or not f.read(1)
    except _READ_ERRORS as err:
        return Document(doc_id, error=_read_problem(err), path=real)
    try:
        text, encoding = decode_bytes(head, complete)
    except DocumentError as err:
        problem = str(err)
        if head.startswith(b"\x1f\x8b") and not gzipped(path):  # gzip's magic bytes: say how to have it read
            problem += f" (gzip data: name it {printable(path.name)}.gz to have it decompressed)"
        return Document(doc_id, error=problem, path=real)
    if complete and not text.strip():
        return Document(doc_id, error="empty document", path=real)
    # The codec without what the head needed replaced ('utf-8 (1 invalid byte replaced)'): FileText
    # decodes with it and its `encoding` then says what the part read needed.
    return Document(doc_id, text=FileText(path, encoding.split(" ", 1)[0]), path=real)


def read_stream(stream: BinaryIO, prefix: str) -> Document:
    """Piped text (stdin, a FIFO), read whole but never past `max_document_bytes()`: an endless
    stream (`- < /dev/zero`, `yes |`) is an error Document after a bounded read. Binary data is
    known from its first HEAD_BYTES. The id is `prefix:` + a hash of what was read (the path of a
    pipe means nothing)."""
    limit = max_document_bytes()
    data = bytearray()
    binary_known = False
    while len(data) <= limit:
        try:
            block = stream.read(min(1 << 20, limit + 1 - len(data)))
        except _READ_ERRORS as err:  # (a pipe named .gz is decompressed: it may be damaged)
            return Document(f"{prefix}:{hashlib.sha256(data).hexdigest()[:12]}",
                            error=_read_problem(err, "cannot read"))  # fmt: skip
        if not block:
            break
        data += block
        if not binary_known and len(data) >= HEAD_BYTES:  # stop at once on binary data (/dev/zero, urandom)
            binary_known = True
            head = bytes(data[:HEAD_BYTES])
            if b"\x00" in head and sniff_encoding(head, complete=False) is None:
                return Document(f"{prefix}:{hashlib.sha256(head).hexdigest()[:12]}", error="binary file, not text")
    doc_id = f"{prefix}:{hashlib.sha256(data).hexdigest()[:12]}"
    if len(data) > limit:
        return Document(doc_id, error=f"document larger than {_megabytes(limit)}")
    try:
        text, encoding = decode_bytes(data)
    except DocumentError as err:
        return Document(doc_id, error=str(err))
    if not text.strip():
        return Document(doc_id, error="empty document")
    return Document(doc_id, text=StringText(text, encoding))


# ------------------------------------------------------------------------------------------ records
Line = tuple[int, str | None, str | None]  # (line number, text or None, why there is no text)


def _binary_lines(f, encoding: str) -> Iterator[Line]:
    """The lines of a byte stream, decoded, line endings kept.

    A line is read only up to `max_document_bytes()`: a longer one is reported, and skipped to its
    end in bounded blocks in a regular file; in a pipe (which may never end: `cat /dev/zero`), it is
    the last line read.
    """
    limit = max_document_bytes()
    try:
        regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):  # not a file (a test's stream)
        regular = False
    for n in itertools.count(1):
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit and not raw.endswith(b"\n"):
            del raw
            problem = f"line longer than the document limit of {_megabytes(limit)}"
            if not regular:
                yield n, None, problem + "; the rest of the stream is not read"
                return
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield n, None, problem
            continue
        if n == 1 and encoding == "utf-8-sig" and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            yield n, raw.decode("utf-8" if encoding == "utf-8-sig" else encoding), None
        except UnicodeDecodeError:
            yield n, None, "line is not valid text in the file's encoding (UTF-8 expected)"


def _record_lines(f) -> tuple[Iterator[Line], str]:
    """Lines of a record file opened in binary mode, decoded with its sniffed encoding."""
    head = f.peek(HEAD_BYTES)[:HEAD_BYTES] if hasattr(f, "peek") else b""
    encoding = sniff_encoding(head, complete=False) or "utf-8"
    if encoding.startswith(("utf-16", "utf-32")):  # NUL bytes inside lines: decode as a stream
        stream = codecs.getreader(encoding)(f)
        return ((n, line, None) for n, line in enumerate(stream, 1)), encoding
    return _binary_lines(f, encoding), encoding


Row = tuple[int, dict | None, str | None]  # (line or row number, record, problem)


def jsonl_rows(path: Path) -> Iterator[Row]:
    with open_binary(path) as f:
        lines, _ = _record_lines(f)
        for n, line, problem in lines:
            if line is None:
                yield n, None, problem
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                yield n, None, f"invalid JSON: {getattr(err, 'msg', err)}"
                continue
            yield (n, record, None) if isinstance(record, dict) else (n, None, "a JSON line must be an object")


class _LineError(csv.Error):
    """A line that could not be given to the CSV reader (undecodable, too long)."""


class _LineFeed:
    """Feeds lines to `csv.reader`, remembering those of the record being read.

    After a malformed record, `resync()` hands back every line after the record's first line, so
    one bad row (an unterminated quote, say) costs that row only and the next rows are still read.
    """

    def __init__(self, lines: Iterator[Line]):
        self._lines = lines
        self._pending: deque[Line] = deque()
        self.current: list[Line] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        item = self._pending.popleft() if self._pending else next(self._lines)
        self.current.append(item)
        if item[1] is None:
            raise _LineError(item[2])
        return item[1]

    def start(self) -> None:
        self.current = []

    def resync(self) -> int:
        """Re-read from the line after the bad record's first line; returns that first line."""
        first, rest = self.current[0][0], self.current[1:]
        self._pending.extendleft(reversed(rest))
        self.current = []
        return first


_DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "'|'"}


def _csv_delimiter(header: str) -> str:
    """The delimiter of a CSV file, judged on its header line: the one of CSV_DELIMITERS that splits it
    into the most fields, quotes honoured (`"a,b";c` is two fields split by `;`); a tie (a header of
    one column) goes to the comma. csv.Sniffer is not used: on one line it takes a comma whenever
    there is one, so `id;text,notes;x` would be read as two fields."""

    def fields(delimiter: str) -> int:
        try:
            return len(next(csv.reader([header], delimiter=delimiter), []))
        except csv.Error:  # an unterminated quote in the header: not this delimiter's doing
            return 0

    return max(CSV_DELIMITERS, key=lambda d: (fields(d), -CSV_DELIMITERS.index(d)))


def csv_rows(path: Path) -> Iterator[Row]:
    """Rows of a CSV file; a malformed row (or one with the wrong number of fields) is reported alone.

    The delimiter (comma, tab, semicolon or `|`) is the one the header line is written with (`_csv_delimiter`).
    """
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with open_binary(path) as f:
        lines, _ = _record_lines(f)
        first = next(lines, None)
        if first is None:
            return
        delimiter = _csv_delimiter(first[1]) if first[1] is not None else ","
        feed = _LineFeed(itertools.chain([first], lines))

        def reader():
            return csv.reader(feed, strict=True, delimiter=delimiter)

        try:
            header = next(reader())
        except StopIteration:
            return
        except csv.Error as err:
            raise DocumentError(f"cannot read the CSV header: {err}") from None
        rows = reader()
        while True:
            feed.start()
            try:
                row = next(rows)
            except StopIteration:
                return
            except _LineError as err:
                yield feed.resync(), None, str(err)
                rows = reader()
                continue
            except csv.Error as err:
                yield feed.resync(), None, f"malformed CSV row: {err} (an unterminated or stray quote?)"
                rows = reader()
                continue
            if not row:
                continue
            line = feed.current[0][0]
            if len(row) != len(header):
                yield line, None, (f"CSV row has {len(row)} fields but the header has {len(header)} "
                                   f"(an unquoted {_DELIMITER_NAMES[delimiter]} or quote?)")  # fmt: skip
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
    """(number, record, problem) for each row of a JSONL/CSV/parquet file, streamed; `.jsonl.gz` and
    `.csv.gz` are decompressed as they are read.

    Raises DocumentError when the file as a whole (or the rest of it) cannot be read.
    """
    suffix = format_suffix(path)
    if suffix not in ROW_READERS:
        raise DocumentError(f"not a record file (JSONL, CSV or parquet): {printable(path.name)}")
    if suffix == ".parquet" and gzipped(path):  # parquet reads its footer first: a gzip stream has none to seek to
        raise DocumentError("a gzipped parquet file is not read (parquet is compressed inside): gunzip it first")
    try:
        yield from ROW_READERS[suffix](path)
    except _GZIP_ERRORS as err:  # damaged or cut short: the rows before it were read
        raise DocumentError(f"cannot read records: {_read_problem(err)}") from None
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
    """Case-insensitive: `*.txt` matches `NOTES.TXT`; a pattern with `/` matches the relative path.

    A gzipped file matches as its name without `.gz` does (`*.txt` finds `notes.txt.gz`): it is read
    decompressed, as that name says, so a folder of compressed texts needs no other --glob.
    """

    def match(relative: str, name: str) -> bool:
        return any(fnmatch.fnmatchcase(relative.lower() if "/" in p else name.lower(), p) for p in patterns)

    if match(relative, name):
        return True
    return name.lower().endswith(GZIP_SUFFIX) and match(relative[: -len(GZIP_SUFFIX)], name[: -len(GZIP_SUFFIX)])


def _own_name(name: str, output: str) -> bool:
    """Is `name` the output file's name `output` or that of a file longsum keeps beside it?

    Those files (their names are made in `longsum.data.store` and `longsum.data.distributed`; the test
    `test_22_12_every_file_beside_the_output_is_left_out` checks them against those functions):
    OUTPUT, OUTPUT.run.json (the sidecar), OUTPUT.lock, OUTPUT.part<N> (a launched run's part files),
    .OUTPUT.<PID>.compact (compaction) and .OUTPUT.run.json.<PID>.tmp (the sidecar's atomic write).
    Names are compared as strings: an output named `out[1].jsonl` is no pattern.
    """

    def number(text: str) -> bool:
        return text.isascii() and text.isdigit()

    if name in (output, f"{output}.run.json", f"{output}.lock"):
        return True
    if name.startswith(f"{output}.part"):
        return number(name[len(output) + 5 :])
    for prefix, suffix in ((f".{output}.", ".compact"), (f".{output}.run.json.", ".tmp")):
        if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix):
            return number(name[len(prefix) : -len(suffix)])
    return False


def output_files(output: str | None) -> Callable[[str], bool]:
    """Whether a resolved path (`os.path.realpath`) is the output `output` or one of longsum's files
    beside it (`_own_name`), which a folder input never reads: so an output inside an input folder
    that the --glob matches (`summarize docs/ --glob '*' -o docs/out.jsonl`) is left out alike on the
    first run, when it does not exist yet, and on every rerun, which then resumes. They are looked
    for beside the output as named and beside the file it links to (where a symlinked output's
    sidecar, lock and part files are, `longsum.data.store.ResultStore`). None or `-`: nothing is.
    """
    if not output or output == "-":
        return lambda real: False
    named = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(output))), os.path.basename(output))
    places = {os.path.split(named), os.path.split(os.path.realpath(output))}

    def own(real: str) -> bool:
        folder, name = os.path.split(real)
        return any(folder == place and _own_name(name, output_name) for place, output_name in places)

    return own


def _folder_entries(folder: Path, patterns: list[str],
                    skip: Callable[[str], bool]) -> tuple[list[tuple[str, Path]], list[Path]]:  # fmt: skip
    """((kind, path) of each file under `folder` whose name matches, sorted; the matching files that
    `skip` left out, by their resolved path).

    kind: `file` or `records` (by `format_suffix`); `broken` for a link that leads nowhere (a dangling
    link, a loop, a target that cannot be reached) and `device` for a FIFO, socket or device: they
    get an error record each, never silence (a dangling `a.txt` is a document the user expects read).
    """
    found, skipped = [], []
    for root, dirs, files in os.walk(folder):  # a link to a folder is in `dirs` and not followed
        dirs.sort()
        real_root = os.path.realpath(root)
        for name in sorted(files):
            path = Path(root) / name
            if not _matches(path.relative_to(folder).as_posix(), name, patterns):
                continue
            # Non-strict: a dangling link to the output (first run) resolves to it as the output will (rerun).
            real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_root, name)
            if skip(real):
                skipped.append(path)
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError:
                found.append(("broken", path))
                continue
            if stat.S_ISREG(mode):
                found.append(("records" if format_suffix(path) in RECORD_SUFFIXES else "file", path))
            elif not stat.S_ISDIR(mode):  # (a folder only when made meanwhile: walked next time)
                found.append(("device", path))  # a FIFO would block with no writer: never read
    return found, skipped


def list_folder(folder: Path, glob: str = DEFAULT_GLOB, output: str | None = None) -> list[Path]:
    """Files under `folder` (recursive, sorted) whose name matches one of the comma-separated patterns,
    but the output's (`output_files`)."""
    return [path for _, path in _folder_entries(folder, _patterns(glob), output_files(output))[0]]


def _special(mode: int) -> str | None:
    """What a file that is neither regular, a folder nor a pipe is (None for those)."""
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return None


def _not_a_document(path: Path) -> str:
    """Why a folder's entry of kind `device` or `broken` (or a device named on the command line) is not read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if os.path.islink(path) and err.errno == errno.ENOENT:
            return f"broken link: its target {printable(os.readlink(path))} does not exist"
        if err.errno == errno.ELOOP:
            return "broken link: a loop of symbolic links"
        return f"cannot read: {err.strerror or err}"
    return f"not a regular file: {_special(mode) or ('FIFO' if stat.S_ISFIFO(mode) else 'an unknown kind')}"


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        return "folder"
    if _special(mode):  # /dev/zero, /dev/urandom, a disk: endless or not a document; never read
        return "device"
    if format_suffix(path) in RECORD_SUFFIXES:
        return "records"
    return "file" if stat.S_ISREG(mode) else "pipe"


def _some(paths: list[Path], most: int = 2) -> str:
    names = [printable(p.name) for p in paths[:most]]
    return ", ".join(names) + (f" and {len(paths) - most} more" if len(paths) > most else "")


def plan_inputs(inputs: list[str], glob: str = DEFAULT_GLOB, output: str | None = None) -> InputPlan:
    """Resolve the command line's inputs; raises LongsumError for a missing path or when nothing matched.

    `output`: the run's output; its files are left out of folders (`output_files`), with a warning.
    Named on the command line, it is an input still (the caller refuses that).
    """
    if not inputs:
        raise LongsumError("name at least one input: a file, a folder, '-' for stdin, or a JSONL/CSV/parquet file")
    missing = [p for p in inputs if p != "-" and not Path(p).exists()]
    if missing:
        raise LongsumError(f"input path does not exist: {printable(missing[0])}")
    if inputs.count("-") > 1:
        raise LongsumError("'-' (stdin) can be named once")
    patterns = _patterns(glob)
    if not patterns:
        raise LongsumError(f"--glob '{glob}' has no pattern; use e.g. '*.txt,*.md'")
    max_document_bytes()  # a bad LONGSUM_MAX_DOCUMENT_MB: refused now, before any work
    skip = output_files(output)
    plan = InputPlan()
    # resolved path, escaped (the key) -> (path, as given): the same file named twice is read once
    seen: dict[str, tuple[str, str]] = {}
    for item in inputs:
        if item == "-":
            plan.items.append(("stdin", None))
            continue
        path = Path(item)
        kind = _kind(path)
        if kind == "folder":
            entries, skipped = _folder_entries(path, patterns, skip)
            if skipped:
                plan.warnings.append(f"left out of {printable(item)}: {_some(skipped)} (the output {printable(output)} "
                                     f"and the files beside it are not inputs)")  # fmt: skip
            if not entries:
                plan.unmatched.append(item)
                plan.warnings.append(
                    f"no file in {printable(item)} matches '{glob}' (matched case-insensitively; use --glob)"
                )
        else:
            entries = [(kind, path)]
        for entry_kind, entry in entries:
            # os.path.realpath, not Path.resolve: that raises on a loop of links (kind `broken`)
            real = os.path.realpath(entry) if entry_kind != "pipe" else str(entry)
            key = printable(real)
            if key in seen and seen[key][0] == real:
                plan.warnings.append(f"{printable(str(entry))} is also named as {seen[key][1]}: read once")
                continue
            if key in seen:  # `caf\xe9.txt` written so, and a file whose name has the byte 0xE9
                plan.warnings.append(f"{printable(str(entry))} is skipped: its name, escaped, is that of "
                                     f"{seen[key][1]} (rename one of them)")  # fmt: skip
                continue
            seen[key] = (real, printable(str(entry)))
            plan.items.append((entry_kind, entry))
    if not plan.items:
        raise LongsumError(f"no input documents: {'; '.join(plan.warnings)}")
    return plan


def source_name(path: Path, kind: str) -> tuple[str, str | None]:
    """(`source`, `path`) of records from `path`: as given and resolved, escaped (`printable`); a pipe's
    path changes on every run."""
    return ("pipe", None) if kind == "pipe" else (printable(str(path)), printable(os.path.realpath(path)))


def iter_documents(plan: InputPlan, text_field: str | None = None, id_field: str | None = None,
                   stdin=None) -> Iterator[Document]:  # fmt: skip
    """Every document of `plan`, in order, one at a time, each with a key that is unique in the run.

    Ids that repeat inside one record file give error Documents (see the module docstring).
    """
    fields = (text_field,) if text_field else TEXT_FIELDS
    for kind, path in plan.items:
        if kind == "stdin":
            yield read_stream(stdin or sys.stdin.buffer, "stdin")
        elif kind == "file":
            yield read_text_file(path)
        elif kind in ("device", "broken"):
            yield Document(str(path), error=_not_a_document(path), path=os.path.realpath(path))
        elif kind == "pipe" and format_suffix(path) not in RECORD_SUFFIXES:
            try:
                with open_binary(path) as f:  # closed before the document is handed on
                    doc = read_stream(f, "pipe")
            except OSError as err:
                doc = Document(str(path), error=f"cannot read: {err.strerror or err}")
            yield doc
        else:
            yield from _record_documents(path, *source_name(path, kind), fields, id_field)


def record_id(value: Any) -> Any:
    """The id of a record (its --id-field value) as its output record will carry it; None: it has none.

    JSON's view of the id is kept: a string stays that string, any other JSON value stays that value
    (`1`, `true`, `{"a": 1}`: not Python's `True` or `{'a': 1}`), as it reads back from JSON (a
    parquet map's tuples become lists). A value that JSON cannot hold (a parquet timestamp, bytes,
    NaN) is its text.
    """
    if value is None or value == "" or isinstance(value, str):
        return value or None
    if type(value) in (int, bool) or (type(value) is float and math.isfinite(value)):
        return value  # (the common case, a number: no round trip through JSON)
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return str(value)


def shown_id(value: Any) -> str:
    """An id as messages show it: `'a'` for a string, its compact JSON text for any other value (`1`, `true`)."""
    return repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _id_key(value: Any) -> str:
    """What tells two ids of one record file apart in the output: the store's key for them. Ids it
    does not tell apart are duplicates here, so no two documents ever share a key."""
    return record_key({"id": value, "source": "", "path": ""})[1]


def _record_documents(path: Path, source: str, real: str | None, fields: tuple[str, ...],
                      id_field: str | None) -> Iterator[Document]:  # fmt: skip
    # `_id_key` of every id used in this file -> the line where it first appeared, negative for an id
    # that is not a string (one int per record: this grows with the file)
    first: dict[str, int] = {}
    n_records = 0
    unreadable = False  # the file (or its rest) could not be read: that one error record says so
    name = printable(path.name) if real is not None else source

    def unused(doc_id: str) -> str:  # a positional id that a record already took as its own id
        k = 2
        while f"{doc_id}#{k}" in first:
            k += 1
        return doc_id if doc_id not in first else f"{doc_id}#{k}"

    def document(doc_id: Any, line: int, error: str | None = None, text: str | None = None) -> Document:
        if isinstance(doc_id, str):  # (its own key; another id was taken before it got here)
            first.setdefault(doc_id, line)
        return Document(doc_id, source, None if text is None else record_string_text(text), error, real)

    try:
        for n, record, problem in iter_rows(path):
            n_records += 1
            positional = f"{name}:{n}"
            if record is None:
                yield document(unused(positional), n, error=problem)
                continue
            doc_id = record_id(record.get(id_field or "id"))
            if doc_id is None:
                doc_id = positional
            string = isinstance(doc_id, str)
            # JSON's "\ud800" (in a string, or in a list or object): escaping it would break the user's join
            if _SURROGATES.search(doc_id if string else shown_id(doc_id) if isinstance(doc_id, (list, dict)) else ""):
                yield document(unused(positional), n, error=f"id {shown_id(doc_id)} is not valid Unicode (a lone "
                               "surrogate): give the record a valid id")  # fmt: skip
                continue
            key = doc_id if string else _id_key(doc_id)
            if key in first:
                line = first[key]
                # The store keys ids by their text: 1 and "1" are one key there, and this says why
                how = "" if (line >= 0) == string else ", as a string there" if line >= 0 else ", not as a string there"
                yield document(unused(positional), n, error=f"duplicate id {shown_id(doc_id)} (first at line "
                               f"{abs(line)} of {source}{how}); give every record its own id")  # fmt: skip
                continue
            first[key] = n if string else -n
            text, problem = record_text(record, fields)
            yield document(doc_id, n, error=problem) if problem else document(doc_id, n, text=text)
    except DocumentError as err:
        unreadable = True
        yield document(unused(name), 0, error=str(err))
    if n_records == 0 and not unreadable:  # (an unreadable file has its record already: one per file)
        yield document(unused(name), 0, error="no records in this file")
