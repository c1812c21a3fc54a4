"""Gaussian class statistics: per-class feature sums (reducible over ranks), means, covariances and
their Cholesky factors, and batched sampling from them (CaRE §6; alignment.py trains on the samples).

Sampling follows `torch.distributions.MultivariateNormal(mean, cov).sample`, i.e.
`mean + L @ eps` with `L = cholesky(cov)`, but the factors are computed once per class (in
float64, batched) and all classes are sampled together with one batched matmul.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from carecl.distributed import Distributed

STORAGE_MODES = ("covariance", "variance")
# Added to every covariance (or variance) so a class with few samples still has a density.
COVARIANCE_RIDGE = 1e-4
# Jitter tried, relative to the mean diagonal, when a float64 Cholesky still fails.
_JITTER_STEPS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Classes per batched Cholesky call: bounds the float64 temporaries (64 x 768 x 768 ~ 300 MB).
_CHOLESKY_CHUNK = 64
# Classes per batched sampling matmul: bounds the noise tensor drawn at once.
_SAMPLE_CHUNK = 128


def class_feature_sums(features: torch.Tensor, storage: str = "covariance") -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, sum x, sum x x^T) in float64 (sum x^2 for "variance"): all-reduce these across
    ranks, then `GaussianClassStatistics.add_from_sums`, to get exactly the global statistics."""
    features = features.detach().to(torch.float64)
    second = features.T @ features if storage == "covariance" else (features * features).sum(0)
    return features.shape[0], features.sum(0), second


class ClassFeatureSums:
    """count, Σx and Σxxᵀ (Σx² for "variance") of each class in [low, high), in float64.

    Fed batch by batch, summed over ranks with `reduce_` when each rank saw a shard, then
    turned into statistics: the same numbers whichever way the samples were split.
    """

    def __init__(self, low: int, high: int, width: int, storage: str = "covariance") -> None:
        self.low, self.high, self.storage = low, high, storage
        classes = high - low
        self.counts = torch.zeros(classes, dtype=torch.float64)
        self.sums = torch.zeros(classes, width, dtype=torch.float64)
        shape = (classes, width, width) if storage == "covariance" else (classes, width)
        self.seconds = torch.zeros(shape, dtype=torch.float64)

    def add(self, features: torch.Tensor, class_ids: torch.Tensor) -> None:
        """(n, width) features of samples whose class ids lie in [low, high)."""
        features = features.detach().to("cpu", torch.float64)
        local = class_ids.to("cpu", torch.long) - self.low
        self.counts.index_add_(0, local, torch.ones_like(local, dtype=torch.float64))
        self.sums.index_add_(0, local, features)
        for index in local.unique().tolist():
            _, _, second = class_feature_sums(features[local == index], self.storage)
            self.seconds[index] += second

    def reduce_(self, distributed: Distributed) -> None:
        """Sum over ranks (a rank that saw none of these samples still takes part, with zeros)."""
        for tensor in (self.counts, self.sums, self.seconds):
            distributed.all_reduce_sum_(tensor)

    def store_into(self, statistics: "GaussianClassStatistics") -> None:
        """Statistics of every class that has at least one sample."""
        for index in torch.nonzero(self.counts).flatten().tolist():
            statistics.add_from_sums(self.low + index, int(self.counts[index]), self.sums[index], self.seconds[index])


def _standard_normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """N(0, 1) noise from `generator` (drawn on its device, then moved), never reseeding anything."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


@dataclass
class StackedGaussians:
    """Means and sampling factors of several classes stacked on one device, ready to sample.

    `factors` is (K, C, C) lower-triangular Cholesky factors, or (K, C) standard deviations
    when only variances are stored.
    """

    class_ids: torch.Tensor
    means: torch.Tensor
    factors: torch.Tensor

    def sample(
        self,
        n_per_class: int,
        mean_scale: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K * n, C) samples, class-major (class k fills rows k*n .. (k+1)*n-1), and labels."""
        n_classes, dim = self.means.shape
        means = self.means if mean_scale is None else self.means * mean_scale.to(self.means).unsqueeze(1)
        out = torch.empty(n_classes, n_per_class, dim, dtype=self.means.dtype, device=self.means.device)
        for start in range(0, n_classes, _SAMPLE_CHUNK):
            chunk = slice(start, start + _SAMPLE_CHUNK)
            eps = _standard_normal(tuple(out[chunk].shape), generator, self.means.device).to(out.dtype)
            if self.factors.dim() == 3:
                # mean + eps @ L^T == mean + L @ eps per sample, as MultivariateNormal does.
                torch.baddbmm(means[chunk].unsqueeze(1), eps, self.factors[chunk].transpose(1, 2), out=out[chunk])
            else:
                out[chunk] = means[chunk].unsqueeze(1) + eps * self.factors[chunk].unsqueeze(1)
        labels = self.class_ids.repeat_interleave(n_per_class)
        return out.reshape(n_classes * n_per_class, dim), labels


