"""RecBole ``Config`` with the plugin's model lookup, shared protocol and input checks.

Layering, lowest to highest priority (RecBole's own order, plus two plugin layers):
RecBole defaults < ``properties/overall.yaml`` (shared protocol) < ``properties/dataset/<dataset>.yaml``
< ``properties/model/<model>.yaml`` < config files < ``config_dict`` < command line.
"""
import os
from pathlib import Path

import torch
from recbole.config.configurator import Config as RecBoleConfig

from recbole_genrec.registry import get_model
from recbole_genrec.utils import GenRecError, keep_freed_memory_for_reuse

PROPERTIES_DIR = Path(__file__).resolve().parent.parent / "properties"

# Keys users may set that no yaml layer defines (never taken for typos of a defined key).
_NO_DEFAULT_KEYS = {"recipe", "text_fields", "resume", "seed", "model", "dataset"}

# Keys whose type is fixed by the protocol even when RecBole's default is None.
_TYPES_OF_NONE_DEFAULTS = {"MAX_ITEM_LIST_LENGTH": int, "train_time_budget": float}


def parse_cmd_args(args):
    """``['--k=v', ...]`` -> ``{'k': 'v'}``; anything else is a one-line error."""
    parsed = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise GenRecError(f"unrecognised argument {arg!r}: pass settings as --key=value")
        key, value = arg[2:].split("=", 1)
        if key in parsed and parsed[key] != value:
            raise GenRecError(f"--{key} is given twice with different values; keep one")
        parsed[key] = value
    return parsed


def model_yaml_chain(model, model_class):
    """Model yaml names from the root plugin ancestor down to ``model``: a derived model's yaml holds only what
    it adds or changes (``TIGER++`` reads ``TIGER.yaml`` then ``TIGER++.yaml``; ``SODA-L`` reads ``TIGER.yaml``,
    ``LETTER.yaml``, ``SODA-L.yaml``). Ancestors are the registered plugin classes in the model's MRO."""
    from recbole_genrec.model import MODEL_REGISTRY

    by_class = {path: name for name, path in MODEL_REGISTRY.items()}
    chain = []
    if isinstance(model_class, type):
        for cls in reversed(model_class.__mro__):
            name = by_class.get(f"{cls.__module__}:{cls.__qualname__}")
            if name is not None and name != model and name not in chain:
                chain.append(name)
    return chain + [model]


def parse_override_args(args):
    """``['--k=v', ...]`` -> ``{'k': value}`` with each value read as JSON where it parses (``3``, ``0.1``,
    ``true``, ``[1, 2]``) and kept as text otherwise; for tools that rebuild a config from a checkpoint."""
    import json

    overrides = {}
    for key, value in parse_cmd_args(args).items():
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return overrides


