"""nn.Module forms: `FeatureEntropy` (the regularizer) and `FIERCELoss` (criterion - lam * H)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._arguments import as_int, as_real
from .dictionary import SIMILARITIES, uniform_dictionary
from .functional import (DEFAULT_BINS, DEFAULT_HEADS, ESTIMATORS, _check_backend, _check_choice,
                         _check_dictionary_shape, _check_dictionary_size, _check_tau,
                         entropy)


class FeatureEntropy(nn.Module):
    """Feature entropy in bits of a batch of `dim`-dimensional features.

    The dictionary (heads, dim, bins) is a buffer: saved in the state_dict, moved by `.to()`,
    never trained. By default it is `uniform_dictionary(dim, bins, heads, seed=0)` (bins 100 and
    heads 1 unless given); a given dictionary fixes bins and heads (leave them out, or they must
    match it). Each forward draws new Gumbel noise from torch's default generator (pass `seed=`
    to fix it).

    `sync=True` (or `process_group=`): in training mode, under torch.distributed (e.g. with DDP),
    the entropy is that of the histogram of the global batch across the group, with
    SyncBatchNorm-style gradients, so a DDP step equals a single-process step on the concatenated
    batch; see `fierce_ext.distributed`. In eval mode (`.eval()`), as SyncBatchNorm, each process
    computes its own batch's entropy: no collective, so evaluating on one rank cannot hang the
    others. Without an initialised process group it is single-process.
    Mixed precision: bf16/fp16 features (torch.autocast) are fine; the result is float32.

    `reset_parameters()` redraws the default dictionary (e.g. after building the module on the
    meta device and `to_empty`); a module given its dictionary cannot redraw it and raises.
    """

    dictionary: Tensor

    def __init__(self, dim: int, bins: int | None = None, heads: int | None = None,
                 similarity: str = "cosine", estimator: str = "gumbel_hard", tau: float = 1.0,
                 dictionary: Tensor | None = None, backend: str = "auto", sync: bool = False,
                 process_group=None):
        super().__init__()
        _check_choice("similarity", similarity, SIMILARITIES)
        _check_choice("estimator", estimator, ESTIMATORS)
        self.tau = _check_tau(tau)
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
        self.sync, self.process_group = sync, process_group
        _check_backend(backend)
        dim = as_int("dim", dim)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        given = dictionary
        if dictionary is None:
            dictionary = uniform_dictionary(dim, DEFAULT_BINS if bins is None else bins,
                                            DEFAULT_HEADS if heads is None else heads, seed=0)
        else:
            # What forward would refuse, refused now (with forward's messages). A dictionary
            # that requires grad is fine here: the buffer is a detached copy.
            _check_dictionary_shape(dictionary, dim, "dim")
            _check_dictionary_size(dictionary, bins, heads)
        self.register_buffer("dictionary", dictionary.detach().clone())
        self.similarity, self.estimator, self.backend = similarity, estimator, backend
        self._default_dictionary = given is None

    def reset_parameters(self) -> None:
        """Redraws the default dictionary, `uniform_dictionary(dim, bins, heads, seed=0)` as the
        constructor drew it, into the buffer (its device and dtype kept): the module's one
        state, uninitialised after `to_empty`. A module built with a given dictionary raises: reload that one instead
        (`load_state_dict`, or copy it into `.dictionary`)."""
        if not self._default_dictionary:
            raise RuntimeError("FeatureEntropy was given its dictionary, which reset_parameters "
                               "cannot redraw; load it again (load_state_dict, or "
                               "module.dictionary.copy_(...))")
        heads, dim, bins = self.dictionary.shape
        with torch.no_grad():
            self.dictionary.copy_(uniform_dictionary(dim, bins, heads, seed=0, device="cpu"))

    @property
    def heads(self) -> int:
        return self.dictionary.shape[0]

    @property
    def bins(self) -> int:
        return self.dictionary.shape[2]

    @property
    def max_entropy(self) -> float:
        """log2(bins): the entropy of a uniform histogram, the largest possible value."""
        return math.log2(self.bins)

    def forward(self, features: Tensor, seed: int | None = None,
                reduction: str = "mean") -> Tensor:
        synchronised = self.training and (self.sync or self.process_group is not None)
        return entropy(features, self.dictionary, similarity=self.similarity,
                       estimator=self.estimator, tau=self.tau, seed=seed, reduction=reduction,
                       backend=self.backend, sync=synchronised,
                       process_group=self.process_group if synchronised else None)

    def extra_repr(self) -> str:
        heads, dim, bins = self.dictionary.shape
        return (f"dim={dim}, bins={bins}, heads={heads}, similarity={self.similarity!r}, "
                f"estimator={self.estimator!r}, tau={self.tau}, backend={self.backend!r}"
                + (", sync=True" if self.sync or self.process_group is not None else ""))


class FIERCELoss(nn.Module):
    """criterion(logits, target) - lam * H(features): cross-entropy by default.

    forward(logits, target, features, seed=None) returns the loss; the last entropy is kept in
    `self.last_entropy` (detached) for logging; under CUDA graphs (torch.compile's
    "reduce-overhead") the next replay overwrites it, so read or clone it before the next step.
    Keyword arguments go to `FeatureEntropy` (bins, heads, similarity, estimator, tau,
    dictionary, backend, sync, process_group).
    With `sync=True` under DDP, the entropy term is that of the global batch (see
    `fierce_ext.distributed`); the criterion stays per rank, as usual with DDP.
    """

    def __init__(self, dim: int, lam: float = 1.0, criterion: nn.Module | None = None,
                 **feature_entropy_kwargs):
        super().__init__()
        self.lam = as_real("lam", lam)
        if not math.isfinite(self.lam):
            raise ValueError(f"lam must be a finite real number, got {lam!r}")
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.feature_entropy = FeatureEntropy(dim, **feature_entropy_kwargs)
        self.last_entropy: Tensor | None = None

    def forward(self, logits: Tensor, target: Tensor, features: Tensor,
                seed: int | None = None) -> Tensor:
        h = self.feature_entropy(features, seed=seed)
        self.last_entropy = h.detach()
        return self.criterion(logits, target) - self.lam * h

    def extra_repr(self) -> str:
        return f"lam={self.lam}"
