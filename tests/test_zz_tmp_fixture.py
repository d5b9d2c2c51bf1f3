import jax, numpy as np
from tests import torch_writers as tw
from tests.helpers import assert_same
def test_fixture(checkpoints):
    assert len(jax.devices()) == 8 and jax.config.jax_enable_x64
    for v in tw.TORCH_READABLE_VARIANTS:
        for n, a in checkpoints.torch_reference[v].items():
            assert_same(a, checkpoints.writer_reference[n], n)
    print(checkpoints.write_seconds, checkpoints.root)
