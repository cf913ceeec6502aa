"""tmu-serve: serve an image classifier and make it forget training data with Twin Machine Unlearning.

The package is a plain library. It never imports TorchServe's ``ts`` package nor ``click``; the CLI lives
in :mod:`tmu_core.cli` and the TorchServe handler in the top-level ``handler`` package.
"""

__version__ = "0.1.0"
