"""The one interface every inference method implements.

A model couples the generative model of paper eq. (1),

    p(z) = N(0, I),    p(x|z) = likelihood(x; g_theta(z)),

with an inference method that maps a batch x (B, C, H, W) to q(z|x): a
``torch.distributions.Distribution`` with ``batch_shape == (B,)`` and
``event_shape == (d,)``, supporting ``rsample(sample_shape)`` and ``log_prob(z)``.

Everything downstream -- the ELBO, the IWAE estimate, timing, plots -- is written once
against :meth:`LatentVariableModel.posterior`, :meth:`log_prior` and :meth:`log_likelihood`
(see :mod:`gpvae.evaluation`), and tests/test_contract.py checks every registered method
against it.  How each method fits:

* VAE, GPVAE (moment-matched eq. 13): a diagonal Gaussian, ``Independent(Normal)``.
* SA(k): ``posterior`` runs k SVI steps from the encoder's output and returns the refined
  Gaussian; it needs autograd, so the class sets ``posterior_needs_grad = True``.
* IAF / Householder flows: a ``TransformedDistribution`` of the encoder's Gaussian.
* ME / RME: a ``MixtureSameFamily`` of Gaussians.
* VLAE: a ``MultivariateNormal`` with the Laplace (full) covariance (also
  ``posterior_needs_grad``: the Jacobian of the decoder).

Methods whose *training* objective is not the plain single-sample ELBO (e.g. the GPVAE's
eq. 15) override :meth:`training_objective`; evaluation never depends on it.  Methods call
the decoder only through :meth:`decode` / :meth:`log_likelihood` (the contract test swaps in
a linear decoder whose log p(x) is known).

Gradients inside ``posterior``
------------------------------
Evaluation, benchmarks, plots and uncertainty need no gradients and run under
``torch.inference_mode`` (or ``no_grad``).  A method whose ``posterior`` itself uses autograd
sets the class attribute ``posterior_needs_grad = True``; such callers then obtain q(z|x)
through :func:`posterior_without_grad` (or run another method that calls ``posterior``
through :func:`without_grad`), which switches autograd back on for that call only and
gives the model a normal tensor (inference-mode tensors cannot enter autograd).

Optional capabilities
---------------------
Base-class methods with a default, never probed for by attribute name:

* :meth:`posterior_flops` -- the FLOP floor of one q(z|x) (printed by
  ``gpvae bench-inference``): a generic count of the layers :meth:`compute_posterior` runs,
  plus :meth:`extra_posterior_flops`, which a method overrides for arithmetic outside
  ``nn.Linear`` / convolution layers (and for backward passes inside ``posterior``);
* :meth:`compute_posterior` -- what "computing q(z|x)" means for timing (Tab. 5);
* :meth:`uncertainty` and :meth:`fused_encoder` -- raise
  :class:`~gpvae.errors.UnsupportedError` unless overridden; :meth:`supports_uncertainty`
  and :meth:`supports_fused_encoder` say whether a class overrides them.
* :meth:`variational_family` -- the family of q(z|x) in words (default
  ``"diagonal Gaussian"``; flows, mixtures and full-covariance methods say theirs);
* :meth:`epoch_summary` -- scalar summaries of the model's state that the trainer appends
  to each epoch's metrics row (default none);
* :meth:`param_groups` -- the optimizer's parameter groups, each with its learning rate
  (default one group of all parameters at ``--lr``; the GPVAE's ``gp_lr`` gives q(W,U)
  its own).
* :meth:`packable` -- whether :mod:`gpvae.packing` may train several runs of the method
  as one vmapped computation (default True).

Options
-------
A method's config dataclass subclasses :class:`ModelConfig`.  Every field beyond
ModelConfig's is that method's own option and must be named ``PREFIX_...`` with PREFIX its
``option_prefix`` (by default the method's registry name; the GPVAE's is ``gp``): the CLI
merges all methods' options into one set of flags, so names that say their method cannot
collide (enforced by :func:`gpvae.models.register`).  ``size_option`` names the option that
a size in the paper's notation sets (``--models sa:2``), and ``renamed_options`` maps former
option names to current ones (old ``config.json`` files keep loading).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, ClassVar, TypeVar

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from ..devices import model_device_dtype
from ..errors import ConfigError, UnsupportedError
from ..flops import count_flops
from ..likelihoods import LIKELIHOODS, make_likelihood
from ..networks import DECODERS, architecture_for, make_decoder
from ..precision import upcast

T = TypeVar("T")


@dataclass
class ModelConfig:
    """Options shared by every method (the generative model)."""

    #: prefix of this method's own option names (``PREFIX_name``); None: the registry name
    option_prefix: ClassVar[str | None] = None
    #: the integer option a size in the paper's notation sets (SA(k): the steps k), or None
    size_option: ClassVar[str | None] = None
    #: former option names -> current ones, applied to config.json files and keywords
    renamed_options: ClassVar[dict[str, str]] = {}

    latent_dim: int = 10
    likelihood: str = "gaussian"
    sigma_x: float = 0.1
    decoder: str = "conv"

    def validate(self) -> None:
        if not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ConfigError(f"--latent-dim must be a positive integer, got {self.latent_dim}")
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(
                f"unknown likelihood {self.likelihood!r}; choose from {', '.join(LIKELIHOODS)}"
            )
        if not self.sigma_x > 0:
            raise ConfigError(f"--sigma-x must be positive, got {self.sigma_x}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"unknown decoder {self.decoder!r}; choose from {', '.join(DECODERS)}")

    def to_dict(self) -> dict:
        return asdict(self)


class LatentVariableModel(nn.Module):
    """Base class: the generative model plus an abstract inference method."""

    config_class = ModelConfig
    #: whether ``posterior`` itself uses autograd (see "Gradients inside posterior" above)
    posterior_needs_grad: ClassVar[bool] = False
    #: whether ``--compile auto`` (the default of train and evaluate) compiles this method on
    #: CUDA (:func:`gpvae.compiling.compile_enabled`): True only for a method whose compiled
    #: q(z|x), IWAE chunk and training step have run as CUDA graphs on a GPU and were
    #: measured faster there (docs/benchmarks.md, "On a GPU"); the others run eagerly under
    #: auto until such a measurement
    compile_auto_on_cuda: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, image_shape: tuple[int, int, int]):
        super().__init__()
        config.validate()
        self.config = config
        self.image_shape = tuple(image_shape)
        self.arch = architecture_for(image_shape)
        self.latent_dim = config.latent_dim
        self.decoder = make_decoder(config.decoder, self.arch, config.latent_dim)
        self.likelihood = make_likelihood(config.likelihood, config.sigma_x)

    # --- the inference interface -------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> Distribution:
        """q(z|x) for a batch x (B, C, H, W): batch_shape (B,), event_shape (d,)."""
        raise NotImplementedError

    def compute_posterior(self, x: torch.Tensor) -> Distribution:
        """q(z|x) with what a user of it needs computed: the work ``gpvae bench-inference``
        times (paper Tab. 5) and :meth:`posterior_flops` counts.  Default: ``posterior(x)``
        and its mean and standard deviation; a method whose q has no closed-form moments
        (a flow) overrides it, e.g. to draw one z ~ q(z|x) and its log density."""
        q = self.posterior(x)
        q.mean, q.stddev  # noqa: B018 -- materialised, for methods that compute them lazily
        return q

    # --- optional capabilities ---------------------------------------------------------
    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A batch of zero images (batch_size, C, H, W) on the model's device and dtype."""
        device, dtype = model_device_dtype(self)
        return torch.zeros(batch_size, *self.image_shape, device=device, dtype=dtype)

    def posterior_flops(self, batch_size: int = 1) -> int:
        """FLOP floor (2 x multiply-adds) of one :meth:`compute_posterior` for a batch of
        ``batch_size`` images: the ``nn.Linear`` / ``Conv2d`` / ``ConvTranspose2d`` layers of
        this model that it runs (forward hooks, :func:`gpvae.flops.count_flops`, on
        :meth:`example_input`), plus :meth:`extra_posterior_flops`."""
        x = self.example_input(batch_size)
        with torch.inference_mode():
            layers = count_flops(self, lambda: without_grad(self, self.compute_posterior, x))
        return layers + self.extra_posterior_flops(batch_size)

    def extra_posterior_flops(self, batch_size: int = 1) -> int:
        """FLOPs of one q(z|x) for ``batch_size`` images that :meth:`posterior_flops`'s layer
        count does not see: arithmetic outside ``nn.Linear`` / convolution layers (the
        GPVAE's quadratic forms), and backward passes run inside ``posterior`` (forward
        hooks see only forward passes).  Default 0."""
        return 0

    def complete_schedule(self) -> None:
        """Move any schedule this method's training follows to its end (RME: the last
        stage, all M components), so that a freshly built model can be timed as a finished
        run uses it (``gpvae bench-inference`` / ``bench-train``).  Default: nothing."""

    def training_plan_warning(self, epochs: int) -> str | None:
        """A one-line warning when a run of ``epochs`` epochs ends before this method's own
        schedule is complete (e.g. RME's stages: the run can still be resumed to more
        epochs), else None; the trainer prints it before any work.  Default: None."""
        return None

    def uncertainty(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-instance uncertainty of the posterior approximation (Sec. 3.3 step 3, 5.3):
        {"tr_f": Tr V(f(x)|D), "tr_h": Tr V(h(x)|D)}, each (B,).  Only methods whose encoder
        is a random function define it (:meth:`supports_uncertainty`)."""
        raise UnsupportedError(f"{type(self).__name__} has no per-instance uncertainty "
                               "(only the GPVAE defines Tr V(f(x)|D), Tr V(h(x)|D))")

    def fused_encoder(self) -> nn.Module:
        """A standalone module x -> (mean, variance) of a Gaussian q(z|x), each (B, d), for
        :mod:`gpvae.export` (:meth:`supports_fused_encoder`)."""
        raise UnsupportedError(f"{type(self).__name__} has no exportable Gaussian encoder "
                               "x -> (mean, variance)")

    def fuse_trunks(self, enabled: bool = True) -> "LatentVariableModel":
        """Run the method's several encoder networks as one fused network (an execution
        choice: same values and parameters; :meth:`supports_fused_trunks`).  Returns the
        model.  Default: nothing to fuse -- ``enabled`` False is accepted, True refused."""
        if enabled:
            raise UnsupportedError(f"{type(self).__name__} has no encoder networks to fuse "
                                   "(only the GPVAE runs several trunks on x)")
        return self

    def use_dense_quadratic_forms(self, enabled: bool = True) -> "LatentVariableModel":
        """Compute the method's quadratic forms from dense factors instead of its stored
        blocked ones (an execution choice: same values to float rounding, same parameters;
        :meth:`supports_dense_quadratic_forms`).  Returns the model.  Default: no quadratic
        forms -- ``enabled`` False is accepted, True refused."""
        if enabled:
            raise UnsupportedError(f"{type(self).__name__} computes no quadratic forms "
                                   "(only the GPVAE's eq. 13 does)")
        return self

    def epoch_summary(self) -> dict[str, float]:
        """Scalar summaries of this model's current state, {name: value}, that the trainer
        appends to each epoch's metrics row (``metrics.csv``, TensorBoard) after the epoch's
        training steps (e.g. the GPVAE's norms and traces of q(W,U)).  The names are columns
        of the CSV header, so they may depend on the class and its config only, never on the
        weights or the epoch; they must not be those of the trainer's own columns
        (:data:`gpvae.training.METRIC_FIELDS`).  Called without gradients.  Default: {}."""
        return {}

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups for the base learning rate ``lr`` (``--lr``):
        dicts with ``"params"`` (a list) and ``"lr"``, every parameter of the model in
        exactly one group, in an order fixed by the class and its config (checkpointed
        optimizer state is matched to parameters by position).  Used by
        :func:`gpvae.training.model_optimizer`.  Default: one group of all parameters at
        ``lr`` -- also those a schedule holds fixed for now (RME's later components: they
        join training later, and the optimizer skips parameters without a gradient)."""
        return [{"params": list(self.parameters()), "lr": lr}]

    @classmethod
    def supports_uncertainty(cls) -> bool:
        """Whether the class defines :meth:`uncertainty`."""
        return cls.uncertainty is not LatentVariableModel.uncertainty

    @classmethod
    def supports_fused_encoder(cls) -> bool:
        """Whether the class defines :meth:`fused_encoder` (``gpvae export``)."""
        return cls.fused_encoder is not LatentVariableModel.fused_encoder

    @classmethod
    def supports_fused_trunks(cls) -> bool:
        """Whether the class defines :meth:`fuse_trunks` (``--fused-trunks`` in the
        benchmarks)."""
        return cls.fuse_trunks is not LatentVariableModel.fuse_trunks

    @classmethod
    def supports_dense_quadratic_forms(cls) -> bool:
        """Whether the class defines :meth:`use_dense_quadratic_forms` (``--gp-quadratic`` in
        the benchmarks)."""
        return cls.use_dense_quadratic_forms is not LatentVariableModel.use_dense_quadratic_forms

    @classmethod
    def packable(cls) -> bool:
        """Whether runs of this method may be trained packed (:mod:`gpvae.packing`: several
        runs as one ``torch.func.vmap`` computation).  Default True; a method whose training
        step vmap cannot batch (autograd inside it, Python control flow on tensor values,
        ``requires_grad`` switched during training) overrides it to return False.  (Packing
        also probes the step before any work and refuses a method that fails there.)"""
        return True

    def variational_family(self) -> str:
        """The family q(z|x) belongs to, in words (``gpvae gap`` names it next to the
        diagonal Gaussian it fits per instance: when this family is richer, L[q*] may be
        below L[q]).  Default ``"diagonal Gaussian"``; methods with another family
        override it."""
        return "diagonal Gaussian"

    # --- the generative model ----------------------------------------------------------
    def prior(self, like: torch.Tensor) -> Distribution:
        """p(z) = N(0, I) (eq. 1), on the device/dtype of ``like``."""
        zeros = like.new_zeros(self.latent_dim)
        return diagonal_normal(zeros, torch.ones_like(zeros))

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) summed over the last dimension."""
        return self.prior(z).log_prob(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """g_theta(z): (..., d) -> (..., C, H, W) (means, or logits for Bernoulli); float32
        under bfloat16 autocast (:func:`gpvae.precision.upcast`), so log p(x|z) is."""
        return upcast(self.decoder(z))

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z): x (B, C, H, W), z (..., B, d) -> (..., B)."""
        return self.likelihood.log_prob(x, self.decode(z))

    # --- training ----------------------------------------------------------------------
    def training_objective(self, x: torch.Tensor, n_train: int) -> tuple[torch.Tensor, dict]:
        """Per-example objective to *maximise* (B,), and a dict of scalar diagnostics.

        Default: the single-sample reparameterized ELBO of eq. (2), with the KL term in
        closed form when torch.distributions knows it, by Monte Carlo otherwise.
        ``n_train`` (the training-set size N) is unused here; the GPVAE needs it (eq. 15).
        """
        q = self.posterior(x)
        z = q.rsample()
        rec = self.log_likelihood(x, z)
        kl = kl_to_prior(q, self.prior(z), z)
        return rec - kl, {"rec": rec.mean().detach(), "kl": kl.mean().detach()}


