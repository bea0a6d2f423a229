"""The LoRA teachers switch the adapter off (or swap the moving average in) without peft's module walk, and
score exactly what peft's own `disable_adapter` scores."""

from __future__ import annotations

import pytest
import torch
from test_train_loop import tiny_cfg
from tiny_fixtures import tiny_family_dir  # noqa: F401

from vopd_train.trainer import Distiller

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_frozen_lora_teacher_is_the_base_model_and_leaves_the_student_as_it_was(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    d = Distiller(tiny_cfg(tiny_model_dir, tmp_path / "run", lora=True, lora_rank=4, teacher="frozen"))
    d.train_step(0)  # the adapter has moved: with it on, the student is not the base model
    prompts, _ = d._render(d._batch_indices(1))
    from vopd_train.rollout import build_sequences

    batch = build_sequences(prompts, [[20, 21, 22], [30]], [0, 1], d.pad_id)
    with torch.no_grad(), d.model.disable_adapter():  # peft's own switch
        want = d.model.get_base_model().model(**batch.tokens, **batch.vision(), use_cache=False).last_hidden_state
    want = want[batch.rows, batch.pos]
    walks = []
    monkeypatch.setattr(type(d.model), "get_model_status", lambda self: walks.append(1))
    got = d.teacher.hidden(batch)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    h = torch.randn(3, d.model.config.text_config.hidden_size)
    torch.testing.assert_close(d.teacher.head(h), d.model.get_output_embeddings()(h), rtol=0, atol=0)
    assert walks == []  # neither the scoring nor the head went through peft's disable_adapter
    with torch.no_grad():
        student = d.model.get_base_model().model(**batch.tokens, **batch.vision(), use_cache=False)
    assert not torch.allclose(student.last_hidden_state[batch.rows, batch.pos], want)  # the adapter is back on
    lora = [p for n, p in d.model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_the_patch_embedding_as_a_matmul_is_the_conv3d(family, tiny_model_dir, tiny_family_dir):  # noqa: F811
    """Qwen's patch embedding runs as one matmul in training: the same features and the same gradient to the
    weights as the Conv3d (to 1e-12 in float64: the same sums, in another order), and a deep copy of the model
    (a frozen teacher) reads its own weights."""
    import copy

    from vopd_bench.families import family_of
    from vopd_bench.modeling import load_model

    path = tiny_model_dir if family == "qwen2-vl" else tiny_family_dir(family)
    model, _ = load_model(str(path), device="cpu", dtype="float32")
    model.double()
    embed = model.model.visual.patch_embed
    conv_class = type(embed)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, embed.proj.weight[0].numel(), generator=g, dtype=torch.float64)
    want = embed(x)
    want.sum().backward()
    want_grad, embed.proj.weight.grad = embed.proj.weight.grad.clone(), None
    family_of(model.config).training_kernels(model)
    assert type(embed) is not conv_class and isinstance(embed, conv_class)
    got = embed(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    torch.testing.assert_close(embed.proj.weight.grad, want_grad, rtol=1e-12, atol=1e-12)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.visual.patch_embed.proj.weight.mul_(2)
    torch.testing.assert_close(embed(x), got)  # the copy's change stays in the copy
    torch.testing.assert_close(twin.model.visual.patch_embed(x), 2 * got - (0 if embed.proj.bias is None else
                                                                             embed.proj.bias))
