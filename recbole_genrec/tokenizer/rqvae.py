"""RQ-VAE tokenizer (Lee et al., CVPR 2022; as used for semantic IDs by TIGER, Rajput et al., NeurIPS 2023).

An MLP encoder maps x to a latent z; L codebooks quantise z residually (Lee et al. Eq. 1 / TIGER Sec. 3.1):
``r_1 = z``, ``c_l = argmin_k ||r_l - e_{l,k}||``, ``r_{l+1} = r_l - e_{l,c_l}``, ``z_hat = sum_l e_{l,c_l}``;
an MLP decoder reconstructs ``x_hat`` from ``z_hat`` (straight-through gradient). Loss (TIGER Eq. 2 /
Lee et al. Eq. 5):

    L = ||x - x_hat||^2 + sum_l ( ||sg[r_l] - e_{l,c_l}||^2 + beta * ||r_l - sg[e_{l,c_l}]||^2 ).

Training first fits the autoencoder alone for a few warm-up epochs, then initialises each codebook with
residual k-means on the latents (TIGER: "k-means initialisation"), then trains everything. Dead codes
(unused over the data) are re-seeded at random current residuals every few epochs, which keeps codebook
utilisation high.
"""
import time
from typing import NamedTuple, Optional

import torch
from torch import nn

from recbole_genrec.tokenizer.base import Tokenizer, kmeans, nearest, soft_assign
from recbole_genrec.utils import progress


class RQVAEOutput(NamedTuple):
    recon: torch.Tensor  # ||x - x_hat||^2, batch mean
    q_loss: torch.Tensor  # sum_l ||sg[r_l] - e_l||^2 + beta ||r_l - sg[e_l]||^2, batch mean
    codes: Optional[torch.Tensor]  # [n, L]
    z_st: torch.Tensor  # [n, d] straight-through quantised latent
    residuals: Optional[torch.Tensor]  # [L, n, d] the vectors quantised at each layer
    x_hat: torch.Tensor  # [n, d_in] reconstruction


def _mlp(dims):
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def residual_quantise(z, codebooks):
    """Residual quantisation of ``z`` ``[n, d]`` with ``codebooks`` ``[L, K, d]`` (hard nearest code per layer,
    TIGER Sec. 3.1 / SODA Eq. 2): ``(codes [n, L], z_hat [n, d], residuals: L x [n, d], quantised: L x [n, d])``.
    Gradients flow through the residuals and the chosen code vectors (pass ``codebooks.detach()`` to keep
    them off the codebooks); the code choice itself is not differentiable."""
    residual, codes, residuals, chosen = z, [], [], []
    for book in codebooks:
        idx, _ = nearest(residual.detach(), book.detach())
        e = book[idx]
        codes.append(idx)
        residuals.append(residual)
        chosen.append(e)
        residual = residual - e
    z_hat = torch.stack(chosen).sum(0)
    return torch.stack(codes, 1), z_hat, residuals, chosen


class RQVAE(nn.Module):
    def __init__(self, in_dim, hidden_dims, latent_dim, num_layers, codebook_size):
        super().__init__()
        self.encoder = _mlp([in_dim, *hidden_dims, latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(hidden_dims), in_dim])
        self.codebooks = nn.Parameter(torch.randn(num_layers, codebook_size, latent_dim) * 0.01)

    def quantise(self, z):
        """Residual quantisation of ``z`` with this model's codebooks (see :func:`residual_quantise`)."""
        return residual_quantise(z, self.codebooks)

    def forward(self, x, beta, quantise=True):
        """The RQ-VAE loss terms and what regularised variants need (LETTER, ETEGRec), as an :class:`RQVAEOutput`.

        ``z_st`` is the straight-through quantised latent (value ``z_hat``, gradient to the encoder), or ``z``
        itself when not quantising (autoencoder warm-up: ``q_loss = 0``, no codes/residuals).
        """
        z = self.encoder(x)
        if not quantise:
            x_hat = self.decoder(z)
            return RQVAEOutput(((x_hat - x) ** 2).sum(1).mean(), z.new_zeros(()), None, z, None, x_hat)
        codes, z_hat, residuals, chosen = self.quantise(z)
        q_loss = sum(((r.detach() - e) ** 2).sum(1).mean() + beta * ((r - e.detach()) ** 2).sum(1).mean()
                     for r, e in zip(residuals, chosen))
        z_st = z + (z_hat - z).detach()  # straight-through estimator
        x_hat = self.decoder(z_st)
        return RQVAEOutput(((x_hat - x) ** 2).sum(1).mean(), q_loss, codes, z_st, torch.stack(residuals), x_hat)


