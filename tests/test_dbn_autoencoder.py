"""DBN and autoencoders: the maths of the penalties, pretraining, and short learning runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from generative import autoencoder as ae
from generative import data, dbn
from runctx import RunContext


def run(train, config, tmp_path: Path, dataset=None):  # type: ignore[no-untyped-def]
    ctx = RunContext.in_memory(workdir=tmp_path, dataset=dataset or data.DigitsDataset(), seed=0)
    ctx.timer.start()
    train(config, ctx)
    ctx.close()
    return ctx


def test_contractive_penalty_is_the_jacobian_frobenius_norm() -> None:
    g = torch.Generator().manual_seed(0)
    model = ae.AutoEncoder([7, 5], tied=False, g=g).double()
    x = torch.rand(3, 7, dtype=torch.float64, generator=g)
    config = ae.Config(variant="contractive", contractive_weight=1.0)
    hs = model.encode(x)
    closed_form = ae.penalty(config, list(model.enc_w), hs)
    jacobians = [
        torch.autograd.functional.jacobian(lambda v: model.encode(v[None])[0][0], row) for row in x
    ]
    expected = torch.stack([(j**2).sum() for j in jacobians]).mean()
    torch.testing.assert_close(closed_form, expected)


def test_sparse_penalty_is_kl_to_the_target() -> None:
    config = ae.Config(variant="sparse", sparsity_target=0.1, sparsity_weight=1.0)
    h = torch.tensor([[0.1, 0.5], [0.1, 0.5]])
    rho, rho_hat = 0.1, torch.tensor(0.5)
    kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
    torch.testing.assert_close(ae.penalty(config, [torch.zeros(2, 2)], [h]), kl)  # unit 0: KL 0


def test_masking_noise_zeroes_the_asked_fraction() -> None:
    config = ae.Config(variant="denoising", noise=0.3)
    x = torch.ones(200, 100)
    corrupted = ae.corrupt(config, x, torch.Generator().manual_seed(0))
    assert abs(float((corrupted == 0).float().mean()) - 0.3) < 0.02
    assert ae.corrupt(ae.Config(variant="plain"), x, torch.Generator()) is x


def test_tied_decoder_uses_the_encoder_transposes() -> None:
    model = ae.AutoEncoder([6, 4, 3], tied=True, g=torch.Generator().manual_seed(0))
    assert len(model.dec_w) == 0
    h = torch.rand(2, 3)
    torch.testing.assert_close(model.decode_layer(h, 1), h @ model.enc_w[1].T + model.dec_b[1])


@pytest.mark.parametrize("variant", ["plain", "sparse", "denoising", "contractive"])
def test_each_variant_learns(tmp_path: Path, variant: str) -> None:
    config = ae.Config(
        variant=variant,
        layers=[64, 16],
        epochs=8,
        pretrain=variant == "denoising",
        pretrain_epochs=2,
        tied=variant == "sparse",
    )
    ctx = run(ae.train, config, tmp_path)
    recon = [v for _, v in ctx.writer.metrics["eval/recon_loss"]]
    assert recon[-1] < 0.8 * recon[0]
    # A 16-unit code (a sparse one has ~1 unit on) still separates the ten digits well.
    assert ctx.writer.metrics["eval/probe_accuracy"][-1][1] > 0.8
    if variant == "denoising":
        assert "pretrain/layer1/loss" in ctx.writer.metrics
    assert {p.name for p, _ in ctx.writer.artifacts} >= {"reconstructions.png"}


def test_dbn_pretraining_initialises_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = dbn.Config(
        layers=[32, 16], finetune_epochs=1, pretraining=dbn.PretrainConfig(epochs=2, batch_size=20)
    )
    ds = data.load(data.DigitsDataset(), 0)
    ctx = RunContext.in_memory(workdir=tmp_path, seed=0)
    net = dbn.build_network([64, 32, 16], 10, torch.Generator().manual_seed(0))
    captured = []
    real_fit = dbn.rbm.fit

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        model, transform = real_fit(*args, **kwargs)
        captured.append(model)
        return model, transform

    monkeypatch.setattr(dbn.rbm, "fit", spy)
    dbn.pretrain(config, ds, net, ctx)
    ctx.close()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert len(captured) == 2
    for rbm_model, linear in zip(captured, linears, strict=False):
        torch.testing.assert_close(linear.weight, rbm_model.W.T)
        torch.testing.assert_close(linear.bias, rbm_model.c)
    assert {"pretrain/layer0/train/recon_error", "pretrain/layer1/train/recon_error"} <= set(
        ctx.writer.metrics
    )


@pytest.mark.parametrize("pretrain", [True, False])
def test_dbn_fine_tuning_classifies_digits(tmp_path: Path, pretrain: bool) -> None:
    # On 8x8 digits a few pretraining epochs leave the top features too uniform to fine-tune
    # from (accuracy stays near chance); 15 a layer are enough.
    config = dbn.Config(
        layers=[128, 64],
        pretrain=pretrain,
        finetune_epochs=20,
        pretraining=dbn.PretrainConfig(epochs=15, batch_size=20),
    )
    ctx = run(dbn.train, config, tmp_path)
    assert ctx.writer.metrics["eval/accuracy"][-1][1] > 0.85
    assert ("pretrain/layer0/train/recon_error" in ctx.writer.metrics) == pretrain


def test_dbn_per_layer_configs_must_match_the_layers() -> None:
    with pytest.raises(ValueError, match="2 configs for 3 layers"):
        dbn.Config(layers=[4, 4, 4], pretraining=[dbn.PretrainConfig(), dbn.PretrainConfig()])


def test_dbn_needs_labels(tmp_path: Path) -> None:
    from service.spec import SpecError, load_spec

    path = tmp_path / "s.yaml"
    path.write_text("name: t\nalgorithm: dbn\ndataset: {name: bars_and_stripes}\n")
    with pytest.raises(SpecError, match=r"s.yaml:3: dataset.name: dbn needs a labelled data set"):
        load_spec(path)
