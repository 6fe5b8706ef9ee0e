"""What every task shares, one room per concern:

- ``errors``: ``UserError``, the one exception for a problem with the user's input.
- ``config``: checks on the composed config and the command line, mode selection.
- ``checkpoints``: safe checkpoint loading, weights-only init, resume, RNG state.
- ``optim``: optimizer + learning-rate schedule from ``_partial_`` configs.
- ``reporting``: metric history, curves, ``results.json`` and the closing summary.
- ``module``: ``TaskModule``, the LightningModule base of every task.
- ``training``: ``Task`` (what a task file provides) and the one training skeleton.
- ``entry``: the command line (``python -m tasks.<name>``) and its error boundary.
"""
