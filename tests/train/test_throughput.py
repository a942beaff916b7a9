"""ThroughputCallback: the FLOPs estimate against a count by hand, the GPU peak table, and what each log line
and the end-of-training summary carry (fake counters and a fake clock; CUDA faked where MFU needs it)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from vlft.models.registry import get_family
from vlft.models.tiny import build_model, build_tokenizer
from vlft.train.core.throughput import ThroughputCallback, estimate_flops, peak_bf16_flops


@pytest.fixture(scope="module")
def tokenizers():
    return {family: build_tokenizer(family) for family in ("qwen2_vl", "qwen2_5_vl")}


def tiny(tokenizers, family: str = "qwen2_vl"):
    return build_model(family, tokenizers[family])


def hand_counts(model) -> dict:
    """Parameters of the tiny Qwen2-VL, layer by layer from its config (Qwen2 attention has q/k/v biases)."""
    text, vision = model.config.text_config, model.config.vision_config
    h, i, layers, vocab = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    kv = text.num_key_value_heads * (h // text.num_attention_heads)
    decoder_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h  # q, k and v, o, MLP, two norms
    llm = layers * decoder_layer + h + vocab * h  # final norm, lm_head (the token embedding is a lookup)
    e, p, t = vision.embed_dim, vision.patch_size, vision.temporal_patch_size
    mlp = e * vision.mlp_ratio
    block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * mlp + mlp) + (mlp * e + e)  # norms, qkv, proj, fc1, fc2
    tower = 3 * t * p * p * e + vision.depth * block  # patch embedding (Conv3d without bias) and blocks
    merged = e * vision.spatial_merge_size**2
    merger = 2 * e + (merged * merged + merged) + (merged * h + h)  # ln_q, mlp.0, mlp.2
    return {"llm": llm, "vision": tower, "merger": merger}


def test_flops_match_a_count_by_hand(tokenizers):
    model = tiny(tokenizers)
    est = estimate_flops(model, get_family("qwen2_vl"))
    counts = hand_counts(model)
    assert (est.llm_params, est.vision_params, est.merger_params) == (counts["llm"], counts["vision"], counts["merger"])
    text, vision = model.config.text_config, model.config.vision_config
    assert (est.vision_factor, est.merger_factor) == (6, 6)  # everything trains
    tokens, records, patches, pairs = 1000, 4, 200, 5000
    expected = (6 * counts["llm"] * tokens
                + 12 * text.num_hidden_layers * text.hidden_size * tokens * (tokens / records)
                + 6 * counts["vision"] * patches
                + 6 * counts["merger"] * patches / vision.spatial_merge_size**2
                + 2 * 6 * vision.embed_dim * vision.depth * pairs)
    assert est.flops(tokens, records, patches, pairs) == pytest.approx(expected, rel=1e-12)
    # without the vision attention count, the tower's attention is left out
    without = expected - 2 * 6 * vision.embed_dim * vision.depth * pairs
    assert est.flops(tokens, records, patches) == pytest.approx(without, rel=1e-12)
    assert est.flops(0, 0) == 0
    # the family is read from the config when not given
    assert estimate_flops(model) == est


def test_frozen_tower_counts_forward_only(tokenizers):
    model = tiny(tokenizers)
    family = get_family("qwen2_vl")
    for name, p in model.named_parameters():
        p.requires_grad = family.part_of(name) != "vision"
    est = estimate_flops(model, family)
    assert (est.vision_factor, est.merger_factor) == (2, 6)  # the merger trains, the tower runs without a graph
    for name, p in model.named_parameters():
        p.requires_grad = family.part_of(name) not in ("vision", "merger")
    assert (estimate_flops(model, family).vision_factor, estimate_flops(model, family).merger_factor) == (2, 2)
    for name, p in model.named_parameters():  # LoRA-like: one trainable tensor inside the tower
        p.requires_grad = name == "model.visual.blocks.0.attn.qkv.weight"
    assert (estimate_flops(model, family).vision_factor, estimate_flops(model, family).merger_factor) == (6, 6)


def test_tied_head_counts_once_and_embeddings_are_free(tokenizers):
    model = tiny(tokenizers)
    untied = estimate_flops(model)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    assert estimate_flops(model).llm_params == untied.llm_params
    model.model.language_model.embed_tokens.weight = torch.nn.Parameter(torch.zeros(3, 64))  # untie, shrink
    assert estimate_flops(model).llm_params == untied.llm_params  # a lookup table costs nothing


def test_qwen2_5_window_attention(tokenizers):
    model = tiny(tokenizers, "qwen2_5_vl")
    vision = model.config.vision_config
    est = estimate_flops(model)
    assert est.vision_layers == vision.depth and est.vision_window_layers == vision.depth - len(vision.fullatt_block_indexes)
    assert est.window_patches == (vision.window_size // vision.patch_size) ** 2
    assert est.vision_width == vision.hidden_size
    full = est.flops(10, 1, 100, 400) - est.flops(10, 1, 100, 0)
    assert full == pytest.approx(2 * 6 * vision.hidden_size * len(vision.fullatt_block_indexes) * 400)


def test_qwen3_shape_comes_through_its_family():
    """Qwen3-VL's tower: width from `hidden_size`, full attention in every block; its deepstack mergers count with
    the merger. A model vlft does not know gets no vision terms rather than a guess."""
    model = build_model("qwen3_vl", build_tokenizer("qwen3_vl"))
    vision = model.config.vision_config
    est = estimate_flops(model)
    assert (est.vision_layers, est.vision_width, est.merge_size) == (vision.depth, vision.hidden_size, 2)
    assert (est.vision_window_layers, est.window_patches) == (0, 0)
    deepstack = sum(p.numel() for n, p in model.named_parameters() if ".deepstack_merger_list." in n)
    assert deepstack and est.merger_params > deepstack
    model.config.model_type = "not_a_qwen"
    unknown = estimate_flops(model)
    assert (unknown.vision_layers, unknown.vision_params, unknown.merger_params) == (0, 0, 0)


# A hand-sized Qwen3.5 text config: one Gated DeltaNet layer then one full-attention layer.
H, V, HEADS, KV, HD, INTER = 16, 32, 2, 1, 8, 24
KH, VH, DK, DV, KERNEL = 1, 2, 4, 6, 3  # linear attention: key heads, value heads, their dims, conv kernel
E, TOP, EI, SI = 4, 2, 8, 12  # experts, experts per token, expert and shared-expert widths


def hand_config(family: str):
    """A tiny config of `family` (qwen3_5 / qwen3_5_moe), with the numbers above."""
    import transformers

    text = dict(hidden_size=H, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=HEADS,
                num_key_value_heads=KV, head_dim=HD, vocab_size=V, layer_types=["linear_attention", "full_attention"],
                linear_conv_kernel_dim=KERNEL, linear_key_head_dim=DK, linear_value_head_dim=DV,
                linear_num_key_heads=KH, linear_num_value_heads=VH)
    if family == "qwen3_5_moe":
        text.update(num_experts=E, num_experts_per_tok=TOP, moe_intermediate_size=EI, shared_expert_intermediate_size=SI)
    vision = dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2, out_hidden_size=H, num_position_embeddings=16)
    Model = getattr(transformers, get_family(family).model_class)
    return Model.config_class(text_config=text, vision_config=vision, tie_word_embeddings=False)


def meta_model(config):
    import transformers

    with torch.device("meta"):
        return getattr(transformers, get_family(config.model_type).model_class)(config)


def test_hybrid_flops_match_a_count_by_hand():
    """Qwen3.5: the quadratic term for the full-attention layer only, the delta rule's linear cost for the other."""
    est = estimate_flops(meta_model(hand_config("qwen3_5")))
    linear_layer = (16 * (2 * 4 + 12) + 16 * 12 + 2 * 16 * 2 + 20 * 3 + 2 + 2 + 6 + 12 * 16  # qkv, z, a b, conv,
                    + 3 * 16 * 24 + 2 * 16)  # dt_bias, A_log, gated norm, out_proj; SwiGLU MLP, two norms
    full_layer = 16 * 2 * 2 * 8 + 2 * 16 * 8 + 16 * 16 + 2 * 8 + 3 * 16 * 24 + 2 * 16  # gated q, k v, o, q/k norm
    n = linear_layer + full_layer + 16 + 32 * 16  # final norm, lm_head (the embedding is a lookup)
    assert (est.llm_params, est.expert_params) == (n, 0)
    tokens, records = 1000, 4
    delta_rule = 3 * 2 * (6 * 64 * 4 + 4 * 64 * 6 + 6 * 4 * 6 + 64 * 64 / 3)  # per token, 2 value heads, C = 64
    expected = 6 * n * tokens + 12 * 1 * (2 * 8) * tokens * (tokens / records) + 1 * delta_rule * tokens
    assert est.flops(tokens, records) == pytest.approx(expected, rel=1e-12)


