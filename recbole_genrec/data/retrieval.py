"""User-to-user retrieval for GenPlugin's retrieval-augmented generation (Yang et al., DASFAA 2026, Sec. 3.3).

Everything here sees the *training* split only (a user's validation and test items never enter a
pseudo-document or a SASRec profile) and never returns a user as its own neighbour.

* :func:`training_histories`: each user's training items (set, for the pseudo-document) and the last
  ``max_len`` of them in time order (for SASRec and the ID encoder), from a RecBole training dataset.
* :func:`bm25_topk`: content-aware retrieval, BM25 (``rank_bm25.BM25Okapi``'s idf, ``k1``, ``b``) of every
  user's pseudo-document against every other's, as one sparse matrix product per chunk of users.
* :func:`cosine_topk`: collaborative retrieval, cosine top-``z`` among user vectors (SASRec profiles).
* :func:`rerank_candidates`: the ``2z`` candidates re-ranked by cosine of the ID-view user vectors ``q``,
  users found by both paths kept first, ``v`` kept.
* :func:`sasrec_user_vectors`: RecBole's SASRec on the same split (shared with LETTER's CF embeddings,
  :mod:`recbole_genrec.data.collab_embeddings`), user vector = its sequence representation of the
  user's training history; cached (safetensors + checksummed sidecar).
"""
import re
import time
from logging import getLogger

import numpy as np
import torch

from recbole_genrec.data.cache import load_tensors, save_tensors, sha256_bytes, stable_hash
from recbole_genrec.utils import GenRecError, progress, timed_phase

RETRIEVAL_VERSION = 1
_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokenize(text):
    """Lower-cased word tokens (``\\w+``) of a text."""
    return _TOKEN.findall(text.lower())


def training_histories(dataset, max_len):
    """Training histories from a RecBole *training* split of a sequential dataset (augmented prefixes).

    Returns ``(pairs [P, 2], seq [n_users, max_len], seq_len [n_users])``: ``pairs`` are the distinct
    ``(user, item)`` training interactions (every target of a training row plus the first item of each
    history); ``seq[u]`` are the last ``max_len`` training items of user ``u`` in time order (left-aligned,
    0-padded, as RecBole's item lists), ``seq_len[u] = 0`` for a user without training rows (and user 0,
    padding). Rows of one user are in time order in RecBole's augmented data, so the user's last row
    (its history plus target) is the full training history.
    """
    feat = dataset.inter_feat
    uid = feat[dataset.uid_field].long()
    target = feat[dataset.iid_field].long()
    item_list = feat[dataset.iid_field + dataset.config["LIST_SUFFIX"]].long()
    lengths = feat[dataset.config["ITEM_LIST_LENGTH_FIELD"]].long()
    n_users = int(dataset.user_num)
    pairs = torch.unique(torch.stack([torch.cat([uid, uid]), torch.cat([target, item_list[:, 0]])], 1), dim=0)
    pairs = pairs[pairs[:, 1] > 0]
    rows = torch.arange(uid.shape[0])
    last = torch.full((n_users,), -1, dtype=torch.long).scatter_reduce(0, uid, rows, reduce="amax")
    has = last >= 0
    width = item_list.shape[1]
    full = torch.zeros(n_users, width + 1, dtype=torch.long)
    full_len = torch.zeros(n_users, dtype=torch.long)
    r = last[has]
    full[has, :width] = item_list[r]
    full[has.nonzero(as_tuple=True)[0], lengths[r]] = target[r]
    full_len[has] = lengths[r] + 1
    # keep the last max_len items, left-aligned
    keep = full_len.clamp(max=max_len)
    start = full_len - keep
    idx = start[:, None] + torch.arange(max_len)[None, :]
    seq = full.gather(1, idx.clamp(max=width)).masked_fill(torch.arange(max_len)[None, :] >= keep[:, None], 0)
    return pairs, seq, keep


def pseudo_documents(texts, pairs, n_users):
    """Token lists, one per user id: the concatenated texts of the user's training items (paper Sec. 3.3)."""
    item_tokens = [tokenize(t) for t in texts]
    docs = [[] for _ in range(n_users)]
    for u, i in pairs.tolist():  # once per run (cached by the caller), not a hot path
        docs[u].extend(item_tokens[i])
    return docs


