"""Fault injection for the survival tests (tests/train/test_survival.py, tests/distributed/test_resume_distributed.py):
a test puts this folder first on PYTHONPATH and sets VLFT_TEST_FAULT=<mode>@<step>; Python imports this file at
start-up in every process the run starts (the ranks of torchrun or the DeepSpeed launcher too), and it patches
vlft's trainer before the command runs:

  kill_step@k   rank 0 SIGKILLs its whole process group (the launcher and every rank) as step k+1 begins
  term_step@k   rank 0 sends itself SIGTERM as step k+1 begins (what a scheduler does; the run must stop cleanly)
  int_step@k    the same with SIGINT (Ctrl-C)
  kill_save@k   rank 0 SIGKILLs the process group while checkpoint-k is being written (weights and optimizer
                written, RNG state and trainer state not yet)

Nothing of this is in vlft itself: SIGKILL cannot be caught, so the runs under test get no chance to tidy up."""
import os

_FAULT = os.environ.get("VLFT_TEST_FAULT")
_IS_RANK = "RANK" in os.environ or "LOCAL_RANK" in os.environ or os.environ.get("VLFT_TEST_SINGLE") == "1"

if _FAULT and _IS_RANK:
    import signal

    _mode, _at = _FAULT.split("@")
    _at = int(_at)
    _rank0 = os.environ.get("RANK", "0") == "0"

    def _kill_everything():
        try:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)

    import vlft.train.core.trainer as _trainer

    if _mode in ("kill_step", "term_step", "int_step"):
        # set on the composition, ahead of the concern mixins whose training_step it runs (counting, guard)
        _step_fn = _trainer.VlftTrainerMixin.training_step
        _sent = []

        def training_step(self, *args, **kwargs):
            if _rank0 and self.state.global_step == _at and not _sent:
                _sent.append(1)
                if _mode == "kill_step":
                    _kill_everything()
                os.kill(os.getpid(), signal.SIGINT if _mode == "int_step" else signal.SIGTERM)
            return _step_fn(self, *args, **kwargs)

        _trainer.VlftTrainerMixin.training_step = training_step
    elif _mode == "kill_save":
        from transformers import Trainer

        _rng_fn = Trainer._save_rng_state

        def _save_rng_state(self, output_dir):
            if _rank0 and self.state.global_step == _at:
                _kill_everything()
            return _rng_fn(self, output_dir)

        Trainer._save_rng_state = _save_rng_state
    else:
        raise ValueError(f"VLFT_TEST_FAULT={_FAULT}: unknown mode {_mode}")
