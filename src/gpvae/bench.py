"""Benchmarks.  They print what they measure; nothing here asserts a speed.

``gpvae bench-iwae``: IWAE-K evaluation throughput on real MNIST test images with the
Tab. 6 networks.  In the same run it also times a reference: the way pythae's
``VAE.get_nll`` works -- one image at a time, its K copies through encoder and decoder in
one batch -- on a copy of the same model with the networks in the default NCHW layout, so
the printed speed-up is measured on this machine, now.  It also times, interleaved with the
estimator, a baseline: the unchanged code, i.e. a copy of the model decoding as it did
before the decoder's speed-ups (:func:`gpvae.networks.set_plain_decoding`: native
transposed convolutions, out-of-place ReLUs, no cache blocking), and checks that both give
the same IWAE to float rounding.
"""
from __future__ import annotations

import copy
import math
import time

import torch

from .compiling import (BENCH_COMPILE_CHOICES, TrainingStep, check_compile_option,
                        compile_enabled, inference_runner, posterior_pass_function)
from .data import load_splits
from .devices import model_device_dtype, resolve_device
from .evaluation import estimate
from .flops import forward_flops
from .models import build_model, parse_model_list, parse_model_spec
from .models.base import posterior_without_grad, without_grad
from .networks import set_channels_last, set_plain_decoding
from .precision import check_precision, precision_context
from .training import make_adam
from .checkpoint import json_text


def reference_per_image_iwae(model, data, samples: int, device) -> torch.Tensor:
    """IWAE_K one image at a time (K copies of the image through encoder and decoder)."""
    out = []
    device, dtype = model_device_dtype(model, device)
    with torch.no_grad():
        for i in range(len(data)):
            x = data.batch(slice(i, i + 1), device).to(dtype)
            xs = x.expand(samples, *x.shape[1:])
            q = posterior_without_grad(model, xs)
            z = q.rsample()
            lw = model.log_likelihood(xs, z) + model.log_prior(z) - q.log_prob(z)
            out.append(torch.logsumexp(lw, 0) - math.log(samples))
    return torch.stack(out)


def decoder_flops(model) -> int:
    """FLOPs of one decoder pass for one z (on the model's device and dtype)."""
    device, dtype = model_device_dtype(model)
    return forward_flops(model.decoder, torch.zeros(1, model.latent_dim, device=device,
                                                    dtype=dtype))


def iwae_flops_per_image(model, samples: int) -> int:
    """One q(z|x) (:meth:`~gpvae.models.base.LatentVariableModel.posterior_flops`) and
    ``samples`` decoder passes."""
    return model.posterior_flops(1) + samples * decoder_flops(model)


