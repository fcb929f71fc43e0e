"""Method math against hand-computed closed forms, and packing/unpacking invariants."""

import copy

import numpy as np
import pytest
import torch

from clients.state import MemoryStore
from clients.training import train_locally
from fedsim.config import ClientSection, load_config
from fedsim.data.tensors import LocalData
from fedsim.engine.protocol import WorkerResult, encode_result
from fedsim.engine.server import RoundLog
from fedsim.engine.strategy import FedsimStrategy
from fedsim.errors import FedsimError
from fedsim.method import ClientContext, ClientResult, RoundResult, RunInfo, TrainPlan
from fedsim.registry import build_method
from fedsim.terms import Proximal
from strategies.scaffold import ControlGradient, ControlStep, Scaffold


def make(name: str, *overrides: str, sizes=(10, 20, 30, 40), **placement) -> FedsimStrategy:
    """The engine's strategy around method `name`, as a run builds it."""
    config = load_config(None, [f"strategy.name={name}", *overrides])
    run = RunInfo(["w"], np.array(sizes), config.client, config.experiment.seed)
    return FedsimStrategy(config, build_method(config, run), [], np.array(sizes), RoundLog(), **placement)


def reply(clients: dict[int, tuple[float, np.ndarray]], reduce: bool):
    result = WorkerResult()
    for cid, (n, w) in clients.items():
        outputs = {"model": {"w": w}}
        if reduce:
            result.sums.setdefault("model", {"w": np.zeros_like(w, dtype=np.float64)})
            result.sums["model"]["w"] += n * w
            result.weights["model"] = result.weights.get("model", 0.0) + n
            outputs = {}
        result.clients.append(ClientResult(cid, {"num_examples": n, "train_loss": 1.0}, outputs))
    return encode_result(result)


@pytest.mark.parametrize("reduce", [True, False])
def test_fedavg_is_the_sample_weighted_mean_in_any_arrival_order(reduce):
    strategy = make("fedavg", f"evaluation.decomposition={str(not reduce).lower()}")
    assert strategy.replies_per_client == (not reduce)
    strategy._current = {"w": np.zeros(3, np.float32)}
    models = {c: np.random.default_rng(c).normal(size=3).astype(np.float32) for c in range(4)}
    sizes = {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0}
    replies = [([0, 3], reply({0: (10.0, models[0]), 3: (40.0, models[3])}, reduce), ""),
               ([1, 2], reply({1: (20.0, models[1]), 2: (30.0, models[2])}, reduce), "")]
    expected = sum(sizes[c] * models[c].astype(np.float64) for c in range(4)) / 100.0
    result = strategy.unpack(replies)
    new, _ = strategy.method.aggregate(1, strategy._current, result)
    new_reversed, _ = strategy.method.aggregate(1, strategy._current, strategy.unpack(replies[::-1]))
    np.testing.assert_allclose(new["w"], expected, rtol=1e-6)
    np.testing.assert_array_equal(new["w"], new_reversed["w"])
    assert [c.client_id for c in result.clients] == [0, 1, 2, 3]
    assert new["w"].dtype == np.float32


def test_worker_failure_marks_its_clients_failed_and_the_round_goes_on():
    strategy = make("fedavg")
    strategy._current = {"w": np.zeros(2, np.float32)}
    replies = [([0, 1], None, "worker error: boom"),
               ([2], reply({2: (5.0, np.ones(2, np.float32))}, True), "")]
    result = strategy.unpack(replies)
    new, _ = strategy.method.aggregate(1, strategy._current, result)
    np.testing.assert_allclose(new["w"], 1.0)
    assert set(result.failures) == {0, 1} and [c.client_id for c in result.clients] == [2]


def result_with_mean(mean: np.ndarray) -> RoundResult:
    return RoundResult(clients=[ClientResult(0, {"num_examples": 1.0})],
                       means={"model": {"w": mean}})


