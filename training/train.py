"""Fine-tune a transformer on the emotion dataset.

``python -m training.train [experiment=quick|full] [key=value ...]`` is a thin
Hydra wrapper around :func:`train`, which tests call directly with a composed
config. Under ``torchrun --nproc_per_node=N`` the same entry point trains with
DDP on the gloo backend; only rank 0 writes files and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm import tqdm

from training.augment import Noise, NoisySplit, training_split
from training.batching import TokenizedSplit, bucketed_batches
from training.config import CONFIG_DIR
from training.data import LABELS, Example, class_counts, load_split
from training.distill import Distiller, build_distiller
from training.evaluate import predict
from training.metrics import classification_metrics
from training.outputs import provenance, report_run, save_outputs
from training.runtime import Runtime, cpu, resolve_precision, setup_runtime, teardown_runtime
from training.tracking import Tracker

log = logging.getLogger(__name__)


def subset(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded random subset of at most ``limit`` examples (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(examples):
        return examples
    return random.Random(seed).sample(examples, limit)


# Settings that must be whole numbers of at least 1 (None: no limit, where the key allows it).
AT_LEAST_ONE = ("train.epochs", "train.batch_size", "train.eval_batch_size", "train.bucket_size_batches")
AT_LEAST_ONE_OR_NONE = ("train.max_steps", "data.max_train_examples", "data.max_val_examples")


def check_config(cfg: DictConfig) -> None:
    """Refuse settings no run can train with, before anything is loaded or written (a run with no
    optimizer step would otherwise save the untrained model over the last one).

    Raises:
        ValueError: A setting is out of its range; the message names its key.
    """

    def value(key: str):
        section, name = key.split(".")
        return cfg[section].get(name)

    for key in (*AT_LEAST_ONE, *AT_LEAST_ONE_OR_NONE):
        number = value(key)
        if number is None and key in AT_LEAST_ONE_OR_NONE:
            continue
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            allowed = "a whole number >= 1" + (" or null" if key in AT_LEAST_ONE_OR_NONE else "")
            raise ValueError(f"{key} must be {allowed}, not {number!r}")
    lr, length = value("train.lr"), value("train.max_length")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise ValueError(f"train.lr must be a number > 0, not {lr!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"train.max_length must be a whole number >= 2 (the special tokens), not {length!r}")
    Noise.from_config(cfg.get("augment"))  # raises on a rate outside [0, 1] or an unknown typo kind


def check_max_length(max_length: int, model) -> None:
    """Refuse a truncation length the model has no position embeddings for: the first longer text
    would fail mid-training, and the saved ``model_max_length`` would break the handler later.

    Raises:
        ValueError: ``max_length`` exceeds the model's ``max_position_embeddings``.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"train.max_length {max_length} exceeds the model's {limit} positions")


def build_model(cfg: DictConfig):
    """Tokenizer and sequence-classification model with the dataset's label order in its config
    and in its head's rows (a checkpoint's own head is reordered or replaced: ``training.heads``)."""
    from transformers import AutoTokenizer

    from training.heads import load_classifier

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.pretrained)
    model = load_classifier(cfg.model.pretrained, LABELS, hidden_dropout_prob=cfg.model.dropout)
    keep_layers = cfg.model.get("keep_layers")
    if keep_layers is not None:
        from training.pruning import keep_bottom_layers

        keep_bottom_layers(model, keep_layers)
    return tokenizer, model


def profiler_context(cfg: DictConfig, runtime: Runtime):
    """torch.profiler over a few steps when ``train.profile.enabled``, else a no-op context."""
    if not (cfg.train.profile.enabled and runtime.is_main):
        return contextlib.nullcontext(None)
    from torch.profiler import ProfilerActivity, profile, schedule

    return profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=0, warmup=2, active=cfg.train.profile.steps, repeat=1),
        record_shapes=True,
    )


