"""Config files far larger than any real one: read or refused in linear time, and a file past the
size cap refused with its name and the limit before it is parsed."""

import json
import time
import warnings

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
def test_a_file_of_60k_unknown_keys_is_refused_in_linear_time(tmp_path):
    load_config({"train_micro_batch_size_per_gpu": 1})  # imports outside the timing
    path = keys_file(tmp_path, 60_000, "optimizer")
    assert path.stat().st_size < 1_000_000  # under the cap: parsed and checked
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert time.monotonic() - start < 10.0  # quadratic took minutes
    assert len(info.value.problems) == 60_000
    assert info.value.problems[-1] == "optimizer.params.k59999: unknown key"


@pytest.mark.timeout(60)
def test_60k_unknown_top_level_keys_warn_in_linear_time(tmp_path):
    """DeepSpeed ignores unknown top-level keys, so memfit warns about each instead of refusing."""
    load_config({"train_micro_batch_size_per_gpu": 1})
    path = keys_file(tmp_path, 60_000, None)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(str(path))
    assert time.monotonic() - start < 10.0
    unknown = [str(w.message) for w in caught if "unknown key" in str(w.message)]
    assert len(unknown) == 60_000
    assert unknown[-1] == f"{path}: k59999: unknown key; ignored, as DeepSpeed ignores unknown top-level keys"


@pytest.mark.timeout(30)
def test_duplicate_keys_among_40k_are_found_in_linear_time(tmp_path):
    path = tmp_path / "ds_config.json"
    pairs = ",".join(f'"k{index % 20_000}": {index}' for index in range(40_000))
    path.write_text("{" + pairs + "}")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"invalid JSON: duplicate keys \['k0', 'k1', 'k10'"):
        load_config(str(path))
    assert time.monotonic() - start < 10.0


def test_a_file_over_the_cap_is_refused_by_config_check_naming_file_and_limit(tmp_path):
    path = keys_file(tmp_path, 200_000)
    assert path.stat().st_size > 3_000_000
    result = check(str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"{path}: larger than the 1048576 bytes a config may hold; is this the config file?"
    )
