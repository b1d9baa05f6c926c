"""Writing a file so that nothing is ever lost, and OS errors as one sentence.

`write_atomic(data, path, overwrite=False)`:

1. the bytes go to a temp file `.<name>.<random>.tmp` in the destination folder (same file system, so
   the last step is a rename), are flushed and fsynced; the temp file gets `0666 & ~umask` like a plain
   `open()` would;
2. then the complete file takes the final name in one atomic step:
   - `overwrite=False` (default): `os.link(tmp, path)`, which fails with EEXIST when the name is taken
     and never replaces anything. Of several processes racing for one new name exactly one wins; there
     is no window between a check and a rename (`os.replace` alone would silently clobber a file created
     meanwhile). Where hard links are not supported (FAT/exFAT, some network and FUSE file systems,
     Windows volumes without them) the name is claimed instead with `os.open(path, O_CREAT | O_EXCL)`,
     still exclusive, and the temp file is renamed over that empty placeholder: for that instant the
     name holds an empty file (a power cut then leaves an empty file, never a partial one);
   - `overwrite=True`: `os.replace(tmp, path)`, only after the temp file is complete, so the old file
     stays whole until the new one replaces it (disk full or Ctrl-C while writing keep the old file);
3. the folder is fsynced so the rename itself survives a crash (where the OS allows it).

The temp file is removed on any exception, KeyboardInterrupt included. Every temp file being written is
also listed in a module-level set so that a signal handler (the CLI's, for SIGTERM/SIGINT) can remove
one whose own clean-up was cut short: `remove_temp_files()`. Nothing here installs signal handlers.

Every OSError leaves as the same exception type (same errno) with a sentence naming the file and what
to do (`explain_os_error`): disk full, read-only file system, permission denied, a folder where the file
should go, a name too long, a file where a folder should be.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

_TEMP_FILES: set[str] = set()  # temp files being written right now (see remove_temp_files)
NAME_MAX = 255  # bytes per file name on nearly every file system (ext4, NTFS, APFS, XFS, btrfs)
# errnos / Windows error codes that mean "this file system cannot make hard links"
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
_NO_LINKS_WIN = {1, 50}  # ERROR_INVALID_FUNCTION, ERROR_NOT_SUPPORTED


def explain_os_error(e: OSError, path: str | os.PathLike, doing: str = "write") -> OSError:
    """The same OSError type and errno with one sentence: what failed, which file, what to do."""
    path = Path(path)
    name = path.name
    code = e.errno
    if code == errno.EEXIST:
        msg = f"{path} already exists; choose another name (meshes are never overwritten)."
    elif code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        msg = (
            f"Could not {doing} {path}: the disk is full (or the quota used up); free some space or choose "
            "another folder."
        )
    elif code == errno.EROFS:
        msg = f"Could not {doing} {path}: {path.parent} is on a read-only file system; choose another folder."
    elif code in (errno.EACCES, errno.EPERM):
        msg = f"Could not {doing} {path}: permission denied; choose a file and folder you are allowed to {doing}."
    elif code == errno.EISDIR:
        example = path / ("mesh" + (path.suffix or ".glb"))
        msg = f"{path} is a folder, not a file; give a file name inside it (like {example})."
    elif code == errno.ENAMETOOLONG:
        n = len(os.fsencode(name))
        msg = (
            f"The file name {name[:40]}... is {n} bytes long, more than the file system allows (usually "
            f"{NAME_MAX}); use a shorter name."
            if n > NAME_MAX
            else f"The path {str(path)[:60]}... is longer than the file system allows; use a shorter folder or name."
        )
    elif code == errno.ENOTDIR:
        msg = f"Could not {doing} {path}: part of its folder path is a file, not a folder; choose another folder."
    elif code == errno.ENOENT:
        msg = f"Could not {doing} {path}: it or its folder does not exist; check the path."
    else:
        msg = f"Could not {doing} {path}: {e.strerror or e}; check the folder, the disk and the file name."
    out = type(e)(msg)
    out.errno = code
    return out


def remove_temp_files() -> None:
    """Delete every temp file a `write_atomic` in this process is still writing (for signal handlers)."""
    for tmp in list(_TEMP_FILES):
        _discard(tmp)


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError:
        return  # keep it listed: a later remove_temp_files may succeed
    _TEMP_FILES.discard(tmp)


def _write_temp(data: bytes, folder: Path, name: str) -> str:
    """A complete, fsynced temp file beside the final name; its path."""
    stem = os.fsdecode(os.fsencode(name)[:100]).rstrip("\ufffd")  # keep temp names short whatever the final one
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(folder / f".{stem}.{secrets.token_hex(4)}.tmp")
        _TEMP_FILES.add(tmp)  # listed before it exists, so no moment has an unlisted temp file
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for a plain open()
            break
        except FileExistsError:
            _TEMP_FILES.discard(tmp)
        except BaseException:
            _TEMP_FILES.discard(tmp)
            raise
    else:
        raise FileExistsError(errno.EEXIST, "no free temp name", str(folder))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def _links_unsupported(e: OSError) -> bool:
    return e.errno in _NO_LINKS or getattr(e, "winerror", None) in _NO_LINKS_WIN


def _claim(tmp: str, path: Path) -> None:
    """Give the complete temp file the name `path` only if it is free (FileExistsError otherwise)."""
    if hasattr(os, "link"):
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            raise
        except OSError as e:
            if not _links_unsupported(e):
                raise
    # no hard links here: claim the name with an exclusive create, then rename onto our own placeholder
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; not possible on Windows or some file systems, where it is skipped."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's way of saying "that is a file"
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder)) from None


def write_atomic(data: bytes, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write bytes to `path` as described in the module docstring; returns the path.

    overwrite=False: FileExistsError if `path` exists (also when another process takes the name while
    this one writes). overwrite=True: an existing file is replaced only by the complete new one.
    Any OSError comes back as the same type with one sentence (`explain_os_error`).
    """
    path = Path(path)
    try:
        if len(os.fsencode(path.name)) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "file name too long", str(path))
        _make_folder(path.parent)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        if not overwrite and os.path.lexists(path):  # early answer only; the exclusive claim below decides
            raise FileExistsError(errno.EEXIST, "exists", str(path))
        tmp = _write_temp(data, path.parent, path.name)
        try:
            if overwrite:
                os.replace(tmp, path)
            else:
                _claim(tmp, path)
        finally:
            _discard(tmp)  # after a link, the second name; after a failure, the whole temp file
        _fsync_folder(path.parent)
    except OSError as e:
        raise explain_os_error(e, path) from None
    return path
