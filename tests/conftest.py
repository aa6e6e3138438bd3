import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny():
    """Tiny random Llama + the SmolLM2 tokenizer + a binary sentiment task."""
    from gmtext.data import Task
    from gmtext.models import load_model

    lm = load_model("tiny-llama")
    task = Task(lm.tokenizer, "{text} It was", ["neg", "pos"], [" bad", " great"], start_token="<|endoftext|>")
    return lm, task


@pytest.fixture
def compose():
    """compose(overrides, config_name='generate', return_hydra_config=False) → cfg, as the console
    scripts would see it (with its `hydra:` node, e.g. a sweep's params, when asked)."""
    from hydra import compose as _compose, initialize_config_module

    from gmtext.config import register_configs

    register_configs()

    def _c(overrides=(), config_name="generate", return_hydra_config=False):
        with initialize_config_module(version_base="1.3", config_module="gmtext.conf"):
            return _compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)

    return _c


def rt_path():
    p = SHARED_DATA / "rotten_tomatoes"
    if not (p / "train.jsonl").exists():
        pytest.skip(f"real data not found at {p} (needs ../shared/data beside the repo)")
    return p
