"""The Liger patch against the unpatched forward, on the CPU.

Liger's Triton kernels need a GPU, so the patching code is run here with the torch reference kernels
(`TORCH_KERNELS`), which must reproduce the unpatched loss and gradients exactly; `apply_liger(force=True)`
then checks that Liger's kernels are put in the same places. `bench/gpu_check.py` compares the real
kernels on a GPU. The matrix is every family of the table whose Liger is not refused (`Family.refusal`).
"""
from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

from vlft.errors import VlftError
from vlft.models.patches import (
    TORCH_KERNELS,
    apply_kernels,
    apply_liger,
    liger,
    liger_applied,
    patch_fused_lm_loss,
    patched_parts,
    torch_linear_cross_entropy_sum,
    torch_rms_norm,
)
from vlft.models.registry import FAMILIES, get_family
from vlft.models.tiny import build_model, build_processor, build_tokenizer

LAYERS = 2  # tiny.build_model's default
LIGER_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.refusal("liger") is None)
MOE_FAMILIES = tuple(name for name in LIGER_FAMILIES if get_family(name).moe is not None)
# transformers' Qwen3_5RMSNorm / Qwen3_5MoeRMSNorm compute x_normed * (1 + w) (shared/NOTES.md); the others w * x_normed
ZERO_CENTRED = {"qwen3_5", "qwen3_5_moe"}


def test_the_matrix_covers_the_new_families():
    assert {"qwen3_5", "qwen3_5_moe", "qwen3_vl_moe"} <= set(LIGER_FAMILIES)
    assert set(MOE_FAMILIES) == {"qwen3_5_moe", "qwen3_vl_moe"}


@pytest.fixture(scope="module", params=LIGER_FAMILIES)
def setup(request):
    return (request.param, *_tokenizer_and_batch(request.param))


@functools.cache
def _tokenizer_and_batch(family):
    """(tokenizer, batch): two conversations of different lengths, one image each, padded;
    labels on the answer only, as the SFT dataset builds them."""
    tok = build_tokenizer(family)
    processor = build_processor(family, tok)
    conversations = [("What colour is the shape?", "A red square on a blue background."), ("Describe the image.", "A cat.")]
    texts = [
        processor.apply_chat_template([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ], tokenize=False)
        for question, answer in conversations
    ]
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (48, 64), (30, 30, 200))]
    batch = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    assert "mm_token_type_ids" in batch and batch["image_grid_thw"].shape[0] == 2
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    turns = (batch["input_ids"] == tok.convert_tokens_to_ids("<|im_start|>")).int().cumsum(1)
    labels[turns < turns[:, -1:]] = -100  # everything before the last (assistant) turn
    assert 0 < (labels != -100).sum() < labels.numel() / 2
    batch["labels"] = labels
    return tok, batch


def _is_norm_class(module):
    return "RMSNorm" in type(module).__name__  # RMSNorm and Qwen3.5's RMSNormGated


def _model(family, tok):
    """The tiny model (same seed -> same weights on every call) with its language model's norm weights moved off
    their initial ones and zeros (Qwen3.5 initialises its zero-centred norms at 0), so that a kernel with the wrong
    offset or weight handling shows in the loss and every gradient."""
    model = build_model(family, tok)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.model.language_model.modules():
            if _is_norm_class(module):
                module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=gen))
    model.train()
    return model


