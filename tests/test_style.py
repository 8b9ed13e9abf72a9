"""Style alignment: the CLIP style scorer, the style rows, the style report and real style pairs.

CLIP and the editors are tiny random models built here and written to disk in
their published formats; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from alignment.data import PreferenceDataError, load_preference_frame, prepare_pairs, write_pickapic_parquet
from alignment.models import ModelNotAvailableError, build_offline_clip_tokenizer, build_tiny_components
from alignment.reports import STYLE_REPORT, ReportInputs, available_reports, build_report
from alignment.style import (
    CONTENT_SCORE_COLUMN,
    IMAGE_COLUMN,
    STYLE_COLUMN,
    STYLE_SCORE_COLUMN,
    ClipStyleScorer,
    StyleScorer,
    bootstrap_mean,
    build_style_report,
    load_style_editor,
    load_style_scorer,
    make_style_pairs,
    style_headline,
    style_samples_frame,
)

SIDE = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine its spin-waits cost seconds per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# A tiny CLIP on disk
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("style_clip")
    tokenizer = build_offline_clip_tokenizer(directory)
    tokenizer.save_pretrained(directory)
    towers = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={
            **towers,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**towers, "image_size": SIDE, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LayerNorms and biases away from their 1 / 0 init, so every weight matters
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(directory)
    processor = {
        "do_resize": True,
        "size": {"shortest_edge": SIDE},
        "do_center_crop": True,
        "crop_size": {"height": SIDE, "width": SIDE},
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "do_convert_rgb": True,
        "image_processor_type": "CLIPImageProcessor",
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory


def _images(count: int, seed: int = 0, side: int = SIDE) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


PROMPTS = ["a red circle", "a blue square on the left", "a green triangle"]


def test_clip_style_scores_are_zero_shot_probabilities(clip_dir):
    scorer = ClipStyleScorer.load("van_gogh", str(clip_dir))
    assert isinstance(scorer, StyleScorer)
    images = _images(3)
    scores = scorer.style_scores(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert ((scores > 0) & (scores < 1)).all()

    # Hand check through CLIPModel's own forward: softmax of logits_per_image over [style, neutral].
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    tokens = tokenizer(["a Van Gogh painting", "a photo"], padding=True, return_tensors="pt")
    pixels = scorer.encoder.preprocess(images)
    with torch.no_grad():
        output = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    expected = output.logits_per_image.softmax(dim=1)[:, 0]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)

    # Content: cosine of image and prompt embeddings, from the same forward's normalised embeddings.
    prompt_tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        paired = model(
            input_ids=prompt_tokens["input_ids"], attention_mask=prompt_tokens["attention_mask"], pixel_values=pixels
        )
    content = scorer.content_scores(images, PROMPTS)
    torch.testing.assert_close(content, (paired.image_embeds * paired.text_embeds).sum(dim=1), atol=1e-5, rtol=1e-5)
    assert ((content >= -1) & (content <= 1)).all()


def test_clip_style_scorer_options_and_errors(clip_dir):
    same = ClipStyleScorer.load("x", str(clip_dir), style_texts=["a photo"], neutral_texts=["a photo"])
    # The style text is the neutral text: every image is exactly undecided.
    torch.testing.assert_close(same.style_scores(_images(2), PROMPTS[:2]), torch.full((2,), 0.5))
    several = ClipStyleScorer.load(
        "sketch", str(clip_dir), style_texts=["a pencil sketch", "a charcoal drawing"], scale=10.0
    )
    assert several.scale == 10.0 and several.style_scores(_images(2), PROMPTS[:2]).shape == (2,)
    via_kind = load_style_scorer("pencil_sketch", kind="clip", source=str(clip_dir))
    assert via_kind.style_texts == ["a pencil sketch"] and via_kind.neutral_texts == ["a photo"]
    with pytest.raises(ValueError, match="unknown style 'cubism'"):
        ClipStyleScorer.load("cubism", str(clip_dir))
    with pytest.raises(ValueError, match="prompts"):
        same.style_scores(_images(2), PROMPTS)
    with pytest.raises(ModelNotAvailableError):
        ClipStyleScorer.load("van_gogh", str(clip_dir / "missing"))
    with pytest.raises(ValueError, match="kind"):
        load_style_scorer("van_gogh", kind="vlm")


# --------------------------------------------------------------------------------------------
# Rows and the report
# --------------------------------------------------------------------------------------------


class TableScorer:
    """A scorer that looks scores up by the image's top-left red value (a test double)."""

    def __init__(self, style: str, table: dict[int, tuple[float, float]]) -> None:
        self.style, self.name, self.table = style, f"table:{style}", table

    def _lookup(self, images, index: int) -> torch.Tensor:
        return torch.tensor([self.table[image.getpixel((0, 0))[0]][index] for image in images], dtype=torch.float64)

    def style_scores(self, images, prompts):
        return self._lookup(images, 0)

    def content_scores(self, images, prompts):
        return self._lookup(images, 1)


