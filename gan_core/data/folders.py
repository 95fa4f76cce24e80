"""Walking image folders: recursive, sorted, hidden names skipped, symlinks followed without ever looping.

`scan_image_folder` is what the shard writers (`write_shards`, `write_paired_shards`) and the inference job
use to list their inputs; entries that cannot be followed are reported, not raised.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from gan_core.data.images import IMAGE_EXTENSIONS


@dataclass
class FolderScan:
    """What scan_image_folder found.

    Attributes:
        files: image files, sorted by path relative to the folder (POSIX separators).
        unreadable: (path relative to the folder, reason) for each entry that could not be read:
            broken symlinks, symlinks that resolve to themselves, folders that cannot be listed.
        not_followed: (path relative to the folder, reason) for each symlinked folder that was not
            walked because its folder was walked anyway: loops back to a containing folder, and
            second links to one folder. Nothing under them is missed.
    """

    files: list[Path] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    not_followed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def problems(self) -> list[tuple[str, str]]:
        """unreadable and not_followed together, in that order."""
        return self.unreadable + self.not_followed



def find_image_files(folder: str | Path) -> list[Path]:
    """Image files under folder (recursive), sorted by relative path; see scan_image_folder.

    Entries that cannot be followed (broken symlinks, symlink loops, folders that
    cannot be listed) are skipped with a UserWarning each; use scan_image_folder
    to get them as a list.

    Args:
        folder: the folder to scan.

    Returns:
        Paths (folder / relative path) whose suffix, in any case, is in IMAGE_EXTENSIONS.

    Raises:
        FileNotFoundError: folder does not exist.
        NotADirectoryError: folder is not a folder.
    """
    scan = scan_image_folder(folder)
    for name, reason in scan.problems:
        warnings.warn(f"{folder}: skipped {name}: {reason}", UserWarning, stacklevel=2)
    return scan.files


def scan_image_folder(folder: str | Path) -> FolderScan:
    """Find the image files under folder, recursively, without ever looping or crashing on odd entries.

    - Names starting with "." (files and folders, at any depth) are skipped, silently.
    - Symlinks are followed, to files and to folders. Each folder is walked once: the
      real folders first, then the symlinked ones; a symlink back to a folder that
      contains it (a loop) or to a folder already walked is reported and not followed.
    - A broken symlink, a symlink the system refuses to resolve (ELOOP: a link to
      itself, two links to each other) and a subfolder that cannot be listed are
      reported.
    - Other files, and entries that are neither file nor folder (sockets, FIFOs),
      are ignored.

    Args:
        folder: the folder to scan.

    Returns:
        A FolderScan: the image files (suffix in IMAGE_EXTENSIONS, any case) as
        folder / relative path, sorted by relative path, and the problems.

    Raises:
        FileNotFoundError: folder does not exist.
        NotADirectoryError: folder is not a folder.
    """
    folder = Path(folder)
    root = os.stat(folder)
    if not stat.S_ISDIR(root.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
    scan = FolderScan()
    found: list[tuple[str, Path]] = []
    root_identity = (root.st_dev, root.st_ino)
    walked = {root_identity: "."}  # folder identity (device, inode) -> the name it was walked under
    # Items are (path, name relative to folder, identities of the folders above it). Real folders go on
    # `folders`, symlinked ones wait on `links` until no real folder is left, so that a real folder is
    # walked under its own name rather than under a link's.
    folders = [(folder, "", frozenset([root_identity]))]
    links: list[tuple[Path, str, frozenset, tuple[int, int]]] = []
    while folders or links:
        if not folders:
            path, name, ancestors, identity = links.pop(0)
            if identity in ancestors:
                scan.not_followed.append((name, f"symlink loop: leads back to {walked[identity]}, not followed"))
            elif identity in walked:
                scan.not_followed.append((name, f"same folder as {walked[identity]}, already scanned, not followed"))
            else:
                walked[identity] = name
                folders.append((path, name, ancestors | {identity}))
            continue
        directory, relative, ancestors = folders.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted((entry for entry in listing if not entry.name.startswith(".")),
                                 key=lambda entry: entry.name)
        except OSError as error:
            scan.unreadable.append((relative or ".", f"cannot list folder: {error.strerror or error}"))
            continue
        subfolders = []
        for entry in entries:
            name = f"{relative}/{entry.name}" if relative else entry.name
            path = directory / entry.name
            try:
                info = entry.stat()  # follows symlinks
            except OSError as error:
                scan.unreadable.append((name, _unfollowable(path, error)))
                continue
            if stat.S_ISDIR(info.st_mode):
                identity = (info.st_dev, info.st_ino)
                if entry.is_symlink():
                    links.append((path, name, ancestors, identity))
                elif identity in walked:  # a real folder seen twice: a bind mount
                    reason = f"same folder as {walked[identity]}, already scanned, not followed"
                    scan.not_followed.append((name, reason))
                else:
                    walked[identity] = name
                    subfolders.append((path, name, ancestors | {identity}))
            elif stat.S_ISREG(info.st_mode) and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((name, path))
        folders.extend(reversed(subfolders))  # popped in name order
    scan.files = [path for _, path in sorted(found, key=lambda item: item[0])]
    return scan


def _unfollowable(path: Path, error: OSError) -> str:
    """Why os.stat failed on a folder entry, for the report."""
    if not path.is_symlink():
        return f"cannot read: {error.strerror or error}"
    if error.errno == errno.ELOOP:
        return "symlink loop: following the link leads back to it"
    target = os.readlink(path)
    if error.errno == errno.ENOENT:
        return f"broken symlink: {target} does not exist"
    return f"cannot follow symlink to {target}: {error.strerror or error}"
