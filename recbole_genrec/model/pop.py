"""Pop: RecBole's popularity baseline with every training interaction counted.

RecBole 1.2.1's ``Pop.calculate_loss`` does ``item_cnt[item] = item_cnt[item] + 1``; an item that occurs
several times in one batch is counted once, so the scores (and ml-100k's NDCG@10: 0.0408 at batch 2048,
0.0316 at 2560) depend on ``train_batch_size`` (RecBole issues #1844 and #2198); and the sampled negatives
of its pointwise training batches (label 0) are counted as if they were interactions. This subclass
counts each positive interaction once, so the ranking is the training-set popularity whatever the batch
size or negative sampling. Everything else is RecBole's model unchanged; ``--model=Pop`` resolves here
before RecBole.
"""
import torch
from recbole.model.general_recommender.pop import Pop as RecBolePop


class Pop(RecBolePop):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.LABEL = config["LABEL_FIELD"]

    def calculate_loss(self, interaction):
        item = interaction[self.ITEM_ID]
        if self.LABEL in interaction.interaction:  # pointwise batches with sampled negatives
            item = item[interaction[self.LABEL] > 0]
        self.item_cnt.index_add_(0, item, torch.ones_like(item).unsqueeze(-1))
        self.max_cnt = torch.max(self.item_cnt, dim=0)[0]
        return torch.nn.Parameter(torch.zeros(1)).to(self.device)
