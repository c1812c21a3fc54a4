"""Durable file writes for the run directory: a file is whole or absent after a crash (temporary file, fsync,
rename, fsync of the folder); write failures become CheckpointWriteErrors naming the path and the OS error."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from carecl.errors import CareclError

_HASH_CHUNK = 1 << 20
# Mode of the files written here: what open() would give under the process's umask.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


class CheckpointWriteError(CareclError, OSError):
    """Writing to the run directory failed (disk full, permission denied, ...); names the path and OS error."""


def fsync_directory(path: Path) -> None:
    """Make a rename or new entry in `path` durable (no-op where directories cannot be fsynced)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


def write_error(path: Path, error: OSError) -> CheckpointWriteError:
    """`error` as a CareclError naming the path; still an OSError carrying the same errno."""
    message = f"cannot write {path}: {error.strerror or error}"
    return CheckpointWriteError(error.errno, message) if error.errno else CheckpointWriteError(message)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write via a temporary file, fsync and rename (then fsync the folder): never a half-written file."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(temporary, FILE_MODE)  # mkstemp makes 0600; the run's files get the usual umask-based mode
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        temporary = None
        fsync_directory(path.parent)
    except OSError as error:
        raise write_error(path, error) from None
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def json_bytes(document: Any) -> bytes:
    return json.dumps(json_safe(document), indent=1, allow_nan=False).encode()


def json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        raise write_error(path, OSError(_errno_in(str(error)), str(error))) from None
    os.chmod(path, FILE_MODE)
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


def _errno_in(message: str) -> int:
    """The errno a wrapped I/O error names in its message (ENOSPC, EACCES, ...), else EIO."""
    for code, words in ((errno.ENOSPC, "No space left"), (errno.EACCES, "Permission denied"),
                        (errno.EDQUOT, "quota"), (errno.EROFS, "Read-only")):
        if words in message:
            return code
    return errno.EIO


def write_json(path: Path, document: Any) -> None:
    with open(path, "wb") as stream:
        stream.write(json_bytes(document))
        stream.flush()
        os.fsync(stream.fileno())
