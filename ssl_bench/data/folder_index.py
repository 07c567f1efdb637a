"""A cached index of an ImageNet-layout folder: what torchvision's ImageFolder lists, without re-walking it.

Listing ImageNet's train folder (1.28 M files in 1000 class folders) takes minutes on a cluster
filesystem, and it happened on the login node for every ``grid launch`` (the plan-time size check)
and again at every job start. The index (class names, and each sample's path and class) is built with
torchvision's own ``find_classes`` and ``make_dataset``, so it is exactly ImageFolder's, and stored
as JSON in the cache folder (``$SSL_BENCH_CACHE``, else ``$XDG_CACHE_HOME/ssl-bench``, else
``~/.cache/ssl-bench``) under a name derived from the folder's absolute path. It is reused while
the modification time of every folder of the tree is what was recorded: adding, removing or renaming
a file or a folder changes its parent's. A tree modified within SETTLE_S seconds of the walk is not
cached (a change in the same timestamp tick would go unseen). The file is gzipped JSON (relative paths
compress well: ImageNet's train index is a few MB). A cache that cannot be written only costs a warning.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

INDEX_VERSION = 1
SETTLE_S = 2.0  # folders modified this recently are not trusted to show their next change (coarse mtimes)


@dataclass(frozen=True)
class FolderIndex:
    """ImageFolder's view of a folder: ``classes`` (sorted) and ``samples`` (path relative to ``root``, class)."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]

    def paths_and_targets(self) -> list[tuple[str, int]]:
        """``samples`` with absolute paths, as ImageFolder's ``.samples``."""
        root = str(self.root)
        return [(os.path.join(root, rel), target) for rel, target in self.samples]


