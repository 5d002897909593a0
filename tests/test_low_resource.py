"""The official demo's low-resource mode (issue 14, part 4): the LLM in 8-bit through
bitsandbytes on one GPU, the ViT on the CPU in fp32; on a machine without CUDA, one
clear error. These run on the CPU: the GPU half is issue 14's part 7."""
import tomllib
from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig

from minigpt4_min import llm as llm_mod
from minigpt4_min.config import DATA_DIR, get_config
from minigpt4_min.model import MiniGPT4

ROOT = Path(__file__).resolve().parents[1]
TINY_LLM = DATA_DIR / "tiny" / "llm"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


def test_from_pretrained_kwargs_8bit_on_one_gpu():
    kw = llm_mod.from_pretrained_kwargs("float16", low_resource=True, device=1)
    q = kw["quantization_config"]
    assert isinstance(q, BitsAndBytesConfig) and q.load_in_8bit and not q.load_in_4bit
    assert kw["device_map"] == {"": 1} and kw["dtype"] is torch.float16
    assert "load_in_8bit" not in kw                      # the deprecated kwarg is not used
    assert llm_mod.from_pretrained_kwargs("float16") == {"dtype": torch.float16}


@no_cuda
def test_without_cuda_one_error_naming_what_is_missing():
    with pytest.raises(RuntimeError) as e:
        llm_mod.load_llm(TINY_LLM, "float16", low_resource=True)
    msg = str(e.value)
    assert "low_resource=True" in msg and "CUDA GPU" in msg and "torch.cuda.is_available() is False" in msg
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert "bitsandbytes >= " in msg and "pip install -e '.[gpu]'" in msg
    # the model's config reaches the same check before any weight is read
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        MiniGPT4.from_config(get_config("tiny", low_resource=True))


def test_error_names_only_what_is_missing(monkeypatch):
    from transformers.utils import import_utils as iu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(iu, "is_bitsandbytes_available", lambda *a: False)
    monkeypatch.setattr(iu, "is_accelerate_available", lambda *a: True)
    with pytest.raises(RuntimeError) as e:
        llm_mod.require_8bit()
    assert "bitsandbytes >= 0.46.1" in str(e.value) and "CUDA" not in str(e.value)
    assert "accelerate" not in str(e.value).split(":")[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(iu, "is_bitsandbytes_available", lambda *a: True)
    with pytest.raises(RuntimeError) as e:
        llm_mod.require_8bit()
    assert "CUDA GPU" in str(e.value) and "pip install" not in str(e.value)


def test_load_llm_hands_the_8bit_kwargs_to_the_real_from_pretrained(monkeypatch):
    """With our own check out of the way, the real `from_pretrained` receives the 8-bit
    kwargs (recorded on the way through) and, on this CPU machine, refuses them itself."""
    seen = {}
    real = llm_mod.LlamaForCausalLM.from_pretrained

    def through(path, **kw):
        seen.update(kw)
        return real(path, **kw)

    monkeypatch.setattr(llm_mod, "require_8bit", lambda: None)
    monkeypatch.setattr(llm_mod.LlamaForCausalLM, "from_pretrained", through)
    with pytest.raises((ImportError, ValueError, RuntimeError)) as e:
        llm_mod.load_llm(TINY_LLM, "float16", low_resource=True, device=0)
    assert seen["quantization_config"].load_in_8bit and seen["device_map"] == {"": 0}
    assert "accelerate" in str(e.value) or "bitsandbytes" in str(e.value) or "CUDA" in str(e.value), e.value


def test_low_resource_layout_vit_on_cpu_in_fp32_rest_on_the_llm_device(random_model):
    m = random_model
    m.encoder.vision.half()                                # as at full scale (vit_dtype float16)
    llm_device = {p.device for p in m.llm.parameters()}
    m.low_resource_layout("meta")                          # "meta" stands in for the GPU
    assert {(p.device.type, p.dtype) for p in m.encoder.vision.parameters()} == {("cpu", torch.float32)}
    assert {p.device.type for p in m.encoder.qformer.parameters()} == {"meta"}
    assert m.encoder.query_tokens.device.type == "meta" and not m.encoder.query_tokens.requires_grad
    assert m.llama_proj.weight.device.type == "meta" and m.llama_proj.weight.requires_grad
    assert {p.device for p in m.llm.parameters()} == llm_device   # from_pretrained placed it


def test_bitsandbytes_is_an_optional_gpu_extra_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("bitsandbytes") for d in project["optional-dependencies"]["gpu"])
    cpu = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert not any(d.startswith(("bitsandbytes", "accelerate")) for d in cpu)


@no_cuda
def test_chat_command_prints_the_estimate_then_the_clear_error(tmp_path, capsys):
    """`chat --scale vicuna13b --low-resource` on this CPU machine: the memory estimate of the
    8-bit demo first (before anything loads), then the error naming what is missing."""
    from minigpt4_min import shapesworld as sw
    from minigpt4_min.__main__ import main

    image = tmp_path / "img.png"
    sw.test_image(0, 64).save(image)
    assert main(["chat", "--image", str(image), "--scale", "vicuna13b", "--low-resource"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("note: estimated memory: vicuna13b (8-bit) chat, 1 beam(s) x 2000 tokens")
    assert err[1].startswith("error: low_resource=True") and "CUDA GPU" in err[1] and len(err) == 2
