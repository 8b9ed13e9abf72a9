"""Rich-PO's library: critique parsing, the toy critic and editor, curation and its report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from alignment.data import PreferenceDataError, load_preference_frame, prepare_pairs, write_pickapic_parquet
from alignment.richpo.config import CurationConfig, RichPOConfig
from alignment.richpo.critique import (
    FAILURE_REASONS,
    Critique,
    CritiqueError,
    CritiqueOutcome,
    EditOutcome,
    parse_critique,
    parse_instructions,
)
from alignment.richpo.curation import (
    CANDIDATE_COLUMNS,
    EXTRA_COLUMNS,
    curate,
    curation_report_html,
    mean_pixel_change,
    png_bytes,
)
from alignment.richpo.toy import ToyCritic, ToyEditor, parse_toy_instruction
from alignment.toyworld.render import COLOUR_RGB, render
from alignment.toyworld.world import Scene

# --- parsing --------------------------------------------------------------------------------------


def test_parse_critique_finds_the_json_in_chatty_output_with_braces_inside_strings():
    text = (
        'Sure! Here is my critique:\n```json\n{"issues": [{"aspect": "Colour", "severity": "high", '
        '"evidence": "looks {green}, not red"}], "instructions": ["1. Make the circle red.", "- make it red"]}\n```'
    )
    critique = parse_critique(text)
    assert critique.issues[0].aspect == "colour" and critique.issues[0].severity == 0.8
    assert critique.issues[0].evidence == "looks {green}, not red"
    assert critique.instructions == ("Make the circle red", "make it red")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("I cannot help with that.", "no_json"),
        ('{"issues": [ {"aspect": "colour"', "no_json"),
        ('{"issues": [1, 2,], }', "invalid_json"),
        ('{"verdict": "bad"}', "schema"),
        ('{"issues": "many"}', "schema"),
        ('{"issues": [{"severity": 0.5}]}', "schema"),
        ('{"issues": [{"aspect": "size", "severity": "enormous"}]}', "schema"),
        ('{"issues": [{"aspect": "size", "severity": 0.5}]}', "no_instructions"),
    ],
)
def test_malformed_critiques_fail_with_a_counted_reason(text, reason):
    with pytest.raises(CritiqueError) as raised:
        parse_critique(text)
    assert raised.value.reason == reason and reason in FAILURE_REASONS


def test_severity_scales_are_mapped_onto_zero_one_and_no_issue_needs_no_instruction():
    critique = parse_critique(
        '{"issues": [{"aspect": "a", "severity": 4}, {"aspect": "b", "severity": 8}], "instructions": "fix a\\nfix b"}'
    )
    assert [issue.severity for issue in critique.issues] == [0.8, 0.8]
    assert critique.instructions == ("fix a", "fix b")
    assert parse_critique('{"issues": []}').instructions == ()
    # instructions from a second call are used when the object has none
    assert parse_critique('{"issues": [{"aspect": "a"}]}', instructions='["do x"]').instructions == ("do x",)


def test_critique_round_trips_through_json():
    critique = parse_critique('{"issues": [{"aspect": "shape", "severity": 0.61, "evidence": "e"}], "edits": ["x"]}')
    assert Critique.from_json(critique.to_json()) == critique
    assert critique.instruction_text == "x"


def test_parse_instructions_drops_blanks_and_duplicates_and_reads_objects():
    assert parse_instructions(["a", " ", "a", {"instruction": "b."}]) == ("a", "b")
    assert parse_instructions(None) == ()


def test_outcomes_hold_one_thing_and_known_reasons():
    with pytest.raises(ValueError):
        CritiqueOutcome(critique=None)
    with pytest.raises(ValueError):
        CritiqueOutcome(critique=None, failure="tired")
    with pytest.raises(ValueError):
        EditOutcome(image=None)


def test_the_curation_reward_cannot_be_the_oracle():
    with pytest.raises(ValueError, match="oracle"):
        RichPOConfig.model_validate({"curation": {"reward": {"scorer": "toy_oracle"}}})


# --- toy critic and editor ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def critic():
    return ToyCritic.load()


def _render(colour="red", shape="circle", size="large", position="left", seed=0):
    return render(Scene(colour, shape, size, position), np.random.default_rng(seed))


def test_the_toy_critic_flags_a_wrong_colour_and_says_what_to_do_in_words(critic):
    prompt = "a large red circle on the left"
    wrong, right = _render(colour="blue"), _render()
    outcomes = critic.critique([wrong, right], [prompt, prompt])
    flagged = outcomes[0].critique
    assert [issue.aspect for issue in flagged.issues] == ["colour"]
    assert flagged.instructions == ("make the blue circle on the left red",)
    assert "blue" in flagged.issues[0].evidence and 0.3 <= flagged.issues[0].severity <= 1
    assert outcomes[1].critique.issues == () and outcomes[1].critique.instructions == ()
    # what it writes is the JSON a VLM writes, parsed by the same parser
    assert parse_critique(outcomes[0].raw) == flagged


def test_the_toy_critic_never_reads_the_oracle(critic, monkeypatch):
    from alignment.toyworld.oracle import Oracle

    def forbidden(*args, **kwargs):
        raise AssertionError("the critic read the oracle")

    monkeypatch.setattr(Oracle, "load", forbidden)
    monkeypatch.setattr(Oracle, "score", forbidden)
    outcomes = critic.critique([_render(colour="green")], ["a large red circle on the left"])
    assert outcomes[0].critique.instructions


def test_a_prompt_outside_the_toy_world_is_a_counted_critic_error(critic):
    outcome = critic.critique([_render()], ["a photo of a cat"])[0]
    assert outcome.critique is None and outcome.failure == "critic_error"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("make the blue circle on the left red", ("colour", "red")),
        ("Turn the red square on the top into a triangle.", ("shape", "triangle")),
        ("make the red circle on the left larger", ("size", "larger")),
        ("move the red circle on the left to the right", ("position", "right")),
        ("sharpen the image", ("quality", "sharpen")),
        ("make it a van gogh painting", None),
    ],
)
def test_the_toy_editor_reads_instruction_text(text, parsed):
    assert parse_toy_instruction(text) == parsed


def _object_stats(image: Image.Image) -> tuple[np.ndarray, float]:
    """Mean colour of the pixels far from the background, and their mean x (0 left, 1 right)."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    mask = np.linalg.norm(pixels - np.array([210, 210, 210]) / 255.0, axis=-1) > 0.3
    xs = np.nonzero(mask)[1]
    return pixels[mask].mean(axis=0), float(xs.mean() / pixels.shape[1])


