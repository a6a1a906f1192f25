"""The snapshot section: defaults (off), every key checked with its JSON path, parity "none" or
"xor" with its frequency and priority, and the shared-memory directory's precedence."""

import pytest

from memfit.checkpointing.snapshot import resolve_shm_dir
from memfit.config import ConfigError, load_config
from memfit.config.snapshot import SHM_DIR_ENV


def snapshot_config(section: dict):
    return load_config({"train_micro_batch_size_per_gpu": 1, "snapshot": section}).snapshot


def test_off_by_default():
    config = load_config({"train_micro_batch_size_per_gpu": 1}).snapshot
    assert config.interval_steps == 0 and config.persist.path is None and config.parity == "none"
    assert config.parity_every == 1 and config.parity_nice == 0


def test_a_full_section_parses():
    config = snapshot_config(
        {
            "interval_steps": 10,
            "persist": {"path": "/ckpt", "every_snapshots": 5, "keep": 3},
            "shm_dir": "/dev/shm/x",
            "keep_shm": True,
            "parity": "xor",
            "parity_every": 4,
            "parity_nice": 0,
        }
    )
    assert (config.interval_steps, config.persist.every_snapshots, config.persist.keep) == (10, 5, 3)
    assert config.shm_dir == "/dev/shm/x" and config.keep_shm
    assert (config.parity, config.parity_every, config.parity_nice) == ("xor", 4, 0)


@pytest.mark.parametrize(
    "section, problem",
    [
        ({"intervals": 5}, "snapshot.intervals: unknown key (did you mean 'interval_steps'?)"),
        ({"interval_steps": -1}, "snapshot.interval_steps: expected an integer >= 0, got -1"),
        ({"interval_steps": 1.5}, "snapshot.interval_steps"),
        ({"persist": {"keep": 0}}, "snapshot.persist.keep: expected an integer >= 1, got 0"),
        ({"persist": {"every_snapshots": 0}}, "snapshot.persist.every_snapshots"),
        ({"persist": {"pth": "/x"}}, "snapshot.persist.pth: unknown key"),
        ({"parity": "raid6"}, 'snapshot.parity: expected one of "none", "xor", got "raid6"'),
        ({"parity": True}, "snapshot.parity: expected one of"),
        ({"parity_every": 0}, "snapshot.parity_every: expected an integer >= 1, got 0"),
        ({"parity_every": "2"}, "snapshot.parity_every: expected an integer"),
        ({"parity_nice": 20}, "snapshot.parity_nice: expected an integer from 0 to 19, got 20"),
        ({"parity_nice": -1}, "snapshot.parity_nice: expected an integer from 0 to 19, got -1"),
        ({"shm_dir": "relative/dir"}, "snapshot.shm_dir: expected an absolute path"),
        ({"keep_shm": "yes"}, "snapshot.keep_shm: expected true or false"),
    ],
)
def test_bad_values_name_the_key(section, problem):
    with pytest.raises(ConfigError) as info:
        snapshot_config(section)
    assert any(line.startswith(problem) for line in info.value.problems), info.value.problems


def test_shm_dir_precedence(monkeypatch):
    monkeypatch.delenv(SHM_DIR_ENV, raising=False)
    monkeypatch.setenv("MEMFIT_JOB_ID", "job7")
    assert resolve_shm_dir(snapshot_config({})) == "/dev/shm/memfit-job7"
    assert resolve_shm_dir(snapshot_config({"shm_dir": "/mnt/slots"})) == "/mnt/slots"
    monkeypatch.setenv(SHM_DIR_ENV, "/tmp/node1")
    assert resolve_shm_dir(snapshot_config({"shm_dir": "/mnt/slots"})) == "/tmp/node1"
