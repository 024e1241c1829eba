"""MemoryHead: the recall counterpart of `lm_head` — a query hidden state in, one logit per memory out.

logits[b, n] = cos(hidden[b], bank[n]) = normalize(hidden[b]) · bank[n], bank rows already unit-norm. No softmax:
the logits go through the same LogitsProcessorList (temperature / top-k / top-p) as token logits. A bank of
standardised keys (`KeySpace`) gives its `center`/`scale`: the query is standardised the same way first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# CPU inference scoring paths, chosen by size (measured on the 2-core dev machine, OMP_WAIT_POLICY=PASSIVE, torch 2
# threads, one query, calls spaced by other torch work as in decoding):
#   queries x N x H <= SMALL_PRODUCT: numpy. OpenBLAS runs such small products on one thread (no thread wake-up):
#     1k x 128 took ~6-16 us against ~13-37 us for torch's matmul, whose fixed cost dominates there.
#   N x H >= NUMPY_BLAS_MIN_ELEMENTS: numpy with every BLAS thread, which pays once a product is long enough to
#     amortise waking them (1.6-2x over one thread for 100k x 1024..4096 on an idle machine).
#   in between: torch's matmul. Numpy's 2 BLAS threads cost a wake-up per call there (10k x 128: 1-1.8 ms, up to
#     7-12 ms while other jobs ran, about as long as 100k) against 0.25-0.5 ms for torch, linear in N.
SMALL_PRODUCT = 1 << 18
NUMPY_BLAS_MIN_ELEMENTS = 1 << 25


class MemoryHead(nn.Module):
    """Cosine-similarity head over a fixed bank of unit vectors `[N, H]` (kept float32 and contiguous)."""

    def __init__(self, vectors: torch.Tensor, center: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        super().__init__()
        if vectors.ndim != 2:
            raise ValueError(f"MemoryHead expects vectors [N, H], got {tuple(vectors.shape)}")
        # Non-persistent: the bank is saved as its own artifact, never inside a model checkpoint.
        # `.to(float32).contiguous()` is a no-op for a bank's CPU tensor, so the head shares its storage.
        self.register_buffer("vectors", vectors.detach().to(torch.float32).contiguous(), persistent=False)
        self.standardised = center is not None
        if self.standardised:
            self.register_buffer("center", center.detach().to(torch.float32), persistent=False)
            self.register_buffer("scale", scale.detach().to(torch.float32), persistent=False)

    @property
    def num_memories(self) -> int:
        return self.vectors.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.vectors.shape[1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [..., H]` (any dtype) -> cosine logits `[..., N]` float32."""
        query = hidden.to(self.vectors.dtype)
        if self.standardised:
            query = (query - self.center) / self.scale
        query = F.normalize(query, dim=-1)
        flat = query.reshape(-1, query.shape[-1])
        cpu_inference = flat.device.type == "cpu" and not flat.requires_grad
        bank_elements = self.vectors.numel()
        if cpu_inference and (flat.shape[0] * bank_elements <= SMALL_PRODUCT
                              or bank_elements >= NUMPY_BLAS_MIN_ELEMENTS):
            scores = torch.from_numpy(flat.numpy() @ self.vectors.numpy().T)  # shared buffers, no copy
        else:
            scores = flat @ self.vectors.T
        return scores.reshape(*query.shape[:-1], self.num_memories)

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k: `(scores, indices)`, each `[..., min(k, N)]`, best first."""
        return torch.topk(self(hidden), min(k, self.num_memories), dim=-1)

    def extra_repr(self) -> str:
        return f"num_memories={self.num_memories}, hidden_size={self.hidden_size}"
