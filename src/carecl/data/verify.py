"""`carecl data verify`: is a prepared benchmark what carecl expects?

Checks, each listed in the report: class and image counts per split against the published ones (where
carecl knows them), the same classes in train/ and test/, every image decodable, no file identical in
train/ and test/ (by SHA-256), and a checksum manifest (`MANIFEST.sha256`, written by the first verify,
compared by every later one: changed, missing and new files).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from carecl.data.base import DatasetError
from carecl.data.catalog import CatalogEntry, catalog_entry
from carecl.data.imagefolder import list_class_folders, list_images

MANIFEST = "MANIFEST.sha256"
CIFAR_FILES = ("train", "test", "meta")  # the python archive's pickles
MAX_LISTED = 10


@dataclass
class VerifyReport:
    folder: Path
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (classes, images)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"{self.folder}:"]
        lines += [f"  {split}: {classes} classes, {images:,} images" for split, (classes, images) in self.counts.items()]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  PROBLEM: {problem}" for problem in self.problems]
        lines.append("  OK" if self.ok else f"  {len(self.problems)} problem(s)")
        return "\n".join(lines)


def listed(items: list[str]) -> str:
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(name: str, root: Path, progress: bool = True) -> VerifyReport:
    entry = catalog_entry(name)
    folder = root.expanduser() / entry.folder
    if not folder.is_dir():
        raise DatasetError(f"{folder} not found: prepare it with `carecl data prepare {name} --archive FILE --root {root}`")
    report = VerifyReport(folder)
    files = cifar_files(folder, entry, report) if entry.layout == "cifar100" else folder_files(folder, entry, report)
    hashes = hash_and_decode(folder, files, entry, report, progress)
    if entry.layout == "folders":
        check_cross_split_duplicates(hashes, report)
    check_manifest(folder, hashes, report)
    return report


def verify_own_tree(folder: Path, progress: bool = True) -> VerifyReport:
    """A user's own ImageFolder tree (`DIR/train/<class>/` + `DIR/test/<class>/`, or `DIR/<class>/`): images per class,
    classes too small to learn from, the same classes in both splits, unreadable images, files in both splits.
    No checksum manifest is written into a user's folder."""
    folder = folder.expanduser()
    report = VerifyReport(folder)
    splits = [s for s in ("train", "test") if (folder / s).is_dir()] or [""]
    files, classes = [], {}
    for split in splits:
        class_dirs = list_class_folders(folder / split)
        if not class_dirs:
            report.problems.append(f"{folder / split} holds no class folders")
            continue
        per_class = {name: list_images(path) for name, path in sorted(class_dirs.items())}
        classes[split] = set(per_class)
        report.counts[split or "images"] = (len(per_class), sum(len(v) for v in per_class.values()))
        files += [Path(p) for paths in per_class.values() for p in paths]
        sizes = ", ".join(f"{name} {len(paths)}" for name, paths in per_class.items())
        report.notes.append(f"{split or 'images'} per class: {sizes}")
        empty = [name for name, paths in per_class.items() if not paths]
        if empty:
            report.problems.append(f"{split or 'images'}: {len(empty)} class folder(s) without images: {listed(empty)}")
        if split != "test":
            single = [name for name, paths in per_class.items() if len(paths) == 1]
            if single:
                report.problems.append(f"{len(single)} class(es) with a single training image: {listed(single)}")
    if len(classes) == 2 and classes["train"] != classes["test"]:
        report.problems.append(f"train/ and test/ have different classes: {listed(sorted(classes['train'] ^ classes['test']))}")
    own = CatalogEntry(name="imagefolder", folder=folder.name, source="a user's own images")
    hashes = hash_and_decode(folder, files, own, report, progress)
    if len(splits) == 2:
        check_cross_split_duplicates(hashes, report)
    return report


