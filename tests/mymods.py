"""A researcher's own models and datasets, as tests/test_own_model.py imports them
(``--model mymods:net --dataset mymods:data``): nothing here knows about landscape."""

import torch
from torch import nn
from torch.utils.data import Dataset


def net(hidden: int = 16, features: int = 8, classes: int = 3) -> nn.Module:
    """A small MLP classifier (deterministic: no dropout, no BatchNorm)."""
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def data(n_train: int = 96, n_test: int = 48, seed: int = 0, features: int = 8, classes: int = 3):
    """Gaussian blobs as ``(inputs, targets)`` tensors; ``seed`` is the data's own (a name
    the trainer also uses: it must reach this function unchanged)."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(classes, features, generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % classes
        return centres[y] + torch.randn(n, features, generator=g), y

    return split(n_train), split(n_test)


class DictNet(nn.Module):
    """Takes keyword inputs: ``model(x=..., mask=...)``."""

    def __init__(self, features: int = 8, classes: int = 3):
        super().__init__()
        self.body = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.body(x * mask)


class DictSamples(Dataset):
    """A map-style Dataset of ``({"x": ..., "mask": ...}, label)`` samples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int):
        self.x, self.y = x, y
        g = torch.Generator().manual_seed(seed)
        self.mask = (torch.rand(x.shape, generator=g) > 0.2).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"x": self.x[i], "mask": self.mask[i]}, int(self.y[i])


def dict_data(n_train: int = 64, n_test: int = 32):
    (tx, ty), (vx, vy) = data(n_train, n_test)
    return DictSamples(tx, ty, 1), DictSamples(vx, vy, 2)


def regressor(features: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, 1))


def regression(n_train: int = 64, n_test: int = 32, features: int = 4):
    """``y = sin(x . w)`` plus noise, targets of shape ``(N,)`` (the model outputs ``(N, 1)``)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(features, generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, features, generator=g)
        return x, torch.sin(x @ w) + 0.1 * torch.randn(n, generator=g)

    return split(n_train), split(n_test)


class TokenNet(nn.Module):
    """Per-token logits ``(B, T, C)`` from token ids ``(B, T)``."""

    def __init__(self, vocab: int = 6, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def tokens(n_train: int = 64, n_test: int = 32, length: int = 6, vocab: int = 6, pad: int = -1):
    """Predict ``(token + 1) % vocab`` at each position; the last two positions of every
    other sequence are padding, labelled ``pad`` (to be ignored)."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, vocab, (n, length), generator=g)
        y = (x + 1) % vocab
        y[::2, -2:] = pad
        return x, y

    return split(n_train), split(n_test)


NOT_CALLABLE = 3


def not_a_module():
    return 42


def bad_data():
    return torch.zeros(4, 2)


def broken():
    raise RuntimeError("a bug in the researcher's code")


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(2), 0


def stream_data():
    return _Stream(), _Stream()


def triples_data():
    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    return torch.utils.data.TensorDataset(x, x, y), torch.utils.data.TensorDataset(x, x, y)


def ragged_data():
    return (torch.zeros(4, 2), torch.zeros(3)), (torch.zeros(4, 2), torch.zeros(4))
