"""Gradient buffers allocated once (`allocate_gradients`) and `clip_and_step`'s in-place zeroing."""

from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from rlhfkit.config import TrainingArguments
from rlhfkit.training.optim import allocate_gradients, build_optimizer, build_scheduler, clip_and_step


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    net[0].bias.requires_grad_(False)  # a frozen parameter gets no buffer
    return net


def train(net: nn.Module, keep: bool, steps: int = 3) -> list[float]:
    """`steps` AdamW steps, each over two accumulated micro-batches, clipped; returns the norms."""
    accelerator = Accelerator(cpu=True)
    args = TrainingArguments(learning_rate=0.05, weight_decay=0.1, max_grad_norm=0.5)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, args)
    scheduler = build_scheduler(optimizer, args, steps)
    params = [p for _, p in named]
    kept = allocate_gradients(accelerator, params) if keep else False
    assert kept == keep
    data = torch.Generator().manual_seed(7)
    norms = []
    for _ in range(steps):
        for _ in range(2):
            x, y = torch.randn(5, 6, generator=data), torch.randn(5, 3, generator=data)
            ((net(x) - y) ** 2).mean().backward()
        norms.append(clip_and_step(accelerator, net, optimizer, scheduler, args.max_grad_norm, params,
                                   keep_gradients=kept))
    return norms


def test_gradients_are_zeroed_views_of_one_buffer_that_survive_each_step():
    net = tiny_net(0)
    params = [p for p in net.parameters() if p.requires_grad]
    assert allocate_gradients(SimpleNamespace(distributed_type=DistributedType.NO), params)
    assert net[0].bias.grad is None
    storage = {p.grad.untyped_storage().data_ptr() for p in params}
    assert len(storage) == 1
    assert sum(p.grad.numel() for p in params) == params[0].grad.untyped_storage().nbytes() // 4
    assert all(p.grad.shape == p.shape and not p.grad.any() for p in params)
    pointers = [p.grad.data_ptr() for p in params]
    ((net(torch.randn(4, 6)) ** 2).sum()).backward()
    assert all(p.grad.any() for p in params)
    assert [p.grad.data_ptr() for p in params] == pointers  # accumulated in place
    optimizer = torch.optim.SGD(params, lr=0.1)
    clip_and_step(Accelerator(cpu=True), net, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                  0.0, params, keep_gradients=True)
    assert [p.grad.data_ptr() for p in params] == pointers and not any(p.grad.any() for p in params)


def test_kept_gradients_train_bit_for_bit_like_freed_ones():
    freed, kept = tiny_net(1), tiny_net(1)
    norms_freed = train(freed, keep=False)
    norms_kept = train(kept, keep=True)
    assert norms_freed == norms_kept
    for (name, a), (_, b) in zip(freed.named_parameters(), kept.named_parameters()):
        assert torch.equal(a, b), name
    assert all(p.grad is None for p in freed.parameters())


def test_sharded_training_keeps_its_own_gradient_storage():
    net = tiny_net(2)
    params = [p for p in net.parameters() if p.requires_grad]
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        assert not allocate_gradients(SimpleNamespace(distributed_type=kind), params)
    assert all(p.grad is None for p in params)