def _bm25_matrices(docs, k1, b, epsilon):
    """``(Q [U, V], W [U, V])`` scipy CSR: ``Q[u, t]`` = count of term t in u's document (as a query),
    ``W[d, t]`` = BM25Okapi's per-term document score ``idf(t) tf (k1+1) / (tf + k1 (1 - b + b |d| / avgdl))``,
    so that ``(Q W^T)[u, d]`` equals ``BM25Okapi(non-empty docs).get_scores(docs[u])[d]``. The index holds the
    non-empty documents only (an empty one is a zero row of both)."""
    from rank_bm25 import BM25Okapi
    from scipy import sparse

    ids = [u for u, d in enumerate(docs) if d]
    bm25 = BM25Okapi([docs[u] for u in ids], k1=k1, b=b, epsilon=epsilon)
    vocab = {t: j for j, t in enumerate(bm25.idf)}
    idf = np.array([bm25.idf[t] for t in vocab], dtype=np.float64)
    doc_len = np.asarray(bm25.doc_len, dtype=np.float64)
    rows, cols, tfs, pos = [], [], [], []
    for k, freqs in enumerate(bm25.doc_freqs):  # once per run, cached by the caller
        rows.extend([ids[k]] * len(freqs))
        pos.extend([k] * len(freqs))
        cols.extend(vocab[t] for t in freqs)
        tfs.extend(freqs.values())
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    tfs, pos = np.asarray(tfs, dtype=np.float64), np.asarray(pos, dtype=np.int64)
    norm = k1 * (1 - b + b * doc_len[pos] / bm25.avgdl)
    shape = (len(docs), len(vocab))
    W = sparse.csr_matrix((idf[cols] * tfs * (k1 + 1) / (tfs + norm), (rows, cols)), shape=shape)
    Q = sparse.csr_matrix((tfs, (rows, cols)), shape=shape)
    return Q, W


def _masked_topk(scores, z, query_ids, valid):
    """Top-``z`` columns of ``scores [n, U]`` (rows = ``query_ids``), never the query itself or an invalid user."""
    scores = scores.masked_fill(~valid[None, :], float("-inf"))
    scores[torch.arange(len(query_ids)), query_ids] = float("-inf")
    return scores.topk(z, dim=1)


def check_candidate_count(z, valid, key="rar_z"):
    """``z`` must leave a candidate for every user: at most the number of *other* users with training history."""
    available = int(valid.sum()) - 1
    if z > available:
        raise GenRecError(f"{key}={z} exceeds the {available} other users with training history: "
                          f"set --{key} to at most {available}")


def bm25_topk(docs, z, k1=1.5, b=0.75, epsilon=0.25, chunk=2048):
    """``(neighbours [U, z], scores [U, z])`` by BM25 of each user's document as the query against every
    other user's (``docs`` indexed by user id; empty documents are never retrieved and retrieve nothing
    meaningful). One sparse product per chunk of ``chunk`` users."""
    valid = torch.tensor([len(d) > 0 for d in docs])
    check_candidate_count(z, valid)
    with timed_phase("bm25_retrieval"):
        Q, W = _bm25_matrices(docs, k1, b, epsilon)
        Wt = W.T.tocsr()
        out_n, out_s = [], []
        for start in progress(range(0, len(docs), chunk), desc="BM25 retrieval", unit="chunk"):
            ids = torch.arange(start, min(start + chunk, len(docs)))
            scores = torch.from_numpy(np.asarray((Q[start:start + chunk] @ Wt).todense(), dtype=np.float32))
            s, n = _masked_topk(scores, z, ids, valid)
            out_n.append(n)
            out_s.append(s)
    return torch.cat(out_n), torch.cat(out_s)


