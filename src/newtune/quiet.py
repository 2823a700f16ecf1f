"""Drop two known-harmless lines that optional packages log on import, whatever the command.

Neither import is ours, so "import optional packages only where they are used" cannot reach
them: peft imports bitsandbytes whenever it is installed (`peft/helpers.py`, at `import peft`,
which transformers' Trainer utilities do), and bitsandbytes then warns that it could not load
the CPU `gemm_4bit_forward` kernel from kernels-community (it matters only for 4-bit inference
on CPU). accelerate's `extract_model_from_parallel` (called by `Trainer.__init__`) imports
deepspeed whenever it is installed, and DeepSpeed warns "Setting accelerator to CPU" on a
machine without a GPU. Blocking the imports would break QLoRA and DeepSpeed runs, so this
installs a filter on exactly the two loggers that emit the lines, matching their text; every
other record of those loggers still shows.
"""

from __future__ import annotations

import logging

KNOWN = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "DeepSpeed": "Setting accelerator to CPU. If you have GPU or other accelerator",
}


class DropKnownLine(logging.Filter):
    """Drop records whose message starts with one known text."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for the known line, True for everything else."""
        return not str(record.msg).startswith(self.start)


def quiet_optional_packages() -> None:
    """Install the filters (once) before peft, bitsandbytes or deepspeed is imported."""
    for name, start in KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnownLine) for f in logger.filters):
            logger.addFilter(DropKnownLine(start))
