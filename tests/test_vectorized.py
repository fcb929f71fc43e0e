"""Vectorized training (torch.func) equals training the same clients one by one."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clients.training import train_locally
from clients.vectorized import FunctionalOptimizer, train_vectorized, vectorize_blocker
from fedsim.config import ClientSection, ModelSection
from fedsim.data.tensors import LocalData
from fedsim.method import ClientContext, LossTerm, NoParams, TrainPlan
from fedsim.models import build_model
from fedsim.terms import ParityConstraint, ParityPenalty, Proximal
from strategies.fedld import MarginControl
from strategies.scaffold import ControlGradient, ControlStep

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"
SHAPES = {"logreg": (1, 8, 8), "mlp": (1, 8, 8), "cnn": (1, 12, 12)}


def clients(shape, sizes, seed=0, groups=False, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, *shape, generator=generator, dtype=dtype)
        y = torch.randint(0, 3, (n,), generator=generator)
        z = torch.randint(0, 2, (n,), generator=generator) if groups else None
        out.append(LocalData(x, y, x[:2], y[:2], z, None))
    return out


class EmptyStore:
    def load(self, name):
        return None


def context(model, client_id, broadcast=None):
    arrays = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ClientContext(client_id, 1, TrainPlan(), arrays, broadcast or {}, EmptyStore(), None, 0.1)


def one_by_one(model, data, settings, seeds, steps, terms):
    out = []
    for d, seed, s, t in zip(data, seeds, steps, terms, strict=True):
        local = copy.deepcopy(model)
        metrics = train_locally(local, d, settings, t, seed, settings.lr, steps=s)
        out.append(({k: v.detach() for k, v in local.named_parameters()}, metrics))
    return out


def assert_close(vectorized, reference, tol=1e-5):
    for (params, metrics), (ref_params, ref_metrics) in zip(vectorized, reference, strict=True):
        for name, value in ref_params.items():
            assert torch.allclose(params[name], value, atol=tol, rtol=tol), name
        assert metrics["steps"] == ref_metrics["steps"]
        assert metrics["train_loss"] == pytest.approx(ref_metrics["train_loss"], rel=tol, abs=tol)


@pytest.mark.parametrize("model_name", ["logreg", "mlp", "cnn"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_model_and_optimizer_trains_as_one_by_one(model_name, optimizer):
    # Adam divides by sqrt(v) + 1e-8, so on a CNN's near-zero gradients it turns float32
    # summation-order noise (1e-8) into steps of up to lr (measured: 8e-4 apart after 10 steps);
    # in float64 the two agree, which shows the computation is the same
    unstable = (model_name, optimizer) == ("cnn", "adam")
    dtype, tol = (torch.float64, 1e-9) if unstable else (torch.float32, 1e-5)
    settings = ClientSection(batch_size=8, local_epochs=2, lr=0.05, optimizer=optimizer,
                             momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-3)
    model = build_model(ModelSection(name=model_name, hidden=[16]), SHAPES[model_name], 3, 0).to(dtype)
    data = clients(SHAPES[model_name], [13, 20, 7, 24], dtype=dtype)  # partial last batches everywhere
    seeds, steps = [11, 12, 13, 14], [None, 3, None, None]  # a straggler stops after 3 steps
    start = {k: v.detach() for k, v in model.named_parameters()}
    terms = [[] for _ in data]
    got = train_vectorized(model, start, data, seeds, steps, settings, settings.lr, terms)
    assert_close(got, one_by_one(model, data, settings, seeds, steps, terms), tol)


def test_loss_terms_are_evaluated_inside_the_vectorized_step():
    settings = ClientSection(batch_size=5, local_epochs=1, lr=0.1, momentum=0.5)
    model = build_model(ModelSection(name="mlp", hidden=[8]), SHAPES["mlp"], 3, 1)
    data = clients(SHAPES["mlp"], [9, 12, 16], seed=3)
    seeds, steps = [1, 2, 3], [None, None, None]
    start = {k: v.detach() for k, v in model.named_parameters()}
    generator = torch.Generator().manual_seed(5)
    terms = []
    for cid in range(3):
        control = {k: torch.randn(v.shape, generator=generator) for k, v in start.items()}
        ctx = context(model, cid, broadcast=control)
        terms.append([Proximal(Proximal.Params(mu=0.3), ctx),
                      MarginControl(MarginControl.Params(lam=0.2), ctx),
                      ControlGradient(NoParams(), ctx), ControlStep(NoParams(), ctx)])
    for client_terms in terms:  # SCAFFOLD's corrections differ per client, in the loss and as shifts
        client_terms[2].correction = {k: torch.randn(v.shape, generator=generator) for k, v in start.items()}
        client_terms[3].shift = {k: torch.randn(v.shape, generator=generator) for k, v in start.items()}
    got = train_vectorized(model, start, data, seeds, steps, settings, settings.lr, terms)
    assert_close(got, one_by_one(model, data, settings, seeds, steps, terms))


def test_what_cannot_vectorize_says_why():
    resnet = build_model(ModelSection(name="resnet"), (1, 8, 8), 3, 0)
    assert "buffers" in vectorize_blocker(resnet, [[], []])
    mlp = build_model(ModelSection(name="mlp"), (1, 8, 8), 3, 0)
    ctx = context(mlp, 0)
    assert vectorize_blocker(mlp, [[Proximal(Proximal.Params(mu=0.1), ctx)]] * 2) == ""
    mixed = [[Proximal(Proximal.Params(mu=0.1), ctx)], [Proximal(Proximal.Params(mu=0.2), ctx)]]
    assert "differ" in vectorize_blocker(mlp, mixed)
    class Branchy(LossTerm):
        per_client = ()

        def penalty(self, model, batch):
            return batch.logits.sum() if (batch.logits > 0).any() else batch.logits.new_zeros(())

    branchy = [[Branchy(NoParams(), ctx)] for _ in range(2)]
    data = clients(SHAPES["mlp"], [6, 6])
    start = {k: v.detach() for k, v in mlp.named_parameters()}
    with pytest.raises(RuntimeError):  # data-dependent control flow: vmap refuses it
        train_vectorized(mlp, start, data, [0, 1], [None, None], ClientSection(batch_size=4), 0.1, branchy)
    assert "do not declare" in vectorize_blocker(mlp, [[LossTerm(NoParams(), ctx)]] * 2)


class PreviousStore:
    def __init__(self, previous):
        self.previous = previous

    def load(self, name):
        return self.previous


def test_moons_contrastive_term_vectorizes_with_each_clients_previous_model():
    from strategies.moon import ModelContrast, MoonParams

    settings = ClientSection(batch_size=4, local_epochs=1, lr=0.1, momentum=0.9)
    model = build_model(ModelSection(name="mlp", hidden=[8]), SHAPES["mlp"], 3, 3)
    data = clients(SHAPES["mlp"], [7, 10, 6], seed=8)
    start = {k: v.detach() for k, v in model.named_parameters()}
    generator = torch.Generator().manual_seed(9)
    terms = []
    for cid in range(3):
        previous = None if cid == 0 else {  # client 0 has no previous model yet
            k: (v + 0.1 * torch.randn(v.shape, generator=generator)).numpy() for k, v in start.items()}
        ctx = replace(context(model, cid), store=PreviousStore(previous),
                      model_factory=lambda: copy.deepcopy(model), cache={})
        terms.append([ModelContrast(MoonParams(mu=1.0, temperature=0.5), ctx)])
    assert vectorize_blocker(model, terms) == ""
    got = train_vectorized(model, start, data, [4, 5, 6], [None] * 3, settings, settings.lr, terms)
    assert_close(got, one_by_one(model, data, settings, [4, 5, 6], [None] * 3, terms))


def test_frozen_parameters_and_clients_without_data():
    mlp = build_model(ModelSection(name="mlp", hidden=[8]), SHAPES["mlp"], 3, 0)
    mlp[1].weight.requires_grad_(False)
    assert "frozen" in vectorize_blocker(mlp, [[], []])
    mlp[1].weight.requires_grad_(True)
    settings = ClientSection(batch_size=4, lr=0.1)
    data = clients(SHAPES["mlp"], [9, 0, 5])  # the second client holds no example
    start = {k: v.detach() for k, v in mlp.named_parameters()}
    got = train_vectorized(mlp, start, data, [1, 2, 3], [None] * 3, settings, 0.1, [[], [], []])
    assert got[1][1]["steps"] == 0 and all(torch.equal(got[1][0][k], start[k]) for k in start)
    assert_close(got, one_by_one(mlp, data, settings, [1, 2, 3], [None] * 3, [[], [], []]))


@pytest.mark.parametrize("term, params", [(ParityPenalty, {"mu": 2.0}),
                                          (ParityConstraint, {"alpha": 10.0, "squash": True})])
def test_the_parity_terms_vectorize_on_groups_and_padded_batches(term, params):
    settings = ClientSection(batch_size=4, local_epochs=2, lr=0.1)
    model = build_model(ModelSection(name="mlp", hidden=[8]), SHAPES["mlp"], 3, 2)
    data = clients(SHAPES["mlp"], [7, 10, 5], seed=4, groups=True)
    data[2].z_train[:] = 1  # one client holds a single group: its penalty is 0 in every batch
    start = {k: v.detach() for k, v in model.named_parameters()}
    terms = [[term(term.Params(**params), context(model, cid))] for cid in range(3)]
    got = train_vectorized(model, start, data, [5, 6, 7], [None] * 3, settings, settings.lr, terms)
    assert_close(got, one_by_one(model, data, settings, [5, 6, 7], [None] * 3, terms))


def test_the_functional_adam_is_torchs_adam():
    torch.manual_seed(0)
    weights = torch.randn(3, 4)
    reference = weights.clone().requires_grad_()
    adam = torch.optim.Adam([reference], lr=0.01, weight_decay=0.1)
    optimizer = FunctionalOptimizer(ClientSection(optimizer="adam", weight_decay=0.1), 0.01)
    stacked = {"w": weights.clone().unsqueeze(0)}
    for step in range(5):
        grad = torch.randn(3, 4)
        reference.grad = grad.clone()
        adam.step()
        optimizer.step(stacked, {"w": grad.unsqueeze(0)}, 1)
        assert torch.allclose(stacked["w"][0], reference.detach(), atol=1e-7), step


def test_a_batchnorm_model_trains_one_by_one_and_the_log_says_why(tmp_path):
    """BatchNorm's running statistics do not vectorize; its 0-d step counter survives the trip
    through Flower's records (it came back 1-d, and every client failed)."""
    from fedsim.config import load_config
    from fedsim.engine.protocol import from_record, to_record
    from fedsim.runner import run_experiment

    assert from_record(to_record({"steps": np.array(3)}))["steps"].shape == ()
    config = load_config(None, ["model.name=resnet", "engine.backend=inprocess", "experiment.rounds=1",
                                "engine.vectorize=on",
                                "data.num_clients=4", "strategy.clients_per_round=4",
                                f"output.run_dir={tmp_path}"])
    rounds = run_experiment(config).rounds
    assert rounds["num_failures"].iloc[1] == 0 and rounds["num_clients"].iloc[1] == 4
    log = (tmp_path / "log.txt").read_text()
    assert log.count("clients train one by one: the model has buffers") == 1


