"""Fine-tune a transformer on the emotion dataset.

``python -m training.train [experiment=quick|full] [key=value ...]`` is a thin
Hydra wrapper around :func:`train`, which tests call directly with a composed
config. Under ``torchrun --nproc_per_node=N`` the same entry point trains with
DDP on the gloo backend; only rank 0 writes files and logs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import random
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from training.batching import TokenizedSplit, bucketed_batches
from training.config import CONFIG_DIR
from training.data import LABELS, Example, load_split
from training.evaluate import predict
from training.metrics import classification_metrics
from training.plots import plot_confusion_matrix, plot_training_curves
from training.runtime import Runtime, describe_data, git_commit, setup_runtime, teardown_runtime
from training.tracking import Tracker

log = logging.getLogger(__name__)


def subset(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded random subset of at most ``limit`` examples (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(examples):
        return examples
    return random.Random(seed).sample(examples, limit)


def build_model(cfg: DictConfig):
    """Tokenizer and sequence-classification model with the dataset's label order in its config."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.pretrained)
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model.pretrained,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
        hidden_dropout_prob=cfg.model.dropout,
    )
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


def save_outputs(cfg: DictConfig, model, tokenizer, history: dict, metrics: dict, provenance: dict) -> None:
    """Model directory (safetensors, tokenizer, config), metrics JSON, history CSV and plots."""
    model_dir = Path(cfg.paths.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    # The tokenizer's model_max_length is the truncation length the handler reads.
    tokenizer.model_max_length = cfg.train.max_length
    tokenizer.save_pretrained(model_dir)
    (model_dir / "training_meta.json").write_text(json.dumps(provenance, indent=2) + "\n")

    metrics_dir = Path(cfg.paths.metrics_dir)
    (metrics_dir / "plots").mkdir(parents=True, exist_ok=True)
    (metrics_dir / "train.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (metrics_dir / "train_epochs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "accuracy", "macro_f1", "train_loss", "epoch_seconds"])
        writer.writeheader()
        writer.writerows(history["epochs"])
    plot_training_curves(history["steps"], history["epochs"], metrics_dir / "plots" / "training_curves.png")
    plot_confusion_matrix(metrics["confusion_matrix"], LABELS, metrics_dir / "plots" / "train_confusion_matrix.png")


def train(cfg: DictConfig) -> dict:
    """Fine-tune, evaluate on the validation split each epoch, save the model and metrics.

    Args:
        cfg: Composed training config (see ``training/conf``).

    Returns:
        Final validation metrics plus timing (``epoch_seconds``, ``train_seconds``).
    """
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
    from transformers import get_linear_schedule_with_warmup

    tcfg = cfg.train
    train_examples = subset(load_split(cfg.data.train_file), cfg.data.max_train_examples, cfg.seed)
    val_examples = subset(load_split(cfg.data.val_file), cfg.data.max_val_examples, cfg.seed)
    tokenizer, model = build_model(cfg)
    train_split = TokenizedSplit(train_examples, tokenizer, tcfg.max_length)
    val_split = TokenizedSplit(val_examples, tokenizer, tcfg.max_length)
    lengths = train_split.lengths()
    if runtime.is_main:
        log.info(
            "training %s on %d examples (validating on %d), %s, %d thread(s), world size %d",
            cfg.model.name,
            len(train_split),
            len(val_split),
            tcfg.precision,
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

    steps_per_epoch = len(epoch_batches(0))
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
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
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if runtime.distributed else model

    history: dict[str, list[dict]] = {"steps": [], "epochs": []}
    step = 0
    started = time.perf_counter()
    metrics: dict = {}
    with profiler_context(cfg, runtime) as prof:
        for epoch in range(1, tcfg.epochs + 1):
            wrapped.train()
            epoch_start = time.perf_counter()
            loss_sum, loss_count = 0.0, 0
            bar = tqdm(epoch_batches(epoch), desc=f"epoch {epoch}/{tcfg.epochs}", disable=not runtime.is_main)
            for indices in bar:
                batch = train_split.collate(indices)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tcfg.precision == "bf16"):
                    loss = wrapped(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_value = loss.item()
                loss_sum += loss_value
                loss_count += 1
                if prof is not None:
                    prof.step()
                if step % tcfg.log_every_n_steps == 0 or step == 1:
                    lr = scheduler.get_last_lr()[0]
                    history["steps"].append({"step": step, "loss": loss_value, "lr": lr})
                    tracker.log({"train/loss": loss_value, "train/lr": lr, "train/epoch": epoch}, step=step)
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
                if step >= total_steps:
                    break
            epoch_seconds = time.perf_counter() - epoch_start
            if runtime.is_main:
                predictions = predict(model, val_split, tcfg.eval_batch_size, tcfg.precision)
                metrics = classification_metrics(val_split.labels, predictions, LABELS)
                row = {
                    "epoch": epoch,
                    "accuracy": round(metrics["accuracy"], 5),
                    "macro_f1": round(metrics["macro_f1"], 5),
                    "train_loss": round(loss_sum / max(loss_count, 1), 5),
                    "epoch_seconds": round(epoch_seconds, 2),
                }
                history["epochs"].append(row)
                log.info(
                    "epoch %d: %.1f s, train loss %.4f, val accuracy %.4f, macro-F1 %.4f",
                    epoch,
                    epoch_seconds,
                    row["train_loss"],
                    row["accuracy"],
                    row["macro_f1"],
                )
                tracker.log(
                    {
                        "val/accuracy": metrics["accuracy"],
                        "val/macro_f1": metrics["macro_f1"],
                        "train/epoch_seconds": epoch_seconds,
                        "train/epoch_loss": row["train_loss"],
                    },
                    step=step,
                )
                tracker.log_confusion(metrics["confusion_matrix"], list(LABELS), step=step)
            if runtime.distributed:
                dist.barrier()
            if step >= total_steps:
                break
    if prof is not None:
        write_profile(prof, Path(tcfg.profile.out_dir))

    train_seconds = time.perf_counter() - started
    if not runtime.is_main:
        return {}
    metrics.update(
        epoch_seconds=[row["epoch_seconds"] for row in history["epochs"]],
        train_seconds=round(train_seconds, 2),
        steps=step,
        world_size=runtime.world_size,
        threads_per_process=torch.get_num_threads(),
    )
    provenance = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": git_commit(),
        "data_md5": describe_data([cfg.data.train_file, cfg.data.val_file]),
        "torch": torch.__version__,
        "max_length": tcfg.max_length,
    }
    save_outputs(cfg, model, tokenizer, history, metrics, provenance)
    tracker.summary(
        {
            "val/accuracy": metrics["accuracy"],
            "val/macro_f1": metrics["macro_f1"],
            "train_seconds": train_seconds,
            "git_commit": provenance["git_commit"],
            "data_md5": provenance["data_md5"],
        }
    )
    plots_dir = Path(cfg.paths.metrics_dir) / "plots"
    tracker.log_images(
        {
            "plots/training_curves": plots_dir / "training_curves.png",
            "plots/confusion_matrix": plots_dir / "train_confusion_matrix.png",
        }
    )
    if cfg.logger.log_model:
        tracker.log_files(
            "emotion-model",
            "model",
            Path(cfg.paths.model_dir),
            {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]},
        )
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
