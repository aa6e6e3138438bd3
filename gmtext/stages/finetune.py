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

import torch
from omegaconf import DictConfig, OmegaConf

from ..artifacts import ConfigChanged, check_resume, read_json, write_json
from ..config import build
from ..data import carve_summary, dev_examples, load_configured, sample_per_class
from ..data.synthetic import resolve_synthetic_path, synthetic_privacy
from ..privacy.ledger import Ledger, LedgerEntry, compose_records, split_id
from ..finetune.baselines import SOURCES, prompted_examples, read_synthetic, real_subset
from ..finetune.distributed import broadcast, get_accelerator, main_process_lock
from ..finetune.evaluate import evaluate, fewshot_context
from ..models import check_fits_context
from ..tracking import artifact_name, make_tracker
from .generate import build_task, load_generator_model, synthetic_artifact

METRICS_FILE = "metrics.json"


def _load(ds, split: str):
    return load_configured(ds, split)  # dataset.carve: the eval split carved out of the train file


def eval_subset(examples, limit: int):
    """A fixed random subset (seed 0, independent of the run seed, so every run of a table
    sees the same examples), in file order. limit <= 0 keeps everything."""
    if limit <= 0 or limit >= len(examples):
        return list(examples)
    keep = set(random.Random(0).sample(range(len(examples)), limit))
    return [e for i, e in enumerate(examples) if i in keep]


def model_privacy(cfg: DictConfig, src: str, n_dev: int, dp: dict | None = None) -> dict | None:
    """The ledger of everything the fine-tuned model depends on that touched the private train
    split: the synthetic set's own ledger (releases, probes), real training examples or
    demonstrations (non-private), DP-SGD's steps, and a dev set carved from the train split
    (non-private: it picks the lr and is published as dev_accuracy). None: a synthetic set of
    unknown origin. No entry at all (zero-shot, prompted): ε = 0."""
    split = split_id(cfg.dataset, cfg.dataset.train_split)
    parts = []
    if src == "synthetic":
        rec = synthetic_privacy(cfg.train.path)
        if rec is None:
            return None
        parts.append(rec)
    elif src in ("real", "fewshot"):
        what = "real training examples" if src == "real" else "real in-context demonstrations"
        parts.append({"epsilon": math.inf, "delta": 0.0, "ledger": Ledger(0.0, [LedgerEntry(src, "non_private", split, note=what)])})
    elif src == "dpsgd":
        m = float(dp["noise_multiplier"])
        entry = LedgerEntry("dpsgd", "subsampled_gaussian", split, records="the DP-SGD training set", noise_multiplier=m,
                            sensitivity=float(dp["clip_norm"]), sigma=m * float(dp["clip_norm"]), count=int(dp["steps"]),
                            sample_rate=float(dp["sample_rate"]), adjacency=dp.get("adjacency", "add_remove"))
        parts.append({"epsilon": float(dp["epsilon"]), "delta": float(dp["delta"]), "ledger": Ledger(float(dp["delta"]), [entry])})
    if n_dev:
        dev = LedgerEntry("real_dev_set", "non_private", split, records=f"{n_dev} records of the dev hash bucket",
                          note="picks the learning rate and is published as dev_accuracy")
        parts.append({"epsilon": math.inf, "delta": 0.0, "ledger": Ledger(0.0, [dev])})
    return compose_records(parts) if parts else {"epsilon": 0.0, "delta": 0.0, **Ledger().to_dict()}


