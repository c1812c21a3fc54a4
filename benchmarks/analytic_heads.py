"""The closed-form heads at their published widths: seconds and peak memory per task, before and after.

    python benchmarks/analytic_heads.py            # CIFAR B0 Inc10 and demo shapes, every head, before and after
    python benchmarks/analytic_heads.py --quick    # the demo shapes only (a smoke run; BENCHMARKS.md left alone)

Random ViT-B features (width 768) for two tasks of a stream: N = 5,000 images of 10 classes per task (CIFAR-100 B0
Inc10) or 250 images of 2 classes (the digits demo). Heads, at their authors' widths:

- RanPAC: a random projection to M = 10,000, ridge on the accumulated Gram matrix, λ chosen per task among 17
  values on a held-out 20 %. Before: one M x M solve per λ, then another; after (carecl.classifiers): every λ from
  one thin SVD of the training rows (or one eigendecomposition), the final solve through a Cholesky factor.
- ACIL: recursive least squares on a random buffer of 8,192 (float64). Before: the Woodbury update written with
  h x h temporaries; after: in place (one addmm_).
- MoAL: an analytic head on a random buffer of 20,000 (float32), its first task a validated ridge inverted in
  float64, later tasks recursive least squares over batches of 64. Before: 17 solves of the 20,000 x 20,000
  system and an explicit inverse (identity matrices built); after: one SVD, one Cholesky inverse, in-place updates.
- FeCAM: a pseudo-inverse of each class's shrunk covariance (768 x 768); measured, unchanged.

Every measurement runs in a fresh process (glibc told to return large blocks at once, so the resident size follows
torch's tensors); per task, the wall seconds of the fit alone and the peak resident memory during it (VmHWM, reset
before the fit: the features, the head's state and every temporary). Results: results/analytic_heads.json, and a section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import common

WIDTH = 768
SHAPES = {"cifar100 B0 Inc10": (5000, 10), "digits demo": (250, 2)}
HEADS = ("ranpac", "acil", "moal", "fecam")
RIDGES = tuple(10.0 ** k for k in range(-8, 9))


# ---------------------------------------------------------------- the formulations before this change

def select_ridge_before(h, y, ridges):
    import torch
    import torch.nn.functional as F

    n_train = int(h.shape[0] * 0.8)
    gram, correlation = h[:n_train].T @ h[:n_train], h[:n_train].T @ y[:n_train]
    eye = torch.eye(h.shape[1], dtype=h.dtype)
    losses = [F.mse_loss(h[n_train:] @ torch.linalg.solve(gram + ridge * eye, correlation), y[n_train:]).item()
              for ridge in ridges]
    return ridges[int(torch.tensor(losses).argmin())]


class RanPACBefore:
    def __init__(self, m: int, n_classes: int) -> None:
        import torch

        self.gram = torch.zeros(m, m, dtype=torch.float64)
        self.correlation = torch.zeros(m, n_classes, dtype=torch.float64)

    def fit_task(self, h, y) -> None:
        import torch

        self.gram += h.T @ h
        self.correlation += h.T @ y
        ridge = select_ridge_before(h, y, RIDGES)
        eye = torch.eye(self.gram.shape[0], dtype=torch.float64)
        self.weight = torch.linalg.solve(self.gram + ridge * eye, self.correlation).T.contiguous()


def woodbury_before(r, x):
    import torch

    inner = torch.eye(x.shape[0], dtype=x.dtype) + x @ r @ x.T
    return r - r @ x.T @ torch.linalg.solve(inner, x @ r)


def moal_first_before(h, y):
    import torch

    ridge = select_ridge_before(h, y, RIDGES)
    gram = (h.T @ h).double() + ridge * torch.eye(h.shape[1], dtype=torch.float64)
    inverse = torch.linalg.inv(gram).to(h.dtype).contiguous()
    return inverse, (0.9 * (inverse @ (h.T @ y))).contiguous()


# ---------------------------------------------------------------- one measurement, in its own process

def features(n: int, n_classes: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_classes
    centres = torch.randn(n_classes, WIDTH, generator=generator)
    return centres[labels] + 0.5 * torch.randn(n, WIDTH, generator=generator), labels


def expanded(feats, width: int, dtype):
    import torch

    generator = torch.Generator().manual_seed(7)
    return torch.relu(feats.to(dtype) @ torch.randn(WIDTH, width, generator=generator, dtype=dtype))


class Timer:
    """The wall seconds and peak resident bytes of each fit."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.peaks: list[int] = []

    def __enter__(self) -> "Timer":
        common.reset_peak_resident()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds.append(time.perf_counter() - self.start)
        self.peaks.append(common.peak_resident_bytes())


