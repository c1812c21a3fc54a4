"""Classifier heads shared by the methods.

- `CosineClassifier`: one weight block per task, logit = cos(f, w) (CaRE, NoRGa, SLCA-style heads).
- `ScaledCosineHead`: σ · cos(f, w) with a learnable σ (the first-session head of APER / RanPAC).
- `PrototypeClassifier`: cosine similarity to class means (SimpleCIL, APER).
- `RidgeClassifier`: least squares on accumulated Gram and correlation matrices, λ chosen by
  validation (RanPAC).
- `MahalanobisClassifier`: Mahalanobis distance to class means with shrunk, normalised covariances (FeCAM).
- `AnalyticClassifier`: recursive least squares, exactly the joint ridge solution task after task (ACIL).

Every head grows with the classes it has seen and keeps its state in registered buffers, so a
method's `state_tensors()` saves it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear_head(width: int, n_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """A Linear head initialised as timm initialises a ViT's: weights N(0, 0.02) truncated, bias 0; drawn from
    `generator` when given (then row k is the same whatever the number of classes)."""
    head = nn.Linear(width, n_classes)
    nn.init.trunc_normal_(head.weight, std=0.02, generator=generator)
    nn.init.zeros_(head.bias)
    return head


class CosineClassifier(nn.Module):
    """logit_k = cos(f, w_k); unscaled, no bias. Blocks are appended task by task."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.heads = nn.ParameterList()

    @property
    def n_classes(self) -> int:
        return sum(head.shape[0] for head in self.heads)

    def add_block(self, n_classes: int) -> None:
        weight = torch.empty(n_classes, self.in_features)
        nn.init.trunc_normal_(weight, std=0.02)
        if len(self.heads):
            weight = weight.to(self.heads[0].device)
        self.heads.append(nn.Parameter(weight))

    def weight(self) -> torch.Tensor:
        return torch.cat(list(self.heads), dim=0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features, dim=-1), F.normalize(self.weight(), dim=-1))


class ScaledCosineHead(nn.Module):
    """σ · cos(f, w_k) with σ learnable from 1 and w uniform(±1/√d) (PILOT / RanPAC's CosineLinear)."""

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(n_classes, in_features).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, features: Tensor) -> Tensor:
        return self.sigma * F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))