def test_moe_flops_count_only_the_routed_experts_a_token_runs():
    """Qwen3.5-MoE: 2 of 4 routed experts per token; the router and the shared expert run for every token."""
    est = estimate_flops(meta_model(hand_config("qwen3_5_moe")))
    moe = 4 * 16 + 3 * 16 * 12 + 16  # router [E, h], shared expert's SwiGLU, its sigmoid gate [1, h]
    linear_layer = 16 * 20 + 16 * 12 + 2 * 16 * 2 + 20 * 3 + 2 + 2 + 6 + 12 * 16 + moe + 2 * 16
    full_layer = 16 * 32 + 2 * 16 * 8 + 16 * 16 + 2 * 8 + moe + 2 * 16
    dense = linear_layer + full_layer + 16 + 32 * 16
    routed = 2 * (4 * 16 * 2 * 8 + 4 * 16 * 8)  # two layers of gate_up [E, 2 I, h] and down [E, h, I]
    assert (est.llm_params, est.expert_params, est.expert_share) == (dense, routed, 2 / 4)
    tokens, records = 512, 2
    delta_rule = 3 * 2 * (6 * 64 * 4 + 4 * 64 * 6 + 6 * 4 * 6 + 64 * 64 / 3)
    expected = (6 * (dense + routed * 2 / 4) * tokens + 12 * 1 * 16 * tokens * (tokens / records)
                + delta_rule * tokens)
    assert est.flops(tokens, records) == pytest.approx(expected, rel=1e-12)