def measure(head: str, variant: str, n: int, n_classes: int) -> dict:
    """Fit two tasks of `n` images / `n_classes` classes; seconds and peak memory of each task's fit."""
    import torch
    import torch.nn.functional as F

    from carecl.classifiers import AnalyticClassifier, MahalanobisClassifier, RidgeClassifier, woodbury_update_
    from carecl.methods.moal import first_analytic_fit, rls_update

    torch.set_num_threads(THREADS[0])

    tasks = [features(n, n_classes, seed) for seed in (0, 1)]
    total = 2 * n_classes
    timer = Timer()
    if head == "ranpac":
        model = RanPACBefore(10000, total) if variant == "before" else RidgeClassifier(10000, total)
        for index, (feats, labels) in enumerate(tasks):
            h = expanded(feats, 10000, torch.float64)
            with timer:
                if variant == "before":
                    model.fit_task(h, F.one_hot(labels + index * n_classes, total).double())
                else:
                    model.fit_task(h, labels + index * n_classes)
    elif head == "acil":
        model = AnalyticClassifier(8192, 0.1)
        for index, (feats, labels) in enumerate(tasks):
            x = expanded(feats, 8192, torch.float64)
            with timer:
                if variant == "before":
                    model.inverse = woodbury_before(model.inverse, x)
                else:
                    woodbury_update_(model.inverse, x)
    elif head == "moal":
        feats, labels = tasks[0]
        h = expanded(feats, 20000, torch.float32)
        y = F.one_hot(labels, total).float()
        with timer:
            inverse, weight = (moal_first_before if variant == "before" else
                               lambda h, y: first_analytic_fit(h, y, 0.9))(h, y)
        feats, labels = tasks[1]
        h = expanded(feats, 20000, torch.float32)
        y = F.one_hot(labels + n_classes, total).float()
        with timer:
            for rows in torch.arange(len(h)).split(64):
                if variant == "before":
                    inverse = woodbury_before(inverse, h[rows])
                    weight = weight + inverse @ h[rows].T @ (y[rows] - h[rows] @ weight)
                else:
                    inverse, weight = rls_update(inverse, weight, h[rows], y[rows])
    else:
        model = MahalanobisClassifier(WIDTH)
        for index, (feats, labels) in enumerate(tasks):
            model.grow((index + 1) * n_classes)
            with timer:
                model.fit_classes(feats, labels + index * n_classes, range(index * n_classes, (index + 1) * n_classes))
    return {"head": head, "variant": variant, "n": n, "classes": n_classes, "seconds": timer.seconds,
            "peak_bytes": timer.peaks}


THREADS = [1]


def run_child(head: str, variant: str, n: int, n_classes: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", head, variant, str(n), str(n_classes), str(threads)]
    completed = subprocess.run(command, capture_output=True, text=True, env=common.probe_environment())
    if completed.returncode != 0:
        raise SystemExit(f"{head} {variant} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    if "--child" in sys.argv:
        head, variant, n, n_classes, threads = sys.argv[sys.argv.index("--child") + 1:][:5]
        THREADS[0] = int(threads)
        print(json.dumps(measure(head, variant, int(n), int(n_classes))))
        return 0
    arguments = common.parser(__doc__.splitlines()[0]).parse_args()
    threads = common.set_threads(arguments.threads)
    shapes = {k: v for k, v in SHAPES.items() if not arguments.quick or k == "digits demo"}
    rows = []
    for shape, (n, n_classes) in shapes.items():
        for head in HEADS:
            for variant in (("after",) if head == "fecam" else ("before", "after")):
                row = {"shape": shape, **run_child(head, variant, n, n_classes, threads)}
                rows.append(row)
                print(f"[analytic] {shape:18s} {head:7s} {variant:6s} "
                      f"task 1 {row['seconds'][0]:8.2f} s {row['peak_bytes'][0] / 2**30:6.2f} GiB   "
                      f"task 2 {row['seconds'][1]:8.2f} s {row['peak_bytes'][1] / 2**30:6.2f} GiB",
                      file=sys.stderr, flush=True)
    common.finish("analytic_heads", {"machine": common.machine("cpu"), "rows": rows}, arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
