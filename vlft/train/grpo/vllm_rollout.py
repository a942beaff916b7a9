"""GRPO rollouts with vLLM (`vlft grpo --use_vllm`): TRL's `VLLMGeneration` (trl/generation/vllm_generation.py,
server or colocate mode, weight sync under DeepSpeed and PEFT) fed with vlft's own inputs, so that vLLM samples from
exactly what the trainer then trains on:

- prompts: the prompt token ids of vlft's data path (ChatEncoder.encode_prompt, every <|image_pad|> run already
  expanded to the count vlft computed), each repeated `num_generations` times as VLLMGeneration expects;
- images: PIL images rebuilt pixel for pixel from the prompt item's uint8 patch rows (`unpatchify_image`), so they
  have vlft's fitted size (grid x patch size, a multiple of patch x merge) and vLLM's processor needs no resize
  as long as its own min/max pixels admit that size;
- weights: pushed to vLLM before the first rollout of every new optimizer step (TRL's rule: gradient-accumulation
  micro-batches of one step share one sync);
- completions: cut after the first end-of-turn token, into the (ids, mask, truncated) of the transformers path.

The per-step check: for every prompt, the number of <|image_pad|> tokens vLLM actually used is compared with vlft's
own count; a difference (vLLM's processor resized the image to another grid) stops the run with a VlftError naming
the record, both counts and the fix. Colocate mode reads vLLM's processed prompt ids (what `generate` returns);
server mode reads the placeholder lengths the server reports for the images it processed (the prompt ids it returns
are an echo of ours, so they prove nothing there), before the request is sent.

Video is not supported (VLLMGeneration has no video input): such records are refused at start-up. The sampler's
log-prob of every completion token is kept (`sampling_logps`, NaN for a token vLLM did not emit) for TRL's
importance-sampling correction (--vllm_importance_sampling_correction, on by default as in TRL), which the loss
applies (train/grpo/loss.py: sampling_correction).

Injection point (tests, or another backend): `generator_factory`, a module attribute called once per trainer with
VLLMGeneration's keyword arguments; it must return an object with `sync_weights()` and
`generate(prompts, images, num_generations)` -> (prompt_ids, completion_ids, logprobs, logprob_token_ids) with one
entry per (repeated) prompt. Replacing it also skips the "vllm is installed" check (`check_vllm_flags`).
"""
from __future__ import annotations

import os

import torch

from vlft.constants import IMAGE_PAD
from vlft.errors import VlftError

# GRPOConfig's vLLM flags -> the VLLMGeneration keyword they feed (the rest of its arguments come from other flags)
FLAG_TO_KWARG = {
    "vllm_mode": "mode", "vllm_structured_outputs_regex": "structured_outputs_regex",
    "vllm_server_base_url": "server_base_url", "vllm_server_host": "server_host", "vllm_server_port": "server_port",
    "vllm_server_timeout": "server_timeout", "vllm_group_port": "group_port",
    "vllm_tensor_parallel_size": "tensor_parallel_size", "vllm_gpu_memory_utilization": "gpu_memory_utilization",
    "vllm_max_model_length": "max_model_length", "vllm_enable_sleep_mode": "enable_sleep_mode",
    "vllm_model_impl": "model_impl",
}
SERVER_ONLY = ("vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_group_port")
COLOCATE_ONLY = ("vllm_tensor_parallel_size", "vllm_gpu_memory_utilization", "vllm_max_model_length",
                 "vllm_enable_sleep_mode", "vllm_model_impl")
# the importance-sampling correction's flags (the loss's, not VLLMGeneration's)
CORRECTION_FLAGS = ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                    "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max")
# -100 on the logits: a vision token in a completion would break the training forward (no pixels for it)
SUPPRESS_BIAS = -100.0


def trl_generator(**kwargs):
    """The default generator: TRL's VLLMGeneration (needs vllm, a GPU, and for server mode a running server)."""
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration(**kwargs)


generator_factory = trl_generator  # the injection point (module docstring)


def vllm_installed() -> bool:
    from trl.import_utils import is_vllm_available

    return is_vllm_available()


