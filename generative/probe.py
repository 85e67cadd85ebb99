"""Linear probes: how much label information a model's features carry."""

from __future__ import annotations

from collections.abc import Callable

import torch

from generative.data import Dataset


def probe_accuracy(features: Callable[[torch.Tensor], torch.Tensor], ds: Dataset) -> float | None:
    """Logistic regression on `features(x)`: fitted on the train split, scored on held-out.

    None when the data set has no labels.
    """
    if ds.y_train is None or ds.y_test is None:
        return None
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with torch.no_grad():
        f_train, f_test = (features(x).cpu().numpy() for x in (ds.x_train, ds.x_test))
    # Standardised features: the probe measures what the features encode, not their scale.
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=1.0))
    clf.fit(f_train, ds.y_train.numpy())
    return float(clf.score(f_test, ds.y_test.numpy()))
