"""The embedding model: one vector per user and per item, scored by (cosine / τ) or plain dot product.

Cosine scores with a temperature make the softmax sharpness a setting rather than something the
embedding norms drift into, and they need no weight decay. Side features would enter as extra
item/user towers summed into these vectors; they are not built yet.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core box spinning threads starve each
# other and a training step got 7x slower (measured); set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class EmbeddingModel(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int = 64, *, cosine: bool = True,
                 temperature: float = 0.2, init_std: float = 0.1, sparse: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        # sparse gradients: a step touches a few thousand rows, not the whole table (lazy Adam, trainer/optim.py)
        self.user = nn.Embedding(n_users, dim, sparse=sparse)
        self.item = nn.Embedding(n_items, dim, sparse=sparse)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        self.cosine = cosine
        self.temperature = temperature

    def users(self, rows: torch.Tensor) -> torch.Tensor:
        """User query vectors, already divided by τ, so that users(u) @ items(i).T are logits."""
        v = self.user(rows)
        if self.cosine:
            v = nn.functional.normalize(v, dim=-1) / self.temperature
        return v

    def items(self, rows: torch.Tensor) -> torch.Tensor:
        v = self.item(rows)
        return nn.functional.normalize(v, dim=-1) if self.cosine else v

    def forward(self, user_rows: torch.Tensor, item_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User and item vectors of one step in one call: DistributedDataParallel syncs through forward."""
        return self.users(user_rows), self.items(item_rows)

    @torch.no_grad()
    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """(user, item) float32 tables whose dot products equal the training logits."""
        dev = self.user.weight.device
        u = self.users(torch.arange(self.user.num_embeddings, device=dev)).cpu().numpy().astype(np.float32)
        return u, self.item_table()

    @torch.no_grad()
    def item_table(self) -> np.ndarray:
        rows = torch.arange(self.item.num_embeddings, device=self.item.weight.device)
        return self.items(rows).cpu().numpy().astype(np.float32)
