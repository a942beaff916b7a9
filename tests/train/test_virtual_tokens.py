"""Virtual tokens (P-Tuning, prompt tuning) on Qwen-VL: the real tokens' logits equal those of the base model fed the
virtual embeddings by hand with positions built independently (virtual tokens at 0..V-1, every real token's mRoPE
position shifted by V), for image, video and text records of every family; training moves only the virtual tokens
and lowers the loss; the run loads with PEFT, predicts (generation checked against a step-by-step greedy decode,
also through Qwen3.5's hybrid cache), and refuses to merge; packing is refused at start-up."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA, FAMILIES, REPO

from vlft.errors import VlftError
from vlft.models.loading import load_model
from vlft.models.virtual_tokens import apply_virtual_tokens, virtual_token_config
from vlft.train.sft.run import run

VIDEO_DATA = REPO / "data_examples" / "llava_video_demo.json"
RECORDS = {"video": 0, "image": 6, "text": 7, "image_and_video": 5}  # indices in VIDEO_DATA
V = 5
METHODS = {"p_tuning": dict(encoder_hidden_size=32), "p_tuning_lstm": dict(encoder_reparameterization_type="LSTM"),
           "prompt_tuning": {}}


def one_record_batches(model_dir, bare):
    from vlft.data.collator import SFTCollator
    from vlft.data.prepare import prepare_sft_data
    from vlft.data.sft import SFTDataset
    from vlft.models.loading import load_processor

    processor = load_processor(str(model_dir))
    checked = prepare_sft_data(str(VIDEO_DATA), processor=processor, image_folder=str(REPO / "data_examples"),
                               media=DEMO_MEDIA, max_seq_length=10**6)
    ds = SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA,
                    video_sources=checked.video_sources)
    collate = SFTCollator.for_model(processor, bare)
    return {name: collate([ds[i]]) for name, i in RECORDS.items()}


def independent_positions(bare, batch) -> torch.Tensor:
    """[4, 1, V+L]: row 0 text positions 0..V+L-1; rows 1-3 (t, h, w): the virtual tokens at 0..V-1, then the
    positions of the record alone (the model's get_rope_index on the unextended ids, or 0..L-1 for text) + V."""
    ids = batch["input_ids"]
    length = ids.shape[1]
    inner = bare.model
    if batch.get("image_grid_thw") is not None or batch.get("video_grid_thw") is not None:
        accepted = inspect.signature(inner.get_rope_index).parameters
        kwargs = {k: batch[k] for k in ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts",
                                        "attention_mask") if k in accepted and batch.get(k) is not None}
        rope, _ = inner.get_rope_index(ids, **kwargs)
    else:
        rope = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)
    pos = torch.zeros((4, 1, V + length), dtype=torch.long)
    pos[0, 0] = torch.arange(V + length)
    pos[1:, 0, :V] = torch.arange(V)
    pos[1:, 0, V:] = rope[:, 0] + V
    return pos


def reference_logits(peft_model, family_name, batch) -> torch.Tensor:
    """The base model fed [virtual; embed(input_ids) with the vision features] by hand, no input_ids."""
    bare = peft_model.get_base_model()
    ids = batch["input_ids"]
    embeds = bare.get_input_embeddings()(ids)
    prompts = peft_model.get_prompt(batch_size=1)
    kwargs = {}
    if getattr(bare.model.visual, "deepstack_merger_list", None):  # Qwen3-VL and Qwen3-VL-MoE
        # deepstack adds vision features inside the first decoder layers too: the model places them, finding the
        # placeholders by their embedding (input_ids are not given)
        kwargs = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
                  if batch.get(k) is not None}
    else:
        for pixels, grid, token, get in (("pixel_values", "image_grid_thw", bare.config.image_token_id,
                                          bare.model.get_image_features),
                                         ("pixel_values_videos", "video_grid_thw", bare.config.video_token_id,
                                          bare.model.get_video_features)):
            if batch.get(pixels) is not None:
                features = torch.cat(get(batch[pixels], batch[grid]).pooler_output)
                mask = ids[0] == token
                assert int(mask.sum()) == features.shape[0]
                embeds = embeds.clone()
                embeds[0, mask] = features
    inputs_embeds = torch.cat([prompts.to(embeds.dtype), embeds], 1)
    out = bare(inputs_embeds=inputs_embeds, position_ids=independent_positions(bare, batch),
               attention_mask=torch.ones((1, inputs_embeds.shape[1]), dtype=torch.long), **kwargs)
    return out.logits


# the new families: Qwen3.5's hybrid decoder (linear-attention layers take no positions, full-attention layers rotate
# a partial_rotary_factor of each head) and MoE, Qwen3-VL-MoE's deepstack


