"""RME(M): recursive mixture estimation (Kim & Pavlovic, NeurIPS 2020), a baseline of the
GPVAE paper: a mixture encoder grown one amortized component at a time by a boosting step.

What is verified (the abstract and reviews; the full text could not be read here, and there
is no public code): a separate amortized encoder per component; components added one at a
time, each new one trained to raise the ELBO while being as different as possible from the
current mixture (a functional-gradient / boosting step); one forward pass at test time.
Everything below that is not in that sentence is this module's derivation
(../shared/design/baselines.md, "RME"), stated exactly.

The mixture.  With q_m(z|x) = N(mu_m(x), Diag(sigma_m(x)^2)), each from its own Tab. 6-8
encoder (trunk + head, exactly the VAE's), and eps_m(x) = sigmoid(w_m . stopgrad(h_m(x)) + b_m)
with h_m the trunk features of component m's encoder (eps_1 = 1),

    Q_1 = q_1,    Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m    (m = 2..M),

so Q_M = sum_m alpha_m q_m with alpha_m = eps_m prod_{j>m} (1 - eps_j), a proper simplex;
log alpha is computed in log space (logsigmoid) by :func:`mixture_log_weights`.  The eps head
reads the features with the gradient stopped so that the trunk of component m is trained by
component m's own criterion only (below).  Each eps head starts at weight 0 and bias
logit(1/m): a new stage starts from the uniform mixture alpha = 1/m (the 2/(t+2)-type
default step of boosting VI, here 1/m).

Why separate encoders (not a shared trunk with heads, as :mod:`gpvae.models.me`): the
abstract says "separate amortized encoders", and freezing the earlier components would
otherwise freeze a shared trunk as well (the new component could then only add a head on old
features).  The price: q(z|x) costs up to M VAE encoder passes at test time.

Stages.  Stage 1 is the VAE: q_1 and the decoder on the VAE's ELBO (the base class's, bit for
bit).  Stage s = 2..M trains, per image,

    J_q = ELBO(q_s) + lambda * KL(q_s || stopgrad Q_s)        -> q_s's encoder only
    J_Q = ELBO(Q_s), the stratified mixture ELBO of ME           -> eps_s, the decoder, the
          (sum_m alpha_m E_{q_m}[log p(x,z) - log Q_s(z)])          likelihood's sigma_x
                                                                    (and the earlier
                                                                    components if unfrozen)

and the model returns J_q + J_Q, with the gradients routed: in J_Q component s's mean and
standard deviation enter with their gradient stopped; in J_q the decoder and likelihood
parameters are held fixed (their ``requires_grad`` switched off for that decoder pass) and
every parameter of the density Q_s (eps_s and q_s's own mean and std included) is stopped:
only the sample z = mu_s + sigma_s * e ~ q_s and the log q_s(z) term carry q_s's gradient.
ELBO(q_s) uses the closed-form KL to the prior; the KL to the mixture is the one-sample
estimate log q_s(z) - log Q_s(z), z ~ q_s (reparameterized).

Why this criterion, and why Q_s and not Q_{s-1}.  ELBO(q) + lambda KL(q || Q) = E_q[log p(x,z)]
- lambda E_q[log Q(z)] + (1 - lambda) H(q): "raise the ELBO and be as different from the
mixture as possible", the abstract's criterion.  Measured against the *previous* mixture
Q_{s-1} (an earlier version of this module, and the design notes) it is unbounded above:
where Q_{s-1} is narrower than the prior, -log Q_{s-1}(z) grows faster in |z| than
log p(x, z) falls (with a decoder that saturates, not at all), so q_s is rewarded for running
away -- on real MNIST RME(2) diverged in its second stage (objective ~1e17, then an inf
gradient).  Measured against the *new* mixture Q_s = (1 - eps_s) Q_{s-1} + eps_s q_s, which
contains q_s, it is bounded: Q_s(z) >= eps_s q_s(z) pointwise, so KL(q_s || Q_s) <= -log eps_s
and J_q <= log p(x) - lambda log eps_s (tested: gradient ascent on J_q with a constant decoder
and a narrow Q_1 stays below that bound; with Q_{s-1} it runs away).  At lambda = 1 it is
E_q[log p(x,z) - log Q_s(z)], whose path gradient in q_s's parameters is, in expectation,
(1 / alpha_s) times the gradient of the mixture's own ELBO(Q_s) with the other components
fixed (the terms through Q_s's explicit dependence on q_s integrate to d/dtheta of
integral Q_s = 0): the greedy step of variational boosting (Miller, Foti & Adams 2017),
the functional-gradient direction of Guo et al. 2016 and Locatello et al. 2018 evaluated at
the updated mixture, with each image weighted equally rather than by alpha_s (boosting: the
new component is trained to help wherever it is used).  Point masses are not rewarded either:
as q_s narrows, -log Q_s(z) at its samples falls to -log eps_s q_s(z).  So 0 <= lambda <= 1
(default 1): lambda = 0 trains q_s as a plain VAE encoder, lambda = 1 on the mixture's
criterion.  The mixing weight eps_s (the step size) is fitted on the mixture's own ELBO, as a
line search would.

Warm start.  With ``rme_init = "copy"`` (default) component s starts its stage as a copy of
component s - 1 (its encoder's parameters; eps_s keeps its head at logit(1/s)), so
Q_s = Q_{s-1} when the stage begins and the mixture does not first get worse, as it does
when a randomly initialized component takes weight 1/s (the common warm start of boosting
VI: the new component is initialized near the current fit).  ``fresh`` keeps the
component's own random initialization.

The schedule inside the plain training loop.  Two persistent buffers (saved in every
checkpoint, so ``--resume`` is exact): ``rme_seen``, the training images seen, advanced only
by :meth:`RME.training_objective` in training mode (validation, ``estimate`` and
``posterior`` never move it), and ``rme_stage`` = min(M, 1 + floor(seen / (E N))), E =
``rme_epochs_per_stage`` and N the training-set size the loop passes (so a stage is E epochs
exactly).  ``posterior`` returns Q_s for the current stage s: a run stopped early is the
mixture it has trained, never an untrained component.  Components after s, and (with
``rme_earlier=frozen``, the default) those before it, get ``requires_grad = False`` while
stage s trains: Adam skips them (their gradients stay ``None``), so frozen is frozen.

Evaluation.  q(z|x) = Q_s, one forward pass through s encoders: a
:class:`~gpvae.models.me.GaussianMixture` (m ~ alpha, z ~ q_m, full mixture density for the
IWAE weights); at stage 1 (and always for M = 1) the VAE's ``Independent(Normal)``.  RME(1)
has no buffers and no eps heads: its parameters, q(z|x), objective and IWAE are the VAE's,
bit for bit.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.distributions import Independent, Normal
from torch.nn import functional as F

from ..errors import ConfigError
from ..networks import GaussianEncoder
from ..precision import upcast
from .base import (LatentVariableModel, ModelConfig, check_config_type, diagonal_normal,
                   kl_to_prior)
from .me import GaussianMixture

EARLIER_CHOICES = ("frozen", "trained")
INIT_CHOICES = ("copy", "fresh")


@dataclass
class RMEConfig(ModelConfig):
    """Options of RME(M) beyond the generative model's."""

    rme_components: int = field(default=2, metadata={
        "help": "number M of components of the recursive mixture encoder RME(M), added one "
                "per stage (1 is the VAE)"})
    rme_lambda: float = field(default=1.0, metadata={
        "help": "weight lambda of KL(q_new || mixture with q_new) in the new component's "
                "criterion ELBO(q_new) + lambda KL, 0 <= lambda <= 1 (0: a plain VAE "
                "encoder; 1: the mixture's own ELBO gradient, variational boosting)"})
    rme_epochs_per_stage: float = field(default=5.0, metadata={
        "help": "training epochs per stage (stage m trains component m); may be fractional; "
                "a run needs more than (M - 1) x this many epochs to reach all M stages"})
    rme_init: str = field(default="copy", metadata={
        "help": "how a new component's encoder starts its stage: copy (of the previous "
                "component's, so the mixture is unchanged at the stage's start) or fresh (its "
                "own random initialization)", "choices": INIT_CHOICES})
    rme_earlier: str = field(default="frozen", metadata={
        "help": "the components of earlier stages while a new one trains: frozen, or trained "
                "on the mixture's ELBO", "choices": EARLIER_CHOICES})

    #: the field a size in the paper's notation sets (``rme:3`` -> rme_components = 3)
    size_option: ClassVar[str | None] = "rme_components"

    def validate(self) -> None:
        super().validate()
        m = self.rme_components
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ConfigError(f"--rme-components must be a positive integer, got {m!r}")
        lam = self.rme_lambda
        if (isinstance(lam, bool) or not isinstance(lam, (int, float))
                or not 0 <= lam <= 1):
            raise ConfigError(f"--rme-lambda must be a number in [0, 1], got {lam!r}")
        e = self.rme_epochs_per_stage
        if (isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e)
                or e <= 0):
            raise ConfigError(f"--rme-epochs-per-stage must be a positive number, got {e!r}")
        if self.rme_init not in INIT_CHOICES:
            raise ConfigError(f"--rme-init must be one of {', '.join(INIT_CHOICES)}, "
                              f"got {self.rme_init!r}")
        if self.rme_earlier not in EARLIER_CHOICES:
            raise ConfigError(f"--rme-earlier must be one of {', '.join(EARLIER_CHOICES)}, "
                              f"got {self.rme_earlier!r}")


