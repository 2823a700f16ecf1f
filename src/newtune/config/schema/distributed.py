"""Keys of multi-device training."""

from typing import Any

from newtune.config.schema.base import SCALE, Section, ignored, planned


class DistributedSection(Section):
    """DeepSpeed, FSDP and DDP settings."""

    deepspeed: str | dict[str, Any] | None = planned(
        SCALE, "DeepSpeed config: a path or a mapping."
    )
    fsdp: list[str] | str | None = planned(SCALE, "FSDP options, e.g. [full_shard, auto_wrap].")
    fsdp_config: dict[str, Any] | None = planned(SCALE, "FSDP plugin settings.")
    ddp_timeout: int | None = planned(SCALE, "Seconds before a distributed operation times out.")
    ddp_bucket_cap_mb: int | None = planned(SCALE, "DDP gradient bucket size.")
    ddp_broadcast_buffers: bool | None = planned(SCALE, "DDP broadcasts buffers each step.")
    local_rank: int | None = ignored("Set by the launcher.")
