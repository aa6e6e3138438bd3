"""Console entry points: thin @hydra.main wrappers around pure stage functions.

Known user errors (an unknown config option or key, bad values, missing or malformed
data, locked or unwritable run dirs, a full disk, mismatched releases, gmtext.errors.UserError)
end with one line on stderr and exit code 2, not a traceback; anything else (a torch
RuntimeError, an I/O error that is no setting) is a bug and shows its traceback. GMTEXT_TRACEBACK=1 (or Hydra's
HYDRA_FULL_ERROR=1) shows the traceback instead. docs/troubleshooting.md lists them.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from .config import register_configs

register_configs()
CONF = "pkg://gmtext.conf"
# An OSError with one of these errno values is about where the run writes, not a bug.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}
# ... or about a path the user gave.
PATH_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


def is_user_error(e: BaseException) -> bool:
    """Errors the user can fix: bad values (ValueError and the data/release/merge errors
    derived from it), missing files, permissions, a full disk or an unusable run dir, a run
    dir in use, and UserError (a launch or install problem). Everything else, a
    RuntimeError from torch included, is a bug and keeps its traceback."""
    from .artifacts import RunDirLocked
    from .errors import UserError

    if isinstance(e, (ValueError, FileNotFoundError, PermissionError, UserError, RunDirLocked)):
        return True
    return isinstance(e, OSError) and e.errno in WRITE_ERRNOS | PATH_ERRNOS


def error_line(e: BaseException) -> str:
    """One line for a user error: the message itself, or for an OS write error which file
    and what to do."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS and e.filename:
        return f"cannot write {e.filename}: {e.strerror}; choose a writable hydra.run.dir with free space"
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def config_error_line(e: BaseException) -> str:
    """Hydra's multi-line composition errors as one line naming the bad value and what is accepted."""
    if isinstance(e, MissingConfigException) and e.options:
        what = str(e).splitlines()[0].split(": ", 1)[-1]  # "Could not find 'projector/fancy'"
        return f"{what}; available options: {', '.join(o for o in e.options if not o.endswith('_schema'))}"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {e.message.splitlines()[0]} (grammar: https://hydra.cc/docs/advanced/override_grammar/basic)"
    msg = str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause):
        msg += ": " + str(cause).splitlines()[0]
        schema = getattr(cause, "object_type", None)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(schema):
            msg += "; accepted keys: " + ", ".join(
                f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")
            )
    return msg


def _fail(stage: str, line: str):
    print(f"gmtext-{stage}: error: {line}", file=sys.stderr)
    sys.exit(2)


def _run(stage: str, fn, cfg: DictConfig):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        _expand_sketch_specs(cfg)
        return fn(cfg, run_dir)
    except Exception as e:
        if os.environ.get("GMTEXT_TRACEBACK") or not is_user_error(e):
            raise
        _fail(stage, error_line(e))


def _expand_sketch_specs(cfg: DictConfig) -> None:
    """Short `sketch:<regex>` entries of matched_params and probe.matched_params → the full form with cfg.sketch's k_in,
    k_out and seed, before any stage builds MatchedParams (so every stage, and the config it
    records, sees the same projection)."""
    from .sketch import expand_specs

    specs = cfg.get("matched_params")
    if specs and any(str(s).startswith("sketch:") for s in specs):
        cfg.matched_params = expand_specs(list(specs), cfg.get("sketch"))
    probe = cfg.get("probe")
    if probe is not None and any(str(s).startswith("sketch:") for s in probe.matched_params):
        probe.matched_params = expand_specs(list(probe.matched_params), cfg.get("sketch"))


def _main(stage: str):
    """@hydra.main, plus: errors Hydra meets before the job (unknown option, misspelled key,
    bad override syntax, a run dir it cannot create) end like every other user error."""

    def deco(task):
        run = hydra.main(version_base="1.3", config_path=CONF, config_name=stage)(task)

        @functools.wraps(task)
        def main(*args, **kwargs):
            if stage != "finetune":
                return _hydra_main(*args, **kwargs)
            from .finetune.distributed import end_process_group, launched_world_size, run_launched

            if launched_world_size() > 1:  # under accelerate launch: every path ends the process group, then os._exit
                run_launched(lambda: (_distributed_launch_setup(), _hydra_main(*args, **kwargs)))
            ok = False
            try:
                out = _hydra_main(*args, **kwargs)
                ok = True
                return out
            finally:  # a one-process group (torchrun --nproc_per_node 1) is ended too
                end_process_group(clean=ok)

        def _hydra_main(*args, **kwargs):
            if os.environ.get("HYDRA_FULL_ERROR") or os.environ.get("GMTEXT_TRACEBACK"):
                return run(*args, **kwargs)
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing a multi-line report
            try:
                return run(*args, **kwargs)
            except (HydraException, OmegaConfBaseException) as e:
                _fail(stage, config_error_line(e))
            except OSError as e:  # Hydra creating the run dir or writing .hydra/
                if not is_user_error(e):
                    raise
                _fail(stage, error_line(e))
            finally:
                os.environ.pop("HYDRA_FULL_ERROR", None)

        return main

    return deco


