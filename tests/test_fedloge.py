"""FedLoGe: the SSE-C classifier against the simplex ETF's closed form, its training against the
one-step-per-head identity, the generic model's realignment and the personal head by hand."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from clients.state import MemoryStore
from fedsim.api import run
from fedsim.config import ClientSection
from fedsim.data.tensors import LocalData
from fedsim.errors import ConfigError
from fedsim.method import ClientContext, ClientResult, RoundResult, RunInfo, TrainPlan
from fedsim.personal import arrays_of
from strategies.fedloge import FedLoGe, simplex_etf, sparse_etf


def test_the_simplex_etf_has_the_closed_form_gram_matrix():
    classes = 7
    rows = simplex_etf(classes, 20, torch.Generator().manual_seed(0))
    expected = classes / (classes - 1) * (torch.eye(classes, dtype=torch.float64) - 1 / classes)
    torch.testing.assert_close(rows @ rows.T, expected, atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="at least the number of classes"):
        simplex_etf(10, 9, torch.Generator())


def test_sse_c_is_sparse_and_equiangular_at_the_target_norm():
    classes, dim = 10, 64
    weights = sparse_etf(classes, dim, sparsity=0.6, norm=0.1, steps=4000, seed=3)
    assert int((weights == 0).sum()) == int(0.6 * classes * dim)  # the zeros stay zero
    cosines = F.normalize(weights, dim=1) @ F.normalize(weights, dim=1).T
    off = cosines[~torch.eye(classes, dtype=torch.bool)]
    assert off.sub(-1 / (classes - 1)).abs().max() < 0.005  # the ETF's angles, within sparsity
    assert weights.norm(dim=1).sub(0.1).abs().max() < 0.012  # from about 0.63 before refining
    unrefined = sparse_etf(classes, dim, sparsity=0.6, norm=0.1, steps=0, seed=3)
    before = F.normalize(unrefined, dim=1) @ F.normalize(unrefined, dim=1).T
    assert before[~torch.eye(classes, dtype=torch.bool)].sub(-1 / (classes - 1)).abs().max() > 0.05
    assert unrefined.norm(dim=1).min() > 0.4  # sparsifying alone breaks the angles; the norms stay large


def setup(classes=4, dim=6, inputs=5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(inputs, dim), torch.nn.ReLU(), torch.nn.Linear(dim, classes))
    names = [n for n, _ in model.named_parameters()]
    method = FedLoGe({"etf_steps": 200}, RunInfo(names, np.array([30]), ClientSection(), seed=0))
    current = arrays_of(model)
    broadcast = {k: torch.as_tensor(v) for k, v in method.broadcast(1, current).items()}
    ctx = ClientContext(0, 1, TrainPlan(), {k: torch.as_tensor(v) for k, v in current.items()}, broadcast,
                        MemoryStore(), ClientSection(batch_size=30, momentum=0.0), lr=0.5,
                        num_classes=classes)
    x = torch.randn(30, inputs)
    y = torch.tensor([0, 1, 2] * 10)  # class 3 absent
    return model, method, current, ctx, LocalData(x, y, x, y)


def test_one_step_trains_the_backbone_through_sse_c_and_each_head_on_its_own_loss():
    model, method, _, ctx, data = setup()
    sse = ctx.broadcast["sse"].clone()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    aux_w, aux_b = ctx.broadcast["aux.weight"].clone(), ctx.broadcast["aux.bias"].clone()
    first_local = method.local_head(ctx, 4, 6, torch.device("cpu"))  # the client's seeded first head
    method.local_training(ctx, model, data, seed=0, steps=1, terms=[])  # one full batch: no shuffle effect
    torch.testing.assert_close(ctx.broadcast["sse"], sse)  # SSE-C is static
    assert torch.equal(model.state_dict()["2.weight"], start["2.weight"])  # the model's own head unused
    # by hand: the backbone's gradient comes from CE(f sse^T) only, the aux head's from CE(aux(f))
    w1, b1 = start["0.weight"].clone().requires_grad_(), start["0.bias"].clone().requires_grad_()
    features = torch.relu(data.x_train @ w1.T + b1)
    F.cross_entropy(features @ sse.T, data.y_train).backward()
    torch.testing.assert_close(model.state_dict()["0.weight"], start["0.weight"] - 0.5 * w1.grad)
    a_w, a_b = aux_w.clone().requires_grad_(), aux_b.clone().requires_grad_()
    F.cross_entropy(features.detach() @ a_w.T + a_b, data.y_train).backward()
    update = method.after_training(ctx, model)
    torch.testing.assert_close(torch.as_tensor(update.outputs["aux"]["weight"]), aux_w - 0.5 * a_w.grad)
    assert set(update.outputs["model"]) == {"0.weight", "0.bias"}  # the head slot is not sent
    F.cross_entropy(first_local(features.detach()), data.y_train).backward()
    kept = ctx.store.load("local")  # the local head stays on the client, one step on
    torch.testing.assert_close(torch.as_tensor(kept["weight"]),
                               first_local.weight.detach() - 0.5 * first_local.weight.grad)


def test_the_generic_model_is_the_realigned_auxiliary_head():
    model, method, current, ctx, data = setup()
    aux = {"weight": np.array([[3.0, 0, 0, 0, 0, 0], [0, 0.5, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                               [0, 0, 0, 0, 2, 0]], dtype=np.float32), "bias": np.arange(4, dtype=np.float32)}
    result = RoundResult([ClientResult(0, {"num_examples": 30.0})],
                         means={"model": {"0.weight": current["0.weight"] + 1, "0.bias": current["0.bias"]},
                                "aux": aux})
    new, metrics = method.aggregate(1, current, result)
    np.testing.assert_allclose(np.linalg.norm(new["2.weight"], axis=1), 1.7, rtol=1e-6)
    np.testing.assert_allclose(new["2.weight"][0], [1.7, 0, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(new["2.bias"], aux["bias"])
    np.testing.assert_array_equal(new["0.weight"], current["0.weight"] + 1)
    assert metrics["aux_row_norm_ratio"] == pytest.approx(3.0 / 0.5)
    np.testing.assert_array_equal(method.state["aux.weight"], aux["weight"])  # the next round's head


def test_the_personal_head_adds_the_norm_transferred_aux_head_and_masks_absent_classes():
    model, method, _, ctx, data = setup()
    local = {"weight": np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32),
             "bias": np.array([0.1, -0.2, 0.3, 5.0], dtype=np.float32)}
    ctx.store.save("local", local)
    body = model[:-1](data.x_test).detach().numpy()
    g_w, g_b = ctx.broadcast["aux.weight"].numpy(), ctx.broadcast["aux.bias"].numpy()
    transferred = g_w * np.linalg.norm(local["weight"], axis=1, keepdims=True)
    logits = body @ (local["weight"] + transferred).T + local["bias"] + g_b
    method.personal_model(ctx, model, data)
    personal = model(data.x_test).detach().numpy()
    np.testing.assert_allclose(personal[:, :3], logits[:, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(personal[:, 3], -30.0)  # class 3 is absent from the client's training data
    assert math.isfinite(float(personal.max()))


def test_a_fedloge_run_reports_generic_and_personal_accuracy(tmp_path):
    import pandas as pd

    summary = run("experiments/quickstart.toml", "strategy.name=fedloge", "strategy.etf_steps=200",
                  "experiment.rounds=2", "engine.backend=inprocess", f"output.dir={tmp_path}",
                  "data.partition.imbalance=10")
    rounds = pd.read_parquet(summary.run_dir / "rounds.parquet")
    assert {"personal_accuracy_mean", "personal_accuracy_few", "test_accuracy_few"} <= set(rounds)
    with np.load(summary.run_dir / "model.npz") as final:
        np.testing.assert_allclose(np.linalg.norm(final["3.weight"], axis=1), 1.7, rtol=1e-5)
