"""Multi-GPU training with torchrun: DistributedDataParallel over the ONE trainable layer.

Paper §3.1 / §4: stage 1 is 20,000 steps of batch 256 on 4 A100s (64 per GPU, about 10 h).
This module turns the single-process trainer (`train.Trainer`) into that run:

    torchrun --standalone --nproc_per_node 4 -m minigpt4_min train --stage 1 --scale vicuna13b \\
        --shards '/data/laion/{00000..09999}.tar' --batch 64 --steps 20000 --out runs/stage1

- Every rank (a process per GPU with nccl, or per CPU core with gloo) loads the whole
  frozen model (ViT, Q-Former, LLM) from the same files: nothing frozen is sent over the
  network and nothing frozen gets a gradient. DistributedDataParallel (DDP) wraps the
  loss with every frozen tensor on its ignore list, so it broadcasts rank 0's
  `llama_proj` once and all-reduces only `llama_proj`'s gradients (`DistributedProjection`).
- global batch = batch_size (per rank) x world_size x accum_steps (the trainer's
  micro-batches, `train.py`). The loss is the GLOBAL batch's token mean: each rank
  divides its summed token loss by the all-reduced count of answer tokens / world (DDP
  then averages), so the gradient does not depend on how the batch is split. (LAVIS
  averages per-rank means: the same number whenever every rank holds as many answer
  tokens.)
- Data, two ways. Streamed shards (`ShardStream`, the full-scale path, encoder in the
  loop): each epoch the shard list is shuffled the same way on every rank, then split
  across ranks (webdataset's `split_by_node`) and DataLoader workers (`split_by_worker`),
  so no sample is read twice in an epoch. Cached features / the stage-2 set
  (`rank_slice`): every rank draws the same global batch from the step's seeded
  generator and keeps its own rows, so N ranks compute what one process computes.
- Rank 0 alone writes checkpoints; a barrier follows, so every rank may then read them
  and `--resume` from them (`DistributedTrainer`).
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .data import ImageProcessor, clean_caption, read_shards, shard_urls
from .train import Trainer


# ------------------------------------------------------------------ the process group
@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank of world_size, its device, and whether it owns the group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owner: bool = False               # this process created the group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """A process group exists (even of one rank): DDP and collectives are on."""
        return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None and default is not None:
        return default
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer "
                         "(torchrun sets RANK, WORLD_SIZE and LOCAL_RANK)") from None


def init(backend: str | None = None) -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): nccl on CUDA, gloo on the CPU. Without
    WORLD_SIZE: one process, no group. A group that already exists is joined as it is."""
    cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        local = _env_int("LOCAL_RANK", dist.get_rank())
        dev = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
        return Dist(dist.get_rank(), dist.get_world_size(), local, dev, owner=False)
    if "WORLD_SIZE" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} with WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r}: expected 'nccl' (GPUs) or 'gloo' (CPUs)")
    device = torch.device("cpu")
    if backend == "nccl":
        if not cuda or local >= torch.cuda.device_count():
            raise ValueError(f"nccl needs GPU {local} (LOCAL_RANK) but this machine has "
                             f"{torch.cuda.device_count() if cuda else 0}; use --backend gloo on CPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    return Dist(rank, world, local, device, owner=True)


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op without a group)."""
    if d.grouped:
        dist.barrier()


def shutdown(d: Dist, wait: bool = True) -> None:
    """Destroy the process group if this process created it (after a last barrier, unless
    `wait` is False: a failing rank must not wait for peers that will never come)."""
    if d.owner and d.grouped:
        if wait:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(backend: str | None = None) -> Iterator[Dist]:
    """`with process_group() as d:` join (or create) the group, and destroy it at the end."""
    d = init(backend)
    try:
        yield d
    except BaseException:
        shutdown(d, wait=False)
        raise
    shutdown(d)


# ------------------------------------------------------------------ the model under DDP
class _GlobalTokenLoss(nn.Module):
    """What DDP wraps: forward(batch) = this rank's share of the global batch's token-mean loss.

    The summed token loss S_r of this rank is divided by (the tokens of all ranks) / world;
    DDP averages the ranks' gradients, so the step's gradient is that of sum_r S_r / tokens.
    `token_divisor(n)` (the trainer's, when it accumulates micro-batches) gives this rank's
    tokens of the whole step; without it, the tokens of this batch (`n`) are used."""

    def __init__(self, model: nn.Module, world_size: int):
        super().__init__()
        self.model, self.world_size = model, world_size

    def forward(self, batch: dict, token_divisor: Callable | None = None) -> torch.Tensor:
        def global_tokens_per_rank(n: torch.Tensor) -> torch.Tensor:
            mine = token_divisor(n) if token_divisor is not None else n
            total = torch.as_tensor(mine, dtype=torch.float32, device=n.device).clone()  # () this rank's
            dist.all_reduce(total)                                                       # () all ranks'
            return total / self.world_size
        return self.model.loss(batch, token_divisor=global_tokens_per_rank)


class DistributedProjection:
    """The `model` the trainer sees under torchrun: `loss(batch)` runs through DDP, which
    all-reduces only `llama_proj`'s gradients; everything else is delegated to the model."""

    def __init__(self, model: nn.Module, d: Dist):
        if not d.grouped:
            raise RuntimeError("DistributedProjection needs a process group: call distributed.init() "
                               "under torchrun first")
        self.model, self.dist = model, d
        inner = _GlobalTokenLoss(model, d.world_size)
        trained = {f"model.{n}" for n, _ in model.trainable_parameters()}
        frozen = [f"model.{n}" for n, _ in model.named_parameters() if f"model.{n}" not in trained]
        frozen += [f"model.{n}" for n, _ in model.named_buffers()]
        # torch's (underscored, long-standing) way to keep tensors out of DDP: they are then
        # neither broadcast at the start (a 13B LLM would be) nor all-reduced
        DDP._set_params_and_buffers_to_ignore_for_model(inner, frozen)
        self.ddp = DDP(inner, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    def reduced_parameters(self) -> list[str]:
        """Names of the parameters whose gradients DDP all-reduces (only `llama_proj.*`)."""
        return [n[len("model."):] for n, p in self.ddp.module.named_parameters()
                if p.requires_grad and n not in self.ddp.parameters_to_ignore]

    def loss(self, batch: dict, token_divisor: Callable | None = None) -> torch.Tensor:
        """The loss of the global batch (its value: what one process would log) whose gradient
        is this rank's share (DDP's backward all-reduces it)."""
        share = self.ddp(batch, token_divisor)      # () this rank's share
        mean = share.detach().clone()
        dist.all_reduce(mean)
        mean /= self.dist.world_size                # () the global batch's loss
        return share + (mean - share.detach())      # value: the global loss; gradient: the share

    def num_targets(self, batch: dict) -> int:
        return self.model.num_targets(batch)

    def set_gradient_checkpointing(self, on: bool = True):
        self.model.set_gradient_checkpointing(on)
        return self

    def trainable_parameters(self):
        return self.model.trainable_parameters()

    def named_parameters(self):
        return self.model.named_parameters()

    def train_mode(self):
        self.model.train_mode()
        return self

    @property
    def projection_source(self):
        return getattr(self.model, "projection_source", None)

    @projection_source.setter
    def projection_source(self, value) -> None:
        self.model.projection_source = value


class DistributedTrainer(Trainer):
    """`Trainer` whose checkpoints only rank 0 writes; every rank waits until they exist."""

    def __init__(self, model, cfg, get_batch: Callable, out_dir=None, d: Dist | None = None):
        super().__init__(model, cfg, get_batch, out_dir)
        self.dist = d or Dist()

    def save(self, folder) -> Path:
        if self.dist.is_main:
            super().save(folder)
        barrier(self.dist)                          # the files exist for every rank from here on
        return Path(folder)


# ------------------------------------------------------------------ data: same global batch
def rank_slice(get_batch: Callable, d: Dist, per_rank: int) -> Callable:
    """`get_batch(step, g)` of the GLOBAL batch (per_rank x world rows) -> this rank's rows
    [rank x per_rank, (rank + 1) x per_rank). Every rank draws the same global batch from
    the step's seeded generator, so the ranks together see exactly that batch."""
    lo, hi, total = d.rank * per_rank, (d.rank + 1) * per_rank, per_rank * d.world_size

    def get(step: int, g: torch.Generator) -> dict:
        out = {}
        for k, v in get_batch(step, g).items():
            if isinstance(v, (torch.Tensor, list)):
                if len(v) != total:
                    raise ValueError(f"batch field {k!r} has {len(v)} rows; expected the global batch "
                                     f"of {per_rank} per rank x {d.world_size} ranks = {total}")
                v = v[lo:hi]                        # feats: (per_rank, Q, Hq)
            out[k] = v
        return out
    return get


# ------------------------------------------------------------------ data: streamed shards
class ShardStream(torch.utils.data.IterableDataset):
    """(image (3, S, S), caption) pairs of webdataset shards, one epoch per iteration, for this
    rank and DataLoader worker: the shard list shuffled by (seed, epoch), the same order on
    every rank, then split by rank and by worker (`data.read_shards`, webdataset's
    split_by_node / split_by_worker)."""

    def __init__(self, urls, processor: ImageProcessor, seed: int = 0):
        self.urls = shard_urls(urls)
        self.processor, self.seed, self.epoch = processor, seed, 0

    def shard_order(self) -> list[str]:
        order = list(self.urls)
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def __iter__(self):
        from webdataset.utils import pytorch_worker_info

        rank, world, worker, workers = pytorch_worker_info()
        if len(self.urls) < world * workers:
            raise ValueError(f"{len(self.urls)} shard(s) cannot feed {world} rank(s) x {workers} "
                             f"loader worker(s): expected at least {world * workers} shards")
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1009 + rank) * 101 + worker)
        for s in read_shards(self.shard_order(), split_by_node=True, split_by_worker=True):
            yield self.processor(s.image, g), clean_caption(s.caption)      # (3, S, S), str


def stream_batches(stream: ShardStream, batch_size: int, workers: int = 2,
                   max_txt_len: int = 32) -> Callable:
    """`get_batch(step, g)` for the trainer over a `ShardStream`: this rank's next batch of
    `batch_size` images (the encoder runs on them in the loss), a new epoch when one ends.
    Streams do not resume mid-epoch: a resumed run reads its shards again from the start of
    epoch 0's order (weights, optimizer and schedule resume exactly)."""
    state = {"it": None}

    def get_batch(step: int, g: torch.Generator) -> dict:
        for _ in range(2):
            if state["it"] is None:
                loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers,
                                                     drop_last=True)
                state["it"] = iter(loader)
            try:
                images, captions = next(state["it"])                       # (B, 3, S, S), [B]
                return {"images": images, "answers": list(captions), "max_txt_len": max_txt_len,
                        "end_sym": "\n"}
            except StopIteration:
                state["it"], stream.epoch = None, stream.epoch + 1
        raise ValueError(f"an epoch of this rank's shards holds fewer than {batch_size} samples per "
                         f"loader worker: lower --batch or --workers, or add shards")
    return get_batch
