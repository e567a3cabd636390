"""The Python parts of scripts/gpu_check.sh (issue 11, item 4).

``agreement``: CPU-vs-device agreement of every registered method on the same weights and
the same random numbers -- q(z|x) (mean, standard deviation where closed-form, log q of a
fixed z), the training objective and its gradient, and IWAE-K / ELBO estimates
(:func:`gpvae.evaluation.estimate`).  One freshly initialised model per method is copied to
the device; both copies see the same images, and every random draw either makes (the
reparameterization noise, SA's noise, mixture components, ...) comes from one CPU generator
seeded alike on both sides (:class:`SameNoise`), so the numbers differ only by how the
device rounds.  Each quantity's error is ``max |a - b| / max |a|`` (a: CPU).  Two passes:

* ``default`` -- PyTorch's defaults on CUDA: TF32 for cuDNN convolutions, FP32 matrix
  products.  Tolerance :data:`TOL_DEFAULT` (TF32 keeps 10 of float32's 23 mantissa bits);
  :data:`TOL_DEFAULT_REFINED` for SA and VLAE, whose refinement steps amplify it;
* ``fp32`` -- TF32 off for convolutions and matrix products.  Tolerance :data:`TOL_FP32`
  (only the order of float32 sums differs).

On a CPU "device" (``--device cpu``, how the script is tested) both sides run the same code
on the same device and every error is exactly 0.

``summary``: reads the steps file and the JSON the steps printed, prints one table and
writes it (Markdown) next to them.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

#: relative tolerance of the ``default`` pass (TF32 convolutions on CUDA)
TOL_DEFAULT = 2e-3
#: relative tolerance of the ``default`` pass for a method whose q(z|x) iterates through the
#: decoder's gradient or Jacobian (``posterior_needs_grad``: SA, VLAE).  Their k refinement
#: steps amplify TF32's rounding: on an H100 (docs/benchmarks.md) SA(2)'s mean moved by
#: 3.0e-2 and VLAE(1)'s by 1.6e-2 relative under TF32 convolutions (IWAE by <= 0.002 nats),
#: while with TF32 off (gpvae's own fp32 default) both agreed to 5e-7
TOL_DEFAULT_REFINED = 5e-2
#: relative tolerance of the ``fp32`` pass (TF32 off)
TOL_FP32 = 1e-4
#: the methods and sizes checked by default: every registered method, small
DEFAULT_MODELS = "vae,gpvae,cmvae,sa:2,hf:1,iaf:1,me:2,rme:2,vlae:1"
QUANTITIES = ("q_mean", "q_std", "q_log_prob", "objective", "gradient", "iwae", "elbo")


class SameNoise(TorchFunctionMode):
    """Every random draw of :data:`gpvae.packing.RANDOM_FUNCTIONS` made on the CPU from one
    generator seeded with ``seed`` and moved to the device it was asked for, so that a model
    on the CPU and its copy on a GPU draw the same numbers (draws that pass their own
    generator, e.g. a binarization's, are left alone)."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from gpvae.packing import _IN_PLACE, RANDOM_FUNCTIONS

        kwargs = dict(kwargs or {})
        if func not in RANDOM_FUNCTIONS or kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        kwargs["generator"] = self.generator
        cpu = torch.device("cpu")
        if func in _IN_PLACE:  # tensor.normal_(...): fill a CPU copy, write it back
            target = args[0]
            filled = torch.empty(target.shape, dtype=target.dtype)
            rest = tree_map(lambda a: a.to(cpu) if isinstance(a, torch.Tensor) else a,
                            tuple(args[1:]))
            func(filled, *rest, **kwargs)
            with torch.no_grad():
                target.copy_(filled)
            return target
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = kwargs.get("device")
        device = torch.device(device) if device is not None else (
            tensors[0].device if tensors else cpu)
        if "device" in kwargs:
            kwargs["device"] = cpu
        args = tree_map(lambda a: a.to(cpu) if isinstance(a, torch.Tensor) else a, tuple(args))
        out = func(*args, **kwargs)
        return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, out)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a| (0 when both are all zero), in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = float(a.abs().max()) if a.numel() else 0.0
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def quantities(model, x: torch.Tensor, z: torch.Tensor, samples: int, seed: int,
               max_batch_samples: int | None = None) -> dict:
    """Every compared quantity of ``model`` on images x (B, C, H, W) and latents z (B, d),
    each from its own :class:`SameNoise` stream (``seed``, ``seed + 1``, ...).

    IWAE / ELBO decode ``max_batch_samples`` z's per call (default: all B x samples in one
    call, on every device): the chunking decides which random numbers each image gets (a
    mixture draws its components and its noise chunk by chunk), so the CPU and the device
    must chunk alike -- the devices' own defaults differ (512 on a CPU, 10,000 on CUDA)."""
    from gpvae.data import ImageData
    from gpvae.devices import model_device_dtype
    from gpvae.evaluation import estimate
    from gpvae.models.base import posterior_without_grad

    device, dtype = model_device_dtype(model)
    x, z = x.to(device, dtype), z.to(device, dtype)
    out = {}
    model.eval()
    with SameNoise(seed), torch.no_grad():
        q = posterior_without_grad(model, x)
        try:
            out["q_mean"], out["q_std"] = q.mean, q.stddev
        except NotImplementedError:  # a flow: no closed-form moments
            pass
        out["q_log_prob"] = q.log_prob(z)
    trained = copy.deepcopy(model).train()
    with SameNoise(seed + 1):
        objective, _ = trained.training_objective(x, 1000)
        params = [p for p in trained.parameters() if p.requires_grad]
        grads = torch.autograd.grad(-objective.mean(), params, allow_unused=True)
    out["objective"] = objective.detach()
    out["gradient"] = torch.cat([g.flatten() for g in grads if g is not None])
    with SameNoise(seed + 2):
        est = estimate(model, ImageData(x.float().cpu()), samples=samples,
                       batch_size=x.shape[0], seed=seed, device=device, progress=False,
                       max_batch_samples=max_batch_samples or x.shape[0] * samples)
    out["iwae"], out["elbo"] = est.iwae, est.elbo
    return {k: v.detach().cpu() for k, v in out.items()}