# ------------------------------------------------------------------ start-up checks
def flag_problems(args, defaults: dict) -> list[str]:
    """GRPOConfig.problems' share: the vLLM flags on their own (no model, no data). `defaults`: {field: default},
    to tell a user's setting from a default."""
    errors = []
    changed = [f for f in (*FLAG_TO_KWARG, *CORRECTION_FLAGS) if getattr(args, f) != defaults[f]]
    if args.use_vllm and args.vllm_importance_sampling_correction and args.loss_type == "vespo" and \
            args.vllm_importance_sampling_mode.startswith("sequence"):
        errors.append(f"--loss_type vespo with --vllm_importance_sampling_mode {args.vllm_importance_sampling_mode}: "
                      "VESPO folds the correction into its per-token weights; use token_truncate or token_mask, or "
                      "--vllm_importance_sampling_correction false")
    if not args.use_vllm:
        if changed:
            errors.append(f"{', '.join('--' + f for f in changed)}: only used with --use_vllm; add --use_vllm or "
                          "drop them")
        return errors
    mode = args.vllm_mode
    if mode not in ("server", "colocate"):
        errors.append(f"--vllm_mode {mode}: use server or colocate")
        return errors
    other = COLOCATE_ONLY if mode == "server" else SERVER_ONLY
    ignored = [f for f in other if f in changed]
    if ignored:
        kind, what = (("colocate", "the server has its own (set them where `trl vllm-serve` starts) or use "
                       "--vllm_mode colocate") if mode == "server" else ("server", "add --vllm_mode server or drop them"))
        errors.append(f"{', '.join('--' + f for f in ignored)}: {kind}-mode setting(s), not used with --vllm_mode "
                      f"{mode}; {what}")
    if mode == "colocate":
        tp = args.vllm_tensor_parallel_size
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if tp < 1:
            errors.append(f"--vllm_tensor_parallel_size must be >= 1, got {tp}")
        elif world % tp:
            errors.append(f"--vllm_tensor_parallel_size {tp} does not divide the {world} training processes: each "
                          "group of that many processes shares one vLLM engine; use a divisor of the process count")
        if not 0 < args.vllm_gpu_memory_utilization <= 1:
            errors.append(f"--vllm_gpu_memory_utilization must be in (0, 1], got {args.vllm_gpu_memory_utilization}")
    if args.vllm_server_timeout <= 0:
        errors.append(f"--vllm_server_timeout must be > 0, got {args.vllm_server_timeout}")
    return errors


def check_vllm_flags(tune_args, train_args) -> None:
    """Right after the flags are parsed: vllm installed, and the combinations vLLM cannot serve."""
    if not train_args.use_vllm:
        return
    if generator_factory is trl_generator and not vllm_installed():
        raise VlftError("--use_vllm needs the vllm package, which this Python lacks (or TRL does not support its "
                        "version): pip install vllm (a version TRL supports), or drop --use_vllm to generate with "
                        "transformers")
    if tune_args.virtual_tokens:
        raise VlftError(f"--use_vllm with --peft_type {tune_args.peft_type}: vLLM generates from the model's weights "
                        "and has no place for virtual tokens; drop --use_vllm or train LoRA")
    if tune_args.bits == 8:
        raise VlftError("--use_vllm with --bits 8: vLLM cannot load in-flight 8-bit quantisation; use --bits 4 or 16, "
                        "or drop --use_vllm")


def check_vllm_length(train_args, max_prompt: int) -> None:
    """Once the prompt budget is known: vLLM's context holds the longest prompt and completion."""
    limit = train_args.vllm_max_model_length
    needed = max_prompt + train_args.max_completion_length
    if train_args.use_vllm and train_args.vllm_mode == "colocate" and limit is not None and limit < needed:
        raise VlftError(f"--vllm_max_model_length {limit} is shorter than the longest prompt allowed "
                        f"(--max_prompt_length {max_prompt}) plus --max_completion_length "
                        f"{train_args.max_completion_length} = {needed}; raise it, or leave it unset (the model's own)")


def check_vllm_data(samples, data_path: str, max_shown: int = 10) -> None:
    """After data preparation, before the model load: no video records (VLLMGeneration takes images only)."""
    videos = [s for s in samples if s.videos]
    if not videos:
        return
    shown = ", ".join(f"{s.index}" + (f" (id {s.id!r})" if s.id is not None else "") for s in videos[:max_shown])
    more = f" and {len(videos) - max_shown} more" if len(videos) > max_shown else ""
    raise VlftError(f"--use_vllm: {data_path} has {len(videos)} record(s) with video, which TRL's vLLM generation "
                    f"cannot take (images only): record(s) {shown}{more}; remove them from the data or drop --use_vllm "
                    "(transformers generation handles video)")


