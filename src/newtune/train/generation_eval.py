"""Generation metrics during eval (`do_causal_lm_eval`) and the prediction table (`eval_table_size`).

At each evaluation every eval row is split where its first trained token starts: the tokens
before are the prompt (the engine that renders inference prompts produced them), the first
trained span is the reference. The model answers each prompt greedily with inference's
`generate_answer`, and sacrebleu scores the answers against the references (corpus BLEU, chrF,
TER, as Axolotl's `evaluate`-based callback logs them). Each rank answers its share of the rows.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from newtune.config.schema.seed_training import DEFAULT_CAUSAL_LM_METRICS
from newtune.data.tokenize import IGNORE_INDEX
from newtune.errors import ConfigError, ModelError
from newtune.fileio import temp_name
from newtune.inference import GenerationOptions, generate_answer

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
COMET_MODEL = "Unbabel/wmt22-comet-da"
TABLE_DIR = "eval_predictions"


@dataclass(frozen=True)
class Prediction:
    """One eval row: the prompt, the reference completion and the model's answer."""

    prompt: str
    reference: str
    prediction: str


def split_row(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids): before the first trained token, and the first trained span."""
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if start is None or start == 0:
        return None  # nothing trained, or no prompt to answer
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return list(input_ids[:start]), list(input_ids[start:end])


def corpus_scores(
    predictions: list[str], references: list[str], metrics: list[str]
) -> dict[str, float]:
    """sacrebleu's corpus BLEU / chrF / TER of the answers, as `eval_<metric>`."""
    import sacrebleu

    refs = [references]
    scorers = {
        "sacrebleu": sacrebleu.corpus_bleu,
        "chrf": sacrebleu.corpus_chrf,
        "ter": sacrebleu.corpus_ter,
    }
    return {
        f"eval_{name}": float(scorers[name](predictions, refs).score)
        for name in metrics
        if name in scorers
    }


def comet_score(rows: list[Prediction]) -> float:
    """COMET's system score (Unbabel/wmt22-comet-da, downloaded from the hub)."""
    from comet import download_model, load_from_checkpoint

    try:
        path = download_model(COMET_MODEL)
    except Exception as exc:  # noqa: BLE001 - offline, no access: one user-facing error
        raise ModelError(
            f"`eval_causal_lm_metrics: [comet]` needs the COMET model {COMET_MODEL}, which could "
            f"not be downloaded ({type(exc).__name__}: {exc}); connect to the hub (HF_HUB_OFFLINE "
            "unset) or remove comet from eval_causal_lm_metrics"
        ) from exc
    model = load_from_checkpoint(path)
    data = [{"src": r.prompt, "mt": r.prediction, "ref": r.reference} for r in rows]
    return float(model.predict(data, batch_size=8, gpus=0, progress_bar=False).system_score)


def check_metrics(metrics: list[str]) -> None:
    """Refuse metrics whose packages are missing, before training starts."""
    needs = {"sacrebleu": "sacrebleu", "chrf": "sacrebleu", "ter": "sacrebleu", "comet": "comet"}
    for name in metrics:
        module = needs.get(name)
        if module and importlib.util.find_spec(module) is None:
            package = "unbabel-comet" if module == "comet" else "'newtune[eval]'"
            raise ConfigError(
                f"`eval_causal_lm_metrics: [{name}]` needs the {module} package, which is not "
                f"installed; run `pip install {package}` or remove {name} from the list"
            )
    if "comet" in metrics and os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise ConfigError(
            f"`eval_causal_lm_metrics: [comet]` downloads the COMET model {COMET_MODEL}, but "
            "HF_HUB_OFFLINE is set; unset it (or have the model in the hub cache) or remove comet"
        )


