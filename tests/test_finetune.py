"""Fine-tune + evaluate stage on the tiny random Llama and the builtin demo set."""

import copy
import json
from pathlib import Path

import pytest
import torch

from gmtext.data import Example, dev_examples, is_dev, load_split
from gmtext.finetune.baselines import prompted_examples, read_synthetic, real_subset
from gmtext.finetune.evaluate import classification_metrics, evaluate, evaluate_fewshot, fewshot_context, predict
from gmtext.finetune.trainer import (
    FineTuner,
    FullFineTuner,
    LastLayersFineTuner,
    LoRAFineTuner,
    classification_loss,
    verbalizer_logits,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
NAMES = ["negative", "positive"]


@pytest.fixture(scope="module")
def demo():
    return load_split("train", NAMES, builtin="demo"), load_split("validation", NAMES, builtin="demo")


def _loss(model, task, exs):
    with torch.no_grad():
        return float(classification_loss(model, task, exs, None))


def test_verbalizer_logits_equal_full_forward(tiny, demo):
    lm, task = tiny
    ids, mask, last = task.batch([e.text for e in demo[0].examples[:6]])
    with torch.no_grad():
        fast = verbalizer_logits(lm.model, ids, mask, last, task.label_token_ids)
        full = lm.model(input_ids=ids, attention_mask=mask).logits[torch.arange(6), last][:, task.label_token_ids]
    assert torch.allclose(fast, full, atol=1e-5)


def test_training_reduces_loss_and_is_deterministic(tiny, demo):
    lm, task = tiny
    train = demo[0].examples
    ft = FullFineTuner(lr=3e-3, epochs=2, batch_size=8, seed=3)
    model = ft.prepare(copy.deepcopy(lm.model))
    before = _loss(model, task, train)
    fit = ft.fit(model, task, train)
    assert fit.steps == 2 * 5
    assert _loss(model, task, train) < 0.8 * before
    # same seed → same batches and the same loss curve
    again = FullFineTuner(lr=3e-3, epochs=2, max_steps=3, batch_size=8, seed=3)
    assert again.fit(again.prepare(copy.deepcopy(lm.model)), task, train).losses == fit.losses[:3]


def test_max_steps_overrides_epochs(tiny, demo):
    lm, task = tiny
    ft = FullFineTuner(lr=1e-4, epochs=10, max_steps=2, batch_size=16)
    fit = ft.fit(ft.prepare(copy.deepcopy(lm.model)), task, demo[0].examples)
    assert fit.steps == 2 and len(fit.losses) == 2


def test_metrics_hand_computed():
    r = classification_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["a", "b"])
    assert r.confusion == [[1, 1], [1, 2]]
    assert r.accuracy == pytest.approx(3 / 5)
    # F1(a) = 2·1/(2·1+1+1) = 0.5; F1(b) = 2·2/(2·2+1+1) = 2/3
    assert r.macro_f1 == pytest.approx((0.5 + 2 / 3) / 2)
    assert r.per_class_accuracy == {"a": pytest.approx(0.5), "b": pytest.approx(2 / 3)}
    # a class never predicted: F1 0, accuracy still the fraction right
    r = classification_metrics([0, 1, 1], [1, 1, 1], ["a", "b"])
    assert r.macro_f1 == pytest.approx((0 + 0.8) / 2) and r.accuracy == pytest.approx(2 / 3)


def test_evaluate_matches_argmax_and_is_batch_independent(tiny, demo):
    lm, task = tiny
    exs = demo[1].examples
    ids, mask, last = task.batch([e.text for e in exs])
    with torch.no_grad():
        full = lm.model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(exs)), last][
            :, task.label_token_ids
        ]
    want = full.argmax(-1).tolist()
    assert predict(lm.model, task, [e.text for e in exs], batch_size=3) == want
    r = evaluate(lm.model, task, exs, batch_size=7)
    assert r.predictions == want
    assert r.accuracy == pytest.approx(sum(p == e.label for p, e in zip(want, exs)) / len(exs))


def test_fewshot_context_uses_template_and_verbalizers(tiny, demo):
    lm, task = tiny
    demos = real_subset(demo[0], 2, 4, seed=0)
    ctx = fewshot_context(task, demos, seed=0)
    text = lm.tokenizer.decode(ctx)
    assert text.count(" It was great\n") == 2 and text.count(" It was bad\n") == 2
    for d in demos:
        assert d.text in text
    r = evaluate_fewshot(lm.model, task, demos, demo[1].examples)
    assert r.n == 20 and 0 <= r.accuracy <= 1


def test_synthetic_wrong_schema_is_a_clear_error(tmp_path):
    f = tmp_path / "synthetic.jsonl"
    f.write_text(json.dumps({"text": "a fine film", "label": 1}) + "\n" + json.dumps({"text": "no label here"}) + "\n")
    with pytest.raises(ValueError, match=r"synthetic\.jsonl:2: missing field\(s\) \['label'\]") as e:
        read_synthetic(f, NAMES)
    assert "\n" not in str(e.value)
    f.write_text(json.dumps({"label": 0}) + "\n")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['text'\]"):
        read_synthetic(f, NAMES)
    f.write_text(json.dumps({"text": "x", "label": 7}) + "\n")
    with pytest.raises(ValueError, match="'label'=7"):
        read_synthetic(f, NAMES)
    f.write_text(
        json.dumps({"text": "ok", "label": "positive"}) + "\n" + json.dumps({"text": "bad", "label": 0}) + "\n"
    )
    assert read_synthetic(tmp_path, NAMES) == [Example("ok", 1), Example("bad", 0)]  # run dir + label names


