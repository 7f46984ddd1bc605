"""The baseline: FIERCE's feature entropy computed the way the paper's public code computes it.

Written here from a description of that code, not copied from it:

1. the B x C x K similarity tensor with ONE einsum of the features (B, D) and the dictionary
   (C, D, K); for cosine, divided by the outer product of the feature norms and the atom norms;
   for the age script's distance (D = 1, bins at fixed centres), -(f - bin)^2;
2. `torch.nn.functional.gumbel_softmax(sim, tau=1, hard=True)` over the K bins (a hard one-hot
   forward, the soft sample's gradient: straight-through);
3. the histogram: the sum over the batch divided by B;
4. the entropy in bits, -(p * log2(p + 1e-21)).sum over K, averaged over the C heads.

Every B x C x K intermediate (similarities, norms' outer product, noise, soft and hard samples)
is materialised, which is the memory and time this project's fused backends remove.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paper_similarity(features: torch.Tensor, dictionary: torch.Tensor,
                     similarity: str = "cosine") -> torch.Tensor:
    """(B, C, K) similarities, materialised as the paper's code does."""
    if similarity == "distance":
        # The age script: logits -(f - bin)^2, broadcast over (B, C, D, K) then summed over D.
        return -((features[:, None, :, None] - dictionary[None]) ** 2).sum(dim=2)
    sim = torch.einsum("bd,cdk->bck", features, dictionary)
    if similarity == "cosine":
        norms = torch.einsum("b,ck->bck", features.norm(dim=1), dictionary.norm(dim=1))
        sim = sim / norms
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'dot', 'cosine' or 'distance', got {similarity!r}")
    return sim


def paper_histogram(features: torch.Tensor, dictionary: torch.Tensor,
                    similarity: str = "cosine", tau: float = 1.0) -> torch.Tensor:
    """(C, K) hard Gumbel-softmax histogram with the straight-through gradient."""
    sim = paper_similarity(features, dictionary, similarity)
    assignments = F.gumbel_softmax(sim, tau=tau, hard=True, dim=-1)
    return assignments.sum(dim=0) / features.shape[0]


def paper_entropy(features: torch.Tensor, dictionary: torch.Tensor,
                  similarity: str = "cosine", tau: float = 1.0) -> torch.Tensor:
    """The feature entropy in bits, averaged over heads (a 0-d tensor)."""
    p = paper_histogram(features, dictionary, similarity, tau)
    return (-(p * torch.log2(p + 1e-21)).sum(dim=-1)).mean()
