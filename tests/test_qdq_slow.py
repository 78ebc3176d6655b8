"""The prepared RT classifier (MiniLM-L6) quantized with onnxruntime's ``quantize_dynamic``
here, simulated in integers: GEMMs against MatMulInteger, predictions against onnxruntime's
run of the int8 model; and bbct's own w4a8 model exported and imported back."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_qdq import _check_gemms

from bbct.golden.data import read_split
from bbct.golden.paths import data_dir, default_model
from bbct.simulator.execute import run
from bbct.simulator.frontend import fgraph as F
from bbct.simulator.session import Simulator


@pytest.fixture(scope="module")
def rt_classifier(real_home, tmp_path_factory) -> Path:
    """The prepared RT classifier; where it is not prepared (a fresh clone, CI: preparing does
    not fine-tune there), the same graph before fine-tuning: the real MiniLM encoder with a
    classification head initialised from a fixed seed (random, not trained). Both tests below
    compare bbct with onnxruntime on the same file, which either graph exercises."""
    src = default_model(real_home)
    if src.is_file():
        return src
    import torch
    import transformers

    from bbct.golden.prepare import export_onnx, source_model_dir

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(
        str(source_model_dir()), num_labels=2, attn_implementation="eager"
    )
    src = tmp_path_factory.mktemp("rt_untrained") / "model.onnx"
    export_onnx(model, src, output="logits")
    shutil.copy(source_model_dir() / "tokenizer.json", src.parent / "tokenizer.json")
    return src


@pytest.mark.slow
def test_rt_classifier_quantize_dynamic(real_home, rt_classifier, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    src = rt_classifier
    out = tmp_path / "int8" / "model.onnx"
    out.parent.mkdir()
    quantize_dynamic(str(src), str(out))
    shutil.copy(src.parent / "tokenizer.json", out.parent / "tokenizer.json")
    sim = Simulator(out, "w8a8")
    ql = [n for n in sim.fgraph.nodes if isinstance(n, F.QuantLinear)]
    assert len(ql) == 6 * 6 + 2 and all(n.x_quant.dynamic for n in ql)  # 6 layers x 6 + pooler + classifier
    texts, _ = read_split(data_dir(real_home), "test")
    feeds = sim.encode(texts[:8])
    res = sim.run(feeds, trace=True)
    _check_gemms(sim.fgraph, sim.graph, feeds, res, dynamic=True)
    agree = []
    for i in range(0, 64, 32):
        feeds = sim.encode(texts[i : i + 32])
        ort_int8 = sim.float_outputs(feeds)["logits"]  # onnxruntime running the quantized model
        bbct = sim.run(feeds).outputs["logits"].dequantize()
        agree.append(np.argmax(ort_int8, -1) == np.argmax(bbct, -1))
    assert np.mean(np.concatenate(agree)) >= 0.85


@pytest.mark.slow
def test_rt_classifier_export_round_trip_w4a8(real_home, rt_classifier, tmp_path):
    """The RT classifier under w4a8 (GPTQ codes, least-squared-error exponents, calibrated on
    the first 64 calibration sentences): ``bbct export`` then import gives the same integer
    weights (codes and exponents of every linear and table) and the same integer logits, bit
    for bit; onnxruntime runs the file."""
    import onnxruntime as ort
    from test_qdq_export import _stored

    from bbct.kernels.testing import assert_bit_equal
    from bbct.simulator.export import export_qdq
    from bbct.simulator.frontend.onnx_in import load_graph
    from bbct.simulator.lower import lower

    src = rt_classifier
    calib = read_split(data_dir(real_home), "calib")[0][:64]
    sim = Simulator(src, "w4a8", calib_texts=calib)
    out = tmp_path / "model.qdq.onnx"
    export_qdq(src, sim.fgraph, sim.graph, sim.config, out)
    g2 = lower(load_graph(out), sim.config, sim.calibration)
    a, b = _stored(sim.graph), _stored(g2)
    assert a.keys() == b.keys() and len(a) == 6 * 6 + 2 + 3  # 38 linears and 3 tables
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                assert_bit_equal(x, y)
    assert len(g2.info["given_quantization"]["weights"]) == len(a)
    texts, _ = read_split(data_dir(real_home), "test")
    feeds = sim.encode(texts[:32])
    r1, r2 = sim.run(feeds), run(g2, feeds)
    assert_bit_equal(r1.outputs["logits"].data, r2.outputs["logits"].data)
    logits = ort.InferenceSession(str(out)).run(["logits"], feeds)[0]
    assert np.mean(np.argmax(logits, -1) == np.argmax(r1.outputs["logits"].dequantize(), -1)) >= 0.85