def test_the_toy_editor_recolours_moves_and_keeps_what_it_is_not_told_to_change():
    editor = ToyEditor(strength=1.0)
    original = _render(colour="blue", position="left")
    recoloured = editor.edit_one(original, ["make the blue circle on the left red"]).image
    colour, x = _object_stats(recoloured)
    assert np.abs(colour * 255 - np.array(COLOUR_RGB["red"])).max() < 30
    assert abs(x - _object_stats(original)[1]) < 0.02  # position kept
    moved = editor.edit_one(original, ["move the blue circle on the left to the right"]).image
    colour_moved, x_moved = _object_stats(moved)
    assert x_moved > 0.6 and np.abs(colour_moved * 255 - np.array(COLOUR_RGB["blue"])).max() < 30


def test_the_edit_depends_on_the_instruction_and_strength_scales_it():
    original = _render(colour="blue")
    to_red = ToyEditor(strength=1.0).edit_one(original, ["make the blue circle on the left red"]).image
    to_green = ToyEditor(strength=1.0).edit_one(original, ["make the blue circle on the left green"]).image
    half = ToyEditor(strength=0.5).edit_one(original, ["make the blue circle on the left red"]).image
    assert mean_pixel_change(png_bytes(to_red), png_bytes(to_green)) > 0.02
    full_change = mean_pixel_change(png_bytes(original), png_bytes(to_red))
    assert 0.3 * full_change < mean_pixel_change(png_bytes(original), png_bytes(half)) < 0.7 * full_change


def test_the_toy_editor_reports_what_it_cannot_do():
    editor = ToyEditor()
    blank = Image.new("RGB", (32, 32), (210, 210, 210))
    assert "no object" in editor.edit_one(blank, ["make the red circle on the left blue"]).error
    assert "understood" in editor.edit_one(_render(), ["make it a van gogh painting"]).error
    kept = editor.edit_one(_render(), ["make it pop", "sharpen the image"])
    assert kept.image is not None and kept.details["skipped"] == ["make it pop"]
    with pytest.raises(ValueError, match="strength"):
        ToyEditor(strength=0.0)


# --- curation -----------------------------------------------------------------------------------


def _candidate(index, prompt, image, critique, edited, failure="", error=""):
    return {
        "sample_id": f"0-{index}",
        "prompt": prompt,
        "seed": index,
        "image": png_bytes(image),
        "critique": critique,
        "critique_failure": failure,
        "critique_raw": "raw text",
        "instruction": "; ".join(json.loads(critique)["instructions"]) if critique else "",
        "edited": None if edited is None else png_bytes(edited),
        "edit_error": error,
    }


def _issue(instruction="make the blue circle on the left red"):
    return json.dumps(
        {"issues": [{"aspect": "colour", "severity": 0.9, "evidence": "blue"}], "instructions": [instruction]}
    )


