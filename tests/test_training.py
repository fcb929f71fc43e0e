"""The local training loop: its optimizer matches PyTorch's, and training is a function of the seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clients.training import LeanSGD, train_locally
from fedsim.config import ClientSection
from fedsim.data.tensors import LocalData


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3))
    model[3].bias.requires_grad_(False)  # a frozen parameter must be left alone
    return model


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-2)])
def test_lean_sgd_follows_torch_sgd_exactly(momentum, weight_decay):
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=generator), torch.randint(0, 3, (5,), generator=generator))
               for _ in range(25)]
    ours, reference = small_model(0), small_model(0)
    lean = LeanSGD(ours.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    torch_sgd = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1,
                                momentum=momentum, weight_decay=weight_decay)
    for step, (x, y) in enumerate(batches):
        for model, optimizer in ((ours, lean), (reference, torch_sgd)):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if step % 7 == 3:  # a step where one layer gets no gradient at all
                loss = F.cross_entropy(model[:3](x), y)
            loss.backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0].weight, small_model(0)[0].weight)  # it did train


def test_local_training_depends_only_on_weights_data_and_seed():
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(37, 6, generator=generator), torch.randint(0, 3, (37,), generator=generator)
    data = LocalData(x, y, x[:0], y[:0])
    settings = ClientSection(local_epochs=2, batch_size=8, lr=0.05, momentum=0.9)

    def trained(seed: int) -> list[torch.Tensor]:
        model = small_model(0)
        stats = train_locally(model, data, settings, [], seed=seed, lr=settings.lr)
        assert stats["steps"] == 2 * 5 and stats["num_examples"] == 37
        return [p.detach().clone() for p in model.parameters()]

    first, again, other = trained(7), trained(7), trained(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