def _changed(before, model):
    after = dict(model.named_parameters())
    return {n for n, p in before.items() if not torch.equal(p, after[n].detach())}


def test_lora_trains_only_adapters(tiny, demo):
    lm, task = tiny
    ft = LoRAFineTuner(r=4, alpha=8, lr=1e-2, epochs=1, batch_size=8)
    model = ft.prepare(copy.deepcopy(lm.model))
    names = FineTuner.trainable_names(model)
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ft.fit(model, task, demo[0].examples)
    changed = _changed(before, model)
    assert changed and all("lora_" in n for n in changed)


def test_last_layers_trains_last_blocks_and_final_norm(tiny, demo):
    lm, task = tiny
    ft = LastLayersFineTuner(num_layers=1, lr=1e-3, epochs=1, batch_size=8)
    model = ft.prepare(copy.deepcopy(lm.model))
    names = set(FineTuner.trainable_names(model))
    assert names == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")} | {"model.norm.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ft.fit(model, task, demo[0].examples)
    assert _changed(before, model) <= names and _changed(before, model)
    with pytest.raises(ValueError, match="has 2 blocks"):
        LastLayersFineTuner(num_layers=5).prepare(copy.deepcopy(lm.model))


def test_real_subset_balanced_seeded_no_dev(demo):
    train = demo[0]
    a, b, c = real_subset(train, 2, 10, 0), real_subset(train, 2, 10, 0), real_subset(train, 2, 10, 1)
    assert a == b and a != c
    assert [sum(e.label == k for e in a) for k in range(2)] == [5, 5]
    assert not any(is_dev(e.text) for e in a)
    dev = {e.text for e in dev_examples(train, 200)}
    assert dev and not dev & {e.text for e in a}


def test_prompted_produces_n_labeled_texts(tiny, capsys):
    lm, _ = tiny
    exs, info = prompted_examples(
        lm.model, lm.tokenizer, ["a negative movie review", "a positive movie review"], 4, seed=0, max_new_tokens=6
    )
    assert capsys.readouterr().err == ""  # progress off by default
    with_bar, _ = prompted_examples(
        lm.model,
        lm.tokenizer,
        ["a negative movie review", "a positive movie review"],
        4,
        seed=0,
        max_new_tokens=6,
        progress=True,
    )
    out = capsys.readouterr()
    assert (
        with_bar == exs and out.out == "" and "prompted: 100%" in out.err and "4/4" in out.err
    )  # the bar: stderr, counts kept texts
    assert len(exs) == 4 and [sum(e.label == k for e in exs) for k in range(2)] == [2, 2]
    assert all(e.text.strip() for e in exs)
    assert info["prompts"] == [
        "Write one short negative movie review sentence.",
        "Write one short positive movie review sentence.",
    ]
    again, _ = prompted_examples(
        lm.model, lm.tokenizer, ["a negative movie review", "a positive movie review"], 4, seed=0, max_new_tokens=6
    )
    assert again == exs  # seeded
    with pytest.raises(ValueError, match="label_descriptions"):
        prompted_examples(lm.model, lm.tokenizer, [], 6, seed=0)


def test_every_finetune_option_composes_and_generate_still_composes(compose):
    for group in ("finetuner", "train"):
        for p in sorted((CONF / group).glob("*.yaml")):
            cfg = compose([f"{group}={p.stem}"], config_name="finetune")
            assert cfg.stage == "finetune" and cfg[group] is not None
    cfg = compose(["seed=5"], config_name="finetune")
    assert cfg.finetuner.seed == 5 and cfg.train.source == "synthetic"
    assert compose([], config_name="generate").stage == "generate"
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"Could not override 'finetuner.lrr'") as e:
        compose(["finetuner.lrr=1"], config_name="finetune")
    assert "Key 'lrr' not in 'FullFineTunerConfig'" in str(
        e.value.__cause__
    )  # the schema rejects it, not a typo in the test


def _tiny_overrides(tmp_path, *extra):
    return ["debug=tiny", "finetuner.lr=1e-3", "finetuner.epochs=1", *extra]


