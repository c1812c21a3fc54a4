"""Rewrite carecl YAML files whose method options use keys that have moved (MethodConfig.moved_keys).

    python scripts/migrate_configs.py FILE_OR_DIR ...          # rewrite in place
    python scripts/migrate_configs.py --check FILE_OR_DIR ...  # list what would change, exit 1 if anything would

Old keys still load (with a notice); this puts each file in the current layout, e.g. CaRE's flat
`adapter_dim: 64` becomes `brmoe:` / `  adapter_dim: 64`. The rewrite is textual, so comments, order and
formatting stay as they were: a moved key's line (with its inline comment and the comment lines just
above it) goes into the new section, written where the first moved key of that section stood. Every
rewritten file is loaded before and after and must give the same configuration.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from carecl.config import ConfigError, config_from_dict, config_to_dict, method_options_class, parse_yaml  # noqa: E402

logging.getLogger("carecl").setLevel(logging.ERROR)  # the old keys' notices: this script is their answer

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")
DEFAULT_TARGETS = ("configs", "benchmarks/realdata", "src/carecl/configs")


@dataclass
class Line:
    text: str
    path: tuple[str, ...] | None = None  # dotted key path of a `key:` line; None for comments and blanks


@dataclass
class Move:
    old: tuple[str, ...]
    new: tuple[str, ...]
    lines: list[str] = field(default_factory=list)


def key_paths(text: str) -> list[Line]:
    """Each line with the full key path of the mapping key it sets (block-style YAML, as carecl writes it)."""
    stack: list[tuple[int, str]] = []
    lines = []
    for raw in text.splitlines():
        match = KEY_LINE.match(raw)
        if not match or raw.lstrip().startswith("#"):
            lines.append(Line(raw))
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        lines.append(Line(raw, tuple(key for _, key in stack)))
    return lines


def migrate_text(text: str) -> tuple[str, list[str]]:
    """The file's text with its method's moved keys rewritten, and one note per moved key."""
    data = parse_yaml(text, "file") or {}
    method = data.get("method") if isinstance(data, dict) else None
    if not isinstance(method, dict) or "name" not in method:
        return text, []
    moved = getattr(method_options_class(method["name"]), "moved_keys", {})
    moves = {("method", *old.split(".")): Move(("method", *old.split(".")), ("method", *new.split(".")))
             for old, new in moved.items()}
    lines = key_paths(text)
    found = [line for line in lines if line.path in moves]
    if not found:
        return text, []
    kept: list[Line | Move] = []
    pending_comments: list[Line] = []
    placed: dict[tuple[str, ...], Move] = {}
    for line in lines:
        if line.path is None and line.text.lstrip().startswith("#"):
            pending_comments.append(line)
            continue
        move = moves.get(line.path)
        if move is None:
            kept.extend(pending_comments)
            pending_comments = []
            kept.append(line)
            continue
        if line.text.rstrip().endswith(":"):
            raise ConfigError(f"{'.'.join(move.old)}: only single-line values can be moved")
        section = move.new[:-1]
        if section not in placed:
            placed[section] = move
            kept.append(move)
        anchor = placed[section]
        anchor.lines.extend(comment.text for comment in pending_comments)
        pending_comments = []
        value = KEY_LINE.match(line.text)["rest"]
        anchor.lines.append(f"{move.new[-1]}:{value}")
    kept.extend(pending_comments)
    out, notes = [], [f"{'.'.join(m.old)} -> {'.'.join(m.new)}" for m in moves.values()
                      if any(line.path == m.old for line in found)]
    existing = {line.path for line in lines if line.path is not None}
    for item in kept:
        if isinstance(item, Line):
            out.append(item.text)
            continue
        parent = item.old[:-1]
        section = item.new[:-1]
        if section in existing:
            raise ConfigError(f"{'.'.join(section)} already exists beside the old keys: merge them by hand")
        depth = len(parent) - 1
        for level, name in enumerate(section[len(parent):]):
            out.append("  " * (depth + 1 + level) + f"{name}:")
        indent = "  " * (depth + 1 + len(section) - len(parent))
        out.extend(indent + entry.lstrip() for entry in item.lines)
    return "\n".join(out) + ("\n" if text.endswith("\n") else ""), notes


def files_under(targets: list[str]) -> list[Path]:
    paths = []
    for target in targets:
        path = Path(target)
        paths.extend(sorted(path.rglob("*.yaml")) if path.is_dir() else [path])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"YAML files or folders (default: {', '.join(DEFAULT_TARGETS)})")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    args = parser.parse_args(argv)
    targets = args.targets or [str(ROOT / target) for target in DEFAULT_TARGETS]
    changed = 0
    for path in files_under(targets):
        text = path.read_text()
        try:
            migrated, notes = migrate_text(text)
        except ConfigError as error:
            print(f"{path}: {error}", file=sys.stderr)
            return 2
        if not notes:
            continue
        before = config_to_dict(config_from_dict(parse_yaml(text, str(path))))
        after = config_to_dict(config_from_dict(parse_yaml(migrated, str(path))))
        if before != after:
            print(f"{path}: the rewrite would change the configuration; left alone", file=sys.stderr)
            return 2
        changed += 1
        print(f"{path}: {', '.join(notes)}")
        if not args.check:
            path.write_text(migrated)
    print(f"{changed} file(s) {'would change' if args.check else 'rewritten'}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