def _distributed_launch_setup() -> None:
    """gmtext-finetune under `accelerate launch` with N > 1 processes: every rank resolves
    the same default run dir (rank 0's time stamp), and the ranks other than 0 make Hydra
    write nothing into it (no .hydra/, no job log file)."""
    from .finetune.distributed import launched_rank, launched_world_size, share_run_stamp

    if launched_world_size() <= 1:
        return
    share_run_stamp()
    if launched_rank() != 0:
        for extra in ("hydra.output_subdir=null", "hydra/job_logging=none"):
            if not any(a.startswith(extra.split("=")[0] + "=") for a in sys.argv[1:]):
                sys.argv.append(extra)


def _is_main_rank() -> bool:
    from .finetune.distributed import launched_rank

    return launched_rank() == 0


@_main("generate")
def generate_main(cfg: DictConfig) -> float:
    from .stages.generate import run_generate

    summary = _run("generate", run_generate, cfg)
    if summary.get("failed_batches"):  # GRADMM batches only (generator=pe has none)
        print(
            f"gmtext-generate: warning: batches {summary['failed_batches']} went non-finite and wrote no text "
            f"(batches/*.failed.json; docs/troubleshooting.md)",
            file=sys.stderr,
        )
    print(
        f"gmtext-generate: {summary['examples']} examples → {HydraConfig.get().runtime.output_dir}/synthetic.jsonl | "
        f"mean match loss {summary['mean_match_loss']:.4f} | mean perplexity {summary['mean_perplexity']:.1f} | "
        + (f"{summary['wall_seconds']:.0f} s" if "wall_seconds" in summary else "wall time withheld (private votes)")
    )
    return summary["mean_match_loss"]


@_main("release")
def release_main(cfg: DictConfig) -> float:
    from .stages.release import run_release

    s = _run("release", run_release, cfg)
    sigma = f" | sigma {s['sigma']:.3g}" if s.get("sigma") is not None else ""
    # a DP release's run time is not published (no wall_seconds): "made"
    took = "reused" if s["reused"] else ("{:.1f} s".format(s["wall_seconds"]) if "wall_seconds" in s else "made")
    print(f"gmtext-release: {s['mechanism']} release (epsilon={s['epsilon']:.4g}{sigma}) → {s['release_dir']} | {took}")
    return s["epsilon"]


@_main("audit")
def audit_main(cfg: DictConfig) -> float:
    from .workflows.audit import run_audit

    s = _run("audit", run_audit, cfg)
    print(
        f"gmtext-audit: longest common n-gram {s['longest_common_ngram']} | "
        f"{s['share_with_real_ngram']:.1%} share a real {s['ngram']}-gram | "
        f"median nearest-real cosine {s['nearest_real_cosine']['median']:.3f} "
        f"→ {HydraConfig.get().runtime.output_dir}/audit.md"
    )
    return s["share_with_real_ngram"]


@_main("finetune")
def finetune_main(cfg: DictConfig) -> float:
    from .stages.finetune import run_finetune

    m = _run("finetune", run_finetune, cfg)
    if _is_main_rank():
        print(finetune_line(m, HydraConfig.get().runtime.output_dir))
    return m["accuracy"]


def finetune_line(m: dict, out_dir) -> str:
    """gmtext-finetune's summary line. DP-SGD publishes no run time (it depends on the Poisson
    batch sizes of the private records), so a metrics.json without wall_seconds says so."""
    eps = f" | epsilon {m['epsilon']:.3g}" if m.get("epsilon") is not None else ""
    dev = f" | dev acc {m['dev_accuracy']:.1%}" if m.get("dev_accuracy") is not None else ""
    took = f"{m['wall_seconds']:.0f} s" if "wall_seconds" in m else "wall time withheld (DP-SGD)"
    return (
        f"gmtext-finetune: {m['train_source']} (n={m['n_train'] if m['n_train'] is not None else 'withheld'}) | "
        f"{m['splits']['accuracy']} accuracy {m['accuracy']:.1%} | "
        f"macro-F1 {m['macro_f1']:.3f}{dev}{eps} | {took} → {out_dir}/metrics.json"
    )


def report_main() -> None:
    """gmtext-report DIR... [-o OUT]: plain argparse (it takes paths, not a config)."""
    from .stages.report import main

    sys.exit(main())


def merge_main() -> None:
    """gmtext-merge OUT_DIR SHARD_DIR...: join generate shards (argparse, like report)."""
    from .stages.merge import main

    sys.exit(main())


@_main("select")
def select_main(cfg: DictConfig) -> int:
    from .stages.select import run_select

    s = _run("select", run_select, cfg)
    print(
        f"gmtext-select: {s['selected']} of {s['pool']} examples "
        f"→ {HydraConfig.get().runtime.output_dir}/selected.jsonl "
        f"| per class {s['per_class']} | mean match loss {s['mean_match_loss']:.4f}"
        + (
            f" | mean label margin {s['mean_label_margin']:.4f} | epsilon {s.get('epsilon', 'unknown')}"
            if "mean_label_margin" in s
            else ""
        )
    )
    return s["selected"]


@_main("pipeline")
def pipeline_main(cfg: DictConfig) -> float:
    from .workflows.pipeline import run_pipeline

    m = _run("pipeline", run_pipeline, cfg)
    print(
        f"gmtext-pipeline: accuracy {m['accuracy']:.4f} on {m.get('splits', {}).get('accuracy', 'eval')} "
        f"| {m['selection']['selected']} synthetic examples | epsilon {m['generation'].get('epsilon')} "
        f"→ {HydraConfig.get().runtime.output_dir}/metrics.json"
    )
    return m["accuracy"]
