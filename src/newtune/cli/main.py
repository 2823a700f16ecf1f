"""The `newtune` command: preprocess, train, inference, merge-lora, validate."""

from __future__ import annotations

import fire

from newtune.cli.inference import inference_command
from newtune.cli.merge_lora import merge_lora_command
from newtune.cli.preprocess import preprocess_command
from newtune.cli.train import train_command
from newtune.cli.validate import validate_command

COMMANDS = {
    "preprocess": preprocess_command,
    "train": train_command,
    "inference": inference_command,
    "merge-lora": merge_lora_command,
    "merge_lora": merge_lora_command,
    "validate": validate_command,
}


def main() -> None:
    """Entry point of the `newtune` console script."""
    fire.Fire(COMMANDS, name="newtune")


if __name__ == "__main__":
    main()