def _step(model, batch, **extra):
    """Loss, output and gradients of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, **extra)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_same(ref, ref_grads, got, got_grads):
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=0)
    assert got_grads.keys() == ref_grads.keys()
    missing = [name for name, grad in ref_grads.items() if grad.abs().max() > 0 and got_grads[name].abs().max() == 0]
    assert not missing, missing
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _counting(kernels):
    """TORCH_KERNELS that count their calls, to prove the patched modules really route through them."""
    calls = {"rms_norm": 0, "silu_mul": 0, "linear_cross_entropy_sum": 0}

    def wrap(name, fn):
        def counted(*args):
            calls[name] += 1
            return fn(*args)
        return counted

    return replace(kernels, **{name: wrap(name, getattr(kernels, name)) for name in calls}), calls


def _norm_names(model):
    """Language-model modules whose class is an RMSNorm (not the gated one), by name: what must be patched."""
    return [f"model.language_model.{name}" for name, m in model.model.language_model.named_modules()
            if type(m).__name__.endswith("RMSNorm")]


def _norm_count(model):
    return len(_norm_names(model))


def _expected_counts(family, model):
    """From the family's text shape: a SwiGLU MLP per dense layer and per shared expert; one gated norm (left on
    torch) per linear-attention layer."""
    fam = get_family(family)
    shape = fam.text_shape(model.config.text_config)
    shared = len(shape.moe_layers) if fam.moe is not None and fam.moe.shared_expert else 0
    return {"rms_norm": _norm_count(model), "swiglu": shape.layers - len(shape.moe_layers) + shared,
            "norms_left": shape.linear_attention_layers}


@pytest.mark.parametrize("num_items", [None, 23])
def test_reference_kernels_reproduce_loss_and_gradients(setup, num_items):
    family, tok, batch = setup
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref, ref_grads = _step(_model(family, tok), batch, **extra)

    model = _model(family, tok)
    kernels, calls = _counting(TORCH_KERNELS)
    counts = apply_kernels(model, kernels)
    assert counts == _expected_counts(family, model)
    got, got_grads = _step(model, batch, **extra)

    _assert_same(ref, ref_grads, got, got_grads)
    assert ref.logits is not None and got.logits is None  # the fused loss never builds the logits
    assert type(got) is type(ref)
    assert calls == {"rms_norm": counts["rms_norm"], "silu_mul": counts["swiglu"], "linear_cross_entropy_sum": 1}
    if num_items is not None:  # sum / num_items_in_batch, not the mean
        assert not torch.allclose(got.loss, _step(model, batch)[0].loss)


def test_norm_casting_is_each_norm_class_own_in_bf16(setup):
    """The casting that goes with each probed offset is the module's own: in bf16, the patched norm (reference
    kernel with the recorded offset and casting) equals the class forward bit for bit, and the other casting does
    not (in fp32, where the loss tests run, the two castings agree, so only this test tells them apart)."""
    family, tok, _ = setup
    model = _model(family, tok).to(torch.bfloat16)
    apply_kernels(model, TORCH_KERNELS)
    gen = torch.Generator().manual_seed(2)
    names, differs = _norm_names(model), []
    for name in names:
        module = model.get_submodule(name)
        x = (3 * torch.randn(4, 5, module.weight.shape[0], generator=gen)).to(torch.bfloat16)
        expected = type(module).forward(module, x)
        torch.testing.assert_close(module(x), expected, atol=0, rtol=0)
        eps_name, offset, casting = module._vlft_norm_style
        other = {"llama": "gemma", "gemma": "llama"}[casting]
        differs.append(not torch.equal(torch_rms_norm(x, module.weight, getattr(module, eps_name), offset, other),
                                       expected))
    assert all(differs), [name for name, d in zip(names, differs) if not d]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_loss_keeps_the_load_balancing_term(family):
    """With `output_router_logits` and `router_aux_loss_coef` set (what --router_aux_loss_coef sets), the library's
    loss is cross-entropy + 0.01 x aux_loss; the fused loss must be the same, with the same gradients (the router's
    included) and `aux_loss` in its output."""
    tok, batch = _tokenizer_and_batch(family)

    def routed(patch: bool):
        model = _model(family, tok)
        model.config.text_config.output_router_logits = True
        model.config.text_config.router_aux_loss_coef = 0.01
        if patch:
            apply_kernels(model, TORCH_KERNELS)
        return model

    cross_entropy = _step(_model(family, tok), batch)[0]
    assert cross_entropy.aux_loss is None
    ref, ref_grads = _step(routed(False), batch)
    assert ref.aux_loss is not None and ref.aux_loss > 0
    torch.testing.assert_close(ref.loss, cross_entropy.loss + 0.01 * ref.aux_loss, atol=1e-6, rtol=0)
    got, got_grads = _step(routed(True), batch)
    _assert_same(ref, ref_grads, got, got_grads)
    torch.testing.assert_close(got.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    assert got.logits is None and got.router_logits is not None


def test_reference_kernels_with_gradient_checkpointing(setup):
    family, tok, batch = setup
    models = [_model(family, tok), _model(family, tok)]
    for model in models:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_kernels(models[1], TORCH_KERNELS)
    _assert_same(*_step(models[0], batch), *_step(models[1], batch))


def _lora_targets(family, model):
    """q_proj of the first full-attention layer, and gate/down of the first SwiGLU MLP (a dense MLP or a shared
    expert; None for a family without one), read from the family's text shape and MoE layout."""
    fam = get_family(family)
    shape = fam.text_shape(model.config.text_config)
    prefix = "model.language_model.layers."
    targets = [f"{prefix}{shape.layer_kinds.index('full_attention')}.self_attn.q_proj"]
    if not shape.moe_layers:
        mlp = f"{prefix}0.mlp"
    elif fam.moe.shared_expert:
        mlp = f"{prefix}{shape.moe_layers[0]}.{fam.moe.shared_expert}"
    else:
        return targets, None
    return targets + [f"{mlp}.gate_proj", f"{mlp}.down_proj"], mlp


