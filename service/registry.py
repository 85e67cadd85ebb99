"""The closed table of algorithms. A spec names a key; nothing else can be imported through it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from agents import policy_iteration, value_iteration
from generative import autoencoder, dbn, gan, rbm, vae
from service.context import RunContext


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: Literal["rl", "generative"]
    summary: str
    config: type[BaseModel]
    train: Callable[[Any, RunContext], None]
    tabular: bool = False  # needs an env with a transition model (unwrapped.P)
    needs_labels: bool = False  # needs a labelled data set


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in [
        Algorithm(
            "value_iteration",
            "rl",
            "Value iteration with the Bellman optimality backup.",
            value_iteration.Config,
            value_iteration.train,
            tabular=True,
        ),
        Algorithm(
            "policy_iteration",
            "rl",
            "Policy iteration, exact or iterative evaluation.",
            policy_iteration.Config,
            policy_iteration.train,
            tabular=True,
        ),
        Algorithm(
            "rbm",
            "generative",
            "Restricted Boltzmann machine trained by CD-k or persistent CD.",
            rbm.Config,
            rbm.train,
        ),
        Algorithm(
            "dbn",
            "generative",
            "Deep belief net: greedy RBM pretraining, then supervised fine-tuning.",
            dbn.Config,
            dbn.train,
            needs_labels=True,
        ),
        Algorithm(
            "autoencoder",
            "generative",
            "Deep autoencoder: plain, sparse, denoising or contractive.",
            autoencoder.Config,
            autoencoder.train,
        ),
        Algorithm(
            "vae",
            "generative",
            "Variational autoencoder (MLP or conv), with the IWAE likelihood bound.",
            vae.Config,
            vae.train,
        ),
        Algorithm(
            "gan",
            "generative",
            "GAN, MLP or DCGAN, non-saturating or WGAN-GP; classifier-feature FID.",
            gan.Config,
            gan.train,
            needs_labels=True,  # the FID feature classifier is trained on the labels
        ),
    ]
}