def _flat(values: list[int]) -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), (value, 0, 0)) for value in values]


# Two prompts x two seeds. Reference and candidate style / content scores, (prompt, seed) order:
#   p1 s0: ref 0.1 / 1.0  cand 0.5 / 1.0   (style win)
#   p1 s1: ref 0.3 / 1.0  cand 0.3 / 0.0   (style tie)
#   p2 s0: ref 0.2 / 0.0  cand 0.1 / 1.0   (style loss)
#   p2 s1: ref 0.2 / 1.0  cand 0.9 / 1.0   (style win)
GRID_PROMPTS = ["p1", "p1", "p2", "p2"]
GRID_SEEDS = [0, 1, 0, 1]
TABLE = {10: (0.1, 1.0), 30: (0.3, 1.0), 20: (0.2, 0.0), 21: (0.2, 1.0), 50: (0.5, 1.0), 31: (0.3, 0.0), 11: (0.1, 1.0)}
TABLE[90] = (0.9, 1.0)


def _grid_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    scorer = TableScorer("outlined", TABLE)
    reference = style_samples_frame("base", GRID_PROMPTS, GRID_SEEDS, _flat([10, 30, 20, 21]), scorer)
    candidate = style_samples_frame("aligned", GRID_PROMPTS, GRID_SEEDS, _flat([50, 31, 11, 90]), scorer)
    return reference, candidate


def test_style_rows_hold_one_row_per_style_and_image():
    reference, _ = _grid_frames()
    assert list(reference[STYLE_SCORE_COLUMN]) == [0.1, 0.3, 0.2, 0.2]
    assert list(reference[CONTENT_SCORE_COLUMN]) == [1.0, 1.0, 0.0, 1.0]
    assert set(reference[STYLE_COLUMN]) == {"outlined"} and set(reference["model"]) == {"base"}
    assert Image.open(io.BytesIO(reference[IMAGE_COLUMN].iloc[0])).size == (8, 8)
    two = style_samples_frame(
        "base",
        GRID_PROMPTS,
        GRID_SEEDS,
        _flat([10, 30, 20, 21]),
        [TableScorer("a", TABLE), TableScorer("b", TABLE)],
        keep_images=False,
    )
    assert len(two) == 8 and IMAGE_COLUMN not in two.columns and list(two[STYLE_COLUMN]) == ["a"] * 4 + ["b"] * 4
    with pytest.raises(ValueError, match="same style"):
        style_samples_frame("base", ["p"], [0], _flat([10]), [TableScorer("a", TABLE), TableScorer("a", TABLE)])
    with pytest.raises(ValueError, match="outside"):
        style_samples_frame("base", ["p"], [0], _flat([5]), TableScorer("a", {5: (1.5, 0.0)}))
    with pytest.raises(ValueError, match="2 prompts"):
        style_samples_frame("base", ["p", "q"], [0], _flat([10]), TableScorer("a", TABLE))


def test_report_numbers_match_a_hand_computation():
    reference, candidate = _grid_frames()
    report = build_style_report(reference, candidate, resamples=500)
    numbers = report.summary["per_style"]["outlined"]
    assert numbers["prompts"] == 2 and numbers["images"] == 4
    assert numbers["style_reference"] == pytest.approx((0.1 + 0.3 + 0.2 + 0.2) / 4)
    assert numbers["style_candidate"] == pytest.approx((0.5 + 0.3 + 0.1 + 0.9) / 4)
    assert numbers["style_delta"] == pytest.approx((0.4 + 0.0 - 0.1 + 0.7) / 4)
    assert numbers["style_win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert numbers["content_reference"] == pytest.approx(0.75) and numbers["content_candidate"] == pytest.approx(0.75)
    assert numbers["content_delta"] == pytest.approx(0.0)
    assert numbers["content_win_rate"] == pytest.approx((0.5 + 0 + 1 + 0.5) / 4)
    # Two prompts with two seeds each: a bootstrap over prompts ranges from one prompt's mean to the other's.
    assert numbers["style_reference_ci95"] == pytest.approx([0.2, 0.2])  # both prompts average 0.2
    assert numbers["style_candidate_ci95"] == pytest.approx([0.4, 0.5])  # p1 (0.5 + 0.3) / 2, p2 (0.1 + 0.9) / 2
    assert numbers["style_win_rate_ci95"] == pytest.approx([0.5, 0.75])  # p2: 1 of 2, p1: 1.5 of 2
    assert numbers["content_candidate_ci95"] == pytest.approx([0.5, 1.0])
    per_prompt = report.per_prompt.set_index("prompt")
    assert per_prompt.loc["p1", "style_win"] == pytest.approx(0.75) and per_prompt.loc["p2", "seeds"] == 2
    headline = style_headline(report.summary)
    assert headline["style/outlined/style_win_rate"] == pytest.approx(0.625)
    assert headline["style/outlined/style_win_rate_ci_low"] == pytest.approx(0.5)
    assert headline["reference"] == "base"


def test_one_prompt_gives_a_degenerate_interval():
    values = np.array([0.2, 0.4, 0.9])
    mean, (low, high) = bootstrap_mean(values, ["p"] * 3)
    assert mean == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)


