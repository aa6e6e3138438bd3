"""A new privacy mechanism and a new training source plug in through config alone: a class plus
a config node (here stored in Hydra's ConfigStore, as a conf/<group>/<name>.yaml would be)."""

import json

import torch
from hydra.core.config_store import ConfigStore

from gmtext.data import Example
from gmtext.finetune.sources import TrainingSet, TrainingSource
from gmtext.privacy.ledger import Ledger, LedgerEntry
from gmtext.privacy.release import Release
from gmtext.stages.finetune import run_finetune
from gmtext.stages.release import run_release

TINY = ["debug=tiny", "progress=false", "threads=1", "real_per_class=2"]


class ConstantRelease:
    """Toy mechanism: releases `value` everywhere, reads nothing it is given."""

    name = "constant"
    sample_rate = 1.0
    publishes_wall_time = True

    def __init__(self, value: float):
        if value == 0:
            raise ValueError(f"privacy.value={value}: must be non-zero")
        self.value = value

    def check_inclusion(self, real_per_class):
        pass

    def release(self, model, task, matched, texts_by_class, inp, name="release"):
        targets = [[torch.full_like(p, self.value) for p in matched.params] for _ in range(task.num_classes)]
        ledger = Ledger(0.0, [LedgerEntry(name=name, kind="non_private", split=inp.split, note="constant")])
        return Release(
            targets,
            list(matched.names),
            list(task.label_names),
            [1.0] * task.num_classes,
            inp.fingerprint,
            {"mechanism": "constant", "epsilon": 0.0, "delta": 0.0, "ledger": ledger.to_dict()},
        )

    def release_joint(self, model, task, parts, texts_by_class, inp, probe_share):
        raise NotImplementedError

    def check_reuse(self, rel):
        pass


class RepeatSource(TrainingSource):
    """Toy training source: one public sentence per class, repeated."""

    name = "repeat"

    def __init__(self, times: int):
        self.times = times

    def load(self, ctx):
        return TrainingSet(
            [Example(f"sentence {c}", c) for c in range(ctx.task.num_classes) for _ in range(self.times)],
            info={"toy": True},
        )


def _store():
    cs = ConfigStore.instance()
    cs.store(
        group="privacy",
        name="constant",
        node={"_target_": f"{__name__}.ConstantRelease", "name": "constant", "value": 0.5},
    )
    cs.store(
        group="train", name="repeat", node={"_target_": f"{__name__}.RepeatSource", "source": "repeat", "times": 3}
    )


def test_a_new_privacy_mechanism_through_config(compose, tmp_path):
    _store()
    s = run_release(compose(TINY + ["privacy=constant", "privacy.value=2.0"], config_name="release"), tmp_path)
    assert s["mechanism"] == "constant" and s["epsilon"] == 0.0
    targets = torch.load(tmp_path / "release" / "targets.pt", weights_only=True)["targets"]
    assert all(torch.all(t == 2.0) for tc in targets for t in tc)
    assert json.loads((tmp_path / "release" / "privacy.json").read_text())["mechanism"] == "constant"


def test_a_new_training_source_through_config(compose, tmp_path):
    _store()
    m = run_finetune(
        compose(
            TINY + ["train=repeat", "finetuner.max_steps=1", "finetuner.batch_size=2", "finetune.eval_limit=4"],
            config_name="finetune",
        ),
        tmp_path,
    )
    assert m["train_source"] == "repeat" and m["n_train"] == 6 and m["train_per_class"] == [3, 3]
    assert (
        m["train_info"] == {"toy": True} and m["steps"] == 1 and m["epsilon"] == 0.0
    )  # nothing from the private split
