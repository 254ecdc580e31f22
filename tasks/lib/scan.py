"""Walking the raw data folder under one policy for links, special files and bad names (docs/data.md states it
for users). Nothing is collected: `candidates()` yields files as the walk finds them; only what is reported is kept.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tasks.lib.images import IMAGE_SUFFIXES, file_kind
from tasks.lib.split_files import SPLITS


@dataclass(frozen=True, slots=True)
class FoundFile:
    """A file found in the raw folder: where it is, its class and (for predefined layouts) its split."""

    path: str  # relative to raw_dir, POSIX separators
    label_name: str
    split: str | None = None


@dataclass(frozen=True)
class Problem:
    """An entry skipped by the policy, reported with the bad images."""

    path: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason, "detail": self.detail}


def name_as_text(name: str) -> str:
    """A file name as text; bytes that are not UTF-8 appear as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def good_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:   # os.fsdecode turned undecodable bytes into surrogates
        return False
    return True


@dataclass
class FolderScan:
    """One walk over raw_dir; `candidates()` streams, the other fields fill up as it goes."""

    raw_dir: Path
    layout: str = "imagefolder"
    classes: set[str] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    n_candidates: int = 0

    def __post_init__(self) -> None:
        self.root = os.path.realpath(self.raw_dir)

    def candidates(self) -> Iterator[FoundFile]:
        top = self._folders(self.raw_dir, "")
        if {name for name, _ in top} == set(SPLITS):
            self.layout = "predefined"
            groups = [(split, name, path) for split in SPLITS
                      for name, path in self._folders(self.raw_dir / split, f"{split}/")]
        else:
            groups = [(None, name, path) for name, path in top]
        for split, label, folder in groups:
            self.classes.add(label)
            for rel in self._walk(folder, folder.relative_to(self.raw_dir).as_posix()):
                self.n_candidates += 1
                yield FoundFile(rel, label, split)

    # ---- the walk
    def _folders(self, folder: Path, prefix: str) -> list[tuple[str, Path]]:
        """Sub-folders (class or split folders), sorted; links and bad names among them are reported."""
        return [(name, folder / name) for name in self._names(folder)
                if self._kind(os.path.join(folder, name), name, prefix + name) == "folder"]

    def _walk(self, folder: Path, rel_folder: str) -> Iterator[str]:
        for name in self._names(folder):
            rel = f"{rel_folder}/{name}"
            path = os.path.join(folder, name)      # a str: no Path per file (see _link_kind)
            kind = self._kind(path, name, rel)
            if kind == "folder":
                yield from self._walk(Path(path), rel)
            elif kind == "file":
                if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                    yield rel
                else:
                    self.ignored.append(rel)

    def _names(self, folder: Path) -> list[str]:
        """The folder's entries, sorted. Names only: a DirEntry holds its path and, once asked, its stat
        (about 900 bytes in all), and a folder of 20,000 images would hold 18 MB of them while it is walked."""
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if not e.name.startswith("."))

    def _kind(self, path: str, name: str, rel: str) -> str:
        """'folder', 'file' or 'skip' (reported) for one directory entry, under the policy above."""
        if not good_name(name):
            return self._report(rel, "bad_file_name", "not valid UTF-8; rename it")
        try:
            mode = os.lstat(path).st_mode
        except OSError as err:    # removed since the folder was listed
            return self._report(rel, "unreadable", err.strerror or str(err))
        if stat.S_ISLNK(mode):
            return self._link_kind(path, rel)
        if stat.S_ISDIR(mode):
            return "folder"
        if stat.S_ISREG(mode):
            return "file"
        return self._report(rel, "not_a_regular_file", file_kind(mode))

    def _link_kind(self, path: str, rel: str) -> str:
        # Plain strings, not Path: pathlib interns every name it parses, so a Path per file would grow
        # memory with the number of files for the life of the process.
        try:
            target = os.path.realpath(path, strict=True)
            mode = os.stat(target).st_mode
        except (OSError, RuntimeError) as err:
            return self._report(rel, "dangling_link", f"-> {os.readlink(path)}: {getattr(err, 'strerror', err)}")
        if os.path.commonpath([target, self.root]) != self.root:
            return self._report(rel, "link_outside", f"-> {target} is outside {self.raw_dir}")
        if stat.S_ISDIR(mode):
            return self._report(rel, "link_to_folder", f"-> {target}; linked folders are not followed")
        if not stat.S_ISREG(mode):
            return self._report(rel, "not_a_regular_file", f"-> {target} ({file_kind(mode)})")
        return "file"

    def _report(self, rel: str, reason: str, detail: str) -> str:
        self.problems.append(Problem(name_as_text(rel), reason, detail))
        return "skip"