def cache_dir() -> Path:
    """Where indexes are kept: ``$SSL_BENCH_CACHE``, ``$XDG_CACHE_HOME/ssl-bench`` or ``~/.cache/ssl-bench``."""
    if os.environ.get("SSL_BENCH_CACHE"):
        return Path(os.environ["SSL_BENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ssl-bench"


def index_file(folder: Path) -> Path:
    """The cache file of ``folder`` (absolute, symlinks resolved)."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:20]
    return cache_dir() / "imagefolder-index" / f"{key}.json.gz"


def _stamps(folder: Path, dirs: list[str]) -> Optional[dict[str, int]]:
    """mtime_ns of each relative folder in ``dirs``, None if one is gone."""
    out = {}
    for rel in dirs:
        try:
            out[rel] = os.stat(os.path.join(folder, rel)).st_mtime_ns
        except OSError:
            return None
    return out


def build_index(folder: Path) -> tuple[FolderIndex, dict[str, int]]:
    """Walk ``folder`` once with torchvision's ImageFolder rules: (the index, every folder's mtime).

    The rules of ``find_classes`` (the sorted sub-folders) and ``make_dataset`` (per class in sorted
    order, ``sorted(os.walk(class, followlinks=True))``, file names sorted, extensions IMG_EXTENSIONS
    case-insensitively, an error for a class without images). The mtimes are taken before each listing.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    stamps = {".": os.stat(folder).st_mtime_ns}
    classes, _ = find_classes(str(folder))
    samples: list[tuple[str, int]] = []
    empty = []
    for target, name in enumerate(classes):
        found = len(samples)
        for top, _, files in sorted(_walk(folder / name, stamps, folder)):
            rel = os.path.relpath(top, folder)
            samples += [(os.path.join(rel, f), target) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        if len(samples) == found:
            empty.append(name)
    if empty:
        raise FileNotFoundError(f"found no valid file for the classes {', '.join(sorted(empty))} under {folder}. "
                                f"Supported extensions are: {', '.join(IMG_EXTENSIONS)}")
    return FolderIndex(folder, list(classes), samples), stamps


def _walk(top: str | Path, stamps: dict[str, int], folder: Path):
    """``os.walk(top, followlinks=True)`` (top-down, unreadable folders skipped), recording each folder's
    mtime (relative to ``folder``) before listing it, so a change during the walk shows in the next check."""
    try:
        mtime = os.stat(top).st_mtime_ns
        with os.scandir(top) as listing:
            entries = list(listing)
    except OSError:
        return
    stamps[os.path.relpath(top, folder)] = mtime
    dirs = [e.name for e in entries if _is_dir(e)]
    yield str(top), dirs, [e.name for e in entries if not _is_dir(e)]
    for name in dirs:
        yield from _walk(os.path.join(top, name), stamps, folder)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks, as os.walk(followlinks=True)
    except OSError:
        return False


def _read_cached(path: Path, folder: Path) -> Optional[FolderIndex]:
    """The cached index if it is readable, of this folder, and every recorded folder's mtime still matches."""
    try:
        record = json.loads(gzip.decompress(path.read_bytes()))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, EOFError) as exc:
        print(f"[ssl-bench] warning: unreadable folder index {path} ({exc}); rebuilding it", file=sys.stderr)
        return None
    try:
        if record["version"] != INDEX_VERSION or record["folder"] != str(folder.resolve()):
            return None
        if _stamps(folder, list(record["stamps"])) != record["stamps"]:
            return None
        return FolderIndex(folder, list(record["classes"]), [(p, int(t)) for p, t in record["samples"]])
    except (KeyError, TypeError, ValueError) as exc:
        print(f"[ssl-bench] warning: malformed folder index {path} ({exc!r}); rebuilding it", file=sys.stderr)
        return None


def _write(path: Path, record: dict[str, Any]) -> bool:
    """Write atomically (temporary file, then rename); False, with a warning, when it cannot."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(gzip.compress(json.dumps(record).encode(), compresslevel=6))
        os.replace(tmp, path)
        return True
    except OSError as exc:
        print(f"[ssl-bench] warning: could not cache the folder index in {path} ({exc}); "
              "set SSL_BENCH_CACHE to a writable folder to keep it", file=sys.stderr)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False


def load_index(folder: str | Path) -> FolderIndex:
    """The index of ``folder`` (ImageNet layout: ``folder/<class>/**/<image>``), from the cache when valid."""
    folder = Path(folder).expanduser()
    path = index_file(folder)
    cached = _read_cached(path, folder)
    if cached is not None:
        return cached
    start = time.time()
    index, stamps = build_index(folder)
    record = {"version": INDEX_VERSION, "folder": str(folder.resolve()), "stamps": stamps,
              "classes": index.classes, "samples": index.samples}
    # A folder changed within the filesystem's timestamp granularity of the walk could change again
    # without a new mtime; such an index is used but not cached (the next call walks again).
    settled = max(stamps.values()) < (start - SETTLE_S) * 1e9
    kept = settled and _write(path, record)
    print(f"[ssl-bench] indexed {len(index.samples)} images in {len(index.classes)} classes under {folder} "
          f"in {time.time() - start:.1f} s" + (f" (cached in {path})" if kept else ""), flush=True)
    return index


class IndexedImageFolder:
    """torchvision's ImageFolder over a cached ``FolderIndex``: ``(transform(image), class)`` items.

    The same ``classes``, ``class_to_idx``, ``samples``, ``targets`` and item order as ImageFolder.
    The image is read as the transform asks (``decode``): a PIL RGB image by default, a (3, H, W)
    uint8 tensor decoded by torchvision.io for the tensor pipelines (``takes_uint8_tensor``), or the
    file's encoded bytes for decoding on the training device (``takes_encoded``).
    """

    def __init__(self, folder: str | Path | FolderIndex, transform: Any = None):
        from ssl_bench.data import decode

        index = folder if isinstance(folder, FolderIndex) else load_index(folder)
        self.root = str(index.root)
        self.classes = index.classes
        self.class_to_idx = {name: i for i, name in enumerate(index.classes)}
        self.samples = index.paths_and_targets()
        self.targets = [target for _, target in self.samples]
        self.transform = transform
        if getattr(transform, "takes_encoded", False):
            self.loader = decode.read_encoded
        elif getattr(transform, "takes_uint8_tensor", False):
            self.loader = decode.read_image
        else:
            from torchvision.datasets.folder import default_loader

            self.loader = default_loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = self.loader(path)
        return (self.transform(image) if self.transform is not None else image), target
