"""`vlft dpo --loss_type orpo | simpo` end to end: no reference model is made, loaded, swapped or precomputed, the
step's loss is `reference_free_loss` on the policy's one forward, training separates the pairs, and the run's peak
memory is lower than a sigmoid DPO run's on the same set-up (full fine-tuning, where DPO's reference is a frozen
copy of the model).

That nothing of a reference is built is proven by making every way to one fail (`no_reference_anywhere`). The
memory proof runs each configuration in its own process and reads two figures there, neither of which asks the
trainer what it holds:
- the process's peak resident memory (`getrusage(RUSAGE_SELF).ru_maxrss`, the kernel's high-water mark): the most
  the run ever had resident at once, whoever held it. (It is the peak, not a total: a copy of the model loaded and
  dropped before training, where the optimizer's first step sets the peak, was tried and did not raise it.)
- the bytes of every torch tensor alive after training (each storage once, found by the garbage collector), where
  a reference held anywhere would show.
The model is a wider tiny Qwen2-VL (hidden 1024, 4 layers: 39M parameters, 157 MB in fp32), so that a copy of it
stands far above the run-to-run noise of the peak (about 40 MB between runs of one configuration here; the
reference-free runs peaked 270-310 MB below sigmoid DPO's)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from vlft.run_dir import REF_CACHE_DIR
from vlft.train.dpo.run import run

DPO_DEMO = REPO / "data_examples" / "dpo_demo.json"
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0",
          "--save_strategy", "no"]
FULL = ["--freeze_vision_tower", "true"]  # full fine-tuning of the language model and the merger
LORA_AND_MERGER = ["--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16", "--freeze_merger", "false",
                   "--freeze_vision_tower", "true"]


def step_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def no_reference_anywhere():
    """Every way to a reference fails loudly while the runs of this module train."""
    import vlft.train.core.setup as setup
    import vlft.train.preference.reference as reference

    def refuse(*args, **kwargs):
        raise AssertionError("a reference-free run built a reference")

    patch = pytest.MonkeyPatch()
    patch.setattr(reference, "make_reference", refuse)
    patch.setattr(setup, "load_model_copy", refuse)
    patch.setattr(reference.FrozenCopy, "__init__", refuse)
    patch.setattr(reference.AdaptersOff, "__init__", refuse)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory, no_reference_anywhere):
    """name -> (output dir, trainer): orpo with full fine-tuning, simpo with LoRA next to a trained merger (where a
    reference would be the adapters switched off plus the merger's starting values); eight steps over the six demo
    pairs, all six in every step."""
    flags = {"orpo": ["--loss_type", "orpo", "--beta", "0.5", *FULL, "--learning_rate", "3e-3"],
             "simpo": ["--loss_type", "simpo", "--beta", "2.0", "--simpo_gamma", "1.0", "--cpo_alpha", "0.0",
                       *LORA_AND_MERGER, "--learning_rate", "5e-3"]}
    out = {}
    for name, extra in flags.items():
        path = tmp_path_factory.mktemp("runs") / name
        _, trainer = run(["--model_id", str(tiny_model_dir), "--data_path", str(DPO_DEMO), "--output_dir", str(path),
                          *extra, "--per_device_train_batch_size", "6", "--max_steps", "8",
                          "--lr_scheduler_type", "constant", *COMMON])
        out[name] = path, trainer
    return out


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_holds_no_reference(runs, name):
    out, trainer = runs[name]
    assert trainer.reference is None and trainer.ref_cache is None and not trainer.needs_reference
    assert not (out / REF_CACHE_DIR).exists()
    assert trainer.args.loss_type == [name]


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_step1_loss_is_the_formula_on_one_forward(runs, name, tiny_model_dir):
    """The first step's logged loss and metrics are `reference_free_loss` on the starting model's per-token
    log-probs of the step's batch (all six pairs), computed here from a fresh load of the model."""
    from vlft.models.loading import load_model
    from vlft.train.dpo.loss import reference_free_loss
    from vlft.train.preference.logprobs import completion_log_probs

    _, trainer = runs[name]
    args = trainer.args
    base, _ = load_model(str(tiny_model_dir))
    base.eval()
    dataset = trainer.train_dataset
    inputs = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    with torch.no_grad():
        expected = reference_free_loss(*completion_log_probs(base, inputs), loss_type=name, beta=args.beta,
                                       simpo_gamma=args.simpo_gamma, cpo_alpha=args.cpo_alpha)
    first = step_logs(trainer)[0]
    assert abs(first["loss"] - float(expected.loss)) < 1e-5, (first, expected.loss)
    assert abs(first["nll_loss"] - float(expected.nll)) < 1e-5
    assert abs(first["logps/chosen"] - float(expected.chosen_logps.mean())) < 1e-5
    # the scores are means per answer token (length-normalised), not sums
    lengths = torch.tensor([int(dataset[i]["chosen_mask"].sum()) for i in range(len(dataset))])
    assert (expected.chosen_logps * lengths).min() < expected.chosen_logps.min() - 1
    if name == "orpo":
        assert abs(first["log_odds_chosen"] - float(expected.extra["log_odds_chosen"])) < 1e-5
        assert abs(first["log_odds_ratio"] - float(expected.extra["log_odds_ratio"])) < 1e-5


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_trains_and_separates_the_pairs(runs, name, tiny_model_dir):
    from vlft.models.loading import load_model

    _, trainer = runs[name]
    logs = step_logs(trainer)
    assert len(logs) == 8
    first, last = logs[0], logs[-1]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "nll_loss"):
        assert key in last and math.isfinite(last[key]), key
    assert last["loss"] < first["loss"] - 0.05, (first, last)
    assert last["rewards/margins"] > first["rewards/margins"] + 0.05
    assert last["rewards/accuracies"] == 1.0
    base = dict(load_model(str(tiny_model_dir))[0].named_parameters())
    moved = [n for n, p in trainer.model.named_parameters()
             if p.requires_grad and n.removeprefix("base_model.model.") in base
             and not torch.equal(p.detach(), base[n.removeprefix("base_model.model.")])]
    assert any(".visual.merger." in n for n in moved)


