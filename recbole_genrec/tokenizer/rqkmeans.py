"""Residual k-means (no network): layer ``l`` runs k-means on the residuals ``r_l = r_{l-1} - c_{l-1}[k_{l-1}]``,
``r_1 = x`` - residual quantisation as in Lee et al. (CVPR 2022, Eq. 1) with k-means codebooks. Fast and
deterministic given the seed."""
import time

import torch

from recbole_genrec.tokenizer.base import Tokenizer, kmeans, soft_assign


class RQKMeansTokenizer(Tokenizer):
    name = "rqkmeans"

    def fit(self, embeddings):
        start = time.perf_counter()
        residual = embeddings.to(self.device, torch.float32).clone()
        codes, soft, mse, self.codebooks = [], [], [], []
        for layer in range(self.num_layers):
            if layer == self.num_layers - 1:
                self._last_inputs = residual.clone()
            centers, assign, dist = kmeans(residual, self.codebook_size, self.kmeans_iters, self.generator(layer))
            temperature = float(dist.mean())
            if self.keep_soft:
                soft.append(soft_assign(residual, centers, temperature).cpu())
            residual -= centers[assign]
            codes.append(assign.cpu())
            mse.append(temperature)
            self.codebooks.append(centers)
        self._last_codebook = self.codebooks[-1]
        self.soft_probs = soft if self.keep_soft else None
        self.stats = {"layer_mse": mse, "fit_seconds": round(time.perf_counter() - start, 3)}
        return torch.stack(codes, dim=1)