def test_moe_lora_adapters_on_the_experts_count_as_experts():
    """PEFT's adapters on the fused expert weights (target_parameters) are per expert: a token runs k of E of them."""
    from peft import LoraConfig

    from vlft.models.lora import wrap_peft

    model = build_model("qwen3_5_moe", build_tokenizer("qwen3_5_moe"))
    plain = estimate_flops(model)
    family = get_family("qwen3_5_moe")
    peft = wrap_peft(model, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=list(family.moe.experts)))
    est = estimate_flops(peft, family)
    text = model.config.text_config
    d, inner, experts = text.hidden_size, text.moe_intermediate_size, text.num_experts
    # gate_up [E, 2I, d] and down [E, d, I]: one rank-2 adapter per expert, r x (in + out) each
    expert_adapters = len(family.text_shape(text).moe_layers) * experts * 2 * ((2 * inner + d) + (d + inner))
    assert est.expert_params - plain.expert_params == expert_adapters
    q_adapters = text.layer_types.count("full_attention") * 2 * (d + 2 * text.num_attention_heads * text.head_dim)
    assert est.llm_params - plain.llm_params == q_adapters


@pytest.mark.parametrize("family, size", [("qwen3_vl_moe", "30B-A3B"), ("qwen3_5_moe", "35B-A3B")])
def test_a3b_presets_run_about_3b_parameters_per_token(family, size):
    """The released *-A3B models run about 3B parameters per token (the embedding, a lookup, left out): measured
    3.04B (Qwen3-VL-30B-A3B) and 2.95B (Qwen3.5-35B-A3B), against 30.2B and 34.1B counting every expert."""
    from vlft.plan import preset_config

    est = estimate_flops(meta_model(preset_config(family, size)))
    assert 2.8e9 < est.active_llm_params < 3.2e9
    assert est.llm_params + est.expert_params > 9 * est.active_llm_params  # MFU read ~10x too high before


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA A10G", 125e12), ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla T4", None), ("NVIDIA GeForce RTX 3090", None),
])
def test_peak_table(name, peak):
    assert peak_bf16_flops(name) == peak


