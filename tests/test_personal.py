"""Personalized FL: personal evaluation, the local-layer methods (FedPer, FedRep, FedBN), FedBABU
and Ditto, and that personal parameters stay on the client."""

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from clients.runtime import run_evaluate, run_train
from clients.state import MemoryStore, RecordStateStore
from clients.training import train_locally
from fedsim.api import run
from fedsim.config import ClientSection, load_config
from fedsim.data.federation import build_federation
from fedsim.data.tensors import LocalData
from fedsim.deploy.clientapp import NodeHost
from fedsim.engine.protocol import decode_result, encode_task
from fedsim.engine.server import RoundLog
from fedsim.engine.strategy import FedsimStrategy
from fedsim.errors import ConfigError
from fedsim.evaluation import evaluate, spread
from fedsim.method import ClientContext, ClientResult, RoundResult, RunInfo, TrainPlan
from fedsim.models import build_model
from fedsim.personal import batchnorm_keys, head_keys, load_arrays, personal_round_metrics, train_keys
from fedsim.registry import build_method, check_config
from fedsim.report.page import build_report
from fedsim.report.runs import collect_runs
from fedsim.report.tables import summary_table
from fedsim.seeding import derive_seed

QUICKSTART = "experiments/quickstart.toml"
FAST = ("engine.backend=inprocess", "output.save_model=false")


def rounds_of(tmp_path, *overrides: str) -> pd.DataFrame:
    summary = run(QUICKSTART, *FAST, f"output.dir={tmp_path}", *overrides)
    return pd.read_parquet(summary.run_dir / "rounds.parquet")


def test_fedper_with_one_client_is_local_training(tmp_path):
    """One client: the mean of one body is that body, so FedPer's personal model after R rounds
    is the model trained locally for R rounds (each round's seed), from the same initial weights."""
    overrides = ("data.num_clients=1", "strategy.clients_per_round=1", "experiment.rounds=3",
                 "data.partition.kind=iid", "client.local_epochs=1")
    rounds = rounds_of(tmp_path, "strategy.name=fedper", *overrides)
    config = load_config(QUICKSTART, list(overrides))
    federation = build_federation(config.data, config.experiment.seed)
    data = LocalData.from_arrays(federation.client_data(0), torch.device("cpu"))
    model = build_model(config.model, federation.input_shape, federation.num_classes, config.experiment.seed)
    for rnd in (1, 2, 3):
        train_locally(model, data, config.client, [], derive_seed(config.experiment.seed, rnd, 0),
                      config.client.lr)
        local = evaluate(model, data.x_test, data.y_test)
        row = rounds[rounds["round"] == rnd].iloc[0]
        assert row["personal_loss"] == pytest.approx(local["loss"], rel=1e-5)
        assert row["personal_accuracy"] == pytest.approx(local["accuracy"])


def test_personal_metrics_reach_the_rounds_table_and_the_report(tmp_path):
    summary = run(QUICKSTART, *FAST, f"output.dir={tmp_path}", "strategy.name=fedper", "experiment.rounds=2",
                  "data.partition.imbalance=10")
    rounds = pd.read_parquet(summary.run_dir / "rounds.parquet")
    wanted = [f"personal_accuracy_{k}" for k in ("mean", "std", "worst10", "many", "medium", "few")]
    last = rounds.iloc[-1]
    assert all(np.isfinite(last[c]) for c in ["personal_accuracy", "personal_loss", *wanted])
    assert last["personal_accuracy_worst10"] <= last["personal_accuracy_mean"]
    clients = pd.read_parquet(summary.run_dir / "clients.parquet")
    final = clients[clients["round"] == 2].dropna(subset=["personal_accuracy"])
    assert last["personal_accuracy_mean"] == pytest.approx(final["personal_accuracy"].mean())
    plain = rounds_of(tmp_path, "experiment.rounds=1")  # fedavg: no personal model
    assert not [c for c in plain.columns if "personal" in c]
    assert "client_eval_accuracy_worst10" in plain.columns
    table = summary_table(collect_runs([summary.run_dir]), target=0.5)
    assert table["personal acc. worst 10% mean"].iloc[0] == last["personal_accuracy_worst10"]
    page = build_report([summary.run_dir], tmp_path / "report.html")
    assert "<h2>Personal models</h2>" in page.read_text()


def test_dittos_global_model_is_fedavgs(tmp_path):
    ditto = rounds_of(tmp_path, "strategy.name=ditto", "experiment.rounds=2")
    fedavg = rounds_of(tmp_path, "experiment.rounds=2")
    np.testing.assert_array_equal(ditto["test_loss"], fedavg["test_loss"])
    assert (ditto["personal_accuracy"].iloc[1:] != ditto["client_eval_accuracy"].iloc[1:]).any()


