"""Does a rebuild reproduce the shipped synthetic model? Compare two checkouts after `make synthetic`.

    python benchmarks/synthetic/reproduce_check.py --rebuilt /tmp/synth --shipped . [--out FILE]
    python benchmarks/synthetic/reproduce_check.py --determinism 30     # needs COMFYUI_PATH

Compares, file by file (each checkout's own paths):
- the two model files, tensor by tensor (bit-equal count, largest difference) and their metadata, ignoring the
  date fields every run rewrites;
- `docs/synthetic/results_cpu.json`, every number (equal, or both values and the difference);
- the example references in `workflows/assets/synthetic/`, byte for byte.
Every {p|mean, se} figure that differs is also given as z = difference / sqrt(se_rebuilt^2 + se_shipped^2): two runs
that differ only by chance mostly stay within |z| < 2 (the two runs share seeds and references, so less often than
independent ones would). --determinism N trains the base model's first phase for N steps three times (torch threads
2, 2 and 1) and compares the weights: same thread count bit-equal, or not.
Reads safetensors only (no unpickling); every file is size-checked before it is read.
"""
import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile

MODELS = ("models/synthetic_faces.safetensors", "models/idfusion/synthetic_faces_adapter.safetensors")
RESULTS = "docs/synthetic/results_cpu.json"
ASSETS = "workflows/assets/synthetic"
MAX_BYTES = 64 << 20    # every file here is well under this; a larger one is not ours
VOLATILE = ("date", "seconds")   # rewritten by every run: the date, and stage times


def _checked(path: str) -> str:
    if not os.path.isfile(path):
        raise SystemExit(f"reproduce_check: {path} is missing; run `make synthetic` in that checkout first")
    if os.path.getsize(path) > MAX_BYTES:
        raise SystemExit(f"reproduce_check: {path} is over {MAX_BYTES >> 20} MB; not a file `make synthetic` writes")
    return path


def _drop_volatile(x):
    if isinstance(x, dict):
        return {k: _drop_volatile(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [_drop_volatile(v) for v in x]
    return x


def compare_models(a: str, b: str) -> dict:
    import torch
    from safetensors import safe_open
    with safe_open(_checked(a), "pt") as fa, safe_open(_checked(b), "pt") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        equal, largest, worst = 0, 0.0, None
        for k in sorted(ka & kb):
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            if ta.shape != tb.shape or ta.dtype != tb.dtype:
                largest, worst = float("inf"), k
                continue
            if torch.equal(ta, tb):
                equal += 1
                continue
            d = (ta.float() - tb.float()).abs().max().item()
            if d > largest:
                largest, worst = d, k
        ma, mb = fa.metadata() or {}, fb.metadata() or {}

    def meta(m):
        return {k: _drop_volatile(json.loads(v)) if v.startswith(("{", "[")) else v for k, v in m.items()}
    ma, mb = meta(ma), meta(mb)
    return {"tensors": len(ka & kb), "only_in_rebuilt": sorted(ka - kb), "only_in_shipped": sorted(kb - ka),
            "bit_equal": equal, "largest_difference": largest, "largest_in": worst,
            "metadata_differs": sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))}