def test_reference_kernels_under_peft_lora(setup):
    """LoRA on attention and MLP projections (their wrappers must stay in the path) and a trainable copy of
    lm_head (PEFT's ModulesToSaveWrapper), with the patch applied before and after PEFT wraps the model."""
    from peft import LoraConfig, get_peft_model

    family, tok, batch = setup
    targets, mlp = _lora_targets(family, _model(family, tok))
    config = dict(r=4, lora_alpha=8, target_modules=targets,
                  modules_to_save=["lm_head"], init_lora_weights=False)  # random B too, so LoRA changes the loss

    def wrapped(patch_before: bool | None):
        model = _model(family, tok)
        if patch_before:
            apply_kernels(model, TORCH_KERNELS)
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(**config))
        if patch_before is False:
            apply_kernels(model, TORCH_KERNELS)
        return model

    ref, ref_grads = _step(wrapped(None), batch)
    assert any("lora_B" in name for name in ref_grads) and any("modules_to_save" in name for name in ref_grads)
    for patch_before in (True, False):
        model = wrapped(patch_before)
        got, got_grads = _step(model, batch)
        _assert_same(ref, ref_grads, got, got_grads)
        assert got.logits is None
        if mlp:
            assert type(model.get_base_model().get_submodule(f"{mlp}.gate_proj")).__module__.startswith("peft.")
        assert patched_parts(model).keys() == {"rms_norm", "fused_lm_loss"} | ({"swiglu"} if mlp else set())


def test_lora_on_lm_head_falls_back_to_the_materialised_loss(setup, capsys):
    from peft import LoraConfig, get_peft_model

    family, tok, batch = setup
    config = LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    torch.manual_seed(1)
    ref, ref_grads = _step(get_peft_model(_model(family, tok), config), batch)
    torch.manual_seed(1)
    model = get_peft_model(_model(family, tok), config)
    apply_kernels(model, TORCH_KERNELS)
    liger._logged.clear()
    got, got_grads = _step(model, batch)
    _assert_same(ref, ref_grads, got, got_grads)
    assert got.logits is not None  # the head's LoRA must run, so the original forward did
    assert "fused linear cross-entropy is off" in capsys.readouterr().err