@pytest.mark.parametrize(("settings", "model_tol"), [
    (["strategy.name=scaffold"], 1e-4),
    # Adam turns float32 noise on a CNN's near-zero gradients into steps of up to lr (see above):
    # the accuracy agrees, single weights need not
    (["strategy.name=fedprox", "client.optimizer=adam", "model.name=cnn"], None),
    (["data.dataset=adult", "model.name=logreg", "data.num_clients=4", "strategy.clients_per_round=4",
      "client.objectives={parity = {mu = 0.5}}"], 1e-4)])
def test_whole_runs_with_and_without_vectorizing_agree(tmp_path, settings, model_tol):
    from fedsim.config import load_config
    from fedsim.runner import run_experiment

    finals = {}
    for mode in ("on", "off"):
        config = load_config(QUICKSTART, ["engine.backend=inprocess", "experiment.rounds=3",
                                          f"engine.vectorize={mode}", f"output.run_dir={tmp_path / mode}",
                                          *settings])
        finals[mode] = run_experiment(config).rounds["test_accuracy"].iloc[-1]
        assert "one by one" not in (tmp_path / mode / "log.txt").read_text()
    assert finals["on"] == pytest.approx(finals["off"], abs=1e-4)
    if model_tol is None:
        return
    with np.load(tmp_path / "on" / "model.npz") as on, np.load(tmp_path / "off" / "model.npz") as off:
        assert all(np.allclose(on[k], off[k], atol=model_tol) for k in on.files)


