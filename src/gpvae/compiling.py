"""Compiled execution (``--compile``): q(z|x), the IWAE loop and the training step run as
compiled graphs -- on CUDA as CUDA graphs, launch-free -- with the eager numbers.

What is compiled
----------------
Three units, each one ``torch.compile(fullgraph=True, dynamic=False)`` graph per input
shape, wrapped in a :class:`Fallback`:

* q(z|x): ``model.posterior`` (IWAE evaluation, :class:`CompiledInference`) or
  ``model.compute_posterior`` (what ``gpvae bench-inference`` times,
  :func:`posterior_pass_function`);
* the IWAE loop's per-chunk work: the decoder and the log-weights
  log p(x|z) + log p(z) - log q(z|x) of k samples z ~ q(z|x) (:class:`CompiledInference`,
  used by :func:`gpvae.evaluation.estimate`); q(z|x) is computed once per batch, then the
  chunks; the samples themselves are drawn eagerly, outside the graph (a sampler may
  synchronize with the host, which a CUDA graph cannot capture);
* the training step's forward pass, ``-mean(training_objective(x, N))`` (eq. 2, or the
  method's own objective such as the GPVAE's eq. 15), with its backward pass compiled by
  AOTAutograd (:class:`TrainingStep`); the gradient check and the optimizer step (fused
  Adam) stay as they are.

On CUDA the mode is ``torch.compile``'s "reduce-overhead" (``triton.cudagraphs``): each
graph is recorded once as a CUDA graph and replayed, so a q(z|x) or a training step costs
a few launches instead of one per operator.  Each batch (an IWAE batch, a training step,
a timed q(z|x)) starts a new CUDA-graph generation
(``torch.compiler.cudagraph_mark_step_begin``), so the outputs of q(z|x) stay valid
while that batch's chunks use them.  On CPU the mode is inductor's default (fused C++
kernels, no graphs): slower to start than on a GPU and not expected to pay off there,
but it runs the same mechanism, which is how tests/test_compile.py checks it without a GPU.

The same numbers
----------------
* Random numbers: inductor's ``fallback_random`` is on, so every draw (z ~ q(z|x), the
  training step's reparameterised sample) comes from PyTorch's own generator in the same
  order as in eager mode: the compiled path draws the very same samples.
* Arithmetic: inductor fuses operators and may reorder sums, so results agree with eager
  to float rounding, not bit for bit (tests/test_compile.py states the tolerances).
* Warm-up: the first call of each unit runs eagerly once (filling Python-level caches
  that a graph cannot fill, e.g. torch.distributions' KL dispatch table), its result is
  discarded and the random-number state restored, then the compiled call gives the
  result.  Every result is therefore the compiled one, so a compiled run is
  deterministic and ``--resume`` continues it exactly as if it had not stopped.
* Methods whose training step cannot be one graph (:meth:`packable` is False: SA's
  autograd inside q(z|x), RME's schedule counters read to Python) train eagerly under
  ``--compile on`` (a one-line note says so); their evaluation is still tried compiled.

The fallback
------------
A unit whose compilation fails -- no C++ compiler, an operator or Python construct
dynamo cannot put in one graph (``torch._dynamo`` errors), a backend failure -- prints
one line (``warning: --compile: ... runs eagerly (<the error>)``) once and runs eagerly
from then on: a run is never stopped by compilation.  The failed call is rerun eagerly
with the random-number state restored, so the numbers are those of an eager run.  An
error of the model itself is not swallowed: when the eager rerun fails too, its error
propagates unchanged (and compilation is not blamed).

Options
-------
``--compile off`` (eager), ``on`` (compiled where it works), ``auto`` (the default of
train and evaluate): on for CUDA for a method whose class says a GPU run measured that
compilation pays off (``compile_auto_on_cuda``: the VAE and the GPVAE, docs/benchmarks.md),
off on a CPU (slower to start, no gain there) and for every other method until measured.
The benchmarks also take ``both`` (eager and compiled rows side by side, measured in one
run).  Compilation is an execution option
like ``--device``, not part of what a run is: it is not stored in config.json, changes
no weight or checkpoint, and a run may be resumed with another setting (the numbers then
differ from an uninterrupted run by float rounding only).
"""
from __future__ import annotations