class Fake:
    """Counters and a clock the test moves by hand."""

    def __init__(self):
        self.tokens = self.samples = self.patches = self.pairs = 0
        self.time = 100.0

    def callback(self, model, **kwargs) -> ThroughputCallback:
        kwargs.setdefault("real_samples", lambda: self.samples)
        return ThroughputCallback(model, real_tokens=lambda: self.tokens, vision_tokens=lambda: self.patches,
                                  vision_pairs=lambda: self.pairs, clock=lambda: self.time, **kwargs)

    def advance(self, seconds: float, tokens: int, samples: int, patches: int = 0, pairs: int = 0):
        self.time += seconds
        self.tokens += tokens
        self.samples += samples
        self.patches += patches
        self.pairs += pairs


def cpu_args(**kwargs):
    return SimpleNamespace(**{"device": torch.device("cpu"), "world_size": 1, "per_device_train_batch_size": 2,
                              "gradient_accumulation_steps": 1, **kwargs})


def log_line(cb, args, state, **logs) -> dict:
    state.log_history.append({**logs, "step": state.global_step})  # what Trainer.log does before the hook
    cb.on_log(args, state, TrainerControl(), logs=logs)
    return logs


def test_on_log_adds_rates_on_cpu_without_mfu(tokenizers):
    fake, args, state = Fake(), cpu_args(), TrainerState()
    cb = fake.callback(tiny(tokenizers))
    cb.on_train_begin(args, state, TrainerControl())
    fake.advance(2.0, tokens=1000, samples=4, patches=64, pairs=512)
    logs = log_line(cb, args, state, loss=1.5)
    assert logs["tokens_per_second"] == 500 and logs["samples_per_second"] == 2
    assert 0.01 < logs["peak_memory_gb"] < 1000  # this process's peak RSS
    assert "mfu" not in logs
    assert state.log_history[-1] == {**logs, "step": 0}  # what trainer_state.json will hold
    # the next line covers only its own interval; rates are for the job (x world size)
    fake.advance(4.0, tokens=1000, samples=2)
    logs = log_line(cb, cpu_args(world_size=2), state, loss=1.2)
    assert logs["tokens_per_second"] == 500 and logs["samples_per_second"] == 1
    # a line with nothing trained since the last one (the Trainer's end-of-training metrics) is left alone
    fake.advance(1.0, tokens=0, samples=0)
    assert log_line(cb, args, state, train_runtime=7.0) == {"train_runtime": 7.0}


def test_samples_fall_back_to_steps_times_batch(tokenizers):
    fake, args, state = Fake(), cpu_args(gradient_accumulation_steps=3), TrainerState()
    cb = fake.callback(tiny(tokenizers), real_samples=None)
    cb.on_train_begin(args, state, TrainerControl())
    fake.advance(2.0, tokens=100, samples=0)
    state.global_step = 2
    assert log_line(cb, args, state, loss=1.0)["samples_per_second"] == 2 * 2 * 3 / 2.0


def fake_cuda(monkeypatch, name: str):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 12.5e9)
    return cpu_args(device=torch.device("cuda", 0))


