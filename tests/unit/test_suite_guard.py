"""The guard in tests/conftest.py: a test file that pytest does not collect (a folder it skips by
name, such as `build`) fails the whole-suite run in both tiers, and a file whose tests are all in
the other tier still counts as collected."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import TESTS_ROOT


def make_suite(root, *, with_skipped_folder: bool) -> str:
    suite = root / "tests"
    suite.mkdir()
    shutil.copy(os.path.join(TESTS_ROOT, "conftest.py"), suite / "conftest.py")
    (suite / "test_fast.py").write_text("def test_fast():\n    pass\n")
    (suite / "test_only_slow.py").write_text("import pytest\n\n\n@pytest.mark.slow\ndef test_slow():\n    pass\n")
    if with_skipped_folder:
        (suite / "build").mkdir()
        (suite / "build" / "test_hidden.py").write_text("def test_hidden():\n    pass\n")
    return str(suite)


def run_pytest(suite: str, *args: str) -> subprocess.CompletedProcess:
    project = os.path.dirname(TESTS_ROOT)
    settings = os.path.join(project, "pyproject.toml")
    command = [sys.executable, "-m", "pytest", suite, "-q", "-p", "no:cacheprovider", "-c", settings, *args]
    env = {**os.environ, "PYTHONPATH": project}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=os.path.dirname(suite), timeout=120)


@pytest.mark.parametrize("tier", [[], ["-m", "slow"]], ids=["fast", "slow"])
def test_a_file_pytest_skips_fails_the_run(tmp_path, tier):
    result = run_pytest(make_suite(tmp_path, with_skipped_folder=True), *tier)
    assert result.returncode != 0
    assert "test files on disk that pytest did not collect: build/test_hidden.py" in result.stdout + result.stderr


@pytest.mark.parametrize("tier, ran", [([], "test_fast"), (["-m", "slow"], "test_slow")], ids=["fast", "slow"])
def test_each_tier_runs_its_own_tests(tmp_path, tier, ran):
    result = run_pytest(make_suite(tmp_path, with_skipped_folder=False), *tier, "-rA")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 deselected" in result.stdout
    assert f"::{ran}\n" in result.stdout.replace("PASSED ", "")


def test_a_slow_tier_variant_its_file_no_longer_has_fails_the_run(tmp_path):
    suite = make_suite(tmp_path, with_skipped_folder=False)
    os.mkdir(os.path.join(suite, "unit"))
    with open(os.path.join(suite, "unit", "test_suite_guard.py"), "w") as file:  # a file the list names
        file.write("def test_renamed():\n    pass\n")
    result = run_pytest(suite)
    assert result.returncode != 0
    assert "SLOW_TIER_VARIANTS in tests/conftest.py names tests that do not exist" in result.stdout + result.stderr
    assert "unit/test_suite_guard.py::test_each_tier_runs_its_own_tests[slow]" in result.stdout + result.stderr