def test_report_html_has_the_table_and_the_images():
    reference, candidate = _grid_frames()
    report = build_style_report(
        reference, candidate, reference_label="base SDXL", candidate_label="rpo", notes=["toy run"], grid_prompts=1
    )
    page = report.html
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert 'id="style-table"' in page and 'data-style="outlined"' in page and "0.625" in page
    assert page.count("data:image/png;base64,") == 2  # one prompt: its base and its aligned image
    assert "base SDXL" in page and "rpo" in page and "toy run" in page and "table:outlined" in page
    without_images = build_style_report(reference.drop(columns=IMAGE_COLUMN), candidate.drop(columns=IMAGE_COLUMN))
    assert "data:image" not in without_images.html and "no image grid" in without_images.html


def test_the_report_is_registered_as_style():
    assert STYLE_REPORT in available_reports()
    reference, candidate = _grid_frames()
    output = build_report(
        STYLE_REPORT,
        ReportInputs(reference, candidate, "base", "aligned", ("a note",), {"resamples": 200, "grid_prompts": 2}),
    )
    assert output.name == STYLE_REPORT and "a note" in output.html
    assert output.headline["style/outlined/style_candidate"] == pytest.approx(0.45)
    assert len(output.summary["per_prompt"]) == 2
    json.dumps(output.summary)  # JSON-able
    json.dumps(output.headline)


def test_bad_report_input_is_named():
    reference, candidate = _grid_frames()
    with pytest.raises(ValueError, match=r"reference rows lack the column\(s\) \['style_score'\]"):
        build_style_report(reference.drop(columns=STYLE_SCORE_COLUMN), candidate)
    with pytest.raises(ValueError, match="unknown style"):
        build_style_report(reference, candidate, styles=["striped"])
    with pytest.raises(ValueError, match="same \\(style, prompt, seed\\) grid"):
        build_style_report(reference, candidate.assign(seed=candidate["seed"] + 1))
    with pytest.raises(ValueError, match="more than once"):
        build_style_report(pd.concat([reference, reference.iloc[:1]]), candidate)
    with pytest.raises(ValueError, match="outside"):
        build_style_report(reference.assign(style_score=2.0), candidate)
    with pytest.raises(ValueError, match="non-finite content_score"):
        build_style_report(reference, candidate.assign(content_score=np.nan))
    with pytest.raises(ValueError, match="empty"):
        build_style_report(reference.iloc[:0], candidate)


# --------------------------------------------------------------------------------------------
# Real style pairs with a tiny editor
# --------------------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pickapic_rows() -> pd.DataFrame:
    images = _images(6, seed=3, side=16)  # small: the tiny editors' cost grows with the pixels
    return pd.DataFrame(
        {
            "caption": ["a cat", "a dog", "a tie"],
            "jpg_0": [_png(images[0]), _png(images[1]), _png(images[2])],
            "jpg_1": [_png(images[3]), _png(images[4]), _png(images[5])],
            "label_0": [1.0, 0.0, 0.5],
            "ranking_id": [10, 11, 12],
        }
    )