def mixture_log_weights(eps_logits: torch.Tensor) -> torch.Tensor:
    """log alpha (..., K) from the logits a_m of eps_m = sigmoid(a_m), m = 2..K (..., K - 1):
    log alpha_m = log eps_m + sum_{j>m} log(1 - eps_j), eps_1 = 1."""
    zero = eps_logits.new_zeros(*eps_logits.shape[:-1], 1)
    log_eps = torch.cat([zero, F.logsigmoid(eps_logits)], -1)
    log_keep = F.logsigmoid(-eps_logits)  # log(1 - eps_j), j = 2..K
    tail = log_keep.flip(-1).cumsum(-1).flip(-1)  # sum_{j >= i} for i = 2..K
    return log_eps + torch.cat([tail, zero], -1)


class RME(LatentVariableModel):
    """RME(M): M separate Gaussian encoders, sigmoid step heads eps_m, grown stage by stage."""

    config_class = RMEConfig
    posterior_needs_grad: ClassVar[bool] = False

    def __init__(self, config: RMEConfig, image_shape):
        check_config_type(config, RMEConfig)
        super().__init__(config, image_shape)
        d, h, m = config.latent_dim, self.arch.hidden, config.rme_components
        # component 1 = the VAE's encoder, created first as in the VAE
        self.encoder = GaussianEncoder(self.arch, d)
        self.components = m
        if m > 1:
            self.extra_encoders = nn.ModuleList(GaussianEncoder(self.arch, d)
                                                for _ in range(m - 1))
            self.eps_heads = nn.ModuleList(nn.Linear(h, 1) for _ in range(m - 1))
            with torch.no_grad():
                for j, head in enumerate(self.eps_heads, start=2):
                    head.weight.zero_()
                    head.bias.fill_(-math.log(j - 1))  # logit(1/j): alpha uniform at start
            self.register_buffer("rme_seen", torch.zeros((), dtype=torch.long))
            self.register_buffer("rme_stage", torch.ones((), dtype=torch.long))

    # --- the stage schedule --------------------------------------------------------------
    @property
    def stage(self) -> int:
        """The current stage s (the number of components in q(z|x)); 1 for M = 1."""
        return 1 if self.components == 1 else int(self.rme_stage)

    def complete_schedule(self) -> None:
        """The last stage: q(z|x) is the full M-component mixture (for timing)."""
        if self.components > 1:
            with torch.no_grad():
                self.rme_stage.fill_(self.components)

    def training_plan_warning(self, epochs: int) -> str | None:
        """RME(M) needs more than (M - 1) E epochs to train its last component; a shorter
        run (or a first piece of a run resumed later) ends as a mixture of fewer."""
        need = (self.components - 1) * self.config.rme_epochs_per_stage
        if epochs > need:
            return None
        return (f"rme:{self.components} with --rme-epochs-per-stage "
                f"{self.config.rme_epochs_per_stage:g} starts its last stage after {need:g} "
                f"epochs: --epochs {epochs} ends before all {self.components} components are "
                "trained (resume with more epochs, or lower --rme-epochs-per-stage)")

    def _advance(self, batch: int, n_train: int) -> None:
        with torch.no_grad():
            per_stage = self.config.rme_epochs_per_stage * n_train
            stage = min(self.components, 1 + int(int(self.rme_seen) // per_stage))
            for new in range(int(self.rme_stage) + 1, stage + 1):
                self._start_component(new)
            self.rme_stage.fill_(max(stage, int(self.rme_stage)))
            self.rme_seen.add_(batch)

    def _start_component(self, s: int) -> None:
        """Stage s begins: with ``rme_init == "copy"`` component s's encoder starts as a copy
        of component s - 1's (so Q_s = Q_{s-1} at the start of the stage)."""
        if self.config.rme_init == "copy":
            encoders = self._encoders()
            encoders[s - 1].load_state_dict(encoders[s - 2].state_dict())

    def _encoders(self) -> list[GaussianEncoder]:
        return [self.encoder, *(self.extra_encoders if self.components > 1 else [])]

    def _set_trainable(self, stage: int) -> None:
        """requires_grad: component ``stage`` and its eps head on; later ones off; earlier
        ones off if ``rme_earlier == 'frozen'``."""
        joint = self.config.rme_earlier == "trained"
        for j, enc in enumerate(self._encoders(), start=1):
            on = j == stage or (j < stage and joint)
            enc.requires_grad_(on)
            if j >= 2:
                self.eps_heads[j - 2].requires_grad_(on)

    @contextlib.contextmanager
    def _generative_fixed(self):
        """The decoder's and likelihood's parameters without gradient, for one pass."""
        params = [p for mod in (self.decoder, self.likelihood) for p in mod.parameters()
                  if p.requires_grad]
        try:
            for p in params:
                p.requires_grad_(False)
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # --- q(z|x) -----------------------------------------------------------------------------
    def parts(self, x: torch.Tensor, k: int):
        """(mean (B, k, d), std (B, k, d), eps logits (B, k - 1)) of the first k components."""
        means, stds, logits = [], [], []
        for j, enc in enumerate(self._encoders()[:k]):
            features = enc.trunk(x)
            mean, std = enc.split_head(enc.head(features))
            means.append(mean)
            stds.append(std)
            if j >= 1:
                logits.append(self.eps_heads[j - 1](features.detach()).squeeze(-1))
        eps = upcast(torch.stack(logits, -1)) if logits else means[0].new_zeros(x.shape[0], 0)
        return torch.stack(means, -2), torch.stack(stds, -2), eps

    def variational_family(self) -> str:
        return "mixture of diagonal Gaussians" if self.stage > 1 else "diagonal Gaussian"

    @classmethod
    def packable(cls) -> bool:
        """No: the stage schedule reads its counters (``.item()``) inside the training step,
        which ``torch.func.vmap`` cannot batch."""
        return False

    def posterior(self, x: torch.Tensor):
        """Q_s(z|x) for the current stage s: a :class:`GaussianMixture`; for s = 1 the VAE's
        ``Independent(Normal)``."""
        k = self.stage
        if k == 1:
            mean, std = self.encoder(x)
            return diagonal_normal(mean, std)
        mean, std, eps = self.parts(x, k)
        return GaussianMixture(mixture_log_weights(eps), mean, std, validate_args=False)

    # --- training -----------------------------------------------------------------------
    def training_objective(self, x: torch.Tensor, n_train: int) -> tuple[torch.Tensor, dict]:
        """Stage 1: the VAE's ELBO.  Stage s >= 2: J_Q + J_q with routed gradients (module
        docstring).  In training mode it first advances the schedule by this batch.

        Diagnostics: ``rec`` and ``kl`` of the mixture's stratified ELBO (rec - kl =
        ELBO(Q_s)), ``stage``, and at s >= 2 ``kl_new`` = KL(q_s || Q_s) (one sample) and
        ``elbo_new`` = ELBO(q_s), batch means.
        """
        if self.components == 1:
            return super().training_objective(x, n_train)
        if self.training:
            self._advance(x.shape[0], n_train)
        s = self.stage
        self._set_trainable(s)
        if s == 1:
            objective, diag = super().training_objective(x, n_train)
            return objective, {**diag, "stage": torch.tensor(1.0)}
        j_mix, j_new, diag = self.stage_objectives(x)
        return j_mix + j_new, diag

    def stage_objectives(self, x: torch.Tensor):
        """(J_Q, J_q, diagnostics) of the current stage s >= 2, each (B,)."""
        s, lam = self.stage, float(self.config.rme_lambda)
        mean, std, eps = self.parts(x, s)
        # J_Q = ELBO(Q_s), stratified, with component s's parameters stopped
        mean_q = torch.cat([mean[:, :-1], mean[:, -1:].detach()], 1)
        std_q = torch.cat([std[:, :-1], std[:, -1:].detach()], 1)
        mixture = GaussianMixture(mixture_log_weights(eps), mean_q, std_q)
        z = mixture.component_rsample()  # (s, B, d)
        alpha = mixture.weights.transpose(0, 1)  # (s, B)
        rec = (alpha * self.log_likelihood(x, z)).sum(0)
        kl = (alpha * (mixture.log_prob(z) - self.log_prior(z))).sum(0)
        j_mix = rec - kl
        # J_q = ELBO(q_s) + lambda KL(q_s || stopgrad Q_s), the generative model fixed;
        # Q_s contains q_s, so KL(q_s || Q_s) <= -log eps_s: bounded (module docstring)
        q_new = Independent(Normal(mean[:, -1], std[:, -1]), 1)
        z_new = q_new.rsample()
        current = GaussianMixture(mixture_log_weights(eps).detach(), mean.detach(),
                                  std.detach())
        with self._generative_fixed():
            rec_new = self.log_likelihood(x, z_new)
        elbo_new = rec_new - kl_to_prior(q_new, self.prior(z_new), z_new)
        kl_new = q_new.log_prob(z_new) - current.log_prob(z_new)
        j_new = elbo_new + lam * kl_new
        diag = {"rec": rec.mean().detach(), "kl": kl.mean().detach(),
                "stage": torch.tensor(float(s)), "kl_new": kl_new.mean().detach(),
                "elbo_new": elbo_new.mean().detach()}
        return j_mix, j_new, diag

    def extra_posterior_flops(self, batch_size: int = 1) -> int:
        """FLOPs of q(z|x) = Q_s outside the Linear/Conv layers: the log-space weights (about
        3 per component) and the mixture's mean and law-of-total-variance standard
        deviation (9sd + 2d, as :meth:`gpvae.models.me.ME.extra_posterior_flops`).  Zero at
        stage 1 (the VAE)."""
        k, d = self.stage, self.latent_dim
        if k == 1:
            return 0
        return batch_size * (3 * k + 9 * k * d + 2 * d)


__all__ = ["RME", "RMEConfig", "mixture_log_weights"]
