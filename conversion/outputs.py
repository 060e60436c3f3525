"""Write the outputs of one converter run all together, or not at all.

`write_outputs` is the one place the converters write files. Each output is first written to a temporary beside
where it will live, and renamed into place only once every output of the run is complete; a failure (an exception,
Ctrl-C, or SIGTERM turned into an exception by the CLI) removes the temporaries and puts back what the renames had
replaced. Only SIGKILL or a power cut can stop a run before that cleanup, so a temporary's name says who owns it:

    .{output name}.tmp-{pid}-{host}-{random}     the output being written
    .{output name}.old-{pid}-{host}-{random}     what the output replaced, kept until every rename succeeded

and the next run for the same output removes those whose owner is gone (`remove_stale_temporaries`), in every
folder above the output, since a run puts its temporaries in whichever of them existed then.

Folders that an output needs but that do not exist yet are created only once everything is written: until then the
temporaries live in the nearest folder that exists (same filesystem, so the final rename stays atomic).

Needs only the standard library, so the torch-free msgpack writer uses it too.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# A temporary untouched for this long is stale whoever owns it: a live run writes its temporaries within minutes, and
# this also catches the cases the owner check cannot tell apart (a reused PID, a run on another machine).
STALE_AFTER_SECONDS = 24 * 60 * 60

# Part of every temporary's name, so that a run on another machine sharing the folder is never judged by our PIDs.
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:63] or "localhost"

# Temporaries this process created and has not finished with; they carry our PID but are not stale.
_OWN_TEMPORARIES: set[Path] = set()


class OutputError(OSError):
    """An output cannot be written: it exists (and --overwrite was not given), is a symlink, or writing it failed."""


@dataclass(frozen=True)
class Output:
    """One output of a run.

    Attributes:
        path: where the output goes.
        write: writes the output's content to the path it is given: an empty file, or an empty folder when `is_dir`.
            It raises OSError for an I/O failure (a full disk); `write_outputs` names the output in the message.
        is_dir: whether the output is a folder.
    """

    path: Path
    write: Callable[[Path], None]
    is_dir: bool = False


def _temporary_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>.*)-[0-9a-f]{{8}}")


def _new_name(directory: Path, name: str, kind: str) -> Path:
    return directory / f".{name}.{kind}-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}"


def _nearest_existing_folder(path: Path) -> Path:
    """The nearest ancestor of `path` that exists; it must be a folder, since `path` is to be created inside it."""
    for ancestor in path.parents:
        if ancestor.is_dir():
            return ancestor
        if os.path.lexists(ancestor):
            raise OutputError(f"cannot create {path}: {ancestor} exists and is not a directory")
    raise OutputError(f"cannot create {path}: none of its parent folders exists")  # unreachable for real paths


def check_output(path: str | os.PathLike[str], *, is_dir: bool = False, overwrite: bool = False) -> None:
    """Refuse an output that cannot be written, or that would be clobbered without `overwrite`.

    The converters call this before any work, so a bad output path fails fast; `write_outputs` checks again just
    before renaming, in case something appeared meanwhile. A symlink is never written through: without `overwrite`
    it is refused, with it the link itself is replaced and its target is left alone.
    """
    path = Path(path)
    if path.is_symlink():
        if not overwrite:
            raise OutputError(
                f"output {path} is a symbolic link (to {os.readlink(path)}); refusing to write through it; "
                "pass --overwrite to replace the link itself (its target is left alone)"
            )
    elif path.exists():
        if is_dir and not path.is_dir():
            raise OutputError(f"output {path} exists and is not a directory")
        if not is_dir and path.is_dir():
            raise OutputError(f"output {path} is a directory")
        if is_dir and any(path.iterdir()) and not overwrite:
            raise OutputError(f"output directory {path} is not empty; pass --overwrite to replace it")
        if not is_dir and not overwrite:
            raise OutputError(f"output file {path} exists; pass --overwrite to replace it")
    _nearest_existing_folder(path)


def _check_distinct(paths: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in paths:
        key = os.path.normpath(os.path.abspath(path))
        if key in seen:
            raise OutputError(f"two outputs of this run are the same path: {seen[key]} and {path}")
        seen[key] = path


def _pid_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is just someone else's
    return True


def _is_stale(entry: Path, pid: int, host: str, now: float) -> bool:
    if entry in _OWN_TEMPORARIES:
        return False
    status = entry.lstat()
    # ctime too: a rename keeps the mtime, so a live run's `.old` (just moved aside) would look as old as the model.
    if now - max(status.st_mtime, status.st_ctime) > STALE_AFTER_SECONDS:
        return True
    if host != _HOST or pid <= 0:
        return False  # a process on another machine: its PID says nothing here
    if pid == os.getpid():
        return True  # an earlier process with our PID (not one of ours, checked above): it has ended
    return not _pid_is_running(pid)


def _remove(path: Path) -> None:
    """Remove a file or folder tree if it is there; a symlink is removed, never followed."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(directory: str | os.PathLike[str], name: str) -> list[Path]:
    """Remove the temporaries of an output called `name` in `directory` whose run has ended without cleaning up.

    A temporary is stale when its owner process (the PID in its name) no longer runs on this machine, or when it
    has not been touched for `STALE_AFTER_SECONDS`. A live run's temporaries, here or on another machine, are left
    alone, and so is anything not named like ours. A stale `.old` copy whose output is missing is put back instead
    of removed. Returns what was removed.
    """
    directory = Path(directory)
    pattern = _temporary_pattern(name)
    now = time.time()
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink():
            continue  # not ours: we never create symlinks
        try:
            stale = _is_stale(entry, int(match["pid"]), match["host"], now)
        except OSError:
            continue  # vanished meanwhile (its owner finished)
        if not stale:
            continue
        target = directory / name
        if match["kind"] == "old" and not os.path.lexists(target):
            # The run died after moving the previous output aside and before putting the new one in its place:
            # the previous output is all there is, so it goes back rather than away.
            logger.info("restoring %s from %s, left behind by process %s", target, entry, match["pid"])
            try:
                os.rename(entry, target)
            except OSError as exc:
                logger.warning("cannot restore %s from %s: %s", target, entry, exc)
            continue
        logger.info("removing %s, left behind by process %s on %s", entry, match["pid"], match["host"])
        _remove(entry)
        removed.append(entry)
    return removed


