"""The snapshot slot directory belongs to the user, not to memfit: a directory that existed before
the job keeps everything memfit did not make, a directory prepared by another user (or with
symlinks planted in it) is refused without touching what the links point at, a read-only one is
a one-line error, and a failed agent start leaves nothing behind. Each job is a real process
calling memfit.initialize, as a user's script does."""

import os
import subprocess

import pytest

from tests.integration.shm_scripts import OTHER_UID, config_with, last_line, train, wait_for_agents_to_exit

MEMFIT_FILES = ("agent.sock", "agent.lock", "agent.spawn.lock", "rank0.slot0", "rank0.slot1", ".memfit-created")


def test_an_existing_shm_dir_keeps_what_memfit_did_not_make(tmp_path):
    shm_dir = tmp_path / "slots"
    shm_dir.mkdir()
    (shm_dir / "precious").write_text("the user's")
    done, report = train(tmp_path, config_with({"shm_dir": str(shm_dir)}))
    assert done.returncode == 0, done.stderr[-2000:]
    assert report["step"] == 2
    wait_for_agents_to_exit(str(shm_dir))
    assert sorted(os.listdir(shm_dir)) == ["precious"]
    assert (shm_dir / "precious").read_text() == "the user's"


@pytest.mark.slow
def test_a_shm_dir_memfit_made_is_removed_and_one_named_by_the_environment_kept(tmp_path):
    made = tmp_path / "made"
    done, _ = train(tmp_path, config_with({"shm_dir": str(made)}))
    assert done.returncode == 0, done.stderr[-2000:]
    wait_for_agents_to_exit(str(made))
    assert not made.exists()

    environment_dir = tmp_path / "from-env"  # MEMFIT_SNAPSHOT_SHM_DIR, an existing directory
    environment_dir.mkdir()
    (environment_dir / "notes.txt").write_text("keep")
    done, _ = train(tmp_path, config_with({}), MEMFIT_SNAPSHOT_SHM_DIR=str(environment_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    wait_for_agents_to_exit(str(environment_dir))
    assert sorted(os.listdir(environment_dir)) == ["notes.txt"]


def victims(tmp_path) -> dict:
    """Files the job's user owns, which a planted symlink points at."""
    found = {}
    for name in ("lock-victim", "slot-victim"):
        path = tmp_path / name
        path.write_bytes(b"precious bytes " * 10)
        found[name] = path
    return found


def assert_untouched(found: dict) -> None:
    for path in found.values():
        assert path.read_bytes() == b"precious bytes " * 10, path


@pytest.mark.skipif(os.geteuid() != 0, reason="preparing a directory as another user needs root")
def test_a_directory_prepared_by_another_user_is_refused_and_its_links_not_followed(tmp_path):
    shm_dir = tmp_path / "memfit-none"
    shm_dir.mkdir(mode=0o755)
    found = victims(tmp_path)
    os.symlink(found["lock-victim"], shm_dir / "agent.spawn.lock")
    os.symlink(found["slot-victim"], shm_dir / "rank0.slot0")
    for path in [shm_dir, shm_dir / "agent.spawn.lock", shm_dir / "rank0.slot0"]:
        os.chown(path, OTHER_UID, OTHER_UID, follow_symlinks=False)
    done, _ = train(tmp_path, config_with({"shm_dir": str(shm_dir)}))
    assert done.returncode != 0
    line = last_line(done)
    assert "AgentError" in line and str(shm_dir) in line and f"owned by uid {OTHER_UID}" in line, done.stderr[-2000:]
    assert_untouched(found)
    assert sorted(os.listdir(shm_dir)) == ["agent.spawn.lock", "rank0.slot0"]


@pytest.mark.parametrize("planted", ["agent.spawn.lock", "rank0.slot0"])
def test_a_symlink_planted_in_an_own_directory_is_refused(tmp_path, planted):
    shm_dir = tmp_path / "slots"
    shm_dir.mkdir(mode=0o700)
    found = victims(tmp_path)
    os.symlink(found["slot-victim"], shm_dir / planted)
    done, _ = train(tmp_path, config_with({"shm_dir": str(shm_dir)}))
    assert done.returncode != 0
    line = last_line(done)
    assert f"{shm_dir / planted}: is a symlink" in line, done.stderr[-2000:]
    assert_untouched(found)


def test_a_shm_dir_others_may_write_is_refused(tmp_path):
    shm_dir = tmp_path / "shared"
    shm_dir.mkdir()
    os.chmod(shm_dir, 0o777)
    done, _ = train(tmp_path, config_with({"shm_dir": str(shm_dir)}))
    assert done.returncode != 0
    assert "writable by other users (mode 777)" in last_line(done), done.stderr[-2000:]
    assert os.listdir(shm_dir) == []


@pytest.fixture
def read_only_mount(tmp_path):
    """A read-only tmpfs owned by this user (read-only even for root, unlike a mode)."""
    point = tmp_path / "read-only"
    point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m,mode=0755", "tmpfs", str(point)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield str(point)
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_read_only_shm_dir_is_a_one_line_error(tmp_path, read_only_mount):
    done, _ = train(tmp_path, config_with({"shm_dir": read_only_mount}))
    assert done.returncode != 0
    line = last_line(done)
    assert line.startswith("memfit.checkpointing.agent.AgentError") and f"{read_only_mount}: read-only" in line, (
        done.stderr[-2000:]
    )
    assert "OSError" not in done.stderr and "PermissionError" not in done.stderr


def test_a_failed_agent_start_leaves_no_spawn_lock(tmp_path):
    # a Unix socket path is at most 107 bytes: the agent cannot listen there and exits at start
    shm_dir = tmp_path / ("x" * 110)
    done, _ = train(tmp_path, config_with({"shm_dir": str(shm_dir)}))
    assert done.returncode != 0
    assert "snapshot agent exited at start" in last_line(done), done.stderr[-2000:]
    assert not shm_dir.exists()
