import pytest
import torch
from torch import nn

import qcompile
from qcompile import QuantLinear


def two_layers():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


@pytest.mark.parametrize("kwargs, words", [
    ({"bits": 0}, ["bits=0", "1 to 8"]),
    ({"bits": 9}, ["bits=9", "1 to 8"]),
    ({"bits": 2.0}, ["bits=2.0"]),
    ({"group_size": 24}, ["group_size=24", "divisor"]),
    ({"format": "nf4"}, ["format='nf4'", "'affine'", "'bcq'"]),
    ({"skip": ["nope"]}, ["'nope'", "matches no module"]),
    ({"config": {"1": {"bits": 3}}}, ["'1'", "ReLU", "only nn.Linear"]),
    ({"config": {"0": {"bitz": 3}}}, ["keys among"]),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, words):
    model = two_layers()
    with pytest.raises(ValueError) as e:
        qcompile.quantize(model, **{"group_size": 32, **kwargs})
    assert all(w in str(e.value) for w in words), str(e.value)
    assert isinstance(model[0], nn.Linear), "nothing changes when the arguments are bad"


def test_bad_targets():
    with pytest.raises(ValueError, match="nn.Linear"):
        qcompile.quantize(nn.Linear(8, 8), group_size=8)
    with pytest.raises(ValueError, match="no nn.Linear"):
        qcompile.quantize(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="float16, bfloat16, float32"):
        qcompile.quantize(nn.Sequential(nn.Linear(8, 8).double()), group_size=8)


def test_skip_and_per_layer_config_for_mixed_bits():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 16))
    out = qcompile.quantize(model, bits=4, group_size=32, skip=["2"],
                            config={"1": {"bits": 2, "format": "bipolar", "group_size": -1}})
    assert out is model
    assert (model[0].bits, model[0].fmt.name, model[0].group_size) == (4, "affine", 32)
    assert (model[1].bits, model[1].fmt.name, model[1].group_size) == (2, "bipolar", -1)
    assert isinstance(model[2], nn.Linear) and not isinstance(model[2], QuantLinear)


def test_bias_stays_float_and_forward_is_close_to_float():
    torch.manual_seed(0)
    model = two_layers()
    x = torch.randn(5, 64)
    ref = model(x)
    qcompile.quantize(model, bits=8, group_size=32)
    assert model[0].bias.dtype == torch.float32
    assert (model(x) - ref).abs().max() < 0.02 * ref.abs().max()
