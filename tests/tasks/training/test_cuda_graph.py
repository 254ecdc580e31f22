"""The step on cached inputs: the plain loop's own arithmetic everywhere, and on CUDA a graph replay of it."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from tasks.lib.config import TrainParams
from tasks.lib.data import batch_order
from tasks.training.batches import BatchProducer
from tasks.training.cuda_graph import WARMUP_STEPS, CudaGraphStep, graph_for, graph_safe
from tasks.training.loop import cached_batch, fp32_logits, train_epoch
from tasks.training.optim import make_loss, make_optimizer, make_step, warmup_cosine
from tasks.training.runtime import Runtime

N, DIM, CLASSES, BATCH, EPOCHS = 100, 32, 4, 16, 3


def problem(device: str) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(N, DIM, generator=g)
    labels = torch.randint(0, CLASSES, (N,), generator=g)
    torch.manual_seed(1)
    return feats.to(device), labels, nn.Linear(DIM, CLASSES).to(device)


def orders() -> list[list[torch.Tensor]]:
    return [batch_order(N, BATCH, shuffle=True, seed=epoch) for epoch in range(EPOCHS)]


def train_loop(device: str, graphs: bool) -> tuple[nn.Linear, CudaGraphStep | None, list[float]]:
    """The head on cached features through the loop's own train_epoch, with a CUDA graph when asked."""
    feats, labels, head = problem(device)
    cfg = TrainParams(batch_size=BATCH, label_smoothing=0.1)
    rt = Runtime(torch.device(device), None)
    optimizer, graph = graph_for(make_optimizer(cfg, [{"params": list(head.parameters()), "lr": 0.01}]), rt, graphs)
    step = make_step(partial(fp32_logits, head), make_loss(cfg, labels, CLASSES, rt.device), optimizer, 2,
                     EPOCHS * len(orders()[0]), fp16=False)
    make = partial(cached_batch, feats, labels.to(device))
    losses = []
    for epoch, order in enumerate(orders()):
        with BatchProducer(order, make, rt.device) as batches:
            losses.append(train_epoch(step, batches, rt, "head", epoch, graph=graph))
    return head, graph, losses


def train_reference(device: str) -> tuple[nn.Linear, list[float]]:
    """The textbook loop: labels and indices from the host every step, loss summed per step."""
    feats, labels, head = problem(device)
    cfg = TrainParams(batch_size=BATCH, label_smoothing=0.1)
    optimizer = make_optimizer(cfg, [{"params": list(head.parameters()), "lr": 0.01}])
    scheduler = warmup_cosine(optimizer, 2, EPOCHS * len(orders()[0]))
    loss_fn = make_loss(cfg, labels, CLASSES, torch.device(device))
    losses = []
    for order in orders():
        total, seen = torch.zeros((), device=device), 0
        for idx in order:
            loss = loss_fn(head(feats[idx.to(device)]), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach() * len(idx)
            seen += len(idx)
        losses.append(float(total / seen))
    return head, losses


def test_on_the_cpu_the_loop_on_cached_inputs_is_the_textbook_loop_bit_for_bit() -> None:
    head, graph, losses = train_loop("cpu", graphs=True)
    reference, reference_losses = train_reference("cpu")
    assert graph is None   # no graphs off CUDA
    assert torch.equal(head.weight, reference.weight) and torch.equal(head.bias, reference.bias)
    assert losses == reference_losses and losses[-1] < losses[0]


def test_graph_safe_keeps_other_optimizers_and_devices_as_they_are() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(TrainParams(optimizer="sgd"), [{"params": params, "lr": 0.1}])
    assert graph_safe(sgd, Runtime(torch.device("cpu"), None)) is sgd
    adamw = make_optimizer(TrainParams(), [{"params": params, "lr": 0.1}])
    assert graph_safe(adamw, Runtime(torch.device("cpu"), None)) is adamw


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_graph_replays_the_same_training() -> None:
    head, graph, losses = train_loop("cuda", graphs=True)
    assert graph is not None and graph.graph is not None and graph.warm_steps == WARMUP_STEPS
    eager, _, eager_losses = train_loop("cuda", graphs=False)
    reference, reference_losses = train_reference("cuda")
    assert eager_losses == pytest.approx(reference_losses, rel=1e-6)   # graphs off: the textbook loop
    torch.testing.assert_close(eager.weight, reference.weight, rtol=1e-6, atol=1e-7)
    # The graph runs AdamW's fused kernel: the same update, rounded differently in the last bits.
    torch.testing.assert_close(head.weight, reference.weight, rtol=1e-4, atol=1e-5)
    assert losses == pytest.approx(reference_losses, rel=1e-4)
    assert torch.isfinite(head.weight).all() and not torch.equal(head.weight, problem("cuda")[2].weight)
