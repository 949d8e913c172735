"""Turn a model spec (exported folder, HF folder, Hub id) into an exported folder, caching exports.

The cache is shared by processes: an export is written into a temp folder `.NAME.xxxxxxxx` and
published by one rename, so a complete export (its manifest.json) is read without a lock; exporting
NAME takes the lock file `.NAME.lock` (fcntl.flock, released by the kernel when its holder dies), so
concurrent first runs make one export and the others wait for it. Temp folders of killed exports are
removed by the next holder of the lock, and by `gpt2-onnx cache clear`. An entry's name never starts with a
dot (a checkpoint folder `.x` makes `x-<fingerprint>`), so that it is never taken for a temp folder; an entry
without manifest.json (damaged) is refused with the command that removes it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gpt2_onnx import config as C
from gpt2_onnx.config import cache_root
from gpt2_onnx.export import EXPORTER_VERSION

Progress = Callable[[str], None]
TEMP = re.compile(r"\.(.+)\.[a-z0-9_]{8}")  # an export's temp folder: `.NAME.` + tempfile.mkdtemp's 8 characters
LOCK = re.compile(r"\.(.+)\.lock")  # an export's lock file


def _files(folder: Path) -> list[str]:
    """name:size:mtime of every file in a folder: a changed checkpoint or adapter gets a fresh export."""
    parts = [str(folder.resolve())]
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return parts


def _fingerprint(spec: str, dtype: str, quantize: str | None, adapter: str | None = None) -> str:
    path = Path(spec).expanduser()
    parts = [EXPORTER_VERSION, dtype, str(quantize)]
    parts += _files(path) if path.is_dir() else [spec]
    if adapter is not None:
        parts += ["adapter", *_files(Path(adapter).expanduser())]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _unwritable(root: Path, e: OSError | None = None) -> ValueError:
    why = f" ({e.strerror})" if e is not None and e.strerror else ""
    return ValueError(f"the export cache {root} is not a writable folder{why}; set GPT2_ONNX_CACHE to a writable "
                      "folder (the exports of checkpoints are kept there)")


@contextmanager
def export_lock(root: Path, name: str, *, wait: bool = True) -> Iterator[bool]:
    """Hold the lock of the export `name` in the cache `root`; with wait=False, yield False at once when
    another process holds it. An unwritable cache is a ValueError that says what to do.

    The lock file is removed as the holder's last act, so that none stays behind: a process that was
    waiting on it then finds it gone and locks a new one (see _lock)."""
    path = root / f".{name}.lock"
    fd = _lock(root, path, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    try:
        yield fd is not None
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)
            os.close(fd)


def _lock(root: Path, path: Path, flags: int) -> int | None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(root))
        while True:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:  # another process holds it
                os.close(fd)
                return None
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # cache clear removed this lock file while we waited on it: lock the new one
    except OSError as e:
        raise _unwritable(root, e) from e


def temp_folders(root: Path, name: str) -> list[Path]:
    """The temp folders `.NAME.xxxxxxxx` of exports of `name` (tempfile.mkdtemp's suffix has no dot)."""
    prefix = f".{name}."
    return [p for p in root.iterdir() if p.name.startswith(prefix) and "." not in p.name[len(prefix):] and p.is_dir()]


def clear_orphans(root: Path, name: str | None = None) -> int:
    """Remove the temp folders (and lock files) of exports that no process is making; returns the folders
    removed. An export under way holds its lock and keeps its temp folder."""
    if not root.is_dir():
        return 0
    names = {m.group(1) for p in root.iterdir() for m in [TEMP.fullmatch(p.name) or LOCK.fullmatch(p.name)] if m}
    removed = 0
    for n in sorted(names if name is None else names & {name}):
        with export_lock(root, n, wait=False) as mine:
            if mine:
                for p in temp_folders(root, n):
                    shutil.rmtree(p, ignore_errors=True)
                    removed += 1
    return removed


def resolve_model(spec: str, *, dtype: str = "float32", quantize: str | None = None, adapter: str | None = None,
                  progress: Progress | None = None) -> Path:
    """An exported folder as is; a checkpoint (HF folder or Hub id), with an optional PEFT adapter folder
    (LoRA, IA3) merged in, exported once into the cache."""
    path = Path(spec).expanduser()
    if adapter is not None and not Path(adapter).expanduser().is_dir():
        raise ValueError(f"adapter {adapter}: no such folder; pass the folder PeftModel.save_pretrained or the "
                         "adapters library's save_adapter wrote")
    if (path / C.MANIFEST_NAME).is_file():
        if adapter is not None:
            raise ValueError(f"{spec} is already exported; an adapter is merged at export: pass the base "
                             "checkpoint with the adapter instead")
        return path
    name = entry_name(spec)
    if adapter is not None:
        name += "+" + (Path(adapter).expanduser().resolve().name.lstrip(".") or "adapter")
    root = cache_root()
    out = root / f"{name}-{_fingerprint(spec, dtype, quantize, adapter)}"
    if (out / C.MANIFEST_NAME).is_file():
        return out  # published whole by one rename: reading it needs no lock (a read-only cache works)
    with export_lock(root, out.name):
        if (out / C.MANIFEST_NAME).is_file():
            return out  # another process exported it while we waited
        if _has_files(out):  # never half-published (one rename): a damaged entry, which an export must not mask
            raise ValueError(f"the cached export {out} has no {C.MANIFEST_NAME}: it is incomplete or damaged; remove "
                             f"it with `gpt2-onnx cache clear {out.name}` and run again (it is then exported anew)")
        for orphan in temp_folders(root, out.name):  # left by a killed export: nobody else holds the lock
            shutil.rmtree(orphan, ignore_errors=True)
        # the first run of a checkpoint takes seconds: say why, once, before the exporter is imported
        what = spec if adapter is None else f"{spec} with the adapter {adapter}"
        if progress is not None:
            progress(f"exporting {what} once into the cache ({root})")
        from gpt2_onnx.export.exporter import WriteError, export_model  # onnx and the rest, only to export

        try:
            return export_model(spec, out, dtype=dtype, quantize=quantize, adapter=adapter, progress=progress)
        except WriteError as e:  # ENOSPC, EIO, EDQUOT: nothing was published, the temp folder is gone
            raise ValueError(f"cannot write the export of {spec} into the cache {root} ({e.strerror}); free space "
                             "there, or set GPT2_ONNX_CACHE to a folder with room") from e


def entry_name(spec: str) -> str:
    """The name part of a spec's cache entry: the checkpoint folder's (or Hub repo's) name without leading dots
    (`.ckpt` -> `ckpt`, `..` -> `model`): a dot-name is a temp folder's, which `cache list` and `clear` skip."""
    return Path(spec).name.lstrip(".") or "model"


def _has_files(folder: Path) -> bool:
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError as e:
        raise C.read_error(folder, e) from e
