"""Quantization schemes: defaults, named schemes, and validation of bad values."""

import dataclasses

import pytest

from tvmq.errors import TvmqError
from tvmq.quantization import Int8Dynamic, Int8Static, WeightOnly, get_scheme, list_schemes


def test_named_schemes():
    assert list_schemes() == ["int8", "int8-dynamic", "w8", "w4"]
    assert get_scheme("int8") == Int8Static()
    assert get_scheme("INT8_dynamic") == Int8Dynamic()
    assert get_scheme("w8") == WeightOnly(bits=8)
    assert get_scheme("w4") == WeightOnly(bits=4, group_size=32)
    custom = Int8Static(activation_dtype="uint8")
    assert get_scheme(custom) is custom
    with pytest.raises(
        TvmqError, match="unknown quantization scheme 'int16'.*int8, int8-dynamic, w8, w4"
    ):
        get_scheme("int16")
    with pytest.raises(TvmqError, match="not dict"):
        get_scheme({"bits": 8})


def test_int8_static_defaults_and_normalization():
    s = Int8Static()
    assert (s.activation_dtype, s.activation_symmetric, s.weight_per_channel) == (
        "int8",
        False,
        True,
    )
    assert (s.observer, s.requantize, s.skip, s.overrides) == ("minmax", "float", (), ())
    assert s.num_calibration_batches is None
    s = Int8Static(observer="Moving-Average", skip=["relax.nn.conv2d"], requantize="integer")
    assert s.observer == "moving_average" and s.skip == ("relax.nn.conv2d",)
    assert Int8Static(skip="fc").skip == ("fc",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.observer = "minmax"  # type: ignore[misc]
    assert hash(s) == hash(
        Int8Static(observer="moving_average", skip=("relax.nn.conv2d",), requantize="integer")
    )


def test_overrides_skip_and_layer_lookup():
    head = Int8Static(observer="percentile")
    s = Int8Static(overrides={"classifier.*": head}, skip=("relax.nn.softmax", "stem.conv"))
    assert s.overrides == (("classifier.*", head),)
    assert s.for_layer("classifier.fc") is head and s.for_layer("body.fc") is s
    assert s.for_layer(None) is s
    assert s.is_skipped("relax.nn.softmax") and s.is_skipped("relax.nn.dense", "stem.conv")
    assert not s.is_skipped("relax.nn.conv2d", None)
    assert Int8Static(overrides=[("fc", head)]) == Int8Static(overrides={"fc": head})
    assert hash(s)
    d = s.to_dict()
    assert d["scheme"] == "Int8Static" and d["skip"] == ["relax.nn.softmax", "stem.conv"]
    assert (
        d["overrides"][0][0] == "classifier.*" and d["overrides"][0][1]["observer"] == "percentile"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation_dtype": "int4"}, "activation_dtype must be one of"),
        ({"activation_symmetric": "yes"}, "activation_symmetric must be True or False"),
        ({"weight_per_channel": 1}, "weight_per_channel must be True or False"),
        ({"weight_symmetric": False}, "weight_symmetric=False is not supported"),
        ({"observer": "kl"}, "observer 'kl' is unknown; known observers: auto, entropy"),
        ({"observer": 3}, "observer name"),
        ({"requantize": "fixed"}, "requantize must be one of"),
        ({"skip": [""]}, "non-empty names"),
        ({"skip": 5}, "skip must be a tuple"),
        ({"overrides": {"fc": "int8"}}, "pairs"),
        ({"overrides": [("fc",)]}, "pairs"),
        ({"overrides": {"a": Int8Static(overrides={"b": Int8Static()})}}, "nested"),
        ({"num_calibration_batches": 0}, "positive integer"),
        ({"num_calibration_batches": True}, "positive integer"),
        ({"num_calibration_batches": 2.5}, "positive integer"),
    ],
)
def test_int8_static_rejects(kwargs, message):
    with pytest.raises(TvmqError, match=message):
        Int8Static(**kwargs)


def test_int8_dynamic():
    assert Int8Dynamic(weight_per_channel=False, skip="relax.matmul").skip == ("relax.matmul",)
    with pytest.raises(TvmqError, match="weight_per_channel"):
        Int8Dynamic(weight_per_channel=None)
    with pytest.raises(TvmqError, match="activation_per_row"):
        Int8Dynamic(activation_per_row="yes")
    assert Int8Dynamic().to_dict() == {
        "scheme": "Int8Dynamic",
        "weight_per_channel": True,
        "activation_per_row": True,
        "skip": [],
    }


def test_weight_only():
    w = WeightOnly(bits=4, group_size=128, symmetric=False)
    assert w.weight_dtype == "int4" and WeightOnly().weight_dtype == "int8"
    assert WeightOnly().group_size is None
    for kwargs, message in [
        ({"bits": 3}, "bits must be one of"),
        ({"bits": True}, "bits must be one of"),
        ({"group_size": 48}, "group_size must be None"),
        ({"group_size": 0}, "group_size must be None"),
        ({"symmetric": None}, "symmetric must be True or False"),
        ({"skip": (None,)}, "non-empty names"),
    ]:
        with pytest.raises(TvmqError, match=message):
            WeightOnly(**kwargs)
