"""Train one run from a YAML config as a script, optionally preempted at a step (tests/methods/test_fsdp.py).

``python tests/fsdp_script.py CONFIG [PREEMPT_STEP]``. Lightning starts the other ranks of a
``trainer.devices=2`` run by running this same script again, so every rank applies the same
preemption: a request during training step ``PREEMPT_STEP - 1``, the checkpoint then holds
``PREEMPT_STEP`` steps (as ``tests/test_resume.py::preempt_at``). Exit code 3 means preempted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_bench import config as config_lib  # noqa: E402
from ssl_bench.methods import dino  # noqa: E402
from ssl_bench.run import preemption, train  # noqa: E402


def main(path: str, preempt_step: int = 0) -> int:
    if preempt_step:
        original = dino.DINO.training_step

        def training_step(self, batch, batch_idx):
            if self.global_step == preempt_step - 1:
                preemption.request_preemption_checkpoint()
            return original(self, batch, batch_idx)

        dino.DINO.training_step = training_step
    try:
        result = train.run(config_lib.load_config(path))
    except preemption.Preempted as stopped:
        print(f"preempted at step {stopped.step}", flush=True)
        return 3
    print(f"{result.status} at step {result.metrics.get('train_steps', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
