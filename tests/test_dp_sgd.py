"""Example-level DP (DP-SGD through Opacus): the step against per-example gradients computed here
with torch.func, the noise's std, empty Poisson batches, the reported epsilon against Opacus' own
accountant and a published value, refusals, and a run of the quickstart."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from fedsim.api import run
from fedsim.config import ClientSection, DpSgdSection, load_config
from fedsim.data.tensors import LocalData
from fedsim.errors import ConfigError
from fedsim.method import ClientContext, TrainPlan
from fedsim.privacy.dp_sgd import ExampleLevelDP, sample_rate
from fedsim.registry import check_config

QUICKSTART = "experiments/quickstart.toml"


def _client(n, batch_size, **dp):
    """A small MLP client, its data and the add-on's client half."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(n, 6) * 2, torch.randint(0, 3, (n,))
    data = LocalData(x, y, x[:0], y[:0])
    settings = ClientSection(batch_size=batch_size, momentum=0.0)
    ctx = ClientContext(0, 1, TrainPlan(), {}, {}, None, settings, 0.5)
    return model, data, ctx, ExampleLevelDP(DpSgdSection(enabled=True, **dp))


def _poisson_batch(seed, n, rate):
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < rate).nonzero().squeeze(1)


def test_a_step_averages_the_clipped_per_example_gradients_over_the_expected_batch():
    model, data, ctx, dp = _client(40, 10, noise_multiplier=0.0, clip_norm=0.5)
    before = copy.deepcopy(model)
    metrics = dp.local_training(ctx, model, data, seed=3, steps=1, terms=[])
    chosen = _poisson_batch(3, 40, 0.25)
    params = {k: v.detach() for k, v in before.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(before, p, (x[None],)), y[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, data.x_train[chosen], data.y_train[chosen])
    norms = torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in grads.values()))
    assert (norms > 0.5).any()  # some examples are clipped
    scale = (0.5 / norms).clamp(max=1.0)
    for name, trained in model.named_parameters():
        clipped = grads[name] * scale.view(-1, *[1] * (grads[name].dim() - 1))
        expected = params[name] - 0.5 * clipped.sum(0) / 10
        torch.testing.assert_close(trained.detach(), expected, atol=1e-6, rtol=1e-5)
    assert metrics["steps"] == 1 and metrics["dp_sgd_batch_size"] == len(chosen)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus stayed off it


def test_the_noise_has_std_z_c_over_the_expected_batch():
    torch.manual_seed(0)
    quiet = nn.Linear(6, 2000)  # many coordinates for the std
    loud = copy.deepcopy(quiet)
    x = torch.randn(200, 6)
    data = LocalData(x, torch.randint(0, 2000, (200,)), x[:0], x[:0, 0].long())
    ctx = ClientContext(0, 1, TrainPlan(), {}, {}, None, ClientSection(batch_size=20, momentum=0.0), 0.5)
    for model, z in ((quiet, 0.0), (loud, 1.5)):  # the same Poisson batch (seed 1), with and without noise
        ExampleLevelDP(DpSgdSection(enabled=True, noise_multiplier=z, clip_norm=2.0)).local_training(
            ctx, model, data, seed=1, steps=1, terms=[])
    difference = torch.cat([(a - b).flatten() for a, b in zip(loud.parameters(), quiet.parameters(),
                                                              strict=True)]).detach()
    assert difference.mean().abs() < 0.01
    assert difference.std().item() == pytest.approx(0.5 * 1.5 * 2.0 / 20, rel=0.03)


def test_an_empty_poisson_batch_is_a_step_of_noise_alone():
    seed = next(s for s in range(100) if len(_poisson_batch(s, 50, 0.02)) == 0)
    model, data, ctx, dp = _client(50, 1, noise_multiplier=1.0, clip_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = dp.local_training(ctx, model, data, seed=seed, steps=1, terms=[])
    assert metrics["dp_sgd_batch_size"] == 0 and np.isnan(metrics["train_loss"])
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert moved.abs().min() > 0 and torch.isfinite(moved).all()


def test_a_tf_privacy_tutorial_setting_reproduces_its_published_epsilon():
    """TensorFlow Privacy's MNIST tutorial table (60000 examples, batch 256, noise 1.12, 60
    epochs, delta 1e-5) publishes epsilon 2.92 from the classic RDP conversion (test_privacy.py
    reproduces that number from the same event); fedsim and Opacus both use the tighter
    conversion, agree with each other, and give less."""
    from fedsim.method import RunInfo

    dp = ExampleLevelDP(DpSgdSection(enabled=True, noise_multiplier=1.12, delta=1e-5),
                        RunInfo(["w"], np.array([60000]), ClientSection(batch_size=256)))
    steps = 60 * 60000 // 256
    dp.state["steps"][0] = steps
    opacus = RDPAccountant()
    opacus.history = [(1.12, 256 / 60000, steps)]
    assert dp.client_epsilon(0) == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-6)
    assert 2.4 < dp.client_epsilon(0) < 2.92


def test_dp_sgd_on_the_quickstart_reports_each_rounds_largest_client_epsilon(tmp_path):
    summary = run(QUICKSTART, "dp_sgd.enabled=true", "dp_sgd.noise_multiplier=1.0", "experiment.rounds=3",
                  "engine.backend=inprocess", f"output.dir={tmp_path}", "output.save_model=false")
    rounds = pd.read_parquet(summary.run_dir / "rounds.parquet").set_index("round")
    clients = pd.read_parquet(summary.run_dir / "clients.parquet").dropna(subset=["steps"])  # trained
    config = load_config(QUICKSTART)
    sizes = clients.groupby("client_id")["num_examples"].first()
    delta = float(sizes.max()) ** -1.1
    assert rounds.loc[1:, "dp_sgd_delta"].tolist() == pytest.approx([delta] * 3)
    for t in (1, 2, 3):  # Opacus' accountant on every client's steps so far
        steps = clients[clients["round"] <= t].groupby("client_id")["steps"].sum()
        worst = 0.0
        for client, total in steps.items():
            accountant = RDPAccountant()
            rate = sample_rate(int(sizes[client]), config.client.batch_size)
            accountant.history = [(1.0, rate, int(total))]
            worst = max(worst, accountant.get_epsilon(delta))
        # the two accountants search different grids of RDP orders: 1.4% apart at epsilon 12.8
        assert rounds.loc[t, "dp_sgd_epsilon"] == pytest.approx(worst, rel=0.02)
    assert rounds.loc[1:, "dp_sgd_epsilon"].is_monotonic_increasing
    assert rounds["test_accuracy"].iloc[-1] > 2 * rounds["test_accuracy"].iloc[0]


@pytest.mark.parametrize(("overrides", "names"), [
    (["strategy.name=fedprox"], "fedprox"), (["strategy.name=scaffold"], "scaffold"),
    (["model.name=resnet", "data.dataset=fashion-mnist"], "resnet"),
    (["fal.enabled=true"], "fal.enabled"),
    (["client.objectives=['parity']", "data.dataset=adult"], "objectives")])
def test_dp_sgd_refuses_what_it_does_not_cover(overrides, names):
    with pytest.raises(ConfigError, match=names):
        check_config(load_config(None, ["dp_sgd.enabled=true", *overrides]))
