"""Tests of alignment.models: the tiny model, finding models offline, loading, and LoRA."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydantic
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from alignment.models import (
    DiffusionComponents,
    LoraSpec,
    ModelNotAvailableError,
    ModelSpec,
    adapters_disabled,
    add_lora,
    build_offline_clip_tokenizer,
    build_tiny_components,
    check_model_available,
    find_local_model,
    load_components,
    load_lora_into_unet,
    lora_state_dict,
    save_lora_weights,
    save_tiny_pipeline,
    trainable_parameters,
)

ARCHS = ["sdxl", "sd15"]


def _unet_inputs(components: DiffusionComponents, batch: int = 2) -> dict:
    """Random latents and random (not encoded) conditioning of the right shapes.

    The latents are 16x16, smaller than the tiny model's 32x32, to keep the tests fast.
    """
    generator = torch.Generator().manual_seed(0)
    width = components.unet.config.cross_attention_dim
    inputs = {
        "sample": torch.randn(batch, 4, 16, 16, generator=generator),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(batch, 77, width, generator=generator),
    }
    if components.arch == "sdxl":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        }
    return inputs


def _nudge_lora_b(unet: torch.nn.Module, seed: int = 1) -> None:
    """Give LoRA B non-zero values, as training would, so the adapter has an effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def _state_dicts_equal(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_components_are_deterministic_by_seed(arch):
    rng_before = torch.random.get_rng_state()
    first = build_tiny_components(arch, seed=0)
    second = build_tiny_components(arch, seed=0)
    other = build_tiny_components(arch, seed=1)
    assert torch.equal(rng_before, torch.random.get_rng_state()), "building must not move the global RNG"

    for module_name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(first, module_name)
        if module is None:
            assert arch == "sd15"
            continue
        assert _state_dicts_equal(module, getattr(second, module_name)), module_name
        assert not _state_dicts_equal(module, getattr(other, module_name)), module_name
    assert first.vae_scale_factor == 2
    assert (first.text_encoder_2 is not None) == (arch == "sdxl")


def test_offline_clip_tokenizer_handles_any_text(tmp_path):
    tokenizer = build_offline_clip_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    ids = tokenizer(["a red cube", "", "ümlaut ✓"], padding="max_length", max_length=77, truncation=True).input_ids
    assert all(len(row) == 77 for row in ids)
    assert ids[1][:2] == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert tokenizer.unk_token_id not in ids[2][1 : ids[2].index(tokenizer.eos_token_id)]


def test_specs_validate():
    with pytest.raises(pydantic.ValidationError):
        ModelSpec(pretrained="tiny", unknown_field=1)
    with pytest.raises(pydantic.ValidationError):
        LoraSpec(rank=0)
    with pytest.raises(pydantic.ValidationError):
        LoraSpec(init="pissa")
    assert LoraSpec(rank=4).effective_alpha == 4.0


@pytest.mark.parametrize("arch", ARCHS)
def test_add_lora_starts_as_identity(arch):
    components = build_tiny_components(arch)
    inputs = _unet_inputs(components)
    with torch.no_grad():
        before = components.unet(**inputs).sample
        add_lora(components.unet, LoraSpec(rank=4))
        after = components.unet(**inputs).sample
    assert torch.equal(before, after), "LoRA B starts at zero: the adapter must be a no-op"


def test_add_lora_trains_only_float32_lora_on_a_bf16_base():
    unet = build_tiny_components("sd15").unet.to(torch.bfloat16)
    add_lora(unet, LoraSpec(rank=4))
    trainable = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for name, p in unet.named_parameters() if "lora_" not in name)
    assert [id(p) for p in trainable_parameters(unet)] == [id(p) for p in trainable.values()]


def test_adapters_disabled_gives_the_base_model_and_always_re_enables():
    components = build_tiny_components("sdxl")
    unet = components.unet
    inputs = _unet_inputs(components)
    with torch.no_grad():
        base = unet(**inputs).sample
    add_lora(unet, LoraSpec(rank=4))
    _nudge_lora_b(unet)
    with torch.no_grad():
        adapted = unet(**inputs).sample
        assert not torch.allclose(adapted, base)
        with adapters_disabled(unet):
            assert torch.allclose(unet(**inputs).sample, base, atol=1e-6)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), adapters_disabled(unet):
        raise Boom
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, adapted)
    assert all(p.requires_grad for name, p in unet.named_parameters() if "lora_" in name)

    class Wrapper(torch.nn.Module):  # stands in for DDP, which exposes the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    with torch.no_grad(), adapters_disabled(Wrapper(unet)):
        assert torch.allclose(unet(**inputs).sample, base, atol=1e-6)


def test_adapters_disabled_refuses_a_unet_without_adapter():
    with pytest.raises(ValueError, match="LoRA"), adapters_disabled(build_tiny_components("sd15").unet):
        pass


