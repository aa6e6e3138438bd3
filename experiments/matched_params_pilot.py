"""Pilot: how class-discriminative is the per-sequence matching distance for a matched-parameter set?

python experiments/matched_params_pilot.py NAME [overrides...]
  e.g. python experiments/matched_params_pilot.py lastblock_verb "matched_params=[final_norm,last_blocks:1]" \\
       match_loss=verbalizer

Makes (or reuses) a non-private rotten-tomatoes release under experiments/results/matched_params_pilot/NAME/release
(gitignored), then scores 10 held-out validation sentences per class of the *other* and the *same* class, and 10 LM
samples per class (the GRADMM initialisation), each against its class target. A useful matching distance ranks
same-class real text below other-class real text, and both below unoptimised LM samples.
"""

import json
import random
import statistics
import sys
import time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_quality import cfg_for, DATA
from gmtext.config import register_configs
from gmtext.data import load_split
from gmtext.gradients import MatchedParams
from gmtext.matching.objective import MatchingObjective
from gmtext.matching.projectors import ProjectionContext
from gmtext.matching.vocab import allowed_token_ids
from gmtext.runtime import build_task, load_generator_model
from gmtext.runtime import load_or_make_release
from gmtext.config import build

OUT = Path(__file__).resolve().parent / "results" / "matched_params_pilot"
name, *ov = sys.argv[1:]
register_configs()
torch.set_num_threads(2)
cfg = cfg_for(["dataset=rotten_tomatoes", f"dataset.path={DATA}", "logger=none", "progress=false", *ov])
lm = load_generator_model(cfg)
task = build_task(cfg, lm.tokenizer)
matched = MatchedParams(lm.model, list(cfg.matched_params))
t = time.time()
rel, _ = load_or_make_release(cfg, OUT / name / "release", lm, task, matched)
print("release s", time.time() - t)
emb = lm.model.get_input_embeddings().weight
ctx = ProjectionContext(
    lm.model, emb, allowed_token_ids(lm.tokenizer, emb.shape[0]), task.lm_context_ids(cfg.dataset.lm_context)
)
obj = MatchingObjective(
    lm.model,
    matched,
    rel.targets,
    task.label_token_ids,
    task.prefix_ids,
    task.suffix_ids,
    context_ids=ctx.prefix_ids,
    match_loss=cfg.match_loss,
)
n = 10
split = load_split("validation", list(cfg.dataset.label_names), path=cfg.dataset.path)
rng = random.Random(0)
by = split.by_class(task.num_classes)
L = cfg.dataset.length
res = {}
t = time.time()
for c in range(task.num_classes):
    for kind, pool in (("other", [e for k, ex in enumerate(by) if k != c for e in ex]), ("same", by[c])):
        for ex in rng.sample(pool, n):
            ids = task.encode_text(ex.text)[:L]
            toks = torch.tensor(ids).view(1, 1, -1).expand(task.num_classes, 1, -1).contiguous()
            _, s = obj.discrete(toks, per_sequence=True)
            res.setdefault(kind, []).append(float(s[c, 0]))
print("real scoring s", time.time() - t)
matcher = build(cfg.matcher)
gen = torch.Generator().manual_seed(0)
samp = matcher.sample_tokens(ctx, task.num_classes * n, L, gen).view(task.num_classes, n, L)
t = time.time()
d, s = obj.discrete(samp, per_sequence=True)
print("sample scoring s", time.time() - t)
res["lm_sample"] = s.flatten().tolist()
res["lm_sample_batch"] = d.tolist()
out = {k: (statistics.mean(v), min(v), max(v)) for k, v in res.items()}
print(name, json.dumps(out))
(OUT / name / "scores.json").write_text(json.dumps(res))