def write_profile(prof, out_dir: Path) -> None:
    """Chrome trace plus the top operators by self CPU time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    (out_dir / "top_operators.txt").write_text(table + "\n")
    log.info("profile written to %s\n%s", out_dir, table)


@dataclass
class Fit:
    """What the epochs of one run share: the model (and its DDP wrapper), the optimizer and its
    schedule, the step count and the history the plots are drawn from."""

    model: Any
    wrapped: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    precision: str = "fp32"  # resolved: bf16 or fp32
    is_main: bool = True  # the DDP rank that shows progress, validates and writes
    distiller: Distiller | None = None  # a teacher's soft targets in the loss (training/distill.py)
    step: int = 0
    history: dict[str, list[dict]] = field(default_factory=lambda: {"steps": [], "epochs": []})

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps


def build_optimizer(model, tcfg: DictConfig, total_steps: int):
    """AdamW without weight decay on biases and LayerNorm weights, and a linear schedule with warm-up."""
    from transformers import get_linear_schedule_with_warmup

    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": tcfg.weight_decay,
        },
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=tcfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tcfg.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


def train_epoch(
    fit: Fit, split: TokenizedSplit, batches: list[list[int]], epoch: int, cfg: DictConfig, tracker: Tracker, prof
) -> float:
    """One pass over ``batches`` (or up to the run's last step); returns the mean training loss."""
    tcfg = cfg.train
    fit.wrapped.train()
    loss_sum, loss_count = 0.0, 0
    bar = tqdm(batches, desc=f"epoch {epoch}/{tcfg.epochs}", disable=not fit.is_main)
    for indices in bar:
        batch = split.collate(indices)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fit.precision == "bf16"):
            output = fit.wrapped(**batch)
        if fit.distiller is None:
            loss = output.loss
        else:
            loss = fit.distiller.loss(output.logits, indices, batch["labels"], fit.step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fit.model.parameters(), tcfg.grad_clip)
        fit.optimizer.step()
        fit.scheduler.step()
        fit.optimizer.zero_grad(set_to_none=True)
        fit.step += 1
        loss_value = loss.item()
        loss_sum += loss_value
        loss_count += 1
        if prof is not None:
            prof.step()
        if fit.step % tcfg.log_every_n_steps == 0 or fit.step == 1:
            lr = fit.scheduler.get_last_lr()[0]
            fit.history["steps"].append({"step": fit.step, "loss": loss_value, "lr": lr})
            logged = {"train/loss": loss_value, "train/lr": lr, "train/epoch": epoch}
            if fit.distiller is not None:
                logged["train/soft_target_weight"] = fit.distiller.weight(fit.step - 1)
            tracker.log(logged, step=fit.step)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
        if fit.done:
            break
    return loss_sum / max(loss_count, 1)


def validate(fit: Fit, split: TokenizedSplit, epoch: int, row: dict, cfg: DictConfig, tracker: Tracker) -> dict:
    """Validation metrics after an epoch, appended to the history (``row`` holds the epoch's
    training figures) and logged."""
    predictions = predict(fit.model, split, cfg.train.eval_batch_size, fit.precision)
    metrics = classification_metrics(split.labels, predictions, LABELS)
    row = {"epoch": epoch, "accuracy": round(metrics["accuracy"], 5), "macro_f1": round(metrics["macro_f1"], 5), **row}
    fit.history["epochs"].append(row)
    log.info(
        "epoch %d: %.1f s, train loss %.4f, val accuracy %.4f, macro-F1 %.4f",
        epoch,
        row["epoch_seconds"],
        row["train_loss"],
        row["accuracy"],
        row["macro_f1"],
    )
    tracker.log(
        {
            "val/accuracy": metrics["accuracy"],
            "val/macro_f1": metrics["macro_f1"],
            "train/epoch_seconds": row["epoch_seconds"],
            "train/epoch_loss": row["train_loss"],
        },
        step=fit.step,
    )
    tracker.log_confusion(metrics["confusion_matrix"], list(LABELS), step=fit.step)
    return metrics


def train(cfg: DictConfig) -> dict:
    """Fine-tune, evaluate on the validation split each epoch, save the model and metrics.

    Args:
        cfg: Composed training config (see ``training/conf``).

    Returns:
        Final validation metrics plus timing (``epoch_seconds``, ``train_seconds``).

    Raises:
        ValueError: A setting no run can train with (``check_config``, ``check_max_length``).
    """
    check_config(cfg)
    runtime = setup_runtime(cfg.seed, cfg.train.num_threads)
    tracker = Tracker(cfg, active=runtime.is_main)
    failed = True
    try:
        metrics = _fit(cfg, runtime, tracker)
        failed = False
        return metrics
    finally:
        tracker.finish(failed=failed)
        teardown_runtime(runtime)


