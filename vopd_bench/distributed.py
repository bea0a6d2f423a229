"""Where this process sits in a torchrun job, and the few collectives vopd needs.

`torchrun` (torch.distributed.run) launches one process per device and tells each one its place through the
environment: RANK, WORLD_SIZE, LOCAL_RANK, and MASTER_ADDR/MASTER_PORT for the rendezvous. Without those
variables everything here is a no-op for a single process (rank 0 of 1), so code written against this module
runs unchanged with or without torchrun.

The process group is gloo on CPUs and nccl on GPUs (`cuda:LOCAL_RANK`). gap-report only needs barriers and small
object exchanges, so it asks for gloo even on GPUs (`init(backend="gloo")`): the GPUs stay with the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vopd_bench.errors import VopdError

# Ranks of a gap-report finish their shares at different times; the others wait at a barrier meanwhile. A
# training run keeps its ranks in step and sets its own, much shorter timeout (`vopd distill --dist-timeout`).
DEFAULT_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Place:
    """This process's rank, the job's world size and the device it should use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        """True in a torchrun job of more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def place_from_env(env: dict[str, str] | None = None) -> Place:
    """Read rank, world size and local rank from the torchrun environment (rank 0 of 1 without it)."""
    env = dict(os.environ) if env is None else env
    try:
        rank = int(env.get("RANK", "0"))
        world = int(env.get("WORLD_SIZE", "1"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise VopdError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise VopdError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and local >= torch.cuda.device_count():
        raise VopdError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible on this node")
    return Place(rank, world, local, device)


def init(backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> Place:
    """Join the torchrun job (once per process) and return this process's place.

    A single process returns rank 0 of 1 and starts nothing. `backend` defaults to nccl on GPUs and gloo on CPUs.
    `timeout`: how long a collective waits for the other ranks before it fails.
    """
    place = place_from_env()
    if not place.enabled:
        return place
    if not dist.is_initialized():
        chosen = backend or ("nccl" if place.device.startswith("cuda") else "gloo")
        if place.device.startswith("cuda"):
            torch.cuda.set_device(place.local_rank)
        kwargs: dict[str, Any] = {"backend": chosen, "timeout": timeout}
        if chosen == "nccl":
            kwargs["device_id"] = torch.device(place.device)
        dist.init_process_group(**kwargs)
    return place


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else place_from_env().rank


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a list of one without torchrun)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def group_gatherer(size: int) -> Callable[[Any], list[Any]]:
    """`all_gather_object` within this rank's group of `size` consecutive ranks (0..size-1, size..2·size-1, ...):
    a function from this rank's object to the group's, in rank order. Every rank must call this together, once
    (it creates the groups' process subgroups, which every rank of the job takes part in creating)."""
    if size == 1:
        return lambda obj: [obj]
    if not active() or dist.get_world_size() % size:
        raise VopdError(f"groups of {size} ranks need a torchrun job whose world size {size} divides "
                        f"(this one: {world_size()})")
    world = dist.get_world_size()
    group, _ = dist.new_subgroups_by_enumeration([list(range(s, s + size)) for s in range(0, world, size)])

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * size
        dist.all_gather_object(out, obj, group=group)
        return out

    return gather


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float], device: str | torch.device = "cpu") -> list[float]:
    """Element-wise sum of a list of numbers over ranks (float64)."""
    if not active() or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: int, device: str | torch.device = "cpu") -> int:
    """The largest `value` over ranks (`device`: where the process group's backend wants tensors)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


_BEFORE_SHUTDOWN: list[Any] = []


def before_shutdown(fn: Any) -> None:
    """Run `fn` when this process leaves its process group (`shutdown`), before the group goes: for what tears
    the group down itself (vLLM's engine shutdown destroys the default group), which must come last."""
    _BEFORE_SHUTDOWN.append(fn)


def shutdown() -> None:
    while _BEFORE_SHUTDOWN:
        _BEFORE_SHUTDOWN.pop()()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