@pytest.mark.parametrize("family_name", FAMILIES)
def test_real_token_logits_equal_the_hand_built_reference(family_name, tiny_model_factory):
    model_dir = tiny_model_factory(family_name)
    base, _ = load_model(str(model_dir))
    batches = one_record_batches(model_dir, base)
    worst = {}
    for method, extra in METHODS.items():
        torch.manual_seed(0)
        peft_type = "p_tuning" if method.startswith("p_tuning") else method
        model = apply_virtual_tokens(base, virtual_token_config(peft_type, V, **extra)).eval()
        for name, batch in batches.items():
            with torch.no_grad():
                got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                want = reference_logits(model, family_name, batch)
                plain = base(**{k: v for k, v in batch.items() if k != "labels"}).logits
            assert got.shape[1] == batch["input_ids"].shape[1] + V
            diff = (got[:, V:] - want[:, V:]).abs().max().item()
            worst[(method, name)] = diff
            assert diff < 1e-5, (method, name, diff)
            assert (got[:, V:] - plain).abs().max() > 1e-3  # the virtual tokens do change the output
        base = model.get_base_model()
    print(f"\n{family_name}: max |real-token logit diff| vs hand-built reference: "
          + ", ".join(f"{m}/{r} {d:.1e}" for (m, r), d in worst.items()))


def test_wrong_positions_would_be_caught(tiny_model_factory):
    """The reference is sensitive to positions: shifting the image's mRoPE rows by one changes the logits."""
    model_dir = tiny_model_factory("qwen2_vl")
    base, _ = load_model(str(model_dir))
    batch = one_record_batches(model_dir, base)["image"]
    model = apply_virtual_tokens(base, virtual_token_config("prompt_tuning", V)).eval()
    bare = model.get_base_model()
    pos = independent_positions(bare, batch)
    wrong = pos.clone()
    wrong[1:] = pos[0]  # 1-D positions everywhere: what PEFT's own forward leaves Qwen-VL with
    embeds = torch.cat([model.get_prompt(batch_size=1), bare.get_input_embeddings()(batch["input_ids"])], 1)
    kwargs = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    with torch.no_grad():
        right = bare(inputs_embeds=embeds, position_ids=pos, **kwargs).logits
        bad = bare(inputs_embeds=embeds, position_ids=wrong, **kwargs).logits
        got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert (right - bad).abs().max() > 1e-3
    assert (got - right).abs().max() < 1e-5


def train_virtual(model_dir, out, method, *extra, steps=6):
    return run(["--model_id", str(model_dir), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
                "--output_dir", str(out), "--peft_type", method, "--num_virtual_tokens", str(V),
                "--max_steps", str(steps), "--per_device_train_batch_size", "4", "--learning_rate", "3e-2",
                "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0", "--logging_steps", "1", *extra])


@pytest.fixture(scope="module", params=["p_tuning", "prompt_tuning"])
def trained(request, tiny_model_factory, tmp_path_factory):
    model_dir = tiny_model_factory("qwen2_vl")
    out = tmp_path_factory.mktemp(request.param) / "run"
    summary, trainer = train_virtual(model_dir, out, request.param)
    return request.param, model_dir, out, summary, trainer


