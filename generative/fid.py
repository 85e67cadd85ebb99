"""Sample quality without the internet: Frechet distance in the features of a small classifier.

Inception weights cannot be downloaded here (nor on many clusters), so each data set gets its own
small CNN classifier, trained on its train split and cached on disk (by data set and seed). Then

    FID   = ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))   (Heusel et al. 2017)

between the classifier's penultimate features of generated images and of held-out real images;
`fid_floor` is the same distance from the train split to held-out, the best a generator can hope
for; `classifier_score` is exp(E_x KL(p(y | x) || p(y))), the Inception Score analogue.
These numbers compare models on the same data set with the same classifier; they are NOT
comparable to Inception-FID values from papers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from generative.data import Dataset
from runctx import RunContext
from runctx.context import stream_torch_generator

FEATURES = 128
# What scoring logs, into the runs of the models it scores.
METRICS = ("eval/fid", "eval/classifier_score", "eval/fid_floor", "eval/fid_classifier_accuracy")


class FIDConfig(BaseModel):
    """How a generative model's samples are scored (GAN and VAE alike)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(True, description="Score eval/fid (needs a labelled data set).")
    every: int = Field(5, ge=0, description="Every N epochs, and at the end (0: end only).")
    samples: int = Field(1000, ge=2, description="Generated images scored.")
    classifier_epochs: int = Field(5, gt=0, description="Epochs of the feature classifier.")
    cache: str = Field("~/.cache/rlgen/fid", description="Classifier cache, by data set and seed.")

    def due(self, epoch: int, epochs: int) -> bool:
        return self.enabled and (
            epoch == epochs - 1 or bool(self.every and (epoch + 1) % self.every == 0)
        )


def setup(config: FIDConfig, ds: Dataset, spec: BaseModel, ctx: RunContext) -> Scorer | None:
    """The scorer for a run (None when disabled or the data set has no labels); logs the classifier
    as an artifact and eval/fid_floor at step 0."""
    if not config.enabled:
        return None
    if ds.y_train is None:
        ctx.log.warning("no eval/fid: the data set has no labels to train FID's feature classifier")
        return None
    if min(len(ds.x_train), len(ds.x_test)) < 2:  # a covariance needs two examples
        ctx.log.warning("no eval/fid: the data set has fewer than 2 training or held-out images")
        return None
    score = scorer(
        ds, ctx.seed, Path(config.cache), spec.model_dump_json(), config.classifier_epochs
    )
    ctx.log_artifact(score.path, "fid_classifier")
    ctx.log_metrics(
        {"eval/fid_floor": score.floor, "eval/fid_classifier_accuracy": score.accuracy}, step=0
    )
    return score


class Classifier(torch.nn.Module):
    """Two conv blocks and a 128-unit penultimate layer, sized for small grey images."""

    def __init__(self, image_shape: tuple[int, int], n_classes: int):
        super().__init__()
        self.image_shape = image_shape
        h, w = image_shape
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
        )
        self.features = torch.nn.Sequential(
            torch.nn.Linear(64 * (h // 2) * (w // 2), FEATURES), torch.nn.ReLU()
        )
        self.head = torch.nn.Linear(FEATURES, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: (B, H*W) -> (B, 128)."""
        return self.features(self.conv(x.view(-1, 1, *self.image_shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


@dataclass
class Scorer:
    classifier: Classifier
    path: Path  # the cached weights (log them as an artifact)
    accuracy: float  # held-out accuracy of the classifier
    real_mu: torch.Tensor  # held-out feature statistics
    real_cov: torch.Tensor
    floor: float  # FID(train split, held-out)

    @torch.no_grad()
    def fid(self, images: torch.Tensor) -> float:
        mu, cov = feature_stats(self.classifier.embed(images.cpu()))
        return frechet_distance(mu, cov, self.real_mu, self.real_cov)

    @torch.no_grad()
    def classifier_score(self, images: torch.Tensor) -> float:
        p = F.softmax(self.classifier(images.cpu()), dim=1).double()  # (N, classes)
        marginal = p.mean(0, keepdim=True)
        kl = (p * (torch.log(p + 1e-12) - torch.log(marginal + 1e-12))).sum(1)
        return float(torch.exp(kl.mean()))


def feature_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = f.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2).

    Tr((S1 S2)^(1/2)) is computed as the sum of sqrt(eigenvalues) of the symmetric
    S1^(1/2) S2 S1^(1/2), which is stable where a general matrix square root is not.
    """
    if not all(bool(t.isfinite().all()) for t in (mu1, cov1, mu2, cov2)):
        return float("nan")  # e.g. a generator that diverged; eigh would raise
    d = len(cov1)
    # eigh may not converge on a badly conditioned matrix: then once more with both
    # covariances + jitter * I, which leaves the distance of a set to itself 0.
    for jitter in (0.0, 1e-6 * float(cov1.trace() + cov2.trace()) / d):
        eye = torch.eye(d, dtype=cov1.dtype)
        try:
            vals, vecs = torch.linalg.eigh(cov1 + jitter * eye)
            sqrt1 = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
            middle = torch.linalg.eigvalsh(sqrt1 @ (cov2 + jitter * eye) @ sqrt1)
        except torch.linalg.LinAlgError:
            continue
        traces = cov1.trace() + cov2.trace() + 2 * jitter * d
        return float((mu1 - mu2).pow(2).sum() + traces - 2 * middle.clamp_min(0).sqrt().sum())
    return float("nan")


def scorer(ds: Dataset, seed: int, cache_dir: Path, dataset_key: str, epochs: int = 5) -> Scorer:
    """The data set's classifier (trained once, then loaded from the cache) and its statistics."""
    if ds.y_train is None or ds.y_test is None:
        raise ValueError("FID needs a labelled data set to train its feature classifier")
    n_classes = int(max(ds.y_train.max(), ds.y_test.max())) + 1
    key = hashlib.sha256(json.dumps([dataset_key, seed, epochs, list(ds.image_shape)]).encode())
    path = cache_dir.expanduser() / f"classifier-{key.hexdigest()[:16]}.pt"
    model = Classifier(ds.image_shape, n_classes)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        train_classifier(model, ds, seed, epochs)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)  # atomic: concurrent trials never read half a file
    model.eval()
    with torch.no_grad():
        accuracy = float((model(ds.x_test).argmax(1) == ds.y_test).float().mean())
        real_mu, real_cov = feature_stats(model.embed(ds.x_test))
        n = min(len(ds.x_train), len(ds.x_test))
        train_mu, train_cov = feature_stats(model.embed(ds.x_train[:n]))
    floor = frechet_distance(train_mu, train_cov, real_mu, real_cov)
    return Scorer(model, path, accuracy, real_mu, real_cov, floor)


def train_classifier(model: Classifier, ds: Dataset, seed: int, epochs: int) -> None:
    # A stream of its own (as `RunContext.torch_generator` makes them), keyed by the seed alone
    # so that the classifier, cached by seed and data, is the same in every run that shares it.
    g = stream_torch_generator(seed, "fid_classifier")
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.kaiming_uniform_(m.weight, nonlinearity="relu", generator=g)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert ds.y_train is not None
    for _ in range(epochs):
        for idx in torch.randperm(len(ds.x_train), generator=g).split(64):
            loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
