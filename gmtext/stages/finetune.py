"""Fine-tune + evaluate: a training set (synthetic, real, prompted, DP-SGD on real, or none /
few-shot in context) → fine-tuned model → metrics.json on dataset.eval_split.

The learning rate is chosen on the dev split (a hash bucket of the train split, disjoint
from every training sample) when `finetune.lrs` lists several; the eval split is only
ever used for the final numbers. `metrics.json` says which split each number is from.
Re-running with the same config in the same run dir returns the stored metrics.

Under `accelerate launch` (N processes, data-parallel) every rank runs this function:
the main process alone takes the run lock and writes metrics.json, metrics.jsonl,
prompted.jsonl and the W&B run; the other ranks train and evaluate their shares and
write nothing (gmtext/finetune/distributed.py).
"""

from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..artifacts import ConfigChanged, check_resume, read_json, write_json
from ..config import build
from ..data import carve_summary, dev_examples
from ..finetune.distributed import broadcast, get_accelerator, main_process_lock
from ..finetune.evaluate import evaluate, fewshot_context
from ..finetune.sources import SourceContext, TrainingSet
from ..models import check_fits_context
from ..privacy.ledger import Ledger, LedgerEntry, compose_records, split_id
from ..runtime import build_task, dataset_split, load_generator_model, start, synthetic_artifact, training_source
from ..tracking import artifact_name, make_tracker

METRICS_FILE = "metrics.json"


def eval_subset(examples, limit: int):
    """A fixed random subset (seed 0, independent of the run seed, so every run of a table
    sees the same examples), in file order. limit <= 0 keeps everything."""
    if limit <= 0 or limit >= len(examples):
        return list(examples)
    keep = set(random.Random(0).sample(range(len(examples)), limit))
    return [e for i, e in enumerate(examples) if i in keep]


def model_privacy(cfg: DictConfig, source, n_dev: int, fit_extra: dict | None = None) -> dict | None:
    """The ledger of everything the fine-tuned model depends on that touched the private train
    split: what the training source read of it (a synthetic set's own ledger, real examples or
    demonstrations, DP-SGD's steps) and a dev set carved from the train split (non-private: it
    picks the lr and is published as dev_accuracy). None: a synthetic set of unknown origin.
    No entry at all (zero-shot, prompted): ε = 0."""
    split = split_id(cfg.dataset, cfg.dataset.train_split)
    parts = source.privacy_parts(split, fit_extra)
    if parts is None:
        return None
    if n_dev:
        dev = LedgerEntry(
            "real_dev_set",
            "non_private",
            split,
            records=f"{n_dev} records of the dev hash bucket",
            note="picks the learning rate and is published as dev_accuracy",
        )
        parts = [*parts, {"epsilon": math.inf, "delta": 0.0, "ledger": Ledger(0.0, [dev])}]
    return compose_records(parts) if parts else {"epsilon": 0.0, "delta": 0.0, **Ledger().to_dict()}


def _learning_rates(cfg: DictConfig, source) -> list[float]:
    """finetune.lrs (several: chosen on the dev split), else finetuner.lr; refused settings first."""
    lrs = [float(x) for x in cfg.finetune.lrs] or [float(cfg.finetuner.lr)]
    source.check(lrs, 1)
    if len(lrs) > 1 and cfg.finetune.dev_size <= 0:
        raise ValueError(
            f"finetune.lrs={lrs}: choosing among several learning rates needs a dev set (finetune.dev_size > 0, "
            "real examples: the ledger then reports epsilon = inf); give one lr (finetuner.lr) instead"
        )
    return lrs


def _stored_metrics(acc, main: bool, done: Path, config: dict) -> dict | None:
    """metrics.json when it was made with the same config (every rank gets it); another config is refused."""
    prev = None
    if main and done.exists():
        prev = read_json(done)
        try:
            check_resume(done.parent, "finetune", config, stored=prev.get("config") or {})
        except ConfigChanged as e:
            prev = {"_refused": str(e)}
    prev = broadcast(acc, prev)  # every rank returns, or is refused, together
    if prev is not None and "_refused" in prev:
        raise ConfigChanged(prev["_refused"])
    return prev


