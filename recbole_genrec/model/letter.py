"""LETTER-TIGER (Wang et al., "Learnable Item Tokenization for Generative Recommendation", CIKM 2024).

TIGER on LETTER's item IDs (``tokenizer: letter``: RQ-VAE + collaborative and diversity regularisers, see
:mod:`recbole_genrec.tokenizer.letter`), trained with LETTER's ranking-guided generation loss (Sec. 3.2):
the teacher-forced cross-entropy of each ID token with the logits divided by a temperature ``tau``,

    L_rank = -sum_t log( exp(s(y_t) / tau) / sum_v exp(s(v) / tau) ),

where ``v`` ranges over the layer's codes. A smaller ``tau`` sharpens the softmax and weights hard
negatives more (the paper relates it to
ranking metrics); ``tau = 1`` is TIGER's loss. Beam search is TIGER's (ranking is
unaffected by a constant temperature).
"""
from recbole_genrec.model.seq2seq import token_cross_entropy
from recbole_genrec.model.tiger import TIGER
from recbole_genrec.utils import GenRecError


class LETTER(TIGER):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.ranking_temperature = float(config["ranking_temperature"] if config["ranking_temperature"] is not None
                                         else 1.0)
        if not self.ranking_temperature > 0:
            raise GenRecError(f"ranking_temperature must be > 0, got {self.ranking_temperature}")

    def token_loss(self, logits, codes, interaction=None):
        """LETTER's ranking-guided generation loss: cross-entropy of ``logits / tau`` per ID token."""
        return token_cross_entropy(logits, codes, temperature=self.ranking_temperature)

    def result_extras(self):
        return {**super().result_extras(), "ranking_temperature": self.ranking_temperature}
