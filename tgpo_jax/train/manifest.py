"""Per-file checksums of a finished checkpoint step, verified before it is restored.

Orbax and tensorstore do not checksum array chunks on a local disk: a flipped byte in an array file
restores silently as a wrong number. `write(step_dir)` records the size and CRC-32 of every file of
the step in `<step_dir>/tgpo_checksums.json`; `verify(step_dir)` re-reads them and names the first
file that is missing, has another size or another CRC.

CRC-32 (zlib) rather than SHA-256: the threat is media/bit-rot/truncation, not an adversary, and
CRC-32 detects every single-bit error and every burst up to 32 bits. zlib.crc32 measured 2.3 GB/s
against 1.6 GB/s for hashlib.sha256 (with SHA-NI; ~0.4 GB/s without) on one core here, and it
releases the GIL. An 18 GB checkpoint (1.5B params + Adam, fp32) costs ~8 s once per
`checkpoint.every` iterations, read back from the page cache.

Local directories only: on an object store (gs://) the manifest is neither written nor checked,
since hashing would download the whole checkpoint again, and the store keeps per-object checksums
itself (GCS: CRC32C).
"""

from __future__ import annotations

import json
import os
import zlib

MANIFEST = "tgpo_checksums.json"
_CHUNK = 8 << 20


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(dirpath, n), step_dir) for n in names]
    return sorted(f for f in out if f != MANIFEST and not f.startswith(MANIFEST + "."))


def write(step_dir: str) -> dict:
    """Checksums every file of a finished step; written atomically (temp + rename). Returns it."""
    files = {
        f: {"size": os.path.getsize(os.path.join(step_dir, f)), "crc32": _crc32(os.path.join(step_dir, f))}
        for f in _files(step_dir)
    }
    manifest = {"algorithm": "crc32", "files": files}
    tmp = os.path.join(step_dir, f"{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))
    return manifest


def has_manifest(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> str | None:
    """None if every recorded file matches; else a description of the first problem (which file,
    what). The caller checks `has_manifest` first: a step without one cannot be verified."""
    try:
        with open(os.path.join(step_dir, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__}: {e})"
    for name, want in sorted(files.items()):
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            return f"file {name} is missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"file {name} has {size} bytes, {want['size']} when saved"
        crc = _crc32(path)
        if crc != want["crc32"]:
            return f"file {name} fails its checksum (crc32 {crc:08x}, {want['crc32']:08x} when saved)"
    return None
