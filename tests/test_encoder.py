"""The frozen encoder: transformers' BLIP-2 parts, loadable from a real BLIP-2 checkpoint.

Real weights cannot be downloaded here, so the test builds a miniature
`Blip2ForConditionalGeneration` checkpoint in the same format (sharded safetensors +
config.json, as on the hub) and checks our encoder reads it and gives the same query
outputs as transformers' own BLIP-2 model.
"""
import pytest
import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig,
                          Blip2VisionConfig, OPTConfig)

from minigpt4_min.config import get_config
from minigpt4_min.encoder import VisualEncoder

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8, qkv_bias=True, layer_norm_eps=1e-6)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               cross_attention_frequency=2, encoder_hidden_size=32, vocab_size=2)


@pytest.fixture
def blip2_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = Blip2Config(vision_config=Blip2VisionConfig(**VISION, initializer_range=0.02).to_dict(),
                      qformer_config=Blip2QFormerConfig(**QFORMER).to_dict(),
                      text_config=OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                            ffn_dim=32, num_attention_heads=2,
                                            word_embed_proj_dim=16).to_dict(),
                      num_query_tokens=4)
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():   # make every tensor distinct from a fresh init
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    return tmp_path, model


def test_loads_blip2_checkpoint_and_matches_transformers(blip2_checkpoint):
    folder, ref = blip2_checkpoint
    assert len(list(folder.glob("*.safetensors"))) > 1, "want a sharded checkpoint"
    # transformers' own BLIP-2 uses the ViT's eps in post_layernorm; the presets use LAVIS's
    # ln_vision eps (1e-5), checked against LAVIS in test_checkpoints.py
    cfg = get_config("vicuna7b", image_size=32, vision=VISION, qformer=QFORMER, num_query_tokens=4,
                     vit_dtype="float32", encoder_path=str(folder), ln_vision_eps=None)
    enc = VisualEncoder.load(cfg)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = enc(x)                                                        # (2, 4, 32)
        img = ref.vision_model(pixel_values=x).last_hidden_state
        q = ref.query_tokens.expand(2, -1, -1)
        theirs = ref.qformer(query_embeds=q, encoder_hidden_states=img).last_hidden_state
    assert ours.shape == (2, 4, 32)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_llama2_variant_groups_four_patches(blip2_checkpoint):
    folder, ref = blip2_checkpoint
    cfg = get_config("llama2-7b", image_size=32, vision=VISION, vit_dtype="float32", encoder_path=str(folder),
                     ln_vision_eps=None)
    enc = VisualEncoder.load(cfg)
    assert enc.qformer is None
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)                                                         # (1, 16/4, 4*32)
        patches = ref.vision_model(pixel_values=x).last_hidden_state[:, 1:]
    assert out.shape == (1, 4, 128) == (1, cfg.num_image_tokens, cfg.proj_in)
    torch.testing.assert_close(out[0, 1], patches[0, 4:8].reshape(-1))


def test_mismatched_checkpoint_names_the_problem(blip2_checkpoint):
    folder, _ = blip2_checkpoint
    cfg = get_config("vicuna7b", image_size=32, vision=dict(VISION, hidden_size=48),
                     qformer=dict(QFORMER, encoder_hidden_size=48), num_query_tokens=4, encoder_path=str(folder))
    with pytest.raises(ValueError, match="shape mismatches"):
        VisualEncoder.load(cfg)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VisualEncoder.load(cfg, folder / "nope")


def test_tiny_encoder_save_load_round_trip(tmp_path):
    cfg = get_config("tiny", encoder_path=str(tmp_path))
    torch.manual_seed(0)
    enc = VisualEncoder(cfg).eval()
    enc.save(tmp_path)
    back = VisualEncoder.load(cfg)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), back(x))


def test_attention_maps_use_eager_and_match_sdpa_outputs():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    enc = VisualEncoder(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = enc(x)                                          # SDPA
        feats, maps = enc(x, output_attentions=True)           # eager, for the maps
        again = enc(x)                                         # back to SDPA
    torch.testing.assert_close(fast, feats, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast, again)
    assert enc.qformer.config._attn_implementation == "sdpa"
    n_cross = cfg.qformer["num_hidden_layers"] // cfg.qformer["cross_attention_frequency"]
    assert len(maps) == n_cross
    assert maps[0].shape == (2, cfg.qformer["num_attention_heads"], cfg.num_query_tokens, 1 + 64)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, cfg.qformer["num_attention_heads"], cfg.num_query_tokens))


def test_a_bf16_vit_stays_close_to_fp32_and_keys_its_own_feature_cache(tmp_path):
    """`vit_dtype="bfloat16"` (the paper's fp16 ViT, on a CPU): the ViT's weights in bf16,
    ln_vision and the Q-Former in fp32; on rendered scenes its features stay within 2 % of the
    fp32 ViT's, and a feature cache written in one dtype is not read in the other."""
    from types import SimpleNamespace

    from minigpt4_min import shapesworld as sw
    from minigpt4_min import stage1
    from minigpt4_min.data import ImageProcessor

    enc32 = VisualEncoder.load(get_config("tiny"))
    enc16 = VisualEncoder.load(get_config("tiny", vit_dtype="bfloat16"))
    assert {p.dtype for n, p in enc16.vision.named_parameters() if "post_layernorm" not in n} == {torch.bfloat16}
    assert {p.dtype for p in enc16.vision.post_layernorm.parameters()} == {torch.float32}
    assert {p.dtype for p in enc16.qformer.parameters()} == {torch.float32}
    cfg = get_config("tiny")
    x = ImageProcessor(cfg, train=False).batch([sw.render(sw.scene_at("test", i), 64) for i in range(8)])
    with torch.no_grad():
        f32, f16 = enc32(x), enc16(x)                                   # (8, Q, Hq)
    assert f16.dtype == torch.float32 and f16.shape == f32.shape
    rel = ((f16 - f32).norm() / f32.norm()).item()
    assert 0 < rel < 0.02, rel
    (tmp_path / "a.tar").write_bytes(b"x")
    keys = {stage1._fingerprint(SimpleNamespace(cfg=get_config("tiny", vit_dtype=d), encoder=enc32), [tmp_path / "a.tar"])
            for d in ("float32", "bfloat16")}                             # the same weights, two dtypes
    assert len(keys) == 2
