"""Product quantisation (Jegou et al., TPAMI 2011): the embedding is split into L equal segments
(``torch.tensor_split``: sizes differ by at most one when d is not divisible by L) and each segment gets
its own k-means codebook; code ``l`` is the nearest centroid of segment ``l``."""
import time

import torch

from recbole_genrec.tokenizer.base import Tokenizer, kmeans, soft_assign
from recbole_genrec.utils import progress


class PQTokenizer(Tokenizer):
    name = "pq"

    def fit(self, embeddings, cf_embeddings=None):
        start = time.perf_counter()
        x = embeddings.to(self.device, torch.float32)
        if x.shape[1] < self.num_layers:
            from recbole_genrec.utils import GenRecError

            raise GenRecError(f"pq needs embedding dim >= num_codebooks, got {x.shape[1]} < {self.num_layers}")
        segments = torch.tensor_split(x, self.num_layers, dim=1)
        codes, soft, mse, self.codebooks = [], [], [], []
        for layer, seg in enumerate(progress(segments, desc=f"{self.name} k-means", unit="segment")):
            seg = seg.contiguous()
            centers, assign, dist = kmeans(seg, self.codebook_size, self.kmeans_iters, self.generator(layer))
            temperature = float(dist.mean())
            if self.keep_soft:
                soft.append(soft_assign(seg, centers, temperature).cpu())
            codes.append(assign.cpu())
            mse.append(temperature)
            self.codebooks.append(centers)
        self._last_inputs, self._last_codebook = segments[-1].contiguous(), self.codebooks[-1]
        self.soft_probs = soft if self.keep_soft else None
        self.stats = {"layer_mse": mse, "segment_dims": [s.shape[1] for s in segments],
                      "fit_seconds": round(time.perf_counter() - start, 3)}
        return torch.stack(codes, dim=1)
