"""`carecl data`: a fake OmniBenchmark-1K archive unpacks where carecl reads it and verifies against its counts; a
truncated archive stops with a clear message and the re-run resumes; a prepared tree is never overwritten;
verify finds unreadable images, files in both splits, count mismatches and changes since its manifest;
download without a reachable hub says which file to fetch and where."""

from __future__ import annotations

import dataclasses
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carecl.cli.main import main
from carecl.data import catalog
from carecl.data.base import DatasetError
from carecl.data.prepare import prepare
from carecl.data.verify import verify

CLASSES, TRAIN, TEST = 3, 4, 2


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (8, 8, 3)).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def fake_files(root: str = "omnibenchmark1k") -> dict[str, bytes]:
    files, seed = {f"{root}/README.txt": b"not part of the dataset"}, 0
    for split, count in (("train", TRAIN), ("test", TEST)):
        for c in range(CLASSES):
            for i in range(count):
                seed += 1
                files[f"{root}/{split}/class{c}/{i}.png"] = png(seed)
    return files


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def small_catalog(monkeypatch):
    """OmniBenchmark-1K's entry with this fake archive's counts."""
    entry = dataclasses.replace(catalog.CATALOG["omnibenchmark1k"], classes=CLASSES, train_images=CLASSES * TRAIN,
                                test_images=CLASSES * TEST)
    monkeypatch.setitem(catalog.CATALOG, "omnibenchmark1k", entry)
    return entry


def test_prepare_and_verify_a_fake_archive(tmp_path, small_catalog, capsys):
    archive = write_tar(tmp_path / "omnibenchmark1k.tar.gz", fake_files())
    assert main(["data", "prepare", "omnibenchmark1k", "--archive", str(archive), "--root", str(tmp_path / "data")]) == 0
    folder = tmp_path / "data" / "omnibenchmark1k"
    assert (folder / "COMPLETE").is_file() and not (folder / "README.txt").exists()
    assert len(list((folder / "train").rglob("*.png"))) == CLASSES * TRAIN
    assert main(["data", "verify", "omnibenchmark1k", "--root", str(tmp_path / "data")]) == 0
    assert "checksum manifest written" in capsys.readouterr().out
    assert verify("omnibenchmark1k", tmp_path / "data", progress=False).ok  # and again against the manifest
    with pytest.raises(DatasetError, match="already prepared .* never overwritten"):
        prepare("omnibenchmark1k", archive, tmp_path / "data", progress=False)


def test_a_truncated_archive_stops_clearly_and_the_rerun_resumes(tmp_path, small_catalog):
    whole = write_tar(tmp_path / "whole.tar.gz", fake_files()).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(DatasetError, match=r"cut\.tar\.gz is truncated or damaged .* run the same command to resume"):
        prepare("omnibenchmark1k", cut, tmp_path / "data", progress=False)
    staged = list((tmp_path / "data" / ".omnibenchmark1k.partial").rglob("*.png"))
    assert 0 < len(staged) < CLASSES * (TRAIN + TEST)
    before = {path: path.stat().st_mtime_ns for path in staged}
    prepare("omnibenchmark1k", tmp_path / "whole.tar.gz", tmp_path / "data", progress=False)
    folder = tmp_path / "data" / "omnibenchmark1k"
    assert all((folder / path.relative_to(path.parents[2])).stat().st_mtime_ns == mtime for path, mtime in before.items())
    assert verify("omnibenchmark1k", tmp_path / "data", progress=False).ok


