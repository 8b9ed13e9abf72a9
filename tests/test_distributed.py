"""Data-parallel training: 2 CPU processes (gloo) reproduce 1 process with the same global batch."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from alignment.inputs import TrainingInputs
from alignment.launch import launch_training, run_worker
from alignment.models import LORA_WEIGHTS_FILE, ModelSpec, build_tiny_components, load_components, lora_state_dict
from alignment.train import PreferenceTrainer, train_alignment
from tests.test_train import synthetic_pairs, tiny_config

# Float summation order differs (the gradient all-reduce adds 2 x 2 pairs, one process adds 4), and
# Adam normalises each element's step: an element whose gradient is at the float-noise level moves by
# ~lr either way, so the largest single difference is noise-dominated (measured 2.7e-5 after 3 steps,
# lr 1e-3, on 4 of 49,152 elements). What must hold is the run as a whole: measured on the tiny SDXL,
# the difference's L2 norm is 1.4e-4 of the learned LoRA-B norm (which starts at zero), and a run that
# saw other pairs, noise or timesteps is off by the order of that norm itself.
RELATIVE_TOLERANCE = 1e-3
ELEMENT_TOLERANCE = 1e-5
MAX_ELEMENTS_OFF = 1e-3  # fraction of LoRA elements allowed past ELEMENT_TOLERANCE (measured 0.008%)


def assert_trains_like_one_process(actual: dict, expected: dict) -> None:
    """The whole-run criterion: ``actual`` (the saved file, keys under "unet.") against ``expected``'s LoRA."""
    assert set(actual) == {f"unet.{key}" for key in expected}
    differences = [actual[f"unet.{key}"] - value for key, value in expected.items()]
    learned = sum(v.square().sum() for k, v in expected.items() if k.endswith("lora.up.weight")).sqrt().item()
    relative = sum(d.square().sum() for d in differences).sqrt().item() / learned
    elements_off = sum((d.abs() > ELEMENT_TOLERANCE).sum().item() for d in differences)
    total = sum(d.numel() for d in differences)
    assert learned > 0.05, "the LoRA barely moved: the comparison would prove nothing"
    assert relative < RELATIVE_TOLERANCE, f"2 processes differ from 1 by {relative:.3g} of the learned norm"
    assert elements_off <= MAX_ELEMENTS_OFF * total, f"{elements_off} of {total} LoRA elements differ"


@pytest.fixture(scope="module")
def pairs():
    # 6 pairs with a global batch of 4: the third micro-batch wraps into the second epoch's shuffle.
    return synthetic_pairs(build_tiny_components("sdxl", seed=0), num_pairs=6)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, pairs):
    spec = ModelSpec(arch="sdxl", pretrained="tiny")
    # caption dropout 0.25 and gradient accumulation: the shared masks and no_sync are exercised too
    single = tiny_config(train_batch_size=4, gradient_accumulation_steps=2, max_train_steps=3, checkpointing_steps=100)
    components = load_components(spec)
    one = train_alignment(components, pairs, single, checkpoint_dir=tmp_path / "one", show_progress=False)
    expected = lora_state_dict(components.unet)

    logged: list[int] = []
    double = single.model_copy(update={"train_batch_size": 2, "num_processes": 2})
    two, weights_dir = launch_training(
        spec,
        pairs,
        double,
        checkpoint_dir=tmp_path / "two_checkpoints",
        fingerprint="two",
        out_dir=tmp_path / "two",
        log_fn=lambda metrics, step: logged.append(step),
        print_fn=lambda line: None,
    )
    assert two.extra == {"num_processes": 2, "distributed_type": "MULTI_CPU"}
    assert two.final_step == 3 and logged == [1, 2, 3]
    # saved once, by the main process, in the diffusers LoRA format
    assert sorted(p.name for p in weights_dir.iterdir()) == [LORA_WEIGHTS_FILE]
    assert [p.name for p in (tmp_path / "two_checkpoints").iterdir()] == ["checkpoint-000003"]
    actual = load_file(str(weights_dir / LORA_WEIGHTS_FILE))

    # the file holds the keys pipe.load_lora_weights expects: lora_state_dict's, under "unet."
    assert_trains_like_one_process(actual, expected)

    for a, b in zip(one.history, two.history, strict=True):
        assert a["step"] == b["step"]
        assert b["loss/dpo"] == pytest.approx(a["loss/dpo"], abs=1e-4)
        assert b["mse/policy_w"] == pytest.approx(a["mse/policy_w"], abs=1e-4)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)


def test_a_multi_process_config_is_refused_in_a_single_process(tmp_path, pairs):
    with pytest.raises(ValueError, match="num_processes is 2 but this run has 1 process"):
        PreferenceTrainer(build_tiny_components("sdxl"), pairs, tiny_config(num_processes=2), checkpoint_dir=tmp_path)


def test_the_worker_names_bad_inputs(tmp_path, pairs):
    TrainingInputs(encoded=pairs).save(tmp_path / "inputs")
    model = '{"arch": "sdxl", "pretrained": "tiny"}'
    base = ["--model", model, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--inputs: .* is not a TrainingInputs directory"):
        run_worker(["--inputs", str(tmp_path), "--config", "{}", *base])
    with pytest.raises(SystemExit, match="--config: not a valid TrainConfig(.|\n)*train_batch_size"):
        run_worker(["--inputs", str(tmp_path / "inputs"), "--config", '{"train_batch_size": 0}', *base])
    with pytest.raises(SystemExit, match="--config: .*missing.json.* is neither a JSON object nor an existing"):
        run_worker(["--inputs", str(tmp_path / "inputs"), "--config", str(tmp_path / "missing.json"), *base])