def _sample(pipeline, seed: int = 0):
    return pipeline(
        prompt="a red circle",
        num_inference_steps=2,
        guidance_scale=1.0,  # no classifier-free guidance: half the UNet work
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_lora_loads_into_a_fresh_pipeline_and_changes_its_output(arch, tmp_path):
    trained = build_tiny_components(arch, seed=3)
    # alpha != rank checks that the scaling travels in the file's metadata.
    add_lora(trained.unet, LoraSpec(rank=4, alpha=2.0))
    _nudge_lora_b(trained.unet)
    assert save_lora_weights(trained.unet, tmp_path, arch) == tmp_path
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    expected = _sample(trained.to_pipeline())

    pipeline = build_tiny_components(arch, seed=3).to_pipeline()
    base = _sample(pipeline)
    pipeline.load_lora_weights(tmp_path)
    with_lora = _sample(pipeline)
    assert abs(with_lora - base).max() > 1e-3
    assert abs(with_lora - expected).max() < 1e-4


@pytest.mark.parametrize("has_adapter", [False, True], ids=["fresh", "resume"])
def test_load_lora_into_unet_round_trips(has_adapter, tmp_path):
    trained = build_tiny_components("sd15").unet
    add_lora(trained, LoraSpec(rank=4, alpha=8.0))
    _nudge_lora_b(trained)
    save_lora_weights(trained, tmp_path, "sd15")

    target = build_tiny_components("sd15").unet
    if has_adapter:
        add_lora(target, LoraSpec(rank=4, alpha=8.0))
    load_lora_into_unet(target, tmp_path)
    saved = lora_state_dict(trained)
    loaded = lora_state_dict(target)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in saved.values())
    components = build_tiny_components("sd15")
    inputs = _unet_inputs(components)
    with torch.no_grad():
        assert torch.allclose(trained(**inputs).sample, target(**inputs).sample, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_tiny_pipeline_loads_offline_with_identical_weights(arch, tmp_path):
    directory = save_tiny_pipeline(arch, tmp_path / "tiny", seed=2)
    pipeline_class = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(directory, local_files_only=True)
    assert _sample(pipeline).shape == (1, 64, 64, 3)

    built = build_tiny_components(arch, seed=2)
    loaded = load_components(ModelSpec(arch=arch, pretrained=str(directory)))
    for module_name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(built, module_name) is not None:
            assert _state_dicts_equal(getattr(built, module_name), getattr(loaded, module_name)), module_name
    assert loaded.tokenizer("a cube").input_ids == built.tokenizer("a cube").input_ids
    assert loaded.noise_scheduler.config.num_train_timesteps == 1000
    assert torch.equal(loaded.noise_scheduler.alphas_cumprod, built.noise_scheduler.alphas_cumprod)
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    assert not loaded.text_encoder.training


def test_load_components_keeps_the_vae_float32_and_applies_a_vae_override(tmp_path):
    override = save_tiny_pipeline("sdxl", tmp_path / "other", seed=5)
    spec = ModelSpec(arch="sdxl", pretrained="tiny", vae=str(override))
    components = load_components(spec, dtype=torch.bfloat16)
    assert components.unet.dtype == torch.bfloat16
    assert components.text_encoder_2.dtype == torch.bfloat16
    assert components.vae.dtype == torch.float32
    assert _state_dicts_equal(components.vae, build_tiny_components("sdxl", seed=5).vae)


def test_check_model_available_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_model_available(ModelSpec())  # tiny is always there

    missing_dir = tmp_path / "no_such_model"
    with pytest.raises(ModelNotAvailableError) as error:
        check_model_available(ModelSpec(pretrained=str(missing_dir)))
    assert str(missing_dir) in str(error.value) and "--profile tiny" in str(error.value)

    hub_id = "no-such-org/uncached-diffusion-model"
    with pytest.raises(ModelNotAvailableError) as error:
        check_model_available(ModelSpec(pretrained=hub_id))
    assert hub_id in str(error.value) and "--profile tiny" in str(error.value)

    with pytest.raises(ModelNotAvailableError, match="no-such-org/uncached-vae"):
        check_model_available(ModelSpec(vae="no-such-org/uncached-vae"))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotAvailableError, match="unet/"):
        check_model_available(ModelSpec(pretrained=str(empty)))


