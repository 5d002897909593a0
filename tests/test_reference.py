"""The reference projection: least squares onto the notes' embeddings reads images back as notes."""
import pytest
import torch

from minigpt4_min import corpus, reference, stage1
from minigpt4_min import shapesworld as sw
from minigpt4_min.config import get_config
from minigpt4_min.llm import train_tokenizer
from minigpt4_min.model import MiniGPT4


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return MiniGPT4.from_config(get_config("tiny"))


def test_fitted_projection_reads_back_the_notes(shipped):
    fit = stage1.scene_features(shipped, sw.split("train", 300), prefix="fit")
    test = stage1.scene_features(shipped, sw.split("test", 30), prefix="test")
    before = reference.nearest_words(shipped, test.feats)          # the untrained projection
    sd = reference.fit_notes_projection(shipped, fit)
    assert sd["weight"].shape == shipped.llama_proj.weight.shape and sd["bias"].shape == shipped.llama_proj.bias.shape
    shipped.llama_proj.load_state_dict(sd)
    after = reference.nearest_words(shipped, test.feats)

    def word_acc(words):
        pairs = [(a, b) for s, w in zip(test.scenes, words) for a, b in zip(sw.notes(s).split(), w)]
        return sum(a == b for a, b in pairs) / len(pairs)
    assert all(len(w) == sw.NOTES_LEN for w in after)
    assert word_acc(after) >= 0.98          # held-out images: the map generalises
    assert word_acc(before) < 0.2           # and it is the fit that did it
    # deterministic: the same images give the same weights
    again = reference.fit_notes_projection(shipped, fit)
    assert torch.equal(again["weight"], sd["weight"]) and torch.equal(again["bias"], sd["bias"])


def test_best_linear_map_is_in_place_within_the_block_only(shipped):
    own = {k: v.clone() for k, v in shipped.llama_proj.state_dict().items()}
    fit = stage1.scene_features(shipped, sw.split("train", 120), prefix="ref")
    with reference.best_linear_map(shipped, 120) as m:
        assert m is shipped
        assert torch.equal(m.llama_proj.weight, reference.fit_notes_projection(shipped, fit)["weight"])
        assert not torch.equal(m.llama_proj.weight, own["weight"])
    assert all(torch.equal(v, own[k]) for k, v in shipped.llama_proj.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"):            # restored on an error too
        with reference.best_linear_map(shipped, 40):
            raise RuntimeError("inside")
    assert torch.equal(shipped.llama_proj.weight, own["weight"])


def test_notes_token_ids_one_per_word(shipped):
    s = sw.split("test", 1)[0]
    ids = reference.notes_token_ids(shipped.tokenizer, s)
    assert [shipped.tokenizer.decode([i]).strip() for i in ids] == sw.notes(s).split()


def test_clear_errors(shipped):
    s = sw.split("test", 1)[0]
    bytes_only = train_tokenizer(corpus.documents(20, seed=1), vocab_size=260)   # splits the words
    with pytest.raises(ValueError, match="one per word"):
        reference.notes_token_ids(bytes_only, s)
    fs = stage1.scene_features(shipped, [s])
    fs.scenes = [None]
    with pytest.raises(ValueError, match="needs the scenes"):
        reference.fit_notes_projection(shipped, fs)
