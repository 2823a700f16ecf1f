"""Online RL on TRL's GRPOTrainer: the `trl:` block as a GRPOConfig, rows from user transforms,
and the run (tokenizer, model with its adapter, trainer, saved outputs) with newtune's pieces.

An online method samples completions inside the training step, so it trains on raw rows (a
`prompt` and what its reward reads), not on tokenized rows: `OnlineMethod.train` replaces the
prepare/collate path of `train.run` and reuses its model loading, callbacks, trackers and
output writing. Generation runs the policy through transformers `generate`, or a vLLM server
(`trl.use_vllm`, server mode: `trl vllm-serve` must be running) or in-process vLLM (colocate).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from typing import Any

from newtune.config.schema.online import VLLM_COLOCATE, trl_block
from newtune.errors import ConfigError, DataError, ModelError
from newtune.train.methods.base import Method

log = logging.getLogger(__name__)

# trl: key -> GRPOConfig field, for keys passed through when set
TRL_FIELDS = {
    "beta": "beta",
    "max_completion_length": "max_completion_length",
    "num_generations": "num_generations",
    "generation_batch_size": "generation_batch_size",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "generation_kwargs": "generation_kwargs",
    "chat_template_kwargs": "chat_template_kwargs",
    "vllm_server_timeout": "vllm_server_timeout",
    "vllm_guided_decoding_regex": "vllm_structured_outputs_regex",
    "vllm_enable_sleep_mode": "vllm_enable_sleep_mode",
    "reward_weights": "reward_weights",
    "multi_objective_aggregation": "multi_objective_aggregation",
    "scale_rewards": "scale_rewards",
    "loss_type": "loss_type",
    "epsilon": "epsilon",
    "epsilon_high": "epsilon_high",
    "num_iterations": "num_iterations",
    "importance_sampling_level": "importance_sampling_level",
    "mask_truncated_completions": "mask_truncated_completions",
    "log_completions": "log_completions",
    "num_completions_to_print": "num_completions_to_print",
    "vllm_importance_sampling_correction": "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode": "vllm_importance_sampling_mode",
    "vllm_importance_sampling_cap": "vllm_importance_sampling_clip_max",
    "off_policy_mask_threshold": "off_policy_mask_threshold",
    "use_bias_correction_kl": "use_bias_correction_kl",
}
# keys of newtune's Trainer features that a GRPOTrainer does not have
TRAINER_ONLY = (
    "sample_packing",
    "relora",
    "loraplus_lr_ratio",
    "lisa_n_layers",
    "do_causal_lm_eval",
    "eval_table_size",
    "neftune_noise_alpha",
)


def vllm_server_help(config: Any) -> str:
    """The command that starts the vLLM server a server-mode config connects to."""
    trl = trl_block(config)
    return (
        "`newtune vllm-serve <this config>` (TRL's server with the `vllm:` block's settings; "
        f"by hand: `trl vllm-serve --model {config.base_model} --host {trl.vllm_server_host} "
        f"--port {trl.vllm_server_port}`), on other GPUs than training (e.g. "
        "CUDA_VISIBLE_DEVICES=1)"
    )


def check_vllm(config: Any) -> None:
    """`trl.use_vllm: true` needs the vllm package here (TRL's client imports it too)."""
    trl = trl_block(config)
    if not trl.use_vllm or importlib.util.find_spec("vllm") is not None:
        return
    mode = trl.vllm_mode or "server"
    where = (
        f"a vLLM server must be running, started with {vllm_server_help(config)}, and TRL's "
        "client imports vllm in the training process too"
        if mode == "server"
        else "colocate mode runs vLLM inside the training process"
    )
    raise ConfigError(
        f"`trl.use_vllm: true` (vllm_mode {mode}) generates completions with vLLM, but the "
        f"vllm package is not installed here: {where}. Install it (`pip install vllm`, CUDA "
        "only), or set `trl.use_vllm: false` to generate with the policy's transformers "
        "`generate` (slower, no extra process)."
    )


def grpo_kwargs(config: Any) -> dict[str, Any]:
    """GRPOConfig fields from the `trl:` (and, in colocate mode, `vllm:`) blocks."""
    trl = trl_block(config)
    kwargs: dict[str, Any] = {}
    for key, field in TRL_FIELDS.items():
        value = getattr(trl, key)
        if value is not None:
            kwargs[field] = value
    if not trl.use_vllm and "stop_token_ids" in (trl.generation_kwargs or {}):
        # vLLM's SamplingParams key; transformers generation gets them as end tokens instead
        rest = {k: v for k, v in trl.generation_kwargs.items() if k != "stop_token_ids"}
        kwargs["generation_kwargs"] = rest or None
    rl_beta = getattr(config, "rl_beta", None)
    if trl.beta is None and rl_beta is not None and getattr(config, "rl", None) != "ebft":
        kwargs["beta"] = rl_beta  # as Axolotl: trl.beta, else rl_beta
    if getattr(config, "rl", None) == "gdpo":  # GDPO: each reward normalised, then summed
        kwargs.setdefault("multi_objective_aggregation", "normalize_then_sum")
    if trl.sync_ref_model:
        kwargs["sync_ref_model"] = True
        kwargs["ref_model_mixup_alpha"] = trl.ref_model_mixup_alpha
        kwargs["ref_model_sync_steps"] = trl.ref_model_sync_steps
    if trl.use_vllm:
        kwargs["use_vllm"] = True
        kwargs["vllm_mode"] = trl.vllm_mode or "server"  # Axolotl's default
        kwargs["vllm_server_host"] = trl.vllm_server_host or "0.0.0.0"  # noqa: S104
        kwargs["vllm_server_port"] = trl.vllm_server_port or 8000
        vllm = getattr(config, "vllm", None)
        if kwargs["vllm_mode"] == "colocate" and vllm is not None:
            for key, field in VLLM_COLOCATE.items():
                if getattr(vllm, key) is not None:
                    kwargs[field] = getattr(vllm, key)
    return kwargs


def grpo_config(config: Any, plan: Any, has_eval: bool, steps_per_epoch: int) -> Any:
    """TRL's GRPOConfig: newtune's TrainingArguments table plus the `trl:` block."""
    from trl import GRPOConfig

    from newtune.train.args import training_kwargs

    kwargs = training_kwargs(config, plan, has_eval, steps_per_epoch)
    kwargs["gradient_checkpointing"] = bool(config.gradient_checkpointing)
    if config.gradient_checkpointing:
        kwargs["gradient_checkpointing_kwargs"] = {
            "use_reentrant": False,
            **(config.gradient_checkpointing_kwargs or {}),
        }
    kwargs.update(grpo_kwargs(config))
    try:
        return GRPOConfig(**kwargs)
    except ValueError as exc:
        raise ConfigError(
            f"TRL's GRPOTrainer refuses these settings: {str(exc).splitlines()[0]} "
            "(micro_batch_size x gradient_accumulation_steps x GPUs is the number of "
            "completions per step; it must be a multiple of `trl.num_generations`)."
        ) from exc


# -- rows from user transforms ---------------------------------------------------------------


def _config_folder(source: str | None) -> Path | None:
    if not source or source.startswith(("http://", "https://")):
        return None
    folder = Path(source).expanduser().resolve().parent
    return folder if folder.is_dir() else None


def load_transform(type_name: str, where: str, source: str | None) -> Any:
    """The function `module.function` names; the module is imported from the Python path or,
    failing that, from the config's folder (where Axolotl's examples keep theirs)."""
    from newtune.trust import check_code_allowed

    module_name, _, attr = type_name.rpartition(".")
    check_code_allowed(f"the dataset transform `{type_name}`")
    folder = _config_folder(source)
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None and folder is not None and "." not in module_name:
        candidate = folder / f"{module_name}.py"
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location(module_name, candidate)
    if spec is None or spec.loader is None:
        looked = f" and {folder}" if folder is not None else ""
        raise DataError(
            f"`{where}.type: {type_name}`: no module `{module_name}` on the Python path{looked}. "
            f"Put `{module_name.replace('.', '/')}.py` (defining `{attr}(cfg, **kwargs)`, which "
            "returns a row function) beside the config or on PYTHONPATH."
        )
    try:
        if module_name in sys.modules:
            module = sys.modules[module_name]
        elif spec.origin and Path(spec.origin).parent == folder:
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # user code can fail in any way; name it
        sys.modules.pop(module_name, None)
        raise DataError(f"`{where}.type: {type_name}`: importing it failed: {exc!r}") from exc
    func = getattr(module, attr, None)
    if not callable(func):
        raise DataError(f"`{where}.type: {type_name}`: module `{module_name}` has no `{attr}`.")
    return func


def _accepts(func: Any, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def transformed_rows(
    entry: Any, index: int, config: Any, source: str | None, tokenizer: Any, key: str = "datasets"
) -> Any:
    """One dataset entry's rows through its transform, Axolotl's RL transform convention:
    `transform(cfg, dataset_idx=i)` returns `fn` or `(fn, {"remove_columns": [...]})`, and
    `fn(row, tokenizer=None)` returns the new row."""
    from newtune.data.sources import load_rows

    where = f"{key}[{index}]"
    transform = load_transform(str(entry.type), where, source)
    try:
        made = (
            transform(config, dataset_idx=index)
            if _accepts(transform, "dataset_idx")
            else (transform(config))
        )
    except Exception as exc:  # user code
        raise DataError(f"`{where}.type: {entry.type}`: calling it failed: {exc!r}") from exc
    fn, options = made if isinstance(made, tuple) else (made, {})
    if not callable(fn):
        raise DataError(
            f"`{where}.type: {entry.type}` returned {type(fn).__name__}, not a row function"
        )
    rows = load_rows(entry, index, key)
    remove = (options or {}).get("remove_columns")
    if remove == "__all__":
        remove = list(rows.column_names)
    remove = [c for c in remove or [] if c in rows.column_names]
    fn_kwargs = {"tokenizer": tokenizer} if _accepts(fn, "tokenizer") else {}
    try:
        return rows.map(fn, fn_kwargs=fn_kwargs, remove_columns=remove or None)
    except Exception as exc:  # user code, per row
        raise DataError(
            f"`{where}.type: {entry.type}`: the row function failed on {entry.path}: {exc!r}"
        ) from exc


def online_data(config: Any, source: str | None, tokenizer: Any, columns: tuple[str, ...]) -> Any:
    """Train (and test) rows of every dataset entry, each with `columns` (DataError otherwise)."""
    import datasets

    parts = []
    for i, entry in enumerate(config.datasets or []):
        rows = transformed_rows(entry, i, config, source, tokenizer)
        missing = [c for c in columns if c not in rows.column_names]
        if missing:
            raise DataError(
                f"`datasets[{i}].type: {entry.type}` gives rows with the columns "
                f"{', '.join(rows.column_names)}, but `{method_label(config)}` needs "
                f"{', '.join(columns)} (missing {', '.join(missing)}); make its row function "
                "return them."
            )
        parts.append(rows)
    if not parts:
        raise DataError(f"`{method_label(config)}` needs `datasets`; none are set.")
    train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(train) == 0:
        raise DataError("the datasets give no rows to train on")
    out = {"train": train}
    if config.test_datasets:
        tests = [
            transformed_rows(e, i, config, source, tokenizer, "test_datasets")
            for i, e in enumerate(config.test_datasets)
        ]
        out["test"] = datasets.concatenate_datasets(tests) if len(tests) > 1 else tests[0]
    elif config.val_set_size:
        split = train.train_test_split(test_size=config.val_set_size, seed=config.seed)
        out = {"train": split["train"], "test": split["test"]}
    return datasets.DatasetDict(out)


def method_label(config: Any) -> str:
    """`rl: <value>` as the config set it."""
    return f"rl: {getattr(config, 'rl', None)}"


# -- the method --------------------------------------------------------------------------------


class OnlineMethod(Method):
    """A method trained on TRL's GRPOTrainer; subclasses give the rewards and trainer class."""

    name = "grpo"
    columns: tuple[str, ...] = ("prompt",)
    trains_itself = True  # train.run hands the run to `train`
    online = True  # evaluated by generating (train's eval), not by `newtune evaluate`

    def __init__(self, config: Any) -> None:
        self.config = config
        self.rl = getattr(config, "rl", None)
        self.trl = trl_block(config)
        check_vllm(config)
        given = [k for k in TRAINER_ONLY if getattr(config, k, None)]
        from newtune.train.args import schedule_for

        if schedule_for(config) is not None:
            given.append(
                "lr_scheduler (one_cycle / lr_quadratic_warmup / cosine_constant_lr_ratio)"
            )
        if given:
            raise ConfigError(
                f"`{self.describe()}` trains with TRL's GRPOTrainer, which has no "
                f"{', '.join(f'`{k}`' for k in given)} (newtune's own Trainer features); remove "
                "them for this method."
            )

    def describe(self) -> str:
        """`rl: <value>` as the config set it."""
        return f"rl: {self.rl}"

    def check_data(self, data: Any) -> None:
        """Rows are checked as they are read (`online_data`)."""

    def check_rows(self, data: Any) -> None:
        """Refuse row columns this method would not read (none by default)."""

    def reward_funcs(self) -> list[Any]:
        """TRL reward functions (subclasses)."""
        raise NotImplementedError

    def trainer_class(self) -> type:
        """The GRPOTrainer subclass to run."""
        return NewtuneGRPOTrainer()

    def train(self, loaded: Any, plan: Any, checkpoint: str | None) -> Path:
        """Read rows, build the model and GRPOTrainer, train, and save the outputs."""
        import math

        from newtune.data.prepare import PreparedData
        from newtune.models.tokenizer import load_tokenizer
        from newtune.train.callbacks import build_callbacks
        from newtune.train.report import tracker_environment
        from newtune.train.run import finish_run, train_and_evaluate, training_model

        config = loaded.config
        tokenizer, new_ids = load_tokenizer(config)
        data = online_data(config, loaded.source, tokenizer, self.columns)
        self.check_rows(data)
        rows = {name: len(ds) for name, ds in data.items()}
        log.info("%s: %s prompts to train on", self.describe(), rows["train"])
        completions = rows["train"] * (self.trl.num_generations or 8)  # TRL's default G
        batches = math.ceil(completions / (config.micro_batch_size * plan.world_size))
        steps = max(1, math.ceil(batches / plan.gradient_accumulation_steps))
        args = grpo_config(config, plan, "test" in data, steps)  # its errors: before the model
        model = training_model(config, plan, tokenizer, new_ids)
        callbacks = build_callbacks(config)
        with tracker_environment(config):
            trainer = self.build_trainer(model, args, data, tokenizer, callbacks)
            metrics = train_and_evaluate(trainer, callbacks, config, checkpoint)
        stats = {"rows": rows, "training_method": self.describe()}
        prepared = PreparedData(Path(config.output_dir), data, stats, reused=False)
        return finish_run(trainer, tokenizer, loaded, prepared, metrics)

    def build_trainer(
        self, model: Any, args: Any, data: Any, tokenizer: Any, callbacks: list[Any]
    ) -> Any:
        """The GRPOTrainer of this method; a vLLM server that does not answer is a ModelError."""
        cls = self.trainer_class()
        try:
            return cls(
                model=model,
                reward_funcs=self.reward_funcs(),
                args=args,
                train_dataset=data["train"],
                eval_dataset=data.get("test"),
                processing_class=tokenizer,
                callbacks=callbacks,
                method=self,
            )
        except ConnectionError as exc:
            raise ModelError(
                f"`trl.use_vllm: true`: no vLLM server answered at "
                f"{args.vllm_server_host}:{args.vllm_server_port} within "
                f"{args.vllm_server_timeout:g} s ({exc}). Start it first with "
                f"{vllm_server_help(self.config)}, or set `trl.use_vllm: false`."
            ) from exc


class GRPOMethod(OnlineMethod):
    """`rl: grpo` / `rl: gdpo`: TRL's GRPOTrainer with the config's `trl.reward_funcs`."""

    name = "grpo"

    def __init__(self, config: Any, source: str | None = None) -> None:
        super().__init__(config)
        self.source = source

    def train(self, loaded: Any, plan: Any, checkpoint: str | None) -> Path:
        """As OnlineMethod.train; reward modules are also looked up beside the config."""
        self.source = loaded.source
        return super().train(loaded, plan, checkpoint)

    def reward_funcs(self) -> list[Any]:
        """Each `trl.reward_funcs` entry: a function `module.function`, else a reward model
        path or hub id (TRL loads it as a sequence classifier)."""
        funcs = []
        for i, name in enumerate(self.trl.reward_funcs or []):
            module = name.rpartition(".")[0]
            folder = _config_folder(self.source)
            local = folder is not None and (folder / f"{module}.py").is_file()
            try:
                found = bool(module) and importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if found or local:
                func = load_transform(name, f"trl.reward_funcs[{i}]", self.source)
                if len(inspect.signature(func).parameters) < 2:
                    raise ConfigError(
                        f"`trl.reward_funcs[{i}]: {name}` must take (prompts, completions, "
                        "**kwargs) and return one float per completion."
                    )
                funcs.append(func)
            else:  # a reward model (local folder or hub id), as Axolotl reads it
                funcs.append(name)
        return funcs


def NewtuneGRPOTrainer() -> type:  # noqa: N802 - a class factory (trl is imported lazily)
    """TRL's GRPOTrainer that keeps the method and logs its metrics (imported on use)."""
    from trl import GRPOTrainer

    class _Trainer(GRPOTrainer):
        """GRPOTrainer with the method that built it."""

        def __init__(self, *args: Any, method: Any, **kwargs: Any) -> None:
            self.method = method
            super().__init__(*args, **kwargs)
            add_stop_tokens(self, method.trl)

    return _Trainer


def stop_token_ids(trl: Any) -> list[int]:
    """`trl.generation_kwargs.stop_token_ids` (vLLM's name), as a list."""
    ids = (trl.generation_kwargs or {}).get("stop_token_ids") or []
    return [int(i) for i in ([ids] if isinstance(ids, int) else ids)]


def add_stop_tokens(trainer: Any, trl: Any) -> None:
    """transformers generation: `stop_token_ids` end a completion as EOS does (vLLM reads them
    itself), both when sampling and when TRL masks what follows the first end token."""
    stops = [i for i in stop_token_ids(trl) if i not in trainer.eos_token_ids]
    if trl.use_vllm or not stops:
        return
    trainer.eos_token_ids = [*trainer.eos_token_ids, *stops]
    trainer.generation_config.eos_token_id = list(trainer.eos_token_ids)
    trainer.generation_kwargs["eos_token_id"] = list(trainer.eos_token_ids)