# ------------------------------------------------------------------ memory
CHILD = r"""
import gc, json, resource, sys
import torch
from vlft.train.dpo.run import run

_, trainer = run(sys.argv[1:])
gc.collect()
storages = {}
for obj in gc.get_objects():
    if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
        storage = obj.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
model_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
print("MEMORY " + json.dumps({
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "tensor_bytes": sum(storages.values()),
    "model_bytes": model_bytes, "reference": type(trainer.reference).__name__,
    "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}))
"""


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """The tiny Qwen2-VL, 1024 wide and 4 layers deep (39M parameters)."""
    from vlft.models.tiny import build_model, build_processor, build_tokenizer

    out = tmp_path_factory.mktemp("models") / "wide-qwen2_vl"
    tokenizer = build_tokenizer("qwen2_vl")
    build_processor("qwen2_vl", tokenizer).save_pretrained(out)
    build_model("qwen2_vl", tokenizer, hidden=1024, layers=4).save_pretrained(out)
    return out


def measure(model_dir, out, *flags) -> dict:
    """One run in a fresh process (the same data preparation in each: no prepared-data cache to reuse)."""
    argv = ["--model_id", str(model_dir), "--data_path", str(DPO_DEMO), "--output_dir", str(out), *FULL,
            "--no_data_cache", "true", "--per_device_train_batch_size", "2", "--max_steps", "2",
            "--learning_rate", "1e-5", *COMMON, *flags]
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("MEMORY "))
    return json.loads(line.removeprefix("MEMORY "))


@pytest.mark.slow  # three training processes
def test_peak_memory_is_below_sigmoid_dpo_by_about_a_model(wide_model_dir, tmp_path):
    sigmoid = measure(wide_model_dir, tmp_path / "sigmoid", "--loss_type", "sigmoid")
    model = sigmoid["model_bytes"]
    assert sigmoid["reference"] == "FrozenCopy" and model > 150e6
    for name in ("orpo", "simpo"):
        free = measure(wide_model_dir, tmp_path / name, "--loss_type", name)
        assert free["reference"] == "NoneType" and free["model_bytes"] == model
        assert len(free["losses"]) == 2 and all(math.isfinite(x) for x in free["losses"])
        # held at the end: DPO's frozen copy, nothing else of that size
        held = sigmoid["tensor_bytes"] - free["tensor_bytes"]
        assert 0.99 * model <= held <= 1.05 * model, (name, held, model)
        # at the peak: at least most of a model's worth less resident memory
        saved = sigmoid["peak_rss"] - free["peak_rss"]
        print(f"{name}: peak RSS {free['peak_rss'] / 1e6:.0f} MB vs sigmoid {sigmoid['peak_rss'] / 1e6:.0f} MB; tensors held "
              f"{free['tensor_bytes'] / 1e6:.1f} MB vs {sigmoid['tensor_bytes'] / 1e6:.1f} MB; model {model / 1e6:.1f} MB")
        assert saved > 0.7 * model, (name, saved / 1e6, model / 1e6, sigmoid, free)


# ------------------------------------------------------------------ the shared reference machinery
def test_the_cache_key_holds_the_stage_and_its_extra(tmp_path):
    """train/preference/reference.py: two stages never share a cache file; a stage's own parts change the key; a
    cache of another width is refused, naming the file."""
    from types import SimpleNamespace

    from vlft.data.reasoning import Thinking
    from vlft.errors import VlftError
    from vlft.train.preference.reference import ReferenceCache, reference_cache_key

    data = tmp_path / "pairs.json"
    data.write_text("[]")

    def key(stage_name="DPO", **change):
        given = dict(data_path=str(data), data=SimpleNamespace(samples=[]), media_sha256="m", model_id="hub/model",
                     media="settings", thinking=Thinking(), chat_template="t",
                     model_args=SimpleNamespace(attn_implementation="sdpa"), tune_args=SimpleNamespace(bits=16),
                     train_args=SimpleNamespace(bf16=False, fp16=False, stage_name=stage_name), max_length=512,
                     extra={"truncation": "keep_start"})
        return reference_cache_key(**{**given, **change})

    assert key() == key() and key("KTO") != key() and key(stage="dpo") != key()
    assert key(extra={"truncation": "drop"}) != key()
    cache = ReferenceCache(tmp_path, key(), n_rows=3, columns=2)
    cache.save(torch.zeros(3, 2))
    assert ReferenceCache(tmp_path, key(), 3, columns=2).load()
    with pytest.raises(VlftError, match=f"{cache.path}.*delete it to recompute"):
        ReferenceCache(tmp_path, key(), 3, columns=1).load()