def cosine_topk(vectors, z, valid, chunk=4096):
    """``(neighbours [U, z], cosine [U, z])``: cosine top-``z`` of each row of ``vectors [U, d]`` among the
    ``valid [U]`` rows, itself excluded."""
    check_candidate_count(z, valid)
    x = torch.nn.functional.normalize(vectors.float(), dim=-1)
    out_n, out_s = [], []
    for start in range(0, x.shape[0], chunk):
        ids = torch.arange(start, min(start + chunk, x.shape[0]))
        s, n = _masked_topk(x[ids] @ x.t(), z, ids, valid.to(x.device))
        out_n.append(n)
        out_s.append(s)
    return torch.cat(out_n), torch.cat(out_s)


def rerank_candidates(content, collab, q, v):
    """Re-rank the dual-path candidates by ID semantics (paper Sec. 3.3).

    Args:
        content, collab: ``[U, z]`` candidate user ids from BM25 and from SASRec.
        q: ``[U, d]`` ID-view user representations (mean-pooled ID-encoder output, Eq. 3).
        v: users kept per target.

    Returns ``(neighbours [U, v], both [U, v] bool)``: the ``v`` candidates with the highest cosine of ``q``
    to the target, except that users found by both paths come first (kept regardless of their
    similarity; if more than ``v`` are, the ``v`` most similar of them); ``both`` marks them.
    """
    if v > content.shape[1]:
        raise GenRecError(f"rar_v={v} exceeds rar_z={content.shape[1]}: set --rar_v to at most rar_z")
    cand = torch.cat([content, collab], dim=1)  # [U, 2z]
    collab_in_content = (collab[:, :, None] == content[:, None, :]).any(-1)  # [U, z]
    content_in_collab = (content[:, :, None] == collab[:, None, :]).any(-1)  # [U, z]
    both = torch.cat([content_in_collab, collab_in_content], dim=1)
    duplicate = torch.cat([torch.zeros_like(collab_in_content), collab_in_content], dim=1)  # 2nd copy of a both-user
    qn = torch.nn.functional.normalize(q.float(), dim=-1)
    cos = (qn[:, None, :] * qn[cand]).sum(-1)  # [U, 2z], in [-1, 1]
    score = (cos + 3.0 * both.float()).masked_fill(duplicate, float("-inf"))
    top = score.topk(v, dim=1).indices
    return cand.gather(1, top), both.gather(1, top)


def sasrec_user_vectors(config, dataset, folder, seq, seq_len, settings, rebuild=False):
    """``(vectors [n_users, hidden], meta)``: RecBole's SASRec trained on the run's split (settings as
    :func:`recbole_genrec.data.collab_embeddings.train_sasrec`), applied to each user's training history
    ``seq [n_users, T]`` / ``seq_len [n_users]``; users with ``seq_len = 0`` get a zero row. Cached in
    ``folder`` keyed by the SASRec settings, the data and a hash of the histories."""
    from recbole_genrec.data.collab_embeddings import sasrec_cache_meta, train_sasrec

    key_meta = {**sasrec_cache_meta(config, dataset, settings), "kind": "rar_sasrec_users",
                "retrieval_version": RETRIEVAL_VERSION,
                "histories": sha256_bytes(seq.numpy().tobytes() + seq_len.numpy().tobytes())[:16]}
    path = folder / f"rar-sasrec-users-{stable_hash(key_meta)}.safetensors"
    hit = None if rebuild else load_tensors(path, key_meta)
    if hit is not None:
        vec = hit[0].get("user_vectors")
        if vec is not None and vec.shape == (seq.shape[0], settings["hidden_size"]):
            return vec.float(), {**hit[1], "path": str(path), "from_cache": True}
        getLogger().warning(f"cache {path} holds a malformed matrix; retraining it")
    start = time.perf_counter()
    model, trainer = train_sasrec(config, dataset, settings)
    model.eval()
    vec = torch.zeros(seq.shape[0], settings["hidden_size"])
    has = (seq_len > 0).nonzero(as_tuple=True)[0]
    device = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, has.shape[0], 1024):
            rows = has[s:s + 1024]
            vec[rows] = model.forward(seq[rows].to(device), seq_len[rows].to(device)).float().cpu()
    meta = {**key_meta, "train_seconds": round(time.perf_counter() - start, 3),
            "epochs_trained": len(trainer.timings["train_epoch_seconds"])}
    save_tensors(path, {"user_vectors": vec}, meta)
    return vec, {**meta, "path": str(path), "from_cache": False}
