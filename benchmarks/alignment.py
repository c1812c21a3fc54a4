"""Class statistics + classifier alignment per task at 100, 500 and 1000 seen classes (ViT-B width).

    python benchmarks/alignment.py            # 100, 500, 1000 seen classes
    python benchmarks/alignment.py --quick    # 100 and 300 seen classes, one round

The B100 Inc3 setting (OmniBenchmark-1K, 301 tasks): each task adds 3 classes; CaRE then adds
their Gaussian statistics (`GaussianClassStatistics.add_class`, ~120 features per class as in
ImageNet-R) and aligns the classifier over every seen class (`align_classifier`: 3 epochs, 5 x 16
samples per class, decayed means), once after each half of the task's training. The statistics of
older classes (and their Cholesky factors) exist already: they are set up before timing.
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager

import torch

import common
from carecl.alignment import align_classifier
from carecl.alignment_config import AlignmentConfig
from carecl.statistics import GaussianClassStatistics
from carecl.classifiers import CosineClassifier

FEATURE_DIM = 768
NEW_CLASSES = 3
FEATURES_PER_CLASS = 120
BATCH = 16
ALIGNMENT = AlignmentConfig(epochs=3, lr=0.005, decay=True)  # the B100 Inc3 release settings
DISTINCT_COVARIANCES = 8  # older classes reuse a few covariances: the cost does not depend on the values


def arguments():
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--classes", type=lambda s: [int(v) for v in s.split(",")], default=None)
    return parser.parse_args()


def class_features(generator: torch.Generator) -> torch.Tensor:
    """(120, 768) correlated features, like a class of ViT CLS features."""
    mixing = torch.randn(FEATURE_DIM, FEATURE_DIM, generator=generator) / FEATURE_DIM**0.5
    return torch.randn(FEATURES_PER_CLASS, FEATURE_DIM, generator=generator) @ mixing + torch.randn(FEATURE_DIM, generator=generator)


def statistics_of_old_classes(n_old: int, generator: torch.Generator) -> GaussianClassStatistics:
    base = GaussianClassStatistics("covariance")
    for class_id in range(DISTINCT_COVARIANCES):
        base.add_class(class_id, class_features(generator))
    covariances = base.state_dict()["covariances"]
    stats = GaussianClassStatistics("covariance")
    stats.load_state_dict({
        "class_ids": torch.arange(n_old), "counts": torch.full((n_old,), FEATURES_PER_CLASS),
        "means": torch.randn(n_old, FEATURE_DIM, generator=generator),
        "covariances": covariances[torch.arange(n_old) % DISTINCT_COVARIANCES],
    })
    stats.stacked(list(range(n_old)))  # their Cholesky factors, computed once as in a real run
    return stats


def classifier_blocks(n_seen: int) -> list[int]:
    """B100 Inc3-like heads: a first block, then blocks of 3, the last one the new task's."""
    n_small = max(1, (n_seen - 100) // NEW_CLASSES)
    return [n_seen - NEW_CLASSES * n_small] + [NEW_CLASSES] * n_small


@contextmanager
def counting_factorisations(counter: list[int]):
    """Counts the matrices handed to torch.linalg.cholesky_ex (a batch counts its size)."""
    original = torch.linalg.cholesky_ex

    def counted(matrices, *args, **kwargs):
        counter[0] += matrices.shape[0] if matrices.dim() == 3 else 1
        return original(matrices, *args, **kwargs)
    torch.linalg.cholesky_ex = counted
    try:
        yield
    finally:
        torch.linalg.cholesky_ex = original


def measure_size(n_seen: int, device: str, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(n_seen)
    started = time.perf_counter()
    stats = statistics_of_old_classes(n_seen - NEW_CLASSES, generator)
    setup = time.perf_counter() - started
    torch.manual_seed(0)
    classifier = CosineClassifier(FEATURE_DIM)
    blocks = classifier_blocks(n_seen)
    for size in blocks:
        classifier.add_block(size)
    classifier.to(device)
    task_of_class = [task for task, size in enumerate(blocks) for _ in range(size)]
    new_ids = list(range(n_seen - NEW_CLASSES, n_seen))
    features = {c: class_features(generator) for c in new_ids}
    statistics_times, alignment_times, factorisations = [], [], []
    for round_index in range(repeats + 1):  # the first round is a warm-up
        counter = [0]
        common.synchronize(device)
        t0 = time.perf_counter()
        for class_id in new_ids:
            stats.add_class(class_id, features[class_id])
        t1 = time.perf_counter()
        with counting_factorisations(counter):
            align_classifier(classifier, stats, ALIGNMENT, n_seen_classes=n_seen, scale=20.0, batch_size=BATCH,
                             task_of_class=task_of_class, current_task=len(blocks) - 1,
                             current_task_size=NEW_CLASSES, generator=torch.Generator().manual_seed(round_index),
                             device=device)
        common.synchronize(device)
        t2 = time.perf_counter()
        if round_index > 0:
            statistics_times.append(t1 - t0)
            alignment_times.append(t2 - t1)
            factorisations.append(counter[0])
        common.progress(f"[{device}] {n_seen} classes: statistics {t1 - t0:.2f}s, alignment {t2 - t1:.2f}s, "
                        f"{counter[0]} Cholesky factorisations")
    return {"seen_classes": n_seen, "setup_seconds": setup, "statistics_seconds": statistics.median(statistics_times),
            "alignment_seconds": statistics.median(alignment_times), "factorisations_per_alignment": max(factorisations),
            "alignment_steps": ALIGNMENT.epochs * n_seen,
            "samples_per_epoch": ALIGNMENT.resolved_samples_per_class(BATCH) * n_seen}


def main() -> None:
    args = arguments()
    common.set_threads(args.threads)
    sizes = args.classes or ([100, 300] if args.quick else [100, 500, 1000])
    repeats = args.repeats or (1 if args.quick else 2)
    runs = []
    for device in common.devices(args.device):
        rows = [measure_size(n_seen, device, repeats) for n_seen in sizes]
        runs.append({"machine": common.machine(device), "repeats": repeats, "new_classes_per_task": NEW_CLASSES,
                     "features_per_class": FEATURES_PER_CLASS, "batch": BATCH, "epochs": ALIGNMENT.epochs, "rows": rows})
    common.finish("alignment", {"runs": runs}, args)


if __name__ == "__main__":
    sys.exit(main())
