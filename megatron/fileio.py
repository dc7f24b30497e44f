"""Generic file I/O that survives crashes and flaky filesystems: atomic writes (temporary name, fsync, rename),
fsync of files, trees and directories, and reads retried on transient errors (Lustre under load).

Used by checkpoints, datasets, tokenizers and exports alike; it imports nothing else from megatron but the
error types, so any package can build on it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from typing import Callable, Iterator, Optional

from megatron.errors import CheckpointError

TMP_PREFIX = ".tmp-"  # a write in progress (or one that died): never read as the final file
TRANSIENT_ERRNOS = (errno.EIO, errno.ESTALE, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT)  # Lustre under load
RETRY_BACKOFF_S = 1.0  # the first wait; it doubles with each retry


def os_error_text(error: OSError) -> str:
    """'ENOSPC (No space left on device)': the symbolic name a user can search for, and the words."""
    name = errno.errorcode.get(error.errno, "") if error.errno is not None else ""
    words = error.strerror or str(error)
    return f"{name} ({words})" if name else words


def with_retries(fn: Callable, path: str, retries: int = 3, backoff_s: Optional[float] = None,
                 log: Callable[[str], None] = print, error_type: type = None, failed: Optional[OSError] = None):
    """fn(), retried `retries` times with doubling waits when it fails with a transient OS error (EIO, ESTALE,
    EAGAIN, EINTR, ETIMEDOUT), each retry logged naming `path`; then `error_type` (default CheckpointError)
    naming the file. Other errors are raised at once. `failed`: the error of a first attempt the caller
    already made itself (a fast path), counted and handled as this function's own first attempt."""
    backoff_s = RETRY_BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(retries + 1):
        try:
            if attempt == 0 and failed is not None:
                raise failed
            return fn()
        except OSError as error:
            if error.errno not in TRANSIENT_ERRNOS:
                raise
            if attempt == retries:
                raise (error_type or CheckpointError)(
                    f"{path}: reading failed {retries + 1} times with {os_error_text(error)}; check the "
                    "filesystem's health, then relaunch") from error
            wait = backoff_s * 2 ** attempt
            log(f"WARNING: reading {path} failed with {os_error_text(error)} (transient?); "
                f"retry {attempt + 1}/{retries} in {wait:.1f} s")
            time.sleep(wait)


def fsync_dir(path: str) -> None:
    """Persist a directory's entries (a rename or a new file in it). A filesystem that cannot fsync a
    directory (EINVAL / ENOTSUP, e.g. some FUSE mounts) is tolerated: there is nothing more to do there."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file under `path`, then every directory bottom-up (a directory's entries after its files)."""
    if not os.path.isdir(path):
        fsync_file(path)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                fsync_file(full)
        fsync_dir(root)


def replace_atomically(tmp: str, final: str) -> None:
    """fsync `tmp` (a file or a whole tree), rename it to `final`, fsync the parent directory."""
    fsync_tree(tmp)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def _tmp_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f"{TMP_PREFIX}{name}.{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path` to write (a file, or a directory to fill); on success it is
    fsynced and renamed to `path`, on error it is removed and `path` is untouched.

        with atomic_output(out) as tmp:
            save_file(tensors, tmp)
    """
    tmp = _tmp_name(path)
    try:
        yield tmp
        replace_atomically(tmp, path)
    except BaseException:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise


def write_bytes_atomically(path: str, data: bytes) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text_atomically(path: str, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def torch_save_atomically(obj, path: str) -> None:
    import torch

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