def compare_model(spec: str, x: torch.Tensor, device, *, latent_dim: int = 10,
                  samples: int = 10, seed: int = 0) -> dict:
    """{quantity: relative error} of method ``spec`` (``NAME[:SIZE]``): a CPU model against
    its copy on ``device``, images x (CPU, float32); plus ``iwae_nats``, the largest
    absolute IWAE difference (nats per image)."""
    from gpvae.models import build_model, parse_model_spec

    name, options = parse_model_spec(spec)
    torch.manual_seed(seed)
    cpu_model = build_model(name, tuple(x.shape[1:]), latent_dim=latent_dim, **options)
    cpu_model.complete_schedule()
    dev_model = copy.deepcopy(cpu_model).to(device)
    z = torch.randn(x.shape[0], latent_dim, generator=torch.Generator().manual_seed(seed + 7))
    a = quantities(cpu_model, x, z, samples, seed)
    b = quantities(dev_model, x, z, samples, seed)
    errors = {k: rel_error(a[k], b[k]) for k in QUANTITIES if k in a}
    errors["iwae_nats"] = float((a["iwae"] - b["iwae"]).abs().max())
    return errors


def _tf32(enabled: bool) -> None:
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def _tolerance(spec: str, mode: str) -> float:
    """The relative tolerance of method ``spec`` in pass ``mode``: :data:`TOL_FP32`, or in
    the TF32 pass :data:`TOL_DEFAULT` (:data:`TOL_DEFAULT_REFINED` for a method whose
    q(z|x) refines through the decoder)."""
    from gpvae.models import MODELS, parse_model_spec

    if mode == "fp32":
        return TOL_FP32
    refined = MODELS[parse_model_spec(spec)[0]].posterior_needs_grad
    return TOL_DEFAULT_REFINED if refined else TOL_DEFAULT


def agreement(models, x: torch.Tensor, device, *, latent_dim: int = 10, samples: int = 10,
              seed: int = 0, passes=("default", "fp32"), log=print) -> dict:
    """The agreement table: one row per (pass, method) with each quantity's relative error,
    the worst, the tolerance and whether it holds."""
    device = torch.device(device)
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    rows = []
    try:
        for mode in passes:
            if mode == "fp32":
                _tf32(False)
            else:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            for spec in models:
                tol = _tolerance(spec, mode)
                t0 = time.perf_counter()
                errors = compare_model(spec, x, device, latent_dim=latent_dim,
                                       samples=samples, seed=seed)
                worst = max(v for k, v in errors.items() if k in QUANTITIES)
                row = {"pass": mode, "model": spec, **errors, "worst": worst, "tol": tol,
                       "ok": bool(worst <= tol), "seconds": time.perf_counter() - t0}
                rows.append(row)
                log(f"{mode:<8} {spec:<8} worst {worst:.1e} (tol {tol:.0e}) "
                    f"{'ok' if row['ok'] else 'FAIL'}  " + " ".join(
                        f"{k}={errors[k]:.1e}" for k in QUANTITIES if k in errors)
                    + f" (IWAE: {errors['iwae_nats']:.2g} nats)")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"device": str(device), "torch": torch.__version__,
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu"),
            "default_tf32": {"cudnn": tf32[0], "matmul": tf32[1]},
            "latent_dim": latent_dim, "images": int(x.shape[0]), "iwae_samples": samples,
            "seed": seed, "tolerances": {"default": TOL_DEFAULT, "default_refined": TOL_DEFAULT_REFINED,
                           "fp32": TOL_FP32},
            "ok": all(r["ok"] for r in rows), "rows": rows}


