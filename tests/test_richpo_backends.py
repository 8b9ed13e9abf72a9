"""Tests of Rich-PO's real backends on tiny models built in code: the VLM critic and the diffusers editors.

Nothing is downloaded: the vision-language model is a tiny Llava with a
byte-level tokenizer made here, the editors run on the tiny SD1.5 / SDXL
modules of ``alignment.models.tiny`` (and on the toy world's base when the
checkout has it). Random weights write garbage, which is what the failure
paths need; the retry and parsing logic is tested with a scripted model.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    EulerAncestralDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from alignment.models import (
    TOY_MODEL_DIRS,
    DiffusionComponents,
    ModelNotAvailableError,
    ModelSpec,
    build_tiny_components,
    load_components,
    move_module,
    save_tiny_pipeline,
)
from alignment.richpo.config import CriticConfig, EditorConfig
from alignment.richpo.critique import FAILURE_REASONS, Critic, CritiqueIssue, Editor
from alignment.richpo.editors import (
    ControlNetImg2ImgEditor,
    InstructPix2PixEditor,
    SDEditEditor,
    canny_edges,
    load_editor,
)
from alignment.richpo.vlm_critic import (
    TEMPLATE_DIR,
    TemplateError,
    TransformersGenerator,
    VLMCritic,
    instructions_from_text,
    load_template,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The VLM critic with a scripted model
# ---------------------------------------------------------------------------------------------

VALID = (
    '{"issues": [{"aspect": "color", "severity": 0.9, "evidence": "blue ball"}], "instructions": ["make the ball red"]}'
)


@dataclass
class Call:
    texts: list[str]
    temperature: float
    seed: int


class ScriptedModel:
    """Answers by a function of (user text, how often that text was asked); raises when the answer is an exception."""

    identity = "scripted"

    def __init__(self, answer):
        self.answer = answer
        self.calls: list[Call] = []
        self.asked: dict[str, int] = {}

    def __call__(self, images, texts, *, temperature, seed):
        assert len(images) == len(texts)
        self.calls.append(Call(list(texts), temperature, seed))
        answers = []
        for text in texts:
            self.asked[text] = self.asked.get(text, 0) + 1
            answer = self.answer(text, self.asked[text])
            if isinstance(answer, Exception):
                raise answer
            answers.append(answer)
        return answers


@pytest.fixture
def templates(tmp_path: Path) -> tuple[str, str]:
    critique = tmp_path / "critique.txt"
    critique.write_text("CRITIQUE {prompt}")
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("INSTRUCT {prompt} :: {critique}")
    return str(critique), str(instructions)


def _critic(answer, templates, *, two_calls=False, **settings) -> tuple[VLMCritic, ScriptedModel]:
    config = CriticConfig(
        backend="vlm",
        source="scripted",
        critique_template=templates[0],
        instruction_template=templates[1] if two_calls else None,
        **settings,
    )
    model = ScriptedModel(answer)
    return VLMCritic(config, model), model


def _images(count: int, size: tuple[int, int] = (16, 16)) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * index % 256, 90, 200)) for index in range(count)]


def test_a_garbage_answer_is_retried_hotter_with_another_seed_and_the_valid_one_kept(templates):
    critic, model = _critic(lambda text, asked: "I cannot see an image" if asked == 1 else VALID, templates, retries=2)
    assert isinstance(critic, Critic)

    outcomes = critic.critique(_images(2), ["a red ball", "a red cube"])

    assert [outcome.attempts for outcome in outcomes] == [2, 2]
    assert all(outcome.failure is None and outcome.raw == VALID for outcome in outcomes)
    assert outcomes[0].critique.issues == (CritiqueIssue("color", 0.9, "blue ball"),)
    assert outcomes[0].critique.instructions == ("make the ball red",)
    first, retry = model.calls
    assert first.temperature == 0.0 and retry.temperature == 0.7
    assert first.seed != retry.seed


def test_every_failure_is_recorded_with_its_reason_after_all_retries_and_nothing_raises(templates):
    answers = {
        "CRITIQUE garbage": lambda asked: f"garbage {asked}",
        "CRITIQUE broken": lambda asked: '{"issues": [1, 2,]}',
        "CRITIQUE schema": lambda asked: '{"problems": "many"}',
        "CRITIQUE silent": lambda asked: '{"issues": [{"aspect": "shape", "severity": 0.8}]}',
        "CRITIQUE crash": lambda asked: RuntimeError("CUDA error: device-side assert"),
        "CRITIQUE fine": lambda asked: VALID,
    }
    critic, model = _critic(lambda text, asked: answers[text](asked), templates, retries=2, batch_size=8)
    prompts = ["garbage", "broken", "schema", "silent", "crash", "fine"]

    outcomes = critic.critique(_images(len(prompts)), prompts)

    assert [outcome.failure for outcome in outcomes] == [
        "no_json",
        "invalid_json",
        "schema",
        "no_instructions",
        "critic_error",
        None,
    ]
    assert all(outcome.failure in FAILURE_REASONS for outcome in outcomes[:5])
    assert [outcome.attempts for outcome in outcomes] == [3, 3, 3, 3, 3, 1]
    assert outcomes[0].raw == f"garbage {model.asked['CRITIQUE garbage']}", "the last answer is kept for the report"
    assert "device-side assert" in outcomes[4].raw
    assert outcomes[5].critique.instructions == ("make the ball red",)
    # The crash takes its batch down in every attempt; the batch is then asked one by one, so nothing else is lost.
    assert model.asked["CRITIQUE fine"] == 1 and model.asked["CRITIQUE crash"] == 3 * 2


def test_two_calls_take_the_instructions_from_the_second_and_show_it_only_the_serious_issues(templates):
    critique_answer = (
        'Here you go: {"issues": [{"aspect": "color", "severity": 0.9, "evidence": "the ball is blue"}, '
        '{"aspect": "quality", "severity": 0.1, "evidence": "slight blur"}], "instructions": ["fix it"]}'
    )
    instruction_answers = ["", 'Sure:\n```json\n["make the ball red", "move the ball left"]\n```']

    def answer(text, asked):
        return critique_answer if text.startswith("CRITIQUE") else instruction_answers[asked - 1]

    critic, model = _critic(answer, templates, two_calls=True, retries=1, min_severity=0.3)

    (outcome,) = critic.critique(_images(1), ["a red ball"])

    assert outcome.critique.instructions == ("make the ball red", "move the ball left")
    assert [issue.aspect for issue in outcome.critique.issues] == ["color", "quality"]
    assert outcome.attempts == 2
    assert model.asked["CRITIQUE a red ball"] == 1, (
        "a valid critique is not asked again when only the instructions failed"
    )
    instruction_text = next(text for call in model.calls for text in call.texts if text.startswith("INSTRUCT"))
    assert instruction_text.startswith("INSTRUCT a red ball :: ")
    assert "the ball is blue" in instruction_text and "slight blur" not in instruction_text
    assert "[instructions]" in outcome.raw and "move the ball left" in outcome.raw


def test_an_image_with_only_minor_issues_gets_no_instructions_and_no_second_call(templates):
    minor = '{"issues": [{"aspect": "quality", "severity": 0.1, "evidence": "grain"}], "instructions": ["denoise"]}'
    critic, model = _critic(lambda text, asked: minor, templates, two_calls=True, min_severity=0.3)

    (outcome,) = critic.critique(_images(1), ["a dog"])

    assert outcome.critique is not None and outcome.critique.instructions == ()
    assert len(outcome.critique.issues) == 1
    assert all(text.startswith("CRITIQUE") for call in model.calls for text in call.texts)


def test_one_call_mode_asks_once_per_image_in_batches_of_batch_size(templates):
    critic, model = _critic(lambda text, asked: VALID, templates, batch_size=2)

    outcomes = critic.critique(_images(5), [f"prompt {index}" for index in range(5)])

    assert all(outcome.critique is not None for outcome in outcomes)
    assert [len(call.texts) for call in model.calls] == [2, 2, 1]
    assert [text for call in model.calls for text in call.texts] == [f"CRITIQUE prompt {index}" for index in range(5)]


def test_sampling_seeds_are_reproducible_and_depend_on_the_config_seed(templates):
    runs = []
    for seed in (0, 0, 1):
        critic, model = _critic(lambda text, asked: VALID, templates, temperature=0.9, seed=seed, batch_size=1)
        critic.critique(_images(2), ["a", "b"])
        runs.append([call.seed for call in model.calls])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert len(set(runs[0])) == 2, "each image's batch has its own seed"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('Sure! ["make the sky blue", "add a cat"] Hope this helps', ("make the sky blue", "add a cat")),
        ('{"instructions": [{"instruction": "remove the hat"}]}', ("remove the hat",)),
        ("Here are the edits:\n1. make the sky blue\n2) add a cat.", ("make the sky blue", "add a cat")),
        ("Make the ball red.", ("Make the ball red",)),
        ("", ()),
    ],
)
def test_instructions_are_read_from_json_lists_objects_numbered_lists_and_plain_lines(text, expected):
    assert instructions_from_text(text) == expected


def test_the_bundled_templates_load_and_fill_their_placeholders_verbatim():
    critique = load_template("critique.txt", ["prompt"])
    instructions = load_template("instructions.txt", ["prompt", "critique"])
    assert critique.path == TEMPLATE_DIR / "critique.txt"
    filled = critique.render(prompt="a {critique} sign")
    assert "a {critique} sign" in filled and '"issues"' in filled, "JSON braces stay, a value is not filled again"
    assert '{"issues": []}' in instructions.render(prompt="p", critique='{"issues": []}')
    VLMCritic(CriticConfig(backend="vlm", source="x"), ScriptedModel(lambda text, asked: VALID))


def test_template_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        load_template("nothere.txt", ["prompt"])
    no_prompt = tmp_path / "no_prompt.txt"
    no_prompt.write_text('Critique the image as {"issues": []}')
    with pytest.raises(TemplateError, match=r"no_prompt\.txt.*\{prompt\}"):
        load_template(str(no_prompt), ["prompt"])
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("Critique {prompt} given {caption}")
    with pytest.raises(TemplateError, match=r"unknown\.txt.*\{caption\}"):
        load_template(str(unknown), ["prompt"])
    with pytest.raises(TemplateError, match="no_prompt.txt"):
        VLMCritic(
            CriticConfig(backend="vlm", source="x", instruction_template=str(no_prompt)),
            ScriptedModel(lambda text, asked: VALID),
        )


def test_the_fingerprint_follows_model_templates_and_generation_settings(templates, tmp_path):
    def fingerprint(**settings) -> str:
        return _critic(lambda text, asked: VALID, templates, **settings)[0].fingerprint

    assert fingerprint() == fingerprint()
    assert fingerprint(temperature=0.5) != fingerprint()
    assert fingerprint(max_new_tokens=10) != fingerprint()
    assert fingerprint(two_calls=True) != fingerprint()
    before = fingerprint()
    Path(templates[0]).write_text("CRITIQUE harder {prompt}")
    assert fingerprint() != before


# ---------------------------------------------------------------------------------------------
# The VLM critic on a tiny Llava, through the real loading path
# ---------------------------------------------------------------------------------------------

_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _save_tiny_llava(directory: Path) -> Path:
    """A randomly initialised Llava (tiny CLIP vision tower, tiny Llama) with a byte-level tokenizer, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # Every byte is a token (no merges), so any text round-trips; then the special tokens.
    vocab = {character: index for index, character in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<pad>", "<s>", "</s>", "<image>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    # 16 px / 8 px patches = 4 image tokens (the CLS token is dropped by the "default" strategy).
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_CHAT_TEMPLATE,
    )
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**small, image_size=16, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(
            **small,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return _save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


def test_a_tiny_llava_critic_loads_offline_and_records_its_garbage_as_failures(tiny_llava):
    config = CriticConfig(
        backend="vlm", source=str(tiny_llava), max_new_tokens=12, retries=1, batch_size=2, device="cpu", dtype="auto"
    )
    critic = VLMCritic.load(config)
    assert isinstance(critic.generator, TransformersGenerator)
    assert critic.generator.dtype == torch.float32, "auto is float32 on the CPU"
    assert critic.name == f"vlm:{tiny_llava}"
    prompts = ["a red ball", "two blue cubes on a table", "a cat"]
    images = [Image.new("RGB", size, "red") for size in ((32, 32), (24, 40), (16, 16))]

    first = critic.critique(images, prompts)
    second = critic.critique(images, prompts)

    assert len(first) == len(prompts)
    for outcome in first:
        assert outcome.critique is not None or (
            outcome.failure in FAILURE_REASONS and outcome.attempts == config.retries + 1
        )
    assert any(outcome.failure is not None for outcome in first), "random weights do not write a critique"
    assert all(outcome.failure != "critic_error" for outcome in first), [outcome.raw for outcome in first]
    assert [outcome.raw for outcome in first] == [outcome.raw for outcome in second], (
        "greedy first attempts and seeded sampled retries are reproducible"
    )


def test_the_critic_renders_with_the_chat_template_or_plain_text_with_the_image_token(tiny_llava):
    critic = VLMCritic.load(CriticConfig(backend="vlm", source=str(tiny_llava), max_new_tokens=4, device="cpu"))
    generator = critic.generator
    assert generator.render("Is it red?") == "USER: <image>\nIs it red?\nASSISTANT:"
    assert generator.processor.tokenizer.padding_side == "left"
    generator.processor.chat_template = None
    assert generator.render("Is it red?") == "<image>\nIs it red?"
    answers = generator([Image.new("RGB", (20, 20), "blue")] * 2, ["a", "a longer question"], temperature=0.0, seed=0)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)