def run_finetune(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Fine-tune and evaluate into run_dir; returns (and writes) the metrics dict."""
    run_dir = Path(run_dir)
    source = training_source(cfg)
    lrs = _learning_rates(cfg, source)
    config = OmegaConf.to_container(cfg, resolve=True)
    acc = get_accelerator()
    main = acc.is_main_process
    source.check(lrs, acc.num_processes)
    with main_process_lock(acc, run_dir, "finetune"):
        prev = _stored_metrics(acc, main, run_dir / METRICS_FILE, config)
        if prev is not None:
            return prev
        done = run_dir / METRICS_FILE
        # before the model: a failure in loading, training or evaluating ends the tracker's run as failed
        tracker = (
            make_tracker(cfg.logger, run_dir, "finetune", config, private=source.private_fit) if main else NullTracker()
        )
        with tracker:
            published = source.published_input()
            if published is not None:  # the set it trains on: linked to the run that wrote it
                tracker.use_artifact(*synthetic_artifact(cfg, published))
            t0 = time.perf_counter()
            start(cfg)
            lm = load_generator_model(cfg)
            if acc.num_processes > 1:
                lm.model.to(acc.device)  # one GPU per rank (accelerate's choice); one process keeps model.device
            task = build_task(cfg, lm.tokenizer)
            check_fits_context(
                lm.model,
                "finetuner.max_text_tokens",
                cfg.finetuner.max_text_tokens,
                len(task.prefix_ids) + len(task.suffix_ids),
            )
            ds = cfg.dataset
            eval_all = dataset_split(ds, ds.eval_split).examples  # dataset.carve: carved out of the train file
            eval_exs = eval_subset(eval_all, cfg.finetune.eval_limit)
            train_split = dataset_split(ds, ds.train_split, every_class=not source.private_fit)
            dev = dev_examples(train_split, cfg.finetune.dev_size) if cfg.finetune.dev_size > 0 else []
            data = source.load(
                SourceContext(
                    lm, task, train_split, cfg.seed, list(ds.label_descriptions), acc, bool(cfg.progress) and main
                )
            )
            metrics = _train_and_evaluate(cfg, lm, task, source, data, eval_exs, dev, lrs, tracker, acc)
            if main:
                source.write_outputs(run_dir, task, data)
            out = _metrics_record(cfg, lm, task, source, data, metrics, eval_exs, len(eval_all), dev, acc.num_processes)
            if not source.private_fit:  # DP-SGD's run time depends on its private Poisson batches
                out["wall_seconds"] = time.perf_counter() - t0
            tracker.summary(
                {
                    k: v
                    for k, v in out.items()
                    if (isinstance(v, (int, float)) and not isinstance(v, bool))
                    or k in ("per_class_accuracy", "confusion")
                }
            )
            tracker.table(
                "confusion",
                ["true", *(f"predicted {n}" for n in task.label_names)],  # rows: true class
                [[n, *row] for n, row in zip(task.label_names, out["confusion"])],
            )
            if main:
                write_json(done, {**out, "config": config})
                tracker.commit()
                tracker.log_artifact(
                    artifact_name("metrics", ds.name),
                    "metrics",
                    {METRICS_FILE: done},
                    {"accuracy": out["accuracy"], "epsilon": out["epsilon"], "train_source": source.name},
                )
    return out


def _metrics_record(
    cfg, lm, task, source, data: TrainingSet, metrics: dict, eval_exs, n_eval_all: int, dev, num_processes: int
) -> dict:
    """metrics.json: the numbers, the split each is from, and the model's privacy ledger."""
    ds = cfg.dataset
    privacy = model_privacy(cfg, source, len(dev), metrics.get("dp"))
    used = data.demos or data.examples
    carve = carve_summary(ds, n_eval_all)
    split_name = (f"{ds.train_split}[carved eval]" if carve else f"{ds.eval_split}") + (
        f"[{len(eval_exs)}/{n_eval_all} fixed subset]" if len(eval_exs) < n_eval_all else ""
    )
    dev_name = f"{ds.train_split}[dev hash bucket, {len(dev)}]"
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "per_class_accuracy": metrics["per_class_accuracy"],
        "dev_accuracy": metrics.get("dev_accuracy"),
        "splits": {
            "accuracy": split_name,
            "macro_f1": split_name,
            "per_class_accuracy": split_name,
            "confusion": split_name,
            "dev_accuracy": dev_name,
            "lr_selection": dev_name,
        },
        "train_source": source.name,
        # DP-SGD: how many records trained is private (which rows fall in the dev bucket depends
        # on their text); the public count its schedule used is metrics["dp"]["num_records"]
        "n_train": None if source.private_fit else len(used),
        "train_per_class": None
        if source.private_fit
        else [sum(e.label == k for e in used) for k in range(task.num_classes)],
        "seed": int(cfg.seed),
        "epsilon": privacy["epsilon"] if privacy else None,
        "delta": privacy["delta"] if privacy else None,
        "privacy": privacy,
        "finetuner": cfg.finetuner._target_.rsplit(".", 1)[-1] if source.trains else None,
        "lr": metrics.get("lr"),
        "lr_selection": metrics.get("lr_selection"),
        "eval_limit": int(cfg.finetune.eval_limit),
        "n_eval": len(eval_exs),
        "n_dev": len(dev),
        "carve": carve,
        "num_processes": num_processes,
        "confusion": metrics["confusion"],
        "model": lm.name,
        "dataset": ds.name,
        **{k: v for k, v in metrics.items() if k in ("train_seconds", "steps", "final_loss", "trainable_params", "dp")},
        "train_info": data.info,
    }


