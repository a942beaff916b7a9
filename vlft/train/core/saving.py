"""What every save writes, and how (a concern of VlftTrainerMixin, train/core/trainer.py): `SavingMixin`."""
from __future__ import annotations

from pathlib import Path

from vlft.run_dir import CHECKPOINT_PREFIX, FINAL_STAGING, STATE_FILE, write_run_files


class SavingMixin:
    """Owns the saves: vlft's files in every save (run_dir.py: fully trained non-LoRA weights, what trained, resolved
    arguments from `self.vlft_args`, and the run's resume identity, `self.identity()`: train/core/resume.py),
    checkpoints written under <output_dir>/.vlft-staging and renamed into place when every rank has finished, and
    the final save staged the same way (train/core/checkpoints.py says why). Every save first refuses non-finite
    weights (`self._check_finite_weights`: train/core/guard.py). A stage with per-process state a resume needs
    overrides `save_process_state`.

    Overrides the private `_get_output_dir`, `_save_checkpoint` and `_save` (rows in train/core/overrides.py)."""

    def __init__(self, *args, **kwargs):
        self._staging: str | None = None  # where the Trainer writes a checkpoint before it is renamed into place
        super().__init__(*args, **kwargs)

    def _get_output_dir(self, trial):
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, written under <output_dir>/.vlft-staging and renamed into place when every
        rank has finished; then the rotation of --save_total_limit (train/core/checkpoints.py says why)."""
        from transformers.trainer_utils import rotate_checkpoints

        from vlft.train.core.checkpoints import (
            STAGING_DIR,
            any_rank,
            barrier,
            publish_checkpoint,
            remove_if_empty,
            save_failed,
        )

        run_dir = Path(super()._get_output_dir(trial))
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        self._check_finite_weights(name)
        staging = run_dir / STAGING_DIR
        self._staging = str(staging)
        failure = None
        try:
            super()._save_checkpoint(model, trial)
            # HF names the best checkpoint under the folder it saved into (staging): name its final place, in
            # memory and in this checkpoint's state file (a resume reads it from there)
            best_step = self.state.best_global_step
            best = run_dir / f"{CHECKPOINT_PREFIX}{best_step}" if best_step else None
            if best is not None and (best.name == name or best.exists()) and \
                    self.state.best_model_checkpoint != str(best):
                self.state.best_model_checkpoint = str(best)
                if self.args.should_save:
                    self.state.save_to_json(str(staging / name / STATE_FILE))
            self.save_process_state(staging / name)
        except OSError as err:
            failure = err
        finally:
            self._staging = None
        if any_rank(failure is not None, self.args.device):
            if self.args.should_save:
                shutil_rmtree(staging / name)
                remove_if_empty(staging)
            raise save_failed(failure or OSError("another process could not write its part"), name, run_dir)
        barrier()
        if self.args.should_save:
            publish_checkpoint(staging / name, run_dir / name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        barrier()

    def save_process_state(self, checkpoint: Path) -> None:
        """Write what this process alone holds and a resume needs (a stage with such state overrides; every rank
        calls it, into the staged checkpoint folder, so the file is published with the checkpoint or not at all)."""

    def save_final(self, output_dir: str) -> None:
        """The end-of-run save, staged and then moved into `output_dir` (see train/core/checkpoints.py)."""
        from vlft.train.core.checkpoints import (
            STAGING_DIR,
            any_rank,
            barrier,
            publish_final,
            remove_if_empty,
            save_failed,
        )

        self._check_finite_weights("the final model")
        out = Path(output_dir)
        staged = out / STAGING_DIR / FINAL_STAGING
        if self.args.should_save:
            shutil_rmtree(staged)
        barrier()
        failure = None
        try:
            self.save_model(str(staged))
        except OSError as err:
            failure = err
        if any_rank(failure is not None, self.args.device):
            if self.args.should_save:
                shutil_rmtree(staged)
                remove_if_empty(staged.parent)
            raise save_failed(failure or OSError("another process could not write its part"), "the final model", out)
        barrier()
        if self.args.should_save:
            from vlft.models.extra_keys import carry_into_final_save

            carry_into_final_save(self.vlft_args.get("model_id"), staged, self.family)  # what load dropped: mtp.*
            publish_final(staged, out)
        barrier()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            from peft import PeftModel

            model = self.accelerator.unwrap_model(self.model)
            gathered = state_dict if self.is_deepspeed_enabled else None
            write_run_files(model, output_dir or self.args.output_dir, self.vlft_args,
                            is_peft=isinstance(model, PeftModel), state_dict=gathered)
            from vlft.train.core.checkpoints import write_identity

            write_identity(output_dir or self.args.output_dir, self.identity())


def shutil_rmtree(path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
