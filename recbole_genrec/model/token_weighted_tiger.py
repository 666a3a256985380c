"""TokenWeightedTIGER: TIGER trained with token-weighted, multi-target, curriculum losses.

Paper: "Token-Weighted Multi-Target Learning for Generative Recommenders with Curriculum Learning"
(Sec. 4). The backbone, inputs and beam search are TIGER's; only the training loss changes
(:meth:`TokenWeightedTIGER.weighted_token_loss`). ``token_loss`` picks the objective:

=================  ==========================================================================
``fg_fr_mt_cl``    full method: L_fg, L_fr, L_or with learnable lambda_j -> alpha_j, curriculum (Eq. 4.2.2)
``fg_fr_mt``       Table 4 "+ multi-target": as above without the curriculum
``fg_fr``          Table 4 "+ Frequency": linear schedule Front-Greater -> CE -> Frequency
``fg``             Table 4 "Front-Greater": linear schedule Front-Greater -> CE
``pos``            Table 3 Pos: linearly decreasing position weights
``cft``            Table 3 CFT-style front-token upweighting
``igd``            Table 3 IGD: Shannon information gain of each token given its prefix
``rank``           Table 3 Rank (LETTER): CE on logits / rank_temperature
``ce``             plain TIGER cross-entropy
=================  ==========================================================================

``mt_form`` chooses how alpha_j enters the multi-target loss: ``logit`` (the paper's equation as written:
``-w_i log softmax(alpha_j f)[y_i]`` summed over j), ``linear`` (its simplified form ``sum_j alpha_j L_j``), or
``uncertainty`` (the official code's variant: learned uncertainty terms ``sum_j exp(-s_j) L_j + s_j``, where
the curriculum is computed and logged but not applied).
"""
import io
import json
import os
from logging import getLogger

import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_genrec import distributed
from recbole_genrec.model import token_weights as tw
from recbole_genrec.model.seq2seq import token_cross_entropy
from recbole_genrec.model.tiger import TIGER
from recbole_genrec.trainer import Trainer
from recbole_genrec.utils import GenRecError, atomic_write_bytes, atomic_write_json

TOKEN_LOSSES = ("fg_fr_mt_cl", "fg_fr_mt", "fg_fr", "fg", "pos", "cft", "igd", "rank", "ce")
MT_FORMS = ("logit", "linear", "uncertainty")
OBJECTIVES = ("fg", "fr", "or")


class TokenWeightTrainer(Trainer):
    """Tells the model the planned number of steps (linear schedules), logs alpha_j / lambda_j after each
    training epoch and saves their history (JSON + PNG) next to the checkpoint, atomically."""

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        if hasattr(self.model, "set_total_steps"):
            self.model.set_total_steps(len(train_data) * int(self.epochs))
        return super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                           callback_fn=callback_fn)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        if hasattr(self.model, "record_objective_weights"):
            row = self.model.record_objective_weights(epoch_idx)
            self.logger.info(f"epoch {epoch_idx} token-loss weights: {json.dumps(row)}")
            if distributed.is_main():  # several processes: rank 0 writes, as with checkpoints
                stem = os.path.splitext(self.saved_model_file)[0]
                self.model.save_weight_history(stem + "-token_weights")
        return loss