def _mnist_images(n: int) -> torch.Tensor:
    from gpvae.data import load_splits

    return load_splits("mnist", limit_train=1, limit_test=n).test.batch(slice(0, n))


def cmd_agreement(args) -> int:
    from gpvae.devices import resolve_device
    from gpvae.models import parse_model_list

    device = resolve_device(args.device)
    models = list(parse_model_list(args.models))
    x = (torch.rand(args.images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
         if args.synthetic else _mnist_images(args.images))
    print(f"CPU vs {device}: {len(models)} methods, {x.shape[0]} images, d={args.latent_dim}, "
          f"IWAE-{args.iwae_samples}; error = max|cpu - device| / max|cpu|")
    result = agreement(models, x, device, latent_dim=args.latent_dim, samples=args.iwae_samples,
                       seed=args.seed, passes=args.passes.split(","))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"ok": result["ok"], "worst_default": max(
        [r["worst"] for r in result["rows"] if r["pass"] == "default"], default=None),
        "worst_fp32": max([r["worst"] for r in result["rows"] if r["pass"] == "fp32"],
                          default=None)}))
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------------------
# compile: compiled vs eager on one device (gpvae.compiling, --compile)
# --------------------------------------------------------------------------------------
#: relative tolerance of compiled vs eager on the same device: float rounding only (one
#: different random draw moves an image's IWAE by ~1e-3 relative)
TOL_COMPILE = 1e-4


def compile_model(spec: str, x: torch.Tensor, device, *, latent_dim: int = 10,
                  samples: int = 10, steps: int = 3, seed: int = 0) -> dict:
    """Method ``spec`` (``NAME[:SIZE]``, ``+fused``: the GPVAE's trunks fused) compiled
    (:mod:`gpvae.compiling`) against its eager copy on ``device``, same weights and seeds,
    under gpvae's fp32 policy (TF32 off on CUDA): relative errors of IWAE-K / ELBO, of the
    first training step's loss and gradient, and -- reported, not judged -- of the
    parameters after ``steps`` Adam steps (Adam's first update is lr * sign(gradient) for
    every element, so an element whose gradient is ~0 moves by +-lr on float rounding alone:
    7.9e-3 on an H100 with TF32 convolutions), the units that fell back to eager (their
    one-line reasons), and the seconds of the
    first compiled pass (compilation included) and of a warm one against eager;
    ``cudagraph_skips``: graphs inductor compiled but could not record as CUDA graphs (their
    reasons: rerun with ``TORCH_LOGS=cudagraphs``)."""
    from torch._dynamo.utils import counters

    from gpvae.compiling import TrainingStep, inference_runner
    from gpvae.data import ImageData
    from gpvae.evaluation import estimate
    from gpvae.models import build_model, parse_model_spec
    from gpvae.precision import precision_context
    from gpvae.training import make_adam

    name, fused = (spec[:-len("+fused")], True) if spec.endswith("+fused") else (spec, False)
    method, options = parse_model_spec(name)
    torch.manual_seed(seed)
    model = build_model(method, tuple(x.shape[1:]), latent_dim=latent_dim, **options)
    model.complete_schedule()
    model = model.to(device)
    if fused:
        model.fuse_trunks(True)
    eager = copy.deepcopy(model)
    data = ImageData(x.float().cpu())
    skips = counters["inductor"]["cudagraph_skips"]

    def run(m, compile):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        est = estimate(m, data, samples=samples, batch_size=x.shape[0], seed=seed,
                       device=device, progress=False, compile=compile)
        return est, time.perf_counter() - t0

    with precision_context("fp32", device):
        a, t_eager = run(eager, "off")
        b, t_first = run(model, "on")
        _, t_warm = run(model, "on")
        _, t_eager = run(eager, "off")
        runner = inference_runner(model, "on", device)
        failed = {unit.what: unit.failure for unit in (runner.posterior, runner.chunk)
                  if unit.failure}
        xs = x.to(device)
        first = {}
        for m in (eager, model):
            m.train()
            step = TrainingStep(m, make_adam(m.parameters(), 1e-3), 50_000, m is model, device)
            optimizer = step.optimizer
            torch.manual_seed(seed + 1)
            for i in range(steps):
                loss, _ = step(xs)
                if i == 0:  # the first step's loss and gradient, before any update
                    first[m is model] = (loss.detach().double().reshape(1), torch.cat(
                        [p.grad.flatten() for p in m.parameters() if p.grad is not None]))
                optimizer.step()
    if step.runner is None or step.runner.failure:
        failed["training step"] = step.runner.failure if step.runner else "not compiled"
    params = rel_error(torch.cat([p.flatten() for p in eager.parameters()]),
                       torch.cat([p.flatten() for p in model.parameters()]))
    errors = {"iwae": rel_error(a.iwae, b.iwae), "elbo": rel_error(a.elbo, b.elbo),
              "loss": rel_error(first[False][0], first[True][0]),
              "gradient": rel_error(first[False][1], first[True][1])}
    return {"model": spec, **errors, "worst": max(errors.values()), "params_after_adam": params,
            "fell_back": failed,
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips,
            "first_compiled_s": t_first, "warm_compiled_s": t_warm, "eager_s": t_eager}


