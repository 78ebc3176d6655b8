"""The quantization config: presets, overrides, and errors that name the field."""

import pytest

from bbct.simulator.config import PRESETS, load_config
from bbct.simulator.errors import ConfigError


def test_presets_load_and_resolve():
    for name in PRESETS:
        c = load_config(name)
        s = c.settings("query", 0)
        assert c.name == name
        assert s.act_bits == 8
    assert load_config("w4a8").settings("intermediate", 3).weight_bits == 4
    assert load_config("mx-int8").settings("value").scaling == "dynamic"
    assert load_config("w8a8-static").any_static and not load_config("w8a8").any_static


def test_overrides_by_class_then_layer(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        'preset = "w4a8"\n'
        "[default]\nacc_bits = 40\n"
        "[op.embedding]\nweight_bits = 8\n"
        '[layer.2.intermediate]\nweight_bits = 6\nrounding = "TRN"\n'
    )
    c = load_config(p)
    assert c.settings("embedding").weight_bits == 8
    assert c.settings("intermediate", 1).weight_bits == 4
    s2 = c.settings("intermediate", 2)
    assert (s2.weight_bits, s2.rounding, s2.acc_bits) == (6, "TRN", 40)
    assert c.settings("query", 2).weight_bits == 4  # a layer override touches only its class
    assert c.to_dict()["layer"]["2"]["intermediate"]["weight_bits"] == 6


@pytest.mark.parametrize(
    "tables, needle",
    [
        ({"default": {"weight_bits": 1}}, "weight_bits=1"),
        ({"default": {"rounding": "NEAREST"}}, "rounding='NEAREST': expected one of TRN"),
        ({"default": {"scaling": "both"}}, "scaling='both'"),
        ({"default": {"weight_bitz": 4}}, "unknown key 'weight_bitz'"),
        ({"op": {"attention": {}}}, "[op.attention]: unknown op class"),
        ({"layer": {"x": {"query": {}}}}, "[layer.x]: layer index must be an integer"),
        ({"layer": {"1": {"query": {"acc_bits": 99}}}}, "[layer.1.query] acc_bits=99"),
        ({"preset": "w2a2"}, "preset='w2a2'"),
        ({"quant": {}}, "unknown top-level key"),
    ],
)
def test_bad_config_names_field_and_allowed_values(tables, needle):
    with pytest.raises(ConfigError) as e:
        load_config(tables)
    assert needle in str(e.value)


def test_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(tmp_path / "missing.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[default\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