@pytest.fixture(scope="module")
def img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipeline = StableDiffusionImg2ImgPipeline(**build_tiny_components("sd15", seed=0).to_pipeline().components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_make_style_pairs_prefers_the_edited_image(img2img, pickapic_rows, tmp_path):
    # Guidance 1 runs one UNet batch instead of two (the test is about the pairs, not the edit's quality).
    kwargs = {"style": "van_gogh", "num_inference_steps": 2, "strength": 0.5, "seed": 4, "guidance_scale": 1.0}
    pairs = make_style_pairs(pickapic_rows, img2img, "in the style of Van Gogh", batch_size=2, **kwargs)
    assert len(pairs) == 2  # the tie has no winner to stylise
    assert list(pairs["caption"]) == ["a cat", "a dog"]
    path = write_pickapic_parquet(pairs.to_dict(orient="records"), tmp_path / "train-00000-of-00001.parquet")
    prepared, stats = prepare_pairs(load_preference_frame(path.parent))
    assert stats["pairs_out"] == 2
    for k, winner_column in enumerate(("jpg_0", "jpg_1")):  # row 0's winner is jpg_0, row 1's jpg_1
        original = _decoded(pickapic_rows[winner_column].iloc[k])
        assert (_decoded(prepared["image_l"].iloc[k]) == original).all(), "the original is the dispreferred image"
        edited = _decoded(prepared["image_w"].iloc[k])
        assert edited.shape == original.shape and (edited != original).any()
    assert set(pairs["model_0"]) | set(pairs["model_1"]) == {"edit:van_gogh", "original"}
    assert (pairs["best_image_uid"] == ["10-0-van_gogh-4", "11-1-van_gogh-4"]).all()
    # One generator per image: the batch size does not change the result (beyond float noise of batched convolutions).
    again = make_style_pairs(pickapic_rows, img2img, "in the style of Van Gogh", batch_size=1, **kwargs)
    pd.testing.assert_frame_equal(pairs.drop(columns=["jpg_0", "jpg_1"]), again.drop(columns=["jpg_0", "jpg_1"]))
    for column in ("jpg_0", "jpg_1"):
        for first, second in zip(pairs[column], again[column], strict=True):
            assert np.abs(_decoded(first).astype(int) - _decoded(second).astype(int)).max() <= 2
    both = make_style_pairs(
        pickapic_rows, img2img, "{caption} as a sketch", source_image="both", resolution=8, **kwargs
    )
    assert len(both) == 6 and _decoded(both["jpg_0"].iloc[0]).shape == (8, 8, 3)


def test_make_style_pairs_refuses_bad_input(img2img, pickapic_rows):
    with pytest.raises(PreferenceDataError, match=r"lack the column\(s\) \['label_0'\]"):
        make_style_pairs(pickapic_rows.drop(columns="label_0"), img2img, "sketch")
    with pytest.raises(PreferenceDataError, match="row 11, column label_0"):
        make_style_pairs(pickapic_rows.assign(label_0=[1.0, 0.3, 0.5]), img2img, "sketch", num_inference_steps=1)
    with pytest.raises(ValueError, match="strength"):
        make_style_pairs(pickapic_rows, img2img, "sketch", strength=0.0)
    with pytest.raises(ValueError, match="source_image"):
        make_style_pairs(pickapic_rows, img2img, "sketch", source_image="loser")
    with pytest.raises(ValueError, match="img2img or InstructPix2Pix"):
        make_style_pairs(pickapic_rows, object(), "sketch")


def test_editors_load_offline_and_instruct_pix2pix_edits(tmp_path, pickapic_rows):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    components = build_tiny_components("sd15", seed=1)
    text_to_image = components.to_pipeline()
    text_to_image.save_pretrained(tmp_path / "sd15")
    assert isinstance(load_style_editor(tmp_path / "sd15"), StableDiffusionImg2ImgPipeline)

    # InstructPix2Pix: the UNet also reads the original image's latents (4 more input channels).
    unet = UNet2DConditionModel.from_config({**components.unet.config, "in_channels": 8})
    pix2pix = StableDiffusionInstructPix2PixPipeline(
        **{**text_to_image.components, "unet": unet}, requires_safety_checker=False
    )
    pix2pix.save_pretrained(tmp_path / "pix2pix")
    editor = load_style_editor(tmp_path / "pix2pix")
    assert isinstance(editor, StableDiffusionInstructPix2PixPipeline)
    pairs = make_style_pairs(
        pickapic_rows,
        editor,
        "make it a pencil sketch",
        num_inference_steps=1,
        source_image="jpg_1",
        guidance_scale=1.0,
    )
    assert len(pairs) == 3 and set(pairs["label_0"]) <= {0.0, 1.0}

    with pytest.raises(ModelNotAvailableError):
        load_style_editor(tmp_path / "missing")
    (tmp_path / "not_an_editor").mkdir()
    (tmp_path / "not_an_editor" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(ValueError, match="DDPMPipeline"):
        load_style_editor(tmp_path / "not_an_editor")
