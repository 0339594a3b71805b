"""The training loop (:mod:`flagscale.train.trainer`), its callbacks
(:mod:`flagscale.train.callbacks`), and the set-up shared with resharding
(:mod:`flagscale.train.setup`)."""
