"""The GPU profile (minigpt4_min/gpu_profile.py, notebooks/gpu_params): every parameter is
declared, the preflight check names every missing input in one error, and the plumbing mode
writes random weights and data in the official formats that the loaders read (at a small
size here: full size needs a GPU machine)."""
import dataclasses
import json

import pytest
import torch

from minigpt4_min import gpu_profile, series
from minigpt4_min.__main__ import main
from minigpt4_min.checkpoints import LAVIS_FILES
from minigpt4_min.config import get_config
from minigpt4_min.data import load_image, read_cc_sbu_align, read_shards, shard_urls
from minigpt4_min.encoder import VisualEncoder
from minigpt4_min.model import MiniGPT4
from minigpt4_min.stage1 import shard_list
from minigpt4_min.stage2_data import image_files

NOTEBOOKS = series.notebooks()
FULL = [nb for nb in NOTEBOOKS if nb.stem[:2] in ("02", "03", "04", "05")]


def small_vicuna():
    """vicuna7b's layout (LAVIS encoder + Q-Former, LLaMA, fp16 LLM) at a size a CPU writes in seconds."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   cross_attention_frequency=2, encoder_hidden_size=32, vocab_size=2)
    llm = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               vocab_size=32000, max_position_embeddings=256)
    return get_config("vicuna7b", image_size=32, vision=vision, qformer=qformer, num_query_tokens=8,
                      llm=llm, vit_dtype="float32")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_profile_parameters_are_declared_with_their_types(nb):
    declared = series.declared_parameters(nb)
    params = gpu_profile.profile_parameters(nb)
    assert set(params) <= set(declared)
    for k, v in params.items():
        assert isinstance(v, type(declared[k])), f"{nb.stem}: {k}={v!r} vs default {declared[k]!r}"
    if nb in FULL:        # the full-scale notebooks: Vicuna-7B on the GPU, weights from MINIGPT4_MODELS
        assert params["scale"] == "vicuna7b" and params["device"] == "cuda"
        assert params["encoder_path"].startswith("${MINIGPT4_MODELS}/")
        assert params["llm_path"] == "${MINIGPT4_MODELS}/vicuna-7b"


def test_profile_sets_the_real_inputs_and_cuts_the_paper_to_a_ci_run():
    p = {nb.stem[:2]: gpu_profile.profile_parameters(nb) for nb in NOTEBOOKS}
    assert p["04"]["align_dir"] == "${MINIGPT4_DATA}/cc_sbu_align" and p["04"]["batch_size"] == 12
    assert 0 < p["04"]["steps"] < 400 and p["04"]["lr"] == 3e-5             # paper: 400 steps of 12, lr 3e-5
    assert p["02"]["batch_size"] == 64 and 0 < p["02"]["steps"] < 20000 and p["02"]["lr"] == 1e-4
    assert p["05"]["stage2_checkpoint"] == "${MINIGPT4_MODELS}/pretrained_minigpt4_7b.pth"
    assert p["02"]["train_shards"] == "${MINIGPT4_DATA}/laion" and "n_train" not in p["02"]   # real shards
    assert p["03"]["image_dir"] == "${MINIGPT4_DATA}/cc_images"                             # real images


def test_an_undeclared_profile_parameter_is_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_profile, "GPU_PARAMS_DIR", tmp_path)
    nb = NOTEBOOKS[0]
    (tmp_path / f"{nb.stem}.json").write_text(json.dumps({"_note": "a note is fine", "no_such": 1}))
    with pytest.raises(ValueError, match=rf"{nb.stem}\.json: parameters \['no_such'\] are not declared"):
        gpu_profile.profile_parameters(nb)
    (tmp_path / f"{nb.stem}.json").unlink()
    with pytest.raises(FileNotFoundError, match="no GPU profile"):
        gpu_profile.profile_parameters(nb)


def test_expand_replaces_set_variables_and_reports_unset_ones():
    env = {"A": "/m"}
    assert gpu_profile.expand("${A}/vicuna-7b", env) == ("/m/vicuna-7b", set())
    assert gpu_profile.expand(["${A}/x", "${B}/y"], env) == (["/m/x", "${B}/y"], {"B"})
    assert gpu_profile.expand(64, env) == (64, set())


def test_preflight_names_every_missing_input_in_one_error(tmp_path):
    models = tmp_path / "models"
    (models / "blip2").mkdir(parents=True)
    (models / "blip2" / LAVIS_FILES[0]).write_bytes(b"x")               # only the ViT file
    (models / "vicuna-7b").mkdir()
    (models / "vicuna-7b" / "config.json").write_text("{}")            # no weights, no tokenizer
    with pytest.raises(gpu_profile.PreflightError) as e:
        gpu_profile.ready(NOTEBOOKS, {"MINIGPT4_MODELS": str(models)})  # MINIGPT4_DATA unset
    msg = str(e.value)
    assert msg.count("\n  - ") == 7, msg
    assert "MINIGPT4_DATA is not set" in msg and "MINIGPT4_MODELS is not set" not in msg
    assert f"no {LAVIS_FILES[1]}" in msg and f"no {LAVIS_FILES[0]}" not in msg
    assert "vicuna-7b (llm_path of notebook 02, 03, 04, 05): HF-format Vicuna v0 weights" in msg
    assert "no *.safetensors / *.bin weights, no tokenizer.json / tokenizer.model" in msg
    assert "pretrained_minigpt4_7b.pth (stage2_checkpoint of notebook 05)" in msg
    assert "${MINIGPT4_DATA}/cc_sbu_align: does not exist" in msg and "from: MiniGPT-4's cc_sbu_align" in msg
    assert "laion (train_shards of notebook 02): stage-1 image-caption webdataset shards" in msg
    assert "cc_images (image_dir of notebook 03): images for the stage-1 model to describe" in msg
    assert "make series-gpu PLUMBING=1" in msg
    # the notebooks that need no weights start without any variable set
    assert set(gpu_profile.ready(NOTEBOOKS[:2], {})) == {NOTEBOOKS[0].stem, NOTEBOOKS[1].stem}


def test_preflight_checks_shard_lists_and_image_folders_as_the_notebooks_read_them(tmp_path):
    from minigpt4_min.data import write_shards

    nb02, nb03 = (nb for nb in NOTEBOOKS if nb.stem[:2] in ("02", "03"))
    env = {"MINIGPT4_MODELS": str(tmp_path / "models"), "MINIGPT4_DATA": str(tmp_path / "data")}
    (tmp_path / "data" / "laion").mkdir(parents=True)
    (tmp_path / "data" / "cc_images").mkdir()
    (tmp_path / "data" / "cc_images" / "notes.txt").write_text("no image")

    def problems():
        with pytest.raises(gpu_profile.PreflightError) as e:
            gpu_profile.ready([nb02, nb03], env)
        return [line for line in str(e.value).splitlines() if line.startswith("  - ")]

    got = [p for p in problems() if "train_shards" in p or "image_dir" in p]
    assert any("laion (train_shards of notebook 02)" in p and "directory holds no *.tar shards" in p for p in got)
    assert any("cc_images (image_dir of notebook 03)" in p and "no .jpg / .jpeg / .png / .webp files" in p
               for p in got)
    write_shards([("k0", torch.zeros(8, 8, 3, dtype=torch.uint8).numpy(), {"caption": "c"})],
                 tmp_path / "data" / "laion", prefix="00000")
    load_image(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()).save(tmp_path / "data" / "cc_images" / "a.jpg")
    assert not [p for p in problems() if "train_shards" in p or "image_dir" in p]    # found: only the weights left
    assert gpu_profile._shards_missing(f"{tmp_path}/data/laion/00000-{{000000..000001}}.tar") == [
        f"1 shard(s) not found: {tmp_path}/data/laion/00000-000001.tar"]
    assert gpu_profile._shards_missing(f"{tmp_path}/data/laion, {tmp_path}/nope") == [f"{tmp_path}/nope does not exist"]


def test_cli_preflight_fails_before_any_notebook(tmp_path, monkeypatch, capsys):
    for v in gpu_profile.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    assert main(["series", "--gpu", "--preflight", "--out", str(tmp_path)]) == 2
    assert "cannot start, 8 input(s) missing" in capsys.readouterr().err
    assert main(["series", "--gpu", "--out", str(tmp_path / "run")]) == 2       # a real run stops the same way
    assert not (tmp_path / "run" / "notebooks").exists()
    assert main(["series", "--plumbing"]) == 2 and main(["series", "--gpu", "--ci"]) == 2


def test_write_lavis_round_trips_through_the_reader(tmp_path):
    cfg = small_vicuna()
    torch.manual_seed(0)
    enc = VisualEncoder(cfg)
    from minigpt4_min.checkpoints import write_lavis
    eva, blip2 = write_lavis(enc, tmp_path)
    raw = torch.load(eva, weights_only=True)
    assert {k.split(".")[1] for k in raw if k.startswith("blocks.")} == {"0", "1", "2"}   # one more block, as EVA-CLIP-g
    assert raw["blocks.0.attn.q_bias"].dtype == torch.float16
    assert set(torch.load(blip2, weights_only=True)) == {"model"}
    back = VisualEncoder.load(cfg, tmp_path).state_dict()
    for k, v in enc.state_dict().items():
        want = v.half().float() if k.startswith("vision.") and "post_layernorm" not in k else v
        if k.endswith("self_attn.qkv.bias"):
            want = torch.cat([want[:32], torch.zeros(32), want[64:]])       # LAVIS has no k bias
        assert torch.equal(back[k], want), k


def test_plumbing_writes_what_the_profile_reads_in_the_official_formats(tmp_path, monkeypatch, capsys):
    """`series --gpu --plumbing --preflight`, the plumbing at a small size: the preflight passes
    on what it wrote, and the library reads every file the way it reads the real ones."""
    cfg = small_vicuna()
    monkeypatch.setattr(gpu_profile, "profile_config", lambda chosen: cfg)
    for v in gpu_profile.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    root = tmp_path / "plumb"
    assert main(["series", "--gpu", "--plumbing", "--preflight", "--plumbing-dir", str(root),
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    params = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert params["04_stage2_finetuning"]["align_dir"] == str(root / "data" / "cc_sbu_align")
    p5 = params["05_chat"]
    paths = dataclasses.replace(cfg, encoder_path=p5["encoder_path"], llm_path=p5["llm_path"])
    model = MiniGPT4.from_config(paths, projection=p5["stage2_checkpoint"])   # as notebook 05 loads them
    assert model.llm.dtype == torch.float16 and model.llm.config.hidden_size == 64
    assert model.llama_proj.weight.shape == (64, 32)
    assert model.projection_source == p5["stage2_checkpoint"]
    pairs = read_cc_sbu_align(root / "data" / "cc_sbu_align")
    assert len(pairs) == 64 and all(p.suffix == ".jpg" for _, p, _ in pairs[:3])
    samples = list(read_shards(shard_urls(str(root / "data" / "laion" / "train-{000000..000001}.tar"))))
    assert len(samples) == 128 and samples[0].caption and samples[0].image.size == (32, 32)
    assert shard_list(params["02_stage1_pretraining"]["train_shards"]) == [          # as notebook 02 reads it
        str(root / "data" / "laion" / f"train-00000{k}.tar") for k in (0, 1)]
    images = image_files(params["03_stage2_data"]["image_dir"])                     # as notebook 03 reads it
    assert len(images) == 64 and load_image(images["img00000"]).size == (32, 32)
    stamp = (root / "plumbing.json").stat().st_mtime_ns            # the same sizes again: reused
    gpu_profile.write_plumbing(root, NOTEBOOKS, cfg)
    assert (root / "plumbing.json").stat().st_mtime_ns == stamp



def test_readme_gpu_section_shows_the_tested_commands_and_the_profile_paths():
    """The README's commands are the ones these tests and test_workflows.py (make -n) run; its
    folder layout is the one the profile reads."""
    readme = (series.REPO_ROOT / "README.md").read_text()
    sec = readme[readme.index("### Running the series on a GPU"):readme.index("\n## Tests")]
    block = sec[sec.index("```bash\n") + 8:sec.index("```", sec.index("```bash\n") + 8)]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["make series-gpu", ".venv/bin/python -m minigpt4_min series --gpu --preflight",
                        "make series-gpu PLUMBING=1"]
    paths = {v for nb in NOTEBOOKS for k, v in gpu_profile.profile_parameters(nb).items() if k in gpu_profile.NEEDS}
    for p in paths:
        shown = p.replace("${", "$").replace("}", "")
        assert shown in sec, shown
