"""An offloaded run that would need more host memory than its cgroup allows is refused at
initialize, before anything is allocated, with the estimate as a table; one that fits starts.
The limit is a real memory cgroup (v1 or v2) around the training process."""

import os
import subprocess
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = """
import sys, torch, memfit
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(int(sys.argv[1]))])
config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
try:
    engine = memfit.initialize(model, config)
except memfit.ConfigError as error:
    print(error)
    sys.exit(3)
print("started", engine.memory_report()["by_tier"]["host"])
"""


@pytest.fixture
def memory_cgroup():
    """A memory cgroup limited to 700 MiB; yields the file a process writes its pid into."""
    name = f"memfit-test-{uuid.uuid4().hex[:8]}"
    for base, limit_file in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        path = os.path.join(base, name)
        try:
            os.mkdir(path)
            with open(os.path.join(path, limit_file), "w") as limit:
                limit.write(str(700 << 20))
        except OSError:
            if os.path.isdir(path):
                os.rmdir(path)
            continue
        yield os.path.join(path, "cgroup.procs")
        os.rmdir(path)
        return
    pytest.skip("cannot create a memory cgroup here")


def run_in(procs_file, num_layers):
    command = f'echo $$ > {procs_file} && exec "{sys.executable}" -c "$MEMFIT_SCRIPT" {num_layers}'
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MEMFIT_SCRIPT": SCRIPT, "PYTHONPATH": ROOT})  # fmt: skip


def test_too_little_host_memory_is_refused_with_the_estimate(memory_cgroup):
    refused = run_in(memory_cgroup, 40)  # 40M bf16 parameters: the host tier alone needs 480 MiB
    assert refused.returncode == 3, refused.stderr[-2000:]
    lines = refused.stdout.splitlines()
    assert lines[0].startswith("memfit.initialize: host memory: the 1 rank(s) on this node need 560.0 MiB more, ")
    assert lines[1].split() == ["rank", "params", "grads", "(staging)", "fp32", "masters", "optimizer", "state",
                                "device", "host"]  # fmt: skip
    assert lines[2].split() == ["0", "80.0", "MiB", "80.0", "MiB", "0", "B", "160.0", "MiB", "320.0", "MiB", "160.0",
                                "MiB", "480.0", "MiB"]  # fmt: skip
    fits = run_in(memory_cgroup, 4)
    assert fits.returncode == 0, fits.stdout + fits.stderr[-2000:]
    assert fits.stdout.startswith("started")