def _fit(cfg: DictConfig, runtime: Runtime, tracker: Tracker) -> dict:
    tcfg = cfg.train
    precision = resolve_precision(tcfg.precision)
    train_examples = subset(load_split(cfg.data.train_file), cfg.data.max_train_examples, cfg.seed)
    val_examples = subset(load_split(cfg.data.val_file), cfg.data.max_val_examples, cfg.seed)
    tokenizer, model = build_model(cfg)
    check_max_length(tcfg.max_length, model)
    train_split = training_split(train_examples, tokenizer, tcfg.max_length, cfg.get("augment"), cfg.seed)
    val_split = TokenizedSplit(val_examples, tokenizer, tcfg.max_length)
    lengths = train_split.lengths()
    if runtime.is_main:
        log.info("%s", cpu().line())
        for name, examples in (("training", train_examples), ("validation", val_examples)):
            missing = [label for label, count in class_counts(examples).items() if count == 0]
            if missing:
                log.warning("the %s examples hold no %s example", name, " or ".join(repr(m) for m in missing))
        log.info(
            "training %s on %d examples (validating on %d), %s, %d thread(s), world size %d",
            cfg.model.name,
            len(train_split),
            len(val_split),
            precision,
            torch.get_num_threads(),
            runtime.world_size,
        )

    def epoch_batches(epoch: int) -> list[list[int]]:
        return bucketed_batches(
            lengths,
            tcfg.batch_size,
            cfg.seed,
            epoch,
            tcfg.bucket_size_batches,
            bucket=tcfg.length_buckets,
            rank=runtime.rank,
            world_size=runtime.world_size,
        )

    batches_per_epoch = len(epoch_batches(0))
    if batches_per_epoch < 1:  # a world of more ranks than batches: no rank would make a step
        raise ValueError(
            f"{len(train_split)} training examples make no batch of {tcfg.batch_size} for each of "
            f"{runtime.world_size} rank(s): no optimizer step; lower train.batch_size or use more examples"
        )
    total_steps = batches_per_epoch * tcfg.epochs
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    optimizer, scheduler = build_optimizer(model, tcfg, total_steps)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if runtime.distributed else model
    distiller = build_distiller(cfg.distill, train_examples, total_steps)
    fit = Fit(model, wrapped, optimizer, scheduler, total_steps, precision, runtime.is_main, distiller=distiller)
    if distiller is not None and runtime.is_main:
        log.info("distilling from teacher %s: %s", cfg.distill.teacher, distiller.describe())
    if isinstance(train_split, NoisySplit) and runtime.is_main:
        log.info("training texts augmented on the fly: %s", train_split.noise)

    started = time.perf_counter()
    metrics: dict = {}
    with profiler_context(cfg, runtime) as prof:
        for epoch in range(1, tcfg.epochs + 1):
            epoch_start = time.perf_counter()
            if isinstance(train_split, NoisySplit):
                train_split.set_epoch(epoch)
            loss = train_epoch(fit, train_split, epoch_batches(epoch), epoch, cfg, tracker, prof)
            epoch_seconds = time.perf_counter() - epoch_start
            if runtime.is_main:
                row = {"train_loss": round(loss, 5), "epoch_seconds": round(epoch_seconds, 2)}
                metrics = validate(fit, val_split, epoch, row, cfg, tracker)
            if runtime.distributed:
                dist.barrier()
            if fit.done:
                break
    if prof is not None:
        write_profile(prof, Path(tcfg.profile.out_dir))

    train_seconds = time.perf_counter() - started
    if not runtime.is_main:
        return {}
    metrics.update(
        epoch_seconds=[row["epoch_seconds"] for row in fit.history["epochs"]],
        train_seconds=round(train_seconds, 2),
        steps=fit.step,
        precision=precision,
        world_size=runtime.world_size,
        threads_per_process=torch.get_num_threads(),
    )
    if distiller is not None:
        metrics["distill"] = {"teacher": str(cfg.distill.teacher), **distiller.describe()}
    if isinstance(train_split, NoisySplit):
        metrics["augment"] = dataclasses.asdict(train_split.noise)
    made_by = provenance(cfg)
    save_outputs(cfg, model, tokenizer, fit.history, metrics, made_by)
    report_run(cfg, tracker, metrics, made_by, train_seconds)
    log.info("training finished in %.1f s; model in %s", train_seconds, cfg.paths.model_dir)
    return metrics


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:  # pragma: no cover - thin CLI wrapper
    """CLI entry point; returns the optimised metric for Hydra sweepers."""
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    if name and metrics:
        return float(metrics[name.split("/", 1)[-1]])
    return None


if __name__ == "__main__":
    main()