def test_chunks_fit_the_memory_budget_and_change_nothing(tmp_path):
    from clients.vectorized import clients_per_chunk
    from fedsim.config import load_config
    from fedsim.runner import run_experiment

    model = build_model(ModelSection(name="cnn"), (1, 28, 28), 10, 0)
    data = clients((1, 28, 28), [60])[0]
    sgd, adam = ClientSection(batch_size=10), ClientSection(batch_size=10, optimizer="adam")
    per_gb = clients_per_chunk(model, data, [], sgd, 2**30)
    assert per_gb > 10 and clients_per_chunk(model, data, [], sgd, 2**31) in (2 * per_gb, 2 * per_gb + 1)
    assert clients_per_chunk(model, data, [], adam, 2**30) < per_gb  # two more state tensors
    assert clients_per_chunk(model, data, [], sgd, 1) == 1
    correction = ControlStep(NoParams(), context(model, 0, {k: torch.zeros_like(v) for k, v in
                                                                  model.named_parameters()}))
    assert clients_per_chunk(model, data, [correction], sgd, 2**30) < per_gb  # a model-sized tensor
    finals = []
    for budget in ("2048", "0.001"):  # all of a worker's clients at once, then one at a time
        config = load_config(QUICKSTART, ["engine.backend=inprocess", "experiment.rounds=2",
                                          "engine.vectorize=on", "strategy.name=scaffold",
                                          f"engine.vectorize_memory_mb={budget}",
                                          f"output.run_dir={tmp_path / budget}"])
        finals.append(run_experiment(config).rounds["test_accuracy"].iloc[-1])
    assert finals[0] == pytest.approx(finals[1], abs=1e-4)