class PrototypeClassifier(nn.Module):
    """Class means of features; score = cosine similarity to each seen class's mean."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(0, in_features))

    def grow(self, n_classes: int) -> None:
        grown = self.prototypes.new_zeros(n_classes, self.prototypes.shape[1])
        grown[: self.prototypes.shape[0]] = self.prototypes
        self.prototypes = grown

    @torch.no_grad()
    def fit_classes(self, features: Tensor, labels: Tensor, classes: range) -> None:
        for class_id in classes:
            self.prototypes[class_id] = features[labels == class_id].mean(0).to(self.prototypes.dtype)

    def forward(self, features: Tensor, n_classes: int) -> Tensor:
        return self.forward_range(features, 0, n_classes)

    def forward_range(self, features: Tensor, low: int, high: int) -> Tensor:
        """Scores of classes [low, high) only (each class's score depends on its prototype alone)."""
        return F.normalize(features, dim=-1) @ F.normalize(self.prototypes[low:high], dim=-1).T


def one_hot(labels: Tensor, n_classes: int, dtype: torch.dtype) -> Tensor:
    return F.one_hot(labels.long(), n_classes).to(dtype)


class RidgeClassifier(nn.Module):
    """W = (G + λI)⁻¹ Q with G = Σ h hᵀ and Q = Σ h yᵀ accumulated over every task (float64).

    λ is chosen per task as RanPAC does: fit on the first 80 % of the task's features, take the
    λ in 10^-8 .. 10^8 with the lowest mean squared error on the other 20 %.
    """

    RIDGES = tuple(10.0 ** k for k in range(-8, 9))

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("gram", torch.zeros(in_features, in_features, dtype=torch.float64))
        self.register_buffer("correlation", torch.zeros(in_features, n_classes, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(n_classes, in_features, dtype=torch.float64))
        self.register_buffer("ridge", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def fit_task(self, features: Tensor, labels: Tensor) -> float:
        """Add a task's features (N, d) and labels, choose λ on them, solve; returns λ."""
        h = features.to(torch.float64)
        y = one_hot(labels, self.correlation.shape[1], torch.float64)
        self.gram += h.T @ h
        self.correlation += h.T @ y
        ridge = select_ridge(h, y, self.RIDGES)
        self.weight = ridge_solve(self.gram, ridge, self.correlation).T.contiguous()
        self.ridge.fill_(ridge)
        return ridge

    def forward(self, features: Tensor, n_classes: int) -> Tensor:
        return features.to(torch.float64) @ self.weight[:n_classes].T


def ridge_solve(gram: Tensor, ridge: float, right: Tensor) -> Tensor:
    """(G + λI)⁻¹ R through one Cholesky factor, the ridge added to a copy's diagonal (no identity matrix built).

    A tiny λ on a rank-deficient G (few images, a wide projection) can leave G + λI numerically indefinite:
    Cholesky then fails and the LU solve the authors' code uses gives the answer instead."""
    shifted = gram.clone()
    shifted.diagonal().add_(ridge)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0:
        return torch.linalg.solve(shifted, right.to(shifted.dtype))
    del shifted
    return torch.cholesky_solve(right.to(factor.dtype), factor)


def select_ridge(h: Tensor, y: Tensor, ridges: tuple[float, ...]) -> float:
    """The λ with the lowest validation MSE: train on the first 80 % of rows, validate on the rest (RanPAC).

    Every λ from one factorisation, in float64: the thin SVD of the training rows H = U S Vᵀ when they are fewer
    than the features (W_λ = V diag(s / (s² + λ)) Uᵀ Y), else the eigendecomposition of their Gram matrix
    (W_λ = Q diag(1 / (e + λ)) Qᵀ HᵀY): one decomposition instead of a solve of the full system per λ."""
    h, y = h.double(), y.double()
    n_train = int(h.shape[0] * 0.8)
    train, valid, targets = h[:n_train], h[n_train:], y[:n_train]
    if n_train < h.shape[1]:
        u, s, vh = torch.linalg.svd(train, full_matrices=False)
        projected, coefficients = valid @ vh.T, u.T @ targets
        shrink = [s / (s.square() + ridge) for ridge in ridges]
    else:
        eigenvalues, q = torch.linalg.eigh(train.T @ train)
        projected, coefficients = valid @ q, q.T @ (train.T @ targets)
        shrink = [1.0 / (eigenvalues.clamp(min=0) + ridge) for ridge in ridges]
    losses = [F.mse_loss((projected * factor) @ coefficients, y[n_train:]).item() for factor in shrink]
    return ridges[int(torch.tensor(losses).argmin())]


class MahalanobisClassifier(nn.Module):
    """FeCAM: per class, the mean and the shrunk, correlation-normalised covariance of L2-normalised
    features; score = −(f − µ_c)ᵀ Σ_c⁺ (f − µ_c), with f L2-normalised too.

    Shrinkage (the authors' ViT code): Σ + α₁·mean(diag Σ)·I + α₂·mean(off-diagonal Σ)·(1 − I), then
    Σ_ij / √(Σ_ii Σ_jj). The pseudo-inverse of each class is computed once, when the class is fitted.
    """

    def __init__(self, in_features: int, alpha1: float = 10.0, alpha2: float = 10.0) -> None:
        super().__init__()
        self.alpha1, self.alpha2 = alpha1, alpha2
        self.register_buffer("means", torch.zeros(0, in_features))
        self.register_buffer("precisions", torch.zeros(0, in_features, in_features))

    def grow(self, n_classes: int) -> None:
        d = self.means.shape[1]
        means, precisions = self.means.new_zeros(n_classes, d), self.precisions.new_zeros(n_classes, d, d)
        means[: self.means.shape[0]], precisions[: self.precisions.shape[0]] = self.means, self.precisions
        self.means, self.precisions = means, precisions

    @torch.no_grad()
    def fit_classes(self, features: Tensor, labels: Tensor, classes: range) -> None:
        normalised = F.normalize(features.to(torch.float64), dim=-1)
        for class_id in classes:
            samples = normalised[labels == class_id]
            self.means[class_id] = samples.mean(0).to(self.means.dtype)
            covariance = normalise_covariance(shrink_covariance(torch.cov(samples.T), self.alpha1, self.alpha2))
            self.precisions[class_id] = torch.linalg.pinv(covariance, hermitian=True).to(self.precisions.dtype)

    def forward(self, features: Tensor, n_classes: int) -> Tensor:
        return self.forward_range(features, 0, n_classes)

    def forward_range(self, features: Tensor, low: int, high: int) -> Tensor:
        """Scores of classes [low, high) only (each class's score depends on its own mean and precision)."""
        difference = F.normalize(features.to(self.means.dtype), dim=-1)[:, None, :] - self.means[None, low:high]
        # (B, C, d) · (C, d, d) · (B, C, d): one squared distance per sample and class.
        distance = torch.einsum("bcd,cde,bce->bc", difference, self.precisions[low:high], difference)
        return -distance


def shrink_covariance(covariance: Tensor, alpha1: float, alpha2: float) -> Tensor:
    d = covariance.shape[0]
    eye = torch.eye(d, dtype=covariance.dtype, device=covariance.device)
    diagonal_mean = covariance.diagonal().mean()
    off_diagonal = covariance * (1 - eye)
    nonzero = off_diagonal != 0
    off_diagonal_mean = off_diagonal[nonzero].mean() if nonzero.any() else covariance.new_zeros(())
    return covariance + alpha1 * diagonal_mean * eye + alpha2 * off_diagonal_mean * (1 - eye)


def normalise_covariance(covariance: Tensor) -> Tensor:
    deviation = covariance.diagonal().sqrt()
    return covariance / (deviation[:, None] * deviation[None, :])


def woodbury_update_(inverse: Tensor, rows: Tensor) -> None:
    """R ← (R⁻¹ + XᵀX)⁻¹ = R − R Xᵀ (I + X R Xᵀ)⁻¹ X R in place: O(h² n) work and no h × h temporary (R symmetric)."""
    projected = inverse @ rows.T  # (h, n) = R Xᵀ
    inner = rows @ projected
    inner.diagonal().add_(1.0)
    inverse.addmm_(projected, torch.linalg.solve(inner, projected.T), alpha=-1.0)


class AnalyticClassifier(nn.Module):
    """ACIL's recursive least squares: after every task W equals the ridge solution on all data so far,

        W = (Σ_t X_tᵀX_t + γI)⁻¹ Σ_t X_tᵀY_t,

    updated from the new task's X, Y alone with the Woodbury identity through R = (Σ XᵀX + γI)⁻¹.
    Classes added later get zero columns in W (their rows of Y were zero before).
    """

    def __init__(self, in_features: int, gamma: float) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(in_features, 0, dtype=torch.float64))
        self.register_buffer("inverse", torch.eye(in_features, dtype=torch.float64) / gamma)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "weight")
        if saved is not None:  # W has a column per class fitted so far: its width comes from the saved state
            self.weight = self.weight.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit_task(self, features: Tensor, labels: Tensor, n_classes: int) -> None:
        x = features.to(torch.float64)
        if n_classes > self.weight.shape[1]:
            self.weight = torch.cat([self.weight, self.weight.new_zeros(self.weight.shape[0], n_classes - self.weight.shape[1])], 1)
        y = one_hot(labels, n_classes, torch.float64)
        woodbury_update_(self.inverse, x)
        self.weight = self.weight + self.inverse @ x.T @ (y - x @ self.weight)

    def forward(self, features: Tensor, n_classes: int) -> Tensor:
        return features.to(torch.float64) @ self.weight[:, :n_classes]
