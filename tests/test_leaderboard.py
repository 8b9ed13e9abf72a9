"""The leaderboard's bookkeeping and statistics (benchmarks/leaderboard.py); no training here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.script_modules import load_script

leaderboard = load_script("leaderboard", REPO_ROOT / "benchmarks" / "leaderboard.py")


def test_every_registered_method_is_an_entry_and_smpo_runs_in_both_modes():
    from alignment.methods import method_names

    names = leaderboard.entries(None)
    assert {"dpo", "sft", "smpo", "smpo_cached"} <= set(names)
    assert set(method_names()) <= set(names)
    with pytest.raises(SystemExit, match="unknown leaderboard entries"):
        leaderboard.entries(["dpo", "nonsense"])


def test_richpo_is_dpo_on_its_own_pairs_at_dpos_chosen_setting(tmp_path, monkeypatch):
    assert "richpo" in leaderboard.entries(None)
    assert leaderboard.sweep_cells("richpo") == []  # no tuning budget of its own: DPO's choice
    cell = leaderboard.Cell("final", "richpo", "sd15", 1e-3, 5000.0, 1)
    training = leaderboard.entry_parameters("richpo", "sd15", cell)["training"]
    assert training["method"] == "dpo" and training["beta"] == 5000.0 and training["seed"] == 1
    monkeypatch.setattr(leaderboard, "CELLS_DIR", tmp_path)
    assert leaderboard.chosen_setting("richpo") is None  # until DPO's sweep is done
    for sweep in leaderboard.sweep_cells("dpo"):
        win = 0.7 if (sweep.learning_rate, sweep.beta) == (3e-4, 2000.0) else 0.5
        result = {"world": leaderboard.world_fingerprint("sdxl"), "cell": {**sweep.__dict__}, "scores": {"win_rate": win, "reward_mean": 0.0}}
        leaderboard.write_json_atomically(sweep.path, result)
    assert leaderboard.chosen_setting("richpo") == (3e-4, 2000.0, None)


def test_sweep_gives_every_method_the_same_grid():
    dpo, sft = leaderboard.sweep_cells("dpo"), leaderboard.sweep_cells("sft")
    assert len(dpo) == len(leaderboard.SWEEP_BETAS) * len(leaderboard.SWEEP_LEARNING_RATES)
    assert {c.learning_rate for c in dpo} == {c.learning_rate for c in sft} == set(leaderboard.SWEEP_LEARNING_RATES)
    assert all(c.beta is None for c in sft)  # SFT has no beta: its sweep is the learning rates
    assert all(c.arch == "sdxl" and c.seed == 0 and c.stage == "sweep" for c in dpo + sft)
    assert len({c.name for c in dpo}) == len(dpo)


def test_entry_parameters_apply_the_cell_and_the_variant():
    cell = leaderboard.Cell("sweep", "smpo_cached", "sd15", 1e-3, 1000.0, 2)
    training = leaderboard.entry_parameters("smpo_cached", "sd15", cell)["training"]
    assert training["learning_rate"] == 1e-3 and training["beta"] == 1000.0 and training["seed"] == 2
    assert training["method_options"]["inversion"]["mode"] == "cached"


def test_cells_of_another_world_are_not_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(leaderboard, "CELLS_DIR", tmp_path)
    cell = leaderboard.Cell("sweep", "dpo", "sdxl", 3e-4, 2000.0, 0)
    leaderboard.write_json_atomically(cell.path, {"world": "another", "scores": {}})
    assert leaderboard.load_cell(cell) is None
    leaderboard.write_json_atomically(cell.path, {"world": leaderboard.world_fingerprint(cell.arch), "scores": {}})
    assert leaderboard.load_cell(cell) is not None
    assert [p.name for p in tmp_path.iterdir()] == [cell.path.name]  # nothing half-written left


def test_chosen_setting_is_the_best_validation_cell(tmp_path, monkeypatch):
    monkeypatch.setattr(leaderboard, "CELLS_DIR", tmp_path)
    cells = leaderboard.sweep_cells("dpo")
    assert leaderboard.chosen_setting("dpo") is None
    for index, cell in enumerate(cells):
        win_rate = 0.9 if index == 4 else 0.5
        payload = {
            "world": leaderboard.world_fingerprint(cell.arch),
            "cell": cell.__dict__,
            "scores": {"win_rate": win_rate, "reward_mean": 1.0},
        }
        leaderboard.write_json_atomically(cell.path, payload)
    assert leaderboard.chosen_setting("dpo") == (cells[4].learning_rate, cells[4].beta, None)
    finals = leaderboard.final_cells("dpo", ["sdxl", "sd15"], [0, 1, 2])
    assert len(finals) == 6 and {c.learning_rate for c in finals} == {cells[4].learning_rate}


def test_rpo_sweeps_tau_as_beta_and_its_random_batch_ablation_reuses_the_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(leaderboard, "CELLS_DIR", tmp_path)
    cells = leaderboard.sweep_cells("rpo")
    taus = leaderboard.OPTION_SWEEPS["rpo"][2]
    betas, learning_rates = leaderboard.SWEEP_GRIDS["rpo"]
    assert len(cells) == len(betas) * len(taus) * len(learning_rates) == len(leaderboard.sweep_cells("dpo"))
    assert {c.option for c in cells} == set(taus) and len({c.name for c in cells}) == len(cells)
    assert leaderboard.sweep_cells("rpo_random") == []
    training = leaderboard.entry_parameters("rpo_random", "sdxl", cells[4])["training"]
    assert training["method_options"]["tau"] == cells[4].option
    assert training["method_options"]["batches"] == "random"
    for index, cell in enumerate(cells):
        payload = {
            "world": leaderboard.world_fingerprint(cell.arch),
            "cell": cell.__dict__,
            "scores": {"win_rate": 0.9 if index == 4 else 0.5, "reward_mean": 1.0},
        }
        leaderboard.write_json_atomically(cell.path, payload)
    chosen = (cells[4].learning_rate, cells[4].beta, cells[4].option)
    assert leaderboard.chosen_setting("rpo") == leaderboard.chosen_setting("rpo_random") == chosen
    finals = leaderboard.final_cells("rpo_random", ["sdxl"], [0])
    assert [c.option for c in finals] == [cells[4].option] and "tau" in finals[0].name


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_seeds():
    rng = np.random.default_rng(0)
    few = (rng.random((1, 48, 8)) < 0.7).astype(float)
    many = (rng.random((3, 48, 8)) < 0.7).astype(float)
    low, high = leaderboard.bootstrap_interval(few)
    assert low < few.mean() < high
    low3, high3 = leaderboard.bootstrap_interval(many)
    assert low3 < many.mean() < high3 and (high3 - low3) < (high - low)
    constant = np.ones((3, 10, 8))
    assert leaderboard.bootstrap_interval(constant) == (1.0, 1.0)


def test_difference_interval_sees_a_real_gap_and_none_where_there_is_none():
    rng = np.random.default_rng(1)
    better = (rng.random((3, 48, 8)) < 0.8).astype(float)
    worse = (rng.random((3, 48, 8)) < 0.5).astype(float)
    difference, low, high = leaderboard.difference_interval(better, worse)
    assert low > 0 and low < difference < high
    same = leaderboard.difference_interval(better, better)
    assert same[1] <= 0 <= same[2]


def test_time_to_reach_is_the_first_point_at_the_target():
    curve = [{"step": 25, "win_rate": 0.4, "seconds": 10.0}, {"step": 50, "win_rate": 0.7, "seconds": 20.0}]
    assert leaderboard.time_to_reach(curve, 0.6)["step"] == 50
    assert leaderboard.time_to_reach(curve, 0.4)["step"] == 25
    assert leaderboard.time_to_reach(curve, 0.8) is None


def test_unet_images_are_counted_for_every_forward_pass():
    unet = torch.nn.Conv2d(4, 4, 1)

    def forward(sample, timestep=None):  # the diffusers UNet's call signature: sample first, or by keyword
        return unet(sample)

    module = torch.nn.Module()
    module.forward = forward
    with leaderboard.counting_unet_images(module) as counter:
        module(torch.zeros(3, 4, 2, 2))
        module(sample=torch.zeros(5, 4, 2, 2))
    assert counter["images"] == 8
    module(torch.zeros(2, 4, 2, 2))
    assert counter["images"] == 8  # the hook is gone after the block


def test_paired_scores_refuse_different_grids_and_count_ties_half():
    base = {"prompts": ["a", "a"], "seeds": [0, 1], "reward": [1.0, 2.0], "all_correct": [False, True]}
    aligned = {"prompts": ["a", "a"], "seeds": [0, 1], "reward": [1.5, 2.0], "all_correct": [True, True]}
    scores = leaderboard.paired_scores(aligned, base)
    assert scores["win_rate"] == 0.75 and scores["all_correct"] == 1.0 and scores["all_correct_base"] == 0.5
    with pytest.raises(ValueError, match="different grids"):
        leaderboard.paired_scores({**aligned, "seeds": [0, 2]}, base)
    json.dumps(scores)  # what a cell stores must be plain JSON