def diagonal_normal(mean: torch.Tensor, std: torch.Tensor) -> Independent:
    """N(mean, Diag(std^2)) over the last dimension, the q(z|x) of the diagonal-Gaussian
    methods, without argument checks: the methods build valid parameters by construction,
    and each check is a device-to-host sync (which a CUDA graph cannot capture)."""
    return Independent(Normal(mean, std, validate_args=False), 1, validate_args=False)


def without_grad(model, fn: Callable[[torch.Tensor], T], x: torch.Tensor) -> T:
    """``fn(x)`` -- ``model.posterior`` or a method that runs it -- for work that needs no
    gradients, inside the caller's ``torch.inference_mode`` / ``no_grad``.

    Ordinary models: just ``fn(x)``.  A model with ``posterior_needs_grad``: ``fn(x)`` with
    autograd back on (inference mode off, gradients enabled) and ``x`` a normal tensor (a
    copy, if it was created in inference mode).  Its results may then hold the graph of
    that computation (freed with them); what the caller computes from them in its own
    mode -- samples, densities, numbers it stores -- holds none.
    """
    if not model.posterior_needs_grad:
        return fn(x)
    with torch.inference_mode(False), torch.enable_grad():
        if x.is_inference():
            x = x.clone()
        return fn(x)


def posterior_without_grad(model, x: torch.Tensor) -> Distribution:
    """q(z|x) for work that needs no gradients: :func:`without_grad` of ``model.posterior``."""
    return without_grad(model, model.posterior, x)


def kl_to_prior(q: Distribution, p: Distribution, z: torch.Tensor) -> torch.Tensor:
    """KL(q || p): closed form if registered with torch.distributions, else 1-sample MC at z."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return q.log_prob(z) - p.log_prob(z)


def check_config_type(config, cls) -> None:
    if not isinstance(config, cls):
        raise ConfigError(f"expected a {cls.__name__}, got {type(config).__name__}")
