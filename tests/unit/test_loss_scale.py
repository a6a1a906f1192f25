"""Dynamic loss scaling follows DeepSpeed's DynamicLossScaler step for step: hand-checked on one
overflow sequence, and against DeepSpeed itself (when installed) on random sequences for every
combination of window, hysteresis and consecutive hysteresis."""

import json
import os
import random
import socket
import subprocess
import sys

import pytest

from memfit.runtime.loss_scale import DynamicLossScaler, StaticLossScaler

SETTINGS = [
    dict(window=window, hysteresis=hysteresis, consecutive=consecutive, min_scale=min_scale)
    for window in (1, 2, 5)
    for hysteresis in (1, 2, 3)
    for consecutive in (False, True)
    for min_scale in (1, 1024)
]


def trajectory(setting, overflows, initial_scale=2.0**16):
    scaler = DynamicLossScaler(initial_scale=initial_scale, **setting)
    out = []
    for overflow in overflows:
        try:
            scaler.update(overflow)
        except RuntimeError:
            out.append("stop")
            break
        out.append([scaler.scale, scaler.hysteresis_left])
    return out


def test_hand_checked_sequence():
    # window 3, hysteresis 2: the first overflow only spends hysteresis, the second halves; the
    # scale doubles after 3 good steps counted from the step after the last overflow
    got = trajectory(dict(window=3, hysteresis=2, consecutive=False, min_scale=1), [0, 1, 1, 0, 0, 0, 0, 1, 0])
    assert got == [
        [65536, 2],
        [65536, 1],
        [32768, 1],
        [32768, 1],
        [32768, 1],
        [32768, 1],
        [65536, 2],
        [65536, 1],
        [65536, 1],
    ]


def test_overflow_at_the_minimum_stops_training():
    scaler = DynamicLossScaler(initial_scale=2.0, window=10, min_scale=1, hysteresis=1, consecutive=False)
    scaler.update(True)
    assert scaler.scale == 1.0
    with pytest.raises(RuntimeError, match=r"loss scale is already at min_loss_scale \(1\)"):
        scaler.update(True)


def test_state_round_trip_and_static_scaler():
    scaler = DynamicLossScaler(initial_scale=2.0**10, window=2, min_scale=1, hysteresis=2, consecutive=False)
    for overflow in (True, True, False):
        scaler.update(overflow)
    again = DynamicLossScaler(initial_scale=1.0, window=2, min_scale=1, hysteresis=2, consecutive=False)
    again.load_state_dict(scaler.state_dict())
    for overflow in (False, True, False, False):
        scaler.update(overflow)
        again.update(overflow)
        assert again.state_dict() == scaler.state_dict()
    static = StaticLossScaler(128.0)
    static.update(True)
    assert static.scale == 128.0


DEEPSPEED_SCRIPT = """
import json, sys
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
cases = json.loads(sys.stdin.read())
results = []
for setting, overflows in cases:
    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=setting["window"], min_scale=setting["min_scale"],
                               delayed_shift=setting["hysteresis"], consecutive_hysteresis=setting["consecutive"])
    out = []
    for overflow in overflows:
        try:
            scaler.update_scale(bool(overflow))
        except Exception:
            out.append("stop")
            break
        out.append([scaler.cur_scale, scaler.cur_hysteresis])
    results.append(out)
print(json.dumps(results))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_scale_trajectory_equals_deepspeed():
    pytest.importorskip("deepspeed")
    rng = random.Random(0)
    cases = [(setting, [int(rng.random() < p) for _ in range(60)]) for setting in SETTINGS for p in (0.1, 0.4, 0.8)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT], input=json.dumps(cases), capture_output=True,
                            text=True, env=env, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    expected = json.loads(result.stdout.strip().splitlines()[-1])
    for (setting, overflows), theirs in zip(cases, expected):
        assert trajectory(setting, overflows) == theirs, setting