def test_fedavgm_matches_the_momentum_recursion():
    strategy = make("fedavgm", "strategy.server_lr=0.5", "strategy.momentum=0.9")
    w = np.array([1.0, -2.0])
    v = np.zeros(2)
    for target in ([2.0, 0.0], [0.0, 1.0], [3.0, 3.0]):
        delta = np.array(target) - w
        v = 0.9 * v + delta
        expected = w + 0.5 * v
        w = strategy.method.aggregate(1, {"w": w}, result_with_mean(np.array(target)))[0]["w"]
        np.testing.assert_allclose(w, expected)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_fedopt_matches_the_paper_updates(name):
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = make(name, f"strategy.server_lr={eta}", f"strategy.tau={tau}")
    w, m, v = np.array([0.5, -0.5]), np.zeros(2), np.full(2, tau**2)
    for target in ([1.0, 0.0], [0.0, 0.0], [2.0, -1.0]):
        d = np.array(target) - w
        m = b1 * m + (1 - b1) * d
        v = (b2 * v + (1 - b2) * d**2 if name == "fedadam"
             else v - (1 - b2) * d**2 * np.sign(v - d**2))
        expected = w + eta * m / (np.sqrt(v) + tau)
        w = strategy.method.aggregate(1, {"w": w}, result_with_mean(np.array(target)))[0]["w"]
        np.testing.assert_allclose(w, expected)


def scaffold_context(model, anchor, server_c, store, lr=0.1) -> ClientContext:
    return ClientContext(0, 1, TrainPlan(), anchor, server_c, store, ClientSection(), lr)


def test_proximal_and_control_variate_terms_have_the_right_gradients():
    model = torch.nn.Linear(3, 2)
    anchor = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    server_c = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    ctx = scaffold_context(model, anchor, server_c, MemoryStore())
    Proximal(Proximal.Params(mu=0.3), ctx).penalty(model, None).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - anchor[n]))
    model.zero_grad()
    gradient = Scaffold({"correction": "gradient"}).loss_terms(ctx)[0]
    assert isinstance(gradient, ControlGradient)
    gradient.penalty(model, None).backward()
    for n, p in model.named_parameters():  # no stored c_i yet: the correction is c itself
        torch.testing.assert_close(p.grad, server_c[n])