def test_verify_finds_every_kind_of_problem(tmp_path, small_catalog, capsys):
    files = fake_files()
    with zipfile.ZipFile(tmp_path / "good.zip", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    prepare("omnibenchmark1k", tmp_path / "good.zip", tmp_path / "data", progress=False)
    assert verify("omnibenchmark1k", tmp_path / "data", progress=False).ok  # and its checksum baseline is written
    folder = tmp_path / "data" / "omnibenchmark1k"
    (folder / "test" / "class0" / "dup.png").write_bytes(files["omnibenchmark1k/train/class1/0.png"])  # in both splits
    (folder / "train" / "class2" / "broken.png").write_bytes(png(999)[:40])  # truncated image
    (folder / "train" / "class0" / "0.png").write_bytes(png(12345))  # changed since the baseline
    report = verify("omnibenchmark1k", tmp_path / "data", progress=False)
    text = "\n".join(report.problems)
    assert "train images: 13, published 12" in text and "test images: 7, published 6" in text
    assert "1 unreadable image(s): train/class2/broken.png" in text
    assert "1 file(s) in both train/ and test/" in text
    assert "changed since the manifest: train/class0/0.png" in text and "new since the manifest" in text
    assert main(["data", "verify", "omnibenchmark1k", "--root", str(tmp_path / "data")]) == 2


def test_an_unpacked_folder_is_copied_and_a_foreign_one_refused(tmp_path, small_catalog):
    source = tmp_path / "unpacked"
    for name, data in fake_files("somewhere").items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    prepare("omnibenchmark1k", source, tmp_path / "data", progress=False)
    assert (source / "somewhere" / "train").is_dir()  # the source is left as it was
    (tmp_path / "other" / "omnibenchmark1k").mkdir(parents=True)
    with pytest.raises(DatasetError, match="exists but carecl did not prepare it"):
        prepare("omnibenchmark1k", source, tmp_path / "other", progress=False)


def test_download_without_the_hub_says_what_to_fetch(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    assert main(["data", "download", "omnibenchmark1k", "--root", str(tmp_path)]) == 2
    assert "LMMM2025/OmniBenchmark-1K" in capsys.readouterr().err
    assert main(["data", "download", "imagenet-r", "--root", str(tmp_path)]) == 2
    assert "LAMDA-PILOT's README" in capsys.readouterr().err


def test_the_cifar_archive_layout(tmp_path, monkeypatch):
    import pickle

    monkeypatch.setitem(catalog.CATALOG, "cifar100", dataclasses.replace(catalog.CATALOG["cifar100"], train_images=6,
                                                                          test_images=3))
    pickles = {name: pickle.dumps({"fine_labels": list(range(count)), "data": np.zeros((count, 3072), np.uint8)})
               for name, count in (("train", 6), ("test", 2))}
    pickles["meta"] = pickle.dumps({"fine_label_names": ["a"] * 100})
    archive = write_tar(tmp_path / "cifar-100-python.tar.gz", {f"cifar-100-python/{k}": v for k, v in pickles.items()})
    prepare("cifar100", archive, tmp_path / "data", progress=False)
    assert sorted(p.name for p in (tmp_path / "data" / "cifar-100-python").iterdir()) == ["COMPLETE", "meta", "test", "train"]
    report = verify("cifar100", tmp_path / "data", progress=False)
    assert report.problems == ["test images: 2, published 3"]


def write_plain_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def member_boundary(path: Path, n_members: int) -> int:
    """The byte offset just after the data of the archive's first `n_members` members (a cut tarfile reads quietly)."""
    with tarfile.open(path, "r:") as archive:
        member = archive.getmembers()[n_members - 1]
    return member.offset_data + -(-member.size // 512) * 512


@pytest.mark.parametrize("cut", ["at a member boundary", "inside a member"])
def test_a_cut_plain_tar_is_never_marked_complete_and_the_whole_one_finishes(tmp_path, small_catalog, capsys, cut):
    whole = write_plain_tar(tmp_path / "whole.tar", fake_files())
    end = member_boundary(whole, 10)
    cut_archive = tmp_path / "cut.tar"
    cut_archive.write_bytes(whole.read_bytes()[: end if cut == "at a member boundary" else end - 100])
    root = tmp_path / "data"
    assert main(["data", "prepare", "omnibenchmark1k", "--archive", str(cut_archive), "--root", str(root)]) == 2
    error = capsys.readouterr().err
    assert "truncated or damaged" in error and ("end-of-archive marker" in error or "unexpected end" in error)
    assert not (root / "omnibenchmark1k").exists()  # nothing marked prepared
    assert main(["data", "prepare", "omnibenchmark1k", "--archive", str(whole), "--root", str(root)]) == 0
    assert (root / "omnibenchmark1k" / "COMPLETE").is_file()
    assert main(["data", "verify", "omnibenchmark1k", "--root", str(root)]) == 0


def test_a_whole_archive_of_too_few_images_is_not_marked_complete(tmp_path, small_catalog, capsys):
    files = {name: data for name, data in fake_files().items() if "class2" not in name}
    root = tmp_path / "data"
    archive = write_plain_tar(tmp_path / "fewer.tar", files)
    assert main(["data", "prepare", "omnibenchmark1k", "--archive", str(archive), "--root", str(root)]) == 2
    assert "train/ has 2 classes, omnibenchmark1k has 3" in capsys.readouterr().err
    assert not (root / "omnibenchmark1k").exists()


def test_verify_writes_no_checksum_baseline_for_a_tree_that_fails(tmp_path, small_catalog, capsys):
    folder = tmp_path / "data" / "omnibenchmark1k"
    for name, data in fake_files().items():
        if "class2" in name or not name.endswith(".png"):
            continue
        path = tmp_path / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert main(["data", "verify", "omnibenchmark1k", "--root", str(tmp_path / "data")]) == 2
    assert "no checksum manifest written" in capsys.readouterr().out
    assert not list(folder.glob("MANIFEST*"))