import sys
import weakref
from typing import Callable

import torch

from .errors import CompileError, ConfigError
from .models.base import without_grad
from .precision import autocast_context, upcast

#: the values of ``--compile`` (the benchmarks add "both")
COMPILE_CHOICES = ("off", "on", "auto")
BENCH_COMPILE_CHOICES = COMPILE_CHOICES + ("both",)
#: dynamo's limit of recompilations per function, raised to this: the compiled units are
#: shared by every model in a process and recompile per input shape (a last, smaller
#: batch; the last IWAE chunk) and per mode (training, evaluation)
RECOMPILE_LIMIT = 64

COMPILE_HELP = ("run q(z|x), the IWAE loop and the training step as compiled graphs "
                "(torch.compile; CUDA graphs on CUDA), falling back to eager mode with a "
                "one-line warning where compilation fails; the same numbers up to float "
                "rounding; the first steps take longer (compilation).  off (eager), on, or "
                "auto: on for CUDA for the methods measured on a GPU to gain from it (vae, "
                "gpvae; docs/benchmarks.md), off on a CPU and for the other methods")

#: the values of ``--fused-trunks`` in train and evaluate (the benchmarks add "both")
FUSED_CHOICES = ("off", "on", "auto")
FUSED_HELP = ("GPVAE: run its three encoder trunks (b/c, psi^m, psi^s) as one network -- "
              "concatenated and grouped convolutions, one batched FC product; the same "
              "features and parameters, fewer kernel launches.  off, on, or auto: on for "
              "CUDA (measured faster there, eager and compiled; docs/benchmarks.md), off on "
              "a CPU (no gain there); methods without trunks to fuse ignore auto")


def check_compile_option(value, choices=COMPILE_CHOICES, flag: str = "--compile") -> str:
    """``value`` if it is one of ``choices``, else a one-line
    :class:`~gpvae.errors.ConfigError`; True and False stand for "on" and "off"."""
    if value is True or value is False:
        value = "on" if value else "off"
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    return value


def compile_enabled(option, device, model=None) -> bool:
    """Whether ``--compile OPTION`` compiles ``model`` on ``device``: "on" yes, "off" no,
    "auto" only on CUDA and only for a method whose class says compiling was measured to
    help there (:attr:`~gpvae.models.base.LatentVariableModel.compile_auto_on_cuda`; with no
    model, no)."""
    option = check_compile_option(option)
    if option == "auto":
        return (torch.device(device).type == "cuda" and model is not None
                and type(model).compile_auto_on_cuda)
    return option == "on"


def _cuda_switch(option, device, can: bool, flag: str, choices, on: str, refusal: str) -> bool:
    """An execution switch of a capability the method may lack (``can``): ``flag``'s
    ``option`` checked against ``choices``; ``on`` yes, and a one-line
    :class:`~gpvae.errors.ConfigError` (``flag on: refusal``) without the capability;
    "auto" on CUDA where the method has it; anything else no."""
    option = check_compile_option(option, choices, flag)
    if option == on and not can:
        raise ConfigError(f"{flag} {on}: {refusal}")
    if option == "auto":
        return can and torch.device(device).type == "cuda"
    return option == on


def fused_trunks_enabled(option, device, model) -> bool:
    """Whether ``--fused-trunks OPTION`` fuses ``model``'s trunks on ``device``: "off" no;
    "auto" on CUDA where the method has trunks to fuse; "on" yes, and a one-line
    :class:`~gpvae.errors.ConfigError` for a method that has none."""
    return _cuda_switch(option, device, model.supports_fused_trunks(), "--fused-trunks",
                        FUSED_CHOICES, "on", f"{type(model).__name__} has no encoder trunks "
                        "to fuse (only the GPVAE does); use off or auto")


def apply_fused_trunks(model, option, device):
    """``model`` with its trunks fused or not as ``--fused-trunks OPTION`` says on ``device``
    (:func:`fused_trunks_enabled`); a model without trunks is returned unchanged."""
    fused = fused_trunks_enabled(option, device, model)  # "on" without trunks is refused
    if model.supports_fused_trunks():
        model.fuse_trunks(fused)
    return model


