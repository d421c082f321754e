"""Zip files written while they are sent: stored (not deflated) entries, read chunk by chunk."""
import posixpath
import zipfile
from dataclasses import dataclass
from typing import Callable

from werkzeug.utils import secure_filename

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ZipEntry:
    name: str
    date_time: tuple
    size: int
    open: Callable  # returns a binary file object to read the entry's bytes from


class _ChunkSink:
    """A write-only, non-seekable stream that collects what zipfile writes until it is drained."""

    def __init__(self):
        self._chunks = []
        self._position = 0

    def write(self, data):
        self._chunks.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self):
        return self._position

    def flush(self):
        pass

    def drain(self):
        chunks, self._chunks = self._chunks, []
        return b"".join(chunks)


def zip_stream(entries):
    """A generator of the bytes of a zip of `entries`; at most one chunk of one entry is in memory.

    zipfile writes a data descriptor after each entry when its stream cannot seek, so nothing has
    to be known (CRCs) before the first byte is sent. Entry names are made safe to unpack, see
    `_safe_unique_name`.
    """
    sink = _ChunkSink()
    taken = set()
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for entry in entries:
            info = zipfile.ZipInfo(_safe_unique_name(entry.name, taken), date_time=entry.date_time)
            info.file_size = entry.size
            with entry.open() as source, archive.open(info, mode="w") as target:
                while chunk := source.read(CHUNK_BYTES):
                    target.write(chunk)
                    yield sink.drain()
            yield sink.drain()  # the entry's data descriptor
    yield sink.drain()  # the central directory


def _safe_unique_name(name, taken):
    """`name` as a plain file name that unpacks where the zip is unpacked, whatever the stored data holds:
    letters, digits, '-', '_' and '.' only (no folder, no `..`, no backslash, no leading '/'). A name that an
    earlier entry has, ignoring case (a case-insensitive file system would unpack both onto one file), is
    numbered -2, -3 … before its extension. `taken` holds the names given so far."""
    safe = secure_filename(name) or "file"
    stem, extension = posixpath.splitext(safe)
    candidate, number = safe, 1
    while candidate.casefold() in taken:
        number += 1
        candidate = f"{stem}-{number}{extension}"
    taken.add(candidate.casefold())
    return candidate
