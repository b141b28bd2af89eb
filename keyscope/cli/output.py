"""Output paths of the CLI commands: checked before any work (:func:`check_outputs`), written atomically
(:func:`write_json`; every writer goes through :mod:`keyscope._infra.atomic`), and put back as they were when a
command fails (:func:`nothing_left_on_failure`: what it created removed, what it replaced restored)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from keyscope._infra.atomic import write_text
from keyscope._infra.errors import KeyscopeError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_outputs(*, folders: dict[str, str | None] | None = None, files: dict[str, str | None] | None = None) -> None:
    """Refuse, before any work, output paths that could not be written: ``{option: path}`` for folders
    (``--out``) and files (``--json``, ``--export``). A folder must be a folder or creatable; a file must not be
    a folder and its folder must be creatable; the nearest existing parent must be a folder in which a file can
    be created (tried with a temporary file, removed at once)."""
    for kind, paths in (("folder", folders or {}), ("file", files or {})):
        for option, value in paths.items():
            if not value:
                continue
            path = Path(value)
            if kind == "folder" and path.exists() and not path.is_dir():
                raise KeyscopeError(f"{option} {value} is a file; give a folder")
            if kind == "file" and path.is_dir():
                raise KeyscopeError(f"{option} {value} is a folder; give a file path")
            base = _nearest_existing(path if kind == "folder" else path.parent)
            if not base.is_dir():
                raise KeyscopeError(f"{option} {value}: {base} is not a folder")
            if not os.access(base, os.W_OK | os.X_OK):
                raise KeyscopeError(f"{option} {value}: {base} is not writable")
            try:  # os.access says yes to root everywhere, and knows nothing of read-only or virtual file systems
                fd, probe = tempfile.mkstemp(prefix=".keyscope-probe-", dir=base)
                os.close(fd)
                os.unlink(probe)
            except OSError as exc:
                raise KeyscopeError(f"{option} {value}: cannot write in {base} ({exc.strerror or exc})") from exc


def write_json(path: str | None, payload: dict | list) -> None:
    """Write ``payload`` to ``path`` atomically (nothing if ``path`` is empty) and say so: into a temporary file
    beside it, moved into place at the end and removed if anything fails (:func:`keyscope._infra.atomic.write_text`)."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


def _entries(folder: Path) -> set[Path]:
    """The names directly in ``folder`` (not below: ``--out .`` must not walk a whole tree)."""
    return set(folder.iterdir()) if folder.is_dir() else set()


def _first_missing(path: Path) -> Path | None:
    """The highest folder of ``path`` (itself included) that does not exist yet: what creating it creates."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


#: Name prefix of the hidden folders that hold the backups of :class:`_Backup`.
BACKUP_PREFIX = ".keyscope-backup-"


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when ``path`` is replaced or rewritten: device, inode, size, modification time (``None``
    when it is gone); of a symbolic link itself, not of what it points to."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class _Backup:
    """The content of files that existed before a command ran, kept so that a failed run can put it back.

    :meth:`keep` hard-links a file (a regular file or a symbolic link, not followed) into a hidden temporary
    folder (``.keyscope-backup-*``) made in the file's own folder, so on the same file system; where linking
    fails (a file system without hard links, a file of another user under ``fs.protected_hardlinks``) it copies
    the file instead, and a file it can read neither way is not kept. keyscope's writers replace a file by
    renaming a new one over it (:mod:`keyscope._infra.atomic`): the old inode, and with it the old content, lives on in
    the link. :meth:`restore` moves each kept file whose path now names something else (another inode, size or
    time, or nothing) back into place; :meth:`discard` removes the hidden folders, whatever happened.
    """

    def __init__(self) -> None:
        self.folders: dict[Path, Path] = {}  # folder of kept files → its hidden backup folder
        self.kept: dict[Path, tuple[Path, tuple[int, int, int, int]]] = {}  # path → (its backup, signature)

    def keep(self, path: Path) -> None:
        key = path.parent.resolve() / path.name  # one backup per file, however its paths are spelt
        signature = _signature(path)
        if key in self.kept or signature is None:
            return
        folder = self.folders.get(key.parent)
        if folder is None:
            folder = self.folders[key.parent] = Path(tempfile.mkdtemp(prefix=BACKUP_PREFIX, dir=key.parent))
        backup = folder / path.name
        try:
            os.link(path, backup, follow_symlinks=False)
        except OSError:
            try:
                shutil.copy2(path, backup, follow_symlinks=False)
            except OSError:
                backup.unlink(missing_ok=True)
                return
        self.kept[key] = (backup, signature)

    def restore(self) -> None:
        for path, (backup, signature) in self.kept.items():
            if _signature(path) == signature:
                continue
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                os.replace(backup, path)
            except OSError:  # put back what can be; the command's own error is the one to report
                continue

    def discard(self) -> None:
        for folder in self.folders.values():
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def nothing_left_on_failure(folders: Mapping[str, str | None], files: Mapping[str, str | None]) -> Iterator[None]:
    """Inside the block a command writes its outputs; if the block raises (an error, Ctrl-C), the outputs are
    put back as they were before it:

    * what it created is removed: the folders of ``folders`` (``{option: folder}``) that did not exist (with
      any parent it had to create), else the entries it added directly in them, and the files of ``files``
      (``{option: path}``) that did not exist (with their new parents);
    * what existed is kept with its content: every file directly in an existing folder of ``folders`` and every
      existing file of ``files`` is backed up on entry (a hard link, else a copy: :class:`_Backup`), and one
      that the block replaced or removed is moved back, byte for byte as it was. Files further down an existing
      folder, and files rewritten in place rather than replaced (keyscope's writers replace:
      :mod:`keyscope._infra.atomic`), are not covered.

    The backups live in hidden ``.keyscope-backup-*`` folders beside the files, never taken for an output, and
    are removed on the way out whatever happened (success, failure, Ctrl-C)."""
    created: list[Path] = []  # paths that did not exist: remove them whole
    added: dict[Path, set[Path]] = {}  # existing folders: remove what is new in them
    existing: list[Path] = []  # files that exist: put back if replaced
    for value in folders.values():
        if value:
            root = Path(value)
            missing = _first_missing(root)
            if missing is None:
                added[root] = _entries(root)
                existing += [e for e in added[root] if e.is_symlink() or e.is_file()]
            else:
                created.append(missing)
    for value in files.values():
        if value and (Path(value).exists() or Path(value).is_symlink()):
            existing.append(Path(value))
        elif value:
            created.append(_first_missing(Path(value).parent) or Path(value))
    backup = _Backup()
    try:
        for path in existing:
            backup.keep(path)
        yield
    except BaseException:
        backup.restore()
        ours = set(backup.folders.values())
        for root, entries in added.items():
            for entry in _entries(root) - entries:
                if entry.parent.resolve() / entry.name not in ours:
                    _remove(entry)
        for path in created:
            _remove(path)
        raise
    finally:
        backup.discard()
