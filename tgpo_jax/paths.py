"""Run paths that may be local or remote URLs (gs://bucket/run, s3://...).

Local paths go through os / open() as before. URLs go through etils.epath (what Orbax itself uses;
fsspec + gcsfs for gs://), never through os.path.abspath or os.makedirs, which would turn
"gs://b/run" into a local directory "gs:/b/run". Object stores cannot append: `append_text`
rewrites the object.
"""

from __future__ import annotations

import os
import posixpath

REMOTE_SCHEMES = ("gs", "s3", "az", "hf")


def scheme(path: str) -> str | None:
    """'gs' for 'gs://b/x', None for a local path (and for file:// URLs, which are local)."""
    path = os.fspath(path)
    if "://" not in path:
        return None
    s = path.split("://", 1)[0].lower()
    return None if s == "file" else s


def is_remote(path: str) -> bool:
    s = scheme(path)
    if s is not None and s not in REMOTE_SCHEMES:
        raise ValueError(
            f"unsupported URL scheme {s!r} in {path!r}; accepted: a local path or "
            f"{', '.join(x + '://' for x in REMOTE_SCHEMES)}"
        )
    return s is not None


def _local(path: str) -> str:
    path = os.fspath(path)
    return path[len("file://") :] if path.startswith("file://") else path


def _epath(path: str):
    from etils import epath

    return epath.Path(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(_local(base), *parts)


def abspath(path: str) -> str:
    """Absolute local path; a URL unchanged."""
    return path if is_remote(path) else os.path.abspath(_local(path))


def makedirs(path: str) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(_local(path), exist_ok=True)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(_local(path))


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(_local(path))


def listdir(path: str) -> list[str]:
    if is_remote(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return sorted(os.listdir(_local(path)))


def read_text(path: str) -> str:
    if is_remote(path):
        return _epath(path).read_text()
    with open(_local(path)) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    if is_remote(path):
        _epath(path).write_bytes(data)
        return
    with open(_local(path), "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def replace_text(path: str, text: str) -> None:
    """Replaces the file whole (temp file, fsync, os.replace): a crash or a reader in another
    process sees the old content or the new, never a mix. An object write is atomic as it is."""
    if is_remote(path):
        write_text(path, text)
        return
    path = _local(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RemoteAppendFile:
    """A text file on an object store opened for appending: keeps the whole content in memory and
    rewrites the object on every flush (fine for metrics logs of a few MB)."""

    def __init__(self, path: str):
        self.path = path
        self._parts = [read_text(path)] if exists(path) else []
        self._dirty = False

    def write(self, text: str) -> int:
        self._parts.append(text)
        self._dirty = True
        return len(text)

    def flush(self) -> None:
        if self._dirty:
            write_text(self.path, "".join(self._parts))
            self._dirty = False

    def close(self) -> None:
        self.flush()


def open_append(path: str):
    """A text file for appending: open(path, 'a') locally, a RemoteAppendFile for a URL."""
    return RemoteAppendFile(path) if is_remote(path) else open(_local(path), "a")