def test_pooled_group_accuracy_and_the_spread_over_clients():
    groups = np.array([0, 1, 2])  # class 0 many, 1 medium, 2 few

    def client(cid, correct, count):
        metrics = {"personal_accuracy": sum(correct) / sum(count), "personal_loss": 1.0,
                   "num_test_examples": float(sum(count))}
        for c in range(3):
            metrics[f"personal_correct_{c}"], metrics[f"personal_count_{c}"] = correct[c], count[c]
        return ClientResult(cid, metrics)

    result = RoundResult([client(0, [4, 1, 0], [5, 2, 1]), client(1, [2, 0, 1], [2, 1, 3])])
    metrics = personal_round_metrics(result, groups)
    assert metrics["personal_accuracy_many"] == pytest.approx(6 / 7)
    assert metrics["personal_accuracy_medium"] == pytest.approx(1 / 3)
    assert metrics["personal_accuracy_few"] == pytest.approx(1 / 4)
    assert metrics["personal_accuracy"] == pytest.approx(8 / 14)  # weighted by test examples
    assert metrics["personal_accuracy_mean"] == pytest.approx((5 / 8 + 3 / 6) / 2)
    values = spread(np.array([0.9, 0.1, np.nan, 0.5] + [0.8] * 17))
    assert values["worst10"] == pytest.approx((0.1 + 0.5) / 2)  # 20 finite values: the worst two
    assert spread(np.array([0.3, 0.7]))["worst10"] == pytest.approx(0.3)