def test_scaffold_steps_as_its_reference_code_with_momentum():
    """Default correction: torch's SGD step (momentum, weight decay), then w -= lr (c - c_i),
    as NIID-Bench's train_net_scaffold and Flower's ScaffoldOptimizer.step_custom."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    model[1].bias.requires_grad_(False)  # a frozen parameter neither steps nor shifts
    server_c = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    own = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    store = MemoryStore()
    store.save("control", {n: t.numpy() for n, t in own.items()})
    settings = ClientSection(batch_size=4, local_epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-3)
    ctx = ClientContext(0, 1, TrainPlan(), {}, server_c, store, settings, settings.lr)
    terms = Scaffold().loss_terms(ctx)
    assert isinstance(terms[0], ControlStep)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    data = LocalData(x, y, x[:2], y[:2], None, None)
    reference, frozen = copy.deepcopy(model), model[1].bias.detach().clone()
    metrics = train_locally(model, data, settings, terms, 7, settings.lr)

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    generator, losses = torch.Generator().manual_seed(7), []
    for _ in range(2):
        order = torch.randperm(10, generator=generator)
        for start in range(0, 10, 4):
            rows = order[start:start + 4]
            loss = torch.nn.functional.cross_entropy(reference(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for n, p in reference.named_parameters():
                    if p.requires_grad:
                        p.add_(server_c[n] - own[n], alpha=-0.05)
            losses.append(loss.item())
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=n)
    torch.testing.assert_close(model[1].bias, frozen, rtol=0, atol=0)
    assert metrics["train_loss"] == pytest.approx(np.mean(losses))  # the cross-entropy alone


def test_scaffold_client_update_is_option_two_and_kept_as_client_state():
    model = torch.nn.Linear(3, 2)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    server_c = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    own = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    store = MemoryStore()
    store.save("control", {n: t.numpy() for n, t in own.items()})
    ctx = scaffold_context(model, anchor, server_c, store, lr=0.05)
    term = Scaffold().loss_terms(ctx)[0]
    for n in own:  # the correction is c - c_i
        torch.testing.assert_close(term.shift[n], server_c[n] - own[n])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    ctx.steps = 4
    update = Scaffold().after_training(ctx, model)
    for n, p in model.named_parameters():
        new = own[n] - server_c[n] + (anchor[n] - p.detach()) / (4 * 0.05)
        np.testing.assert_allclose(store["control"][n], new.numpy(), rtol=1e-6)
        np.testing.assert_allclose(update.outputs["control_delta"][n], (new - own[n]).numpy(), rtol=1e-5)


def test_scaffold_server_update_follows_the_paper():
    strategy = make("scaffold", sizes=(10,) * 8)
    method = strategy.method
    current = {"w": np.zeros(2, np.float32)}
    np.testing.assert_array_equal(method.broadcast(1, current)["w"], [0.0, 0.0])
    result = RoundResult(clients=[ClientResult(c, {"num_examples": 1.0}) for c in range(2)],
                         means={"model": {"w": np.array([1.0, 2.0], np.float32)},
                                "control_delta": {"w": np.array([4.0, -8.0], np.float32)}})
    new, _ = method.aggregate(1, current, result)
    np.testing.assert_allclose(new["w"], [1.0, 2.0])
    np.testing.assert_allclose(method.state["w"], [1.0, -2.0])  # |S|/N = 2/8
    np.testing.assert_allclose(method.broadcast(2, new)["w"], [1.0, -2.0])


def test_cohorts_are_seeded_per_round():
    a, b = make("fedavg", sizes=(10,) * 100).sampler, make("fedavg", sizes=(10,) * 100).sampler
    assert a.sample_cohort(3) == b.sample_cohort(3)
    assert a.sample_cohort(3) != a.sample_cohort(4)
    assert len(a.sample_cohort(3)) == 10 and len(set(a.sample_cohort(3))) == 10


class FakeGrid:
    """The part of a Flower Grid the strategy asks: which nodes are online."""

    def __init__(self, online):
        self.online = online

    def get_node_ids(self):
        return list(self.online)


def test_deployed_sampling_skips_offline_nodes_and_stops_below_the_minimum():
    strategy = make("fedavg", "strategy.clients_per_round=3", "strategy.min_available_clients=2",
                    placement={0: 100, 1: 101, 2: 102, 3: 103})
    strategy.update_availability(FakeGrid([100, 101, 102, 103]))
    plain = make("fedavg", "strategy.clients_per_round=3").sampler
    assert strategy.sampler.sample_cohort(5) == plain.sample_cohort(5)
    strategy.update_availability(FakeGrid([101, 103]))
    assert strategy.sampler.available == [1, 3] and strategy.sampler.sample_cohort(5) == [1, 3]
    with pytest.raises(FedsimError, match="min_available_clients = 2"):
        strategy.update_availability(FakeGrid([103]))


def test_superlink_error_replies_fail_the_clients_of_the_message_they_answer(monkeypatch):
    from types import SimpleNamespace

    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_task_id", 1), ("_node_id", 1)):  # as inside a run
        monkeypatch.setattr(TaskIdentity, name, value)
    strategy = make("fedavg", placement={0: 100, 1: 101})
    tasks = strategy.tasks(1, {"w": np.zeros(2, np.float32)}, [0, 1], 2, train=True)
    messages = strategy.messages(tasks, FakeGrid([100, 101]), "train", 1)
    for number, message in enumerate(messages):  # what the grid does when it pushes them
        message.metadata.__dict__["_message_id"] = f"m{number}"
    assert [m.metadata.dst_node_id for m in messages] == [100, 101]
    unavailable = SimpleNamespace(  # written by the SuperLink itself (node id 1) for node 101
        metadata=SimpleNamespace(reply_to_message_id="m1", src_node_id=1),
        has_error=lambda: True, error=SimpleNamespace(reason="node unavailable"))
    replies = strategy.replies([unavailable])
    assert ([1], None, "worker error: node unavailable") in replies
    assert ([0], None, "no reply within engine.timeout") in replies