def _time(fn, repeats: int, device) -> float:
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_iwae(args) -> dict:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    test = load_splits("mnist", limit_train=1, limit_test=args.images).test
    method, options = parse_model_spec(args.model)
    model = build_model(method, test.images.shape[1:], latent_dim=args.latent_dim, **options)
    model = model.to(device).eval()
    n, k = len(test), args.iwae_samples
    compile_mode = check_compile_option(getattr(args, "compile", "off"), BENCH_COMPILE_CHOICES)
    both = compile_mode == "both"  # the estimator eager, and compiled, timed interleaved

    precision = check_precision(getattr(args, "precision", "fp32"), device)

    def ours(compile="off" if both else compile_mode):
        return estimate(model, test, samples=k, batch_size=args.batch_size, device=device,
                        max_batch_samples=args.max_batch_samples, progress=False,
                        compile=compile, precision=precision)

    # the unchanged code: the same model decoding as before the decoder's speed-ups
    # (networks.set_plain_decoding), timed interleaved with ours in this run
    base_model = set_plain_decoding(copy.deepcopy(model))

    def baseline():
        return estimate(base_model, test, samples=k, batch_size=args.batch_size, device=device,
                        max_batch_samples=args.max_batch_samples, progress=False,
                        precision=precision)

    ref_n = min(n, 100)
    ref_data = type(test)(test.images[:ref_n])
    ref_model = set_channels_last(copy.deepcopy(base_model), False)  # NCHW, as pythae runs

    def reference():
        reference_per_image_iwae(ref_model, ref_data, k, device)

    ours()  # warm-up
    if both:
        for _ in range(2):  # compile, record the CUDA graphs
            ours("on")
        t_ours = t_compiled = math.inf
        for _ in range(args.repeats):
            t_ours = min(t_ours, _time(ours, 1, device))
            t_compiled = min(t_compiled, _time(lambda: ours("on"), 1, device))
    else:
        if compile_mode != "off":
            ours()  # compiled at the first call: record the CUDA graphs too
        t_ours = _time(ours, args.repeats, device)
    t_ref = _time(reference, args.repeats, device)
    kept = {}  # the last estimate of each, to compare their numbers

    def keep(name, fn):
        return lambda: kept.__setitem__(name, fn())

    baseline()  # warm-up
    t_base = math.inf
    for _ in range(args.repeats):  # interleaved: baseline, ours, baseline, ours, ...
        t_base = min(t_base, _time(keep("baseline", baseline), 1, device))
        t_ours = min(t_ours, _time(keep("ours", ours), 1, device))
    iwae_diff = float((kept["ours"].iwae - kept["baseline"].iwae).abs().max())
    flops = iwae_flops_per_image(model, k)
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "model": args.model,
        "iwae_samples": k, "images": n,
        "images_per_s": n / t_ours, "reference_images_per_s": ref_n / t_ref,
        "speedup_vs_reference": (n / t_ours) / (ref_n / t_ref),
        "gflop_per_image": flops / 1e9, "achieved_gflop_per_s": flops * n / t_ours / 1e9,
        "compile": compile_mode, "precision": precision,
    }
    if both:
        result.update(compiled_images_per_s=n / t_compiled, compile_speedup=t_ours / t_compiled)
    if both or compile_enabled(compile_mode, device, model):  # did a unit fall back?
        runner = inference_runner(model, "on", device)
        result["compile_fallback"] = {u.what: u.failure for u in (runner.posterior, runner.chunk)
                                      if u.failure} or None
    result.update(baseline="native transposed convolutions, out-of-place ReLU, no cache blocking",
                  baseline_images_per_s=n / t_base, speedup_vs_baseline=t_base / t_ours,
                  max_abs_iwae_diff_vs_baseline=iwae_diff)
    if args.json:
        print(json_text(result))
    else:
        print(f"IWAE-{k} on {n} MNIST test images, {args.model}, Tab. 6 networks, d={args.latent_dim}, "
              f"{device} ({result['threads']} threads), best of {args.repeats}")
        print(f"  gpvae estimator:            {result['images_per_s']:8.1f} images/s"
              + ("" if compile_mode == "off" else f" (--compile {compile_mode})"))
        if both:
            print(f"  gpvae estimator, compiled:  {result['compiled_images_per_s']:8.1f} "
                  f"images/s ({result['compile_speedup']:.2f}x eager)")
        for what, why in (result.get("compile_fallback") or {}).items():
            print(f"  ({what} ran eagerly, its compilation fell back: {why})")
        print(f"  baseline (unchanged code):  {result['baseline_images_per_s']:8.1f} images/s "
              f"({result['baseline']})")
        print(f"  speed-up vs baseline:       {result['speedup_vs_baseline']:8.2f}x (the same "
              f"numbers: IWAE differs by at most {iwae_diff:.1e} nats/image)")
        print(f"  per-image reference loop:   {result['reference_images_per_s']:8.1f} images/s "
              f"(pythae get_nll style, {ref_n} images)")
        print(f"  speed-up:                   {result['speedup_vs_reference']:8.2f}x")
        print(f"  FLOP floor: {result['gflop_per_image']:.3f} GFLOP/image (true multiply-adds x 2; "
              f"counting each transposed-convolution output x kernel gives ~4x more) -> "
              f"{result['achieved_gflop_per_s']:.1f} GFLOP/s achieved")
        if getattr(args, "profile", False):
            _print_profile({"gpvae estimator": ours, "baseline (unchanged code)": baseline},
                           device)
    return result


def _train_floor_flops(model) -> int:
    """Forward FLOPs of one training example: q(z|x) (``model.posterior_flops(1)``) plus
    one decoder pass.  Backward costs about twice the forward for both models, so the
    ratio of these is the arithmetic floor of the training-step time ratio."""
    return model.posterior_flops(1) + decoder_flops(model)


