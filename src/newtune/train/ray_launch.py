"""`use_ray: true`: `newtune train` runs its ranks as Ray Train workers.

The driver (the `newtune train` process) connects to the Ray cluster in RAY_ADDRESS or starts
a local one, and runs a `ray.train.torch.TorchTrainer` with `ray_num_workers` workers. Ray
sets up torch.distributed in each worker (gloo on CPU, nccl on GPU) and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, as torchrun does; each worker then runs newtune's
ordinary training entry (`newtune.train.run.train`, the code `accelerate launch -m
newtune.cli.train` runs), where accelerate reuses Ray's process group and only rank 0 writes
the outputs. DeepSpeed and FSDP ride along as under torchrun: transformers' TrainingArguments
turns them on from the config inside each worker.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from newtune.config.ray import RAY_KEYS, ray_rules  # noqa: F401 - re-exported
from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError, NewtuneError

log = logging.getLogger(__name__)

INSTALL = "pip install 'newtune[ray]'"
WORKER_ENV = "NEWTUNE_RAY_WORKER"  # set in a worker: this process is one rank of a Ray run
# Ray Train's workers turn `print` into root-logger records, which newtune's log format then
# shows line by line (dill's captured `dis` output, when datasets hashes a function)
WORKER_SETTINGS = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def scaling_kwargs(cfg: NewtuneConfig, cluster_gpus: float) -> dict[str, Any]:
    """ScalingConfig's arguments: workers, GPU or not, and each worker's resources.

    `resources_per_worker.GPU` decides GPU training when given (0: CPU); else the workers use
    GPUs when the Ray cluster has any (Ray then reserves one per worker).
    """
    resources = dict(cfg.resources_per_worker) if cfg.resources_per_worker is not None else None
    gpu = (resources or {}).get("GPU")
    use_gpu = gpu > 0 if gpu is not None else cluster_gpus > 0
    if resources is not None and gpu == 0:
        del resources["GPU"]
    return {
        "num_workers": cfg.ray_num_workers or 1,
        "use_gpu": use_gpu,
        "resources_per_worker": resources or None,
    }


def needed_resources(scaling: dict[str, Any]) -> dict[str, float]:
    """What the workers reserve in all, as Ray counts it (1 CPU, or 1 GPU, each by default)."""
    per = dict(scaling["resources_per_worker"] or ({} if scaling["use_gpu"] else {"CPU": 1}))
    if scaling["use_gpu"]:
        per.setdefault("GPU", 1)
    return {k: v * scaling["num_workers"] for k, v in per.items() if v}


def check_launch(environ: dict[str, str] | None = None) -> None:
    """Refuse `use_ray` in a process that is already one rank of a launcher's run."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise ConfigError(
            f"`use_ray: true`, but this process is already rank {env.get('RANK', '?')} of "
            f"{world} under accelerate launch/torchrun: Ray Train starts the ranks itself. Run "
            "`newtune train cfg.yml` as one plain process (no launcher), or remove `use_ray` "
            "to keep the launcher."
        )


def check_no_launcher(cfg: NewtuneConfig, launcher: str) -> None:
    """`newtune train --launcher X` with `use_ray`: two launchers for one run."""
    if cfg.use_ray:
        raise ConfigError(
            f"`--launcher {launcher}` and `use_ray: true` both start the training processes; "
            "drop `--launcher` (Ray Train starts `ray_num_workers` ranks) or remove `use_ray`."
        )


def import_ray() -> tuple[Any, Any, Any, Any]:
    """(ray, TorchTrainer, ScalingConfig, RunConfig), or one ConfigError saying what to install."""
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as exc:
        raise ConfigError(
            f"`use_ray: true` launches the run through Ray Train, which is not installed here "
            f"({exc}); run `{INSTALL}` (or `pip install 'ray[train]'`), or remove `use_ray` "
            "and start the ranks with `accelerate launch`/torchrun."
        ) from None
    return ray, TorchTrainer, ScalingConfig, RunConfig


def _check_room(ray: Any, scaling: dict[str, Any]) -> None:
    """On a local cluster, workers that cannot all be placed would wait forever: refuse now."""
    total = ray.cluster_resources()
    for resource, amount in needed_resources(scaling).items():
        if total.get(resource, 0) < amount:
            raise ConfigError(
                f"`ray_num_workers: {scaling['num_workers']}` workers need {amount:g} {resource} "
                f"in all, and the local Ray cluster has {total.get(resource, 0):g}; lower "
                "`ray_num_workers` or `resources_per_worker`, or set RAY_ADDRESS to a cluster "
                "that has them."
            )


def user_error(error: BaseException) -> NewtuneError | None:
    """The NewtuneError a worker raised, found inside Ray's wrapping of it, else None."""
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, NewtuneError):
            return exc
        failures = getattr(exc, "worker_failures", None) or {}
        todo += [failures[rank] for rank in sorted(failures, reverse=True)]
        todo += [getattr(exc, "cause", None), exc.__cause__, exc.__context__]
        todo.append(getattr(exc, "controller_failure", None))
    return None


def worker_loop(job: dict[str, Any]) -> None:
    """One Ray Train worker: newtune's training entry, as under `accelerate launch`."""
    os.chdir(job["cwd"])  # Ray starts workers in its run folder; the config's paths are relative
    os.environ[WORKER_ENV] = "1"
    from newtune.cli.common import setup_logging

    setup_logging(job["debug"])  # after Ray set RANK: ranks > 0 log warnings only
    from newtune.train.run import train

    try:
        train(job["loaded"])
    except NewtuneError as exc:  # the driver prints its paragraph; Ray's log keeps it short
        raise exc.with_traceback(None) from None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 has published the outputs; Ray tears the group down


def train_with_ray(loaded: Any, debug: bool = False) -> Path:
    """Run the training on Ray Train workers; return the output folder (rank 0 wrote it).

    Each worker gets the driver's validated config (`loaded`, pickled) and working directory.
    """
    check_launch()
    cfg = loaded.config
    ray, torch_trainer, scaling_config, run_config = import_ray()
    from newtune.train.distributed import pinned_deepspeed
    from newtune.train.preflight import check_output_dir

    loaded = pinned_deepspeed(loaded)  # a missing DeepSpeed JSON fails before Ray starts
    check_output_dir(cfg.output_dir)
    out = Path(cfg.output_dir).expanduser().resolve()
    local = not os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    if started:
        os.environ.update(WORKER_SETTINGS)  # a local cluster's workers inherit the environment
        ray.init(  # RAY_ADDRESS: that cluster; else a new local one (not one found running)
            address=None if not local else "local",
            include_dashboard=False,
            runtime_env={"env_vars": WORKER_SETTINGS},
        )
    try:
        scaling = scaling_kwargs(cfg, ray.cluster_resources().get("GPU", 0))
        if local:
            _check_room(ray, scaling)
        log.info(
            "Ray Train: %s workers (%s, resources per worker %s)",
            scaling["num_workers"],
            "GPU" if scaling["use_gpu"] else "CPU",
            scaling["resources_per_worker"] or "Ray's default",
        )
        job = {"cwd": os.getcwd(), "loaded": loaded, "debug": debug}
        trainer = torch_trainer(
            worker_loop,
            train_loop_config=job,
            scaling_config=scaling_config(**scaling),
            run_config=run_config(name=cfg.ray_run_name, storage_path=str(out)),
        )
        try:
            trainer.fit()
        except Exception as exc:
            found = user_error(exc)
            if found is not None:  # a worker's user error: its one paragraph, no traceback
                raise found from None
            raise
    finally:
        if started:
            ray.shutdown()
    return out