def clients_and_model(tmp_path, name, *overrides):
    from fedsim.config import load_config
    from fedsim.runner import run_experiment

    config = load_config(QUICKSTART, ["engine.backend=inprocess", "experiment.rounds=2",
                                      "client.local_epochs=1", f"output.run_dir={tmp_path / name}",
                                      *overrides])
    run_experiment(config)
    clients_table = pd.read_parquet(tmp_path / name / "clients.parquet").dropna(subset=["train_loss"])
    with np.load(tmp_path / name / "model.npz") as model:
        return clients_table.set_index(["round", "client_id"]), {k: model[k] for k in model.files}


def test_several_chunks_per_worker_and_a_failing_chunk_keep_every_clients_result(tmp_path, monkeypatch):
    import clients.runtime

    reference, model = clients_and_model(tmp_path, "one-by-one", "strategy.name=scaffold",
                                         "engine.vectorize=off")
    monkeypatch.setattr(clients.runtime, "clients_per_chunk", lambda *args: 2)  # 5 clients: 2 + 2 + 1
    chunked, chunked_model = clients_and_model(tmp_path, "chunks", "strategy.name=scaffold",
                                               "engine.vectorize=on")
    real, calls = clients.runtime.train_vectorized, []

    def second_chunk_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) % 3 == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(clients.runtime, "train_vectorized", second_chunk_fails)
    fallback, fallback_model = clients_and_model(tmp_path, "fallback", "strategy.name=scaffold",
                                                 "engine.vectorize=on")
    assert "training them together raised RuntimeError: out of memory" in (
        tmp_path / "fallback" / "log.txt").read_text()
    for table in (chunked, fallback):  # every client once, as trained one by one
        assert table.index.equals(reference.index)
        assert np.allclose(table["train_loss"], reference["train_loss"], atol=1e-5)
        assert (table["steps"] == reference["steps"]).all()
    for arrays in (chunked_model, fallback_model):  # SCAFFOLD's state was not updated twice
        assert all(np.allclose(arrays[k], model[k], atol=1e-5) for k in model)


