"""Checksums of the files a run keeps (store shards, bank adapters): recorded when written, verified when read.

A damaged file is an :class:`InputError` naming the file and whose data it holds, never a silent
change of results.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mta_ray.errors import InputError

CHUNK = 1 << 20


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise InputError(str(path), f"cannot read: {exc.strerror or exc}") from None
    return h.hexdigest()


def folder_checksums(folder: str | Path) -> dict[str, str]:
    """File name -> SHA-256 for every file of a folder (a PEFT adapter folder)."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def verify_folder(folder: str | Path, expected: dict[str, str], whose: str) -> None:
    """Every recorded file present with its recorded checksum, else an InputError naming file and owner."""
    for name, digest in sorted(expected.items()):
        path = Path(folder) / name
        if not path.is_file():
            raise InputError(str(path), f"missing ({whose}): the run folder is damaged; rerun the stage that "
                                        "writes it")
        if sha256_file(path) != digest:
            raise InputError(str(path), f"checksum mismatch ({whose}): the file is damaged; rerun the stage "
                                        "that writes it")