class Config(RecBoleConfig):
    """RecBole's ``Config`` that

    * finds plugin models first (``TIGER++``, ``SODA-T`` are accepted as typed);
    * applies ``properties/overall.yaml`` to every model, stock or plugin, so numbers are comparable;
    * reads the command line only when given ``cmd_args`` (library calls, pytest and Ray workers
      never have their ``sys.argv`` parsed);
    * leaves a ``CUDA_VISIBLE_DEVICES`` set by the user or by Ray alone and honours ``device``;
    * rejects config values of the wrong type with a one-line message.
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=None,
                 check_unknown_keys=True):
        self._cmd_args = list(cmd_args) if cmd_args is not None else []
        self._check_unknown_keys = check_unknown_keys  # comparisons check against every compared model's keys
        for path in config_file_list or []:
            if not os.path.isfile(path):
                raise GenRecError(f"config file {path!r} not found: check --config_files")
        # Plugin metrics (HeadHit, Coverage, PrefixMatch, ...) must be known before RecBole checks `metrics`.
        from recbole_genrec.evaluator.metrics import register_metrics

        register_metrics()
        try:
            super().__init__(model, dataset, config_file_list, config_dict)
        except (ValueError, TypeError, KeyError, NotImplementedError) as err:  # RecBole's checks of topk, eval_args...
            message = " ".join(str(err).split()).rstrip(".") or type(err).__name__
            raise GenRecError(f"{message}: change that setting (docs/bad_input.md lists the valid values)") from None
        # Looking a model up imports RecBole's sequential models, whose sine.py switches on
        # torch.autograd.set_detect_anomaly(True) for the whole process and slows every backward pass
        # (benchmarks/bench_anomaly_detection.py). Off unless the config asks for it.
        torch.autograd.set_detect_anomaly(bool(self.final_config_dict.get("detect_anomaly", False)))
        if self.final_config_dict.get("malloc_reuse", True):
            keep_freed_memory_for_reuse()
        self._check_types()
        self._check_protocol()
        self._check_training_settings()
        from recbole_genrec.checks import check_settings

        check_settings(self)  # every other setting the run reads (recbole_genrec/checks.py)

    # ---- RecBole hooks -------------------------------------------------------------------
    def compatibility_settings(self):
        # RecBole aliases removed numpy names (np.float = np.float_); numpy<2 is pinned, keep it harmless.
        try:
            super().compatibility_settings()
        except AttributeError:  # numpy 2: nothing to alias, nothing in RecBole 1.2.1's path needs them
            pass

    def _load_cmd_line(self):
        return self._convert_config_dict(parse_cmd_args(self._cmd_args))

    def _get_model_and_dataset(self, model, dataset):
        model = model if model is not None else self.external_config_dict.get("model")
        dataset = dataset if dataset is not None else self.external_config_dict.get("dataset")
        if model is None:
            raise GenRecError("no model given: pass --model=NAME (e.g. --model=SASRec)")
        if dataset is None:
            raise GenRecError("no dataset given: pass --dataset=NAME (e.g. --dataset=ml-100k)")
        if isinstance(model, str):
            model_class = get_model(model)
        else:
            model_class, model = model, model.__name__
        return model, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        self.internal_config_dict.pop("model", None)
        for path in (
            PROPERTIES_DIR / "overall.yaml",
            PROPERTIES_DIR / "semantic_ids.yaml",
            PROPERTIES_DIR / "dataset" / f"{dataset}.yaml",
            *[PROPERTIES_DIR / "model" / f"{name}.yaml" for name in model_yaml_chain(model, model_class)],
        ):
            if path.is_file():
                self._update_internal_config_dict(str(path))
        recipe = self.external_config_dict.get("recipe")
        if recipe:
            self._apply_recipe(str(recipe), model, model_class)

    def _apply_recipe(self, recipe, model, model_class):
        """``--recipe=NAME``: ``properties/recipe/NAME.yaml`` (or a yaml path) on top of the model's yaml, for
        models that accept recipes (``accepts_recipes = True``: the TIGER family), then ``properties/recipe/NAME/<M>.yaml``
        for each model ``M`` of the yaml chain where it exists; stock models ignore it, so
        ``--model=TIGER,SASRec --recipe=cpu`` changes TIGER only. Files and the command line still override it."""
        path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else PROPERTIES_DIR / "recipe" / f"{recipe}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (PROPERTIES_DIR / "recipe").glob("*.yaml"))
            raise GenRecError(f"recipe {recipe!r} not found ({path}): use one of {known} or a yaml file path")
        if getattr(model_class, "accepts_recipes", False):
            self._update_internal_config_dict(str(path))
            files = [str(path)]
            # Per-model refinements (e.g. GenPlugin's guidance start scaled to the recipe's epochs):
            # properties/recipe/NAME/<Model>.yaml along the model's yaml chain, ancestors first.
            for name in model_yaml_chain(model, model_class):
                extra = path.with_suffix("") / f"{name}.yaml"
                if extra.is_file():
                    self._update_internal_config_dict(str(extra))
                    files.append(str(extra))
            self.internal_config_dict["recipe_file"] = ",".join(files)

    def _set_default_parameters(self):
        # RecBole refuses CE-loss models (SASRec's default) unless negative sampling is switched off
        # by hand; the protocol ranks over all items, so switch it off unless the user set it.
        final = self.final_config_dict
        if final.get("loss_type") == "CE" and "train_neg_sample_args" not in self.external_config_dict:
            final["train_neg_sample_args"] = None
        super()._set_default_parameters()

    def _distributed_launch(self):
        """How this process joins a multi-process run, or ``None`` for a single process: spawned by ``--nproc``
        / started per machine (``local_rank`` set by :mod:`recbole_genrec.quick_start`), or by torchrun (its
        environment). An auxiliary run (the SASRec rank 0 trains for LETTER's CF embeddings or GenPlugin's
        retrieval, inside :func:`recbole_genrec.distributed.auxiliary_run`) is single-process."""
        from recbole_genrec import distributed

        final = self.final_config_dict
        if distributed.in_auxiliary_run():
            return None
        if "local_rank" in self.external_config_dict and int(final.get("world_size") or 1) > 1:
            return {"local_rank": int(final["local_rank"]), "offset": int(final.get("offset") or 0),
                    "world_size": int(final["world_size"]), "nproc": int(final.get("nproc") or 1),
                    "ip": str(final.get("ip") or "localhost"), "port": str(final.get("port") or "5678"),
                    "from_env": False}
        env = distributed.torchrun_env()
        if env is None:
            return None
        return {**{k: env[k] for k in ("local_rank", "offset", "world_size", "nproc", "ip", "port")},
                "from_env": True}

    def _init_device(self):
        launch = self._distributed_launch()
        if launch is not None:
            return self._init_distributed(launch)
        self.final_config_dict.pop("local_rank", None)  # RecBole would read it as a (CUDA-only) DDP launch
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        user_gpu = "gpu_id" in self.external_config_dict
        if visible is not None and not user_gpu:
            # RecBole would overwrite CUDA_VISIBLE_DEVICES with its default gpu_id '0'.
            self.final_config_dict["gpu_id"] = visible
        super()._init_device()
        requested = self.external_config_dict.get("device")
        if requested is None:
            requested = "cuda" if self.final_config_dict.get("use_gpu", True) else "cpu"
            if requested == "cuda" and not torch.cuda.is_available():
                requested = "cpu"
        if not isinstance(requested, (str, torch.device)):
            raise GenRecError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {requested!r}")
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise GenRecError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {requested!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise GenRecError("--device=cuda was asked for but no CUDA GPU is visible: use --device=cpu")
        self.final_config_dict["device"] = device

    def _init_distributed(self, launch):
        """Join the process group with ``ddp_backend`` (gloo on CPU, nccl on CUDA) instead of RecBole's
        NCCL-only path; rank ``local_rank`` of this machine uses GPU ``local_rank`` when CUDA is used."""
        from recbole_genrec import distributed

        final = self.final_config_dict
        requested = self.external_config_dict.get("device")
        use_cuda = torch.cuda.is_available() and final.get("use_gpu", True) and requested != "cpu"
        if requested is not None and str(requested).startswith("cuda") and not torch.cuda.is_available():
            raise GenRecError("--device=cuda was asked for but no CUDA GPU is visible: use --device=cpu")
        if use_cuda:
            if launch["local_rank"] >= torch.cuda.device_count():
                raise GenRecError(f"--nproc={launch['nproc']} needs {launch['nproc']} visible GPUs, this machine "
                                  f"has {torch.cuda.device_count()}: lower --nproc or use --device=cpu")
            device = torch.device("cuda", launch["local_rank"])
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        backend = distributed.resolve_backend(final.get("ddp_backend"), device)
        global_rank = launch["local_rank"] + launch["offset"]
        if not 0 <= global_rank < launch["world_size"]:
            raise GenRecError(f"rank {global_rank} (local_rank {launch['local_rank']} + offset "
                              f"{launch['offset']}) is outside world_size {launch['world_size']}: check --offset")
        distributed.init_process_group(backend, global_rank, launch["world_size"], launch["ip"], launch["port"],
                                       from_env=launch["from_env"], timeout_seconds=final.get("ddp_timeout"))
        final.update({"local_rank": launch["local_rank"], "offset": launch["offset"],
                      "world_size": launch["world_size"], "nproc": launch["nproc"], "ip": launch["ip"],
                      "port": launch["port"], "ddp_backend": backend, "device": device, "single_spec": False})
        if global_rank != 0:  # as RecBole: rank 0 logs and shows progress, the others report errors only
            final.update({"state": "warning", "show_progress": False, "verbose": False})

    # ---- checks ---------------------------------------------------------------------------
    def check_unknown_keys(self, known):
        """Raise for a user key that no layer defines but that is one edit away from a ``known`` key."""
        import difflib

        for key in self.external_config_dict:
            if key in known or key in _NO_DEFAULT_KEYS:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
            if close:
                raise GenRecError(f"unknown setting {key!r}: did you mean {close[0]!r}? (a misspelt key would be "
                                  "ignored silently)")

    def _check_types(self):
        """A user value must have the type of the default it overrides (ints may stand for floats); a key no
        layer defines that is one edit away from one that is (``lerning_rate``) is a typo, not a new setting."""
        if self._check_unknown_keys:
            self.check_unknown_keys(set(self.internal_config_dict))
        for key, value in self.external_config_dict.items():
            default = self.internal_config_dict.get(key)
            expected = type(default) if default is not None else _TYPES_OF_NONE_DEFAULTS.get(key)
            if expected is None or value is None or key in ("device",):
                continue
            ok = isinstance(value, expected)
            if expected is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif expected is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif expected is bool:
                ok = isinstance(value, bool)
            elif expected in (list, tuple):
                ok = isinstance(value, (list, tuple))
            if not ok:
                raise GenRecError(
                    f"config key {key!r} expects {expected.__name__} (default {default!r}), "
                    f"got {type(value).__name__} {value!r}: change its value"
                )

    def _check_training_settings(self):
        """Schedule and precision are checked here, before any data preparation (the trainer re-reads them)."""
        from recbole_genrec.trainer.schedule import LRSchedule, resolve_precision

        LRSchedule.from_config(self)
        resolve_precision(self["precision"], self["device"])

    def _check_protocol(self):
        metric, _, k = str(self["valid_metric"]).partition("@")
        metrics = [m.lower() for m in self["metrics"]]
        if metric.lower() not in metrics or (k and (not k.isdigit() or int(k) not in self["topk"])):
            raise GenRecError(
                f"valid_metric {self['valid_metric']!r} is not among metrics {self['metrics']} at topk "
                f"{self['topk']}: add it there or choose another valid_metric"
            )
