"""The preflight finds the evaluation scorers' weights before a run starts (no model is loaded).

Each published scorer's ``locate`` does the resolutions its ``load`` starts
with; ``check_scorer_available`` dispatches by name; ``pipelines/configuration``
lists every missing scorer with the other missing pieces. Files here are empty
stand-ins: ``locate`` only looks for them (``tests/test_eval_scorers.py`` and
``tests/test_rewards.py`` load real tiny checkpoints through the same code).
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
from click.testing import CliRunner

from alignment.models import ModelNotAvailableError
from alignment.rewards import available_scorers, check_scorer_available, register_scorer
from alignment.rewards import base as rewards_base
from alignment.rewards.clip_scorers import AESTHETIC_WEIGHTS_FILE, PICKSCORE_MODEL, PICKSCORE_PROCESSOR
from alignment.rewards.hps import HPS_REPO, HPS_V21_FILE
from alignment.rewards.image_reward import IMAGE_REWARD_FILE, IMAGE_REWARD_REPO, MED_CONFIG_FILE
from pipelines import configuration

PUBLISHED = ("pickscore", "hpsv21", "imagereward", "laion_aesthetic", "clip_score")


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path_factory, monkeypatch):
    """Hub ids resolve against an empty Hugging Face cache, whatever this machine holds."""
    cache = tmp_path_factory.mktemp("hf_cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _touch(path: Path, text: str = "{}") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _clip_dir(directory: Path, *, weights: bool = True, processor: bool = True) -> Path:
    """A CLIPModel directory's file names (the contents are never read by ``locate``)."""
    _touch(directory / "config.json")
    if weights:
        _touch(directory / "model.safetensors", "")
    if processor:
        _touch(directory / "preprocessor_config.json")
        _touch(directory / "vocab.json")
        _touch(directory / "merges.txt", "")
    return directory


def _scorer_files(root: Path) -> dict[str, dict]:
    """Every published scorer's files as stand-ins; returns ``{name: {source, options}}`` (``evaluation.scorers``)."""
    clip = _clip_dir(root / "clip")
    processor = _clip_dir(root / "processor", weights=False)
    hps = _touch(root / "hps" / HPS_V21_FILE, "")
    bert = _touch(root / "bert" / "vocab.txt", "[PAD]\n")
    reward = root / "imagereward"
    _touch(reward / IMAGE_REWARD_FILE, "")
    _touch(reward / MED_CONFIG_FILE)
    head = _touch(root / "aesthetic" / AESTHETIC_WEIGHTS_FILE, "")
    return {
        # raw_cosine, clip_config, vision_config: options that name no file are accepted and ignored
        "pickscore": {"source": str(clip), "options": {"processor_source": str(processor), "raw_cosine": True}},
        "hpsv21": {"source": str(hps.parent), "options": {"tokenizer_source": str(processor), "clip_config": {}}},
        "imagereward": {"source": str(reward), "options": {"tokenizer_source": str(bert.parent), "vision_config": {}}},
        "laion_aesthetic": {"source": str(head), "options": {"clip_source": str(clip)}},
        "clip_score": {"source": str(clip), "options": {}},
    }


# --------------------------------------------------------------------------- locate


def test_every_published_scorer_locates_the_files_its_load_reads(tmp_path):
    specs = _scorer_files(tmp_path)
    found = {name: check_scorer_available(name, spec["source"], spec["options"]) for name, spec in specs.items()}
    assert found["pickscore"] == {"model": tmp_path / "clip", "processor": tmp_path / "processor"}
    assert found["hpsv21"] == {"checkpoint": tmp_path / "hps" / HPS_V21_FILE, "tokenizer": tmp_path / "processor"}
    assert found["imagereward"] == {
        "checkpoint": tmp_path / "imagereward" / IMAGE_REWARD_FILE,
        "med_config": tmp_path / "imagereward" / MED_CONFIG_FILE,
        "tokenizer": tmp_path / "bert",
    }
    assert found["laion_aesthetic"] == {
        "head": tmp_path / "aesthetic" / AESTHETIC_WEIGHTS_FILE,
        "clip": tmp_path / "clip",
    }
    assert found["clip_score"] == {"model": tmp_path / "clip", "processor": tmp_path / "clip"}
    # A directory given for a file scorer finds the file in it; a path to the file itself is taken as it is.
    assert check_scorer_available("laion_aesthetic", str(tmp_path / "aesthetic"), specs["laion_aesthetic"]["options"])


