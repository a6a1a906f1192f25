"""Checkpoints on disk are as private as the slots: files 0600 and directories 0700, or 0640 / 0750
with checkpoint.group_access; and `memfit snapshot verify` refuses a rank file whose checksums
match but which does not load as tensors and plain values (a malicious pickle)."""

import json
import os
import stat

import pytest
import torch

import memfit
from memfit.checkpointing.disk import MANIFEST, _sealed, read_manifest
from memfit.checkpointing.integrity import file_digest
from memfit.launcher.cli import main as cli_main


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MEMFIT_CONFIG", raising=False)


def saved_checkpoint(directory, **config) -> str:
    engine = memfit.initialize(torch.nn.Linear(4, 4), {"train_micro_batch_size_per_gpu": 1, **config})
    engine.backward(engine(torch.ones(1, 4)).sum())
    engine.step()
    return engine.save_checkpoint(directory)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("group_access, file_mode, directory_mode", [(False, 0o600, 0o700), (True, 0o640, 0o750)])
def test_checkpoint_modes(tmp_path, group_access, file_mode, directory_mode):
    save_dir = tmp_path / "checkpoints"
    config = {"checkpoint": {"group_access": True}} if group_access else {}
    tag_dir = saved_checkpoint(save_dir, **config)
    assert mode(save_dir) == directory_mode and mode(tag_dir) == directory_mode
    for name in ("rank0.pt", MANIFEST):
        assert mode(os.path.join(tag_dir, name)) == file_mode, name
    assert mode(save_dir / "latest") == file_mode


def test_an_existing_save_dir_keeps_its_mode(tmp_path):
    save_dir = tmp_path / "shared"
    save_dir.mkdir()
    os.chmod(save_dir, 0o755)
    tag_dir = saved_checkpoint(save_dir)
    assert mode(save_dir) == 0o755 and mode(tag_dir) == 0o700


class Payload:
    """What a malicious pickle calls on load (harmless here: it only prints)."""

    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_verify_reports_a_rank_file_that_is_not_weights_only(tmp_path, capsys):
    tag_dir = saved_checkpoint(tmp_path / "checkpoints")
    assert cli_main(["snapshot", "verify", tag_dir]) == 0
    rank_file = os.path.join(tag_dir, "rank0.pt")
    payload = torch.load(rank_file, weights_only=True)
    payload["client_state"] = {"position": Payload()}
    torch.save(payload, rank_file)
    body = read_manifest(tag_dir)  # the checksums made to match the new file
    body["files"]["rank0.pt"].update(bytes=os.path.getsize(rank_file), file_digest=file_digest(rank_file))
    with open(os.path.join(tag_dir, MANIFEST), "w") as file:
        json.dump(_sealed(body), file)
    capsys.readouterr()
    assert cli_main(["snapshot", "verify", tag_dir]) == 2
    output = capsys.readouterr()
    assert f"memfit snapshot verify: {rank_file}: does not load as tensors and plain values" in output.err
    assert "code ran while loading" not in output.out + output.err
