"""The command layer: one module per ``python -m landscape <command>``.

Each holds its config dataclass (mirrored 1:1 by argparse and TOML through
:mod:`landscape.cli`), loads checkpoints and data, sets up the process group under
``torchrun``, writes ``--out`` through :mod:`landscape.store`, prints, and draws with
``--plot``. The library below it (measures, trainer, store, plot) knows nothing of flags,
files given on a command line, or ranks as processes.
"""

COMMANDS = {
    "demo": "compare optimizers on the embedded digits dataset",
    "train": "train a model; log every epoch to HDF5, checkpoint",
    "sharpness": "m-sharpness or adaptive sharpness of a checkpoint",
    "hessian": "Hessian eigenvalues, trace and density of a checkpoint",
    "surface": "1D/2D loss surface of a checkpoint (random, PCA, interp)",
    "plot": "figures from run, surface and measurement files",
    "study": "many runs from one spec: train them (run), statistics over seeds (report)",
}