def _close(a, b) -> bool:
    """Equal but for float summation order (a reduction in another order moves the last digits)."""
    return isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def compare_numbers(a, b, path="", out=None):
    """Every leaf of two JSON trees: equal, equal to 1e-9 (rounding), or (path, a, b); and for every figure
    ({p or mean, se}) that differs, its z."""
    out = out if out is not None else {"equal": 0, "rounding": 0, "differ": [], "z": []}
    if isinstance(a, dict) and isinstance(b, dict) and "se" in a and "se" in b:
        m = "p" if "p" in a else "mean"
        if m in a and m in b and a[m] != b[m] and not _close(a[m], b[m]):
            se = math.hypot(a["se"], b["se"])
            out["z"].append((path, a[m], b[m], (a[m] - b[m]) / se if se > 0 else float("inf")))
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in VOLATILE:
                continue
            if k not in a or k not in b:
                out["differ"].append((f"{path}/{k}", a.get(k, "<missing>"), b.get(k, "<missing>")))
            else:
                compare_numbers(a[k], b[k], f"{path}/{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            compare_numbers(x, y, f"{path}/{i}", out)
    elif a == b:
        out["equal"] += 1
    elif _close(a, b):
        out["rounding"] += 1
    else:
        out["differ"].append((path, a, b))
    return out


def _sha(path: str) -> str:
    with open(_checked(path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _train_phase_one(steps: int, threads: int, out: str):
    """In a child process: the base model's first phase for `steps` steps with `threads` torch threads."""
    import torch
    torch.set_num_threads(threads)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    import run
    from train import load_pack   # scripts/train.py, on run's path
    load_pack(os.environ.get("COMFYUI_PATH") or os.path.join(run.ROOT, ".hosts", "0.3.75", "ComfyUI"), cpu=True)
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as work:
        unet, text, _ = run.train_base({**run.SCALES["cpu"], "base_steps": steps, "then": []}, work, torch.device("cpu"))
    save_file({**{f"unet.{k}": v for k, v in unet.items()}, **{f"text.{k}": v for k, v in text.items()}}, out)


def determinism(steps: int) -> dict:
    if not 1 <= steps <= 2400:
        raise SystemExit(f"reproduce_check: --determinism takes 1-2400 steps (the first phase's length), not {steps}")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, threads in (("2 threads", 2), ("2 threads again", 2), ("1 thread", 1)):
            path = os.path.join(tmp, f"{threads}-{len(runs)}.safetensors")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--_phase-one", str(steps), str(threads), path],
                           check=True)
            runs[name] = path
        report = {pair: compare_models(runs[a], runs[b]) for pair, (a, b) in
                  {"2 vs 2 threads": ("2 threads", "2 threads again"), "1 vs 2 threads": ("1 thread", "2 threads")}.items()}
    for pair, r in report.items():
        print(f"{pair}, {steps} steps: {r['bit_equal']}/{r['tensors']} tensors bit-equal, largest difference "
              f"{r['largest_difference']:.3g}")
    return {"steps": steps, **report}


def compare(rebuilt: str, shipped: str) -> dict:
    report = {"models": {m: compare_models(os.path.join(rebuilt, m), os.path.join(shipped, m)) for m in MODELS}}
    with open(_checked(os.path.join(rebuilt, RESULTS))) as f:
        ra = json.load(f)
    with open(_checked(os.path.join(shipped, RESULTS))) as f:
        rb = json.load(f)
    nums = compare_numbers(ra, rb)
    z = [abs(x[3]) for x in nums["z"]]
    report["results"] = {"equal": nums["equal"], "equal but for rounding": nums["rounding"], "differ": len(nums["differ"]),
                         "figures that differ": len(z), "of them |z| > 2": sum(v > 2 for v in z),
                         "largest |z|": max(z, default=0.0),
                         "figures": [{"path": p, "rebuilt": x, "shipped": y, "z": round(v, 2)} for p, x, y, v in nums["z"]],
                         "differences": [{"path": p, "rebuilt": x, "shipped": y} for p, x, y in nums["differ"]]}
    report["rebuilt_seconds"] = ra.get("seconds")
    for root in (rebuilt, shipped):
        if not os.path.isdir(os.path.join(root, ASSETS)):
            raise SystemExit(f"reproduce_check: {os.path.join(root, ASSETS)} is missing; is {root} a checkout of this pack?")
    names = sorted(set(os.listdir(os.path.join(rebuilt, ASSETS))) | set(os.listdir(os.path.join(shipped, ASSETS))))
    report["assets"] = {n: _sha(os.path.join(rebuilt, ASSETS, n)) == _sha(os.path.join(shipped, ASSETS, n)) for n in names}
    for m, r in report["models"].items():
        print(f"{m}: {r['bit_equal']}/{r['tensors']} tensors bit-equal, largest difference {r['largest_difference']:.3g}"
              f" ({r['largest_in']}); metadata differs in {r['metadata_differs'] or 'nothing'}")
    r = report["results"]
    print(f"{RESULTS}: {r['equal']} numbers equal, {r['equal but for rounding']} equal but for rounding, {r['differ']} "
          f"differ; {r['figures that differ']} figures differ, {r['of them |z| > 2']} of them by |z| > 2 "
          f"(largest {r['largest |z|']:.2f})")
    for f in sorted(r["figures"], key=lambda f: -abs(f["z"]))[:12]:
        print(f"  z {f['z']:+.2f}  {f['path']}: rebuilt {f['rebuilt']:.4g} shipped {f['shipped']:.4g}")
    print(f"{ASSETS}: {sum(report['assets'].values())}/{len(names)} files byte-equal")
    print(f"rebuilt stage seconds: {report['rebuilt_seconds']}")
    return report



def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_phase-one"]:   # the child of --determinism
        return _train_phase_one(int(argv[1]), int(argv[2]), argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rebuilt", help="checkout where `make synthetic` ran from scratch")
    ap.add_argument("--shipped", default=".", help="checkout holding the shipped files (default: here)")
    ap.add_argument("--determinism", type=int, metavar="STEPS", help="instead: does the base's training depend on "
                    "the thread count? (STEPS of its first phase, three times)")
    ap.add_argument("--out", help="write the comparison here as JSON")
    args = ap.parse_args(argv)
    if args.determinism is not None:
        report = determinism(args.determinism)
    elif args.rebuilt:
        report = compare(args.rebuilt, args.shipped)
    else:
        ap.error("give --rebuilt DIR (compare a rebuild) or --determinism STEPS")
    if args.out:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from run import write_text_atomic
        write_text_atomic(args.out, json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