class GaussianClassStatistics:
    """Per-class feature mean and covariance (+ridge·I, 1e-4 by default) or variance (+ridge); one Cholesky
    factor per class, computed once (float64, batched) on first use and reused.

    Statistics are kept in float32 on `device` (CPU by default: 1000 classes of width 768 hold
    2.4 GB of covariances). Adding a class id again replaces its statistics (CaRE recomputes
    the current task's classes after each half of its training).
    """

    def __init__(self, storage: str = "covariance", device: torch.device | str = "cpu",
                 ridge: float = COVARIANCE_RIDGE) -> None:
        if storage not in STORAGE_MODES:
            raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")
        self.storage = storage
        # Added to every covariance diagonal (or variance); SSIAT's code uses 1e-3.
        self.ridge = ridge
        self.device = torch.device(device)
        self._counts: dict[int, int] = {}
        self._means: dict[int, torch.Tensor] = {}
        # Covariance (C, C) or variance (C,), ridge included.
        self._seconds: dict[int, torch.Tensor] = {}
        # Cholesky factor (C, C) or standard deviation (C,) per class: derived, so not in state_dict.
        # Each is a row of one stacked table, so alignment reads all classes without copying them.
        self._factors = _FactorTable()
        # (n, C) means of classes 0..n-1 on a device, kept until a mean changes (MOS / HiDe regulariser reads).
        self._mean_table: torch.Tensor | None = None

    # -- adding classes

    def add_class(self, class_id: int, features: torch.Tensor) -> None:
        """Statistics of one class from its (n, C) features, n >= 1 (n == 1: covariance ridge·I)."""
        if features.dim() != 2 or features.shape[0] < 1:
            raise ValueError(f"class {class_id}: features must be (n >= 1, C), got shape {tuple(features.shape)}")
        features = features.detach().to(torch.float64)
        count = features.shape[0]
        mean = features.mean(0)
        centered = features - mean
        # Unbiased (n - 1), as torch.cov / np.cov; a single sample has zero scatter.
        divisor = max(count - 1, 1)
        if self.storage == "covariance":
            second = centered.T @ centered / divisor
        else:
            second = (centered * centered).sum(0) / divisor
        self._store(class_id, count, mean, second)

    def add_from_sums(
        self, class_id: int, count: int, feature_sum: torch.Tensor, second_moment_sum: torch.Tensor
    ) -> None:
        """Statistics from `class_feature_sums` output (possibly summed over ranks).

        `second_moment_sum` is sum x x^T (C, C); in "variance" mode sum x^2 (C,) is enough.
        """
        count = int(count)
        if count < 1:
            raise ValueError(f"class {class_id}: count must be >= 1, got {count}")
        mean = feature_sum.detach().to(torch.float64) / count
        second_sum = second_moment_sum.detach().to(torch.float64)
        if self.storage == "covariance":
            if second_sum.dim() != 2:
                raise ValueError(f"class {class_id}: covariance storage needs sum x x^T of shape (C, C)")
            scatter = second_sum - count * torch.outer(mean, mean)
        else:
            diagonal = second_sum.diagonal() if second_sum.dim() == 2 else second_sum
            # Cancellation can leave tiny negatives where the true variance is 0.
            scatter = (diagonal - count * mean * mean).clamp_min(0.0)
        if count == 1:
            scatter = torch.zeros_like(scatter)
        self._store(class_id, count, mean, scatter / max(count - 1, 1))

    def _store(self, class_id: int, count: int, mean: torch.Tensor, second: torch.Tensor) -> None:
        class_id = int(class_id)
        widths = {m.shape[0] for c, m in self._means.items() if c != class_id}
        if widths and mean.shape[0] not in widths:
            raise ValueError(f"class {class_id}: feature width {mean.shape[0]} != {widths.pop()} of stored classes")
        if not (torch.isfinite(mean).all() and torch.isfinite(second).all()):
            raise ValueError(f"class {class_id}: features contain NaN or inf")
        if self.storage == "covariance":
            second = second + self.ridge * torch.eye(mean.shape[0], dtype=second.dtype, device=second.device)
        else:
            second = second + self.ridge
        self._counts[class_id] = count
        self._means[class_id] = mean.to(self.device, torch.float32)
        self._seconds[class_id] = second.to(self.device, torch.float32)
        self._factors.forget(class_id)
        self._mean_table = None

    def shift_means(self, class_ids: Sequence[int], offsets: torch.Tensor) -> None:
        """Move stored means by (len(class_ids), C) offsets (SSIAT's semantic-shift update); covariances
        and their factors stay as they are."""
        for row, class_id in enumerate(class_ids):
            index = self._require(class_id)
            self._means[index] = self._means[index] + offsets[row].to(self._means[index])
        self._mean_table = None

    # -- reading

    def mean_table(self, n_classes: int, device: torch.device | str) -> torch.Tensor:
        """(n_classes, C) float32 means of classes 0..n_classes-1 on `device` ((0, 0) for none), cached until a
        mean changes: a training step can read it every batch."""
        device = torch.device(device)
        table = self._mean_table
        if table is None or len(table) != n_classes or table.device != device:
            means = [self.mean(c) for c in range(n_classes)]
            table = torch.stack(means).to(device) if means else torch.zeros(0, 0, device=device)
            self._mean_table = table
        return table

    @property
    def class_ids(self) -> list[int]:
        return sorted(self._means)

    def __len__(self) -> int:
        return len(self._means)

    def __contains__(self, class_id: int) -> bool:
        return int(class_id) in self._means

    def _require(self, class_id: int) -> int:
        class_id = int(class_id)
        if class_id not in self._means:
            raise KeyError(f"no statistics for class {class_id} (stored: {len(self)} classes)")
        return class_id

    def count(self, class_id: int) -> int:
        return self._counts[self._require(class_id)]

    def mean(self, class_id: int) -> torch.Tensor:
        return self._means[self._require(class_id)]

    def covariance(self, class_id: int) -> torch.Tensor:
        """(C, C) covariance, ridge included; diagonal in "variance" mode."""
        second = self._seconds[self._require(class_id)]
        return second if self.storage == "covariance" else torch.diag(second)

    def factor(self, class_id: int) -> torch.Tensor:
        """Lower Cholesky factor of the covariance (standard deviations in "variance" mode)."""
        class_id = self._require(class_id)
        self._ensure_factors([class_id])
        return self._factors.get(class_id).clone()

    # -- sampling

    def _ensure_factors(self, class_ids: Sequence[int]) -> None:
        missing = [c for c in class_ids if c not in self._factors]
        if self.storage == "variance":
            for c in missing:
                self._factors.put(c, self._seconds[c].sqrt())
            return
        for start in range(0, len(missing), _CHOLESKY_CHUNK):
            chunk = missing[start : start + _CHOLESKY_CHUNK]
            covariances = torch.stack([self._seconds[c] for c in chunk]).to(torch.float64)
            factors, info = torch.linalg.cholesky_ex(covariances)
            for c, factor, failed, covariance in zip(chunk, factors, info.tolist(), covariances):
                if failed or not torch.isfinite(factor).all():
                    factor = _jittered_cholesky(c, covariance)
                self._factors.put(c, factor.to(torch.float32))

    def stacked(self, class_ids: Sequence[int], device: torch.device | str | None = None) -> StackedGaussians:
        """Means and factors of `class_ids` stacked on `device` (one copy, reused across epochs)."""
        ids = [self._require(c) for c in class_ids]
        if not ids:
            raise ValueError("no class ids to sample from")
        self._ensure_factors(ids)
        device = self.device if device is None else torch.device(device)
        return StackedGaussians(
            class_ids=torch.tensor(ids, dtype=torch.long, device=device),
            means=torch.stack([self._means[c] for c in ids]).to(device),
            factors=self._factors.rows(ids).to(device),
        )

    def sample(
        self,
        class_ids: Sequence[int],
        n_per_class: int,
        mean_scale: Mapping[int, float] | torch.Tensor | Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`n_per_class` draws from N(mean_c * mean_scale_c, cov_c) per class, class-major, with labels."""
        ids = [int(c) for c in class_ids]
        stacked = self.stacked(ids, device)
        return stacked.sample(n_per_class, _scale_vector(mean_scale, ids), generator)

    # -- persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); the storage mode is the name of the last key."""
        ids = self.class_ids
        second_key = "covariances" if self.storage == "covariance" else "variances"
        if not ids:
            shape = (0, 0, 0) if self.storage == "covariance" else (0, 0)
            return {"class_ids": torch.zeros(0, dtype=torch.long), "counts": torch.zeros(0, dtype=torch.long),
                    "means": torch.zeros(0, 0), second_key: torch.zeros(shape)}
        return {
            "class_ids": torch.tensor(ids, dtype=torch.long),
            "counts": torch.tensor([self._counts[c] for c in ids], dtype=torch.long),
            "means": torch.stack([self._means[c] for c in ids]).cpu(),
            second_key: torch.stack([self._seconds[c] for c in ids]).cpu(),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        second_key = "covariances" if self.storage == "covariance" else "variances"
        expected = {"class_ids", "counts", "means", second_key}
        if set(state) != expected:
            raise ValueError(
                f"class statistics state for storage {self.storage!r} needs keys {sorted(expected)}, got {sorted(state)}"
            )
        ids = state["class_ids"].tolist()
        for name in ("counts", "means", second_key):
            if state[name].shape[0] != len(ids):
                raise ValueError(f"class statistics state: {name!r} has {state[name].shape[0]} rows for {len(ids)} classes")
        self._counts, self._means, self._seconds, self._factors = {}, {}, {}, _FactorTable()
        self._mean_table = None
        for row, c in enumerate(ids):
            self._counts[c] = int(state["counts"][row])
            self._means[c] = state["means"][row].to(self.device).clone()
            self._seconds[c] = state[second_key][row].to(self.device).clone()


class _FactorTable:
    """Per-class rows of one stacked (capacity, ...) tensor, in order of first addition.

    Classes added in order 0..n-1 (every benchmark protocol) are read back as a view of the first
    n rows: alignment at 1000 classes then uses the factors in place instead of stacking 2.4 GB of
    them on every call. Capacity grows by 1/4 when full; a replaced class reuses its row.
    """

    def __init__(self) -> None:
        self.table: torch.Tensor | None = None
        self.size = 0
        self.row_of: dict[int, int] = {}
        self.valid: set[int] = set()

    def __contains__(self, class_id: int) -> bool:
        return class_id in self.valid

    def forget(self, class_id: int) -> None:
        self.valid.discard(class_id)

    def get(self, class_id: int) -> torch.Tensor:
        return self.table[self.row_of[class_id]]

    def put(self, class_id: int, factor: torch.Tensor) -> None:
        row = self.row_of.get(class_id)
        if row is None:
            row = self.row_of[class_id] = self._new_row(factor)
        self.table[row] = factor
        self.valid.add(class_id)

    def _new_row(self, like: torch.Tensor) -> int:
        if self.table is None or self.table.shape[1:] != like.shape or self.table.device != like.device:
            self.table, self.size, self.row_of, self.valid = like.new_empty((1, *like.shape)), 0, {}, set()
        if self.size == self.table.shape[0]:
            grown = self.table.new_empty((self.size + max(1, self.size // 4), *self.table.shape[1:]))
            grown[: self.size] = self.table[: self.size]
            self.table = grown
        self.size += 1
        return self.size - 1

    def rows(self, class_ids: Sequence[int]) -> torch.Tensor:
        """(len, ...) factors of `class_ids`: a view when they occupy consecutive rows in order."""
        rows = [self.row_of[c] for c in class_ids]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return self.table[rows[0] : rows[0] + len(rows)]
        return self.table[torch.tensor(rows, device=self.table.device)]


def _jittered_cholesky(class_id: int, covariance: torch.Tensor) -> torch.Tensor:
    """float64 Cholesky with growing diagonal jitter; warns naming the class, or raises."""
    scale = covariance.diagonal().abs().mean().clamp_min(1e-12).item()
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    for relative in _JITTER_STEPS:
        jitter = relative * scale
        factor, info = torch.linalg.cholesky_ex(covariance + jitter * eye)
        if int(info) == 0 and torch.isfinite(factor).all():
            warnings.warn(
                f"class {class_id}: covariance is not positive definite even in float64; "
                f"sampling from covariance + {jitter:.3g}*I instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return factor
    raise ValueError(
        f"class {class_id}: covariance is not positive definite even with jitter "
        f"{_JITTER_STEPS[-1] * scale:.3g}*I; check that class's features"
    )


def _scale_vector(
    mean_scale: Mapping[int, float] | torch.Tensor | Sequence[float] | None, class_ids: list[int]
) -> torch.Tensor | None:
    """Per-class mean scales aligned with `class_ids` (a mapping is looked up by class id)."""
    if mean_scale is None:
        return None
    if isinstance(mean_scale, Mapping):
        return torch.tensor([float(mean_scale[c]) for c in class_ids], dtype=torch.float32)
    scales = torch.as_tensor(mean_scale, dtype=torch.float32).flatten()
    if scales.shape[0] != len(class_ids):
        raise ValueError(f"mean_scale has {scales.shape[0]} entries for {len(class_ids)} classes")
    return scales