class TokenWeightedTIGER(TIGER):
    trainer_class = TokenWeightTrainer

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        get = lambda k, d: d if config[k] is None else config[k]  # noqa: E731
        self.mode = str(get("token_loss", "fg_fr_mt_cl")).lower()
        if self.mode not in TOKEN_LOSSES:
            raise GenRecError(f"token_loss must be one of {list(TOKEN_LOSSES)}, got {config['token_loss']!r}")
        self.mt_form = str(get("mt_form", "logit")).lower()
        if self.mt_form not in MT_FORMS:
            raise GenRecError(f"mt_form must be one of {list(MT_FORMS)}, got {config['mt_form']!r}")
        self.beta = float(get("freq_beta", 0.99))
        if not 0.0 < self.beta < 1.0:
            raise GenRecError(f"freq_beta must be in (0, 1), got {self.beta}")
        self.curriculum_c = float(get("curriculum_c", 2e-5))
        if self.curriculum_c < 0:
            raise GenRecError(f"curriculum_c must be >= 0, got {self.curriculum_c}")
        self.rank_temperature = float(get("rank_temperature", 1.0))
        if self.rank_temperature <= 0:
            raise GenRecError(f"rank_temperature must be > 0, got {self.rank_temperature}")
        self.linear_schedule_steps = int(get("linear_schedule_steps", 0))
        self.total_steps = self.linear_schedule_steps
        L = self.layout.num_layers

        sids = self.semantic_ids  # the object TIGER built: its item embeddings give the Front-Greater weights
        emb = getattr(sids, "embeddings", None)
        if emb is not None:
            w_fg, mu = tw.front_greater_weights(emb, sids.codes)
        else:
            w_fg, mu = torch.ones(L, dtype=torch.float64), torch.zeros(L + 1, dtype=torch.float64)
        train_items = dataset.inter_feat[dataset.iid_field].long()
        counts = tw.token_counts(self.layout.codes[train_items].cpu(), self.layout.codebook_sizes)
        item_freq = torch.bincount(train_items, minlength=self.n_items).double()
        fr_items = tw.frequency_weights(self.layout.codes.cpu(), counts, self.beta)  # [n_items, L]
        self.register_buffer("w_fg", w_fg.float(), persistent=False)
        self.register_buffer("w_fr_items", fr_items.float(), persistent=False)
        static = None
        if self.mode == "pos":
            static = tw.position_weights(L)
        elif self.mode == "cft":
            static = tw.cft_weights(L, int(get("cft_front_tokens", 1)), float(get("cft_front_weight", 2.0)))
        self.register_buffer("w_static", (static if static is not None else torch.ones(L)).float(), persistent=False)
        if self.mode == "igd":
            igd = torch.ones(self.n_items, L, dtype=torch.float64)
            igd[1:] = tw.information_gain_weights(self.layout.codes[1:].cpu(), item_freq[1:])
            self.register_buffer("w_igd_items", igd.float(), persistent=False)
        self.register_buffer("global_step", torch.zeros((), dtype=torch.long))
        # lambda_j = exp(rho_j) > 0, initialised equal (lambda_j = mt_lambda_init).
        init = float(get("mt_lambda_init", 1.0))
        self.mt_log_lambda = nn.Parameter(torch.full((3,), float(torch.tensor(init).log())))
        self.mt_log_var = nn.Parameter(torch.zeros(3))  # mt_form=uncertainty only
        self.weight_history = []
        self.weights_plot_path = None
        self.token_weight_report = {
            "prefix_dispersion": [float(x) for x in mu],
            "front_greater_weights": [float(x) for x in w_fg],
            "frequency_beta": self.beta,
            "frequency_weight_mean_per_layer": [float(x) for x in fr_items[1:].mean(0)],
        }
        getLogger().info(f"TokenWeightedTIGER token_loss={self.mode}: mu_0..mu_L={self.token_weight_report['prefix_dispersion']}"
                         f", Front-Greater weights={self.token_weight_report['front_greater_weights']}")

    def set_total_steps(self, steps):
        if self.linear_schedule_steps <= 0:
            self.total_steps = int(steps)

    # ---- objective weights --------------------------------------------------------------------
    def lambdas(self):
        return self.mt_log_lambda.exp()

    def curriculum(self, step=None):
        t = int(self.global_step) if step is None else step
        if self.mode == "fg_fr_mt_cl":
            return tw.curriculum_factors(t, self.curriculum_c)
        return 1.0, 1.0, 1.0

    def alphas(self, step=None):
        """``alpha'_j`` for (fg, fr, or) at ``step`` (default: the current global step)."""
        if self.mt_form == "uncertainty":
            prec = (-self.mt_log_var).exp()
            return prec / prec.sum()
        return tw.normalised_alphas(self.lambdas(), self.curriculum(step))

    def objective_weights(self):
        """The logged values (paper Fig. 5): step, alpha_j, lambda_j and curriculum lambda'_j."""
        with torch.no_grad():
            lam = self.lambdas()
            fac = self.curriculum()
            alpha = self.alphas()
            row = {"step": int(self.global_step)}
            for j, name in enumerate(OBJECTIVES):
                row[f"alpha_{name}"] = float(alpha[j])
                row[f"lambda_{name}"] = float(lam[j])
                row[f"lambda_prime_{name}"] = float(lam[j] * fac[j])
                if self.mt_form == "uncertainty":
                    row[f"log_var_{name}"] = float(self.mt_log_var[j])
        return row

    def record_objective_weights(self, epoch_idx):
        row = dict(self.objective_weights(), epoch=int(epoch_idx))
        self.weight_history.append(row)
        return row

    def save_weight_history(self, stem):
        """``stem.json`` (history) and ``stem.png`` (alpha_j and lambda_j over training), both atomic."""
        atomic_write_json(stem + ".json", {"token_loss": self.mode, "mt_form": self.mt_form,
                                           "history": self.weight_history, **self.token_weight_report})
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.weight_history]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for name in OBJECTIVES:
            axes[0].plot(steps, [r[f"alpha_{name}"] for r in self.weight_history], marker="o", label=name)
            axes[1].plot(steps, [r[f"lambda_{name}"] for r in self.weight_history], marker="o", label=name)
        axes[0].set_title(f"alpha_j ({self.mode})")
        axes[1].set_title("lambda_j (learned)")
        for ax in axes:
            ax.set_xlabel("training step")
            ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(stem + ".png", buf.getvalue())
        self.weights_plot_path = os.path.abspath(stem + ".png")
        return self.weights_plot_path

    # ---- loss -----------------------------------------------------------------------------------
    def token_loss(self, logits, codes, interaction=None):
        """TIGER's loss hook: the selected objective; the item-dependent weights read the batch's target items.
        A training call advances the global step t of the schedules and the curriculum."""
        item = interaction[self.POS_ITEM_ID] if interaction is not None else None
        loss = self.weighted_token_loss(logits, codes, item)
        if self.training and interaction is not None:
            self.global_step += 1
        return loss

    @staticmethod
    def _scaled_ce(logits, codes, scale):
        """Per-token CE ``[B, L]`` of ``scale * logits`` (the padding columns stay ``-inf``)."""
        finite = torch.isfinite(logits)  # zero the -inf columns first: 0 * -inf would make d/d(alpha) NaN
        scaled = torch.where(finite, logits.masked_fill(~finite, 0.0) * scale, logits)
        return token_cross_entropy(scaled, codes, reduction="none")

    def _linear_progress(self):
        return tw.linear_progress(int(self.global_step), self.total_steps)

    def weighted_token_loss(self, logits, codes, item=None):
        """The selected objective on per-layer logits ``[B, L, K_max]``, codes ``[B, L]``, target items ``[B]``."""
        mode = self.mode
        if mode == "ce":
            return token_cross_entropy(logits, codes)
        if mode == "rank":
            return token_cross_entropy(logits, codes, temperature=self.rank_temperature)
        if mode in ("pos", "cft"):
            return token_cross_entropy(logits, codes, weights=self.w_static)
        if item is None:
            raise GenRecError(f"token_loss={mode} needs the target items: call weighted_token_loss(logits, codes, item)")
        if mode == "igd":
            return token_cross_entropy(logits, codes, weights=self.w_igd_items[item])
        w_fr = self.w_fr_items[item]
        if mode == "fg":
            return token_cross_entropy(logits, codes, weights=tw.linear_fg_schedule(self.w_fg, self._linear_progress()))
        if mode == "fg_fr":
            w = tw.linear_fg_fr_schedule(self.w_fg, w_fr, self._linear_progress())
            return token_cross_entropy(logits, codes, weights=w)
        weights = (self.w_fg.expand_as(w_fr), w_fr, None)
        if self.mt_form == "logit":  # Sec. 4.2.1 as written: alpha_j scales the logits before the softmax
            alpha = self.alphas()
            total = 0.0
            for j, w in enumerate(weights):
                ce = self._scaled_ce(logits, codes, alpha[j])
                total = total + (ce * w if w is not None else ce).mean()
            return total
        ce = token_cross_entropy(logits, codes, reduction="none")
        losses = [(ce * w if w is not None else ce).mean() for w in weights]
        if self.mt_form == "linear":  # the simplified objective sum_j alpha'_j L_j
            alpha = self.alphas()
            return sum(alpha[j] * losses[j] for j in range(3))
        # uncertainty (official code's variant): learned log-variances, no curriculum applied
        return sum((-self.mt_log_var[j]).exp() * losses[j] + self.mt_log_var[j] for j in range(3))

    def result_extras(self):
        out = super().result_extras()
        out["token_weighting"] = {
            "token_loss": self.mode, "mt_form": self.mt_form, "curriculum_c": self.curriculum_c,
            "global_step": int(self.global_step), "total_steps": self.total_steps,
            "final_objective_weights": self.objective_weights(), "history": self.weight_history,
            "weights_plot": self.weights_plot_path, **self.token_weight_report,
        }
        return out