def folder_files(folder: Path, entry: CatalogEntry, report: VerifyReport) -> list[Path]:
    files, classes = [], {}
    for split, expected_images in (("train", entry.train_images), ("test", entry.test_images)):
        split_dir = folder / split
        if not split_dir.is_dir():
            report.problems.append(f"{split_dir} missing")
            continue
        class_dirs = list_class_folders(split_dir)
        images = [Path(p) for c in sorted(class_dirs) for p in list_images(class_dirs[c])]
        classes[split] = set(class_dirs)
        report.counts[split] = (len(class_dirs), len(images))
        files += images
        compare_count(report, f"{split} classes", len(class_dirs), entry.classes)
        compare_count(report, f"{split} images", len(images), expected_images)
        empty = sorted(c for c in class_dirs if not list_images(class_dirs[c]))
        if empty:
            report.problems.append(f"{split}: {len(empty)} empty class folder(s): {listed(empty)}")
    if len(classes) == 2 and classes["train"] != classes["test"]:
        only = sorted(classes["train"] ^ classes["test"])
        report.problems.append(f"train/ and test/ have different classes: {listed(only)}")
    if entry.train_images is None:
        report.notes.append("no published image counts for this dataset: the manifest records these")
    return files


def compare_count(report: VerifyReport, what: str, found: int, expected: int | None) -> None:
    if expected is not None and found != expected:
        report.problems.append(f"{what}: {found:,}, published {expected:,}")


def cifar_files(folder: Path, entry: CatalogEntry, report: VerifyReport) -> list[Path]:
    import pickle

    files = []
    for name, expected in zip(CIFAR_FILES, (entry.train_images, entry.test_images, None)):
        path = folder / name
        if not path.is_file():
            report.problems.append(f"{path} missing")
            continue
        files.append(path)
        if expected is not None:
            with path.open("rb") as handle:
                count = len(pickle.load(handle, encoding="latin1")["fine_labels"])
            report.counts[name] = (entry.classes or 0, count)
            compare_count(report, f"{name} images", count, expected)
    return files


def hash_and_decode(folder: Path, files: list[Path], entry: CatalogEntry, report: VerifyReport,
                    progress: bool) -> dict[str, str]:
    """relative path -> SHA-256 of every file; each image decoded once (unreadable ones are problems)."""
    hashes, unreadable = {}, []
    for path in tqdm(files, desc=f"verifying {folder.name}", unit="file", disable=not progress):
        hashes[path.relative_to(folder).as_posix()] = sha256(path)
        if entry.layout == "folders":
            try:
                with Image.open(path) as image:
                    image.load()
            except Exception as error:  # noqa: BLE001 - PIL raises many types for a bad file
                unreadable.append(f"{path.relative_to(folder)} ({type(error).__name__})")
    if unreadable:
        report.problems.append(f"{len(unreadable)} unreadable image(s): {listed(unreadable)}")
    return hashes


def check_cross_split_duplicates(hashes: dict[str, str], report: VerifyReport) -> None:
    by_hash: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for relative, digest in hashes.items():
        by_hash[digest][relative.split("/", 1)[0]].append(relative)
    shared = [f"{groups['train'][0]} = {groups['test'][0]}" for groups in by_hash.values()
              if groups.get("train") and groups.get("test")]
    if shared:
        report.problems.append(f"{len(shared)} file(s) in both train/ and test/ (same content): {listed(shared)}")


def check_manifest(folder: Path, hashes: dict[str, str], report: VerifyReport) -> None:
    manifest = folder / MANIFEST
    if not manifest.is_file() and report.problems:
        report.notes.append(f"no checksum manifest written: the tree has the problems above ({manifest.name} records "
                            "a tree that passes its checks)")
        return
    if not manifest.is_file():
        manifest.write_text("".join(f"{digest}  {relative}\n" for relative, digest in sorted(hashes.items())))
        report.notes.append(f"checksum manifest written: {manifest} ({len(hashes):,} files)")
        return
    recorded = dict(reversed(line.rstrip("\n").split("  ", 1)) for line in manifest.read_text().splitlines() if line)
    changed = sorted(r for r in hashes.keys() & recorded.keys() if hashes[r] != recorded[r])
    missing, added = sorted(recorded.keys() - hashes.keys()), sorted(hashes.keys() - recorded.keys())
    for what, items in (("changed since the manifest", changed), ("missing since the manifest", missing),
                        ("new since the manifest", added)):
        if items:
            report.problems.append(f"{len(items)} file(s) {what}: {listed(items)}")
    if not (changed or missing or added):
        report.notes.append(f"every file matches {manifest.name}")
