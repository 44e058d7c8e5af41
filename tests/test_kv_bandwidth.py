"""bench/kv_bandwidth.py reads the same bytes in every layout of V: its sums against torch's,
per head and split, so a GPU run times the reads it claims to."""
import pytest
import torch

from bench.kv_bandwidth import LAYOUTS, read_sums, v_in
from conftest import DEVICE


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_sums_every_byte_of_its_split_once(layout):
    heads, t, block_t, splits = 2, 256, 64, 3  # 3 splits of 128 tokens: the last one empty
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randint(0, 256, (heads, t, 128), dtype=torch.uint8, generator=g).to(DEVICE) for _ in range(2))
    got = read_sums(k, v_in(layout, v, block_t), layout, splits, block_t, warps=1, stages=3)
    chunk = 128
    want = torch.stack([(k[:, s * chunk:(s + 1) * chunk].sum((1, 2), dtype=torch.int64)
                         + v[:, s * chunk:(s + 1) * chunk].sum((1, 2), dtype=torch.int64)) for s in range(splits)], 1)
    assert torch.equal(got.long().cpu(), want.cpu())
