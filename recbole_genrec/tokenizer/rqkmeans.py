"""Residual k-means (no network): layer ``l`` runs k-means on the residuals ``r_l = r_{l-1} - c_{l-1}[k_{l-1}]``,
``r_1 = x`` - residual quantisation as in Lee et al. (CVPR 2022, Eq. 1) with k-means codebooks. Fast and
deterministic given the seed."""
import time

import torch

from recbole_genrec.tokenizer.base import ROW_CHUNK, Tokenizer, kmeans, nearest, soft_assign
from recbole_genrec.tokenizer.collision import row_keys
from recbole_genrec.utils import progress


class RQKMeansTokenizer(Tokenizer):
    """Layer ``l > 1`` fits its codebook on the residuals of items whose prefix is still shared with another
    item (a unique prefix already identifies its item; on small catalogues those items' near-zero residuals
    would otherwise crowd the codebook), then assigns every item to its nearest code."""

    name = "rqkmeans"

    @staticmethod
    def _ambiguous_rows(codes):
        _, inverse, counts = torch.unique(row_keys(torch.stack(codes, 1)), return_inverse=True,
                                          return_counts=True)
        return (counts[inverse] > 1).nonzero().flatten()

    def fit(self, embeddings, cf_embeddings=None):
        start = time.perf_counter()
        residual = embeddings.to(self.device, torch.float32).clone()
        n = residual.shape[0]
        codes, soft, mse, self.codebooks = [], [], [], []
        for layer in progress(range(self.num_layers), desc=f"{self.name} k-means", unit="layer"):
            last = layer == self.num_layers - 1
            if last:  # the last residual is not updated below, so it is kept without a copy
                self._last_inputs = residual
            fit_rows = self._ambiguous_rows(codes) if layer else None
            if fit_rows is not None and len(fit_rows) >= self.codebook_size:
                # the ambiguous rows are clustered in place (kmeans(rows=...)), not copied: 1.5 GB at 1M x 384
                rows = None if len(fit_rows) == n else fit_rows.to(residual.device)
                centers, _, _ = kmeans(residual, self.codebook_size, self.kmeans_iters, self.generator(layer),
                                       rows=rows)
                assign, dist = nearest(residual, centers)
            else:
                centers, assign, dist = kmeans(residual, self.codebook_size, self.kmeans_iters,
                                               self.generator(layer))
            temperature = float(dist.mean())
            if self.keep_soft:
                soft.append(soft_assign(residual, centers, temperature).cpu())
            if not last:  # in row chunks: no [n, d] gather of the assigned centres
                for s in range(0, n, ROW_CHUNK):
                    residual[s:s + ROW_CHUNK] -= centers[assign[s:s + ROW_CHUNK]]
            codes.append(assign.cpu())
            mse.append(temperature)
            self.codebooks.append(centers)
        self._last_codebook = self.codebooks[-1]
        self.soft_probs = soft if self.keep_soft else None
        self.stats = {"layer_mse": mse, "fit_seconds": round(time.perf_counter() - start, 3)}
        return torch.stack(codes, dim=1)