def test_the_critic_loads_a_hub_id_from_the_cache_with_its_revision_and_reports_missing_models(
    tiny_llava, tmp_path, monkeypatch
):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--tiny-llava"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_llava, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    critic = VLMCritic.load(CriticConfig(backend="vlm", source="org/tiny-llava", device="cpu"))
    assert critic.revision == commit and critic.source == "org/tiny-llava"

    with pytest.raises(ModelNotAvailableError, match="org/absent-vlm"):
        VLMCritic.load(CriticConfig(backend="vlm", source="org/absent-vlm"))
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotAvailableError, match="no-such-model"):
        VLMCritic.load(CriticConfig(backend="vlm", source=str(missing)))
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ModelNotAvailableError, match="image-text-to-text"):
        VLMCritic.load(CriticConfig(backend="vlm", source=str(not_a_model)))
    with pytest.raises(ValueError, match="backend"):
        VLMCritic.load(CriticConfig(backend="toy"))


# ---------------------------------------------------------------------------------------------
# The diffusers editors on tiny models
# ---------------------------------------------------------------------------------------------

STEPS = 3
EDIT = {"num_inference_steps": STEPS, "guidance_scale": 2.0, "batch_size": 4, "device": "cpu"}


def _picture(size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A red square on a grey ground: structure for the canny map, colour for the edit."""
    array = np.full((size[1], size[0], 3), 120, dtype=np.uint8)
    array[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = (220, 30, 30)
    return Image.fromarray(array)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _check_seeding(editor: Editor, instructions: list[str], size: tuple[int, int] = (32, 32)) -> None:
    """Output size = input size; same seed, same edit (up to batch numerics); another seed, another edit."""
    image = _picture(size)
    first = editor.edit([image, image], [instructions] * 2, ["a red square"] * 2, [7, 8])
    repeated = editor.edit([image, image], [instructions] * 2, ["a red square"] * 2, [7, 8])
    alone = editor.edit([image], [instructions], ["a red square"], [7])
    assert all(outcome.error is None and outcome.image.size == size for outcome in first + repeated + alone)
    assert all(np.array_equal(_pixels(a.image), _pixels(b.image)) for a, b in zip(first, repeated, strict=True))
    # Each image has its own generator: its edit does not depend on its batch (but for float rounding).
    assert np.abs(_pixels(first[0].image) - _pixels(alone[0].image)).max() <= 2
    assert np.abs(_pixels(first[0].image) - _pixels(first[1].image)).max() > 10


@pytest.fixture(scope="module")
def sd15() -> DiffusionComponents:
    return build_tiny_components("sd15", seed=0)


def test_sdedit_on_the_tiny_sd15_keeps_size_seeds_and_ignores_the_instructions(sd15):
    editor = load_editor(EditorConfig(backend="sdedit", strength=0.7, **EDIT), sd15)
    assert isinstance(editor, SDEditEditor) and isinstance(editor, Editor)
    assert type(editor.pipeline).__name__ == "StableDiffusionImg2ImgPipeline"

    _check_seeding(editor, ["make it blue"], size=(35, 27))  # odd: edited at 34x26 (the VAE's 2 px cells), resized back
    without, with_instructions = (
        editor.edit([_picture()], [instructions], ["a red square"], [3])[0] for instructions in ([], ["make it blue"])
    )
    assert np.array_equal(_pixels(without.image), _pixels(with_instructions.image))
    assert without.details == {"text": "a red square", "seed": 3}


def test_sdedit_on_the_tiny_sdxl_and_from_a_saved_pipeline_directory(tmp_path):
    editor = SDEditEditor(
        build_tiny_components("sdxl", seed=0).to_pipeline(),
        strength=0.7,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        batch_size=2,
    )
    _check_seeding(editor, [])

    directory = save_tiny_pipeline("sd15", tmp_path / "tiny-sd15", seed=1)
    loaded = load_editor(EditorConfig(backend="sdedit", source=str(directory), strength=0.7, **EDIT), components=None)
    assert loaded.source == str(directory)
    (outcome,) = loaded.edit([_picture()], [[]], ["a red square"], [0])
    assert outcome.image.size == (32, 32)
    with pytest.raises(ModelNotAvailableError, match="missing-base"):
        load_editor(EditorConfig(backend="sdedit", source=str(tmp_path / "missing-base")))
    with pytest.raises(ValueError, match="no base model"):
        load_editor(EditorConfig(backend="sdedit"))
    with pytest.raises(ValueError, match="no denoising step"):
        load_editor(EditorConfig(backend="sdedit", strength=0.2, num_inference_steps=3), build_tiny_components("sd15"))


@pytest.mark.skipif(
    not (TOY_MODEL_DIRS["sdxl"] / "unet" / "diffusion_pytorch_model.safetensors").is_file(),
    reason="the toy world's base model is not in this checkout (dvc pull data/toyworld)",
)
def test_sdedit_on_the_toy_worlds_sdxl_base():
    pipeline = load_components(
        ModelSpec(arch="sdxl", pretrained=str(TOY_MODEL_DIRS["sdxl"]), resolution=32)
    ).to_pipeline()
    editor = SDEditEditor(pipeline, strength=0.6, num_inference_steps=6, guidance_scale=3.0, batch_size=2)
    _check_seeding(editor, [])
    (outcome,) = editor.edit([_picture()], [[]], ["a red circle"], [1])
    assert 0 < _pixels(outcome.image).mean() < 255


def test_mixed_precision_components_edit_and_get_their_float32_vae_back():
    """The project's half-precision layout (bf16 here: the CPU has no fp16 convolutions) with a float32 VAE."""
    for arch in ("sd15", "sdxl"):
        components = build_tiny_components(arch, seed=0)
        for module in (components.unet, components.text_encoder, components.text_encoder_2):
            if module is not None:
                move_module(module, "cpu", torch.bfloat16)
        editor = load_editor(EditorConfig(backend="sdedit", strength=0.7, **EDIT), components)
        (outcome,) = editor.edit([_picture()], [[]], ["a red square"], [0])
        assert outcome.error is None and outcome.image.size == (32, 32), outcome.error
        assert components.vae.dtype == torch.float32 and components.unet.dtype == torch.bfloat16


class FlakyImg2Img(StableDiffusionImg2ImgPipeline):
    """Raises whenever a batch holds the prompt "boom": what a bad item does to a whole batch."""

    def __call__(self, prompt, **kwargs):
        if "boom" in prompt:
            raise RuntimeError("boom item")
        return super().__call__(prompt=prompt, **kwargs)


def test_a_failing_item_becomes_an_error_outcome_and_the_others_are_still_edited(sd15):
    flaky = FlakyImg2Img(**sd15.to_pipeline().components)
    editor = SDEditEditor(flaky, strength=0.7, num_inference_steps=STEPS, guidance_scale=2.0, batch_size=3)
    assert editor.pipeline is flaky, "an img2img pipeline is used as it is"
    images, seeds = [_picture()] * 3, [1, 2, 3]

    outcomes = editor.edit(images, [[]] * 3, ["a red square", "boom", "a red square"], seeds)

    assert outcomes[1].image is None and "boom item" in outcomes[1].error
    clean = editor.edit([images[0], images[2]], [[], []], ["a red square"] * 2, [1, 3])
    for isolated, batched in zip((outcomes[0], outcomes[2]), clean, strict=True):
        assert np.abs(_pixels(isolated.image) - _pixels(batched.image)).max() <= 2


def test_nan_output_is_an_error_outcome(sd15):
    components = build_tiny_components("sd15", seed=0)
    with torch.no_grad():
        components.vae.decoder.conv_out.bias.fill_(float("nan"))
    editor = SDEditEditor(
        components.to_pipeline(), strength=0.7, num_inference_steps=STEPS, guidance_scale=2.0, batch_size=2
    )
    outcomes = editor.edit([_picture()] * 2, [[]] * 2, ["a red square"] * 2, [0, 1])
    assert [outcome.error for outcome in outcomes] == ["non-finite output (NaN or inf)"] * 2


def _save_tiny_instruct_pix2pix(components: DiffusionComponents, directory: Path) -> Path:
    """An InstructPix2Pix pipeline: the tiny modules with a UNet taking 8 channels (noisy + original latents)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        unet = UNet2DConditionModel.from_config({**components.unet.config, "in_channels": 8})
    scheduler = EulerAncestralDiscreteScheduler.from_config(components.noise_scheduler.config)
    common = {
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "tokenizer": components.tokenizer,
        "unet": unet,
        "scheduler": scheduler,
    }
    if components.arch == "sdxl":
        pipeline = StableDiffusionXLInstructPix2PixPipeline(
            **common,
            text_encoder_2=components.text_encoder_2,
            tokenizer_2=components.tokenizer_2,
            add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionInstructPix2PixPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_instruct_pix2pix_loads_offline_edits_by_instruction_and_skips_images_without_one(arch, tmp_path):
    directory = _save_tiny_instruct_pix2pix(build_tiny_components(arch, seed=0), tmp_path / f"ip2p-{arch}")
    editor = load_editor(EditorConfig(backend="instruct_pix2pix", source=str(directory), **EDIT))
    assert isinstance(editor, InstructPix2PixEditor)
    expected = (
        "StableDiffusionXLInstructPix2PixPipeline" if arch == "sdxl" else "StableDiffusionInstructPix2PixPipeline"
    )
    assert type(editor.pipeline).__name__ == expected

    latent_sizes = []
    editor.pipeline.unet.register_forward_pre_hook(lambda module, args: latent_sizes.append(tuple(args[0].shape[-2:])))
    _check_seeding(editor, ["make the square blue", "add a border"])
    # 32 px images are 16x16 latents; SDXL InstructPix2Pix would draw at its UNet's default (32x32) if not told.
    assert set(latent_sizes) == {(16, 16)}
    outcomes = editor.edit([_picture()] * 2, [[], [" ", "make it blue"]], ["a red square"] * 2, [0, 0])
    assert outcomes[0].image is None and outcomes[0].error == "no instruction"
    assert outcomes[1].details["text"] == "make it blue"


def test_instruct_pix2pix_refuses_a_text_to_image_model(tmp_path):
    directory = save_tiny_pipeline("sd15", tmp_path / "tiny-sd15")
    with pytest.raises(ValueError, match="4 input channels"):
        load_editor(EditorConfig(backend="instruct_pix2pix", source=str(directory)))
    with pytest.raises(ValueError, match="editor.source"):
        load_editor(EditorConfig(backend="instruct_pix2pix"))


def test_controlnet_img2img_edits_with_the_filled_template_and_loads_its_controlnet_offline(sd15, tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        # One stride-2 layer in the conditioning embedding: the tiny VAE halves the image, not SD's eighth.
        controlnet = ControlNetModel.from_unet(sd15.unet, conditioning_embedding_out_channels=(16, 32))
    controlnet.save_pretrained(tmp_path / "controlnet")
    config = EditorConfig(
        backend="controlnet_img2img",
        controlnet=str(tmp_path / "controlnet"),
        strength=0.8,
        prompt_template="{caption}, {instruction}",
        controlnet_conditioning_scale=0.8,
        **EDIT,
    )
    editor = load_editor(config, sd15)
    assert isinstance(editor, ControlNetImg2ImgEditor)

    _check_seeding(editor, ["make the square blue"])
    no_instruction, edited = editor.edit(
        [_picture()] * 2, [[], ["make it blue", "add a cat"]], ["a red square"] * 2, [0, 0]
    )
    assert no_instruction.error == "no instruction"
    assert edited.details["text"] == "a red square, make it blue; add a cat"

    with pytest.raises(ValueError, match="no \\{instruction\\}"):
        load_editor(config.model_copy(update={"prompt_template": "{caption}"}), sd15)
    with pytest.raises(ValueError, match="prompt_template"):
        load_editor(config.model_copy(update={"prompt_template": "{caption} {mood}"}), sd15)
    with pytest.raises(ModelNotAvailableError, match="ControlNet"):
        load_editor(config.model_copy(update={"controlnet": str(tmp_path / "absent")}), sd15)
    with pytest.raises(ValueError, match="does not fit"):
        ControlNetImg2ImgEditor(
            build_tiny_components("sdxl").to_pipeline(),
            controlnet=controlnet,
            prompt_template="{instruction}",
            strength=0.8,
            num_inference_steps=STEPS,
            guidance_scale=2.0,
            controlnet_conditioning_scale=1.0,
            batch_size=1,
        )


def test_canny_edges_are_thin_binary_outlines():
    edges = np.asarray(canny_edges(_picture((32, 32))).convert("L"))
    assert set(np.unique(edges)) == {0, 255}
    outline = np.zeros_like(edges, dtype=bool)
    outline[7:25, 7:25] = True
    outline[9:23, 9:23] = False  # a two-pixel band around the square's border at 8..24
    assert (edges[~outline] == 0).all(), "no edges away from the square's border"
    assert (edges[outline] == 255).mean() > 0.4, "the border is traced"
    assert (edges[outline] == 255).sum() < 0.6 * outline.sum(), "non-maximum suppression thins the band"
    assert not np.asarray(canny_edges(Image.new("RGB", (16, 16), "red"))).any(), "a flat image has no edges"


def test_load_editor_leaves_the_toy_backend_to_the_toy_module():
    with pytest.raises(ValueError, match="alignment.richpo.toy"):
        load_editor(EditorConfig(backend="toy"))