def _print_profile(runs: dict, device, rows: int = 12) -> None:
    """Run each model's timed work once more under torch.profiler and print its operators
    by self time (the share of each is of that model's total)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    for name, run in runs.items():
        with profile(activities=activities) as prof:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n{name}: where the time goes (torch.profiler, one timed round)")
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def _in_precision(fn, args, device, autocast: bool = True):
    """``fn`` run under :func:`gpvae.precision.precision_context` of ``args.precision``
    (fp32 when the command has no such flag)."""
    precision = getattr(args, "precision", "fp32")
    check_precision(precision, device)

    def run():
        with precision_context(precision, device, autocast=autocast):
            return fn()

    return run


def _variants(args) -> list[tuple[str, str, bool | str, bool, bool]]:
    """How ``--compile``, ``--fused-trunks`` and ``--gp-quadratic`` ask each model to be run:
    (row-name suffix, its compile part, compiled, fused trunks, dense quadratic forms) per
    row; ``both`` gives two rows (eager and ``+compile``; three trunks and ``+fused``; the
    blocked quadratic forms and ``+dense``), timed side by side.  ``compiled`` is True or
    False, or the option itself (off, on, auto), which :func:`_variant_models` resolves per
    model (auto compiles only the methods measured to gain on CUDA)."""
    mode = check_compile_option(getattr(args, "compile", "off"), BENCH_COMPILE_CHOICES)
    fuse = getattr(args, "fused_trunks", "off")
    form = getattr(args, "gp_quadratic", "blocked")
    compiles = ([(False, ""), (True, "+compile")] if mode == "both"
                else [(mode, "")])  # off, on or auto: resolved per model (_variant_models)
    fuses = [(False, ""), (True, "+fused")] if fuse == "both" else [(fuse == "on", "")]
    forms = ([(False, ""), (True, "+dense")] if form == "both"
             else [(form == "dense", "")])
    return [(fs + ds + cs, cs, compiled, fused, dense) for fused, fs in fuses
            for dense, ds in forms for compiled, cs in compiles]


def _variant_models(name: str, model, variants) -> list[tuple[str, str, object, bool, bool,
                                                              bool]]:
    """(row, its reference VAE row, model, compiled, fused, dense) for each of
    :func:`_variants`: the first row runs ``model`` itself, the others copies (the same
    weights); fused trunks and dense quadratic forms only for a model that has them (the
    GPVAE), which gets no ``+fused`` or ``+dense`` row otherwise."""
    can_fuse = model.supports_fused_trunks()
    can_densify = model.supports_dense_quadratic_forms()
    device = model_device_dtype(model)[0]
    rows = []
    for suffix, compile_suffix, compiled, fused, dense in variants:
        if isinstance(compiled, str):  # --compile off / on / auto, for this model
            compiled = compile_enabled(compiled, device, model)
        if (fused and not can_fuse and "+fused" in suffix
                or dense and not can_densify and "+dense" in suffix):
            continue
        m = copy.deepcopy(model) if rows else model
        fused = fused and can_fuse
        m.fuse_trunks(fused)
        dense = dense and can_densify
        m.use_dense_quadratic_forms(dense)
        rows.append((name + suffix, "vae" + compile_suffix, m, compiled, fused, dense))
    return rows


def _warm_up(fn, compiled: bool) -> None:
    """The untimed calls before timing: one, or for a compiled row two (compilation, then
    the CUDA-graph recording)."""
    for _ in range(2 if compiled else 1):
        fn()


def _print_fallbacks(results: dict) -> None:
    """A line per compiled row that ran eagerly after all (its compilation fell back)."""
    for name, r in results.items():
        if r.get("compile_fallback"):
            print(f"({name}: ran eagerly, its compilation fell back: {r['compile_fallback']})")


def _modes_text(out: dict) -> str:
    """The header's note of ``--compile`` / ``--fused-trunks`` when not off (ratios to the
    VAE compare rows run the same way: a ``+compile`` row with the compiled VAE)."""
    modes = [f"--{k.replace('_', '-')} {out[k]}" for k in ("compile", "fused_trunks")
             if out.get(k, "off") != "off"]
    if out.get("gp_quadratic", "blocked") != "blocked":
        modes.append(f"--gp-quadratic {out['gp_quadratic']}")
    return f" ({', '.join(modes)}; ratios to the VAE run the same way)" if modes else ""


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _with_vae(specs: dict) -> dict:
    """The parsed ``--models`` with the VAE first when it is not listed (the reference)."""
    return specs if "vae" in specs else {"vae": ("vae", {}), **specs}


def _test_batches(dataset: str, data_dir, batch_size: int, limit: int | None, device):
    from .data import load_splits

    test = load_splits(dataset, data_dir, limit_train=1, limit_test=limit).test
    return [test.batch(slice(i, i + batch_size), device) for i in range(0, len(test), batch_size)]


def _posterior_pass(model, batches, compiled: bool = False):
    """One pass of ``model.compute_posterior`` (q(z|x) and its parameters) over ``batches``,
    without gradients (with autograd inside q(z|x) for a method that needs it).  The
    batches are cast to the model's device and dtype first (untimed; no copy if they match).
    ``compiled``: as a compiled graph (:func:`gpvae.compiling.posterior_pass_function`)."""
    batches = [x.to(*model_device_dtype(model, x.device)) for x in batches]
    run = (posterior_pass_function(model, batches[0].device) if compiled
           else lambda x: without_grad(model, model.compute_posterior, x))

    def one_pass():
        with torch.inference_mode():
            for x in batches:
                run(x)

    one_pass.unit = run if compiled else None  # its .failure: did it fall back?

    return one_pass


def time_posterior(model, batches, repeats: int, device) -> list[float]:
    """Milliseconds per batch of computing q(z|x) (its mean and scale) over ``batches``:
    one warm-up pass, then ``repeats`` timed passes (CUDA synchronized)."""
    one_pass = _posterior_pass(model, batches)
    one_pass()  # warm-up
    return [_time(one_pass, 1, device) / len(batches) * 1e3 for _ in range(repeats)]


def bench_inference(args) -> dict:
    """Paper Tab. 5 protocol: per-batch time of computing q(z|x) over the test set.

    The models' timed passes are interleaved (VAE, GPVAE, VAE, GPVAE, ...) so that each
    ratio compares passes taken at nearly the same moment on a noisy machine."""
    from .data import IMAGE_SHAPES

    device = resolve_device(args.device)
    check_precision(getattr(args, "precision", "fp32"), device)
    specs = _with_vae(parse_model_list(args.models))
    names = list(specs)
    batches = _test_batches(args.dataset, args.data_dir, args.batch_size, args.limit_test, device)
    models, passes, refs, modes, units = {}, {}, {}, {}, {}
    variants = _variants(args)
    for name, (method, options) in specs.items():
        torch.manual_seed(0)
        model = build_model(method, IMAGE_SHAPES[args.dataset], latent_dim=args.latent_dim,
                            decoder=args.decoder, **options)
        model.complete_schedule()  # e.g. RME(M) timed with all M components
        for row, ref, m, compiled, fused, dense in _variant_models(
                name, model.to(device).eval(), variants):
            models[row], refs[row] = m, ref
            one_pass = _posterior_pass(m, batches, compiled)
            units[row] = one_pass.unit
            passes[row] = _in_precision(one_pass, args, device)
            modes[row] = (compiled, fused, dense)
            _warm_up(passes[row], compiled)
    names = list(passes)
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(_time(passes[name], 1, device) / len(batches) * 1e3)
    results = {}
    for name in names:
        t = times[name]
        results[name] = {"ms_per_batch": sum(t) / len(t), "ms_per_batch_min": min(t),
                         "flops_per_image": models[name].posterior_flops(1)}
    for name, r in results.items():
        vae = results[refs[name]]  # the VAE run the same way (eager or compiled)
        r["ratio_to_vae"] = r["ms_per_batch"] / vae["ms_per_batch"]
        r["flop_ratio_to_vae"] = _ratio(r["flops_per_image"], vae["flops_per_image"])
        r["gflops_per_s"] = r["flops_per_image"] * args.batch_size / r["ms_per_batch"] / 1e6
        r["compiled"], r["fused_trunks"], r["dense_quadratic_forms"] = modes[name]
        r["compile_fallback"] = units[name].failure if units[name] else None
    out = {"device": str(device), "threads": torch.get_num_threads(), "dataset": args.dataset,
           "decoder": args.decoder, "precision": getattr(args, "precision", "fp32"),
           "latent_dim": args.latent_dim, "batch_size": args.batch_size,
           "batches": len(batches), "repeats": args.repeats,
           "compile": getattr(args, "compile", "off"),
           "fused_trunks": getattr(args, "fused_trunks", "off"),
           "gp_quadratic": getattr(args, "gp_quadratic", "blocked"), "models": results}
    if args.json:
        print(json_text(out))
    else:
        print(f"q(z|x) inference time per batch of {args.batch_size}, {args.dataset} test set "
              f"({len(batches)} batches), d={args.latent_dim}, {out['decoder']} decoder, {device} "
              f"({out['threads']} threads), {out['precision']}, mean of {args.repeats} passes "
              "after a warm-up" + _modes_text(out))
        w = max(10, *map(len, results))
        print(f"{'model':<{w}} {'ms/batch':>9} {'ratio to VAE':>13} {'MFLOP/image':>12} "
              f"{'FLOP floor ratio':>17} {'GFLOP/s':>8}")
        for name, r in results.items():
            print(f"{name:<{w}} {r['ms_per_batch']:>9.2f} {r['ratio_to_vae']:>13.2f} "
                  f"{r['flops_per_image'] / 1e6:>12.2f} {r['flop_ratio_to_vae']:>17.2f} "
                  f"{r['gflops_per_s']:>8.1f}")
        print("(MFLOP/image: the FLOP floor of one q(z|x), 2 x multiply-adds; GFLOP/s: that "
              "floor over the measured time, i.e. the rate the method achieves)")
        _print_fallbacks(results)
        if args.profile:
            _print_profile(passes, device)
    return out


def bench_train(args) -> dict:
    """Time of one training step (objective, backward, Adam) per model, ratio to the VAE.

    As in :func:`bench_inference` the models' timed rounds are interleaved (VAE, GPVAE,
    VAE, ...), each model's best round is kept, so the ratio compares rounds taken at
    nearly the same moment on a noisy machine."""
    from .data import IMAGE_SHAPES, load_splits

    device = resolve_device(args.device)
    check_precision(getattr(args, "precision", "fp32"), device)
    specs = _with_vae(parse_model_list(args.models))
    names = list(specs)
    train_data = load_splits(args.dataset, args.data_dir, limit_train=args.batch_size * 4).train
    x = train_data.batch(slice(0, args.batch_size), device)

    def make_steps(model, opt, compiled=False):
        """``args.steps`` training steps as the trainer takes them
        (:class:`gpvae.compiling.TrainingStep`, compiled or eager, then Adam)."""
        xm = x.to(*model_device_dtype(model, device))  # the model's device and dtype
        step = TrainingStep(model, opt, 50_000, compiled, device,
                            precision=getattr(args, "precision", "fp32"))

        def steps():
            for _ in range(args.steps):
                step(xm)
                opt.step()
        run = _in_precision(steps, args, device, autocast=False)  # as gpvae.training
        run.unit = step.runner  # compiled: its .failure says whether it fell back
        return run

    runs, models, refs, modes, units = {}, {}, {}, {}, {}
    variants = _variants(args)
    for name, (method, options) in specs.items():
        torch.manual_seed(0)
        model = build_model(method, IMAGE_SHAPES[args.dataset], latent_dim=args.latent_dim,
                            decoder=args.decoder, **options)
        model.complete_schedule()
        for row, ref, m, compiled, fused, dense in _variant_models(
                name, model.to(device).train(), variants):
            models[row], refs[row] = m, ref
            runs[row] = make_steps(m, make_adam(m.parameters(), lr=5e-4), compiled)
            units[row] = runs[row].unit
            modes[row] = (compiled, fused, dense)
            _warm_up(runs[row], compiled)
    names = list(runs)
    best = {name: math.inf for name in names}
    for _ in range(args.repeats):
        for name in names:
            best[name] = min(best[name], _time(runs[name], 1, device))
    results = {name: {"ms_per_step": best[name] / args.steps * 1e3,
                      "flops_per_image": _train_floor_flops(models[name])} for name in names}
    for name, r in results.items():
        vae = results[refs[name]]  # the VAE run the same way (eager or compiled)
        r["ratio_to_vae"] = r["ms_per_step"] / vae["ms_per_step"]
        r["flop_ratio_to_vae"] = _ratio(r["flops_per_image"], vae["flops_per_image"])
        r["compiled"], r["fused_trunks"], r["dense_quadratic_forms"] = modes[name]
        r["compile_fallback"] = (units[name].failure if units[name] else
                                 "cannot be one graph" if r["compiled"] else None)
    out = {"device": str(device), "threads": torch.get_num_threads(), "dataset": args.dataset,
           "precision": getattr(args, "precision", "fp32"),
           "latent_dim": args.latent_dim, "batch_size": args.batch_size,
           "compile": getattr(args, "compile", "off"),
           "fused_trunks": getattr(args, "fused_trunks", "off"),
           "gp_quadratic": getattr(args, "gp_quadratic", "blocked"), "models": results}
    if args.json:
        print(json_text(out))
    else:
        print(f"training step (batch {args.batch_size}, d={args.latent_dim}, {args.dataset}, "
              f"{device}, {out['threads']} threads, {out['precision']}), best of "
              f"{args.repeats} x {args.steps} steps" + _modes_text(out))
        w = max(10, *map(len, results))
        print(f"{'model':<{w}} {'ms/step':>9} {'ratio to VAE':>13} {'MFLOP/image':>12} "
              f"{'FLOP floor ratio':>17}")
        for name, r in results.items():
            print(f"{name:<{w}} {r['ms_per_step']:>9.2f} {r['ratio_to_vae']:>13.2f} "
                  f"{r['flops_per_image'] / 1e6:>12.2f} {r['flop_ratio_to_vae']:>17.2f}")
        print("(MFLOP/image: the forward FLOP floor, one q(z|x) and one decoder pass)")
        _print_fallbacks(results)
        if args.profile:
            _print_profile(runs, device)
    return out


def bench_quadratic(args) -> dict:
    """Time one batch of the d quadratic forms psi^T Sigma_j psi of eq. (13): the dense
    Cholesky form, the column-blocked Cholesky form (what training uses, reading the stored
    blocks in place) and the symmetric packed form for several block sizes."""
    from .cholesky import (blocked_cholesky_quadratic_form, chol_block_size,
                           cholesky_quadratic_form, dense_to_blocked, packed_quadratic_form,
                           symmetric_packed)

    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    p, rows = args.features, []
    for d in args.latent_dims:
        chol = (torch.randn(d, p, p, generator=g) * 0.01).tril(-1)
        chol = (chol + torch.diag_embed(torch.rand(d, p, generator=g) + 0.5)).to(device)
        psi = torch.randn(args.batch_size, p, generator=g).to(device)
        with torch.inference_mode():
            row = {"d": d, "chol_ms": _time(lambda: cholesky_quadratic_form(psi, chol),
                                            args.repeats, device) * 1e3}
            cb = chol_block_size(p)
            log_diag, blocks = dense_to_blocked(chol, cb)
            row["blocked_ms"] = _time(
                lambda: blocked_cholesky_quadratic_form(psi, log_diag, blocks, cb),
                args.repeats, device) * 1e3
            for b in args.blocks:
                if p % b:
                    continue
                packed = symmetric_packed(chol, b)
                row[f"packed_b{b}_ms"] = _time(lambda: packed_quadratic_form(psi, packed, b),
                                               args.repeats, device) * 1e3
        rows.append(row)
    out = {"device": str(device), "threads": torch.get_num_threads(), "p": p,
           "batch_size": args.batch_size, "rows": rows}
    if args.json:
        print(json_text(out))
    else:
        print(f"d quadratic forms psi^T Sigma_j psi, batch {args.batch_size}, p={p}, {device} "
              f"({out['threads']} threads), best of {args.repeats}, ms")
        keys = [k for k in rows[0] if k != "d"]
        print(f"{'d':>4} " + " ".join(f"{k[:-3]:>12}" for k in keys))
        for r in rows:
            print(f"{r['d']:>4} " + " ".join(f"{r[k]:>12.2f}" for k in keys))
    return out