def test_without_labels_or_in_eval_the_original_forward_runs(setup):
    family, tok, batch = setup
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref_model, model = _model(family, tok), _model(family, tok)
    apply_kernels(model, TORCH_KERNELS)
    with torch.no_grad():
        ref, got = ref_model(**inputs), model(**inputs)
        assert got.loss is None
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-6, rtol=0)
        ref_model.eval()
        model.eval()
        ref, got = ref_model(**batch), model(**batch)  # evaluation keeps logits for metrics
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.loss, ref.loss, atol=1e-6, rtol=0)


def test_patched_forward_keeps_the_signature(setup):
    """The Trainer (unused-column removal, loss kwargs) and the collator read `model.forward`'s parameters."""
    family, tok, _ = setup
    model = _model(family, tok)
    before = inspect.signature(model.forward)
    apply_kernels(model, TORCH_KERNELS)
    assert model.__dict__.get("forward") is not None
    assert inspect.signature(model.forward) == before
    assert "mm_token_type_ids" in inspect.signature(model.forward).parameters


def test_apply_liger_on_cpu_skips_and_says_so(setup, capsys, monkeypatch):
    family, tok, _ = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _model(family, tok)
    assert apply_liger(model) is False
    assert not liger_applied(model)
    assert patched_parts(model) == {}
    assert all("forward" not in m.__dict__ for m in model.modules())  # every forward is still the class's
    err = capsys.readouterr().err
    assert "Liger kernels need a CUDA GPU" in err and "skipped" in err


def test_apply_liger_forced_puts_liger_kernels_in_place(setup):
    """Without running them (Liger needs a GPU): the right modules get our forwards, calling Liger's kernels."""
    family, tok, _ = setup
    model = _model(family, tok)
    assert apply_liger(model, force=True) is True
    assert liger_applied(model)
    parts = {"swiglu": [], **patched_parts(model)}  # Qwen3-VL-MoE has no dense MLP
    assert parts["fused_lm_loss"] == [""]
    assert parts["rms_norm"] == _norm_names(model) and len(parts["rms_norm"]) >= 2 * LAYERS + 1
    assert len(parts["swiglu"]) == _expected_counts(family, model)["swiglu"]
    assert all(name.startswith("model.language_model.") for name in parts["rms_norm"] + parts["swiglu"])
    if family.startswith("qwen3"):
        assert any(name.endswith("self_attn.q_norm") for name in parts["rms_norm"])
    for name in parts["rms_norm"] + parts["swiglu"] + parts["fused_lm_loss"]:
        assert "liger_kernels" in model.get_submodule(name)._vlft_kernel.__qualname__
    # the norm formula Liger is told, per family: offset 1 with fp32 casting for the zero-centred norms
    styles = {model.get_submodule(name)._vlft_norm_style[1:] for name in parts["rms_norm"]}
    assert styles == ({(1.0, "gemma")} if family in ZERO_CENTRED else {(0.0, "llama")})

    # idempotent: a second application replaces, never wraps, what the first one put there
    original = model._vlft_original_forward
    assert original.__func__ is type(model).forward
    assert apply_liger(model, force=True) is True
    assert {"swiglu": [], **patched_parts(model)} == parts
    assert model._vlft_original_forward is original
    assert model.forward.__func__.__wrapped__ is type(model).forward


def test_missing_liger_is_a_user_error(setup, monkeypatch):
    family, tok, _ = setup
    for name in [n for n in sys.modules if n == "liger_kernel" or n.startswith("liger_kernel.")] + ["liger_kernel"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(VlftError, match="pip install liger-kernel"):
        apply_liger(_model(family, tok))


def test_not_a_qwen_vl_model_is_a_user_error():
    with pytest.raises(VlftError, match="language_model"):
        apply_liger(torch.nn.Linear(2, 2), force=True)
    with pytest.raises(VlftError, match="language_model"):
        patch_fused_lm_loss(torch.nn.Linear(2, 2), torch_linear_cross_entropy_sum)