# ------------------------------------------------------------------ images
def unpatchify_image(rows: torch.Tensor, grid, *, patch_size: int, merge_size: int, temporal_patch_size: int):
    """The inverse of data/pixels.py's `patchify` for one image: uint8 patch rows and its grid (1, gh, gw) ->
    the PIL image of size (gw * patch, gh * patch) vlft fitted and trained on."""
    from PIL import Image

    t, gh, gw = (int(v) for v in grid)
    m, p, tps = merge_size, patch_size, temporal_patch_size
    c = rows.shape[1] // (tps * p * p)
    frames = rows.reshape(t, gh // m, gw // m, m, m, c, tps, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    frames = frames.reshape(t * tps, c, gh * p, gw * p)
    if frames.dtype != torch.uint8:
        raise ValueError("unpatchify_image needs the raw uint8 pixel rows (PromptDataset with raw_pixels=True)")
    return Image.fromarray(frames[0].permute(1, 2, 0).contiguous().numpy())


def item_images(item: dict, *, patch_size: int, merge_size: int, temporal_patch_size: int) -> list:
    """A prompt item's images as PIL images at vlft's sizes ([] when it has none)."""
    if "image_grid_thw" not in item:
        return []
    out, start = [], 0
    for grid in item["image_grid_thw"].tolist():
        n = grid[0] * grid[1] * grid[2]
        out.append(unpatchify_image(item["pixel_values"][start:start + n], grid, patch_size=patch_size,
                                    merge_size=merge_size, temporal_patch_size=temporal_patch_size))
        start += n
    return out


def pad_runs(ids, pad_id: int) -> list[int]:
    """Lengths of the runs of `pad_id` in `ids` (one run per image)."""
    runs, n = [], 0
    for t in list(ids) + [None]:
        if t == pad_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


# ------------------------------------------------------------------ completions
def completion_rows(completion_ids, *, end_ids, vision_ids, max_completion_length: int, mask_truncated: bool,
                    logprobs=None):
    """vLLM's completion token lists -> (ids, mask, truncated) per completion, as the transformers path gives them:
    cut after the first end-of-turn token; truncated = no end-of-turn token within --max_completion_length (masked
    out with --mask_truncated_completions). A completion that stopped early without an end token in its ids (vLLM
    dropped the stop token) gets <|im_end|> appended: it did end its turn. A vision token (suppressed, but a bias is
    not a guarantee) ends the completion before it, as truncated.
    logprobs: vLLM's per completion, per token [logprob, ...] (the sampled token's first), or None. Returns
    (ids, masks, truncated, sampling): sampling holds per completion a float32 tensor of the kept tokens' sampler
    log-probs (NaN for an appended <|im_end|>), or is None without logprobs."""
    completions, masks, truncated, sampling = [], [], [], []
    for k, raw in enumerate(completion_ids):
        row = list(raw)
        cut_at = next((k for k, t in enumerate(row) if t in vision_ids), None)
        if cut_at is not None:
            row = row[:cut_at]
        end = next((k for k, t in enumerate(row) if t in end_ids), None)
        if end is not None:
            row, cut = row[:end + 1], False
        elif cut_at is None and len(row) < max_completion_length:
            row, cut = row + [end_ids[0]], False
        else:
            cut = True
        ids = torch.tensor(row, dtype=torch.long)
        mask = torch.zeros_like(ids) if (cut and mask_truncated) else torch.ones_like(ids)
        completions.append(ids)
        masks.append(mask)
        truncated.append(cut)
        if logprobs is not None:
            given = [float(t[0]) if isinstance(t, (list, tuple)) else float(t) for t in logprobs[k]][:len(row)]
            sampling.append(torch.tensor(given + [float("nan")] * (len(row) - len(given)), dtype=torch.float32))
    return completions, masks, truncated, (sampling if logprobs is not None else None)


# ------------------------------------------------------------------ the rollout
class VllmRollout:
    """The trainer's vLLM generation (GRPOTrainer.generate hands over to `generate` under --use_vllm)."""

    def __init__(self, trainer):
        a = trainer.args
        self.trainer = trainer
        encoder = trainer.encoder
        tokenizer = encoder.tokenizer
        self.image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        processor = encoder.processor
        self.geometry = {"patch_size": encoder.patch_size, "merge_size": encoder.merge_size,
                         "temporal_patch_size": getattr(processor.image_processor, "temporal_patch_size", 2)}
        self.end_ids = list(trainer.end_ids)
        self.vision_ids = set(trainer.generation_config.suppress_tokens or [])
        kwargs = {kw: getattr(a, flag) for flag, kw in FLAG_TO_KWARG.items()}
        sampling = {"stop_token_ids": self.end_ids}
        if self.vision_ids:
            sampling["logit_bias"] = {int(t): SUPPRESS_BIAS for t in sorted(self.vision_ids)}
        self.generator = generator_factory(
            model=trainer.model, accelerator=trainer.accelerator, processing_class=processor, **kwargs,
            max_num_seqs=a.per_device_train_batch_size * a.vllm_tensor_parallel_size,
            trust_remote_code=False, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
            max_completion_length=a.max_completion_length, logprobs=0,
            generation_kwargs=sampling)
        self.synced_step: int | None = None  # the global step whose weights vLLM holds
        self.sync_count = 0
        self.server_counts: list[list[int]] | None = None
        self.last: dict | None = None  # the last rollout's inputs and outputs (tests, and the future IS correction)
        self._watch_server_features()

    def _watch_server_features(self) -> None:
        """Server mode: VLLMGeneration (trl 1.16) has the server process each prompt's images and then points those
        features at our image-pad runs (`_place_features`), so the prompt ids it returns are ours. Wrap that step
        to compare the server's own per-image token counts with ours before the request goes out."""
        gen = self.generator
        place = getattr(gen, "_place_features", None)
        if getattr(gen, "mode", None) != "server" or place is None:
            return

        def checked(features, prompt_ids):
            if features is not None:
                theirs = [int(p["length"]) for p in features["mm_placeholders"]["image"]]
                ours = pad_runs(prompt_ids, self.image_pad_id)
                labels = self._server_labels or []
                k = self._server_index
                self._server_index += 1
                if theirs != ours:
                    label = labels[k] if k < len(labels) else f"prompt {k} of this step"
                    raise VlftError(self._mismatch(label, sum(ours), sum(theirs), ours, theirs, "the vLLM server"))
            return place(features, prompt_ids)

        gen._place_features = checked

    _server_labels: list[str] | None = None
    _server_index = 0

    def maybe_sync(self, global_step: int) -> None:
        if self.synced_step != global_step:
            self.generator.sync_weights()
            self.synced_step = global_step
            self.sync_count += 1

    def _label(self, item) -> str:
        sample = self.trainer.samples[int(item["record"])]
        return f"record {sample.index}" + (f" (id {sample.id!r})" if sample.id is not None else "")

    def _mismatch(self, label, ours_total, theirs_total, ours, theirs, who) -> str:
        return (f"--use_vllm: {label}: {who} used {theirs_total} image tokens (per image {theirs}) where vlft's prompt "
                f"has {ours_total} (per image {ours}); vLLM's image processor resized the picture to another grid. "
                f"vlft hands vLLM the images at its own fitted sizes: vLLM's processor min_pixels / max_pixels (the "
                f"model's preprocessor_config.json, or the server's --mm-processor-kwargs) must admit them; set "
                f"--image_min_pixels / --image_max_pixels inside vLLM's range, or drop --use_vllm")

    def generate(self, items: list[dict], global_step: int):
        """The transformers path's return, from vLLM: per row (prompt-major) completion ids, mask, truncated, and the
        inputs handed to vLLM."""
        a = self.trainer.args
        g = a.num_generations
        self.maybe_sync(global_step)
        prompts, images, labels = [], [], []
        for item in items:
            ids = item["prompt_ids"].tolist()
            pictures = item_images(item, **self.geometry)
            prompts += [ids] * g
            images += [pictures or None] * g
            labels.append(self._label(item))
        if all(i is None for i in images):
            images = None
        self._server_index = 0
        if getattr(self.generator, "mode", None) == "server":
            from accelerate.utils import gather_object

            self._server_labels = gather_object(labels)  # main process checks every process's prompts
        prompt_ids, completion_ids, logprobs, _ = self.generator.generate(prompts=prompts, images=images,
                                                                          num_generations=g)
        if len(completion_ids) != len(prompts) or len(prompt_ids) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(prompt_ids)} prompts and {len(completion_ids)} completions for "
                               f"{len(prompts)} requests")
        for k in range(len(items)):
            ours = pad_runs(prompts[k * g], self.image_pad_id)
            for row in range(k * g, (k + 1) * g):
                theirs = pad_runs(prompt_ids[row], self.image_pad_id)
                if theirs != ours:  # per image, in order (as the server check)
                    raise VlftError(self._mismatch(labels[k], sum(ours), sum(theirs), ours, theirs, "vLLM"))
        completions, masks, truncated, sampling = completion_rows(
            completion_ids, end_ids=self.end_ids, vision_ids=self.vision_ids, max_completion_length=a.max_completion_length,
            mask_truncated=a.mask_truncated_completions, logprobs=logprobs)
        self.last = {"prompts": prompts, "images": images, "prompt_ids": prompt_ids, "completion_ids": completion_ids,
                     "logprobs": logprobs, "sampling_logps": sampling}
        return completions, masks, truncated, self.last
