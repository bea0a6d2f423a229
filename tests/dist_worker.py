"""Run by torchrun from test_distributed.py: one rank of a gap-report or distill job, with test hooks.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/dist_worker.py MODE CONFIG_JSON

MODE `gap-report`: `run_gap_report(GapReportConfig(**config))`; with "kill_rank" and "kill_after" in the config,
that rank SIGKILLs itself after that many batches. MODE `distill`: `Distiller(DistillConfig(**config)).train()`;
with "seed_engine": true, rollouts come from `SeedEngine`. MODE `setup-memory`: the peak memory of building the
trainer, written to CONFIG["result"].rankR.json. MODE `head`: the sharded LM head's loss and gradients against a
replicated model's (`sharded_head`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

from vopd_train.rollout import Rollout


class SeedEngine:
    """Deterministic rollouts that depend only on each prompt's own seed, never on its rank or batch neighbours:
    rollout j of a prompt is 1–3 tokens drawn from its seed."""

    def generate(self, prompts, settings):
        out = []
        for i, seed in enumerate(settings.prompt_seeds):
            for j in range(settings.n):
                h = (seed * 31 + j * 7) % 1009
                out.append(Rollout(i, [40 + h % 7, 50 + h % 5, 60 + h % 3][: 1 + h % 3]))
        return out

    def sync_weights(self, model):
        return None


def _memory_kib() -> dict[str, int]:
    """This process's resident set now and at its peak (Linux /proc), KiB."""
    import re

    status = open("/proc/self/status", encoding="utf-8").read()
    return {k: int(v) for k, v in re.findall(r"(VmHWM|VmRSS):\s+(\d+)", status)}


def setup_memory(config: dict) -> None:
    """The peak resident memory of building the trainer (model, teacher, optimizer), above what the process held
    before: everything heavy is imported and the process group started first, then the peak is reset."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from peft import LoraConfig, get_peft_model  # noqa: F401
    from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: F401

    from vopd_bench import distributed
    from vopd_bench.benchmarks import synthetic  # noqa: F401
    from vopd_train import fsdp, recompute, sharded_load  # noqa: F401
    from vopd_train.config import DistillConfig
    from vopd_train.trainer import Distiller

    out = config.pop("result")
    cfg = DistillConfig(**config)
    distributed.init()
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    before = _memory_kib()["VmRSS"]
    trainer = Distiller(cfg, engine=SeedEngine())
    after = _memory_kib()
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in trainer.model.parameters())
    with open(f"{out}.rank{distributed.rank()}.json", "w", encoding="utf-8") as f:
        json.dump({"before_kib": before, "peak_kib": after["VmHWM"], "local_params": local}, f)


def sharded_head(config: dict) -> None:
    """The loss through the sharded LM head (gathered once, applied per chunk) against the same loss through a
    replicated copy of the model on every rank, its gradients summed over ranks by hand: each rank scores a
    different number of tokens (so a different number of chunks). Writes what differs."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from vopd_bench import distributed
    from vopd_bench.modeling import load_model
    from vopd_train import fsdp
    from vopd_train.losses import chunked_divergence
    from vopd_train.rollout import backbone, head_fn
    from vopd_train.sharded_load import ShardedLoader

    torch.set_num_threads(1)
    place = distributed.init()
    loader = ShardedLoader(config["model"], "cpu")
    student, _ = loader.student()
    teacher = loader.copy_of(student)
    ref, _ = load_model(config["model"], device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 400, (2, 9), generator=g)  # the same on every rank
    crop = torch.randint(10, 400, (2, 9), generator=g)
    cut = [0, 5, 18][place.rank:place.rank + 2]  # rank 0 scores 5 tokens, rank 1 the other 13
    chunk, rows = 4, slice(*cut)

    def losses(s_net, t_net, heads):
        s_net.train()
        s_net.zero_grad(set_to_none=True)
        mask = torch.ones_like(ids)
        hs = backbone(s_net)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        with torch.no_grad():
            ht = backbone(t_net)(input_ids=crop, attention_mask=mask, use_cache=False).last_hidden_state
        hs, ht = hs.flatten(0, 1)[rows], ht.flatten(0, 1)[rows]
        with heads:
            out = chunked_divergence(hs, ht, head_fn(s_net), head_fn(t_net), ids.flatten()[rows], topk=7,
                                     chunk_size=chunk)
            out.loss.sum().backward()
        return out.loss.detach()

    sharded = losses(student, teacher, fsdp.gathered_heads(student, teacher))
    replicated = losses(ref, ref, contextlib.nullcontext())
    worst = 0.0
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    for grad in ref_grads.values():
        dist.all_reduce(grad)
    for name, p in student.named_parameters():
        if (p.grad is None) != (name not in ref_grads):
            raise AssertionError(f"{name}: a gradient on one side only")
        if p.grad is None:  # the vision tower: no image in these sequences
            continue
        full = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        want = ref_grads[name]
        worst = max(worst, float((full - want).norm() / want.norm()))
    head = fsdp.lm_head(student).weight
    with open(f"{config['result']}.rank{place.rank}.json", "w", encoding="utf-8") as f:
        json.dump({"tokens": cut[1] - cut[0], "loss_diff": float((sharded - replicated).abs().max()),
                   "loss": float(sharded.sum()), "grad_rel_err": worst, "grads": len(ref_grads),
                   "head_sharded": isinstance(head, DTensor) and head.to_local().shape[0] < head.shape[0]}, f)


def main() -> None:
    mode, config = sys.argv[1], json.loads(sys.argv[2])
    if mode == "gap-report":
        from vopd_bench.runner import GapReportConfig, run_gap_report

        kill_rank, kill_after = config.pop("kill_rank", None), config.pop("kill_after", None)

        def on_batch(n: int) -> None:
            if int(os.environ.get("RANK", "0")) == kill_rank and n >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        run_gap_report(GapReportConfig(**config), on_batch=on_batch)
    elif mode == "setup-memory":
        setup_memory(config)
    elif mode == "head":
        sharded_head(config)
    elif mode == "distill":
        from vopd_train.config import DistillConfig
        from vopd_train.trainer import Distiller

        engine = SeedEngine() if config.pop("seed_engine", False) else None
        Distiller(DistillConfig(**config), engine=engine).train()
    else:
        raise SystemExit(f"unknown mode {mode}")
    from vopd_bench import distributed

    distributed.shutdown()


if __name__ == "__main__":
    main()
