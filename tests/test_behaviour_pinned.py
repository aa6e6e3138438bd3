"""release → generate → select → fine-tune on the tiny model, pinned to what the code produced
before the component refactor (privacy=none and privacy=dp).

The DP noise comes from os.urandom; the test replaces it with a seeded byte stream so the whole
chain, noise included, is reproducible. EXPECTED was recorded by running this file with
GMTEXT_RECORD_PINNED=1 on the pre-refactor code; refactors must not change it.
"""

import json
import os
import random

import pytest

from gmtext.privacy import noise
from gmtext.stages.finetune import run_finetune
from gmtext.workflows.pipeline import run_pipeline
from gmtext.stages.release import run_release

# debug=fast (debug=tiny cut to seconds): the recipe these values were recorded with (the tiny model,
# lm_head matched on the full-vocabulary loss, best-match selection, ...), from before the schema took
# the measured defaults; the values were recorded with these same settings spelled out one by one
COMMON = ["debug=fast", "matcher.outer_steps=1", "matcher.inner_steps=2", "projector.topk=10", "selector.per_class=3"]
MODES = {"none": ["real_per_class=4"], "dp": ["privacy=dp", "privacy.epsilon=2", "privacy.divisor=5"]}
TIMING = ("seconds", "timings")


def _rounded(x):
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items() if not any(t in k for t in TIMING)}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def _same(got, want, path="") -> None:
    """Equal structure and values; floats to a relative 1e-5 (the 7th digit of a loss moves with
    the CPU's vector kernels, so exact floats pinned on one machine fail on another)."""
    if isinstance(want, float) and isinstance(got, (int, float)):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def _chain(compose, run_dir, mode, monkeypatch) -> dict:
    rng = random.Random(1234)
    monkeypatch.setattr(noise.os, "urandom", rng.randbytes)  # reproducible noise (tests only)
    overrides = COMMON + MODES[mode]
    rel = run_release(compose(overrides, config_name="release"), run_dir)
    m = run_pipeline(compose(overrides, config_name="pipeline"), run_dir)
    read = lambda f: [json.loads(line) for line in (run_dir / f).read_text().splitlines()]  # noqa: E731
    privacy = json.loads((run_dir / "release" / "privacy.json").read_text())
    return _rounded(
        {
            "release": {k: v for k, v in rel.items() if k not in ("release_dir", "model_load_seconds", "wall_seconds")},
            "privacy": {k: v for k, v in privacy.items() if k != "ledger"},
            "ledger_epsilon": privacy["ledger"]["epsilon"],
            "synthetic": [(r["text"], r["label"], r["match_loss"]) for r in read("synthetic.jsonl")],
            "selected": [r["text"] for r in read("selected.jsonl")],
            "metrics": {
                k: m[k]
                for k in (
                    "accuracy",
                    "macro_f1",
                    "confusion",
                    "n_train",
                    "train_per_class",
                    "epsilon",
                    "delta",
                    "lr",
                    "steps",
                    "final_loss",
                    "generation",
                    "selection",
                )
            },
        }
    )


@pytest.mark.parametrize("mode", list(MODES))
def test_chain_output_is_pinned(compose, tmp_path, monkeypatch, mode):
    got = _chain(compose, tmp_path, mode, monkeypatch)
    if os.environ.get("GMTEXT_RECORD_PINNED"):
        print(f"\nPINNED[{mode!r}] = {json.dumps(got)}")
        return
    _same(json.loads(json.dumps(got)), EXPECTED[mode])