class RQVAETokenizer(Tokenizer):
    name = "rqvae"

    def __init__(self, latent_dim=32, hidden_dims=(512, 256, 128), epochs=100, lr=1e-3, batch_size=256,
                 commitment=0.25, **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = int(latent_dim)
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.commitment = float(commitment)
        self.model = None

    def config(self):
        return {**super().config(), "latent_dim": self.latent_dim, "hidden_dims": self.hidden_dims,
                "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "commitment": self.commitment}

    @torch.no_grad()
    def _reseed_dead_codes(self, x, gen):
        """Re-seed codes no item uses at random residuals of that layer (a sample of at most 20k items)."""
        if x.shape[0] > 20000:
            x = x[torch.randperm(x.shape[0], generator=gen)[:20000].to(x.device)]
        residual, reseeded = self.model.encoder(x), 0
        for book in self.model.codebooks:
            idx, _ = nearest(residual, book)
            dead = (torch.bincount(idx, minlength=book.shape[0]) == 0).nonzero().flatten()
            if len(dead) and residual.shape[0] >= book.shape[0]:
                pick = torch.randint(residual.shape[0], (len(dead),), generator=gen).to(x.device)
                book[dead] = residual[pick]
                reseeded += len(dead)
                idx, _ = nearest(residual, book)
            residual = residual - book[idx]
        return reseeded

    def fit(self, embeddings, cf_embeddings=None):
        start = time.perf_counter()
        x = embeddings.to(self.device, torch.float32)
        n = x.shape[0]
        gen = self.generator()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = RQVAE(x.shape[1], self.hidden_dims, self.latent_dim, self.num_layers,
                               self.codebook_size).to(self.device)
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr)
        warmup = max(1, self.epochs // 10)
        settle = self.epochs - max(1, self.epochs // 10)  # no re-seeding in the last 10% of epochs
        reseeded, history = 0, []
        for epoch in progress(range(self.epochs + warmup), desc=f"{self.name} fit", unit="epoch"):
            quantise = epoch >= warmup
            if epoch == warmup:
                self._init_codebooks(x)
            self.model.train()
            order = torch.randperm(n, generator=gen).to(self.device)
            tot, extra_tot = [0.0, 0.0], {}
            if quantise:
                self.epoch_start(epoch - warmup)
            for s in range(0, n, self.batch_size):
                rows = order[s:s + self.batch_size]
                recon, q_loss, codes, z_q = self.model(x[rows], self.commitment, quantise)[:4]
                extra = self.extra_losses(rows, codes, z_q) if quantise else {}
                loss = recon + q_loss + sum(extra.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot[0] += float(recon.detach()) * len(rows)
                tot[1] += float(q_loss.detach()) * len(rows)
                for name, value in extra.items():
                    extra_tot[name] = extra_tot.get(name, 0.0) + float(value.detach()) * len(rows)
            if quantise and epoch - warmup < settle and (epoch - warmup) % 5 == 4:
                self.model.eval()
                reseeded += self._reseed_dead_codes(x, gen)
            history.append([tot[0] / n, tot[1] / n, {k: v / n for k, v in extra_tot.items()}])
        codes = self._encode_all(x)
        self.stats = {"fit_seconds": round(time.perf_counter() - start, 3), "warmup_epochs": warmup,
                      "final_recon_loss": history[-1][0], "final_quant_loss": history[-1][1],
                      **{f"final_{k}_loss": v for k, v in history[-1][2].items()},
                      "dead_codes_reseeded": int(reseeded), **self.stats}
        return codes

    # ---- hooks for regularised variants (LETTER) -----------------------------------------------
    def epoch_start(self, epoch):
        """Called before each quantised epoch (``epoch`` counts from 0 after the warm-up)."""

    def extra_losses(self, rows, codes, z_q):
        """Weighted extra loss terms ``{name: scalar}`` added to the batch loss once quantising starts.

        ``rows``: the batch's row indices into the fitted embeddings; ``codes`` ``[B, L]``: their codes;
        ``z_q`` ``[B, d]``: straight-through quantised latents. Plain RQ-VAE adds nothing.
        """
        return {}

    @torch.no_grad()
    def _init_codebooks(self, x):
        """Residual k-means on the latents initialises the codebooks (TIGER Sec. 3.1)."""
        self.model.eval()
        residual = self.model.encoder(x)
        for layer, book in enumerate(self.model.codebooks):
            centers, assign, _ = kmeans(residual, self.codebook_size, self.kmeans_iters, self.generator(layer + 1))
            book.copy_(centers)
            residual = residual - centers[assign]

    @torch.no_grad()
    def _encode_all(self, x):
        self.model.eval()
        z = self.model.encoder(x)
        residual, codes, soft, mse = z, [], [], []
        for layer, book in enumerate(self.model.codebooks):
            idx, dist = nearest(residual, book)
            if layer == self.num_layers - 1:
                self._last_inputs, self._last_codebook = residual.clone(), book.detach().clone()
            if self.keep_soft:
                soft.append(soft_assign(residual, book, float(dist.mean())).cpu())
            mse.append(float(dist.mean()))
            codes.append(idx.cpu())
            residual = residual - book[idx]
        self.soft_probs = soft if self.keep_soft else None
        self.stats = {"layer_mse": mse}
        return torch.stack(codes, 1)
