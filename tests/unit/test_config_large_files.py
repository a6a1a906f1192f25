"""Config files far larger than any real one: read or refused in linear time, and a file past the
size cap refused with its name and the limit before it is parsed."""

import json
import time

import pytest

from memfit.config import ConfigError, load_config
from tests.unit.test_config_cli import check


def keys_file(tmp_path, num_keys: int, section: str | None = None):
    keys = {f"k{index}": index for index in range(num_keys)}
    config = {"train_micro_batch_size_per_gpu": 1}
    if section == "optimizer":
        config["optimizer"] = {"type": "AdamW", "params": keys}
    else:
        config.update(keys)
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config, separators=(",", ":")))
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("section", [None, "optimizer"])
def test_a_file_of_60k_unknown_keys_is_refused_in_linear_time(tmp_path, section):
    load_config({"train_micro_batch_size_per_gpu": 1})  # imports outside the timing
    path = keys_file(tmp_path, 60_000, section)
    assert path.stat().st_size < 1_000_000  # under the cap: parsed and checked
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert time.monotonic() - start < 2.0
    assert len(info.value.problems) == 60_000
    prefix = "optimizer.params." if section else ""
    assert info.value.problems[-1] == f"{prefix}k59999: unknown key"


@pytest.mark.timeout(30)
def test_duplicate_keys_among_40k_are_found_in_linear_time(tmp_path):
    path = tmp_path / "ds_config.json"
    pairs = ",".join(f'"k{index % 20_000}": {index}' for index in range(40_000))
    path.write_text("{" + pairs + "}")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"invalid JSON: duplicate keys \['k0', 'k1', 'k10'"):
        load_config(str(path))
    assert time.monotonic() - start < 2.0


def test_a_file_over_the_cap_is_refused_by_config_check_naming_file_and_limit(tmp_path):
    path = keys_file(tmp_path, 200_000)
    assert path.stat().st_size > 3_000_000
    result = check(str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"{path}: larger than the 1048576 bytes a config may hold; is this the config file?"
    )