def cmd_compile(args) -> int:
    from gpvae.devices import resolve_device

    device = resolve_device(args.device)
    x = (torch.rand(args.images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
         if args.synthetic else _mnist_images(args.images))
    print(f"compiled vs eager on {device}: {x.shape[0]} images, d={args.latent_dim}, "
          f"IWAE-{args.iwae_samples}, {args.steps} training steps; error = max|eager - "
          f"compiled| / max|eager| (tol {TOL_COMPILE:.0e})")
    rows = []
    for spec in [s.strip() for s in args.models.split(",") if s.strip()]:
        row = compile_model(spec, x, device, latent_dim=args.latent_dim,
                            samples=args.iwae_samples, steps=args.steps, seed=args.seed)
        row["ok"] = bool(row["worst"] <= TOL_COMPILE and not row["fell_back"])
        rows.append(row)
        print(f"{spec:<12} iwae={row['iwae']:.1e} elbo={row['elbo']:.1e} "
              f"loss={row['loss']:.1e} gradient={row['gradient']:.1e} "
              f"{'ok' if row['ok'] else 'FAIL'} (params after {args.steps} Adam steps: "
              f"{row['params_after_adam']:.1e}, not judged)  IWAE pass: "
              f"first {row['first_compiled_s']:.1f} s (compiling), warm "
              f"{row['warm_compiled_s']:.3f} s, eager {row['eager_s']:.3f} s; "
              f"{row['cudagraph_skips']} graphs not recorded as CUDA graphs"
              + "".join(f"\n  fell back: {k}: {v}" for k, v in row["fell_back"].items()))
    result = {"device": str(device), "tol": TOL_COMPILE, "ok": all(r["ok"] for r in rows),
              "rows": rows}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------
def last_json(text: str):
    """The last line of ``text`` that is a JSON object, or None."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def headline(step: str, stdout: str) -> str:
    """One short line of what a step measured (from the JSON or the lines it printed);
    ``step`` without its number (``bench-train``)."""
    data = last_json(stdout)
    try:
        if step.startswith(("bench-inference", "bench-train")):
            m = data["models"]
            key = "ms_per_batch" if step.startswith("bench-inference") else "ms_per_step"
            ref = "gpvae" if "gpvae" in m else list(m)[-1]
            line = (f"vae {m['vae'][key]:.3f} ms, {ref} {m[ref][key]:.3f} ms: "
                    f"{m[ref]['ratio_to_vae']:.2f}x ({key})")
            if "gpvae+dense" in m:  # --gp-quadratic both: the dense form's row too
                line += (f"; gpvae+dense {m['gpvae+dense'][key]:.3f} ms: "
                         f"{m['gpvae+dense']['ratio_to_vae']:.2f}x")
            return line
        if step.startswith("bench-iwae"):
            return (f"{data['images_per_s']:.0f} images/s, {data['achieved_gflop_per_s']:.1f} "
                    f"GFLOP/s, {data['speedup_vs_reference']:.1f}x the per-image loop")
        if step.startswith("agreement"):
            return (f"worst relative error {data['worst_default']:.1e} (TF32 default, tol "
                    f"{TOL_DEFAULT:.0e}), {data['worst_fp32']:.1e} (FP32, tol {TOL_FP32:.0e})")
        if step.startswith("evaluate"):
            return (f"test IWAE-{data['iwae_samples']} {data['test_iwae']:.2f} nats on "
                    f"{data['n']} images")
        if step.startswith("bench-packing"):
            packed = [ln.split(":", 1)[1].strip() for ln in stdout.splitlines()
                      if "packed" in ln and "R =" in ln]
            return packed[-1] if packed else ""
        if step.startswith("gap"):
            return (f"amortization gap {data['amortization_gap']['mean']:.2f}, approximation "
                    f"gap {data['approximation_gap']['mean']:.2f} nats (means)")
        if step.startswith("uncertainty"):
            rho = data["spearman_vs_amortization_gap"]["total"]["rho"]
            return f"Spearman(Tr V, amortization gap) {rho:.2f} on {data['n']} images"
        if step.startswith("bench-quadratic"):
            r = data["rows"][-1]
            return (f"d={r['d']}: blocked Cholesky {r['blocked_ms']:.3f} ms, dense "
                    f"{r['chol_ms']:.3f} ms")
        if step.startswith("env"):
            return next(ln[5:] for ln in stdout.splitlines() if ln.startswith("env: "))
        if step.startswith("train"):
            line = next(ln for ln in stdout.splitlines() if ln.startswith("trained "))
            return line.split(": ", 1)[1].split(";")[0]
        if step.startswith(("compare", "grid-pack", "grid-report")):
            return "; ".join(f"{r[0]} {r[1]}" for r in _first_table(stdout))
    except (TypeError, KeyError, IndexError, ValueError, AttributeError, StopIteration):
        pass
    if data is not None:
        return ""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip() and not ln.startswith("$ ")]
    last = lines[-1].replace("|", "/") if lines else ""
    return last if len(last) <= 100 else last[:97] + "..."


def _first_table(text: str) -> list[list[str]]:
    """The body rows (lists of cells) of the first Markdown table in ``text``."""
    rows, seen = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set("".join(cells)) <= set("-: "):
                seen = True
            elif seen:
                rows.append(cells)
        elif seen:
            break
    return rows


def _bench_tables(outputs: dict) -> list[str]:
    lines = []
    for step, stdout in outputs.items():
        data = last_json(stdout)
        if isinstance(data, dict) and "models" in data and "bench-" in step:
            per = "ms_per_batch" if "bench-inference" in step else "ms_per_step"
            lines += ["", f"{step} ({data.get('device')}, d={data.get('latent_dim')}, "
                      f"{data.get('decoder', 'conv')} decoder, batch {data.get('batch_size')})",
                      f"| model | {per} | ratio to VAE | FLOP floor ratio |",
                      "|---|---:|---:|---:|"]
            for name, r in data["models"].items():
                lines.append(f"| {name} | {r[per]:.3f} | {r['ratio_to_vae']:.2f} | "
                             f"{r['flop_ratio_to_vae']:.2f} |")
        elif "bench-packing" in step:
            rows = [ln for ln in stdout.splitlines() if "images/s" in ln or "packed vs" in ln]
            if rows:
                lines += ["", step] + [f"    {ln}" for ln in rows]
    return lines


def read_steps(path) -> list[dict]:
    """The steps file of gpu_check.sh: one tab-separated line per step (name, exit code or
    -1 for skipped, seconds, time limit, stdout file; stderr next to it as .err)."""
    steps = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            name, rc, seconds, limit, stdout = line.split("\t")
            steps.append({"name": name, "rc": int(rc), "seconds": float(seconds),
                          "limit": limit, "stdout": Path(stdout)})
    return sorted(steps, key=lambda s: s["name"])


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def cmd_summary(args) -> int:
    """Print the summary (one row per step, the benchmark tables after) and, with
    ``--out-dir``, write it there as summary.md with gpu_check.log (every step's output and
    stderr, in order) and bench.jsonl (the JSON each step printed)."""
    steps = read_steps(args.steps)
    rows, outputs, log, jsonl = [], {}, [], []
    for s in steps:
        text, err = _read(s["stdout"]), _read(s["stdout"].with_suffix(".err"))
        outputs[s["name"]] = text
        rc = s["rc"]
        status = ("ok" if rc == 0 else "SKIPPED (no time left)" if rc == -1 else
                  f"TIMEOUT ({s['limit']} s)" if rc in (124, 137) else f"FAIL (exit {rc})")
        if rc == 0:
            result = headline(s["name"].split("-", 1)[-1], text)
        else:  # what went wrong: the last line of its error output
            lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
            result = (lines[-1].replace("|", "/")[:100] if lines and rc != -1 else "")
        rows.append((s["name"], status, s["seconds"], result))
        log += [f"===== {s['name']}: {status}, {s['seconds']:.1f} s =====", text.rstrip()]
        if err.strip():
            log += ["--- stderr ---", err[-20000:].rstrip()]
        log.append("")
        data = last_json(text)
        if data is not None:
            jsonl.append(json.dumps({"step": s["name"], "result": data}))
    width = max([len(r[0]) for r in rows] + [4])
    out = [f"| {'step':<{width}} | status | seconds | result |",
           f"|{'-' * (width + 2)}|---|---:|---|"]
    out += [f"| {n:<{width}} | {st} | {t:.1f} | {h} |" for n, st, t, h in rows]
    failed = [r[0] for r in rows if r[1] != "ok"]
    out += ["", f"{len(rows) - len(failed)} of {len(rows)} steps ok"
            + (f"; not ok: {', '.join(failed)} (see gpu_check.log)" if failed else "")]
    out += _bench_tables(outputs)
    text = "\n".join(out) + "\n"
    print(text, end="")
    if args.out_dir:
        folder = Path(args.out_dir)
        (folder / "summary.md").write_text(text)
        (folder / "gpu_check.log").write_text("\n".join(log) + "\n")
        (folder / "bench.jsonl").write_text("".join(j + "\n" for j in jsonl))
    return 1 if failed else 0


def cmd_synthetic_cifar(args) -> int:
    """Random CIFAR-10-shaped images in the standard files (cifar-10-batches-py: the five
    training batches and test_batch, the pickled dicts of cifar-10-python.tar.gz), so the
    benchmarks can time CIFAR-shaped inputs (3 x 32 x 32) where the real files are absent.
    Timings of freshly initialised models do not depend on the pixels."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(args.seed)
    folder = Path(args.out) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int, label: bytes) -> bytes:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        return pickle.dumps({b"batch_label": label, b"labels": [0] * n, b"data": data,
                             b"filenames": [b"x.png"] * n}, protocol=2)

    per = max(1, args.train // 5)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(batch(per, b"training batch %d of 5" % i))
    (folder / "test_batch").write_bytes(batch(args.test, b"testing batch 1 of 1"))
    print(f"synthetic CIFAR-10 files in {folder}: {5 * per} training, {args.test} test images")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("agreement", help="CPU vs device: q(z|x), objective, IWAE")
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--latent-dim", type=int, default=10)
    p.add_argument("--images", type=int, default=32, help="real MNIST test images")
    p.add_argument("--iwae-samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passes", default="default,fp32", help="default (TF32 convolutions, "
                   "PyTorch's CUDA default) and/or fp32 (TF32 off)")
    p.add_argument("--synthetic", action="store_true", help="random images, no MNIST")
    p.add_argument("--json-out", help="write the full table here")
    p = sub.add_parser("compile", help="compiled (--compile on) vs eager on one device")
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="vae,gpvae,gpvae+fused", help="NAME[:SIZE], "
                   "gpvae+fused: the GPVAE with its trunks fused")
    p.add_argument("--latent-dim", type=int, default=10)
    p.add_argument("--images", type=int, default=64, help="real MNIST test images")
    p.add_argument("--iwae-samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=3, help="training steps compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", action="store_true", help="random images, no MNIST")
    p = sub.add_parser("synthetic-cifar", help="random images in CIFAR-10's files (for timing)")
    p.add_argument("out", help="the data directory to write cifar-10-batches-py/ into")
    p.add_argument("--train", type=int, default=640)
    p.add_argument("--test", type=int, default=1280)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("summary", help="the summary table of a gpu_check.sh run")
    p.add_argument("steps", help="the steps file (name, rc, seconds, limit, stdout file)")
    p.add_argument("--out-dir", help="write summary.md, gpu_check.log and bench.jsonl here")
    args = parser.parse_args(argv)
    return {"agreement": cmd_agreement, "compile": cmd_compile, "summary": cmd_summary,
            "synthetic-cifar": cmd_synthetic_cifar}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