#: the values of ``--gp-quadratic`` in train and evaluate (the benchmarks: blocked, dense, both)
GP_QUADRATIC_CHOICES = ("blocked", "dense", "auto")
GP_QUADRATIC_HELP = ("GPVAE: how its 2d quadratic forms psi^T Sigma_j psi (eq. 13) are "
                     "computed -- blocked (the stored column blocks of the Cholesky factors "
                     "read in place: many small products, half the arithmetic) or dense "
                     "(the factors formed on every call: a few large products); the same "
                     "numbers up to float rounding.  auto: dense on CUDA (measured faster "
                     "there, docs/benchmarks.md), blocked on a CPU; methods without the "
                     "quadratic forms ignore auto")


def dense_quadratic_enabled(option, device, model) -> bool:
    """Whether ``--gp-quadratic OPTION`` computes ``model``'s quadratic forms through dense
    factors on ``device``: "blocked" no; "auto" on CUDA where the method has them; "dense"
    yes, and a one-line :class:`~gpvae.errors.ConfigError` for a method that has none."""
    return _cuda_switch(option, device, model.supports_dense_quadratic_forms(),
                        "--gp-quadratic", GP_QUADRATIC_CHOICES, "dense",
                        f"{type(model).__name__} has no GP quadratic forms (only the GPVAE "
                        "does); use blocked or auto")


def apply_gp_quadratic(model, option, device):
    """``model`` with its quadratic forms dense or blocked as ``--gp-quadratic OPTION`` says
    on ``device`` (:func:`dense_quadratic_enabled`); a model without them is unchanged."""
    dense = dense_quadratic_enabled(option, device, model)  # "dense" without them is refused
    if model.supports_dense_quadratic_forms():
        model.use_dense_quadratic_forms(dense)
    return model


def compile_options(device) -> dict:
    """inductor's options: its own random numbers off (``fallback_random``: the eager
    generator, the eager draws), and CUDA graphs on CUDA (= mode "reduce-overhead")."""
    options = {"fallback_random": True}
    if torch.device(device).type == "cuda":
        options["triton.cudagraphs"] = True
    return options