def test_only_the_virtual_tokens_train_and_the_loss_falls(trained):
    from conftest import logged_losses

    method, model_dir, out, summary, trainer = trained
    fresh, _ = load_model(str(model_dir))
    before = dict(fresh.named_parameters())
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)
    for name, p in model.get_base_model().named_parameters():
        assert torch.equal(p, before[name]), name  # every base weight as loaded
    losses = logged_losses(out)
    print(f"\n{method}: losses {[round(x, 3) for x in losses]}")
    assert len(losses) == 6 and losses[-1] < losses[0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["num_virtual_tokens"] == V
    assert not (out / "non_lora_trainables.safetensors").exists()


def test_saved_run_loads_with_peft_and_predicts(trained, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from vlft.predict import main as predict_main

    method, model_dir, out, _, trainer = trained
    base, _ = load_model(str(model_dir))
    loaded = PeftModel.from_pretrained(base, str(out))
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("prompt" in k for k in saved)
    with torch.no_grad():
        assert torch.equal(loaded.get_prompt(batch_size=1), trainer.model.get_prompt(batch_size=1).cpu())
    preds = tmp_path / "preds.jsonl"
    predict_main(["--model", str(out), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
                  "--output", str(preds), "--max_new_tokens", "4", "--batch_size", "4"])
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 10 and all(isinstance(r["prediction"], str) for r in rows)


def test_generation_equals_a_step_by_step_greedy_decode(trained):
    """generate (prefill with the virtual tokens, then the KV cache and the model's rope deltas) picks the tokens a
    full forward over the whole sequence picks, step by step, for an image and a text record (batch 1)."""
    from vlft.models.virtual_tokens import load_virtual_tokens

    _, model_dir, out, _, _ = trained
    base, _ = load_model(str(model_dir))
    model = load_virtual_tokens(base, out)
    assert_generation_is_greedy(model, one_record_batches(model_dir, base), ("image", "text"))


def test_generation_through_the_hybrid_cache_is_greedy(tiny_model_factory):
    """Qwen3.5: generate's cached decoding (recurrent and convolution states of the linear-attention layers, KV of
    the full-attention ones) after a prefill with the virtual tokens picks what full forwards pick (an untrained
    adapter: the comparison needs none)."""
    model_dir = tiny_model_factory("qwen3_5")
    base, _ = load_model(str(model_dir))
    torch.manual_seed(0)
    model = apply_virtual_tokens(base, virtual_token_config("prompt_tuning", V)).eval()
    assert_generation_is_greedy(model, one_record_batches(model_dir, base), ("image", "video", "text"))


def assert_generation_is_greedy(model, batches, names) -> None:
    for name in names:
        batch = {k: v for k, v in batches[name].items() if k != "labels"}
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=5, do_sample=False, min_new_tokens=5)
            ids = batch["input_ids"]
            assert torch.equal(generated[:, :ids.shape[1]], ids)
            step = dict(batch)
            for _ in range(5):
                logits = model(**step).logits[:, -1]
                nxt = logits.argmax(-1, keepdim=True)
                step["input_ids"] = torch.cat([step["input_ids"], nxt], 1)
                step["attention_mask"] = torch.cat([step["attention_mask"], torch.ones_like(nxt)], 1)
                if "mm_token_type_ids" in step:
                    step["mm_token_type_ids"] = torch.cat([step["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
        assert torch.equal(generated, step["input_ids"]), name


def test_merge_refuses_virtual_tokens(trained, tmp_path):
    from vlft.merge import merge

    _, _, out, _, _ = trained
    with pytest.raises(VlftError, match="cannot be merged"):
        merge(str(out), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_unproven_combinations_are_refused(tiny_model_factory, tmp_path):
    model_dir = tiny_model_factory("qwen2_vl")
    for extra, message in ((["--packing", "true"], "--packing with --peft_type"),
                           (["--lora_enable", "true"], "drop --lora_enable"),
                           (["--freeze_llm", "false"], "--freeze_llm false is not supported"),
                           (["--bits", "4"], "--bits is not supported")):
        with pytest.raises(VlftError, match=message):
            train_virtual(model_dir, tmp_path / "x", "p_tuning", *extra)
    with pytest.raises(VlftError, match="needs --num_virtual_tokens"):
        run(["--model_id", str(model_dir), "--data_path", str(DEMO_DATA), "--output_dir", str(tmp_path / "y"),
             "--peft_type", "prompt_tuning"])
    with pytest.raises(VlftError, match="P-Tuning setting"):
        train_virtual(model_dir, tmp_path / "z", "prompt_tuning", "--encoder_hidden_size", "8")


def test_lora_script_takes_peft_type_and_num_virtual_tokens(tmp_path):
    from test_scripts import launched_argv

    from vlft.config import parse_args, validate
    from vlft.train.sft.config import GROUPS as SFT_GROUPS

    calls = launched_argv(tmp_path, "finetune_lora.sh", PEFT_TYPE="prompt_tuning", NUM_VIRTUAL_TOKENS="12")
    groups = parse_args(SFT_GROUPS, calls["sft"])
    validate(*groups)
    tune = groups[2]
    assert (tune.peft_type, tune.num_virtual_tokens, tune.lora_enable) == ("prompt_tuning", 12, False)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_generation_of_every_family_equals_a_step_by_step_decode(family_name, tiny_model_factory):
    """As above, untrained P-Tuning on each family, for image, video and text records."""
    model_dir = tiny_model_factory(family_name)
    base, _ = load_model(str(model_dir))
    base.config.use_cache = True
    torch.manual_seed(0)
    model = apply_virtual_tokens(base, virtual_token_config("p_tuning", V)).eval()
    for name, batch in one_record_batches(model_dir, base).items():
        batch = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            step = dict(batch)
            for _ in range(4):
                nxt = model(**step).logits[:, -1].argmax(-1, keepdim=True)
                step["input_ids"] = torch.cat([step["input_ids"], nxt], 1)
                step["attention_mask"] = torch.cat([step["attention_mask"], torch.ones_like(nxt)], 1)
                if "mm_token_type_ids" in step:
                    step["mm_token_type_ids"] = torch.cat([step["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
        assert torch.equal(generated, step["input_ids"]), (family_name, name)