@pytest.fixture
def candidates():
    prompt = "a large red circle on the left"
    blue, red = _render(colour="blue"), _render()
    other_blue = _render(colour="blue", seed=5)
    no_issue = json.dumps({"issues": [], "instructions": []})
    rows = [
        _candidate(0, prompt, blue, _issue(), red),  # kept
        _candidate(1, prompt, blue, _issue(), red),  # same two images: duplicate
        _candidate(2, prompt, blue, "", None, failure="invalid_json"),
        _candidate(3, prompt, red, no_issue, None),
        _candidate(4, prompt, blue, _issue(), None, error="no instruction understood"),
        _candidate(5, prompt, blue, _issue(), blue),  # unchanged: near-duplicate
        _candidate(6, prompt, other_blue, _issue(), _render(seed=5)),  # reward says no
        _candidate(
            7,
            "a small green square on the top",
            _render("yellow", "square", "small", "top"),
            _issue(),
            _render("green", "square", "small", "top"),
        ),
    ]
    original = [0.5, 0.5, 0.1, 0.9, 0.5, 0.5, 0.6, 0.2]
    edited = [0.9, 0.9, np.nan, np.nan, np.nan, 0.7, 0.55, 0.8]
    return pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS)), original, edited


def test_curation_counts_every_stage_and_reason(candidates):
    frame, original, edited = candidates
    curated = curate(frame, original, edited, CurationConfig(min_margin=0.0, min_change=0.01))
    assert curated.counts["dropped"] == {
        "invalid_json": 1,
        "no_issue": 1,
        "edit_failed": 1,
        "near_duplicate": 1,
        "reward_margin": 1,
        "duplicate": 1,
    }
    assert curated.counts["kept"] == 2 and curated.counts["reached"]["sampled"] == 8
    assert curated.counts["reached"]["edited"] == 5 and curated.counts["reached"]["reward_prefers"] == 3
    assert list(curated.decisions["stage"]) == [
        "kept",
        "reward_prefers",
        "sampled",
        "critiqued",
        "has_issues",
        "edited",
        "changed",
        "kept",
    ]
    np.testing.assert_allclose(curated.decisions["margin"].iloc[0], 0.4)


def test_a_higher_margin_and_a_cap_keep_fewer(candidates):
    frame, original, edited = candidates
    strict = curate(frame, original, edited, CurationConfig(min_margin=0.5))
    assert strict.counts["kept"] == 1 and strict.counts["dropped"]["reward_margin"] == 3
    capped = curate(frame, original, edited, CurationConfig(max_pairs_per_prompt=1, duplicate_distance=0.0))
    assert capped.counts["dropped"]["over_cap"] == 1 and capped.counts["kept"] == 2


def test_kept_pairs_are_pickapic_rows_with_the_edit_preferred_in_either_column(candidates, tmp_path):
    frame, original, edited = candidates
    curated = curate(frame, original, edited, CurationConfig(duplicate_distance=0.0), seed=3)
    path = write_pickapic_parquet(curated.rows, tmp_path / "train-00000-of-00001.parquet", EXTRA_COLUMNS)
    loaded = load_preference_frame(path.parent)
    assert list(loaded["critique"]) == [row["critique"] for row in curated.rows]
    pairs, _counts = prepare_pairs(loaded)
    edits = {row["sample_id"]: row["edited"] for row in frame.to_dict("records")}
    assert set(pairs["image_w"]) <= set(edits.values())  # the winner is always the edit
    columns = {row["label_0"] for row in curated.rows}
    assert columns == {0.0, 1.0}  # with 3 pairs and this seed both columns hold a winner


def test_extra_columns_are_checked_when_written(tmp_path):
    row = {"caption": "c", "jpg_0": b"x", "jpg_1": b"y", "label_0": 1.0}
    with pytest.raises(PreferenceDataError, match="critique"):
        write_pickapic_parquet([row], tmp_path / "a.parquet", ("critique",))
    with pytest.raises(PreferenceDataError, match="Pick-a-Pic"):
        write_pickapic_parquet([row], tmp_path / "a.parquet", ("caption",))


def test_curation_refuses_misaligned_scores(candidates):
    frame, original, _ = candidates
    with pytest.raises(ValueError, match="edited reward scores"):
        curate(frame, original, [0.0], CurationConfig())


def test_the_curation_report_shows_the_funnel_reasons_and_examples(candidates):
    frame, original, edited = candidates
    config = CurationConfig(report_examples=4)
    curated = curate(frame, original, edited, config)
    report = curation_report_html(frame, curated, critic="toy", editor="toy", reward="toy_reward", config=config)
    assert "2 pairs kept of 8 samples" in report
    for section in ("curation-counts", "curation-examples", "near_duplicate", "reward_margin", "invalid_json"):
        assert section in report
    assert report.count("<div class='example'>") == 4 and "data:image/png;base64" in report
