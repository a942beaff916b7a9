"""The GRPO stage's flags: `GRPOConfig` (TrainingArguments + vlft's additions + the stage's own) and `GROUPS`, the
argument groups `vlft grpo` parses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import TrainingArguments

from vlft.train.core.arguments import VlftArgumentsMixin, stage_groups


@dataclass
class GRPOConfig(VlftArgumentsMixin, TrainingArguments):
    """HF TrainingArguments with vlft's additions and the GRPO stage's flags, under TRL's `GRPOConfig` names and
    defaults (trl 1.16) for what vlft implements (train/grpo/loss.py, train/grpo/rewards.py, train/grpo/trainer.py).
    As in TRL, --per_device_train_batch_size counts completions: prompts per step = it / --num_generations."""

    stage_key = "grpo"
    stage_name = "GRPO"
    router_aux_loss_joins = False

    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (the group)."})
    max_completion_length: int = field(default=512, metadata={"help": "Longest completion, in tokens."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Longest prompt, vision tokens included; longer ones are dropped, never cut "
                                        "(default: --max_seq_length minus --max_completion_length)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (the log-probs use it too)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    beta: float = field(default=0.0, metadata={"help": "KL weight against the reference (0: no reference model)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping bound of the importance ratio."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping bound (default: --epsilon)."})
    loss_type: str = field(default="dapo", metadata={"help": "How token losses are aggregated and clipped (TRL's names).",
                                                      "choices": ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo",
                                                                  "luspo", "vespo"]})
    importance_sampling_level: str = field(
        default="token", metadata={"help": "token (GRPO) or sequence (GSPO).", "choices": ["token", "sequence"]})
    scale_rewards: str = field(
        default="group", metadata={"help": "Divide advantages by the group's reward std (group), the batch's (batch), "
                                           "or not (none).", "choices": ["group", "batch", "none"]})
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Leave completions that hit --max_completion_length out of the loss."})
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer steps per generated batch (TRL's mu): each step's rollouts are trained on "
                                     "this many times, the importance ratio taken against the policy that generated them "
                                     "(clipped by --epsilon); an epoch then uses every prompt this many times."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": "Rewards: built-in names (format, think_format, accuracy, count, choice, iou, overlong, "
                          "repetition), path/to/file.py:function or module:function, with TRL's signature, or "
                          "rm:PATH[@DEVICE] (a `vlft rm` run scoring each completion with its prompt's images and "
                          "video). Thinking models: accuracy, count, choice and iou score the answer after </think>."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward (default 1)."})
    log_completions: bool = field(
        default=True, metadata={"help": "Write every step's completions and rewards to <output_dir>/completions.jsonl."})
    # vLLM generation (train/grpo/vllm_rollout.py): TRL's GRPOConfig names and defaults, except where noted
    use_vllm: bool = field(
        default=False, metadata={"help": "Generate the completions with vLLM (pip install vllm; images and text prompts, "
                                         "not video) instead of transformers' generate."})
    vllm_mode: str = field(
        default="colocate", metadata={"help": "server: a separate `trl vllm-serve` process; colocate: a vLLM engine "
                                              "inside every training process, sharing its GPU.",
                                      "choices": ["server", "colocate"]})
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "Server mode: the server's base URL (then --vllm_server_host / --vllm_server_port "
                                        "are not used)."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: the server's host."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: the server's port."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Server mode: seconds to wait for the server to come up."})
    vllm_group_port: int = field(
        default=51216, metadata={"help": "Server mode: port of the weight-update process group."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Colocate mode: share of the GPU memory vLLM may take."})
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "Colocate mode: processes that share one vLLM engine (must divide the process "
                                     "count)."})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "Colocate mode: vLLM's context length (default: the model's)."})
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Colocate mode: offload vLLM's weights and cache between rollouts."})
    vllm_model_impl: str = field(
        default="vllm", metadata={"help": "Colocate mode: vLLM's own model code (vllm) or transformers'.",
                                  "choices": ["vllm", "transformers"]})
    vllm_structured_outputs_regex: str | None = field(
        default=None, metadata={"help": "Constrain the completions to this regex (vLLM structured outputs)."})
    vllm_importance_sampling_correction: bool = field(
        default=True, metadata={"help": "Weight each token's loss by the policy / vLLM sampler probability ratio, "
                                        "truncated or masked (TRL's correction for their numerical mismatch)."})
    vllm_importance_sampling_mode: str = field(
        default="sequence_mask", metadata={"help": "token_* one ratio per token, sequence_* one per completion; "
                                                   "*_truncate clamps it to the bounds, *_mask zeroes it outside them.",
                                           "choices": ["token_truncate", "token_mask", "sequence_truncate",
                                                       "sequence_mask"]})
    vllm_importance_sampling_clip_min: float | None = field(
        default=None, metadata={"help": "Lower bound of the correction ratio (default: none)."})
    vllm_importance_sampling_clip_max: float | None = field(
        default=3.0, metadata={"help": "Upper bound of the correction ratio."})
    disable_dropout: bool = field(default=False, metadata={"help": "Turn dropout off in the policy."})

    def __post_init__(self):
        self.reward_funcs = [t.strip() for value in self.reward_funcs for t in str(value).split(",") if t.strip()]
        super().__post_init__()

    def problems(self) -> list[str]:
        errors = super().problems()
        if self.num_generations < 2:
            errors.append("--num_generations must be >= 2: advantages compare the completions of one prompt")
        elif self.per_device_train_batch_size % self.num_generations:
            errors.append(f"--per_device_train_batch_size {self.per_device_train_batch_size} counts completions and "
                          f"must be a multiple of --num_generations {self.num_generations}")
        if self.num_iterations < 1:
            errors.append(f"--num_iterations {self.num_iterations}: must be >= 1 (optimizer steps per generated batch; "
                          "use 1, the default, for one)")
        from vlft.train.grpo.vllm_rollout import flag_problems

        errors += flag_problems(self, {f.name: f.default for f in dataclasses.fields(self)})
        if self.max_completion_length < 1:
            errors.append("--max_completion_length must be >= 1")
        if not self.reward_funcs:
            errors.append("--reward_funcs needs at least one reward")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            errors.append(f"--reward_weights has {len(self.reward_weights)} value(s) for {len(self.reward_funcs)} "
                          "reward(s); give one weight per --reward_funcs entry")
        if self.temperature <= 0:
            errors.append("--temperature must be > 0")
        return errors


GROUPS = stage_groups(GRPOConfig)
