import os

# One intra-op thread per process, as torchrun gives each worker: the distributed tests run two or
# more ranks on two cores, and torch's threads spin-waiting on each other's cores made the small
# models of the equivalence table ten times slower. Set before torch is imported, and inherited by
# every spawned rank and subprocess. A test of threading passes its thread count explicitly.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from memfit.io import available_backends  # noqa: E402

TESTS_ROOT = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(params=["io_uring", "threads", "python"])
def io_backend(request):
    """Every I/O backend; a native one this machine lacks is skipped with the reason."""
    if request.param not in available_backends():
        pytest.skip(f"{request.param} backend not available here")
    return request.param


# Further variants of features the fast tier already tests once, run in the slow tier only (most
# slow-tier tests carry @pytest.mark.slow where they are written; these are picked by id so that a
# parametrized test keeps its table in one place). A listed id that its file no longer has fails the run.
SLOW_TIER_VARIANTS = {
    "distributed/test_checkpoint.py::test_every_optimizer_resumes_bit_identically_under_zero",
    "distributed/test_estimate.py::test_estimate_equals_memory_report_on_one_rank",
    "distributed/test_estimate.py::test_estimate_equals_memory_report_on_two_ranks",
    "distributed/test_estimate.py::test_estimate_equals_memory_report_of_the_staged_host_tier",
    "distributed/test_fp16.py::test_resume_keeps_the_loss_scale_and_skipped_steps",
    "distributed/test_stage3.py::test_checkpoints_move_between_stages_and_world_sizes[bfloat16]",
    "distributed/test_nvme_offload.py::test_checkpoints_move_between_nvme_and_host_tiers[GaLoreAdamW]",
    "distributed/test_nvme_offload.py::test_staged_nvme_tier_equals_staged_host_tier",
    "distributed/test_snapshot_parity.py::test_round_and_rebuild[3-1-1-128]",
    "integration/test_job_identity.py::test_a_persisted_snapshot_is_private_and_refused_to_another_optimizer",
    "unit/test_config_cli.py::test_memfit_run_refuses_what_initialize_refuses_before_starting_workers",
    "unit/test_deepspeed_api.py::test_memfit_run_checks_deepspeed_config_before_launch",
    "integration/test_job_identity.py::test_slots_of_another_configuration_are_refused",
    "integration/test_launcher.py::test_memfit_run_checks_the_batch_sizes_for_the_world_it_launches[launch1-6]",
    "integration/test_launcher.py::test_memfit_run_checks_the_config_wherever_it_is_given[after the script]",
    "integration/test_launcher.py::test_memfit_run_checks_the_config_wherever_it_is_given[after the script, with =]",
    "integration/test_lifecycle.py::test_workers_exit_when_the_launcher_died_before_initialize[memfit run]",
    "integration/test_lifecycle.py::test_workers_exit_when_the_launcher_died_before_initialize[torchrun]",
    "integration/test_lifecycle.py::test_workers_exit_when_the_launcher_is_killed[torchrun]",
    "integration/test_logs.py::test_a_quieter_level_keeps_only_warnings[config]",
    "integration/test_monitors.py::test_a_crash_keeps_each_complete_step_and_drops_the_unfinished_one[logs-before-last_line1]",
    "integration/test_monitors.py::test_a_crash_keeps_each_complete_step_and_drops_the_unfinished_one[silent-after-last_line2]",
    "distributed/test_update_in_backward.py::test_update_in_backward_equals_stage2[sometimes stage3 overlap acc3 clip0.0 AdamW float32 none offload-none steps3]",
    "integration/test_shm_directory.py::test_a_symlink_planted_in_an_own_directory_is_refused[rank0.slot0]",
    "integration/test_snapshot_kill.py::test_stage3_with_parameters_on_nvme_resumes_bit_identical",
    "integration/test_snapshot_slot_size.py::test_amsgrad_slots_reserved_at_start_are_never_outgrown",
    "unit/test_checkpoint_buffers.py::test_a_snapshot_restore_refuses_a_buffer_of_another_shape",
    "unit/test_client_state.py::test_a_snapshot_refuses_a_state_updated_in_place_and_restores_the_last_good_one",
    "unit/test_optim_groups.py::test_sharded_engine_projects_what_one_process_projects",
    "unit/test_snapshot_restore_checks.py::test_a_flipped_byte_in_the_older_slot_is_not_read",
    "unit/test_suite_guard.py::test_a_file_pytest_skips_fails_the_run[slow]",
    "unit/test_suite_guard.py::test_each_tier_runs_its_own_tests[slow]",
}


def _test_files_on_disk() -> set[str]:
    found = set()
    for directory, _, files in os.walk(TESTS_ROOT):
        found.update(os.path.join(directory, f) for f in files if f.startswith("test_") and f.endswith(".py"))
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """When the whole suite is asked for, in either tier, every test file on disk must have been
    collected: a folder that pytest skips by name (it skips `dist`, `build`, `venv`...) fails the
    run instead of silently dropping its tests. This runs before `-m` deselects a tier's tests, so a
    file whose tests are all in the other tier still counts as collected."""
    for item in items:
        if os.path.relpath(str(item.path), TESTS_ROOT) + "::" + item.name in SLOW_TIER_VARIANTS:
            item.add_marker(pytest.mark.slow)
    asked = [os.path.abspath(str(arg).split("::")[0]) for arg in config.args]
    if asked and any(path != TESTS_ROOT and path != os.path.dirname(TESTS_ROOT) for path in asked):
        return  # a subset was asked for
    if config.getoption("keyword"):
        return
    collected = {os.path.abspath(str(item.path)) for item in items}
    missing = sorted(os.path.relpath(path, TESTS_ROOT) for path in _test_files_on_disk() - collected)
    if missing:
        raise pytest.UsageError(f"test files on disk that pytest did not collect: {', '.join(missing)}")
    ids = {os.path.relpath(str(item.path), TESTS_ROOT) + "::" + item.name for item in items}
    files = {test_id.split("::")[0] for test_id in ids}
    if stale := sorted(test_id for test_id in SLOW_TIER_VARIANTS - ids if test_id.split("::")[0] in files):
        raise pytest.UsageError(f"SLOW_TIER_VARIANTS in tests/conftest.py names tests that do not exist: {stale}")