def test_only_the_named_parameters_train():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(40, 4)
    data = LocalData(x, torch.randint(0, 3, (40,)), x[:0], x[:0, 0].long())
    ctx = ClientContext(0, 1, TrainPlan(), {}, {}, None, ClientSection(batch_size=8), 0.1)
    head = head_keys(model)
    assert head == ["2.weight", "2.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_keys(ctx, model, data, head, seed=0, steps=5, terms=[])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in ("0.weight", "0.bias"))
    assert not any(torch.equal(before[k], after[k]) for k in head)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards


def test_the_global_head_stays_as_initialised_under_fedbabu_and_fedrep(tmp_path):
    config = load_config(QUICKSTART, [])
    federation = build_federation(config.data, config.experiment.seed)
    model = build_model(config.model, federation.input_shape, federation.num_classes, 0)
    initial, head = model.state_dict(), head_keys(model)
    for name, head_moves in (("fedbabu", False), ("fedrep", False), ("fedavg", True)):
        summary = run(QUICKSTART, "engine.backend=inprocess", f"output.dir={tmp_path}",
                      f"strategy.name={name}", "experiment.rounds=2")
        with np.load(summary.run_dir / "model.npz") as final:
            for key in head:  # the global model's head
                assert np.array_equal(final[key], initial[key].numpy()) != head_moves, (name, key)
            assert not np.array_equal(final["1.weight"], initial["1.weight"].numpy())  # the body


def test_fedbabu_without_fine_tuning_is_the_global_model(tmp_path):
    rounds = rounds_of(tmp_path, "strategy.name=fedbabu", "strategy.finetune_epochs=0",
                       "experiment.rounds=2")
    np.testing.assert_allclose(rounds["personal_accuracy"].dropna(), rounds["client_eval_accuracy"].dropna())
    tuned = rounds_of(tmp_path, "strategy.name=fedbabu", "experiment.rounds=2")
    assert tuned["personal_accuracy"].iloc[-1] > tuned["client_eval_accuracy"].iloc[-1]


def test_fedbn_keeps_batch_norm_local_and_refuses_models_without_it():
    with pytest.raises(ConfigError, match="resnet"):
        check_config(load_config(QUICKSTART, ["strategy.name=fedbn"]))
    model = build_model(load_config(None, ["model.name=resnet"]).model, (1, 8, 8), 10, 0)
    keys = batchnorm_keys(model)
    assert "1.running_mean" in keys and "1.weight" in keys
    assert not [k for k in keys if "conv" in k or k.startswith("0.")]
    from strategies.fedbn import FedBN

    method, store = FedBN(), MemoryStore()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = ClientContext(0, 1, TrainPlan(), global_state, {}, store, ClientSection(batch_size=8), 0.1)
    x = torch.randn(16, 1, 8, 8)
    data = LocalData(x, torch.randint(0, 10, (16,)), x[:0], x[:0, 0, 0, 0].long())
    method.local_training(ctx, model, data, seed=0, steps=2, terms=[])
    sent = method.after_training(ctx, model).outputs["model"]
    assert set(sent) == set(model.state_dict()) - set(keys)
    kept = store.load("local")
    assert set(kept) == set(keys)
    assert not np.allclose(kept["1.running_mean"], global_state["1.running_mean"].numpy())
    model.load_state_dict(global_state)
    method.personal_model(ctx, model, data)  # the global model with the client's own batch norm
    assert np.array_equal(model.state_dict()["1.running_mean"].numpy(), kept["1.running_mean"])
    assert torch.equal(model.state_dict()["0.weight"], global_state["0.weight"])


def node_round(name: str, context: Context, server_round: int, kind: str, tmp_path):
    """One deployed node's reply to round `server_round`'s training or evaluation message, from
    the engine's own strategy, with its state in `context` (as a SuperNode keeps it)."""
    config = load_config(QUICKSTART, [f"strategy.name={name}", "data.num_clients=3",
                                      f"output.dir={tmp_path}"])
    federation = build_federation(config.data, config.experiment.seed)
    model = build_model(config.model, federation.input_shape, federation.num_classes, 0)
    run_info = RunInfo([n for n, _ in model.named_parameters()], federation.train_sizes, config.client)
    info = {"input_shape": list(federation.input_shape), "num_classes": federation.num_classes,
            "num_groups": 0}
    strategy = FedsimStrategy(config, build_method(config, run_info), [], federation.train_sizes, RoundLog(),
                              placement={0: 1, 1: 2, 2: 3}, data_info=info)
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    task = strategy.tasks(server_round, arrays, [1], 1, train=kind == "train")[0]
    handler = run_train if kind == "train" else run_evaluate
    return handler(encode_task(task), NodeHost(context)), model


@pytest.mark.parametrize("name", ["fedper", "ditto"])
def test_personal_parameters_never_leave_a_deployed_client(name, tmp_path):
    context = Context(0, 2, {"partition-id": 1, "cache-dir": str(tmp_path / "cache")}, RecordDict(), {})
    reply, model = node_round(name, context, 1, "train", tmp_path)
    sent = {key for record in reply.values() if isinstance(record, ArrayRecord) for key in record}
    kept = [key for key in context.state if key.startswith("fedsim-state.")]
    assert kept, "the node keeps the client's personal parameters"
    assert not any(key.startswith("state.") for key in reply)  # nothing of the state travels
    if name == "fedper":
        assert sent == set(model.state_dict()) - set(head_keys(model))
    else:  # ditto sends the trained global model; its personal model stays
        assert sent == set(model.state_dict())
    evaluated, _ = node_round(name, context, 1, "evaluate", tmp_path)
    metrics = decode_result(evaluated).clients[0].metrics
    stored = RecordStateStore(context.state).load(1, f"{name}/{'local' if name == 'fedper' else 'personal'}")
    load_arrays(model, stored)  # the global model sent (the initial one) with what the node kept
    config = load_config(QUICKSTART, ["data.num_clients=3"])
    data = LocalData.from_arrays(build_federation(config.data, 0).client_data(1), torch.device("cpu"))
    expected = evaluate(model, data.x_test, data.y_test)["loss"]
    assert metrics["personal_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["personal_loss"] != pytest.approx(metrics["eval_loss"])


def test_the_simulated_server_aggregates_no_personal_parameters(tmp_path, monkeypatch):
    """In simulation the client state rides with the client's messages (the server process
    stores it for the client), but the method's server half sees only what clients send."""
    from strategies.fedper import FedPer

    seen, original = [], FedPer.aggregate

    def spy(self, server_round, current, result):
        seen.append(set(result.means["model"]))
        return original(self, server_round, current, result)

    monkeypatch.setattr(FedPer, "aggregate", spy)
    rounds_of(tmp_path, "strategy.name=fedper", "experiment.rounds=2")
    assert seen == [{"1.weight", "1.bias"}] * 2  # the MLP's body (its head: 3.weight, 3.bias)


def test_personal_evaluation_rides_on_the_training_message(tmp_path):
    """evaluation.with_training: the next round's training clients evaluate their personal model
    before training, which gives the same round metrics as separate evaluation messages."""
    common = ("strategy.name=fedper", "data.num_clients=6", "strategy.clients_per_round=6",
              "experiment.rounds=3")
    separate = rounds_of(tmp_path, *common)
    riding = rounds_of(tmp_path, *common, "evaluation.with_training=true")
    for column in ("personal_accuracy", "personal_loss", "personal_accuracy_worst10", "client_eval_accuracy"):
        np.testing.assert_allclose(riding[column].iloc[1:], separate[column].iloc[1:], rtol=1e-6)


@pytest.mark.parametrize("overrides, match", [
    (["privacy.enabled=true"], "personal parameters"),
    (["fedlabel.enabled=true", "data.labels.fraction=0.5"], "personal parameters"),
    (["evaluation.decomposition=true"], "keep part of theirs")])
def test_what_would_send_or_read_personal_parameters_is_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_config(load_config(QUICKSTART, ["strategy.name=fedper", *overrides]))