def test_the_published_defaults_name_their_hub_ids():
    """Offline with an empty cache, each default names what to download (and nothing is loaded)."""
    expected = {
        "pickscore": [PICKSCORE_MODEL, PICKSCORE_PROCESSOR],
        "hpsv21": [HPS_REPO, HPS_V21_FILE, "HPS tokenizer"],
        "imagereward": [IMAGE_REWARD_REPO, IMAGE_REWARD_FILE, "bert-base-uncased"],
        "laion_aesthetic": [AESTHETIC_WEIGHTS_FILE, "openai/clip-vit-large-patch14"],
        "clip_score": ["openai/clip-vit-large-patch14"],
    }
    for name, needles in expected.items():
        with pytest.raises(ModelNotAvailableError) as caught:
            check_scorer_available(name)
        for needle in needles:
            assert needle in str(caught.value), (name, needle)
    # clip_score reads model and processor from one repo: it is named once.
    with pytest.raises(ModelNotAvailableError) as caught:
        check_scorer_available("clip_score")
    assert str(caught.value).count("'openai/clip-vit-large-patch14'") == 1


def test_every_missing_piece_of_a_scorer_is_named_at_once(tmp_path):
    specs = _scorer_files(tmp_path)

    # PickScore: the model directory has no weights, the processor directory no tokenizer.
    bare = _clip_dir(tmp_path / "bare", weights=False, processor=False)
    with pytest.raises(ModelNotAvailableError) as caught:
        check_scorer_available("pickscore", str(bare), {"processor_source": str(bare)})
    message = str(caught.value)
    assert "PickScore model" in message and "weights (*.safetensors or *.bin)" in message
    assert "PickScore processor" in message and "preprocessor_config.json" in message and "tokenizer files" in message

    # HPSv2.1: a directory without the checkpoint, and a tokenizer that does not exist.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotAvailableError) as caught:
        check_scorer_available("hpsv21", str(empty), {"tokenizer_source": str(tmp_path / "no_tokenizer")})
    assert HPS_V21_FILE in str(caught.value) and str(tmp_path / "no_tokenizer") in str(caught.value)

    # ImageReward: the checkpoint without its med_config.json next to it.
    lone = _touch(tmp_path / "lone" / IMAGE_REWARD_FILE, "")
    with pytest.raises(ModelNotAvailableError, match=MED_CONFIG_FILE):
        check_scorer_available("imagereward", str(lone), specs["imagereward"]["options"])
    options = {**specs["imagereward"]["options"], "med_config": str(tmp_path / "imagereward" / MED_CONFIG_FILE)}
    assert check_scorer_available("imagereward", str(lone), options)["med_config"].name == MED_CONFIG_FILE

    # LAION aesthetic: no source at all (it has no hub id), and a backbone without its preprocessor.
    no_processor = _clip_dir(tmp_path / "no_processor", processor=False)
    with pytest.raises(ModelNotAvailableError) as caught:
        check_scorer_available("laion_aesthetic", None, {"clip_source": str(no_processor)})
    assert "needs source=" in str(caught.value) and "preprocessor_config.json" in str(caught.value)


def test_load_reports_what_locate_finds_missing(tmp_path):
    """``load`` resolves through ``locate``: the same message, before any model is built."""
    from alignment.rewards.clip_scorers import PickScoreScorer
    from alignment.rewards.hps import HpsV21Scorer

    bare = _clip_dir(tmp_path / "bare", weights=False, processor=False)
    with pytest.raises(ModelNotAvailableError) as from_load:
        PickScoreScorer.load(str(bare), processor_source=str(bare))
    with pytest.raises(ModelNotAvailableError) as from_locate:
        PickScoreScorer.locate(str(bare), processor_source=str(bare))
    assert str(from_load.value) == str(from_locate.value)
    with pytest.raises(ModelNotAvailableError, match=HPS_V21_FILE):
        HpsV21Scorer.load(str(tmp_path))


def test_scorers_without_files_pass_and_unknown_names_are_refused(tmp_path):
    # The toy world's learned reward: its two committed files.
    files = check_scorer_available("toy_reward")
    assert sorted(path.name for path in files.values()) == ["reward_model.json", "reward_model.safetensors"]
    with pytest.raises(FileNotFoundError, match="python -m alignment.toyworld.reward_model"):
        check_scorer_available("toy_reward", str(tmp_path))

    # A scorer registered without a locator has nothing to find.
    register_scorer("file_free", lambda source, **kwargs: None, replace=True)
    try:
        assert check_scorer_available("file_free", "anything", {"x": 1}) == {}
    finally:
        rewards_base._REGISTRY.pop("file_free", None)
    assert "file_free" not in available_scorers()

    with pytest.raises(ValueError, match="Unknown scorer 'nope'"):
        check_scorer_available("nope")


