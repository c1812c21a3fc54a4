"""`carecl data prepare`: unpack a benchmark's archive (or copy an unpacked tree) into the folder carecl reads.

- Streaming: a tar archive is read member by member (`r|*`), a zip through its directory; nothing is held
  in memory beyond one file's buffer.
- Resumable: files go to `<root>/.<folder>.partial/`, each written as `<file>.part` and renamed once whole;
  a re-run skips every file already there at its full size, so an interrupted unpack continues.
- Never overwrites: the finished tree is renamed into place with a `COMPLETE` marker; a folder that has
  one is refused, and so is one that exists without it (not carecl's).
- Never marks an incomplete archive complete: a compressed stream that ends early fails in its decompressor, an
  uncompressed tar must end with its end-of-archive marker after its last member's data, and the unpacked tree
  must have the catalog's class and image counts where the catalog has them; otherwise the staged files stay
  and a re-run with the whole archive finishes the job.
- Safe: members with absolute paths or `..` are refused; only `train/` and `test/` (or CIFAR's archive
  folder) are taken, from wherever they sit in the archive (`omnibenchmark1k/train/...`, `train/...`).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator

from tqdm.auto import tqdm

from carecl.data.base import DatasetError
from carecl.data.catalog import CatalogEntry, catalog_entry

COMPLETE = "COMPLETE"
CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveFile:
    path: PurePosixPath
    size: int
    open: Callable[[], IO[bytes]]


def archive_files(source: Path) -> Iterator[ArchiveFile]:
    """The regular files of a tar / zip archive or a folder, in archive order."""
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            yield ArchiveFile(PurePosixPath(path.relative_to(source).as_posix()), path.stat().st_size,
                              lambda path=path: path.open("rb"))
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield ArchiveFile(PurePosixPath(info.filename), info.file_size,
                                      lambda info=info: archive.open(info))
    else:
        try:
            archive = tarfile.open(source, mode="r|*")
        except tarfile.TarError as error:
            raise DatasetError(f"{source} is not a tar or zip archive (or is damaged): {error}") from None
        with archive:
            for member in archive:
                if member.isfile():
                    yield ArchiveFile(PurePosixPath(member.name), member.size,
                                      lambda member=member: archive.extractfile(member))
        if not compressed(source):
            check_tar_end(source)


# A compressed stream's magic bytes: gzip, bzip2, xz (their decompressors notice a stream that ends early).
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
TAR_BLOCK = 512


def compressed(source: Path) -> bool:
    with source.open("rb") as stream:
        head = stream.read(6)
    return head.startswith(COMPRESSED_MAGIC)


def check_tar_end(source: Path) -> None:
    """An uncompressed tar ends with two zero blocks after its last member's data: without them it was cut short
    (tarfile itself reads a tar cut at a member boundary as complete)."""
    try:
        with tarfile.open(source, mode="r:") as archive:
            members = archive.getmembers()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise EOFError(f"its members cannot all be read ({error})") from None
    last = members[-1] if members else None
    end = 0 if last is None else last.offset_data + -(-last.size // TAR_BLOCK) * TAR_BLOCK
    with source.open("rb") as stream:
        stream.seek(end)
        marker = stream.read(2 * TAR_BLOCK)
    if len(marker) < 2 * TAR_BLOCK or any(marker):
        raise EOFError(f"it ends without its end-of-archive marker after {len(members)} member(s)")


def relative_target(path: PurePosixPath, entry: CatalogEntry) -> PurePosixPath | None:
    """Where an archive file goes inside the dataset folder (None: not part of the dataset)."""
    if path.is_absolute() or ".." in path.parts:
        raise DatasetError(f"archive member {path} points outside the dataset folder: refused")
    parts = path.parts
    anchors = ("cifar-100-python",) if entry.layout == "cifar100" else ("train", "test")
    for index, part in enumerate(parts[:-1]):
        if part in anchors:
            start = index + 1 if entry.layout == "cifar100" else index
            return PurePosixPath(*parts[start:])
    return None


def prepare(name: str, source: Path, root: Path, progress: bool = True) -> Path:
    """Unpack `source` (archive or folder) into `<root>/<folder>`; resumes a staged, interrupted unpack."""
    entry = catalog_entry(name)
    source, root = source.expanduser(), root.expanduser()
    target, staging = root / entry.folder, root / f".{entry.folder}.partial"
    if (target / COMPLETE).is_file():
        raise DatasetError(f"{target} is already prepared (it has {COMPLETE}); it is never overwritten: check it with "
                           f"`carecl data verify {name} --root {root}`, or move it away to prepare it again")
    if target.exists():
        raise DatasetError(f"{target} exists but carecl did not prepare it (no {COMPLETE}): move it away, or check it "
                           f"as it is with `carecl data verify {name} --root {root}`")
    if not source.exists():
        raise DatasetError(f"--archive {source} not found")
    staging.mkdir(parents=True, exist_ok=True)
    written = skipped = total_bytes = 0
    bar = tqdm(desc=f"unpacking {source.name}", unit="file", disable=not progress)
    try:
        for item in archive_files(source):
            relative = relative_target(item.path, entry)
            if relative is None:
                continue
            destination = staging / relative
            total_bytes += item.size
            bar.update()
            if destination.is_file() and destination.stat().st_size == item.size:
                skipped += 1  # unpacked by an earlier, interrupted run
                continue
            write_file(item, destination)
            written += 1
    except (tarfile.TarError, EOFError, zlib.error, zipfile.BadZipFile, OSError) as error:
        raise DatasetError(f"{source} is truncated or damaged ({type(error).__name__}: {error}) after {written + skipped} "
                           f"files; they are kept in {staging}: fetch the archive again and run the same command to "
                           "resume from there") from None
    finally:
        bar.close()
    if written + skipped == 0:
        anchor = "cifar-100-python/" if entry.layout == "cifar100" else "train/ and test/"
        raise DatasetError(f"{source} holds no files under {anchor}: is it the {name} archive?")
    check_counts(staging, entry, source)
    (staging / COMPLETE).write_text(json.dumps({"source": source.name, "files": written + skipped,
                                                "bytes": total_bytes}, indent=1))
    os.replace(staging, target)
    return target


def check_counts(staging: Path, entry: CatalogEntry, source: Path) -> None:
    """The unpacked tree has the catalog's class and image counts (where it has them), or it is not marked complete."""
    if entry.layout != "folders":
        return
    from carecl.data.imagefolder import IMAGE_EXTENSIONS

    found = []
    for split, expected in (("train", entry.train_images), ("test", entry.test_images)):
        folder = staging / split
        classes = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        images = sum(1 for c in classes for p in c.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if entry.classes is not None and len(classes) != entry.classes:
            found.append(f"{split}/ has {len(classes)} classes, {entry.name} has {entry.classes}")
        if expected is not None and images != expected:
            found.append(f"{split}/ has {images:,} images, {entry.name} has {expected:,}")
    if found:
        raise DatasetError(f"{source} unpacked to an incomplete {entry.name} ({'; '.join(found)}): not marked complete. "
                           f"The files are kept in {staging}: fetch the whole archive and run the same command to finish")


def write_file(item: ArchiveFile, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    with item.open() as reader, partial.open("wb") as writer:
        shutil.copyfileobj(reader, writer, CHUNK)
    if partial.stat().st_size != item.size:
        raise EOFError(f"{item.path}: {partial.stat().st_size} of {item.size} bytes")
    os.replace(partial, destination)


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


def download(name: str, root: Path, progress: bool = True) -> Path:
    """Fetch a benchmark from the Hugging Face hub (huggingface_hub) into `<root>/.downloads/`, then prepare it."""
    entry = catalog_entry(name)
    root = root.expanduser()
    by_hand = (f"get the archive from {entry.source}, then run `carecl data prepare {name} --archive FILE "
               f"--root {root}`")
    if entry.hub_repo is None:
        raise DatasetError(f"carecl cannot download {name}: {by_hand}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DatasetError(f'carecl data download needs huggingface_hub (pip install "carecl[download]"); or {by_hand}') from None
    where = root / ".downloads" / name
    try:
        local = Path(snapshot_download(repo_id=entry.hub_repo, repo_type="dataset", local_dir=str(where)))
    except Exception as error:  # noqa: BLE001 - the hub client raises many types (offline, auth, missing repo)
        raise DatasetError(f"could not download {entry.hub_repo} from the Hugging Face hub ({type(error).__name__}: "
                           f"{error}); download https://huggingface.co/datasets/{entry.hub_repo} by hand (an archive "
                           f"whose {entry.folder}/ holds train/ and test/) and run `carecl data prepare {name} "
                           f"--archive FILE --root {root}`") from None
    archives = sorted(p for p in local.rglob("*") if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
    return prepare(name, archives[0] if len(archives) == 1 else local, root, progress)
