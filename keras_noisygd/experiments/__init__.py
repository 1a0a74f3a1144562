"""Reproducing the paper's comparisons: datasets, models, one training loop, reports and the CLI.

Needs the `examples` extra (`pip install keras_noisygd[examples]`): mnist1d,
scikit-learn and matplotlib. Run `python -m keras_noisygd --help`.
"""