def _create_temporary(directory: Path, name: str, is_dir: bool) -> Path:
    while True:
        path = _new_name(directory, name, "tmp")
        try:
            if is_dir:
                os.mkdir(path, 0o777)  # the umask applies, as for any new folder
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue  # a clash of the random part; draw again
        _OWN_TEMPORARIES.add(path)
        return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the data files were synced already
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    # Without this, a crash soon after the rename can leave a complete-looking name over empty or partial data.
    if path.is_dir():
        for folder, _, files in os.walk(path):
            for file in files:
                _fsync(Path(folder) / file)
            _fsync(Path(folder))
    else:
        _fsync(path)


def _reason(exc: OSError) -> str:
    # The OSError's own text repeats the (temporary) file name; the output's name is what the user needs.
    return exc.strerror or str(exc) or type(exc).__name__


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones created, outermost first."""
    missing = []
    for ancestor in (folder, *folder.parents):
        if ancestor.is_dir():
            break
        missing.append(ancestor)
    created = []
    for ancestor in reversed(missing):
        try:
            os.mkdir(ancestor)
        except FileExistsError:
            if not ancestor.is_dir():
                raise
            continue  # another process made it meanwhile; it is not ours to remove on failure
        created.append(ancestor)
    return created


@dataclass
class _Staged:
    output: Output
    temporary: Path
    replaced: Path | None = None  # where the previous output was moved, once it was
    placed: bool = False


def _place(item: _Staged, overwrite: bool, created: list[Path]) -> None:
    path = item.output.path
    check_output(path, is_dir=item.output.is_dir, overwrite=overwrite)  # something may have appeared meanwhile
    created += _make_parents(path.parent)
    if os.path.lexists(path):
        # Moved aside rather than replaced, so that a later failure can put it back.
        replaced = _new_name(path.parent, path.name, "old")
        _OWN_TEMPORARIES.add(replaced)
        os.rename(path, replaced)
        item.replaced = replaced
    os.rename(item.temporary, path)
    item.placed = True


def _commit(staged: Sequence[_Staged], overwrite: bool) -> None:
    """Rename every temporary into place; if any rename fails, undo the ones done and put back what they replaced."""
    created: list[Path] = []
    try:
        for item in staged:
            try:
                _place(item, overwrite, created)
            except OutputError:
                raise
            except OSError as exc:
                raise OutputError(f"cannot move {item.output.path} into place: {_reason(exc)}") from exc
    except BaseException:
        for item in reversed(staged):
            if item.placed:
                _remove(item.output.path)
            if item.replaced is not None:
                try:
                    os.rename(item.replaced, item.output.path)
                except OSError:
                    pass  # the next run puts it back (see remove_stale_temporaries)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass  # something else was put there meanwhile; not ours to remove
        raise
    for item in staged:
        if item.replaced is not None:
            _remove(item.replaced)
    # Make the renames themselves durable.
    for folder in {item.output.path.parent for item in staged} | {folder.parent for folder in created[:1]}:
        _fsync(folder)


def write_outputs(outputs: Sequence[Output], *, overwrite: bool = False) -> None:
    """Write every output of a run, so that they all appear together or none does.

    Each output is written to a fresh temporary (in the nearest existing folder of its path), synced to disk, and
    only when all are written are they renamed into place, creating missing parent folders at that moment. On any
    failure, including KeyboardInterrupt, the temporaries are removed, renames already done are undone, and the
    folders created are removed again. Stale temporaries of earlier runs for the same outputs are removed first.

    Raises:
        OutputError: an output is refused by `check_output`, or writing or renaming it failed (the message names
            the output and the reason).
    """
    _check_distinct([output.path for output in outputs])
    for output in outputs:
        check_output(output.path, is_dir=output.is_dir, overwrite=overwrite)

    staged: list[_Staged] = []
    try:
        for output in outputs:
            # An earlier run put its temporaries in the nearest folder that existed then, which may since have
            # gained subfolders: look in every folder above the output.
            for ancestor in output.path.absolute().parents:
                remove_stale_temporaries(ancestor, output.path.name)
            folder = _nearest_existing_folder(output.path)
            try:
                staged.append(_Staged(output, _create_temporary(folder, output.path.name, output.is_dir)))
                output.write(staged[-1].temporary)
                _fsync_tree(staged[-1].temporary)
            except OSError as exc:
                raise OutputError(f"cannot write {output.path}: {_reason(exc)}") from exc
        _commit(staged, overwrite)
    finally:
        for item in staged:
            if not item.placed:
                _remove(item.temporary)
            _OWN_TEMPORARIES.discard(item.temporary)
            if item.replaced is not None:
                _OWN_TEMPORARIES.discard(item.replaced)