def run_finetune(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Fine-tune and evaluate into run_dir; returns (and writes) the metrics dict."""
    run_dir = Path(run_dir)
    src = cfg.train.source
    if src not in SOURCES:
        raise ValueError(f"train.source={src!r} unknown; accepted: {', '.join(SOURCES)}")
    fcfg = cfg.finetune
    lrs = [float(x) for x in fcfg.lrs] or [float(cfg.finetuner.lr)]
    if src == "dpsgd" and len(lrs) > 1:
        raise ValueError("finetune.lrs: selecting the lr over several DP-SGD runs spends the privacy budget once per run, "
                         "which is not accounted; give one lr (finetuner.lr) for train=dpsgd")
    if len(lrs) > 1 and fcfg.dev_size <= 0:
        raise ValueError(f"finetune.lrs={lrs}: choosing among several learning rates needs a dev set (finetune.dev_size > 0, "
                         "real examples: the ledger then reports epsilon = inf); give one lr (finetuner.lr) instead")
    if src == "synthetic" and not cfg.train.path:
        raise ValueError("train=synthetic needs train.path=<synthetic.jsonl | selected.jsonl | generate run dir>")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    config = OmegaConf.to_container(cfg, resolve=True)
    acc = get_accelerator()
    main = acc.is_main_process
    if acc.num_processes > 1 and src == "dpsgd":
        raise ValueError(f"train=dpsgd runs on one process (its sampling and accounting are per process); "
                         f"launched with {acc.num_processes}: run plain gmtext-finetune")
    if src == "dpsgd":  # opacus is imported only for DP-SGD runs (seconds of import time)
        from ..finetune.dpsgd import check_dpsgd_args

        t = cfg.train
        check_dpsgd_args(t.epsilon, t.delta, t.clip_norm, t.accountant, t.microbatch)
    with main_process_lock(acc, run_dir, "finetune"):
        done = run_dir / METRICS_FILE
        prev = None
        if main and done.exists():  # the stored metrics, when made with the same config; another config is refused
            prev = read_json(done)
            try:
                check_resume(run_dir, "finetune", config, stored=prev.get("config") or {})
            except ConfigChanged as e:
                prev = {"_refused": str(e)}
        prev = broadcast(acc, prev)  # every rank returns, or is refused, together
        if prev is not None and "_refused" in prev:
            raise ConfigChanged(prev["_refused"])
        if prev is not None:
            return prev
        # before the model: a failure in loading, training or evaluating ends the tracker's run as failed
        tracker = make_tracker(cfg.logger, run_dir, "finetune", config, private=src == "dpsgd") if main else NullTracker()
        with tracker:
            if src == "synthetic":  # the set it trains on: linked to the run that wrote it
                tracker.use_artifact(*synthetic_artifact(cfg, resolve_synthetic_path(cfg.train.path)))
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed)
            lm = load_generator_model(cfg)
            if acc.num_processes > 1:
                lm.model.to(acc.device)  # one GPU per rank (accelerate's choice); one process keeps model.device
            task = build_task(cfg, lm.tokenizer)
            check_fits_context(lm.model, "finetuner.max_text_tokens", cfg.finetuner.max_text_tokens, len(task.prefix_ids) + len(task.suffix_ids))
            ds = cfg.dataset
            c = task.num_classes
            eval_all = _load(ds, ds.eval_split).examples
            eval_exs = eval_subset(eval_all, fcfg.eval_limit)
            train_split = _load(ds, ds.train_split)
            dev = dev_examples(train_split, fcfg.dev_size) if fcfg.dev_size > 0 else []
            info: dict = {}
            train_exs, demos = [], []
            if src == "synthetic":
                train_exs = read_synthetic(cfg.train.path, task.label_names)
                info["path"] = str(resolve_synthetic_path(cfg.train.path))
            elif src == "real":
                train_exs = real_subset(train_split, c, cfg.train.size, cfg.seed)
            elif src == "dpsgd":
                from ..finetune.dpsgd import private_records

                train_exs = private_records(train_split, cfg.train.size, cfg.seed)
            elif src == "fewshot":
                if cfg.train.k < 1:
                    raise ValueError(f"train.k={cfg.train.k}: need at least one demonstration per class")
                demos = sample_per_class(train_split, c, cfg.train.k, cfg.seed)
            elif src == "prompted":
                tg = time.perf_counter()
                t = cfg.train
                train_exs, pinfo = prompted_examples(lm.model, lm.tokenizer, list(ds.label_descriptions), t.size, cfg.seed, t.prompt,
                                                     t.temperature, t.top_p, t.max_new_tokens, t.use_chat,
                                                     progress=bool(cfg.progress) and main)
                info.update(pinfo, generation_seconds=time.perf_counter() - tg)
                train_exs = broadcast(acc, train_exs)  # every rank trains on the main process's samples
            metrics = _train_and_evaluate(cfg, lm, task, src, train_exs, demos, eval_exs, dev, lrs, tracker, acc)
            if src == "prompted" and main:
                from ..artifacts import write_jsonl

                write_jsonl(run_dir / "prompted.jsonl", [{"text": e.text, "label": e.label, "label_name": task.label_names[e.label]} for e in train_exs])
            privacy = model_privacy(cfg, src, len(dev), metrics.get("dp"))
            n_train = len(demos) if src == "fewshot" else len(train_exs)
            carve = carve_summary(ds, len(eval_all))
            split_name = (f"{ds.train_split}[carved eval]" if carve else f"{ds.eval_split}") + (f"[{len(eval_exs)}/{len(eval_all)} fixed subset]" if len(eval_exs) < len(eval_all) else "")
            dev_name = f"{ds.train_split}[dev hash bucket, {len(dev)}]"
            out = {
                "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "per_class_accuracy": metrics["per_class_accuracy"],
                "dev_accuracy": metrics.get("dev_accuracy"),
                "splits": {"accuracy": split_name, "macro_f1": split_name, "per_class_accuracy": split_name, "confusion": split_name,
                           "dev_accuracy": dev_name, "lr_selection": dev_name},
                "train_source": src, "n_train": n_train, "train_per_class": None if src == "dpsgd" else [sum(e.label == k for e in (demos or train_exs)) for k in range(c)],
                "seed": int(cfg.seed), "epsilon": privacy["epsilon"] if privacy else None,
                "delta": privacy["delta"] if privacy else None, "privacy": privacy,
                "finetuner": cfg.finetuner._target_.rsplit(".", 1)[-1] if src not in ("none", "fewshot") else None,
                "lr": metrics.get("lr"), "lr_selection": metrics.get("lr_selection"),
                "eval_limit": int(fcfg.eval_limit), "n_eval": len(eval_exs), "n_dev": len(dev), "carve": carve, "num_processes": acc.num_processes,
                "confusion": metrics["confusion"], "model": lm.name, "dataset": ds.name,
                **{k: v for k, v in metrics.items() if k in ("train_seconds", "steps", "final_loss", "trainable_params", "dp")},
                "train_info": info,
            }
            if src != "dpsgd":  # DP-SGD's run time depends on its private Poisson batches
                out["wall_seconds"] = time.perf_counter() - t0
            tracker.summary({k: v for k, v in out.items() if (isinstance(v, (int, float)) and not isinstance(v, bool))
                             or k in ("per_class_accuracy", "confusion")})
            tracker.table("confusion", ["true", *(f"predicted {n}" for n in task.label_names)],  # rows: true class
                          [[n, *row] for n, row in zip(task.label_names, out["confusion"])])
            if main:
                write_json(done, {**out, "config": config})
                tracker.commit()
                tracker.log_artifact(artifact_name("metrics", ds.name), "metrics", {METRICS_FILE: done},
                                     {"accuracy": out["accuracy"], "epsilon": out["epsilon"], "train_source": src})
    return out


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


def _train_and_evaluate(cfg, lm, task, src, train_exs, demos, eval_exs, dev, lrs, tracker, acc=None) -> dict:
    from tqdm.auto import tqdm

    show = bool(cfg.progress) and (acc is None or acc.is_main_process)

    def bar(name):  # progress=false, or a rank other than 0: no bar
        return name if show else None

    bs = cfg.finetune.eval_batch_size
    mtt = cfg.finetuner.max_text_tokens
    if src in ("none", "fewshot"):
        ctx = fewshot_context(task, demos, cfg.seed) if src == "fewshot" else None
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

        total = ft.num_steps(len(train_exs))  # DP-SGD runs as many (noisy) steps
        pbar = tqdm(total=total, desc=f"finetune lr={lr:g}" if len(lrs) > 1 else "finetune", unit="step", disable=not show)

        def on_step(rec, i=i, lr=lr, pbar=pbar):
            rec_log = {"train/lr": rec["lr"], "lr_run": i, "lr_value": lr}
            pbar.update(1)
            if src != "dpsgd":  # DP-SGD's batch loss is computed from private records without noise: never logged
                rec_log["train/loss"] = rec["loss"]
                pbar.set_postfix(loss=f"{rec['loss']:.4f}")
            tracker.log(rec_log, step=step0 + rec["step"])

        if src == "dpsgd":
            from ..finetune.dpsgd import dpsgd_fit

            t = cfg.train
            fit = dpsgd_fit(ft, model, task, train_exs, t.epsilon, t.delta, t.clip_norm, t.accountant, t.microbatch, on_step)
        else:
            fit = ft.fit(model, task, train_exs, on_step, accelerator=acc)
        pbar.close()
        step0 += fit.steps
        dev_acc = evaluate(model, task, dev, bs, mtt, accelerator=acc, desc=bar("dev")).accuracy if dev else None
        selection[str(lr)] = dev_acc
        tracker.log({"dev/accuracy": dev_acc if dev_acc is not None else float("nan"), "lr_value": lr}, step=step0, kind="dev")
        if best is None or (dev_acc is not None and dev_acc > best[0]):
            best = (dev_acc if dev_acc is not None else -1.0, lr, model, fit)
        else:
            del model
    _, lr, model, fit = best
    res = evaluate(model, task, eval_exs, bs, mtt, accelerator=acc, desc=bar("evaluate"))
    out = res.to_dict()
    out.update(lr=lr, lr_selection=selection if len(lrs) > 1 else None, dev_accuracy=selection[str(lr)], train_seconds=fit.seconds,
               steps=fit.steps, final_loss=fit.losses[-1] if fit.losses else None, trainable_params=fit.trainable_params)
    if src == "dpsgd":  # the loss and run time of private batches are statistics of the private data
        out["dp"] = fit.extra
        out.pop("final_loss")
        out.pop("train_seconds")
    return out
