"""Gradient buffers allocated once (`cpu.gradients.allocate_gradients`), sparse embedding gradients
added into them (`sparse_embedding_gradients`), only where the CPU speed-ups apply, and
`clip_and_step`'s in-place zeroing."""

from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from transformers import LlamaForCausalLM

from conftest import CPU, float64_tolerance, tiny_llama
from rlhfkit.config import TrainingArguments
from rlhfkit.cpu.gradients import allocate_gradients, sparse_embedding_gradients
from rlhfkit.cpu.speedups import CpuSpeedups
from rlhfkit.training.optim import build_optimizer, build_scheduler, clip_and_step


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(CPU)  # kept CPU buffers
    net[0].bias.requires_grad_(False)  # a frozen parameter gets no buffer
    return net


LEARNING_RATE = 0.05


def training_setup(model: nn.Module, max_grad_norm: float, steps: int):
    """AdamW (lr 0.05, weight decay 0.1) and its schedule over `model`'s trainable parameters."""
    args = TrainingArguments(learning_rate=LEARNING_RATE, weight_decay=0.1, max_grad_norm=max_grad_norm)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, args)
    return args, optimizer, build_scheduler(optimizer, args, steps), [p for _, p in named]


def run_steps(accelerator, model: nn.Module, setup, steps: int, micro_batch, keep_gradients: bool) -> list[float]:
    """`steps` clipped AdamW steps (`setup` from `training_setup`), each accumulating two calls of
    `micro_batch()` (a forward and backward pass); returns the norms."""
    args, optimizer, scheduler, params = setup
    norms = []
    for _ in range(steps):
        for _ in range(2):
            micro_batch()
        norms.append(clip_and_step(accelerator, model, optimizer, scheduler, args.max_grad_norm, params,
                                   keep_gradients=keep_gradients))
    return norms


def train(net: nn.Module, keep: bool, steps: int = 3) -> list[float]:
    """`steps` AdamW steps, each over two accumulated micro-batches, clipped; returns the norms."""
    accelerator = Accelerator(cpu=True)
    setup = training_setup(net, 0.5, steps)
    kept = allocate_gradients(setup[3]) if keep else False
    assert kept == keep
    data = torch.Generator().manual_seed(7)

    def micro_batch():
        x, y = torch.randn(5, 6, generator=data), torch.randn(5, 3, generator=data)
        ((net(x) - y) ** 2).mean().backward()

    return run_steps(accelerator, net, setup, steps, micro_batch, kept)


def test_gradients_are_zeroed_views_of_one_buffer_that_survive_each_step():
    net = tiny_net(0)
    params = [p for p in net.parameters() if p.requires_grad]
    allocated = allocate_gradients(params)
    assert allocated
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
        accelerator = SimpleNamespace(device=CPU, num_processes=1, distributed_type=kind)
        speedups = CpuSpeedups.for_run("auto", accelerator)
        allocated = speedups.gradient_block(net, params)
        assert not allocated and not speedups.keep_gradients
    assert all(p.grad is None for p in params)


def tiny_tied_lm(dtype=torch.float32) -> LlamaForCausalLM:
    return tiny_llama(40, seed=3, tied=True).to(dtype)


def train_lm(model: LlamaForCausalLM, sparse: bool, steps: int = 3) -> list[float]:
    """AdamW steps over two accumulated micro-batches (pad tokens included), gradients kept in one buffer."""
    accelerator = Accelerator(cpu=True)
    setup = training_setup(model, 1.0, steps)
    allocated = allocate_gradients(setup[3])
    assert allocated
    embedding = model.get_input_embeddings()
    if sparse:
        switched = sparse_embedding_gradients(model)
        assert switched == 1
    else:
        assert not embedding.sparse
    pointer = embedding.weight.grad.data_ptr()
    data = torch.Generator().manual_seed(11)

    def micro_batch():
        ids = torch.randint(0, 40, (3, 7), generator=data)  # repeated tokens and pad (0) rows
        model(input_ids=ids, labels=ids).loss.backward()
        grad = embedding.weight.grad
        assert not grad.is_sparse and grad.data_ptr() == pointer  # added into the dense buffer

    return run_steps(accelerator, model, setup, steps, micro_batch, keep_gradients=True)


def test_sparse_embedding_gradients_train_like_dense_ones_in_the_same_buffer():
    """Float64: the sparse rows are added into the buffer in another order than the dense gradient.

    Tolerances: the norm is a sum over every gradient element; each AdamW step moves a weight by
    at most the learning rate times a ratio of gradient moments, which the two runs round
    differently by float64 rounding over a micro-batch's positions x the widest layer (32).
    """
    dense, sparse = tiny_tied_lm(torch.float64), tiny_tied_lm(torch.float64)
    assert sparse.get_input_embeddings().weight is sparse.lm_head.weight  # tied: head dense + rows sparse
    steps = 3
    norms_dense, norms_sparse = train_lm(dense, sparse=False, steps=steps), train_lm(sparse, sparse=True, steps=steps)
    assert sparse.get_input_embeddings().sparse
    elements = sum(p.numel() for p in dense.parameters())
    torch.testing.assert_close(norms_sparse, norms_dense, rtol=float64_tolerance(1.0, elements), atol=0)
    terms = 2 * 3 * 7 * 32  # two micro-batches of 3 x 7 positions, widest layer 32
    rtol, atol = float64_tolerance(1.0, terms), steps * LEARNING_RATE * float64_tolerance(1.0, terms)
    for (name, a), (_, b) in zip(dense.named_parameters(), sparse.named_parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=name)


def test_sparse_embedding_gradients_only_into_dense_buffers_on_one_process():
    model = tiny_tied_lm()
    embedding = model.get_input_embeddings()
    switched = sparse_embedding_gradients(model)
    assert switched == 0  # no buffer allocated: the gradient would stay sparse
    params = [p for p in model.parameters() if p.requires_grad]
    for accelerator in (SimpleNamespace(device=CPU, num_processes=2, distributed_type=DistributedType.MULTI_CPU),
                        SimpleNamespace(device=CPU, num_processes=1, distributed_type=DistributedType.DEEPSPEED)):
        allocated = CpuSpeedups.for_run("auto", accelerator).gradient_block(model, params)
        assert not allocated and not embedding.sparse  # several processes or sharded: nothing switched
    allocated = allocate_gradients(params)
    assert allocated
    embedding.weight.requires_grad_(False)  # frozen (LoRA): nothing to switch
    switched = sparse_embedding_gradients(model)
    assert switched == 0 and not embedding.sparse
