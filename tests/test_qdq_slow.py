"""The prepared RT classifier (MiniLM-L6) quantized with onnxruntime's ``quantize_dynamic``
here, simulated in integers: GEMMs against MatMulInteger, predictions against onnxruntime's
run of the int8 model. Without a prepared classifier, the same graph before fine-tuning."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_qdq import _check_gemms

from bbct.golden.data import read_split
from bbct.golden.paths import data_dir, default_model
from bbct.simulator.frontend import fgraph as F
from bbct.simulator.session import Simulator


@pytest.mark.slow
def test_rt_classifier_quantize_dynamic(real_home, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    src = default_model()
    if not src.is_file():  # the classifier graph before fine-tuning (predictions still compared)
        import torch
        import transformers

        from bbct.golden.prepare import export_onnx, source_model_dir

        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification.from_pretrained(
            str(source_model_dir()), num_labels=2, attn_implementation="eager"
        )
        src = tmp_path / "float" / "model.onnx"
        src.parent.mkdir()
        export_onnx(model, src, output="logits")
        shutil.copy(source_model_dir() / "tokenizer.json", src.parent / "tokenizer.json")
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
