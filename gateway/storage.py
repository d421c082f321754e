"""Where DICOM files live: a folder whose layout only the gateway decides.

Files are written under `tmp/` first and moved into place by an atomic rename, so a reader never
sees half a file; keys are generated here, never taken from a client.
"""
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

# One level of 256 folders, all made (and made durable) when the storage opens: placing a file then
# never makes a folder, so no two workers race to make one and sync it.
_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{32}\.[a-z0-9]{1,8}$")
_FOLDERS = [f"{number:02x}" for number in range(256)]


class FileStorage:
    def __init__(self, root):
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for folder in _FOLDERS:
            (self.root / folder).mkdir(exist_ok=True)
        _sync_folder(self.root)

    def new_key(self, suffix="dcm"):
        name = uuid.uuid4().hex
        return f"{name[:2]}/{name}.{suffix}"

    def path(self, key):
        if not _KEY.match(key):
            raise ValueError("not a storage key")
        return self.root / key

    def temp_file(self):
        """An open, empty file in the storage's own tmp folder (same file system as its final place).

        A plain file object: tempfile's wrappers cost more than the small uploads they would hold.
        """
        return open(self.tmp_dir / f"{uuid.uuid4().hex}.part", "xb+")

    def prepare(self, handle):
        """What is slow about placing a temp file (from temp_file), done ahead: flush it to disk and
        close it (its name stays readable)."""
        if not handle.closed:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()

    def place(self, handle, key):
        """Move a finished temp file to `key` atomically and durably: its folder is synced last, so a
        row committed next cannot outlive the file's name in a power cut. An open file is renamed before
        its bytes are synced, which under concurrent uploads costs fewer journal commits than the other
        way round; a reader still never sees half a file."""
        if not handle.closed:
            handle.flush()
        os.replace(handle.name, self.path(key))
        if not handle.closed:
            os.fsync(handle.fileno())
            handle.close()
        _sync_folder(self.path(key).parent)

    @contextmanager
    def spooled(self, source):
        """A temp file holding a copy of the binary stream `source`: (open handle, size); removed on exit
        unless place() moved it."""
        handle = self.temp_file()
        try:
            shutil.copyfileobj(source, handle)
            handle.flush()
            yield handle, handle.tell()
        finally:
            handle.close()
            self.discard_temp(handle.name)

    def open(self, key):
        return open(self.path(key), "rb")

    def exists(self, key):
        return self.path(key).is_file()

    def delete(self, key):
        self.path(key).unlink(missing_ok=True)

    def discard_temp(self, temp_path):
        Path(temp_path).unlink(missing_ok=True)

    def placed_files(self):
        """(key, path) of every file placed in the storage, one folder at a time; anything else that lies
        in the folders (not named as a key) is not the storage's, and is left out."""
        for folder in _FOLDERS:
            for path in (self.root / folder).iterdir():
                key = f"{folder}/{path.name}"
                if _KEY.match(key):
                    yield key, path

    def temp_paths(self):
        return self.tmp_dir.glob("*.part")


def _sync_folder(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
