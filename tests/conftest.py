"""Shared pytest setup (keep each part small and labelled)."""
import sys
from pathlib import Path

# --- import path: lets `pytest` import minigpt4_min from the repo root when not installed
REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


# --- a miniature MiniGPT-4 with random weights, for unit tests that must not depend on
#     the shipped data/tiny parts (built in ~1 s, shared by the whole session)
import pytest  # noqa: E402


def _build_random_model(seed: int = 0):
    import torch
    import transformers

    from minigpt4_min import corpus
    from minigpt4_min.config import get_config
    from minigpt4_min.encoder import VisualEncoder
    from minigpt4_min.llm import tiny_llm_config, train_tokenizer
    from minigpt4_min.model import MiniGPT4

    torch.manual_seed(seed)
    small_llm = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512)
    cfg = get_config("tiny", llm=small_llm)
    tok = train_tokenizer(corpus.documents(1500, seed=1), vocab_size=600)
    llm = transformers.LlamaForCausalLM(tiny_llm_config(len(tok), tok, small_llm))
    return MiniGPT4(cfg, VisualEncoder(cfg), llm, tok)


@pytest.fixture
def random_model():
    """A fresh random miniature MiniGPT-4 (tests may train it)."""
    return _build_random_model()
