"""`tgpo-jax demo ARGS...` that holds still right after one SFT checkpoint, so that a test can send it a
signal at a known point: python demo_interrupt_driver.py STAGE STEP TRIGGER_FILE -- demo ARGS...

Once the checkpoint of step STEP of the SFT run under <out>/STAGE/ is on disk, TRIGGER_FILE is
written and the process sleeps; the test then interrupts it (SIGINT as Ctrl-C does, or SIGKILL).
Nothing else of the demo is changed."""

import os
import signal
import sys
import time

from tgpo_jax.train import checkpoint


def main() -> int:
    # A shell starts background commands with SIGINT ignored, and Python then keeps it ignored: a test
    # run from such a job would send a SIGINT that does nothing. A demo in a terminal has the default
    # handler (Ctrl-C raises KeyboardInterrupt); so does this driver, whoever started it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stage, step, trigger = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    argv = sys.argv[sys.argv.index("--") + 1 :]
    original = checkpoint.RunCheckpoints.save

    def save_then_hold(self, iteration, state, meta, eval_score=None):
        original(self, iteration, state, meta, eval_score)
        if iteration == step and f"{os.sep}{stage}{os.sep}sft{os.sep}" in self.root + os.sep:
            self.wait()  # on disk, as it is when a signal comes a while after the save
            with open(trigger, "w") as f:
                f.write(str(iteration))
            time.sleep(600)

    checkpoint.RunCheckpoints.save = save_then_hold
    from tgpo_jax.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