SOURCES = {
    "real": ["train=real", "train.size=8"],
    "none": ["train=none"],
    "fewshot": ["train=fewshot", "train.k=1"],
    "prompted": ["train=prompted", "train.size=2", "train.max_new_tokens=4"],
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_training_sources_are_pinned(compose, tmp_path, source):
    # real_per_class=null: the default these were recorded under (every record of the split)
    m = run_finetune(compose(COMMON + ["real_per_class=null"] + SOURCES[source], config_name="finetune"), tmp_path)
    got = _rounded(
        {
            k: m.get(k)
            for k in (
                "accuracy",
                "macro_f1",
                "confusion",
                "train_source",
                "n_train",
                "train_per_class",
                "epsilon",
                "finetuner",
                "lr",
                "steps",
                "final_loss",
            )
        }
    )
    if source == "prompted":
        got["texts"] = [json.loads(line)["text"] for line in (tmp_path / "prompted.jsonl").read_text().splitlines()]
    if os.environ.get("GMTEXT_RECORD_PINNED"):
        print(f"\nPINNED[{source!r}] = {json.dumps(got)}")
        return
    _same(json.loads(json.dumps(got)), EXPECTED_SOURCES[source])


# recorded from the pre-refactor code (GMTEXT_RECORD_PINNED=1); json keeps inf as Infinity. The kept set's
# median / p90 perplexity and known-word rate were added later (new fields; every earlier value unchanged)
EXPECTED = {
    'none': json.loads(
        '{"release": {"reused": false, "epsilon": Infinity, "delta": 0.0, "mechanism": "none", "sigma": null, '
        '"divisors": [4.0, 4.0], "num_params": 3145728}, "privacy": {"mechanism": "none", "epsilon": Infinity, '
        '"delta": 0.0, "note": "non-private: targets are exact means of real-example gradients"}, '
        '"ledger_epsilon": Infinity, '
        '"synthetic": [["Linda requirements Comparativect oversee", 0, 0.1470710039138794], '
        '["Mithestial Belarus vulnerability tailor", 0, 0.09468048810958862], '
        '["aggressivelyprisesorphousightedsolving", 1, 0.11264270544052124], '
        '["holidayiti graduating Humans dining", 1, 0.10676980018615723], '
        '["ened outstandingCAT simulate Kab", 0, 0.08734208345413208], '
        '["estrogengrowngt Saturn Imperial", 0, 0.26490479707717896], '
        '["Yomswigfaiss Comparison blow Well", 1, 0.2896345257759094], '
        '["PueblofounderNot enum concern", 1, 0.07532453536987305]], "selected": ["ened outstandingCAT simulate Kab", '
        '"Mithestial Belarus vulnerability tailor", "Linda requirements Comparativect oversee", '
        '"PueblofounderNot enum concern", "holidayiti graduating Humans dining", '
        '"aggressivelyprisesorphousightedsolving"], "metrics": {"accuracy": 0.5, "macro_f1": 0.333333, '
        '"confusion": [[4, 0], [4, 0]], "n_train": 6, "train_per_class": [3, 3], "epsilon": Infinity, "delta": 0.0, '
        '"lr": 1e-05, "steps": 2, "final_loss": 0.87939, "generation": {"examples": 8, "mean_match_loss": 0.147296, '
        '"mean_perplexity": 40192.6, "epsilon": Infinity, "delta": 0.0}, "selection": {"pool": 8, "selected": 6, '
        '"mean_match_loss": 0.103972, "mean_perplexity": 40387.5, "median_perplexity": 41074.9, '
        '"p90_perplexity": 41814.9, "known_word_rate": 0.6}}}'
    ),
    'dp': json.loads(
        '{"release": {"reused": false, "epsilon": 1.99907, "delta": 1e-05, "mechanism": "gaussian", "sigma": 3.98928, '
        '"divisors": [5.0, 5.0], "num_params": 3145728}, "privacy": {"mechanism": "gaussian", "epsilon": 1.99907, '
        '"delta": 1e-05, "unit": "one record (row) of the protected split", "adjacency": "replace_one", '
        '"clip_norm": 1.0, "sensitivity": 2.0, "noise_multiplier": 1.99464, "sigma": 3.98928, "divisor": 5.0, '
        '"sample_rate": 1.0, "num_records": 40, "calibration_accountant": "analytic", '
        '"per_example_gradients": "closed_form", "match_loss": "full_vocab", '
        '"noise_source": "os.urandom (kernel CSPRNG), Box-Muller in float64 over 53-bit uniforms; no seed", '
        '"warnings": []}, "ledger_epsilon": 1.99907, '
        '"synthetic": [["aridetect considerable windyinav", 0, 0.9980099201202393], '
        '["polyg prenataleylon shells corrid", 0, 0.9984696507453918], '
        '["roller aligningLIN stinging represents", 1, 0.9974721074104309], '
        '["ript WatchingPrefixhaus dissolved", 1, 0.9983267188072205], '
        '["affairslots Areas these chickpeas", 0, 0.9981505274772644], '
        '["AccountabilityNSF Skip Gust io", 0, 0.9977928996086121], '
        '["Requ diarrhea Legend teenage equipping", 1, 0.9981108903884888], '
        '["Interaction smellperature intellectually Australia", 1, 0.9984728097915649]], '
        '"selected": ["AccountabilityNSF Skip Gust io", "aridetect considerable windyinav", '
        '"affairslots Areas these chickpeas", "roller aligningLIN stinging represents", '
        '"Requ diarrhea Legend teenage equipping", "ript WatchingPrefixhaus dissolved"], "metrics": {"accuracy": 0.5, '
        '"macro_f1": 0.333333, "confusion": [[4, 0], [4, 0]], "n_train": 6, "train_per_class": [3, 3], '
        '"epsilon": 1.99907, "delta": 1e-05, "lr": 1e-05, "steps": 2, "final_loss": 0.887001, '
        '"generation": {"examples": 8, "mean_match_loss": 0.998101, "mean_perplexity": 40268.3, "epsilon": 1.99907, '
        '"delta": 1e-05}, "selection": {"pool": 8, "selected": 6, "mean_match_loss": 0.997977, '
        '"mean_perplexity": 39946.2, "median_perplexity": 39624.0, "p90_perplexity": 42026.0, '
        '"known_word_rate": 0.652174}}}'
    ),
}
EXPECTED_SOURCES = {
    'real': json.loads(
        '{"accuracy": 0.5, "macro_f1": 0.333333, "confusion": [[4, 0], [4, 0]], "train_source": "real", "n_train": 8, '
        '"train_per_class": [4, 4], "epsilon": Infinity, "finetuner": "FullFineTuner", "lr": 1e-05, "steps": 2, '
        '"final_loss": 0.711786}'
    ),
    'none': json.loads(
        '{"accuracy": 0.5, "macro_f1": 0.333333, "confusion": [[4, 0], [4, 0]], "train_source": "none", "n_train": 0, '
        '"train_per_class": [0, 0], "epsilon": 0.0, "finetuner": null, "lr": null, "steps": null, "final_loss": null}'
    ),
    'fewshot': json.loads(
        '{"accuracy": 0.5, "macro_f1": 0.333333, "confusion": [[4, 0], [4, 0]], "train_source": "fewshot", '
        '"n_train": 2, "train_per_class": [1, 1], "epsilon": Infinity, "finetuner": null, "lr": null, "steps": null, '
        '"final_loss": null}'
    ),
    'prompted': json.loads(
        '{"accuracy": 0.5, "macro_f1": 0.333333, "confusion": [[4, 0], [4, 0]], "train_source": "prompted", '
        '"n_train": 2, "train_per_class": [1, 1], "epsilon": 0.0, "finetuner": "FullFineTuner", "lr": 1e-05, '
        '"steps": 2, "final_loss": 0.666506, "texts": ["ench eukaryoticatiibus", "Testament filmmakers Yom decisive"]}'
    ),
}
