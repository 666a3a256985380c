"""Constrained beam search speed: ours vs transformers' generate(prefix_allowed_tokens_fn=...).

    OMP_NUM_THREADS=2 python benchmarks/bench_beam_search.py --dataset=ml-100k [--checkpoint=saved/TIGER-....pth]
        [--beam_size=20] [--reference_users=64] [--device=cpu]

Runs TIGER's beam search over every test user of the dataset (943 for ml-100k) and reports users/s for

* ``ours``: :class:`recbole_genrec.model.seq2seq.BeamDecoder` (encoder once per user, cross-attention K/V
  shared by a user's beams, per-beam self-attention cache) + the tensor trie search;
* ``hf-decoder-no-cache``: the same tensor search, but each step re-runs the HF T5 decoder on the full
  prefix with the encoder output copied per beam (the "tiny decoder on the full prefix" option);
* ``hf-generate``: ``t5.generate(num_beams=W, prefix_allowed_tokens_fn=...)``, the naive reference, on
  ``--reference_users`` users (extrapolated users/s), and checks that it returns the same items in the
  same order with the same scores as ours on those users.

Without ``--checkpoint`` the model is randomly initialised with a sharpened output layer (speed does
not depend on the weights; agreement is checked either way).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_genrec.evaluator.beam_search import constrained_beam_search, trie_beam_search  # noqa: E402
from recbole_genrec.model.seq2seq import PAD_TOKEN  # noqa: E402


def build(args):
    from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data
    from recbole_genrec.trainer import load_checkpoint

    cfg = {"show_progress": False, "state": "WARNING", "beam_size": args.beam_size, "device": args.device}
    config = load_config("TIGER", args.dataset, config_dict=cfg)
    dataset, train, valid, test = prepare_data(config)
    model, _ = build_model_and_trainer(config, train)
    if args.checkpoint:
        model.load_state_dict(load_checkpoint(args.checkpoint, map_location=config["device"])["state_dict"])
    else:
        with torch.no_grad():
            model.backbone.t5.lm_head.weight.mul_(20.0)
    model.eval()
    batches = [b[0].to(config["device"]) for b in test]
    return model, batches


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_ours(model, inputs, beam):
    trie = model.trie_on(inputs[0][0].device)
    out = []
    for ids, mask in inputs:
        for s in range(0, ids.shape[0], model.beam_batch_size):
            out.append(constrained_beam_search(model.backbone, ids[s:s + model.beam_batch_size],
                                               mask[s:s + model.beam_batch_size], trie, beam))
    return out


@torch.no_grad()
def run_no_cache(model, inputs, beam, chunk=64):
    """Same tensor search; every step runs the HF decoder on the whole prefix of every beam."""
    backbone, layout = model.backbone, model.layout
    trie = model.trie_on(inputs[0][0].device)
    out = []
    for ids_all, mask_all in inputs:
        for s in range(0, ids_all.shape[0], chunk):
            ids, mask = ids_all[s:s + chunk], mask_all[s:s + chunk]
            enc = backbone.encode(ids, mask)
            B = ids.shape[0]
            state = {"prefix": torch.full((B, 1), PAD_TOKEN, dtype=torch.long, device=ids.device),
                     "root": torch.arange(B, device=ids.device)}

            def step(depth, last, parent, enc=enc, mask=mask, state=state):
                if depth > 0:
                    tok = layout.offsets[depth - 1] + last
                    state["prefix"] = torch.cat([state["prefix"][parent], tok[:, None]], 1)
                    state["root"] = state["root"][parent]
                root = state["root"]
                hidden, _ = backbone.decode(state["prefix"], enc[root], mask[root])
                return torch.log_softmax(backbone.layer_logits(hidden[:, -1], depth).float(), -1)

            out.append(trie_beam_search(step, trie, B, beam))
    return out


@torch.no_grad()
def run_generate(model, ids, mask, beam):
    """transformers' beam search with a per-beam Python callback for the allowed tokens."""
    layout, t5 = model.layout, model.backbone.t5
    trie = model.trie_on("cpu")
    children = [c.tolist() for c in trie.children]
    offsets = layout.offsets.tolist()
    L = layout.num_layers
    allowed_cache = {}

    def allowed(batch_id, sent):
        toks = sent.tolist()[1:]
        key = tuple(toks)
        if key not in allowed_cache:
            node = 0
            for d, t in enumerate(toks):
                node = children[d][node][t - offsets[d]]
            depth = len(toks)
            if depth >= L or node < 0:
                allowed_cache[key] = [PAD_TOKEN]
            else:
                allowed_cache[key] = [offsets[depth] + c for c, n in enumerate(children[depth][node]) if n >= 0]
        return allowed_cache[key]

    # layer-restricted normalisation, as our decoder (and the training loss) uses: tokens outside
    # layer d's range get -inf before generate's log_softmax
    rows = []
    for d in range(L):
        m = torch.full((layout.vocab_size,), float("-inf"), device=ids.device)
        m[offsets[d]:offsets[d] + layout.codebook_sizes[d]] = 0.0
        rows.append(m)
    counter = {"step": 0}

    def hook(module, inputs, output):
        step = min(counter["step"], L - 1)
        counter["step"] += 1
        return output + rows[step]

    handle = t5.lm_head.register_forward_hook(hook)
    try:
        counter["step"] = 0
        gen = t5.generate(input_ids=ids, attention_mask=mask, num_beams=beam, num_return_sequences=beam,
                          max_new_tokens=L, min_new_tokens=L, do_sample=False, length_penalty=0.0,
                          early_stopping=True, prefix_allowed_tokens_fn=allowed, output_scores=True,
                          return_dict_in_generate=True, decoder_start_token_id=PAD_TOKEN)
    finally:
        handle.remove()
    seq = gen.sequences[:, 1:1 + L]
    codes = seq - layout.offsets
    items = trie.lookup(codes.cpu()).to(ids.device).view(ids.shape[0], beam)
    return items, gen.sequences_scores.view(ids.shape[0], beam)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--beam_size", type=int, default=20)
    p.add_argument("--reference_users", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip_no_cache", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--ids", default=None, help="semantic IDs exported by benchmarks/tiger_seeds.py (no text encoder)")
    args = p.parse_args()
    if args.ids:
        from benchmarks.tiger_seeds import use_exported_ids

        use_exported_ids(args.ids)
    model, batches = build(args)
    inputs = [model.encoder_input(b) for b in batches]
    n_users = sum(i[0].shape[0] for i in inputs)
    W = args.beam_size
    res = {"dataset": args.dataset, "beam_size": W, "users": n_users, "device": args.device,
           "threads": torch.get_num_threads(), "checkpoint": args.checkpoint}

    run_ours(model, [(inputs[0][0][:8], inputs[0][1][:8])], W)  # warm-up
    sync(args.device)
    t = time.perf_counter()
    ours = run_ours(model, inputs, W)
    sync(args.device)
    res["ours_seconds"] = time.perf_counter() - t
    res["ours_users_per_s"] = n_users / res["ours_seconds"]
    print(f"ours: {n_users} users in {res['ours_seconds']:.2f}s = {res['ours_users_per_s']:.1f} users/s", flush=True)
    ours_items = torch.cat([o[0] for o in ours])
    ours_scores = torch.cat([o[1] for o in ours])

    if not args.skip_no_cache:
        sync(args.device)
        t = time.perf_counter()
        nc = run_no_cache(model, inputs, W)
        sync(args.device)
        res["no_cache_seconds"] = time.perf_counter() - t
        res["no_cache_users_per_s"] = n_users / res["no_cache_seconds"]
        nc_items = torch.cat([o[0] for o in nc])
        res["no_cache_same_items"] = bool(torch.equal(nc_items, ours_items))
        print(f"hf-decoder-no-cache: {res['no_cache_users_per_s']:.1f} users/s, same items: "
              f"{res['no_cache_same_items']}", flush=True)

    R = min(args.reference_users, n_users)
    ids, mask = inputs[0][0][:R], inputs[0][1][:R]
    sync(args.device)
    t = time.perf_counter()
    ref_items, ref_scores = run_generate(model, ids, mask, W)
    sync(args.device)
    res["generate_seconds"] = time.perf_counter() - t
    res["generate_users"] = R
    res["generate_users_per_s"] = R / res["generate_seconds"]
    same_items = (ref_items == ours_items[:R]).all(1)
    res["generate_agreement_rows"] = f"{int(same_items.sum())}/{R}"
    res["generate_max_score_diff"] = float((ref_scores - ours_scores[:R]).abs().max())
    res["speedup_vs_generate"] = res["ours_users_per_s"] / res["generate_users_per_s"]
    print(f"hf-generate(prefix_allowed_tokens_fn): {res['generate_users_per_s']:.2f} users/s on {R} users; "
          f"identical ranked items on {res['generate_agreement_rows']} users, max |score diff| "
          f"{res['generate_max_score_diff']:.2e}; ours is {res['speedup_vs_generate']:.1f}x faster", flush=True)
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