def compiled(fn: Callable, device) -> Callable:
    """``torch.compile(fn)`` as used here: one graph (``fullgraph``: a graph break is a
    compilation failure, raised before anything runs), static shapes, :func:`compile_options`.
    Compilation itself happens at the first call."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               RECOMPILE_LIMIT)
    return torch.compile(fn, fullgraph=True, dynamic=False, options=compile_options(device))


def warn(message: str) -> None:
    """The default ``log`` of the fallback: one line on stderr."""
    print(message, file=sys.stderr, flush=True)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _capture_failed(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from or during) is a failed CUDA-graph
    capture -- after which CUDA's random-number generator may be unusable in the process
    (seen on an H100: ``torch.normal`` inside a captured graph, docs/benchmarks.md)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if "captur" in text and ("graph" in text or "stream" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class Fallback:
    """``fast(*args)`` (a compiled unit) with ``eager(*args)`` (the same work, eager) as
    its fallback; see the module docstring.

    The first call runs ``eager`` as a warm-up (result discarded, random-number state
    restored), then ``fast``.  If ``fast`` raises, the call is rerun with ``eager`` (state
    restored first): if that succeeds, compilation failed -- one line goes to ``log``
    and every later call is eager; if it raises too, that error propagates (it is the
    model's) -- unless ``fast`` failed recording a CUDA graph, which can leave CUDA unable
    to run the eager path in this process: then a one-line
    :class:`~gpvae.errors.CompileError` says to rerun with ``--compile off``.  ``fast`` may
    be None (``torch.compile`` itself failed: ``error``).
    ``new_step``: on CUDA, each call starts a new CUDA-graph generation (whether it then
    runs compiled or not: the units called after it in the same batch are in it).

    ``compiled_calls`` counts the calls whose result came from ``fast``; ``failure`` is
    the one-line reason after a fallback, else None.
    """

    def __init__(self, fast: Callable | None, eager: Callable, what: str, device,
                 log: Callable[[str], None] | None = None, new_step: bool = False,
                 error: BaseException | None = None):
        self.fast, self.eager, self.what = fast, eager, what
        self.device = torch.device(device)
        self.log = log or warn
        self.new_step = new_step and self.device.type == "cuda"
        self.warmed = False
        self.compiled_calls = 0
        self.failure: str | None = None
        self._error = error if fast is None else None

    def _fail(self, exc: BaseException) -> None:
        self.failure = _one_line(exc)
        self.log(f"warning: --compile: {self.what} runs eagerly ({self.failure})")

    def __call__(self, *args):
        if self.new_step:  # also when eager: the batch's compiled units start a generation
            torch.compiler.cudagraph_mark_step_begin()
        if self.failure is not None:
            return self.eager(*args)
        if self._error is not None:
            self._fail(self._error)
            return self.eager(*args)
        state = _rng_state(self.device)
        if not self.warmed:
            self.eager(*args)  # an error of the model raises here, unchanged
            _set_rng_state(state, self.device)
            self.warmed = True
        try:
            out = self.fast(*args)
        except Exception as exc:  # noqa: BLE001 -- anything compilation raises; see below
            try:
                _set_rng_state(state, self.device)
                out = self.eager(*args)  # the model's own error propagates from here
            except Exception as eager_exc:
                if self.device.type == "cuda" and _capture_failed(exc):
                    raise CompileError(
                        f"--compile: recording {self.what} as a CUDA graph failed "
                        f"({_one_line(exc)}) and left this process unable to run it eagerly "
                        f"({_one_line(eager_exc)}); rerun with --compile off (a training "
                        "run continues from its last finished epoch with --resume)"
                    ) from eager_exc
                raise
            self._fail(exc)
            return out
        self.compiled_calls += 1
        return out


def fallback(fn: Callable, what: str, device, log=None, new_step: bool = False,
             wrap: Callable | None = None) -> Fallback:
    """A :class:`Fallback` of :func:`compiled` ``(fn)`` with ``fn`` itself as the eager
    path; ``wrap``, when given, builds both callables around them (``wrap(compiled(fn))``
    and ``wrap(fn)``: e.g. adds the backward pass)."""
    wrap = wrap or (lambda f: f)
    try:
        fast = compiled(fn, device)
    except Exception as exc:  # noqa: BLE001 -- torch.compile unavailable here
        return Fallback(None, wrap(fn), what, device, log, new_step, error=exc)
    return Fallback(wrap(fast), wrap(fn), what, device, log, new_step)


# --- q(z|x) and the IWAE loop ---------------------------------------------------------------
def _posterior(model, x):
    return without_grad(model, model.posterior, x)


def _compute_posterior(model, x):
    return without_grad(model, model.compute_posterior, x)


def _log_weights_chunk(model, q, x, z):
    """log p(x|z) + log p(z) - log q(z|x) for the chunk's draws z (k, B, d).  The draws are
    made outside the compiled graph (:meth:`CompiledInference.log_weights`): a method's
    sampler may synchronize with the host -- ``torch.normal(mean, std)`` checks std >= 0
    there, which a CUDA graph cannot capture (``cudaErrorStreamCaptureUnsupported``, seen on
    an H100) -- and drawn eagerly they are exactly the eager path's draws."""
    return model.log_likelihood(x, z) + model.log_prior(z) - q.log_prob(z)


class CompiledInference:
    """Compiled q(z|x) and IWAE log-weights for one model (see the module docstring);
    :func:`inference_runner` gives each model one, kept for the model's lifetime (so a
    failure is reported once, and the warm-up runs once).  It holds no reference to the
    model: every call takes it."""

    def __init__(self, name: str, device, log=None):
        self.posterior = fallback(_posterior, f"q(z|x) of {name}", device, log,
                                  new_step=True)
        self.chunk = fallback(_log_weights_chunk,
                              f"the IWAE log-weights of {name}", device, log)

    def log_weights(self, model, x: torch.Tensor, samples: int,
                    max_batch_samples: int = 512) -> torch.Tensor:
        """:func:`gpvae.evaluation.log_weights` (same chunks, same draws), compiled."""
        q = self.posterior(model, x)
        per_chunk = max(1, max_batch_samples // x.shape[0])
        out = []
        for start in range(0, samples, per_chunk):
            z = q.sample((min(per_chunk, samples - start),))  # eagerly: see _log_weights_chunk
            out.append(self.chunk(model, q, x, z))
        return torch.cat(out, 0)


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_runner(model, option, device=None, log=None) -> CompiledInference | None:
    """The model's :class:`CompiledInference` when ``--compile option`` compiles on
    ``device`` (default: the model's), else None (eager)."""
    from .devices import model_device_dtype

    device = torch.device(device) if device is not None else model_device_dtype(model)[0]
    if not compile_enabled(option, device, model):
        return None
    key = (device.type, device.index)
    runners = _RUNNERS.setdefault(model, {})
    if key not in runners:
        runners[key] = CompiledInference(type(model).__name__, device, log)
    return runners[key]


def posterior_pass_function(model, device, log=None) -> Callable:
    """x -> ``model.compute_posterior(x)`` (without gradients, as
    :func:`gpvae.bench.time_posterior` runs it), compiled: one CUDA-graph generation per call."""
    def _compute_posterior_of_model(x):
        return _compute_posterior(model, x)

    return fallback(_compute_posterior_of_model, f"q(z|x) of {type(model).__name__}", device,
                    log, new_step=True)


# --- the training step ---------------------------------------------------------------------
def _training_loss(model, x, n_train: int):
    """-mean(objective) and the diagnostics; the mean of the objective in float32 (or
    wider: :func:`gpvae.precision.upcast`) also under bf16 autocast."""
    objective, diag = model.training_objective(x, n_train)
    return -upcast(objective).mean(), diag


def _training_loss_under(precision: str, device) -> Callable:
    """:func:`_training_loss` under ``precision``'s autocast, entered *inside* the function
    (so inside a compiled graph): compiled with autocast entered around it, AOT autograd
    traced the backward of the FP32 islands' plain operations under the outer autocast, in
    bfloat16 -- the eager step's gradients were float32 there."""
    def _autocast_training_loss(model, x, n_train: int):
        with autocast_context(precision, device):
            return _training_loss(model, x, n_train)
    return _autocast_training_loss


class TrainingStep:
    """One training step's forward and backward pass: ``step(x)`` zeroes the gradients,
    computes ``loss = -mean(model.training_objective(x, n_train))`` (the objective under
    ``precision``'s autocast, :func:`gpvae.precision.autocast_context`; the mean in float32),
    runs ``loss.backward()`` (outside autocast) and returns ``(loss, diagnostics)`` --
    compiled when ``enabled`` (see the module docstring), else the same code eagerly.  The
    caller checks the loss and gradients and steps the optimizer."""

    def __init__(self, model, optimizer, n_train: int, enabled: bool, device=None, log=None,
                 precision: str = "fp32"):
        from .devices import model_device_dtype

        self.model, self.optimizer, self.n_train = model, optimizer, n_train
        self.device = torch.device(device) if device is not None else model_device_dtype(model)[0]
        self.runner = None
        loss = _training_loss_under(precision, self.device)
        if enabled and not model.packable():
            (log or warn)(f"note: --compile: the training step of {type(model).__name__} "
                          "cannot be one graph (autograd or Python control flow inside "
                          "it) and runs eagerly")
        elif enabled:
            self.runner = fallback(loss, f"the training step of {type(model).__name__}",
                                   self.device, log, new_step=True, wrap=self._with_backward)
        self._eager = self._with_backward(loss)

    def _with_backward(self, forward: Callable) -> Callable:
        def step(model, x, n_train):
            self.optimizer.zero_grad(set_to_none=True)
            loss, diag = forward(model, x, n_train)
            loss.backward()
            return loss, diag
        return step

    def __call__(self, x: torch.Tensor):
        run = self.runner if self.runner is not None else self._eager
        return run(self.model, x, self.n_train)