# --------------------------------------------------------------------------- preflight


def _evaluate_config(*overrides: str) -> dict:
    # The tiny profile's base model and candidate are in the repository: only the scorers can be missing.
    return configuration.resolve_config("evaluate", None, "tiny", overrides)


def test_the_evaluate_preflight_names_each_missing_scorer_and_ends_with_the_hint(tmp_path):
    specs = _scorer_files(tmp_path)
    table = [{"name": name, **spec} for name, spec in specs.items()]
    config = _evaluate_config()
    config["parameters"]["evaluation"]["scorers"] = table
    configuration.preflight("evaluate", config)  # every file is there

    config["parameters"]["evaluation"]["scorers"] = [
        {"name": "pickscore"},
        {"name": "hpsv21", "source": str(tmp_path / "nowhere")},
        table[-1],  # clip_score, present
    ]
    with pytest.raises(configuration.ConfigurationError) as caught:
        configuration.preflight("evaluate", config)
    lines = caught.value.message.splitlines()
    scorer_lines = [line for line in lines if line.startswith("evaluation scorer ")]
    assert [line.split(":")[0] for line in scorer_lines] == ["evaluation scorer pickscore", "evaluation scorer hpsv21"]
    assert PICKSCORE_MODEL in scorer_lines[0] and str(tmp_path / "nowhere") in scorer_lines[1]
    assert lines[-1].startswith("To run the embedded default instead:")


def test_a_training_preflight_checks_the_primary_scorer_and_the_table(tmp_path):
    specs = _scorer_files(tmp_path)
    overrides = ("parameters.evaluation.scorer=pickscore",)
    config = configuration.resolve_config("dpo_sdxl", None, "tiny", overrides)
    with pytest.raises(configuration.ConfigurationError) as caught:
        configuration.preflight("dpo_sdxl", config)
    message = caught.value.message
    assert "evaluation scorer pickscore:" in message and PICKSCORE_MODEL in message
    assert message.splitlines()[-1] == "To run the embedded default instead: python run.py --pipeline dpo_sdxl --profile tiny"

    # Given as a table entry with its source, the primary scorer is found.
    config = configuration.resolve_config("dpo_sdxl", None, "tiny", overrides)
    config["parameters"]["evaluation"]["scorers"] = [{"name": "pickscore", **specs["pickscore"]}]
    configuration.preflight("dpo_sdxl", config)


def test_a_missing_scorer_is_a_note_when_the_hub_is_reachable(monkeypatch, capsys):
    monkeypatch.setattr(configuration, "_hub_reachable", lambda timeout=3.0: True)
    config = _evaluate_config("parameters.evaluation.scorers=[pickscore]")
    configuration.preflight("evaluate", config)
    out = capsys.readouterr().out
    assert "note: evaluation scorer pickscore is not on this machine" in out and PICKSCORE_MODEL in out


def test_pipelines_that_do_not_evaluate_do_not_check_the_scorers():
    # The style pipeline scores its samples with its style scorer, not with evaluation.scorers.
    config = configuration.resolve_config(
        "style_alignment", None, "tiny", ("parameters.evaluation.scorers=[pickscore, hpsv21]",)
    )
    configuration.preflight("style_alignment", config)


def test_the_cli_names_the_missing_scorers_of_a_real_config():
    import run  # the CLI itself

    result = CliRunner().invoke(
        run.main, ["--pipeline", "dpo_sdxl", "--set", "parameters.data.path=data/tiny_pickapic"]
    )
    assert result.exit_code == 1
    output = result.output
    for name in PUBLISHED:
        assert f"evaluation scorer {name}:" in output, name
    assert "yuvalkirstain/PickScore_v1" in output and HPS_REPO in output and IMAGE_REWARD_REPO in output
    # Next to the base model, one line per scorer, the hint last.
    assert "stabilityai/stable-diffusion-xl-base-1.0" in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert sum(line.startswith("evaluation scorer ") for line in lines) == len(PUBLISHED)
    assert lines[-1] == "To run the embedded default instead: python run.py --pipeline dpo_sdxl --profile tiny"