def write_table(folder: Path, step: int, rows: list[Prediction]) -> tuple[Path, Path]:
    """output_dir/eval_predictions/step-N.jsonl and .md (each written whole, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / f"step-{step}.jsonl"
    md = folder / f"step-{step}.md"
    lines = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rows)

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    table = [f"# Eval predictions at step {step}", "", "| prompt | reference | prediction |"]
    table += ["|---|---|---|"]
    table += [f"| {cell(r.prompt)} | {cell(r.reference)} | {cell(r.prediction)} |" for r in rows]
    for path, text in ((jsonl, lines), (md, "\n".join(table) + "\n")):
        tmp = temp_name(path)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return jsonl, md


class GenerationEvalCallback(TrainerCallback):
    """After each evaluation: generate answers, log sacrebleu metrics, write the table."""

    def __init__(self, trainer: Any, config: Any, tokenizer: Any) -> None:
        self.trainer, self.tokenizer = trainer, tokenizer
        self.metrics = (
            list(config.eval_causal_lm_metrics or DEFAULT_CAUSAL_LM_METRICS)
            if config.do_causal_lm_eval
            else []
        )
        self.table_size = int(config.eval_table_size or 0)
        self.options = GenerationOptions(
            max_new_tokens=config.eval_max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        )
        check_metrics(self.metrics)
        self._busy = False

    def rows(self) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, reference ids) of the eval rows this evaluation answers."""
        dataset = self.trainer.eval_dataset
        count = len(dataset) if self.metrics else min(self.table_size, len(dataset))
        out = []
        for i in range(count):
            split = split_row(dataset[i]["input_ids"], dataset[i]["labels"])
            if split is not None:
                out.append(split)
        return out

    def answer(self, rows: list[tuple[list[int], list[int]]]) -> list[Prediction]:
        """This rank's share of the rows answered (rank r takes rows r, r + W, ...)."""
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        mine = rows[trainer.args.process_index :: trainer.args.world_size]
        decode = self.tokenizer.decode
        try:
            out = [
                Prediction(
                    decode(prompt, skip_special_tokens=False),
                    decode(ref, skip_special_tokens=True).strip(),
                    generate_answer(model, self.tokenizer, prompt, self.options),
                )
                for prompt, ref in mine
            ]
        finally:
            model.train(was_training)
        return out

    def gather(self, mine: list[Prediction]) -> list[Prediction]:
        """Every rank's answers, in row order."""
        world = self.trainer.args.world_size
        if world == 1:
            return mine
        import torch.distributed as dist

        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, mine)
        total = sum(len(p) for p in parts)
        return [parts[i % world][i // world] for i in range(total)]

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
    ) -> Any:
        """Answer the eval prompts, log the metrics, and write the table."""
        if self._busy or self.trainer.eval_dataset is None:
            return control
        self._busy = True
        try:
            self._evaluate(state, metrics)
        finally:
            self._busy = False
        return control

    def _evaluate(self, state: Any, metrics: Any) -> None:
        rows = self.gather(self.answer(self.rows()))
        scores: dict[str, float] = {}
        if self.metrics:
            predictions = [r.prediction for r in rows]
            references = [r.reference for r in rows]
            scores = corpus_scores(predictions, references, self.metrics)
            if "comet" in self.metrics:
                scores["eval_comet"] = comet_score(rows)
            if metrics is not None:
                metrics.update(scores)  # evaluate() returns them (metric_for_best_model)
            for entry in reversed(state.log_history):  # the eval's own entry: train_results.json
                if "eval_loss" in entry and entry.get("step") == state.global_step:
                    entry.update(scores)
                    break
            self.trainer.log(scores)  # the trackers
        table = rows[: self.table_size]
        if table and self.trainer.is_world_process_zero():
            folder = Path(self.trainer.args.output_dir) / TABLE_DIR
            jsonl, _ = write_table(folder, state.global_step, table)
            log_to_trackers(self.trainer, table, state.global_step)
            log.info("eval predictions (%d rows) written to %s", len(table), jsonl)


def log_to_trackers(trainer: Any, rows: list[Prediction], step: int) -> None:
    """The table to the trackers that run: a wandb Table, an mlflow table, tensorboard text."""
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    columns = ["prompt", "reference", "prediction"]
    data = [[r.prompt, r.reference, r.prediction] for r in rows]
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, WandbCallback) and getattr(callback, "_wandb", None) is not None:
            run = callback._wandb.run
            if run is not None:
                run.log({"eval_predictions": callback._wandb.Table(columns=columns, data=data)})
        elif isinstance(callback, MLflowCallback) and getattr(callback, "_ml_flow", None):
            table = {c: [row[i] for row in data] for i, c in enumerate(columns)}
            callback._ml_flow.log_table(table, artifact_file=f"eval_predictions/step-{step}.json")
        elif isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            text = "\n".join(f"| {' | '.join(row)} |" for row in data)
            header = "| prompt | reference | prediction |\n|---|---|---|\n"
            callback.tb_writer.add_text("eval_predictions", header + text, step)