def test_mfu_on_a_known_gpu(tokenizers, monkeypatch):
    fake, state = Fake(), TrainerState()
    args = fake_cuda(monkeypatch, "NVIDIA H200")
    cb = fake.callback(tiny(tokenizers))
    cb.on_train_begin(args, state, TrainerControl())
    fake.advance(0.5, tokens=8192, samples=4, patches=4096, pairs=2**20)
    logs = log_line(cb, args, state, loss=1.0)
    expected = cb.flops_model.flops(8192, 4, 4096, 2**20) / 0.5 / 989e12
    assert logs["mfu"] == pytest.approx(expected, abs=1e-6) and 0 < logs["mfu"] < 1
    assert logs["peak_memory_gb"] == 12.5


def test_unknown_gpu_omits_mfu_and_says_so_once(tokenizers, monkeypatch, capsys):
    fake, state = Fake(), TrainerState()
    args = fake_cuda(monkeypatch, "Tesla T4")
    cb = fake.callback(tiny(tokenizers))
    cb.on_train_begin(args, state, TrainerControl())
    for _ in range(2):
        fake.advance(1.0, tokens=10, samples=1)
        logs = log_line(cb, args, state, loss=1.0)
        assert "mfu" not in logs and logs["tokens_per_second"] == 10
    assert capsys.readouterr().err.count("MFU not reported") == 1


def test_summary_is_logged_at_train_end(tokenizers, monkeypatch, capsys):
    fake, state = Fake(), TrainerState()
    args = fake_cuda(monkeypatch, "NVIDIA A100-SXM4-80GB")
    cb = fake.callback(tiny(tokenizers))
    cb.on_train_begin(args, state, TrainerControl())
    for _ in range(3):
        fake.advance(2.0, tokens=3000, samples=3)
        log_line(cb, args, state, loss=1.0)
    cb.on_train_end(args, state, TrainerControl())
    assert cb.summary["tokens_per_second"] == 1500 and cb.summary["samples_per_second"] == 1.5
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "throughput:" in ln)
    assert "1,500 tokens/s" in line and "1.50 samples/s" in line and "12.50 GB (GPU, allocated)" in line
    assert f"MFU {cb.summary['mfu']:.1%} of 312 TFLOP/s" in line


def test_in_a_real_trainer_the_history_carries_the_figures(tokenizers, tmp_path, capsys):
    """Two steps of SFTTrainer on text-only rows: the keys reach trainer_state's log history, the summary is
    logged, and the token rate matches the trainer's own count."""
    from vlft.train.core.trainer import SFTTrainer

    model = tiny(tokenizers)
    rows = [{"input_ids": torch.arange(10 + k) % 100, "attention_mask": torch.ones(10 + k, dtype=torch.long),
             "labels": torch.arange(10 + k) % 100} for k in range(4)]

    def collate(items):
        width = max(len(it["input_ids"]) for it in items)
        return {key: torch.stack([torch.nn.functional.pad(it[key], (0, width - len(it[key])),
                                                          value=-100 if key == "labels" else 0) for it in items])
                for key in items[0]}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    assert isinstance(trainer.throughput, ThroughputCallback)  # every vlft trainer wires its own
    trainer.train()
    lines = [h for h in trainer.state.log_history if "loss" in h]
    assert len(lines) == 2 and all(h["tokens_per_second"] > 0 and h["peak_memory_gb"] > 0 for h in lines)
    assert all("mfu" not in h for h in lines)
    assert int(trainer.counts.tokens) == 10 + 11 + 12 + 13
    assert "throughput:" in capsys.readouterr().err


