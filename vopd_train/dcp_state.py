"""The resumable training state of a torchrun run: a `torch.distributed.checkpoint` (DCP) folder.

    OUT/state/
        trainer_state.json   "format": "dcp", step, config, optimizer param groups, scheduler, RNG, skipped prompts
        dcp/*.safetensors     every rank's shards of the trainable weights, AdamW moments and EMA teacher

Each rank writes its own shards, in safetensors files that carry DCP's sharding information (no pickle). DCP
reshards on load, so a state saved by N ranks resumes on M ranks, or in one process without torchrun (which then
reads full tensors). The folder is replaced atomically, as the single-process state is (`checkpoint.py`).

Only the weights that train are saved (LoRA: the adapter); the rest is the starting model, reloaded on resume.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from vopd_bench import distributed
from vopd_bench.errors import VopdError
from vopd_train import checkpoint

FORMAT = "dcp"
TRAINABLE = StateDictOptions(ignore_frozen_params=True)


def is_dcp(path: Path) -> bool:
    try:
        return json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _flat(model: Any, optimizer: Any, teacher: dict[str, Tensor]) -> tuple[dict[str, Tensor], list]:
    """One flat name -> tensor dict of everything sharded, and the optimizer's param groups (plain JSON)."""
    flat = {f"student/{k}": v for k, v in _untied(get_model_state_dict(model, options=TRAINABLE)).items()}
    osd = get_optimizer_state_dict(model, optimizer, options=TRAINABLE)
    for fqn, st in osd["state"].items():
        for key, v in st.items():
            flat[f"optim/{fqn}/{key}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    flat.update({f"teacher/{k}": v for k, v in teacher.items()})
    return flat, osd["param_groups"]


def _untied(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tied weights (an LM head shared with the embeddings) appear under two names: keep the first; loading it
    fills both."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for k, v in sd.items():
        local = v.to_local() if isinstance(v, DTensor) else v
        ident = (local.data_ptr(), tuple(local.shape))
        if local.numel() and ident in seen:
            continue
        seen.add(ident)
        out[k] = v
    return out


def save(out: Path, *, meta: dict[str, Any], model: Any, optimizer: Any, scheduler: Any,
         teacher: dict[str, Tensor]) -> None:
    """Collective: every rank calls it. Rank 0 writes the JSON and swaps the folder in."""
    tmp = out / (checkpoint.STATE + ".tmp")
    flat, groups = _flat(model, optimizer, teacher)
    if distributed.rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "dcp").mkdir(parents=True)
    distributed.barrier()
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=distributed.active()))
    distributed.barrier()
    if distributed.rank() == 0:
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        body = {**meta, "format": FORMAT, "world_size": distributed.world_size(), "param_groups": groups,
                "scheduler": sched, "torch_rng": torch.get_rng_state().tolist(), "python_rng": checkpoint._py_rng(),
                "numpy_rng": checkpoint._np_rng()}
        (tmp / "trainer_state.json").write_text(json.dumps(body, indent=1), encoding="utf-8")
        checkpoint.publish_state(out)
    distributed.barrier()


def load(path: Path, *, model: Any, optimizer: Any, teacher: dict[str, Tensor]) -> dict[str, Any]:
    """Fill the model's trainable weights, the optimizer and the teacher's tensors from a DCP state (DCP loads in
    place, so `teacher` must be the teacher's own tensors, as `Teacher.state_tensors` gives them),
    resharding to this job's world size; restore the RNGs. Returns the JSON part (step, config, scheduler, ...)."""
    try:
        meta = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        flat, _ = _flat(model, optimizer, teacher)
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / "dcp")))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise VopdError(f"cannot read the saved training state in {path}: {' '.join(str(e).split())[:300]}; "
                        "use --restart") from None
    student = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("student/")}
    # tied weights were saved once (`_untied`): the other name shares the tensor just loaded
    set_model_state_dict(model, student, options=StateDictOptions(ignore_frozen_params=True, strict=False))
    state: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        if k.startswith("optim/"):
            fqn, key = k[len("optim/"):].rsplit("/", 1)
            state.setdefault(fqn, {})[key] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta.pop("param_groups")]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=TRAINABLE)
    torch.set_rng_state(torch.tensor(meta.pop("torch_rng"), dtype=torch.uint8))
    random.setstate(checkpoint._tuples(meta.pop("python_rng")))
    np_state = meta.pop("numpy_rng")
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return meta


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` (the same on every rank) cut to the shard `like` holds: a DTensor like `like`, or `full` itself."""
    if not isinstance(like, DTensor):
        return full.to(like.device)
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def load_single_process_state(state: dict[str, Any], *, model: Any, params: list, optimizer: Any,
                              teacher: dict[str, Tensor]) -> None:
    """Resume under torchrun from a state a single process saved (`checkpoint.load_state`'s full tensors): every
    rank reads all of it and keeps its own shards."""
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(live) != set(state["student"]):
        raise VopdError("the saved student does not match this model's trainable parameters; use --restart")
    with torch.no_grad():
        for n, p in live.items():
            p.copy_(shard_like(state["student"][n], p))
        for n, t in teacher.items():
            t.copy_(shard_like(state["teacher"][n], t))
    opt = state["optimizer"]
    opt["state"] = {i: {k: shard_like(v, params[i]) if isinstance(v, Tensor) and v.dim() else v
                        for k, v in st.items()} for i, st in opt["state"].items()}
    optimizer.load_state_dict(opt)


def save_trainable(folder: Path, model: Any) -> None:
    """Collective: every rank writes its shards of the trainable weights to `folder`/dcp (the best weights of a
    torchrun run, `best.py`)."""
    flat = _untied(get_model_state_dict(model, options=TRAINABLE))
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(folder / "dcp"), save_distributed=distributed.active()))


def load_trainable(folder: Path, model: Any) -> None:
    """Fill the trainable weights from `save_trainable`'s folder, resharded to this job (or one process)."""
    flat = _untied(get_model_state_dict(model, options=TRAINABLE))
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(folder / "dcp")))
    set_model_state_dict(model, flat, options=StateDictOptions(ignore_frozen_params=True, strict=False))


def load_full_trainable(model: Any, tensors: dict[str, Tensor]) -> None:
    """Fill a sharded model's trainable weights from full tensors (a single process's), each rank its shards."""
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(live) != set(tensors):
        raise VopdError("the saved student does not match this model's trainable parameters; use --restart")
    with torch.no_grad():
        for n, p in live.items():
            p.copy_(shard_like(tensors[n], p))