def test_check_model_available_catches_an_arch_mismatch(tmp_path):
    directory = save_tiny_pipeline("sd15", tmp_path / "sd15")
    check_model_available(ModelSpec(arch="sd15", pretrained=str(directory)))
    with pytest.raises(ModelNotAvailableError, match="sd15"):
        check_model_available(ModelSpec(arch="sdxl", pretrained=str(directory)))


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache under tmp_path, and no network."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read the variable at import time; its constant is what snapshot_download uses.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _cached_snapshot(cache: Path, repo_id: str) -> Path:
    """Lay out ``repo_id`` as huggingface_hub does: refs/main names the snapshot folder, returned (empty)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text(commit)
    snapshot = repo_cache / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_a_hub_id_in_the_local_cache_loads_without_network(hub_cache):
    save_tiny_pipeline("sd15", _cached_snapshot(hub_cache, "tiny-org/tiny-sd15"), seed=4)

    spec = ModelSpec(arch="sd15", pretrained="tiny-org/tiny-sd15")
    check_model_available(spec)
    components = load_components(spec, dtype=torch.bfloat16)
    assert components.text_encoder.dtype == torch.bfloat16 and components.vae.dtype == torch.float32
    reference = build_tiny_components("sd15", seed=4).unet.to(torch.bfloat16)
    assert _state_dicts_equal(components.unet, reference)
    with pytest.raises(ModelNotAvailableError, match="revision 'v2'"):
        check_model_available(ModelSpec(arch="sd15", pretrained="tiny-org/tiny-sd15", revision="v2"))


def test_find_local_model_finds_paths_and_cached_hub_ids_and_names_what_is_missing(tmp_path, hub_cache):
    snapshot = _cached_snapshot(hub_cache, "org/model")
    local = tmp_path / "local"
    for directory in (snapshot, local):
        directory.mkdir(exist_ok=True)
        (directory / "weights.pt").write_text("weights")

    assert find_local_model(str(local)) == local
    assert find_local_model(local, filename="weights.pt") == local / "weights.pt"
    assert find_local_model(local / "weights.pt", filename="weights.pt") == local / "weights.pt"
    assert find_local_model("org/model").resolve() == snapshot.resolve()
    assert find_local_model("org/model", filename="weights.pt").resolve() == (snapshot / "weights.pt").resolve()

    missing = tmp_path / "nowhere"
    cases = [
        ({"name_or_path": local / "weights.pt"}, ["is a file"]),
        ({"name_or_path": missing}, [f"'{missing}' does not exist"]),
        (
            {"name_or_path": "org/model", "revision": "v2"},
            ["'org/model' at revision 'v2'", "download org/model --revision v2"],
        ),
        (
            {"name_or_path": "org/other", "filename": "head.pth"},
            ["'head.pth' of 'org/other'", "download org/other head.pth"],
        ),
        ({"name_or_path": local, "filename": "head.pth"}, [f"{local} has no head.pth"]),
        (
            {"name_or_path": "org/model", "filename": "head.pth"},
            ["'head.pth' of 'org/model' is not in its cached snapshot"],
        ),
    ]
    for kwargs, phrases in cases:
        with pytest.raises(ModelNotAvailableError) as error:
            find_local_model(what="scorer head", hint="Or run without it.", **kwargs)
        message = str(error.value)
        assert all(phrase in message for phrase in [*phrases, "scorer head", "Or run without it."]), message


def _save_tiny_clip(directory: Path) -> None:
    """A tiny CLIP model with its tokenizer and image processor: what the CLIP score scorer loads."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = build_offline_clip_tokenizer(directory)
    tokenizer.save_pretrained(directory)
    small = {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**small, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    vision = {**small, "image_size": 16, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(directory)


def test_the_diffusion_loader_and_a_reward_scorer_find_models_through_one_function(tmp_path, hub_cache, monkeypatch):
    from alignment.models import locate
    from alignment.rewards import load_scorer

    pipeline_snapshot = _cached_snapshot(hub_cache, "org/tiny-sd15")
    save_tiny_pipeline("sd15", pipeline_snapshot, seed=4)
    clip_snapshot = _cached_snapshot(hub_cache, "org/tiny-clip")
    _save_tiny_clip(clip_snapshot)
    local_pipeline = shutil.copytree(pipeline_snapshot, tmp_path / "local-sd15")
    local_clip = shutil.copytree(clip_snapshot, tmp_path / "local-clip")

    found: set[tuple[str, Path]] = set()

    def spy(name_or_path, *args, **kwargs):
        path = find_local_model(name_or_path, *args, **kwargs)
        found.add((str(name_or_path), path.resolve()))
        return path

    monkeypatch.setattr(locate, "find_local_model", spy)

    unets = [load_components(ModelSpec(arch="sd15", pretrained=p)).unet for p in (str(local_pipeline), "org/tiny-sd15")]
    assert _state_dicts_equal(*unets)
    scorers = [load_scorer("clip_score", source=source) for source in (local_clip, "org/tiny-clip")]
    images = [Image.new("RGB", (16, 16), color) for color in ("red", "blue")]
    torch.testing.assert_close(scorers[0].score(images, "a red square"), scorers[1].score(images, "a red square"))

    assert found == {
        (str(local_pipeline), local_pipeline.resolve()),
        ("org/tiny-sd15", pipeline_snapshot.resolve()),
        (str(local_clip), local_clip.resolve()),
        ("org/tiny-clip", clip_snapshot.resolve()),
    }
