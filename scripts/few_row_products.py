"""How fast a few rows go through a model's layer weights on this CPU, in each form libtorch
offers: `x.linear(W)`, MKL with the weight on the left (`W x^T`), oneDNN's inner product
(plain weight), MKL with the weight prepacked for the row count, oneDNN with the weight
reordered for it. Every layer has its own weights, so they come from memory as in decoding;
the forms run in turns, round after round, and the median counts (docs/BENCHMARKS.md,
"Few-row products through oneDNN").

    python scripts/few_row_products.py [--shape smollm2|demo] [--rows 1,4,9,16,25] [--per-shape]

--per-shape times each weight shape on its own (per call, microseconds) instead of every
layer's products together (milliseconds).
"""
import argparse
import statistics
import time

import torch

SHAPES = {
    # (width, q/k/v rows, gate/up rows, intermediate, layers)
    "smollm2": (576, 960, 3072, 1536, 30),
    "demo": (256, 512, 1408, 704, 6),
}


def forms(rows):
    """name -> (prepare(weight) -> operand, product(x, weight, operand))."""
    dnn = torch._C._nn.mkldnn_linear
    out = {
        "x.linear(W)": (None, lambda x, w, p: torch.nn.functional.linear(x, w)),
        "W x^T": (None, lambda x, w, p: w.mm(x.t()).t()),
        "oneDNN": (None, lambda x, w, p: dnn(x.to_mkldnn(), w).to_dense()),
    }
    if hasattr(torch.ops.mkl, "_mkl_linear"):
        out["MKL prepacked"] = (
            lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, rows),
            lambda x, w, p: torch.ops.mkl._mkl_linear(x, p, w, None, rows),
        )
    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        out["oneDNN reordered"] = (
            lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows),
            lambda x, w, p: dnn(x.to_mkldnn(), p).to_dense(),
        )
    return out


def median_times(weights, xs_for, rows, rounds, per_call):
    """Median time of each form over `rounds` interleaved rounds, over all `weights`."""
    fs = forms(rows)
    prepared = {n: [[prep(w) if prep else None for w in lw] for lw in weights] for n, (prep, _) in fs.items()}
    xs = xs_for(rows)
    times = {n: [] for n in fs}
    with torch.no_grad():
        for _ in range(rounds):
            for n, (_, f) in fs.items():
                start = time.perf_counter()
                for lw, lp in zip(weights, prepared[n]):
                    for w, p, x in zip(lw, lp, xs):
                        f(x, w, p)
                calls = sum(len(lw) for lw in weights)
                elapsed = time.perf_counter() - start
                times[n].append(elapsed / calls * 1e6 if per_call else elapsed * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--rows", default="1,4,9,16,25")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--per-shape", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    d, qkv, gu, inter, layers = SHAPES[args.shape]
    shapes = [(qkv, d), (d, d), (gu, d), (d, inter)]
    print(f"{args.shape}, {torch.get_num_threads()} threads, oneDNN {torch.backends.mkldnn.is_available()}")
    for rows in (int(r) for r in args.rows.split(",")):
        if args.per_shape:
            for out, inp in shapes:
                weights = [[torch.randn(out, inp)] for _ in range(layers)]
                t = median_times(weights, lambda r: [torch.randn(r, inp)], rows, args.rounds, True)
                print(f"rows {rows:2} {out}x{inp} (us per call): " + "  ".join(f"{n} {v:.1f}" for n, v in t.items()))
        else:
            weights = [[torch.randn(out, inp) for out, inp in shapes] for _ in range(layers)]
            t = median_times(weights, lambda r: [torch.randn(r, inp) for _, inp in shapes], rows, args.rounds, False)
            print(f"rows {rows:2} (ms, every layer): " + "  ".join(f"{n} {v:.1f}" for n, v in t.items()), flush=True)


if __name__ == "__main__":
    main()
