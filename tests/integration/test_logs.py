"""What a user sees from a script that set up no logging, started by `memfit run` on 2 ranks:
the resolved config and the steps_per_print lines once (rank 0), each warning once with no
source line under it, and nothing but warnings under a quieter log level."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plain_script.py")
IGNORED = "wall_clock_breakdown: true is ignored by memfit"


def run_job(tmp_path, extra_config=None, env=None):
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "steps_per_print": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        "zero_optimization": {"stage": 2},
        "wall_clock_breakdown": True,  # a key memfit warns about
        **(extra_config or {}),
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "memfit.launcher.cli",
            "run",
            "--nproc-per-node",
            "2",
            "--config",
            str(path),
            SCRIPT,
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_rank_0_prints_the_config_and_step_lines_once(tmp_path):
    output = run_job(tmp_path)
    assert output.count("memfit config:\n  batch: global 4 = micro batch 2 x accumulation 1 x 2 ranks") == 1
    assert output.count("memfit: config: optimizer.params.lr = 0.001 (auto: AdamW's default)") == 1
    for step in (2, 4):
        assert output.count(f"memfit: step {step} loss ") == 1, output
    assert "memfit: step 1 " not in output and "memfit: step 3 " not in output
    assert output.count(IGNORED) == 1, output  # printed by `memfit run`, not again by rank 0
    assert "warnings.warn" not in output and "return build(" not in output and "UserWarning" not in output


@pytest.mark.parametrize(
    "how",
    [
        pytest.param({"extra_config": {"memfit": {"log_level": "warning"}}}, id="config"),
        pytest.param({"env": {"MEMFIT_LOG_LEVEL": "warning"}}, id="env", marks=pytest.mark.slow),
    ],
)
def test_a_quieter_level_keeps_only_warnings(tmp_path, how):
    output = run_job(tmp_path, **how)
    assert "memfit config:" not in output and "memfit: step " not in output
    assert output.count(IGNORED) == 1