def test_run_finetune_writes_metrics(compose, tmp_path):
    from gmtext.stages.finetune import run_finetune

    cfg = compose(
        _tiny_overrides(
            tmp_path,
            "train=real",
            "train.size=10",
            "finetune.lrs=[1e-4,1e-3]",
            "finetune.dev_size=8",
            "finetune.eval_limit=12",
        ),
        config_name="finetune",
    )
    m = run_finetune(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["accuracy"] == m["accuracy"]
    conf = saved["confusion"]  # rows: true class, columns: prediction
    assert sum(map(sum, conf)) == saved["n_eval"] == 12
    assert saved["accuracy"] == pytest.approx(sum(conf[k][k] for k in range(2)) / 12)
    assert saved["per_class_accuracy"] == {
        n: pytest.approx(conf[k][k] / sum(conf[k])) for k, n in enumerate(NAMES) if sum(conf[k])
    }
    assert set(saved["per_class_accuracy"]) == set(NAMES) and "macro_f1" in saved
    assert saved["n_eval"] == 12 and saved["eval_limit"] == 12 and saved["n_train"] == 10
    assert set(saved["lr_selection"]) == {"0.0001", "0.001"} and saved["lr"] in (1e-4, 1e-3)
    assert saved["splits"]["accuracy"].startswith("validation") and "dev" in saved["splits"]["dev_accuracy"]
    assert saved["train_source"] == "real" and saved["seed"] == 0 and saved["epsilon"] == float("inf")
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in recs) and recs[-1]["kind"] == "summary"
    assert run_finetune(cfg, tmp_path / "run") == saved  # same config: resumed, not retrained
    quiet = compose(
        _tiny_overrides(
            tmp_path,
            "train=real",
            "train.size=10",
            "finetune.lrs=[1e-4,1e-3]",
            "finetune.eval_limit=12",
            "finetune.dev_size=8",
            "progress=false",
        ),
        config_name="finetune",
    )
    assert run_finetune(quiet, tmp_path / "run") == saved  # keys that shape nothing may differ
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    other = compose(
        _tiny_overrides(
            tmp_path,
            "train=real",
            "train.size=10",
            "finetune.lrs=[1e-4,1e-3]",
            "finetune.eval_limit=10",
            "finetune.dev_size=8",
        ),
        config_name="finetune",
    )
    from gmtext.artifacts import ConfigChanged

    with pytest.raises(
        ConfigChanged, match=r"holds finetune output made with another config \(finetune.eval_limit 12 → 10\)"
    ):
        run_finetune(other, tmp_path / "run")  # used to retrain silently over the stored metrics
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before


def test_run_finetune_synthetic_zero_shot_fewshot(compose, tmp_path):
    from gmtext.stages.finetune import run_finetune

    syn = tmp_path / "synthetic.jsonl"
    syn.write_text(
        "".join(
            json.dumps({"text": t, "label": k}) + "\n"
            for t, k in [("awful", 0), ("superb", 1), ("boring", 0), ("lovely", 1)]
        )
    )
    m = run_finetune(
        compose(_tiny_overrides(tmp_path, "train=synthetic", f"train.path={syn}"), config_name="finetune"),
        tmp_path / "syn",
    )
    assert m["n_train"] == 4 and m["train_source"] == "synthetic"
    z = run_finetune(compose(_tiny_overrides(tmp_path, "train=none"), config_name="finetune"), tmp_path / "zero")
    f = run_finetune(
        compose(_tiny_overrides(tmp_path, "train=fewshot", "train.k=2"), config_name="finetune"), tmp_path / "few"
    )
    assert z["n_train"] == 0 and f["n_train"] == 4 and z["finetuner"] is None
    # zero-shot accuracy is exactly a direct evaluate of the model on the same fixed eval subset
    from gmtext.stages.finetune import eval_subset
    from gmtext.runtime import build_task, load_generator_model

    cfg = compose(_tiny_overrides(tmp_path, "train=none"), config_name="finetune")
    lm = load_generator_model(cfg)
    task = build_task(cfg, lm.tokenizer)
    exs = eval_subset(load_split("validation", NAMES, builtin="demo").examples, cfg.finetune.eval_limit)
    direct = evaluate(lm.model, task, exs, cfg.finetune.eval_batch_size, cfg.finetuner.max_text_tokens)
    assert z["n_eval"] == len(exs) and z["accuracy"] == direct.accuracy and z["confusion"] == direct.confusion
    assert z["accuracy"] == sum(z["confusion"][k][k] for k in range(2)) / z["n_eval"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"txt": "x", "label": 0}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) \['text'\]"):
        run_finetune(
            compose(_tiny_overrides(tmp_path, "train=synthetic", f"train.path={bad}"), config_name="finetune"),
            tmp_path / "bad",
        )


def test_progress_bars_follow_the_progress_setting(compose, tmp_path, capfd):
    """Fine-tuning and evaluation draw tqdm bars on stderr with progress=true (the default),
    none with progress=false."""
    from gmtext.stages.finetune import run_finetune

    base = [
        "debug=tiny",
        "train=real",
        "train.size=8",
        "finetuner.max_steps=3",
        "finetuner.batch_size=4",
        "finetune.eval_limit=8",
        "finetune.dev_size=4",
    ]
    run_finetune(compose(base + ["progress=true"], config_name="finetune"), tmp_path / "on")
    err = capfd.readouterr().err
    assert "finetune" in err and "3/3" in err and "evaluate" in err and "dev" in err
    run_finetune(compose(base + ["progress=false"], config_name="finetune"), tmp_path / "off")
    err = capfd.readouterr().err
    assert "finetune" not in err and "evaluate" not in err and "it/s" not in err
