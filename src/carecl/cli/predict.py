"""`carecl predict --run RUN_DIR IMAGE_OR_DIR ...`: top-k classes of image files with a trained run."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from carecl.predict import ImagePrediction


def expand_inputs(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Paths as given, directories replaced by their image files (recursively, sorted); plus problems."""
    from carecl.data.imagefolder import is_image_file

    files: list[Path] = []
    problems: list[str] = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)  # a missing or unreadable file becomes that image's error record
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p.name)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            problems.append(f"no image files in directory {path}")
        files.extend(found)
    return files, problems


def format_table_rows(prediction: ImagePrediction, width: int) -> list[str]:
    """Table lines of one prediction: one per rank, the image named on the first."""
    return [f"{prediction.source if rank == 1 else '':<{width}}  {rank:>4}  {c.name:<20}  {c.probability:>11.4f}"
            for rank, c in enumerate(prediction.classes, 1)]


def add_command(subparsers: Any) -> None:
    """Register `carecl predict --run RUN_DIR IMAGE_OR_DIR ...`."""
    parser = subparsers.add_parser(
        "predict", help="top-k classes of image files with a trained run",
        description="Classify images with a finished run: each image is converted to RGB, passed through the "
                    "run's test transform, and its top-k classes are printed with probabilities. Directories "
                    "are searched recursively for image files. Unreadable images are reported on stderr (and "
                    "as error records in jsonl output) without stopping the others.")
    parser.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="run directory written by carecl train/demo")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--format", choices=("table", "jsonl"), default="table", help="table (default) or one JSON object per line")
    parser.add_argument("--batch-size", type=int, help="images per forward (default: the run's eval.batch_size)")
    parser.add_argument("--data-root", type=Path, metavar="DIR",
                        help="the dataset's folder, if it moved since training (only runs without classes.json need it)")
    parser.set_defaults(handler=command_predict)


def command_predict(args: argparse.Namespace) -> int:
    from carecl.predict import PredictionError, Predictor, iter_predictions

    files, problems = expand_inputs(args.inputs)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not files:
        raise PredictionError(f"no image files to classify in {', '.join(args.inputs)}")
    predictor = Predictor.load(args.run, data_root=args.data_root)
    width = max(len("image"), *(len(str(f)) for f in files))
    if args.format == "table":
        print(f"{'image':<{width}}  {'rank':>4}  {'class':<20}  {'probability':>11}")
    n_classified = 0
    for prediction in iter_predictions(predictor.experiment, files, args.topk, args.batch_size):
        if not prediction.ok:
            print(f"error: {prediction.error}", file=sys.stderr)
        n_classified += prediction.ok
        if args.format == "jsonl":
            print(json.dumps(prediction.to_dict()), flush=True)
        elif prediction.ok:
            print("\n".join(format_table_rows(prediction, width)), flush=True)
    if n_classified == 0:
        raise PredictionError(f"none of the {len(files)} images could be classified (errors above)")
    return 0
