"""docs/KERNELS.md specifies every IR op: each op the executor runs (and every IR node type)
is named in backticks in a heading, and the vector manifest section names every field a dump
writes."""

from __future__ import annotations

import re
from pathlib import Path

from bbct.simulator import ir
from bbct.simulator.execute import HANDLERS

DOC = Path(__file__).resolve().parents[1] / "docs" / "KERNELS.md"


def heading_names(text: str) -> set[str]:
    """Every backticked word in a Markdown heading line."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#"):
            names.update(re.findall(r"`([^`]+)`", line))
    return names


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section, up to the next ``## `` heading."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def ir_ops() -> set[str]:
    """The op name of every concrete IR node type: the executor's registry and every Node
    subclass declaring its own ``op``."""
    ops = {cls.op for cls in HANDLERS}
    todo = list(ir.Node.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if "op" in vars(cls):
            ops.add(cls.op)
    return ops


def test_every_ir_op_has_a_kernels_md_heading():
    names = heading_names(DOC.read_text())
    ops = ir_ops()
    assert len(ops) >= 18
    missing = sorted(ops - names)
    assert not missing, f"IR ops without a docs/KERNELS.md heading naming them in backticks: {missing}"


def test_the_convention_catches_a_missing_op():
    text = "## `linear` and `matmul`\n\nbody naming `softmax` outside a heading\n### `relu`\n"
    assert heading_names(text) == {"linear", "matmul", "relu"}


def test_lowering_choices_and_ambiguities_are_settled_in_the_text():
    text = DOC.read_text()
    ln = section(text, "`layernorm` (`kernels/layernorm.py`) — integer mean/variance, digit-by-digit isqrt")
    assert "S = Σ_j x_j" in ln and "`sh < 0` adds the exact" in ln
    sm = section(text, "`softmax` (`kernels/softmax.py`) — shift + polynomial exp, or base-2 LUT exp")
    assert "P = ((C2 · t**2) >>RND 30) + C0" in sm
    assert "`bias_rounding`" in section(
        text, "gemm (`kernels/gemm.py`) — MAC array with a narrow accumulator (IR ops `linear`, `matmul`)"
    )
    common = section(text, "Nonlinear kernels: common convention")
    assert "one exponent per row" in common and "in@2^0" in common
    lin = section(text, "How the IR uses the kernels: data movement and set-up ops")
    for word in ("weight_guard = 12", "`w_exp = max(stored.exp", "transpose(0, 2, 1, 3)", "`index`", "2**−9"):
        assert word in lin, word
