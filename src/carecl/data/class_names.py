"""`data.class_names_file`: display names for a dataset's classes (what CLIP's text classifier reads)."""

from __future__ import annotations

from pathlib import Path

import yaml

from carecl.data.base import DatasetError


def read_class_names(path: str, current: list[str]) -> list[str]:
    """A text file of one name per line in class-id order, or a YAML/JSON mapping from the dataset's own
    names (folder names) to display names (classes it does not name keep theirs)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetError(f"data.class_names_file: {'a folder, not a file' if file.is_dir() else 'file not found'}: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"data.class_names_file: cannot read {file} as UTF-8 text: {error}") from None
    if file.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            mapping = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise DatasetError(f"data.class_names_file: {file} is not valid YAML/JSON: {error}") from None
        if not isinstance(mapping, dict):
            raise DatasetError(f"data.class_names_file: {file} must map folder names to display names")
        unknown = sorted(set(map(str, mapping)) - set(current))
        if unknown:
            raise DatasetError(f"data.class_names_file: {file} names classes the dataset does not have: {unknown[:10]}")
        return [str(mapping.get(name, name)) for name in current]
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != len(current):
        raise DatasetError(f"data.class_names_file: {file} lists {len(names)} names for the dataset's {len(current)} classes")
    return names
