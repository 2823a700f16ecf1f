"""validate's side of `use_ray` (train/ray_launch.py runs it): the Ray keys' rules."""

from __future__ import annotations

from collections.abc import Callable

from newtune.config.schema import NewtuneConfig

RAY_KEYS = ("ray_num_workers", "resources_per_worker", "ray_run_name")


def ray_rules(cfg: NewtuneConfig, names: Callable[[str], str] = str) -> list[str]:
    """Validate's errors for the Ray keys (nothing is imported: Ray may be absent here)."""
    errors = []
    if not cfg.use_ray:
        for key in RAY_KEYS:
            if getattr(cfg, key) is not None:
                errors.append(
                    f"`{names(key)}` is set but `{names('use_ray')}` is not true; it only "
                    f"configures a Ray Train launch: add `{names('use_ray')}: true` or remove it"
                )
        return errors
    for resource, amount in (cfg.resources_per_worker or {}).items():
        if amount < 0:
            errors.append(
                f"`{names('resources_per_worker')}.{resource}: {amount:g}` is negative; give "
                "each worker 0 or more of a resource"
            )
    if cfg.ddp is False and (cfg.ray_num_workers or 1) > 1:
        errors.append(
            f"`{names('ddp')}: false` with `{names('ray_num_workers')}: {cfg.ray_num_workers}`: "
            "Ray's workers are the ranks of one DDP run; use one worker or remove `ddp`"
        )
    return errors
