"""A model built under memfit.zero_init trains at ZeRO stage 3 with its parameters on NVMe exactly
as the same model built in memory: same losses, same final parameters, bit for bit (the example
GPT, see zero_init_job.py), on one rank in the fast tier and on two under torchrun in the slow
tier."""

import os
import subprocess
import sys

import pytest

from tests.distributed.zero_init_job import ROOT, differences, train


def test_example_gpt_built_under_zero_init_trains_as_the_eager_build(tmp_path):
    eager = train(False, str(tmp_path), steps=2)
    deferred = train(True, str(tmp_path), steps=2)
    assert not differences(eager, deferred)
    assert len(set(eager[0])) > 1  # it trained


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_example_gpt_built_under_zero_init_trains_as_the_eager_build_on_two_ranks(tmp_path):
    job = os.path.join(ROOT, "tests", "distributed", "zero_init_job.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", job]
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, env=env, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