@pytest.mark.parametrize("strategy", ["qffl", "fednova"])
def test_methods_with_hooks_train_in_lockstep_as_one_by_one(tmp_path, strategy):
    """q-FFL reports the global model first and FedNova sends extra outputs: both now take the
    lockstep kernels, with the same per-client results as one by one."""
    together, model = clients_and_model(tmp_path, "lockstep", f"strategy.name={strategy}")
    alone, alone_model = clients_and_model(tmp_path, "alone", f"strategy.name={strategy}",
                                           "engine.lockstep=false")
    assert together.index.equals(alone.index)
    shared = [c for c in alone if c not in ("train_seconds",) and pd.api.types.is_numeric_dtype(alone[c])]
    assert np.allclose(together[shared], alone[shared], atol=2e-5, equal_nan=True)
    assert all(np.allclose(model[k], alone_model[k], atol=2e-5) for k in model)


def test_vectorized_training_augments_exactly_as_one_by_one():
    settings = ClientSection(batch_size=8, local_epochs=2, lr=0.05, momentum=0.9, augment=["crop", "flip"])
    model = build_model(ModelSection(name="cnn"), (1, 12, 12), 3, 0)
    data = clients((1, 12, 12), [13, 20, 7])
    seeds, steps = [11, 12, 13], [None, 3, None]
    start = {k: v.detach() for k, v in model.named_parameters()}
    reference = one_by_one(model, data, settings, seeds, steps, [[], [], []])
    vectorized = train_vectorized(model, start, data, seeds, steps, settings, settings.lr, [[], [], []])
    assert_close(vectorized, reference)
    plain = one_by_one(model, data, settings.model_copy(update={"augment": []}), seeds, steps, [[], [], []])
    first = next(iter(reference[0][0]))
    assert not torch.allclose(plain[0][0][first], reference[0][0][first])


def test_the_balanced_softmax_vectorizes_with_each_clients_prior():
    from fedsim.terms import BalancedSoftmax

    settings = ClientSection(batch_size=4, local_epochs=2, lr=0.1)
    model = build_model(ModelSection(name="mlp", hidden=[8]), SHAPES["mlp"], 3, 2)
    data = clients(SHAPES["mlp"], [7, 10, 5], seed=4)
    data[2].y_train[:] = 1  # a client with one class: the others' log prior is log 1e-12
    start = {k: v.detach() for k, v in model.named_parameters()}
    terms = []
    for cid in range(3):
        ctx = context(model, cid)
        ctx.labels, ctx.num_classes = data[cid].y_train, 3
        terms.append([BalancedSoftmax(BalancedSoftmax.Params(tau=1.0), ctx)])
    got = train_vectorized(model, start, data, [5, 6, 7], [None] * 3, settings, settings.lr, terms)
    assert_close(got, one_by_one(model, data, settings, [5, 6, 7], [None] * 3, terms))
