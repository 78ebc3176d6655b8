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


def test_selectors_by_op_type_and_node_glob(tmp_path):
    """[optype.X] and [node."glob"] select float-graph nodes; a node glob wins over a layer
    table; both are checked against the model when it is lowered."""
    p = tmp_path / "c.toml"
    p.write_text(
        'preset = "w8a8"\n'
        '[optype.softmax]\nsoftmax_method = "lut"\n'
        "[layer.1.intermediate]\nweight_bits = 6\n"
        '[node."L1.ffn*"]\nweight_bits = 4\n'
    )
    c = load_config(p)
    assert c.settings("softmax", 0, "softmax", ("L0.probs",)).softmax_method == "lut"
    assert c.settings("softmax", 0, "gelu", ("L0.gelu",)).softmax_method == "poly"
    assert c.settings("intermediate", 1, "linear", ("L1.ffn1", "/onnx/name")).weight_bits == 4
    assert c.settings("intermediate", 0, "linear", ("L0.ffn1",)).weight_bits == 8
    assert c.to_dict()["node"] == {"L1.ffn*": {"weight_bits": 4}}
    assert "node" not in load_config("w8a8").to_dict()  # a preset's record is unchanged
    c.check_selectors([("softmax", ("L0.probs", "x")), ("linear", ("L1.ffn1", "y"))])
    with pytest.raises(ConfigError, match=r'\[node."L1.ffn\*"\]: matches no node of the model'):
        c.check_selectors([("softmax", ("L0.probs", "x"))])
    with pytest.raises(ConfigError, match=r"\[optype.softmax\]: no node of that type in the model; its types: linear"):
        c.check_selectors([("linear", ("L1.ffn1", "y"))])
    with pytest.raises(ConfigError, match=r'\[node."L\*"\] unknown key'):
        load_config({"node": {"L*": {"weight_bitz": 4}}})


def test_selectors_reach_the_lowered_graph(tiny_bert_onnx):
    from bbct.simulator.frontend.onnx_in import load_graph
    from bbct.simulator.lower import lower

    fg = load_graph(tiny_bert_onnx)
    g = lower(
        fg,
        load_config(
            {"preset": "w8a8", "node": {"L1.ffn*": {"weight_bits": 4}}, "optype": {"gelu": {"gelu_method": "poly"}}}
        ),
    )
    bits = {n.name: n.stored.fmt.bits for n in g.nodes if n.op == "linear"}
    assert bits["L1.ffn1.acc"] == bits["L1.ffn2.acc"] == 4 and bits["L0.ffn1.acc"] == bits["L1.q.acc"] == 8
    assert {n.method for n in g.nodes if n.op == "gelu"} == {"poly"}
    with pytest.raises(ConfigError, match=r'\[node."L7.\*"\]: matches no node'):
        lower(fg, load_config({"preset": "w8a8", "node": {"L7.*": {"weight_bits": 4}}}))