class NullTracker:
    """What the non-main ranks log to: nothing (no metrics.jsonl, no W&B run)."""

    def log(self, *a, **k) -> None:
        pass

    table = summary = commit = log_artifact = use_artifact = log

    def close(self, exit_code: int = 0) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _train_and_evaluate(cfg, lm, task, source, data: TrainingSet, eval_exs, dev, lrs, tracker, acc=None) -> dict:
    show = bool(cfg.progress) and (acc is None or acc.is_main_process)

    def bar(name):  # progress=false, or a rank other than 0: no bar
        return name if show else None

    bs = cfg.finetune.eval_batch_size
    mtt = cfg.finetuner.max_text_tokens
    if not source.trains:  # zero-shot, or few-shot in context
        ctx = fewshot_context(task, data.demos, cfg.seed) if data.demos else None
        res = evaluate(lm.model, task, eval_exs, bs, mtt, ctx, accelerator=acc, desc=bar("evaluate"))
        out = res.to_dict()
        if dev:
            out["dev_accuracy"] = evaluate(lm.model, task, dev, bs, mtt, ctx, accelerator=acc, desc=bar("dev")).accuracy
        return out
    base = lm.model
    best = None
    selection = {}
    step0 = 0
    for i, lr in enumerate(lrs):
        ft = build(OmegaConf.merge(cfg.finetuner, {"lr": lr}))
        model = ft.prepare(copy.deepcopy(base) if len(lrs) > 1 else base)
        pbar = tqdm(
            total=source.num_steps(ft, len(data.examples)),
            desc=f"finetune lr={lr:g}" if len(lrs) > 1 else "finetune",
            unit="step",
            disable=not show,
        )

        def on_step(rec, i=i, lr=lr, pbar=pbar):
            rec_log = {"train/lr": rec["lr"], "lr_run": i, "lr_value": lr}
            pbar.update(1)
            if (
                not source.private_fit
            ):  # DP-SGD's batch loss is computed from private records without noise: never logged
                rec_log["train/loss"] = rec["loss"]
                pbar.set_postfix(loss=f"{rec['loss']:.4f}")
            tracker.log(rec_log, step=step0 + rec["step"])

        fit = source.fit(ft, model, task, data.examples, on_step, accelerator=acc)
        pbar.close()
        step0 += fit.steps
        dev_acc = evaluate(model, task, dev, bs, mtt, accelerator=acc, desc=bar("dev")).accuracy if dev else None
        selection[str(lr)] = dev_acc
        tracker.log(
            {"dev/accuracy": dev_acc if dev_acc is not None else float("nan"), "lr_value": lr}, step=step0, kind="dev"
        )
        if best is None or (dev_acc is not None and dev_acc > best[0]):
            best = (dev_acc if dev_acc is not None else -1.0, lr, model, fit)
        else:
            del model
    _, lr, model, fit = best
    res = evaluate(model, task, eval_exs, bs, mtt, accelerator=acc, desc=bar("evaluate"))
    out = res.to_dict()
    out.update(
        lr=lr,
        lr_selection=selection if len(lrs) > 1 else None,
        dev_accuracy=selection[str(lr)],
        train_seconds=fit.seconds,
        steps=fit.steps,
        final_loss=fit.losses[-1] if fit.losses else None,
        trainable_params=fit.trainable_params,
    )
    if source.private_fit:  # the loss and run time of private batches are statistics of the private data
        out["dp"] = fit.extra
        out.pop("final_loss")
        out.pop("train_seconds")
    return out