def test_a_real_sft_run_counts_the_vision_tower(tiny_model_dir, tmp_path):
    """`vlft sft` as users run it (LoRA, tower frozen, merger trained): the FLOPs it reports equal the hand count
    of the language model on the real tokens plus the tower, merger and vision attention on the patches of the
    records' images, which the processor itself grids (an independent count)."""
    import json

    from conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA
    from PIL import Image

    from vlft.models.loading import load_processor
    from vlft.train.sft.run import run

    summary, trainer = run(["--model_id", str(tiny_model_dir), "--data_path", str(DEMO_DATA), "--image_folder",
                            str(DEMO_IMAGES), "--output_dir", str(tmp_path / "o"), "--lora_enable", "true",
                            "--lora_rank", "4", "--freeze_vision_tower", "true", "--num_train_epochs", "1",
                            "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
                            "--disable_tqdm", "true", "--use_cpu", "true"])
    image_processor = load_processor(str(tiny_model_dir)).image_processor
    patches = pairs = 0
    for record in json.loads(DEMO_DATA.read_text()):
        names = record.get("image") or []
        for name in [names] if isinstance(names, str) else names:
            image = Image.open(DEMO_IMAGES / name).convert("RGB")
            t, h, w = image_processor(images=[image], size={"shortest_edge": DEMO_MEDIA.image_min_pixels,
                                      "longest_edge": DEMO_MEDIA.image_max_pixels})["image_grid_thw"][0].tolist()
            patches += t * h * w
            pairs += t * (h * w) ** 2
    tokens = sum(len(trainer.train_dataset[i]["input_ids"]) for i in range(len(trainer.train_dataset)))
    records = len(trainer.train_dataset)
    assert (int(trainer.counts.tokens), int(trainer.counts.records)) == (tokens, records)
    assert (int(trainer.counts.patches), int(trainer.counts.pairs)) == (patches, pairs)

    base = trainer.model.get_base_model()
    counts = hand_counts(base)
    vision = base.config.vision_config
    text_only = estimate_flops(trainer.model).flops(tokens, records)  # the language model's share
    tower = (2 * counts["vision"] * patches  # frozen tower: forward only
             + 6 * counts["merger"] * patches / vision.spatial_merge_size**2  # the merger trains
             + 2 * 2 * vision.embed_dim * vision.depth * pairs)  # full attention in every block
    assert summary["flops"] == pytest.approx(text_only + tower, rel=1e-9)
    assert tower > 0.01 * text_only


# --- the progress bar ---


def test_progress_bar_postfix_shows_tokens_per_second(capsys):
    """HF's bar already shows elapsed < time left; TokensProgressCallback adds the latest tokens/s and loss to its
    postfix, and an evaluation line (no tokens/s) keeps the last tokens/s shown."""
    from vlft.train.core.throughput import TokensProgressCallback

    args, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerControl()
    state = TrainerState(max_steps=10, is_world_process_zero=True)
    bar = TokensProgressCallback()
    bar.on_train_begin(args, state, control)
    state.global_step = 3
    bar.on_step_end(args, state, control)
    bar.on_log(args, state, control, logs={"loss": 1.23456, "tokens_per_second": 4210.4, "learning_rate": 1e-4})
    assert bar.training_bar.postfix == "tokens/s=4,210, loss=1.235"
    bar.on_log(args, state, control, logs={"eval_loss": 2.5, "eval_runtime": 0.5})
    assert bar.training_bar.postfix == "tokens/s=4,210, loss=1.235, eval_loss=2.5"
    line = str(bar.training_bar)
    assert "3/10" in line and "<" in line and "tokens/s=4,210" in line  # steps, elapsed<remaining, tokens/s
    bar.on_train_end(args, state, control)
    assert "'tokens_per_second': '4210'" in capsys.readouterr().out  # HF's log line above the bar is kept


def test_the_trainer_progress_bar_is_replaced_once():
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback

    from vlft.train.core.throughput import TokensProgressCallback, use_tokens_progress_bar

    def trainer(*callbacks):
        handler = CallbackHandler(list(callbacks), None, None, None, None)
        return SimpleNamespace(callback_handler=handler, pop_callback=handler.pop_callback,
                               add_callback=handler.add_callback)

    with_bar = trainer(DefaultFlowCallback, ProgressCallback)
    use_tokens_progress_bar(with_bar)
    kinds = [type(c) for c in with_bar.callback_handler.callbacks]
    assert kinds == [DefaultFlowCallback, TokensProgressCallback]
    printer = trainer(DefaultFlowCallback, PrinterCallback)  # --disable_tqdm: no bar, nothing to replace
    use_tokens_progress_bar(printer)
    assert [type(c) for c in printer.callback_handler.callbacks] == [DefaultFlowCallback, PrinterCallback]
