"""The NVMe tier's pieces that need no engine: the sub-group plan (sizes 0 and 1, exact fits,
splits at 4 KiB), SwapFile.reserve, and StreamedAdamW's argument checks."""

import errno

import pytest
import torch

from memfit.io import SwapFile, SwapFullError
from memfit.offload.nvme_kernel import StreamedAdamW
from memfit.offload.swap_space import ALIGN_ELEMENTS, plan_subgroups


def covered(groups, numels):
    """Every element of every tensor, in order, exactly once."""
    seen = {index: [] for index in range(len(numels))}
    for group in groups:
        for piece in group:
            seen[piece.index].append((piece.start, piece.stop))
    for index, numel in enumerate(numels):
        ranges = seen[index]
        assert [start for start, _ in ranges] == [0] + [stop for _, stop in ranges[:-1]] if numel else ranges == []
        assert (ranges[-1][1] if ranges else 0) == numel


@pytest.mark.parametrize(
    "numels",
    [[], [0], [1], [0, 1, 0], [ALIGN_ELEMENTS], [ALIGN_ELEMENTS + 1], [5 * ALIGN_ELEMENTS, 3, 7 * ALIGN_ELEMENTS - 1]],
)
@pytest.mark.parametrize("buffer_elements", [3 * ALIGN_ELEMENTS, 4 * ALIGN_ELEMENTS, 64 * ALIGN_ELEMENTS])
def test_plan_covers_every_element_within_the_buffer(numels, buffer_elements):
    kinds = [3 if index % 2 else 2 for index in range(len(numels))]
    groups = plan_subgroups(numels, kinds, buffer_elements)
    covered(groups, numels)
    for group in groups:
        assert group, "no empty sub-group"
        used = 0
        for piece in group:
            assert piece.buffer_offset == used and piece.buffer_offset % ALIGN_ELEMENTS == 0
            assert piece.start % ALIGN_ELEMENTS == 0  # splits keep file offsets 4 KiB-aligned
            assert piece.width >= piece.stop - piece.start and piece.width % ALIGN_ELEMENTS == 0
            used += kinds[piece.index] * piece.width
        assert used <= buffer_elements


def test_a_tensor_that_fits_exactly_is_not_split():
    groups = plan_subgroups([ALIGN_ELEMENTS, ALIGN_ELEMENTS], [3, 3], 3 * ALIGN_ELEMENTS)
    assert [[(p.index, p.start, p.stop) for p in group] for group in groups] == [
        [(0, 0, ALIGN_ELEMENTS)],
        [(1, 0, ALIGN_ELEMENTS)],
    ]


def test_reserve_allocates_without_writing(tmp_path):
    with SwapFile(tmp_path / "s.swap", 3 * 4096) as swap:
        slot = swap.reserve("a", torch.float32, (1024,))
        assert (slot.num_bytes, slot.dtype, slot.shape) == (4096, torch.float32, (1024,))
        assert swap.bytes_in_use == 4096
        with pytest.raises(ValueError, match="slot 'a' exists already"):
            swap.reserve("a", torch.float32, (1,))
        with pytest.raises(OSError) as never_written:
            swap.get("a", torch.empty(1024))
        assert never_written.value.errno == errno.ENODATA
        with pytest.raises(SwapFullError, match="slot 'b' needs 12.0 KiB"):
            swap.reserve("b", torch.float32, (3 * 1024,))
        value = torch.arange(1024, dtype=torch.float32)
        swap.file.pwrite(value, slot.offset).wait()
        back = torch.empty(1024)
        swap.file.pread(back, slot.offset).wait()
        assert torch.equal(back, value)


def test_streamed_adamw_checks_its_arguments():
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        StreamedAdamW([torch.zeros(2)], lr=-1)
    with pytest.raises(ValueError, match="parameter 0 of group 0 is torch.int64"):
        StreamedAdamW([torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="not contiguous"):
        StreamedAdamW([torch.zeros(2, 3).t()])
    optimizer = StreamedAdamW([torch.zeros(2)])
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        optimizer.add_param_group({"params": [torch.zeros(1)], "betas": (0.9, 1.0)})
    assert len(optimizer.param_groups) == 1  # a refused group is not kept
