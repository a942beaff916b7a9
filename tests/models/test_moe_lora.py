"""LoRA and training on the mixture-of-experts families (Qwen3-VL-MoE, Qwen3.5-MoE) and on Qwen3.5's hybrid
linear-attention layers: what LoRA reaches (the routed experts' fused parameters through PEFT's target_parameters,
the Gated DeltaNet projections, never the depthwise conv1d nor the MoE gates), that the router stays frozen unless
--train_router, that merge and resume carry the expert adapters and a fully trained router, and that
--router_aux_loss_coef adds coef x the logged aux_loss to the logged loss."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import DEMO_IMAGES, DEMO_MEDIA, assert_same_run, logged_losses
from safetensors.torch import load_file
from torch import nn

from vlft.config import TuneArguments, validate
from vlft.errors import VlftError
from vlft.models.freezing import apply_freeze, count_parameters, is_moe_gate
from vlft.models.lora import apply_lora, lora_targets
from vlft.models.registry import get_family
from vlft.models.tiny import build_model, build_tokenizer
from vlft.train.dpo.config import DPOConfig

MOE = ("qwen3_5_moe", "qwen3_vl_moe")
RANK = 4


@pytest.fixture(scope="module")
def tiny_models():
    """family -> a fresh copy of its tiny random model (built once per module)."""
    import copy

    built = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            built[name] = build_model(name, build_tokenizer(name))
        return copy.deepcopy(built[name])

    return get


def moe_layers(model, family):
    layers = model.model.language_model.layers
    return [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "experts")]


def text_batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.text_config.vocab_size - 40, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


# --- what LoRA reaches ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe"])
def test_linear_attention_projections_get_lora_and_conv1d_does_not(name, tiny_models):
    model, family = tiny_models(name), get_family(name)
    kinds = model.config.text_config.layer_types
    linear = [i for i, kind in enumerate(kinds) if kind == "linear_attention"]
    assert linear
    targets = set(lora_targets(model, family, llm=True, vision=False))
    # every nn.Linear of the decoder layers is a target, except the MoE gates and the per-head in_proj_a / in_proj_b
    per_head = {f"{family.llm_layers_prefix}{i}.linear_attn.{p}" for i in linear for p in ("in_proj_a", "in_proj_b")}
    expected = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and family.part_of(n) == "llm"
                and not is_moe_gate(family, n)} - per_head
    assert {t for t in targets if not t.endswith(("experts.gate_up_proj", "experts.down_proj"))} == expected
    heads = model.config.text_config.linear_num_value_heads
    assert all(model.get_submodule(n).out_features == heads for n in per_head)  # one output per value head
    for i in linear:
        prefix = f"{family.llm_layers_prefix}{i}.linear_attn."
        assert {prefix + p for p in ("in_proj_qkv", "in_proj_z", "out_proj")} <= targets
        assert prefix + "conv1d" not in targets
    peft_model = apply_lora(model, targets=sorted(targets), rank=RANK, alpha=8, dropout=0.0)
    for i in linear:
        attn = peft_model.base_model.model.model.language_model.layers[i].linear_attn
        assert isinstance(attn.conv1d, nn.Conv1d) and not hasattr(attn.conv1d, "lora_A")  # untouched
        for proj in ("in_proj_a", "in_proj_b"):
            assert isinstance(getattr(attn, proj), nn.Linear) and not hasattr(getattr(attn, proj), "lora_A"), proj
        for proj in ("in_proj_qkv", "in_proj_z", "out_proj"):
            assert "default" in getattr(attn, proj).lora_A, proj


@pytest.mark.parametrize("name", MOE)
def test_experts_are_lora_targets_by_default_and_gates_never(name, tiny_models):
    model, family = tiny_models(name), get_family(name)
    layers = moe_layers(model, family)
    targets = lora_targets(model, family, llm=True, vision=False)
    experts = {f"{family.llm_layers_prefix}{i}.{p}" for i in layers for p in family.moe.experts}
    assert experts <= set(targets)
    params = dict(model.named_parameters())
    assert all(params[e].dim() == 3 for e in experts)  # the fused [experts, out, in] parameters
    gates = [t for t in targets if any(f".{g}" in t for g in family.moe.gates)]
    assert not gates
    if family.moe.shared_expert_gate:  # an nn.Linear of width 1, left out on purpose
        gate = model.get_submodule(f"{family.llm_layers_prefix}{layers[0]}.{family.moe.shared_expert_gate}")
        assert isinstance(gate, nn.Linear) and gate.out_features == 1
    without = lora_targets(model, family, llm=True, vision=False, experts=False)
    assert set(without) == set(targets) - experts
    only_up = lora_targets(model, family, llm=True, vision=False, exclude=["experts.down_proj"])
    assert {t for t in only_up if ".experts." in t} == {e for e in experts if e.endswith("gate_up_proj")}


@pytest.mark.parametrize("name", MOE)
def test_expert_adapters_get_gradients_and_the_parts_table_counts_them(name, tiny_models):
    model, family = tiny_models(name), get_family(name)
    text = model.config.text_config
    targets = lora_targets(model, family, llm=True, vision=False)
    # init false: A and B both random, so both get a gradient (B = 0 would leave A's at zero)
    peft_model = apply_lora(model, targets=targets, rank=RANK, alpha=8, dropout=0.05, init_lora_weights=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    apply_freeze(peft_model, family, freeze_vision_tower=True, freeze_merger=True, freeze_llm=True,
                 always_train=trainable)
    peft_model.train()
    peft_model(**text_batch(model)).loss.backward()
    expert_adapters = {n: p for n, p in peft_model.named_parameters() if ".mlp.experts." in n and ".lora_" in n}
    layers = moe_layers(peft_model.base_model.model, family)
    assert len(expert_adapters) == 4 * len(layers)  # A and B for gate_up_proj and down_proj of each MoE layer
    for n, p in expert_adapters.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    for n, p in peft_model.named_parameters():
        if is_moe_gate(family, n):
            assert not p.requires_grad and p.grad is None, n

    # closed form: per MoE layer and expert, rank x (in + out) for gate_up_proj [2I, d] and down_proj [d, I]
    d, inter, experts = text.hidden_size, text.moe_intermediate_size, text.num_experts
    counts = count_parameters(peft_model, family)
    assert counts["lora:experts"] == (len(layers) * experts * RANK * ((d + 2 * inter) + (inter + d)), 0)
    linear = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n and ".mlp.experts." not in n)
    assert counts["lora:llm"] == (linear, 0)

    # the dropout PEFT refuses on a fused expert matmul stays off there, and on the nn.Linear adapters
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            want = nn.Identity if isinstance(module, ParamWrapper) else nn.Dropout
            assert isinstance(module.lora_dropout["default"], want)
    assert peft_model.peft_config["default"].lora_dropout == 0.0  # what adapter_config.json says: PEFT loads it


def test_merged_experts_give_the_adapter_models_logits(tiny_models):
    """Qwen3-VL-MoE in memory (Qwen3.5-MoE: the end-to-end merge test below): random A and B on every target, the
    fused experts' adapters merged by PEFT give the adapter model's logits."""
    import copy

    model, family = tiny_models("qwen3_vl_moe"), get_family("qwen3_vl_moe")
    peft_model = apply_lora(model, targets=lora_targets(model, family, llm=True, vision=False), rank=RANK, alpha=8,
                            dropout=0.0, init_lora_weights=False).eval()
    batch = text_batch(model, seed=1)
    batch.pop("labels")
    with torch.no_grad():
        adapted = peft_model(**batch).logits
        with peft_model.disable_adapter():
            base = peft_model(**batch).logits
        merged_model = copy.deepcopy(peft_model).merge_and_unload()
        merged = merged_model(**batch).logits
    assert not any(".lora_" in n for n, _ in merged_model.named_parameters())
    assert (adapted - base).abs().max() > 1e-1  # the expert adapters change the model
    assert (merged - adapted).abs().max() <= 1e-4


@pytest.mark.parametrize("name", MOE)
def test_train_router_trains_exactly_the_gates(name, tiny_models):
    model, family = tiny_models(name), get_family(name)
    peft_model = apply_lora(model, targets=lora_targets(model, family, llm=True, vision=False), rank=RANK, alpha=8,
                            dropout=0.0)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    apply_freeze(peft_model, family, freeze_vision_tower=True, freeze_merger=True, freeze_llm=True,
                 always_train=trainable, train_router=True)
    full = {n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters()
            if p.requires_grad and ".lora_" not in n}
    want = {f"{family.llm_layers_prefix}{i}.{g}.weight" for i in moe_layers(model, family) for g in family.moe.gates}
    assert full == want


def test_expert_lora_refuses_what_peft_cannot_do(tiny_models):
    model, family = tiny_models("qwen3_vl_moe"), get_family("qwen3_vl_moe")
    targets = lora_targets(model, family, llm=True, vision=False)
    with pytest.raises(VlftError, match="--lora_target_experts false"):
        apply_lora(model, targets=targets, rank=RANK, alpha=8, dropout=0.0, init_lora_weights="pissa")


# --- flags ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,fragment", [
    (dict(lora_enable=True, router_aux_loss_coef=0.01), "--router_aux_loss_coef is not available for Qwen2-VL"),
    (dict(lora_enable=True, train_router=True), "--train_router is not available for Qwen2-VL"),
    (dict(lora_enable=True, lora_target_experts=False), "--lora_target_experts false is not available"),
])
def test_moe_flags_are_refused_on_a_dense_family(flags, fragment):
    with pytest.raises(VlftError, match="its MLPs are dense") as err:
        validate(TuneArguments(**flags), family=get_family("qwen2_vl"))
    assert fragment in str(err.value)
    validate(TuneArguments(**flags), family=get_family("qwen3_5_moe"))  # accepted where there are experts


@pytest.mark.parametrize("flags,fragment", [
    (dict(train_router=True), "--train_router trains the router of a frozen language model"),
    (dict(train_router=True, freeze_llm=False), "--freeze_llm false asks for that"),
    (dict(lora_target_experts=False, vision_lora=True), "--lora_target_experts false keeps"),
    (dict(lora_enable=True, router_aux_loss_coef=-1.0), "--router_aux_loss_coef must be >= 0"),
    (dict(lora_enable=True, use_dora=True), "--use_dora: PEFT's DoRA cannot adapt the routed experts"),
    (dict(lora_enable=True, init_lora_weights="olora"), "--init_lora_weights olora: PEFT runs it"),
    (dict(lora_enable=True, train_router=True, bits=4), "shared-expert gate is an nn.Linear"),
])
def test_moe_flag_rules(flags, fragment):
    with pytest.raises(VlftError) as err:
        validate(TuneArguments(**flags), family=get_family("qwen3_5_moe"))
    assert fragment in str(err.value)


def test_moe_flag_rules_allow_dora_without_experts():
    validate(TuneArguments(lora_enable=True, use_dora=True, lora_target_experts=False), family=get_family("qwen3_5_moe"))


def test_router_aux_loss_is_refused_for_dpo(tmp_path):
    with pytest.raises(VlftError, match="applied to the SFT loss only: DPO"):
        validate(TuneArguments(lora_enable=True, router_aux_loss_coef=0.01), DPOConfig(output_dir=str(tmp_path)))


# --- training end to end (tiny Qwen3.5-MoE) ------------------------------------------------------------------------


def sft(model_dir, data, out, *extra):
    from vlft.train.sft.run import run

    return run(["--model_id", str(model_dir), "--data_path", str(data), "--image_folder", str(DEMO_IMAGES),
                "--output_dir", str(out), "--lora_enable", "true", "--lora_rank", str(RANK), "--lora_alpha", "8",
                "--freeze_vision_tower", "true", "--freeze_merger", "true", "--per_device_train_batch_size", "1",
                "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
                "--seed", "0", "--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1", *extra])[1]


@pytest.fixture(scope="module")
def moe_runs(tiny_model_factory, image_only_data, tmp_path_factory):
    """Tiny Qwen3.5-MoE LoRA runs (gradient accumulation 2, so the aux term's weighting is exercised):
    'router': --train_router --router_aux_loss_coef 0.01, 4 steps; 'parts': the same in two halves, resumed;
    'plain': default LoRA (router frozen, no aux loss), 2 steps. Returns (model dir, {name: (dir, trainer)})."""
    model_dir = tiny_model_factory("qwen3_5_moe")
    root = tmp_path_factory.mktemp("moe-runs")
    router = ["--train_router", "true", "--router_aux_loss_coef", "0.01"]
    runs = {"router": (root / "router", sft(model_dir, image_only_data, root / "router", *router, "--max_steps", "4",
                                            "--save_strategy", "no"))}
    parts = root / "parts"
    sft(model_dir, image_only_data, parts, *router, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    runs["parts"] = (parts, sft(model_dir, image_only_data, parts, *router, "--max_steps", "4", "--save_strategy", "no",
                                "--resume_from_checkpoint", str(parts / "checkpoint-2")))
    runs["plain"] = (root / "plain", sft(model_dir, image_only_data, root / "plain", "--max_steps", "2",
                                         "--save_strategy", "no"))
    return model_dir, runs


def base_gates(model_dir, family) -> dict[str, torch.Tensor]:
    weights = load_file(str(model_dir / "model.safetensors"))
    gates = {k: v for k, v in weights.items() if is_moe_gate(family, k)}
    assert gates
    return gates


def gate_weights(trainer, family) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model."): p.detach() for n, p in trainer.model.named_parameters()
            if is_moe_gate(family, n)}


def test_router_stays_bit_identical_under_lora(moe_runs):
    model_dir, runs = moe_runs
    family = get_family("qwen3_5_moe")
    out, trainer = runs["plain"]
    losses = logged_losses(out)
    assert len(losses) == 2 and abs(losses[1] - losses[0]) > 1e-4  # the adapters trained
    base, now = base_gates(model_dir, family), gate_weights(trainer, family)
    assert base.keys() == now.keys()
    for name in base:
        assert torch.equal(base[name], now[name]), name
    trained = json.loads((out / "vlft_trained.json").read_text())
    assert trained["non_lora"] == []
    assert not (out / "non_lora_trainables.safetensors").exists()
    assert any(m.endswith("experts.gate_up_proj") for m in trained["lora_modules"])


def test_train_router_changes_it_and_saves_it(moe_runs):
    model_dir, runs = moe_runs
    family = get_family("qwen3_5_moe")
    out, trainer = runs["router"]
    base, now = base_gates(model_dir, family), gate_weights(trainer, family)
    assert all(not torch.equal(base[name], now[name]) for name in base)
    saved = load_file(str(out / "non_lora_trainables.safetensors"))
    assert saved.keys() == base.keys()
    trained = json.loads((out / "vlft_trained.json").read_text())
    assert set(trained["non_lora"]) == set(base)
    args = json.loads((out / "vlft_args.json").read_text())
    assert args["train_router"] is True and args["router_aux_loss_coef"] == 0.01 and args["lora_target_experts"] is True


def test_resumed_moe_run_equals_the_straight_one(moe_runs):
    _, runs = moe_runs
    assert_same_run(runs["router"][0], runs["parts"][0], "Qwen3.5-MoE LoRA + experts + router + aux loss | resumed at 2")
    history = json.loads((runs["parts"][0] / "trainer_state.json").read_text())["log_history"]
    straight = json.loads((runs["router"][0] / "trainer_state.json").read_text())["log_history"]
    aux = [h["aux_loss"] for h in history if "aux_loss" in h]
    assert aux == pytest.approx([h["aux_loss"] for h in straight if "aux_loss" in h], abs=1e-6) and len(aux) == 4


def test_logged_loss_is_the_lm_loss_plus_coef_times_aux(moe_runs):
    """Step 1 of both runs sees the same weights and batches (same seed; --train_router changes only what the step
    updates): the 'router' run's loss is the 'plain' run's language-model loss + 0.01 x its logged aux_loss, with
    gradient accumulation 2 (the aux term counted once per step, not once per micro-batch)."""
    _, runs = moe_runs
    with_aux = json.loads((runs["router"][0] / "trainer_state.json").read_text())["log_history"][0]
    without = json.loads((runs["plain"][0] / "trainer_state.json").read_text())["log_history"][0]
    assert "aux_loss" not in without
    assert with_aux["aux_loss"] > 0.5  # Switch's loss: experts_per_token (2) for a perfectly balanced router
    print(f"\naux loss | lm {without['loss']:.6f} | aux {with_aux['aux_loss']:.6f} | logged {with_aux['loss']:.6f} | "
          f"diff {with_aux['loss'] - without['loss'] - 0.01 * with_aux['aux_loss']:.3g}")
    assert with_aux["loss"] == pytest.approx(without["loss"] + 0.01 * with_aux["aux_loss"], abs=2e-6)


def test_merge_and_adapter_loading_carry_expert_adapters_and_router(moe_runs, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlft.data.collator import SFTCollator
    from vlft.data.prepare import prepare_sft_data
    from vlft.data.sft import SFTDataset
    from vlft.merge import load_adapted_model, merge
    from vlft.models.loading import load_processor

    model_dir, runs = moe_runs
    out, trainer = runs["router"]
    processor = load_processor(str(model_dir))
    checked = prepare_sft_data(trainer.vlft_args["data_path"][0], processor=processor, image_folder=str(DEMO_IMAGES),
                               media=DEMO_MEDIA, max_seq_length=4096)
    ds = SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA)
    adapted, family, _ = load_adapted_model(out)
    batch = SFTCollator.for_model(processor, adapted.get_base_model())([ds[0], ds[1]])
    batch.pop("labels")
    with torch.no_grad():
        trainer.model.eval()
        in_memory = trainer.model(**batch).logits
        loaded = adapted(**batch).logits
    merged_dir = merge(str(out), str(tmp_path / "merged"), dtype="fp32")
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    base = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(**batch).logits
    loaded_diff = (loaded - in_memory).abs().max().item()
    merged_diff = (merged_logits - loaded).abs().max().item()
    moved = (merged_logits - base_logits).abs().max().item()
    print(f"\nmoe merge | saved vs in-memory {loaded_diff:.3g} | merged vs adapter {merged_diff:.3g} | vs base {moved:.3g}")
    assert moved > 1e-2  # training changed the model: the equalities below mean something
    assert loaded_diff <= 1e-5
    assert merged_diff <= 1e-4
    merged_weights = dict(merged.named_parameters())
    for name, tensor in load_file(str(out / "non_lora_trainables.safetensors")).items():
        assert torch.equal(merged_weights[name], tensor), name  # the trained router, as saved


def test_merge_refuses_a_run_whose_adapted_targets_differ_from_its_record(moe_runs, tmp_path):
    """merge checks what the adapter config adapts against vlft_trained.json: an expert parameter missing from
    the record (the run directory edited after training) stops it, naming the parameter."""
    import shutil

    from vlft.merge import load_adapted_model

    out = shutil.copytree(moe_runs[1]["plain"][0], tmp_path / "run")
    trained = json.loads((out / "vlft_trained.json").read_text())
    dropped = next(m for m in trained["lora_modules"] if m.endswith("experts.down_proj"))
    trained["lora_modules"].remove(dropped)
    (out / "vlft_trained.json").write_text(json.dumps(trained))
    with pytest.raises(VlftError, match="only in the config") as err:
        load_adapted_model(out)
    assert dropped in str(err.value)
