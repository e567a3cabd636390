"""gpvae: VAEs whose amortized encoder is a Bayesian random function (Kim & Pavlovic, ICML 2021).

Python API::

    from gpvae.data import load_splits
    from gpvae.models import build_model
    from gpvae.evaluation import estimate

    splits = load_splits("mnist", limit_train=10000)
    model = build_model("vae", splits.shape, latent_dim=10)
    q = model.posterior(splits.test.batch(slice(0, 8)))   # a torch.distributions object
    print(estimate(model, splits.test, samples=100).summary())
"""
__version__ = "0.1.0"
